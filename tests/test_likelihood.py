"""The probability-flow ODE likelihood against closed forms: Gaussian data, whose optimal noise predictor is
linear, have an exact NLL; the flow is invertible; Hutchinson's divergence is unbiased; a trained model's NLL
is bounded below by the data's entropy."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import stats

import datasets
import likelihood
import tinydiff


def alpha_bar(scheduler, t):
    """ab at fractional t: log sigma_bar = 0.5 log((1 - ab) / ab) linear between integer timesteps."""
    ab = scheduler.alphas_cumprod.double().numpy()
    s = np.interp(t, np.arange(len(ab)), 0.5 * np.log((1 - ab) / ab))
    return 1 / (1 + np.exp(2 * s))


class GaussianEps(nn.Module):
    """The optimal noise predictor for z ~ N(mu, Sigma), in closed form:
    eps*(x_t, t) = sqrt(1 - ab_t) (ab_t Sigma + (1 - ab_t) I)^-1 (x_t - sqrt(ab_t) mu)."""

    def __init__(self, scheduler, mu, Sigma, shift=None, scale=None, map_as="data_map"):
        super().__init__()
        self.scheduler = scheduler
        self.register_buffer("data_mean", torch.tensor(mu, dtype=torch.float64))
        self.register_buffer("data_cov", torch.tensor(Sigma, dtype=torch.float64))
        if shift is not None and map_as == "data_map":
            self.data_map = nn.Module()
            self.data_map.register_buffer("shift", torch.tensor(shift))
            self.data_map.register_buffer("scale", torch.tensor(scale))
        elif shift is not None:
            self.register_buffer("data_shift", torch.tensor(shift))
            self.register_buffer("data_scale", torch.tensor(scale))

    def forward(self, z, t):
        ab = torch.as_tensor(alpha_bar(self.scheduler, t.double().numpy()))[:, None]  # (B, 1)
        D = z.shape[1]
        M = ab[:, :, None] * self.data_cov + (1 - ab[:, :, None]) * torch.eye(D, dtype=torch.float64)  # (B, D, D)
        r = z.double() - ab.sqrt() * self.data_mean
        return ((1 - ab).sqrt() * torch.linalg.solve(M, r[:, :, None])[:, :, 0]).to(z.dtype)


MU, SIGMA = np.array([0.7, -0.4]), np.array([[1.3, 0.6], [0.6, 0.5]])  # anisotropic, correlated
SHIFT, SCALE = np.array([3.0, -1.0]), np.array([2.5, 0.3])  # x = shift + scale z


@pytest.mark.parametrize("map_as", ["data_map", "data_shift"])
def test_gaussian_nll_is_the_exact_one(map_as):
    scheduler = tinydiff.NoiseScheduler(100)
    model = GaussianEps(scheduler, MU, SIGMA, SHIFT, SCALE, map_as)
    rng = np.random.default_rng(0)
    z = rng.multivariate_normal(MU, SIGMA, 200)
    x = SHIFT + SCALE * z
    got = likelihood.nll(model, scheduler, x, batch_size=100)
    # the ODE's density is the data's smoothed by the first timestep's noise, sigma_bar_0^2 ~ 1e-4
    ab0 = scheduler.alphas_cumprod[0].double().item()
    smoothed = -stats.multivariate_normal(MU, SIGMA + (1 - ab0) / ab0 * np.eye(2)).logpdf(z) + np.log(SCALE).sum()
    exact = -stats.multivariate_normal(SHIFT + SCALE * MU, SIGMA * np.outer(SCALE, SCALE)).logpdf(x)
    assert np.abs(got - smoothed).max() < 1e-3
    assert np.abs(got - exact).max() / math.log(2) < 0.01
    # the map's log-determinant, sum log scale = -0.29 nats: the same points in model space, without the map
    unmapped = likelihood.nll(GaussianEps(scheduler, MU, SIGMA), scheduler, z, batch_size=100)
    assert np.abs(got - unmapped - np.log(SCALE).sum()).max() < 1e-4 and abs(np.log(SCALE).sum()) > 0.1


class ClassGaussianEps(nn.Module):
    """Class-conditional: z | y ~ N(mus[y], Sigma), eps*(x_t, t, y) as GaussianEps's with mean mus[y]. Its
    prior, like a conditional Denoiser's, is one Gaussian for all classes: the mixture's mean and covariance."""

    def __init__(self, scheduler, mus, Sigma):
        super().__init__()
        self.classes = nn.ModuleList(GaussianEps(scheduler, mu, Sigma) for mu in mus)
        self.register_buffer("data_mean", torch.tensor(mus.mean(0)))
        self.register_buffer("data_cov", torch.tensor(Sigma + np.cov(mus.T, bias=True)))

    def forward(self, z, t, y):
        eps = torch.stack([g(z, t) for g in self.classes], 1)  # (B, classes, D)
        return eps[torch.arange(len(z)), torch.as_tensor(y)]


class GaussianOutput(GaussianEps):
    """GaussianEps's optimal prediction, as the scheduler's prediction_type asks: eps*, v* = alpha eps* - sigma
    x0*, or x0* = (x_t - sigma eps*) / alpha; no data moments, so the ODE starts from N(0, I)."""

    def __init__(self, scheduler, mu, Sigma):
        super().__init__(scheduler, mu, Sigma)
        del self.data_mean, self.data_cov
        self.mu, self.Sigma = torch.tensor(mu), torch.tensor(Sigma)

    def forward(self, z, t):
        self.data_mean, self.data_cov = self.mu, self.Sigma
        eps = super().forward(z, t).double()
        del self.data_mean, self.data_cov
        ab = torch.as_tensor(alpha_bar(self.scheduler, t.double().numpy()))[:, None]
        alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
        x0 = (z.double() - sigma * eps) / alpha
        kind = self.scheduler.prediction_type
        return {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}[kind].to(z.dtype)


@pytest.mark.parametrize("kind", tinydiff.PREDICTION_TYPES)
def test_a_schedule_that_reaches_noise_gives_the_exact_nll_from_n01(kind):
    """logsnr ends at alpha_bar_T = 1e-4, so N(0, I) is q(x_T) to 1e-4: the ODE's density is the data's smoothed
    by sigma_bar_0, whatever the network predicts. Reference: scipy's Gaussian log density."""
    scheduler = tinydiff.NoiseScheduler(100, beta_schedule="logsnr", prediction_type=kind)
    z = np.random.default_rng(1).multivariate_normal(MU, SIGMA, 100)
    got = likelihood.nll(GaussianOutput(scheduler, MU, SIGMA), scheduler, z, batch_size=100)
    ab0 = scheduler.alphas_cumprod[0].double().item()
    smoothed = -stats.multivariate_normal(MU, SIGMA + (1 - ab0) / ab0 * np.eye(2)).logpdf(z)
    # N(0, I) is q(x_T) up to the mean sqrt(ab_T) mu = 0.007 and a covariance 1e-4 off: measured, 0.025 nats on the
    # worst of these points and 0.0009 on average; a start from the linear schedule's alpha_bar_T = 0.36 is 1.9 off
    assert np.abs(got - smoothed).max() < 0.05 and abs(np.mean(got - smoothed)) < 3e-3


def test_class_conditional_nll_is_the_prior_pushed_through_the_class_flow():
    scheduler = tinydiff.NoiseScheduler(100)
    mus = np.array([[2.0, 0.0], [-1.0, 1.5]])
    y = np.arange(60) % 2
    z = mus[y] + np.random.default_rng(4).multivariate_normal([0, 0], SIGMA, 60)
    model = ClassGaussianEps(scheduler, mus, SIGMA)
    got = likelihood.nll(model, scheduler, z, y=y, batch_size=25)
    # class k's flow is linear in x_bar: x_bar(sb) - mu_k = (Sigma + sb^2 I)^1/2 (Sigma + sb_T^2 I)^-1/2 (x_bar_T -
    # mu_k),
    # and the prior in x_bar is N(data_mean, data_cov + sb_T^2 I), so the density at sb_0 is a Gaussian too
    ab = scheduler.alphas_cumprod.double().numpy()
    sb2_0, sb2_T = (1 - ab[0]) / ab[0], (1 - ab[-1]) / ab[-1]
    lam, V = np.linalg.eigh(SIGMA)
    A = V @ np.diag(np.sqrt((lam + sb2_0) / (lam + sb2_T))) @ V.T
    m, C = model.data_mean.numpy(), model.data_cov.numpy() + sb2_T * np.eye(2)
    exact = -np.array(
        [stats.multivariate_normal(mus[k] + A @ (m - mus[k]), A @ C @ A.T).logpdf(p) for p, k in zip(z, y)]
    )
    assert np.abs(got - exact).max() < 1e-3
    assert np.abs(got - likelihood.nll(model, scheduler, z, y=1 - y)).min() > 0.1  # the label reaches the model


def test_flow_to_T_and_back_returns_the_point():
    scheduler = tinydiff.NoiseScheduler(100)
    model = GaussianEps(scheduler, MU, SIGMA, SHIFT, SCALE)
    x = SHIFT + SCALE * np.random.default_rng(1).multivariate_normal(MU, SIGMA, 50)
    x_T = likelihood.flow(model, scheduler, x)
    assert np.abs(x_T - x).min() > 1e-2  # it moved
    assert np.abs(likelihood.flow(model, scheduler, x_T, reverse=True) - x).max() < 1e-4
    torch.manual_seed(0)
    net = tinydiff.Denoiser(tinydiff.DenoiserConfig(hidden=32, hidden_layers=1, emb_dim=16, coord_scale=1.0))
    x = np.random.default_rng(2).normal(size=(20, 2))
    # an untrained network's eps wiggles in t, and RK45's global error is many times its local tolerance
    there = likelihood.flow(net, scheduler, x, rtol=1e-7, atol=1e-7)
    assert np.abs(likelihood.flow(net, scheduler, there, reverse=True, rtol=1e-7, atol=1e-7) - x).max() < 1e-4


def test_hutchinson_divergence_is_unbiased_in_3d():
    scheduler = tinydiff.NoiseScheduler(50)
    mu, Sigma = np.array([0.2, -0.1, 0.5]), np.array([[1.0, 0.5, -0.2], [0.5, 0.8, 0.1], [-0.2, 0.1, 0.4]])
    model = GaussianEps(scheduler, mu, Sigma)
    z = np.random.default_rng(3).multivariate_normal(mu, Sigma, 400)
    exact = likelihood.nll(model, scheduler, z, exact_div=True, batch_size=400)
    assert (
        np.abs(exact + stats.multivariate_normal(mu, Sigma).logpdf(z)).max() < 0.01
    )  # 3.3e-3: sigma_bar_0's smoothing
    hutch = likelihood.nll(model, scheduler, z, exact_div=False, probes=4, batch_size=400, seed=1)
    d = hutch - exact  # independent across points: each row has its own probe vectors
    assert d.std() > 1e-3  # the estimator is noisy (Sigma is not diagonal) ...
    assert abs(d.mean()) < 4 * d.std() / math.sqrt(len(d))  # ... and unbiased
    many = likelihood.nll(model, scheduler, z[:50], exact_div=False, probes=64, batch_size=50, seed=2)
    assert (many - exact[:50]).std() < d.std() / 2  # more probes, less noise


@pytest.mark.slow
def test_a_trained_model_nll_is_above_the_data_entropy():
    torch.manual_seed(0)
    scheduler = tinydiff.NoiseScheduler(100)
    model = tinydiff.Denoiser(tinydiff.DenoiserConfig(hidden=64, hidden_layers=2, emb_dim=32, coord_scale=25.0))
    X = torch.as_tensor(datasets.load_dataset("ring8", n=50_000), dtype=torch.float32)
    # raw coordinates, but the prior's moments: at T = 100, x_T keeps sqrt(0.36) of the signal, and a
    # N(0, I) prior would cost about a bit more than the model's error
    model.set_data_stats(X, standardize=False)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = 4000
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x0 = X[torch.randint(0, len(X), (256,))]
        t = torch.randint(0, scheduler.num_train_timesteps, (256,))
        noise = torch.randn_like(x0)
        loss = nn.functional.mse_loss(model(scheduler.add_noise(x0, noise, t), t.float()), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    x = datasets.load_dataset("ring8", n=500, seed=11)
    result = likelihood.summarize(likelihood.nll(model, scheduler, x), 2)
    H, se_H = datasets.entropy_bits("ring8")
    se = math.hypot(result["nll_bits_se"], se_H)
    assert H - 3 * se <= result["nll_bits"] <= H + 1, (result, H)


def test_a_stiff_flow_stops_at_its_budget_naming_the_points_and_progress_is_reported():
    """Reference: the solver's own count of right-hand-side calls. A flow that needs more network evaluations than
    max_evals stops with one sentence; progress reaches every point."""
    scheduler = tinydiff.NoiseScheduler(100)
    model = GaussianEps(scheduler, MU, SIGMA)
    z = np.random.default_rng(2).multivariate_normal(MU, SIGMA, 30)
    seen = []
    likelihood.nll(model, scheduler, z, batch_size=20, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1][1] == 30 and max(d for d, _ in seen) == pytest.approx(30, abs=1e-6) and min(d for d, _ in seen) == 0
    with pytest.raises(likelihood.StiffFlow, match=r"more than 10 network evaluations for points 0..19"):
        likelihood.nll(model, scheduler, z, batch_size=20, max_evals=10)
