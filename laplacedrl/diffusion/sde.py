"""Forward SDEs of score-based diffusion: Variance Exploding (VE) and Variance Preserving (VP).

Pure torch, no ``nn.Module`` and no config object: the networks never see ``sigma_min`` /
``sigma_max`` / ``beta_*``; they see :meth:`SDE.net_input` only.

Both SDEs are linear, so the perturbation kernel is Gaussian::

    p_0t(x_t | x_0) = N(x_t; m(t) x_0, s(t)^2 I),    x_t = m(t) x_0 + s(t) * noise

with ``m = mean_coeff(t)`` and ``s = std(t)``. Everything else (marginal, kernel score, the exact
transition used by the samplers, the noise scale networks see) is derived from these two functions
in :class:`SDE`.

What networks see (decided here, once): ``net_input(t) = log noise_scale(t)`` where
``noise_scale(t) = s(t) / m(t)`` is the noise-to-signal ratio, i.e. the std of the VE-equivalent
process ``x_t / m(t) = x_0 + (s / m) * noise``. For VE it is ``log sigma(t)`` (score-SDE's choice for
NCSN++); for VP it is ``0.5 * log(exp(-2 log m) - 1) = -0.5 log SNR(t)``, which keeps growing over the
whole of [0, 1] (``log s(t)`` would flatten to 0 above t ~ 0.4 and give a learnable t no gradient).
It is a differentiable torch function of ``t``, so a trainable ``t`` (train_ssl) goes through it.

Times: ``t`` in [eps, T] with ``T = 1`` and ``eps = 1e-5``; ``t`` is a tensor of shape (B,).
"""
import math
from typing import Optional, Sequence, Tuple

import torch

T = 1.0
EPS = 1e-5


def per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample (B,) tensor to (B, 1, ..., 1) so that it broadcasts against ``x``."""
    return v.reshape(-1, *([1] * (x.dim() - 1)))


class SDE:
    """A linear forward SDE ``dx = f(t) x dt + g(t) dw`` on t in [0, T].

    Subclasses define ``mean_coeff(t)``, ``std(t)``, ``sde(x, t)``, ``prior_sampling``, the inverse
    ``t_of_noise_scale`` and ``to_dict``.
    """

    name = ""
    T = T
    eps = EPS

    # ---- defined by subclasses -------------------------------------------------------------
    def mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """m(t): the kernel mean is ``m(t) * x_0``. (B,) -> (B,)."""
        raise NotImplementedError

    def std(self, t: torch.Tensor) -> torch.Tensor:
        """s(t): the kernel std. (B,) -> (B,)."""
        raise NotImplementedError

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Drift ``f(x, t)`` (shape of x) and diffusion ``g(t)`` (B,) of the forward SDE."""
        raise NotImplementedError

    def prior_sampling(self, shape: Sequence[int], generator: Optional[torch.Generator] = None,
                       device=None) -> torch.Tensor:
        """A sample of the prior p_T, of the given shape."""
        raise NotImplementedError

    def t_of_noise_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`noise_scale`: the t at which ``s(t) / m(t) = scale``."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        """Plain dict ``{"name": ..., <constructor args>}``; :func:`sde_from_dict` rebuilds it."""
        raise NotImplementedError

    # ---- derived ---------------------------------------------------------------------------
    def marginal_prob(self, x0: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean ``m(t) x_0`` (shape of x0) and std ``s(t)`` (B,) of p_0t(x_t | x_0)."""
        return per_sample(self.mean_coeff(t), x0) * x0, self.std(t)

    def perturb(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = m(t) x_0 + s(t) * noise`` with noise ~ N(0, I) of the shape of x0."""
        mean, std = self.marginal_prob(x0, t)
        return mean + per_sample(std, x0) * noise

    def kernel_score(self, xt: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad_{x_t} log p_0t(x_t | x_0) = -(x_t - m(t) x_0) / s(t)^2  (= -noise / s(t))."""
        mean, std = self.marginal_prob(x0, t)
        return -(xt - mean) / per_sample(std, x0) ** 2

    def noise_scale(self, t: torch.Tensor) -> torch.Tensor:
        """Noise-to-signal ratio s(t) / m(t): the std of the VE-equivalent process. (B,) -> (B,)."""
        return self.std(t) / self.mean_coeff(t)

    def net_input(self, t: torch.Tensor) -> torch.Tensor:
        """What the encoder and the score network see: ``log(s(t) / m(t))``, (B,) -> (B,).

        The one place that decides it (see the module docstring); differentiable in ``t``.
        """
        return torch.log(self.noise_scale(t))

    def discretize(self, x: torch.Tensor, t: torch.Tensor, dt: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """Exact one-step transition from ``t - dt`` to ``t``: ``x_t = x + f + G * z``.

        With ``a = m(t) / m(t - dt)``: ``f = (a - 1) x`` and ``G^2 = s(t)^2 - a^2 s(t - dt)^2``
        (VE: ``f = 0, G^2 = sigma(t)^2 - sigma(t - dt)^2``; VP: ``G^2 = 1 - a^2``).
        Returns ``f`` (shape of x) and ``G`` (B,), as score-SDE's ``SDE.discretize``.
        """
        s = t - dt
        a = self.mean_coeff(t) / self.mean_coeff(s)
        g2 = self.std(t) ** 2 - a ** 2 * self.std(s) ** 2
        return (per_sample(a, x) - 1.0) * x, torch.sqrt(g2.clamp_min(0.0))


class VESDE(SDE):
    """Variance Exploding SDE: ``dx = sqrt(d sigma^2 / dt) dw``, sigma(t) = s_min (s_max / s_min)^t.

    As in score-SDE the kernel std is ``sigma(t)`` itself (not sqrt(sigma(t)^2 - sigma(0)^2)), so
    ``std(0) = sigma_min`` and ``std(1) = sigma_max``; the prior is N(0, sigma_max^2 I).
    """

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"VE SDE needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t) = sigma_min * (sigma_max / sigma_min) ** t."""
        return self.sigma_min * torch.exp(t * self.log_ratio)

    def mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t)

    def std(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma(t)

    def sde(self, x, t):
        """f = 0, g(t) = sigma(t) * sqrt(2 log(sigma_max / sigma_min)) = sqrt(d sigma^2 / dt)."""
        return torch.zeros_like(x), self.sigma(t) * math.sqrt(2.0 * self.log_ratio)

    def prior_sampling(self, shape, generator=None, device=None):
        return torch.randn(*shape, generator=generator, device=device) * self.sigma_max

    def t_of_noise_scale(self, scale):
        """t = log(sigma / sigma_min) / log(sigma_max / sigma_min)."""
        return torch.log(scale / self.sigma_min) / self.log_ratio

    def to_dict(self):
        return {"name": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class VPSDE(SDE):
    """Variance Preserving SDE: ``dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw``, beta linear in t.

    With ``B(t) = int_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2``:
    ``m(t) = exp(-B(t) / 2)`` and ``s(t) = sqrt(1 - exp(-B(t)))``; the prior is N(0, I).
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 < beta_min <= beta_max:
            raise ValueError(f"VP SDE needs 0 < beta_min <= beta_max, got {beta_min}, {beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """beta(t) = beta_min + t (beta_max - beta_min)."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t: torch.Tensor) -> torch.Tensor:
        """B(t) = int_0^t beta(u) du = beta_min t + (beta_max - beta_min) t^2 / 2."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t ** 2

    def mean_coeff(self, t):
        return torch.exp(-0.5 * self.integrated_beta(t))

    def std(self, t):
        return torch.sqrt(-torch.expm1(-self.integrated_beta(t)))

    def noise_scale(self, t):
        """s / m = sqrt(exp(B(t)) - 1), computed without cancellation at small t."""
        return torch.sqrt(torch.expm1(self.integrated_beta(t)))

    def sde(self, x, t):
        """f = -beta(t) x / 2, g(t) = sqrt(beta(t))."""
        beta = self.beta(t)
        return -0.5 * per_sample(beta, x) * x, torch.sqrt(beta)

    def prior_sampling(self, shape, generator=None, device=None):
        return torch.randn(*shape, generator=generator, device=device)

    def t_of_noise_scale(self, scale):
        """Solve B(t) = log(1 + scale^2) for t (the positive root of a quadratic)."""
        target = torch.log1p(scale ** 2)
        slope = self.beta_max - self.beta_min
        if slope == 0:
            return target / self.beta_min
        return (torch.sqrt(self.beta_min ** 2 + 2.0 * slope * target) - self.beta_min) / slope

    def to_dict(self):
        return {"name": self.name, "beta_min": self.beta_min, "beta_max": self.beta_max}


SDES = {VESDE.name: VESDE, VPSDE.name: VPSDE}


def sde_from_dict(d: dict) -> SDE:
    """Rebuild an SDE from :meth:`SDE.to_dict` output (missing parameters take their defaults)."""
    params = dict(d)
    name = params.pop("name", None)
    if name not in SDES:
        raise ValueError(f"unknown SDE {name!r}; expected one of {sorted(SDES)}")
    return SDES[name](**params)
