"""What a run survives: preemption signals (real ones, to a whole process group with its loader
workers, also under torchrun), a diverging loss, failed writes (a real file-size limit, a full
tmpfs, a run dir turned read-only), a truncated checkpoint and a second run on the same dir."""
import json
import os
import random
import re
import resource
import select
import shutil
import signal
import socket
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


def start(script, args, workers=2, **kwargs):
    """A CLI in a process group of its own (its leader's pid), with ``workers`` DataLoader workers
    (the worker count leaves the arithmetic unchanged)."""
    return subprocess.Popen([sys.executable, str(ROOT / script), *args, "--num-workers", str(workers)], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)


def group_is_gone(pgid, timeout=10):
    """True once no process of the group is left (no loader worker outlives its run)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])     # SIGINT: the worker tests below
def test_a_signal_to_the_process_group_stops_pretraining_at_a_step_and_the_rerun_ends_as_an_uninterrupted_run(
        tmp_path, uninterrupted, sig):
    run = tmp_path / "drl"
    proc = start("pretrain_drl.py", DRL + ["--out", str(run)])
    wait_for(lambda: log_has(run, "iters=40"))
    time.sleep(random.uniform(0.2, 0.6))                 # somewhere in the loop
    os.killpg(proc.pid, sig)                             # the run and its 2 loader workers, as a cluster does
    out, err = proc.communicate(timeout=120)
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, (out, err)
    assert group_is_gone(proc.pid)
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


def test_sigterm_to_the_process_group_stops_laplacenet_at_an_epoch_boundary_and_the_rerun_ends_as_an_uninterrupted_run(
        tmp_path, uninterrupted, sig=signal.SIGTERM):
    run = tmp_path / "ssl"
    proc = start("train_ssl.py", SSL + ["--out", str(run)])
    wait_for(lambda: (run / "metrics.json").exists() and metrics(run)["epochs_done"] >= 1)
    time.sleep(random.uniform(0.0, 0.5))
    os.killpg(proc.pid, sig)                             # the run and its loaders' workers (2 each)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (out, err)
    assert group_is_gone(proc.pid)
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
           str(ROOT / "pretrain_drl.py"), *DRL, "--batch-size", "32", "--device", "cpu", "--num-workers", "2",
           "--out", str(run)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for(lambda: log_has(run, "processes=2"))
    time.sleep(random.uniform(0.5, 1.5))
    os.killpg(proc.pid, signal.SIGTERM)        # torchrun passes it on to each rank's group (workers too)
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
    whole = tmp_path / "whole"                                   # the same job, uninterrupted
    r = subprocess.run(cmd[:-1] + [str(whole)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    mine, theirs = (torch.load(d / "ckpt.pt", weights_only=True) for d in (run, whole))
    for k, v in theirs["encoder"].items():
        assert torch.equal(mine["encoder"][k], v), k                  # bit for bit
    assert metrics(run)["loss"] == metrics(whole)["loss"]


def test_loader_workers_ignore_stop_signals_and_one_left_open_does_not_hold_up_the_exit():
    code = """if True:
        import os, signal, time
        from laplacedrl.data.streams import make_loader
        it = iter(make_loader(list(range(100)), 2, "cpu", batch_size=10))
        next(it)
        for w in it._workers:
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                os.kill(w.pid, sig)
        time.sleep(1)
        print(sum(w.is_alive() for w in it._workers), "alive", flush=True)
        """                                      # and the iterator is left open at exit
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "2 alive", r.stderr[-2000:]
    assert time.time() - t0 < 30                 # multiprocessing's exit-time join would wait for ever


def test_loader_workers_that_are_still_starting_survive_signals_to_the_group():
    code = """if True:
        import signal
        from laplacedrl.data.streams import close_loader, make_loader
        got = []
        signal.signal(signal.SIGTERM, lambda *a: got.append(1))      # the main process takes them, as a run does
        print("ready", flush=True)
        for i in range(8):                                            # 16 worker starts
            loader = make_loader(list(range(40)), 2, "cpu", batch_size=10)
            assert sum(len(b) for b in loader) == 40
            close_loader(loader)
        print("signals", len(got), flush=True)
        sys.stdin.read()                                              # until the signals have stopped
        """
    proc = subprocess.Popen([sys.executable, "-c", "import sys\n" + code], cwd=ROOT, env=ENV, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "ready"
    while proc.poll() is None and not select.select([proc.stdout], [], [], 0.002)[0]:
        os.killpg(proc.pid, signal.SIGTERM)                           # every 2 ms
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.startswith("signals "), err[-2000:]
    assert int(out.split()[1]) > 0


def test_a_log_txt_that_cannot_be_written_is_one_warning_and_the_lines_go_on_to_stdout(capsys):
    import logging
    from laplacedrl.engine.run import _RunLog
    handler = _RunLog("/dev/full")                     # every write fails with ENOSPC, as on a full disk
    record = logging.LogRecord("laplacedrl", logging.INFO, __file__, 0, "epoch 1/3", None, None)
    handler.handle(record)
    handler.handle(record)
    assert capsys.readouterr().err == ("warning: could not write /dev/full: No space left on device; "
                                       "log lines go to stdout only\n")
    handler.close()


def test_a_write_failure_is_told_apart_from_a_programming_error():
    from laplacedrl.engine.checkpoint import write_failure
    try:
        try:
            raise OSError(27, "File too large")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as e:
        assert write_failure(e) == "File too large"                  # what torch.save raises on EFBIG
    assert write_failure(RuntimeError("a bug")) is None


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


def one_line_error(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 2, (out[-2000:], err[-3000:])
    assert len(err.strip().splitlines()) == 1, err[-3000:]               # one line, not a traceback
    return err.strip()


def after_first_epoch(script_args, run, fault, **kwargs):
    """Start LaplaceNet, let it write last.pt after epoch 1, then ``fault()``; -> its one error line."""
    proc = start("train_ssl.py", script_args + ["--out", str(run)], workers=0, **kwargs)
    try:
        wait_for(lambda: (run / "metrics.json").exists() and metrics(run)["epochs_done"] >= 1)
        proc.send_signal(signal.SIGSTOP)           # the fault comes before the run's next write
        fault(proc)
        proc.send_signal(signal.SIGCONT)
        return one_line_error(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_checkpoint_write_over_a_real_file_size_limit_is_one_line_and_keeps_the_previous_one(tmp_path, uninterrupted):
    run = tmp_path / "limit"
    limit = (uninterrupted / "ssl" / "last.pt").stat().st_size // 2     # log lines, metrics.json still fit

    def file_size_limit(proc):               # from now on writes past `limit` bytes fail with EFBIG
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
    err = after_first_epoch(SSL, run, file_size_limit,
                            preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN))   # EFBIG, not a kill
    assert re.fullmatch(rf"error: could not write {re.escape(str(run))}/last.pt: File too large .*intact", err), err
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] >= 1 and not list(run.glob(".*.tmp"))


@pytest.fixture()
def mount_point(tmp_path):
    """A folder to mount on (root only; skipped elsewhere); unmounted afterwards."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting needs root")
    mounted = []

    def mount(*args, target):
        r = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount here: {r.stderr.strip()}")
        if target not in mounted:
            mounted.append(target)
    yield mount
    for target in reversed(mounted):
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_a_full_tmpfs_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, uninterrupted, mount_point):
    disk = tmp_path / "disk"
    disk.mkdir()
    size = (uninterrupted / "ssl" / "last.pt").stat().st_size
    mount_point("-t", "tmpfs", "-o", f"size={size * 3 // 2 + 256 * 1024}", "tmpfs", target=disk)   # 1.5 checkpoints
    run = disk / "run"
    proc = start("train_ssl.py", SSL + ["--out", str(run)], workers=0)
    err = one_line_error(proc)                     # the second last.pt does not fit beside the first
    assert re.fullmatch(rf"error: could not write {re.escape(str(run))}/last.pt: No space left on device .*", err), err
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1 and not list(run.glob(".*.tmp"))


def test_a_run_dir_turned_read_only_mid_run_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, mount_point):
    run = tmp_path / "ro"

    def read_only(proc):                           # what is open stays writable, nothing new can be written
        mount_point("--bind", str(run), target=run)
        mount_point("-o", "remount,ro,bind", target=run)
    err = after_first_epoch(SSL, run, read_only)
    assert re.fullmatch(rf"error: could not write {re.escape(str(run))}/\S+: Read-only file system .*", err), err
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] >= 1 and not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("script,args,started",
                         [("train_ssl.py", SSL, "run_dir="), ("pretrain_drl.py", DRL, "iters=40")])
def test_a_second_run_on_a_run_dir_in_use_stops_at_once_naming_the_first_and_goes_once_it_is_killed(
        tmp_path, script, args, started):
    run = tmp_path / "busy"
    first = start(script, args + ["--out", str(run)], workers=0)
    try:
        wait_for(lambda: log_has(run, started))
        first.send_signal(signal.SIGSTOP)                  # it holds the run dir, frozen mid-run
        t0 = time.time()
        second = start(script, args + ["--out", str(run)], workers=0)
        err = one_line_error(second)
        assert time.time() - t0 < 5, err
        assert f"pid {first.pid} on host {socket.gethostname()}" in err and "in use" in err, err
    finally:
        first.kill()                                       # kill -9: the kernel drops its lock
        first.wait()
    finish(script, args + ["--out", str(run)])             # the next run goes on from its last.pt
    assert log_has(run, "final " if script == "train_ssl.py" else "wrote ")


def test_the_lock_is_rank_0s_alone_and_a_run_in_the_same_process_goes_on_under_it(tmp_path):
    from laplacedrl.engine.lock import LOCK_NAME, lock_run_dir, releasing_locks
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from laplacedrl.engine.lock import "
                               "lock_run_dir; lock_run_dir(sys.argv[1]); print('locked', flush=True); time.sleep(60)",
                               str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"run dir {re.escape(str(tmp_path))} is in use by pid {holder.pid} "):
            lock_run_dir(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    releasing_locks(lambda: (lock_run_dir(tmp_path), lock_run_dir(tmp_path)))()    # twice in one process
    assert (tmp_path / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} on host ")
    other = subprocess.run([sys.executable, "-c", "import sys; from laplacedrl.engine.lock import lock_run_dir; "
                            "lock_run_dir(sys.argv[1])", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert other.returncode == 0, other.stderr                    # released when the call returned


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
