"""LaplaceNet's weak / strong augmentation as batched tensor operations on the training device.

The CPU reference (:func:`laplacedrl.data.augment.make_transform`) augments one PIL image at a time:
``[hflip] -> reflect-pad random crop -> RandAugment(num_ops, magnitude) -> ToTensor -> Normalize``.
:class:`BatchAugment` does the same to a whole (B, C, H, W) batch of [0, 1] images, every sample with
its own flip, crop offset, ops and signs, with no Python loop over samples:

- flip: ``torch.where`` with a per-sample coin;
- crop: reflect-pad the batch once, then gather one (H, W) window per sample at offsets in [0, 2p];
- RandAugment: per round, each sample draws one of the 14 ops of :data:`OPS` uniformly and, for the
  signed ops, a random sign (as ``torchvision.transforms.RandAugment``). The ops are applied in four
  batched groups: one ``grid_sample`` with a per-sample affine matrix for the geometric ops (identity
  for the others), one blend ``clamp(f * x + (1 - f) * degenerate)`` for the enhance ops, then
  posterize / solarize / autocontrast / equalize, each kept by ``torch.where`` on its own samples.

Magnitudes and conventions follow torchvision's tensor functional ops (nearest interpolation, fill 0,
shears about the top-left corner, rotations and translations about the image centre); posterize and
equalize work on the 8-bit values ``round(255 x)`` as PIL does. Results are not bit-identical to PIL
(which rounds to uint8 after every op) but follow the same distribution of ops.
"""

import torch
import torch.nn.functional as F
from torchvision import transforms as T

from laplacedrl.data.augment import DEFAULT_RA_OPS

# torchvision RandAugment's op list, in its order (the op id is the index).
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
       "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
SIGNED = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
           "Contrast", "Sharpness")
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
ENHANCE = ("Brightness", "Color", "Contrast", "Sharpness")
NUM_BINS = 31
_OP_ID = {name: i for i, name in enumerate(OPS)}


def raw_transform(spec):
    """The CPU-side transform when augmenting on the device: PIL -> (C, H, W) float in [0, 1]."""
    return T.ToTensor()


def magnitude_table(magnitude, height, width, num_bins=NUM_BINS) -> torch.Tensor:
    """Unsigned magnitude of every op of :data:`OPS` at bin ``magnitude`` of ``num_bins`` -> (14,).

    As torchvision's RandAugment, with ``u = magnitude / (num_bins - 1)``: shear ``0.3 u``, translate
    ``int(150 / 331 * side * u)`` pixels, rotate ``30 u`` degrees, enhance factors ``1 +- 0.9 u``,
    posterize ``8 - round(4 u)`` bits, solarize threshold ``255 (1 - u)`` (on the 0..255 scale).
    """
    if not 0 <= magnitude < num_bins:
        raise ValueError(f"magnitude must be in [0, {num_bins - 1}], got {magnitude}")

    def ramp(top):
        return float(torch.linspace(0.0, top, num_bins)[magnitude])

    values = {"ShearX": ramp(0.3), "ShearY": ramp(0.3),
              "TranslateX": float(int(ramp(150.0 / 331.0 * width))),
              "TranslateY": float(int(ramp(150.0 / 331.0 * height))),
              "Rotate": ramp(30.0), "Brightness": ramp(0.9), "Color": ramp(0.9),
              "Contrast": ramp(0.9), "Sharpness": ramp(0.9),
              "Posterize": float(8 - round(magnitude / ((num_bins - 1) / 4))),
              "Solarize": float(torch.linspace(255.0, 0.0, num_bins)[magnitude])}
    return torch.tensor([values.get(name, 0.0) for name in OPS])


# ============ random draws (on the generator's device, then moved to the data) ============
def _rand(n, generator, device):
    dev = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=dev).to(device)


def _randint(high, n, generator, device):
    dev = generator.device if generator is not None else device
    return torch.randint(high, (n,), generator=generator, device=dev).to(device)


def sample_ops(n, table, generator=None, device="cpu"):
    """One RandAugment round for ``n`` samples -> (op ids (n,) int64, signed magnitudes (n,) float).

    ``op ~ U{0..13}``; signed ops get a minus sign with probability 1/2 (``table``: (14,) unsigned).
    """
    op = _randint(len(OPS), n, generator, device)                       # (n,)
    flip_sign = _rand(n, generator, device) < 0.5                       # (n,)
    mag = table.to(device)[op] * torch.where(_is(op, *SIGNED) & flip_sign, -1.0, 1.0)  # (n,)
    return op, mag


# ============ flip and crop ============
def random_hflip(x, generator=None):
    """Mirror each sample left-right with probability 1/2.  x: (B, C, H, W)."""
    coin = _rand(x.shape[0], generator, x.device) < 0.5                 # (B,)
    return torch.where(coin[:, None, None, None], x.flip(-1), x)


def random_crop(x, pad, generator=None):
    """Reflect-pad by ``pad`` and cut a random (H, W) window per sample (a shift within [-pad, pad]^2)."""
    if pad <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")              # (B, C, H+2p, W+2p)
    top = _randint(2 * pad + 1, b, generator, x.device)                 # (B,)
    left = _randint(2 * pad + 1, b, generator, x.device)                # (B,)
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, :, None]     # (B, H, 1)
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, :]    # (B, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None]                  # (B, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)


# ============ the RandAugment ops, batched ============
def _is(op, *names):
    """(B,) bool: the samples whose op is one of ``names``."""
    mask = torch.zeros_like(op, dtype=torch.bool)
    for name in names:
        mask |= op == _OP_ID[name]
    return mask


def _keep(mask, new, old):
    return torch.where(mask[:, None, None, None], new, old)


def affine_matrices(op, mag, height, width) -> torch.Tensor:
    """Per-sample inverse affine maps (output pixel -> input pixel) -> (B, 2, 3).

    Coordinates are pixel centres relative to the image centre, as torchvision's tensor affine:
    ShearX ``x' = x + m (y + H/2)``, ShearY ``y' = y + m (x + W/2)`` (shear about the top-left
    corner), TranslateX/Y ``x' = x - int(m)`` / ``y' = y - int(m)``, Rotate by ``m`` degrees
    ``[x'; y'] = [[cos, -sin], [sin, cos]] [x; y]``; every other op the identity.
    """
    zero = torch.zeros_like(mag)
    angle = torch.where(_is(op, "Rotate"), torch.deg2rad(mag), zero)
    cos, sin = torch.cos(angle), torch.sin(angle)
    shear_x = torch.where(_is(op, "ShearX"), mag, zero)
    shear_y = torch.where(_is(op, "ShearY"), mag, zero)
    shift_x = torch.where(_is(op, "TranslateX"), mag.trunc(), zero)
    shift_y = torch.where(_is(op, "TranslateY"), mag.trunc(), zero)
    row0 = torch.stack([cos, shear_x - sin, shear_x * height / 2 - shift_x], 1)   # (B, 3)
    row1 = torch.stack([sin + shear_y, cos, shear_y * width / 2 - shift_y], 1)    # (B, 3)
    return torch.stack([row0, row1], 1)                                          # (B, 2, 3)


def warp(x, theta):
    """Nearest-neighbour resampling with inverse maps ``theta`` (B, 2, 3); outside pixels are 0."""
    h, w = x.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype) - (h - 1) / 2,
                            torch.arange(w, device=x.device, dtype=x.dtype) - (w - 1) / 2,
                            indexing="ij")                                # pixel centres (H, W)
    base = torch.stack([xs, ys, torch.ones_like(xs)], -1)                # (H, W, 3)
    src = torch.einsum("hwk,bjk->bhwj", base, theta.to(x.dtype))         # (B, H, W, 2) in pixels
    grid = torch.stack([src[..., 0] / (w / 2), src[..., 1] / (h / 2)], -1)   # grid_sample's [-1, 1]
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def grayscale(x):
    """ITU-R 601 luma ``0.2989 R + 0.587 G + 0.114 B`` -> (B, 1, H, W) (one channel: itself)."""
    if x.shape[1] == 1:
        return x
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def smoothed(x):
    """PIL's SMOOTH filter ``[[1,1,1],[1,5,1],[1,1,1]] / 13`` on the interior; borders unchanged.

    Computed as ``(3x3 box sum + 4 centre) / 13`` from shifted slices (cheaper than a grouped conv).
    """
    h, w = x.shape[-2:]
    if h <= 2 or w <= 2:
        return x
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]              # (B, C, H-2, W)
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]               # (B, C, H-2, W-2)
    out = x.clone()
    out[..., 1:-1, 1:-1] = (box + 4.0 * x[..., 1:-1, 1:-1]) / 13.0
    return out


def enhance(x, op, mag):
    """Brightness / Color / Contrast / Sharpness: ``clamp(f x + (1 - f) d, 0, 1)`` with ``f = 1 + m``.

    The degenerate image ``d`` is black, the grayscale image, the mean grayscale value, or the
    smoothed image; Color is the identity on one channel and Sharpness on images of side <= 2.
    """
    def weight(name):                                                    # (B, 1, 1, 1) 0/1
        return _is(op, name).to(x.dtype)[:, None, None, None]

    f = (1.0 + mag)[:, None, None, None]                                 # (B, 1, 1, 1)
    gray = grayscale(x)                                                  # (B, 1, H, W)
    degenerate = (weight("Color") * gray + weight("Contrast") * gray.mean((1, 2, 3), keepdim=True)
                  + weight("Sharpness") * smoothed(x))                   # Brightness: 0
    return _keep(_is(op, *ENHANCE), (f * x + (1.0 - f) * degenerate).clamp(0.0, 1.0), x)


def to_levels(x):
    """[0, 1] float -> the 8-bit values ``round(255 x)`` (still float)."""
    return (x * 255.0).round().clamp(0.0, 255.0)


def posterize(x, bits):
    """Keep the top ``bits`` (B,) bits of each 8-bit value."""
    step = torch.exp2(8.0 - bits.round().clamp(0, 8))[:, None, None, None].to(x.dtype)  # (B, 1, 1, 1)
    return torch.floor(to_levels(x) / step) * step / 255.0


def solarize(x, threshold):
    """Invert the values ``>= threshold`` (B,), the threshold on the 0..255 scale."""
    t = threshold[:, None, None, None] / 255.0
    return torch.where(x >= t - 1e-6, 1.0 - x, x)


def autocontrast(x):
    """Stretch each channel of each sample linearly to [0, 1]; constant channels unchanged."""
    lo = x.amin((2, 3), keepdim=True)
    hi = x.amax((2, 3), keepdim=True)
    flat = hi <= lo
    scale = torch.where(flat, torch.ones_like(hi), 1.0 / torch.where(flat, torch.ones_like(hi), hi - lo))
    return ((x - torch.where(flat, torch.zeros_like(lo), lo)) * scale).clamp(0.0, 1.0)


def equalize(x):
    """Histogram equalisation per sample and channel on the 8-bit values (PIL's algorithm).

    With histogram ``h`` (256 bins) and ``step = (sum h - h[last non-empty bin]) // 255``, the
    lookup table is ``lut[v] = min(255, (cumsum(h)[v - 1] + step // 2) // step)`` (``lut[0] = 0``);
    ``step == 0`` leaves the channel unchanged.
    """
    b, c, h, w = x.shape
    levels = to_levels(x).long().view(b * c, h * w)                      # (BC, HW)
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(1, levels, torch.ones_like(levels))                # (BC, 256)
    last = 255 - (hist.flip(1) > 0).long().argmax(1, keepdim=True)       # (BC, 1)
    step = (h * w - hist.gather(1, last)) // 255                         # (BC, 1)
    safe = step.clamp(min=1)
    lut = (hist.cumsum(1) + safe // 2) // safe                           # (BC, 256)
    lut = F.pad(lut, (1, 0))[:, :-1].clamp(0, 255)
    out = torch.where(step > 0, lut.gather(1, levels), levels)           # (BC, HW)
    return out.view(b, c, h, w).to(x.dtype) / 255.0


def apply_ops(x, op, mag):
    """Apply op ``op[i]`` with signed magnitude ``mag[i]`` to sample ``i``.  x: (B, C, H, W) in [0, 1]."""
    h, w = x.shape[-2:]
    x = _keep(_is(op, *GEOMETRIC), warp(x, affine_matrices(op, mag, h, w)), x)
    x = enhance(x, op, mag)
    x = _keep(_is(op, "Posterize"), posterize(x, mag), x)
    x = _keep(_is(op, "Solarize"), solarize(x, mag), x)
    x = _keep(_is(op, "AutoContrast"), autocontrast(x), x)
    return _keep(_is(op, "Equalize"), equalize(x), x)


class BatchAugment(torch.nn.Module):
    """Weak / strong LaplaceNet augmentation of a batch, then normalisation with ``spec.mean/std``.

    ``forward(x)``: x (B, C, H, W) float in [0, 1] (or uint8 0..255) on any device -> (B, C, H, W)
    float32 ``(aug(x) - mean) / std``. ``ra_ops`` RandAugment rounds per sample (default 1 weak,
    2 strong; 0 = none) at bin ``ra_magnitude`` of 31. Random draws use ``generator`` (on any device)
    or the global RNG of x's device. Runs in float32 even inside an autocast region.
    """

    def __init__(self, spec, kind="weak", ra_ops=None, ra_magnitude=10):
        super().__init__()
        if kind not in DEFAULT_RA_OPS:
            raise ValueError(f"unknown augmentation kind '{kind}'; choose weak or strong")
        self.spec = spec
        self.ra_ops = DEFAULT_RA_OPS[kind] if ra_ops is None else int(ra_ops)
        if self.ra_ops < 0:
            raise ValueError(f"ra_ops must be >= 0, got {ra_ops}")
        self.register_buffer("table", magnitude_table(ra_magnitude, spec.image_size, spec.image_size),
                             persistent=False)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x, generator=None):
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if self.spec.hflip:
                x = random_hflip(x, generator)
            x = random_crop(x, self.spec.crop_pad, generator)
            for _ in range(self.ra_ops):
                x = apply_ops(x, *sample_ops(x.shape[0], self.table, generator, x.device))
            return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def extra_repr(self):
        return (f"dataset={self.spec.name}, ra_ops={self.ra_ops}, hflip={self.spec.hflip}, "
                f"crop_pad={self.spec.crop_pad}")
