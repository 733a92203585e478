"""The score network (NCSN++ with the published code conditioning), its decoder and the VDRL head.

How the pinned parameter counts were obtained: the published NCSN++ (score-SDE, as the DRL authors
configured it) was built outside this repository with the small CIFAR-10 configuration (nf 16,
ch_mult (1, 2, 2, 2), 2 res blocks, attention at 16, BigGAN blocks with fir=False, progressive_input
'residual', progressive 'none', skip_rescale, init_scale 0, dropout 0.1, Fourier scale 16, 3 channels,
image 32), with include_encoder=True and probabilistic_encoder=False, its config tree given as plain
namespaces; then the trainable parameters (requires_grad) of the whole network, of its ``encoder``
submodule (the time-conditioned WRN-28-2) and of its ``decoder`` submodule were counted. The score
path is the whole minus the encoder minus the decoder; it includes the code projection and the three
layers that make the bottleneck code map. Trainable counts are compared because the published network
keeps its 16 Fourier frequencies as a parameter with requires_grad=False, where this one keeps them
in a buffer. The same was done with image 84 and ch_mult (1, 2, 2) (the Mini-ImageNet run). Copying
the published weights into this module, layer by layer in call order, reproduced its score and its
reconstruction to float precision (about 1e-6) at 32x32 and 28x28.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from laplacedrl.models.embedding import ZERO_SCALE, default_init_
from laplacedrl.models.score_net import (AttnBlock, ResBlock, ScoreNet, VariationalHead, build_score_net,
                                         score_net_record)

CIFAR_SMALL_SCORE_PATH = 938_899  # published NCSN++ minus encoder minus Decoder
CIFAR_SMALL_DECODER = 353_907
MINIIMAGENET_SCORE_PATH = 10_658_579  # image 84, ch_mult (1, 2, 2)
MINIIMAGENET_DECODER = 257_555

TINY = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), code_dim=6, dropout=0.0)


def n_trainable(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(decoder=False, **kwargs):
    return ScoreNet(in_channels=1, image_size=8, decoder=decoder, **{**TINY, **kwargs})


def inputs(net, batch=3):
    a = net.args
    x = torch.randn(batch, a["in_channels"], a["image_size"], a["image_size"])
    c = torch.linspace(-4.0, 3.0, batch)  # log sigma
    return x, c, torch.randn(batch, a["code_dim"]), c.exp()


def wake_up(net):
    """Re-initialise the (almost) zero-initialised convs with scale 1, so every path carries signal."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d) and m.weight.abs().max() < 1e-3:
                default_init_(m.weight)
    return net


# ---------------------------------------------------------------- pinned sizes


def test_cifar_small_parameter_counts_match_the_published_network():
    score = ScoreNet(3, 32)
    with_decoder = ScoreNet(3, 32, decoder=True)
    assert n_trainable(score) == CIFAR_SMALL_SCORE_PATH
    assert n_trainable(with_decoder) - n_trainable(score) == CIFAR_SMALL_DECODER
    assert n_trainable(with_decoder.decoder) == CIFAR_SMALL_DECODER
    assert score.time_embed.fourier.w.numel() == 16 and score.emb_dim == 128
    assert (score.map_channels, score.map_size) == (32, 4)


def test_miniimagenet_parameter_counts_match_the_published_network():
    score = ScoreNet(3, 84, ch_mult=(1, 2, 2))
    assert n_trainable(score) == MINIIMAGENET_SCORE_PATH
    decoder = ScoreNet(3, 84, ch_mult=(1, 2, 2), decoder=True).decoder
    assert n_trainable(decoder) == MINIIMAGENET_DECODER
    assert score.map_size == 21


def test_defaults_are_the_small_configuration():
    a = ScoreNet(3, 32).args
    assert (a["nf"], a["ch_mult"], a["num_res_blocks"], a["attn_resolutions"], a["dropout"], a["code_dim"],
            a["fourier_scale"], a["scale_by_std"], a["decoder"]) == (16, (1, 2, 2, 2), 2, (16,), 0.1, 128,
                                                                    16.0, True, False)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("channels,size,kwargs", [
    (3, 32, {}),  # CIFAR, the small configuration
    (3, 84, dict(ch_mult=(1, 2, 2))),  # Mini-ImageNet: 84 -> 42 -> 21
    (1, 28, dict(ch_mult=(1, 2), nf=8)),  # Fashion-MNIST
    (1, 28, dict(ch_mult=(1, 2, 2), nf=8, attn_resolutions=(7,))),
    (1, 8, dict(ch_mult=(1, 2), nf=8, attn_resolutions=(4,), code_dim=6)),  # digits
])
def test_shapes_for_every_supported_size(channels, size, kwargs):
    net = ScoreNet(channels, size, decoder=True, **kwargs).eval()
    x, c, code, std = inputs(net, batch=1 if size == 84 else 2)
    with torch.no_grad():
        score = net(x, c, code, std=std)
        recon = net.reconstruct(c, code)
    assert score.shape == x.shape and recon.shape == x.shape
    assert torch.isfinite(score).all() and torch.isfinite(recon).all()
    assert net.map_size == size // 2 ** (len(net.args["ch_mult"]) - 1)


@pytest.mark.parametrize("size,ch_mult,odd", [(84, (1, 2, 2, 2), "21"), (28, (1, 2, 2, 2), "7"), (10, (1, 2, 2), "5")])
def test_sizes_the_down_path_cannot_halve_are_refused(size, ch_mult, odd):
    with pytest.raises(ValueError, match=f"image_size {size} cannot be halved") as err:
        ScoreNet(1, size, ch_mult=ch_mult, nf=8)
    assert odd in str(err.value)


def test_bad_inputs_are_refused():
    net = tiny()
    x, c, code, std = inputs(net)
    with pytest.raises(ValueError, match="needs std"):
        net(x, c, code)
    with pytest.raises(ValueError, match="code must have shape"):
        net(x, c, code[:, :2], std=std)
    with pytest.raises(ValueError, match="c must have shape"):
        net(x, c[:2], code, std=std)
    with pytest.raises(ValueError, match="x_t must have shape"):
        net(x[:, :, :4, :4], c, code, std=std)
    with pytest.raises(ValueError, match="decoder=True"):
        net.reconstruct(c, code)
    with pytest.raises(ValueError, match="code_dim"):
        ScoreNet(1, 8, code_dim=0)


# ---------------------------------------------------------------- initialisation


def test_untrained_net_outputs_almost_zero_so_the_dsm_loss_is_the_dimension_count():
    net = ScoreNet(3, 32).eval()
    x0 = torch.rand(2, 3, 32, 32)
    c = torch.tensor([-2.0, 2.5])
    std = c.exp()
    noise = torch.randn_like(x0)
    with torch.no_grad():
        score = net(x0 + std[:, None, None, None] * noise, c, torch.randn(2, 128), std=std)
    raw = score * std[:, None, None, None]
    assert 0 < raw.abs().max().item() < 1e-3  # score-SDE's init scale 0 is 1e-10, not exactly 0
    dsm = ((raw + noise) ** 2).sum(dim=(1, 2, 3))  # || s std + z ||^2 per sample
    assert torch.allclose(dsm, (noise ** 2).sum(dim=(1, 2, 3)), rtol=1e-3)
    assert dsm.mean().item() == pytest.approx(3 * 32 * 32, rel=0.05)


def test_zero_scale_layers_and_variance_scaling():
    net = ScoreNet(3, 32)
    fan_avg = (net.conv_out.in_channels + 3) * 9 / 2
    assert 0 < net.conv_out.weight.abs().max().item() <= math.sqrt(3 * ZERO_SCALE / fan_avg)
    block = net.up[0].blocks[0]
    assert block.conv1.weight.abs().max().item() < 1e-4 and net.mid[1].out.weight.abs().max().item() < 1e-4
    bound = math.sqrt(6.0 / ((block.conv0.in_channels + block.conv0.out_channels) * 9))
    assert block.conv0.weight.abs().max().item() <= bound
    assert block.conv0.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.equal(block.conv0.bias, torch.zeros_like(block.conv0.bias))
    assert torch.equal(block.emb_proj.bias, torch.zeros_like(block.emb_proj.bias))
    assert net.code_proj.bias.abs().max().item() > 0  # PyTorch default init, as published
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert all(n.eps == 1e-6 and n.num_groups == min(n.num_channels // 4, 32) for n in norms)


# ---------------------------------------------------------------- structure


def test_layout_channels_and_resampling():
    net = ScoreNet(3, 32)
    assert [len(level.blocks) for level in net.down] == [2, 2, 2, 2]
    assert [len(level.blocks) for level in net.up] == [3, 3, 3, 3]
    assert [level.attn is not None for level in net.down] == [False, True, False, False]  # at 16 only
    assert net.mid[0].norm0.num_channels == 32 + 32  # bottleneck features + the code map
    assert net.down[0].resample.resample == "down" and net.down[-1].resample is None
    assert net.up[0].resample.resample == "up" and net.up[-1].resample is None
    assert net.down[0].pyramid.conv.stride == (2, 2) and net.down[0].pyramid.conv.in_channels == 3
    assert net.up[0].blocks[0].conv0.in_channels == 64 + 32  # middle output + the last skip


def test_residual_input_pyramid():
    net = wake_up(ScoreNet(1, 16, nf=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), code_dim=4))
    net.eval()
    seen = {}

    def keep(name):
        def hook(module, args, out):
            seen[name] = (args[0], out)
        return hook

    for i, level in enumerate(net.down):
        for part in ("resample", "pyramid"):
            if getattr(level, part) is not None:
                getattr(level, part).register_forward_hook(keep(f"{part}{i}"))
        level.blocks[0].register_forward_hook(keep(f"block{i}"))
    x, c, code, std = inputs(net, batch=2)
    with torch.no_grad():
        net(x, c, code, std)
    assert torch.equal(seen["pyramid0"][0], x)  # the pyramid starts from the image itself
    for i in (0, 1):
        mixed = (seen[f"pyramid{i}"][1] + seen[f"resample{i}"][1]) / math.sqrt(2)
        assert torch.allclose(seen[f"block{i + 1}"][0], mixed, atol=1e-6)  # the next level starts there
    assert torch.equal(seen["pyramid1"][0], seen["block1"][0])  # and the next pyramid step too


@pytest.mark.parametrize("resample", [None, "down", "up"])
def test_resblock_formula(resample):
    block = ResBlock(8, 16 if resample is None else 8, emb_dim=12, dropout=0.0, resample=resample).eval()
    wake_up(block)
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 12)
    r = {None: lambda t: t, "down": lambda t: F.avg_pool2d(t, 2),
         "up": lambda t: t.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)}[resample]
    with torch.no_grad():
        h = block.conv0(r(F.silu(block.norm0(x)))) + block.emb_proj(F.silu(emb))[:, :, None, None]
        h = block.conv1(F.silu(block.norm1(h)))
        expected = (block.skip(r(x)) + h) / math.sqrt(2)
        assert torch.allclose(block(x, emb), expected, atol=1e-5)
    assert block.skip is not None  # channels change or resampling: a 1x1 conv
    assert ResBlock(8, 8, 12, 0.0).skip is None


def test_attention_formula():
    attn = wake_up(AttnBlock(8))
    x = torch.randn(2, 8, 3, 3)
    with torch.no_grad():
        h = attn.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (attn.q, attn.k, attn.v))  # (B, HW, C)
        w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), dim=-1)
        out = (w @ v).transpose(1, 2).reshape(2, 8, 3, 3)
        assert torch.allclose(attn(x), (x + attn.out(out)) / math.sqrt(2), atol=1e-5)


# ---------------------------------------------------------------- conditioning


def test_embedding_and_code_map_formulas():
    net = tiny()
    _, c, code, _ = inputs(net)
    te = net.time_embed
    proj = c[:, None] * te.fourier.w[None, :] * (2 * math.pi)  # (B, nf)
    temb = te.lin2(F.silu(te.lin1(torch.cat([proj.sin(), proj.cos()], dim=1))))  # (B, 4nf)
    emb = torch.cat([temb, net.code_proj(code)], dim=1)  # (B, 8nf), not activated
    assert torch.allclose(net.embed(c, code), emb, atol=1e-5)
    m = net.code_map
    expected = F.silu(m.lin3(F.silu(m.lin2(F.silu(m.lin1(emb)))))).reshape(3, 16, 4, 4)  # (B, 2nf, s, s)
    assert torch.allclose(m(emb), expected, atol=1e-6)
    assert (m.lin1.out_features, m.lin3.out_features) == (16 * 4, 16 * 4 * 4)


def _score(net, code, x, c, std):
    with torch.no_grad():
        return net(x, c, code, std=std)


def test_code_reaches_the_output_through_both_paths():
    net = wake_up(tiny()).eval()
    x, c, code, std = inputs(net)
    other = torch.randn_like(code)
    assert (_score(net, code, x, c, std) - _score(net, other, x, c, std)).abs().max() > 1e-3
    with torch.no_grad():  # silence every residual block's projection of the embedding
        for m in net.modules():
            if isinstance(m, ResBlock):
                m.emb_proj.weight.zero_()
                m.emb_proj.bias.zero_()
    # ... the code still reaches the output through the bottleneck map
    assert (_score(net, code, x, c, std) - _score(net, other, x, c, std)).abs().max() > 1e-3
    with torch.no_grad():  # and silencing the map as well leaves the code no way in
        net.code_map.lin3.weight.zero_()
        net.code_map.lin3.bias.zero_()
    assert torch.equal(_score(net, code, x, c, std), _score(net, other, x, c, std))


def test_code_reaches_the_output_through_the_block_projections_alone():
    net = wake_up(tiny()).eval()
    x, c, code, std = inputs(net)
    with torch.no_grad():
        net.code_map.lin3.weight.zero_()
        net.code_map.lin3.bias.zero_()
    assert (_score(net, code, x, c, std) - _score(net, torch.randn_like(code), x, c, std)).abs().max() > 1e-3


def test_noise_input_conditions_the_score_and_scale_by_std_divides():
    net = wake_up(tiny()).eval()
    x, c, code, std = inputs(net)
    raw = tiny(scale_by_std=False)
    raw.load_state_dict(net.state_dict(), strict=True)
    raw.eval()
    with torch.no_grad():
        assert (net(x, c, code, std) - net(x, c + 1.0, code, std)).abs().max() > 1e-3
        assert torch.allclose(net(x, c, code, std) * std[:, None, None, None], raw(x, c, code), atol=1e-5)


def test_reconstruct_runs_only_the_embedding_the_code_map_and_the_decoder():
    net = tiny(decoder=True)
    _, c, code, _ = inputs(net)
    recon = net.reconstruct(c, code)
    assert recon.shape == (3, 1, 8, 8)
    F.binary_cross_entropy_with_logits(recon, torch.rand_like(recon)).backward()
    for name in ScoreNet.SCORE_PATH:
        assert all(p.grad is None for p in getattr(net, name).parameters()), name
    for module in (net.decoder, net.code_map, net.code_proj, net.time_embed):
        assert all(p.grad is not None for p in module.parameters())
    calls = []
    for name in ScoreNet.SCORE_PATH:
        getattr(net, name).register_forward_pre_hook(lambda module, args, name=name: calls.append(name))
    with torch.no_grad():
        net.reconstruct(c, code)
    assert calls == []


def test_forward_does_not_run_the_decoder():
    net = tiny(decoder=True)
    x, c, code, std = inputs(net)
    net(x, c, code, std=std).sum().backward()
    assert all(p.grad is None for p in net.decoder.parameters())
    assert net.conv_out.weight.grad is not None


# ---------------------------------------------------------------- record


@pytest.mark.parametrize("decoder", [False, True])
def test_record_round_trip(decoder):
    net = wake_up(tiny(decoder=decoder, dropout=0.1)).eval()
    record = score_net_record(net)
    assert json.loads(json.dumps(record)) == record  # plain data
    assert record["decoder"] is decoder and record["ch_mult"] == [1, 2]
    rebuilt = build_score_net(**record).eval()
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    x, c, code, std = inputs(net)
    with torch.no_grad():
        assert torch.equal(net(x, c, code, std), rebuilt(x, c, code, std))
        if decoder:
            assert torch.equal(net.reconstruct(c, code), rebuilt.reconstruct(c, code))
    assert rebuilt.args == net.args


def test_decoder_mismatch_is_refused_by_strict_load():
    with pytest.raises(RuntimeError):
        tiny(decoder=False).load_state_dict(tiny(decoder=True).state_dict(), strict=True)


# ---------------------------------------------------------------- VDRL head


def test_variational_head_is_one_linear_split_in_halves():
    head = VariationalHead(16, 4)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].weight.shape == (8, 16)
    assert n_trainable(head) == 16 * 8 + 8
    assert linears[0].weight.abs().max().item() <= 1 / math.sqrt(16)  # PyTorch default init
    assert linears[0].bias.abs().max().item() > 0
    feat = torch.randn(3, 16)
    mean, logvar = head(feat)
    full = linears[0](feat)
    assert mean.shape == logvar.shape == (3, 4)
    assert torch.equal(mean, full[:, :4]) and torch.equal(logvar, full[:, 4:])
