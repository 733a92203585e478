"""What a run survives: preemption signals (real ones, to real processes, also under torchrun), a
diverging loss, a failed checkpoint write and a truncated checkpoint."""
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pretrain_drl
import train_ssl
from laplacedrl.engine.checkpoint import first_nonfinite
from laplacedrl.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SSL = ["--arch", "wrn-10-1", "--labels", "30", "--sup-rounds", "1", "--sup-passes", "3", "--epochs", "2",
       "--aug-num", "1", "--batch-size", "60", "--labeled-batch-size", "20", "--knn", "10", "--no-progress",
       "--eval-batch-size", "1297"]
DRL = ["--arch", "wrn-10-1", "--iters", "40", "--batch-size", "32", "--lr", "2e-3", "--warmup", "1", "--nf", "8",
       "--ch-mult", "1,2", "--num-res-blocks", "1", "--attn-resolutions", "", "--log-every", "10",
       "--ckpt-every", "1000", "--no-progress"]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def start(script, args):
    """A CLI with one DataLoader worker (the worker count leaves the arithmetic unchanged)."""
    return subprocess.Popen([sys.executable, str(ROOT / script), *args, "--num-workers", "1"], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def log_has(run, text):
    return (run / "log.txt").exists() and text in (run / "log.txt").read_text()


def metrics(run):
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture()
def one_thread():
    """Runs in this process with one thread, as the ones in subprocesses (OMP_NUM_THREADS=1): the
    same arithmetic, bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def finish(script, args):
    """Run a CLI to its end in this process (one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return (train_ssl if script == "train_ssl.py" else pretrain_drl).main(args)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The runs without interruption."""
    root = tmp_path_factory.mktemp("whole")
    finish("train_ssl.py", SSL + ["--out", str(root / "ssl")])
    finish("pretrain_drl.py", DRL + ["--out", str(root / "drl")])
    return root


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_stops_pretraining_at_a_step_and_the_rerun_ends_as_an_uninterrupted_run(tmp_path, uninterrupted, sig):
    run = tmp_path / "drl"
    proc = start("pretrain_drl.py", DRL + ["--out", str(run)])
    wait_for(lambda: log_has(run, "iters=40"))
    time.sleep(random.uniform(0.2, 0.6))                 # somewhere in the loop
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, (out, err)
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"stopped by {name} at step ") and line.endswith("rerun the same command to resume")
    step = int(line.split("at step ")[1].split(";")[0])
    assert 0 < step < 40 and line in (run / "log.txt").read_text()
    assert torch.load(run / "last.pt", weights_only=True)["step"] == step      # written at that step
    finish("pretrain_drl.py", DRL + ["--out", str(run)])
    assert log_has(run, f"resuming at step {step}")
    mine = torch.load(run / "ckpt.pt", weights_only=True)
    whole = torch.load(uninterrupted / "drl" / "ckpt.pt", weights_only=True)
    for key in ("encoder", "score_net"):
        for k, v in whole[key].items():
            assert torch.equal(mine[key][k], v), f"{key}.{k}"          # bit for bit
    assert metrics(run)["loss"] == metrics(uninterrupted / "drl")["loss"]


def test_a_signal_stops_laplacenet_at_an_epoch_boundary_and_the_rerun_ends_as_an_uninterrupted_run(
        tmp_path, uninterrupted, sig=signal.SIGTERM):
    run = tmp_path / "ssl"
    proc = start("train_ssl.py", SSL + ["--out", str(run)])
    wait_for(lambda: (run / "metrics.json").exists() and metrics(run)["epochs_done"] >= 1)
    time.sleep(random.uniform(0.0, 0.5))
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (out, err)
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"stopped by {signal.Signals(sig).name} ") and " epoch " in line and "rerun the same" in line
    done = metrics(run)["epochs_done"]
    assert 1 <= done < 3 and line in (run / "log.txt").read_text()
    finish("train_ssl.py", SSL + ["--out", str(run)])
    mine, whole = metrics(run), metrics(uninterrupted / "ssl")
    assert [h["epoch"] for h in mine["history"]] == [1, 2, 3]
    for a, b in zip(mine["history"], whole["history"]):
        assert (a["test_top1"], a.get("pseudo_label_acc")) == (b["test_top1"], b.get("pseudo_label_acc"))
        assert a["loss"] == b["loss"]


def test_sigterm_to_a_two_process_torchrun_stops_both_ranks_at_one_step_and_resumes(tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "pretrain_drl.py"), *DRL, "--batch-size", "32", "--device", "cpu", "--out", str(run)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: log_has(run, "processes=2"))
    time.sleep(random.uniform(0.5, 1.5))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode != 0
    stops = re.findall(r"stopped by SIGTERM at step (\d+);", out + err)
    assert len(stops) == 2 and len(set(stops)) == 1, (out, err)          # both ranks, one step
    assert sum(ln.startswith("stopped by SIGTERM at step") for ln in err.splitlines()) == 2, err   # own lines
    step = int(stops[0])
    assert torch.load(run / "last.pt", weights_only=True)["step"] == step
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert log_has(run, f"resuming at step {step}") and (run / "ckpt.pt").exists()


def test_the_stop_line_is_one_write_so_ranks_sharing_stderr_never_join_their_lines(monkeypatch):
    from laplacedrl.engine.stop import stopped
    from laplacedrl.errors import main_guard
    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    def stop(argv):
        raise stopped("SIGTERM", "at step 7")
    monkeypatch.setattr(sys, "stderr", Recorder())
    assert main_guard(stop, []) == 143
    assert writes == ["stopped by SIGTERM at step 7; rerun the same command to resume\n"]


def test_a_diverging_pretraining_stops_naming_the_step_and_keeps_a_finite_checkpoint(tmp_path, capsys, one_thread):
    from laplacedrl.errors import main_guard
    run = tmp_path / "div"
    args = DRL + ["--lr", "10", "--warmup", "20", "--ckpt-every", "5", "--out", str(run)]    # NaN before step 40
    assert main_guard(pretrain_drl.main, args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "became" in err, err
    assert "pretraining loss at step " in err or "became non-finite" in err     # the loss, or weights first
    ck = torch.load(run / "last.pt", weights_only=True)
    assert first_nonfinite({k: ck[k] for k in ("models", "optimizer", "ema")}) is None
    if "pretraining loss at step " in err:
        assert ck["step"] < int(err.split("at step ")[1].split()[0])
    assert main_guard(pretrain_drl.main, args) == 2                   # it resumes (and diverges again)
    assert log_has(run, f"resuming at step {ck['step']}")


def test_weights_that_turn_non_finite_are_never_written(tmp_path, monkeypatch):
    from laplacedrl.recipes import ssl as recipe
    real, calls = recipe.train_epoch, []

    def poisoned(model, *a, **k):
        losses = real(model, *a, **k)
        calls.append(1)
        if len(calls) == 2:                                  # epoch 2: a BatchNorm blows up
            model.bn_out.running_var.fill_(float("inf"))
        return losses
    monkeypatch.setattr(recipe, "train_epoch", poisoned)
    run = tmp_path / "inf"
    with pytest.raises(UserError, match=r"bn_out.running_var became non-finite .* stopped without writing"):
        train_ssl.main(SSL + ["--out", str(run)])
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and first_nonfinite(ck["model"]) is None


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous_one(tmp_path, monkeypatch):
    real, calls = torch.save, []

    def full_disk(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk)
    run = tmp_path / "full"
    with pytest.raises(UserError, match=r"could not write .*last.pt: No space left on device"):
        train_ssl.main(SSL + ["--out", str(run)])
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    assert not list(run.glob(".*.tmp"))                     # nothing a rerun would trip on
    monkeypatch.setattr(torch, "save", real)
    assert train_ssl.main(SSL + ["--out", str(run)])["epochs_done"] == 3


def test_a_truncated_last_pt_gives_way_to_the_one_before(tmp_path, uninterrupted, capsys):
    import shutil
    run = tmp_path / "cut"
    shutil.copytree(uninterrupted / "ssl", run)
    assert torch.load(run / "last.prev.pt", weights_only=True)["epoch"] == 2
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 3])
    finish("train_ssl.py", SSL + ["--out", str(run)])
    log = (run / "log.txt").read_text()
    assert "warning: run checkpoint" in log and "resuming from the checkpoint before it" in log
    assert "resuming after epoch 2" in log
    m = metrics(run)
    assert m["epochs_done"] == 3 and m["test_top1"] == metrics(uninterrupted / "ssl")["test_top1"]
    (run / "last.prev.pt").unlink()
    (run / "last.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match=r"last.pt is not a readable torch checkpoint.*--fresh"):
        train_ssl.main(SSL + ["--out", str(run)])
    with pytest.raises(UserError, match="--init .* not a readable torch checkpoint"):
        train_ssl.main(SSL + ["--out", str(tmp_path / "x"), "--init", str(run / "last.pt")])
