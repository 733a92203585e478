"""The first hour with your own images: pretraining sized to the folder, the warm-up rule, the time
estimate, labels.csv checked row by row, and the small things a new user trips over."""
import logging
import types

import pytest
import yaml

import pretrain_drl
import train_ssl
from laplacedrl import config as C
from laplacedrl import demo_images
from laplacedrl.drl.plan import auto_arch, fit_pretraining, fit_warmup
from laplacedrl.drl.step import warmup_lr
from laplacedrl.errors import UserError, main_guard

TINY_DRL = ["--batch-size", "8", "--nf", "8", "--ch-mult", "1,2", "--attn-resolutions", "", "--num-res-blocks", "1",
            "--no-progress", "--num-workers", "0"]
TINY_SSL = ["--dataset", "imagefolder", "--arch", "wrn-10-1", "--sup-rounds", "1", "--sup-passes", "1", "--epochs", "1",
            "--aug-num", "1", "--no-progress", "--num-workers", "0"]


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "imgs"
    demo_images.write_demo(root, size=8, labeled=2, unlabeled=10, test=2)      # 8 labeled, 40 unlabeled
    return root


# ============ the warm-up rule and the folder's pretraining defaults ============
def test_a_warm_up_longer_than_half_the_run_is_scaled_or_refused():
    assert fit_warmup(5000, 70000) == (5000, None)               # the published one stays
    assert fit_warmup(200, 2000) == (200, None)                  # digits' stays
    assert fit_warmup(150, 300) == (150, None)                   # exactly half: kept
    steps, note = fit_warmup(5000, 300)                          # a default one: scaled, and said so
    assert steps == 15 and "longer than half of the 300 iterations: scaled to 15 (5%)" in note
    with pytest.raises(UserError, match=r"--warmup 5000 is longer than half of the 300 iterations: the run "
                                        r"would end at 6% of its learning rate; use --warmup 150 or less"):
        fit_warmup(5000, 300, given=True)
    assert fit_warmup(5000, 2000, fraction=0.05) == (100, None)  # a fraction of the run ...
    assert fit_warmup(30, 2000, fraction=0.05, given=True) == (30, None)     # ... unless --warmup is given


def test_the_folder_defaults_fit_a_3000_image_folder_and_iters_300_ends_at_the_full_rate():
    cfg = C.resolve(C.DRLConfig, {"dataset": "imagefolder", "data_dir": "x"})
    fitted, notes = fit_pretraining(cfg, 3040, 28)                  # 40 labeled + 3,000 unlabeled, 28x28
    assert fitted.arch == "wrn-10-1" and fitted.iters == 1216 and fitted.warmup == 61
    assert fitted.warmup <= 0.1 * fitted.iters and len(notes) == 2
    short, notes = fit_pretraining(C.resolve(C.DRLConfig, {"dataset": "imagefolder", "iters": "300"}), 3040, 28)
    assert short.iters == 300 and short.warmup == 15 and len(notes) == 1          # the arch only
    assert warmup_lr(short.lr, short.iters - 1, short.warmup) == short.lr          # the last step's rate
    assert auto_arch(50000, 32) == "wrn-28-2" and auto_arch(50000, 84) == "wrn-10-1" and auto_arch(9999, 32) == "wrn-10-1"
    given = C.resolve(C.DRLConfig, {"dataset": "digits", "iters": "300", "warmup": "200"})
    with pytest.raises(UserError, match="--warmup 200 is longer than half"):
        fit_pretraining(given, 1297, 8)
    scaled, notes = fit_pretraining(C.resolve(C.DRLConfig, {"dataset": "digits", "iters": "300"}), 1297, 8)
    assert scaled.warmup == 15 and "default warm-up of 200 steps" in notes[0]
    with pytest.raises(UserError, match="auto is pretrain_drl.py's"):
        C.resolve(C.SSLConfig, {"arch": "auto"})


def test_a_short_pretraining_on_a_folder_ends_at_its_learning_rate(folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "drl"
    pretrain_drl.main(["--dataset", "imagefolder", "--data-dir", str(folder), "--iters", "10", "--log-every", "10",
                       "--out", str(out), *TINY_DRL])
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["arch"] == "wrn-10-1" and config["iters"] == 10 and config["warmup"] == 0     # 5% of 10 steps
    events = EventAccumulator(str(out))
    events.Reload()
    assert [e.value for e in events.Scalars("pretrain/lr")] == [pytest.approx(2e-4)]


def test_print_config_estimates_the_wall_time_or_says_it_is_unknown(folder, tmp_path, capsys):
    m = pretrain_drl.main(["--dataset", "imagefolder", "--data-dir", str(folder), "--print-config", *TINY_DRL])
    out = capsys.readouterr().out
    assert m["seconds"] > 0 and "# estimated wall time: " in out and "iterations at" in out
    assert "iters: 240" in out and "warmup: 12" in out and "--iters 0: 240 iterations = 40 passes over 48 images" in out
    m = train_ssl.main([*TINY_SSL, "--data-dir", str(folder), "--print-config"])
    out = capsys.readouterr().out
    assert m["seconds"] > 0 and "supervised steps x" in out and "graph steps x" in out
    for main in (pretrain_drl.main, train_ssl.main):
        m = main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "nothing"), "--print-config"])
        assert m["seconds"] is None and "estimated wall time: unknown" in capsys.readouterr().out


def test_the_run_bar_counts_every_step_of_the_run():
    from laplacedrl.recipes.ssl import run_progress
    from laplacedrl.ssl.schedule import Schedule
    sched = Schedule(sup_rounds=2, sup_passes=3, pass_steps=4, lab_batch=10, ssl_epochs=5, ssl_steps=7, stop=7)
    trainer = types.SimpleNamespace(sched=sched, cfg=types.SimpleNamespace(t_search=False, progress=False), main=True)
    bar = run_progress(trainer, start=3)
    assert (bar.total, bar.n) == (2 * 12 + 5 * 7, 2 * 12 + 7)
    bar.close()


# ============ labels.csv and the check before a run ============
def test_labels_csv_problems_are_named_at_once_by_line_and_skipped(folder, tmp_path, capsys):
    unlabeled = sorted((folder / "unlabeled").rglob("*.png"))
    (folder / "unlabeled" / "notes.png").write_bytes(b"not an image")
    rows = ["path,label", "unlabeled/gone.png,red_square", "unlabeled/missing.png,green_bar",
            f"{unlabeled[0].relative_to(folder)},red_square", "unlabeled/notes.png,blue_column"]
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "ssl"
    assert main_guard(train_ssl.main, [*TINY_SSL, "--data-dir", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "3 problem(s)" in err and not out.exists()
    assert "labels.csv line 2: no image" in err and "gone.png" in err
    assert "labels.csv line 3: no image" in err and "missing.png" in err
    assert f"labels.csv line 5: unreadable {folder / 'unlabeled' / 'notes.png'} (" in err      # the whole path

    m = train_ssl.main([*TINY_SSL, "--data-dir", str(folder), "--print-config"])      # says what is wrong
    printed = capsys.readouterr().out
    assert "the data is not there" not in printed and "# " + str(folder) + ": 3 problem(s)" in printed
    assert m["schedule"]["labeled"] == 9

    said = logging.Handler()
    said.emit = lambda record: warnings.append(record.getMessage())
    warnings = []
    logging.getLogger("laplacedrl").addHandler(said)          # the run's own logging replaces it
    m = train_ssl.main([*TINY_SSL, "--data-dir", str(folder), "--out", str(out), "--skip-bad-images"])
    assert any("--skip-bad-images left out 3 problem(s)" in w for w in warnings), warnings
    assert m["epochs_done"] == 2 and (out / "labeled.txt").read_text().count("\n") == 9    # 8 + 1 listed
    log = (out / "log.txt").read_text()
    assert "t=None" not in log and " t=" not in log                # no diffusion time without --init
    events = sorted(out.glob("events.out.tfevents.*"))

    # a finished run, rerun: nothing to do, and no empty event file left behind
    train_ssl.main([*TINY_SSL, "--data-dir", str(folder), "--out", str(out), "--skip-bad-images"])
    assert sorted(out.glob("events.out.tfevents.*")) == events

    # --export writes the export and nothing else
    from laplacedrl import evaluate
    evaluate.main([str(out), "--export", str(tmp_path / "model.pt")])
    assert (tmp_path / "model.pt2").exists() and (tmp_path / "model.json").exists()
    assert not (out / "confusion.csv").exists() and not (out / "evaluation.json").exists()


def test_the_run_header_formats_t():
    from laplacedrl.recipes.ssl import format_t
    assert format_t(0.4999997615814209) == "t=0.500 " and format_t(None) == ""


def test_evaluate_help_is_whole_sentences(capsys):
    from laplacedrl import evaluate
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "predictions for a folder of images, or an export that loads with torch alone." in text


def test_an_unreadable_image_is_named_in_full(tmp_path):
    from laplacedrl.data.folders import scan
    path = tmp_path / ("a_rather_long_folder_name_" * 3) / "notes.png"
    path.parent.mkdir()
    path.write_bytes(b"text")
    why = scan([str(path)], decode=True).unreadable[str(path)]
    assert str(path) not in why and "notes.pn" not in why and why



def test_the_readme_cpu_install_lists_every_dependency():
    """The CPU-only install names the dependencies itself (pip's own list would pull faiss-gpu back):
    every one of setup.cfg's but torch, torchvision and faiss-gpu, with faiss-cpu in its place."""
    import configparser
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    block = (root / "README.md").read_text().split("<!-- cpu-install -->")[1].split("```bash")[1].split("```")[0]
    installed = {re.split(r"[<>=\"]", w.strip('"'))[0].lower() for line in block.splitlines()
                 if line.startswith("pip install") for w in line.split()[2:] if not w.startswith("-")}
    setup = configparser.ConfigParser()
    setup.read(root / "setup.cfg")
    needed = {re.split(r"[<>=;\s]", r.strip())[0].lower() for r in setup["options"]["install_requires"].splitlines()
              if r.strip()} | {"pytest"}
    assert needed - installed == {"faiss-gpu"} and "faiss-cpu" in installed
    assert "--index-url https://download.pytorch.org/whl/cpu" in block and "pip install --no-deps -e ." in block
