"""LaplaceNet's transforms and a dataset view that returns several augmented copies per image.

weak   = [horizontal flip] -> random crop with reflect padding -> RandAugment(1 op) -> tensor -> normalise
strong = the same with RandAugment(2 ops)
eval   = tensor -> normalise
RandAugment is torchvision's (fixed magnitude ``ra_magnitude`` out of 31 bins).
"""

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

KINDS = ("weak", "strong", "eval")
DEFAULT_RA_OPS = {"weak": 1, "strong": 2}


def make_transform(spec, kind, ra_ops=None, ra_magnitude=10):
    """PIL image -> normalised float tensor (C, H, W) for ``kind`` in ``KINDS``.

    ``ra_ops`` is the number of RandAugment ops (default 1 for weak, 2 for strong; 0 = none); the
    crop uses ``spec.crop_pad`` (0 = no crop) and the flip ``spec.hflip``. Normalise:
    ``x = (pixel / 255 - spec.mean) / spec.std`` per channel.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown transform kind '{kind}'; choose one of {', '.join(KINDS)}")
    steps = []
    if kind != "eval":
        ra_ops = DEFAULT_RA_OPS[kind] if ra_ops is None else ra_ops
        if spec.hflip:
            steps.append(T.RandomHorizontalFlip())
        if spec.crop_pad > 0:
            steps.append(T.RandomCrop(spec.image_size, padding=spec.crop_pad, padding_mode="reflect"))
        if ra_ops > 0:
            steps.append(T.RandAugment(num_ops=ra_ops, magnitude=ra_magnitude))
    steps += [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    return T.Compose(steps)


class AugmentedSubset(Dataset):
    """The images ``indices`` of ``imageset``; item ``j`` -> ``(x, indices[j])``.

    ``x`` is (aug_num, C, H, W): ``aug_num`` independent draws of ``transform``. Labels are not
    returned: the caller looks them (or the current pseudo-labels) up by the dataset index.
    """

    def __init__(self, imageset, indices, transform, aug_num=1):
        if aug_num < 1:
            raise ValueError(f"aug_num must be at least 1, got {aug_num}")
        self.imageset = imageset
        self.indices = np.asarray(indices, dtype=np.int64)  # (M,)
        self.transform = transform
        self.aug_num = aug_num

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        index = int(self.indices[j])
        image = self.imageset.pil(index)
        x = torch.stack([self.transform(image) for _ in range(self.aug_num)])  # (aug_num, C, H, W)
        return x, index
