"""Save a PNG grid comparing the CPU/PIL augmentation (make_transform) with the batched BatchAugment.

Rows, top to bottom: the original images, then for weak and for strong augmentation one row from
the PIL path and one from BatchAugment (same images, independent random draws). Pixels are shown
un-normalised; small images are enlarged (nearest) so that 8x8 digits stay visible.

    python benchmarks/augment_grid.py --dataset digits --out grid_digits.png
    python benchmarks/augment_grid.py --dataset cifar10 --out grid_cifar.png              # synthetic images
    python benchmarks/augment_grid.py --dataset cifar10 --data-dir data --out grid_cifar.png
"""

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.utils import save_image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from laplacedrl.choices import datasets  # noqa: E402
from laplacedrl.data.augment import make_transform  # noqa: E402
from laplacedrl.data.datasets import (CIFAR10_MEAN, CIFAR10_STD,  # noqa: E402
                                      ArrayImageSet, DatasetSpec, load_dataset)
from laplacedrl.data.gpu_augment import BatchAugment, raw_transform  # noqa: E402
from laplacedrl.errors import main_guard  # noqa: E402


def synthetic_images(n, size=32, seed=0):
    """CIFAR-shaped (n, size, size, 3) uint8 images: a colour gradient, a bar, a disc and stripes.

    The shapes are asymmetric so that flips, shears, rotations and translations are easy to see.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    images = []
    for _ in range(n):
        c0, c1, c2 = rng.uniform(0.1, 0.9, (3, 3))
        img = c0 * (1 - xx[..., None]) + c1 * yy[..., None] * 0.8                # (H, W, 3)
        top, left = rng.integers(2, size // 2, 2)
        img[top:top + size // 3, left:left + size // 8] = c2                      # vertical bar
        cy, cx = rng.uniform(0.5, 0.8, 2) * size
        img[(yy * size - cy) ** 2 + (xx * size - cx) ** 2 < (size / 6) ** 2] = 1 - c2   # disc
        img[: size // 6, ::4] = 0.0                                               # stripes at the top
        images.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return np.stack(images)


def pick_images(args):
    """(image set, spec, indices of the images to show)."""
    if args.dataset in ("digits",) or args.data_dir:
        train, _, spec = load_dataset(args.dataset, args.data_dir)
    else:
        print(f"no --data-dir: using synthetic CIFAR-shaped images instead of {args.dataset}")
        images = synthetic_images(args.num_images, seed=args.seed)
        train = ArrayImageSet(images, np.zeros(len(images)), ["x"], [f"{i}.png" for i in range(len(images))])
        spec = DatasetSpec("synthetic", 10, 3, 32, CIFAR10_MEAN, CIFAR10_STD, crop_pad=4, hflip=True)
    idx = np.random.default_rng(args.seed).choice(len(train), min(args.num_images, len(train)), replace=False)
    return train, spec, idx


def build_grid(train, spec, idx, seed=0, device="cpu"):
    """Rows of (len(idx), C, H, W) [0, 1] images: original, PIL weak, batch weak, PIL strong, batch strong."""
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    pils = [train.pil(int(i)) for i in idx]
    x = torch.stack([raw_transform(spec)(p) for p in pils])                       # (N, C, H, W)
    rows = [x]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    for kind in ("weak", "strong"):
        cpu = torch.stack([make_transform(spec, kind)(p) for p in pils])
        dev = BatchAugment(spec, kind).to(device)(x.to(device), generator=g).cpu()
        rows += [cpu * std + mean, dev * std + mean]
    return torch.cat(rows)                                                        # (5N, C, H, W)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="augment_grid.png", help="PNG path to write")
    p.add_argument("--dataset", default="digits", choices=datasets())
    p.add_argument("--data-dir", default=None,
                   help="dataset folder; without it, datasets other than digits use synthetic images")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="device for BatchAugment (cpu, cuda)")
    args = p.parse_args(argv)
    train, spec, idx = pick_images(args)
    grid = build_grid(train, spec, idx, args.seed, args.device)
    scale = max(1, 64 // spec.image_size)
    if scale > 1:
        grid = F.interpolate(grid, scale_factor=scale, mode="nearest")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_image(grid, args.out, nrow=len(idx), padding=2, pad_value=0.5)
    print(f"wrote {args.out}: rows = original, PIL weak, batch weak, PIL strong, batch strong "
          f"({spec.name}, {len(idx)} images)")


if __name__ == "__main__":
    sys.exit(main_guard(main))
