"""The one training loop of LaplaceNet: supervised rounds and semi-supervised epochs alike.

:func:`train_epoch` runs the optimiser steps of an epoch over its batches; :func:`copies_loss` is
the loss of one step over the augmented copies, as published (one forward pass per copy).
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from laplacedrl.ssl.mixup import mixup_batch, mixup_cross_entropy


def copies_loss(model, x, y, w, lam, perm, prec, *, channels_last=False, fused=False) -> torch.Tensor:
    """The loss of one step over A augmented copies: cross-entropy in float64, mixed by (lam, perm)
    when perm is given, averaged over the copies and weighted per sample by w (B,).

    ``x`` is (B, A, C, H, W). As published, each copy is one forward pass of B images, so every
    BatchNorm sees batches of B and its running statistics follow the copies in order (the last BN,
    momentum 0.9, ends near the last copy's). ``fused``: one forward pass of all B * A images (faster
    on GPUs; BatchNorm then normalises over every copy at once).
    """
    b, a = x.shape[:2]
    views = [x.flatten(0, 1)] if fused else [x[:, j] for j in range(a)]
    per = []
    for v in views:
        if channels_last:
            v = v.contiguous(memory_format=torch.channels_last)
        with prec.autocast():
            logits, _ = model(v)                                 # (B*A or B, C)
        per.append(mixup_cross_entropy(logits.double().view(b, -1, logits.shape[1]), y, lam, perm))
    per = torch.cat(per, dim=1)                                  # (B, A)
    return (per.mean(1) * w).sum() / w.sum()


def train_epoch(model, opt, batches, steps, lr_at, device, prec, augment, *, mixup_alpha=None,
                channels_last=False, fused_copies=False, desc=None, should_stop=None,
                run_bar=None) -> torch.Tensor:
    """Run up to ``steps`` optimiser steps over ``batches`` of (x, y (B,), w (B,), n_labeled).

    ``augment(x, n_labeled)`` returns the (B, A, C, H, W) augmented copies on the device (identity
    when the loader already augmented on the CPU); the loss is :func:`copies_loss`, with mixup (one
    Beta(alpha, alpha) lambda and one permutation per batch, shared by the copies) when
    ``mixup_alpha`` is given. ``lr_at(step)`` sets the rate. ``desc``: progress-bar title (None: no
    bar). ``should_stop()``, asked after every step, ends the epoch early (a preempted run).
    ``run_bar``: the whole run's progress bar, advanced by every step. Returns the per-step losses
    (steps run,) on device.
    """
    model.train()
    losses = []
    bar = tqdm(total=steps, desc=desc, disable=desc is None, leave=False)
    for step, (x, y, w, n_lab) in zip(range(steps), batches):
        x, y, w = (v.to(device, non_blocking=True) for v in (x, y, w))
        x = augment(x, n_lab)                                    # (B, A, C, H, W)
        for g in opt.param_groups:
            g["lr"] = lr_at(step) * g.get("lr_mult", 1.0)
        lam, perm = mixup_batch(x.shape[0], mixup_alpha, device) if mixup_alpha else (1.0, None)
        if perm is not None:
            x = lam * x + (1 - lam) * x[perm]
        loss = copies_loss(model, x, y, w, lam, perm, prec, channels_last=channels_last, fused=fused_copies)
        opt.zero_grad(set_to_none=True)
        prec.backward(loss)
        prec.step(opt)
        losses.append(loss.detach())
        bar.update()
        if run_bar is not None:
            run_bar.update()
        if desc is not None and step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if should_stop is not None and should_stop():
            break
    bar.close()
    return torch.stack(losses) if losses else torch.zeros(0, device=device)
