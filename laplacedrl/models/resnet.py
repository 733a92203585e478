"""ResNet-18 backbone (LaplaceNet's Mini-ImageNet classifier), plain or conditioned on the noise level.

Stem: for inputs of 64 pixels and more (Mini-ImageNet's 84x84) the ImageNet stem, a 7x7 stride-2
conv and a 3x3 stride-2 max-pool, as LaplaceNet's ResNet-18: 84 -> 42 -> 21, then the four stages
run at 21, 11, 6, 3. Smaller inputs get the CIFAR stem (one 3x3 stride-1 conv, no pool) so that
32x32 (or 8x8) images are not reduced to a couple of pixels before the first stage. The choice is
recorded in the architecture record (``stem``) and can be forced with ``stem="imagenet"|"cifar"``.

Initialisation: Kaiming-normal (fan_out) convs, BN weight 1 / bias 0, Xavier-normal head with zero
bias; BatchNorm momentum 0.1 (PyTorch's default) unless ``bn_momentum`` says otherwise.

Time conditioning (``time_cond=True``) uses the same noise embedding and per-block projections as
:mod:`laplacedrl.models.wrn`; ``t_bias`` places each block's bias after conv1 and before BN1
(``"before_bn"``, cancelled by BN1 in training mode when the batch shares one noise value, as
explained there) or after BN1, before the ReLU (``"after_bn"``).
"""
from typing import Optional

import torch
from torch import nn

from laplacedrl.models.wrn import (DEFAULT_EMB_DIM, DEFAULT_FOURIER_SCALE, DEFAULT_NUM_FREQUENCIES,
                                   DEFAULT_T_BIAS, ConditionedBackbone, add_noise_bias, check_t_bias,
                                   noise_projection)

STEMS = ("imagenet", "cifar")
STAGE_WIDTHS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = 2  # ResNet-18
BN_MOMENTUM = 0.1  # PyTorch's default


class BasicBlock(nn.Module):
    """Post-activation basic block: ``relu(BN2(conv2(relu(BN1(conv1(x) [+ b]) [+ b]))) + skip(x))``.

    ``b`` is the noise bias, before BN1 (``t_bias="before_bn"``) or after it (``"after_bn"``).
    ``skip`` is a 1x1 conv + BN when the shape changes, the identity otherwise.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, emb_dim: Optional[int], bn_momentum: float,
                 t_bias: str = DEFAULT_T_BIAS):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch, momentum=bn_momentum)
        self.relu = nn.ReLU()
        self.noise_proj = noise_projection(emb_dim, out_ch)
        self.before_bn = check_t_bias(t_bias) == "before_bn"
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_ch, momentum=bn_momentum))

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor]) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)  # (B, out_ch, H/s, W/s)
        h = self.conv1(x)  # (B, out_ch, H/s, W/s)
        if self.before_bn:
            h = add_noise_bias(h, self.noise_proj, emb)
        h = self.bn1(h)
        if not self.before_bn:
            h = add_noise_bias(h, self.noise_proj, emb)
        h = self.bn2(self.conv2(self.relu(h)))
        return self.relu(h + skip)


class ResNet18(ConditionedBackbone):
    """ResNet-18: stem, four stages of two BasicBlocks (64, 128, 256, 512 channels; strides 1, 2, 2, 2),
    global average pooling, linear head. feature_dim = 512."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, time_cond: bool = False,
                 num_frequencies: int = DEFAULT_NUM_FREQUENCIES, emb_dim: int = DEFAULT_EMB_DIM,
                 fourier_scale: float = DEFAULT_FOURIER_SCALE, t_bias: str = DEFAULT_T_BIAS,
                 *, bn_momentum: float = BN_MOMENTUM, stem: Optional[str] = None):
        super().__init__()
        stem = stem or ("imagenet" if image_size >= 64 else "cifar")
        if stem not in STEMS:
            raise ValueError(f"unknown ResNet stem {stem!r}; valid: {', '.join(STEMS)}")
        self.config = {"arch": "resnet18", "num_classes": num_classes, "in_channels": in_channels,
                       "image_size": image_size, "time_cond": bool(time_cond), "bn_momentum": bn_momentum,
                       "stem": stem}
        cond_dim = self._init_conditioning(time_cond, num_frequencies, emb_dim, fourier_scale, t_bias)

        width0 = STAGE_WIDTHS[0]
        if stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width0, 7, stride=2, padding=3, bias=False),
                                      nn.BatchNorm2d(width0, momentum=bn_momentum), nn.ReLU(),
                                      nn.MaxPool2d(3, stride=2, padding=1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width0, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(width0, momentum=bn_momentum), nn.ReLU())
        blocks, in_ch = [], width0
        for stage, out_ch in enumerate(STAGE_WIDTHS):
            for i in range(BLOCKS_PER_STAGE):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_ch, out_ch, stride, cond_dim, bn_momentum, t_bias))
                in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.feature_dim = in_ch
        self.head = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def trunk(self, x: torch.Tensor, emb: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.stem(x)  # (B, 64, H', W'): H' = H/4 (imagenet stem) or H (cifar stem)
        for block in self.blocks:
            h = block(h, emb)
        return h.mean(dim=(2, 3))  # (B, 512)


def init_weights(model: ResNet18) -> None:
    """Kaiming-normal (fan_out, ReLU) convs, BN weight 1 / bias 0, Xavier-normal head with zero bias.

    The noise embedding and the per-block noise projections keep their variance-scaling init.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.xavier_normal_(model.head.weight)
    nn.init.zeros_(model.head.bias)
