"""The code-conditioned score network (a small DDPM++-style U-Net) and the pretraining heads.

* :class:`ScoreNet` -- ``s_theta(x_t, t, z)``: residual blocks (GroupNorm, SiLU, 3x3 convs, skip
  rescaled by 1/sqrt(2) as DDPM++), a down path and an up path joined by skip connections, optional
  self-attention at chosen resolutions and always at the bottom. The noise level enters as a
  Gaussian Fourier embedding of ``c = sde.net_input(t)``; the code ``z`` goes through two dense layers
  and is added to the time embedding; their sum is projected to a per-channel bias in every residual
  block (paper App. D).
* :class:`VariationalHead` -- mean and log-variance of q(z | x_0) on top of the encoder's feature (VDRL).
* :class:`ConvDecoder` -- code -> image logits, for the autoencoder baseline.

Every module keeps its constructor arguments in ``.args`` (plain data) so that a checkpoint can
rebuild it without a config: ``ScoreNet(**net.args)`` (:func:`score_net_record` / :func:`build_score_net`).
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from laplacedrl.models.embedding import GaussianFourierEmbedding

SKIP_SCALE = 1.0 / math.sqrt(2.0)  # DDPM++ "skip_rescale": keeps the residual stream's variance


def _groups(channels: int) -> int:
    """GroupNorm groups as in score-SDE: min(channels // 4, 32), at least 1."""
    return max(1, min(channels // 4, 32))


class ResBlock(nn.Module):
    """``(x + conv(drop(act(GN(conv(act(GN(x))) + bias(emb)))))) / sqrt(2)`` with a 1x1 skip if needed."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm0 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm1 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]  # per-channel bias from time + code
        h = self.conv1(self.drop(F.silu(self.norm1(h))))
        return (self.skip(x) + h) * SKIP_SCALE


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, residual and rescaled by 1/sqrt(2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, hgt * wid).unbind(1)  # each (B, C, HW)
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)  # (B, HW, HW)
        h = torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hgt, wid)
        return (x + self.out(h)) * SKIP_SCALE


class ScoreNet(nn.Module):
    """DDPM++-style U-Net ``forward(x_t, c, code, std=None) -> score`` of shape (B, C, H, W).

    Args:
        in_channels: image channels C.
        image_size: H = W; must be divisible by 2 ** (len(ch_mult) - 1).
        base_channels: channels at full resolution; level i has ``base_channels * ch_mult[i]``.
        ch_mult: channel multiplier per resolution level (one level per entry, halving H, W).
        num_res_blocks: residual blocks per level on the down path (the up path has one more).
        attn_resolutions: resolutions (H) at which a self-attention block follows each res block.
        code_dim: dimension of the code z (>= 1).
        emb_dim: width of the time and code embeddings.
        dropout: dropout inside residual blocks.
        scale_by_std: divide the raw output by the kernel std ``s(t)`` (score-SDE's trick), so the
            raw output estimates ``-noise`` and has unit scale at every t; then ``std`` is required.
        fourier_scale: scale of the Gaussian Fourier features of ``c``.

    ``c`` is ``sde.net_input(t)``, shape (B,); ``code`` is (B, code_dim); ``std`` is (B,).
    """

    def __init__(self, in_channels: int, image_size: int, base_channels: int = 32,
                 ch_mult: Sequence[int] = (1, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (), code_dim: int = 128, emb_dim: int = 128,
                 dropout: float = 0.0, scale_by_std: bool = True, fourier_scale: float = 16.0):
        super().__init__()
        if image_size % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"image_size {image_size} not divisible by 2^{len(ch_mult) - 1} (ch_mult {ch_mult})")
        if code_dim < 1:
            raise ValueError(f"code_dim must be >= 1, got {code_dim}")
        self.args = dict(in_channels=in_channels, image_size=image_size, base_channels=base_channels,
                         ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                         attn_resolutions=tuple(attn_resolutions), code_dim=code_dim, emb_dim=emb_dim,
                         dropout=dropout, scale_by_std=scale_by_std, fourier_scale=fourier_scale)
        self.scale_by_std = scale_by_std
        self.code_dim = code_dim

        self.time_embed = nn.Sequential(GaussianFourierEmbedding(emb_dim, scale=fourier_scale),
                                        nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.code_embed = nn.Sequential(nn.Linear(code_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        # Down path: remember every output channel count, the up path consumes them as skips.
        self.down = nn.ModuleList()
        skip_ch, ch, res = [base_channels], base_channels, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, base_channels * mult, emb_dim, dropout))
                ch = base_channels * mult
                if res in attn_resolutions:
                    self.down.append(AttnBlock(ch))
                skip_ch.append(ch)
            if level < len(ch_mult) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))  # downsample by 2
                res //= 2
                skip_ch.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), AttnBlock(ch),
                                  ResBlock(ch, ch, emb_dim, dropout)])
        # Up path: num_res_blocks + 1 blocks per level, each eating one skip.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(ch + skip_ch.pop(), base_channels * mult, emb_dim, dropout))
                ch = base_channels * mult
                if res in attn_resolutions:
                    self.up.append(AttnBlock(ch))
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(ch, ch, 3, padding=1)))
                res *= 2
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        # Zero output layer (DDPM++ uses init_scale 0 here): the initial score is 0, so the
        # initial DSM loss is exactly the dimension count, and training starts from a calm point.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x_t: torch.Tensor, c: torch.Tensor, code: torch.Tensor,
                std: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.time_embed(c) + self.code_embed(code)  # (B, emb_dim)
        h = self.conv_in(x_t)
        skips = [h]
        for layer in self.down:
            if isinstance(layer, AttnBlock):
                h = skips[-1] = layer(h)  # the attention output replaces its block's skip
            else:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)  # res block or downsample
                skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = layer(h)  # attention or upsample
        out = self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W)
        if self.scale_by_std:
            if std is None:
                raise ValueError("ScoreNet(scale_by_std=True) needs std")
            out = out / std.reshape(-1, 1, 1, 1)
        return out


def score_net_record(net: ScoreNet) -> dict:
    """The constructor arguments of ``net`` as a plain dict (lists, not tuples, for YAML/JSON)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in net.args.items()}


def build_score_net(**record) -> ScoreNet:
    """Rebuild a :class:`ScoreNet` from :func:`score_net_record` output."""
    return ScoreNet(**record)


class VariationalHead(nn.Module):
    """q(z | x_0) = N(mean, diag(exp(logvar))) from the encoder feature: two linear heads.

    ``forward(feat) -> (mean, logvar)``, each (B, code_dim). The log-variance head starts at zero
    weight and bias -4 (std ~ 0.14), so early training sees a nearly deterministic code.
    """

    def __init__(self, feature_dim: int, code_dim: int):
        super().__init__()
        self.args = dict(feature_dim=feature_dim, code_dim=code_dim)
        self.mean = nn.Linear(feature_dim, code_dim)
        self.logvar = nn.Linear(feature_dim, code_dim)
        nn.init.zeros_(self.logvar.weight)
        nn.init.constant_(self.logvar.bias, -4.0)

    def forward(self, feat: torch.Tensor):
        return self.mean(feat), self.logvar(feat)


class ConvDecoder(nn.Module):
    """Code -> image logits (B, C, H, W), for the autoencoder baseline.

    A linear layer maps z to a (base_channels, s, s) map with s <= 4, then each stage upsamples
    (nearest, to the next size of the halving chain of ``image_size``) and applies conv-GN-SiLU;
    a final 3x3 conv gives one logit per pixel and channel. Works for any image size (8, 32, 84).
    """

    def __init__(self, code_dim: int, out_channels: int, image_size: int, base_channels: int = 64):
        super().__init__()
        self.args = dict(code_dim=code_dim, out_channels=out_channels, image_size=image_size,
                         base_channels=base_channels)
        sizes = [image_size]
        while sizes[-1] > 4:
            sizes.append(math.ceil(sizes[-1] / 2))
        self.sizes = sizes[::-1]  # e.g. 32 -> [4, 8, 16, 32]; 8 -> [4, 8]
        self.base_channels = base_channels
        self.fc = nn.Linear(code_dim, base_channels * self.sizes[0] ** 2)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(base_channels, base_channels, 3, padding=1),
                          nn.GroupNorm(_groups(base_channels), base_channels), nn.SiLU())
            for _ in self.sizes[1:])
        self.conv_out = nn.Conv2d(base_channels, out_channels, 3, padding=1)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        s0 = self.sizes[0]
        h = F.silu(self.fc(code)).reshape(-1, self.base_channels, s0, s0)
        for size, stage in zip(self.sizes[1:], self.stages):
            h = stage(F.interpolate(h, size=(size, size), mode="nearest"))
        return self.conv_out(h)
