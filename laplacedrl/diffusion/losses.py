"""Pretraining objectives: conditional denoising score matching (DRL, VDRL, mixup-DRL) and the
autoencoder baseline, as the published score-SDE code of the DRL paper computes them. Plain
functions with explicit arguments; each objective returns a dict with ``"loss"`` (scalar, with grad)
and its named terms (detached scalars, for TensorBoard).

Networks (see :mod:`laplacedrl.models`):
    ``encoder(x0, noise=c) -> (logits, feat)``, ``feat`` (B, D) is the code (Eq. 9: the encoder sees t);
    ``score_net(x_t, c, code, std=s) -> score`` (B, C, H, W);
with ``c = sde.net_input(t)`` and ``s = sde.std(t)``: :func:`model_score` is the one place where a
score network is called with a time.

Scale: the DSM term is half the sum over pixels, averaged over the batch (score-SDE with
``reduce_mean=False``); a model that outputs 0 scores exactly half the dimension count. The code
penalties (L1, KL) are not halved.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from laplacedrl.choices import OBJECTIVES, T_SAMPLING_HELP, parse_t_sampling  # noqa: F401 (re-exported)
from laplacedrl.diffusion.sde import EPS, SDE, per_sample


# ---- time sampling --------------------------------------------------------------------------
def sample_t(batch: int, mode: str, sde: SDE, generator: Optional[torch.Generator] = None,
             eps: float = EPS, device=None) -> torch.Tensor:
    """Diffusion times, shape (batch,), for one training batch.

    * ``uniform``: t ~ U(eps, 1) (published).
    * ``high-noise`` ("focus on high noise levels", paper Fig. 2-3): the noise scale ``s(t)/m(t)`` is
      uniform between its values at t = 0 and t = 1, then mapped back to t (clamped to >= eps).
      VE: sigma ~ U(sigma_min, sigma_max), ``t = log(sigma / sigma_min) / log(sigma_max / sigma_min)``.
      VP: the noise-to-signal ratio ``sqrt(exp(B(t)) - 1)`` ~ U(0, ~152), i.e. most t above 0.6.
    * ``fixed:<t>``: every t equals the given value (single-timescale training, App. H).
    """
    kind, value = parse_t_sampling(mode)
    if kind == "fixed":
        return torch.full((batch,), value, device=device)
    u = torch.rand(batch, generator=generator, device=device)
    if kind == "uniform":
        return eps + (1.0 - eps) * u
    lo, hi = sde.noise_scale(torch.tensor([0.0, 1.0], device=device))
    return sde.t_of_noise_scale(lo + (hi - lo) * u).clamp(eps, 1.0)


# ---- denoising score matching ---------------------------------------------------------------
def model_score(score_net, sde: SDE, xt: torch.Tensor, t: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """s_theta(x_t, t, code) = ``score_net(x_t, sde.net_input(t), code, std=sde.std(t))``."""
    return score_net(xt, sde.net_input(t), code, std=sde.std(t))


def dsm_loss(score_net, sde: SDE, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             code: torch.Tensor) -> torch.Tensor:
    """Per-sample DSM with lambda(t) = s(t)^2, shape (B,)::

        1/2 lambda(t) || s_theta(x_t, t, z) - grad log p_0t(x_t | x_0) ||^2 = 1/2 || s(t) s_theta(x_t, t, z) + noise ||^2

    summed over pixels, where ``x_t = m(t) x_0 + s(t) noise`` (the kernel score is ``-noise / s(t)``).
    """
    xt = sde.perturb(x0, t, noise)
    score = model_score(score_net, sde, xt, t, code)
    return 0.5 * (per_sample(sde.std(t), x0) * score + noise).pow(2).flatten(1).sum(1)


def _noise_like(x0: torch.Tensor, noise: Optional[torch.Tensor], generator) -> torch.Tensor:
    """The given noise, or fresh N(0, I) noise of the shape of x0 drawn from ``generator``."""
    if noise is not None:
        return noise
    return torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)


def encode(encoder, sde: SDE, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The time-conditioned code E_phi(x_0, t) = ``encoder(x0, noise=sde.net_input(t))[1]``, (B, D)."""
    return encoder(x0, noise=sde.net_input(t))[1]


# ---- objectives -----------------------------------------------------------------------------
def drl_loss(encoder, score_net, sde: SDE, x0: torch.Tensor, t: torch.Tensor,
             noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
             l1_weight: float = 1e-5) -> dict:
    """DRL, Eq. 9: ``mean_B[ DSM(x_0, t, E(x_0, t)) ] + l1_weight * mean_B ||E(x_0, t)||_1``.

    Returns ``{"loss", "dsm", "reg"}``.
    """
    noise = _noise_like(x0, noise, generator)
    code = encode(encoder, sde, x0, t)  # (B, D)
    dsm = dsm_loss(score_net, sde, x0, t, noise, code).mean()
    reg = l1_weight * code.abs().sum(1).mean()
    return {"loss": dsm + reg, "dsm": dsm.detach(), "reg": reg.detach()}


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, diag e^logvar) || N(0, I)) = 1/2 sum(mean^2 + e^logvar - 1 - logvar), shape (B,)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)


def vdrl_loss(encoder, head, score_net, sde: SDE, x0: torch.Tensor, t: torch.Tensor,
              noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
              *, kl_weight: float = 1e-5) -> dict:
    """VDRL, Eq. 8 with the time-conditioned encoder: ``(mean, logvar) = head(E(x_0, t))``,
    ``z = mean + exp(logvar / 2) * e`` (reparameterised), loss ``mean_B[DSM(x_0, t, z)] +
    kl_weight * mean_B KL(q(z | x_0) || N(0, I))``. Returns ``{"loss", "dsm", "kl"}``.
    """
    noise = _noise_like(x0, noise, generator)
    mean, logvar = head(encode(encoder, sde, x0, t))  # (B, code_dim) each
    e = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    z = mean + torch.exp(0.5 * logvar) * e
    dsm = dsm_loss(score_net, sde, x0, t, noise, z).mean()
    kl = kl_weight * gaussian_kl(mean, logvar).mean()
    return {"loss": dsm + kl, "dsm": dsm.detach(), "kl": kl.detach()}


def mixup_drl_loss(encoder, score_net, sde: SDE, x0: torch.Tensor, t: torch.Tensor,
                   noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                   *, alpha: float = 1.0, lam: Optional[torch.Tensor] = None,
                   l1_weight: float = 1e-5) -> dict:
    """Mixup-DRL as published: only the ENCODER sees a mixture, the score net denoises the original.

    Per image i: ``lam_i ~ Beta(alpha, alpha)`` and a partner ``perm[i]`` (a random permutation);
    the code is ``z_i = E(lam_i x0_i + (1 - lam_i) x0_perm[i], t_i)`` and the loss is
    ``mean_B[ 2 lam_i DSM(x0_i, t_i, z_i) ] + l1_weight * mean_B ||z_i||_1``: a code that mostly
    describes the partner is weighted down. ``lam`` (B,) may be given (tests). Returns
    ``{"loss", "dsm", "reg", "lam"}`` (``lam``: the batch mean).
    """
    noise = _noise_like(x0, noise, generator)
    b = x0.shape[0]
    if lam is None:
        lam = torch.distributions.Beta(alpha, alpha).sample((b,)).to(x0.device)
    perm = torch.randperm(b, generator=generator).to(x0.device)
    w = per_sample(lam, x0)
    code = encode(encoder, sde, w * x0 + (1.0 - w) * x0[perm], t)     # (B, D)
    dsm = (2.0 * lam * dsm_loss(score_net, sde, x0, t, noise, code)).mean()
    reg = l1_weight * code.abs().sum(1).mean()
    return {"loss": dsm + reg, "dsm": dsm.detach(), "reg": reg.detach(), "lam": lam.mean().detach()}


def to_unit_interval(x: torch.Tensor, mean=0.5, std=0.5) -> torch.Tensor:
    """Undo the input normalisation ``x = (p - mean) / std`` channel-wise: ``p = x * std + mean``,
    clamped to [0, 1]. ``mean``/``std`` are floats or per-channel sequences (defaults: [-1, 1] data).
    """
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(shape)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(shape)
    return (x * std + mean).clamp(0.0, 1.0)


def ae_loss(encoder, score_net, sde: SDE, x0: torch.Tensor, t: torch.Tensor, mean=0.5, std=0.5,
            l1_weight: float = 1e-5) -> dict:
    """Autoencoder baseline as published: the DRL model trained on reconstruction alone.

    ``code = E(x_0, t)``; the score net's decoder, conditioned on the noise level and the code
    (``score_net.reconstruct``), gives image logits; loss =
    ``mean_B[ 1/2 sum_pixels BCE(sigmoid(logits), p) ] + l1_weight * mean_B ||code||_1`` with
    ``p = to_unit_interval(x_0, mean, std)`` the image in [0, 1]. Returns ``{"loss", "bce", "reg"}``.
    """
    code = encode(encoder, sde, x0, t)
    logits = score_net.reconstruct(sde.net_input(t), code)          # (B, C, H, W)
    target = to_unit_interval(x0, mean, std)
    bce = 0.5 * F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(1).mean()
    reg = l1_weight * code.abs().sum(1).mean()
    return {"loss": bce + reg, "bce": bce.detach(), "reg": reg.detach()}
