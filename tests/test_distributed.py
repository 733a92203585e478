"""The torch.distributed helpers: a real 2-process gloo group on the CPU, and the 1-process fallback."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from laplacedrl.engine.distributed import (DistInfo, all_reduce_mean, barrier, broadcast_object,
                                           cleanup, epoch_permutation, epoch_shard, gather_rows,
                                           init_distributed, shard, unwrap, wrap_ddp)

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows_of(idx):
    """A recognisable (m, 2, 3) row per dataset index."""
    idx = torch.as_tensor(idx, dtype=torch.float32)
    return (idx[:, None, None] * 10 + torch.arange(6.0).view(1, 2, 3))


def _worker(rank, port, out_dir):
    """One rank of the gloo group: run every collective and save what it saw."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info, device = init_distributed("cpu")
    seen = {"info": info, "device": str(device)}
    n = 11
    # strided shards (6 + 5 rows) and a lopsided, shuffled split (8 + 3 rows)
    idx = shard(n, info)
    seen["strided"] = gather_rows(rows_of(idx), idx, n, info)
    lopsided = np.arange(8)[::-1].copy() if rank == 0 else np.array([10, 8, 9])
    seen["lopsided"] = gather_rows(rows_of(lopsided), lopsided, n, info)
    seen["labels"] = gather_rows(torch.as_tensor(lopsided) % 3, lopsided, n, info)   # int64, 1-d
    try:                                     # all rows claim index 0: every rank must raise
        gather_rows(rows_of(idx), np.zeros_like(idx), n, info)
        seen["bad_cover_raised"] = False
    except ValueError:
        seen["bad_cover_raised"] = True
    payload = {"pseudo": np.arange(5) * 7, "acc": 0.9} if rank == 0 else None
    seen["broadcast"] = broadcast_object(payload, info)
    seen["mean"] = all_reduce_mean(torch.tensor([rank + 1.0, 10.0 * rank]), info)
    # DDP: each rank sees different data; after backward the gradients are the ranks' average
    torch.manual_seed(rank)                  # different init per rank: DDP must broadcast rank 0's
    model = torch.nn.Linear(3, 1)
    ddp = wrap_ddp(model, info, device)
    x = torch.full((4, 3), float(rank + 1))
    ddp(x).sum().backward()
    seen["weight"] = model.weight.detach().clone()
    seen["grad"] = model.weight.grad.clone()
    seen["unwrapped_is_model"] = unwrap(ddp) is model
    barrier(info)
    cleanup(info)
    torch.save(seen, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_process_gloo_group(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    seen = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    expected = rows_of(np.arange(11))
    for r, s in enumerate(seen):
        assert s["info"] == DistInfo(r, WORLD, r, True) and s["info"].is_main == (r == 0)
        assert s["device"] == "cpu"
        torch.testing.assert_close(s["strided"], expected)           # dataset order on every rank
        torch.testing.assert_close(s["lopsided"], expected)
        torch.testing.assert_close(s["labels"], torch.arange(11) % 3)
        assert s["bad_cover_raised"]
        np.testing.assert_array_equal(s["broadcast"]["pseudo"], np.arange(5) * 7)
        assert s["broadcast"]["acc"] == 0.9
        torch.testing.assert_close(s["mean"], torch.tensor([1.5, 5.0]))
        # d/dW sum(W x + b) = sum of x rows = 4 * (rank + 1) per input; averaged over ranks: 6
        torch.testing.assert_close(s["grad"], torch.full((1, 3), 6.0))
        torch.testing.assert_close(s["weight"], seen[0]["weight"])
        assert s["unwrapped_is_model"]


def test_single_process_fallback(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    info, device = init_distributed("cpu")
    assert info == DistInfo(0, 1, 0, False) and info.is_main and device == torch.device("cpu")
    order = np.array([3, 0, 2, 1])
    torch.testing.assert_close(gather_rows(rows_of(order), order, 4, info), rows_of(np.arange(4)))
    with pytest.raises(ValueError):
        gather_rows(rows_of([0, 1, 1]), [0, 1, 1], 3, info)
    with pytest.raises(ValueError):
        gather_rows(rows_of([0, 1]), [0, 1], 3, info)
    assert broadcast_object({"a": 1}, info) == {"a": 1}
    x = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(all_reduce_mean(x, info), x)
    model = torch.nn.Linear(2, 2)
    assert wrap_ddp(model, info, device) is model and unwrap(model) is model
    barrier(info)
    cleanup(info)


def test_world_of_one_under_torchrun_needs_no_group(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    info, _ = init_distributed("cpu")
    assert info == DistInfo(0, 1, 0, False)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 7, 12])
def test_shard_covers_every_index_once(n, world):
    parts = [shard(n, DistInfo(r, world, r, world > 1)) for r in range(world)]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_epoch_permutation_is_seeded_and_changes_per_epoch():
    a = epoch_permutation(50, seed=3, epoch=1)
    np.testing.assert_array_equal(a, epoch_permutation(50, seed=3, epoch=1))
    np.testing.assert_array_equal(np.sort(a), np.arange(50))
    assert not np.array_equal(a, epoch_permutation(50, seed=3, epoch=2))
    assert not np.array_equal(a, epoch_permutation(50, seed=4, epoch=1))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_epoch_shards_rebuild_the_single_process_batches(world):
    """Disjoint, equal-length shards; per-rank batch B/world -> step k is the 1-process batch k."""
    n, batch, seed, epoch = 103, 12, 5, 7
    parts = [epoch_shard(n, seed, epoch, DistInfo(r, world, r, world > 1)) for r in range(world)]
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == n // world
    union = np.concatenate(parts)
    assert len(np.unique(union)) == len(union)
    perm = epoch_permutation(n, seed, epoch)
    sub = batch // world
    for k in range(n // batch):                          # the steps of a drop-last loader
        together = np.concatenate([p[k * sub:(k + 1) * sub] for p in parts])
        np.testing.assert_array_equal(np.sort(together), np.sort(perm[k * batch:(k + 1) * batch]))
    assert len(parts[0]) // sub == n // batch            # the same number of steps per epoch
