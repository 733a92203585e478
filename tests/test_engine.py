"""Checkpoint formats and atomic writes, the schedule's closed forms, seeds, batch streams, metrics."""
import math
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from laplacedrl.data.streams import BatchStream, SeededItems, close_loader, loader_workers, make_loader, usable_cpus
from laplacedrl.engine.checkpoint import (DRL_CKPT, FORMATS, SSL_RUN, atomic_write_json, load_checkpoint,
                                          load_state, save_checkpoint)
from laplacedrl.engine.seeds import PHASES, derive_seed
from laplacedrl.errors import UserError
from laplacedrl.ssl.evaluation import summarize, topk_correct
from laplacedrl.ssl.schedule import cosine_lr, make_schedule
from laplacedrl.ssl.mixup import mixup_cross_entropy


def ssl_payload(net):
    return {"config": {}, "epoch": 1, "model": net.state_dict(), "classifier": {}, "optimizer": {},
            "history": [], "labeled": [0], "t_search": None}


# ============ checkpoints ============
def test_checkpoint_round_trip_and_format_checks(tmp_path):
    net = torch.nn.Linear(3, 2)
    path = tmp_path / "last.pt"
    save_checkpoint(path, SSL_RUN, ssl_payload(net))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]   # no temp file left behind
    ck = load_checkpoint(path, SSL_RUN)
    assert set(ck) == set(FORMATS[SSL_RUN]) | {"format", "version"}
    other = torch.nn.Linear(3, 2)
    load_state(other, ck["model"], "x")
    x = torch.randn(4, 3)
    assert torch.equal(net(x), other(x))
    with pytest.raises(UserError, match="is a laplacedrl.ssl-run checkpoint, expected laplacedrl.drl"):
        load_checkpoint(path, DRL_CKPT, "--init")
    with pytest.raises(UserError, match="does not match the model architecture"):
        load_state(torch.nn.Linear(3, 5), ck["model"], "x")


def test_save_refuses_keys_the_format_does_not_document(tmp_path):
    payload = ssl_payload(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="unexpected \\['extra'\\]"):
        save_checkpoint(tmp_path / "a.pt", SSL_RUN, {**payload, "extra": 1})
    del payload["history"]
    with pytest.raises(ValueError, match="missing \\['history'\\]"):
        save_checkpoint(tmp_path / "a.pt", SSL_RUN, payload)
    assert not list(tmp_path.iterdir())


def test_truncated_missing_and_foreign_files_are_one_line_user_errors(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, SSL_RUN, ssl_payload(torch.nn.Linear(300, 300)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for bad, msg in ((path, "not a readable torch checkpoint"), (tmp_path / "nope.pt", "no such file"),
                     (tmp_path, "is a directory")):
        with pytest.raises(UserError, match=msg) as e:
            load_checkpoint(bad, SSL_RUN, "--init")
        assert "\n" not in str(e.value) and "index" not in str(e.value)
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(UserError, match="not a readable torch checkpoint"):
        load_checkpoint(text, SSL_RUN, "--init")
    torch.save({"weights": 1}, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="not a laplacedrl checkpoint"):
        load_checkpoint(tmp_path / "plain.pt", SSL_RUN)
    torch.save({"format": SSL_RUN, "version": 1}, tmp_path / "old.pt")
    with pytest.raises(UserError, match="format version 1"):
        load_checkpoint(tmp_path / "old.pt", SSL_RUN)


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"a": 1})

    class Boom:
        pass
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": Boom()})   # fails while serialising
    assert '"a": 1' in path.read_text()
    assert len(list(tmp_path.iterdir())) == 1


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_json(tmp_path / "m.json", {"b": 2, "a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o640
    assert list((tmp_path / "m.json").read_text().split('"')[1]) == ["b"]   # the caller's key order


# ============ the schedule ============
def test_cosine_lr_closed_form():
    assert cosine_lr(0.03, 0, 100) == pytest.approx(0.03)
    assert cosine_lr(0.03, 55, 100) == pytest.approx(0.015)        # halfway through total + 10
    assert cosine_lr(0.03, 110, 100) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(0.03, 10, 100) > cosine_lr(0.03, 11, 100)


def schedule(labels, train, classes_batch=100, **kw):
    cfg = SimpleNamespace(batch_size=classes_batch, labeled_batch_size=50, sup_rounds=10, sup_passes=10,
                          epochs=0, num_steps=250_000, max_epochs=0, supervised_only=False)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return make_schedule(cfg, labels, train - labels)


@pytest.mark.parametrize("labels, train, total", [
    (100, 50_000, 260), (4000, 50_000, 277),          # CIFAR-10
    (10_000, 50_000, 310), (20_000, 50_000, 393),     # CIFAR-100 (Mini-ImageNet at 4000 labels: CIFAR-10's row)
])
def test_step_budget_gives_the_published_epoch_totals(labels, train, total):
    """LaplaceNet: epochs = 10 + floor((250000 - floor(labels / 100) * 100) / floor(unlabeled / 50))."""
    s = schedule(labels, train)
    assert s.total == total == 10 + (250_000 - labels // 100 * 100) // ((train - labels) // 50)
    assert s.stop == total and s.steps(0) == 10 * (labels // 100) and s.steps(10) == (train - labels) // 50


def test_limited_compute_stops_at_epoch_100_on_the_full_cosine():
    s = schedule(100, 50_000, max_epochs=100)
    assert (s.total, s.stop) == (260, 100)
    summary = s.summary(0.03)
    # last step of epoch 100 (index 99): epoch 99 + 997/998 of the 270-epoch rampdown
    assert summary["lr_at_last_step"] == pytest.approx(cosine_lr(0.03, 99 + 997 / 998, 260), abs=1e-6)
    assert summary["lr_at_last_step"] == pytest.approx(0.021, abs=5e-4)
    assert summary["steps_run"] == 10 * 10 * 1 + 90 * 998


def test_supervised_rounds_repeat_the_rounds_lr_span_every_pass():
    s = schedule(4000, 50_000)               # 40 steps a pass, 10 passes a round
    assert s.lr(0.03, 3, 0) == s.lr(0.03, 3, 40) == s.lr(0.03, 3, 360) == pytest.approx(cosine_lr(0.03, 3, 277))
    assert s.lr(0.03, 3, 20) == pytest.approx(cosine_lr(0.03, 3.5, 277))
    assert s.lr(0.03, 12, 460) == pytest.approx(cosine_lr(0.03, 12.5, 277))


def test_fewer_labels_than_a_batch_and_explicit_epochs():
    s = schedule(40, 1000, epochs=7)
    assert (s.lab_batch, s.pass_steps, s.total) == (40, 1, 17)


# ============ seeds and streams ============
def test_derived_seeds_do_not_collide():
    seeds = {derive_seed(s, p, i, r) for s in range(3) for p in PHASES for i in range(40) for r in range(8)}
    assert len(seeds) == 3 * len(PHASES) * 40 * 8
    assert derive_seed(0, "epoch", 0, 7) != derive_seed(0, "epoch", 1, 0)
    assert derive_seed(5, "labeled", 2, 1) == derive_seed(5, "labeled", 2, 1) < 2**63
    with pytest.raises(ValueError, match="unknown seed phase"):
        derive_seed(0, "nope")


def perm_order(n):
    return lambda epoch, pass_index, rng: rng.permutation(n)


def take(stream, k):
    out = []
    for batch in stream:
        out.append(batch)
        if len(out) == k:
            return out
    return out


def test_stream_is_a_function_of_seed_epoch_and_rank():
    a = BatchStream(perm_order(7), 5, seed=1, stream="labeled", endless=True)
    b = BatchStream(perm_order(7), 5, seed=1, stream="labeled", endless=True)
    a.set_epoch(3), b.set_epoch(3)
    first = take(a, 6)
    assert first == take(b, 6)                       # same seed and epoch: the same batches
    b.set_epoch(4)
    assert take(b, 6) != first                       # another epoch: another order
    r1 = BatchStream(perm_order(7), 5, seed=1, stream="labeled", rank=1, endless=True)
    r1.set_epoch(3)
    assert take(r1, 6) != first
    # endless: 6 batches of 5 from 7 images run across reshuffles, each image every pass
    positions = [p for batch in first for p, _ in batch]
    assert len(positions) == 30 and sorted(positions[:7]) == list(range(7))


def test_stream_skip_resumes_in_the_middle():
    s = BatchStream(perm_order(10), 3, seed=0, stream="pretrain-data", endless=True)
    whole = take(s, 9)
    s.set_epoch(0, skip=4)
    assert take(s, 5) == whole[4:]


def test_finite_stream_drops_the_last_incomplete_batch():
    s = BatchStream(lambda e, p, rng: np.arange(10), 4, seed=0, stream="unlabeled")
    assert [[p for p, _ in b] for b in s] == [[0, 1, 2, 3], [4, 5, 6, 7]]


class Noisy(torch.utils.data.Dataset):
    """An item drawn from torch's RNG, as an augmentation would."""

    def __len__(self):
        return 10

    def __getitem__(self, j):
        return torch.rand(3), j


@pytest.mark.parametrize("workers", [0, 2])
def test_persistent_loader_gives_the_same_batches_with_any_worker_count(workers):
    def epochs(w):
        s = BatchStream(perm_order(10), 4, seed=3, stream="labeled", endless=True)
        loader = make_loader(SeededItems(Noisy()), w, "cpu", batch_sampler=s)
        out = []
        for e in range(3):                         # one loader, its workers kept across epochs
            s.set_epoch(e)
            out.append([(x, i) for (x, i), _ in zip(loader, range(4))])
        close_loader(loader)
        return out
    ref, got = epochs(0), epochs(workers)
    for e_ref, e_got in zip(ref, got):
        for (xa, ia), (xb, ib) in zip(e_ref, e_got):
            assert torch.equal(ia, ib) and torch.equal(xa, xb)
    before = torch.random.get_rng_state()
    SeededItems(Noisy())[(0, 123)]
    assert torch.equal(before, torch.random.get_rng_state())   # the caller's stream is untouched


def test_worker_count_auto_never_exceeds_the_cpus():
    assert loader_workers(-1) == min(8, usable_cpus())
    assert loader_workers(0) == 0 and loader_workers(16) == 16      # explicit requests are honoured


# ============ metrics ============
def test_topk_and_mixup_loss():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1, -2], [0.0, 1.0, 2.0, 3.0, 4, 5]])
    assert topk_correct(logits, torch.tensor([1, 0])) == [0, 1]
    assert topk_correct(logits, torch.tensor([0, 5])) == [2, 2]
    lg = torch.randn(4, 2, 3)
    y = torch.tensor([0, 1, 2, 0])
    perm = torch.tensor([1, 0, 3, 2])
    plain = mixup_cross_entropy(lg, y)
    mixed = mixup_cross_entropy(lg, y, 0.3, perm)
    other = mixup_cross_entropy(lg, y[perm])
    assert torch.allclose(mixed, 0.3 * plain + 0.7 * other)
    assert plain.shape == (4, 2)
    ref = torch.nn.functional.cross_entropy(lg[1, 0:1], y[1:2])
    assert math.isclose(float(plain[1, 0]), float(ref), rel_tol=1e-6)


def test_summary_leads_with_the_headline_numbers():
    hist = [{"test_top1": v, "pseudo_label_acc": p} for v, p in
            [(10, None), (50, 60), (40, 70), (30, 80), (20, 85), (60, 90)]]
    m = summarize(hist, schedule(100, 1000, epochs=8), 3)
    assert (m["test_top1"], m["test_top1_best"], m["pseudo_label_acc"]) == (60, 60, 90)
    assert m["test_top1_last5"] == pytest.approx((50 + 40 + 30 + 20 + 60) / 5)
    assert (m["epochs_done"], m["epochs_total"], m["seed"], m["t"]) == (6, 18, 3, None)
    keys = list(m)
    assert keys[0] == "test_top1" and keys[-1] == "history"


# ---------------------------------------------------------------------------------------------------
# One source of randomness

DIGITS_50_SEED0 = [18, 39, 45, 58, 119, 134, 148, 154, 183, 188, 204, 281, 289, 298, 345, 373, 401, 442, 460,
                   494, 506, 509, 537, 543, 552, 571, 583, 601, 615, 714, 775, 788, 843, 911, 917, 918, 928,
                   940, 978, 1029, 1079, 1115, 1126, 1131, 1214, 1219, 1231, 1263, 1265, 1289]


def test_existing_label_splits_do_not_change():
    """The digits 50-label split of seed 0, as every earlier version drew it."""
    from laplacedrl.data import balanced_split, load_dataset
    train, _, spec = load_dataset("digits")
    assert balanced_split(train.targets, 50, spec.num_classes, 0).tolist() == DIGITS_50_SEED0


def test_label_split_pass_order_and_subset_draw_are_different_streams():
    """numpy makes default_rng(s) and default_rng([s, 0]) one stream: the label split, the first
    pretraining pass and (seed 0) the --train-subset draw must not share it."""
    import numpy as np

    from laplacedrl.data.datasets import CARVE_SEED, carve
    from laplacedrl.data.datasets import ImageSet as Stub
    from laplacedrl.engine.distributed import epoch_permutation
    from laplacedrl.engine.seeds import split_rng
    n = 1000
    for seed in (0, 1, 7):
        split_order = split_rng(seed).permutation(n)
        first_pass = epoch_permutation(n, seed, 0)
        assert not np.array_equal(first_pass, split_order)
        assert not np.array_equal(first_pass, np.random.default_rng([seed, 0]).permutation(n))
        assert not np.array_equal(first_pass, epoch_permutation(n, seed, 1))       # passes differ too
    stub = Stub(np.zeros(n, dtype=np.int64), ["a"], [str(i) for i in range(n)])
    train, held_out, _ = carve(stub, stub, val_images=10)
    assert not np.array_equal(np.sort(held_out.indices), np.sort(split_rng(CARVE_SEED).permutation(n)[:10]))
    assert not np.array_equal(np.sort(held_out.indices), np.sort(epoch_permutation(n, CARVE_SEED, 0)[:10]))


def test_no_random_draw_bypasses_the_seeds_module():
    import re
    root = Path(__file__).resolve().parent.parent / "laplacedrl"
    pattern = re.compile(r"default_rng\(|manual_seed\(|np\.random\.seed\(|random\.seed\(")
    offenders = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py") if p.name != "seeds.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders
