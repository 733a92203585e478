"""torch.distributed helpers for runs launched by ``torchrun`` (one process per GPU, or per CPU slot).

``torchrun --nproc_per_node N train_ssl.py ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; without them everything here is a no-op single process
(``DistInfo(enabled=False)``), so the loops call these helpers unconditionally. Multi-node: the same
command on every node with torchrun's rendezvous flags, e.g.
``torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 --rdzv_id RUN``.

How a training loop uses this (the recipe the SSL and DRL loops follow):

- ``info, device = init_distributed(cfg.device)``; seed every rank with the same seed (identical
  model init; DDP also broadcasts rank 0's weights), log / write TensorBoard / save checkpoints only
  when ``info.is_main``, then ``barrier(info)`` so no rank reads a half-written file.
- Model: ``ddp = wrap_ddp(model, info, device)`` after moving it to the device (and channels_last),
  before ``torch.compile``; train with ``ddp``, save and evaluate ``unwrap(ddp)`` (no ``module.`` /
  ``_orig_mod.`` keys in checkpoints). Optionally convert BatchNorm with
  ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` first for batch statistics over all ranks.
- Shuffled training data: every rank computes the same ``epoch_permutation(n, seed, epoch)`` and takes
  ``epoch_shard(...)``, its strided slice ``perm[rank::world_size]`` cut to ``n // world_size`` (the
  same length on every rank, so all ranks run the same number of steps and DDP never waits on a rank
  that ran out). Pass the indices as the DataLoader's ``sampler`` (shuffle off) with the per-rank batch
  ``global_batch // world_size``: then step ``k`` of the ranks together trains on exactly
  ``perm[k * B:(k + 1) * B]``, the batch a single process would draw, whatever the world size. The
  permutation depends only on (seed, epoch), so a run checkpointed at an epoch boundary resumes with
  any number of processes.
- Per-sample randomness (augmentation) should differ between ranks: seed its generator with
  ``(seed, epoch, rank)``.
- Feature extraction for the graph: each rank embeds ``shard(n, info)`` and
  ``gather_rows(feats, idx, n, info)`` returns all n rows in dataset order on every rank; rank 0 runs
  the graph step and ``broadcast_object`` sends the pseudo-labels and weights to the others.
- Metrics summed per rank: ``all_reduce_mean`` (or gather the rows and compute once).
"""

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from laplacedrl.engine.run import pick_device
from laplacedrl.engine.seeds import numpy_rng
from laplacedrl.errors import UserError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``enabled`` is False for a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name="auto"):
    """Join the torchrun process group (if launched by torchrun) -> ``(DistInfo, torch.device)``.

    Backend ``nccl`` on CUDA (device ``cuda:LOCAL_RANK``), ``gloo`` on CPU. A world of one process
    is run as a single process (no group). ``device_name`` as ``--device`` (``auto``, ``cpu``, ``cuda``).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(), pick_device(device_name)
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise UserError(f"RANK is set but not {', '.join(missing)}; launch with torchrun")
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                    int(os.environ["LOCAL_RANK"]), enabled=int(os.environ["WORLD_SIZE"]) > 1)
    device = pick_device(device_name)
    if device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {info.local_rank} but only {torch.cuda.device_count()} GPUs; "
                            "use --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", init_method="env://", device_id=device)
        else:
            dist.init_process_group("gloo", init_method="env://")
    return info, device


def cleanup(info: DistInfo) -> None:
    """Leave the process group (call once at the end of a run)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for one process)."""
    if info.enabled:
        dist.barrier()


def _comm_device() -> torch.device:
    """Where tensors must live for the collective: the current GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ============ data sharding ============
def shard(n: int, info: DistInfo) -> np.ndarray:
    """This rank's dataset indices for a pass over 0..n-1: strided, ``arange(rank, n, world_size)``.

    Every index belongs to exactly one rank; shard lengths differ by at most one. Used for
    evaluation / feature extraction (every row once), then :func:`gather_rows`.
    """
    return np.arange(info.rank, n, info.world_size, dtype=np.int64)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of 0..n-1 for ``epoch``: the same on every rank and for any world size."""
    return numpy_rng(seed, "order", epoch).permutation(n)


def epoch_shard(n: int, seed: int, epoch: int, info: DistInfo) -> np.ndarray:
    """This rank's training indices for ``epoch``: ``perm[rank::world_size][:n // world_size]``.

    Disjoint across ranks and of equal length (up to ``world_size - 1`` images of the epoch are
    left out, as a drop-last loader would); for one process it is the whole permutation.
    """
    return epoch_permutation(n, seed, epoch)[info.rank::info.world_size][: n // info.world_size]


# ============ collectives ============
def gather_rows(local: torch.Tensor, local_idx, n: int, info: DistInfo) -> torch.Tensor:
    """Every rank's rows, put back in dataset order -> (n, ...) on every rank, on ``local``'s device.

    ``local`` (m, ...) are this rank's rows for the dataset indices ``local_idx`` (m,); the ranks'
    indices together must cover 0..n-1 exactly once (e.g. :func:`shard`). Shards of different
    lengths are padded to the longest for ``all_gather`` and the padding dropped.
    """
    local_idx = torch.as_tensor(local_idx, dtype=torch.long).reshape(-1)
    if len(local_idx) != len(local):
        raise ValueError(f"{len(local)} rows for {len(local_idx)} indices")
    if not info.enabled:
        rows, idx = local, local_idx.to(local.device)
    else:
        dev = _comm_device()
        sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(info.world_size)]
        dist.all_gather(sizes, torch.tensor([len(local)], device=dev))
        sizes = [int(s) for s in sizes]
        longest = max(sizes)
        pad_rows = torch.zeros((longest - len(local), *local.shape[1:]), dtype=local.dtype, device=dev)
        padded = torch.cat([local.to(dev), pad_rows])                          # (longest, ...)
        padded_idx = torch.cat([local_idx.to(dev), torch.full((longest - len(local),), -1, device=dev)])
        all_rows = [torch.empty_like(padded) for _ in range(info.world_size)]
        all_idx = [torch.empty_like(padded_idx) for _ in range(info.world_size)]
        dist.all_gather(all_rows, padded)
        dist.all_gather(all_idx, padded_idx)
        rows = torch.cat([r[:s] for r, s in zip(all_rows, sizes)]).to(local.device)     # (sum m, ...)
        idx = torch.cat([i[:s] for i, s in zip(all_idx, sizes)]).to(local.device)       # (sum m,)
    if not _covers_once(idx, n):
        raise ValueError(f"the ranks' indices do not cover 0..{n - 1} exactly once")
    out = torch.empty((n, *local.shape[1:]), dtype=local.dtype, device=local.device)
    out[idx] = rows
    return out


def _covers_once(idx: torch.Tensor, n: int) -> bool:
    """Whether ``idx`` is a permutation of 0..n-1."""
    if len(idx) != n:
        return False
    if n == 0:
        return True
    in_range = bool(((idx >= 0) & (idx < n)).all())
    return in_range and bool((torch.bincount(idx, minlength=n) == 1).all())


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """``obj`` (any picklable object, e.g. pseudo-labels) from rank ``src``; returned on every rank."""
    if not info.enabled:
        return obj
    box = [obj if info.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_min(value: int, info: DistInfo) -> int:
    """The smallest of every rank's ``value``."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.long, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


def all_gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of ``x`` over ranks (elementwise), on every rank and on ``x``'s device."""
    if not info.enabled:
        return x
    y = x.detach().to(_comm_device(), dtype=torch.float64 if x.dtype == torch.float64
                      else torch.float32, copy=True)
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return (y / info.world_size).to(x.device, x.dtype)


# ============ models ============
def wrap_ddp(model: torch.nn.Module, info: DistInfo, device: torch.device, **ddp_kwargs):
    """``DistributedDataParallel(model, **ddp_kwargs)`` on this rank's device when distributed, else
    ``model``. Pass ``find_unused_parameters=True`` if some parameters get no gradient in a step."""
    if not info.enabled:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, **ddp_kwargs)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / ``torch.compile`` wrappers (what to save and evaluate)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
