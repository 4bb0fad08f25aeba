"""Denoiser: its layers written out by hand, its token layout, any D, and the affine map to data units (AffineMap)."""

import ast
import copy
import math
import os
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

import tinydiff as td

pytestmark = pytest.mark.unit

E, H = 128, 256
linear = lambda i, o: i * o + o  # parameters of nn.Linear(i, o)

CONFIGS = [
    dict(),
    dict(attn_layers=1, heads=4),
    dict(attn_layers=1, heads=16),
    dict(attn_layers=2, heads=4),
    dict(ssm_layers=1),
    dict(ssm_layers=3),
    dict(attn_layers=1, ssm_layers=2),
    dict(block="relu", attn_layers=2),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()) or "base")
def test_every_config_maps_points_and_time_to_points(kw):
    torch.manual_seed(0)
    model = td.Denoiser(td.DenoiserConfig(**kw))
    out = model(torch.randn(7, 2), torch.randint(0, 100, (7,)))
    assert out.shape == (7, 2) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())  # every block takes part


def test_baseline_parameter_count_matches_the_study_build():
    expected = linear(3 * E, H) + 3 * linear(H, H) + linear(H, 2)  # concat -> 256, 3 blocks, -> 2
    assert sum(p.numel() for p in td.Denoiser(td.DenoiserConfig()).parameters()) == expected == 296_450


def emb(v, scale):
    """The template's SinusoidalEmbedding, from its formula."""
    w = torch.exp(-math.log(10000.0) / 63 * torch.arange(64))
    a = (v.float() * scale)[:, None] * w
    return torch.cat([a.sin(), a.cos()], -1)


@pytest.mark.parametrize("D", [2, 3])
@pytest.mark.parametrize("block", ["relu", "gelu"])
def test_the_mlp_denoiser_is_the_network_written_out(block, D):
    """block="relu": the study's MLPDenoiser, Linear(128 (D + 1), 256) -> 3 x (x + Linear(ReLU(x))) -> ReLU ->
    Linear(256, D); block="gelu": tiny-diffusion's, Linear -> GELU -> 3 x (x + GELU(Linear(x))) -> Linear."""
    torch.manual_seed(0)
    model = td.Denoiser(td.DenoiserConfig(block=block, coord_scale=25.0, data_dim=D))
    x, t = torch.randn(9, D), torch.randint(0, 100, (9,))
    lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(lin) == 5
    h = lin[0](torch.cat([emb(x[:, i], 25.0) for i in range(D)] + [emb(t, 1.0)], -1))
    if block == "relu":
        for ff in lin[1:4]:
            h = h + ff(torch.relu(h))
        ref = lin[4](torch.relu(h))
    else:
        h = torch.nn.functional.gelu(h)
        for ff in lin[1:4]:
            h = h + torch.nn.functional.gelu(ff(h))
        ref = lin[4](h)
    torch.testing.assert_close(model(x, t), ref)


def test_unknown_block_and_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="unknown block 'tanh'; use gelu or relu"):
        td.Denoiser(td.DenoiserConfig(block="tanh"))
    with pytest.raises(ValueError, match="data_dim 0 must be at least 1"):
        td.Denoiser(td.DenoiserConfig(data_dim=0))
    with pytest.raises(ValueError, match="not both"):
        td.Denoiser(td.DenoiserConfig(num_classes=3, cond_dim=2))
    with pytest.raises(ValueError, match="not both"):
        td.Denoiser(td.DenoiserConfig(num_classes=-1))


@pytest.mark.parametrize("kw", [dict(), dict(attn_layers=1, ssm_layers=2)], ids=["base", "attn1-ssm2"])
@pytest.mark.parametrize("cond", [dict(num_classes=3), dict(cond_dim=2)], ids=["labels", "numbers"])
def test_an_unconditional_model_has_no_condition_and_conditioning_only_adds_to_it(kw, cond):
    """num_classes=0, cond_dim=0: no condition token (MLP input (D + 1) E) and no condition layers. The same seed with a
    condition builds the same mixers and residual blocks, adds the condition's own layers, and widens the MLP input by
    E."""
    torch.manual_seed(0)
    plain = td.Denoiser(td.DenoiserConfig(**kw))
    torch.manual_seed(0)
    cond_model = td.Denoiser(td.DenoiserConfig(**kw, **cond))
    assert not plain.conditional and cond_model.conditional
    assert not any(
        n.startswith(("label_emb", "cond_emb", "null_cond", "cond_map")) for n, _ in plain.state_dict().items()
    )
    assert plain.mlp[0].in_features == 3 * E and cond_model.mlp[0].in_features == 4 * E
    p, c = dict(plain.named_parameters()), dict(cond_model.named_parameters())
    added = (
        {"label_emb.weight"}
        if "num_classes" in cond
        else {"null_cond", "cond_emb.0.weight", "cond_emb.0.bias", "cond_emb.2.weight", "cond_emb.2.bias"}
    )
    assert set(c) - set(p) == added
    if "num_classes" in cond:  # label_emb comes last: the unconditional names are a prefix
        assert list(c)[: len(p)] == list(p)
    blocks = [
        f"mlp.{i}.ff.{w}"
        for i, m in enumerate(plain.mlp)
        if isinstance(m, td.ResidualBlock)
        for w in ("weight", "bias")
    ]
    mixers = [n for n in p if not n.startswith("mlp.")] + blocks
    assert len(blocks) == 6
    assert all(torch.equal(p[n], c[n]) for n in mixers)
    seen = []
    plain.mlp.register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    plain(torch.randn(5, 2), torch.zeros(5, dtype=torch.long))
    assert seen == [(5, 3 * E)]


def test_long_skips_join_shallow_to_deep_blocks():
    model = td.Denoiser(td.DenoiserConfig(ssm_layers=4))
    order = []
    for i, blk in enumerate(model.ssm):
        blk.register_forward_hook(lambda m, a, o, i=i: order.append(("block", i)))
    for j, sk in enumerate(model.skips):
        sk.register_forward_hook(lambda m, a, o, j=j: order.append(("skip", j)))
    model(torch.randn(2, 2), torch.zeros(2, dtype=torch.long))
    assert order == [("block", 0), ("block", 1), ("skip", 1), ("block", 2), ("skip", 0), ("block", 3)]


def test_the_ssm_stack_is_a_residual_branch_written_out():
    torch.manual_seed(0)
    model = td.Denoiser(td.DenoiserConfig(ssm_layers=2)).double()
    x, t = torch.randn(4, 2, dtype=torch.float64), torch.randint(0, 100, (4,))
    tokens = torch.stack([emb(x[:, 0], 50.0), emb(x[:, 1], 50.0), emb(t, 1.0)], 1).double()
    h0 = model.ssm[0](model.ssm_in(tokens))
    h = model.ssm[1](model.skips[0](torch.cat([h0, h0], -1)))
    ref = model.mlp((tokens + model.ssm_out(h)).flatten(1))
    torch.testing.assert_close(model(x, t), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("D", [1, 3, 8])
@pytest.mark.parametrize("kw", [dict(), dict(attn_layers=1, ssm_layers=2)], ids=["base", "attn1-ssm2"])
def test_a_d_dimensional_denoiser_has_one_token_per_coordinate(D, kw):
    torch.manual_seed(0)
    model = td.Denoiser(td.DenoiserConfig(data_dim=D, **kw))
    assert sum(p.numel() for p in model.mlp.parameters()) == linear((D + 1) * E, H) + 3 * linear(H, H) + linear(H, D)
    seen = []
    model.mlp.register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    out = model(torch.randn(7, D), torch.randint(0, 100, (7,)))
    assert out.shape == (7, D) and torch.isfinite(out).all() and seen == [(7, (D + 1) * E)]
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_points_that_do_not_fit_the_model_are_refused_in_library_terms():
    model, s = td.Denoiser(td.DenoiserConfig()), td.NoiseScheduler()
    model.set_data_stats(torch.randn(10, 2))
    t = torch.zeros(5, dtype=torch.long)
    for x in (torch.randn(5, 3), torch.randn(5, 1), torch.randn(5)):
        for call in (lambda: model(x, t), lambda: td.ddpm_loss(model, s, x), lambda: model.set_data_stats(x)):
            with pytest.raises(ValueError, match=r"takes 2-D points, \(B, 2\) \(DenoiserConfig.data_dim=2\)") as e:
                call()
            assert "--" not in str(e.value)
    with pytest.raises(ValueError, match="one timestep per point"):
        model(torch.randn(5, 2), torch.zeros(4, dtype=torch.long))


def test_set_data_stats_standardizes_each_coordinate_against_numpy():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(5000, 3)) @ np.array([[2, 0, 0], [1, 0.5, 0], [0, 0.3, 1]]) * [50, 1e-3, 1e4] + [100, -3, 1e6]
    model = td.Denoiser(td.DenoiserConfig(data_dim=3))
    assert not model.data_stats_set
    model.set_data_stats(torch.as_tensor(X))
    m = model.data_map
    assert model.data_stats_set
    np.testing.assert_allclose(m.shift.double().numpy() + m.shift_lo.double().numpy(), X.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.scale.numpy(), X.std(0) / td.MODEL_SD, rtol=1e-6)
    np.testing.assert_allclose(model.data_mean.numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(
        model.data_cov.numpy(), np.corrcoef(X.T) * td.MODEL_SD**2, atol=1e-5
    )  # the covariance of z
    # raw coordinates: the identity map, and the moments numpy computes
    raw = X / [100, 1e-3, 1e4]
    model.set_data_stats(torch.as_tensor(raw), standardize=False)
    assert (
        torch.equal(m.shift, torch.zeros(3))
        and torch.equal(m.shift_lo, torch.zeros(3))
        and torch.equal(m.scale, torch.ones(3))
    )
    np.testing.assert_allclose(model.data_mean.numpy(), raw.mean(0), rtol=1e-6)
    np.testing.assert_allclose(model.data_cov.numpy(), np.cov(raw.T, bias=True), rtol=1e-5, atol=1e-6)
    # moments off: 0 and I (the N(0, I) start); a constant coordinate takes the largest scale of the others
    model.set_data_stats(torch.tensor([[1.0, 5.0, 0.0], [3.0, 5.0, 0.5]]), moments=False)
    assert torch.equal(model.data_mean, torch.zeros(3)) and torch.equal(model.data_cov, torch.eye(3))
    torch.testing.assert_close(m.scale, torch.tensor([1.0, 1.0, 0.25]) / td.MODEL_SD)


@pytest.mark.parametrize("offset", [0.0, 1e9, -3e7])
def test_affine_map_round_trips_points_far_from_the_origin(offset):
    """Data at offset 1e9 with a spread of 1: float32 alone cannot tell them apart (its spacing there is 64)."""
    g = torch.Generator().manual_seed(0)
    X = offset + torch.randn(20_000, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.5])
    model = td.Denoiser(td.DenoiserConfig())
    model.set_data_stats(X)
    z = model.data_map.to_model(X)
    assert z.dtype == torch.float32
    z64 = (X - X.mean(0)) / (X.std(0, correction=0) / td.MODEL_SD)  # the reference, in float64
    assert (z.double() - z64).abs().max() < 1e-5
    assert z.double().mean(0).abs().max() < 1e-4
    torch.testing.assert_close(
        z.double().std(0, correction=0), torch.full((2,), td.MODEL_SD, dtype=torch.float64), rtol=1e-5, atol=0
    )
    back = model.data_map.to_data(z)
    assert back.dtype == torch.float64
    spread = X.std(0, correction=0)
    assert ((back - X).abs() / spread).max() < 1e-6


def test_affine_map_formulas():
    m = td.AffineMap(2)
    x32 = torch.tensor([[1.0, 2.0], [-4.0, 0.0]])
    m.set([0.5, -2.0], [3.0, 0.25])  # plain numbers work
    torch.testing.assert_close(m.to_model(x32), (x32 - torch.tensor([0.5, -2.0])) / torch.tensor([3.0, 0.25]))
    torch.testing.assert_close(
        m.to_data(x32),
        torch.tensor([0.5, -2.0], dtype=torch.float64) + torch.tensor([3.0, 0.25]).double() * x32.double(),
    )
    assert [n for n, _ in m.named_buffers()] == ["shift", "shift_lo", "scale"]


def test_a_standardized_model_is_the_raw_model_on_standardized_points():
    """Reference: the same weights with the identity map, given the standardized points by hand (float64):
    the same loss (same t and noise), and samples that map back by x = mean + sd / MODEL_SD * z."""
    torch.manual_seed(0)
    X = torch.randn(512, 3, dtype=torch.float64) * torch.tensor([50.0, 0.01, 3.0]) + torch.tensor([100.0, -7.0, 1e3])
    a = td.Denoiser(td.DenoiserConfig(data_dim=3)).eval()
    a.set_data_stats(X)
    b = copy.deepcopy(a)
    b.data_map.set(torch.zeros(3), torch.ones(3))
    s, g = td.NoiseScheduler(), lambda seed: torch.Generator().manual_seed(seed)
    mean, scale = X.mean(0), X.std(0, correction=0) / td.MODEL_SD
    Z = ((X - mean) / scale).float()
    t, noise = torch.randint(0, 100, (512,), generator=g(1)), torch.randn(512, 3, generator=g(1))
    assert td.ddpm_loss(a, s, X, t, noise).item() == pytest.approx(td.ddpm_loss(b, s, Z, t, noise).item(), rel=1e-5)
    xa = td.sample(a, s, 300, "dpm++", generator=g(2))
    zb = td.sample(b, s, 300, "dpm++", generator=g(2))
    torch.testing.assert_close(xa, mean + scale * zb, rtol=1e-6, atol=1e-6 * scale.min().item())


def test_unwrap_finds_the_denoiser_in_averaged_model_and_ddp():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = td.Denoiser(td.DenoiserConfig())
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99))
    ddp_like = torch.nn.Module()
    ddp_like.module = ema
    assert td.unwrap(ema) is ema.module and td.unwrap(ddp_like) is ema.module and td.unwrap(model) is model
    other = torch.nn.Linear(2, 2)
    assert td.unwrap(other) is other


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's first import warns about torch.jit
@pytest.mark.parametrize("kw", [dict(attn_layers=1, heads=16), dict(ssm_layers=2)])
def test_the_compiled_denoiser_matches_eager_mode(kw):
    """What `train.py --compile` trains: torch.compile's kernels against eager PyTorch, values and gradients."""
    torch.manual_seed(0)
    model = td.Denoiser(td.DenoiserConfig(**kw))
    x, t, g = torch.randn(256, 2), torch.randint(0, 100, (256,)), torch.randn(256, 2)
    compiled = torch.compile(model)
    assert td.unwrap(compiled) is model  # so the loss and the samplers find its data statistics
    outs = [f(x, t) for f in (model, compiled)]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad(y, list(model.parameters()), g) for y in outs]
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_tinydiff_imports_only_torch_and_the_standard_library_and_does_no_file_io():
    tree = ast.parse(open(os.path.join(ROOT, "tinydiff.py")).read())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mods.add(node.module.split(".")[0])
    assert mods and all(m == "torch" or m in sys.stdlib_module_names for m in mods), mods
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert "open" not in calls


def test_a_denoiser_cast_to_half_is_refused_in_one_sentence():
    """model.half() would round the map to data units and mix dtypes deep in torch; autocast is the way instead."""
    model = td.Denoiser(td.DenoiserConfig())
    model.set_data_stats(torch.randn(50, 2))
    with pytest.raises(ValueError, match="was cast to torch.float16; keep it in float32 or float64"):
        model.half()(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
