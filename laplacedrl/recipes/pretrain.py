"""The DRL pretraining recipe behind ``pretrain_drl.py``: data -> models -> optimiser -> resume -> loop.

As the published score-SDE code of the DRL paper trains the encoder: batches of the labeled images
of one split (``--pretrain-data labeled``, 4000 labels by default) with LaplaceNet's weak
augmentation, the NCSN++ score net conditioned on the code, Adam with a linear warm-up, gradient
clipping and a parameter EMA. While it trains, ``last.pt`` (format ``laplacedrl.drl-run``) holds
the training state; at the end ``ckpt.pt`` (``laplacedrl.drl``, see
:mod:`laplacedrl.engine.checkpoint`) holds the encoder ``train_ssl.py --init`` needs (raw weights
by default, as published) and the EMA score net for sampling, and ``last.pt`` is removed. The
pieces live in :mod:`laplacedrl.drl`.
"""
from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from laplacedrl import config as C
from laplacedrl.data import load_run_dataset
from laplacedrl.drl.data import pretraining_images, pretraining_loader
from laplacedrl.drl.models import DRLModels, export, make_sde
from laplacedrl.drl.step import Training, open_training, pretrain_step
from laplacedrl.engine.checkpoint import DRL_CKPT, DRL_RUN, load_checkpoint
from laplacedrl.engine.distributed import all_reduce_mean, barrier, cleanup, init_distributed
from laplacedrl.engine.run import RunDir, check_finite, log, run_name
from laplacedrl.engine.seeds import derive_seed, seed_everything
from laplacedrl.errors import UserError
from laplacedrl.recipes.sample import sample_to_png


def train_steps(tr: Training, loader, cfg, sde, run: RunDir, info, device) -> dict:
    """Steps ``tr.step`` .. ``cfg.iters`` of :func:`pretrain_step`; scalars every ``--log-every``
    steps, snapshots every ``--snapshot-every``, ``last.pt`` every ``--ckpt-every``. Returns the last
    logged means."""
    seed_everything(derive_seed(cfg.seed, "pretrain", tr.step, info.rank))
    bar = tqdm(range(tr.step, cfg.iters), desc="pretrain", disable=not (cfg.progress and info.is_main),
               initial=tr.step, total=cfg.iters)
    sums, t0, metrics = {}, time.time(), {}
    tr.models.train()
    for _, (x0, _) in zip(bar, loader):
        out = pretrain_step(tr, x0[:, 0].to(device, non_blocking=True), cfg, sde)     # (B, C, H, W)
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + v.float()
        done = tr.step
        if done % cfg.log_every == 0 or done == cfg.iters:
            n = done % cfg.log_every or cfg.log_every
            means = {k: float(all_reduce_mean(v, info)) / n for k, v in sums.items()}
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
