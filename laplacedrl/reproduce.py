"""Reproduce one of the paper's Tables 1-5 with one command: plan, run (or resume), collect.

    python -m laplacedrl.reproduce --table 1 --dry-run           # the exact commands, nothing else
    python -m laplacedrl.reproduce --table 1 --splits 3 --devices cuda:0,cuda:1
    python -m laplacedrl.reproduce --table 1 --scale tiny        # a miniature on digits, CPU

A cell is a row of the paper's table (dataset, labels; laplacedrl.paper_results) times a column
(configs/tables/tables.yaml: pretraining, mixup, t-search, compute). The flags each scale adds are in
configs/tables/scales.yaml. As the published code ran them: full training = LaplaceNet's
250,000-step budget (260 to 393 epochs, depending on the cell); limited compute (Tables 2-3, "the
classifier trained for 100 epochs only") = the same schedule stopped after epoch 100
(``--max-epochs 100``), the learning rate still on the full cosine. ``--label-dir DIR`` (LaplaceNet's
``data-local/labels`` folder) makes every run read LaplaceNet's split files,
``DIR/<dataset>/<labels>_balanced_labels/<NN>.txt`` with NN = the seed, and every pretraining the
published pretraining's split (4,000 labels, split 10); without it the splits are seeded balanced
draws.

Runs are the two CLIs, one process each, in deterministic run dirs under ``--root``::

    <root>/<scale>/pretrain/<dataset>-<objective>-<hash>/ckpt.pt        pretrain_drl.py --out
    <root>/<scale>/ssl/<dataset>-<labels>-<variant>-<compute>-s<seed>-<hash>/metrics.json
                                                                          train_ssl.py --out

The name is a function of the run's flags (``<hash>`` covers all of them), so a run shared by two
cells or two tables (Table 4 "None" is Table 1 "LaplaceNet") is the same dir and runs once, every
pretraining (dataset x objective) runs once and its ckpt.pt feeds every cell that needs it, and a
changed flag never lands in an old dir. A finished run (ckpt.pt; metrics.json with epochs_done ==
epochs_total) is skipped; an unfinished one is rerun with the same command, which resumes it.
``--splits K`` runs seeds 0..K-1 (the class-balanced label draw and the initialisation) and reports
the mean and sample std of the last epoch's test top-1.

``--scale tiny`` maps every cell onto digits (the same labeled fraction of the training set, at
least one label per class; tiny nets, a few epochs; one pretraining per objective for all rows): a
plumbing check whose numbers are not comparable with the paper's. Its commands set
OMP_NUM_THREADS=1 (scales.yaml ``env``). ``--dry-run`` prints ``python -m laplacedrl.<cli>`` (in a
clone the same as ``python train_ssl.py`` / ``pretrain_drl.py``); runs use the running interpreter
and add ``--no-progress``.

Two reproduce commands must not share a ``--root`` at the same time (a run shared by their tables
would be started twice).

Results: ``<results>/table<N>.md`` and ``.csv``: per cell the paper's value, ours (mean, std, n), the
difference and the run dirs; a cell without a finished run reads "missing", never 0.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import io
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue
from typing import Callable, Optional

import yaml

from laplacedrl.config import package_configs, shared_flag
from laplacedrl.errors import OneLineParser, UserError, main_guard
from laplacedrl.paper_results import DATASET_TITLES, PaperTable, table as paper_table

MODULES = {"pretrain": "laplacedrl.pretrain_drl", "ssl": "laplacedrl.train_ssl"}
SCALES = ("full", "tiny")
PYTHON = "python"   # what --dry-run prints; runs use sys.executable


# ============ flags ============
def to_flags(values: dict) -> list:
    """Config fields -> CLI flags: ``{"batch_size": 100, "mixup": False, "ch_mult": [1, 2]}`` ->
    ``["--batch-size", "100", "--no-mixup", "--ch-mult", "1,2"]`` (the CLIs' flag convention)."""
    out = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            out += [flag, ",".join(str(v) for v in value)]
        else:
            out += [flag, str(value)]
    return out


def short_hash(parts: list) -> str:
    """First 6 hex digits of the SHA-1 of ``parts`` as JSON: names a run by its flags."""
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:6]


def load_specs(tables_dir=None) -> tuple:
    """``(tables.yaml, scales.yaml)`` of ``tables_dir`` (default: the package's configs/tables/)."""
    tables_dir = Path(tables_dir) if tables_dir else package_configs() / "tables"
    return tuple(yaml.safe_load((tables_dir / name).read_text()) for name in ("tables.yaml", "scales.yaml"))


def tiny_labels(labels: int, dataset: str, tiny: dict) -> int:
    """Label count on digits for a row of the paper:
    ``max(classes, round(labels * train_size / real_train_size[dataset]))`` (same labeled fraction,
    at least one image per class)."""
    frac = labels / tiny["real_train_size"][dataset]
    return max(tiny["classes"], round(frac * tiny["train_size"]))


# ============ runs ============
@dataclass(frozen=True)
class Job:
    """One run of a CLI. ``args`` are its flags (``--out`` included, ``--device`` not); ``needs`` is
    the ckpt.pt of the pretraining it starts from; ``env`` the scale's environment variables."""

    kind: str                      # "pretrain" | "ssl"
    args: tuple
    out: Path
    needs: Optional[Path] = None
    env: tuple = ()                # (("OMP_NUM_THREADS", "1"), ...)

    def command(self, python: str = PYTHON, device: Optional[str] = None) -> list:
        """``[VAR=value ...] python -m laplacedrl.<cli> <args> [--device D]``: what --dry-run prints
        (the same as ``python train_ssl.py`` / ``pretrain_drl.py`` in a clone); with
        ``python=sys.executable`` and without the env prefix, what the runner executes."""
        prefix = [f"{k}={v}" for k, v in self.env] if python == PYTHON else []
        return [*prefix, python, "-m", MODULES[self.kind], *self.args, *(["--device", device] if device else [])]

    def metrics(self) -> Optional[dict]:
        try:
            return json.loads((self.out / "metrics.json").read_text())
        except (OSError, ValueError):
            return None

    def done(self) -> bool:
        """Pretraining: ckpt.pt exists. SSL: metrics.json says every epoch is done."""
        if self.kind == "pretrain":
            return (self.out / "ckpt.pt").is_file()
        m = self.metrics() or {}
        return bool(m.get("epochs_total")) and m.get("epochs_done") == m.get("epochs_total")

    def result(self) -> Optional[float]:
        """The last epoch's test top-1 of a finished SSL run, else None."""
        return self.metrics().get("test_top1") if self.kind == "ssl" and self.done() else None


@dataclass
class Cell:
    """One cell of a table: the paper's value and our runs of it (one per split)."""

    dataset: str
    labels: int
    key: str
    header: str
    paper: float
    run_labels: int
    runs: list = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.dataset}-{self.labels}-{self.key}"


@dataclass
class Plan:
    table: PaperTable
    scale: str
    compute: str
    pretrain: list       # Jobs, each distinct pretraining once
    ssl: list            # Jobs, each distinct run once, split by split
    cells: list
    compute_flags: dict  # scales.yaml: <scale>.compute.<compute>

    def jobs(self) -> list:
        return self.pretrain + self.ssl


def select(cells: list, pattern: str) -> list:
    """``--cells``: a glob (``cifar10-4000*``); without glob characters, the cell of that exact id if
    there is one, else every cell whose id contains it (``vdrl``)."""
    if not pattern:
        return cells
    if any(ch in pattern for ch in "*?["):
        return [c for c in cells if fnmatch.fnmatchcase(c.id, pattern)]
    exact = [c for c in cells if c.id == pattern]
    return exact or [c for c in cells if pattern in c.id]


PROTOCOLS = ("fmnist",)


def protocol_table(name: str, spec: dict) -> PaperTable:
    """A protocol of tables.yaml that is not one of the paper's tables: its rows and columns, no
    paper numbers (the collector shows ours alone)."""
    columns = tuple((key, col.get("header", key)) for key, col in spec["columns"].items())
    rows = {(d, int(n)): (None,) * len(columns) for d, n in spec["rows"]}
    return PaperTable(name, spec["title"], columns, rows)


def split_file(label_dir: str, dataset: str, labels: int, split: int) -> str:
    """LaplaceNet's split file ``<label_dir>/<dataset>/<labels>_balanced_labels/<split:02d>.txt``."""
    path = Path(label_dir) / dataset / f"{labels}_balanced_labels" / f"{split:02d}.txt"
    if not path.is_file():
        raise UserError(f"--label-dir {label_dir}: no split file {path} (LaplaceNet's layout: "
                        f"<dir>/<dataset>/<labels>_balanced_labels/<NN>.txt)")
    return str(path)


def plan_table(number: int, scale: str = "full", splits: int = 1, root="runs/tables",
               data_dir: str = "", cells: str = "", tables_dir=None, label_dir: str = "") -> Plan:
    """Every cell of Table ``number`` at ``scale`` with its runs, and the distinct jobs behind them."""
    if splits < 1:
        raise UserError(f"--splits must be >= 1, got {splits}")
    tables, scales = load_specs(tables_dir)
    if number not in tables:
        raise UserError(f"--table must be 1-5 or one of {', '.join(map(str, PROTOCOLS))}, got {number!r}")
    spec = tables[number]
    scale = spec.get("scale", scale)               # a protocol runs at its own scale
    if scale not in scales or (scale != spec.get("scale") and scale not in SCALES):
        raise UserError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")
    paper, sc = protocol_table(number, spec) if number in PROTOCOLS else paper_table(number), scales[scale]
    root = Path(root) / scale
    data = ["--data-dir", data_dir] if data_dir else []
    env = tuple((k, str(v)) for k, v in sc.get("env", {}).items())
    pretrain_jobs, ssl_jobs = {}, {}   # run dir -> Job; run dir -> (seed, Job)

    def pretraining(dataset: str, objective: str) -> Job:
        ident = ["--dataset", dataset, "--objective", objective, *to_flags(sc["pretrain"])]
        if label_dir and "pretrain_split" in sc:
            ident += ["--label-file", split_file(label_dir, dataset, sc["pretrain_split"]["labels"],
                                                 sc["pretrain_split"]["split"])]
        name = f"{dataset}-{objective}-{short_hash(ident)}"
        job = Job("pretrain", tuple(ident + data + ["--out", str(root / "pretrain" / name)]),
                  root / "pretrain" / name, env=env)
        return pretrain_jobs.setdefault(job.out, job)

    chosen = select([Cell(d, n, k, paper.header(k), v, n) for d, n, k, v in paper.cells()], cells)
    for cell in chosen:
        dataset, col = cell.dataset, spec["columns"][cell.key]
        run_dataset = sc.get("dataset", dataset)
        if "real_train_size" in sc:         # a miniature: the same labeled fraction of its dataset
            cell.run_labels = tiny_labels(cell.labels, dataset, sc)
        mixup, obj = bool(col.get("mixup")), col.get("pretrain", "none")
        alpha = sc["mixup_alpha"][dataset]
        ident = ["--dataset", run_dataset, "--labels", str(cell.run_labels),
                 *to_flags(sc["compute"][spec["compute"]]), *to_flags(sc["ssl"]),
                 *to_flags({"mixup": mixup}), *(["--mixup-alpha", str(alpha)] if mixup else []),
                 *(["--t-search"] if col.get("t_search") else []),
                 *(["--supervised-only"] if col.get("supervised_only") else [])]
        init, pre = [], None
        if obj != "none":
            pre = pretraining(run_dataset, obj)
            init = ["--init", str(pre.out / "ckpt.pt")]
        variant = (obj + ("-tsearch" if col.get("t_search") else "") + (f"-mixup{alpha}" if mixup else "")
                   + ("-suponly" if col.get("supervised_only") else ""))
        for seed in range(splits):
            seeded = ident + ["--seed", str(seed)]
            if label_dir and "real_train_size" not in sc:
                seeded += ["--label-file", split_file(label_dir, run_dataset, cell.run_labels, seed)]
            name = (f"{run_dataset}-{cell.run_labels}-{variant}-{spec['compute']}-s{seed}-"
                    f"{short_hash(seeded + [pre.out.name if pre else ''])}")
            job = Job("ssl", tuple(seeded + init + data + ["--out", str(root / "ssl" / name)]),
                      root / "ssl" / name, pre.out / "ckpt.pt" if pre else None, env)
            cell.runs.append(ssl_jobs.setdefault(job.out, (seed, job))[1])
    if not chosen:
        raise UserError(f"--cells {cells!r} matches no cell of Table {number} "
                        f"(ids look like {paper.cells()[0][0]}-{paper.cells()[0][1]}-{paper.keys[0]})")
    by_seed = [job for _, job in sorted(ssl_jobs.values(), key=lambda sj: sj[0])]  # stable: cell order
    return Plan(paper, scale, spec["compute"], list(pretrain_jobs.values()), by_seed, chosen,
                sc["compute"][spec["compute"]])


# ============ running ============
Runner = Callable[[Job, Optional[str]], int]


def subprocess_runner(job: Job, device: Optional[str]) -> int:
    """Run ``job`` in a child process (progress bars off); its output goes to
    ``<run dir>/reproduce.log``."""
    job.out.mkdir(parents=True, exist_ok=True)
    with open(job.out / "reproduce.log", "a") as logf:
        logf.write(f"$ {shlex.join(job.command(PYTHON, device) + ['--no-progress'])}\n")
        logf.flush()
        return subprocess.run(job.command(sys.executable, device) + ["--no-progress"], stdout=logf,
                              stderr=subprocess.STDOUT, env={**os.environ, **dict(job.env)}).returncode


def execute(plan: Plan, runner: Runner = subprocess_runner, devices: Optional[list] = None,
            say=print) -> dict:
    """Run every unfinished job of ``plan``, one per device at a time (``devices`` None: one at a
    time on the default device), in the order: pretrainings, the SSL runs that need none, the
    others. A run that needs a pretraining waits until it has ended, so runs without one keep the
    devices busy meanwhile; a run whose pretraining failed is not started. Returns
    ``{run dir: "finished" | "ran" | "failed" | "blocked"}``."""
    status = {}
    slots: Queue = Queue()
    for d in devices or [None]:
        slots.put(d)
    lock = threading.Lock()
    todo = [j for j in plan.jobs() if not j.done()]
    for j in plan.jobs():
        if j.done():
            status[j.out] = "finished"
    say(f"Table {plan.table.number} ({plan.scale}): {len(plan.cells)} cells, {len(plan.pretrain)} "
        f"pretrainings + {len(plan.ssl)} runs, {len(todo)} to run")
    counter = iter(range(1, len(todo) + 1))
    ended = {j.out / "ckpt.pt": threading.Event() for j in todo if j.kind == "pretrain"}

    def work(job: Job) -> None:
        if job.needs in ended:
            ended[job.needs].wait()        # queued before this job, so already running or ended
        if job.needs is not None and not job.needs.is_file():
            status[job.out] = "blocked"
            with lock:
                say(f"[{next(counter)}/{len(todo)}] skip {job.out} (its pretraining failed)")
            return
        device = slots.get()
        t0 = time.time()
        try:
            rc = runner(job, device)
        finally:
            slots.put(device)
            if job.kind == "pretrain":
                ended[job.out / "ckpt.pt"].set()
        ok = rc == 0 and job.done()
        status[job.out] = "ran" if ok else "failed"
        if ok:
            res = job.result()
            msg = f"done in {time.time() - t0:.0f}s" + (f", test top-1 {res:.2f}" if res is not None else "")
        else:
            msg = f"FAILED (exit {rc}); see {job.out / 'reproduce.log'}"
        with lock:
            say(f"[{next(counter)}/{len(todo)}] {job.kind} {job.out} {msg}")

    order = sorted(todo, key=lambda j: (j.kind != "pretrain", j.needs is not None))    # stable
    with ThreadPoolExecutor(max_workers=len(devices or [None])) as pool:
        list(pool.map(work, order))
    return status


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


# ============ CLI ============
def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m laplacedrl.reproduce", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--table", required=True, type=lambda v: int(v) if v.isdigit() else v,
                   choices=[1, 2, 3, 4, 5, *PROTOCOLS],
                   help="the paper's table (1-5), or fmnist: the CPU protocol on Fashion-MNIST")
    p.add_argument("--cells", default="", help="only these cells: a cell id (<dataset>-<labels>-<column>, "
                                               "e.g. cifar10-4000-drl), a glob (cifar10-4000*) or a "
                                               "substring (vdrl)")
    p.add_argument("--scale", default="full", choices=SCALES,
                   help="full: the paper's setting; tiny: a CPU miniature on digits (plumbing check); "
                        "a protocol (fmnist) runs at its own scale")
    p.add_argument("--dry-run", action="store_true", help="print every command, in order, and exit")
    p.add_argument("--splits", type=int, default=1, help="label splits per cell (seeds 0..K-1)")
    p.add_argument("--devices", default="", help="comma-separated devices (cuda:0,cuda:1) running "
                                                 "independent runs in parallel; default: one at a "
                                                 "time on the default device")
    p.add_argument("--root", default="runs/tables", help="where the run dirs go")
    shared_flag(p, "data_dir", "", shown="each CLI's; passed to both")
    p.add_argument("--label-dir", default="", help="LaplaceNet's labels folder (<dir>/<dataset>/"
                                                   "<labels>_balanced_labels/<NN>.txt): its split files "
                                                   "instead of seeded balanced draws")
    p.add_argument("--results", default="results", help="where table<N>.md / .csv go")
    p.add_argument("--specs", default="", help="folder holding tables.yaml and scales.yaml (default: the "
                                               "package's laplacedrl/configs/tables/)")
    p.add_argument("--collect-only", action="store_true", help="write the results of the runs "
                                                               "there are, run nothing")
    return p


def main(argv=None, runner: Runner = subprocess_runner) -> int:
    args = build_parser().parse_args(argv)
    plan = plan_table(args.table, args.scale, args.splits, args.root, args.data_dir, args.cells, args.specs,
                      args.label_dir)
    if not args.label_dir and args.table not in PROTOCOLS and plan.scale == "full":
        print("note: the label splits are seeded class-balanced draws, not LaplaceNet's published split "
              "files; pass --label-dir LaplaceNet/data-local/labels to run on those", file=sys.stderr)
    if args.dry_run:
        for job in plan.jobs():
            print(shlex.join(job.command()))
        return 0
    failed = []
    if not args.collect_only:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()] or None
        t0 = time.time()
        status = execute(plan, runner, devices)
        failed = [str(p) for p, s in status.items() if s in ("failed", "blocked")]
        print(f"Table {args.table} ({plan.scale}): {sum(s == 'ran' for s in status.values())} runs in "
              f"{time.time() - t0:.0f}s, {len(failed)} failed or blocked")
    md, md_path, csv_path = write_results(plan, args.results, args.splits)
    print(md)
    print(f"wrote {md_path} and {csv_path}")
    if failed:
        raise UserError(f"{len(failed)} run(s) did not finish, e.g. {failed[0]} (see its reproduce.log); "
                        f"rerun the same command to resume them")
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
