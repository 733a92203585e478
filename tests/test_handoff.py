"""The hand-off options (laplacedrl.ssl.handoff) against what each promises."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import pretrain_drl
import train_ssl
from laplacedrl.engine.run import Precision
from laplacedrl.models import LearnableTime, build_model
from laplacedrl.diffusion.sde import VESDE
from laplacedrl.ssl.epoch import train_epoch
from laplacedrl.ssl.handoff import is_body, reestimate_bn, reset_norms, shrink_perturb
from laplacedrl.ssl.model import make_optimizer

CPU = torch.device("cpu")


def timed_wrn(seed, t_bias="before_bn"):
    torch.manual_seed(seed)
    body = build_model("wrn-16-1", 10, 1, 8, time_cond=True, t_bias=t_bias)
    return LearnableTime(body, VESDE(0.01, 50.0), 0.5)


def pretrained_like(model, x):
    """Weights grown unevenly (as after Adam without weight decay) and running statistics of a few
    training-mode batches: the state a pretrained body arrives in."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(1 + 3 * torch.rand((), generator=g))
                m.bias.add_(0.1 * torch.randn(m.bias.shape, generator=g))
        model.train()
        for _ in range(3):
            model(x)
    return model.eval()


@pytest.mark.parametrize("t_bias", ["before_bn", "after_bn"])
def test_norm_reset_keeps_the_eval_function_and_reaches_the_fresh_norms(t_bias):
    x = torch.randn(16, 1, 8, 8)
    model = pretrained_like(timed_wrn(0, t_bias), x)
    fresh = build_model("wrn-16-1", 10, 1, 8, time_cond=True, t_bias=t_bias)
    before_logits, before_feat = model(x)
    report = reset_norms(model, fresh)
    after_logits, after_feat = model(x)
    # equal up to BatchNorm's epsilon (var + eps becomes c^2 var + eps): here below 1e-4
    assert torch.allclose(after_feat, before_feat, rtol=1e-3, atol=3e-4)
    assert torch.allclose(after_logits, before_logits, rtol=1e-3, atol=3e-4)
    assert any(abs(c - 1) > 0.2 for c in report["conv1"] + report["stream"])   # it did rescale
    body = model.backbone
    for b, rb in zip(body.blocks, fresh.blocks):                               # conv1: exactly fresh
        assert math.isclose(b.conv1.weight.norm().item(), rb.conv1.weight.norm().item(), rel_tol=1e-5)
    first = [body.stem, *[b.conv2 for b in body.blocks[:2]]]                   # the first stream: as a whole
    ref = [fresh.stem, *[b.conv2 for b in fresh.blocks[:2]]]
    assert math.isclose(sum(c.weight.norm() ** 2 for c in first).item(),
                        sum(c.weight.norm() ** 2 for c in ref).item(), rel_tol=1e-5)


def test_norm_reset_refuses_a_resnet():
    with pytest.raises(ValueError, match="WRN"):
        reset_norms(build_model("resnet18", 10, 3, 32), build_model("resnet18", 10, 3, 32))


def test_bn_reestimate_gives_the_statistics_of_the_given_images():
    """Each BN's running mean / variance become the mean over the batches of its input's batch mean /
    unbiased variance (the network's other layers in eval mode); eval-mode BN then uses them."""
    model = pretrained_like(timed_wrn(0), torch.randn(16, 1, 8, 8) * 3 + 1)
    images = torch.randn(40, 1, 8, 8)
    batches = [(images[:20], None), (images[20:], None)]
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: inputs.setdefault(name, []).append(a[0]))
             for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    seen = reestimate_bn(model, batches, CPU)
    for h in hooks:
        h.remove()
    assert seen == 40 and not model.training
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            means = [a.mean((0, 2, 3)) for a in inputs[name]]
            vars_ = [a.var((0, 2, 3), unbiased=True) for a in inputs[name]]
            assert torch.allclose(m.running_mean, sum(means) / 2, rtol=1e-4, atol=1e-5), name
            assert torch.allclose(m.running_var, sum(vars_) / 2, rtol=1e-4, atol=1e-5), name
    assert model.backbone.bn_out.momentum == 0.9          # momenta restored


def test_body_lr_reaches_only_the_body():
    """With the body's multiplier 0, an SGD step moves the head and nothing else; with 1 the body moves."""
    x, y = torch.randn(8, 1, 1, 8, 8), torch.randint(0, 10, (8,))
    for mult in (0.0, 1.0):
        model = timed_wrn(0)
        cfg = SimpleNamespace(t_weight_decay=True, body_lr_mult=mult, lr=0.1, momentum=0.0, nesterov=False,
                              weight_decay=0.0)
        opt = make_optimizer(cfg, model)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train_epoch(model, opt, [(x, y, torch.ones(8), 8)], 1, lambda step: 0.1, CPU, Precision("off", CPU),
                    lambda v, n_lab: v)
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        body = {n for n in before if is_body(n)}
        assert {"backbone.head.weight", "backbone.head.bias"} <= moved
        assert not (moved & body) if mult == 0.0 else (moved & body)
    assert len(opt.param_groups) == 1                     # multiplier 1: the published single group


def test_shrink_perturb_mixes_the_body_with_a_fresh_net_and_leaves_the_head():
    model, fresh = timed_wrn(0), timed_wrn(1)
    head = model.backbone.head.weight.detach().clone()
    w = model.backbone.blocks[0].conv1.weight.detach().clone()
    shrink_perturb(model, fresh, 0.5, 0.25)
    assert torch.allclose(model.backbone.blocks[0].conv1.weight, 0.5 * w + 0.25 * fresh.backbone.blocks[0].conv1.weight)
    assert torch.equal(model.backbone.head.weight, head)


@pytest.fixture(scope="module")
def drl_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("handoff") / "drl"
    pretrain_drl.main(["--arch", "wrn-10-1", "--iters", "4", "--warmup", "2", "--batch-size", "16",
                       "--no-progress", "--out", str(out)])
    return out / "ckpt.pt"


def test_every_option_runs_end_to_end_from_an_init_checkpoint(tmp_path, drl_ckpt):
    out = tmp_path / "run"
    m = train_ssl.main(["--init", str(drl_ckpt), "--labels", "30", "--sup-rounds", "1", "--sup-passes", "2",
                        "--epochs", "1", "--aug-num", "1", "--batch-size", "60", "--labeled-batch-size", "20",
                        "--knn", "10", "--no-progress", "--eval-batch-size", "1297", "--body-lr-mult", "3",
                        "--bn-reestimate", "--norm-reset", "--shrink", "0.8", "--perturb", "0.1",
                        "--out", str(out)])
    assert m["epochs_done"] == 2 and m["test_top1"] > 10
