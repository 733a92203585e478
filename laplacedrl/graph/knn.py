"""Exact k-nearest-neighbour search by inner product of L2-normalised rows, the point itself dropped.

Backends (``knn_search(..., backend=...)``):

- ``"faiss"``: ``IndexFlatIP`` (exact), on all GPUs when faiss sees GPUs and the data is on CUDA,
  else on the CPU; k + 1 hits per query, the query's own index removed.
- ``"torch"``: row blocks ``S = X_b X^T`` in one reused buffer on the data's device, the
  diagonal set to -inf, ``topk`` per block. Runs on any device (the tests run it on the CPU).
- ``"auto"``: faiss when it imports and can serve the device (its CPU index for CPU data, its GPU
  index for CUDA data when it sees GPUs), else torch.

Threads are left to faiss and torch: nothing here changes a library's thread settings.
Results agree between backends up to ties (equal similarities, or ones within float32 rounding).
"""

import math

import numpy as np
import torch

from laplacedrl.choices import KNN_BACKENDS

_ROWBLOCK_ELEMENTS = {"cpu": 2**25, "cuda": 2**28}   # similarities held at once: 128 MiB / 1 GiB


def _import_faiss():
    try:
        import faiss
    except Exception:  # ImportError, or a broken CUDA build failing at import time
        return None
    return faiss


def faiss_gpu_count():
    """GPUs faiss can use, or None when faiss cannot be imported (for start-up logs)."""
    faiss = _import_faiss()
    return faiss.get_num_gpus() if faiss is not None else None


def resolve_backend(backend="auto", device=None):
    """The backend ``knn_search`` will use: "faiss" or "torch" (ValueError for an unknown name).

    "auto": faiss for CPU data when faiss imports, faiss's GPU index for CUDA data when faiss sees
    GPUs, torch otherwise (e.g. CUDA data with a CPU-only faiss: the search stays on the device).
    """
    if backend not in KNN_BACKENDS:
        raise ValueError(f"unknown kNN backend {backend!r}; choose one of {', '.join(KNN_BACKENDS)}")
    faiss = _import_faiss()
    if backend == "auto":
        on_cuda = device is not None and torch.device(device).type == "cuda"
        usable = faiss is not None and (not on_cuda or faiss.get_num_gpus() > 0)
        return "faiss" if usable else "torch"
    if backend == "faiss" and faiss is None:
        raise ValueError("kNN backend 'faiss' requested but faiss cannot be imported; use 'torch'")
    return backend


def _as_tensor(x, device):
    """Features as a float32 torch tensor on ``device`` (default: x's own device, CPU for numpy)."""
    t = torch.as_tensor(x)
    device = torch.device(device) if device is not None else t.device
    return t.to(device=device, dtype=torch.float32)


def check_knn_args(x, k):
    """ValueError for anything but finite (N, d) features and 1 <= k < N."""
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D (N, d) array, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must satisfy 1 <= k < N (the point itself is excluded); got k={k}, N={n}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("features contain NaN or infinite values")


def knn_search(x, k, backend="auto", device=None):
    """Exact kNN by inner product of the L2-normalised rows of x, each point's own index excluded.

    Args:
        x: (N, d) numpy array or torch tensor.
        k: neighbours per point, 1 <= k < N.
        backend: "auto" | "faiss" | "torch" (see the module docstring).
        device: where to compute (default: x's device; numpy input computes on the CPU).

    Returns:
        (sims (N, k) float32, idx (N, k) int64), rows sorted by decreasing similarity: numpy arrays
        for numpy input, torch tensors (on the compute device) for tensor input.
    """
    xt = _as_tensor(x, device)
    check_knn_args(xt, k)
    sims, idx = knn(xt, k, resolve_backend(backend, xt.device))
    if isinstance(x, np.ndarray):
        return sims.cpu().numpy(), idx.cpu().numpy()
    return sims, idx


def knn(x, k, backend):
    """:func:`knn_search` on a float32 tensor with a resolved backend; tensors on x's device."""
    x = torch.nn.functional.normalize(x, dim=1)
    return knn_faiss(x, k) if backend == "faiss" else knn_torch(x, k)


def knn_faiss(x, k):
    """faiss ``IndexFlatIP`` search of unit rows for k + 1 hits, each row's own index removed.

    When duplicates of a point tie with it, faiss may not return the point itself; then the last of
    the k + 1 hits is dropped instead.
    """
    faiss = _import_faiss()
    xn = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    index = faiss.IndexFlatIP(xn.shape[1])
    if x.device.type == "cuda" and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(xn)
    sims, idx = index.search(xn, k + 1)                   # (N, k+1) each
    drop = idx == np.arange(len(idx))[:, None]            # the point itself
    drop[~drop.any(axis=1), -1] = True
    sims = sims[~drop].reshape(-1, k)
    idx = idx[~drop].reshape(-1, k).astype(np.int64)
    return torch.from_numpy(sims).to(x.device), torch.from_numpy(idx).to(x.device)


def knn_torch(x, k):
    """Row blocks of unit rows: ``S = X_b X^T`` (b, N) into one reused buffer, self -inf, top-k."""
    n = x.shape[0]
    rows = max(1, min(n, _ROWBLOCK_ELEMENTS.get(x.device.type, 2**25) // n))
    buf = torch.empty(rows, n, device=x.device)
    sims = torch.empty(n, k, device=x.device)
    idx = torch.empty(n, k, dtype=torch.long, device=x.device)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        block = torch.mm(x[s:e], x.T, out=buf[: e - s])                     # (b, N)
        block.diagonal(offset=s).fill_(-math.inf)                          # drop self
        torch.topk(block, k, dim=1, out=(sims[s:e], idx[s:e]))
    return sims, idx
