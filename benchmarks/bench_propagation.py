"""Benchmark: our pseudo-labelling step against the published algorithm, on the same input, one process.

Features are class-clustered: class means drawn uniformly on the unit sphere plus Gaussian noise
(std --noise per coordinate), balanced classes in shuffled order, --labeled points labeled (balanced).
Each repeat runs ``laplacedrl.graph.propagate`` and ``laplacedrl.graph.reference.reference_propagate``
(faiss IndexFlatIP, per-class scipy CG, Python-loop alignment); stage times are medians over repeats.
Prints ONE JSON line.

    python benchmarks/bench_propagation.py --n 50000 --classes 10 --labeled 4000
    python benchmarks/bench_propagation.py --n 50000 --classes 100 --labeled 10000
    python benchmarks/bench_propagation.py --n 200000 --classes 10 --labeled 4000 --repeats 1 --no-reference
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from laplacedrl.graph import propagate  # noqa: E402
from laplacedrl.graph.reference import reference_propagate  # noqa: E402

STAGES = ("knn", "graph", "cg", "align", "total", "cpu")   # wall seconds per stage; cpu = process CPU s


def clustered_features(n, d, num_classes, labeled, noise, seed):
    """(x (n, d) float32, y (n,), labeled_mask (n,)): unit-sphere class means + N(0, noise^2) noise."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((num_classes, d))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    y = rng.permutation(np.arange(n) % num_classes)
    x = (means[y] + noise * rng.standard_normal((n, d))).astype(np.float32)
    mask = np.zeros(n, dtype=bool)
    for c in range(num_classes):
        mask[np.flatnonzero(y == c)[: labeled // num_classes]] = True
    return x, y, mask


def knn_agreement(ours_sims, ours_idx, ref_sims, ref_idx, tie_tol=1e-5):
    """Fraction of rows with identical neighbour sets, and the same allowing swaps at near-ties.

    A differing row counts as a tie when every neighbour in only one of the two sets has a similarity
    within tie_tol of that row's k-th similarity.
    """
    a = np.sort(ours_idx, axis=1)
    b = np.sort(ref_idx, axis=1)
    same = (a == b).all(axis=1)
    tie_rows = 0
    for i in np.flatnonzero(~same):
        kth = min(ours_sims[i].min(), ref_sims[i].min())
        only_ours = ~np.isin(ours_idx[i], ref_idx[i])
        only_ref = ~np.isin(ref_idx[i], ours_idx[i])
        extra = np.concatenate([ours_sims[i][only_ours], ref_sims[i][only_ref]])
        tie_rows += bool((np.abs(extra - kth) <= tie_tol).all())
    n = len(same)
    return float(same.mean()), float((same.sum() + tie_rows) / n), int((~same).sum())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50000, help="number of points")
    ap.add_argument("--d", type=int, default=128, help="feature dimension")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--labeled", type=int, default=4000, help="labeled points (balanced over classes)")
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--noise", type=float, default=0.25, help="Gaussian noise std per coordinate")
    ap.add_argument("--repeats", type=int, default=3, help="stage times are medians over repeats")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--knn-backend", default="auto", choices=["auto", "faiss", "torch"],
                    help="kNN backend of OUR propagate (the reference always uses faiss)")
    ap.add_argument("--device", default=None, help="device for our propagate (default: CPU)")
    ap.add_argument("--no-reference", action="store_true", help="time only ours (e.g. at N = 200,000)")
    args = ap.parse_args(argv)

    x, y, mask = clustered_features(args.n, args.d, args.classes, args.labeled, args.noise, args.seed)
    ours_t, ref_t = [], []
    ours = ref = None
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):                        # interleaved, so that both see the same machine
        cpu = time.process_time()
        ours = propagate(x, y, mask, args.classes, k=args.k, knn_backend=args.knn_backend, device=args.device)
        ours_t.append(dict(ours.timings, cpu=time.process_time() - cpu))
        if not args.no_reference:
            cpu = time.process_time()
            ref = reference_propagate(x, y, mask, args.classes, k=args.k)
            ref_t.append(dict(ref["timings"], cpu=time.process_time() - cpu))

    def medians(runs):
        return {s: round(statistics.median(r[s] for r in runs), 3) for s in STAGES}

    out = {
        "n": args.n, "d": args.d, "classes": args.classes, "labeled": args.labeled, "k": args.k,
        "noise": args.noise, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "knn_backend": ours.knn_backend, "device": args.device or "cpu",
        "ours": medians(ours_t),
        "ours_acc_before_align": round(100 * float((ours.labels_before_align == y)[~mask].mean()), 2),
        "ours_acc_after_align": round(100 * float((ours.pseudo_labels == y)[~mask].mean()), 2),
        "cg_iters": ours.cg_iters, "cg_residual": ours.cg_residual,
    }
    if ref is not None:
        ref_med = medians(ref_t)
        from laplacedrl.graph.knn import knn_search

        sims, idx = knn_search(x, args.k, backend=args.knn_backend, device=args.device)
        exact, ties_aside, differing = knn_agreement(sims, idx, ref["sims"], ref["idx"])
        out.update({
            "reference": ref_med,
            "speedup_total": round(ref_med["total"] / out["ours"]["total"], 2),
            "speedup_per_stage": {s: round(ref_med[s] / max(out["ours"][s], 1e-9), 1) for s in STAGES[:-1]},
            "pseudo_label_agreement": float((ours.pseudo_labels == ref["pseudo_labels"]).mean()),
            "knn_sets_identical": exact, "knn_sets_identical_ties_aside": ties_aside,
            "knn_rows_differing": differing,
            "ref_acc_before_align": ref["acc_before_align"], "ref_acc_after_align": ref["acc_after_align"],
        })
    out.update({"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "when": time.strftime("%Y-%m-%d %H:%M")})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
