"""pretrain_drl.py end to end on digits (tiny nets) and on generated CIFAR-10 (the published-size
nets), the checkpoint formats, sampling from a ckpt.pt alone, and the --init handoff into train_ssl.py."""
import json
import shutil

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import pretrain_drl
import train_ssl
from conftest import TINY_DRL, TINY_SSL, tiny
from laplacedrl import config as C
from laplacedrl.data import balanced_split, load_dataset
from laplacedrl.diffusion.ema import ExponentialMovingAverage
from laplacedrl.engine.checkpoint import DRL_CKPT, FORMATS, SSL_RUN, load_checkpoint, save_checkpoint
from laplacedrl.errors import UserError
from laplacedrl.engine.checkpoint import init_values
from laplacedrl.ssl.model import init_classifier
from laplacedrl.ssl.tsearch import T_SEARCH_VALUES

TINY_SSL = tiny(TINY_SSL, arch=None, sup_passes=2, epochs=1, eval_batch_size=None)   # --init sets the arch


def pretrain(tmp_path, *extra, name="drl"):
    out = tmp_path / name
    pretrain_drl.main(TINY_DRL + ["--out", str(out), *extra])
    return out


@pytest.fixture(scope="module")
def drl_run(tmp_path_factory):
    """One finished tiny DRL pretraining shared by the tests that only read it."""
    return pretrain(tmp_path_factory.mktemp("shared"))


def losses(out):
    acc = EventAccumulator(str(out))
    acc.Reload()
    return [e.value for e in acc.Scalars("pretrain/loss")]


@pytest.mark.parametrize("objective, sde", [("drl", "ve"), ("vdrl", "ve"), ("mixup-drl", "ve"),
                                            ("ae", "ve"), ("drl", "vp")])
def test_each_objective_trains_and_hands_over(tmp_path, objective, sde):
    out = pretrain(tmp_path, "--objective", objective, "--sde", sde)
    curve = losses(out)
    assert len(curve) == 4 and curve[-1] < 0.9 * curve[0], curve       # the loss falls
    ck = load_checkpoint(out / "ckpt.pt", DRL_CKPT)
    assert (ck["objective"], ck["sde"]["name"], ck["step"]) == (objective, sde, 40)
    assert ck["encoder_arch"]["time_cond"] is True and ck["encoder_arch"]["t_bias"] == "before_bn"
    assert (ck["head"] is not None) == (objective == "vdrl")
    assert ck["score_net_arch"]["decoder"] == (objective == "ae")
    assert not (out / "last.pt").exists()               # a finished run keeps one copy of the weights
    m = train_ssl.main(TINY_SSL + ["--init", str(out / "ckpt.pt"), "--out", str(tmp_path / "ssl")])
    ts = [h["t"] for h in m["history"]]
    assert len(ts) == 2 and m["t"] == ts[-1]
    assert all(0.35 <= t <= 0.65 for t in ts)             # published: t under decay, BN cancels its bias


def test_ckpt_holds_exactly_the_documented_keys_and_the_raw_encoder(tmp_path, drl_run):
    ck = torch.load(drl_run / "ckpt.pt", weights_only=True)
    assert set(ck) == set(FORMATS[DRL_CKPT]) | {"format", "version"}
    assert ck["encoder_weights"] == "raw" and ck["labeled"] is None        # digits: every image
    assert ck["dataset"] == {"name": "digits", "channels": 1, "image_size": 8, "data_dir": "data"}
    ema = pretrain(tmp_path, "--export", "ema", name="ema")
    ck_ema = torch.load(ema / "ckpt.pt", weights_only=True)
    w = next(k for k, v in ck["encoder"].items() if v.dim() == 4)
    assert not torch.equal(ck["encoder"][w], ck_ema["encoder"][w])       # raw vs EMA weights
    assert all(torch.equal(ck["score_net"][k], ck_ema["score_net"][k]) for k in ck["score_net"])


def test_pretraining_subset_is_the_splits_labeled_images(tmp_path):
    out = pretrain(tmp_path, "--pretrain-data", "labeled", "--labels", "40", "--seed", "3",
                   "--iters", "2", "--batch-size", "20")
    train, _, _ = load_dataset("digits")
    ck = load_checkpoint(out / "ckpt.pt", DRL_CKPT)
    assert ck["labeled"] == balanced_split(train.targets, 40, 10, 3).tolist()
    split = tmp_path / "split.txt"
    split.write_text("".join(train.label_line(i) + "\n" for i in (5, 9, 100, 200)))
    out2 = pretrain(tmp_path, "--pretrain-data", "labeled", "--label-file", str(split), "--iters", "2",
                    "--batch-size", "4", name="file")
    assert load_checkpoint(out2 / "ckpt.pt", DRL_CKPT)["labeled"] == [5, 9, 100, 200]
    with pytest.raises(UserError, match="exceeds the 4 pretraining images"):
        pretrain(tmp_path, "--pretrain-data", "labeled", "--label-file", str(split), name="big")
    assert not (tmp_path / "big").exists()


def test_init_loads_the_encoder_weights_with_a_fresh_head(drl_run):
    cfg = C.resolve(C.SSLConfig, {"init": str(drl_run / "ckpt.pt")}, init_values=init_values)
    assert cfg.dataset == "digits" and "--init" in cfg.dataset_source
    _, _, spec = load_dataset("digits")
    model = init_classifier(cfg, spec)
    enc = torch.load(drl_run / "ckpt.pt", weights_only=True)["encoder"]
    got = model.backbone.state_dict()
    same = [k for k in enc if not k.startswith("head.")]
    assert same and all(torch.equal(enc[k], got[k]) for k in same)
    assert float(model.t.detach()) == pytest.approx(0.5)


def test_published_t_barely_moves_and_after_bn_lets_it_learn(tmp_path, drl_run):
    frozen = train_ssl.main(TINY_SSL + ["--init", str(drl_run / "ckpt.pt"), "--freeze-t", "--t-init",
                                        "0.3", "--out", str(tmp_path / "f")])
    assert all(h["t"] == pytest.approx(0.3) for h in frozen["history"])
    after = pretrain(tmp_path, "--t-bias", "after_bn", name="after")
    moved = train_ssl.main(TINY_SSL + ["--init", str(after / "ckpt.pt"), "--no-t-weight-decay",
                                       "--lr", "0.3", "--out", str(tmp_path / "a")])
    assert abs(moved["t"] - 0.5) > 1e-3
    published = train_ssl.main(TINY_SSL + ["--init", str(drl_run / "ckpt.pt"), "--lr", "0.3",
                                           "--out", str(tmp_path / "p")])
    assert abs(published["t"] - 0.5) < 1e-3


def test_t_search_trains_eleven_supervised_phases_and_goes_on_from_the_best(tmp_path, drl_run, monkeypatch):
    from laplacedrl.recipes import ssl as recipe
    phases = []
    real = recipe.make_optimizer

    def counting(cfg, model):
        phases.append(float(model.t.detach()))
        return real(cfg, model)
    monkeypatch.setattr(recipe, "make_optimizer", counting)
    first_batches = []
    real_epoch = recipe.train_epoch

    def spy(model, opt, batches, *a, **k):
        batches = iter(batches)
        first = next(batches)
        first_batches.append(first[0].clone())

        def again():
            yield first
            yield from batches
        return real_epoch(model, opt, again(), *a, **k)
    monkeypatch.setattr(recipe, "train_epoch", spy)
    m = train_ssl.main(TINY_SSL + ["--init", str(drl_run / "ckpt.pt"), "--t-search", "--freeze-t",
                                   "--out", str(tmp_path / "s")])
    search = m["t_search"]
    # the phases are independent runs: each its own data order and augmentations (published)
    assert len(first_batches) == 11 + 1 and not torch.equal(first_batches[0], first_batches[1])
    assert len(search["phase_losses"]) == 11 and all(len(p) == 1 for p in search["phase_losses"])
    assert max(search["lowest_loss"]) - min(search["lowest_loss"]) > 1e-3
    assert search["t"] == pytest.approx(list(T_SEARCH_VALUES)) and len(search["t"]) == 11
    assert search["t"][0] == pytest.approx(0.01) and search["t"][-1] == pytest.approx(0.99)
    best = search["t"][int(np.argmin(search["lowest_loss"]))]
    assert search["chosen_t"] == best and m["history"][-1]["t"] == pytest.approx(best, abs=1e-5)
    # one optimiser for the run, a fresh one for each of the 11 phases, a fresh one after the search
    assert len(phases) == 13 and phases[1:12] == pytest.approx(list(T_SEARCH_VALUES), abs=1e-5)
    assert [h["epoch"] for h in m["history"]] == [1, 2] and m["epochs_done"] == m["epochs_total"] == 2


def test_checkpoint_of_another_shape_or_kind_is_refused(tmp_path, drl_run):
    ck = load_checkpoint(drl_run / "ckpt.pt", DRL_CKPT)
    payload = {k: ck[k] for k in FORMATS[DRL_CKPT]}
    save_checkpoint(tmp_path / "rgb.pt", DRL_CKPT, {**payload, "dataset": dict(
        ck["dataset"], name="cifar10", channels=3, image_size=32)})
    with pytest.raises(UserError, match="pretrained on 3x32x32"):
        train_ssl.main(TINY_SSL + ["--dataset", "digits", "--init", str(tmp_path / "rgb.pt"),
                                   "--out", str(tmp_path / "x")])
    save_checkpoint(tmp_path / "deeper.pt", DRL_CKPT, {**payload, "encoder_arch": dict(
        ck["encoder_arch"], arch="wrn-16-1")})
    with pytest.raises(UserError, match="does not match the model architecture"):
        train_ssl.main(TINY_SSL + ["--init", str(tmp_path / "deeper.pt"), "--out", str(tmp_path / "y")])
    with pytest.raises(UserError, match="laplacedrl.ssl-run checkpoint, expected laplacedrl.drl"):
        save_checkpoint(tmp_path / "ssl.pt", SSL_RUN, {k: None for k in FORMATS[SSL_RUN]})
        train_ssl.main(TINY_SSL + ["--init", str(tmp_path / "ssl.pt"), "--out", str(tmp_path / "z")])
    assert not any((tmp_path / d).exists() for d in "xyz")


def interrupted(monkeypatch, at_step, *args, **kw):
    """Run a pretraining that is interrupted (KeyboardInterrupt) in step ``at_step``."""
    calls = {"n": 0}
    real = ExponentialMovingAverage.update

    def dying(self, params):
        calls["n"] += 1
        if calls["n"] == at_step:
            raise KeyboardInterrupt
        real(self, params)
    monkeypatch.setattr(ExponentialMovingAverage, "update", dying)
    with pytest.raises(KeyboardInterrupt):
        pretrain(*args, **kw)
    monkeypatch.setattr(ExponentialMovingAverage, "update", real)


def test_interrupted_pretraining_resumes_from_last_checkpoint(tmp_path, monkeypatch):
    interrupted(monkeypatch, 30, tmp_path)
    ck = torch.load(tmp_path / "drl" / "last.pt", weights_only=True)
    assert ck["step"] == 20 and set(ck) == set(FORMATS["laplacedrl.drl-run"]) | {"format", "version"}
    assert not (tmp_path / "drl" / "ckpt.pt").exists()
    pretrain(tmp_path)
    assert torch.load(tmp_path / "drl" / "ckpt.pt", weights_only=True)["step"] == 40
    assert not (tmp_path / "drl" / "last.pt").exists()
    metrics = json.loads((tmp_path / "drl" / "metrics.json").read_text())
    assert metrics["step"] == 40
    steps = [e.step for e in EventAccumulator(str(tmp_path / "drl")).Reload().Scalars("pretrain/loss")]
    assert steps == [10, 20, 30, 40]                          # no duplicate after the resume


def test_resumed_pretraining_sees_the_same_batches_as_an_uninterrupted_one(tmp_path, monkeypatch):
    from laplacedrl.drl import models as pre
    seen = []
    real_forward = pre.DRLModels.forward

    def spy(self, x0, t):
        seen.append(round(x0.double().sum().item(), 6))
        return real_forward(self, x0, t)
    monkeypatch.setattr(pre.DRLModels, "forward", spy)
    args = ["--iters", "6", "--ckpt-every", "3", "--num-workers", "2"]
    pretrain(tmp_path, *args, name="whole")
    whole, seen[:] = list(seen), []
    interrupted(monkeypatch, 5, tmp_path, *args, name="killed")
    first, seen[:] = list(seen), []
    pretrain(tmp_path, *args, name="killed")              # resumes after step 3
    assert len(whole) == 6 and first == whole[:5] and seen == whole[3:]


def test_samples_from_a_ckpt_alone(tmp_path, drl_run):
    from laplacedrl import sample
    before = (drl_run / "ckpt.pt").stat().st_mtime_ns
    pretrain_drl.main(TINY_DRL + ["--out", str(drl_run), "--sample", "8", "--sample-steps", "4"])
    assert (drl_run / "ckpt.pt").stat().st_mtime_ns == before     # no retraining
    lone = tmp_path / "elsewhere" / "ckpt.pt"
    lone.parent.mkdir()
    shutil.copy(drl_run / "ckpt.pt", lone)                        # only the file, no run dir
    sample.main([str(lone), "--n", "16", "--steps", "3", "--device", "cpu"])
    from PIL import Image
    img = Image.open(lone.parent / "samples.png")
    assert img.size[0] > 8 * 8 and img.size[1] > 3 * 8           # test images + 2 rows of samples
    a, b = (np.asarray(Image.open(p)) for p in (drl_run / "samples.png", lone.parent / "samples.png"))
    assert a.shape[1] == b.shape[1] and not np.array_equal(a[:10], np.zeros_like(a[:10]))


def test_snapshots_are_ckpts_of_the_earlier_steps(tmp_path):
    from laplacedrl.engine.checkpoint import load_encoder
    out = pretrain(tmp_path, "--snapshot-every", "20", "--iters", "40")
    snaps = sorted((out / "snapshots").iterdir())
    assert [p.name for p in snaps] == ["ckpt_0000020.pt"]         # the last step is ckpt.pt itself
    early, _, ck = load_encoder(snaps[0])
    final, _, _ = load_encoder(out / "ckpt.pt")
    assert ck["step"] == 20
    w = next(k for k, v in early.state_dict().items() if v.dim() == 4)
    assert not torch.equal(early.state_dict()[w], final.state_dict()[w])


def test_cifar10_pretraining_builds_the_published_nets_and_hands_over(tmp_path):
    """Generated CIFAR-10 archives, the built-in (published) config, a few iterations."""
    from test_data import write_cifar10
    write_cifar10(tmp_path / "data", per_batch=40)
    out = tmp_path / "c10"
    pretrain_drl.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--labels", "100",
                       "--iters", "2", "--batch-size", "10", "--no-progress", "--num-workers", "0",
                       "--out", str(out)])
    ck = load_checkpoint(out / "ckpt.pt", DRL_CKPT)
    assert ck["encoder_arch"]["arch"] == "wrn-28-2" and len(ck["labeled"]) == 100
    assert (ck["score_net_arch"]["nf"], ck["score_net_arch"]["ch_mult"], ck["score_net_arch"]["attn_resolutions"],
            ck["score_net_arch"]["dropout"]) == (16, [1, 2, 2, 2], [16], 0.1)
    assert sum(v.numel() for v in ck["score_net"].values() if v.is_floating_point()) >= 938_899
    m = train_ssl.main(["--labels", "20", "--init", str(out / "ckpt.pt"), "--sup-rounds", "1",
                        "--sup-passes", "1", "--epochs", "1", "--aug-num", "1", "--num-workers", "0",
                        "--no-progress", "--out", str(tmp_path / "ssl")])
    cfg = C.from_dict(C.SSLConfig, __import__("yaml").safe_load((tmp_path / "ssl" / "config.yaml").read_text()))
    assert cfg.dataset == "cifar10" and cfg.data_dir == str(tmp_path / "data")   # followed the checkpoint
    assert m["epochs_done"] == 2
