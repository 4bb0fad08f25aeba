"""tinydiff.py against independent references: Markov chains, Bayes' rule, naive loops, closed forms."""
import ast
import copy
import math
import os
import sys

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

import tinydiff as td
from conftest import ROOT


def moments_close(x, mean, var, n_sigma=5):
    """Empirical mean/variance of x (N,) within n_sigma standard errors of the given values."""
    n = x.numel()
    assert abs(x.mean().item() - mean) < n_sigma * math.sqrt(var / n)
    assert abs(x.var().item() - var) < n_sigma * var * math.sqrt(2 / (n - 1))


# ----------------------------------------------------------------------------- scheduler


@pytest.mark.parametrize("schedule", ["linear", "quadratic", "cosine"])
def test_alpha_bar_is_product_of_alphas(schedule):
    s = td.NoiseScheduler(50, beta_schedule=schedule)
    prod = 1.0
    for t in range(50):
        prod *= 1 - s.betas[t].double().item()
        assert s.alphas_cumprod[t].item() == pytest.approx(prod, rel=1e-4)  # betas are stored rounded to float32
    assert s.alpha_bar_T == pytest.approx(prod, rel=1e-4)
    assert (s.betas > 0).all() and (s.betas <= 0.999).all()


def test_linear_schedule_at_T100_ends_far_from_pure_noise():
    s = td.NoiseScheduler()  # the study's: T=100, betas 1e-4 .. 0.02
    betas = [1e-4 + (0.02 - 1e-4) * i / 99 for i in range(100)]
    assert s.alpha_bar_T == pytest.approx(math.prod(1 - b for b in betas), rel=1e-6)
    assert 0.35 < s.alpha_bar_T < 0.37


def test_cosine_schedule_matches_nichol_dhariwal():
    T, s = 100, td.NoiseScheduler(100, beta_schedule="cosine")
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 10, 50, 90):
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-4)


@pytest.mark.parametrize("t", [0, 7, 99])
def test_add_noise_matches_the_forward_markov_chain(t):
    s = td.NoiseScheduler()
    g = torch.Generator().manual_seed(0)
    n, x0 = 200_000, 1.7
    x = torch.full((n, 1), x0, dtype=torch.float64)
    for i in range(t + 1):  # x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) eps
        beta = s.betas[i].double()
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(n, 1, generator=g, dtype=torch.float64)
    direct = s.add_noise(torch.full((n, 1), x0), torch.randn(n, 1, generator=g), torch.full((n,), t))
    mean, var = x.mean().item(), x.var().item()
    moments_close(direct.double().flatten(), mean, var, n_sigma=6)


def betas64(schedule, T=100):
    """The schedules' definitions in plain Python floats."""
    if schedule == "linear":
        return [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    return [min(1 - f(t + 1) / f(t), 0.999) for t in range(T)]


def bayes_posterior(s, t, schedule="linear"):
    """q(x_{t-1} | x_t, x_0) by multiplying the two Gaussians, in float64: (coef on x0, coef on xt, var)."""
    betas = betas64(schedule, s.num_train_timesteps)
    ab_prev, beta = math.prod(1 - b for b in betas[:t]), betas[t]
    if t == 0:
        return 1.0, 0.0, 0.0
    prec = 1 / (1 - ab_prev) + (1 - beta) / beta
    return math.sqrt(ab_prev) / (1 - ab_prev) / prec, math.sqrt(1 - beta) / beta / prec, 1 / prec


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_coefficients_match_bayes_rule(schedule):
    s = td.NoiseScheduler(100, beta_schedule=schedule)
    for t in (0, 1, 5, 50, 99):
        c0, ct, var = bayes_posterior(s, t, schedule)
        assert s.posterior_mean_coef1[t].item() == pytest.approx(c0, rel=1e-5, abs=1e-7)
        assert s.posterior_mean_coef2[t].item() == pytest.approx(ct, rel=1e-5, abs=1e-7)
        assert s.posterior_variance[t].item() == pytest.approx(var, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("t", [1, 30, 99])
def test_step_samples_the_posterior(t):
    s = td.NoiseScheduler()
    n, x0, xt = 200_000, 0.8, -1.3
    # the noise that maps x0 to xt, so the predicted x0 is exactly x0
    eps = (xt - s.sqrt_alphas_cumprod[t].item() * x0) / s.sqrt_one_minus_alphas_cumprod[t].item()
    out = s.step(torch.full((n, 1), eps), t, torch.full((n, 1), xt), generator=torch.Generator().manual_seed(1))
    c0, ct, var = bayes_posterior(s, t)
    moments_close(out.double().flatten(), c0 * x0 + ct * xt, var)


def test_step_at_t0_returns_the_predicted_x0():
    s = td.NoiseScheduler()
    x0, eps = torch.randn(10, 2), torch.randn(10, 2)
    xt = s.add_noise(x0, eps, torch.zeros(10, dtype=torch.long))
    torch.testing.assert_close(s.step(eps, 0, xt), x0, atol=1e-5, rtol=1e-5)


def test_ddim_eta0_is_deterministic():
    s = td.NoiseScheduler()
    eps, xt = torch.randn(100, 2), torch.randn(100, 2)
    a = s.ddim_step(eps, 60, 40, xt, eta=0.0, generator=torch.Generator().manual_seed(1))
    b = s.ddim_step(eps, 60, 40, xt, eta=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("t", [1, 10, 99])
def test_ddim_eta1_over_all_steps_is_the_ddpm_posterior(t):
    s = td.NoiseScheduler()
    n = 200_000
    eps, xt = torch.full((n, 1), 0.4), torch.full((n, 1), 1.1)
    out = s.ddim_step(eps, t, t - 1, xt, eta=1.0, generator=torch.Generator().manual_seed(3))
    x0 = (1.1 - s.sqrt_one_minus_alphas_cumprod[t].item() * 0.4) / s.sqrt_alphas_cumprod[t].item()
    c0, ct, var = bayes_posterior(s, t)
    moments_close(out.double().flatten(), c0 * x0 + ct * 1.1, var)
    # and, with the same noise, exactly DDPM's step
    ref = s.step(eps[:5], t, xt[:5], generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(s.ddim_step(eps[:5], t, t - 1, xt[:5], eta=1.0, generator=torch.Generator().manual_seed(4)), ref, atol=1e-5, rtol=1e-5)


def test_set_timesteps_is_strided_unique_and_ends_at_0():
    s = td.NoiseScheduler(100)
    for k in (1, 2, 7, 20, 99, 100):
        ts = s.set_timesteps(k)
        assert len(ts) == len(set(ts)) == k and ts[0] == 99 and ts == sorted(ts, reverse=True)
        assert k == 1 or ts[-1] == 0
    with pytest.raises(ValueError):
        s.set_timesteps(101)


def test_logsnr_spacing_is_nearest_to_an_even_log_snr_grid():
    s = td.NoiseScheduler(100)
    betas = betas64("linear", 100)
    lam = [0.5 * math.log(a / (1 - a)) for a in (math.prod(1 - b for b in betas[: t + 1]) for t in range(100))]
    for k in (2, 5, 8):  # few enough steps that the nearest timesteps are all distinct
        grid = [lam[99] + (lam[0] - lam[99]) * i / (k - 1) for i in range(k)]
        ref = [min(range(100), key=lambda t: abs(lam[t] - g)) for g in grid]
        assert len(set(ref)) == k and s.set_timesteps(k, "logsnr") == ref
    for k in (2, 10, 20, 50, 100):  # more steps: nearest ones collide at low noise and are spread apart
        ts = s.set_timesteps(k, "logsnr")
        assert len(ts) == len(set(ts)) == k and ts[0] == 99 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    assert sum(t < 20 for t in s.set_timesteps(20, "logsnr")) > sum(t < 20 for t in s.set_timesteps(20))
    with pytest.raises(ValueError, match="linear or logsnr"):
        s.set_timesteps(10, "cosine")


@pytest.mark.parametrize("t,s_", [(1, 0), (50, 49), (99, 70), (40, 3)])
def test_first_order_dpm_solver_step_is_the_ddpm_posterior_step(t, s_):
    s = td.NoiseScheduler()
    eps, xt = torch.randn(1000, 2), torch.randn(1000, 2)
    x0 = s.predict_x0(eps, t, xt)
    out = s.dpm_solver_step(x0, t, s_, xt, generator=torch.Generator().manual_seed(5))
    ref = s.ddim_step(eps, t, s_, xt, eta=1.0, generator=torch.Generator().manual_seed(5))  # q(x_s | x_t, x_0)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    if s_ == t - 1:
        torch.testing.assert_close(out, s.step(eps, t, xt, generator=torch.Generator().manual_seed(5)), atol=2e-5, rtol=1e-5)


def test_second_order_dpm_solver_step_extrapolates_x0_in_log_snr():
    """The 2M step equals the first-order step with x0 replaced by (1 + 1/2r) x0 - 1/2r x0_last, r = h_last / h."""
    s = td.NoiseScheduler()
    lam = lambda t: 0.5 * math.log(s.alphas_cumprod[t].item() / (1 - s.alphas_cumprod[t].item()))
    x0, x0_last, xt = torch.randn(50, 2), torch.randn(50, 2), torch.randn(50, 2)
    r = (lam(60) - lam(80)) / (lam(40) - lam(60))
    D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_last
    out = s.dpm_solver_step(x0, 60, 40, xt, x0_last, 80, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(out, s.dpm_solver_step(D, 60, 40, xt, generator=torch.Generator().manual_seed(6)), atol=1e-5, rtol=1e-5)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="linear, quadratic or cosine"):
        td.NoiseScheduler(beta_schedule="sigmoid")


def test_scheduler_buffers_move_with_to():
    s = td.NoiseScheduler().to(torch.float64)
    assert s.alphas_cumprod.dtype == torch.float64
    assert len(s.state_dict()) == 0  # derived from the config, not saved


# ----------------------------------------------------------------------------- embeddings and blocks


def test_sinusoidal_embedding_formula():
    emb = td.SinusoidalEmbedding(8, scale=25.0)
    x = torch.tensor([0.3, -1.2])
    out = emb(x)
    for i, xi in enumerate(x.tolist()):
        for k in range(4):
            w = math.exp(-math.log(10000.0) * k / 3)
            assert out[i, k].item() == pytest.approx(math.sin(25 * xi * w), abs=1e-5)
            assert out[i, 4 + k].item() == pytest.approx(math.cos(25 * xi * w), abs=1e-5)


@pytest.mark.parametrize("L", [3, 9])  # the few-token path and scaled_dot_product_attention
@pytest.mark.parametrize("heads", [1, 4, 8, 16])
def test_attention_matches_naive_softmax(heads, L):
    torch.manual_seed(0)
    attn = td.SelfAttention(128, heads).double()
    x = torch.randn(5, L, 128, dtype=torch.float64, requires_grad=True)
    h = attn.norm(x)
    q, k, v = (h @ attn.qkv.weight.T + attn.qkv.bias).split(128, -1)
    hs = 128 // heads
    outs = []
    for i in range(heads):  # one head at a time, written out
        sl = slice(i * hs, (i + 1) * hs)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hs), -1)
        outs.append(w @ v[..., sl])
    ref = x + torch.cat(outs, -1) @ attn.proj.weight.T + attn.proj.bias
    out = attn(x)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(ref)
    torch.testing.assert_close(*(torch.autograd.grad(y, [x, attn.qkv.weight], g) for y in (out, ref)), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("heads", [3, 5, 0, 7])
def test_heads_that_do_not_divide_the_width_are_refused(heads):
    with pytest.raises(ValueError, match="must divide the token width 128"):
        td.Denoiser(td.DenoiserConfig(attn_layers=1, heads=heads))


# ----------------------------------------------------------------------------- selective scan


def scan_reference(dt, A, B, C, x):
    """Plain loop, one element at a time over the sequence: the definition of the recurrence."""
    Bsz, L, D = x.shape
    h = torch.zeros(Bsz, A.shape[0], D, dtype=x.dtype)
    ys = torch.zeros_like(x)
    for t in range(L):
        for n in range(A.shape[0]):
            h[:, n] = torch.exp(dt[:, t] * A[n]) * h[:, n] + dt[:, t] * B[:, t, n, None] * x[:, t]
        ys[:, t] = (C[:, t, :, None] * h).sum(1)
    return ys


def scan_inputs(L, dtype, Bsz=2, D=6, N=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = F.softplus(torch.randn(Bsz, L, D, generator=g) - 2).to(dtype)
    A = -torch.arange(1, N + 1, dtype=dtype)[:, None].repeat(1, D)
    B, C = torch.randn(Bsz, L, N, generator=g).to(dtype), torch.randn(Bsz, L, N, generator=g).to(dtype)
    return dt, A, B, C, torch.randn(Bsz, L, D, generator=g).to(dtype)


@pytest.mark.parametrize("L", [1, 2, 3, 17, 256])
@pytest.mark.parametrize("parallel", [False, True])
def test_scan_paths_match_the_plain_loop(L, parallel):
    ref = scan_reference(*scan_inputs(L, torch.float64))
    out64 = td.selective_scan(*scan_inputs(L, torch.float64), parallel=parallel)
    assert (out64 - ref).abs().max().item() < 1e-10
    out32 = td.selective_scan(*scan_inputs(L, torch.float32), parallel=parallel)
    assert (out32.double() - ref).abs().max().item() < 1e-5


def test_parallel_scan_of_a_generic_recurrence():
    g = torch.Generator().manual_seed(0)
    for L in (1, 5, 64, 1000):
        a, b = torch.rand(3, L, 4, generator=g, dtype=torch.float64), torch.randn(3, L, 4, generator=g, dtype=torch.float64)
        h, ref = torch.zeros(3, 4, dtype=torch.float64), []
        for t in range(L):
            h = a[:, t] * h + b[:, t]
            ref.append(h)
        assert (td.scan_parallel(a, b) - torch.stack(ref, 1)).abs().max().item() < 1e-10


@pytest.mark.parametrize("parallel", [False, True])
def test_scan_gradcheck(parallel):
    inputs = [t.requires_grad_() for t in scan_inputs(5, torch.float64, Bsz=1, D=2, N=2)]
    assert torch.autograd.gradcheck(lambda *a: td.selective_scan(*a, parallel=parallel), inputs)


def test_long_sequences_stay_finite_at_mamba_init():
    torch.manual_seed(0)
    block = td.BiMambaBlock(16, d_state=16)
    y = block(torch.randn(2, 2048, 16))
    assert torch.isfinite(y).all()
    ssm = block.forward_ssm
    u = torch.randn(1, 1024, 32)
    seq = ssm(u)
    td_parallel = td.selective_scan
    try:  # the parallel path agrees at L = 1024
        td.selective_scan = lambda *a: td_parallel(*a, parallel=True)
        torch.testing.assert_close(ssm(u), seq, atol=1e-4, rtol=1e-4)
    finally:
        td.selective_scan = td_parallel


def test_forward_branch_is_causal():
    torch.manual_seed(0)
    ssm = td.SelectiveSSM(8, 4, 1)
    x = torch.randn(2, 12, 8)
    j = 7
    x2 = x.clone()
    x2[:, j] += 1.0
    y, y2 = ssm(x), ssm(x2)
    assert torch.equal(y[:, :j], y2[:, :j])
    assert not torch.equal(y[:, j], y2[:, j])


def test_bidirectional_block_is_the_average_of_both_directions():
    torch.manual_seed(0)
    blk = td.BiMambaBlock(16, d_state=4)
    x = torch.randn(3, 9, 16)
    u, z = blk.in_proj(blk.norm(x)).chunk(2, -1)
    both = 0.5 * (blk.forward_ssm(u) + blk.backward_ssm(u.flip(1)).flip(1))
    torch.testing.assert_close(blk(x), x + blk.out_proj(both * F.silu(z)))
    # swapping the two directions' weights and reversing the input reverses the output
    swapped = copy.deepcopy(blk)
    swapped.forward_ssm, swapped.backward_ssm = swapped.backward_ssm, swapped.forward_ssm
    torch.testing.assert_close(swapped(x.flip(1)), blk(x).flip(1), atol=1e-6, rtol=1e-5)


def test_dt_bias_is_inverse_softplus_of_dt_range():
    torch.manual_seed(0)
    ssm = td.SelectiveSSM(512, 4, 4)
    dt = F.softplus(ssm.dt_proj.bias)
    assert dt.min().item() >= 1e-3 * 0.999 and dt.max().item() <= 1e-1 * 1.001
    torch.testing.assert_close(torch.exp(ssm.A_log[:, 0]), torch.arange(1.0, 5.0))


# ----------------------------------------------------------------------------- denoiser, loss, samplers

CONFIGS = [dict(), dict(attn_layers=1, heads=4), dict(attn_layers=1, heads=8), dict(attn_layers=1, heads=16),
           dict(attn_layers=2, heads=4), dict(ssm_layers=1), dict(ssm_layers=2), dict(ssm_layers=3), dict(attn_layers=1, ssm_layers=2)]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()) or "base")
def test_every_config_maps_points_and_time_to_points(kw):
    torch.manual_seed(0)
    model = td.Denoiser(td.DenoiserConfig(**kw))
    out = model(torch.randn(7, 2), torch.randint(0, 100, (7,)))
    assert out.shape == (7, 2) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # every block takes part


def test_baseline_parameter_count_matches_the_study_build():
    E, H = 128, 256
    linear = lambda i, o: i * o + o
    expected = linear(3 * E, H) + 3 * linear(H, H) + linear(H, 2)  # concat -> 256, 3 blocks, -> 2
    assert sum(p.numel() for p in td.Denoiser(td.DenoiserConfig()).parameters()) == expected == 296_450


@pytest.mark.parametrize("D", [2, 3])
def test_relu_block_is_the_study_mlp_denoiser(D):
    """block="relu" against the study's MLPDenoiser written out by hand with the same weights:
    Linear(384, 256) -> 3 x (x + Linear(ReLU(x))) -> ReLU -> Linear(256, 2); in D dimensions one
    embedding per coordinate: Linear(128 (D + 1), 256) ... Linear(256, D)."""
    torch.manual_seed(0)
    model = td.Denoiser(td.DenoiserConfig(block="relu", coord_scale=25.0, data_dim=D))
    assert D != 2 or sum(p.numel() for p in model.parameters()) == 296_450
    x, t = torch.randn(9, D), torch.randint(0, 100, (9,))

    def emb(v, scale):  # the template's SinusoidalEmbedding, from its formula
        w = torch.exp(-math.log(10000.0) / 63 * torch.arange(64))
        a = (v.float() * scale)[:, None] * w
        return torch.cat([a.sin(), a.cos()], -1)

    lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    h = lin[0](torch.cat([emb(x[:, i], 25.0) for i in range(D)] + [emb(t, 1.0)], -1))
    for ff in lin[1:4]:
        h = h + ff(torch.relu(h))
    torch.testing.assert_close(model(x, t), lin[4](torch.relu(h)))
    with pytest.raises(ValueError, match="unknown block"):
        td.Denoiser(td.DenoiserConfig(block="tanh"))


def test_long_skips_join_shallow_to_deep_blocks():
    model = td.Denoiser(td.DenoiserConfig(ssm_layers=4))
    order = []
    for i, blk in enumerate(model.ssm):
        blk.register_forward_hook(lambda m, a, o, i=i: order.append(("block", i)))
    for j, sk in enumerate(model.skips):
        sk.register_forward_hook(lambda m, a, o, j=j: order.append(("skip", j)))
    model(torch.randn(2, 2), torch.zeros(2, dtype=torch.long))
    assert order == [("block", 0), ("block", 1), ("skip", 1), ("block", 2), ("skip", 0), ("block", 3)]


def test_ddpm_loss_is_the_noise_mse():
    torch.manual_seed(0)
    model, s = td.Denoiser(td.DenoiserConfig()), td.NoiseScheduler()
    x0 = torch.randn(64, 2)
    loss = td.ddpm_loss(model, s, x0, generator=torch.Generator().manual_seed(5), low_frac=0)
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 100, (64,), generator=g)
    noise = torch.randn(64, 2, generator=g)
    xt = s.sqrt_alphas_cumprod[t, None] * x0 + s.sqrt_one_minus_alphas_cumprod[t, None] * noise
    assert loss.item() == pytest.approx(((model(xt, t) - noise) ** 2).mean().item(), rel=1e-6)


class RecordT(torch.nn.Module):
    """A stand-in denoiser that predicts zero noise and keeps the timesteps it was asked about."""

    def forward(self, x, t):
        self.t = t
        return torch.zeros_like(x)


@pytest.mark.parametrize("low_t,low_frac", [(2, 0.5), (10, 0.25), (1, 0.9)])
def test_low_t_oversampling_draws_the_stated_mixture(low_t, low_frac):
    """p(t) = low_frac / low_t [t < low_t] + (1 - low_frac) / T, by a chi-square test against the closed form."""
    model, s, n, T = RecordT(), td.NoiseScheduler(), 200_000, 100
    td.ddpm_loss(model, s, torch.zeros(n, 2), generator=torch.Generator().manual_seed(0), low_t=low_t, low_frac=low_frac)
    counts = np.bincount(model.t.numpy(), minlength=T)
    p = (1 - low_frac) / T + low_frac / low_t * (np.arange(T) < low_t)
    assert counts.sum() == n and counts[p == 0].sum() == 0
    assert scipy.stats.chisquare(counts[p > 0], n * p[p > 0]).pvalue > 1e-3


def test_low_t_off_is_the_plain_uniform_draw():
    a, b, s = RecordT(), RecordT(), td.NoiseScheduler()
    td.ddpm_loss(a, s, torch.zeros(64, 2), generator=torch.Generator().manual_seed(3), low_t=0, low_frac=0.0)
    td.ddpm_loss(b, s, torch.zeros(64, 2), generator=torch.Generator().manual_seed(3), low_t=2, low_frac=0.0)
    assert torch.equal(a.t, b.t) and torch.equal(a.t, torch.randint(0, 100, (64,), generator=torch.Generator().manual_seed(3)))


class OracleEps(torch.nn.Module):
    """The exact noise prediction for data that are a single point x*: eps = (x_t - sqrt(ab) x*) / sqrt(1-ab)."""

    def __init__(self, s, point):
        super().__init__()
        self.s, self.point = s, torch.tensor(point)

    def forward(self, x, t):
        return (x - self.s.sqrt_alphas_cumprod[t, None] * self.point) / self.s.sqrt_one_minus_alphas_cumprod[t, None]


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddpm", 10), ("ddim", 20), ("ddim", 1), ("dpm++", 20), ("dpm++", 5)])
def test_samplers_recover_a_point_mass_from_the_exact_denoiser(sampler, steps):
    s = td.NoiseScheduler()
    x = td.sample(OracleEps(s, [1.5, -2.0]), s, 500, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0), dim=2)
    torch.testing.assert_close(x, torch.tensor([[1.5, -2.0]]).expand(500, 2), atol=1e-4, rtol=0)


def test_sampling_is_reproducible_and_returns_the_trajectory():
    torch.manual_seed(0)
    model, s = td.Denoiser(td.DenoiserConfig()).eval(), td.NoiseScheduler(20)
    run = lambda seed, **kw: td.sample(model, s, 50, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    traj = run(1, return_trajectory=True)
    assert traj.shape == (21, 50, 2) and torch.equal(traj[-1], run(1))
    assert run(1, sampler="ddim", steps=5, return_trajectory=True).shape == (6, 50, 2)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_sampling_in_chunks_gives_the_samples_of_one_batch(sampler):
    """Reference: the whole batch in one network call. 7 does not divide 50, so the last chunk is short."""
    torch.manual_seed(0)
    model, s = td.Denoiser(td.DenoiserConfig(attn_layers=1, ssm_layers=2)).eval(), td.NoiseScheduler(20)
    run = lambda b: td.sample(model, s, 50, sampler=sampler, steps=5, generator=torch.Generator().manual_seed(1), batch_size=b)
    torch.testing.assert_close(run(7), run(50), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="batch_size 0"):
        run(0)


@pytest.mark.parametrize("D", [2, 3])
def test_prior_has_the_moments_of_the_forward_process_at_T(D):
    """Reference: x_T drawn by add_noise from skewed, correlated data (not Gaussian)."""
    s, g = td.NoiseScheduler(), torch.Generator().manual_seed(0)
    n = 400_000
    u = torch.rand(n, generator=g) ** 3
    data = torch.stack([4 * u - 1, 2 * u + 0.5 * torch.randn(n, generator=g), u.sqrt() - torch.rand(n, generator=g)][:D], 1)
    mean, cov = data.mean(0), torch.cov(data.T, correction=0)
    xT = s.add_noise(data, torch.randn(n, D, generator=g), torch.full((n,), 99))
    draw = s.prior(n, mean, cov, generator=g)
    torch.testing.assert_close(draw.mean(0), xT.mean(0), atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(draw.T), torch.cov(xT.T), atol=0.01, rtol=0)


def test_prior_with_zero_mean_and_identity_cov_is_the_standard_normal():
    s = td.NoiseScheduler()
    for D in (1, 2, 5):
        z = s.prior(1000, generator=torch.Generator().manual_seed(3), dim=D)
        assert torch.equal(z, torch.randn(1000, D, generator=torch.Generator().manual_seed(3)))
        assert torch.equal(s.prior(1000, torch.zeros(D), torch.eye(D), generator=torch.Generator().manual_seed(3)), z)
    with pytest.raises(ValueError, match="or dim"):
        s.prior(10)


class GaussianEps(torch.nn.Module):
    """The exact noise prediction for Gaussian data N(mu, S): E[eps | x_t] = sqrt(1-ab) (ab S + (1-ab) I)^-1 (x_t - sqrt(ab) mu)."""

    def __init__(self, s, mu, S):
        super().__init__()
        self.s, self.mu, self.S = s, mu, S

    def forward(self, x, t):
        ab = self.s.alphas_cumprod[t][:, None, None]
        P = torch.linalg.inv(ab * self.S + (1 - ab) * torch.eye(len(self.mu)))
        return (1 - ab[:, :, 0]).sqrt() * (P @ (x - ab[:, :, 0].sqrt() * self.mu)[..., None])[..., 0]


def test_the_data_prior_removes_the_start_error_that_n01_leaves_at_T100():
    """With the exact denoiser for Gaussian data far from the origin, a run started at the data
    moments ends on the data's mean; one started at N(0, I) (alpha_bar_T = 0.36) does not."""
    s, mu, S = td.NoiseScheduler(), torch.tensor([3.0, -2.0]), torch.tensor([[1.0, 0.6], [0.6, 0.5]])
    model = GaussianEps(s, mu, S)
    run = lambda **kw: td.sample(model, s, 20_000, generator=torch.Generator().manual_seed(0), **kw)
    model.data_mean, model.data_cov = mu, S
    good = run()
    del model.data_mean, model.data_cov  # no moments: the standard N(0, I) start
    bad = run(dim=2)
    assert (good.mean(0) - mu).abs().max() < 0.03
    assert (bad.mean(0) - mu).abs().max() > 0.3


GAUSS_3D = torch.tensor([0.5, 2.0, -1.0]), torch.tensor([[0.4, 0.1, 0.0], [0.1, 0.3, -0.1], [0.0, -0.1, 0.6]])


@pytest.mark.parametrize("sampler,steps,tol,gauss", [("ddpm", None, 0.03, None), ("dpm++", 20, 0.01, None), ("dpm++", 20, 0.01, GAUSS_3D)],
                         ids=["ddpm", "dpm++", "dpm++-3d"])
def test_samplers_recover_gaussian_data_from_the_exact_denoiser(sampler, steps, tol, gauss):
    s, (mu, S) = td.NoiseScheduler(), gauss or (torch.tensor([1.0, -0.5]), torch.tensor([[0.3, 0.2], [0.2, 0.5]]))
    model = GaussianEps(s, mu, S)
    model.data_mean, model.data_cov = mu, S
    x = td.sample(model, s, 100_000, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
    assert (x.mean(0) - mu).abs().max() < tol and (torch.cov(x.T) - S).abs().max() < tol


@pytest.mark.parametrize("missing", [("data_mean", "data_cov", "data_shift", "data_scale"), ("data_shift", "data_scale")],
                         ids=["before-moments", "before-affine-map"])
def test_checkpoints_without_the_data_buffers_load_with_the_standard_start(missing):
    model = td.Denoiser(td.DenoiserConfig())
    old = {k: v for k, v in model.state_dict().items() if k not in missing}
    fresh = td.Denoiser(td.DenoiserConfig())
    for name in ("data_mean", "data_cov", "data_shift", "data_scale"):
        getattr(fresh, name).fill_(5.0)
    td.load_weights(fresh, old)
    assert torch.equal(fresh.data_mean, torch.zeros(2)) and torch.equal(fresh.data_cov, torch.eye(2))
    assert torch.equal(fresh.data_shift, torch.zeros(2)) and torch.equal(fresh.data_scale, torch.ones(2))
    del old["mlp.0.weight"]
    with pytest.raises(RuntimeError, match="mlp.0.weight"):
        td.load_weights(fresh, old)


# ----------------------------------------------------------------------------- any dimension, any scale


@pytest.mark.parametrize("D", [1, 3, 8])
@pytest.mark.parametrize("kw", [dict(), dict(attn_layers=1, ssm_layers=2)], ids=["base", "attn1-ssm2"])
def test_a_d_dimensional_denoiser_has_one_token_per_coordinate(D, kw):
    torch.manual_seed(0)
    E, H = 128, 256
    model = td.Denoiser(td.DenoiserConfig(data_dim=D, **kw))
    linear = lambda i, o: i * o + o
    mlp = sum(p.numel() for p in model.mlp.parameters())
    assert mlp == linear((D + 1) * E, H) + 3 * linear(H, H) + linear(H, D)
    seen = []
    model.mlp.register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    out = model(torch.randn(7, D), torch.randint(0, 100, (7,)))
    assert out.shape == (7, D) and torch.isfinite(out).all() and seen == [(7, (D + 1) * E)]
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("block", ["gelu", "relu"])
def test_the_2d_build_draws_the_same_weights_in_the_same_order_as_before(block):
    """Reference: the layers written out by hand in the order the 2-D build has always created them
    (attention; the residual blocks; then the MLP's input and output layers). Same seed -> the same
    weights, and the RNG left in the same state, so training from here is bit-identical too."""
    torch.manual_seed(0)
    model = td.Denoiser(td.DenoiserConfig(block=block, attn_layers=1))
    after = torch.rand(5)
    torch.manual_seed(0)
    norm, qkv, proj = torch.nn.LayerNorm(128), torch.nn.Linear(128, 384), torch.nn.Linear(128, 128)
    blocks = [torch.nn.Linear(256, 256) for _ in range(3)]
    first, last = torch.nn.Linear(384, 256), torch.nn.Linear(256, 2)
    assert torch.equal(after, torch.rand(5))
    ref = [p for m in (norm, qkv, proj, first, *blocks, last) for p in m.parameters()]
    assert len(ref) == len(list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref))


def test_points_that_do_not_fit_the_model_are_refused_in_library_terms():
    model, s = td.Denoiser(td.DenoiserConfig()), td.NoiseScheduler()
    t = torch.zeros(5, dtype=torch.long)
    for x in (torch.randn(5, 3), torch.randn(5, 1), torch.randn(5)):
        for call in (lambda: model(x, t), lambda: td.ddpm_loss(model, s, x), lambda: model.set_data_stats(x)):
            with pytest.raises(ValueError, match=r"takes 2-D points, \(B, 2\) \(DenoiserConfig.data_dim=2\)") as e:
                call()
            assert "--" not in str(e.value)
    with pytest.raises(ValueError, match="one timestep per point"):
        model(torch.randn(5, 2), torch.zeros(4, dtype=torch.long))
    weights_3d = td.Denoiser(td.DenoiserConfig(data_dim=3)).state_dict()
    with pytest.raises(ValueError, match="weights are for 3-D points but the model is built for 2-D points"):
        td.load_weights(model, weights_3d)
    with pytest.raises(ValueError, match="data_dim 0 must be at least 1"):
        td.Denoiser(td.DenoiserConfig(data_dim=0))


def test_heads_error_names_the_divisors_of_the_width():
    with pytest.raises(ValueError) as e:
        td.SelfAttention(30, 4)
    divisors = [h for h in range(1, 31) if 30 % h == 0]  # 1, 2, 3, 5, 6, 10, 15, 30
    assert str(e.value) == f"heads 4 must divide the token width 30; use one of {', '.join(map(str, divisors))}"


def test_set_data_stats_standardizes_each_coordinate_against_numpy():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(5000, 3)) @ np.array([[2, 0, 0], [1, 0.5, 0], [0, 0.3, 1]]) * [50, 1e-3, 1e4] + [100, -3, 1e6]
    model = td.Denoiser(td.DenoiserConfig(data_dim=3))
    model.set_data_stats(torch.as_tensor(X))
    np.testing.assert_allclose(model.data_shift.numpy(), X.mean(0), rtol=1e-6)
    np.testing.assert_allclose(model.data_scale.numpy(), X.std(0) / td.MODEL_SD, rtol=1e-6)
    np.testing.assert_allclose(model.data_mean.numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(model.data_cov.numpy(), np.corrcoef(X.T) * td.MODEL_SD**2, atol=1e-5)  # the covariance of z
    x = torch.as_tensor(X[:100], dtype=torch.float32)
    torch.testing.assert_close(model.to_data(model.to_model(x)), x)
    # raw coordinates: the identity map, and the moments numpy computes
    raw = X / [100, 1e-3, 1e4]
    model.set_data_stats(torch.as_tensor(raw), standardize=False)
    assert torch.equal(model.data_shift, torch.zeros(3)) and torch.equal(model.data_scale, torch.ones(3))
    np.testing.assert_allclose(model.data_mean.numpy(), raw.mean(0), rtol=1e-6)
    np.testing.assert_allclose(model.data_cov.numpy(), np.cov(raw.T, bias=True), rtol=1e-5, atol=1e-6)
    # moments off: 0 and I (the N(0, I) start); a constant coordinate takes the largest scale of the others
    model.set_data_stats(torch.tensor([[1.0, 5.0, 0.0], [3.0, 5.0, 0.5]]), moments=False)
    assert torch.equal(model.data_mean, torch.zeros(3)) and torch.equal(model.data_cov, torch.eye(3))
    torch.testing.assert_close(model.data_scale, torch.tensor([1.0, 1.0, 0.25]) / td.MODEL_SD)


def test_a_standardized_model_is_the_raw_model_on_standardized_points():
    """Reference: the same weights with the identity map, given the standardized points by hand:
    the same loss (same t and noise), and samples that map back by x = shift + scale * z."""
    torch.manual_seed(0)
    X = torch.randn(512, 3, dtype=torch.float64) * torch.tensor([50.0, 0.01, 3.0]) + torch.tensor([100.0, -7.0, 1e3])
    a = td.Denoiser(td.DenoiserConfig(data_dim=3)).eval()
    a.set_data_stats(X)
    b = copy.deepcopy(a)
    b.data_shift.zero_()
    b.data_scale.fill_(1.0)
    s, g = td.NoiseScheduler(), lambda seed: torch.Generator().manual_seed(seed)
    Z = (X.float() - a.data_shift) / a.data_scale
    assert td.ddpm_loss(a, s, X.float(), g(1)).item() == pytest.approx(td.ddpm_loss(b, s, Z, g(1)).item(), rel=1e-6)
    xa = td.sample(a, s, 300, "dpm++", generator=g(2))
    zb = td.sample(b, s, 300, "dpm++", generator=g(2))
    torch.testing.assert_close(xa, a.data_shift + a.data_scale * zb)
    traj = td.sample(a, s, 300, "dpm++", generator=g(2), return_trajectory=True)
    assert traj.shape == (21, 300, 3) and torch.equal(traj[-1], xa)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's first import warns about torch.jit
def test_sampling_through_averaged_model_and_compile_uses_the_wrapped_statistics():
    """Reference: the wrapped Denoiser itself. Without unwrapping, the EMA wrapper would start at N(0, I)
    in the model's space and return points without the map back to data units."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = td.Denoiser(td.DenoiserConfig(data_dim=3)).eval()
    model.set_data_stats(torch.randn(1000, 3, dtype=torch.float64) * 50 + 100)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99))
    assert td.unwrap(ema) is ema.module and td.unwrap(torch.compile(model)) is model and td.unwrap(model) is model
    s = td.NoiseScheduler()
    run = lambda m: td.sample(m, s, 300, "ddim", steps=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(run(ema), run(model))
    loss = lambda m: td.ddpm_loss(m, s, torch.full((64, 3), 100.0), torch.Generator().manual_seed(1))
    assert torch.equal(loss(ema), loss(model))


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(attn_layers=1, heads=16), dict(ssm_layers=2)])
def test_the_compiled_denoiser_matches_eager_mode(kw):
    """What `train.py --compile` trains: torch.compile's kernels against eager PyTorch, values and gradients."""
    torch.manual_seed(0)
    model = td.Denoiser(td.DenoiserConfig(**kw))
    x, t, g = torch.randn(256, 2), torch.randint(0, 100, (256,)), torch.randn(256, 2)
    outs = [f(x, t) for f in (model, torch.compile(model))]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad(y, list(model.parameters()), g) for y in outs]
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_tinydiff_imports_only_torch_and_the_standard_library():
    tree = ast.parse(open(os.path.join(ROOT, "tinydiff.py")).read())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mods.add(node.module.split(".")[0])
    assert mods and all(m == "torch" or m in sys.stdlib_module_names for m in mods), mods
