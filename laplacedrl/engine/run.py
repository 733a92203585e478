"""What both CLIs do around their training loop: the run dir, resume, device, precision, logging.

``RunDir`` owns the run directory (``config.yaml``, ``run.json``, ``last.pt``, ``metrics.json``,
TensorBoard events, ``log.txt``).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from laplacedrl import config as C
from laplacedrl.engine.checkpoint import (atomic_write_json, atomic_write_text, first_nonfinite, load_checkpoint,
                                         save_checkpoint)
from laplacedrl.engine.lock import LOCK_NAME, lock_run_dir
from laplacedrl.errors import UserError, main_guard  # noqa: F401 (re-exported)

log = logging.getLogger("laplacedrl")
REPO = Path(__file__).resolve().parents[2]


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; an unavailable cuda request is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return dev


def amp_dtype(amp: str, device: torch.device):
    """The autocast dtype for ``--amp`` (None = full precision). ``auto``: bf16 on GPUs that have it
    (float32 on CPUs). ``bf16`` also runs on CPUs (fast where they have AMX / AVX-512 BF16 units);
    ``fp16`` needs a GPU (its loss scaling)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if amp == "fp16" and device.type != "cuda":
        raise UserError(f"--amp fp16 needs a CUDA device; use --amp bf16 or off on {device}")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


class Precision:
    """``--amp``: autocast, and loss scaling for fp16. A step is ``with prec.autocast(): loss = ...``,
    ``prec.backward(loss)``, ``prec.unscale(opt)`` (before clipping), ``prec.step(opt)``."""

    def __init__(self, amp: str, device: torch.device):
        self.dtype = amp_dtype(amp, device)
        self.device = device
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype is torch.float16)

    def autocast(self):
        import contextlib
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale(self, opt) -> None:
        """Call before gradient clipping."""
        self.scaler.unscale_(opt)

    def step(self, opt) -> None:
        self.scaler.step(opt)
        self.scaler.update()


def prepare_model(model: torch.nn.Module, cfg, device: torch.device) -> torch.nn.Module:
    """``model`` on ``device``, channels-last if ``cfg.channels_last`` (cudnn autotuning on GPUs).

    Save and evaluate this module; wrap it (DDP, ``torch.compile``) only for training, so that
    checkpoints never hold ``module.`` / ``_orig_mod.`` keys.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def setup_logging(run_dir: Path | None = None, quiet: bool = False) -> None:
    """Log lines to stdout and, when given, to ``run_dir/log.txt``; ``quiet`` (other ranks): warnings only."""
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    h = logging.StreamHandler(sys.stdout)
    h.setFormatter(fmt)
    log.addHandler(h)
    if run_dir is not None:
        fh = _RunLog(run_dir / "log.txt")
        fh.setFormatter(fmt)
        log.addHandler(fh)
    log.propagate = False


class _RunLog(logging.FileHandler):
    """log.txt; a line it cannot write (a full disk) is a one-line warning on stderr, once, instead of
    logging's traceback, and the lines go on to stdout only."""

    failed = False

    def handleError(self, record):
        e = sys.exc_info()[1]
        if not isinstance(e, OSError):         # not the disk: logging's own report (a bad format, say)
            return super().handleError(record)
        if not self.failed:
            self.failed = True
            sys.stderr.write(f"warning: could not write {self.baseFilename}: {e.strerror or e}; "
                             f"log lines go to stdout only\n")

    def emit(self, record):
        if not self.failed:
            super().emit(record)

    def close(self):
        try:
            super().close()
        except OSError:                        # the lines it still held could not be written either
            pass


def provenance(command=None) -> dict:
    """What made this run: package version, git commit (when run from a checkout), command line."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        pkg = version("laplacedrl")
    except PackageNotFoundError:
        pkg = "unknown"
    commit = None
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            commit = out.stdout.strip() + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    command = command or [Path(sys.argv[0]).name, *sys.argv[1:]]
    return {"version": pkg, "git_commit": commit, "command": list(command),
            "python": sys.version.split()[0], "torch": torch.__version__,
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


class RunDir:
    """A run directory and its resumable state; create it only once the inputs are validated.

    Args:
        cfg: the resolved config dataclass.
        fmt: checkpoint format of ``last.pt`` (see :mod:`laplacedrl.engine.checkpoint`).
        default_name: folder name under ``runs/`` when ``--out`` is not given.
    """

    def __init__(self, cfg, fmt: str, default_name: str, main: bool = True):
        self.cfg, self.fmt, self.main = cfg, fmt, main
        self.path = Path(cfg.out or Path("runs") / default_name)
        self.last = self.path / "last.pt"
        self.prev = self.path / "last.prev.pt"      # the checkpoint before last.pt, kept for a bad last.pt
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out {self.path} exists and is not a directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot use the run dir {self.path}: {e.strerror or e}") from None
        in_use = None
        if main:                               # one writer per run dir (engine/lock.py): rank 0 locks
            try:
                lock_run_dir(self.path)
            except UserError as e:
                in_use = str(e)
        in_use = _rank0_says(in_use)
        if in_use:
            raise UserError(in_use)
        try:
            if cfg.fresh and main:
                for p in self.path.iterdir():  # start over: nothing of the old run may leak in
                    if p.name != LOCK_NAME:
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
            if main:                           # temporary files of a write a kill interrupted
                for p in self.path.glob(".*.tmp"):
                    p.unlink()
        except OSError as e:
            raise UserError(f"cannot use the run dir {self.path}: {e.strerror or e}") from None
        setup_logging(self.path if main else None, quiet=not main)

    def resume_state(self):
        """The checkpoint to continue from, or None; refuses a run dir made by another config.

        An unreadable ``last.pt`` (truncated by a node failure, say) gives way to ``last.prev.pt``
        with a warning; with no readable checkpoint left, one line that names the file.
        """
        bad = None
        for path in (self.last, self.prev):
            if not path.exists():
                continue
            try:
                ckpt = load_checkpoint(path, self.fmt, "run checkpoint")
            except UserError as e:
                bad = bad or e
                continue
            self.check_config(ckpt["config"])
            if bad is not None:
                log.warning(f"warning: {bad}; resuming from the checkpoint before it, {path}")
            return ckpt
        if bad is not None:
            raise UserError(f"{bad}, and there is no readable earlier checkpoint; pass --fresh to start over")
        if self.cfg.resume:
            raise UserError(f"--resume: no {self.last} to resume from")
        return None

    def check_config(self, recorded: dict) -> None:
        """UserError when ``recorded`` (a checkpoint's config) is another run's."""
        diff = C.config_diff(recorded, C.to_dict(self.cfg))
        if diff:
            k = diff[0]
            raise UserError(f"run dir {self.path} holds a run with {k}={recorded.get(k)!r}, "
                            f"not {getattr(self.cfg, k, None)!r}; pass --fresh to start over or "
                            f"--out for another dir")

    def write_config(self) -> None:
        """config.yaml (the resolved config) and run.json (one entry per invocation)."""
        if not self.main:
            return
        atomic_write_text(self.path / "config.yaml", C.to_yaml(self.cfg))
        record = self.path / "run.json"
        try:
            runs = json.loads(record.read_text())["invocations"]
        except (OSError, ValueError, KeyError, TypeError):
            runs = []
        atomic_write_json(record, {"invocations": runs + [provenance(getattr(self.cfg, "command", None))]})

    def save(self, payload: dict, path: Path | None = None, fmt: str | None = None) -> None:
        """Write ``payload`` (+ the config) as a ``fmt`` checkpoint (default: last.pt, the previous
        one kept as last.prev.pt), atomically. A payload holding a NaN or an infinity is never
        written: a one-line UserError names the tensor and the checkpoint on disk stays."""
        if not self.main:
            return
        path = path or self.last
        bad = first_nonfinite(payload)
        if bad:
            raise UserError(f"{bad} became non-finite (NaN or infinite); stopped without writing {path} "
                            f"(the last good checkpoint in {self.path} is kept and resumes; try a lower --lr)")
        save_checkpoint(path, fmt or self.fmt, {"config": C.to_dict(self.cfg), **payload},
                        keep_previous=self.prev if path == self.last else None)

    def finish(self) -> None:
        """A finished pretraining: its ckpt.pt replaces the training state."""
        if self.main:
            self.last.unlink(missing_ok=True)
            self.prev.unlink(missing_ok=True)

    def write_metrics(self, metrics: dict) -> None:
        if self.main:
            atomic_write_json(self.path / "metrics.json", metrics)

    def writer(self, purge_step: int | None):
        """TensorBoard writer; ``purge_step`` drops events a killed run logged after its checkpoint.
        Its event file is opened by the first event, so that a run that logs nothing (a finished run
        rerun) leaves none behind; a failed write ends the run with one line (:func:`_run_writer`).
        Processes other than rank 0 get a writer that writes nothing."""
        if not self.main:
            return _NullWriter()
        return _LazyWriter(str(self.path), purge_step)


class _LazyWriter:
    """A SummaryWriter opened at its first use other than ``flush`` / ``close``."""

    def __init__(self, path: str, purge_step: int | None):
        self._args, self._writer = (path, purge_step), None

    def __getattr__(self, name):
        if self._writer is None:
            if name in ("flush", "close"):
                return lambda *a, **k: None
            path, purge_step = self._args
            self._writer = _run_writer()(path, purge_step=purge_step)
        return getattr(self._writer, name)


def _run_writer():
    """SummaryWriter whose failed writes (a full disk, a read-only run dir) end the run with one line
    at the next ``flush`` / ``close`` instead of a traceback from tensorboard's writer thread."""
    from torch.utils.tensorboard import SummaryWriter

    class RunWriter(SummaryWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.write_errors = []
            records = getattr(getattr(self._get_file_writer().event_writer, "_async_writer", None), "_writer", None)
            for name in ("write", "flush", "close"):   # the record writer (tensorboard's thread calls it)
                if hasattr(records, name):
                    setattr(records, name, self._recording(getattr(records, name)))

        def _recording(self, write):
            def guarded(*args):
                if not self.write_errors:
                    try:
                        write(*args)
                    except OSError as e:
                        self.write_errors.append(e)
            return guarded

        def _check(self):
            if self.write_errors:
                e = self.write_errors[0]
                where = os.fsdecode(e.filename) if e.filename else self.log_dir
                raise UserError(f"could not write {where}: {e.strerror or e} (a full disk or a read-only "
                                f"folder?); the last checkpoint is intact")

        def flush(self):
            super().flush()
            self._check()

        def close(self):
            super().close()
            self._check()
    return RunWriter


def _rank0_says(message):
    """Rank 0's ``message`` on every rank of a torchrun job (as is without one)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _NullWriter:
    """Stands in for SummaryWriter on non-zero ranks."""

    def __getattr__(self, name):
        return lambda *a, **k: None


def run_name(prefix: str, cfg, parts: list) -> str:
    """``<prefix>_<parts...>_<hash>``: the same command maps to the same dir, another config to another."""
    import hashlib
    import json
    key = {k: v for k, v in C.to_dict(cfg).items() if k not in C.RUN_NEUTRAL}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:6]
    return "_".join([prefix, *[str(p) for p in parts if p], digest])
