"""Your own images: labeled + unlabeled folders, the check before a run, sizes fitted to the folder,
the README's worked example run as written, and the export that loads with torch alone."""
import csv
import json
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import train_ssl
from conftest import ROOT, run_cli
from laplacedrl import demo_images
from laplacedrl.errors import main_guard

SMALL = ["--dataset", "imagefolder", "--arch", "wrn-10-1", "--sup-rounds", "1", "--sup-passes", "2", "--epochs", "1",
         "--aug-num", "1", "--no-progress"]


def readme_example() -> list:
    """The commands of the README's "Your own images" worked example, in order."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- own-images-example -->")[1].split("```bash")[1].split("```")[0]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip().startswith("python")]


def test_the_readme_example_runs_as_written(tmp_path):
    """Acceptance in one pass: a generated folder (4 classes, 12 labeled, 200 unlabeled, 40 test),
    a short pretraining, LaplaceNet from it, evaluation, predictions for the unlabeled images, and
    the exported model loaded with torch alone giving evaluate's predictions."""
    commands = readme_example()
    assert [c.split()[1] if c.split()[1] != "-m" else c.split()[2] for c in commands] == [
        "laplacedrl.demo_images", "pretrain_drl.py", "train_ssl.py", "laplacedrl.evaluate", "laplacedrl.evaluate",
        "laplacedrl.evaluate"]
    for command in commands:
        r = run_cli(*shlex.split(command)[1:], cwd=tmp_path)
        assert r.returncode == 0, (command, r.stderr)
    data = tmp_path / "my_images"
    assert sum(1 for _ in (data / "unlabeled").rglob("*.png")) == 200
    assert sum(1 for _ in (data / "labeled").rglob("*.png")) == 12
    ssl_run = next(p.parent for p in (tmp_path / "runs").glob("*/metrics.json") if "ssl" in p.parent.name)
    metrics = json.loads((ssl_run / "metrics.json").read_text())
    assert metrics["eval_set"] == "test" and metrics["test_top1"] is not None
    assert metrics["pseudo_label_acc"] is None          # the unlabeled images' classes are not known
    assert len((ssl_run / "labeled.txt").read_text().split("\n")) - 1 == 12
    with open(ssl_run / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 200
    meta = json.loads((tmp_path / "my_model.json").read_text())
    assert meta["classes"] == sorted(demo_images.CLASSES) and meta["image_size"] == 16
    code = ("import sys, json, torch\n"
            "model = torch.export.load(sys.argv[1]).module()\n"
            "x = torch.stack([torch.load(p) for p in sys.argv[2:]])\n"
            "print(json.dumps(model(x).tolist()), 'laplacedrl' in sys.modules)")
    from laplacedrl.evaluate import load_image
    tensors = []
    for i, row in enumerate(rows[:8]):
        torch.save(load_image(tmp_path / row["image"], 3, 16), tmp_path / f"x{i}.pt")
        tensors.append(str(tmp_path / f"x{i}.pt"))
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "my_model.pt2"), *tensors],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    probs, imported = r.stdout.strip().rsplit(" ", 1)
    assert imported == "False"                          # torch alone
    probs = np.array(json.loads(probs))
    for row, p in zip(rows[:8], probs):
        assert meta["classes"][int(p.argmax())] == row["predicted"]
        assert p.max() == pytest.approx(float(row["probability"]), abs=1e-4)


@pytest.fixture()
def small_folder(tmp_path):
    root = tmp_path / "small"
    demo_images.write_demo(root, size=8, labeled=2, unlabeled=10, test=2)      # 8 labeled, 40 unlabeled
    return root


def test_defaults_fit_a_small_folder_and_print_config_shows_them(small_folder, capsys):
    m = train_ssl.main(["--dataset", "imagefolder", "--data-dir", str(small_folder), "--print-config"])
    out = capsys.readouterr().out
    plan = m["schedule"]
    assert (plan["labeled"], plan["unlabeled"]) == (8, 40)
    assert plan["semi_supervised_epochs"] == 260 and plan["steps_per_semi_supervised_epoch"] == 1
    assert "knn: 47" in out and "batch_size: 48" in out and "labeled_batch_size: 8" in out
    assert "out: runs/ssl_imagefolder_l0_s0_" in out


@pytest.mark.parametrize("flags, message", [
    (["--knn", "50"], "--knn 50 needs more than 50 training images and there are 48: use --knn 47 or less"),
    (["--batch-size", "100", "--labeled-batch-size", "50"], "use --batch-size 90 or less"),
])
def test_impossible_sizes_are_refused_before_a_run_dir(small_folder, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main_guard(train_ssl.main, SMALL + ["--data-dir", str(small_folder), "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_a_bad_image_is_named_before_anything_is_written(small_folder, tmp_path, capsys):
    (small_folder / "unlabeled" / "batch0" / "broken.png").write_bytes(b"\x89PNG not really")
    Image.new("RGB", (4, 4)).save(small_folder / "unlabeled" / "batch1" / "tiny.png")
    out = tmp_path / "run"
    assert main_guard(train_ssl.main, SMALL + ["--data-dir", str(small_folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "2 problem(s)" in err and "--skip-bad-images" in err
    assert "broken.png" in err and "tiny.png is 4x4, smaller than the folder's 8x8" in err
    assert not out.exists()
    m = train_ssl.main(SMALL + ["--data-dir", str(small_folder), "--out", str(out), "--skip-bad-images"])
    assert m["epochs_done"] == 2 and (out / "last.pt").exists()


def test_csv_labels_val_folder_and_class_checks(small_folder, tmp_path, capsys):
    unlabeled = sorted((small_folder / "unlabeled").rglob("*.png"))
    (small_folder / "labels.csv").write_text("path,label\n" + f"{unlabeled[0].relative_to(small_folder)},red_square\n")
    (small_folder / "test").rename(small_folder / "val")
    m = train_ssl.main(SMALL + ["--data-dir", str(small_folder), "--out", str(tmp_path / "r")])
    assert m["eval_set"] == "validation" and m["test_top1"] is not None
    assert (tmp_path / "r" / "labeled.txt").read_text().count("\n") == 9      # 8 in labeled/ + 1 by the CSV
    (small_folder / "val" / "cow").mkdir()
    Image.new("RGB", (8, 8)).save(small_folder / "val" / "cow" / "c.png")
    (small_folder / "labeled" / "empty").mkdir()
    assert main_guard(train_ssl.main, SMALL + ["--data-dir", str(small_folder), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "empty class folder" in err and "val class cow is not among the training classes" in err


def test_init_sets_the_architecture(tmp_path, capsys):
    import pretrain_drl
    root = tmp_path / "imgs"
    demo_images.write_demo(root, size=8, labeled=2, unlabeled=10, test=2)
    pretrain_drl.main(["--dataset", "imagefolder", "--data-dir", str(root), "--arch", "wrn-10-1", "--iters", "2",
                       "--batch-size", "8", "--nf", "8", "--ch-mult", "1,2", "--attn-resolutions", "", "--no-progress",
                       "--out", str(tmp_path / "drl")])
    ckpt = str(tmp_path / "drl" / "ckpt.pt")
    assert main_guard(train_ssl.main, ["--init", ckpt, "--arch", "wrn-28-2", "--print-config"]) == 2
    assert "--arch wrn-28-2 contradicts --init" in capsys.readouterr().err
    m = train_ssl.main(["--init", ckpt, "--arch", "wrn-10-1", "--print-config"])
    assert "arch: wrn-10-1" in capsys.readouterr().out and m["schedule"]["labeled"] == 8
    train_ssl.main(["--init", ckpt, "--print-config"])
    assert "arch: wrn-10-1" in capsys.readouterr().out      # recorded as what runs, not the default


def test_print_config_needs_no_data_and_names_the_run_dir(tmp_path, capsys):
    m = train_ssl.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "nothing"), "--print-config"])
    out = capsys.readouterr().out
    assert (m["schedule"]["labeled"], m["schedule"]["unlabeled"]) == (4000, 46000)
    assert m["schedule"]["semi_supervised_epochs"] == 267 and m["run_dir"].startswith("runs/ssl_cifar10_l4000_s0_")
    assert f"out: {m['run_dir']}" in out and "the data is not there" in out
    assert not (tmp_path / "nothing").exists()


def test_a_closed_pipe_ends_quietly():
    r = subprocess.run(f"{sys.executable} -m laplacedrl.reproduce --table 1 --dry-run | head -1", shell=True,
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith("python -m laplacedrl.pretrain_drl") and len(r.stdout.splitlines()) == 1
    assert "Traceback" not in r.stderr and "Error" not in r.stderr, r.stderr
