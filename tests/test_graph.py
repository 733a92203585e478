"""Tests of laplacedrl.graph: kNN backends, graph, block CG, alignment, weights and the whole step."""

import importlib
import math
from concurrent.futures import ThreadPoolExecutor

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


@pytest.mark.parametrize("n,d,k", [(300, 8, 10), (257, 5, 30)])
def test_knn_backends_match_brute_force(n, d, k):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, d)).astype(np.float32)
    want = brute_force_knn(x, k)
    xt = torch.from_numpy(x)
    xn = torch.nn.functional.normalize(xt, dim=1)
    found = {
        "faiss": knn_search(x, k, backend="faiss")[1],
        "torch": knn_search(x, k, backend="torch")[1],
        "rowblock": knn_mod.knn_torch_rowblock(xn, k)[1].numpy(),
        # several tiles and a real cluster order, as at large N
        "symmetric": knn_mod.knn_torch_symmetric(xn, k, tile=64, cluster_size=32)[1].numpy(),
    }
    for name, idx in found.items():
        assert idx.shape == (n, k) and idx.dtype == np.int64, name
        assert not (idx == np.arange(n)[:, None]).any(), f"{name} returned the point itself"
        np.testing.assert_array_equal(np.sort(idx, axis=1), want, err_msg=name)


def test_knn_without_faiss_uses_torch_merges(monkeypatch):
    monkeypatch.setattr(knn_mod, "_import_faiss", lambda: None)
    x = np.random.default_rng(7).standard_normal((200, 6)).astype(np.float32)
    assert knn_mod.resolve_backend("auto") == "torch"
    with pytest.raises(ValueError, match="faiss"):
        knn_mod.resolve_backend("faiss")
    for workers in (1, 2):
        xn = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
        sims, idx = knn_mod.knn_torch_symmetric(xn, 12, tile=48, cluster_size=16, workers=workers)
        np.testing.assert_array_equal(np.sort(idx.numpy(), axis=1), brute_force_knn(x, 12))
        assert (sims[:, :-1] >= sims[:, 1:]).all()


def test_knn_worker_error_is_raised_not_hung(monkeypatch):
    calls = []

    def failing_add(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")

    monkeypatch.setattr(knn_mod._FaissTopK, "add", failing_add)
    x = torch.nn.functional.normalize(torch.randn(300, 5), dim=1)
    with pytest.raises(RuntimeError, match="boom"):
        knn_mod.knn_torch_symmetric(x, 5, tile=32, workers=2)


def test_auto_backend_is_torch_on_cpu():
    assert knn_mod.resolve_backend("auto", "cpu") == "torch"
    assert knn_mod.resolve_backend("faiss", "cpu") == "faiss"


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


def test_graph_host_torch_and_published_agree():
    x, _, _ = blobs(n_per_class=30)
    sims, idx = knn_search(x, 6, backend="torch")
    want = dense_normalized_graph(sims, idx)
    host = prop_mod.normalized_graph_host(sims, idx).toarray()
    dev = prop_mod.normalized_graph_torch(torch.from_numpy(sims), torch.from_numpy(idx)).to_dense().numpy()
    published = reference_graph(sims, idx).toarray()   # sims here are positive: no clipping difference
    for got in (host, dev, published):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.allclose(want, want.T) and not np.diag(want).any()


def test_graph_clips_negative_similarities():
    sims = np.array([[0.5], [-0.3], [0.5]], dtype=np.float32)
    idx = np.array([[2], [0], [0]])
    host = prop_mod.normalized_graph_host(sims, idx).toarray()
    assert (host >= 0).all() and host[1].sum() == 0 and host[0, 2] == pytest.approx(1.0)


def spd_system(n=120, c=5, seed=0, dtype=torch.float64):
    x, y, labeled = blobs(n_per_class=n // c, num_classes=c, noise=0.3, seed=seed)
    sims, idx = knn_search(x, 8, backend="torch")
    wn = torch.from_numpy(dense_normalized_graph(sims, idx)).to(dtype)
    a = torch.eye(len(wn), dtype=dtype) - 0.99 * wn
    b = torch.zeros(len(wn), c, dtype=dtype)
    b[np.flatnonzero(labeled), y[labeled]] = 1
    b[:, -1] = 0                                  # a class without labeled points: x = 0, as scipy
    return a, b


@pytest.mark.parametrize("compact", [True, False])
def test_block_cg_equals_per_class_scipy_cg(compact):
    a, b = spd_system()
    x, iters = prop_mod.block_cg(lambda v: a @ v, b, rtol=1e-3, max_iter=30, compact=compact)
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


@pytest.mark.parametrize("seed,c,parts", [(0, 6, 1), (1, 6, 2), (2, 30, 1), (3, 100, 3)])
def test_alignment_equals_loop_version(seed, c, parts):
    p, unlabeled, freq, labels = random_probs(c=c, seed=seed)
    with ThreadPoolExecutor(parts) as pool:
        fast = prop_mod.align_distribution(p, unlabeled, freq, steps=100, clip=0.01, pool=pool, parts=parts)
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
    assert res.acc_before_align == 100.0 and res.acc_after_align == 100.0
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
    assert res.acc_before_align is None and res.acc_after_align is None
    with_truth = propagate(x, np.where(labeled, y_wrong, y), labeled, 4, k=10)
    np.testing.assert_array_equal(res.pseudo_labels, with_truth.pseudo_labels)


def test_device_path_on_cpu_matches_host_path_and_reference():
    x, y, labeled = blobs(n_per_class=80, noise=0.5, seed=6)
    args = (y, labeled, 4, 10, 0.99, 30, 1e-3, 100, 0.01, "torch")
    host = prop_mod._propagate(torch.from_numpy(x), *args, host=True)
    dev = prop_mod._propagate(torch.from_numpy(x), *args, host=False)
    ref = reference_propagate(x, y, labeled, 4, k=10)
    for res in (host, dev):
        np.testing.assert_array_equal(res.pseudo_labels, ref["pseudo_labels"])
        np.testing.assert_allclose(res.probs, ref["probs"], atol=1e-4)
        np.testing.assert_allclose(res.weights, ref["weights"], atol=1e-4)
        assert res.cg_iters == dev.cg_iters
    assert host.acc_after_align == pytest.approx(ref["acc_after_align"])


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
    assert out["floor"]["gemm_gflops_per_thread"] > 0


# ---------------------------------------------------------------------------------------------------
# The int8 screen (exact kNN through int8 candidates and a per-row certificate)

screen = pytest.importorskip("laplacedrl.graph.screen")
needs_numba = pytest.mark.skipif(screen.numba is None, reason="numba not installed")


def unit_rows(n, d, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(x, dim=1)


def test_quantization_bound_holds_for_every_pair():
    x = unit_rows(400, 24, 0)
    q, scale, bound = screen.quantize(x)
    err = (x.double() @ x.double().T - q.double() @ q.double().T / scale**2).abs()      # (N, N)
    assert bool((err <= bound[:, None]).all())
    assert float(bound.max()) < 0.05            # tight enough to be useful: int8 steps of max|x| / 127


@needs_numba
@pytest.mark.parametrize("n,d,k,rows,width,chunk", [
    (300, 8, 10, 64, 128, 32),       # several blocks and slabs, n not a multiple of either
    (257, 5, 30, 32, 96, 32),
    (999, 32, 50, 96, 192, 32),      # blocks that are not a multiple of the chunk
    (640, 16, 20, 128, 512, 24),
])
def test_screen_matches_brute_force(n, d, k, rows, width, chunk):
    x = unit_rows(n, d, n)
    sims, idx, stats = screen.knn_screened(x, k, rows=rows, width=width, chunk=chunk, sample=128, workers=2)
    np.testing.assert_array_equal(np.sort(idx.numpy(), axis=1), brute_force_knn(x.numpy(), k))
    assert not (idx == torch.arange(n)[:, None]).any()
    exact = (x[:, None, :] * x[idx]).sum(-1)
    torch.testing.assert_close(sims, exact, atol=1e-5, rtol=0)
    assert bool((sims[:, :-1] >= sims[:, 1:]).all())
    assert stats["certified"] > 0.5              # the certificate does most of the work


@needs_numba
def test_screen_falls_back_on_rows_it_cannot_certify():
    # duplicates: exact ties the screen can never separate; a far too high guess: few candidates
    base = unit_rows(60, 6, 1)
    x = torch.cat([base] * 5)
    for kw in ({}, {"guess": 0.05}):
        sims, idx, stats = screen.knn_screened(x, 8, rows=64, width=128, sample=64, **kw)
        assert stats["certified"] < 1.0
        assert not (idx == torch.arange(len(x))[:, None]).any()
        want = torch.sort(x @ x.T - 3 * torch.eye(len(x)), dim=1, descending=True).values[:, :8]
        torch.testing.assert_close(sims, want, atol=1e-5, rtol=0)


@needs_numba
def test_knn_search_uses_the_screen_from_min_n_on(monkeypatch):
    calls = []
    real = screen.knn_screened
    monkeypatch.setattr(screen, "MIN_N", 200)
    monkeypatch.setattr(screen, "available", lambda: True)
    monkeypatch.setattr(screen, "knn_screened", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = unit_rows(500, 12, 3).numpy()
    _, idx = knn_search(x, 10, backend="torch")
    assert calls, "the screen was not used"
    np.testing.assert_array_equal(np.sort(idx, axis=1), brute_force_knn(x, 10))


def test_int8_screen_is_not_used_on_narrow_features(monkeypatch):
    # torch's CPU int8 product is wrong for d = 1: such features go through the float32 tiles
    monkeypatch.setattr(screen, "MIN_N", 100)
    monkeypatch.setattr(screen, "available", lambda: True)
    assert not knn_mod.use_screen(300, 5, d=1) and knn_mod.use_screen(300, 5, d=2)
    x = np.random.default_rng(5).standard_normal((300, 1)).astype(np.float32)
    sims, _ = knn_search(x, 5, backend="torch")
    assert np.allclose(sims, 1.0)                    # unit 1-d rows are +-1; 150 share each sign
    with pytest.raises(ValueError, match="dimension"):
        screen.knn_screened(torch.ones(300, 1), 5)


def test_int8_screen_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(screen, "available", lambda: True)
    assert knn_mod.use_screen(100_000, 50, 128)
    monkeypatch.setenv("LAPLACEDRL_INT8_SCREEN", "0")
    assert not knn_mod.use_screen(100_000, 50, 128)


def test_knn_search_without_numba_uses_float32_tiles(monkeypatch):
    monkeypatch.setattr(screen, "numba", None)
    assert not screen.available()
    assert not knn_mod.use_screen(100_000, 50, 128)
    x = unit_rows(300, 8, 4).numpy()
    _, idx = knn_search(x, 10, backend="torch")
    np.testing.assert_array_equal(np.sort(idx, axis=1), brute_force_knn(x, 10))
