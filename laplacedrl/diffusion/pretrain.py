"""The DRL pretraining recipe behind ``pretrain_drl.py``: data -> models -> loss -> optimiser -> loop.

``ckpt.pt`` (and the resumable ``last.pt``, same format) is a dict of tensors and primitives::

    format "laplacedrl.drl", version 1, config (resolved, plain dict), step,
    objective ("drl" | "vdrl" | "mixup-drl" | "ae"), sde (sde.to_dict()),
    dataset {name, channels, image_size},
    encoder_arch (build_model(**encoder_arch) rebuilds it), encoder (EMA weights),
    score_net_arch / score_net (EMA weights; None for ae), extra_arch / extra (VDRL head or AE
    decoder, EMA weights; None otherwise),
    train {encoder, score_net, extra, optimizer, ema}: the raw training state for resuming.

``train_ssl.py --init`` reads ``encoder_arch``, ``encoder`` and ``sde`` only.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from laplacedrl import config as C
from laplacedrl.data import AugmentedSubset, load_dataset, make_transform
from laplacedrl.diffusion.ema import ExponentialMovingAverage
from laplacedrl.diffusion.losses import (ae_loss, drl_loss, encode, mixup_drl_loss, model_score,
                                         sample_t, vdrl_loss)
from laplacedrl.diffusion.sampling import euler_maruyama_sampler, pc_sampler
from laplacedrl.diffusion.sde import VESDE, VPSDE
from laplacedrl.engine.checkpoint import DRL_FORMAT, load_state
from laplacedrl.engine.distributed import (all_reduce_mean, barrier, cleanup, epoch_shard,
                                           init_distributed, wrap_ddp)
from laplacedrl.engine.run import (Precision, RunDir, check_finite, log, prepare_model, run_name,
                                   seed_everything)
from laplacedrl.errors import UserError
from laplacedrl.models import arch_record, build_model
from laplacedrl.models.score_net import ConvDecoder, ScoreNet, VariationalHead


def make_sde(cfg):
    return VESDE(cfg.sigma_min, cfg.sigma_max) if cfg.sde == "ve" else VPSDE(cfg.beta_min, cfg.beta_max)


class DRLModels(nn.Module):
    """Everything pretraining optimises: the encoder, the score net (not for ae), a VDRL head or an
    AE decoder. One module, so one optimiser, one EMA and one state_dict cover them."""

    def __init__(self, cfg, spec, sde):
        super().__init__()
        self.cfg, self.spec, self.sde = cfg, spec, sde     # plain attributes, not state
        self.objective = cfg.objective
        self.encoder = build_model(cfg.arch, spec.num_classes, spec.channels, spec.image_size,
                                   time_cond=True)
        self.encoder.head.requires_grad_(False)   # the classifier head plays no part in pretraining
        feat = self.encoder.feature_dim
        code_dim = cfg.code_dim or feat
        if cfg.objective != "vdrl" and code_dim != feat:
            raise UserError(f"--code-dim applies to vdrl only (the drl code is the {feat}-d feature)")
        self.extra = (VariationalHead(feat, code_dim) if cfg.objective == "vdrl" else
                      ConvDecoder(feat, spec.channels, spec.image_size) if cfg.objective == "ae" else None)
        self.score_net = None if cfg.objective == "ae" else ScoreNet(
            spec.channels, spec.image_size, cfg.base_channels, cfg.ch_mult, cfg.num_res_blocks,
            cfg.attn_resolutions, code_dim, cfg.emb_dim)

    def forward(self, x0: torch.Tensor, t: torch.Tensor) -> dict:
        """The objective's loss dict for clean images x0 (B, C, H, W) at times t (B,)."""
        cfg, sde, spec = self.cfg, self.sde, self.spec
        enc, net = self.encoder, self.score_net
        if cfg.objective == "drl":
            return drl_loss(enc, net, sde, x0, t, l1_weight=cfg.l1_weight)
        if cfg.objective == "mixup-drl":
            return mixup_drl_loss(enc, net, sde, x0, t, alpha=cfg.mixup_alpha, l1_weight=cfg.l1_weight)
        if cfg.objective == "vdrl":
            return vdrl_loss(enc, self.extra, net, sde, x0, t, kl_weight=cfg.kl_weight)
        return ae_loss(enc, self.extra, sde, x0, t, spec.mean, spec.std, l1_weight=cfg.l1_weight)

    def code(self, sde, x0, t):
        """The code the score net is conditioned on (VDRL: the mean of q(z|x0))."""
        feat = encode(self.encoder, sde, x0, t)
        return self.extra(feat)[0] if self.objective == "vdrl" else feat


def warmup_lr(base_lr: float, step: int, warmup: int) -> float:
    """score-SDE's linear warm-up: ``lr * min(1, (step + 1) / warmup)``."""
    return base_lr * min(1.0, (step + 1) / max(warmup, 1))


def export(models: DRLModels, ema: ExponentialMovingAverage, opt, cfg, sde, spec, step) -> dict:
    """The checkpoint dict (see the module docstring); exported weights are the EMA weights.

    state_dict() returns the live tensors, so the EMA weights are copied out before the raw ones
    are put back (otherwise the "EMA" entries would silently hold the raw weights).
    """
    def snapshot(module):
        return None if module is None else {k: v.detach().clone() for k, v in module.state_dict().items()}
    train = {"models": snapshot(models), "optimizer": opt.state_dict(), "ema": ema.state_dict()}
    ema.store(models.parameters())
    ema.copy_to(models.parameters())
    out = {"step": step, "objective": cfg.objective, "sde": sde.to_dict(),
           "dataset": {"name": cfg.dataset, "channels": spec.channels, "image_size": spec.image_size},
           "encoder_arch": arch_record(models.encoder), "encoder": snapshot(models.encoder),
           "score_net_arch": models.score_net.args if models.score_net is not None else None,
           "score_net": snapshot(models.score_net), "extra": snapshot(models.extra),
           "train": train}
    out = {k: _plain(v) for k, v in out.items()}
    ema.restore(models.parameters())
    return out


def _plain(v):
    """Tuples -> lists, so a checkpoint loads under ``weights_only=True``."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return list(v) if isinstance(v, tuple) else v


def pretrain(cfg: C.DRLConfig) -> dict:
    info, device = init_distributed(cfg.device)
    ws, main = info.world_size, info.is_main
    if cfg.batch_size % ws:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the {ws} processes")
    seed_everything(cfg.seed)

    # ============ data: every training image, labels unused ============
    train, test, spec = load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    run = RunDir(cfg, DRL_FORMAT, run_name("drl", cfg, [cfg.dataset, cfg.objective, cfg.sde,
                                                      f"s{cfg.seed}"]), main)
    barrier(info)
    ckpt = run.resume_state()
    run.write_config()
    evalt = make_transform(spec, "eval")
    data = AugmentedSubset(train, np.arange(len(train)), evalt)
    if cfg.batch_size > len(data):
        raise UserError(f"--batch-size {cfg.batch_size} exceeds the {len(data)} training images")

    # ============ models, SDE, optimiser, EMA, resume ============
    sde = make_sde(cfg)
    models, _ = prepare_model(DRLModels(cfg, spec, sde), cfg, device)
    fwd = wrap_ddp(models, info, device)
    fwd = torch.compile(fwd) if cfg.compile else fwd
    prec = Precision(cfg.amp, device)
    opt = torch.optim.Adam(models.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    ema = ExponentialMovingAverage(models.parameters(), decay=cfg.ema)
    step = 0
    if ckpt:
        load_state(models, ckpt["train"]["models"], f"run checkpoint {run.last}")
        opt.load_state_dict(ckpt["train"]["optimizer"])
        ema.load_state_dict(ckpt["train"]["ema"])
        step = ckpt["step"]
    writer = run.writer(purge_step=step + 1 if step else None)
    n_params = sum(p.numel() for p in models.parameters())
    log.info(f"device={device} dataset={cfg.dataset} train={len(train)} objective={cfg.objective} "
             f"sde={cfg.sde} t_sampling={cfg.t_sampling} params={n_params / 1e6:.2f}M "
             f"iters={cfg.iters} run_dir={run.path}" + (f" resuming at step {step}" if step else ""))

    def batches(epoch):
        while True:   # each rank: its slice of one (seed, epoch) permutation, any world size
            yield from DataLoader(data, cfg.batch_size // ws, drop_last=True,
                                  sampler=epoch_shard(len(data), cfg.seed, epoch, info).tolist(),
                                  num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
            epoch += 1

    # ============ the loop ============
    start = step
    stream = batches(step * cfg.batch_size // len(data))   # resume: continue the epoch order
    seed_everything(cfg.seed + step * 7 + info.rank)
    bar = tqdm(range(step, cfg.iters), desc="pretrain", disable=not (cfg.progress and main),
               initial=step, total=cfg.iters)
    sums, t0, metrics = {}, time.time(), {}
    models.train()
    for step in bar:
        x0, _ = next(stream)
        x0 = x0[:, 0].to(device, non_blocking=True)                # (B, C, H, W)
        if cfg.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        if spec.hflip:                                              # score-SDE's random flip
            flip = torch.rand(x0.shape[0], device=device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = sample_t(x0.shape[0], cfg.t_sampling, sde, device=device)
        for g in opt.param_groups:
            g["lr"] = warmup_lr(cfg.lr, step, cfg.warmup)
        with prec.autocast():
            out = fwd(x0, t)
        opt.zero_grad(set_to_none=True)
        prec.backward(out["loss"])
        prec.unscale(opt)
        gnorm = nn.utils.clip_grad_norm_(models.parameters(), cfg.grad_clip)
        prec.step(opt)
        ema.update(models.parameters())
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float().to(device)
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + gnorm.detach()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.iters:
            n = done % cfg.log_every or cfg.log_every
            means = {k: float(all_reduce_mean(v.float(), info)) / n for k, v in sums.items()}
            check_finite(means["loss"], f"pretraining loss at step {done}", run.path)
            for k, v in means.items():
                writer.add_scalar(f"pretrain/{k}", v, done)
            writer.add_scalar("pretrain/lr", opt.param_groups[0]["lr"], done)
            bar.set_postfix(loss=f"{means['loss']:.3f}")
            metrics = {"step": done, "iters": cfg.iters, **means,
                       "seconds": time.time() - t0}
            sums = {}
        if done % cfg.ckpt_every == 0 or done == cfg.iters:
            if main:
                run.save(export(models, ema, opt, cfg, sde, spec, done))
                run.write_metrics(metrics)
            barrier(info)
    final = run.path / "ckpt.pt"
    if main and (start < cfg.iters or not final.exists()):
        run.save(export(models, ema, opt, cfg, sde, spec, cfg.iters), final)
        log.info(f"wrote {final} (step {cfg.iters}, final loss {metrics.get('loss', float('nan')):.4f})")
    elif start >= cfg.iters:
        log.info(f"run already finished: {final}")

    # ============ conditional samples (paper Fig. 6) ============
    if cfg.sample and main:
        if models.score_net is None:
            raise UserError("--sample needs a score model; the ae objective has none")
        ema.copy_to(models.parameters())
        path = draw_samples(models, sde, test, evalt, spec, cfg, device, writer, run.path)
        log.info(f"wrote {path}")
    writer.close()
    barrier(info)
    cleanup(info)
    return {"ckpt": str(run.path / "ckpt.pt"), "run_dir": str(run.path), **metrics}


@torch.no_grad()
def draw_samples(models, sde, test, evalt, spec, cfg, device, writer, run_dir):
    """Samples conditioned on the codes of the first test images: row 1 the test images, then
    ``--sample`` / n rows of samples per image, written to samples.png and TensorBoard."""
    from torchvision.utils import make_grid, save_image
    models.eval()
    n_cond = min(8, len(test), cfg.sample)
    per = max(1, cfg.sample // n_cond)
    x_cond = torch.stack([evalt(test.pil(i)) for i in range(n_cond)]).to(device)  # (n, C, H, W)
    x_rep = x_cond.repeat(per, 1, 1, 1)

    def score_fn(x, t):
        # the code is time-conditioned: at each reverse step, E(x_cond, t) at that step's t
        return model_score(models.score_net, sde, x, t, models.code(sde, x_rep, t))

    sampler = pc_sampler if cfg.sampler == "pc" else euler_maruyama_sampler
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    samples = sampler(score_fn, sde, x_rep.shape, steps=cfg.sample_steps, generator=g, device=device)
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    grid = make_grid(((torch.cat([x_cond, samples]) * std + mean).clamp(0, 1)).cpu(), nrow=n_cond,
                     padding=1, pad_value=1.0)
    path = run_dir / "samples.png"
    save_image(grid, path)
    writer.add_image("samples/conditional", grid, cfg.iters)
    return path
