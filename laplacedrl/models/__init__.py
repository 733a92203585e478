"""Classifier backbones (WRN-d-w, ResNet-18), plain or time-conditioned, and the learnable-t wrapper.

Every backbone is called as ``logits, feat = model(x)`` (plain) or ``model(x, noise=c)``
(time-conditioned, ``c`` of shape (B,) = what the SDE hands to networks, log sigma(t) for VE);
``feat`` is the penultimate feature (the graph's feature and the DRL code), ``model.feature_dim``
its size. :func:`arch_record` gives the constructor arguments as plain primitives so a checkpoint
can rebuild the architecture with ``build_model(**record)``.
"""
import math
import numbers

import torch
from torch import nn

from laplacedrl.choices import ARCH_NAMES, parse_arch  # noqa: F401 (re-exported)
from laplacedrl.models.resnet import ResNet18
from laplacedrl.models.wrn import ConditionedBackbone, WideResNet

T_CLAMP = 1e-6  # t is kept in [T_CLAMP, 1 - T_CLAMP] so that logit(t) stays finite


def build_model(arch: str, num_classes: int, in_channels: int, image_size: int, time_cond: bool = False,
                **extra) -> ConditionedBackbone:
    """Build a backbone by name.

    Args:
        arch: "wrn-28-2", "wrn-28-8", any "wrn-<depth>-<width>" with (depth-4) % 6 == 0, or "resnet18".
        num_classes, in_channels, image_size: follow the dataset (digits: 10, 1, 8).
        time_cond: add the noise embedding and the per-block noise bias.
        **extra: the noise embedding ``num_frequencies`` (16), ``emb_dim`` (64), ``fourier_scale``
            (16.0) and ``t_bias`` ("before_bn" as published, or "after_bn"; see
            :mod:`laplacedrl.models.wrn`); WRN also ``dropout`` (0.0); ResNet-18 also ``bn_momentum``
            (0.1) and ``stem`` ("imagenet" for image_size >= 64, else "cifar").

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


def arch_record(model: nn.Module) -> dict:
    """The architecture as a plain dict of primitives: ``build_model(**arch_record(m))`` rebuilds ``m``'s
    architecture, and ``load_state_dict(m.state_dict(), strict=True)`` then works.

    Keys: arch, num_classes, in_channels, image_size, time_cond; num_frequencies, emb_dim,
    fourier_scale and t_bias when time-conditioned; dropout for WRN; bn_momentum and stem for
    ResNet-18. A :class:`LearnableTime` (or a
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

    ``forward(x) = backbone(x, noise=sde.net_input(t).expand(B))``, so the loss gradient reaches
    ``t_logit`` (VE: ``log sigma_min + t * (log sigma_max - log sigma_min)``). The SDE is not part of
    the state_dict (:func:`classifier_record` keeps its record). The state_dict holds ``t_logit`` (a
    0-dim parameter, the published ``param_t``) and ``backbone.*``. As published, the optimiser
    applies weight decay to ``t_logit``, which pulls t to 0.5; with the published
    ``t_bias="before_bn"`` BatchNorm cancels the batch-shared bias in training mode, so ``t_logit``
    gets (almost) no gradient either; ``t_bias="after_bn"`` gives it a real one.
    """

    def __init__(self, backbone: ConditionedBackbone, sde, t_init: float = 0.5, trainable: bool = True):
        super().__init__()
        if not getattr(backbone, "time_cond", False):
            raise ValueError("LearnableTime needs a time-conditioned backbone (build_model(..., time_cond=True))")
        self.backbone = backbone
        self.sde = sde
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
        noise = self.sde.net_input(self.t).reshape(()).expand(x.shape[0])  # (B,)
        return self.backbone(x, noise=noise)


def classifier_record(model: nn.Module) -> dict:
    """What rebuilds a classifier without its config: ``{"backbone": arch record, "learnable_t",
    "t_trainable", "sde"}`` (the last three for a :class:`LearnableTime`)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    timed = isinstance(model, LearnableTime)
    return {"backbone": arch_record(model), "learnable_t": timed,
            "t_trainable": bool(model.t_logit.requires_grad) if timed else False,
            "sde": model.sde.to_dict() if timed else None}


def classifier_from_record(record: dict) -> nn.Module:
    """The (untrained) classifier of :func:`classifier_record` output; load its state_dict next."""
    backbone = build_model(**record["backbone"])
    if not record["learnable_t"]:
        return backbone
    from laplacedrl.diffusion.sde import sde_from_dict
    return LearnableTime(backbone, sde_from_dict(record["sde"]), trainable=record["t_trainable"])
