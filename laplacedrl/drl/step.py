"""One DRL pretraining step, and the training state it updates.

:func:`pretrain_step` is the whole step (times, warm-up rate, forward, backward, clipping, Adam, EMA);
the recipe's loop and ``benchmarks/throughput.py`` both call it, so what the benchmark times is what
the CLI runs.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from laplacedrl.diffusion.ema import ExponentialMovingAverage
from laplacedrl.diffusion.losses import sample_t
from laplacedrl.drl.models import DRLModels
from laplacedrl.engine.checkpoint import load_state
from laplacedrl.engine.distributed import wrap_ddp
from laplacedrl.engine.run import Precision, RunDir, prepare_model


def warmup_lr(base_lr: float, step: int, warmup: int) -> float:
    """score-SDE's linear warm-up: ``lr * min(1, step / warmup)`` (0 at the first step)."""
    return base_lr * min(1.0, step / warmup) if warmup > 0 else base_lr


@dataclasses.dataclass
class Training:
    """What the loop updates: the models (and their DDP / compiled forward), optimiser, EMA, step."""

    models: DRLModels
    fwd: nn.Module
    opt: torch.optim.Optimizer
    ema: ExponentialMovingAverage
    prec: Precision
    step: int
    writer: object = None
    labeled: object = None        # the pretraining images' indices (None: all), for exports
    resumed: dict = None          # rng and log window of the checkpoint resumed from (None: a new run)


def new_training(models: DRLModels, cfg, info, device) -> Training:
    """Models on the device (wrapped for DDP and compiled if asked), Adam and the EMA, at step 0."""
    models = prepare_model(models, cfg, device)
    fwd = wrap_ddp(models, info, device, find_unused_parameters=cfg.objective == "ae")
    fwd = torch.compile(fwd) if cfg.compile else fwd
    opt = torch.optim.Adam(models.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    ema = ExponentialMovingAverage(models.parameters(), decay=cfg.ema)
    return Training(models, fwd, opt, ema, Precision(cfg.amp, device), 0)


def open_training(models: DRLModels, cfg, run: RunDir, info, device) -> Training:
    """:func:`new_training`, resumed from the run dir's ``last.pt`` if present, with TensorBoard."""
    ckpt = run.resume_state()
    tr = new_training(models, cfg, info, device)
    if ckpt:
        load_state(tr.models, ckpt["models"], f"run checkpoint {run.last}")
        tr.opt.load_state_dict(ckpt["optimizer"])
        tr.ema.load_state_dict(ckpt["ema"])
        tr.step = ckpt["step"]
        tr.resumed = {"rng": ckpt["rng"], "window": ckpt["window"]}
    tr.writer = run.writer(purge_step=tr.step + 1 if tr.step else None)
    return tr


def rng_state(device) -> dict:
    """This process's torch generator states (the CPU one, and the device's on a GPU)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def pretrain_step(tr: Training, x0: torch.Tensor, cfg, sde) -> dict:
    """One optimiser step on clean images ``x0`` (B, C, H, W) already on the device.

    Times ``t`` per image by ``cfg.t_sampling``, the warm-up rate of step ``tr.step``, the objective's
    loss, gradients clipped to ``cfg.grad_clip``, Adam, then the EMA; ``tr.step`` advances by one.
    Returns the objective's terms and ``grad_norm`` (detached scalars on the device).
    """
    if cfg.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    t = sample_t(x0.shape[0], cfg.t_sampling, sde, device=x0.device)
    for g in tr.opt.param_groups:
        g["lr"] = warmup_lr(cfg.lr, tr.step, cfg.warmup)
    with tr.prec.autocast():
        out = tr.fwd(x0, t)
    tr.opt.zero_grad(set_to_none=True)
    tr.prec.backward(out["loss"])
    tr.prec.unscale(tr.opt)
    gnorm = nn.utils.clip_grad_norm_(tr.models.parameters(), cfg.grad_clip)
    tr.prec.step(tr.opt)
    tr.ema.update(tr.models.parameters())
    tr.step += 1
    return {**{k: v.detach() for k, v in out.items()}, "grad_norm": gnorm.detach()}
