"""Every random stream of a run comes from here: (seed, phase, index, rank) -> an independent stream.

``derive_seed(seed, phase, index, rank)`` hashes the four numbers with numpy's ``SeedSequence``, so
two different tuples give unrelated seeds (no arithmetic such as ``seed + 7 * epoch + rank``, where
rank 7 at step 0 meets rank 0 at step 1, and no ``default_rng([seed, epoch])``, which numpy makes
the same stream as ``default_rng(seed)`` at epoch 0). ``phase`` names what the stream is for:

==============  ==========================================================================
init            model initialisation (both CLIs)
epoch           global generators at the start of an SSL epoch (mixup draws); index = epoch
labeled         the labeled batch stream of an SSL epoch (order and per-item augmentation)
unlabeled       the pseudo-labeled batch stream of an SSL epoch
pretrain        global generators when pretraining starts or resumes; index = step
pretrain-data   the pretraining batch stream (per-item augmentation)
t-search        the base seed of a t-search phase's streams; index = phase
sample          the conditional sampler
probe           the probe's random encoder, MLP, subset and SVC labels
carve           the fixed --train-subset / --val-images draw (seed 0 for every run)
order           the shuffled order of a pass over the data; index = epoch or pass
loader          a DataLoader's private generator (the workers' base seed, otherwise unused)
demo            the example image folder of ``python -m laplacedrl.demo_images``
==============  ==========================================================================

One stream predates this module and is kept as it was, so that existing label splits do not
change: the class-balanced label draw, ``numpy.random.default_rng(seed)`` (:func:`split_rng`).
"""
import random

import numpy as np

PHASES = ("init", "epoch", "labeled", "unlabeled", "pretrain", "pretrain-data", "t-search", "sample",
          "probe", "carve", "order", "loader", "demo", "handoff")


def derive_seed(seed: int, phase: str, index: int = 0, rank: int = 0) -> int:
    """A 63-bit seed for stream ``phase`` at ``index`` on ``rank`` of a run seeded with ``seed``."""
    if phase not in PHASES:
        raise ValueError(f"unknown seed phase {phase!r}; one of {', '.join(PHASES)}")
    entropy = [int(seed) % 2**63, PHASES.index(phase), int(index), int(rank)]
    words = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def numpy_rng(seed: int, phase: str, index: int = 0, rank: int = 0) -> np.random.Generator:
    """A numpy Generator on the stream :func:`derive_seed` names."""
    return np.random.default_rng(derive_seed(seed, phase, index, rank))


def torch_generator(seed: int, phase: str, index: int = 0, rank: int = 0, device="cpu"):
    """A torch Generator (on ``device``) on the stream :func:`derive_seed` names."""
    import torch
    return torch.Generator(device=device).manual_seed(derive_seed(seed, phase, index, rank))


def split_rng(seed: int) -> np.random.Generator:
    """The label-split stream, ``numpy.random.default_rng(seed)``: older than :func:`derive_seed` and
    kept unchanged so that a seed's split stays the split it always was."""
    return np.random.default_rng(seed)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (torch on every device)."""
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_torch_cpu(seed: int) -> None:
    """Seed torch's CPU generator only (``torch.manual_seed`` also seeds every GPU: ~0.3 ms a call)."""
    import torch
    torch.default_generator.manual_seed(seed)
