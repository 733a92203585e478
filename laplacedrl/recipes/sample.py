"""Conditional samples from a DRL ``ckpt.pt`` alone (paper Fig. 6): the score net is rebuilt from it.

The first row of the grid holds the first test images of the checkpoint's dataset; every row below
holds samples of the reverse SDE conditioned on those images' codes, ``E(x_cond, t)`` at each
reverse step's t (VDRL: the mean of q(z | x_cond)). ``python -m laplacedrl.sample`` and
``pretrain_drl.py --sample N`` both call :func:`draw_samples`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from laplacedrl.data import load_dataset, make_transform
from laplacedrl.diffusion.losses import encode, model_score
from laplacedrl.diffusion.sampling import euler_maruyama_sampler, pc_sampler
from laplacedrl.engine.checkpoint import load_score_model
from laplacedrl.engine.run import log
from laplacedrl.engine.seeds import torch_generator
from laplacedrl.errors import UserError


def draw_samples(ckpt_path, n: int, png, device="cpu", steps: int = 500, sampler: str = "pc",
                 seed: int = 0, data_dir: str = ""):
    """Write a grid of ``n`` conditional samples (and their conditioning images) to ``png``.

    Returns the grid tensor (3, H', W') in [0, 1].
    """
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
    g = torch_generator(seed, "sample", device=device)
    with torch.no_grad():
        samples = run(score_fn, sde, x_rep.shape, steps=steps, generator=g, device=device)
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    grid = make_grid(((torch.cat([x_cond, samples]) * std + mean).clamp(0, 1)).cpu(), nrow=n_cond,
                     padding=1, pad_value=1.0)
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, png)
    return grid


def sample_to_png(ckpt_path, cfg, png, device, writer=None):
    """``pretrain_drl.py --sample N``: :func:`draw_samples` with the run's settings (and TensorBoard)."""
    grid = draw_samples(ckpt_path, cfg.sample, png, device=device, steps=cfg.sample_steps,
                        sampler=cfg.sampler, seed=cfg.seed, data_dir=cfg.data_dir)
    if writer is not None:
        writer.add_image("samples/conditional", grid, cfg.iters)
    log.info(f"wrote {png}")
