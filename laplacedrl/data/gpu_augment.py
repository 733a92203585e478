"""LaplaceNet's weak / strong augmentation as batched tensor operations on the training device.

The CPU reference (:func:`laplacedrl.data.augment.make_transform`) augments one PIL image at a time:
``[hflip] -> reflect-pad random crop -> RandAugment(n) + Cutout -> ToTensor -> Normalize``.
:class:`BatchAugment` does the same to a whole (B, C, H, W) batch, every sample with its own flip,
crop offset, ops, values, signs and Cutout square, with no Python loop over samples:

- the batch is first quantised to the 8-bit levels ``round(255 x)`` (float tensors holding integers),
  and every op maps levels to levels with PIL's own integer arithmetic, so that an op gives the
  PIL op's pixels (see the functions for the rounding conventions);
- flip: ``torch.where`` with a per-sample coin; crop: reflect-pad the batch once, then gather one
  (H, W) window per sample at offsets in [0, 2p];
- RandAugment: per round, each sample draws one of the 14 ops of :data:`OPS` uniformly (rounds are
  independent, so ops repeat: drawn with replacement) and its value ``U(low, high)``; the ops of
  :data:`SIGNED` negate it with probability 1/2 (:func:`sample_ops`). The ops are applied in batched
  groups: one gather with a per-sample fixed-point affine map for the geometric ops, one blend for
  the enhance ops, then posterize / solarize / autocontrast / equalize, each on its own samples
  (on the CPU computed for those samples only; elsewhere for the whole batch and selected by
  ``torch.where``, which needs no host sync);
- Cutout after the last round (:func:`sample_cutout`, :func:`apply_cutout`).

Per-sample parameters (values, affine coefficients) are float64 (B,) vectors, as in PIL's double
arithmetic. For the same draws the pixels equal the PIL path's (bit for bit in the tests on the
CPU; only float ties could differ); the draws themselves come from another stream than the PIL
path's, so the two agree in distribution, not sample by sample.
"""

import torch
import torch.nn.functional as F
from torchvision import transforms as T

from laplacedrl.data.augment import (CUTOUT_MAX, DEFAULT_RA_OPS, OP_NAMES, OPS, SIGNED, cutout_fill)

GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
ENHANCE = ("Brightness", "Color", "Contrast", "Sharpness")
_OP_ID = {name: i for i, name in enumerate(OP_NAMES)}
_ONE = 65536                                        # 1.0 in PIL's 16.16 fixed point


def raw_transform(spec):
    """The CPU-side transform when augmenting on the device: PIL -> (C, H, W) float in [0, 1]."""
    return T.ToTensor()


# ============ random draws (on the generator's device, then moved to the data) ============
def _rand(n, generator, device, dtype=torch.float32):
    dev = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=dev, dtype=dtype).to(device)


def _randint(high, n, generator, device):
    dev = generator.device if generator is not None else device
    return torch.randint(high, (n,), generator=generator, device=dev).to(device)


def op_ranges(device="cpu"):
    """(low (14,), high (14,)) float64: the value range of every op of :data:`OPS`."""
    low = torch.tensor([lo for _, lo, _ in OPS], dtype=torch.float64, device=device)
    high = torch.tensor([hi for _, _, hi in OPS], dtype=torch.float64, device=device)
    return low, high


def sample_ops(n, generator=None, device="cpu", ranges=None):
    """One RandAugment round for ``n`` samples -> (op ids (n,) int64, signed values (n,) float64).

    ``op ~ U{0..13}``, ``v = low[op] + u (high[op] - low[op])`` with ``u ~ U[0, 1)``, and for the
    :data:`SIGNED` ops ``v -> -v`` with probability 1/2. ``ranges``: (low, high) on ``device``
    (default :func:`op_ranges`).
    """
    op = _randint(len(OPS), n, generator, device)                                    # (n,)
    u = _rand(n, generator, device, torch.float64)                                   # (n,)
    negate = _rand(n, generator, device) < 0.5                                       # (n,)
    low, high = op_ranges(device) if ranges is None else ranges
    value = low[op] + u * (high[op] - low[op])                                       # (n,)
    return op, torch.where(_is(op, *SIGNED) & negate, -value, value)


def sample_cutout(n, height, width, cutout=CUTOUT_MAX, generator=None, device="cpu"):
    """Cutout draws for ``n`` samples -> (side fraction, centre x, centre y), each (n,) float64.

    ``frac = U(0, 1) cutout``; the centre coordinates are ``w + (1 - w) U(0, 1)`` and the same with
    ``h``: LaplaceNet's published augmentation calls numpy's ``uniform(w)``, whose ``low = w`` and
    default ``high = 1`` put the centre in (1, w] instead of [0, w); reproduced on purpose.
    """
    u = _rand(3 * n, generator, device, torch.float64).view(3, n)                    # (3, n)
    return u[0] * cutout, width + (1.0 - width) * u[1], height + (1.0 - height) * u[2]


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


# ============ the ops, batched, on 8-bit levels ============
def _is(op, *names):
    """(B,) bool: the samples whose op is one of ``names``."""
    mask = torch.zeros_like(op, dtype=torch.bool)
    for name in names:
        mask |= op == _OP_ID[name]
    return mask


def _keep(mask, new, old):
    return torch.where(mask[:, None, None, None], new, old)


def to_levels(x):
    """[0, 1] float -> the 8-bit values ``round(255 x)`` (float32 holding integers)."""
    return (x.float() * 255.0).round().clamp(0.0, 255.0)


def affine_coefficients(op, value, height, width) -> torch.Tensor:
    """Per-sample inverse affine maps in PIL's 16.16 fixed point -> (B, 6) int64 ``A``.

    Output pixel (x, y) reads input ``((A0 x + A1 y + A2) >> 16, (A3 x + A4 y + A5) >> 16)``, as
    PIL's nearest ``Image.transform`` does for a map (a, b, c, d, e, f) (input = (a x + b y + c,
    d x + e y + f) at pixel centres ``x + 1/2``): ``A0 = FIX(a)``, ``A1 = FIX(b)``,
    ``A2 = FIX(c + a/2 + b/2)`` etc., ``FIX(t) = floor(65536 t + 1/2)``. The maps:
    ShearX (1, v, 0, 0, 1, 0), ShearY (1, 0, 0, v, 1, 0); Rotate by ``v`` degrees counter-clockwise
    about (W/2, H/2): with ``t = -radians(v mod 360)``, (cos t, sin t, c, -sin t, cos t, f) where c, f
    map the centre to itself. TranslateX/Y by ``v W`` / ``v H`` pixels: PIL takes its float path
    (``floor(x + 1/2 + v W)``), an integer shift ``floor(v W + 1/2)``, coded here exactly. Every other
    op: the identity (1, 0, 0, 0, 1, 0).
    """
    v = value.double()                                                               # (B,)
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    t = -torch.deg2rad(torch.remainder(v, 360.0))
    cos, sin = torch.round(torch.cos(t), decimals=15), torch.round(torch.sin(t), decimals=15)
    cx, cy = width / 2.0, height / 2.0
    rotate = torch.stack([cos, sin, cos * -cx + sin * -cy + cx,
                          -sin, cos, -sin * -cx + cos * -cy + cy], 1)               # (B, 6)
    shear_x = torch.stack([one, v, zero, zero, one, zero], 1)
    shear_y = torch.stack([one, zero, zero, v, one, zero], 1)
    identity = torch.stack([one, zero, zero, zero, one, zero], 1)
    m = torch.where(_is(op, "Rotate")[:, None], rotate, identity)
    m = torch.where(_is(op, "ShearX")[:, None], shear_x, m)
    m = torch.where(_is(op, "ShearY")[:, None], shear_y, m)                          # (B, 6)
    a, b, c, d, e, f = m.unbind(1)
    fixed = torch.stack([a, b, c + a * 0.5 + b * 0.5, d, e, f + d * 0.5 + e * 0.5], 1)
    fixed = torch.floor(fixed * _ONE + 0.5).long()                                   # (B, 6)
    shift_x = torch.floor(v * width + 0.5).long() * _ONE + _ONE // 2
    shift_y = torch.floor(v * height + 0.5).long() * _ONE + _ONE // 2
    fixed[:, 2] = torch.where(_is(op, "TranslateX"), shift_x, fixed[:, 2])
    fixed[:, 5] = torch.where(_is(op, "TranslateY"), shift_y, fixed[:, 5])
    return fixed


def warp(x, coef):
    """Nearest resampling with the fixed-point inverse maps ``coef`` (B, 6); outside pixels are 0."""
    b, c, h, w = x.shape
    ys = torch.arange(h, device=x.device)[:, None]                                  # (H, 1)
    xs = torch.arange(w, device=x.device)[None, :]                                  # (1, W)
    a = coef[:, :, None, None]                                                      # (B, 6, 1, 1)
    src_x = torch.div(a[:, 0] * xs + a[:, 1] * ys + a[:, 2], _ONE, rounding_mode="floor")  # (B, H, W)
    src_y = torch.div(a[:, 3] * xs + a[:, 4] * ys + a[:, 5], _ONE, rounding_mode="floor")  # (B, H, W)
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)                # (B, H, W)
    index = torch.where(inside, src_y * w + src_x, 0).view(b, 1, h * w).expand(b, c, h * w)
    out = x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)                  # (B, C, H, W)
    return torch.where(inside[:, None], out, torch.zeros_like(out))


def luma(x):
    """PIL's RGB -> L on levels: ``(19595 R + 38470 G + 7471 B + 2^15) >> 16`` -> (B, 1, H, W).

    Exact in float32 (every partial sum is an integer below 2^24). One channel: itself.
    """
    if x.shape[1] == 1:
        return x
    s = 19595.0 * x[:, 0:1] + 38470.0 * x[:, 1:2] + 7471.0 * x[:, 2:3] + 32768.0
    return torch.floor(s / 65536.0)


def smoothed(x):
    """PIL's SMOOTH filter ``[[1,1,1],[1,5,1],[1,1,1]] / 13`` rounded half up; border pixels unchanged.

    ``floor(sum / 13 + 1/2) = floor((2 sum + 13) / 26)``: the quotient is never within 1/26 of an
    integer, so float32 is exact.
    """
    h, w = x.shape[-2:]
    if h <= 2 or w <= 2:
        return x
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]              # (B, C, H-2, W)
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]               # (B, C, H-2, W-2)
    out = x.clone()
    out[..., 1:-1, 1:-1] = torch.floor((2.0 * (box + 4.0 * x[..., 1:-1, 1:-1]) + 13.0) / 26.0)
    return out


def enhance(x, op, value):
    """Brightness / Color / Contrast / Sharpness as PIL's ``ImageEnhance``: ``trunc(d + f (x - d))``.

    ``f = float32(v)`` and float32 arithmetic as PIL's ``Image.blend``, clamped to [0, 255]. The
    degenerate image ``d``: black; the luma (Color; on one channel that is ``x``, so the identity);
    the constant ``floor(mean luma + 1/2)`` (Contrast); :func:`smoothed` (Sharpness).
    """
    def weight(name):                                                    # (B, 1, 1, 1) 0/1
        return _is(op, name).float()[:, None, None, None]

    f = value.float()[:, None, None, None]                               # (B, 1, 1, 1)
    gray = luma(x)                                                       # (B, 1, H, W)
    n = gray.shape[-1] * gray.shape[-2]
    total = gray.long().sum((1, 2, 3), keepdim=True)                     # (B, 1, 1, 1)
    mean = ((2 * total + n) // (2 * n)).float()                          # integer: exact on any device
    degenerate = (weight("Color") * gray + weight("Contrast") * mean
                  + weight("Sharpness") * smoothed(x))                   # Brightness: 0
    out = torch.trunc(degenerate + f * (x - degenerate)).clamp(0.0, 255.0)
    return _keep(_is(op, *ENHANCE), out, x)


def posterize(x, value):
    """Keep the top ``max(1, int(v))`` bits of each level: ``floor(x / 2^k) 2^k``, ``k = 8 - bits``."""
    bits = torch.trunc(value).clamp(1, 8)
    step = torch.exp2(8.0 - bits).float()[:, None, None, None]           # (B, 1, 1, 1)
    return torch.floor(x / step) * step


def solarize(x, value):
    """Invert (``255 - x``) the levels ``x >= v``; on integers that is ``x >= ceil(v)``."""
    threshold = torch.ceil(value).float()[:, None, None, None]           # (B, 1, 1, 1)
    return torch.where(x >= threshold, 255.0 - x, x)


def autocontrast(x):
    """PIL's ``ImageOps.autocontrast`` per sample and channel: ``lut[v] = trunc(v s - lo s)`` clamped to
    [0, 255], ``s = 255 / (hi - lo)`` with the channel's min / max level ``lo`` / ``hi``.

    The table is computed in float64 as PIL does (an exact integer formula differs for about 0.4 %
    of (lo, hi, v) triples); constant channels unchanged.
    """
    b, c, h, w = x.shape
    levels = x.long().reshape(b * c, h * w)                              # (BC, HW)
    lo = levels.amin(1, keepdim=True).double()                           # (BC, 1)
    hi = levels.amax(1, keepdim=True).double()
    flat = hi <= lo
    # a true division (``255.0 / t`` would multiply by a rounded reciprocal)
    scale = torch.div(torch.full_like(hi, 255.0), torch.where(flat, torch.ones_like(hi), hi - lo))
    v = torch.arange(256, device=x.device, dtype=torch.float64)          # (256,)
    lut = torch.trunc(v * scale + (-lo * scale)).clamp(0.0, 255.0)       # (BC, 256)
    out = lut.gather(1, levels).to(x.dtype)                              # (BC, HW)
    return torch.where(flat, x.reshape(b * c, h * w), out).view(b, c, h, w)


def equalize(x):
    """PIL's ``ImageOps.equalize`` per sample and channel on the levels.

    With histogram ``h`` (256 bins) and ``step = (sum h - h[last non-empty bin]) // 255``, the lookup
    table is ``lut[v] = min(255, (sum_{u<v} h[u] + step // 2) // step)``; ``step == 0`` (at most one
    non-empty bin, or too few pixels) leaves the channel unchanged.
    """
    b, c, h, w = x.shape
    levels = x.long().reshape(b * c, h * w)                              # (BC, HW)
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(1, levels, torch.ones_like(levels))                # (BC, 256)
    last = 255 - (hist.flip(1) > 0).long().argmax(1, keepdim=True)       # (BC, 1)
    step = (h * w - hist.gather(1, last)) // 255                         # (BC, 1)
    safe = step.clamp(min=1)
    below = F.pad(hist.cumsum(1), (1, 0))[:, :-1]                        # (BC, 256) sum_{u<v} h[u]
    lut = ((below + safe // 2) // safe).clamp(max=255)
    out = torch.where(step > 0, lut.gather(1, levels), levels)           # (BC, HW)
    return out.view(b, c, h, w).to(x.dtype)


def _on(mask, fn, x, args, compact):
    """``x`` with ``fn(x, *args)`` on the samples of ``mask`` (B,) (``args``: per-sample tensors).

    ``compact``: run ``fn`` on those samples only and write them into ``x`` in place (a host sync
    for the index, cheap on the CPU); otherwise on the whole batch, selected by ``torch.where``
    (no sync, for accelerators).
    """
    if not compact:
        return _keep(mask, fn(x, *args), x)
    index = mask.nonzero().squeeze(1)                                    # (M,)
    if index.numel() > 0:
        x[index] = fn(x[index], *(a[index] for a in args))
    return x


def apply_ops(x, op, value, compact=None):
    """Apply op ``op[i]`` with signed value ``value[i]`` to sample ``i``.  x: (B, C, H, W) levels 0..255.

    ``compact`` (default: on the CPU) computes each op only on the samples that drew it; the result
    is the same either way. ``x`` is not modified.
    """
    h, w = x.shape[-2:]
    compact = x.device.type == "cpu" if compact is None else compact
    if compact:
        x = x.clone()
    x = _on(_is(op, *GEOMETRIC), lambda y, o, v: warp(y, affine_coefficients(o, v, h, w)), x, (op, value),
            compact)
    x = _on(_is(op, *ENHANCE), enhance, x, (op, value), compact)
    x = _on(_is(op, "Posterize"), posterize, x, (value,), compact)
    x = _on(_is(op, "Solarize"), solarize, x, (value,), compact)
    x = _on(_is(op, "AutoContrast"), autocontrast, x, (), compact)
    return _on(_is(op, "Equalize"), equalize, x, (), compact)


def apply_cutout(x, frac, cx, cy, fill=None):
    """Fill one square per sample with ``fill`` (C levels, default :func:`cutout_fill`). x: (B, C, H, W).

    Side ``s = frac W``; inclusive bounds ``x0 = floor(max(0, cx - s/2))``,
    ``x1 = min(floor(x0 + s), W - 1)`` and the same for rows with ``cy`` and H (as PIL's
    ``ImageDraw.rectangle`` draws the published float corners); ``frac <= 0``: nothing.
    """
    b, c, h, w = x.shape
    side = frac * w                                                      # (B,) float64
    x0 = torch.floor(torch.clamp(cx - side / 2, min=0.0))
    y0 = torch.floor(torch.clamp(cy - side / 2, min=0.0))
    x1 = torch.clamp(torch.floor(x0 + side), max=w - 1)
    y1 = torch.clamp(torch.floor(y0 + side), max=h - 1)
    cols = torch.arange(w, device=x.device, dtype=torch.float64)         # (W,)
    rows = torch.arange(h, device=x.device, dtype=torch.float64)         # (H,)
    in_cols = (cols >= x0[:, None]) & (cols <= x1[:, None])              # (B, W)
    in_rows = (rows >= y0[:, None]) & (rows <= y1[:, None])              # (B, H)
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & (frac > 0)[:, None, None])  # (B, H, W)
    colour = torch.as_tensor(cutout_fill(c) if fill is None else fill, dtype=x.dtype, device=x.device)
    return torch.where(mask[:, None], colour.view(1, c, 1, 1), x)


class BatchAugment(torch.nn.Module):
    """Weak / strong LaplaceNet augmentation of a batch, then normalisation with ``spec.mean/std``.

    ``forward(x)``: x (B, C, H, W) float in [0, 1] (or uint8 0..255) on any device -> (B, C, H, W)
    float32 ``(aug(x) - mean) / std``. Order: [flip] -> crop -> ``ra_ops`` RandAugment rounds
    (default 1 weak, 2 strong; 0 = neither RandAugment nor Cutout) -> Cutout of maximum side
    ``cutout`` of the image side (0.5 as published; 0 = none). Random draws use ``generator`` (on
    any device) or the global RNG of x's device. Runs in float32 even inside an autocast region.
    """

    def __init__(self, spec, kind="weak", ra_ops=None, cutout=CUTOUT_MAX):
        super().__init__()
        if kind not in DEFAULT_RA_OPS:
            raise ValueError(f"unknown augmentation kind '{kind}'; choose weak or strong")
        self.spec = spec
        self.ra_ops = DEFAULT_RA_OPS[kind] if ra_ops is None else int(ra_ops)
        if self.ra_ops < 0:
            raise ValueError(f"ra_ops must be >= 0, got {ra_ops}")
        if not 0.0 <= cutout <= 1.0:
            raise ValueError(f"cutout is the maximum Cutout side as a fraction of the image side, "
                             f"in [0, 1]; got {cutout}")
        self.cutout = float(cutout)
        low, high = op_ranges()
        # constants as buffers, so that a forward on the device copies nothing from the host
        self.register_buffer("low", low, persistent=False)
        self.register_buffer("high", high, persistent=False)
        self.register_buffer("fill", torch.tensor(cutout_fill(spec.channels), dtype=torch.float32),
                             persistent=False)                          # (C,) levels; 1 or 3 channels
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x, generator=None):
        with torch.autocast(x.device.type, enabled=False):
            b, _, h, w = x.shape
            dev = x.device
            x = x.float() if x.dtype == torch.uint8 else to_levels(x)    # (B, C, H, W) 0..255
            if self.spec.hflip:
                x = random_hflip(x, generator)
            x = random_crop(x, self.spec.crop_pad, generator)
            ranges = (self.low.to(dev), self.high.to(dev))
            for _ in range(self.ra_ops):
                x = apply_ops(x, *sample_ops(b, generator, dev, ranges))
            if self.ra_ops > 0 and self.cutout > 0:
                frac, cx, cy = sample_cutout(b, h, w, self.cutout, generator, dev)
                x = apply_cutout(x, frac, cx, cy, fill=self.fill.to(dev))
            return (x / 255.0 - self.mean.to(dev)) / self.std.to(dev)

    def extra_repr(self):
        return (f"dataset={self.spec.name}, ra_ops={self.ra_ops}, cutout={self.cutout}, "
                f"hflip={self.spec.hflip}, crop_pad={self.spec.crop_pad}")
