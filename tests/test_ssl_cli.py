"""train_ssl.py end to end on digits with a tiny network: outputs, resume, idempotence, user errors."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_ssl
from conftest import ENV, ROOT, TINY_SSL as TINY, run_cli
from laplacedrl import config as C
from laplacedrl.errors import UserError, main_guard

def read_metrics(out):
    return json.loads((Path(out) / "metrics.json").read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ssl") / "run"
    metrics = train_ssl.main(TINY + ["--out", str(out)])
    return out, metrics


def test_run_writes_every_output(tiny_run):
    out, metrics = tiny_run
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "run.json", "labeled.txt", "last.pt",
                                               "metrics.json", "log.txt"}
    m = read_metrics(out)
    assert list(m)[:2] == ["test_top1", "test_top5"] and list(m)[-1] == "history"
    for key in ("test_top1_best", "test_top1_last5", "pseudo_label_acc", "epochs_done", "epochs_total",
                "t", "seed"):
        assert key in m, key
    assert m["epochs_done"] == m["epochs_total"] == 3 and len(m["history"]) == 3
    assert [h["phase"] for h in m["history"]] == ["sup", "ssl", "ssl"]
    assert m["t"] is None and m["seed"] == 0
    assert m["test_top1"] == m["history"][-1]["test_top1"] > 30      # chance is 10%
    assert m["test_top5"] > m["test_top1"]
    assert m["pseudo_label_acc"] > 50          # the graph does better than chance even here
    run = json.loads((out / "run.json").read_text())["invocations"][0]
    assert run["command"][0] == "train_ssl.py" and "--labels" in run["command"] and run["version"]
    assert run["git_commit"] is None or len(run["git_commit"]) >= 40
    assert all({"test_top1", "loss", "time"} <= set(h) for h in m["history"])
    cfg = C.from_dict(C.SSLConfig, __import__("yaml").safe_load((out / "config.yaml").read_text()))
    assert cfg.arch == "wrn-10-1" and cfg.labels == 30
    lines = (out / "labeled.txt").read_text().split("\n")
    assert len([ln for ln in lines if ln]) == 30


def test_tensorboard_holds_the_scalars(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _ = tiny_run
    acc = EventAccumulator(str(out))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "eval/test_top1", "eval/test_top5", "eval/pseudo_label_acc",
            "eval/pseudo_label_acc_before_align", "time/epoch_seconds", "eval/graph_time"} <= tags
    assert [e.step for e in acc.Scalars("eval/test_top1")] == [1, 2, 3]


def test_rerun_of_a_finished_run_does_nothing(tiny_run):
    out, _ = tiny_run
    before = (out / "last.pt").stat().st_mtime_ns
    m = train_ssl.main(TINY + ["--out", str(out)])
    assert m["epochs_done"] == 3 and len(m["history"]) == 3
    assert (out / "last.pt").stat().st_mtime_ns == before


def test_labeled_txt_repeats_the_run(tiny_run, tmp_path):
    out, _ = tiny_run
    from laplacedrl.data import load_dataset, read_label_file
    train, _, _ = load_dataset("digits")
    idx = read_label_file(out / "labeled.txt", train)
    ck = torch.load(out / "last.pt", weights_only=True)
    assert np.array_equal(idx, np.asarray(ck["labeled"]))


def test_changed_config_in_same_dir_is_refused(tiny_run):
    out, _ = tiny_run
    with pytest.raises(UserError, match="--fresh"):
        train_ssl.main(TINY + ["--out", str(out), "--lr", "0.1"])


def test_kill_during_an_epoch_then_rerun_resumes(tmp_path):
    out = tmp_path / "killed"
    args = TINY[:] + ["--out", str(out), "--num-workers", "2"]     # persistent loader workers too
    args[args.index("--epochs") + 1] = "4"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_ssl.py"), *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        if (out / "metrics.json").exists() and read_metrics(out)["epochs_done"] >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)                   # kill -9 in the middle of epoch 3
    proc.wait()
    done = read_metrics(out)["epochs_done"]
    assert 2 <= done < 5, "the run must be killed before it finishes"
    r = run_cli("train_ssl.py", *args)
    assert r.returncode == 0, r.stderr
    assert f"resuming after epoch {done}" in r.stdout
    m = read_metrics(out)
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3, 4, 5]   # every epoch exactly once


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from laplacedrl.recipes import ssl as recipe
    out = tmp_path / "nan"
    real = recipe.train_epoch
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        losses = real(*a, **k)
        return losses * float("nan") if len(calls) == 2 else losses
    monkeypatch.setattr(recipe, "train_epoch", flaky)
    with pytest.raises(UserError, match="training loss at step 1 of epoch 2 became nan"):
        train_ssl.main(TINY + ["--out", str(out)])
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and read_metrics(out)["epochs_done"] == 1


@pytest.mark.parametrize("args, message", [
    (["--labels", "5"], "at least one per class"),
    (["--labels", "99999"], "--labels 99999 on digits (the default; pass --dataset to choose)"),
    (["--label-file", "/no/such/file.txt"], "/no/such/file.txt"),
    (["--init", "/no/such/ckpt.pt"], "--init /no/such/ckpt.pt: no such file"),
    (["--init", "/etc/passwd"], "--init /etc/passwd is not a readable torch checkpoint"),
    (["--dataset", "cifar10", "--data-dir", "/no/such/dir"], "cifar"),
    (["--knn-backend", "gpu"], "invalid choice"),
    (["--device", "cuda:7"], "--device"),
])
def test_user_errors_are_one_line_and_exit_2(args, message, tmp_path, capsys):
    code = main_guard(train_ssl.main, TINY + ["--out", str(tmp_path / "e")] + args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and message.lower() in err.lower(), err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "e").exists()              # a refused command leaves no run dir


def test_a_mistyped_flag_is_one_line_on_stderr_from_the_real_cli(tmp_path):
    r = run_cli("train_ssl.py", "--lables", "5", "--out", str(tmp_path / "e"), process=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.strip().splitlines() == ["error: unrecognized arguments: --lables 5 (see --help)"]
    assert not (tmp_path / "e").exists()


def test_bad_label_file_names_the_line(tmp_path):
    f = tmp_path / "labels.txt"
    f.write_text("0_0.png 0\n1_1.png 7\n")
    r = run_cli("train_ssl.py", *TINY, "--out", str(tmp_path / "e"), "--label-file", str(f))
    assert r.returncode == 2 and f"{f}:2" in r.stderr, r.stderr


def test_supervised_only_trains_on_labels_alone(tmp_path):
    m = train_ssl.main(TINY + ["--out", str(tmp_path / "sup"), "--supervised-only"])
    assert m["pseudo_label_acc"] is None and m["epochs_done"] == 3


def test_fewer_labels_than_the_labeled_batch_still_trains(tmp_path):
    args = TINY[:]
    args[args.index("--labels") + 1] = "12"         # < --labeled-batch-size 20
    args[args.index("--epochs") + 1] = "1"
    m = train_ssl.main(args + ["--out", str(tmp_path / "few")])
    assert m["epochs_done"] == 2


def test_semi_supervised_epochs_mix_even_with_no_mixup(tmp_path, monkeypatch):
    """Published: --mixup concerns the supervised rounds only; --no-ssl-mixup switches the rest off."""
    from laplacedrl.recipes import ssl as recipe
    seen = []
    real = recipe.train_epoch

    def spy(*a, mixup_alpha=None, **k):
        seen.append(mixup_alpha)
        return real(*a, mixup_alpha=mixup_alpha, **k)
    monkeypatch.setattr(recipe, "train_epoch", spy)
    train_ssl.main(TINY + ["--out", str(tmp_path / "a"), "--no-mixup", "--mixup-alpha", "0.7"])
    assert seen == [None, 0.7, 0.7]
    seen.clear()
    train_ssl.main(TINY + ["--out", str(tmp_path / "b"), "--mixup", "--no-ssl-mixup"])
    assert seen == [1.0, None, None]


def test_same_seed_gives_the_same_labeled_batches_with_any_worker_count():
    from laplacedrl.engine.distributed import DistInfo
    from laplacedrl.ssl.loaders import Loaders, load_data, make_augmentation
    from laplacedrl.ssl.schedule import make_schedule

    def batches(workers, seed=0):
        cfg = C.resolve(C.SSLConfig, {"labels": "30", "labeled_batch_size": "20", "batch_size": "60",
                                      "num_workers": str(workers), "seed": str(seed), "epochs": "2",
                                      "sup_rounds": "1", "sup_passes": "2"})
        data = load_data(cfg)
        sched = make_schedule(cfg, len(data.lab_idx), len(data.unl_idx))
        weak, strong, copies, _ = make_augmentation(cfg, data.spec, torch.device("cpu"))
        loaders = Loaders(cfg, data, sched, DistInfo(), "cpu", weak, strong, copies)
        out = []
        for epoch in (0, 1, 2):
            it = loaders.labeled_batches(epoch, data.targets)
            out.append([next(it)[:2] for _ in range(3)])
        return out
    ref = batches(0)
    for got in (batches(0), batches(2)):
        for e_ref, e_got in zip(ref, got):
            for (xa, ya), (xb, yb) in zip(e_ref, e_got):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(batches(0, seed=1)[0][0][0], ref[0][0][0])
    assert ref[0][0][0].shape == (30, 3, 1, 8, 8)                 # supervised rounds: all 30 labels
    assert ref[1][0][0].shape == (20, 3, 1, 8, 8)                 # then the labeled batch


def test_print_config_shows_the_schedule_and_writes_nothing(tmp_path):
    r = run_cli("train_ssl.py", "--labels", "40", "--epochs", "0", "--num-steps", "5000", "--max-epochs", "12",
                "--print-config", "--out", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr
    sched = __import__("yaml").safe_load(r.stdout.split("schedule:")[1].join(["schedule:", ""]))["schedule"]
    assert sched["labeled"] == 40 and sched["unlabeled"] == 1257
    # 10 rounds x 10 passes x 1 step, then floor((5000 - 100) / floor(1257 / 50)) epochs
    assert sched["semi_supervised_epochs"] == (5000 - 100) // 25 and sched["epochs_run"] == 12
    assert not (tmp_path / "p").exists()


def test_help_imports_no_torch_and_shows_the_datasets_defaults():
    r = run_cli("train_ssl.py", "--help")
    assert r.returncode == 0 and "configs/ssl/digits.yaml" in r.stdout
    assert "(default: 30)" in " ".join(r.stdout.split())        # digits' epochs, not the built-in 0
    cifar = run_cli("train_ssl.py", "--dataset", "cifar10", "--help")
    assert "(default: 4000)" in " ".join(cifar.stdout.split())
    code = "import sys, train_ssl; sys.argv=['train_ssl.py','--help']\ntry: train_ssl.main()\nexcept SystemExit: pass\n" \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_last_pt_holds_exactly_the_documented_keys(tiny_run):
    from laplacedrl.engine.checkpoint import FORMATS, SSL_RUN
    out, _ = tiny_run
    ck = torch.load(out / "last.pt", weights_only=True)
    assert set(ck) == set(FORMATS[SSL_RUN]) | {"format", "version"}
    assert ck["classifier"]["backbone"]["arch"] == "wrn-10-1" and ck["classifier"]["learnable_t"] is False


def test_evaluate_reproduces_the_runs_accuracy_and_exports(tiny_run, tmp_path):
    from laplacedrl import evaluate
    from laplacedrl.engine.checkpoint import EXPORT, load_checkpoint
    out, metrics = tiny_run
    res = evaluate.main([str(out), "--out", str(tmp_path)])
    assert evaluate.main([str(out), "--export", str(tmp_path / "model.pt")]) == {"export": str(tmp_path / "model.pt")}
    assert res["test_top1"] == pytest.approx(metrics["test_top1"]) and res["test_images"] == 500
    rows = (tmp_path / "confusion.csv").read_text().splitlines()
    counts = np.array([[int(v) for v in r.split(",")[1:]] for r in rows[1:]])
    assert counts.shape == (10, 10) and counts.sum() == 500
    assert np.trace(counts) == round(metrics["test_top1"] * 5)          # the diagonal is top-1
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    exported = load_checkpoint(tmp_path / "model.pt", EXPORT)
    from laplacedrl.models import classifier_from_record
    model = classifier_from_record(exported["classifier"])
    model.load_state_dict(exported["state_dict"])
    assert exported["classes"] == [str(c) for c in range(10)] and exported["image_size"] == 8
    images = tmp_path / "imgs"
    images.mkdir()
    from laplacedrl.data import load_dataset
    _, test, _ = load_dataset("digits")
    for i in range(4):
        test.pil(i).resize((16, 16)).save(images / f"{i}.png")          # another size: resized
    evaluate.main([str(out), "--images", str(images), "--out", str(tmp_path / "pred")])
    lines = (tmp_path / "pred" / "predictions.csv").read_text().splitlines()
    assert len(lines) == 5 and lines[0] == "image,predicted,probability,top5"


def test_init_without_dataset_follows_an_imagefolder_checkpoint(tmp_path, capsys):
    import pretrain_drl
    from test_data import write_image_folders
    write_image_folders(tmp_path / "D", ["cat", "dog"], 12, 4, size=(16, 16))
    pretrain_drl.main(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "D"), "--iters", "2",
                       "--arch", "wrn-10-1", "--nf", "8", "--batch-size", "8", "--no-progress",
                       "--out", str(tmp_path / "r1")])
    train_ssl.main(["--labels", "4", "--init", str(tmp_path / "r1" / "ckpt.pt"), "--epochs", "1",
                    "--sup-rounds", "1", "--sup-passes", "1", "--aug-num", "1", "--knn", "5",
                    "--batch-size", "10", "--labeled-batch-size", "4", "--no-progress",
                    "--out", str(tmp_path / "s")])
    assert f"dataset=imagefolder (from the --init checkpoint {tmp_path / 'r1' / 'ckpt.pt'})" in capsys.readouterr().out
    with pytest.raises(UserError, match="pretrained on 3x16x16"):
        train_ssl.main(["--dataset", "digits", "--labels", "20", "--init", str(tmp_path / "r1" / "ckpt.pt"),
                        "--out", str(tmp_path / "t")])


def test_the_graph_step_never_sees_a_label_of_an_unlabeled_image(tmp_path, monkeypatch):
    """propagate gets -1 for every unlabeled image; its pseudo-labels are those it gives when the
    true labels are there behind the mask (they never mattered), and the accuracy is measured outside."""
    from laplacedrl.data import load_dataset
    from laplacedrl.graph import propagate as real
    from laplacedrl.ssl import pseudo_labels
    calls = []

    def spy(features, labels, labeled_mask, *a, **k):
        res = real(features, labels, labeled_mask, *a, **k)
        calls.append((np.asarray(labels).copy(), np.asarray(labeled_mask).copy(), features, a, k, res))
        return res
    monkeypatch.setattr(pseudo_labels, "propagate", spy)
    m = train_ssl.main(TINY + ["--out", str(tmp_path / "r")])
    assert len(calls) == 2                                    # one graph step per semi-supervised epoch
    truth = load_dataset("digits")[0].targets
    for labels, mask, feats, a, k, res in calls:
        assert mask.sum() == 30 and (labels[~mask] == -1).all()
        assert (labels[mask] == truth[mask]).all()
        hidden_in_plain_sight = real(feats, truth, mask, *a, **k)
        np.testing.assert_array_equal(res.pseudo_labels, hidden_in_plain_sight.pseudo_labels)
    unl = ~calls[-1][1]
    acc = 100 * np.mean(calls[-1][5].pseudo_labels[unl] == truth[unl])
    assert m["pseudo_label_acc"] == pytest.approx(acc)
