"""A deliberately slow, faithful re-implementation of LaplaceNet's published pseudo-labelling step.

Written from the published algorithm's description to serve as the yardstick for tests and for
``benchmarks/bench_propagation.py``. It keeps the published algorithm's choices, including its costs:

- faiss ``IndexFlatIP`` exact search for k + 1 neighbours, first column dropped (assumed to be the point
  itself); ``W[i, j]`` = the raw inner product (no clipping);
- symmetrisation ``W + W^T * [W^T > W] - W * [W^T > W]`` (the element-wise max), diagonal removed,
  ``Wn = D^-1/2 W D^-1/2`` with zero row sums set to 1, all in scipy.sparse;
- one ``scipy.sparse.linalg.cg`` solve per class of ``(I - alpha Wn) z = y`` (float64, ``rtol``, ``maxiter``);
- rows clipped at 0 and L2-normalised, labeled rows one-hot;
- distribution alignment with Python loops: the class histogram is counted point by point and the
  column scaling is a loop over classes, ``align_steps`` times;
- entropy weights via ``scipy.stats.entropy`` (a zero row gives NaN there, as published).

Use :func:`laplacedrl.graph.propagate` for real work; this module exists to be compared against.
"""

import time

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import scipy.stats


def _l2_normalise_rows(a):
    """Rows divided by max(||row||_2, 1e-12), as torch.nn.functional.normalize does."""
    norms = np.sqrt((a * a).sum(axis=1, keepdims=True))
    return a / np.maximum(norms, 1e-12)


def reference_knn(features, k):
    """faiss exact inner-product search of the L2-normalised rows for k + 1 hits, first column dropped.

    Returns (sims (N, k) float32, idx (N, k) int64).
    """
    import faiss  # imported here: the rest of the reference needs only numpy / scipy

    x = np.ascontiguousarray(features, dtype=np.float32).copy()
    faiss.normalize_L2(x)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, idx = index.search(x, k + 1)
    return sims[:, 1:], idx[:, 1:]


def reference_graph(sims, idx):
    """Published graph: W[i, idx[i, j]] = sims[i, j]; max-symmetrised; zero diagonal; D^-1/2 W D^-1/2."""
    n, k = idx.shape
    rows = np.repeat(np.arange(n), k)
    w = scipy.sparse.csr_matrix((sims.ravel(), (rows, idx.ravel())), shape=(n, n))
    wt_larger = w.T > w
    w = w + w.T.multiply(wt_larger) - w.multiply(wt_larger)
    w = w - scipy.sparse.diags(w.diagonal())
    degree = np.asarray(w.sum(axis=1)).ravel()
    degree[degree == 0] = 1
    d = scipy.sparse.diags(1.0 / np.sqrt(degree))
    return (d @ w @ d).tocsr()


def reference_cg(wn, y, alpha, tol, max_iter):
    """One scipy CG solve of (I - alpha Wn) z = y[:, c] per class c; returns Z (N, C) float64."""
    a = scipy.sparse.eye(wn.shape[0], format="csr") - alpha * wn
    z = np.zeros(y.shape)
    for c in range(y.shape[1]):
        z[:, c], _ = scipy.sparse.linalg.cg(a, y[:, c], rtol=tol, maxiter=max_iter)
    return z


def reference_align(probs, labels, labeled_idx, unlabeled_idx, num_classes, steps, clip):
    """The published smooth distribution alignment, loops included.

    Each step: histogram of argmax over the unlabeled rows, factor = labeled frequencies / histogram
    clipped to [1 - clip, 1 + clip], unlabeled columns scaled by the factor, every row L2-normalised.
    """
    probs = _l2_normalise_rows(probs)
    pseudo = np.argmax(probs, axis=1)
    labeled_freq = np.zeros(num_classes)
    for i in labeled_idx:
        labeled_freq[labels[i]] += 1
    labeled_freq /= len(labeled_idx)
    for _ in range(steps):
        unlabeled_freq = np.zeros(num_classes)
        for i in unlabeled_idx:
            unlabeled_freq[pseudo[i]] += 1
        unlabeled_freq /= len(unlabeled_idx)
        factor = np.clip(labeled_freq / (unlabeled_freq + 1e-7), 1 - clip, 1 + clip)
        for c in range(num_classes):
            probs[unlabeled_idx, c] = probs[unlabeled_idx, c] * factor[c]
        probs = _l2_normalise_rows(probs)
        pseudo = np.argmax(probs, axis=1)
    return probs


def _set_labeled_one_hot(probs, labels, labeled_idx):
    probs[labeled_idx] = 0
    probs[labeled_idx, labels[labeled_idx]] = 1


def _accuracy(pred, labels, unlabeled_idx):
    known = unlabeled_idx[labels[unlabeled_idx] >= 0]
    return None if len(known) == 0 else 100.0 * float(np.mean(pred[known] == labels[known]))


def reference_propagate(features, labels, labeled_mask, num_classes, k=50, alpha=0.99, max_iter=30,
                        tol=1e-3, *, align_steps=100, align_clip=0.01):
    """The published pseudo-labelling step end to end (numpy in, plain dict out).

    Returns a dict with pseudo_labels, probs, weights, acc_before_align, acc_after_align, sims, idx
    (the kNN found) and timings (knn, graph, cg, align, total in seconds).
    """
    t_start = time.perf_counter()
    labels = np.asarray(labels, dtype=np.int64)
    labeled_mask = np.asarray(labeled_mask, dtype=bool)
    labeled_idx = np.flatnonzero(labeled_mask)
    unlabeled_idx = np.flatnonzero(~labeled_mask)
    timings = {}

    t = time.perf_counter()
    sims, idx = reference_knn(features, k)
    timings["knn"] = time.perf_counter() - t

    t = time.perf_counter()
    wn = reference_graph(sims, idx)
    timings["graph"] = time.perf_counter() - t

    t = time.perf_counter()
    y = np.zeros((len(labels), num_classes))
    y[labeled_idx, labels[labeled_idx]] = 1
    z = reference_cg(wn, y, alpha, tol, max_iter)
    timings["cg"] = time.perf_counter() - t

    t = time.perf_counter()
    z[z < 0] = 0
    probs = _l2_normalise_rows(z)
    _set_labeled_one_hot(probs, labels, labeled_idx)
    acc_before = _accuracy(np.argmax(probs, axis=1), labels, unlabeled_idx)
    probs = reference_align(probs, labels, labeled_idx, unlabeled_idx, num_classes, align_steps, align_clip)
    _set_labeled_one_hot(probs, labels, labeled_idx)
    pseudo_labels = np.argmax(probs, axis=1)
    acc_after = _accuracy(pseudo_labels, labels, unlabeled_idx)
    with np.errstate(invalid="ignore", divide="ignore"):
        weights = 1 - scipy.stats.entropy(probs.T) / np.log(num_classes)
    weights[labeled_idx] = 1.0
    timings["align"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    return {"pseudo_labels": pseudo_labels, "probs": probs, "weights": weights,
            "acc_before_align": acc_before, "acc_after_align": acc_after,
            "sims": sims, "idx": idx, "timings": timings}
