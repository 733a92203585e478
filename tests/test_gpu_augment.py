"""The batched (device) augmentation against the PIL path: op table, op by op, pipeline, in distribution.

Both paths implement LaplaceNet's published augmentation (RandAugment with per-op random values,
drawn with replacement, then Cutout). The PIL path's own conventions are pinned in test_data.py.
"""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms import functional as TF

from laplacedrl.data import augment as pil_aug
from laplacedrl.data import gpu_augment as gpu_aug
from laplacedrl.data.augment import (CUTOUT_FILL, CUTOUT_FILL_GRAY, DEFAULT_RA_OPS, OP_NAMES, OPS, SIGNED,
                                     cutout, make_transform, pil_op)
from laplacedrl.data.datasets import DatasetSpec
from laplacedrl.data.gpu_augment import (BatchAugment, apply_cutout, apply_ops, op_ranges, raw_transform,
                                         sample_cutout, sample_ops)

DIGITS = DatasetSpec("digits", 10, 1, 8, (0.3053,), (0.3758,), crop_pad=1, hflip=False)
CIFAR = DatasetSpec("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                    crop_pad=4, hflip=True)
MINI = dataclasses.replace(CIFAR, name="miniimagenet", image_size=84, crop_pad=8)

# LaplaceNet's published op table, written out: (name, low, high) in its order.
PUBLISHED_OPS = (("AutoContrast", 0, 1), ("Brightness", 0.05, 0.95), ("Color", 0.05, 0.95),
                 ("Contrast", 0.05, 0.95), ("Equalize", 0, 1), ("Identity", 0, 1), ("Posterize", 4, 8),
                 ("Rotate", 0, 30), ("Sharpness", 0.05, 0.95), ("ShearX", 0, 0.3), ("ShearY", 0, 0.3),
                 ("Solarize", 0, 256), ("TranslateX", 0, 0.3), ("TranslateY", 0, 0.3))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def structured_images(n, channels, size, seed=0):
    """(n, size, size, channels) uint8: gradients, a rectangle, a disc, stripes; no pixel is the Cutout fill.

    One image is a low-contrast noise patch and one almost constant (edge cases of autocontrast /
    equalize / contrast).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    images = []
    for i in range(n):
        lo, hi = rng.uniform(0, 80), rng.uniform(150, 255)
        planes = [xx, yy, 0.5 * (1 - xx) + 0.5 * yy][:channels] if channels == 3 else [xx * (1 - yy)]
        img = lo + (hi - lo) * np.stack(planes, -1)                              # (H, W, C)
        top, left = rng.integers(0, size // 2, 2)
        img[top:top + max(1, size // 3), left:left + max(1, size // 4)] = rng.uniform(0, 255, channels)
        cy, cx = rng.uniform(0.4, 0.8, 2) * size
        img[(yy * size - cy) ** 2 + (xx * size - cx) ** 2 < (size / 5) ** 2] = rng.uniform(0, 255, channels)
        img[: max(1, size // 8), ::3] = 0.0                                      # stripes at the top
        if i == n - 2:
            img = rng.uniform(100, 112, (size, size, channels))                  # low contrast
        if i == n - 1:
            img = np.full((size, size, channels), 60.0)
            img[0, 0] = 61.0                                                      # almost constant
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    images = np.stack(images)
    fill = np.array(CUTOUT_FILL if channels == 3 else (CUTOUT_FILL_GRAY,), dtype=np.uint8)
    images[(images == fill).all(-1)] += np.uint8(1)
    return images


def to_pil(a):
    return Image.fromarray(a if a.shape[-1] == 3 else a[..., 0])


def pil_levels(img, channels):
    """PIL image -> (C, H, W) float levels 0..255."""
    a = np.array(img, dtype=np.float32)
    return torch.from_numpy(a.reshape(a.shape[0], a.shape[1], channels)).permute(2, 0, 1)


def test_op_table_is_the_published_one():
    assert tuple((n, float(lo), float(hi)) for n, lo, hi in OPS) == \
        tuple((n, float(lo), float(hi)) for n, lo, hi in PUBLISHED_OPS)
    assert set(SIGNED) == {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}
    low, high = op_ranges()                                     # the batched path reads the same table
    assert low.tolist() == [lo for _, lo, _ in PUBLISHED_OPS]
    assert high.tolist() == [hi for _, _, hi in PUBLISHED_OPS]
    assert CUTOUT_FILL == (125, 123, 114)
    assert CUTOUT_FILL_GRAY == Image.new("RGB", (1, 1), CUTOUT_FILL).convert("L").getpixel((0, 0)) == 123


def test_sample_ops_uniform_with_replacement_ranges_and_signs():
    n = 28_000
    g = gen(3)
    op, value = sample_ops(n, g)
    op2, _ = sample_ops(n, g)                                  # a second round, as strong draws
    assert op.dtype == torch.int64 and value.dtype == torch.float64
    counts = torch.bincount(op, minlength=len(OPS)).double()
    expected = n / len(OPS)
    assert float(((counts - expected) ** 2 / expected).sum()) < 34.5   # chi-square, 13 dof, p = 0.001
    # with replacement: the two rounds pick the same op 1/14 of the time (without replacement: never)
    assert abs(float((op == op2).double().mean()) - 1 / 14) < 0.006
    for k, (name, lo, hi) in enumerate(OPS):
        v = value[op == k]
        mag = v.abs()
        span = hi - lo
        assert float(mag.min()) >= lo and float(mag.max()) <= hi, name
        assert float(mag.min()) < lo + 0.01 * span and float(mag.max()) > hi - 0.01 * span, name
        assert abs(float(mag.mean()) - (lo + hi) / 2) < 0.02 * span, name     # uniform: SE ~ 0.0065 span
        negative = float((v < 0).double().mean())
        if name in SIGNED:
            assert abs(negative - 0.5) < 0.05, name
        else:
            assert negative == 0.0, name


@pytest.mark.parametrize("size", [8, 32])
def test_sample_cutout_ranges_and_centre_quirk(size):
    n = 20_000
    frac, cx, cy = sample_cutout(n, size, size, 0.5, gen(5))
    assert float(frac.min()) >= 0 and float(frac.max()) < 0.5
    assert abs(float(frac.mean()) - 0.25) < 0.005
    for c in (cx, cy):
        # numpy's uniform(w) = U(w, 1): in (1, w], mean (w + 1) / 2 (not w / 2)
        assert float(c.min()) > 1.0 and float(c.max()) <= size
        assert float(c.min()) < 1.0 + 0.01 * size and float(c.max()) > 0.99 * size
        assert abs(float(c.mean()) - (size + 1) / 2) < 0.25           # SE <= 0.065; w / 2 is 0.5 off
    assert abs(float(torch.corrcoef(torch.stack([cx, cy]))[0, 1])) < 0.05       # independent


@pytest.mark.parametrize("channels,size", [(3, 32), (1, 8)])
@pytest.mark.parametrize("name", OP_NAMES)
def test_each_op_matches_the_pil_op(name, channels, size):
    """Exact equality: the batched ops use PIL's 8-bit arithmetic (16.16 fixed point for the affine
    maps, float32 blends truncated, float64 autocontrast tables), so only float ties could differ and
    none occur for these values."""
    u8 = structured_images(6, channels, size, seed=7)
    k = OP_NAMES.index(name)
    _, lo, hi = OPS[k]
    values = [lo + f * (hi - lo) for f in (0.0, 0.13, 0.5, 0.77, 0.999)]
    if name in SIGNED:
        values += [-v for v in values]
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float()                          # (6, C, H, W) levels
    changed = False
    for v in values:
        out = apply_ops(x, torch.full((len(u8),), k), torch.full((len(u8),), v, dtype=torch.float64))
        ref = torch.stack([pil_levels(pil_op(to_pil(a), name, v), channels) for a in u8])
        torch.testing.assert_close(out, ref, atol=0, rtol=0, msg=f"{name} v={v}")
        changed |= not torch.equal(out, x)
    # not vacuous: every op changes some image except Identity, Color on one channel, and Equalize
    # on 8x8 (PIL's equalize leaves a channel alone unless 255 pixels lie outside its top bin)
    assert changed == (name != "Identity" and not (size == 8 and name in ("Color", "Equalize")))


def test_mixed_ops_in_one_batch_equal_the_ops_one_by_one():
    x = torch.from_numpy(structured_images(len(OPS) * 2, 3, 16, seed=1)).permute(0, 3, 1, 2).float()
    op = torch.arange(len(OPS)).repeat(2)
    low, high = op_ranges()
    value = (low[op] + 0.6 * (high[op] - low[op])) * torch.tensor([1.0, -1.0]).repeat_interleave(len(OPS))
    value = torch.where(torch.isin(op, torch.tensor([OP_NAMES.index(s) for s in SIGNED])), value, value.abs())
    before = x.clone()
    out = apply_ops(x, op, value)                              # CPU default: each op on its samples only
    assert torch.equal(x, before)                              # the input is left alone
    # the accelerator form (every op on the whole batch, selected by torch.where) gives the same
    torch.testing.assert_close(apply_ops(x, op, value, compact=False), out, atol=0, rtol=0)
    for i in range(len(op)):
        alone = apply_ops(x[i:i + 1], op[i:i + 1], value[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], alone, atol=0, rtol=0)


@pytest.mark.parametrize("channels,size", [(3, 32), (1, 8)])
def test_cutout_matches_the_pil_cutout(channels, size):
    n = 300
    u8 = structured_images(n, channels, size, seed=2)
    frac, cx, cy = sample_cutout(n, size, size, 0.5, gen(11))
    frac[:3] = torch.tensor([1e-4, 0.5, 0.0], dtype=torch.float64)     # 1 pixel, the largest, none
    cx[:3] = torch.tensor([1.0, float(size), 5.0], dtype=torch.float64)
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float()
    out = apply_cutout(x, frac, cx, cy)
    ref = torch.stack([pil_levels(cutout(to_pil(a), float(f), float(i), float(j)), channels)
                       for a, f, i, j in zip(u8, frac, cx, cy)])
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    fill = torch.tensor(CUTOUT_FILL if channels == 3 else (CUTOUT_FILL_GRAY,)).float().view(1, -1, 1, 1)
    covered = (out == fill).all(1).flatten(1).sum(1)                               # (n,) pixels
    assert int(covered[0]) == 1 and int(covered[2]) == 0 and bool((covered[3:] >= 1).all())


@pytest.mark.parametrize("spec", [DIGITS, CIFAR], ids=lambda s: s.name)
def test_pipeline_equals_the_pil_ops_for_the_same_draws(spec):
    """BatchAugment = flip -> crop -> RandAugment rounds -> Cutout, with draws in that order from the
    generator; replaying those draws through the PIL ops gives the same pixels."""
    n, s, p = 24, spec.image_size, spec.crop_pad
    u8 = structured_images(n, spec.channels, s, seed=4)
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255
    out = BatchAugment(spec, "strong")(x, gen(9))
    g = gen(9)
    flip = torch.rand(n, generator=g) < 0.5 if spec.hflip else torch.zeros(n, dtype=torch.bool)
    top = torch.randint(2 * p + 1, (n,), generator=g)
    left = torch.randint(2 * p + 1, (n,), generator=g)
    rounds = [sample_ops(n, g) for _ in range(2)]
    frac, cx, cy = sample_cutout(n, s, s, 0.5, g)
    mean, std = torch.tensor(spec.mean).view(-1, 1, 1), torch.tensor(spec.std).view(-1, 1, 1)
    for i in range(n):
        img = to_pil(u8[i])
        if flip[i]:
            img = ImageOps.mirror(img)
        img = TF.pad(img, p, padding_mode="reflect").crop((int(left[i]), int(top[i]),
                                                           int(left[i]) + s, int(top[i]) + s))
        for op, value in rounds:
            img = pil_op(img, OP_NAMES[int(op[i])], float(value[i]))
        img = cutout(img, float(frac[i]), float(cx[i]), float(cy[i]))
        ref = (pil_levels(img, spec.channels) / 255 - mean) / std
        torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=0)
    assert not torch.equal(out, BatchAugment(spec, "strong")(x, gen(10)))


@pytest.mark.parametrize("spec", [DIGITS, CIFAR, MINI], ids=lambda s: s.name)
@pytest.mark.parametrize("kind", ["weak", "strong"])
def test_output_shape_dtype_range_and_cutout_in_every_sample(spec, kind):
    u8 = structured_images(7, spec.channels, spec.image_size)
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255
    out = BatchAugment(spec, kind)(x, generator=gen(1))
    assert out.shape == x.shape and out.dtype == torch.float32
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    levels = (out * std + mean) * 255                                  # back to 0..255
    assert levels.min() >= -1e-3 and levels.max() <= 255 + 1e-3
    assert torch.allclose(levels, levels.round(), atol=1e-3)           # 8-bit levels, as PIL
    fill = torch.tensor(CUTOUT_FILL if spec.channels == 3 else (CUTOUT_FILL_GRAY,)).float().view(1, -1, 1, 1)
    # Cutout (after the ops) covers at least one pixel of every sample, weak as well as strong
    assert bool(((levels.round() == fill).all(1).flatten(1).any(1)).all())


def test_uint8_input_and_batch_of_one():
    u8 = torch.from_numpy(structured_images(1, 3, 32)).permute(0, 3, 1, 2).contiguous()
    aug = BatchAugment(CIFAR, "strong")
    torch.testing.assert_close(aug(u8, gen(5)), aug(u8.float() / 255, gen(5)))


def test_no_ops_means_no_cutout_and_cutout_zero_disables_it():
    spec = dataclasses.replace(CIFAR, crop_pad=0, hflip=False)
    x = torch.from_numpy(structured_images(64, 3, 32)).permute(0, 3, 1, 2).float() / 255
    plain = TF.normalize(x, spec.mean, spec.std)
    torch.testing.assert_close(BatchAugment(spec, "strong", ra_ops=0)(x), plain)
    mean, std = torch.tensor(spec.mean).view(1, -1, 1, 1), torch.tensor(spec.std).view(1, -1, 1, 1)
    fill = torch.tensor(CUTOUT_FILL).float().view(1, 3, 1, 1)

    def fill_pixels(out):
        return int(((out * std + mean) * 255).round().eq(fill).all(1).sum())

    assert fill_pixels(BatchAugment(spec, "weak", cutout=0.0)(x, gen(3))) == 0
    assert fill_pixels(BatchAugment(spec, "weak")(x, gen(3))) >= 64
    assert raw_transform(spec)(to_pil(structured_images(1, 3, 32)[0])).max() <= 1.0


def test_flip_rate_is_one_half():
    spec = dataclasses.replace(CIFAR, crop_pad=0)
    x = torch.from_numpy(structured_images(1, 3, 32)).permute(0, 3, 1, 2).float().div(255)
    x = x.expand(4000, -1, -1, -1)
    out = BatchAugment(spec, "weak", ra_ops=0)(x, gen(2))
    plain = TF.normalize(x[:1], spec.mean, spec.std)
    flipped = (out - plain.flip(-1)).abs().amax((1, 2, 3)) < 1e-6
    same = (out - plain).abs().amax((1, 2, 3)) < 1e-6
    assert bool((flipped ^ same).all())                       # each is exactly one of the two
    assert abs(float(flipped.double().mean()) - 0.5) < 0.03


@pytest.mark.parametrize("spec", [DIGITS, CIFAR], ids=lambda s: s.name)
def test_crops_are_shifts_within_crop_pad(spec):
    p, s = spec.crop_pad, spec.image_size
    spec = dataclasses.replace(spec, hflip=False, mean=(0.0,) * spec.channels, std=(1.0,) * spec.channels)
    x = torch.randint(0, 256, (1, spec.channels, s, s), generator=gen()).float().div(255)
    x = x.expand(3000, -1, -1, -1)
    out = BatchAugment(spec, "weak", ra_ops=0)(x, gen(4))
    padded = torch.nn.functional.pad(x[:1], (p, p, p, p), mode="reflect")[0]
    windows = torch.stack([padded[:, i:i + s, j:j + s] for i in range(2 * p + 1)
                           for j in range(2 * p + 1)])         # (K, C, s, s)
    dist = torch.cdist(out.flatten(1), windows.flatten(1),
                       compute_mode="donot_use_mm_for_euclid_dist")   # (N, K)
    match = dist < 1e-4
    assert bool((match.sum(1) == 1).all())                     # each output is exactly one window
    counts = match.double().sum(0)
    assert bool((counts > 0).all())                            # every shift in [-p, p]^2 occurs
    assert float(counts.max() / counts.min()) < 2.5            # ... about equally often


# ----------------------------------------------------------------------- the statistical comparison
def _summary(out, spec, src):
    """Per-sample statistics (N, K) of a normalised augmented batch ``out`` (N, C, H, W).

    ``src`` (M, C, H, W) in [0, 1]: the source images, sample ``i`` being an augmentation of
    ``src[i % M]``. The first columns are changes from the source, which removes the spread between
    the source images from the test's noise. Columns: the change of the per-channel mean and std of
    the pixels; the change of the fraction of pixels (all channels) at least 1/4, 1/2, 3/4; the
    fraction of pixels equal to the Cutout fill (all channels) overall and in the first / last
    column and row (where the centre quirk shows); the fraction of black pixels (the geometric
    ops' fill); the mean absolute change.
    """
    mean, std = torch.tensor(spec.mean).view(1, -1, 1, 1), torch.tensor(spec.std).view(1, -1, 1, 1)
    levels = ((out * std + mean) * 255).round()                                   # (N, C, H, W)
    src_levels = (src * 255).round()                                              # (M, C, H, W)
    copies = len(out) // len(src)

    def per_sample(v):                                                            # (n, 2C + 3)
        above = [(v >= t).float().mean((1, 2, 3)) for t in (64, 128, 192)]
        return torch.cat([v.mean((2, 3)), v.std((2, 3)), torch.stack(above, 1)], 1)

    fill = torch.tensor(CUTOUT_FILL if spec.channels == 3 else (CUTOUT_FILL_GRAY,)).float().view(1, -1, 1, 1)
    is_fill = (levels == fill).all(1).float()                                     # (N, H, W)
    change = (levels.view(copies, *src.shape) - src_levels).abs().mean((2, 3, 4)).flatten()    # (N,)
    cols = [(per_sample(levels) - per_sample(src_levels).repeat(copies, 1)) / torch.tensor(
                [255.0] * (2 * spec.channels) + [1.0] * 3),
            torch.stack([is_fill.mean((1, 2)), is_fill[:, :, 0].mean(1), is_fill[:, :, -1].mean(1),
                         is_fill[:, 0].mean(1), is_fill[:, -1].mean(1)], 1),      # (N, 5)
            (levels == 0).all(1).float().mean((1, 2))[:, None],
            change[:, None] / 255]
    return torch.cat(cols, 1).double()                                            # (N, K)


def _wrong_enhance_ranges(device="cpu"):
    """The op table with enhance factors in [0.1, 1.9] (``1 +- 0.9 u``) instead of [0.05, 0.95]."""
    low, high = _OP_RANGES(device)
    for name in ("Brightness", "Color", "Contrast", "Sharpness"):
        low[OP_NAMES.index(name)], high[OP_NAMES.index(name)] = 0.1, 1.9
    return low, high


def _cutout_without_the_quirk(n, height, width, cutout=0.5, generator=None, device="cpu"):
    """Cutout draws with the centre uniform in [0, w) instead of (1, w]."""
    frac, cx, cy = _SAMPLE_CUTOUT(n, height, width, cutout, generator, device)
    return frac, (width - cx) / (width - 1) * width, (height - cy) / (height - 1) * height


_OP_RANGES, _SAMPLE_CUTOUT = op_ranges, sample_cutout


@pytest.mark.parametrize("spec,n", [(DIGITS, 6400), (CIFAR, 3200)], ids=["digits", "cifar10"])
@pytest.mark.parametrize("kind", ["weak", "strong"])
def test_same_distribution_as_the_pil_path(spec, n, kind, monkeypatch):
    """Many augmentations of 8 fixed structured images: PIL path vs batched path (CPU), N samples each.

    1. Per-op parameters: op frequencies and, per op, the range / mean / sign rate of the drawn
       values agree (the PIL path's draws are recorded by wrapping its op function).
    2. Pixel statistics per augmented sample (:func:`_summary`, 12 columns for 1 channel, 16 for
       3): the column means of the two paths must agree within ``tol = 4 SE``, SE the standard
       error of their difference (a two-sample z-test at |z| < 4: under equal distributions a
       column passes with probability 0.99994, all 56 columns of the four cases together with about
       0.35 % risk; the seeds are fixed, so the outcome is deterministic). Seen: at most 0.65 tol.
       The tolerance is tight enough to fail a wrong augmentation: altering the batched path shifts
       some column mean by more than ``tol`` (measured against the unaltered batched path with the
       same generator seed, so the shift is estimated with little noise). Seen: no Cutout 11-19
       tol; the other kind's number of ops 3.3-4.5 tol; enhance factors in [0.1, 1.9] instead of
       [0.05, 0.95] 1.6-2.5 tol (a shift of 1.6 tol fails the z-test with probability 0.99); on 8x8
       the Cutout centre in [0, w) instead of (1, w] 3 tol (on 32x32 that one-pixel shift, about
       0.9 tol, is below the test's resolution). N = 6400 on 8x8 and 3200 on 32x32 keeps these
       margins and the file within about 15 s on 2 cores.
    """
    s = spec.image_size
    u8 = structured_images(8, spec.channels, s, seed=12)
    pils = [to_pil(a) for a in u8]
    src = torch.from_numpy(u8).permute(0, 3, 1, 2).float().div(255)              # (8, C, H, W)
    x = src.repeat(n // len(u8), 1, 1, 1)                                          # (N, C, H, W)

    calls = []
    real_op = pil_aug.pil_op

    def recording_op(img, name, v):
        calls.append((OP_NAMES.index(name), v))
        return real_op(img, name, v)

    with monkeypatch.context() as m:
        m.setattr(pil_aug, "pil_op", recording_op)
        tf = make_transform(spec, kind)
        torch.manual_seed(21)
        cpu = torch.stack([tf(pils[i % len(pils)]) for i in range(n)])            # (N, C, H, W)

    # 1. per-op parameters, PIL path (recorded) vs batched path (sampled)
    assert len(calls) == n * DEFAULT_RA_OPS[kind]
    ops_pil = torch.tensor([k for k, _ in calls])
    val_pil = torch.tensor([v for _, v in calls], dtype=torch.float64)
    ops_dev, val_dev = sample_ops(100_000, gen(23))
    counts = torch.bincount(ops_pil, minlength=len(OPS)).double()
    expected = len(calls) / len(OPS)
    assert float(((counts - expected) ** 2 / expected).sum()) < 34.5    # chi-square, 13 dof, p = 0.001
    freq = torch.stack([torch.bincount(o, minlength=len(OPS)).double() / len(o) for o in (ops_pil, ops_dev)])
    assert float((freq[0] - freq[1]).abs().max()) < 0.02                # SE of a difference <= 0.0047
    for k, (name, lo, hi) in enumerate(OPS):
        span = hi - lo
        for vals in (val_pil[ops_pil == k], val_dev[ops_dev == k]):               # >= 200 draws each
            mag = vals.abs()
            assert float(mag.min()) >= lo and float(mag.max()) <= hi, name
            assert float(mag.min()) < lo + 0.05 * span and float(mag.max()) > hi - 0.05 * span, name
            assert abs(float(mag.mean()) - (lo + hi) / 2) < 0.08 * span, name    # SE <= 0.02 span
            assert (float((vals < 0).double().mean()) > 0.3) == (name in SIGNED), name

    # 2. pixel statistics
    def batched(**kwargs):
        return _summary(BatchAugment(spec, kind, **kwargs)(x, gen(31)), spec, src).mean(0)

    reference, right = _summary(cpu, spec, src), _summary(BatchAugment(spec, kind)(x, gen(31)), spec, src)
    tol = 4.0 * (reference.var(0) / n + right.var(0) / n).sqrt().clamp(min=1e-9)   # (K,)
    gap = (reference.mean(0) - right.mean(0)).abs() / tol
    assert float(gap.max()) < 1.0, gap

    def shift(wrong):                                                             # in units of tol
        return float(((wrong - right.mean(0)).abs() / tol).max())

    assert shift(batched(cutout=0.0)) > 5.0
    assert shift(batched(ra_ops=3 - DEFAULT_RA_OPS[kind])) > 2.0
    with monkeypatch.context() as m:
        m.setattr(gpu_aug, "op_ranges", _wrong_enhance_ranges)
        assert shift(batched()) > 1.3
    if s == 8:
        with monkeypatch.context() as m:
            m.setattr(gpu_aug, "sample_cutout", _cutout_without_the_quirk)
            assert shift(batched()) > 2.0


def test_runs_in_float32_under_autocast():
    x = torch.rand(3, 3, 32, 32, generator=gen())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = BatchAugment(CIFAR, "strong")(x, gen(0))
    assert out.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_the_same_draws():
    x = torch.from_numpy(structured_images(64, 3, 32)).permute(0, 3, 1, 2).float() / 255
    aug = BatchAugment(CIFAR, "strong")
    cpu = aug(x, gen(8))
    cuda = aug.to("cuda")(x.cuda(), gen(8))                    # CPU generator: the same draws
    close = (cuda.cpu() - cpu).abs() < 1e-4
    assert float(close.double().mean()) > 0.9999               # float ties may differ on the GPU


def test_bad_arguments():
    with pytest.raises(ValueError):
        BatchAugment(CIFAR, "eval")
    with pytest.raises(ValueError):
        BatchAugment(CIFAR, "weak", ra_ops=-1)
    with pytest.raises(ValueError):
        BatchAugment(CIFAR, "weak", cutout=10)
    with pytest.raises(ValueError):
        BatchAugment(dataclasses.replace(CIFAR, channels=2), "weak")
