"""Tests of laplacedrl.graph: kNN backends, graph, block CG, alignment, weights and the whole step."""

import importlib
import math

import numpy as np
import pytest
import scipy.sparse.linalg
import torch

from laplacedrl.graph import PropagationResult, knn_search, propagate
from laplacedrl.graph import knn as knn_mod
from laplacedrl.graph.reference import reference_align, reference_graph, reference_propagate

# the package's `propagate` attribute is the function; the module is reached through importlib
prop_mod = importlib.import_module("laplacedrl.graph.propagate")


def blobs(n_per_class=60, num_classes=4, d=16, noise=0.05, labeled_per_class=2, seed=0):
    """Well-separated class clusters in shuffled order; returns (x, y, labeled_mask)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((num_classes, d))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    y = rng.permutation(np.repeat(np.arange(num_classes), n_per_class))
    x = (means[y] + noise * rng.standard_normal((len(y), d))).astype(np.float32)
    labeled = np.zeros(len(y), dtype=bool)
    for c in range(num_classes):
        labeled[np.flatnonzero(y == c)[:labeled_per_class]] = True
    return x, y, labeled


def brute_force_knn(x, k):
    """Sorted neighbour sets by a float64 dense search."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = xn.astype(np.float64) @ xn.T.astype(np.float64)
    np.fill_diagonal(s, -np.inf)
    return np.sort(np.argsort(-s, axis=1)[:, :k], axis=1)


def dense_normalized_graph(sims, idx):
    """W[i, idx] = max(sim, 0), max-symmetrised, D^-1/2 W D^-1/2, as a dense float64 matrix."""
    n = len(idx)
    w = np.zeros((n, n))
    w[np.repeat(np.arange(n), idx.shape[1]), idx.ravel()] = np.maximum(sims.ravel(), 0)
    w = np.maximum(w, w.T)
    np.fill_diagonal(w, 0)
    deg = w.sum(1)
    deg[deg == 0] = 1
    return w / np.sqrt(deg)[:, None] / np.sqrt(deg)[None, :]


# ---------------------------------------------------------------------------------------------------
# kNN


@pytest.mark.parametrize("n,d,k", [(300, 8, 10), (257, 5, 30), (9000, 6, 5)])
def test_knn_backends_match_brute_force(n, d, k):
    """Both backends return the exact neighbour sets (9000 rows: several torch row blocks)."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, d)).astype(np.float32)
    want = brute_force_knn(x, k) if n < 5000 else None
    found = {b: knn_search(x, k, backend=b)[1] for b in ("faiss", "torch")}
    if want is None:                                           # too big for the float64 dense check
        want = np.sort(found["faiss"], axis=1)
        knn_mod._ROWBLOCK_ELEMENTS["cpu"], old = 4 * n, knn_mod._ROWBLOCK_ELEMENTS["cpu"]
        try:
            found["torch"] = knn_search(x, k, backend="torch")[1]
        finally:
            knn_mod._ROWBLOCK_ELEMENTS["cpu"] = old
    for name, idx in found.items():
        assert idx.shape == (n, k) and idx.dtype == np.int64, name
        assert not (idx == np.arange(n)[:, None]).any(), f"{name} returned the point itself"
        np.testing.assert_array_equal(np.sort(idx, axis=1), want, err_msg=name)


def test_backend_resolution(monkeypatch):
    assert knn_mod.resolve_backend("auto", "cpu") == "faiss"
    assert knn_mod.resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="unknown kNN backend"):
        knn_mod.resolve_backend("annoy")
    monkeypatch.setattr(knn_mod, "_import_faiss", lambda: None)
    assert knn_mod.resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="faiss cannot be imported"):
        knn_mod.resolve_backend("faiss")


def test_auto_backend_on_cuda_without_faiss_gpus_stays_on_the_device(monkeypatch):
    class CpuOnlyFaiss:
        @staticmethod
        def get_num_gpus():
            return 0
    monkeypatch.setattr(knn_mod, "_import_faiss", lambda: CpuOnlyFaiss)
    assert knn_mod.resolve_backend("auto", "cuda") == "torch"


def test_knn_leaves_thread_settings_alone():
    before = torch.get_num_threads()
    x, _, _ = blobs()
    for backend in ("faiss", "torch"):
        knn_search(x, 5, backend=backend)
        assert torch.get_num_threads() == before


def test_knn_search_sims_sorted_and_types():
    x, _, _ = blobs()
    sims, idx = knn_search(x, 7, backend="torch")
    assert isinstance(sims, np.ndarray) and sims.dtype == np.float32 and idx.dtype == np.int64
    assert (np.diff(sims, axis=1) <= 0).all()
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(sims, np.einsum("id,ikd->ik", xn, xn[idx]), atol=1e-5)
    st, it = knn_search(torch.from_numpy(x), 7, backend="torch")
    assert torch.is_tensor(st) and torch.equal(it, torch.from_numpy(idx))


def test_knn_duplicate_points_never_return_self():
    x = np.repeat(np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32), 3, axis=0)
    for backend in ("faiss", "torch"):
        _, idx = knn_search(x, 2, backend=backend)
        assert not (idx == np.arange(len(x))[:, None]).any()
        # the two copies of each point are its nearest neighbours
        copies = np.repeat(np.arange(20), 3)[:, None]
        np.testing.assert_array_equal(idx // 3, np.hstack([copies, copies]))


def test_knn_argument_errors():
    x = np.zeros((5, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="k must"):
        knn_search(x, 5)
    with pytest.raises(ValueError, match="unknown kNN backend"):
        knn_search(x, 2, backend="annoy")
    with pytest.raises(ValueError, match="2-D"):
        knn_search(np.zeros(5), 2)


# ---------------------------------------------------------------------------------------------------
# Graph and CG


def test_graph_equals_dense_and_published_graph():
    x, _, _ = blobs(n_per_class=30)
    sims, idx = knn_search(x, 6, backend="torch")
    want = dense_normalized_graph(sims, idx)
    ours = prop_mod.normalized_graph(torch.from_numpy(sims), torch.from_numpy(idx)).to_dense().numpy()
    published = reference_graph(sims, idx).toarray()   # sims here are positive: no clipping difference
    for got in (ours, published):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.allclose(want, want.T) and not np.diag(want).any()


def test_graph_clips_negative_similarities():
    sims = np.array([[0.5], [-0.3], [0.5]], dtype=np.float32)
    idx = np.array([[2], [0], [0]])
    w = prop_mod.normalized_graph(torch.from_numpy(sims), torch.from_numpy(idx)).to_dense().numpy()
    assert (w >= 0).all() and w[1].sum() == 0 and w[0, 2] == pytest.approx(1.0)


def spd_system(n=120, c=5, seed=0, dtype=torch.float64):
    x, y, labeled = blobs(n_per_class=n // c, num_classes=c, noise=0.3, seed=seed)
    sims, idx = knn_search(x, 8, backend="torch")
    wn = torch.from_numpy(dense_normalized_graph(sims, idx)).to(dtype)
    a = torch.eye(len(wn), dtype=dtype) - 0.99 * wn
    b = torch.zeros(len(wn), c, dtype=dtype)
    b[np.flatnonzero(labeled), y[labeled]] = 1
    b[:, -1] = 0                                  # a class without labeled points: x = 0, as scipy
    return a, b


def test_block_cg_equals_per_class_scipy_cg():
    a, b = spd_system()
    x, iters = prop_mod.block_cg(lambda v: a @ v, b, rtol=1e-3, max_iter=30)
    for c in range(b.shape[1]):
        count = []
        want, _ = scipy.sparse.linalg.cg(a.numpy(), b[:, c].numpy(), rtol=1e-3, maxiter=30,
                                         callback=lambda _: count.append(1))
        np.testing.assert_allclose(x[:, c].numpy(), want, rtol=1e-9, atol=1e-12)
        assert int(iters[c]) == len(count)
    assert int(iters[-1]) == 0 and not x[:, -1].any()


def test_block_cg_reaches_dense_solve():
    a, b = spd_system(seed=1)
    x, _ = prop_mod.block_cg(lambda v: a @ v, b, rtol=1e-10, max_iter=500)
    np.testing.assert_allclose(x.numpy(), np.linalg.solve(a.numpy(), b.numpy()), atol=1e-8)


def test_propagate_equals_dense_reference_solve():
    x, y, labeled = blobs(n_per_class=40, noise=0.4, seed=3)
    c = 4
    res = propagate(x, y, labeled, c, k=8, tol=1e-6, max_iter=300, align_steps=0, knn_backend="torch")
    sims, idx = knn_search(x, 8, backend="torch")
    wn = dense_normalized_graph(sims, idx)
    yy = np.zeros((len(y), c))
    yy[np.flatnonzero(labeled), y[labeled]] = 1
    z = np.maximum(np.linalg.solve(np.eye(len(y)) - 0.99 * wn, yy), 0)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    z[labeled] = yy[labeled]
    np.testing.assert_allclose(res.probs, z, atol=1e-4)
    assert res.cg_residual < 1e-5          # float32 true residual; the recursion stopped at 1e-6


# ---------------------------------------------------------------------------------------------------
# Alignment and weights


def random_probs(n=400, c=6, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.random((n, c)) ** 3 * np.linspace(1.0, 2.5, c)       # skewed toward the last classes
    unlabeled = rng.random(n) > 0.2
    labels = rng.integers(0, c, n)
    freq = np.bincount(labels[~unlabeled], minlength=c) / (~unlabeled).sum()
    p = torch.from_numpy(p / np.linalg.norm(p, axis=1, keepdims=True))
    return p, torch.from_numpy(unlabeled), freq, labels


@pytest.mark.parametrize("seed,c", [(0, 6), (1, 6), (2, 30), (3, 100)])
def test_alignment_equals_loop_version(seed, c):
    p, unlabeled, freq, labels = random_probs(c=c, seed=seed)
    fast = prop_mod.align_distribution(p, unlabeled, freq, steps=100, clip=0.01)
    loop = prop_mod.align_distribution_loop(p, unlabeled, freq, steps=100, clip=0.01)
    np.testing.assert_allclose(fast.numpy(), loop.numpy(), rtol=1e-10, atol=1e-12)
    assert torch.equal(fast.argmax(1), loop.argmax(1))
    labeled = (~unlabeled).numpy()
    published = reference_align(p.numpy(), labels, np.flatnonzero(labeled),
                                np.flatnonzero(~labeled), p.shape[1], 100, 0.01)
    np.testing.assert_allclose(fast.numpy()[~labeled], published[~labeled], rtol=1e-10, atol=1e-12)


def test_alignment_moves_histogram_toward_labeled_frequencies():
    p, unlabeled, _, _ = random_probs(n=2000, seed=4)
    freq = np.full(6, 1 / 6)
    before = np.bincount(p[unlabeled].argmax(1).numpy(), minlength=6) / int(unlabeled.sum())
    out = prop_mod.align_distribution(p, unlabeled, freq, steps=100, clip=0.01)
    after = np.bincount(out[unlabeled].argmax(1).numpy(), minlength=6) / int(unlabeled.sum())
    assert np.abs(after - freq).sum() < 0.5 * np.abs(before - freq).sum()
    assert torch.equal(out[~unlabeled], p[~unlabeled])


def test_entropy_weights():
    probs = torch.tensor([[1.0, 0, 0], [1, 1, 1], [0, 0, 0], [0.6, 0.8, 0]])
    w = prop_mod.entropy_weights(probs, torch.tensor([False, False, False, True]), 3)
    np.testing.assert_allclose(w.numpy(), [1, 0, 0, 1], atol=1e-6)
    w2 = prop_mod.entropy_weights(probs[3:], torch.tensor([False]), 3)
    p = np.array([0.6, 0.8]) / 1.4
    assert float(w2[0]) == pytest.approx(1 + (p * np.log(p)).sum() / math.log(3), abs=1e-6)


# ---------------------------------------------------------------------------------------------------
# The whole step


def test_propagate_recovers_blob_labels_from_few_labels():
    x, y, labeled = blobs()
    res = propagate(x, y, labeled, 4, k=10)
    assert isinstance(res, PropagationResult)
    assert res.pseudo_labels.dtype == np.int64 and res.probs.dtype == np.float32
    assert res.weights.dtype == np.float32 and res.probs.shape == (len(y), 4)
    np.testing.assert_array_equal(res.pseudo_labels, y)
    np.testing.assert_array_equal(res.labels_before_align, y)
    assert (res.weights[labeled] == 1).all() and ((res.weights >= 0) & (res.weights <= 1)).all()
    np.testing.assert_allclose(np.linalg.norm(res.probs, axis=1), 1, atol=1e-5)
    assert 0 < res.cg_iters <= 30 and res.cg_residual < 1e-3
    assert set(res.timings) == {"knn", "graph", "cg", "align", "total"}


def test_propagate_keeps_labels_of_labeled_points_and_ignores_unknown_labels():
    x, y, labeled = blobs(noise=0.6, seed=5)
    y_wrong = y.copy()
    y_wrong[labeled] = (y[labeled] + 1) % 4           # labeled points override the graph
    hidden = np.where(labeled, y_wrong, -1)
    res = propagate(x, hidden, labeled, 4, k=10)
    np.testing.assert_array_equal(res.pseudo_labels[labeled], y_wrong[labeled])
    with_truth = propagate(x, np.where(labeled, y_wrong, y), labeled, 4, k=10)
    np.testing.assert_array_equal(res.pseudo_labels, with_truth.pseudo_labels)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_propagate_matches_the_published_algorithm(backend):
    """Both kNN backends (torch is the path CUDA data takes without faiss GPUs) give the published
    pseudo-labels, probabilities and weights."""
    x, y, labeled = blobs(n_per_class=80, noise=0.5, seed=6)
    res = propagate(torch.from_numpy(x), y, labeled, 4, k=10, knn_backend=backend)
    ref = reference_propagate(x, y, labeled, 4, k=10)
    np.testing.assert_array_equal(res.pseudo_labels, ref["pseudo_labels"])
    np.testing.assert_allclose(res.probs, ref["probs"], atol=1e-4)
    np.testing.assert_allclose(res.weights, ref["weights"], atol=1e-4)
    unl = ~labeled
    assert 100 * np.mean(res.pseudo_labels[unl] == y[unl]) == pytest.approx(ref["acc_after_align"])
    assert res.knn_backend == backend


def test_propagate_argument_errors():
    x, y, labeled = blobs(n_per_class=5)
    with pytest.raises(ValueError, match="k must"):
        propagate(x, y, labeled, 4, k=len(y))
    with pytest.raises(ValueError, match="num_classes"):
        propagate(x, y, labeled, 1, k=3)
    with pytest.raises(ValueError, match="shape"):
        propagate(x, y[:-1], labeled, 4, k=3)
    with pytest.raises(ValueError, match="no labeled points"):
        propagate(x, y, np.zeros_like(labeled), 4, k=3)
    with pytest.raises(ValueError, match=r"labels in \[0, 3\)"):
        propagate(x, y, labeled, 3, k=3)
    with pytest.raises(ValueError, match="alpha"):
        propagate(x, y, labeled, 4, k=3, alpha=1.0)
    with pytest.raises(ValueError, match="unknown kNN backend"):
        propagate(x, y, labeled, 4, k=3, knn_backend="gpu")


def test_propagation_benchmark_prints_one_json_line_that_agrees_with_the_reference(capsys):
    """benchmarks/bench_propagation.py on a tiny input: one JSON line, our step equal to the published one."""
    import json
    import pathlib
    import runpy

    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_propagation.py"
    bench = runpy.run_path(str(script))
    bench["main"](["--n", "600", "--d", "16", "--classes", "3", "--labeled", "30", "--k", "10",
                   "--repeats", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["pseudo_label_agreement"] == 1.0
    assert out["knn_sets_identical_ties_aside"] == 1.0
    assert out["ours"]["total"] > 0 and out["reference"]["total"] > 0
    assert out["knn_backend"] == "faiss" and out["speedup_total"] > 0
