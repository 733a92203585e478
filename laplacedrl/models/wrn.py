"""Wide ResNet (WRN-d-w) classifier / encoder backbone, plain or conditioned on the diffusion noise level.

The architecture is LaplaceNet's WRN, the one the DRL authors also use as their encoder:

* stem: 3x3 conv (with bias), 16 channels;
* block: ``out = conv2_s(relu(BN2(drop(conv1(relu(BN1(x))) [+ b])))) + shortcut(x)``, where conv1 is
  3x3 stride 1, conv2 3x3 with the group's stride ``s``, both with bias, and ``shortcut`` a 1x1 conv
  (bias, stride ``s``) of the raw block input when the shape changes, the identity otherwise;
* three groups of (depth-4)/6 blocks of 16w, 32w, 64w channels at strides 1, 2, 2;
* final BN with ``momentum=0.9`` (PyTorch semantics: the new batch gets weight 0.9 in the running
  stats), ReLU, global average pooling, linear head; feature_dim = 64w.

Initialisation is PyTorch's default everywhere (convs: kaiming_uniform with a = sqrt(5), BN weight
1 / bias 0, Linear default for the head); only the noise-embedding MLP and the per-block noise
projections use score-SDE's variance scaling (fan_avg, uniform) with zero biases.

Time conditioning (``time_cond=True``): ``temb = NoiseEmbedding(c)`` (Gaussian Fourier features of
the noise input ``c``, 16 frequencies of scale 16, then Linear(32, 64), SiLU, Linear(64, 64)); every
block adds the per-channel bias ``b = Linear_block(SiLU(temb))`` (zero bias), shape (B, planes, 1, 1).

Where the bias goes (``t_bias``):

* ``"before_bn"`` (default, the published encoder): after conv1, before BN2. When every image of a
  training-mode batch shares one noise value -- the semi-supervised stage, where a single t is
  learned for all images -- ``b`` is constant over the batch and the spatial positions, so BN2
  subtracts it again with the batch mean and leaves the variance unchanged:
  ``BN(h + b) = BN(h)`` exactly. The output, and hence the loss, does not depend on t, and the
  learnable t gets no gradient (only float rounding). It still matters when samples have different
  noise values (DRL pretraining draws one t per image) and in eval mode (running statistics).
* ``"after_bn"``: after BN2, before its ReLU. The bias then survives BatchNorm, so a batch-shared t
  changes the output and receives a real gradient.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from laplacedrl.choices import T_BIAS
from laplacedrl.models.embedding import NoiseEmbedding, dense

DEFAULT_T_BIAS = "before_bn"
DEFAULT_NUM_FREQUENCIES = 16  # Fourier frequencies of the encoder's noise embedding (32 features)
DEFAULT_EMB_DIM = 64  # width of the encoder's noise embedding MLP
DEFAULT_FOURIER_SCALE = 16.0  # std of the Fourier frequencies
FINAL_BN_MOMENTUM = 0.9  # LaplaceNet's last BN: running stats ~ the last batch


def check_t_bias(t_bias: str) -> str:
    """Return ``t_bias`` if it is one of :data:`laplacedrl.choices.T_BIAS`, else raise ValueError."""
    if t_bias not in T_BIAS:
        raise ValueError(f"unknown t_bias {t_bias!r}; valid: {', '.join(T_BIAS)}")
    return t_bias


def noise_projection(emb_dim: Optional[int], channels: int) -> Optional[nn.Linear]:
    """The per-block ``Linear(emb_dim, channels)`` (variance-scaling weight, zero bias), None if plain."""
    return None if emb_dim is None else dense(emb_dim, channels)


def add_noise_bias(h: torch.Tensor, proj: Optional[nn.Linear], emb: Optional[torch.Tensor]) -> torch.Tensor:
    """``h + proj(emb)[:, :, None, None]``: a per-sample, per-channel bias; ``h`` unchanged if plain.

    ``emb`` is the already activated embedding SiLU(temb), shape (B, emb_dim).
    """
    if proj is None:
        return h
    return h + proj(emb)[:, :, None, None]  # (B, C, H, W) + (B, C, 1, 1)


class ConditionedBackbone(nn.Module):
    """Base class: ``forward(x, noise=None) -> (logits, feat)``.

    Subclasses set ``self.head`` (Linear(feature_dim, num_classes)), ``self.feature_dim``,
    ``self.config`` (the constructor arguments, see :func:`laplacedrl.models.arch_record`) and
    implement ``trunk(x, emb) -> feat`` of shape (B, feature_dim).
    """

    def _init_conditioning(self, time_cond: bool, num_frequencies: int, emb_dim: int,
                           fourier_scale: float, t_bias: str) -> Optional[int]:
        """Create the noise embedding when ``time_cond`` and add its settings to ``self.config`` (set
        that first); return the dim the blocks project from, or None for a plain backbone."""
        self.time_cond = bool(time_cond)
        self.t_bias = check_t_bias(t_bias)
        self.noise_embed = NoiseEmbedding(num_frequencies, emb_dim, fourier_scale) if self.time_cond else None
        if self.time_cond:
            self.config.update(num_frequencies=int(num_frequencies), emb_dim=int(emb_dim),
                               fourier_scale=float(fourier_scale), t_bias=t_bias)
        return emb_dim if self.time_cond else None

    def embed_noise(self, noise: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
        """Check the noise argument against the model kind; return SiLU(temb) (B, emb_dim) or None."""
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
        # the blocks all project the same activated embedding
        return F.silu(self.noise_embed(noise))  # (B, emb_dim)

    def trunk(self, x: torch.Tensor, emb: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        emb = self.embed_noise(noise, x)
        feat = self.trunk(x, emb)  # (B, feature_dim)
        return self.head(feat), feat  # (B, num_classes), (B, feature_dim)


class WideBasicBlock(nn.Module):
    """``conv2_s(relu(BN2(drop(conv1(relu(BN1(x))) [+ b])[+ b]))) + shortcut(x)``.

    ``b`` is the noise bias, added before BN2 (``t_bias="before_bn"``) or after it (``"after_bn"``).
    The stride ``s`` sits on conv2 and on the 1x1 shortcut conv, which sees the raw input ``x``.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, emb_dim: Optional[int], dropout: float,
                 t_bias: str = DEFAULT_T_BIAS):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=1, padding=1, bias=True)
        self.dropout = nn.Dropout(dropout)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=stride, padding=1, bias=True)
        reshape = stride != 1 or in_ch != out_ch
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=True) if reshape else None
        self.noise_proj = noise_projection(emb_dim, out_ch)
        self.before_bn = check_t_bias(t_bias) == "before_bn"

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.conv1(F.relu(self.bn1(x)))  # (B, out_ch, H, W)
        if self.before_bn:
            h = add_noise_bias(h, self.noise_proj, emb)
        h = self.bn2(self.dropout(h))
        if not self.before_bn:
            h = add_noise_bias(h, self.noise_proj, emb)
        h = self.conv2(F.relu(h))  # (B, out_ch, H/s, W/s)
        skip = x if self.shortcut is None else self.shortcut(x)  # (B, out_ch, H/s, W/s)
        return h + skip


class WideResNet(ConditionedBackbone):
    """WRN-depth-width (LaplaceNet's), see the module docstring; feature_dim = 64 * width.

    Any input size works (global pooling): 32x32 -> 32, 16, 8; 84x84 -> 84, 42, 21; 8x8 -> 8, 4, 2.

    Args:
        depth, width: (depth - 4) % 6 == 0, depth >= 10; width >= 1.
        num_classes, in_channels, image_size: follow the dataset.
        time_cond: add the noise embedding and the per-block noise bias.
        num_frequencies, emb_dim, fourier_scale: the noise embedding (defaults: 16, 64, 16.0).
        t_bias: "before_bn" (published) or "after_bn", see the module docstring.
        dropout: dropout rate between conv1 and BN2 (0 in the published runs).
    """

    def __init__(self, depth: int, width: int, num_classes: int, in_channels: int, image_size: int,
                 time_cond: bool = False, num_frequencies: int = DEFAULT_NUM_FREQUENCIES,
                 emb_dim: int = DEFAULT_EMB_DIM, *, fourier_scale: float = DEFAULT_FOURIER_SCALE,
                 t_bias: str = DEFAULT_T_BIAS, dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        if width < 1:
            raise ValueError(f"WRN width must be >= 1, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.config = {"arch": f"wrn-{depth}-{width}", "num_classes": num_classes,
                       "in_channels": in_channels, "image_size": image_size, "time_cond": bool(time_cond),
                       "dropout": float(dropout)}
        cond_dim = self._init_conditioning(time_cond, num_frequencies, emb_dim, fourier_scale, t_bias)

        blocks_per_group = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=True)
        blocks, in_ch = [], 16
        for out_ch, stride in zip(widths, (1, 2, 2)):
            for i in range(blocks_per_group):
                blocks.append(WideBasicBlock(in_ch, out_ch, stride if i == 0 else 1, cond_dim, dropout,
                                             t_bias))
                in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.bn_out = nn.BatchNorm2d(in_ch, momentum=FINAL_BN_MOMENTUM)
        self.feature_dim = in_ch
        self.head = nn.Linear(in_ch, num_classes)

    def trunk(self, x: torch.Tensor, emb: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.stem(x)  # (B, 16, H, W)
        for block in self.blocks:
            h = block(h, emb)  # (B, 64w, H/4, W/4) after the last group
        h = F.relu(self.bn_out(h))
        return h.mean(dim=(2, 3))  # (B, 64w)
