"""LaplaceNet's transforms (its published augmentation) and a dataset view with several copies per image.

weak   = [horizontal flip] -> reflect-padded random crop -> RandAugment(1) + Cutout -> tensor -> normalise
strong = the same with RandAugment(2) + Cutout
eval   = tensor -> normalise

RandAugment(n) (:class:`RandAugmentCutout`) applies ``n`` ops drawn uniformly *with replacement* from
the 14 of :data:`OPS`; every op gets its own value ``v ~ U(low, high)`` of its range (no global
magnitude), and the geometric ops of :data:`SIGNED` negate it with probability 1/2:

- AutoContrast, Equalize, Identity: no parameter (PIL's ``ImageOps`` functions);
- Brightness / Color / Contrast / Sharpness: ``ImageEnhance`` factor ``v`` in [0.05, 0.95] (they only
  ever weaken the image), ``out = trunc(d + v (x - d))`` with the degenerate image ``d`` = black /
  luma / mean luma / SMOOTH-filtered;
- Posterize: keep the top ``int(v)`` bits, ``v`` in [4, 8] (so 4..7 bits);
- Solarize: invert the 8-bit values ``>= v``, ``v`` in [0, 256];
- Rotate: ``v`` in [0, 30] degrees counter-clockwise about ``(W/2, H/2)``;
- ShearX / ShearY: ``v`` in [0, 0.3]; output pixel (x, y) reads input (x + v y, y) / (x, y + v x),
  i.e. sheared about the top-left corner;
- TranslateX / TranslateY: ``v`` in [0, 0.3] of the side, output (x, y) reads input (x + v W, y) /
  (x, y + v H).

The geometric ops resample NEAREST and fill 0 (PIL's ``Image.transform`` / ``Image.rotate``).
After the ops, always (weak included) Cutout: a square of side ``s W`` with ``s = U(0, 1) cutout``
(``cutout`` = 0.5 in the published augmentation) filled with :data:`CUTOUT_FILL`, see :func:`cutout`.
Every random draw of this module comes from torch's global RNG, so that
seeding torch (:mod:`laplacedrl.engine.seeds`) alone fixes an augmentation.
"""

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms as T

KINDS = ("weak", "strong", "eval")
DEFAULT_RA_OPS = {"weak": 1, "strong": 2}

# (name, low, high): the op id is the index; the value of an op is drawn from U(low, high).
OPS = (("AutoContrast", 0.0, 1.0),
       ("Brightness", 0.05, 0.95),
       ("Color", 0.05, 0.95),
       ("Contrast", 0.05, 0.95),
       ("Equalize", 0.0, 1.0),
       ("Identity", 0.0, 1.0),
       ("Posterize", 4.0, 8.0),
       ("Rotate", 0.0, 30.0),
       ("Sharpness", 0.05, 0.95),
       ("ShearX", 0.0, 0.3),
       ("ShearY", 0.0, 0.3),
       ("Solarize", 0.0, 256.0),
       ("TranslateX", 0.0, 0.3),
       ("TranslateY", 0.0, 0.3))
OP_NAMES = tuple(name for name, _, _ in OPS)
SIGNED = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")   # value negated with prob. 1/2
CUTOUT_MAX = 0.5                     # published maximum Cutout side, as a fraction of the image side
CUTOUT_FILL = (125, 123, 114)        # RGB
# One channel (never run by the published code, whose RGB fill fails on mode 'L'): PIL's RGB -> L
# conversion of CUTOUT_FILL, (125 * 19595 + 123 * 38470 + 114 * 7471 + 2**15) >> 16 = 123.
CUTOUT_FILL_GRAY = 123


def cutout_fill(channels):
    """The Cutout colour as a tuple of ``channels`` 8-bit values (3: :data:`CUTOUT_FILL`, 1: its luma)."""
    if channels == 3:
        return CUTOUT_FILL
    if channels == 1:
        return (CUTOUT_FILL_GRAY,)
    raise ValueError(f"Cutout is defined for 1 or 3 channels, got {channels}")


def op_value(k, u):
    """Value of op ``k`` for a uniform draw ``u`` in [0, 1): ``low + u (high - low)``."""
    _, low, high = OPS[k]
    return low + u * (high - low)


def pil_op(img, name, v):
    """Apply op ``name`` of :data:`OPS` with the (already signed) value ``v`` to a PIL 'L' or 'RGB' image."""
    w, h = img.size
    if name == "Identity":
        return img
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        return getattr(ImageEnhance, name)(img).enhance(v)        # Color on 'L': the identity
    if name == "Posterize":
        return ImageOps.posterize(img, max(1, int(v)))
    if name == "Solarize":
        return ImageOps.solarize(img, v)
    if name == "Rotate":
        return img.rotate(v, resample=Image.Resampling.NEAREST)
    # Image.transform's AFFINE data (a, b, c, d, e, f): output (x, y) reads input
    # (a x + b y + c, d x + e y + f)
    matrix = {"ShearX": (1, v, 0, 0, 1, 0), "ShearY": (1, 0, 0, v, 1, 0),
              "TranslateX": (1, 0, v * w, 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, v * h)}[name]
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.NEAREST)


def cutout_box(width, height, side, cx, cy):
    """The Cutout square as inclusive pixel bounds ``(x0, y0, x1, y1)``.

    ``x0 = int(max(0, cx - side / 2))``, ``x1 = min(int(x0 + side), width - 1)`` (the same for y with
    ``cy`` and ``height``): PIL's ``ImageDraw.rectangle`` truncates float corners and includes the
    right and bottom edges, so even a tiny ``side`` covers one pixel.
    """
    x0 = int(max(0.0, cx - side / 2.0))
    y0 = int(max(0.0, cy - side / 2.0))
    x1 = min(int(min(width, x0 + side)), width - 1)
    y1 = min(int(min(height, y0 + side)), height - 1)
    return x0, y0, x1, y1


def cutout(img, frac, cx, cy, fill=None):
    """Fill a square of side ``frac * width`` centred near ``(cx, cy)`` (see :func:`cutout_box`).

    ``fill``: the colour, default :func:`cutout_fill` of the image's channels; ``frac <= 0`` is a no-op.
    """
    if frac <= 0:
        return img
    fill = cutout_fill(len(img.getbands())) if fill is None else tuple(fill)
    img = img.copy()
    ImageDraw.Draw(img).rectangle(cutout_box(img.size[0], img.size[1], frac * img.size[0], cx, cy),
                                  fill=fill if len(fill) > 1 else fill[0])
    return img


def cutout_centre(side_len, u):
    """Cutout centre coordinate from a uniform draw ``u`` in [0, 1): ``side_len + (1 - side_len) u``.

    LaplaceNet's published augmentation calls numpy's ``uniform(w)``, i.e. ``low = w`` with the
    default ``high = 1``: the centre lies in (1, w], not in [0, w). This reproduces that quirk
    (squares reach the right / bottom edge more often than the left / top one).
    """
    return side_len + (1.0 - side_len) * u


class RandAugmentCutout:
    """LaplaceNet's RandAugment(``num_ops``) then Cutout, on a PIL image ('L' or 'RGB').

    Draws ``num_ops`` op ids uniformly with replacement from :data:`OPS`, for each a value
    ``U(low, high)`` and (the :data:`SIGNED` ops) a sign, applies them in order with :func:`pil_op`,
    then :func:`cutout` with side fraction ``U(0, 1) * cutout`` (``cutout = 0``: none) and centre
    :func:`cutout_centre`. All draws come from torch's global RNG.
    """

    def __init__(self, num_ops, cutout=CUTOUT_MAX, fill=None):
        if num_ops < 0:
            raise ValueError(f"num_ops must be >= 0, got {num_ops}")
        if not 0.0 <= cutout <= 1.0:
            raise ValueError(f"cutout is the maximum Cutout side as a fraction of the image side, "
                             f"in [0, 1]; got {cutout}")
        self.num_ops = int(num_ops)
        self.cutout = float(cutout)
        self.fill = fill

    def __call__(self, img):
        n = self.num_ops
        ops = torch.randint(len(OPS), (n,)).tolist()
        uniform = torch.rand(n, dtype=torch.float64).tolist()
        negate = (torch.rand(n) < 0.5).tolist()
        for k, u, neg in zip(ops, uniform, negate):
            name = OPS[k][0]
            v = op_value(k, u)
            img = pil_op(img, name, -v if neg and name in SIGNED else v)
        if self.cutout > 0:
            u_side, u_x, u_y = torch.rand(3, dtype=torch.float64).tolist()
            w, h = img.size
            img = cutout(img, u_side * self.cutout, cutout_centre(w, u_x), cutout_centre(h, u_y), self.fill)
        return img

    def __repr__(self):
        return f"{type(self).__name__}(num_ops={self.num_ops}, cutout={self.cutout})"


def make_transform(spec, kind, ra_ops=None, cutout=CUTOUT_MAX):
    """PIL image -> normalised float tensor (C, H, W) for ``kind`` in ``KINDS``.

    ``ra_ops`` is the number of RandAugment ops (default 1 for weak, 2 for strong; 0 = neither
    RandAugment nor Cutout); ``cutout`` the maximum Cutout side as a fraction of the image side
    (0.5 as published; 0 = no Cutout). The crop uses ``spec.crop_pad`` (0 = no crop) and the flip
    ``spec.hflip``. Normalise: ``x = (pixel / 255 - spec.mean) / spec.std`` per channel.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown transform kind '{kind}'; choose one of {', '.join(KINDS)}")
    steps = []
    if kind != "eval":
        ra_ops = DEFAULT_RA_OPS[kind] if ra_ops is None else ra_ops
        if spec.hflip:
            steps.append(T.RandomHorizontalFlip())
        if spec.crop_pad > 0:
            steps.append(T.RandomCrop(spec.image_size, padding=spec.crop_pad, padding_mode="reflect"))
        if ra_ops > 0:
            steps.append(RandAugmentCutout(ra_ops, cutout))
    steps += [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    return T.Compose(steps)


class AugmentedSubset(Dataset):
    """The images ``indices`` of ``imageset``; item ``j`` -> ``(x, indices[j])``.

    ``x`` is (aug_num, C, H, W): ``aug_num`` independent draws of ``transform``. Labels are not
    returned: the caller looks them (or the current pseudo-labels) up by the dataset index.
    """

    def __init__(self, imageset, indices, transform, aug_num=1):
        if aug_num < 1:
            raise ValueError(f"aug_num must be at least 1, got {aug_num}")
        self.imageset = imageset
        self.indices = np.asarray(indices, dtype=np.int64)  # (M,)
        self.transform = transform
        self.aug_num = aug_num

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        index = int(self.indices[j])
        image = self.imageset.pil(index)
        x = torch.stack([self.transform(image) for _ in range(self.aug_num)])  # (aug_num, C, H, W)
        return x, index
