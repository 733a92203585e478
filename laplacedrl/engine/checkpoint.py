"""Atomic file writes and checkpoint loading with user-readable failures.

Every file a run depends on (``last.pt``, ``ckpt.pt``, ``metrics.json``, ``config.yaml``) is written
to a temporary file in the same folder, flushed to disk, then renamed over the target: a kill at any
moment leaves either the old file or the new one, never a torn one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from laplacedrl.errors import UserError

SSL_FORMAT = "laplacedrl.ssl"       # last.pt of train_ssl.py
DRL_FORMAT = "laplacedrl.drl"       # last.pt / ckpt.pt of pretrain_drl.py
FORMAT_VERSION = 1


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj, path) -> None:
    """``torch.save`` to ``path`` atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def load_checkpoint(path, fmt: str, what: str = "checkpoint") -> dict:
    """Load a checkpoint dict written by this project, or raise a one-line UserError.

    Args:
        path: file to read.
        fmt: expected ``format`` entry (``SSL_FORMAT`` or ``DRL_FORMAT``).
        what: how the message names the file (e.g. ``"--init"``).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file")
    try:
        # weights_only: a checkpoint holds tensors and plain Python data only, so a hostile file
        # cannot run code on load.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} {path} is not a readable checkpoint (truncated or corrupt?): "
                        f"{msg[:160]}") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise UserError(f"{what} {path} is not a laplacedrl checkpoint")
    if ckpt["format"] != fmt:
        raise UserError(f"{what} {path} is a {ckpt['format']} checkpoint, expected {fmt}")
    if ckpt.get("version") != FORMAT_VERSION:
        raise UserError(f"{what} {path} has format version {ckpt.get('version')}, "
                        f"this laplacedrl reads version {FORMAT_VERSION}")
    return ckpt


def load_state(module: torch.nn.Module, state: dict, what: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line UserError on a mismatch."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = " ".join(first[1:3])[:200] if len(first) > 1 else first[0][:200]
        raise UserError(f"{what} does not match the model architecture: {detail}") from None
