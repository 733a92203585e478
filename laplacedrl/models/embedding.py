"""Noise-level embeddings shared by the encoder and the score network."""
import math

import torch
from torch import nn


class GaussianFourierEmbedding(nn.Module):
    """Random Fourier features of a scalar: ``[sin(2 pi w x), cos(2 pi w x)]`` with fixed ``w ~ N(0, scale^2)``.

    The input is whatever the SDE says networks see (``log sigma(t)`` for VE), shape (B,);
    the output has shape (B, dim). ``w`` is a buffer, so it is saved and never trained.
    """

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        self.register_buffer("w", torch.randn(dim // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = x[:, None].float() * self.w[None, :] * (2 * math.pi)  # (B, dim/2)
        return torch.cat([proj.sin(), proj.cos()], dim=-1)
