"""Batch streams for DataLoaders whose worker processes live as long as the run.

A training loader is built once per run (``make_loader``) with persistent workers; what changes
from epoch to epoch is its batch sampler, a :class:`BatchStream`, told the epoch with
``set_epoch`` before the loader is iterated again. Starting worker processes costs seconds; a
loader rebuilt for every pass over a few labeled images would pay that at every step.

Each item the stream yields is ``(position, item seed)``; :class:`SeededItems` computes the item
under torch's CPU generator seeded with that seed (and restores the generator afterwards), so an
augmented batch depends only on (run seed, stream, epoch, rank): the same with any number of
loader workers, after a resume, and on a rerun.
"""
from __future__ import annotations

import atexit
import os
import signal
import weakref
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from laplacedrl.engine.lock import close_inherited_locks
from laplacedrl.engine.seeds import derive_seed, numpy_rng, seed_torch_cpu, torch_generator
from laplacedrl.engine.stop import ignore_stop_signals, stop_signals_held

MAX_AUTO_WORKERS = 8


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; os.cpu_count() where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def loader_workers(requested: int) -> int:
    """Worker processes per loader: ``requested`` when >= 0, else (auto) the usable CPUs, at most 8."""
    return requested if requested >= 0 else min(MAX_AUTO_WORKERS, usable_cpus())


def make_loader(dataset, workers: int, device, batch_size: Optional[int] = None,
                batch_sampler: Optional[Sampler] = None) -> DataLoader:
    """A DataLoader in dataset order (``batch_size``) or driven by ``batch_sampler``; its ``workers``
    processes persist across iterations and ignore stop signals (:func:`worker_init`): the run
    shuts them down (:func:`close_loader`)."""
    # a private generator: a DataLoader draws its workers' base seed when an iterator starts, which
    # would otherwise take a number from the global generator (mixup's) at a worker-count-dependent time
    return _Loader(dataset, batch_size=batch_size if batch_sampler is None else 1,
                   batch_sampler=batch_sampler, shuffle=False, num_workers=workers,
                   persistent_workers=workers > 0, pin_memory=torch.device(device).type == "cuda",
                   generator=torch_generator(0, "loader"), worker_init_fn=worker_init if workers > 0 else None)


def worker_init(worker_id: int) -> None:
    """A loader worker leaves the stop signals to its main process (a cluster signals every process
    of a job: the run stops at a step and shuts its workers down) and does not hold its run-dir lock."""
    ignore_stop_signals()
    close_inherited_locks()


class _Loader(DataLoader):
    """A DataLoader whose worker processes are shut down at interpreter exit at the latest."""

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        with stop_signals_held():             # until each worker's init function ignores them
            it = super()._get_iterator()
        for w in it._workers:
            # torch ends a worker that has not joined 5 s after its shutdown with terminate (SIGTERM),
            # which these ignore: SIGKILL instead, or each such shutdown would wait 5 s more
            w.terminate = w.kill
        _WORKERS.update(it._workers)
        return it


# Workers ignore SIGTERM, so multiprocessing's exit-time terminate-and-join would wait for ever on
# one left running. Every run shuts its loaders down; should a worker be left (a loader a caller
# never closed, its iterator kept by a traceback or already collected), it is killed here, before
# multiprocessing's exit hook (registered earlier, so run later).
_WORKERS: "weakref.WeakSet" = weakref.WeakSet()       # worker processes (an iterator may be gone before them)


def _shut_down_left_workers() -> None:
    """At exit nothing a worker holds is wanted any more: SIGKILL, and no wait for a graceful end
    (``_shutdown_workers`` gives each worker 5 s to join, then 5 s more after a SIGTERM it ignores)."""
    left = [w for w in list(_WORKERS) if w.is_alive()]
    if not left:
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)    # torch's handler would call their deaths a failure
    for w in left:
        w.kill()
    for w in left:
        w.join(timeout=5)


atexit.register(_shut_down_left_workers)


def close_loader(loader) -> None:
    """Stop a DataLoader's persistent workers now. Left to the garbage collector, stopping them can
    take seconds per worker (it joins workers that still hold prefetched batches), which a process
    that goes on to another run would wait for."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    loader._iterator = None


class SeededItems(Dataset):
    """Item ``(j, s)`` -> ``dataset[j]`` computed with torch's CPU generator seeded with ``s``.

    The caller's generator state is saved and restored around the item, so loading in the main
    process (no workers) leaves the training loop's random stream untouched. Transforms must draw
    from torch's generator only (torchvision's and :mod:`laplacedrl.data.augment`'s do).
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        j, seed = key
        with torch.random.fork_rng(devices=[]):
            seed_torch_cpu(seed)
            return self.dataset[j]


class BatchStream(Sampler):
    """Batches of ``(position, item seed)`` for one epoch at a time.

    Args:
        order: ``order(epoch, pass_index, rng) -> positions`` of one pass over the data, e.g.
            ``rng.permutation(n)``, or a rank's slice of a permutation that every rank derives
            from (seed, pass) alone.
        batch_size: positions per batch (``set_epoch`` may change it).
        seed, stream, rank: the generator of epoch e is seeded with ``derive_seed(seed, stream, e,
            rank)``; it is handed to ``order`` and draws the item seeds.
        endless: False = one pass per epoch, the last incomplete batch dropped; True = passes follow
            each other for ever (a batch may span two passes, as in LaplaceNet's labeled stream) and
            the loop stops taking batches when it has the steps it needs.
    """

    def __init__(self, order: Callable, batch_size: int, seed: int, stream: str, rank: int = 0,
                 endless: bool = False):
        self.order, self.batch_size, self.endless = order, batch_size, endless
        self.seed, self.stream, self.rank = seed, stream, rank
        self.epoch, self.skip = 0, 0
        derive_seed(seed, stream)            # an unknown stream name fails here, not in a worker

    def set_epoch(self, epoch: int, batch_size: Optional[int] = None, endless: Optional[bool] = None,
                  skip: int = 0) -> None:
        """Iterate epoch ``epoch`` next (with ``batch_size`` / ``endless`` if given), leaving out its
        first ``skip`` batches (a run resumed in the middle of an endless stream)."""
        self.epoch, self.skip = epoch, skip
        self.batch_size = batch_size or self.batch_size
        self.endless = self.endless if endless is None else endless

    def __iter__(self):
        rng = numpy_rng(self.seed, self.stream, self.epoch, self.rank)
        bs, pending, done, pass_index = self.batch_size, np.empty(0, dtype=np.int64), 0, 0
        while True:
            positions = np.asarray(self.order(self.epoch, pass_index, rng), dtype=np.int64)
            pass_index += 1
            pending = np.concatenate([pending, positions])
            while len(pending) >= bs:
                batch, pending = pending[:bs], pending[bs:]
                seeds = rng.integers(0, 2**63 - 1, size=bs)
                done += 1
                if done > self.skip:
                    yield list(zip(batch.tolist(), seeds.tolist()))
            if not self.endless or len(positions) == 0:
                return
