"""Backbones: LaplaceNet's WRN (block, init, pinned sizes), ResNet-18, noise conditioning and its
placement (t_bias), the architecture record round-trip, the learnable-t wrapper, errors."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from laplacedrl.diffusion.sde import VESDE
from laplacedrl.choices import T_BIAS
from laplacedrl.models import ARCH_NAMES, LearnableTime, arch_record, build_model
from laplacedrl.models.embedding import default_init_, variance_scaling_


def ve_noise(t, sigma_min=0.01, sigma_max=50.0):
    """log sigma(t) of the VE SDE, as the caller of LearnableTime would provide it."""
    return math.log(sigma_min) + t * (math.log(sigma_max) - math.log(sigma_min))


def n_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("arch,feature_dim", [("wrn-28-2", 128), ("wrn-28-8", 512), ("resnet18", 512)])
@pytest.mark.parametrize("time_cond", [False, True])
def test_digits_shapes(arch, feature_dim, time_cond):
    model = build_model(arch, num_classes=10, in_channels=1, image_size=8, time_cond=time_cond)
    x = torch.randn(3, 1, 8, 8)
    noise = torch.full((3,), ve_noise(0.5)) if time_cond else None
    logits, feat = model(x, noise=noise)
    assert logits.shape == (3, 10)
    assert feat.shape == (3, feature_dim) and model.feature_dim == feature_dim
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch,size,channels", [("wrn-28-2", 32, 3), ("wrn-10-2", 32, 3), ("wrn-10-2", 28, 1),
                                                ("wrn-10-1", 84, 3)])
def test_wrn_shapes_for_every_dataset_size(arch, size, channels):
    model = build_model(arch, num_classes=100, in_channels=channels, image_size=size, time_cond=True)
    logits, feat = model(torch.randn(2, channels, size, size), noise=torch.tensor([-1.0, 2.0]))
    assert logits.shape == (2, 100) and feat.shape == (2, model.feature_dim)


def test_resnet18_miniimagenet_shape_and_stem():
    model = build_model("resnet18", num_classes=100, in_channels=3, image_size=84, time_cond=True)
    assert arch_record(model)["stem"] == "imagenet"
    assert build_model("resnet18", 10, 3, 32).config["stem"] == "cifar"
    logits, feat = model(torch.randn(2, 3, 84, 84), noise=torch.tensor([-1.0, 2.0]))
    assert logits.shape == (2, 100) and feat.shape == (2, 512)


# ---------------------------------------------------------------- LaplaceNet's WRN: sizes, block, init


# Pinned by building the published definitions outside this repository and counting parameters:
# LaplaceNet's plain WRN-28-2 (10 classes, dropout 0) and the DRL authors' time-conditioned WRN-28-2
# encoder/classifier (10 classes, dropout 0, latent dim 128). The published time-conditioned net holds
# 1,534,171 parameters: 16 Fourier frequencies stored as a parameter with requires_grad=False (a
# buffer here), one learnable time ``param_t`` (here ``LearnableTime.t_logit``, outside the
# backbone) and 1,534,154 others, so 1,534,155 are trainable.
LAPLACENET_WRN_28_2 = 1_469_642
PUBLISHED_TIME_WRN_28_2_TRAINABLE = 1_534_155
PUBLISHED_PARAM_T = 1
FOURIER_FREQUENCIES = 16


def test_plain_wrn_28_2_parameter_count_matches_laplacenet():
    model = build_model("wrn-28-2", 10, 3, 32)
    assert sum(p.numel() for p in model.parameters()) == LAPLACENET_WRN_28_2
    assert n_trainable(model) == LAPLACENET_WRN_28_2
    assert len(model.blocks) == 12


def test_time_conditioned_wrn_28_2_parameter_count_matches_the_published_encoder():
    model = build_model("wrn-28-2", 10, 3, 32, time_cond=True)
    # the backbone lacks the published param_t; the wrapper's t_logit takes its place
    assert n_trainable(model) == PUBLISHED_TIME_WRN_28_2_TRAINABLE - PUBLISHED_PARAM_T
    assert n_trainable(LearnableTime(model, VESDE())) == PUBLISHED_TIME_WRN_28_2_TRAINABLE
    # the Fourier frequencies are saved but never trained
    assert model.noise_embed.fourier.w.numel() == FOURIER_FREQUENCIES
    assert "noise_embed.fourier.w" in model.state_dict()
    assert all(p is not model.noise_embed.fourier.w for p in model.parameters())


def test_bn_momenta_blocks_default_last_laplacenet():
    model = build_model("wrn-28-2", 10, 3, 32, time_cond=True)
    assert model.bn_out.momentum == 0.9
    block_bns = [m for b in model.blocks for m in b.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(block_bns) == 24 and all(bn.momentum == 0.1 for bn in block_bns)


def test_momentum_0_9_weights_the_new_batch():
    model = build_model("wrn-10-1", 10, 1, 8).train()
    bn = model.bn_out
    seen = {}

    def record(mod, inp, out):
        seen["mean"] = inp[0].mean(dim=(0, 2, 3))

    bn.register_forward_hook(record)
    with torch.no_grad():
        model(torch.randn(16, 1, 8, 8))
    # running_mean starts at 0: after one batch it is 0.1 * 0 + 0.9 * batch mean
    assert torch.allclose(bn.running_mean, 0.9 * seen["mean"], atol=1e-6)


def test_wrn_uses_pytorch_default_init():
    model = build_model("wrn-28-2", 10, 3, 32, time_cond=True)
    conv = model.blocks[-1].conv2  # 128 -> 128, 3x3: fan_in 1152
    fan_in = conv.in_channels * 9
    # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 1/sqrt(3 fan_in)
    assert conv.weight.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.03)
    assert conv.weight.abs().max().item() <= 1 / math.sqrt(fan_in)
    assert conv.bias is not None and conv.bias.abs().max().item() > 0  # bias kept, default (non-zero) init
    assert model.stem.bias is not None and model.blocks[4].shortcut.bias is not None
    head = model.head
    assert head.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 128), rel=0.1)
    assert head.bias.abs().max().item() > 0
    assert torch.equal(model.bn_out.weight, torch.ones(128)) and torch.equal(model.bn_out.bias, torch.zeros(128))


def test_noise_linears_use_variance_scaling_with_zero_bias():
    model = build_model("wrn-28-2", 10, 3, 32, time_cond=True)
    linears = [model.noise_embed.lin1, model.noise_embed.lin2] + [b.noise_proj for b in model.blocks]
    assert model.noise_embed.lin1.in_features == 32 and model.noise_embed.lin2.out_features == 64
    for lin in linears:
        bound = math.sqrt(6.0 / (lin.in_features + lin.out_features))  # fan_avg, uniform, scale 1
        assert lin.weight.abs().max().item() <= bound
        assert lin.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.2)
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
    assert model.blocks[-1].noise_proj.out_features == 128


def test_variance_scaling_helper():
    w = torch.empty(300, 200, 3, 3)
    default_init_(w)
    bound = math.sqrt(6.0 / ((200 + 300) * 9))
    assert w.abs().max().item() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    default_init_(w, scale=0.0)  # score-SDE maps 0 to 1e-10: tiny, not zero
    assert 0 < w.abs().max().item() <= math.sqrt(3e-10 / ((200 + 300) * 9 / 2))
    variance_scaling_(w, 2.0, "fan_in", "normal")
    assert w.std().item() == pytest.approx(math.sqrt(2.0 / (200 * 9)), rel=0.01)
    with pytest.raises(ValueError, match="mode"):
        variance_scaling_(w, 1.0, "fan_sum")


def test_wrn_block_structure_stride_on_conv2_and_raw_input_shortcut():
    model = build_model("wrn-16-2", 10, 3, 16).eval()  # two blocks per group
    first_of_group2 = model.blocks[2]
    assert first_of_group2.conv1.stride == (1, 1) and first_of_group2.conv2.stride == (2, 2)
    assert isinstance(first_of_group2.shortcut, nn.Conv2d) and first_of_group2.shortcut.stride == (2, 2)
    block = model.blocks[0]  # 16 -> 32 channels, stride 1: a 1x1 shortcut
    with torch.no_grad():
        for p in (block.conv2.weight, block.conv2.bias):
            p.zero_()
        x = torch.randn(2, 16, 8, 8)
        # with the residual branch silenced, the block is exactly the 1x1 conv of its raw input
        expected = F.conv2d(x, block.shortcut.weight, block.shortcut.bias)
        assert torch.allclose(block(x, None), expected, atol=1e-6)
    assert model.blocks[1].shortcut is None  # same shape: identity


def test_wrn_block_formula():
    model = build_model("wrn-10-2", 10, 3, 16, time_cond=True).train()
    block, x = model.blocks[1], torch.randn(4, 32, 8, 8)
    emb = F.silu(model.noise_embed(torch.linspace(-3, 3, 4)))
    bias = block.noise_proj(emb)[:, :, None, None]

    def bn(layer, h):  # training-mode BN from batch statistics
        return F.batch_norm(h, None, None, layer.weight, layer.bias, training=True, eps=layer.eps)

    h = block.conv1(F.relu(bn(block.bn1, x))) + bias
    expected = block.conv2(F.relu(bn(block.bn2, h))) + block.shortcut(x)
    assert torch.allclose(block(x, emb), expected, atol=1e-5)


def test_noise_embedding_formula_and_what_the_blocks_receive():
    model = build_model("wrn-10-1", 10, 1, 8, time_cond=True).eval()
    emb = model.noise_embed
    noise = torch.tensor([-4.6, 0.0, 3.9])
    proj = noise[:, None] * emb.fourier.w[None, :] * (2 * math.pi)  # (3, 16)
    fourier = torch.cat([proj.sin(), proj.cos()], dim=1)  # (3, 32)
    temb = emb.lin2(F.silu(emb.lin1(fourier)))  # (3, 64)
    assert torch.allclose(emb(noise), temb, atol=1e-5)
    assert emb.fourier.w.std().item() == pytest.approx(16.0, rel=0.5)  # N(0, 16^2) frequencies
    received = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: received.append(args[1]))
    with torch.no_grad():
        model(torch.randn(3, 1, 8, 8), noise=noise)
    assert len(received) == 3 and all(torch.allclose(r, F.silu(temb), atol=1e-5) for r in received)


# ---------------------------------------------------------------- records


@pytest.mark.parametrize("arch,time_cond,t_bias", [("wrn-10-2", True, "after_bn"), ("wrn-10-1", False, "before_bn"),
                                                   ("resnet18", True, "before_bn")])
def test_arch_record_round_trip(arch, time_cond, t_bias):
    model = build_model(arch, num_classes=5, in_channels=1, image_size=8, time_cond=time_cond, t_bias=t_bias)
    x = torch.randn(4, 1, 8, 8)
    noise = torch.linspace(-3, 3, 4) if time_cond else None
    model(x, noise=noise)  # one training-mode pass moves the BN running stats away from init
    record = arch_record(model)
    assert json.loads(json.dumps(record)) == record  # plain primitives only
    assert record["arch"] == arch and record["time_cond"] is time_cond
    if time_cond:
        assert (record["num_frequencies"], record["emb_dim"], record["fourier_scale"], record["t_bias"]) == (
            16, 64, 16.0, t_bias)
    rebuilt = build_model(**record)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    rebuilt.eval()
    with torch.no_grad():
        for a, b in zip(model(x, noise=noise), rebuilt(x, noise=noise)):
            assert torch.equal(a, b)


def test_embedding_sizes_are_constructor_args():
    model = build_model("wrn-10-1", 10, 1, 8, time_cond=True, num_frequencies=4, emb_dim=8, fourier_scale=2.0)
    assert model.noise_embed.lin1.in_features == 8 and model.blocks[0].noise_proj.in_features == 8
    assert model.noise_embed.fourier.w.numel() == 4
    assert build_model(**arch_record(model)).noise_embed.lin2.out_features == 8


def test_arch_record_mismatch_is_refused_by_strict_load():
    old = build_model("wrn-10-2", 10, 1, 8, time_cond=True)
    plain = build_model("wrn-10-2", 10, 1, 8)
    with pytest.raises(RuntimeError):
        plain.load_state_dict(old.state_dict(), strict=True)


# ---------------------------------------------------------------- noise conditioning and t_bias


def test_default_t_bias_is_the_published_placement():
    assert build_model("wrn-10-1", 10, 1, 8, time_cond=True).config["t_bias"] == "before_bn"
    assert build_model("resnet18", 10, 1, 8, time_cond=True).config["t_bias"] == "before_bn"
    assert T_BIAS == ("before_bn", "after_bn")


def _shared_noise_outputs(model, x):
    with torch.no_grad():
        low = model(x, noise=torch.full((x.shape[0],), ve_noise(0.1)))
        high = model(x, noise=torch.full((x.shape[0],), ve_noise(0.9)))
    return low, high


@pytest.mark.parametrize("arch", ["wrn-10-2", "resnet18"])
def test_before_bn_bias_is_cancelled_by_train_mode_bn_for_a_shared_noise(arch):
    model = build_model(arch, 10, 1, 8, time_cond=True, t_bias="before_bn").train()
    x = torch.randn(6, 1, 8, 8)
    low, high = _shared_noise_outputs(model, x)
    for a, b in zip(low, high):
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    # ... but not in eval mode (running statistics), nor for per-sample noise values
    low, high = _shared_noise_outputs(model.eval(), x)
    assert (low[1] - high[1]).abs().max() > 1e-3
    model.train()
    with torch.no_grad():
        a = model(x, noise=torch.linspace(-4, 3, 6))[1]
        b = model(x, noise=torch.linspace(3, -4, 6))[1]
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["wrn-10-2", "resnet18"])
@pytest.mark.parametrize("train_mode", [False, True])
def test_after_bn_output_depends_on_a_batch_shared_noise(arch, train_mode):
    model = build_model(arch, 10, 1, 8, time_cond=True, t_bias="after_bn").train(train_mode)
    x = torch.randn(6, 1, 8, 8)
    low, high = _shared_noise_outputs(model, x)
    assert (low[1] - high[1]).abs().max() > 1e-3
    assert (low[0] - high[0]).abs().max() > 1e-4


def test_per_sample_noise_conditions_each_sample():
    model = build_model("wrn-10-2", 10, 1, 8, time_cond=True).eval()
    x = torch.randn(1, 1, 8, 8).expand(3, 1, 8, 8)
    with torch.no_grad():
        _, feat = model(x, noise=torch.tensor([-4.0, 0.0, 3.0]))
    assert (feat[0] - feat[1]).abs().max() > 1e-3 and (feat[1] - feat[2]).abs().max() > 1e-3


def test_scalar_noise_is_broadcast():
    model = build_model("wrn-10-2", 10, 1, 8, time_cond=True).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x, noise=torch.tensor(0.7))[0], model(x, noise=torch.full((3,), 0.7))[0])


# ---------------------------------------------------------------- learnable t


def _learnable(trainable=True, arch="wrn-10-2", t_bias="before_bn"):
    backbone = build_model(arch, 10, 1, 8, time_cond=True, t_bias=t_bias)
    return LearnableTime(backbone, VESDE(), t_init=0.5, trainable=trainable)


def test_learnable_time_starts_at_half_and_exposes_backbone():
    lt = _learnable()
    assert isinstance(lt.t, torch.Tensor) and lt.t.item() == pytest.approx(0.5)
    assert lt.feature_dim == lt.backbone.feature_dim == 128
    assert set(lt.state_dict()) == {"t_logit"} | {f"backbone.{k}" for k in lt.backbone.state_dict()}
    assert arch_record(lt) == arch_record(lt.backbone)


def _t_grad(lt):
    logits, _ = lt.train()(torch.randn(8, 1, 8, 8))
    F.cross_entropy(logits, torch.arange(8) % 10).backward()
    return lt.t_logit.grad


@pytest.mark.parametrize("arch", ["wrn-10-2", "resnet18"])
def test_learnable_time_gradient_after_bn_is_real_before_bn_is_float_noise(arch):
    after = _t_grad(_learnable(arch=arch, t_bias="after_bn"))
    assert after is not None and after.abs().item() > 1e-2
    torch.manual_seed(0)
    before = _t_grad(_learnable(arch=arch, t_bias="before_bn"))
    assert before is not None and before.abs().item() < 1e-3


def test_frozen_time_gets_no_gradient():
    lt = _learnable(trainable=False).train()
    logits, _ = lt(torch.randn(8, 1, 8, 8))
    logits.sum().backward()
    assert not lt.t_logit.requires_grad and lt.t_logit.grad is None
    assert all(p is not lt.t_logit for p in lt.parameters() if p.requires_grad)


def test_set_t_changes_t_and_output():
    lt = _learnable().eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        before = lt(x)[0]
        lt.set_t(0.9)
        after = lt(x)[0]
    assert lt.t.item() == pytest.approx(0.9)
    assert (before - after).abs().max() > 1e-4
    lt.set_t(1.0)  # the t-search grid ends at 1: t_logit must stay finite
    assert torch.isfinite(lt.t_logit) and lt.t.item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError):
        lt.set_t(1.5)


def test_learnable_time_forward_equals_backbone_at_noise_of_t():
    lt = _learnable().eval()
    lt.set_t(0.3)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        expected = lt.backbone(x, noise=torch.full((2,), ve_noise(0.3)))[0]
        assert torch.allclose(lt(x)[0], expected, atol=1e-5)


# ---------------------------------------------------------------- errors


def test_noise_usage_errors():
    plain = build_model("wrn-10-2", 10, 1, 8)
    cond = build_model("wrn-10-2", 10, 1, 8, time_cond=True)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="not time-conditioned"):
        plain(x, noise=torch.zeros(2))
    with pytest.raises(ValueError, match="time-conditioned"):
        cond(x)
    with pytest.raises(ValueError, match="shape"):
        cond(x, noise=torch.zeros(3))
    with pytest.raises(ValueError, match="time-conditioned backbone"):
        LearnableTime(plain, VESDE())


@pytest.mark.parametrize("bad", ["vgg16", "wrn-12-2", "wrn-4-2", "wrn-28"])
def test_unknown_arch_names_it_and_the_valid_names(bad):
    with pytest.raises(ValueError) as err:
        build_model(bad, 10, 1, 8)
    assert bad in str(err.value)
    assert all(name in str(err.value) for name in ARCH_NAMES)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="num_classes"):
        build_model("wrn-28-2", 0, 1, 8)
    with pytest.raises(ValueError, match="stem"):
        build_model("resnet18", 10, 3, 84, stem="huge")
    for arch in ("wrn-10-1", "resnet18"):
        with pytest.raises(ValueError, match="t_bias"):
            build_model(arch, 10, 1, 8, time_cond=True, t_bias="inside_bn")
