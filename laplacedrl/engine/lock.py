"""One writer per run dir: a run holds an exclusive ``flock`` on ``<run dir>/run.lock`` while it runs.

Two processes writing one run dir (a requeued job that starts while the old one still writes, the
same command run twice) would both resume from the same ``last.pt`` and overwrite each other's
checkpoints and metrics. Rank 0 takes the lock before it touches anything in the dir; a second run
on a locked dir stops at once with one line naming the holder (its pid and host, which the holder
writes into the lock file). The kernel releases a ``flock`` when its holder's process ends, however
it ends, so a ``kill -9`` or a node failure never leaves a stale lock behind.

A process holds the lock of a run dir once: a second run on the same dir in the same process (a
notebook, a test) goes on under it. :func:`releasing_locks` lets go of the locks taken during a call.
"""
from __future__ import annotations

import datetime
import fcntl
import functools
import os
import socket
from pathlib import Path

from laplacedrl.errors import UserError

LOCK_NAME = "run.lock"
_HELD: dict = {}          # resolved lock file -> (file descriptor, pid of the process that took it)


def lock_run_dir(run_dir) -> None:
    """Hold ``run_dir``'s lock from now on, or a one-line UserError naming the process that has it."""
    path = (Path(run_dir) / LOCK_NAME).resolve()
    if str(path) in _HELD and _HELD[str(path)][1] == os.getpid():
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UserError(f"cannot use the run dir {run_dir}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:                                     # another process holds it
        error = _in_use(run_dir, fd)
        os.close(fd)
        raise error from None
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} (since {started})\n".encode())
    except OSError:
        pass                                            # a full disk: the lock holds, only the details are missing
    _HELD[str(path)] = (fd, os.getpid())


def refuse_if_in_use(run_dir) -> None:
    """A one-line UserError at once when another process holds ``run_dir``'s lock (a CLI asks this
    before its slow imports and data loading; the run takes the lock itself when it opens the dir)."""
    if not run_dir:
        return
    path = Path(run_dir) / LOCK_NAME
    if str(path.resolve()) in _HELD:
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:                                     # no lock file yet: a new run dir
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # taken (and dropped on close) unless a run holds it
    except OSError:
        raise _in_use(run_dir, fd) from None
    finally:
        os.close(fd)


def _in_use(run_dir, fd) -> UserError:
    holder = os.read(fd, 300).decode(errors="replace").strip() or "another process (it wrote no details)"
    return UserError(f"run dir {run_dir} is in use by {holder}; wait for that run to end, or pass another --out")


def release(key: str) -> None:
    fd, pid = _HELD.pop(key)
    if pid == os.getpid():
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def close_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the parent's lock files, so that a lock is
    the parent's alone and dies with it. (Closing a copy does not release the parent's lock.)"""
    for key, (fd, pid) in list(_HELD.items()):
        if pid != os.getpid():
            _HELD.pop(key)
            try:
                os.close(fd)
            except OSError:
                pass


def releasing_locks(fn):
    """Decorator: the run dir locks ``fn`` takes are released when it returns or raises."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = set(_HELD)
        try:
            return fn(*args, **kwargs)
        finally:
            for key in set(_HELD) - before:
                release(key)
    return wrapper
