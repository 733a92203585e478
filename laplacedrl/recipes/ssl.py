"""The LaplaceNet recipe behind ``train_ssl.py``: data -> run dir -> model -> resume -> epochs -> record.

Supervised rounds, then per semi-supervised epoch the graph step (pseudo-labels from a kNN graph of
the classifier's features) and one epoch on labeled + pseudo-labeled batches. Every epoch ends with
an evaluation, ``metrics.json`` and an atomic ``last.pt``, so a killed run resumes at the next epoch
boundary and re-running a finished command does nothing. The pieces live in :mod:`laplacedrl.ssl`:
the schedule, the loaders, the training epoch, the graph step, the t-search and the evaluation.
"""
from __future__ import annotations

import copy
import time
from contextlib import closing

import numpy as np
import torch

from laplacedrl import config as C
from laplacedrl.data import write_label_file
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
from laplacedrl.ssl.epoch import train_epoch
from laplacedrl.ssl.evaluation import evaluate, summarize
from laplacedrl.ssl.loaders import Loaders, SSLData, load_data, make_augmentation
from laplacedrl.ssl.model import current_t, init_classifier, make_optimizer
from laplacedrl.ssl.pseudo_labels import graph_step
from laplacedrl.ssl.plan import default_run_name, plan_without_data, print_plan
from laplacedrl.ssl.schedule import check_sizes, fit_to_data, make_schedule
from laplacedrl.ssl.tsearch import search_t

TB_TAGS = {"loss": "train/loss", "lr": "train/lr", "t": "train/t", "test_top1": "eval/test_top1",
           "test_top5": "eval/test_top5", "pseudo_label_acc": "eval/pseudo_label_acc",
           "pseudo_label_acc_before_align": "eval/pseudo_label_acc_before_align",
           "graph_time": "eval/graph_time", "cg_iters": "eval/cg_iters", "cg_residual": "eval/cg_residual"}


class Trainer:
    """One run of train_ssl.py: the pieces every step of :func:`train_ssl` shares."""

    def __init__(self, cfg, data: SSLData, info, device):
        self.cfg, self.data, self.info, self.device = cfg, data, info, device
        self.main = info.is_main
        self.sched = make_schedule(cfg, len(data.lab_idx), len(data.unl_idx))
        seed_everything(derive_seed(cfg.seed, "init"))
        self.model = init_classifier(cfg, data.spec)       # an --init error surfaces here
        self.init_state = copy.deepcopy(self.model.state_dict()) if cfg.t_search else None
        weak, strong, copies, self.augment = make_augmentation(cfg, data.spec, device)
        self.weak_strong = (weak, strong, copies)
        self.prec = Precision(cfg.amp, device)
        try:
            self.backend = resolve_backend(cfg.knn_backend, device)
        except ValueError as e:
            raise UserError(f"--knn-backend: {e}") from None

    def open(self, run: RunDir):
        """Model to device, optimiser, loaders, TensorBoard; resume from ``last.pt`` if there is one."""
        cfg, info, device = self.cfg, self.info, self.device
        self.run = run
        self.model = prepare_model(self.model, cfg, device)
        self.fwd = wrap_ddp(self.model, info, device)
        self.fwd = torch.compile(self.fwd) if cfg.compile else self.fwd
        self.opt = make_optimizer(cfg, self.model)
        self.loaders = Loaders(cfg, self.data, self.sched, info, device, *self.weak_strong)
        self.use_streams(cfg.seed)
        self.history, self.start, self.searched = [], 0, None
        ckpt = run.resume_state()
        if ckpt:
            if not np.array_equal(np.asarray(ckpt["labeled"]), self.data.lab_idx):
                raise UserError("the labeled set differs from the one this run started with; "
                                "pass --fresh to start over")
            load_state(self.model, ckpt["model"], f"run checkpoint {run.last}")
            self.opt.load_state_dict(ckpt["optimizer"])
            self.history, self.start, self.searched = ckpt["history"], ckpt["epoch"], ckpt["t_search"]
        self.writer = run.writer(purge_step=self.start)

    def use_streams(self, seed: int) -> None:
        """Draw the epochs' data order, augmentations and mixup from ``seed``: the run's seed, or a
        t-search phase's own (so the phases are independent runs, as published)."""
        self.stream_seed = seed
        self.loaders.lab_stream.seed = self.loaders.unl_stream.seed = seed

    def epoch_losses(self, epoch: int, desc: str, stop=None):
        """Train one epoch of the schedule (graph step first in semi-supervised epochs) ->
        (per-step losses, the graph step's statistics)."""
        cfg, sched, data, loaders = self.cfg, self.sched, self.data, self.loaders
        seed_everything(derive_seed(self.stream_seed, "epoch", epoch, self.info.rank))  # replay on resume
        stats = {}
        if sched.phase(epoch) == "sup" or cfg.supervised_only:
            batches, mixup = loaders.labeled_batches(epoch, data.targets), cfg.mixup
        else:
            pseudo, weight, stats = graph_step(self.model, loaders, data, cfg, self.info, self.device,
                                               cfg.progress and self.main)
            batches, mixup = loaders.composite_batches(epoch, data.targets, pseudo, weight), cfg.ssl_mixup
        losses = train_epoch(self.fwd, self.opt, batches, sched.steps(epoch),
                             lambda step: sched.lr(cfg.lr, epoch, step), self.device, self.prec,
                             self.augment, cfg.mixup_alpha if mixup else None, cfg.channels_last,
                             cfg.fused_copies, desc if cfg.progress and self.main else None,
                             None if stop is None else lambda: stop.requested(self.info) is not None)
        return losses, stats

    def entry(self, epoch: int, losses: torch.Tensor, seconds: float, stats: dict) -> dict:
        """Describe one finished epoch, evaluated every --eval-every epochs and at the end (rank 0)."""
        last_of = self.sched.sup_rounds if epoch < self.sched.sup_rounds and self.cfg.t_search else self.sched.stop
        top1 = top5 = None
        if self.data.eval_kind != "none" and ((epoch + 1) % self.cfg.eval_every == 0 or epoch + 1 == last_of):
            top1, top5 = evaluate(self.model, self.loaders.eval_test, self.data.test.targets, self.device,
                                  self.cfg.progress)
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
            step_losses, _ = self.epoch_losses(epoch, f"t-search t={t:.2f} round {epoch + 1}", stop)
            signame = stop.requested(self.info) if stop is not None else None
            if signame:
                raise stopped(signame, f"in t-search phase {i + 1} (last.pt holds the {i} phases before)")
            losses.append(float(all_reduce_mean(step_losses[-sched.pass_steps:].mean(), self.info)))
            if self.main:
                entries.append(self.entry(epoch, step_losses, time.time() - t0, {}))
                self.writer.add_scalar(f"t_search/loss_t{t:.2f}", losses[-1], epoch + 1)
        log.info(f"t-search: t={t:.2f} lowest loss {min(losses):.4f}")
        return losses, entries, copy.deepcopy(self.model.state_dict())

    def run_t_search(self, stop=None) -> int:
        """Run (or finish) the t-search, go on from the chosen phase; returns the next epoch."""
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
    # ============ set-up and data: every input error before anything is written ============
    info, device = init_distributed(cfg.device)
    try:
        data = load_data(cfg)
    except UserError as e:
        if cfg.print_config and info.is_main:
            return plan_without_data(cfg, e)
        raise
    counts = (len(data.train), len(data.lab_idx), len(data.unl_idx))
    cfg = fit_to_data(cfg, *counts)
    check_sizes(cfg, *counts)
    ws = info.world_size
    if cfg.batch_size % ws or cfg.labeled_batch_size % ws:
        raise UserError(f"--batch-size {cfg.batch_size} and --labeled-batch-size "
                        f"{cfg.labeled_batch_size} must be divisible by the {ws} processes")
    trainer = Trainer(cfg, data, info, device)
    sched = trainer.sched
    if cfg.print_config:
        return print_plan(cfg, sched, {"labeled": counts[1], "unlabeled": counts[2]}) if info.is_main else {}

    # ============ run dir, model, resume ============
    run = RunDir(cfg, SSL_RUN, default_run_name(cfg), info.is_main)
    barrier(info)
    trainer.open(run)
    if info.is_main:
        write_label_file(run.path / "labeled.txt", data.train, data.lab_idx)
    run.write_config()
    start = trainer.start
    faiss_gpus = faiss_gpu_count()
    log.info(f"device={device} processes={ws} dataset={cfg.dataset} (from {cfg.dataset_source}) "
             f"train={len(data.train)} {data.eval_kind}={len(data.test)} classes={data.spec.num_classes} "
             f"labeled={len(data.lab_idx)} unlabeled={len(data.unl_idx)} "
             f"loader_workers={trainer.loaders.workers} "
             f"faiss_gpus={'n/a' if faiss_gpus is None else faiss_gpus} knn_backend={trainer.backend} "
             f"epochs={sched.stop} of {sched.total} ({sched.sup_rounds} supervised + {sched.ssl_epochs}) "
             f"t={current_t(trainer.model)} run_dir={run.path}"
             + (f" resuming after epoch {start}" if start else ""))
    if start >= sched.stop:
        log.info("run already finished; nothing to do (pass --fresh to start over)")
    if start == 0 and 0 in cfg.snapshot_epochs and info.is_main:
        trainer.save(0, path=run.path / "snapshots" / "epoch_0000.pt")

    # ============ t-search (Table 3), then the epoch loop ============
    with StopSignals() as stop, closing(trainer.loaders):
        if cfg.t_search and start < sched.sup_rounds:
            start = trainer.run_t_search(stop)
        for epoch in range(start, sched.stop):
            t0 = time.time()
            losses, stats = trainer.epoch_losses(epoch, f"epoch {epoch + 1}/{sched.stop} {sched.phase(epoch)}",
                                                 stop)
            signame = stop.requested(info)
            finished = len(losses) == sched.steps(epoch)
            if finished or not signame:
                check_losses(losses, epoch, info, run.path)
                if info.is_main:       # rank 0 evaluates, logs and saves; the others wait for it
                    trainer.record(trainer.entry(epoch, losses, time.time() - t0, stats))
                barrier(info)
            if signame:                # back to the last epoch boundary: last.pt holds the epochs done
                done = epoch + 1 if finished else epoch
                log.warning(f"{signame} in epoch {epoch + 1} after step {len(losses)}; last.pt holds {done} epochs")
                raise stopped(signame, f"{'after' if finished else 'in'} epoch {epoch + 1}")

    # ============ record ============
    trainer.writer.close()
    metrics = summarize(trainer.history, sched, cfg.seed, trainer.searched, data.eval_kind)
    if info.is_main and trainer.history:
        run.write_metrics(metrics)
        if metrics["test_top1"] is None:
            log.info(f"finished; no val/ or test/ images to evaluate on -> {run.path / 'metrics.json'}")
        else:
            log.info(f"final {data.eval_kind} top-1 {metrics['test_top1']:.2f}% (best "
                     f"{metrics['test_top1_best']:.2f}%, mean of last 5 {metrics['test_top1_last5']:.2f}%) -> "
                     f"{run.path / 'metrics.json'}")
    cleanup(info)
    return metrics
