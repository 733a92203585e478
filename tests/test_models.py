"""Backbones: shapes, architecture record round-trip, noise conditioning, learnable t, errors."""
import json
import math

import pytest
import torch

from laplacedrl.models import ARCH_NAMES, LearnableTime, arch_record, build_model


def ve_noise(t, sigma_min=0.01, sigma_max=50.0):
    """log sigma(t) of the VE SDE, as the caller of LearnableTime would provide it."""
    return math.log(sigma_min) + t * (math.log(sigma_max) - math.log(sigma_min))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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


@pytest.mark.parametrize("arch,feature_dim", [("wrn-28-2", 128), ("wrn-10-2", 128)])
def test_cifar_shapes(arch, feature_dim):
    model = build_model(arch, num_classes=100, in_channels=3, image_size=32)
    logits, feat = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 100) and feat.shape == (2, feature_dim)


def test_resnet18_miniimagenet_shape_and_stem():
    model = build_model("resnet18", num_classes=100, in_channels=3, image_size=84, time_cond=True)
    assert arch_record(model)["stem"] == "imagenet"
    assert build_model("resnet18", 10, 3, 32).config["stem"] == "cifar"
    logits, feat = model(torch.randn(2, 3, 84, 84), noise=torch.tensor([-1.0, 2.0]))
    assert logits.shape == (2, 100) and feat.shape == (2, 512)


def test_wrn_28_2_size_matches_the_literature():
    # WRN-28-2 is the ~1.47M-parameter net of MixMatch / FixMatch / LaplaceNet CIFAR-10 tables
    model = build_model("wrn-28-2", 10, 3, 32)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1.4e6 < n_params < 1.55e6
    assert len(model.blocks) == 12


@pytest.mark.parametrize("arch,time_cond", [("wrn-10-2", True), ("wrn-10-1", False), ("resnet18", True)])
def test_arch_record_round_trip(arch, time_cond):
    model = build_model(arch, num_classes=5, in_channels=1, image_size=8, time_cond=time_cond)
    x = torch.randn(4, 1, 8, 8)
    noise = torch.linspace(-3, 3, 4) if time_cond else None
    model(x, noise=noise)  # one training-mode pass moves the BN running stats away from init
    record = arch_record(model)
    assert json.loads(json.dumps(record)) == record  # plain primitives only
    assert record["arch"] == arch and record["time_cond"] is time_cond
    rebuilt = build_model(**record)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    rebuilt.eval()
    with torch.no_grad():
        for a, b in zip(model(x, noise=noise), rebuilt(x, noise=noise)):
            assert torch.equal(a, b)


def test_arch_record_mismatch_is_refused_by_strict_load():
    old = build_model("wrn-10-2", 10, 1, 8, time_cond=True)
    plain = build_model("wrn-10-2", 10, 1, 8)
    with pytest.raises(RuntimeError):
        plain.load_state_dict(old.state_dict(), strict=True)


@pytest.mark.parametrize("arch", ["wrn-10-2", "resnet18"])
@pytest.mark.parametrize("train_mode", [False, True])
def test_time_cond_output_depends_on_a_batch_shared_noise(arch, train_mode):
    # In training mode BatchNorm would cancel a bias shared by the whole batch if it were added before
    # the BN: this is the learnable-t case, so the output must still change with the noise value.
    model = build_model(arch, 10, 1, 8, time_cond=True).train(train_mode)
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        low = model(x, noise=torch.full((6,), ve_noise(0.1)))
        high = model(x, noise=torch.full((6,), ve_noise(0.9)))
        again = model(x, noise=torch.full((6,), ve_noise(0.1)))
    assert (low[1] - high[1]).abs().max() > 1e-3
    assert (low[0] - high[0]).abs().max() > 1e-4
    if not train_mode:
        assert torch.equal(low[1], again[1])


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


def _learnable(trainable=True, arch="wrn-10-2"):
    backbone = build_model(arch, 10, 1, 8, time_cond=True)
    return LearnableTime(backbone, ve_noise, t_init=0.5, trainable=trainable)


def test_learnable_time_starts_at_half_and_exposes_backbone():
    lt = _learnable()
    assert isinstance(lt.t, torch.Tensor) and lt.t.item() == pytest.approx(0.5)
    assert lt.feature_dim == lt.backbone.feature_dim == 128
    assert set(lt.state_dict()) == {"t_logit"} | {f"backbone.{k}" for k in lt.backbone.state_dict()}
    assert arch_record(lt) == arch_record(lt.backbone)


@pytest.mark.parametrize("arch", ["wrn-10-2", "resnet18"])
def test_learnable_time_gets_gradient_in_training_mode(arch):
    lt = _learnable(arch=arch).train()
    logits, _ = lt(torch.randn(8, 1, 8, 8))
    torch.nn.functional.cross_entropy(logits, torch.arange(8) % 10).backward()
    # BN cancelling the bias would leave only float noise here (~1e-6)
    assert lt.t_logit.grad is not None and lt.t_logit.grad.abs().item() > 1e-3


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
        LearnableTime(plain, ve_noise)


@pytest.mark.parametrize("bad", ["vgg16", "wrn-12-2", "wrn-4-2", "wrn-28"])
def test_unknown_arch_names_it_and_the_valid_names(bad):
    with pytest.raises(ValueError) as err:
        build_model(bad, 10, 1, 8)
    assert bad in str(err.value)
    assert all(name in str(err.value) for name in ARCH_NAMES)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="num_classes"):
        build_model("wrn-28-2", 0, 1, 8)
    with pytest.raises(ValueError, match="stem"):
        build_model("resnet18", 10, 3, 84, stem="huge")
