"""LaplaceNet's pseudo-labelling step: kNN graph, label propagation, distribution alignment.

The same mathematics as the published algorithm (:mod:`laplacedrl.graph.reference`, a faithful slow
re-implementation used as the yardstick), computed with torch on whatever device the features are
on (one code path for CPU and CUDA tensors; only the graph's sparse matrix is assembled by scipy):

1. exact kNN of the L2-normalised features (:mod:`laplacedrl.graph.knn`, faiss by default);
2. ``W[i, j] = max(sim_ij, 0)``, max-symmetrised, zero diagonal, ``Wn = D^-1/2 W D^-1/2`` (zero
   degree -> 1). Negative similarities are clipped so that W is a non-negative affinity; the
   published code keeps them, which differs only where both directions of an edge are negative
   (its max-symmetrisation already zeroes one-sided negative edges) and can give NaN degrees there;
3. ``(I - alpha Wn) Z = Y`` by conjugate gradients on all classes at once (one sparse x dense
   product per iteration), each column stopping exactly where scipy's per-class ``cg`` would;
4. ``Z`` clipped at 0, rows L2-normalised, labeled rows one-hot;
5. distribution alignment as one argmax + histogram per round (:func:`align_distribution`);
6. weights ``1 - H(p) / log C`` with ``p`` the row scaled to sum 1 (labeled rows 1, all-zero rows 0).
"""

import dataclasses
import math
import time
import warnings

import numpy as np
import scipy.sparse
import torch

from laplacedrl.graph.knn import _as_tensor, check_knn_args, knn, resolve_backend

_SPMM_COLUMNS = 32      # columns per sparse x dense product: CPU sparse kernels run faster on narrow blocks


@dataclasses.dataclass
class PropagationResult:
    """Output of :func:`propagate` (all arrays numpy, rows in input order)."""

    pseudo_labels: np.ndarray        # (N,) int64; labeled points keep their label
    probs: np.ndarray                # (N, C) float32; clipped, L2-normalised, aligned; labeled one-hot
    weights: np.ndarray              # (N,) float32; 1 - H(p)/log C, labeled 1
    labels_before_align: np.ndarray  # (N,) int64; argmax of the propagated rows before the alignment
    cg_iters: int                    # most CG iterations any class needed
    cg_residual: float               # largest final ||y - A z|| / ||y|| over classes
    knn_backend: str                 # "faiss" or "torch"
    timings: dict                    # seconds: knn, graph, cg, align, total


# ============ graph ============
def normalized_graph(sims, idx):
    """Wn = D^-1/2 max(W, W^T) D^-1/2 as a sparse CSR tensor on sims' device.

    ``W[i, idx[i, j]] = max(sims[i, j], 0)``; the diagonal is dropped; rows of zero degree use D = 1.
    Built with scipy.sparse on the host for any device (its transpose-and-maximum is a counting
    sort, several times faster than a sort in torch; the (N, k) inputs are small to move), then
    handed back to sims' device.
    """
    n, k = idx.shape
    s_np, i_np = sims.detach().cpu().numpy(), idx.detach().cpu().numpy()
    values = np.where(i_np == np.arange(n)[:, None], 0, np.maximum(s_np, 0)).astype(np.float32)
    w = scipy.sparse.csr_matrix((values.ravel(), i_np.ravel(), np.arange(0, n * k + 1, k)), shape=(n, n))
    w = w.maximum(w.T.tocsr()).tocsr()                   # symmetric: the larger of both directions
    w.eliminate_zeros()
    w.sort_indices()
    degree = np.asarray(w.sum(axis=1), dtype=np.float64).ravel()
    degree[degree == 0] = 1
    d = (1 / np.sqrt(degree)).astype(np.float32)
    w.data *= d[np.repeat(np.arange(n), np.diff(w.indptr))] * d[w.indices]
    index = np.int32 if w.nnz < 2**31 else np.int64         # int32 indices take MKL's sparse kernels
    crow, col, val = (torch.from_numpy(a).to(sims.device)
                      for a in (w.indptr.astype(index), w.indices.astype(index), w.data))
    with warnings.catch_warnings():                      # torch marks sparse CSR as a beta feature
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, val, size=(n, n), check_invariants=False)


def propagation_operator(wn, alpha):
    """``v -> (I - alpha Wn) v`` for v (N, C), in column blocks of ``_SPMM_COLUMNS``."""
    def apply(v):
        parts = [torch.addmm(p, wn, p, beta=1.0, alpha=-alpha) for p in v.split(_SPMM_COLUMNS, dim=1)]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return apply


# ============ conjugate gradients ============
def block_cg(apply_a, b, rtol=1e-3, max_iter=30):
    """Independent CG solves of A x_c = b_c for all columns of b (N, C) at once.

    Each column follows scipy.sparse.linalg.cg from x0 = 0 exactly: it stops at the first iterate with
    ||r_c|| < rtol ||b_c|| or after max_iter updates, and a zero b_c gives x_c = 0. Converged columns
    leave the block, so one call of ``apply_a`` (N, C') -> (N, C') per iteration serves the running ones.

    Returns (x (N, C), iterations per column (C,) int64 tensor).
    """
    x = torch.zeros_like(b)
    iters = torch.zeros(b.shape[1], dtype=torch.long, device=b.device)
    cols = torch.arange(b.shape[1], device=b.device)              # global column of each working column
    bnorm = torch.linalg.vector_norm(b, dim=0)
    thresh = rtol * bnorm
    xa, r = torch.zeros_like(b), b.clone()
    p = r.clone()
    rho = torch.linalg.vecdot(r, r, dim=0)                        # (C',) ||r||^2
    running = (rho.sqrt() >= thresh) & (bnorm > 0)
    for _ in range(max_iter):
        if not bool(running.all()):                               # drop converged columns
            x[:, cols[~running]] = xa[:, ~running]
            keep = running.nonzero().squeeze(1)
            xa, r, p, rho, thresh, cols = (v.index_select(-1, keep) for v in (xa, r, p, rho, thresh, cols))
            running = running[keep]
        if cols.numel() == 0:
            break
        q = apply_a(p)                                            # (N, C')
        step = rho / torch.linalg.vecdot(p, q, dim=0)
        xa.addcmul_(step, p)
        r.addcmul_(step, q, value=-1)
        rho_new = torch.linalg.vecdot(r, r, dim=0)
        iters[cols] += 1
        running = rho_new.sqrt() >= thresh
        p = torch.addcmul(r, p, rho_new / rho)                    # p = r + beta p
        rho = rho_new
    x[:, cols] = xa
    return x, iters


def _relative_residual(apply_a, b, x):
    """max over columns with b_c != 0 of ||b_c - A x_c|| / ||b_c||."""
    bnorm = torch.linalg.vector_norm(b, dim=0)
    res = torch.linalg.vector_norm(b - apply_a(x), dim=0)
    nonzero = bnorm > 0
    return float((res[nonzero] / bnorm[nonzero]).max()) if bool(nonzero.any()) else 0.0


# ============ alignment and weights ============
def align_distribution(probs, unlabeled, labeled_freq, steps=100, clip=0.01):
    """Smooth distribution alignment of the unlabeled rows, vectorised.

    Equals ``steps`` rounds of: h = histogram of argmax over the unlabeled rows / their count;
    f = clip(labeled_freq / (h + 1e-7), 1 - clip, 1 + clip); unlabeled columns *= f; rows L2-normalised.

    The normalisation never changes an argmax, so after t rounds the rows are normalise(P0 * F_t) with
    F_t the product of the factors: a round is one argmax of P0 * F_t and one histogram. F_t moves the
    ratio of two classes by at most ((1 + clip) / (1 - clip))^steps in all, so rows whose runner-up is
    below that reach of their best never change and are counted once, and the others keep only the
    classes within reach.

    Args:
        probs: (N, C) non-negative rows (labeled rows are returned unchanged).
        unlabeled: (N,) bool.
        labeled_freq: (C,) class frequencies of the labeled points (sum 1).
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
        cls = live.topk(width, dim=1).indices if width < n_c // 2 else None    # (L, W) candidates
        if cls is not None:
            live = live.gather(1, cls)
        ones = torch.ones(len(live), dtype=torch.float64, device=dev)
        for _ in range(steps):
            f = (factor if cls is None else factor[cls]).to(live.dtype)
            winner = (live * f).argmax(1)                               # (L,)
            if cls is not None:
                winner = cls.gather(1, winner[:, None]).squeeze(1)
            hist = settled.index_add(0, winner, ones) / n_u           # a histogram without a host sync
            factor *= (target / (hist + 1e-7)).clamp(1 - clip, 1 + clip)
    out = probs.clone()
    out[unlabeled] = torch.nn.functional.normalize(pu.double() * factor, dim=1).to(probs.dtype)
    return out


def align_distribution_loop(probs, unlabeled, labeled_freq, steps=100, clip=0.01):
    """The published per-round loop (rescale + renormalise every round), for tests."""
    p = probs.double().clone()
    target = torch.as_tensor(labeled_freq, dtype=torch.float64)
    for _ in range(steps):
        hist = torch.bincount(p[unlabeled].argmax(1), minlength=p.shape[1]).double() / int(unlabeled.sum())
        f = (target / (hist + 1e-7)).clamp(1 - clip, 1 + clip)
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


# ============ the whole step ============
def _check_propagate_args(features, labels, labeled_mask, num_classes, k, alpha, max_iter, tol,
                          *, align_steps, align_clip):
    n = features.shape[0]
    if labels.shape != (n,) or labeled_mask.shape != (n,):
        raise ValueError(f"labels and labeled_mask must have shape ({n},) to match features; "
                         f"got {tuple(labels.shape)} and {tuple(labeled_mask.shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    check_knn_args(features, k)
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


def propagate(features, labels, labeled_mask, num_classes, k=50, alpha=0.99, max_iter=30, tol=1e-3,
              *, align_steps=100, align_clip=0.01, knn_backend="auto", device=None):
    """Pseudo-labels for every point by kNN-graph label propagation (LaplaceNet's graph step).

    Args:
        features: (N, d) float numpy array or torch tensor (CPU or CUDA).
        labels: (N,) int; only the labeled points' entries are read (pass -1 elsewhere: a label of an
            unlabeled point never reaches the computation, and the caller measures accuracy).
        labeled_mask: (N,) bool.
        num_classes: C >= 2.
        k, alpha, max_iter, tol: graph neighbours, propagation weight, CG limit and relative tolerance.
        align_steps, align_clip: distribution-alignment rounds and factor clip.
        knn_backend: "auto" | "faiss" | "torch".
        device: where to compute (default: the features' device; numpy input computes on CPU).

    Returns:
        :class:`PropagationResult`.
    """
    t_start = time.perf_counter()
    x = _as_tensor(features, device)
    dev = x.device
    labels = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels).to(dev, torch.long)
    labeled = torch.as_tensor(np.asarray(labeled_mask) if not torch.is_tensor(labeled_mask)
                              else labeled_mask).to(dev, torch.bool)
    _check_propagate_args(x, labels, labeled, num_classes, k, alpha, max_iter, tol, align_steps=align_steps,
                          align_clip=align_clip)
    labels = torch.where(labeled, labels, -1)                           # nothing past here sees the others
    backend = resolve_backend(knn_backend, dev)
    unlabeled = ~labeled
    timings = {}

    def lap(stage, t0):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        timings[stage] = time.perf_counter() - t0
        return time.perf_counter()

    t = time.perf_counter()
    sims, idx = knn(x, k, backend)                                       # (N, k) each
    t = lap("knn", t)
    wn = normalized_graph(sims, idx)
    t = lap("graph", t)

    y = torch.zeros(len(labels), num_classes, device=dev)               # (N, C) one-hot labeled rows
    y[labeled, labels[labeled]] = 1
    apply_a = propagation_operator(wn, alpha)
    z, iters = block_cg(apply_a, y, rtol=tol, max_iter=max_iter)
    residual = _relative_residual(apply_a, y, z)
    t = lap("cg", t)

    probs = torch.nn.functional.normalize(z.clamp_min_(0), dim=1)
    probs[labeled] = y[labeled]
    before = probs.argmax(1)
    freq = torch.bincount(labels[labeled], minlength=num_classes).double() / int(labeled.sum())
    probs = align_distribution(probs, unlabeled, freq, align_steps, align_clip)
    probs[labeled] = y[labeled]
    pseudo = probs.argmax(1)
    weights = entropy_weights(probs, labeled, num_classes)
    lap("align", t)
    timings["total"] = time.perf_counter() - t_start
    return PropagationResult(
        pseudo_labels=pseudo.cpu().numpy().astype(np.int64), probs=probs.cpu().numpy().astype(np.float32),
        weights=weights.cpu().numpy().astype(np.float32),
        labels_before_align=before.cpu().numpy().astype(np.int64), cg_iters=int(iters.max()),
        cg_residual=residual, knn_backend=backend,
        timings=timings)
