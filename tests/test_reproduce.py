"""laplacedrl.reproduce: cells against the paper, commands that parse, idempotence, the collector."""
import csv
import io
import json
import shlex
import shutil
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from laplacedrl import config as C
from laplacedrl import reproduce as R
from laplacedrl.errors import UserError
from laplacedrl.paper_results import TABLES

SHAPES = {1: (11, 5), 2: (11, 2), 3: (3, 5), 4: (3, 3), 5: (11, 5)}
# a few numbers typed again from the paper's tables, independently of paper_results.py
SPOT = {(1, "cifar10-100-vdrl"): 81.63, (1, "miniimagenet-10000-laplacenet"): 66.65,
        (2, "cifar100-20000-drl"): 66.39, (3, "miniimagenet-4000-ae"): 48.52,
        (3, "cifar10-100-drl-tsearch"): 67.07, (4, "cifar10-100-ae"): 58.84,
        (5, "cifar100-10000-mixupdrl-mixup"): 74.36, (5, "cifar10-100-vdrl-mixup"): 77.51}


def dry_run(*args) -> list:
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert R.main(["--dry-run", *args]) == 0
    return [shlex.split(line) for line in buf.getvalue().splitlines()]


def parse(tokens):
    while "=" in tokens[0]:                                           # VAR=value prefix (tiny scale)
        tokens = tokens[1:]
    assert tokens[:2] == ["python", "-m"] and tokens[2] in ("laplacedrl.train_ssl", "laplacedrl.pretrain_drl")
    cls = C.SSLConfig if tokens[2] == "laplacedrl.train_ssl" else C.DRLConfig
    return C.parse(cls, tokens[3:])


def finish(job, acc=90.0, done=None, total=5):
    """Fake a run: ckpt.pt for a pretraining, metrics.json for an SSL run."""
    job.out.mkdir(parents=True, exist_ok=True)
    if job.kind == "pretrain":
        (job.out / "ckpt.pt").write_bytes(b"fake")
    else:
        (job.out / "metrics.json").write_text(json.dumps(
            {"test_top1": acc, "epochs_done": total if done is None else done, "epochs_total": total}))


class Recorder:
    """An injected runner: records each call and fakes a finished run."""

    def __init__(self, fail=()):
        self.calls, self.fail, self.lock, self.active, self.peak = [], set(fail), threading.Lock(), 0, 0

    def __call__(self, job, device):
        with self.lock:
            self.calls.append((job, device))
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(0.02)
        with self.lock:
            self.active -= 1
        if job.kind in self.fail:
            return 1
        finish(job)
        return 0


@pytest.mark.parametrize("number", [1, 2, 3, 4, 5])
def test_cells_are_the_papers(number):
    plan = R.plan_table(number)
    rows, cols = SHAPES[number]
    assert len(plan.cells) == rows * cols == len({c.id for c in plan.cells})
    assert len(plan.ssl) == rows * cols                  # at full scale every cell is its own run
    t = TABLES[number]
    for c in plan.cells:
        assert c.paper == t.value(c.dataset, c.labels, c.key)
        assert len(c.runs) == 1 and c.runs[0] in plan.ssl
    for (n, cell_id), value in SPOT.items():
        if n == number:
            assert next(c.paper for c in plan.cells if c.id == cell_id) == value


def test_a_run_shared_between_tables_has_one_paper_value(tmp_path):
    """Cells of different tables that are the same run (Table 4 None = Table 1 LaplaceNet, Table 5
    Basic = Table 1 DRL, Table 3 None = Table 2 None, ...) share a run dir and the paper's number."""
    by_dir = {}
    for n in TABLES:
        for c in R.plan_table(n, root=tmp_path).cells:
            by_dir.setdefault(c.runs[0].out, set()).add(c.paper)
    assert all(len(v) == 1 for v in by_dir.values())
    assert len(by_dir) < sum(len(R.plan_table(n).cells) for n in TABLES)   # some are shared


@pytest.mark.parametrize("number", [1, 2, 3, 4, 5])
def test_dry_run_commands_are_complete(number):
    lines = dry_run("--table", str(number), "--splits", "2", "--data-dir", "/d")
    plan = R.plan_table(number, splits=2)
    spec = yaml.safe_load((C.package_configs() / "tables" / "tables.yaml").read_text())[number]
    max_epochs = {"full": 0, "limited": 100}[spec["compute"]]
    ckpts, ssl = set(), []
    for tokens in lines:
        cfg = parse(tokens)
        assert cfg.data_dir == "/d" and cfg.out
        if isinstance(cfg, C.DRLConfig):
            assert not ssl, "pretrainings come first"
            ckpts.add(str(Path(cfg.out) / "ckpt.pt"))
            assert (cfg.iters, cfg.pretrain_data, cfg.labels, cfg.batch_size, cfg.export) == \
                (70000, "labeled", 4000, 100, "raw")          # the published pretraining
        else:
            ssl.append(cfg)
            assert not cfg.init or cfg.init in ckpts            # its pretraining is listed before it
    assert len(ssl) == 2 * len(plan.cells) and len(lines) == len(plan.jobs())
    assert [c.seed for c in ssl] == [0] * len(plan.cells) + [1] * len(plan.cells)
    for cell, cfg in zip(plan.cells, ssl):
        col = spec["columns"][cell.key]
        assert (cfg.dataset, cfg.labels, cfg.arch, cfg.batch_size, cfg.labeled_batch_size, cfg.lr,
                cfg.aug_num) == (cell.dataset, cell.labels, "wrn-28-2", 100, 50, 0.03, 3)
        # the published schedule: LaplaceNet's 250k-step budget, limited compute stops at epoch 100
        assert (cfg.sup_rounds, cfg.sup_passes, cfg.epochs, cfg.num_steps, cfg.max_epochs) == \
            (10, 10, 0, 250_000, max_epochs)
        assert cfg.amp == "off" and not cfg.label_file
        assert cfg.mixup == bool(col.get("mixup")) and cfg.t_search == bool(col.get("t_search"))
        if cfg.mixup:
            assert cfg.mixup_alpha == 1.0         # the published code's default for every dataset
        pre = col["pretrain"]
        assert bool(cfg.init) == (pre != "none")
        if cfg.init:
            drl = parse(next(t for t in lines if t[-1] == str(Path(cfg.init).parent)))
            assert (drl.dataset, drl.objective) == (cell.dataset, pre)


def test_label_dir_gives_every_run_laplacenets_split_file(tmp_path):
    files = [(d, 4000, 10) for d in ("cifar10", "cifar100", "miniimagenet")] + [
        (d, n, s) for d, n in (("cifar10", 100), ("cifar100", 1000), ("miniimagenet", 4000)) for s in (0, 1)]
    for dataset, labels, split in files:
        f = tmp_path / dataset / f"{labels}_balanced_labels" / f"{split:02d}.txt"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x y\n")
    lines = dry_run("--table", "3", "--cells", "*-drl", "--splits", "2", "--label-dir", str(tmp_path))
    cfgs = [parse(t) for t in lines]
    pre = [c for c in cfgs if isinstance(c, C.DRLConfig)]
    assert {c.label_file for c in pre} == {str(tmp_path / d / "4000_balanced_labels" / "10.txt")
                                           for d in ("cifar10", "cifar100", "miniimagenet")}
    ssl = [c for c in cfgs if isinstance(c, C.SSLConfig) and c.dataset == "cifar10"]
    assert [c.label_file for c in ssl] == [str(tmp_path / "cifar10" / "100_balanced_labels" / f"0{s}.txt")
                                           for s in (0, 1)]
    with pytest.raises(UserError, match="no split file"):
        R.plan_table(1, label_dir=str(tmp_path), cells="cifar10-500-drl")


def test_split_notice_without_label_dir_only(tmp_path, capsys):
    """Seeded splits are announced once on stderr; with --label-dir the notice goes and every
    command reads a split file."""
    dry_run("--table", "3")
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "--label-dir" in err and "seeded" in err
    for dataset, labels in (("cifar10", 100), ("cifar100", 1000), ("miniimagenet", 4000)):
        for split in (0, 10):
            f = tmp_path / dataset / f"{labels}_balanced_labels" / f"{split:02d}.txt"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("x y\n")
        (tmp_path / dataset / "4000_balanced_labels").mkdir(exist_ok=True)
        (tmp_path / dataset / "4000_balanced_labels" / "10.txt").write_text("x y\n")
    lines = dry_run("--table", "3", "--label-dir", str(tmp_path))
    assert "note:" not in capsys.readouterr().err
    assert all("--label-file" in tokens for tokens in lines)
    dry_run("--table", "3", "--scale", "tiny")
    assert "note:" not in capsys.readouterr().err          # digits: there are no published splits


def test_table1_has_55_cells_and_one_pretraining_per_dataset_and_variant():
    lines = dry_run("--table", "1")
    pre = [parse(t) for t in lines if t[2] == "laplacedrl.pretrain_drl"]
    assert len(lines) - len(pre) == 55
    assert sorted((c.dataset, c.objective) for c in pre) == sorted(
        (d, o) for d in ("cifar10", "cifar100", "miniimagenet") for o in ("drl", "vdrl"))


def test_tiny_scale_maps_onto_digits_and_shares_pretrainings():
    plan = R.plan_table(1, "tiny")
    assert [j.args[3] for j in plan.pretrain] == ["drl", "vdrl"]     # one per variant, all rows
    labels = {(c.dataset, c.labels): c.run_labels for c in plan.cells}
    # max(10, round(labels * 1297 / 50000))
    assert labels[("cifar10", 100)] == 10 and labels[("cifar10", 4000)] == 104
    assert labels[("cifar100", 20000)] == 519 and labels[("miniimagenet", 10000)] == 259
    for tokens in dry_run("--table", "1", "--scale", "tiny"):
        assert tokens[0] == "OMP_NUM_THREADS=1"
        cfg = parse(tokens)
        assert cfg.dataset == "digits" and cfg.arch == "wrn-10-1"
    # rows that become the same digits run share it (CIFAR-10/1000 and CIFAR-100/1000: 26 labels)
    a, b = (next(c for c in plan.cells if c.id == i) for i in ("cifar10-1000-drl", "cifar100-1000-drl"))
    assert a.runs == b.runs
    # ... unless their flags differ (here: labels 26 vs 104)
    a, b = (next(c for c in plan.cells if c.id == i) for i in ("cifar10-1000-drl-mixup", "cifar10-4000-drl-mixup"))
    assert a.runs != b.runs


def test_cells_filter():
    assert [c.id for c in R.plan_table(1, cells="cifar10-4000*").cells] == [
        f"cifar10-4000-{k}" for k in TABLES[1].keys]
    assert {c.key for c in R.plan_table(1, cells="vdrl").cells} == {"vdrl"}           # substring
    assert [c.id for c in R.plan_table(3, cells="cifar10-100-none").cells] == ["cifar10-100-none"]
    with pytest.raises(UserError, match="matches no cell"):
        R.plan_table(1, cells="cifar10-7*")


def test_finished_runs_are_skipped_and_unfinished_ones_resumed(tmp_path):
    args = ["--table", "1", "--scale", "tiny", "--cells", "cifar10-100-*", "--root", str(tmp_path / "runs"),
            "--results", str(tmp_path / "res")]
    plan = R.plan_table(1, "tiny", root=tmp_path / "runs", cells="cifar10-100-*")
    first = Recorder()
    R.main(args, runner=first)
    # 5 cells, 2 pretrainings (drl is shared by drl and drl-mixup), each run once, pretrainings first
    assert len(first.calls) == 7 and len({j.out for j, _ in first.calls}) == 7
    assert [j.kind for j, _ in first.calls] == ["pretrain"] * 2 + ["ssl"] * 5
    again = Recorder()
    R.main(args, runner=again)
    assert again.calls == []                                          # nothing left to do
    finish(plan.ssl[2], done=3)                                        # one run killed at epoch 3 of 5
    third = Recorder()
    R.main(args, runner=third)
    assert [j for j, _ in third.calls] == [plan.ssl[2]]


def test_failed_pretraining_blocks_its_cells_only(tmp_path):
    rec = Recorder(fail={"pretrain"})
    with pytest.raises(UserError, match="did not finish"):
        R.main(["--table", "2", "--cells", "cifar10-100-*", "--root", str(tmp_path), "--results",
                str(tmp_path / "res")], runner=rec)
    assert [j.kind for j, _ in rec.calls] == ["pretrain", "ssl"]       # the no-pretraining cell ran
    text = (tmp_path / "res" / "table2.csv").read_text()
    rows = {r["cell"]: r for r in csv.DictReader(io.StringIO(text))}
    assert rows["cifar10-100-none"]["status"] == "ok" and rows["cifar10-100-drl"]["status"] == "missing"


def test_devices_run_in_parallel_one_job_per_device(tmp_path):
    plan = R.plan_table(1, "tiny", root=tmp_path, cells="cifar10-*")
    rec = Recorder()
    status = R.execute(plan, rec, ["cuda:0", "cuda:1"], say=lambda s: None)
    assert set(status.values()) == {"ran"} and len(rec.calls) == len(plan.jobs())
    assert rec.peak == 2 and {d for _, d in rec.calls} == {"cuda:0", "cuda:1"}
    kinds = [j.kind for j, _ in rec.calls]
    assert kinds == sorted(kinds)                                      # every pretraining before any run
    assert "--device" not in plan.ssl[0].command() and plan.ssl[0].command(device="cuda:1")[-2:] == \
        ["--device", "cuda:1"]


def test_runs_without_pretraining_start_while_pretrainings_run(tmp_path):
    plan = R.plan_table(1, "tiny", root=tmp_path, cells="cifar10-*")
    events, lock = [], threading.Lock()

    def runner(job, device):
        with lock:
            events.append(("start", job))
        time.sleep(0.3 if job.kind == "pretrain" else 0.02)
        finish(job)
        with lock:
            events.append(("end", job))
        return 0

    status = R.execute(plan, runner, ["cpu", "cpu", "cpu"], say=lambda s: None)
    assert set(status.values()) == {"ran"} and len(events) == 2 * len(plan.jobs())
    at = {(kind, job.out): i for i, (kind, job) in enumerate(events)}
    pre_end = {j.out / "ckpt.pt": at["end", j.out] for j in plan.pretrain}
    free = [j for j in plan.ssl if j.needs is None]
    assert free and any(at["start", j.out] < min(pre_end.values()) for j in free)
    for j in plan.ssl:
        if j.needs is not None:
            assert at["start", j.out] > pre_end[j.needs]                 # its ckpt.pt exists


def test_collector_missing_mean_std(tmp_path):
    plan = R.plan_table(4, splits=3, root=tmp_path)
    cell = next(c for c in plan.cells if c.id == "cifar10-100-drl")
    for job, acc in zip(cell.runs, (90.0, 92.0, 94.0)):
        finish(job, acc)
    half = next(c for c in plan.cells if c.id == "cifar100-1000-none")
    finish(half.runs[0], 50.0)
    finish(half.runs[1], 99.0, done=2)                                 # unfinished: not counted
    md, md_path, csv_path = R.write_results(plan, tmp_path / "res", 3)
    rows = {r["cell"]: r for r in csv.DictReader(io.StringIO(csv_path.read_text()))}
    r = rows["cifar10-100-drl"]
    assert (float(r["ours_mean"]), float(r["ours_std"]), r["n"], float(r["diff"]), r["status"]) == \
        (92.0, 2.0, "3", pytest.approx(92.0 - 74.31), "ok")
    r = rows["cifar100-1000-none"]
    assert (float(r["ours_mean"]), r["ours_std"], r["n"], r["status"]) == (50.0, "", "1", "partial")
    r = rows["miniimagenet-4000-ae"]
    assert (r["ours_mean"], r["ours_std"], r["n"], r["diff"], r["status"], float(r["paper"])) == \
        ("", "", "0", "", "missing", 57.93)
    assert len(rows) == 9 and all(len(r["run_dirs"].split(";")) == 3 for r in rows.values())
    line = next(ln for ln in md.splitlines() if ln.startswith("| Mini-ImageNet | 4000 |"))
    assert line.count("missing / ") == 3 and " 0.00" not in line      # never a zero
    assert "92.00 ± 2.00 (n=3) / 74.31" in md and "| cifar100-1000-none | 55.58 | 50.00 |  | 1/3 |" in md
    assert md_path.read_text() == md and "Protocol" in md and "NOT comparable" not in md


def test_tiny_results_say_they_are_not_comparable(tmp_path):
    plan = R.plan_table(3, "tiny", root=tmp_path)
    md, _, _ = R.write_results(plan, tmp_path, 1)
    assert "plumbing check" in md and "NOT comparable" in md and "digits labels" in md


def test_end_to_end_subprocess_and_rerun(tmp_path):
    """One real tiny cell through the subprocess runner; a rerun does nothing."""
    specs = tmp_path / "specs"
    shutil.copytree(C.package_configs() / "tables", specs)
    scales = yaml.safe_load((specs / "scales.yaml").read_text())
    scales["tiny"]["compute"]["limited"] = {"sup_rounds": 1, "sup_passes": 1, "epochs": 1, "max_epochs": 0}
    scales["tiny"]["ssl"]["batch_size"] = 210                          # 6 steps per epoch
    (specs / "scales.yaml").write_text(yaml.safe_dump(scales))
    args = ["--table", "3", "--scale", "tiny", "--cells", "cifar10-100-none", "--root", str(tmp_path / "r"),
            "--results", str(tmp_path / "res"), "--specs", str(specs)]
    R.main(args)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "res" / "table3.csv").read_text())))
    assert len(rows) == 1 and rows[0]["status"] == "ok"
    run = Path(rows[0]["run_dirs"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_done"] == 2 and float(rows[0]["ours_mean"]) == pytest.approx(metrics["test_top1"])
    assert "--no-progress" in (run / "reproduce.log").read_text().splitlines()[0]
    mtime = (run / "metrics.json").stat().st_mtime_ns

    def refuse(job, device):
        raise AssertionError(f"reran {job.out}")
    R.main(args, runner=refuse)
    assert (run / "metrics.json").stat().st_mtime_ns == mtime
