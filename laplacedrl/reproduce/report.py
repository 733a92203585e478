"""The report of a table: per cell the paper's value, ours (mean, std, n) and the difference, as
Markdown and CSV; see :mod:`laplacedrl.reproduce`."""
from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from laplacedrl.paper_results import DATASET_TITLES
from laplacedrl.reproduce.plan import PROTOCOLS, Cell, Plan

# ============ collecting ============
def summarize_cell(cell: Cell) -> dict:
    """The paper's value next to ours: mean and sample std (ddof 1, n >= 2) of the finished runs."""
    accs = [a for a in (j.result() for j in cell.runs) if a is not None]
    mean = statistics.fmean(accs) if accs else None
    return {"cell": cell.id, "dataset": cell.dataset, "labels": cell.labels,
            "run_labels": cell.run_labels, "column": cell.header, "paper": cell.paper,
            "ours_mean": mean, "ours_std": statistics.stdev(accs) if len(accs) > 1 else None,
            "n": len(accs), "splits": len(cell.runs),
            "diff": None if mean is None or cell.paper is None else mean - cell.paper,
            "status": "missing" if not accs else "partial" if len(accs) < len(cell.runs) else "ok",
            "run_dirs": [str(j.out) for j in cell.runs]}


def _num(v, fmt="{:.2f}", none="") -> str:
    return none if v is None else fmt.format(v)


def ours_text(r: dict) -> str:
    """``93.10 ± 0.25 (n=3)``, ``93.10 (n=1)`` or ``missing``."""
    if r["ours_mean"] is None:
        return "missing"
    return f"{r['ours_mean']:.2f}" + (f" ± {r['ours_std']:.2f}" if r["ours_std"] is not None else "") + \
        f" (n={r['n']})"


def protocol_text(plan: Plan, splits: int) -> str:
    f = plan.compute_flags
    epochs = (f"{f['epochs']} semi-supervised epochs" if f.get("epochs") else
              f"as many semi-supervised epochs as a {f['num_steps']:,}-step budget allows")
    compute = (f"{'Full training' if plan.compute == 'full' else 'Limited compute'}: "
               f"{f['sup_rounds']} supervised rounds x {f['sup_passes']} passes + {epochs}"
               + (f", stopped after epoch {f['max_epochs']} (the learning rate on the full schedule)"
                  if f.get("max_epochs") else ""))
    paper = plan.table.number not in PROTOCOLS
    text = (f"Protocol: test top-1 accuracy (%) of the last epoch (`test_top1` of each run's "
            f"metrics.json), mean ± sample std over the finished runs of {splits} label split(s) "
            f"(`--seed` 0..{splits - 1}: class-balanced label draw and initialisation); n = runs "
            f"finished." + (" Paper: the number printed in the paper. Δ = ours − paper." if paper else "")
            + f" {compute}. 'missing' = no finished run (never counted as 0).")
    if plan.scale == "tiny":
        text = ("**Scale tiny: a plumbing check on scikit-learn's 8x8 digits with tiny models and a "
                "few epochs. These numbers are NOT comparable with the paper's.** Every row runs on "
                "digits with the same labeled fraction of the training set (column 'digits labels'); "
                "rows of different datasets share one pretraining per objective.\n\n" + text)
    return text


def render_markdown(plan: Plan, rows: list, splits: int) -> str:
    """The table as the paper lays it out (ours / paper per cell), then one line per cell."""
    t, tiny = plan.table, plan.scale == "tiny"
    keys = [k for k in t.keys if any(r["cell"].endswith("-" + k) for r in rows)]
    by_id = {r["cell"]: r for r in rows}

    def paper(v):
        return "—" if v is None else f"{v:.2f}"
    lines = [f"# Table {t.number}: {t.title} (scale: {plan.scale})", "", protocol_text(plan, splits), "",
             "Each cell: ours / paper." if t.number not in PROTOCOLS else "Each cell: ours.", "",
             "| Dataset | Labels |" + (" digits labels |" if tiny else "") +
             "".join(f" {t.header(k)} |" for k in keys),
             "|---|---|" + ("---|" if tiny else "") + "---|" * len(keys)]
    for dataset, labels in t.rows:
        cells = [by_id.get(f"{dataset}-{labels}-{k}") for k in keys]
        if not any(cells):
            continue
        run_labels = next(c["run_labels"] for c in cells if c)
        lines.append(f"| {DATASET_TITLES.get(dataset, dataset)} | {labels} |" + (f" {run_labels} |" if tiny else "")
                     + "".join(" |" if c is None else f" {ours_text(c)}" + (" |" if c["paper"] is None else
                                                                          f" / {c['paper']:.2f} |") for c in cells))
    lines += ["", "| Cell | Paper | Ours | Std | n | Δ | Run dirs |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ours = "missing" if r["ours_mean"] is None else f"{r['ours_mean']:.2f}"
        lines.append(f"| {r['cell']} | {paper(r['paper'])} | {ours} | {_num(r['ours_std'])} | "
                     f"{r['n']}/{r['splits']} | {_num(r['diff'], '{:+.2f}')} | "
                     f"{'<br>'.join(r['run_dirs'])} |")
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("table", "scale", "cell", "dataset", "labels", "run_labels", "column", "paper",
              "ours_mean", "ours_std", "n", "splits", "diff", "status", "run_dirs")


def render_csv(plan: Plan, rows: list) -> str:
    """One line per cell; a missing value is an empty field (status says why), never 0."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "table": plan.table.number, "scale": plan.scale,
                    "ours_mean": _num(r["ours_mean"], "{:.4f}"), "ours_std": _num(r["ours_std"], "{:.4f}"),
                    "diff": _num(r["diff"], "{:+.4f}"), "run_dirs": ";".join(r["run_dirs"])})
    return buf.getvalue()


def write_results(plan: Plan, results_dir, splits: int) -> tuple:
    """Write ``table<N>.md`` and ``table<N>.csv``; returns ``(markdown text, md path, csv path)``."""
    from laplacedrl.engine.checkpoint import atomic_write_text
    rows = [summarize_cell(c) for c in plan.cells]
    md, results_dir = render_markdown(plan, rows, splits), Path(results_dir)
    md_path, csv_path = (results_dir / f"table{plan.table.number}.{ext}" for ext in ("md", "csv"))
    atomic_write_text(md_path, md)
    atomic_write_text(csv_path, render_csv(plan, rows))
    return md, md_path, csv_path
