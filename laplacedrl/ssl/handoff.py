"""Hand-off options: what may be done to a classifier between pretraining and LaplaceNet.

The published hand-off loads the pretrained encoder as it is and trains it with the same SGD as a
fresh network. A DRL-pretrained body (pretrained by Adam without weight decay) arrives with grown
weights and large activations; its relative gradients ``||g|| / ||w||`` are then an order of
magnitude smaller than a fresh network's, and it barely moves in the supervised rounds. These
options act on that; each is off by default (the published hand-off):

* :func:`body_param_groups` -- a learning-rate multiplier for the body (every parameter but the
  classification head and t): ``--body-lr-mult``;
* :func:`reestimate_bn` -- BatchNorm running statistics recomputed on the training images after
  each epoch, so that the graph step's features and the evaluation use statistics of the data they
  see rather than the running averages of the last labeled batches: ``--bn-reestimate``;
* :func:`reset_norms` -- the body's conv weights scaled back to a fresh initialisation's norms, the
  BatchNorm statistics scaled with them, so that the network computes the same function in eval
  mode (only its gradients change): ``--norm-reset``;
* :func:`shrink_perturb` -- Ash & Adams' "shrink and perturb" (NeurIPS 2020):
  ``w <- shrink * w + perturb * w_fresh`` for the body's conv and linear parameters:
  ``--shrink`` / ``--perturb``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from laplacedrl.engine.distributed import all_reduce_mean
from laplacedrl.models.wrn import WideResNet

BN = nn.modules.batchnorm._BatchNorm


def unwrap(model: nn.Module) -> nn.Module:
    """The backbone of a classifier: inside DDP / torch.compile wrappers and a LearnableTime."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return getattr(model, "backbone", model)


def is_body(name: str) -> bool:
    """A parameter of the pretrained body: not the classification head, not t."""
    name = name.removeprefix("backbone.")
    return not (name.startswith("head.") or name == "t_logit")


def body_param_groups(named_params, body_lr_mult: float, base: dict) -> list:
    """Split one optimiser parameter group's ``named_params`` into body and the rest, the body with
    ``lr_mult = body_lr_mult`` (the training loop sets ``lr = schedule lr * lr_mult``); ``base``
    holds the group's other settings (e.g. its weight decay). One group as before when the
    multiplier is 1, so optimiser states of earlier runs still load."""
    params = list(named_params)
    if body_lr_mult == 1.0:
        return [{**base, "params": [p for _, p in params]}] if params else []
    body = [p for n, p in params if is_body(n)]
    rest = [p for n, p in params if not is_body(n)]
    return [g for g in ({**base, "params": body, "lr_mult": body_lr_mult}, {**base, "params": rest})
            if g["params"]]


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches, device, info=None) -> int:
    """Recompute every BatchNorm's running mean and variance from ``batches`` of images: each BN's
    statistics become the average over the batches of its input's batch mean and (unbiased)
    variance, the rest of the network in eval mode (no dropout). Averaged over ranks under
    torch.distributed. ``batches`` yields (x, ...) with x (B, C, H, W) or (B, 1, C, H, W) (a
    loader of the eval transform). Returns the number of images seen (this rank)."""
    bns = [m for m in model.modules() if isinstance(m, BN)]
    was_training = model.training
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None                  # cumulative average over the batches
        m.train()
    seen = 0
    for x, *_ in batches:
        x = x[:, 0] if x.dim() == 5 else x
        model(x.to(device, non_blocking=True))
        seen += x.shape[0]
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
        if info is not None:
            m.running_mean.copy_(all_reduce_mean(m.running_mean, info))
            m.running_var.copy_(all_reduce_mean(m.running_var, info))
    model.train(was_training)
    return seen


def _norm(w: torch.Tensor) -> float:
    return float(w.detach().double().norm())


def _scale_conv(conv: nn.Conv2d, weight_factor: float, bias_factor: float) -> None:
    conv.weight.mul_(weight_factor)
    if conv.bias is not None:
        conv.bias.mul_(bias_factor)


def _scale_bn_input(bn: BN, c: float) -> None:
    """The BN's input is now ``c`` times what it was: its running statistics follow."""
    bn.running_mean.mul_(c)
    bn.running_var.mul_(c * c)


@torch.no_grad()
def reset_norms(model: nn.Module, fresh: nn.Module) -> dict:
    """Scale a WRN body's conv weights to the norms of ``fresh`` (the same architecture, freshly
    initialised) without changing what the network computes in eval mode. Returns the factors.

    A pre-activation WRN has two kinds of conv. ``conv1`` of a block feeds BN2 alone: it takes the
    factor ``c = ||w_fresh|| / ||w||`` (weight, bias and, when the time embedding is added before
    BN2, the noise projection), and BN2's running mean and variance are scaled by c and c^2. The
    other convs write the residual stream: between two blocks that change the shape, the stem (or
    the first block's conv2 and 1x1 shortcut) and every conv2 add into one stream, which only
    BatchNorms read (BN1 of the blocks, the final BN) and the next 1x1 shortcut. Such a stream takes
    one factor, ``sqrt(sum ||w_fresh||^2 / sum ||w||^2)`` over its convs; the BNs reading it scale
    their statistics, and the shortcut reading it divides its weight by the factor. Eval-mode outputs
    are unchanged up to BatchNorm's epsilon; training-mode outputs too (batch statistics).
    """
    body, ref = unwrap(model), unwrap(fresh)
    if not isinstance(body, WideResNet):
        raise ValueError("--norm-reset is defined for WRN backbones (wrn-<depth>-<width>)")
    blocks, ref_blocks = list(body.blocks), list(ref.blocks)
    # streams: lists of (conv, fresh conv) that write one residual stream; a reshaping block opens one
    streams, owner = [[(body.stem, ref.stem)]], []
    for b, rb in zip(blocks, ref_blocks):
        if b.shortcut is not None:
            streams.append([(b.shortcut, rb.shortcut)])
        streams[-1].append((b.conv2, rb.conv2))
        owner.append(len(streams) - 1)
    factors = [math.sqrt(sum(_norm(r.weight) ** 2 for _, r in s) / sum(_norm(c.weight) ** 2 for c, _ in s))
               for s in streams]
    _scale_conv(body.stem, factors[0], factors[0])
    stream_in = factors[0]                           # the factor of the stream entering the next block
    report = {"stream": factors, "conv1": []}
    for b, rb, k in zip(blocks, ref_blocks, owner):
        _scale_bn_input(b.bn1, stream_in)
        c1 = _norm(rb.conv1.weight) / _norm(b.conv1.weight)
        _scale_conv(b.conv1, c1, c1)
        if b.before_bn and b.noise_proj is not None:
            b.noise_proj.weight.mul_(c1)
            b.noise_proj.bias.mul_(c1)
        _scale_bn_input(b.bn2, c1)
        report["conv1"].append(c1)
        ck = factors[k]
        if b.shortcut is not None:
            _scale_conv(b.shortcut, ck / stream_in, ck)
        _scale_conv(b.conv2, ck, ck)
        stream_in = ck
    _scale_bn_input(body.bn_out, stream_in)
    return report


@torch.no_grad()
def shrink_perturb(model: nn.Module, fresh: nn.Module, shrink: float, perturb: float) -> int:
    """``w <- shrink * w + perturb * w_fresh`` for every conv and linear parameter of the body (the
    head and t untouched; BatchNorm's affine parameters and statistics untouched). Returns the number
    of tensors changed."""
    ref = dict(unwrap(fresh).named_modules())
    n = 0
    for name, m in unwrap(model).named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not name.startswith("head"):
            for pname, p in m.named_parameters(recurse=False):
                p.mul_(shrink).add_(getattr(ref[name], pname), alpha=perturb)
                n += 1
    return n
