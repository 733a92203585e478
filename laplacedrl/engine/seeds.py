"""Every random stream of a run is derived from (seed, phase, index, rank) in one place.

``derive_seed(seed, phase, index, rank)`` hashes the four numbers with numpy's ``SeedSequence``, so
two different tuples give unrelated seeds (no arithmetic such as ``seed + 7 * epoch + rank``, where
rank 7 at step 0 meets rank 0 at step 1). ``phase`` names what the stream is for; ``index`` is the
epoch, the pretraining step or the t-search phase; ``rank`` the torchrun process.
"""
import random

import numpy as np

PHASES = ("init", "epoch", "labeled", "unlabeled", "pretrain", "pretrain-data", "t-search", "sample",
          "probe")


def derive_seed(seed: int, phase: str, index: int = 0, rank: int = 0) -> int:
    """A 63-bit seed for stream ``phase`` at ``index`` on ``rank`` of a run seeded with ``seed``."""
    if phase not in PHASES:
        raise ValueError(f"unknown seed phase {phase!r}; one of {', '.join(PHASES)}")
    entropy = [int(seed) % 2**63, PHASES.index(phase), int(index), int(rank)]
    words = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (torch on every device)."""
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
