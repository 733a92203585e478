"""train_ssl.py end to end on digits with a tiny network: outputs, resume, idempotence, user errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_ssl
from laplacedrl import config as C
from laplacedrl.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
# A WRN-10-1 on 8x8 digits: seconds per epoch on 2 CPU cores.
TINY = ["--arch", "wrn-10-1", "--labels", "30", "--sup-rounds", "1", "--sup-passes", "3",
        "--epochs", "2", "--aug-num", "1", "--batch-size", "60", "--labeled-batch-size", "20",
        "--knn", "10", "--no-progress", "--eval-batch-size", "1297"]


def run_cli(script, args, timeout=300):
    """Run a CLI as a user would; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_metrics(out):
    return json.loads((Path(out) / "metrics.json").read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ssl") / "run"
    metrics = train_ssl.main(TINY + ["--out", str(out)])
    return out, metrics


def test_run_writes_every_output(tiny_run):
    out, metrics = tiny_run
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "labeled.txt", "last.pt",
                                               "metrics.json", "log.txt"}
    m = read_metrics(out)
    for key in ("test_top1", "test_top5", "test_top1_best", "test_top1_last5", "pseudo_label_acc",
                "epochs_done", "epochs_total", "t", "seed", "history"):
        assert key in m, key
    assert m["epochs_done"] == m["epochs_total"] == 3 and len(m["history"]) == 3
    assert [h["phase"] for h in m["history"]] == ["sup", "ssl", "ssl"]
    assert m["t"] is None and m["seed"] == 0
    assert 0 <= m["test_top1"] <= m["test_top5"] <= 100
    assert m["pseudo_label_acc"] > 50          # the graph does better than chance even here
    assert all({"test_top1", "loss", "time"} <= set(h) for h in m["history"])
    cfg = C.from_dict(C.SSLConfig, __import__("yaml").safe_load((out / "config.yaml").read_text()))
    assert cfg.arch == "wrn-10-1" and cfg.labels == 30
    lines = (out / "labeled.txt").read_text().split("\n")
    assert len([ln for ln in lines if ln]) == 30


def test_tensorboard_holds_the_scalars(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _ = tiny_run
    acc = EventAccumulator(str(out))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "eval/test_top1", "eval/test_top5", "eval/pseudo_label_acc",
            "eval/pseudo_label_acc_before_align", "time/epoch_seconds", "eval/graph_time"} <= tags
    assert [e.step for e in acc.Scalars("eval/test_top1")] == [1, 2, 3]


def test_rerun_of_a_finished_run_does_nothing(tiny_run):
    out, _ = tiny_run
    before = (out / "last.pt").stat().st_mtime_ns
    m = train_ssl.main(TINY + ["--out", str(out)])
    assert m["epochs_done"] == 3 and len(m["history"]) == 3
    assert (out / "last.pt").stat().st_mtime_ns == before


def test_labeled_txt_repeats_the_run(tiny_run, tmp_path):
    out, _ = tiny_run
    from laplacedrl.data import load_dataset, read_label_file
    train, _, _ = load_dataset("digits")
    idx = read_label_file(out / "labeled.txt", train)
    ck = torch.load(out / "last.pt", weights_only=True)
    assert np.array_equal(idx, np.asarray(ck["labeled"]))


def test_changed_config_in_same_dir_is_refused(tiny_run):
    out, _ = tiny_run
    with pytest.raises(UserError, match="--fresh"):
        train_ssl.main(TINY + ["--out", str(out), "--lr", "0.1"])


def test_kill_during_an_epoch_then_rerun_resumes(tmp_path):
    out = tmp_path / "killed"
    args = TINY[:] + ["--out", str(out)]
    args[args.index("--epochs") + 1] = "4"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_ssl.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        if (out / "metrics.json").exists() and read_metrics(out)["epochs_done"] >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)                   # kill -9 in the middle of epoch 3
    proc.wait()
    done = read_metrics(out)["epochs_done"]
    assert 2 <= done < 5, "the run must be killed before it finishes"
    r = run_cli("train_ssl.py", args)
    assert r.returncode == 0, r.stderr
    assert f"resuming after epoch {done}" in r.stdout
    m = read_metrics(out)
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3, 4, 5]   # every epoch exactly once


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from laplacedrl.ssl import laplacenet
    out = tmp_path / "nan"
    real = laplacenet.train_epoch
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return float("nan") if len(calls) == 2 else loss
    monkeypatch.setattr(laplacenet, "train_epoch", flaky)
    with pytest.raises(UserError, match="training loss in epoch 2 became nan"):
        train_ssl.main(TINY + ["--out", str(out)])
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and read_metrics(out)["epochs_done"] == 1


@pytest.mark.parametrize("args, message", [
    (["--labels", "5"], "at least one per class"),
    (["--labels", "99999"], "99999"),
    (["--label-file", "/no/such/file.txt"], "/no/such/file.txt"),
    (["--init", "/no/such/ckpt.pt"], "--init /no/such/ckpt.pt: no such file"),
    (["--dataset", "cifar10", "--data-dir", "/no/such/dir"], "cifar"),
    (["--knn-backend", "gpu"], "invalid choice"),
    (["--device", "cuda:7"], "--device"),
])
def test_user_errors_are_one_line_and_exit_2(args, message, tmp_path):
    r = run_cli("train_ssl.py", TINY + ["--out", str(tmp_path / "e")] + args, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in err and message.lower() in err.lower(), err
    assert len(err.splitlines()) == 1 or err.startswith("usage:"), err


def test_bad_label_file_names_the_line(tmp_path):
    f = tmp_path / "labels.txt"
    f.write_text("0_0.png 0\n1_1.png 7\n")
    r = run_cli("train_ssl.py", TINY + ["--out", str(tmp_path / "e"), "--label-file", str(f)])
    assert r.returncode == 2 and f"{f}:2" in r.stderr, r.stderr


def test_truncated_last_pt_is_refused_and_left_alone(tiny_run, tmp_path):
    out, _ = tiny_run
    bad = tmp_path / "bad"
    bad.mkdir()
    data = (out / "last.pt").read_bytes()
    (bad / "last.pt").write_bytes(data[: len(data) // 3])
    r = run_cli("train_ssl.py", TINY + ["--out", str(bad)])
    assert r.returncode == 2 and "truncated or corrupt" in r.stderr, r.stderr
    assert (bad / "last.pt").read_bytes() == data[: len(data) // 3]


def test_supervised_only_trains_on_labels_alone(tmp_path):
    m = train_ssl.main(TINY + ["--out", str(tmp_path / "sup"), "--supervised-only"])
    assert m["pseudo_label_acc"] is None and m["epochs_done"] == 3


def test_fewer_labels_than_the_labeled_batch_still_trains(tmp_path):
    args = TINY[:]
    args[args.index("--labels") + 1] = "12"         # < --labeled-batch-size 20
    args[args.index("--epochs") + 1] = "1"
    m = train_ssl.main(args + ["--out", str(tmp_path / "few")])
    assert m["epochs_done"] == 2
