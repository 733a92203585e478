"""Noise-level embeddings and the score-SDE initialiser, shared by the encoders and the score network.

* :func:`variance_scaling_` / :func:`default_init_` -- the variance-scaling initialiser the score-SDE
  code uses for its dense layers and convolutions ("fan_avg", uniform).
* :class:`GaussianFourierEmbedding` -- fixed random Fourier features of a scalar noise input.
* :class:`NoiseEmbedding` -- Fourier features followed by the two-layer MLP (Linear, SiLU, Linear).
"""
import math

import torch
from torch import nn

# score-SDE turns an initialiser scale of exactly 0 into this tiny positive value: the weights are
# then ~1e-5 / sqrt(fan) instead of exactly zero (the layer is "almost" zero-initialised).
ZERO_SCALE = 1e-10


def _fans(tensor: torch.Tensor):
    """``(fan_in, fan_out)`` of a weight of shape (out, in, *kernel): ``in * k`` and ``out * k``."""
    if tensor.dim() < 2:
        raise ValueError(f"variance scaling needs a weight with >= 2 dims, got shape {tuple(tensor.shape)}")
    receptive = math.prod(tensor.shape[2:]) if tensor.dim() > 2 else 1
    return tensor.shape[1] * receptive, tensor.shape[0] * receptive


@torch.no_grad()
def variance_scaling_(tensor: torch.Tensor, scale: float = 1.0, mode: str = "fan_avg",
                      distribution: str = "uniform") -> torch.Tensor:
    """Fill ``tensor`` in place with variance ``scale / n`` and return it.

    ``n`` is fan_in, fan_out or their mean (``mode``); the values are drawn from
    ``U(-sqrt(3 var), sqrt(3 var))`` ("uniform") or ``N(0, var)`` ("normal"). Fans follow the
    (out, in, *kernel) layout of PyTorch's Linear and Conv weights.
    """
    fan_in, fan_out = _fans(tensor)
    denominators = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}
    if mode not in denominators:
        raise ValueError(f"unknown variance-scaling mode {mode!r}; valid: {', '.join(denominators)}")
    var = scale / denominators[mode]
    if distribution == "uniform":
        bound = math.sqrt(3.0 * var)
        return tensor.uniform_(-bound, bound)
    if distribution == "normal":
        return tensor.normal_(0.0, math.sqrt(var))
    raise ValueError(f"unknown variance-scaling distribution {distribution!r}; valid: uniform, normal")


def default_init_(tensor: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """score-SDE's ``default_init``: variance scaling, fan_avg, uniform; ``scale == 0`` means 1e-10.

    With scale 1 the bound is ``sqrt(6 / (fan_in + fan_out))`` (Glorot uniform).
    """
    return variance_scaling_(tensor, ZERO_SCALE if scale == 0 else scale, "fan_avg", "uniform")


def dense(in_features: int, out_features: int, scale: float = 1.0) -> nn.Linear:
    """``nn.Linear`` with :func:`default_init_` weights and a zero bias."""
    layer = nn.Linear(in_features, out_features)
    default_init_(layer.weight, scale)
    nn.init.zeros_(layer.bias)
    return layer


class GaussianFourierEmbedding(nn.Module):
    """Random Fourier features of a scalar: ``[sin(2 pi w x), cos(2 pi w x)]`` with fixed ``w ~ N(0, scale^2)``.

    The input is whatever the SDE says networks see (``log sigma(t)`` for VE), shape (B,);
    the output has shape (B, dim), ``dim / 2`` frequencies. ``w`` is a buffer, so it is saved in the
    state_dict and never trained.
    """

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        if dim % 2 or dim < 2:
            raise ValueError(f"embedding dim must be even and >= 2, got {dim}")
        self.register_buffer("w", torch.randn(dim // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = x[:, None].float() * self.w[None, :] * (2 * math.pi)  # (B, dim/2)
        return torch.cat([proj.sin(), proj.cos()], dim=-1)  # (B, dim)


class NoiseEmbedding(nn.Module):
    """``emb = W2 SiLU(W1 fourier(c) + b1) + b2``: (B,) noise inputs -> (B, emb_dim).

    ``fourier`` has ``num_frequencies`` frequencies (``2 * num_frequencies`` features); W1, W2 use
    :func:`default_init_` with zero biases. ``c`` is what the SDE hands to networks (log sigma(t)
    for VE), so the network never sees sigma_min / sigma_max. The score network uses it with
    ``num_frequencies = nf`` and ``emb_dim = 4 nf``; the encoders with 16 and 64.
    """

    def __init__(self, num_frequencies: int, emb_dim: int, fourier_scale: float):
        super().__init__()
        if num_frequencies < 1 or emb_dim < 1:
            raise ValueError(f"num_frequencies and emb_dim must be >= 1, got {num_frequencies}, {emb_dim}")
        self.fourier = GaussianFourierEmbedding(2 * num_frequencies, scale=fourier_scale)
        self.lin1 = dense(2 * num_frequencies, emb_dim)
        self.lin2 = dense(emb_dim, emb_dim)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        h = self.lin1(self.fourier(c))  # (B, emb_dim)
        return self.lin2(nn.functional.silu(h))  # (B, emb_dim)
