"""Conditional samples from a DRL ``ckpt.pt`` alone (paper Fig. 6): the score net is rebuilt from it.

    python -m laplacedrl.sample runs/drl_digits_.../ckpt.pt --n 64 --out samples.png

The first row of the grid holds the first test images of the checkpoint's dataset; every row below
holds samples of the reverse SDE conditioned on those images' codes, ``E(x_cond, t)`` at each
reverse step's t (VDRL: the mean of q(z | x_cond)). ``pretrain_drl.py --sample N`` calls the same
code after training, or on a finished run.
"""
from __future__ import annotations

import sys
from pathlib import Path

from laplacedrl.config import shared_flag
from laplacedrl.choices import SAMPLERS
from laplacedrl.errors import OneLineParser, UserError, main_guard


def main(argv=None):
    p = OneLineParser(prog="python -m laplacedrl.sample", description=__doc__.split("\n")[0])
    p.add_argument("ckpt", help="ckpt.pt of pretrain_drl.py")
    p.add_argument("--n", type=int, default=64, help="samples (8 conditioning images, n / 8 rows)")
    p.add_argument("--out", default="", help="PNG to write (default: samples.png beside the checkpoint)")
    p.add_argument("--steps", type=int, default=500, help="reverse-SDE steps")
    p.add_argument("--sampler", default="pc", choices=SAMPLERS, help="predictor-corrector or Euler-Maruyama")
    shared_flag(p, "data_dir", "", shown="the checkpoint's --data-dir")
    shared_flag(p, "device")
    shared_flag(p, "seed")
    args = p.parse_args(argv)
    if args.n < 1 or args.steps < 1:
        raise UserError("--n and --steps must be positive")
    from laplacedrl.engine.run import pick_device
    from laplacedrl.recipes.sample import draw_samples
    out = args.out or str(Path(args.ckpt).parent / "samples.png")
    draw_samples(args.ckpt, args.n, out, pick_device(args.device), args.steps, args.sampler, args.seed,
                 args.data_dir)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main_guard(main))
