"""Stopping a run cleanly when the cluster asks: SIGTERM, SIGUSR1 (SLURM's ``--signal``) or SIGINT.

While a run trains, :class:`StopSignals` turns these signals into a request that the loops look at
after every optimiser step: pretraining then writes its resumable state at that step; LaplaceNet
goes back to the last epoch boundary (``last.pt`` of the last finished epoch: a mid-epoch state
would have to hold the loaders' streams and the graph step's pseudo-labels, and an epoch is minutes
on a GPU). Under torchrun every rank asks the others after each step, so all of them stop at the
same step; rank 0 writes. The run then raises :class:`laplacedrl.errors.Stopped` and the CLI
exits with 128 + the signal's number (SIGTERM 143, SIGUSR1 138, SIGINT 130), saying so in one
line. A second SIGINT interrupts at once.

A cluster often signals every process of a job at once (SLURM; torchrun signals each rank's process
group), DataLoader workers included. Workers start with the stop signals blocked
(:func:`stop_signals_held`) and ignore them from their init function on
(:func:`ignore_stop_signals`): the main process stops at a step as usual and then shuts its
workers down itself (:func:`laplacedrl.data.streams.close_loader`), which every path out of a run
does.
"""
from __future__ import annotations

import contextlib
import signal

from laplacedrl.errors import Stopped

SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


def _numbers() -> set:
    return {getattr(signal, name) for name in SIGNALS}


@contextlib.contextmanager
def stop_signals_held():
    """Hold back (block) the stop signals in this thread while it starts worker processes: a fork
    keeps them blocked in the child until its init function ignores them
    (:func:`ignore_stop_signals`), so a signal to the whole group cannot kill a worker that is still
    starting (torch's worker start-up installs a SIGTERM handler that dies of a signal from anyone
    but its parent). Those sent meanwhile reach this process when the block ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _numbers())
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def ignore_stop_signals() -> None:
    """Ignore SIGTERM, SIGUSR1 and SIGINT in this process (a DataLoader worker: its main process
    stops the run and shuts it down), then let through any that were held back (they are dropped)."""
    for name in SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _numbers())


def stopped(signame: str, where: str) -> Stopped:
    """The exception a recipe raises once its state is written: ``stopped by SIGTERM <where>; rerun
    the same command to resume``, exit status 128 + the signal's number."""
    return Stopped(f"stopped by {signame} {where}; rerun the same command to resume",
                   128 + int(getattr(signal, signame)))


class StopSignals:
    """``with StopSignals() as stop:`` installs the handlers (main thread) and restores the old ones;
    ``stop.requested(info)`` -> the signal's name once one arrived (agreed by every rank), else None."""

    def __init__(self):
        self.name = None
        self.previous = {}

    def __enter__(self):
        for name in SIGNALS:
            try:
                self.previous[name] = signal.signal(getattr(signal, name), self._handle)
            except ValueError:                 # not the main thread: leave the signals alone
                break
        return self

    def __exit__(self, *exc):
        for name, handler in self.previous.items():
            signal.signal(getattr(signal, name), handler)
        return False

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.name == "SIGINT":
            raise KeyboardInterrupt            # a second Ctrl-C: stop now
        self.name = self.name or name

    def requested(self, info) -> str | None:
        """The name of the signal that asks the run to stop, the same on every rank (a one-number
        all-reduce per call under torchrun), or None."""
        if not getattr(info, "enabled", False):
            return self.name
        import torch
        import torch.distributed as dist

        from laplacedrl.engine.distributed import _comm_device
        code = torch.tensor([SIGNALS.index(self.name) + 1 if self.name else 0], device=_comm_device())
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        return SIGNALS[int(code) - 1] if int(code) else None
