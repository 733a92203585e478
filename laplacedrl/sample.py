"""Conditional samples from a DRL ``ckpt.pt`` alone (paper Fig. 6): the score net is rebuilt from it.

    python -m laplacedrl.sample runs/drl_digits_.../ckpt.pt --n 64 --out samples.png

The first row of the grid holds the first test images of the checkpoint's dataset; every row below
holds samples of the reverse SDE conditioned on those images' codes, ``E(x_cond, t)`` at each
reverse step's t (VDRL: the mean of q(z | x_cond)). ``pretrain_drl.py --sample N`` calls the same
code after training, or on a finished run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from laplacedrl.engine.run import main_guard
from laplacedrl.errors import UserError


def draw_samples(ckpt_path, n: int, png, device="cpu", steps: int = 500, sampler: str = "pc",
                 seed: int = 0, data_dir: str = ""):
    """Write a grid of ``n`` conditional samples (and their conditioning images) to ``png``.

    Returns the grid tensor (3, H', W') in [0, 1].
    """
    import torch
    from torchvision.utils import make_grid, save_image

    from laplacedrl.data import load_dataset, make_transform
    from laplacedrl.diffusion.losses import encode, model_score
    from laplacedrl.diffusion.sampling import euler_maruyama_sampler, pc_sampler
    from laplacedrl.engine.checkpoint import load_score_model
    from laplacedrl.engine.seeds import derive_seed

    encoder, head, net, sde, ck = load_score_model(ckpt_path, "checkpoint")
    if ck["objective"] == "ae":
        raise UserError(f"{ckpt_path} is an autoencoder checkpoint: it has no score model to sample")
    device = torch.device(device)
    encoder, net = encoder.to(device), net.to(device)
    head = head.to(device) if head is not None else None
    _, test, spec = load_dataset(ck["dataset"]["name"], data_dir or ck["dataset"].get("data_dir") or None)
    evalt = make_transform(spec, "eval")
    n_cond = min(8, len(test), n)
    per = max(1, n // n_cond)
    x_cond = torch.stack([evalt(test.pil(i)) for i in range(n_cond)]).to(device)    # (n, C, H, W)
    x_rep = x_cond.repeat(per, 1, 1, 1)

    def code(t):
        feat = encode(encoder, sde, x_rep, t)
        return head(feat)[0] if head is not None else feat

    def score_fn(x, t):
        return model_score(net, sde, x, t, code(t))

    run = pc_sampler if sampler == "pc" else euler_maruyama_sampler
    g = torch.Generator(device=device).manual_seed(derive_seed(seed, "sample") % 2**63)
    with torch.no_grad():
        samples = run(score_fn, sde, x_rep.shape, steps=steps, generator=g, device=device)
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    grid = make_grid(((torch.cat([x_cond, samples]) * std + mean).clamp(0, 1)).cpu(), nrow=n_cond,
                     padding=1, pad_value=1.0)
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, png)
    return grid


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m laplacedrl.sample", description=__doc__.split("\n")[0])
    p.add_argument("ckpt", help="ckpt.pt of pretrain_drl.py")
    p.add_argument("--n", type=int, default=64, help="samples (8 conditioning images, n / 8 rows)")
    p.add_argument("--out", default="", help="PNG to write (default: samples.png beside the checkpoint)")
    p.add_argument("--steps", type=int, default=500, help="reverse-SDE steps")
    p.add_argument("--sampler", default="pc", choices=("pc", "em"), help="predictor-corrector or Euler-Maruyama")
    p.add_argument("--data-dir", default="", help="default: the checkpoint's --data-dir")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.n < 1 or args.steps < 1:
        raise UserError("--n and --steps must be positive")
    from laplacedrl.engine.run import pick_device
    out = args.out or str(Path(args.ckpt).parent / "samples.png")
    draw_samples(args.ckpt, args.n, out, pick_device(args.device), args.steps, args.sampler, args.seed,
                 args.data_dir)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main_guard(main))
