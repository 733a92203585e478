"""The batched (device) augmentation against torchvision's ops and the CPU/PIL reference path."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from laplacedrl.data.augment import make_transform
from laplacedrl.data.datasets import DatasetSpec
from laplacedrl.data.gpu_augment import (OPS, SIGNED, BatchAugment, apply_ops, magnitude_table,
                                         raw_transform, sample_ops)

DIGITS = DatasetSpec("digits", 10, 1, 8, (0.3053,), (0.3758,), crop_pad=1, hflip=False)
CIFAR = DatasetSpec("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                    crop_pad=4, hflip=True)
MINI = dataclasses.replace(CIFAR, name="miniimagenet", image_size=84, crop_pad=8)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def uint8_images(n, c, size, seed=0):
    """Random 8-bit images, one of them low-contrast and one constant (edge cases of the ops)."""
    u8 = torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=gen(seed))
    u8[:1] //= 4
    u8[1:2] = 7
    return u8


def smooth_image(c, size):
    """A deterministic gradient image (H, W, C) uint8, not left-right symmetric."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    planes = [xx, yy, 0.4 * (xx + yy) + 0.1][:c]
    return (np.stack(planes, -1) * 200 + 20).astype(np.uint8)


def torchvision_op(name, m):
    """torchvision's functional op as RandAugment applies it with signed magnitude ``m``."""
    return {
        "Identity": lambda i: i,
        "ShearX": lambda i: TF.affine(i, 0.0, [0, 0], 1.0, [math.degrees(math.atan(m)), 0.0],
                                      center=[0, 0]),
        "ShearY": lambda i: TF.affine(i, 0.0, [0, 0], 1.0, [0.0, math.degrees(math.atan(m))],
                                      center=[0, 0]),
        "TranslateX": lambda i: TF.affine(i, 0.0, [int(m), 0], 1.0, [0.0, 0.0]),
        "TranslateY": lambda i: TF.affine(i, 0.0, [0, int(m)], 1.0, [0.0, 0.0]),
        "Rotate": lambda i: TF.rotate(i, m),
        "Brightness": lambda i: TF.adjust_brightness(i, 1 + m),
        "Color": lambda i: TF.adjust_saturation(i, 1 + m),
        "Contrast": lambda i: TF.adjust_contrast(i, 1 + m),
        "Sharpness": lambda i: TF.adjust_sharpness(i, 1 + m),
        "Posterize": lambda i: TF.posterize(i, int(m)),        # uint8 only
        "Solarize": lambda i: TF.solarize(i, m / 255.0),
        "AutoContrast": TF.autocontrast,
        "Equalize": TF.equalize,                               # uint8 only
    }[name]


def test_magnitude_table_matches_torchvision_randaugment():
    ra = T.RandAugment()
    if not hasattr(ra, "_augmentation_space"):
        pytest.skip("torchvision's RandAugment no longer exposes _augmentation_space")
    for size in (8, 32, 84):
        space = ra._augmentation_space(31, (size, size))
        assert tuple(space) == OPS                              # same ops, same order
        for magnitude in (0, 5, 10, 30):
            table = magnitude_table(magnitude, size, size)
            for name, value in zip(OPS, table.tolist()):
                ref, signed = space[name]
                ref = float(ref[magnitude]) if ref.ndim else 0.0
                ref = float(int(ref)) if name.startswith("Translate") else ref
                assert value == pytest.approx(ref, abs=1e-6), (name, size, magnitude)
                assert signed == (name in SIGNED), name


@pytest.mark.parametrize("channels,size", [(3, 32), (1, 8)])
@pytest.mark.parametrize("name", OPS)
def test_each_op_matches_torchvision_functional(name, channels, size):
    u8 = uint8_images(5, channels, size)
    x = u8.float() / 255
    k = OPS.index(name)
    for magnitude in (3, 10, 30):
        m0 = float(magnitude_table(magnitude, size, size)[k])
        for m in ((m0, -m0) if name in SIGNED else (m0,)):
            out = apply_ops(x, torch.full((5,), k), torch.full((5,), m))
            if name in ("Posterize", "Equalize"):
                ref = torchvision_op(name, m)(u8).float() / 255
            else:
                ref = torchvision_op(name, m)(x)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0, msg=f"{name} m={m}")


def test_mixed_ops_in_one_batch_equal_the_ops_one_by_one():
    x = uint8_images(len(OPS) * 2, 3, 16, seed=1).float() / 255
    op = torch.arange(len(OPS)).repeat(2)
    mag = magnitude_table(20, 16, 16)[op] * torch.tensor([1.0, -1.0]).repeat_interleave(len(OPS))
    out = apply_ops(x, op, mag)
    for i in range(len(op)):
        alone = apply_ops(x[i:i + 1], op[i:i + 1], mag[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], alone, atol=1e-6, rtol=0)
    assert not torch.equal(out[1], x[1])                      # ShearX did something


def test_op_choice_is_uniform_and_signs_are_fair():
    n = 28_000
    table = magnitude_table(10, 32, 32)
    op, mag = sample_ops(n, table, gen(3))
    counts = torch.bincount(op, minlength=len(OPS)).double()
    expected = n / len(OPS)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 34.5                                         # chi-square, 13 dof, p = 0.001
    for k, name in enumerate(OPS):
        m = mag[op == k]
        assert torch.allclose(m.abs(), table[k].expand_as(m))
        negative = float((m < 0).double().mean())
        if name in SIGNED:
            assert abs(negative - 0.5) < 0.05, name
        else:
            assert negative == 0.0, name


@pytest.mark.parametrize("spec", [DIGITS, CIFAR, MINI], ids=lambda s: s.name)
@pytest.mark.parametrize("kind", ["weak", "strong"])
def test_output_shape_dtype_and_normalised_range(spec, kind):
    x = torch.rand(7, spec.channels, spec.image_size, spec.image_size, generator=gen())
    out = BatchAugment(spec, kind)(x, generator=gen(1))
    assert out.shape == x.shape and out.dtype == torch.float32
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    pixels = out * std + mean                                  # back to [0, 1]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert not torch.allclose(out, (x - mean) / std)           # something was augmented


def test_uint8_input_and_batch_of_one():
    u8 = uint8_images(1, 3, 32)
    aug = BatchAugment(CIFAR, "strong")
    torch.testing.assert_close(aug(u8, gen(5)), aug(u8.float() / 255, gen(5)))


def test_no_ops_no_crop_no_flip_equals_normalize():
    spec = dataclasses.replace(CIFAR, crop_pad=0, hflip=False)
    x = torch.rand(4, 3, 32, 32, generator=gen())
    out = BatchAugment(spec, "strong", ra_ops=0)(x)
    torch.testing.assert_close(out, TF.normalize(x, spec.mean, spec.std))
    assert raw_transform(spec)(Image.fromarray(smooth_image(3, 32))).max() <= 1.0


def test_forward_is_flip_then_crop_then_ops_with_the_given_generator():
    from laplacedrl.data.gpu_augment import random_crop, random_hflip
    x = torch.rand(6, 3, 32, 32, generator=gen())
    out = BatchAugment(CIFAR, "strong")(x, gen(9))
    g = gen(9)
    y = random_crop(random_hflip(x, g), CIFAR.crop_pad, g)
    table = magnitude_table(10, 32, 32)
    for _ in range(2):
        y = apply_ops(y, *sample_ops(6, table, g))
    torch.testing.assert_close(out, TF.normalize(y, CIFAR.mean, CIFAR.std))
    assert not torch.equal(out, BatchAugment(CIFAR, "strong")(x, gen(10)))


def test_flip_rate_is_one_half():
    spec = dataclasses.replace(CIFAR, crop_pad=0)
    x = torch.from_numpy(smooth_image(3, 32)).permute(2, 0, 1).float().div(255)[None]
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
    spec = dataclasses.replace(spec, hflip=False, mean=(0.0,) * spec.channels,
                               std=(1.0,) * spec.channels)
    x = torch.rand(1, spec.channels, s, s, generator=gen()).expand(3000, -1, -1, -1)
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


@pytest.mark.parametrize("spec", [DIGITS, CIFAR], ids=lambda s: s.name)
@pytest.mark.parametrize("kind", ["weak", "strong"])
def test_same_distribution_as_the_pil_path(spec, kind):
    """Summary statistics of many augmentations of one image agree with make_transform's."""
    n = 1000
    image = smooth_image(spec.channels, spec.image_size)
    pil = Image.fromarray(image[:, :, 0] if spec.channels == 1 else image)
    torch.manual_seed(0)
    cpu = torch.stack([make_transform(spec, kind)(pil) for _ in range(n)])
    x = raw_transform(spec)(pil)[None].expand(n, -1, -1, -1)
    dev = BatchAugment(spec, kind)(x, gen(6))
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    stats = []
    for out in (cpu, dev):
        px = out * std + mean                                  # (n, C, H, W) in [0, 1]
        stats.append(torch.stack([px.mean(), px.std((1, 2, 3)).mean(), (px < 0.5 / 255).double().mean(),
                                  (px.mean(0) - x[0]).abs().mean()]).double())
    # mean pixel, mean per-image std, fraction of black (fill) pixels, mean change per pixel;
    # seen |diff| <= 0.005; weak-vs-strong differ by 0.01-0.03
    torch.testing.assert_close(stats[1], stats[0], atol=0.01, rtol=0)


def test_runs_in_float32_under_autocast():
    x = torch.rand(3, 3, 32, 32, generator=gen())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = BatchAugment(CIFAR, "strong")(x, gen(0))
    assert out.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_the_same_draws():
    x = torch.rand(16, 3, 32, 32, generator=gen())
    aug = BatchAugment(CIFAR, "strong")
    cpu = aug(x, gen(8))
    cuda = aug.to("cuda")(x.cuda(), gen(8))                    # CPU generator: the same draws
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-4, rtol=0)


def test_bad_arguments():
    with pytest.raises(ValueError):
        BatchAugment(CIFAR, "eval")
    with pytest.raises(ValueError):
        BatchAugment(CIFAR, "weak", ra_ops=-1)
    with pytest.raises(ValueError):
        magnitude_table(31, 32, 32)
