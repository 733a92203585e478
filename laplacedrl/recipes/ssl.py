"""The LaplaceNet recipe behind ``train_ssl.py``: :func:`train_ssl` is the algorithm's loop.

Supervised rounds, then per semi-supervised epoch the graph step (pseudo-labels from a kNN graph of
the classifier's features) and one epoch on labeled + pseudo-labeled batches. Every epoch ends with
an evaluation, ``metrics.json`` and an atomic ``last.pt``, so a killed run resumes at the next epoch
boundary and re-running a finished command does nothing. :func:`set_up` decides what a run starts
from before anything is written; :class:`Trainer` holds the run in its run dir, with resuming,
records and stop signals behind its methods. The pieces live in :mod:`laplacedrl.ssl`: the
schedule, the loaders, the training epoch, the graph step, the t-search and the evaluation.
"""
from __future__ import annotations

import copy
import time
from contextlib import closing
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from laplacedrl import config as C
from laplacedrl.data import write_label_file
from laplacedrl.data.folders import BadImages
from laplacedrl.engine.checkpoint import SSL_RUN, load_state
from laplacedrl.engine.distributed import (all_reduce_mean, all_reduce_min, barrier, cleanup, init_distributed,
                                           wrap_ddp)
from laplacedrl.engine.lock import releasing_locks
from laplacedrl.engine.run import Precision, RunDir, log, prepare_model
from laplacedrl.engine.seeds import derive_seed, seed_everything
from laplacedrl.engine.stop import StopSignals, stopped
from laplacedrl.errors import UserError
from laplacedrl.graph.knn import faiss_gpu_count, resolve_backend
from laplacedrl.models import classifier_record
from laplacedrl.ssl import pseudo_labels
from laplacedrl.ssl.epoch import train_epoch
from laplacedrl.ssl.evaluation import evaluate, summarize
from laplacedrl.ssl.handoff import reestimate_bn
from laplacedrl.ssl.loaders import Loaders, SSLData, load_data, make_augmentation
from laplacedrl.ssl.model import current_t, init_classifier, make_optimizer
from laplacedrl.ssl.plan import default_run_name, estimate, plan_without_data, print_plan
from laplacedrl.ssl.schedule import Schedule, check_sizes, fit_to_data, make_schedule
from laplacedrl.ssl.tsearch import T_SEARCH_VALUES, search_t

TB_TAGS = {"loss": "train/loss", "lr": "train/lr", "t": "train/t", "test_top1": "eval/test_top1",
           "test_top5": "eval/test_top5", "pseudo_label_acc": "eval/pseudo_label_acc",
           "pseudo_label_acc_before_align": "eval/pseudo_label_acc_before_align",
           "graph_time": "eval/graph_time", "cg_iters": "eval/cg_iters", "cg_residual": "eval/cg_residual"}


@dataclass
class Setup:
    """What a run starts from, decided before anything is written: the schedule, the initial model
    (seeded; the ``--init`` encoder when given), the augmentations, the precision and the kNN
    backend. Every input error of these surfaces while it is built (:func:`set_up`)."""

    sched: Schedule
    model: torch.nn.Module
    init_state: Optional[dict]          # the --init weights each t-search phase starts from
    weak_strong: tuple                  # (weak, strong, copies) of make_augmentation
    augment: Callable
    prec: Precision
    backend: str


def set_up(cfg, data: SSLData, device) -> Setup:
    """The run's :class:`Setup` (seeds the initialisation with the run's "init" stream)."""
    sched = make_schedule(cfg, len(data.lab_idx), len(data.unl_idx))
    seed_everything(derive_seed(cfg.seed, "init"))
    model = init_classifier(cfg, data.spec)       # an --init error surfaces here
    init_state = copy.deepcopy(model.state_dict()) if cfg.t_search else None
    weak, strong, copies, augment = make_augmentation(cfg, data.spec, device)
    prec = Precision(cfg.amp, device)
    try:
        backend = resolve_backend(cfg.knn_backend, device)
    except ValueError as e:
        raise UserError(f"--knn-backend: {e}") from None
    return Setup(sched, model, init_state, (weak, strong, copies), augment, prec, backend)


def fit_to(cfg, data: SSLData, info):
    """``cfg`` with the batch sizes and k fitted to the data (where 0 asks for it), checked against
    the image counts and the number of processes."""
    counts = (len(data.train), len(data.lab_idx), len(data.unl_idx))
    cfg = fit_to_data(cfg, *counts)
    check_sizes(cfg, *counts)
    ws = info.world_size
    if cfg.batch_size % ws or cfg.labeled_batch_size % ws:
        raise UserError(f"--batch-size {cfg.batch_size} and --labeled-batch-size "
                        f"{cfg.labeled_batch_size} must be divisible by the {ws} processes")
    return cfg


class Trainer:
    """One run of train_ssl.py in its run dir: the model on its device, the optimiser, the loaders
    and TensorBoard, resumed from ``last.pt`` when there is one. Its methods are the steps of
    :func:`train_ssl`; checkpoints, records and stop signals stay behind them."""

    def __init__(self, cfg, data: SSLData, setup: Setup, info, device):
        self.cfg, self.data, self.info, self.device = cfg, data, info, device
        self.main = info.is_main
        self.run_bar = None       # the whole run's progress bar (rank 0, with --progress)
        self.sched, self.augment, self.prec, self.backend = setup.sched, setup.augment, setup.prec, setup.backend
        self.init_state = setup.init_state
        self.run = RunDir(cfg, SSL_RUN, default_run_name(cfg), info.is_main)
        barrier(info)
        self.model = prepare_model(setup.model, cfg, device)
        self.fwd = wrap_ddp(self.model, info, device)
        self.fwd = torch.compile(self.fwd) if cfg.compile else self.fwd
        self.opt = make_optimizer(cfg, self.model)
        self.loaders = Loaders(cfg, data, self.sched, info, device, *setup.weak_strong)
        self.stream_seed = cfg.seed
        self.use_streams(cfg.seed)
        self.history, self.start, self.searched = [], 0, None
        self.resume()
        self.writer = self.run.writer(purge_step=self.start)
        self.announce()

    def resume(self) -> None:
        """Go on from ``last.pt`` if the run dir has one (the same labeled set, or an error)."""
        ckpt = self.run.resume_state()
        if ckpt:
            if not np.array_equal(np.asarray(ckpt["labeled"]), self.data.lab_idx):
                raise UserError("the labeled set differs from the one this run started with; "
                                "pass --fresh to start over")
            load_state(self.model, ckpt["model"], f"run checkpoint {self.run.last}")
            self.opt.load_state_dict(ckpt["optimizer"])
            self.history, self.start, self.searched = ckpt["history"], ckpt["epoch"], ckpt["t_search"]

    def announce(self) -> None:
        """labeled.txt, config.yaml, one log line describing the run; the snapshot before training."""
        cfg, data, sched, run, start = self.cfg, self.data, self.sched, self.run, self.start
        if self.main:
            write_label_file(run.path / "labeled.txt", data.train, data.lab_idx)
        run.write_config()
        faiss_gpus = faiss_gpu_count()
        log.info(f"device={self.device} processes={self.info.world_size} dataset={cfg.dataset} "
                 f"(from {cfg.dataset_source}) train={len(data.train)} {data.eval_kind}={len(data.test)} "
                 f"classes={data.spec.num_classes} labeled={len(data.lab_idx)} unlabeled={len(data.unl_idx)} "
                 f"loader_workers={self.loaders.workers} "
                 f"faiss_gpus={'n/a' if faiss_gpus is None else faiss_gpus} knn_backend={self.backend} "
                 f"epochs={sched.stop} of {sched.total} ({sched.sup_rounds} supervised + {sched.ssl_epochs}) "
                 f"{format_t(current_t(self.model))}run_dir={run.path}"
                 + (f" resuming after epoch {start}" if start else ""))
        if start >= sched.stop:
            log.info("run already finished; nothing to do (pass --fresh to start over)")
        if start == 0 and 0 in cfg.snapshot_epochs and self.main:
            self.save(0, path=run.path / "snapshots" / "epoch_0000.pt")

    def use_streams(self, seed: int) -> None:
        """Draw the epochs' data order, augmentations and mixup from ``seed``: the run's seed, or a
        t-search phase's own (so the phases are independent runs, as published)."""
        self.stream_seed = seed
        self.loaders.lab_stream.seed = self.loaders.unl_stream.seed = seed

    # ============ the steps of an epoch ============
    def supervised(self, epoch: int) -> bool:
        """Whether ``epoch`` is a supervised round (every epoch is with --supervised-only)."""
        return self.sched.phase(epoch) == "sup" or self.cfg.supervised_only

    def seed_epoch(self, epoch: int) -> None:
        """The epoch's random draws from its own seed, so that a resumed run replays them."""
        seed_everything(derive_seed(self.stream_seed, "epoch", epoch, self.info.rank))

    def supervised_round(self, epoch: int, stop=None, desc: str = "") -> torch.Tensor:
        """One supervised round: --sup-passes passes over the labeled images (mixup if --mixup)."""
        self.seed_epoch(epoch)
        batches = self.loaders.labeled_batches(epoch, self.data.targets)
        return self.train(epoch, batches, self.cfg.mixup, stop, desc)

    def graph_step(self, epoch: int):
        """LaplaceNet's graph step before semi-supervised epoch ``epoch``: features of every training
        image, a kNN graph, label propagation, distribution alignment -> (pseudo-labels, weights,
        statistics)."""
        self.seed_epoch(epoch)
        return pseudo_labels.graph_step(self.model, self.loaders, self.data, self.cfg, self.info, self.device,
                                        self.cfg.progress and self.main)

    def semi_supervised_epoch(self, epoch: int, pseudo, weight, stop=None) -> torch.Tensor:
        """One epoch of composite batches (labeled + pseudo-labeled), mixup unless --no-ssl-mixup."""
        batches = self.loaders.composite_batches(epoch, self.data.targets, pseudo, weight)
        return self.train(epoch, batches, self.cfg.ssl_mixup, stop)

    def train(self, epoch: int, batches, mixup: bool, stop=None, desc: str = "") -> torch.Tensor:
        """The optimiser steps of ``epoch`` over ``batches`` -> the per-step losses."""
        cfg, sched = self.cfg, self.sched
        desc = desc or f"epoch {epoch + 1}/{sched.stop} {sched.phase(epoch)}"
        return train_epoch(self.fwd, self.opt, batches, sched.steps(epoch),
                           lambda step: sched.lr(cfg.lr, epoch, step), self.device, self.prec, self.augment,
                           mixup_alpha=cfg.mixup_alpha if mixup else None, channels_last=cfg.channels_last,
                           fused_copies=cfg.fused_copies, desc=desc if cfg.progress and self.main else None,
                           should_stop=None if stop is None else lambda: stop.requested(self.info) is not None,
                           run_bar=self.run_bar)

    def end_epoch(self, epoch: int, losses: torch.Tensor, stats: dict, seconds: float, stop) -> None:
        """After an epoch: its losses checked, then (rank 0) the evaluation when due, the records and
        ``last.pt``; a stop signal ends the run here (at the epoch boundary last.pt holds)."""
        signame = stop.requested(self.info)
        finished = len(losses) == self.sched.steps(epoch)
        if finished or not signame:
            check_losses(losses, epoch, self.info, self.run.path)
            if self.cfg.bn_reestimate:   # statistics of the training images for the graph and evaluation
                reestimate_bn(self.model, self.loaders.eval_train, self.device, self.info)
            if self.main:          # rank 0 evaluates, logs and saves; the others wait for it
                self.record(self.describe(epoch, losses, seconds, stats, self.evaluate_if_due(epoch)))
            barrier(self.info)
        if signame:
            done = epoch + 1 if finished else epoch
            log.warning(f"{signame} in epoch {epoch + 1} after step {len(losses)}; last.pt holds {done} epochs")
            raise stopped(signame, f"{'after' if finished else 'in'} epoch {epoch + 1}")

    # ============ evaluation and records ============
    def evaluate_if_due(self, epoch: int):
        """(top-1, top-5) on the evaluation set every --eval-every epochs and after the last one
        (of the run, or of a t-search phase); (None, None) otherwise."""
        last_of = self.sched.sup_rounds if epoch < self.sched.sup_rounds and self.cfg.t_search else self.sched.stop
        if self.data.eval_kind != "none" and ((epoch + 1) % self.cfg.eval_every == 0 or epoch + 1 == last_of):
            return evaluate(self.model, self.loaders.eval_test, self.data.test.targets, self.device,
                            self.cfg.progress)
        return None, None

    def describe(self, epoch: int, losses: torch.Tensor, seconds: float, stats: dict, scores) -> dict:
        """The history entry of a finished epoch."""
        top1, top5 = scores
        last = self.sched.steps(epoch) - 1
        return {"epoch": epoch + 1, "phase": self.sched.phase(epoch), "test_top1": top1, "test_top5": top5,
                "loss": float(losses.mean()) if len(losses) else float("nan"),
                "lr": self.sched.lr(self.cfg.lr, epoch, last), "t": current_t(self.model),
                "time": seconds, **stats}

    def record(self, entry: dict) -> None:
        """History, TensorBoard, metrics.json, last.pt (atomic), one log line (rank 0)."""
        self.history.append(entry)
        step = entry["epoch"]
        for key, tag in TB_TAGS.items():
            if entry.get(key) is not None:
                self.writer.add_scalar(tag, entry[key], step)
        self.writer.add_scalar("time/epoch_seconds", entry["time"], step)
        self.writer.flush()
        self.save(step)
        if step in self.cfg.snapshot_epochs:
            self.save(step, path=self.run.path / "snapshots" / f"epoch_{step:04d}.pt")
        self.run.write_metrics(summarize(self.history, self.sched, self.cfg.seed, self.searched,
                                         self.data.eval_kind))
        parts = [f"epoch {step}/{self.sched.stop} [{entry['phase']}] loss {entry['loss']:.4f}"]
        if entry["test_top1"] is not None:
            parts.append(f"top1 {entry['test_top1']:.2f} top5 {entry['test_top5']:.2f}")
        if entry.get("pseudo_label_acc") is not None:
            parts.append(f"pl_acc {entry['pseudo_label_acc']:.2f}")
        if entry["t"] is not None:
            parts.append(f"t {entry['t']:.3f}")
        log.info(" ".join(parts) + f" ({entry['time']:.1f}s)")

    def save(self, epoch: int, model_state=None, history=None, path=None) -> None:
        """``last.pt`` (or ``path``) after ``epoch`` epochs: the resumable state and the classifier."""
        self.run.save({"epoch": epoch, "model": model_state or self.model.state_dict(),
                       "classifier": classifier_record(self.model), "optimizer": self.opt.state_dict(),
                       "history": self.history if history is None else history,
                       "labeled": self.data.lab_idx.tolist(), "t_search": self.searched}, path)

    # ============ Table 3's t-search (laplacedrl.ssl.tsearch) ============
    def search_phase(self, i: int, t: float, stop=None):
        """One t-search phase from the --init weights: (round losses, round entries, final state).
        A stop signal ends it (last.pt holds the phases finished before)."""
        cfg, sched = self.cfg, self.sched
        self.model.load_state_dict(self.init_state)
        self.model.set_t(t)
        self.use_streams(derive_seed(cfg.seed, "t-search", i))
        self.opt = make_optimizer(cfg, self.model)
        losses, entries = [], []
        for epoch in range(sched.sup_rounds):
            t0 = time.time()
            step_losses = self.supervised_round(epoch, stop, f"t-search t={t:.2f} round {epoch + 1}")
            signame = stop.requested(self.info) if stop is not None else None
            if signame:
                raise stopped(signame, f"in t-search phase {i + 1} (last.pt holds the {i} phases before)")
            losses.append(float(all_reduce_mean(step_losses[-sched.pass_steps:].mean(), self.info)))
            if self.main:
                entries.append(self.describe(epoch, step_losses, time.time() - t0, {}, self.evaluate_if_due(epoch)))
                self.writer.add_scalar(f"t_search/loss_t{t:.2f}", losses[-1], epoch + 1)
        log.info(f"t-search: t={t:.2f} lowest loss {min(losses):.4f}")
        return losses, entries, copy.deepcopy(self.model.state_dict())

    def run_t_search(self, stop=None) -> int:
        """Table 3's t-search: the supervised rounds once per t from the --init weights; the phase
        with the lowest training loss goes on. Runs (or finishes) it; returns the next epoch."""
        def keep(searched, best_state):                  # last.pt holds the best phase so far
            self.searched = searched
            if self.main:
                self.save(0, best_state, history=[])
            barrier(self.info)
        resumed = copy.deepcopy(self.model.state_dict()) if self.searched else None
        self.searched, best = search_t(lambda i, t: self.search_phase(i, t, stop), self.searched, resumed, keep)
        self.use_streams(self.cfg.seed)
        self.model.load_state_dict(best)
        chosen = self.searched["phases"][self.searched["chosen"]]
        log.info(f"t-search: lowest losses {[round(min(p['losses']), 4) for p in self.searched['phases']]};"
                 f" going on from t={chosen['t']:.2f}")
        self.history = list(chosen["entries"])
        self.opt = make_optimizer(self.cfg, self.model)     # published: a fresh optimiser
        if self.main:
            self.save(self.sched.sup_rounds)
        return self.sched.sup_rounds

    def finish(self) -> dict:
        """metrics.json and the final log line (rank 0); the summary of the run."""
        self.writer.close()
        metrics = summarize(self.history, self.sched, self.cfg.seed, self.searched, self.data.eval_kind)
        if self.main and self.history:
            self.run.write_metrics(metrics)
            if metrics["test_top1"] is None:
                log.info(f"finished; no val/ or test/ images to evaluate on -> {self.run.path / 'metrics.json'}")
            else:
                log.info(f"final {self.data.eval_kind} top-1 {metrics['test_top1']:.2f}% (best "
                         f"{metrics['test_top1_best']:.2f}%, mean of last 5 {metrics['test_top1_last5']:.2f}%) -> "
                         f"{self.run.path / 'metrics.json'}")
        return metrics


def format_t(t) -> str:
    """The run header's diffusion time: ``'t=0.500 '``, nothing for a classifier without one."""
    return "" if t is None else f"t={t:.3f} "


def run_progress(trainer: Trainer, start: int):
    """The whole run's progress bar (steps of every epoch to run, t-search phases included; the
    remaining time counts the graph steps and evaluations in, as an average since the start), on
    rank 0 with --progress; the epochs' own bars run below it."""
    sched, cfg = trainer.sched, trainer.cfg
    steps = [sched.steps(e) for e in range(sched.stop)]
    extra = (len(T_SEARCH_VALUES) - 1) * sum(steps[:sched.sup_rounds]) if cfg.t_search else 0
    trainer.run_bar = tqdm(total=sum(steps) + extra, initial=sum(steps[:start]) + (extra if start else 0),
                           desc="run", unit="step", smoothing=0, disable=not (cfg.progress and trainer.main))
    return trainer.run_bar


def check_losses(losses: torch.Tensor, epoch: int, info, run_dir) -> None:
    """A one-line UserError naming the first step whose loss was not finite (over every rank)."""
    n = len(losses)
    bad = torch.nonzero(~torch.isfinite(losses.detach().float())).flatten()
    first = all_reduce_min(int(bad[0]) if len(bad) else n, info)      # the earliest bad step of any rank
    if first < n:
        value = float(losses[first]) if len(bad) and int(bad[0]) == first else "non-finite"
        raise UserError(f"training loss at step {first + 1} of epoch {epoch + 1} became {value}; stopped "
                        f"(last.pt in {run_dir} holds the {epoch} epochs before, finite, and resumes; "
                        f"try a lower --lr)")


@releasing_locks
def train_ssl(cfg: C.SSLConfig) -> dict:
    """LaplaceNet (Sellars et al. 2021), from scratch or from a DRL-pretrained encoder (``--init``):

    1. supervised rounds: ``--sup-rounds`` rounds of ``--sup-passes`` passes over the labeled
       images (with ``--t-search``, Table 3: once per t from the --init weights, and the phase with
       the lowest training loss goes on);
    2. then per semi-supervised epoch: the graph step (features of every training image, a kNN
       graph, label propagation and distribution alignment give pseudo-labels and their weights),
       then one epoch of composite batches of labeled and pseudo-labeled images with mixup;
    3. after every epoch, the evaluation (every --eval-every epochs and after the last).

    The learning rate follows LaplaceNet's cosine schedule over all epochs. Every epoch ends with
    ``last.pt`` and ``metrics.json``, so a stopped run resumes at its next epoch. Returns the metrics.
    """
    info, device = init_distributed(cfg.device)
    problems = ""
    try:
        data = load_data(cfg)
    except BadImages as e:       # --print-config: the plan without them, and what a run would refuse
        if not (cfg.print_config and info.is_main):
            raise
        data = load_data(C.replace(cfg, skip_bad_images=True))
        problems = f"{e} (the numbers above leave them out)"
    except UserError as e:
        if cfg.print_config and info.is_main:
            return plan_without_data(cfg, e)
        raise
    cfg = fit_to(cfg, data, info)
    setup = set_up(cfg, data, device)              # every input error before anything is written
    if cfg.print_config:
        counts = {"labeled": len(data.lab_idx), "unlabeled": len(data.unl_idx)}
        if not info.is_main:
            return {}
        timed = estimate(cfg, data, setup.sched, setup.model, setup.weak_strong, setup.augment, setup.prec,
                         info, device)
        return print_plan(cfg, setup.sched, counts, problems, timed)
    trainer = Trainer(cfg, data, setup, info, device)
    sched, start = trainer.sched, trainer.start
    with StopSignals() as stop, closing(trainer.loaders), closing(run_progress(trainer, start)):
        if cfg.t_search and start < sched.sup_rounds:
            start = trainer.run_t_search(stop)
        for epoch in range(start, sched.stop):
            t0, stats = time.time(), {}
            if trainer.supervised(epoch):          # a supervised round
                losses = trainer.supervised_round(epoch, stop)
            else:                                  # the graph step, then one semi-supervised epoch
                pseudo, weight, stats = trainer.graph_step(epoch)
                losses = trainer.semi_supervised_epoch(epoch, pseudo, weight, stop)
            trainer.end_epoch(epoch, losses, stats, time.time() - t0, stop)      # evaluation, records
    metrics = trainer.finish()
    cleanup(info)
    return metrics
