"""Pretraining sized to the data: the encoder, the iterations and the warm-up, and the time they take.

:func:`fit_pretraining` resolves what a config leaves to the data (``--arch auto``, ``--iters 0``
with ``--passes``, ``--warmup-fraction``) and applies the warm-up rule to every dataset: a warm-up
longer than half the run leaves it ending below its learning rate, so a default one is scaled to
:data:`SCALED_WARMUP` of the run and one the user gave is refused. :func:`time_steps` times a few
real steps (:func:`estimate`) for ``--print-config``.
"""
from __future__ import annotations

import math

from laplacedrl import config as C
from laplacedrl.errors import UserError

SCALED_WARMUP = 0.05      # a default warm-up longer than half the run becomes this fraction of it
LARGE_FOLDER = 10000      # --arch auto: the published wrn-28-2 from this many images ...
SMALL_IMAGES = 32         # ... of at most this side; wrn-10-1 otherwise


def auto_arch(n_images: int, image_size: int) -> str:
    """``--arch auto``: the published WRN-28-2 for a CIFAR-sized set (10,000 or more images of at
    most 32x32 pixels), else WRN-10-1 (a twentieth of its parameters: fewer images to fit, or larger
    images that make each step dearer)."""
    return "wrn-28-2" if n_images >= LARGE_FOLDER and image_size <= SMALL_IMAGES else "wrn-10-1"


def iters_from_passes(passes: float, n_images: int, batch_size: int) -> int:
    """Steps of ``passes`` passes over ``n_images`` in batches of ``batch_size`` (at least one)."""
    return max(1, math.ceil(passes * n_images / batch_size))


def fit_warmup(warmup: int, iters: int, fraction: float = 0.0, given: bool = False):
    """``(warm-up steps, note or None)`` for a run of ``iters`` steps.

    ``fraction`` > 0 and no ``--warmup`` given: ``round(fraction * iters)``. A warm-up longer than
    half the run (which would end the run below its learning rate) is scaled to
    :data:`SCALED_WARMUP` of the run when it is a default (the note says so), and refused when the
    user gave it.
    """
    if fraction > 0 and not given:
        warmup = round(fraction * iters)
    if 2 * warmup <= iters:
        return warmup, None
    if given:
        raise UserError(f"--warmup {warmup} is longer than half of the {iters} iterations: the run would end "
                        f"at {100 * iters / warmup:.0f}% of its learning rate; use --warmup {iters // 2} or less "
                        f"(or leave it out: a default warm-up fits the run)")
    scaled = round(SCALED_WARMUP * iters)
    return scaled, (f"the default warm-up of {warmup} steps is longer than half of the {iters} iterations: "
                    f"scaled to {scaled} ({100 * SCALED_WARMUP:.0f}%)")


def fit_pretraining(cfg, n_images: int, image_size: int):
    """``(cfg, notes)``: ``cfg`` with ``--arch auto``, ``--iters 0`` and the warm-up resolved for
    ``n_images`` pretraining images of side ``image_size``; ``notes``: lines for the log."""
    changes, notes = {}, []
    if cfg.arch == "auto":
        changes["arch"] = auto_arch(n_images, image_size)
        notes.append(f"--arch auto: {changes['arch']} for {n_images} images of {image_size}x{image_size}")
    iters = cfg.iters or iters_from_passes(cfg.passes, n_images, cfg.batch_size)
    if iters != cfg.iters:
        changes["iters"] = iters
        notes.append(f"--iters 0: {iters} iterations = {cfg.passes:g} passes over {n_images} images "
                     f"in batches of {cfg.batch_size}")
    warmup, note = fit_warmup(cfg.warmup, iters, cfg.warmup_fraction, "warmup" in getattr(cfg, "given", ()))
    if warmup != cfg.warmup:
        changes["warmup"] = warmup
    notes += [note] if note else []
    return (C.replace(cfg, **changes) if changes else cfg), notes


def estimate_seconds(models, cfg, sde, train, rows, transform, info, device) -> float | None:
    """Wall time of the whole pretraining on this machine: seconds per step, from a few real steps
    (real batches of the pretraining images, augmented in this process, as a loader would), times
    ``cfg.iters``. None if a step cannot run here. ``models`` are trained by it: use it last."""
    import torch

    from laplacedrl.data import AugmentedSubset
    from laplacedrl.drl.step import new_training, pretrain_step
    from laplacedrl.engine.timing import time_steps
    images = AugmentedSubset(train, rows, transform)
    tr = new_training(models, C.replace(cfg, compile=False), info, device)

    def step():                                  # the first batch of the images: the timing is the same
        batch = [images[j][0] for j in range(cfg.batch_size // info.world_size)]
        pretrain_step(tr, torch.stack(batch)[:, 0].to(device), cfg, sde)           # (B, C, H, W)
    per_step = time_steps(step)
    return None if per_step is None else per_step * cfg.iters
