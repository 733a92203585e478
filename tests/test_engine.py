import math

import pytest
import torch

from laplacedrl.engine.checkpoint import (DRL_FORMAT, SSL_FORMAT, atomic_save, atomic_write_json,
                                          load_checkpoint, load_state)
from laplacedrl.errors import UserError
from laplacedrl.ssl.laplacenet import Schedule, cosine_lr, epochs_from_steps, summarize, topk_correct
from laplacedrl.ssl.mixup import mixup_cross_entropy


def test_checkpoint_round_trip_and_format_checks(tmp_path):
    net = torch.nn.Linear(3, 2)
    path = tmp_path / "last.pt"
    atomic_save({"format": SSL_FORMAT, "version": 1, "model": net.state_dict()}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]   # no temp file left behind
    ck = load_checkpoint(path, SSL_FORMAT)
    other = torch.nn.Linear(3, 2)
    load_state(other, ck["model"], "x")
    x = torch.randn(4, 3)
    assert torch.equal(net(x), other(x))
    with pytest.raises(UserError, match="is a laplacedrl.ssl checkpoint, expected laplacedrl.drl"):
        load_checkpoint(path, DRL_FORMAT, "--init")
    with pytest.raises(UserError, match="does not match the model architecture"):
        load_state(torch.nn.Linear(3, 5), ck["model"], "x")


def test_truncated_and_missing_checkpoints_are_user_errors(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_save({"format": SSL_FORMAT, "version": 1, "w": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_checkpoint(path, SSL_FORMAT, "--init")
    with pytest.raises(UserError, match="no such file"):
        load_checkpoint(tmp_path / "nope.pt", SSL_FORMAT, "--init")
    (tmp_path / "plain.pt").write_bytes(b"")
    torch.save({"weights": 1}, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="not a laplacedrl checkpoint"):
        load_checkpoint(tmp_path / "plain.pt", SSL_FORMAT)


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"a": 1})

    class Boom:
        pass
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": Boom()})   # fails while serialising
    assert path.read_text().strip().startswith("{") and '"a": 1' in path.read_text()
    assert len(list(tmp_path.iterdir())) == 1


def test_cosine_lr_closed_form():
    assert cosine_lr(0.03, 0, 100) == pytest.approx(0.03)
    assert cosine_lr(0.03, 55, 100) == pytest.approx(0.015)        # halfway through total + 10
    assert cosine_lr(0.03, 110, 100) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(0.03, 10, 100) > cosine_lr(0.03, 11, 100)


def test_epochs_from_steps_matches_laplacenet_formula():
    # 4000 labels, batch 100: ini = 40 * 100 steps; |unlabeled| = 46000, 50 per step -> 920 steps
    assert epochs_from_steps(400_000, 4000, 920) == (400_000 - 4000) // 920
    assert epochs_from_steps(10, 4000, 920) == 0
    s = Schedule(10, 40, 5, 920)
    assert s.total == 15 and s.phase(9) == "sup" and s.phase(10) == "ssl" and s.steps(12) == 920


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


def test_summary_reports_last_best_and_last5():
    hist = [{"test_top1": v, "pseudo_label_acc": p} for v, p in
            [(10, None), (50, 60), (40, 70), (30, 80), (20, 85), (60, 90)]]
    m = summarize(hist, 8, 3)
    assert (m["test_top1"], m["test_top1_best"], m["pseudo_label_acc"]) == (60, 60, 90)
    assert m["test_top1_last5"] == pytest.approx((50 + 40 + 30 + 20 + 60) / 5)
    assert (m["epochs_done"], m["epochs_total"], m["seed"], m["t"]) == (6, 8, 3, None)
