"""The DRL pretraining recipe behind ``pretrain_drl.py``: data -> models -> optimiser -> resume -> loop.

As the published score-SDE code of the DRL paper trains the encoder: batches of the labeled images
of one split (``--pretrain-data labeled``, 4000 labels by default) with LaplaceNet's weak
augmentation, the NCSN++ score net conditioned on the code, Adam with a linear warm-up, gradient
clipping and a parameter EMA. While it trains, ``last.pt`` (format ``laplacedrl.drl-run``) holds
the training state; at the end ``ckpt.pt`` (``laplacedrl.drl``, see
:mod:`laplacedrl.engine.checkpoint`) holds the encoder ``train_ssl.py --init`` needs (raw weights
by default, as published) and the EMA score net for sampling, and ``last.pt`` is removed.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from laplacedrl import config as C
from laplacedrl.data import AugmentedSubset, labeled_indices, load_run_dataset, make_transform
from laplacedrl.data.streams import BatchStream, SeededItems, loader_workers, make_loader
from laplacedrl.diffusion.ema import ExponentialMovingAverage
from laplacedrl.diffusion.losses import ae_loss, drl_loss, mixup_drl_loss, sample_t, vdrl_loss
from laplacedrl.diffusion.sde import VESDE, VPSDE
from laplacedrl.engine.checkpoint import DRL_CKPT, DRL_RUN, load_checkpoint, load_state
from laplacedrl.engine.distributed import (all_reduce_mean, barrier, cleanup, epoch_permutation,
                                           init_distributed, wrap_ddp)
from laplacedrl.engine.run import Precision, RunDir, check_finite, log, prepare_model, run_name
from laplacedrl.engine.seeds import derive_seed, seed_everything
from laplacedrl.errors import UserError
from laplacedrl.models import arch_record, build_model
from laplacedrl.models.score_net import ScoreNet, VariationalHead, score_net_record


def make_sde(cfg):
    return VESDE(cfg.sigma_min, cfg.sigma_max) if cfg.sde == "ve" else VPSDE(cfg.beta_min, cfg.beta_max)


class DRLModels(nn.Module):
    """Everything pretraining optimises: the time-conditioned encoder, the score net (with the
    autoencoder's decoder for ``ae``) and, for VDRL, the head giving q(z | x0). One module, so one
    optimiser, one EMA and one state_dict cover them."""

    def __init__(self, cfg, spec, sde):
        super().__init__()
        self.cfg, self.spec, self.sde = cfg, spec, sde     # plain attributes, not state
        self.encoder = build_model(cfg.arch, spec.num_classes, spec.channels, spec.image_size,
                                   time_cond=True, t_bias=cfg.t_bias)
        self.encoder.head.requires_grad_(False)   # the classifier head plays no part in pretraining
        feat = self.encoder.feature_dim
        code_dim = cfg.code_dim or feat
        if cfg.objective != "vdrl" and code_dim != feat:
            raise UserError(f"--code-dim applies to vdrl only (the drl code is the {feat}-d feature)")
        self.head = VariationalHead(feat, code_dim) if cfg.objective == "vdrl" else None
        try:
            self.score_net = ScoreNet(spec.channels, spec.image_size, cfg.nf, cfg.ch_mult, cfg.num_res_blocks,
                                      cfg.attn_resolutions, cfg.dropout, code_dim,
                                      decoder=cfg.objective == "ae")
        except ValueError as e:
            raise UserError(f"score net for {spec.image_size}x{spec.image_size} images: {e}") from None

    def forward(self, x0: torch.Tensor, t: torch.Tensor) -> dict:
        """The objective's loss dict for clean images x0 (B, C, H, W) at times t (B,)."""
        cfg, sde, spec, enc, net = self.cfg, self.sde, self.spec, self.encoder, self.score_net
        if cfg.objective == "drl":
            return drl_loss(enc, net, sde, x0, t, l1_weight=cfg.l1_weight)
        if cfg.objective == "mixup-drl":
            return mixup_drl_loss(enc, net, sde, x0, t, alpha=cfg.mixup_alpha, l1_weight=cfg.l1_weight)
        if cfg.objective == "vdrl":
            return vdrl_loss(enc, self.head, net, sde, x0, t, kl_weight=cfg.kl_weight)
        return ae_loss(enc, net, sde, x0, t, spec.mean, spec.std, l1_weight=cfg.l1_weight)


def warmup_lr(base_lr: float, step: int, warmup: int) -> float:
    """score-SDE's linear warm-up: ``lr * min(1, step / warmup)`` (0 at the first step)."""
    return base_lr * min(1.0, step / warmup) if warmup > 0 else base_lr


def export(models: DRLModels, ema: ExponentialMovingAverage, cfg, sde, spec, step, labeled) -> dict:
    """The ``ckpt.pt`` payload: the encoder's raw (or ``--export ema``) weights, the EMA score net.

    ``state_dict()`` returns the live tensors, so the EMA weights are copied out before the raw ones
    are put back (otherwise the "EMA" entries would silently hold the raw weights).
    """
    def snapshot(module):
        return None if module is None else {k: v.detach().clone() for k, v in module.state_dict().items()}
    raw_encoder = snapshot(models.encoder)
    ema.store(models.parameters())
    ema.copy_to(models.parameters())
    out = {"step": step, "objective": cfg.objective, "sde": sde.to_dict(),
           "dataset": {"name": cfg.dataset, "channels": spec.channels, "image_size": spec.image_size,
                       "data_dir": cfg.data_dir},
           "labeled": None if labeled is None else labeled.tolist(),
           "encoder_arch": arch_record(models.encoder),
           "encoder": raw_encoder if cfg.export == "raw" else snapshot(models.encoder),
           "encoder_weights": cfg.export,
           "head_arch": models.head.args if models.head is not None else None, "head": snapshot(models.head),
           "score_net_arch": score_net_record(models.score_net), "score_net": snapshot(models.score_net)}
    ema.restore(models.parameters())
    return out


def pretraining_images(cfg, train, spec):
    """(training indices pretraining draws from, or None for all; the transform)."""
    idx = labeled_indices(cfg, train, spec) if cfg.pretrain_data == "labeled" else None
    if cfg.augment == "weak":
        tf = make_transform(spec, "weak", 1, cfg.cutout)
    else:
        from torchvision import transforms as T
        evalt = make_transform(spec, "eval")
        tf = T.Compose([T.RandomHorizontalFlip(), evalt]) if spec.hflip else evalt
    return idx, tf


@dataclasses.dataclass
class Training:
    """What the loop updates: the models (and their DDP / compiled forward), optimiser, EMA, step."""

    models: DRLModels
    fwd: nn.Module
    opt: torch.optim.Optimizer
    ema: ExponentialMovingAverage
    prec: Precision
    step: int
    writer: object
    labeled: object = None        # the pretraining images' indices (None: all), for exports


def open_training(models, cfg, run: RunDir, info, device) -> Training:
    """Models on the device, Adam, the EMA and TensorBoard; resumed from ``last.pt`` if present."""
    ckpt = run.resume_state()
    models, _ = prepare_model(models, cfg, device)
    fwd = wrap_ddp(models, info, device, find_unused_parameters=cfg.objective == "ae")
    fwd = torch.compile(fwd) if cfg.compile else fwd
    opt = torch.optim.Adam(models.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    ema = ExponentialMovingAverage(models.parameters(), decay=cfg.ema)
    step = 0
    if ckpt:
        load_state(models, ckpt["models"], f"run checkpoint {run.last}")
        opt.load_state_dict(ckpt["optimizer"])
        ema.load_state_dict(ckpt["ema"])
        step = ckpt["step"]
    return Training(models, fwd, opt, ema, Precision(cfg.amp, device), step,
                    run.writer(purge_step=step + 1 if step else None))


def pretraining_loader(cfg, train, rows, transform, step, info, device):
    """One persistent loader over the pretraining images: every rank its slice of one (seed, pass)
    permutation, full global batches only; a resumed run goes on where the stream was."""
    ws = info.world_size
    usable = len(rows) - len(rows) % cfg.batch_size

    def order(epoch, pass_index, rng):
        return epoch_permutation(len(rows), cfg.seed, pass_index)[:usable][info.rank::ws]

    stream = BatchStream(order, cfg.batch_size // ws, cfg.seed, "pretrain-data", info.rank, endless=True)
    stream.set_epoch(0, skip=step)
    workers = loader_workers(cfg.num_workers)
    return make_loader(SeededItems(AugmentedSubset(train, rows, transform)), workers, device,
                       batch_sampler=stream), workers


def train_steps(tr: Training, loader, cfg, sde, run: RunDir, info, device) -> dict:
    """Steps ``tr.step`` .. ``cfg.iters``: warm-up lr, clipped Adam step, EMA; scalars every
    ``--log-every`` steps, ``last.pt`` every ``--ckpt-every``. Returns the last logged means."""
    seed_everything(derive_seed(cfg.seed, "pretrain", tr.step, info.rank))
    bar = tqdm(range(tr.step, cfg.iters), desc="pretrain", disable=not (cfg.progress and info.is_main),
               initial=tr.step, total=cfg.iters)
    sums, t0, metrics = {}, time.time(), {}
    tr.models.train()
    for step, (x0, _) in zip(bar, loader):
        x0 = x0[:, 0].to(device, non_blocking=True)                # (B, C, H, W)
        if cfg.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        t = sample_t(x0.shape[0], cfg.t_sampling, sde, device=device)
        for g in tr.opt.param_groups:
            g["lr"] = warmup_lr(cfg.lr, step, cfg.warmup)
        with tr.prec.autocast():
            out = tr.fwd(x0, t)
        tr.opt.zero_grad(set_to_none=True)
        tr.prec.backward(out["loss"])
        tr.prec.unscale(tr.opt)
        gnorm = nn.utils.clip_grad_norm_(tr.models.parameters(), cfg.grad_clip)
        tr.prec.step(tr.opt)
        tr.ema.update(tr.models.parameters())
        for k, v in {**out, "grad_norm": gnorm}.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float().to(device)
        tr.step = done = step + 1
        if done % cfg.log_every == 0 or done == cfg.iters:
            n = done % cfg.log_every or cfg.log_every
            means = {k: float(all_reduce_mean(v.float(), info)) / n for k, v in sums.items()}
            check_finite(means["loss"], f"pretraining loss at step {done}", run.path)
            for k, v in means.items():
                tr.writer.add_scalar(f"pretrain/{k}", v, done)
            tr.writer.add_scalar("pretrain/lr", tr.opt.param_groups[0]["lr"], done)
            bar.set_postfix(loss=f"{means['loss']:.3f}")
            metrics, sums = {"step": done, "iters": cfg.iters, **means, "seconds": time.time() - t0}, {}
        if cfg.snapshot_every and done % cfg.snapshot_every == 0 and done < cfg.iters:
            run.save(export(tr.models, tr.ema, cfg, sde, tr.models.spec, done, tr.labeled),
                     run.path / "snapshots" / f"ckpt_{done:07d}.pt", DRL_CKPT)
        if done % cfg.ckpt_every == 0 and done < cfg.iters:
            run.save({"step": done, "models": tr.models.state_dict(), "optimizer": tr.opt.state_dict(),
                      "ema": tr.ema.state_dict()})
            run.write_metrics(metrics)
            barrier(info)
    return metrics


def pretrain(cfg: C.DRLConfig) -> dict:
    # ============ set-up, data and models: every input error before anything is written ============
    info, device = init_distributed(cfg.device)
    if cfg.batch_size % info.world_size:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the {info.world_size} processes")
    train, test, spec, _ = load_run_dataset(cfg)
    labeled, transform = pretraining_images(cfg, train, spec)
    rows = np.arange(len(train)) if labeled is None else labeled
    if cfg.batch_size > len(rows):
        raise UserError(f"--batch-size {cfg.batch_size} exceeds the {len(rows)} pretraining images "
                        f"({'the labeled ones' if labeled is not None else 'all of ' + cfg.dataset})")
    sde = make_sde(cfg)
    seed_everything(derive_seed(cfg.seed, "init"))
    models = DRLModels(cfg, spec, sde)
    if cfg.print_config:
        if info.is_main:
            import yaml
            print(yaml.safe_dump(C.to_dict(cfg), sort_keys=True).rstrip())
            print(f"pretraining images: {len(rows)}; parameters: "
                  f"{sum(p.numel() for p in models.parameters()) / 1e6:.2f}M")
        return {}

    # ============ run dir, resume (a finished run only samples, if asked) ============
    run = RunDir(cfg, DRL_RUN, run_name("drl", cfg, [cfg.dataset, cfg.objective, cfg.sde, f"s{cfg.seed}"]),
                 info.is_main)
    barrier(info)
    final = run.path / "ckpt.pt"
    if final.exists():
        run.check_config(load_checkpoint(final, DRL_CKPT, "run checkpoint")["config"])
        log.info(f"run already finished: {final}")
        if cfg.sample and info.is_main:
            sample_to_png(final, cfg, run.path / "samples.png", device)
        cleanup(info)
        return {"ckpt": str(final), "run_dir": str(run.path)}
    tr = open_training(models, cfg, run, info, device)
    tr.labeled = labeled
    run.write_config()
    start = tr.step
    loader, workers = pretraining_loader(cfg, train, rows, transform, start, info, device)
    log.info(f"device={device} processes={info.world_size} dataset={cfg.dataset} (from {cfg.dataset_source}) "
             f"pretraining images={len(rows)} ({cfg.pretrain_data}, {cfg.augment} augmentation) "
             f"objective={cfg.objective} sde={cfg.sde} t_sampling={cfg.t_sampling} "
             f"params={sum(p.numel() for p in models.parameters()) / 1e6:.2f}M loader_workers={workers} "
             f"iters={cfg.iters} run_dir={run.path}" + (f" resuming at step {start}" if start else ""))

    # ============ the loop ============
    metrics = train_steps(tr, loader, cfg, sde, run, info, device)

    # ============ record: ckpt.pt replaces last.pt ============
    if info.is_main:
        run.save(export(tr.models, tr.ema, cfg, sde, spec, cfg.iters, labeled), final, DRL_CKPT)
        run.write_metrics(metrics)
        run.last.unlink(missing_ok=True)
        log.info(f"wrote {final} (step {cfg.iters}, {cfg.iters - start} this run, final loss "
                 f"{metrics.get('loss', float('nan')):.4f})")
        if cfg.sample:
            sample_to_png(final, cfg, run.path / "samples.png", device, tr.writer)
    tr.writer.close()
    barrier(info)
    cleanup(info)
    return {"ckpt": str(final), "run_dir": str(run.path), **metrics}


def sample_to_png(ckpt_path, cfg, png, device, writer=None):
    """``--sample N`` samples from ``ckpt.pt`` alone (see :mod:`laplacedrl.sample`)."""
    from laplacedrl.sample import draw_samples
    grid = draw_samples(ckpt_path, cfg.sample, png, device=device, steps=cfg.sample_steps,
                        sampler=cfg.sampler, seed=cfg.seed, data_dir=cfg.data_dir)
    if writer is not None:
        writer.add_image("samples/conditional", grid, cfg.iters)
    log.info(f"wrote {png}")
