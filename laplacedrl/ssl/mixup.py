"""Mixup as LaplaceNet applies it: one lambda and one permutation per batch."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def mixup_batch(batch: int, alpha: float, device=None):
    """Draw ``lambda ~ Beta(alpha, alpha)`` and a permutation of the batch."""
    lam = float(np.random.beta(alpha, alpha))
    return lam, torch.randperm(batch, device=device)


def mixup_cross_entropy(logits: torch.Tensor, y: torch.Tensor, lam: float = 1.0, perm=None):
    """Per-sample, per-copy cross-entropy ``lam CE(y) + (1 - lam) CE(y[perm])``.

    Args:
        logits: (B, A, C) for A augmented copies of each of B images.
        y: (B,) labels. perm: (B,) permutation used to mix the inputs, or None (no mixup).
    Returns:
        (B, A) losses.
    """
    b, a, c = logits.shape
    flat = logits.reshape(b * a, c)
    ce = F.cross_entropy(flat, y.repeat_interleave(a), reduction="none").view(b, a)
    if perm is None:
        return ce
    ce2 = F.cross_entropy(flat, y[perm].repeat_interleave(a), reduction="none").view(b, a)
    return lam * ce + (1 - lam) * ce2
