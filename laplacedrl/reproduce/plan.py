"""The plan of a table: its cells (a row of the paper's table times a column), the runs each needs
(pretrainings shared across cells and tables) and their commands in deterministic run dirs; see
:mod:`laplacedrl.reproduce`."""
from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from laplacedrl.config import package_configs
from laplacedrl.errors import UserError
from laplacedrl.paper_results import PaperTable, table as paper_table

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
