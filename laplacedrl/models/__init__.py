"""Classifier backbones (WRN-d-w, ResNet-18), plain or time-conditioned, and the learnable-t wrapper.

Every backbone is called as ``logits, feat = model(x)`` (plain) or ``model(x, noise=c)``
(time-conditioned, ``c`` of shape (B,) = what the SDE hands to networks, log sigma(t) for VE);
``feat`` is the penultimate feature (the graph's feature and the DRL code), ``model.feature_dim``
its size. :func:`arch_record` gives the constructor arguments as plain primitives so a checkpoint
can rebuild the architecture with ``build_model(**record)``.
"""
import math
import numbers
import re
from typing import Callable

import torch
from torch import nn

from laplacedrl.models.resnet import ResNet18
from laplacedrl.models.wrn import ConditionedBackbone, WideResNet

ARCH_NAMES = ("wrn-28-2", "wrn-28-8", "resnet18")
_WRN_PATTERN = re.compile(r"wrn-(\d+)-(\d+)")
_ARCH_HELP = f"valid: {', '.join(ARCH_NAMES)}, or wrn-<depth>-<width> with (depth-4) % 6 == 0"
T_CLAMP = 1e-6  # t is kept in [T_CLAMP, 1 - T_CLAMP] so that logit(t) stays finite


def build_model(arch: str, num_classes: int, in_channels: int, image_size: int, time_cond: bool = False,
                **extra) -> ConditionedBackbone:
    """Build a backbone by name.

    Args:
        arch: "wrn-28-2", "wrn-28-8", any "wrn-<depth>-<width>" with (depth-4) % 6 == 0, or "resnet18".
        num_classes, in_channels, image_size: follow the dataset (digits: 10, 1, 8).
        time_cond: add the noise embedding and the per-block noise bias.
        **extra: ``emb_dim`` (128), ``fourier_scale`` (16.0), ``bn_momentum`` (0.1); ResNet-18 also
            ``stem`` ("imagenet" for image_size >= 64, else "cifar").

    Returns:
        The model; ``model(x[, noise=c]) -> (logits (B, num_classes), feat (B, model.feature_dim))``.

    Raises:
        ValueError: unknown architecture name or impossible sizes.
    """
    sizes = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
        sizes[key] = int(value)  # the record holds plain ints, not numpy scalars
    num_classes, in_channels, image_size = sizes["num_classes"], sizes["in_channels"], sizes["image_size"]
    parsed = parse_arch(arch)
    if parsed is None:
        return ResNet18(num_classes, in_channels, image_size, time_cond=time_cond, **extra)
    return WideResNet(*parsed, num_classes, in_channels, image_size, time_cond=time_cond, **extra)


def parse_arch(arch: str):
    """``(depth, width)`` of a WRN name, None for resnet18; ValueError naming the valid names otherwise."""
    name = str(arch).strip().lower()
    if name == "resnet18":
        return None
    match = _WRN_PATTERN.fullmatch(name)
    if match is None:
        raise ValueError(f"unknown architecture {arch!r}; {_ARCH_HELP}")
    depth, width = int(match.group(1)), int(match.group(2))
    if depth < 10 or (depth - 4) % 6 or width < 1:
        raise ValueError(f"bad WRN depth in {arch!r}; {_ARCH_HELP} (depth >= 10)")
    return depth, width


def arch_record(model: nn.Module) -> dict:
    """The architecture as a plain dict of primitives: ``build_model(**arch_record(m))`` rebuilds ``m``'s
    architecture, and ``load_state_dict(m.state_dict(), strict=True)`` then works.

    Keys: arch, num_classes, in_channels, image_size, time_cond, bn_momentum, plus emb_dim and
    fourier_scale when time-conditioned and stem for ResNet-18. A :class:`LearnableTime` (or a
    DataParallel/DDP ``.module`` wrapper) is unwrapped to its backbone.
    """
    while isinstance(model, LearnableTime) or hasattr(model, "module"):
        model = model.backbone if isinstance(model, LearnableTime) else model.module
    if not isinstance(model, ConditionedBackbone):
        raise TypeError(f"not a laplacedrl backbone: {type(model).__name__}")
    return dict(model.config)


def _logit(t: float) -> float:
    """``log(t / (1 - t))`` of t clamped to [T_CLAMP, 1 - T_CLAMP]; t outside [0, 1] is an error."""
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must lie in [0, 1], got {t}")
    t = min(max(t, T_CLAMP), 1.0 - T_CLAMP)
    return math.log(t / (1.0 - t))


class LearnableTime(nn.Module):
    """A time-conditioned backbone run at one learnable diffusion time ``t = sigmoid(t_logit)``.

    ``forward(x) = backbone(x, noise=noise_fn(t).expand(B))``, so the loss gradient reaches
    ``t_logit``. ``noise_fn`` is a differentiable torch function of t from the caller (VE:
    ``log sigma_min + t * (log sigma_max - log sigma_min)``); it is not part of the state_dict, the
    caller rebuilds it from the checkpoint's SDE record. The state_dict holds ``t_logit`` (a 0-dim
    parameter) and ``backbone.*``. Keep ``t_logit`` out of weight decay (decay would pull t to 0.5).
    """

    def __init__(self, backbone: ConditionedBackbone, noise_fn: Callable[[torch.Tensor], torch.Tensor],
                 t_init: float = 0.5, trainable: bool = True):
        super().__init__()
        if not getattr(backbone, "time_cond", False):
            raise ValueError("LearnableTime needs a time-conditioned backbone (build_model(..., time_cond=True))")
        if not callable(noise_fn):
            raise TypeError("noise_fn must be a callable mapping a t tensor to the network's noise input")
        self.backbone = backbone
        self.noise_fn = noise_fn
        self.t_logit = nn.Parameter(torch.tensor(_logit(t_init)), requires_grad=trainable)

    @property
    def t(self) -> torch.Tensor:
        """The current diffusion time, a 0-dim tensor in (0, 1) (differentiable w.r.t. t_logit)."""
        return torch.sigmoid(self.t_logit)

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    def set_t(self, value: float) -> None:
        """Set t in place (e.g. for the t-search); values are clamped to [1e-6, 1 - 1e-6]."""
        with torch.no_grad():
            self.t_logit.fill_(_logit(value))

    def forward(self, x: torch.Tensor):
        noise = torch.as_tensor(self.noise_fn(self.t)).reshape(()).expand(x.shape[0])  # (B,)
        return self.backbone(x, noise=noise)
