"""laplacedrl.probe on tiny digits checkpoints: 11 rows per encoder, a PNG, TensorBoard, bad input."""
import csv

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import pretrain_drl
from conftest import TINY_DRL, tiny
from laplacedrl import probe
from laplacedrl.errors import main_guard
from laplacedrl.recipes import probe as recipe

TINY_DRL = tiny(TINY_DRL, iters=30, ckpt_every=30, dropout=None)
FAST = ["--mlp-epochs", "3", "--max-train", "300", "--svm-labels", "20,50", "--device", "cpu", "--num-workers", "0"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    for objective in ("drl", "ae"):
        pretrain_drl.main(TINY_DRL + ["--objective", objective, "--out", str(root / objective)])
    return root


def test_probe_writes_csv_png_and_tensorboard(ckpts, tmp_path):
    rows = probe.main(["--ckpt", str(ckpts / "drl" / "ckpt.pt"), "--ae-ckpt", str(ckpts / "ae" / "ckpt.pt"),
                       "--out", str(tmp_path), *FAST])
    with open(tmp_path / "probe.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["encoder", "t", "mlp_acc", "svm20_acc", "svm50_acc", "silhouette"]
    for name in ("drl", "ae", "random"):
        sel = [r for r in table if r["encoder"] == name]
        assert [float(r["t"]) for r in sel] == pytest.approx([i / 10 for i in range(11)])
        acc = np.array([[float(r[k]) for k in ("mlp_acc", "svm20_acc", "svm50_acc")] for r in sel])
        assert acc[:, 0].min() > 20 and acc[:, 2].max() > 20          # above chance (10%)
    assert len(rows) == len(table) == 33
    for row, line in zip(rows, table):                                 # the CSV holds what was computed
        assert float(line["silhouette"]) == pytest.approx(row["silhouette"], abs=1e-4)
        assert float(line["svm50_acc"]) == pytest.approx(row["svm50_acc"], abs=1e-4)
    assert (tmp_path / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("drl/mlp_acc")]
    assert steps == list(range(0, 101, 10)) and "random/silhouette" in acc.Tags()["scalars"]


def test_codes_depend_on_t_and_are_deterministic(ckpts):
    import torch
    from torch.utils.data import DataLoader

    from laplacedrl.data import AugmentedSubset, load_dataset, make_transform
    from laplacedrl.engine.checkpoint import load_encoder
    enc, sde, _ = load_encoder(ckpts / "drl" / "ckpt.pt", "--ckpt")
    train, _, spec = load_dataset("digits")
    loader = DataLoader(AugmentedSubset(train, np.arange(64), make_transform(spec, "eval")), batch_size=32)
    drl = recipe.timed_encoder("drl", enc, sde)
    drl.ts = (0.0, 0.5, 1.0)
    codes = recipe.extract_codes([drl], loader, torch.device("cpu"))["drl"]
    assert codes.shape == (3, 64, enc.feature_dim)
    assert not np.allclose(codes[0], codes[2])                      # the encoder sees t
    again = recipe.extract_codes([drl], loader, torch.device("cpu"))["drl"]
    assert np.array_equal(codes, again)


def test_the_init_classifier_starts_with_the_checkpoints_code_at_t_half(ckpts):
    """The hand-off: before any training, the features of the classifier train_ssl.py --init builds
    are the probe's codes of the checkpoint's encoder at t = 0.5."""
    import torch
    from torch.utils.data import DataLoader

    from laplacedrl import config as C
    from laplacedrl.data import AugmentedSubset, load_dataset, make_transform
    from laplacedrl.engine.checkpoint import init_values, load_encoder
    from laplacedrl.ssl.model import init_classifier
    ckpt = ckpts / "drl" / "ckpt.pt"
    cfg = C.resolve(C.SSLConfig, {"init": str(ckpt)}, init_values=init_values)
    train, _, spec = load_dataset("digits")
    model = init_classifier(cfg, spec).eval()
    loader = DataLoader(AugmentedSubset(train, np.arange(96), make_transform(spec, "eval")), batch_size=32)
    mine = recipe.extract_codes([recipe.classifier_encoder("init", model)], loader, torch.device("cpu"))["init"]
    enc, sde, _ = load_encoder(ckpt, "--ckpt")
    theirs = recipe.timed_encoder("drl", enc, sde)
    theirs.ts = (0.5,)
    codes = recipe.extract_codes([theirs], loader, torch.device("cpu"))["drl"]
    assert mine.shape == codes.shape == (1, 96, enc.feature_dim)
    np.testing.assert_allclose(mine, codes, rtol=1e-5, atol=1e-6)
    assert not np.allclose(codes, recipe.extract_codes([recipe.timed_encoder("x", enc, sde)], loader,
                                                      torch.device("cpu"))["x"][9])    # t = 0.9 differs


def test_probe_follows_a_classifier_through_its_snapshots(ckpts, tmp_path):
    import train_ssl
    run = tmp_path / "ssl"
    train_ssl.main(["--init", str(ckpts / "drl" / "ckpt.pt"), "--labels", "30", "--sup-rounds", "2",
                    "--sup-passes", "1", "--epochs", "1", "--aug-num", "1", "--batch-size", "60",
                    "--labeled-batch-size", "20", "--knn", "10", "--no-progress", "--snapshot-epochs", "0,2",
                    "--out", str(run)])
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["epoch_0000.pt", "epoch_0002.pt"]
    rows = probe.main(["--ckpt", str(ckpts / "drl" / "ckpt.pt"), "--no-random", "--out", str(tmp_path / "p"),
                       "--classifier", f"start={run / 'snapshots' / 'epoch_0000.pt'}",
                       "--classifier", str(run / "snapshots" / "epoch_0002.pt"), *FAST, "--mlp-epochs", "0"])
    start = next(r for r in rows if r["encoder"] == "start")
    at_half = next(r for r in rows if r["encoder"] == "drl" and r["t"] == 0.5)
    assert start["t"] == 0.5 and start["svm50_acc"] == pytest.approx(at_half["svm50_acc"])
    assert [r["encoder"] for r in rows if len(r) and r["encoder"].startswith("ssl")] == ["ssl@2"]


def test_probe_metrics_on_known_codes():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = rng.normal(size=(120, 4)) + 6 * np.eye(3, 4)[y]               # three far-apart blobs
    assert recipe.mlp_accuracy(x, y, x, y, 3, hidden=16, epochs=200) == 100.0
    assert recipe.svm_accuracy(x, y, x, y, 6, 3) == 100.0
    assert recipe.silhouette(x, y) > 0.5 > recipe.silhouette(x, rng.permutation(y))


def test_bad_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main_guard(probe.main, ["--ckpt", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --ckpt") and err.count("\n") == 1
    assert main_guard(probe.main, ["--ckpt", str(tmp_path / "missing.pt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_probe_takes_further_checkpoints_and_can_skip_the_mlp(ckpts, tmp_path):
    rows = probe.main(["--ckpt", str(ckpts / "drl" / "ckpt.pt"), "--also", str(ckpts / "ae" / "ckpt.pt"),
                       "--also", str(ckpts / "drl" / "ckpt.pt"), "--no-random", "--out", str(tmp_path),
                       *FAST, "--mlp-epochs", "0"])
    assert [r["encoder"] for r in rows[::11]] == ["drl", "ae", "drl@30"]
    assert "mlp_acc" not in rows[0] and {"svm20_acc", "svm50_acc", "silhouette"} <= set(rows[0])
    same = [(a["svm50_acc"], a["silhouette"]) for a in rows[:11]]
    assert same == [(b["svm50_acc"], b["silhouette"]) for b in rows[22:]]   # the same encoder twice


def test_val_images_measure_on_held_out_training_images(ckpts, tmp_path, monkeypatch):
    from laplacedrl.data import load_dataset
    from laplacedrl.data.datasets import carve
    seen = []
    real = recipe.svm_accuracy

    def spy(xtr, ytr, xte, yte, *a, **k):
        seen.append((len(ytr), np.asarray(yte).copy()))
        return real(xtr, ytr, xte, yte, *a, **k)
    monkeypatch.setattr(recipe, "svm_accuracy", spy)
    probe.main(["--ckpt", str(ckpts / "drl" / "ckpt.pt"), "--no-random", "--out", str(tmp_path),
                *FAST, "--mlp-epochs", "0", "--val-images", "200"])
    train, test, _ = load_dataset("digits")
    rest, val, kind = carve(train, test, val_images=200)
    assert kind == "validation" and len(rest) == len(train) - 200
    assert {n for n, _ in seen} == {300} and all(np.array_equal(y, val.targets) for _, y in seen)
    assert main_guard(probe.main, ["--ckpt", str(ckpts / "drl" / "ckpt.pt"), "--val-images", "-1"]) == 2
