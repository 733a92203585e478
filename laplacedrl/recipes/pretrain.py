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
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from laplacedrl import config as C
from laplacedrl.data import load_run_dataset
from laplacedrl.data.folders import BadImages
from laplacedrl.data.streams import close_loader
from laplacedrl.drl.data import pretraining_images, pretraining_loader
from laplacedrl.drl.models import DRLModels, export, make_sde
from laplacedrl.drl.plan import estimate_seconds, fit_pretraining
from laplacedrl.drl.step import Training, open_training, pretrain_step, rng_state, set_rng_state
from laplacedrl.engine.checkpoint import DRL_CKPT, DRL_RUN, load_checkpoint
from laplacedrl.engine.distributed import (all_gather_objects, all_reduce_mean, all_reduce_min, barrier, cleanup,
                                           init_distributed)
from laplacedrl.engine.lock import releasing_locks
from laplacedrl.engine.run import RunDir, log, run_name
from laplacedrl.engine.seeds import derive_seed, seed_everything
from laplacedrl.engine.stop import StopSignals, stopped
from laplacedrl.engine.timing import format_duration, timed_here
from laplacedrl.errors import UserError
from laplacedrl.recipes.sample import sample_to_png
from laplacedrl.registry import published


def run_state(tr: Training, window: dict, info, device) -> dict:
    """``last.pt`` at ``tr.step``: the training state and, per rank, the generator states and the
    log interval's running sums, so that a resumed run goes on exactly as an uninterrupted one."""
    mine = {"rng": rng_state(device), "window": {k: float(v) for k, v in window.items()}}
    ranks = all_gather_objects(mine, info)
    return {"step": tr.step, "models": tr.models.state_dict(), "optimizer": tr.opt.state_dict(),
            "ema": tr.ema.state_dict(), "rng": [r["rng"] for r in ranks], "window": [r["window"] for r in ranks]}


def train_steps(tr: Training, loader, cfg, sde, run: RunDir, info, device, stop) -> dict:
    """Steps ``tr.step`` .. ``cfg.iters`` of :func:`pretrain_step`; scalars every ``--log-every``
    steps, snapshots every ``--snapshot-every``, ``last.pt`` every ``--ckpt-every`` and when a stop
    signal arrives. A loss that is not finite stops the run, naming its step. Returns the last
    logged means."""
    sums, first_bad = {}, torch.full((2,), -1.0, device=device)     # (step, loss) of the first bad loss
    if tr.resumed and len(tr.resumed["rng"]) == info.world_size:      # go on exactly where it stopped
        set_rng_state(tr.resumed["rng"][info.rank], device)
        sums = {k: torch.tensor(v, device=device) for k, v in tr.resumed["window"][info.rank].items()}
    else:
        seed_everything(derive_seed(cfg.seed, "pretrain", tr.step, info.rank))
    bar = tqdm(range(tr.step, cfg.iters), desc="pretrain", disable=not (cfg.progress and info.is_main),
               initial=tr.step, total=cfg.iters)
    t0, metrics = time.time(), {}
    tr.models.train()

    def check_losses():
        bad = all_reduce_min(int(first_bad[0]) if first_bad[0] >= 0 else cfg.iters + 1, info)
        if bad <= cfg.iters:
            value = float(first_bad[1]) if int(first_bad[0]) == bad else "non-finite"
            raise UserError(f"pretraining loss at step {bad} became {value}; stopped (last.pt in {run.path} "
                            f"holds an earlier step, finite, and resumes; try a lower --lr)")

    for _, (x0, _) in zip(bar, loader):
        out = pretrain_step(tr, x0[:, 0].to(device, non_blocking=True), cfg, sde)     # (B, C, H, W)
        done = tr.step
        loss = out["loss"].float()
        new_bad = (first_bad[0] < 0) & ~torch.isfinite(loss)        # on the device: no sync per step
        first_bad = torch.where(new_bad, torch.stack([torch.tensor(float(done), device=device), loss]), first_bad)
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + v.float()
        log_now = done % cfg.log_every == 0 or done == cfg.iters
        save_now = done % cfg.ckpt_every == 0 and done < cfg.iters
        signame = stop.requested(info)
        if log_now or save_now or signame:
            check_losses()
        if log_now:
            n = done % cfg.log_every or cfg.log_every
            means = {k: float(all_reduce_mean(v, info)) / n for k, v in sums.items()}
            for k, v in means.items():
                tr.writer.add_scalar(f"pretrain/{k}", v, done)
            tr.writer.add_scalar("pretrain/lr", tr.opt.param_groups[0]["lr"], done)
            bar.set_postfix(loss=f"{means['loss']:.3f}")
            metrics, sums = {"step": done, "iters": cfg.iters, **means, "seconds": time.time() - t0}, {}
        if cfg.snapshot_every and done % cfg.snapshot_every == 0 and done < cfg.iters:
            run.save(export(tr.models, tr.ema, cfg, sde, tr.models.spec, done, tr.labeled),
                     run.path / "snapshots" / f"ckpt_{done:07d}.pt", DRL_CKPT)
        if save_now or (signame and done < cfg.iters):
            run.save(run_state(tr, sums, info, device))
            run.write_metrics(metrics)
            barrier(info)
        if signame and done < cfg.iters:
            log.warning(f"{signame} at step {done}: last.pt holds this step")
            raise stopped(signame, f"at step {done}")
    return metrics


def print_plan(cfg, name: str, models, note: str, notes=(), seconds=None, why_unknown="") -> dict:
    """``--print-config``: the resolved config with the run dir, the parameter count, notes, and the
    estimated wall time (``seconds``; None: unknown, because ``why_unknown``)."""
    out = cfg.out or str(Path("runs") / name)
    print(C.to_yaml(cfg, out=out).rstrip())
    params = sum(p.numel() for p in models.parameters()) if models is not None else None
    print(f"# {note}" + (f"; parameters: {params / 1e6:.2f}M" if params else ""))
    for line in notes:
        print(f"# {line}")
    if seconds is not None:
        print(f"# estimated wall time: {format_duration(seconds)} ({cfg.iters} iterations at "
              f"{seconds / cfg.iters:.2f} s each, {timed_here()})")
    else:
        print(f"# estimated wall time: unknown ({why_unknown or 'no step could be timed here'})")
    return {"run_dir": out, "parameters": params, "seconds": seconds}


def plan_without_data(cfg, err: UserError) -> dict:
    """--print-config when the data is not there: the published sizes where they are known."""
    known = published(cfg.dataset)
    notes, models = [], None
    if known is not None:
        n_images = known[0] if cfg.pretrain_data == "all" or cfg.labels == 0 else cfg.labels
        cfg, notes = fit_pretraining(cfg, n_images, known[1].image_size)
        models = DRLModels(cfg, known[1], make_sde(cfg))
    elif cfg.arch == "auto" or cfg.iters == 0:
        notes = ["--arch auto and --iters 0 are resolved once the image sizes and counts are known"]
    name = run_name("drl", cfg, [cfg.dataset, cfg.objective, cfg.sde, f"s{cfg.seed}"])
    return print_plan(cfg, name, models, f"the data is not there ({err})", notes,
                      why_unknown="it is timed on the data, which is not there")


def pretraining_rows(cfg, train, spec):
    """``(labeled indices or None, the rows pretraining draws from, the transform)``; a batch larger
    than the pretraining images is refused."""
    labeled, transform = pretraining_images(cfg, train, spec)
    rows = np.arange(len(train)) if labeled is None else labeled
    if cfg.batch_size > len(rows):
        raise UserError(f"--batch-size {cfg.batch_size} exceeds the {len(rows)} pretraining images "
                        f"({'the labeled ones' if labeled is not None else 'all of ' + cfg.dataset}): use "
                        f"--batch-size {len(rows)} or less")
    return labeled, rows, transform


def finished_run(final: Path, cfg, run: RunDir, device) -> dict:
    """A run dir whose ``ckpt.pt`` exists: nothing to train; samples drawn if asked (rank 0)."""
    run.check_config(load_checkpoint(final, DRL_CKPT, "run checkpoint")["config"])
    log.info(f"run already finished: {final}")
    if cfg.sample and run.main:
        sample_to_png(final, cfg, run.path / "samples.png", device)
    return {"ckpt": str(final), "run_dir": str(run.path)}


def describe(cfg, tr: Training, rows, workers: int, run: RunDir, info, device) -> str:
    """The log line that opens a run."""
    return (f"device={device} processes={info.world_size} dataset={cfg.dataset} (from {cfg.dataset_source}) "
            f"pretraining images={len(rows)} ({cfg.pretrain_data}, {cfg.augment} augmentation) "
            f"objective={cfg.objective} sde={cfg.sde} t_sampling={cfg.t_sampling} "
            f"params={sum(p.numel() for p in tr.models.parameters()) / 1e6:.2f}M loader_workers={workers} "
            f"iters={cfg.iters} warmup={cfg.warmup} run_dir={run.path}" + (f" resuming at step {tr.step}" if tr.step else ""))


def write_ckpt(tr: Training, cfg, sde, final: Path, run: RunDir, metrics: dict, start: int, device) -> None:
    """``ckpt.pt`` replaces ``last.pt``; the final metrics; samples if asked (rank 0)."""
    run.save(export(tr.models, tr.ema, cfg, sde, tr.models.spec, cfg.iters, tr.labeled), final, DRL_CKPT)
    run.write_metrics(metrics)
    run.finish()
    log.info(f"wrote {final} (step {cfg.iters}, {cfg.iters - start} this run, final loss "
             f"{metrics.get('loss', float('nan')):.4f})")
    if cfg.sample:
        sample_to_png(final, cfg, run.path / "samples.png", device, tr.writer)


@releasing_locks
def pretrain(cfg: C.DRLConfig) -> dict:
    """DRL pretraining (Mittal et al.) of a classifier's encoder E, as the published score-SDE code:

    1. the images: the labeled images of one split (``--pretrain-data all``: every training image)
       with LaplaceNet's weak augmentation (``--augment``);
    2. each step: a batch x0, times t (``--t-sampling``), noisy x_t from the SDE (``--sde``), and
       the denoising score-matching loss of the score net conditioned on the code E(x0, t), plus
       the objective's term on the code (``--objective``: L1 for DRL, KL for VDRL, mixed codes for
       mixup-DRL, a decoder for the autoencoder); Adam with a linear warm-up, gradient clipping and
       an EMA of the weights;
    3. the end: ``ckpt.pt`` holds the encoder ``train_ssl.py --init`` takes and the EMA score net.

    ``last.pt`` every --ckpt-every steps lets a stopped run resume at the step it reached. Returns
    the run dir, ``ckpt.pt`` and the last logged means.
    """
    info, device = init_distributed(cfg.device)
    if cfg.batch_size % info.world_size:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the {info.world_size} processes")
    problems = ""
    try:
        train, test, spec, _ = load_run_dataset(cfg)
    except BadImages as e:       # --print-config: the plan without them, and what a run would refuse
        if not (cfg.print_config and info.is_main):
            raise
        train, test, spec, _ = load_run_dataset(C.replace(cfg, skip_bad_images=True))
        problems = f"{e} (the numbers above leave them out)"
    except UserError as e:
        if cfg.print_config and info.is_main:
            return plan_without_data(cfg, e)
        raise
    labeled, rows, transform = pretraining_rows(cfg, train, spec)
    cfg, notes = fit_pretraining(cfg, len(rows), spec.image_size)     # the folder sizes its pretraining
    name = run_name("drl", cfg, [cfg.dataset, cfg.objective, cfg.sde, f"s{cfg.seed}"])
    sde = make_sde(cfg)
    seed_everything(derive_seed(cfg.seed, "init"))
    models = DRLModels(cfg, spec, sde)           # every input error before anything is written
    if cfg.print_config:
        if not info.is_main:
            return {}
        params = sum(p.numel() for p in models.parameters())
        seconds = estimate_seconds(models, cfg, sde, train, rows, transform, info, device)
        plan = print_plan(cfg, name, None, f"pretraining images: {len(rows)}; parameters: {params / 1e6:.2f}M",
                          notes + ([problems] if problems else []), seconds)
        return {**plan, "parameters": params}

    run = RunDir(cfg, DRL_RUN, name, info.is_main)
    barrier(info)
    final = run.path / "ckpt.pt"
    if final.exists():
        result = finished_run(final, cfg, run, device)
        cleanup(info)
        return result
    tr = open_training(models, cfg, run, info, device)
    tr.labeled = labeled
    run.write_config()
    start = tr.step
    loader, workers = pretraining_loader(cfg, train, rows, transform, start, info, device)
    log.info(describe(cfg, tr, rows, workers, run, info, device))
    for line in notes:
        log.info(line)
    with StopSignals() as stop:
        try:
            metrics = train_steps(tr, loader, cfg, sde, run, info, device, stop)
        finally:                               # workers shut down while a stop signal is still caught
            close_loader(loader)
    if info.is_main:
        write_ckpt(tr, cfg, sde, final, run, metrics, start, device)
    tr.writer.close()
    barrier(info)
    cleanup(info)
    return {"ckpt": str(final), "run_dir": str(run.path), **metrics}
