"""Wide ResNet (WRN-d-w) classifier backbone, plain or conditioned on the diffusion noise level.

Also holds the pieces shared with :mod:`laplacedrl.models.resnet`: the noise-embedding MLP, the
per-block bias helper and the :class:`ConditionedBackbone` base class that gives every backbone the
same ``forward(x, noise=None) -> (logits, feat)`` contract.

Where the noise bias goes: after a block's first conv *and the BatchNorm that follows it*, just
before the activation. Adding it before that BatchNorm (as DDPM++ does before a GroupNorm, and as
traj_drl's WRN does before a BatchNorm) would let BatchNorm cancel it in training mode whenever the
whole batch shares one noise level: ``BN(h + b) = BN(h)`` for a per-channel ``b`` that is constant over
batch and space. That is exactly the semi-supervised case, where a single learnable t is shared by
every image, so the classifier would be blind to t and t would get no gradient.

BatchNorm momentum: PyTorch's default 0.1 (running stats average over the last ~10 batches, the
TensorFlow "decay 0.9") in every BN layer, the last one included. LaplaceNet sets the last BN to
``momentum=0.9`` (running stats ~ the last batch alone: noisy features for the graph), USB uses
``0.001`` (an average over ~1000 batches: too slow for the short digits runs, where a whole training
run has a few hundred steps and the running stats would still carry the random-init statistics when
features are extracted in eval mode). 0.1 is stable and adapts within an epoch on every dataset.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from laplacedrl.models.embedding import GaussianFourierEmbedding

BN_MOMENTUM = 0.1  # see the module docstring for why not LaplaceNet's 0.9 or USB's 0.001
LEAKY_SLOPE = 0.1  # LeakyReLU slope of the MixMatch / LaplaceNet-family WRN
DEFAULT_EMB_DIM = 128
DEFAULT_FOURIER_SCALE = 16.0  # score_sde's scale for the Fourier features of log sigma


class NoiseEmbedding(nn.Module):
    """``emb = Linear(SiLU(Linear(fourier(noise))))``: (B,) noise values -> (B, emb_dim).

    ``noise`` is what the SDE hands to networks (log sigma(t) for VE); the net never sees
    sigma_min / sigma_max.
    """

    def __init__(self, emb_dim: int, fourier_scale: float):
        super().__init__()
        self.fourier = GaussianFourierEmbedding(emb_dim, scale=fourier_scale)
        self.mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.fourier(noise))  # (B, emb_dim)


def noise_projection(emb_dim: Optional[int], channels: int) -> Optional[nn.Linear]:
    """The per-block ``Linear(emb_dim, channels)`` (zero bias), or None for a plain backbone."""
    if emb_dim is None:
        return None
    proj = nn.Linear(emb_dim, channels)
    nn.init.zeros_(proj.bias)
    return proj


def add_noise_bias(h: torch.Tensor, proj: Optional[nn.Linear], emb: Optional[torch.Tensor]) -> torch.Tensor:
    """``h + proj(emb)[:, :, None, None]``: a per-sample, per-channel bias; ``h`` unchanged if plain."""
    if proj is None:
        return h
    return h + proj(emb)[:, :, None, None]  # (B, C, H, W) + (B, C, 1, 1)


class ConditionedBackbone(nn.Module):
    """Base class: ``forward(x, noise=None) -> (logits, feat)``.

    Subclasses set ``self.head`` (Linear(feature_dim, num_classes)), ``self.feature_dim``,
    ``self.config`` (the constructor arguments, see :func:`laplacedrl.models.arch_record`) and
    implement ``trunk(x, emb) -> feat`` of shape (B, feature_dim).
    """

    def _init_conditioning(self, time_cond: bool, emb_dim: int, fourier_scale: float) -> Optional[int]:
        """Create the noise embedding when ``time_cond``; return the dim blocks project from (or None)."""
        self.time_cond = bool(time_cond)
        self.noise_embed = NoiseEmbedding(emb_dim, fourier_scale) if self.time_cond else None
        return emb_dim if self.time_cond else None

    def embed_noise(self, noise: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
        """Check the noise argument against the model kind; return SiLU(embedding) (B, emb_dim) or None."""
        if not self.time_cond:
            if noise is not None:
                raise ValueError("this backbone is not time-conditioned: call it without noise=")
            return None
        if noise is None:
            raise ValueError("this backbone is time-conditioned: pass noise= (a (B,) tensor, e.g. log sigma(t))")
        batch = x.shape[0]
        noise = torch.as_tensor(noise, dtype=torch.float32, device=x.device)
        if noise.dim() == 0:
            noise = noise.expand(batch)
        if noise.shape != (batch,):
            raise ValueError(f"noise must have shape ({batch},), got {tuple(noise.shape)}")
        # one SiLU on the shared embedding before the per-block projections (DDPM++ convention)
        return F.silu(self.noise_embed(noise))  # (B, emb_dim)

    def trunk(self, x: torch.Tensor, emb: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        emb = self.embed_noise(noise, x)
        feat = self.trunk(x, emb)  # (B, feature_dim)
        return self.head(feat), feat  # (B, num_classes), (B, feature_dim)


class WideBasicBlock(nn.Module):
    """Pre-activation basic block: ``x + conv2(act(BN2(conv1(act(BN1(x)))) + bias(emb)))``.

    The stride sits on conv1. When the shape changes, the shortcut is a 1x1 conv applied to the
    pre-activated input ``act(BN1(x))`` (Zagoruyko & Komodakis' WRN); otherwise it is the identity.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, emb_dim: Optional[int], bn_momentum: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)
        self.noise_proj = noise_projection(emb_dim, out_ch)
        reshape = stride != 1 or in_ch != out_ch
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False) if reshape else None

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor]) -> torch.Tensor:
        pre = self.act(self.bn1(x))  # (B, in_ch, H, W)
        skip = x if self.shortcut is None else self.shortcut(pre)  # (B, out_ch, H/s, W/s)
        h = self.bn2(self.conv1(pre))  # (B, out_ch, H/s, W/s)
        h = self.conv2(self.act(add_noise_bias(h, self.noise_proj, emb)))
        return h + skip


class WideResNet(ConditionedBackbone):
    """WRN-depth-width: 3x3 stem (16 ch), three groups of (depth-4)/6 blocks of 16w, 32w, 64w channels
    at strides 1, 2, 2, final BN-act, global average pooling, linear head. feature_dim = 64w.

    Any input size works (global pooling): 32x32 -> 32, 16, 8; digits 8x8 -> 8, 4, 2.
    """

    def __init__(self, depth: int, width: int, num_classes: int, in_channels: int, image_size: int,
                 time_cond: bool = False, emb_dim: int = DEFAULT_EMB_DIM,
                 fourier_scale: float = DEFAULT_FOURIER_SCALE, bn_momentum: float = BN_MOMENTUM):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        if width < 1:
            raise ValueError(f"WRN width must be >= 1, got {width}")
        self.config = {"arch": f"wrn-{depth}-{width}", "num_classes": num_classes,
                       "in_channels": in_channels, "image_size": image_size, "time_cond": bool(time_cond),
                       "bn_momentum": bn_momentum}
        if time_cond:
            self.config.update(emb_dim=emb_dim, fourier_scale=fourier_scale)
        cond_dim = self._init_conditioning(time_cond, emb_dim, fourier_scale)

        blocks_per_group = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        blocks, in_ch = [], 16
        for out_ch, stride in zip(widths, (1, 2, 2)):
            for i in range(blocks_per_group):
                blocks.append(WideBasicBlock(in_ch, out_ch, stride if i == 0 else 1, cond_dim, bn_momentum))
                in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.bn_out = nn.BatchNorm2d(in_ch, momentum=bn_momentum)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)
        self.feature_dim = in_ch
        self.head = nn.Linear(in_ch, num_classes)
        init_weights(self, nonlinearity="leaky_relu", slope=LEAKY_SLOPE)

    def trunk(self, x: torch.Tensor, emb: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.stem(x)  # (B, 16, H, W)
        for block in self.blocks:
            h = block(h, emb)
        h = self.act(self.bn_out(h))  # (B, 64w, H/4, W/4)
        return h.mean(dim=(2, 3))  # (B, 64w)


def init_weights(model: nn.Module, nonlinearity: str, slope: float = 0.0) -> None:
    """Kaiming-normal (fan_out) convs, BN weight 1 / bias 0, Xavier-normal classifier head with zero bias.

    The per-block noise projections and the embedding MLP keep PyTorch's Linear default init
    (their biases are zeroed where created).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=slope, mode="fan_out", nonlinearity=nonlinearity)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.xavier_normal_(model.head.weight)
    nn.init.zeros_(model.head.bias)
