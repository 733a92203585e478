"""pretrain_drl.py end to end on digits (tiny nets), and the --init handoff into train_ssl.py."""
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import pretrain_drl
import train_ssl
from laplacedrl.diffusion.ema import ExponentialMovingAverage
from laplacedrl.engine.checkpoint import atomic_save
from laplacedrl.errors import UserError

TINY_DRL = ["--arch", "wrn-10-1", "--iters", "40", "--batch-size", "32", "--lr", "2e-3",
            "--warmup", "1", "--base-channels", "16", "--ch-mult", "1,2", "--num-res-blocks", "1",
            "--emb-dim", "32", "--log-every", "10", "--ckpt-every", "20", "--no-progress"]
TINY_SSL = ["--labels", "30", "--sup-rounds", "1", "--sup-passes", "2", "--epochs", "1",
            "--aug-num", "1", "--batch-size", "60", "--labeled-batch-size", "20", "--knn", "10",
            "--no-progress"]


def pretrain(tmp_path, *extra):
    out = tmp_path / "drl"
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
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert (ck["format"], ck["objective"], ck["sde"]["name"], ck["step"]) == \
        ("laplacedrl.drl", objective, sde, 40)
    assert ck["encoder_arch"]["time_cond"] is True
    m = train_ssl.main(TINY_SSL + ["--init", str(out / "ckpt.pt"), "--out", str(tmp_path / "ssl")])
    ts = [h["t"] for h in m["history"]]
    assert len(ts) == 2 and all(0 < t < 1 for t in ts)
    assert ts[-1] != 0.5                                   # t is learned, and reported per epoch
    assert m["t"] == ts[-1]


def test_checkpoint_holds_ema_weights_and_raw_training_state(drl_run):
    ck = torch.load(drl_run / "ckpt.pt", weights_only=True)
    raw = {k[len("encoder."):]: v for k, v in ck["train"]["models"].items() if k.startswith("encoder.")}
    w = "blocks.0.conv1.weight" if "blocks.0.conv1.weight" in raw else next(
        k for k in raw if k.endswith("weight") and raw[k].dim() == 4)
    assert not torch.equal(raw[w], ck["encoder"][w])     # exported = EMA, not the raw weights
    assert set(raw) == set(ck["encoder"])


def test_encoder_weights_are_the_pretrained_ones(drl_run):
    from laplacedrl.data import load_dataset
    from laplacedrl.pretrained import load_pretrained_classifier
    out = drl_run
    _, _, spec = load_dataset("digits")
    model = load_pretrained_classifier(out / "ckpt.pt", spec, t_init=0.5)
    enc = torch.load(out / "ckpt.pt", weights_only=True)["encoder"]
    got = model.backbone.state_dict()
    same = [k for k in enc if not k.startswith("head.")]
    assert same and all(torch.equal(enc[k], got[k]) for k in same)
    assert float(model.t.detach()) == pytest.approx(0.5)


def test_freeze_t_and_t_search(tmp_path, drl_run):
    out = drl_run
    frozen = train_ssl.main(TINY_SSL + ["--init", str(out / "ckpt.pt"), "--freeze-t", "--t-init",
                                        "0.3", "--out", str(tmp_path / "f")])
    assert all(h["t"] == pytest.approx(0.3) for h in frozen["history"])
    searched = train_ssl.main(TINY_SSL + ["--init", str(out / "ckpt.pt"), "--t-search",
                                          "--freeze-t", "--out", str(tmp_path / "s")])
    grid = searched["t_search"]
    assert len(grid) == 11 and min(grid) == pytest.approx(0.001) and max(grid) == 1.0
    best = min(grid, key=grid.get)
    assert searched["history"][-1]["t"] == pytest.approx(float(best), abs=1e-5)


def test_checkpoint_of_another_shape_is_refused(tmp_path, drl_run):
    out = drl_run
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    ck["encoder_arch"] = dict(ck["encoder_arch"], in_channels=3, image_size=32)
    atomic_save(ck, tmp_path / "rgb.pt")
    with pytest.raises(UserError, match="pretrained on 3x32x32"):
        train_ssl.main(TINY_SSL + ["--init", str(tmp_path / "rgb.pt"), "--out", str(tmp_path / "x")])
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    ck["encoder_arch"] = dict(ck["encoder_arch"], arch="wrn-16-1")
    atomic_save(ck, tmp_path / "deeper.pt")
    with pytest.raises(UserError, match="do not fit wrn-16-1"):
        train_ssl.main(TINY_SSL + ["--init", str(tmp_path / "deeper.pt"), "--out", str(tmp_path / "y")])
    atomic_save({"format": "laplacedrl.ssl", "version": 1}, tmp_path / "ssl.pt")
    with pytest.raises(UserError, match="laplacedrl.ssl checkpoint, expected laplacedrl.drl"):
        train_ssl.main(TINY_SSL + ["--init", str(tmp_path / "ssl.pt"), "--out", str(tmp_path / "z")])


def test_interrupted_pretraining_resumes_from_last_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = ExponentialMovingAverage.update

    def dying(self, params):
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt
        real(self, params)
    monkeypatch.setattr(ExponentialMovingAverage, "update", dying)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tmp_path)
    monkeypatch.setattr(ExponentialMovingAverage, "update", real)
    ck = torch.load(tmp_path / "drl" / "last.pt", weights_only=True)
    assert ck["step"] == 20 and not (tmp_path / "drl" / "ckpt.pt").exists()
    pretrain(tmp_path)
    assert torch.load(tmp_path / "drl" / "ckpt.pt", weights_only=True)["step"] == 40
    metrics = json.loads((tmp_path / "drl" / "metrics.json").read_text())
    assert metrics["step"] == 40
    steps = [e.step for e in EventAccumulator(str(tmp_path / "drl")).Reload().Scalars("pretrain/loss")]
    assert steps == [10, 20, 30, 40]                          # no duplicate after the resume


def test_sample_grid_from_a_finished_run(drl_run):
    out = drl_run
    before = (out / "ckpt.pt").stat().st_mtime_ns
    pretrain_drl.main(TINY_DRL + ["--out", str(out), "--sample", "8", "--sample-steps", "10"])
    assert (out / "ckpt.pt").stat().st_mtime_ns == before     # no retraining
    from PIL import Image
    img = Image.open(out / "samples.png")
    assert img.size[0] > 8 * 8 and img.size[1] > 2 * 8        # a row of test images + samples
