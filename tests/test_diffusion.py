"""Tests of laplacedrl.diffusion (SDEs, objectives, samplers, EMA); the score network has its own file.

Tiny shapes, seeded, CPU. The Eq. 6 test trains a tiny encoder + score net for a few hundred
steps and checks that the learned code carries what the denoiser needs.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from laplacedrl.diffusion import (EPS, VESDE, VPSDE, ExponentialMovingAverage, ae_loss, conditional_score_fn,
                                  drl_loss, dsm_loss, encode, euler_maruyama_sampler, mixup_drl_loss,
                                  parse_t_sampling, pc_sampler, sample_t, sde_from_dict, vdrl_loss)
from laplacedrl.diffusion.losses import gaussian_kl, to_unit_interval
from laplacedrl.models.embedding import GaussianFourierEmbedding
from laplacedrl.models.score_net import ScoreNet, VariationalHead

SDES = [VESDE(), VPSDE()]
SDE_IDS = ["ve", "vp"]


class TinyEncoder(nn.Module):
    """Stand-in for the WRN: ``forward(x, noise=c) -> (logits, feat)``, conditioned on c."""

    def __init__(self, channels: int = 1, size: int = 8, feature_dim: int = 16):
        super().__init__()
        self.feature_dim = feature_dim
        self.conv = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten())
        self.fc = nn.Linear(32 * (size // 2) ** 2, 64)
        self.noise_embed = nn.Sequential(GaussianFourierEmbedding(32), nn.Linear(32, 64))
        self.out = nn.Linear(64, feature_dim)
        self.head = nn.Linear(feature_dim, 10)

    def forward(self, x, noise=None):
        feat = self.out(F.silu(self.fc(self.conv(x)) + self.noise_embed(noise)))
        return self.head(feat), feat


def tiny_score_net(code_dim: int = 16, randomise_output: bool = False, decoder: bool = False) -> ScoreNet:
    net = ScoreNet(in_channels=1, image_size=8, nf=8, ch_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(4,), dropout=0.0, code_dim=code_dim, decoder=decoder)
    if randomise_output:  # the output conv starts at zero, which hides the code at init
        nn.init.normal_(net.conv_out.weight, std=0.05)
    return net


def images(n: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1  # (n, 1, 8, 8) in [-1, 1]


# ---- SDEs ----------------------------------------------------------------------------------
def test_ve_std_endpoints_and_mean():
    sde = VESDE(0.01, 50.0)
    t = torch.tensor([0.0, 1.0])
    x0 = torch.randn(2, 1, 4, 4)
    mean, std = sde.marginal_prob(x0, t)
    assert torch.allclose(std, torch.tensor([0.01, 50.0]))
    assert torch.equal(mean, x0)
    prior = sde.prior_sampling((4000,), generator=torch.Generator().manual_seed(0))
    assert prior.std().item() == pytest.approx(50, rel=0.05)


def test_ve_diffusion_squared_is_dsigma2_dt():
    sde = VESDE()
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    h = 1e-6
    dsigma2 = (sde.sigma(t + h) ** 2 - sde.sigma(t - h) ** 2) / (2 * h)
    drift, g = sde.sde(torch.ones(7, 3, dtype=torch.float64), t)
    assert torch.allclose(g ** 2, dsigma2, rtol=1e-6)
    assert torch.all(drift == 0)


@pytest.mark.parametrize("sde", SDES, ids=SDE_IDS)
def test_marginals_match_integrated_moment_odes(sde):
    """For dx = k(t) x dt + g dw: dm/dt = k m, dv/dt = 2 k v + g^2; integrate with RK4 from t = 0."""
    def rhs(t, m, v):
        tt = torch.tensor([t], dtype=torch.float64)
        drift, g = sde.sde(torch.ones(1, 1, dtype=torch.float64), tt)
        k = drift.item()
        return k * m, 2 * k * v + g.item() ** 2

    t0 = torch.zeros(1, dtype=torch.float64)
    m, v = sde.mean_coeff(t0).item(), sde.std(t0).item() ** 2
    n = 2000
    h = 1.0 / n
    checks = {}
    for i in range(n):
        t = i * h
        k1 = rhs(t, m, v)
        k2 = rhs(t + h / 2, m + h / 2 * k1[0], v + h / 2 * k1[1])
        k3 = rhs(t + h / 2, m + h / 2 * k2[0], v + h / 2 * k2[1])
        k4 = rhs(t + h, m + h * k3[0], v + h * k3[1])
        m += h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        v += h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
        if (i + 1) % 500 == 0:
            checks[(i + 1) * h] = (m, v)
    for t, (m_num, v_num) in checks.items():
        tt = torch.tensor([t], dtype=torch.float64)
        mean, std = sde.marginal_prob(torch.ones(1, 1, dtype=torch.float64), tt)
        assert mean.item() == pytest.approx(m_num, rel=1e-6)
        assert std.item() ** 2 == pytest.approx(v_num, rel=1e-6)


def test_vp_closed_forms():
    sde = VPSDE(0.1, 20.0)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    big_b = 0.1 * t + 0.5 * 19.9 * t ** 2
    assert torch.allclose(sde.mean_coeff(t), torch.exp(-big_b / 2))
    assert torch.allclose(sde.std(t), torch.sqrt(1 - torch.exp(-big_b)))
    assert sde.std(t)[0] == 0 and sde.std(t)[-1] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("sde", SDES, ids=SDE_IDS)
def test_kernel_score_is_minus_noise_over_std(sde):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    t = torch.tensor([EPS, 0.1, 0.4, 0.7, 1.0])
    xt = sde.perturb(x0, t, noise)
    expected = -noise / sde.std(t).reshape(-1, 1, 1, 1)
    assert torch.allclose(sde.kernel_score(xt, x0, t), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sde", SDES, ids=SDE_IDS)
def test_discretize_is_the_exact_transition(sde):
    t = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    dt = 0.01
    x = torch.ones(3, 1, dtype=torch.float64)
    f, big_g = sde.discretize(x, t, dt)
    a = 1 + f[:, 0]
    assert torch.allclose(a, sde.mean_coeff(t) / sde.mean_coeff(t - dt))
    assert torch.allclose(sde.std(t) ** 2, a ** 2 * sde.std(t - dt) ** 2 + big_g ** 2)


@pytest.mark.parametrize("sde", SDES, ids=SDE_IDS)
def test_net_input_is_increasing_and_differentiable(sde):
    t = torch.linspace(EPS, 1.0, 50, requires_grad=True)
    c = sde.net_input(t)
    assert torch.all(c[1:] > c[:-1])
    c.sum().backward()
    assert torch.all(torch.isfinite(t.grad)) and torch.all(t.grad > 0.5)  # no flat region for a learnable t
    if isinstance(sde, VESDE):
        assert torch.allclose(c, torch.log(sde.sigma(t)))


@pytest.mark.parametrize("sde", SDES, ids=SDE_IDS)
def test_t_of_noise_scale_inverts_noise_scale(sde):
    t = torch.linspace(0.01, 1.0, 20, dtype=torch.float64)
    assert torch.allclose(sde.t_of_noise_scale(sde.noise_scale(t)), t, atol=1e-9)


def test_sde_dict_round_trip_and_unknown_name():
    for sde in (VESDE(0.02, 30.0), VPSDE(0.2, 10.0)):
        again = sde_from_dict(sde.to_dict())
        assert type(again) is type(sde) and again.to_dict() == sde.to_dict()
    assert isinstance(sde_from_dict({"name": "vp"}), VPSDE)
    with pytest.raises(ValueError, match="subvp"):
        sde_from_dict({"name": "subvp"})
    with pytest.raises(ValueError):
        VESDE(sigma_min=5.0, sigma_max=1.0)


# ---- DSM and t sampling ---------------------------------------------------------------------
@pytest.mark.parametrize("sde", SDES, ids=SDE_IDS)
def test_dsm_of_exact_score_for_a_delta_dataset_is_zero_and_zero_score_gives_dimension(sde):
    """Data = one point a: the true score is the kernel score, so DSM = 0; score 0 gives ||noise||^2."""
    g = torch.Generator().manual_seed(0)
    n, dim = 4000, 64
    a = torch.randn(1, 1, 8, 8, generator=g)
    x0 = a.expand(n, 1, 8, 8)
    t = sample_t(n, "uniform", sde, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    code = torch.zeros(n, 1)

    def exact(xt, c, code, std):  # m(t) from std: m = 1 (VE) or sqrt(1 - std^2) (VP)
        m = torch.ones_like(std) if isinstance(sde, VESDE) else torch.sqrt(1 - std ** 2)
        return -(xt - m.reshape(-1, 1, 1, 1) * a) / std.reshape(-1, 1, 1, 1) ** 2

    def zero(xt, c, code, std):
        return torch.zeros_like(xt)

    assert dsm_loss(exact, sde, x0, t, noise, code).max().item() < 1e-3
    zero_loss = dsm_loss(zero, sde, x0, t, noise, code)
    assert zero_loss.shape == (n,)
    assert torch.allclose(zero_loss, 0.5 * noise.pow(2).flatten(1).sum(1))   # published: 1/2 sum
    assert zero_loss.mean().item() == pytest.approx(dim / 2, abs=2 * math.sqrt(2 * dim / n))


def test_sample_t_modes():
    g = torch.Generator().manual_seed(0)
    ve = VESDE(0.01, 50.0)
    t = sample_t(20000, "uniform", ve, generator=g)
    assert t.min() >= EPS and t.max() <= 1 and t.mean().item() == pytest.approx(0.5, abs=0.01)

    sigma = ve.sigma(sample_t(20000, "high-noise", ve, generator=g))
    assert sigma.min() >= 0.01 - 1e-6 and sigma.max() <= 50 + 1e-3
    quartiles = torch.quantile(sigma, torch.tensor([0.25, 0.5, 0.75]))
    expected = 0.01 + (50 - 0.01) * torch.tensor([0.25, 0.5, 0.75])
    assert torch.allclose(quartiles, expected, atol=1.0)  # sigma ~ U(sigma_min, sigma_max)

    vp = VPSDE()
    scale = vp.noise_scale(sample_t(20000, "high-noise", vp, generator=g))
    top = vp.noise_scale(torch.ones(1)).item()
    assert scale.mean().item() == pytest.approx(top / 2, rel=0.03)

    assert torch.all(sample_t(5, "fixed:0.3", ve) == 0.3)
    assert torch.all(sample_t(5, "fixed:1", ve) == 1.0)
    assert parse_t_sampling("fixed:0.25") == ("fixed", 0.25)
    for bad in ("fixed:0", "fixed:1.5", "fixed:-0.1", "fixed:abc", "fixed:", "bogus"):
        with pytest.raises(ValueError):
            sample_t(5, bad, ve)


# ---- objectives -----------------------------------------------------------------------------
def objective_setup(name: str, sde):
    """(parameters, loss_fn(x0, t, generator) -> dict, encoder) for one objective on tiny nets."""
    torch.manual_seed(0)
    enc = TinyEncoder()
    if name == "ae":
        net = tiny_score_net(decoder=True)
        return (list(enc.parameters()) + list(net.parameters()),
                lambda x0, t, g: ae_loss(enc, net, sde, x0, t, l1_weight=0.0), enc)
    if name == "vdrl":
        head = VariationalHead(16, 4)
        net = tiny_score_net(code_dim=4, randomise_output=True)
        return (list(enc.parameters()) + list(head.parameters()) + list(net.parameters()),
                lambda x0, t, g: vdrl_loss(enc, head, net, sde, x0, t, generator=g, kl_weight=1e-3), enc)
    net = tiny_score_net(randomise_output=True)
    params = list(enc.parameters()) + list(net.parameters())
    if name == "drl":
        return params, lambda x0, t, g: drl_loss(enc, net, sde, x0, t, generator=g, l1_weight=0.0), enc
    return params, lambda x0, t, g: mixup_drl_loss(enc, net, sde, x0, t, generator=g,
                                                   lam=torch.full((8,), 0.7), l1_weight=0.0), enc


OBJECTIVE_CASES = [("drl", VESDE()), ("drl", VPSDE()), ("vdrl", VESDE()), ("mixup-drl", VESDE()),
                   ("ae", VESDE())]
OBJECTIVE_IDS = ["drl-ve", "drl-vp", "vdrl-ve", "mixup-drl-ve", "ae"]


@pytest.mark.parametrize("name,sde", OBJECTIVE_CASES, ids=OBJECTIVE_IDS)
def test_objective_backprops_into_encoder(name, sde):
    """With the regularisers off, the main term alone must reach the encoder."""
    params, loss_fn, enc = objective_setup(name, sde)
    x0 = images(8)
    out = loss_fn(x0, sample_t(8, "uniform", sde, generator=torch.Generator().manual_seed(1)),
                  torch.Generator().manual_seed(2))
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    grad = sum(p.grad.abs().sum() for p in enc.parameters() if p.grad is not None)
    assert grad > 0


@pytest.mark.parametrize("name,sde", OBJECTIVE_CASES, ids=OBJECTIVE_IDS)
def test_objective_falls_under_adam(name, sde):
    params, loss_fn, _ = objective_setup(name, sde)
    opt = torch.optim.Adam(params, lr=2e-3)
    x0 = images(8)
    t = torch.full((8,), 0.4)
    losses = []
    for _ in range(60 if name == "ae" else 15):   # the decoder's output conv starts at ~0: slower start
        out = loss_fn(x0, t, torch.Generator().manual_seed(3))  # the same noise every step
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    floor = 0.0
    if name == "ae":  # BCE cannot go below the entropy of the (non-binary) targets
        p = to_unit_interval(x0).clamp(1e-6, 1 - 1e-6)
        floor = -0.5 * (p * p.log() + (1 - p) * (1 - p).log()).flatten(1).sum(1).mean().item()
    assert losses[-1] - floor < 0.8 * (losses[0] - floor), losses


def test_regularisers_and_terms():
    sde = VESDE()
    enc, net = TinyEncoder(), tiny_score_net()
    x0, t = images(4), torch.full((4,), 0.5)
    code = encode(enc, sde, x0, t)
    out = drl_loss(enc, net, sde, x0, t, generator=torch.Generator().manual_seed(0), l1_weight=0.1)
    assert out["reg"].item() == pytest.approx(0.1 * code.abs().sum(1).mean().item(), rel=1e-5)
    assert out["dsm"].item() == pytest.approx(32.0, rel=0.5)  # ~zero output: DSM = ||noise||^2 / 2
    assert out["loss"].item() == pytest.approx(out["dsm"].item() + out["reg"].item(), rel=1e-6)

    mean, logvar = torch.randn(5, 3), torch.randn(5, 3)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros(5, 3), torch.ones(5, 3))
    assert torch.allclose(gaussian_kl(mean, logvar), torch.distributions.kl_divergence(q, p).sum(1), atol=1e-5)


def test_mixup_drl_mixes_only_the_encoder_input_and_weights_by_two_lambda():
    """Published Mixup-DRL: per image lam_i, code of the mixture, DSM of the ORIGINAL image x 2 lam_i."""
    sde = VESDE()
    x0 = images(6)
    enc, net = TinyEncoder(), tiny_score_net(randomise_output=True)
    t = torch.full((6,), 0.5)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    lam = torch.tensor([1.0, 0.5, 0.2, 0.9, 0.3, 0.7])
    out = mixup_drl_loss(enc, net, sde, x0, t, noise=noise, generator=torch.Generator().manual_seed(4),
                         lam=lam, l1_weight=0.0)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(4))
    mixed = lam.reshape(-1, 1, 1, 1) * x0 + (1 - lam.reshape(-1, 1, 1, 1)) * x0[perm]
    want = (2 * lam * dsm_loss(net, sde, x0, t, noise, encode(enc, sde, mixed, t))).mean()
    assert out["dsm"].item() == pytest.approx(want.item(), rel=1e-5)
    # lam = 1 everywhere: the code of the image itself, DSM weighted by 2
    ones = mixup_drl_loss(enc, net, sde, x0, t, noise=noise, lam=torch.ones(6), l1_weight=0.0)
    plain = drl_loss(enc, net, sde, x0, t, noise=noise, l1_weight=0.0)
    assert ones["loss"].item() == pytest.approx(2 * plain["loss"].item(), rel=1e-5)
    drawn = mixup_drl_loss(enc, net, sde, x0, t, noise=noise, generator=torch.Generator().manual_seed(0))
    assert 0 < drawn["lam"].item() < 1


def test_ae_loss_trains_only_the_decoder_path():
    sde = VESDE()
    enc, net = TinyEncoder(), tiny_score_net(decoder=True)
    x0, t = images(4), torch.full((4,), 0.3)
    out = ae_loss(enc, net, sde, x0, t, l1_weight=0.0)
    out["loss"].backward()
    assert all(p.grad is None for n, p in net.named_parameters() if n.startswith(("down", "up", "mid")))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.decoder.parameters())
    logits = net.reconstruct(sde.net_input(t), encode(enc, sde, x0, t))
    bce = F.binary_cross_entropy_with_logits(logits, to_unit_interval(x0), reduction="none")
    assert out["bce"].item() == pytest.approx(0.5 * bce.flatten(1).sum(1).mean().item(), rel=1e-5)


def test_to_unit_interval():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 2, 2)
    assert torch.equal(to_unit_interval(x).flatten(), torch.tensor([0.0, 0.5, 1.0, 1.0]))
    x3 = torch.zeros(1, 3, 1, 1)
    assert torch.allclose(to_unit_interval(x3, mean=(0.1, 0.2, 0.3), std=(1, 1, 1)).flatten(),
                          torch.tensor([0.1, 0.2, 0.3]))


# ---- samplers -------------------------------------------------------------------------------
@pytest.mark.parametrize("sde", SDES, ids=SDE_IDS)
@pytest.mark.parametrize("sampler", [euler_maruyama_sampler, pc_sampler], ids=["em", "pc"])
def test_samplers_recover_a_delta_dataset(sde, sampler):
    """With the exact score of data = {a}, the reverse SDE must end at a."""
    a = images(1)

    def score_fn(x, t):
        mean, std = sde.marginal_prob(a.expand_as(x), t)
        return -(x - mean) / std.reshape(-1, 1, 1, 1) ** 2

    x = sampler(score_fn, sde, (4, 1, 8, 8), steps=200, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    assert (x - a).abs().max().item() < 0.05


@pytest.mark.parametrize("sampler", [euler_maruyama_sampler, pc_sampler], ids=["em", "pc"])
def test_samplers_with_a_conditional_score_net(sampler):
    sde = VESDE()
    net = tiny_score_net(randomise_output=True)
    code = torch.randn(3, 16)
    g = torch.Generator().manual_seed(0)
    x = sampler(conditional_score_fn(net, sde, code), sde, (3, 1, 8, 8), steps=5, generator=g)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
    again = sampler(conditional_score_fn(net, sde, code), sde, (3, 1, 8, 8), steps=5,
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, again)  # seeded
    with pytest.raises(ValueError):
        sampler(conditional_score_fn(net, sde, code), sde, (3, 1, 8, 8), steps=0)
    untrained = tiny_score_net()  # zero output: score 0 everywhere, the sampler must stay finite
    x = sampler(conditional_score_fn(untrained, sde, code), sde, (3, 1, 8, 8), steps=3, generator=g)
    assert torch.isfinite(x).all()


# ---- EMA ------------------------------------------------------------------------------------
def test_ema_update_store_copy_restore_and_state():
    p = nn.Parameter(torch.zeros(3))
    ema = ExponentialMovingAverage([p], decay=0.9, use_num_updates=False)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update([p])
    assert torch.allclose(ema.shadow[0], torch.full((3,), 0.1))  # 0.9 * 0 + 0.1 * 1
    ema.update([p])
    assert torch.allclose(ema.shadow[0], torch.full((3,), 0.19))

    warm = ExponentialMovingAverage([nn.Parameter(torch.zeros(1))], decay=0.999)
    q = nn.Parameter(torch.ones(1))
    warm.update([q])
    assert warm.shadow[0].item() == pytest.approx(1 - 2 / 11)  # decay = min(0.999, (1 + 1) / (10 + 1))

    ema.store([p])
    ema.copy_to([p])
    assert torch.allclose(p, torch.full((3,), 0.19))
    ema.restore([p])
    assert torch.equal(p.detach(), torch.ones(3))
    with pytest.raises(RuntimeError):
        ema.restore([p])

    other = ExponentialMovingAverage([nn.Parameter(torch.zeros(3))], decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.9 and other.num_updates is None and torch.equal(other.shadow[0], ema.shadow[0])
    with pytest.raises(ValueError):
        ExponentialMovingAverage([p, p]).load_state_dict(ema.state_dict())


# ---- Eq. 6: the code carries what the denoiser needs ----------------------------------------
def test_eq6_learned_code_beats_uninformative_codes():
    """After DRL training on 8 fixed random images, the DSM loss with each image's own code is
    clearly below the loss of the same model given zeros or the codes of other images (Eq. 6: without
    information on x_0 no score model can go below the constant term)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    sde = VESDE()
    data = images(8)
    enc, net = TinyEncoder(), tiny_score_net()
    opt = torch.optim.Adam(list(enc.parameters()) + list(net.parameters()), lr=2e-3)
    for _ in range(200):
        x0 = data.repeat(8, 1, 1, 1)  # (64, 1, 8, 8)
        out = drl_loss(enc, net, sde, x0, sample_t(64, "uniform", sde, generator=g), generator=g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()

    @torch.no_grad()
    def losses(mode):
        ge = torch.Generator().manual_seed(1)
        x0 = data.repeat(64, 1, 1, 1)  # (512, 1, 8, 8)
        t = sample_t(x0.shape[0], mode, sde, generator=ge)
        noise = torch.randn(x0.shape, generator=ge)
        code = encode(enc, sde, x0, t)
        other = encode(enc, sde, x0.roll(1, dims=0), t)  # each image gets another image's code
        return {name: dsm_loss(net, sde, x0, t, noise, z).mean().item()
                for name, z in (("own", code), ("zeros", torch.zeros_like(code)), ("shuffled", other))}

    uniform, mid = losses("uniform"), losses("fixed:0.5")
    print(f"\nEq. 6 DSM losses, uniform t: {uniform}; t = 0.5: {mid}")
    # margins measured on seed 0 are printed above
    assert uniform["own"] < 0.9 * uniform["zeros"] and uniform["own"] < 0.6 * uniform["shuffled"]
    assert mid["own"] < 0.75 * mid["zeros"] and mid["own"] < 0.3 * mid["shuffled"]
