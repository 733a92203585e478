"""Reproduce one of the paper's Tables 1-5 with one command: plan, run (or resume), collect.

    python -m laplacedrl.reproduce --table 1 --dry-run           # the exact commands, nothing else
    python -m laplacedrl.reproduce --table 1 --splits 3 --devices cuda:0,cuda:1
    python -m laplacedrl.reproduce --table 1 --scale tiny        # a miniature on digits, CPU

In three parts: :mod:`~laplacedrl.reproduce.plan` (the cells, their runs and commands),
:mod:`~laplacedrl.reproduce.run` (running what is unfinished) and :mod:`~laplacedrl.reproduce.report`
(the results next to the paper's); this module is the command line.

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
import shlex
import sys
import time

from laplacedrl.config import shared_flag
from laplacedrl.errors import OneLineParser, UserError
from laplacedrl.reproduce.plan import PROTOCOLS, SCALES, plan_table
from laplacedrl.reproduce.report import write_results
from laplacedrl.reproduce.run import Runner, execute, subprocess_runner

__all__ = ["build_parser", "main", "plan_table", "execute", "write_results", "subprocess_runner"]


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

