"""An example folder of your own images, in the layout ``--dataset imagefolder`` reads.

    python -m laplacedrl.demo_images my_images [--size 16] [--labeled 3] [--unlabeled 50] [--test 10]

Four classes of small RGB pictures (a red square, a green horizontal bar, a blue vertical bar, a
yellow diagonal, each at a random place on a noisy background): ``labeled/<class>/`` (3 per class),
``unlabeled/`` (50 per class, their classes not told) and ``test/<class>/`` (10 per class). The
README's worked example and the tests run on it.
"""
import sys
from pathlib import Path

import numpy as np

from laplacedrl.config import shared_flag
from laplacedrl.errors import OneLineParser, UserError, main_guard

CLASSES = ("red_square", "green_bar", "blue_column", "yellow_diagonal")


def picture(k: int, size: int, rng) -> np.ndarray:
    """One (size, size, 3) uint8 picture of class ``k``."""
    img = rng.integers(0, 60, (size, size, 3)).astype(np.int32)               # dark noisy background
    s = max(2, size // 3)
    y, x = rng.integers(0, size - s + 1, 2)
    color = [(230, 40, 40), (40, 220, 40), (50, 60, 240), (230, 220, 40)][k]
    if k == 0:
        img[y:y + s, x:x + s] = color
    elif k == 1:
        img[y:y + max(1, s // 3), :] = color
    elif k == 2:
        img[:, x:x + max(1, s // 3)] = color
    else:
        idx = np.arange(size)
        img[idx, (idx + x) % size] = color
    return np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)


def write_demo(root, size: int = 16, labeled: int = 3, unlabeled: int = 50, test: int = 10, seed: int = 0) -> dict:
    """Write the example folder under ``root``; returns the image counts per split."""
    from PIL import Image

    from laplacedrl.engine.seeds import numpy_rng
    rng = numpy_rng(seed, "demo")
    root = Path(root)
    counts = {"labeled": 0, "unlabeled": 0, "test": 0}
    for k, name in enumerate(CLASSES):
        for split, n in (("labeled", labeled), ("unlabeled", unlabeled), ("test", test)):
            folder = root / split / (name if split != "unlabeled" else f"batch{k}")
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(picture(k, size, rng)).save(folder / f"{name[:3]}{k}_{i:03d}.png")
                counts[split] += 1
    return counts


def main(argv=None):
    p = OneLineParser(prog="python -m laplacedrl.demo_images", description=__doc__.split("\n")[0])
    p.add_argument("folder", help="where to write it (must not exist yet, or be empty)")
    p.add_argument("--size", type=int, default=16, help="image side in pixels")
    p.add_argument("--labeled", type=int, default=3, help="labeled images per class")
    p.add_argument("--unlabeled", type=int, default=50, help="unlabeled images per class")
    p.add_argument("--test", type=int, default=10, help="test images per class")
    shared_flag(p, "seed")
    args = p.parse_args(argv)
    root = Path(args.folder)
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{root} exists and is not empty")
    if args.size < 4 or min(args.labeled, args.unlabeled, args.test) < 0 or args.labeled < 1:
        raise UserError("--size must be >= 4 and --labeled >= 1")
    counts = write_demo(root, args.size, args.labeled, args.unlabeled, args.test, seed=args.seed)
    print(f"wrote {root}: " + ", ".join(f"{n} {split}" for split, n in counts.items()) + f" images of {args.size}x"
          f"{args.size}, {len(CLASSES)} classes")


if __name__ == "__main__":
    sys.exit(main_guard(main))
