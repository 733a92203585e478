"""LaplaceNet's schedule: supervised rounds, then semi-supervised epochs, and the learning rate.

The schedule is a list of epochs: ``sup_rounds`` supervised rounds (each ``sup_passes`` passes over
the labeled images), then the semi-supervised epochs, as many as ``--epochs`` says or as LaplaceNet's
step budget allows (:func:`make_schedule`); ``--max-epochs`` stops early while the learning rate
keeps the full schedule (the published "limited compute" runs).
"""
from __future__ import annotations

import dataclasses
import math

from laplacedrl import config as C
from laplacedrl.errors import UserError


def cosine_lr(base_lr: float, epoch: float, total_epochs: int) -> float:
    """LaplaceNet's rampdown: ``lr * (cos(pi * epoch / (total + 10)) + 1) / 2``, ``epoch`` fractional."""
    return base_lr * 0.5 * (math.cos(math.pi * epoch / (total_epochs + 10)) + 1.0)


@dataclasses.dataclass
class Schedule:
    """Epochs, steps and learning rates of a run (see :func:`make_schedule`)."""

    sup_rounds: int
    sup_passes: int
    pass_steps: int      # optimiser steps of one pass over the labeled images (full batches)
    lab_batch: int       # labeled images per supervised step
    ssl_epochs: int
    ssl_steps: int       # optimiser steps of one semi-supervised epoch
    stop: int            # epochs actually run (--max-epochs), <= total

    @property
    def total(self) -> int:
        return self.sup_rounds + self.ssl_epochs

    def phase(self, epoch: int) -> str:
        return "sup" if epoch < self.sup_rounds else "ssl"

    def steps(self, epoch: int) -> int:
        return self.sup_passes * self.pass_steps if self.phase(epoch) == "sup" else self.ssl_steps

    def lr(self, base_lr: float, epoch: int, step: int) -> float:
        """LaplaceNet's per-step rate: a supervised round repeats the epoch's span once per pass
        (the published loop calls its epoch function once per pass with the same epoch number)."""
        if self.phase(epoch) == "sup":
            return cosine_lr(base_lr, epoch + (step % self.pass_steps) / self.pass_steps, self.total)
        return cosine_lr(base_lr, epoch + step / self.ssl_steps, self.total)

    def summary(self, base_lr: float) -> dict:
        """What ``--print-config`` shows: the epochs, the steps and the last learning rate of the run."""
        last = self.stop - 1
        return {"supervised_rounds": self.sup_rounds, "supervised_steps_per_round": self.steps(0),
                "semi_supervised_epochs": self.ssl_epochs, "steps_per_semi_supervised_epoch": self.ssl_steps,
                "epochs_total": self.total, "epochs_run": self.stop,
                "steps_run": sum(self.steps(e) for e in range(self.stop)),
                "lr_at_last_step": round(self.lr(base_lr, last, self.steps(last) - 1), 6) if self.stop else None}


def make_schedule(cfg, n_labeled: int, n_unlabeled: int) -> Schedule:
    """LaplaceNet's schedule: supervised passes of full labeled batches (the remainder of each pass is
    dropped), semi-supervised epochs of ``floor(unlabeled / pseudo-labeled batch)`` steps, and unless
    ``--epochs`` is given, ``floor((num_steps - supervised steps) / ssl steps)`` of them."""
    lab_batch = min(cfg.batch_size, n_labeled)
    pass_steps = max(1, n_labeled // lab_batch)
    ssl_steps = max(1, n_unlabeled // (cfg.batch_size - cfg.labeled_batch_size))
    sup_steps = cfg.sup_rounds * cfg.sup_passes * pass_steps
    ssl_epochs = cfg.epochs or max(0, (cfg.num_steps - sup_steps) // ssl_steps)
    total = cfg.sup_rounds + ssl_epochs
    return Schedule(cfg.sup_rounds, cfg.sup_passes, pass_steps, lab_batch, ssl_epochs, ssl_steps,
                    min(total, cfg.max_epochs) if cfg.max_epochs else total)


def fit_to_data(cfg, n_train: int, n_labeled: int, n_unlabeled: int):
    """``cfg`` with its "0 = fit the data" sizes resolved: ``knn`` min(50, images - 1), a step of
    min(50, labeled) labeled + min(50, unlabeled) unlabeled images when either batch size is 0."""
    sizes = {}
    if cfg.knn == 0:
        sizes["knn"] = max(1, min(50, n_train - 1))
    if 0 in (cfg.batch_size, cfg.labeled_batch_size):
        lab = cfg.labeled_batch_size or max(1, min(50, n_labeled))
        sizes.update(labeled_batch_size=lab, batch_size=lab + max(1, min(50, n_unlabeled)))
    return C.replace(cfg, **sizes) if sizes else cfg


def check_sizes(cfg, n_train: int, n_labeled: int, n_unlabeled: int) -> None:
    """One-line UserErrors, before anything is written, for sizes the data cannot serve, each with
    the value that would fit."""
    if cfg.supervised_only:
        return
    if n_unlabeled == 0:
        raise UserError("no unlabeled training images: LaplaceNet needs some (add unlabeled images, keep "
                        "fewer labels with --labels N, or train on the labels alone with --supervised-only)")
    if cfg.knn >= n_train:
        raise UserError(f"--knn {cfg.knn} needs more than {cfg.knn} training images and there are {n_train}: "
                        f"use --knn {n_train - 1} or less (or 0 to fit the data)")
    per_step = cfg.batch_size - cfg.labeled_batch_size
    if per_step > n_unlabeled:
        raise UserError(f"--batch-size {cfg.batch_size} with --labeled-batch-size {cfg.labeled_batch_size} "
                        f"takes {per_step} unlabeled images a step and there are {n_unlabeled}: use "
                        f"--batch-size {cfg.labeled_batch_size + n_unlabeled} or less (or 0 to fit the data)")
