"""NoiseScheduler against the forward Markov chain, Bayes' rule and the schedules' closed forms."""

import math

import numpy as np
import pytest
import torch

import tinydiff as td

pytestmark = pytest.mark.unit


def moments_close(x, mean, var, n_sigma=5):
    """Empirical mean/variance of x (N,) within n_sigma standard errors of the given values."""
    n = x.numel()
    assert abs(x.mean().item() - mean) < n_sigma * math.sqrt(var / n)
    assert abs(x.var().item() - var) < n_sigma * var * math.sqrt(2 / (n - 1))


def betas64(schedule, T=100):
    """The schedules' definitions in plain Python floats."""
    if schedule == "linear":
        return [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    if schedule == "quadratic":
        return [(1e-2 + (0.02**0.5 - 1e-2) * i / (T - 1)) ** 2 for i in range(T)]
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    return [min(1 - f(t + 1) / f(t), 0.999) for t in range(T)]


def bayes_posterior(t, schedule="linear", T=100):
    """q(x_{t-1} | x_t, x_0) by multiplying the two Gaussians, in float64: (coef on x0, coef on xt, var)."""
    betas = betas64(schedule, T)
    ab_prev, beta = math.prod(1 - b for b in betas[:t]), betas[t]
    if t == 0:
        return 1.0, 0.0, 0.0
    prec = 1 / (1 - ab_prev) + (1 - beta) / beta
    return math.sqrt(ab_prev) / (1 - ab_prev) / prec, math.sqrt(1 - beta) / beta / prec, 1 / prec


@pytest.mark.parametrize("schedule", ["linear", "quadratic", "cosine"])
def test_schedules_match_their_definitions(schedule):
    s = td.NoiseScheduler(50, beta_schedule=schedule)
    prod = 1.0
    for t, beta in enumerate(betas64(schedule, 50)):
        prod *= 1 - beta
        assert s.betas[t].item() == pytest.approx(beta, rel=1e-6)
        assert s.alphas_cumprod[t].item() == pytest.approx(prod, rel=1e-5)
        assert s.log_snr[t].item() == pytest.approx(0.5 * math.log(prod / (1 - prod)), rel=1e-5, abs=1e-5)
    assert s.alpha_bar_T == pytest.approx(prod, rel=1e-5)
    assert (s.betas > 0).all() and (s.betas <= 0.999).all()


def test_linear_schedule_at_T100_ends_far_from_pure_noise():
    s = td.NoiseScheduler()  # the study's: T=100, betas 1e-4 .. 0.02
    assert s.alpha_bar_T == pytest.approx(math.prod(1 - b for b in betas64("linear")), rel=1e-6)
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
    moments_close(direct.double().flatten(), x.mean().item(), x.var().item(), n_sigma=6)


def test_predict_x0_inverts_add_noise():
    s, g = td.NoiseScheduler(), torch.Generator().manual_seed(0)
    x0, eps = torch.randn(50, 3, generator=g) * 4, torch.randn(50, 3, generator=g)
    for t in (0, 30, 99):
        xt = s.add_noise(x0, eps, torch.full((50,), t))
        torch.testing.assert_close(s.predict_x0(eps, t, xt), x0, atol=1e-5, rtol=1e-5)  # no clipping to [-1, 1]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_coefficients_match_bayes_rule(schedule):
    s = td.NoiseScheduler(100, beta_schedule=schedule)
    for t in (0, 1, 5, 50, 99):
        c0, ct, var = bayes_posterior(t, schedule)
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
    c0, ct, var = bayes_posterior(t)
    moments_close(out.double().flatten(), c0 * x0 + ct * xt, var)


def test_step_at_t0_returns_the_predicted_x0():
    s = td.NoiseScheduler()
    x0, eps = torch.randn(10, 2), torch.randn(10, 2)
    xt = s.add_noise(x0, eps, torch.zeros(10, dtype=torch.long))
    torch.testing.assert_close(s.step(eps, 0, xt), x0, atol=1e-5, rtol=1e-5)


def test_ddim_eta0_is_the_deterministic_update_of_eq_12():
    s = td.NoiseScheduler()
    eps, xt = torch.randn(100, 2), torch.randn(100, 2)
    a = s.ddim_step(eps, 60, 40, xt, eta=0.0, generator=torch.Generator().manual_seed(1))
    b = s.ddim_step(eps, 60, 40, xt, eta=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    ab_t, ab_s = s.alphas_cumprod[60].double(), s.alphas_cumprod[40].double()
    x0 = (xt.double() - (1 - ab_t).sqrt() * eps.double()) / ab_t.sqrt()
    torch.testing.assert_close(a.double(), ab_s.sqrt() * x0 + (1 - ab_s).sqrt() * eps.double(), atol=1e-5, rtol=1e-5)
    # t_prev = -1: the clean sample, alpha_bar = 1
    torch.testing.assert_close(s.ddim_step(eps, 60, -1, xt), s.predict_x0(eps, 60, xt))


@pytest.mark.parametrize("t", [1, 10, 99])
def test_ddim_eta1_over_all_steps_is_the_ddpm_posterior(t):
    s = td.NoiseScheduler()
    n = 200_000
    eps, xt = torch.full((n, 1), 0.4), torch.full((n, 1), 1.1)
    out = s.ddim_step(eps, t, t - 1, xt, eta=1.0, generator=torch.Generator().manual_seed(3))
    x0 = (1.1 - s.sqrt_one_minus_alphas_cumprod[t].item() * 0.4) / s.sqrt_alphas_cumprod[t].item()
    c0, ct, var = bayes_posterior(t)
    moments_close(out.double().flatten(), c0 * x0 + ct * 1.1, var)


def test_set_timesteps_is_strided_unique_and_ends_at_0():
    s = td.NoiseScheduler(100)
    for k in (1, 2, 7, 20, 99, 100):
        ts = s.set_timesteps(k)
        ref = [round(99 - 99 * i / (k - 1)) for i in range(k)] if k > 1 else [99]
        assert ts == ref and len(set(ts)) == k
    for k in (0, 101):
        with pytest.raises(ValueError, match=r"steps must be in 1\.\.100"):
            s.set_timesteps(k)


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
    """Reference: q(x_s | x_t, x_0) in closed form (the posterior of the forward process from s to t), same noise."""
    s = td.NoiseScheduler()
    eps, xt = torch.randn(1000, 2), torch.randn(1000, 2)
    x0 = s.predict_x0(eps, t, xt)
    out = s.dpm_solver_step(x0, t, s_, xt, generator=torch.Generator().manual_seed(5))
    z = torch.randn(1000, 2, generator=torch.Generator().manual_seed(5)).double()
    ab_t, ab_s = s.alphas_cumprod[t].double(), s.alphas_cumprod[s_].double()
    a_ts = ab_t / ab_s  # q(x_t | x_s) = N(sqrt(a_ts) x_s, (1 - a_ts) I)
    var = (1 - ab_s) * (1 - a_ts) / (1 - ab_t)
    mean = ab_s.sqrt() * (1 - a_ts) / (1 - ab_t) * x0.double() + a_ts.sqrt() * (1 - ab_s) / (1 - ab_t) * xt.double()
    torch.testing.assert_close(out.double(), mean + var.sqrt() * z, atol=2e-5, rtol=1e-5)
    if s_ == t - 1:
        torch.testing.assert_close(
            out, s.step(eps, t, xt, generator=torch.Generator().manual_seed(5)), atol=2e-5, rtol=1e-5
        )


def test_second_order_dpm_solver_step_extrapolates_x0_in_log_snr():
    """The 2M step equals the first-order step with x0 replaced by (1 + 1/2r) x0 - 1/2r x0_last, r = h_last / h."""
    s = td.NoiseScheduler()
    lam = lambda t: 0.5 * math.log(s.alphas_cumprod[t].item() / (1 - s.alphas_cumprod[t].item()))
    x0, x0_last, xt = torch.randn(50, 2), torch.randn(50, 2), torch.randn(50, 2)
    r = (lam(60) - lam(80)) / (lam(40) - lam(60))
    D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_last
    out = s.dpm_solver_step(x0, 60, 40, xt, x0_last, 80, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(
        out, s.dpm_solver_step(D, 60, 40, xt, generator=torch.Generator().manual_seed(6)), atol=1e-5, rtol=1e-5
    )


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="linear, quadratic, cosine, logsnr"):
        td.NoiseScheduler(beta_schedule="sigmoid")


def test_scheduler_buffers_move_with_to_and_are_not_saved():
    s = td.NoiseScheduler().to(torch.float64)
    assert s.alphas_cumprod.dtype == torch.float64
    assert len(s.state_dict()) == 0  # derived from the arguments


@pytest.mark.parametrize("D", [2, 3])
def test_prior_has_the_moments_of_the_forward_process_at_T(D):
    """Reference: x_T drawn by add_noise from skewed, correlated data (not Gaussian)."""
    s, g = td.NoiseScheduler(), torch.Generator().manual_seed(0)
    n = 400_000
    u = torch.rand(n, generator=g) ** 3
    data = torch.stack(
        [4 * u - 1, 2 * u + 0.5 * torch.randn(n, generator=g), u.sqrt() - torch.rand(n, generator=g)][:D], 1
    )
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
        torch.testing.assert_close(
            s.prior(1000, torch.zeros(D), torch.eye(D), generator=torch.Generator().manual_seed(3)), z
        )
    with pytest.raises(ValueError, match="or dim"):
        s.prior(10)


@pytest.mark.parametrize("kind", td.PREDICTION_TYPES)
def test_get_target_and_predict_are_the_published_formulas_and_invert_each_other(kind):
    """Reference: numpy's float64 alpha_bar from the betas; v = sqrt(ab) eps - sqrt(1 - ab) x0 (diffusers'
    get_velocity); and predict() of the exact target returns the (x0, eps) that made x_t."""
    s = td.NoiseScheduler(beta_schedule="cosine", prediction_type=kind)
    ab = np.cumprod(1 - s.betas.double().numpy())
    g = torch.Generator().manual_seed(0)
    x0, eps, t = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g), torch.arange(0, 96, 1.5).long()
    a, sg = torch.tensor(np.sqrt(ab[t]), dtype=torch.float32)[:, None], torch.tensor(np.sqrt(1 - ab[t]))[:, None]
    want = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - sg.float() * x0}[kind]
    torch.testing.assert_close(s.get_target(x0, eps, t), want, atol=1e-6, rtol=1e-5)
    x_t = s.add_noise(x0, eps, t)
    for i in (0, 30, 63):
        x0_hat, eps_hat = s.predict(s.get_target(x0, eps, t)[i], int(t[i]), x_t[i])
        torch.testing.assert_close(x0_hat, x0[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(eps_hat, eps[i], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown prediction_type 'score'"):
        td.NoiseScheduler(prediction_type="score")
