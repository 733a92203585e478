"""What the tests share: one thread setting, the tiny flag sets of both CLIs, and one CLI runner."""
import contextlib
import importlib
import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the CLIs (train_ssl.py, pretrain_drl.py) live at the repo root

# One thread everywhere (the fixture below): the nets here are tiny, so one thread is as fast, and
# far faster when the other core is busy; and it is the arithmetic of the CLIs the tests start as
# processes (ENV: OMP_NUM_THREADS=1), so their results match in-process ones bit for bit.
THREADS = 1
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(THREADS))

# A WRN-10-1 on 8x8 digits: seconds per epoch (one supervised round of 3 passes, 2 epochs).
TINY_SSL = ["--arch", "wrn-10-1", "--labels", "30", "--sup-rounds", "1", "--sup-passes", "3",
            "--epochs", "2", "--aug-num", "1", "--batch-size", "60", "--labeled-batch-size", "20",
            "--knn", "10", "--no-progress", "--eval-batch-size", "1297"]
# A WRN-10-1 encoder and a two-level score net on digits: 40 iterations.
TINY_DRL = ["--arch", "wrn-10-1", "--iters", "40", "--batch-size", "32", "--lr", "2e-3",
            "--warmup", "1", "--nf", "8", "--ch-mult", "1,2", "--num-res-blocks", "1",
            "--attn-resolutions", "", "--dropout", "0", "--log-every", "10", "--ckpt-every", "20",
            "--no-progress"]


def tiny(flags: list, **changes) -> list:
    """``flags`` with some values changed (``epochs=1`` sets ``--epochs 1``; None drops the flag)."""
    out = list(flags)
    for name, value in changes.items():
        flag = "--" + name.replace("_", "-")
        if flag in out:
            i = out.index(flag)
            del out[i:i + 2]
        if value is not None:
            out += [flag, str(value)]
    return out


def run_cli(command: str, *args, cwd=None, process: bool = False, timeout: float = 300):
    """Run a command line: ``run_cli("train_ssl.py", "--labels", "30")`` or
    ``run_cli("-m", "laplacedrl.evaluate", run_dir)``. Returns ``returncode``, ``stdout``, ``stderr``.

    In this process by default, as its ``__main__`` would (``main_guard``: 0, or 2 for a user
    error); ``process=True`` starts a real interpreter, for what only one shows: signals, kill -9,
    the modules a fresh ``--help`` imports, a closed pipe.
    """
    argv = [command, *args] if command != "-m" else ["-m", *args]
    if process:
        r = subprocess.run([sys.executable, *(argv if command == "-m" else [str(ROOT / command), *args])],
                           cwd=cwd or ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
        return SimpleNamespace(returncode=r.returncode, stdout=r.stdout, stderr=r.stderr)
    from laplacedrl.errors import main_guard
    module = argv[1] if command == "-m" else "laplacedrl." + Path(command).stem
    rest = [str(a) for a in argv[(2 if command == "-m" else 1):]]
    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    os.chdir(cwd or before)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main_guard(importlib.import_module(module).main, rest)
    except SystemExit as e:                       # --help, or argparse's own exit
        code = e.code
    finally:
        os.chdir(before)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Every test runs torch on :data:`THREADS` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_progress_env(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    yield
