"""LaplaceNet's pseudo-labelling step (../shared/LAPLACENET.md, steps 2b-2f), computed fast.

Same mathematics as the published algorithm (:mod:`laplacedrl.graph.reference`), organised for speed:

1. exact kNN (:mod:`laplacedrl.graph.knn`; on CPUs with fast int8 products the int8 screen of
   :mod:`laplacedrl.graph.screen`), on the rows put in a cluster order first (an ordering only;
   results are returned in input order) so that neighbours sit close in memory;
2. ``W[i, j] = max(sim_ij, 0)``, max-symmetrised, zero diagonal, ``Wn = D^-1/2 W D^-1/2`` (zero degree
   -> 1). Negative similarities are clipped so that W is a non-negative affinity. The published code
   keeps them; that differs only where both directions of an edge are negative (its
   max-symmetrisation already zeroes one-sided negative edges), and there it can give NaN degrees;
3. ``(I - alpha Wn) Z = Y`` by conjugate gradients on all classes at once (one sparse x dense
   product per iteration, float32), each column stopping exactly where scipy's per-class ``cg`` would;
4. ``Z`` clipped at 0, rows L2-normalised, labeled rows one-hot;
5. distribution alignment as one argmax + bincount per round (:func:`align_distribution`);
6. weights ``1 - H(p) / log C`` with ``p`` the row scaled to sum 1 (labeled rows 1, all-zero rows 0).

On CPU the libraries run single-threaded and the parallel work is spread over our own threads (kNN
tiles, row bands x column chunks of the sparse products): no OpenMP barriers, which collapse when the
machine is shared. Converged CG columns are dropped from the block. On an accelerator everything stays
on the device and no iteration waits for the host (converged columns are frozen by masks instead).
"""

import dataclasses
import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse
import torch

from laplacedrl.graph.knn import (_as_tensor, _check_knn_args, _knn, cluster_order, num_threads,
                                  resolve_backend, thread_limit)

_SPMM_CHUNK = 16      # columns per CPU sparse x dense product (measured fastest with MKL)


@dataclasses.dataclass
class PropagationResult:
    """Output of :func:`propagate` (all arrays numpy, rows in input order)."""

    pseudo_labels: np.ndarray        # (N,) int64; labeled points keep their label
    probs: np.ndarray                # (N, C) float32; clipped, L2-normalised, aligned; labeled one-hot
    weights: np.ndarray              # (N,) float32; 1 - H(p)/log C, labeled 1
    acc_before_align: float | None   # percent over unlabeled points with a known label (>= 0)
    acc_after_align: float | None
    cg_iters: int                    # most CG iterations any class needed
    cg_residual: float               # largest final ||y - A z|| / ||y|| over classes
    knn_backend: str                 # "faiss" or "torch"
    timings: dict                    # seconds: knn, graph, cg, align, total


# ----------------------------------------------------------------------------------------------------
# Graph


def _csr_tensor(crow, col, val, shape):
    """A torch sparse CSR tensor, without the beta-feature warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, val, size=shape, check_invariants=False)


def normalized_graph_host(sims, idx):
    """Wn = D^-1/2 max(W, W^T) D^-1/2 from numpy kNN arrays (N, k), built with scipy.sparse.

    W[i, idx[i, j]] = max(sims[i, j], 0); rows with zero degree use D = 1. Returns a float32 CSR matrix.
    """
    n, k = idx.shape
    values = np.where(idx == np.arange(n)[:, None], 0, np.maximum(sims, 0)).astype(np.float32)  # no self
    w = scipy.sparse.csr_matrix((values.ravel(), idx.ravel(), np.arange(0, n * k + 1, k)), shape=(n, n))
    w.sort_indices()
    w = w.maximum(w.T.tocsr()).tocsr()                                 # symmetric, max of both directions
    w.eliminate_zeros()
    degree = np.asarray(w.sum(axis=1), dtype=np.float64).ravel()
    degree[degree == 0] = 1
    d = (1 / np.sqrt(degree)).astype(np.float32)
    rows = np.repeat(np.arange(n), np.diff(w.indptr))
    w.data *= d[rows] * d[w.indices]
    return w


def normalized_graph_torch(sims, idx):
    """The same Wn as :func:`normalized_graph_host`, in torch on sims' device; returns sparse CSR."""
    n, k = idx.shape
    dev = sims.device
    rows = torch.arange(n, device=dev).repeat_interleave(k)                 # (N k,)
    cols = idx.reshape(-1)
    w = sims.clamp_min(0).reshape(-1)
    keys = torch.cat([rows * n + cols, cols * n + rows])                    # both directions
    uniq, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    val = torch.zeros(len(uniq), device=dev).scatter_reduce_(
        0, inverse, torch.cat([w, w]), reduce="amax", include_self=False)    # max over duplicates
    r, c = uniq // n, uniq % n
    off_diag = r != c
    r, c, val = r[off_diag], c[off_diag], val[off_diag]
    degree = torch.zeros(n, device=dev).index_add_(0, r, val)
    d = torch.where(degree > 0, degree, torch.ones_like(degree)).rsqrt()
    crow = torch.zeros(n + 1, dtype=torch.long, device=dev)
    crow[1:] = torch.cumsum(torch.bincount(r, minlength=n), 0)
    return _csr_tensor(crow, c, val * d[r] * d[c], (n, n))


def _host_to_torch(w):
    """scipy CSR -> torch CSR (int32 indices, shared memory where possible)."""
    crow, col = (torch.from_numpy(a.astype(np.int32)) for a in (w.indptr, w.indices))
    return _csr_tensor(crow, col, torch.from_numpy(w.data), w.shape)


# ----------------------------------------------------------------------------------------------------
# Conjugate gradients


def column_dot(a, b):
    """Column-wise dot products (C,) of a, b (N, C); float64 partial sums over row chunks on CPU."""
    if a.device.type != "cpu":
        return torch.linalg.vecdot(a, b, dim=0)
    an, bn = a.numpy(), b.numpy()                      # numpy's einsum is ~4x faster than torch here
    total = np.zeros(a.shape[1])
    for s in range(0, len(an), 4096):
        total += np.einsum("ij,ij->j", an[s:s + 4096], bn[s:s + 4096])
    return torch.from_numpy(total).to(a.dtype)


def block_cg(apply_a, b, rtol=1e-3, max_iter=30, compact=True):
    """Independent CG solves of A x_c = b_c for all columns of b (N, C) at once.

    Each column follows scipy.sparse.linalg.cg from x0 = 0 exactly: it stops at the first iterate with
    ||r_c|| < rtol ||b_c|| or after max_iter updates, and a zero b_c gives x_c = 0. One call of
    ``apply_a`` (N, C') -> (N, C') per iteration serves all running columns.

    compact=True drops converged columns from the block (needs their count on the host each iteration);
    compact=False freezes them with masks so that nothing leaves the device.

    Returns (x (N, C), iterations per column (C,) int64 tensor).
    """
    n, c = b.shape
    x = torch.zeros_like(b)
    iters = torch.zeros(c, dtype=torch.long, device=b.device)
    cols = torch.arange(c, device=b.device)                       # global column of each working column
    bnorm = torch.linalg.vector_norm(b, dim=0)
    thresh = rtol * bnorm
    r = b.clone()
    p = r.clone()
    xa = torch.zeros_like(b)
    rho = column_dot(r, r)                                      # (C',) ||r||^2
    active = (rho.sqrt() >= thresh) & (bnorm > 0)
    zero = torch.zeros((), dtype=b.dtype, device=b.device)
    for _ in range(max_iter):
        if compact:
            if not bool(active.all()):                            # drop converged columns
                x[:, cols[~active]] = xa[:, ~active]
                keep = active.nonzero().squeeze(1)
                xa, r, p, rho, thresh, cols = (v.index_select(-1, keep)
                                               for v in (xa, r, p, rho, thresh, cols))
                active = active[keep]
            if cols.numel() == 0:
                break
        q = apply_a(p)                                            # (N, C')
        step = torch.where(active, rho / column_dot(p, q), zero)
        xa.addcmul_(step, p)
        r.addcmul_(step, q, value=-1)
        rho_new = column_dot(r, r)
        iters.index_add_(0, cols, active.long())
        beta = torch.where(active, rho_new / rho, zero)
        active = active & (rho_new.sqrt() >= thresh)
        torch.addcmul(r, p, beta, out=p)                          # p = r + beta p
        rho = rho_new
    x[:, cols] = xa
    return x, iters


def _relative_residual(apply_a, b, x):
    """max over columns with b_c != 0 of ||b_c - A x_c|| / ||b_c||."""
    bnorm = torch.linalg.vector_norm(b, dim=0)
    res = torch.linalg.vector_norm(b - apply_a(x), dim=0)
    nonzero = bnorm > 0
    return float((res[nonzero] / bnorm[nonzero]).max()) if bool(nonzero.any()) else 0.0


# ----------------------------------------------------------------------------------------------------
# Alignment and weights


def _scaled_argmax(rows, pool=None, parts=1):
    """f -> argmax over classes of rows * f (rows (L, C), f (C,) or (L, C)), reusing one buffer.

    On CPU in numpy (~3x faster than torch's argmax there), split over ``pool``'s threads by rows
    into ``parts`` (numpy releases the GIL); elsewhere one torch expression.
    """
    if rows.device.type != "cpu":
        return lambda f: (rows * f.to(rows.dtype)).argmax(1)
    r = rows.numpy()
    buf = np.empty_like(r)
    winner = np.empty(len(r), dtype=np.int64)
    cuts = np.linspace(0, len(r), parts + 1).astype(int)

    def part(a, b, f):
        np.multiply(r[a:b], f if f.ndim == 1 else f[a:b], out=buf[a:b])
        winner[a:b] = buf[a:b].argmax(axis=1)

    def argmax(f):
        f = f.numpy().astype(r.dtype)
        if pool is None or parts == 1:
            part(0, len(r), f)
        else:
            for job in [pool.submit(part, a, b, f) for a, b in zip(cuts[:-1], cuts[1:])]:
                job.result()
        return torch.from_numpy(winner.copy())
    return argmax


def align_distribution(probs, unlabeled, labeled_freq, steps=100, clip=0.01, pool=None, parts=1):
    """Smooth distribution alignment of the unlabeled rows, vectorised.

    Equals ``steps`` rounds of: h = histogram of argmax over the unlabeled rows / their count;
    f = clip(labeled_freq / (h + 1e-7), 1 - clip, 1 + clip); unlabeled columns *= f; rows L2-normalised.

    The normalisation never changes an argmax, so after t rounds the rows are normalise(P0 * F_t) with
    F_t the product of the factors: a round is one argmax of P0 * F_t and one bincount. F_t moves the
    ratio of two classes by at most ((1 + clip) / (1 - clip))^steps in all, so rows whose runner-up is
    below that reach of their best never change and are counted once, and the others keep only the
    classes within reach. Computes in probs' dtype; no host round trip inside the rounds.

    Args:
        probs: (N, C) non-negative rows (labeled rows are returned unchanged).
        unlabeled: (N,) bool.
        labeled_freq: (C,) class frequencies of the labeled points (sum 1).
        pool, parts: optional ThreadPoolExecutor and number of row parts to split the CPU rounds into.
    Returns:
        (N, C) tensor, the unlabeled rows normalise(P0 * F).
    """
    pu = probs[unlabeled]                                               # (U, C)
    n_u, n_c = pu.shape
    dev = probs.device
    factor = torch.ones(n_c, dtype=torch.float64, device=dev)
    target = torch.as_tensor(labeled_freq, dtype=torch.float64, device=dev)
    if n_u and steps:
        reach = ((1 - clip) / (1 + clip)) ** steps * (1 - 1e-6)
        within = pu >= pu.amax(1, keepdim=True) * reach                  # (U, C) classes that can win
        fixed = within.sum(1) == 1
        settled = torch.bincount(pu[fixed].argmax(1), minlength=n_c).double()
        live = pu[~fixed]                                               # (L, C)
        width = int(within[~fixed].sum(1).max()) if len(live) else 1
        cls = None
        if width < n_c // 2:                                            # keep only the candidates
            cls = live.topk(width, dim=1).indices                       # (L, W)
            live = live.gather(1, cls)
        argmax = _scaled_argmax(live, pool, parts)
        ones = torch.ones(len(live), dtype=torch.float64, device=dev)
        for _ in range(steps):
            winner = argmax(factor if cls is None else factor[cls])
            if cls is not None:
                winner = cls.gather(1, winner[:, None]).squeeze(1)
            hist = settled.index_add(0, winner, ones) / n_u           # bincount, without a host sync
            factor *= (target / (hist + 1e-7)).clamp(1 - clip, 1 + clip)
    out = probs.clone()
    out[unlabeled] = torch.nn.functional.normalize(pu.double() * factor, dim=1).to(probs.dtype)
    return out


def align_distribution_loop(probs, unlabeled, labeled_freq, steps=100, clip=0.01):
    """The published per-round loop (rescale + renormalise every round), for tests."""
    p = probs.double().clone()
    factor_lo, factor_hi = 1 - clip, 1 + clip
    target = torch.as_tensor(labeled_freq, dtype=torch.float64)
    n_c = p.shape[1]
    for _ in range(steps):
        hist = torch.bincount(p[unlabeled].argmax(1), minlength=n_c).double() / int(unlabeled.sum())
        f = (target / (hist + 1e-7)).clamp(factor_lo, factor_hi)
        p[unlabeled] = torch.nn.functional.normalize(p[unlabeled] * f, dim=1)
    return p.to(probs.dtype)


def entropy_weights(probs, labeled, num_classes):
    """w_i = 1 - H(p_i) / log C with p_i = row i / its sum; labeled rows 1, all-zero rows 0."""
    total = probs.sum(dim=1, keepdim=True)
    p = probs / total.clamp_min(torch.finfo(probs.dtype).tiny)
    h = -torch.special.xlogy(p, p).sum(dim=1)
    w = 1 - h / math.log(num_classes)
    w = torch.where(total.squeeze(1) > 0, w, torch.zeros_like(w))
    w[labeled] = 1
    return w


# ----------------------------------------------------------------------------------------------------
# The whole step


def _check_propagate_args(features, labels, labeled_mask, num_classes, k, alpha, max_iter, tol,
                          align_steps, align_clip):
    n = features.shape[0]
    if labels.shape != (n,) or labeled_mask.shape != (n,):
        raise ValueError(f"labels and labeled_mask must have shape ({n},) to match features; "
                         f"got {tuple(labels.shape)} and {tuple(labeled_mask.shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    _check_knn_args(features, k)
    if not bool(labeled_mask.any()):
        raise ValueError("no labeled points: label propagation needs at least one")
    lab = labels[labeled_mask]
    if bool(((lab < 0) | (lab >= num_classes)).any()):
        raise ValueError(f"labeled points must have labels in [0, {num_classes}); found {int(lab.min())}"
                         f"..{int(lab.max())}")
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    if max_iter < 1 or tol <= 0:
        raise ValueError(f"need max_iter >= 1 and tol > 0, got max_iter={max_iter}, tol={tol}")
    if align_steps < 0 or not 0 <= align_clip < 1:
        raise ValueError(f"need align_steps >= 0 and 0 <= align_clip < 1, got {align_steps}, {align_clip}")


def _accuracy(pred, labels, unlabeled):
    known = unlabeled & (labels >= 0)
    return None if not bool(known.any()) else 100.0 * float((pred[known] == labels[known]).double().mean())


def propagate(features, labels, labeled_mask, num_classes, k=50, alpha=0.99, max_iter=30, tol=1e-3,
              align_steps=100, align_clip=0.01, knn_backend="auto", device=None):
    """Pseudo-labels for every point by kNN-graph label propagation (LaplaceNet steps 2b-2f).

    Args:
        features: (N, d) float numpy array or torch tensor (CPU or CUDA).
        labels: (N,) int; labels of unlabeled points only feed the reported accuracy (-1 = unknown).
        labeled_mask: (N,) bool.
        num_classes: C >= 2.
        k, alpha, max_iter, tol: graph neighbours, propagation weight, CG limit and relative tolerance.
        align_steps, align_clip: distribution-alignment rounds and factor clip.
        knn_backend: "auto" | "faiss" | "torch".
        device: where to compute (default: the features' device; numpy input computes on CPU).

    Returns:
        :class:`PropagationResult`.
    """
    x = _as_tensor(features, device)
    return _propagate(x, labels, labeled_mask, num_classes, k, alpha, max_iter, tol, align_steps,
                      align_clip, knn_backend, host=x.device.type == "cpu")


class _HostOperator:
    """v -> (I - alpha Wn) v on CPU for v (N, C'), parallel over threads without OpenMP.

    Wn (scipy CSR) is cut into row bands of equal nnz, one per thread, and v into column chunks of
    ``chunk`` (MKL's sparse x dense product is several times faster on narrow blocks); each task is a
    single-threaded ``addmm`` into its own slice of the output.
    """

    def __init__(self, wn, alpha, pool, workers, chunk=_SPMM_CHUNK):
        cuts = np.searchsorted(wn.indptr, np.linspace(0, wn.nnz, workers + 1)).clip(0, wn.shape[0])
        cuts[0], cuts[-1] = 0, wn.shape[0]
        self.bands = [(a, b, _host_to_torch(wn[a:b])) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
        self.alpha, self.pool, self.chunk = alpha, pool, chunk

    def __call__(self, v):
        parts = [p.contiguous() for p in v.split(self.chunk, dim=1)]
        outs = [torch.empty_like(p) for p in parts]

        def task(p, o, a, b, w):
            torch.addmm(p[a:b], w, p, beta=1.0, alpha=-self.alpha, out=o[a:b])

        jobs = [self.pool.submit(task, p, o, a, b, w) for p, o in zip(parts, outs) for a, b, w in self.bands]
        for job in jobs:
            job.result()
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


def _propagate(x, labels, labeled_mask, num_classes, k, alpha, max_iter, tol, align_steps, align_clip,
               knn_backend, host):
    """propagate() on tensor x; host=False runs the accelerator path (usable on the CPU device in tests)."""
    t_start = time.perf_counter()
    dev = x.device
    labels = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
    labeled = torch.as_tensor(np.asarray(labeled_mask) if not torch.is_tensor(labeled_mask) else labeled_mask)
    labels, labeled = labels.to(dev, torch.long), labeled.to(dev, torch.bool)
    _check_propagate_args(x, labels, labeled, num_classes, k, alpha, max_iter, tol, align_steps, align_clip)
    backend = resolve_backend(knn_backend, dev)
    timings = {}

    def lap(stage, t0):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        timings[stage] = time.perf_counter() - t0
        return time.perf_counter()

    workers = num_threads()
    # CPU: libraries single-threaded, parallel work spread over our own threads (robust under load).
    with thread_limit(1 if host else workers), ThreadPoolExecutor(workers) as pool:
        # Work in a cluster order: neighbours end up close in memory (kNN tiles, sparse products).
        t = time.perf_counter()
        x = torch.nn.functional.normalize(x, dim=1)
        perm = cluster_order(x)
        x, labels, labeled = x[perm].contiguous(), labels[perm], labeled[perm]
        unlabeled = ~labeled
        sims, idx = _knn(x, k, backend, ordered=True)                      # (N, k) each
        t = lap("knn", t)

        if host:
            wn = normalized_graph_host(sims.numpy(), idx.numpy())
        else:
            wn = normalized_graph_torch(sims, idx)
        t = lap("graph", t)

        y = torch.zeros(len(labels), num_classes, device=dev)               # (N, C) one-hot labeled rows
        y[labeled, labels[labeled]] = 1
        if host:
            apply_a = _HostOperator(wn, alpha, pool, workers)
        else:
            def apply_a(v):                                                 # (I - alpha Wn) v
                return torch.addmm(v, wn, v, beta=1.0, alpha=-alpha)
        z, iters = block_cg(apply_a, y, rtol=tol, max_iter=max_iter, compact=host)
        residual = _relative_residual(apply_a, y, z)
        t = lap("cg", t)

        probs = torch.nn.functional.normalize(z.clamp_min_(0), dim=1)
        probs[labeled] = y[labeled]
        acc_before = _accuracy(probs.argmax(1), labels, unlabeled)
        freq = torch.bincount(labels[labeled], minlength=num_classes).double() / int(labeled.sum())
        probs = align_distribution(probs, unlabeled, freq, align_steps, align_clip, pool, workers)
        probs[labeled] = y[labeled]
        pseudo = probs.argmax(1)
        acc_after = _accuracy(pseudo, labels, unlabeled)
        weights = entropy_weights(probs, labeled, num_classes)
        t = lap("align", t)

    def unpermute(v):
        out = torch.empty_like(v)
        out[perm] = v
        return out.cpu().numpy()

    timings["total"] = time.perf_counter() - t_start
    return PropagationResult(
        pseudo_labels=unpermute(pseudo).astype(np.int64), probs=unpermute(probs).astype(np.float32),
        weights=unpermute(weights).astype(np.float32), acc_before_align=acc_before,
        acc_after_align=acc_after, cg_iters=int(iters.max()), cg_residual=residual, knn_backend=backend,
        timings=timings)
