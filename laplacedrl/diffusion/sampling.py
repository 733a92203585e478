"""Reverse-SDE samplers: Euler-Maruyama and predictor-corrector (score-SDE, Song et al. 2021).

Both take ``score_fn(x, t) -> score`` with ``t`` of shape (B,) (build one for a conditional score
net with :func:`conditional_score_fn`), walk ``steps`` steps on the grid ``t_0 = t_start > ... >
t_steps = eps`` and return the final sample; the last step adds no noise (score-SDE's
``noise_removal``), so what comes back is the denoised mean at ``t = eps``.

Reverse SDE: ``dx = [f(x, t) - g(t)^2 score(x, t)] dt + g(t) dw_bar`` run from t_start down to eps.
"""
from typing import Callable, Optional, Sequence

import torch

from laplacedrl.diffusion.losses import model_score
from laplacedrl.diffusion.sde import EPS, SDE, per_sample

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def conditional_score_fn(score_net, sde: SDE, code: torch.Tensor) -> ScoreFn:
    """``score_fn(x, t) = s_theta(x, t, code)`` for the samplers (``code`` is (B, code_dim))."""
    return lambda x, t: model_score(score_net, sde, x, t, code)


def _start(sde: SDE, shape, t_start, x_start, generator, device):
    """The initial state: ``x_start`` if given (e.g. a noised image, paper Fig. 6), else the prior.

    For ``t_start < 1`` without ``x_start`` the prior is rescaled to the marginal scale at t_start.
    """
    if x_start is not None:
        return x_start.to(device)
    x = sde.prior_sampling(shape, generator=generator, device=device)
    if t_start < 1.0:
        t = torch.tensor([t_start, 1.0], device=device)
        x = x * (sde.std(t[:1]) / sde.std(t[1:]))
    return x


def _time_grid(steps: int, t_start: float, eps: float, device) -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(t_start, eps, steps + 1, device=device)


@torch.no_grad()
def euler_maruyama_sampler(score_fn: ScoreFn, sde: SDE, shape: Sequence[int], steps: int = 500,
                           generator: Optional[torch.Generator] = None, device=None, eps: float = EPS,
                           *, t_start: float = 1.0, x_start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE: ``x <- x - [f - g^2 score] dt + g sqrt(dt) z``."""
    x = _start(sde, shape, t_start, x_start, generator, device)
    ts = _time_grid(steps, t_start, eps, device)
    for i in range(steps):
        t = ts[i].expand(x.shape[0])
        dt = float(ts[i] - ts[i + 1])
        drift, g = sde.sde(x, t)
        g = per_sample(g, x)
        x_mean = x - (drift - g ** 2 * score_fn(x, t)) * dt
        z = torch.randn(x.shape, generator=generator, device=x.device)
        x = x_mean + g * dt ** 0.5 * z if i < steps - 1 else x_mean
    return x


@torch.no_grad()
def pc_sampler(score_fn: ScoreFn, sde: SDE, shape: Sequence[int], steps: int = 500, snr: float = 0.16,
               n_corrector: int = 1, generator: Optional[torch.Generator] = None, device=None,
               *, eps: float = EPS, t_start: float = 1.0, x_start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Predictor-corrector: at each grid time, ``n_corrector`` Langevin steps then one reverse-diffusion step.

    Corrector (annealed Langevin, signal-to-noise ``snr``): ``step = 2 alpha (snr ||z|| / ||score||)^2``,
    ``x <- x + step * score + sqrt(2 step) z`` with alpha = 1 (VE) or the one-step signal retention
    ``a^2`` (VP); skipped while the score is exactly 0 (an untrained, zero-initialised net).
    Predictor (reverse diffusion on the exact transition ``x_t = x_{t-dt} + f + G z``):
    ``x <- x - f + G^2 score + G z``.
    """
    x = _start(sde, shape, t_start, x_start, generator, device)
    ts = _time_grid(steps, t_start, eps, device)
    for i in range(steps):
        t = ts[i].expand(x.shape[0])
        dt = float(ts[i] - ts[i + 1])
        alpha = per_sample((sde.mean_coeff(t) / sde.mean_coeff(t - dt)) ** 2, x)
        for _ in range(n_corrector):
            grad = score_fn(x, t)
            z = torch.randn(x.shape, generator=generator, device=x.device)
            grad_norm = grad.flatten(1).norm(dim=1).mean()
            z_norm = z.flatten(1).norm(dim=1).mean()
            if grad_norm == 0:
                break
            step = 2.0 * alpha * (snr * z_norm / grad_norm) ** 2
            x = x + step * grad + torch.sqrt(2.0 * step) * z
        f, big_g = sde.discretize(x, t, dt)
        big_g = per_sample(big_g, x)
        x_mean = x - f + big_g ** 2 * score_fn(x, t)
        z = torch.randn(x.shape, generator=generator, device=x.device)
        x = x_mean + big_g * z if i < steps - 1 else x_mean
    return x
