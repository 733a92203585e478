"""The code-conditioned score network (the published NCSN++ as the DRL authors configured it) and heads.

* :class:`ScoreNet` -- ``s_theta(x_t, t, z)``, an NCSN++ U-Net with BigGAN-style residual blocks,
  a residual input pyramid and DDPM-style attention, conditioned on the code ``z`` in two ways:

  1. the embedding every residual block projects to a per-channel bias is the concatenation
     ``emb = [temb(c), W_z z]`` (8 nf values: 4 nf for the noise level, 4 nf for the code);
  2. three dense layers map ``emb`` to a (2 nf, s, s) map at the lowest resolution s, which is
     concatenated with the features at the bottleneck (the middle blocks have the extra channels).

  With ``decoder=True`` it also holds the autoencoder decoder (:class:`Decoder`), which maps the
  same (2 nf, s, s) map back to an image; :meth:`ScoreNet.reconstruct` runs only that branch.
* :class:`VariationalHead` -- mean and log-variance of q(z | x_0) from the encoder feature (VDRL).

Initialisation follows score-SDE: variance scaling (fan_avg, uniform) with zero biases for the convs,
the noise MLP and the per-block projections, a 1e-10 scale (:data:`ZERO_SCALE`, what an init scale
of 0 means there) for the last conv of every residual block, the attention output and the network
output; the code projection and the three code-map layers keep PyTorch's Linear default. An untrained
network therefore outputs ~0 (about 1e-5), and the initial denoising score-matching loss
``|| s(x_t) std + noise ||^2`` equals the dimension count.

Every module keeps its constructor arguments in ``.args`` (plain data) so that a checkpoint can
rebuild it without a config (:func:`score_net_record` / :func:`build_score_net`).
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from laplacedrl.models.embedding import ZERO_SCALE, NoiseEmbedding, default_init_, dense  # noqa: F401

SKIP_SCALE = 1.0 / math.sqrt(2.0)  # "skip_rescale": (skip + residual) / sqrt(2) keeps the variance
GN_EPS = 1e-6


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(channels // 4, 32) groups (at least 1) and eps 1e-6, as score-SDE."""
    groups = max(1, min(channels // 4, 32))
    if channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} GroupNorm groups; "
                         f"choose nf so that every level's channel count is a multiple of 4 (and of 32 above 128)")
    return nn.GroupNorm(groups, channels, eps=GN_EPS)


def conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: Optional[int] = None,
         init_scale: float = 1.0) -> nn.Conv2d:
    """Conv2d with :func:`default_init_` weights (``init_scale`` 0 -> 1e-10) and a zero bias."""
    layer = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2 if padding is None else padding)
    default_init_(layer.weight, init_scale)
    nn.init.zeros_(layer.bias)
    return layer


class ResBlock(nn.Module):
    """BigGAN-style residual block, optionally resampling by 2.

    ``h = conv0(R(act(GN0(x)))) + Dense(act(emb))``, ``h = conv1(drop(act(GN1(h))))``,
    ``out = (skip(R(x)) + h) / sqrt(2)`` with ``R`` = 2x2 average pooling (``resample="down"``),
    nearest 2x upsampling (``"up"``) or nothing, ``act`` = SiLU, ``skip`` a 1x1 conv when the channels
    change or when resampling, the identity otherwise. conv1 starts at ~0, so a new block is ~x/sqrt(2).
    """

    def __init__(self, in_ch: int, out_ch: Optional[int], emb_dim: int, dropout: float,
                 resample: Optional[str] = None):
        super().__init__()
        if resample not in (None, "down", "up"):
            raise ValueError(f"resample must be None, 'down' or 'up', got {resample!r}")
        out_ch = out_ch or in_ch
        self.resample = resample
        self.norm0 = group_norm(in_ch)
        self.conv0 = conv(in_ch, out_ch, 3)
        self.emb_proj = dense(emb_dim, out_ch)
        self.norm1 = group_norm(out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv1 = conv(out_ch, out_ch, 3, init_scale=0.0)
        self.skip = conv(in_ch, out_ch, 1) if (in_ch != out_ch or resample) else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)  # (B, C, H/2, W/2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")  # (B, C, 2H, 2W)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self._resample(F.silu(self.norm0(x)))  # (B, in_ch, H', W')
        x = self._resample(x)
        h = self.conv0(h) + self.emb_proj(F.silu(emb))[:, :, None, None]  # (B, out_ch, H', W')
        h = self.conv1(self.drop(F.silu(self.norm1(h))))
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) * SKIP_SCALE


class AttnBlock(nn.Module):
    """DDPM-style single-head self-attention over the H*W positions, residual and rescaled.

    ``w = softmax_j(q_i . k_j / sqrt(C))``, ``out = (x + P(sum_j w_ij v_j)) / sqrt(2)`` with q, k, v
    1x1 convs of GN(x) (init scale 0.1) and P a 1x1 conv with init scale 0.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = conv(channels, channels, 1, init_scale=0.1)
        self.k = conv(channels, channels, 1, init_scale=0.1)
        self.v = conv(channels, channels, 1, init_scale=0.1)
        self.out = conv(channels, channels, 1, init_scale=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).reshape(b, c, hgt * wid) for proj in (self.q, self.k, self.v))  # (B, C, HW)
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c ** -0.5, dim=-1)  # (B, HW, HW)
        h = torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hgt, wid)  # (B, C, H, W)
        return (x + self.out(h)) * SKIP_SCALE


class PyramidDown(nn.Module):
    """The input pyramid's downsampler: pad one pixel right/bottom, 3x3 conv of stride 2, no padding.

    (B, in_ch, H, W) -> (B, out_ch, H/2, W/2) for even H, W.
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = conv(in_ch, out_ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class CodeMap(nn.Module):
    """``m = act(L3(act(L2(act(L1(emb))))))`` reshaped to (B, channels, size, size).

    L1: emb_dim -> channels * size, L2: channels * size -> channels * size, L3: -> channels * size^2;
    PyTorch's default Linear init.
    """

    def __init__(self, emb_dim: int, channels: int, size: int):
        super().__init__()
        self.channels, self.size = channels, size
        hidden = channels * size
        self.lin1 = nn.Linear(emb_dim, hidden)
        self.lin2 = nn.Linear(hidden, hidden)
        self.lin3 = nn.Linear(hidden, hidden * size)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.lin1(emb))  # (B, channels * size)
        h = F.silu(self.lin3(F.silu(self.lin2(h))))  # (B, channels * size^2)
        return h.reshape(-1, self.channels, self.size, self.size)  # (B, channels, size, size)


def level_resolutions(image_size: int, num_levels: int) -> List[int]:
    """``[image_size, image_size / 2, ...]`` (one per level); ValueError if a halving is not exact."""
    sizes = [image_size]
    for _ in range(num_levels - 1):
        if sizes[-1] % 2:
            chain = " -> ".join(map(str, sizes))
            raise ValueError(f"image_size {image_size} cannot be halved {num_levels - 1} times "
                             f"({chain} is odd): use fewer ch_mult levels (one per resolution)")
        sizes.append(sizes[-1] // 2)
    return sizes


class _Level(nn.Module):
    """One resolution level: residual blocks, their attention blocks (or None), and the resampler."""

    def __init__(self, blocks: Sequence[nn.Module], attn: Optional[Sequence[nn.Module]],
                 resample: Optional[nn.Module] = None, pyramid: Optional[nn.Module] = None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = None if attn is None else nn.ModuleList(attn)
        self.resample = resample
        self.pyramid = pyramid


def up_path(ch: int, skips: Optional[List[int]], nf: int, ch_mult: Sequence[int], num_res_blocks: int,
            res: Sequence[int], attn_resolutions: Sequence[int], dropout: float, *, emb_dim: int):
    """The up levels, lowest resolution first, and their output channel count.

    Per level: ``num_res_blocks + 1`` ResBlocks to ``nf * ch_mult[level]`` channels, each also eating
    the channels ``skips.pop()`` of a down-path skip (the score net) or none (``skips`` None, the
    decoder); attention after them at ``attn_resolutions``; an upsampling ResBlock except at the top.
    """
    levels = []
    for level in reversed(range(len(ch_mult))):
        blocks = []
        for _ in range(num_res_blocks + 1):
            blocks.append(ResBlock(ch + (skips.pop() if skips is not None else 0), nf * ch_mult[level],
                                   emb_dim, dropout))
            ch = nf * ch_mult[level]
        attn = [AttnBlock(ch)] if res[level] in attn_resolutions else None
        up = ResBlock(ch, ch, emb_dim, dropout, resample="up") if level > 0 else None
        levels.append(_Level(blocks, attn, up))
    return nn.ModuleList(levels), ch


class Decoder(nn.Module):
    """The autoencoder decoder: the (2 nf, s, s) code map -> image logits (B, C, H, W).

    Middle (ResBlock, attention, ResBlock at 2 nf channels), then for each level from the lowest
    resolution up: ``num_res_blocks + 1`` ResBlocks to ``nf * ch_mult[level]`` channels (no skip
    inputs), an attention block at ``attn_resolutions``, an upsampling ResBlock except at the top;
    output GN -> SiLU -> 3x3 conv (init scale 0). Every ResBlock is conditioned on ``emb`` (B, emb_dim).
    """

    def __init__(self, out_channels: int, image_size: int, nf: int, ch_mult: Sequence[int],
                 num_res_blocks: int, attn_resolutions: Sequence[int], dropout: float, emb_dim: int):
        super().__init__()
        res = level_resolutions(image_size, len(ch_mult))
        ch = 2 * nf
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), AttnBlock(ch),
                                  ResBlock(ch, ch, emb_dim, dropout)])
        self.up, ch = up_path(ch, None, nf, ch_mult, num_res_blocks, res, attn_resolutions, dropout,
                              emb_dim=emb_dim)
        self.norm_out = group_norm(ch)
        self.conv_out = conv(ch, out_channels, 3, init_scale=0.0)

    def forward(self, code_map: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.mid[0](code_map, emb)  # (B, 2nf, s, s)
        h = self.mid[2](self.mid[1](h), emb)
        for level in self.up:
            for block in level.blocks:
                h = block(h, emb)
            if level.attn is not None:
                h = level.attn[0](h)
            if level.resample is not None:
                h = level.resample(h, emb)  # (B, ch, 2h, 2w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W)


class ScoreNet(nn.Module):
    """NCSN++ ``forward(x_t, c, code, std=None) -> score`` of shape (B, C, H, W), see the module docstring.

    Layout (``L = len(ch_mult)`` levels at resolutions H, H/2, ..., s = H / 2^(L-1)):

    * ``h = conv_in(x_t)``; per level ``num_res_blocks`` ResBlocks to ``nf * ch_mult[level]``
      channels (each followed by attention at ``attn_resolutions``), then, except at the lowest
      level, a downsampling ResBlock ``d`` and the residual input pyramid
      ``p <- (PyramidDown(p) + d) / sqrt(2)``, ``h = p`` (``p`` starts as ``x_t``); every output is
      kept as a skip;
    * bottleneck: ``h = [h, CodeMap(emb)]`` (``nf * ch_mult[-1] + 2 nf`` channels), ResBlock,
      attention, ResBlock;
    * per level from the bottom: ``num_res_blocks + 1`` ResBlocks on ``[h, skip]``, attention at
      ``attn_resolutions``, an upsampling ResBlock except at the top;
    * ``out = conv_out(act(GN(h)))`` (init scale 0), divided by ``std`` when ``scale_by_std``.

    Args:
        in_channels: image channels C.
        image_size: H = W; must halve exactly ``len(ch_mult) - 1`` times (32 with 4 levels, 84 with
            3: 84 -> 42 -> 21, 28 with 2 or 3, 8 with 2).
        nf: channels at full resolution; level i has ``nf * ch_mult[i]``.
        ch_mult: channel multiplier per resolution level.
        num_res_blocks: residual blocks per level on the down path (the up path has one more).
        attn_resolutions: resolutions at which attention blocks are inserted.
        dropout: dropout inside the residual blocks.
        code_dim: dimension of the code z.
        fourier_scale: std of the Fourier frequencies of ``c`` (nf frequencies).
        scale_by_std: divide the output by the kernel std ``s(t)`` (score-SDE's ``scale_by_sigma``),
            so the raw output estimates ``-noise``; then ``std`` is required.
        decoder: also build the autoencoder :class:`Decoder` (see :meth:`reconstruct`).
    """

    SCORE_PATH = ("conv_in", "down", "mid", "up", "norm_out", "conv_out")  # modules only forward uses

    def __init__(self, in_channels: int, image_size: int, nf: int = 16, ch_mult: Sequence[int] = (1, 2, 2, 2),
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1,
                 code_dim: int = 128, *, fourier_scale: float = 16.0, scale_by_std: bool = True,
                 decoder: bool = False):
        super().__init__()
        ch_mult, attn_resolutions = tuple(int(m) for m in ch_mult), tuple(int(r) for r in attn_resolutions)
        for name, value in (("in_channels", in_channels), ("image_size", image_size), ("nf", nf),
                            ("num_res_blocks", num_res_blocks), ("code_dim", code_dim)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not ch_mult or min(ch_mult) < 1:
            raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {ch_mult}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        res = level_resolutions(image_size, len(ch_mult))
        self.args = dict(in_channels=int(in_channels), image_size=int(image_size), nf=int(nf), ch_mult=ch_mult,
                         num_res_blocks=int(num_res_blocks), attn_resolutions=attn_resolutions,
                         dropout=float(dropout), code_dim=int(code_dim), fourier_scale=float(fourier_scale),
                         scale_by_std=bool(scale_by_std), decoder=bool(decoder))
        self.scale_by_std = bool(scale_by_std)
        self.code_dim = int(code_dim)
        self.emb_dim = emb_dim = 8 * nf  # [temb (4 nf), code projection (4 nf)]
        self.map_channels, self.map_size = 2 * nf, res[-1]

        # conditioning, shared by the score path and the decoder
        self.time_embed = NoiseEmbedding(nf, 4 * nf, fourier_scale)
        self.code_proj = nn.Linear(code_dim, 4 * nf)
        self.code_map = CodeMap(emb_dim, self.map_channels, self.map_size)

        # score path: down
        self.conv_in = conv(in_channels, nf, 3)
        skip_ch, ch, pyramid_ch = [nf], nf, in_channels
        levels = []
        for level, mult in enumerate(ch_mult):
            blocks, attn = [], ([] if res[level] in attn_resolutions else None)
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, nf * mult, emb_dim, dropout))
                ch = nf * mult
                if attn is not None:
                    attn.append(AttnBlock(ch))
                skip_ch.append(ch)
            down = pyramid = None
            if level < len(ch_mult) - 1:
                down = ResBlock(ch, ch, emb_dim, dropout, resample="down")
                pyramid = PyramidDown(pyramid_ch, ch)
                pyramid_ch = ch
                skip_ch.append(ch)
            levels.append(_Level(blocks, attn, down, pyramid))
        self.down = nn.ModuleList(levels)
        # bottleneck: the features plus the code map
        ch += self.map_channels
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), AttnBlock(ch),
                                  ResBlock(ch, ch, emb_dim, dropout)])
        # up
        self.up, ch = up_path(ch, skip_ch, nf, ch_mult, num_res_blocks, res, attn_resolutions, dropout,
                              emb_dim=emb_dim)
        self.norm_out = group_norm(ch)
        self.conv_out = conv(ch, in_channels, 3, init_scale=0.0)

        self.decoder = Decoder(in_channels, image_size, nf, ch_mult, num_res_blocks, attn_resolutions,
                               dropout, emb_dim) if decoder else None

    def embed(self, c: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """``emb = [temb(c), W_z code]``, shape (B, 8 nf); checks the shapes of ``c`` and ``code``."""
        if code.dim() != 2 or code.shape[1] != self.code_dim:
            raise ValueError(f"code must have shape (B, {self.code_dim}), got {tuple(code.shape)}")
        if c.shape != (code.shape[0],):
            raise ValueError(f"c must have shape ({code.shape[0]},), got {tuple(c.shape)}")
        return torch.cat([self.time_embed(c), self.code_proj(code)], dim=1)  # (B, 8nf)

    def forward(self, x_t: torch.Tensor, c: torch.Tensor, code: torch.Tensor,
                std: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Score estimate at ``x_t`` (B, C, H, W) for noise input ``c`` (B,) and code (B, code_dim).

        ``std`` (B,) is the kernel std s(t) the output is divided by when ``scale_by_std``.
        """
        if self.scale_by_std and std is None:
            raise ValueError("ScoreNet(scale_by_std=True) needs std")
        size = self.args["image_size"]
        if x_t.dim() != 4 or tuple(x_t.shape[1:]) != (self.args["in_channels"], size, size):
            raise ValueError(f"x_t must have shape (B, {self.args['in_channels']}, {size}, {size}), "
                             f"got {tuple(x_t.shape)}")
        emb = self.embed(c, code)  # (B, 8nf)
        hs = [self.conv_in(x_t)]  # (B, nf, H, W)
        pyramid = x_t
        for level in self.down:
            for i, block in enumerate(level.blocks):
                h = block(hs[-1], emb)
                if level.attn is not None:
                    h = level.attn[i](h)
                hs.append(h)
            if level.resample is not None:
                h = level.resample(hs[-1], emb)  # (B, ch, h/2, w/2)
                pyramid = (level.pyramid(pyramid) + h) * SKIP_SCALE
                hs.append(pyramid)
        h = torch.cat([hs[-1], self.code_map(emb)], dim=1)  # (B, nf * ch_mult[-1] + 2nf, s, s)
        h = self.mid[0](h, emb)
        h = self.mid[2](self.mid[1](h), emb)
        for level in self.up:
            for block in level.blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            if level.attn is not None:
                h = level.attn[0](h)
            if level.resample is not None:
                h = level.resample(h, emb)  # (B, ch, 2h, 2w)
        out = self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W)
        if self.scale_by_std:
            out = out / std.reshape(-1, 1, 1, 1)
        return out

    def reconstruct(self, c: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """Autoencoder logits (B, C, H, W) from the code: embedding -> code map -> :class:`Decoder`.

        Runs neither the score path nor ``x_t``; needs ``decoder=True``.
        """
        if self.decoder is None:
            raise ValueError("reconstruct needs ScoreNet(..., decoder=True)")
        emb = self.embed(c, code)  # (B, 8nf)
        return self.decoder(self.code_map(emb), emb)  # (B, C, H, W)


def score_net_record(net: ScoreNet) -> dict:
    """The constructor arguments of ``net`` as a plain dict (lists, not tuples, for YAML/JSON)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in net.args.items()}


def build_score_net(**record) -> ScoreNet:
    """Rebuild a :class:`ScoreNet` from :func:`score_net_record` output."""
    return ScoreNet(**record)


class VariationalHead(nn.Module):
    """q(z | x_0) = N(mean, diag(exp(logvar))) from the encoder feature: ONE linear layer.

    ``[mean, logvar] = W feat + b`` with ``W`` of shape (2 code_dim, feature_dim), PyTorch's default
    init; ``forward(feat (B, feature_dim)) -> (mean, logvar)``, each (B, code_dim), the first and the
    second half of the output.
    """

    def __init__(self, feature_dim: int, code_dim: int):
        super().__init__()
        self.args = dict(feature_dim=feature_dim, code_dim=code_dim)
        self.code_dim = code_dim
        self.linear = nn.Linear(feature_dim, 2 * code_dim)

    def forward(self, feat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.linear(feat)  # (B, 2 code_dim)
        return out[:, :self.code_dim], out[:, self.code_dim:]
