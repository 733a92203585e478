#!/usr/bin/env python
"""The probe over pretraining steps: from a ``probe.csv`` of ``python -m laplacedrl.probe`` run on a
pretraining's ``snapshots/`` (encoders named ``<objective>@<step>``; the final ``ckpt.pt`` is the
objective's plain name), one JSON line per encoder and step with each metric at its best t, and a
PNG of those curves::

    python benchmarks/probe_curve.py runs/probe-digits/probe.csv --final-step 27300 --images 997 --batch 64 \
        --png docs/digits_probe_steps.png

``--images`` and ``--batch`` turn steps into passes over the pretraining images.
"""
import argparse
import csv
import json
from collections import defaultdict


def best_over_t(rows, metrics):
    """``{encoder: {metric: (best value, its t)}}`` over the rows of each encoder."""
    out = defaultdict(dict)
    for enc in dict.fromkeys(r["encoder"] for r in rows):
        sel = [r for r in rows if r["encoder"] == enc]
        for m in metrics:
            best = max(sel, key=lambda r: float(r[m]))
            out[enc][m] = (float(best[m]), float(best["t"]))
    return out


def split_name(name: str, final_step: int):
    """``drl@1365`` -> (``drl``, 1365); ``drl`` -> (``drl``, final_step); ``random`` -> (``random``, 0)."""
    if "@" in name:
        objective, step = name.split("@", 1)
        return objective, int(step.rstrip("'"))
    return name, 0 if name == "random" else final_step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("csv")
    p.add_argument("--final-step", type=int, required=True, help="the step of the plainly named encoders")
    p.add_argument("--images", type=int, default=0, help="pretraining images (for passes)")
    p.add_argument("--batch", type=int, default=0, help="pretraining batch size (for passes)")
    p.add_argument("--png", default="", help="write the curves here")
    args = p.parse_args(argv)
    with open(args.csv) as f:
        rows = list(csv.DictReader(f))
    metrics = [k for k in rows[0] if k.startswith("svm") or k in ("silhouette", "mlp_acc")]
    best = best_over_t(rows, metrics)
    curves = defaultdict(list)
    for enc, values in best.items():
        objective, step = split_name(enc, args.final_step)
        passes = step * args.batch / args.images if args.images and args.batch else None
        line = {"encoder": objective, "step": step, "passes": None if passes is None else round(passes, 1),
                **{m: round(v, 3) for m, (v, _) in values.items()}, **{f"{m}_t": t for m, (_, t) in values.items()}}
        curves[objective].append(line)
        print(json.dumps(line))
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        svm = [m for m in metrics if m.startswith("svm")]
        fig, axes = plt.subplots(1, len(svm), figsize=(5 * len(svm), 4))
        for ax, m in zip(axes if len(svm) > 1 else [axes], svm):
            for c, (objective, pts) in enumerate(sorted(curves.items())):
                pts = sorted(pts, key=lambda q: q["step"])
                xs = [q["passes"] if q["passes"] is not None else q["step"] for q in pts]
                if objective == "random":
                    ax.axhline(pts[0][m], color="gray", linestyle=":", label="random encoder")
                    continue
                ax.plot(xs, [q[m] for q in pts], marker="o", ms=3, color=f"C{c}", label=objective)
            ax.set(title=f"SVC on {m[3:-4]} labeled codes, best t", xlabel="passes over the pretraining images"
                   if args.images else "step", ylabel="accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
    return curves


if __name__ == "__main__":
    main()
