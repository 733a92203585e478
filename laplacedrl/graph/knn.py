"""Exact k-nearest-neighbour search by inner product of L2-normalised rows, the point itself dropped.

Backends (``knn_search(..., backend=...)``):

- ``"faiss"``: ``IndexFlatIP`` (on all GPUs when faiss sees GPUs and the data is on CUDA), k + 1 hits
  per query, the query's own index removed.
- ``"torch"``:

  * on CUDA, row blocks ``S = X_b X^T`` into one preallocated buffer and ``topk`` per block;
  * on CPU from N = 8,192 on, when numba is installed and int8 matrix products run at least twice as
    fast as float32 ones: the int8 screen of :mod:`laplacedrl.graph.screen` (int8 similarities pick
    candidates, float32 ones decide, a per-row certificate proves the answer exact, rows it cannot
    certify are rescored against every point their bound does not rule out);
  * otherwise on CPU, a symmetric tiled search that does half the GEMM work. Rows are put in a
    cluster order (a few rounds of spherical k-means: an ordering only, the answer stays exact) and
    every row keeps a running top-k (faiss's C++ heaps when faiss imports, torch.topk merges
    otherwise). Diagonal
    tiles come first; an upper tile ``T = X_i X_j^T`` is then offered to the rows of block i whose
    maximum in T beats their current k-th best, and ``T^T`` to the columns that beat theirs, the
    most similar block pairs first so those thresholds tighten early. Worker threads take tiles with
    disjoint blocks and run every library single-threaded, which keeps both cores busy without
    OpenMP barriers (those collapse when the machine is shared).
- ``"auto"``: faiss's GPU index for CUDA data when faiss sees GPUs, else torch (see
  :func:`resolve_backend`).

Results agree between backends up to ties (equal similarities, or ones within float32 rounding).
"""

import contextlib
import math
import os
import threading

import numpy as np
import torch

from laplacedrl.graph import screen

# Work size of one GEMM block: rows x columns of float32 similarities held at once.
_ROWBLOCK_ELEMENTS = {"cpu": 2**25, "cuda": 2**28}   # 128 MiB on CPU, 1 GiB on CUDA
_TILE = 512                  # CPU symmetric tiles: 512 x 512 float32 = 1 MiB, so transposes stay in L2
_TILE_LARGE_N = 1024         # from 2**16 points on: 4x fewer tiles, same cost per element
_CLUSTER_SIZE = 512                                  # points per k-means cluster for the cluster order

BACKENDS = ("auto", "faiss", "torch")


def num_threads():
    """Threads to use: $OMP_NUM_THREADS when set, else the CPUs this process may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def thread_limit(n=None):
    """Run torch (and faiss, if importable) with ``n`` threads (default :func:`num_threads`), then restore."""
    n = n or num_threads()
    old = torch.get_num_threads()
    faiss = _import_faiss()
    old_faiss = faiss.omp_get_max_threads() if faiss else None
    torch.set_num_threads(n)
    if faiss:
        faiss.omp_set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(old)
        if faiss:
            faiss.omp_set_num_threads(old_faiss)


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

    "auto" picks faiss's GPU index when the device is CUDA and faiss sees GPUs, else torch: on CPU the
    symmetric torch search is several times faster than faiss's flat index (and still uses faiss's
    heaps when faiss imports).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown kNN backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        faiss = _import_faiss()
        on_cuda = device is not None and torch.device(device).type == "cuda"
        return "faiss" if faiss is not None and on_cuda and faiss.get_num_gpus() > 0 else "torch"
    if backend == "faiss" and _import_faiss() is None:
        raise ValueError("kNN backend 'faiss' requested but faiss cannot be imported; use 'torch'")
    return backend


def _as_tensor(x, device):
    """Features as a float32 torch tensor on ``device`` (default: x's own device, CPU for numpy)."""
    t = torch.as_tensor(x)
    device = torch.device(device) if device is not None else t.device
    return t.to(device=device, dtype=torch.float32)


def _check_knn_args(x, k):
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
        backend: "auto" | "faiss" | "torch".
        device: where the torch backend computes (default: x's device); faiss uses its GPU index
            when it sees GPUs and the device is CUDA.

    Returns:
        (sims (N, k) float32, idx (N, k) int64), rows sorted by decreasing similarity: numpy arrays
        for numpy input, torch tensors (on the compute device) for tensor input.
    """
    xt = _as_tensor(x, device)
    _check_knn_args(xt, k)
    backend = resolve_backend(backend, xt.device)
    with thread_limit():
        sims, idx = _knn(xt, k, backend)
    if isinstance(x, np.ndarray):
        return sims.cpu().numpy(), idx.cpu().numpy()
    return sims, idx


def _knn(x, k, backend, ordered=False):
    """Dispatch on a float32 tensor; returns torch tensors on x's device.

    ordered=True: the rows are already in cluster order (see :func:`cluster_order`).
    """
    x = torch.nn.functional.normalize(x, dim=1)
    if backend == "faiss":
        return knn_faiss(x, k)
    if x.device.type == "cpu":
        if use_screen(len(x), k, x.shape[1]):
            with thread_limit(1):                        # the screen spreads its own threads
                sims, idx, _ = screen.knn_screened(x, k, workers=num_threads())
            return sims, idx
        return knn_torch_symmetric(x, k, ordered=ordered)
    return knn_torch_rowblock(x, k)


def use_screen(n, k, d):
    """Whether the CPU search of N points of dimension d goes through the int8 screen
    (:mod:`laplacedrl.graph.screen`): numba installed, int8 products at least twice as fast as float32
    ones here, N and d large enough, and not switched off with LAPLACEDRL_INT8_SCREEN=0."""
    if os.environ.get("LAPLACEDRL_INT8_SCREEN", "1") == "0":
        return False
    return n >= screen.MIN_N and d >= screen.MIN_D and k < n // 4 and screen.available()


def knn_faiss(x, k):
    """faiss IndexFlatIP search for k + 1 hits; each row's own index removed (or its last hit, if absent)."""
    faiss = _import_faiss()
    xn = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    index = faiss.IndexFlatIP(xn.shape[1])
    if x.device.type == "cuda" and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(xn)
    with thread_limit():
        sims, idx = index.search(xn, k + 1)                   # (N, k+1) each
    drop = idx == np.arange(len(idx))[:, None]                # the point itself
    drop[~drop.any(axis=1), -1] = True                        # self not returned (ties): drop the last
    keep = ~drop
    sims = sims[keep].reshape(-1, k)
    idx = idx[keep].reshape(-1, k).astype(np.int64)
    return torch.from_numpy(sims).to(x.device), torch.from_numpy(idx).to(x.device)


def knn_torch_rowblock(x, k):
    """Row blocks: S = X_b X^T (B, N) into one reused buffer, self set to -inf, top-k per row."""
    n = x.shape[0]
    rows = max(1, min(n, _ROWBLOCK_ELEMENTS.get(x.device.type, 2**25) // n))
    buf = torch.empty(rows, n, device=x.device)
    sims = torch.empty(n, k, device=x.device)
    idx = torch.empty(n, k, dtype=torch.long, device=x.device)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        block = torch.mm(x[s:e], x.T, out=buf[: e - s])                       # (b, N)
        block.diagonal(offset=s).fill_(-math.inf)                            # drop self
        torch.topk(block, k, dim=1, out=(sims[s:e], idx[s:e]))
    return sims, idx


def cluster_order(x, cluster_size=_CLUSTER_SIZE, iters=4, seed=0):
    """A permutation that places similar rows of unit-norm x next to each other.

    Spherical k-means (K ~ N / cluster_size, a few rounds on a sample), clusters chained greedily by
    centroid similarity, points sorted by cluster. Used only as an ordering, never as an answer.
    """
    n = x.shape[0]
    n_clusters = max(1, min(1024, n // cluster_size))
    if n_clusters == 1:
        return torch.arange(n, device=x.device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sample = x[torch.randperm(n, generator=gen)[: min(n, 64 * n_clusters)].to(x.device)]
    centroids = sample[:n_clusters].clone()
    for _ in range(iters):
        assign = (sample @ centroids.T).argmax(1)                            # (n_sample,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, sample)     # (K, d)
        filled = sums.norm(dim=1) > 0
        centroids[filled] = torch.nn.functional.normalize(sums[filled], dim=1)
    assign = torch.cat([(chunk @ centroids.T).argmax(1) for chunk in x.split(65536)])  # (N,)
    rank = torch.empty(n_clusters, dtype=torch.long, device=x.device)
    rank[_greedy_chain(centroids)] = torch.arange(n_clusters, device=x.device)
    return torch.argsort(rank[assign], stable=True)


def _greedy_chain(points):
    """Order rows of unit-norm ``points`` so that each is followed by its most similar unvisited row."""
    sim = (points @ points.T).cpu()
    sim.fill_diagonal_(-math.inf)
    order = [0]
    sim[:, 0] = -math.inf
    for _ in range(len(points) - 1):
        nxt = int(sim[order[-1]].argmax())
        order.append(nxt)
        sim[:, nxt] = -math.inf
    return torch.tensor(order, device=points.device)


class _FaissTopK:
    """Running top-k of every row in faiss's C++ min-heaps: a value enters when it beats the row's k-th best.

    vals / idx (N, k) are numpy arrays; ``tau`` (N,) is a live view of each heap's root, the k-th best
    so far (-FLT_MAX until k values were seen). ``add`` takes numpy arrays.
    """

    def __init__(self, n, k):
        faiss = _import_faiss()
        self._ptr = faiss.swig_ptr
        self.vals = np.empty((n, k), dtype=np.float32)
        self.idx = np.empty((n, k), dtype=np.int64)
        self.heaps = faiss.float_minheap_array_t()
        self.heaps.k, self.heaps.nh = k, n
        self.heaps.val, self.heaps.ids = self._ptr(self.vals), self._ptr(self.idx)
        self.heaps.heapify()
        self.tau = self.vals[:, 0]

    def add(self, sims, ids, row0=None, rows=None):
        """Offer sims (A, B) with neighbour ids (B,) to rows row0 .. row0 + A - 1, or to those in ``rows``."""
        a, b = sims.shape
        if rows is None:
            self.heaps.addn_with_ids(b, self._ptr(sims), self._ptr(ids), 0, row0, a)
        else:
            self.heaps.addn_query_subset_with_ids(a, self._ptr(rows), b, self._ptr(sims), self._ptr(ids), 0)

    def result(self):
        """(vals, idx) (N, k) torch tensors, each row sorted by decreasing similarity."""
        self.heaps.reorder()
        return torch.from_numpy(self.vals), torch.from_numpy(self.idx)


class _TorchTopK:
    """The same running top-k as :class:`_FaissTopK` with torch.topk merges (used when faiss is absent)."""

    def __init__(self, n, k):
        self.k = k
        self.vals = torch.full((n, k), -math.inf)
        self.idx = torch.full((n, k), -1, dtype=torch.long)
        self._tau = torch.full((n,), -math.inf)
        self.tau = self._tau.numpy()                    # shares memory with the tensor updated below

    def add(self, sims, ids, row0=None, rows=None):
        sims, ids = torch.from_numpy(sims), torch.from_numpy(ids)
        rows = torch.arange(row0, row0 + len(sims)) if rows is None else torch.from_numpy(rows)
        v, j = torch.topk(sims, min(self.k, sims.shape[1]), dim=1, sorted=False)
        all_v = torch.cat([self.vals[rows], v], dim=1)                     # (A, k + m)
        all_i = torch.cat([self.idx[rows], ids[j]], dim=1)
        best, pos = torch.topk(all_v, self.k, dim=1, sorted=False)
        self.vals[rows] = best
        self.idx[rows] = all_i.gather(1, pos)
        self._tau[rows] = best.amin(dim=1)

    def result(self):
        vals, pos = torch.sort(self.vals, dim=1, descending=True)
        return vals, self.idx.gather(1, pos)


class _PairQueue:
    """Tile pairs (i, j) handed out in a preferred order to worker threads, never two at once that
    share a block, so that workers update disjoint rows of the running top-k."""

    def __init__(self, pairs):
        self.pending = list(pairs)
        self.busy = set()
        self.error = None                                # the first exception raised by a worker
        self.cond = threading.Condition()

    def take(self):
        with self.cond:
            while self.pending and self.error is None:
                for n, (i, j) in enumerate(self.pending):
                    if i not in self.busy and j not in self.busy:
                        self.busy.update((i, j))
                        return self.pending.pop(n)
                self.cond.wait()
            return None

    def release(self, pair, error=None):
        with self.cond:
            self.busy.difference_update(pair)
            self.error = self.error or error
            self.cond.notify_all()


def _offer(acc, t, rows, row0, ids, scratch):
    """Offer the rows ``rows`` (local indices) of tile t (torch view) to the accumulator: all of t when
    most rows are listed, else a gathered copy of those rows (torch's gather beats numpy's take here)."""
    if 2 * len(rows) > len(t):
        acc.add(t.contiguous().numpy(), ids, row0=row0)
    elif len(rows):
        sub = scratch[: len(rows) * t.shape[1]].view(len(rows), -1)
        acc.add(torch.index_select(t, 0, torch.from_numpy(rows), out=sub).numpy(), ids, rows=rows + row0)


def _tile_worker(xp, spans, acc, queue, tile):
    """Process tiles from the queue: diagonal ones whole, upper ones for their rows and columns.

    The GEMM and the transposes run in torch; everything else in numpy on views of the same buffers
    (fewer and cheaper calls per tile than torch's dispatch).
    """
    ids = np.arange(len(xp))
    buf = torch.empty(tile * tile)                       # flat, so that every (a, b) view is contiguous
    buf_t = torch.empty(tile * tile)

    def out(flat, a, b):
        return flat[: a * b].view(a, b)

    while (pair := queue.take()) is not None:
        error = None
        try:
            (si, ei), (sj, ej) = spans[pair[0]], spans[pair[1]]
            t = torch.mm(xp[si:ei], xp[sj:ej].T, out=out(buf, ei - si, ej - sj))   # (Bi, Bj)
            tn = t.numpy()
            if si == sj:
                np.fill_diagonal(tn, -np.inf)                                   # the point itself
                acc.add(tn, ids[sj:ej], row0=si)
            else:
                # T to the rows of block i, T^T to those of block j: only rows whose maximum beats
                # their current k-th best, gathered unless most of them do.
                rows = np.flatnonzero(tn.max(axis=1) > acc.tau[si:ei])
                cols = np.flatnonzero(tn.max(axis=0) > acc.tau[sj:ej])
                _offer(acc, t, rows, si, ids[sj:ej], buf_t)
                if 2 * len(cols) > ej - sj:                # T^T copied once, then offered whole
                    acc.add(out(buf_t, ej - sj, ei - si).copy_(t.T).numpy(), ids[si:ei], row0=sj)
                else:
                    _offer(acc, t.T, cols, sj, ids[si:ei], buf_t)
        except BaseException as exc:                     # stop the other workers, re-raised by the caller
            error = exc
        finally:
            queue.release(pair, error)


def _knn_symmetric_ordered(xp, k, tile, workers=None):
    """Exact kNN of the unit rows xp (N, d) from the upper-triangular tiles of xp xp^T.

    Diagonal tiles are offered whole (self excluded) and come first. An upper tile T = X_i X_j^T is
    offered to the rows of block i whose maximum in T beats their current k-th best, and its
    transpose to the columns that beat theirs; tiles of the most similar block pairs come first so
    that those thresholds tighten early. ``workers`` threads (default :func:`num_threads`) each run
    single-threaded GEMMs and heap updates on tiles with disjoint blocks: coarse-grained parallelism
    that also holds up on a loaded machine.
    Returns (vals, idx) (N, k) sorted by decreasing similarity.
    """
    n = xp.shape[0]
    workers = workers or num_threads()
    with thread_limit(1):                                # each worker's libraries run single-threaded
        acc = (_FaissTopK if _import_faiss() is not None else _TorchTopK)(n, k)
        spans = [(s, min(n, s + tile)) for s in range(0, n, tile)]
        centres = torch.stack([xp[s:e].sum(0) for s, e in spans])           # (nb, d)
        upper = torch.triu_indices(len(spans), len(spans), offset=1)        # (2, P)
        order = torch.argsort((centres @ centres.T)[upper[0], upper[1]], descending=True)
        pairs = [(b, b) for b in range(len(spans))] + [tuple(p) for p in upper[:, order].T.tolist()]
        queue = _PairQueue(pairs)
        threads = [threading.Thread(target=_tile_worker, args=(xp, spans, acc, queue, tile))
                   for _ in range(workers - 1)]
        for th in threads:
            th.start()
        _tile_worker(xp, spans, acc, queue, tile)
        for th in threads:
            th.join()
    if queue.error is not None:
        raise queue.error
    return acc.result()


def knn_torch_symmetric(x, k, tile=None, cluster_size=_CLUSTER_SIZE, ordered=False, workers=None):
    """CPU exact kNN over the upper-triangular tiles of X X^T (half the GEMM), see the module docstring.

    ordered=True: x is already in a locality-friendly order (skip the cluster ordering).
    """
    tile = tile or (_TILE if len(x) < 2**16 else _TILE_LARGE_N)
    perm = torch.arange(len(x)) if ordered else cluster_order(x, cluster_size)
    vals, idx = _knn_symmetric_ordered(x[perm].contiguous(), k, tile, workers)
    out_v = torch.empty_like(vals)
    out_i = torch.empty_like(idx)
    out_v[perm] = vals
    out_i[perm] = perm[idx]                                                   # back to input indices
    return out_v, out_i
