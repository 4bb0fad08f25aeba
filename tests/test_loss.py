"""ddpm_loss against L_simple computed by hand, its draws against their distributions, and sample_timesteps."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

import tinydiff as td

pytestmark = pytest.mark.unit


class Record(torch.nn.Module):
    """A stand-in denoiser that predicts 0.5 x_t and keeps what it was given."""

    def forward(self, x, t):
        self.x, self.t = x, t
        return 0.5 * x


def test_ddpm_loss_with_t_and_noise_given_is_the_noise_mse_by_hand():
    torch.manual_seed(0)
    model, s = td.Denoiser(td.DenoiserConfig(attn_layers=1)), td.NoiseScheduler()
    X = torch.randn(64, 2, dtype=torch.float64) * torch.tensor([3.0, 0.1]) + torch.tensor([10.0, -4.0])
    model.set_data_stats(X)
    g = torch.Generator().manual_seed(5)
    t, noise = torch.randint(0, 100, (64,), generator=g), torch.randn(64, 2, generator=g)
    loss = td.ddpm_loss(model, s, X, t, noise)
    z = ((X - X.mean(0)) / (X.std(0, correction=0) / td.MODEL_SD)).float()  # the model's space, by hand
    ab = torch.tensor(
        [math.prod(1 - b for b in (1e-4 + (0.02 - 1e-4) * i / 99 for i in range(k + 1))) for k in t.tolist()]
    )[:, None]
    xt = ab.sqrt() * z + (1 - ab).sqrt() * noise
    assert loss.item() == pytest.approx(((model(xt, t) - noise) ** 2).mean().item(), rel=1e-5)


def test_ddpm_loss_refuses_a_denoiser_without_data_stats():
    model, s = td.Denoiser(td.DenoiserConfig()), td.NoiseScheduler()
    with pytest.raises(ValueError, match=r"call model.set_data_stats\(x_train\) before training"):
        td.ddpm_loss(model, s, torch.randn(8, 2))


def test_integer_points_are_mapped_in_float64_like_the_same_points_as_floats():
    """Reference: the same points as float64. A map computed in the input's dtype would truncate the scale (13.8 -> 13),
    or divide by a scale below 1 rounded to 0."""
    s, g = td.NoiseScheduler(), torch.Generator().manual_seed(3)
    t, noise = torch.randint(0, 100, (200,), generator=g), torch.randn(200, 2, generator=g)
    for spread in (30.0, 0.3):
        model = td.Denoiser(td.DenoiserConfig())
        X = (torch.randn(200, 2, generator=g, dtype=torch.float64) * spread).round()
        model.set_data_stats(torch.randn(1000, 2, generator=g, dtype=torch.float64) * spread)
        assert td.ddpm_loss(model, s, X.long(), t, noise).item() == td.ddpm_loss(model, s, X, t, noise).item()


def test_the_data_statistics_refuse_what_would_poison_them():
    plain, labelled = td.Denoiser(td.DenoiserConfig()), td.Denoiser(td.DenoiserConfig(num_classes=3))
    bad = torch.randn(50, 2)
    bad[7, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        plain.set_data_stats(bad)
    with pytest.raises(ValueError, match=r"give the training points' conditions too, set_data_stats\(x, y\)"):
        labelled.set_data_stats(torch.randn(50, 2))  # else every class would get the data's moments and equal shares
    plain.set_data_stats(torch.randn(50, 2))
    with pytest.raises(ValueError, match=r"p_uncond 1.5 must be a probability in \[0, 1\]"):
        td.ddpm_loss(plain, td.NoiseScheduler(), torch.randn(8, 2), p_uncond=1.5)


def test_the_drawn_t_is_uniform_and_the_drawn_noise_standard_normal():
    """With x0 = 0, x_t = sqrt(1 - ab_t) noise: the noise is read back from what the model saw. t by a chi-square test
    against U{0..T-1}; the noise by its moments and its independence of t; the loss by the formula on these draws."""
    model, s, n, T = Record(), td.NoiseScheduler(), 200_000, 100
    loss = td.ddpm_loss(model, s, torch.zeros(n, 2), generator=torch.Generator().manual_seed(0))
    t = model.t
    noise = model.x.double() / s.sqrt_one_minus_alphas_cumprod[t, None].double()
    assert scipy.stats.chisquare(np.bincount(t.numpy(), minlength=T)).pvalue > 1e-3
    se = 1 / math.sqrt(n)
    assert noise.mean(0).abs().max() < 5 * se and (noise.var(0) - 1).abs().max() < 5 * math.sqrt(2) * se
    assert (
        abs(torch.corrcoef(noise.T)[0, 1]) < 5 * se
        and abs(torch.corrcoef(torch.stack([noise[:, 0], t.double()]))[0, 1]) < 5 * se
    )
    assert scipy.stats.kstest(noise[:, 0].numpy(), "norm").pvalue > 1e-3
    assert loss.item() == pytest.approx(((0.5 * model.x.double() - noise) ** 2).mean().item(), rel=1e-5)


class OracleEps(torch.nn.Module):
    """The exact noise prediction for data that are a single point x*: eps = (x_t - sqrt(ab) x*) / sqrt(1-ab)."""

    def __init__(self, s, point):
        super().__init__()
        self.s, self.point = s, torch.tensor(point)

    def forward(self, x, t):
        return (x - self.s.sqrt_alphas_cumprod[t, None] * self.point) / self.s.sqrt_one_minus_alphas_cumprod[t, None]


def test_the_loss_regresses_the_noise():
    """For a point mass the exact noise predictor has zero loss (a loss on x0 would not); for 1-D Gaussian data
    N(m, v) the optimal E[eps | x_t] has the closed-form loss mean_t ab_t v / (ab_t v + 1 - ab_t)."""
    s, g = td.NoiseScheduler(), torch.Generator().manual_seed(0)
    point = [1.5, -2.0]
    assert td.ddpm_loss(OracleEps(s, point), s, torch.tensor([point]).expand(4096, 2), generator=g).item() < 1e-9
    m, v, n = 2.0, 0.3, 400_000
    ab = s.alphas_cumprod.double()

    def gaussian_eps(x, t):
        a = s.alphas_cumprod[t, None]
        return (1 - a).sqrt() * (x - a.sqrt() * m) / (a * v + 1 - a)

    x0 = m + math.sqrt(v) * torch.randn(n, 1, generator=g)
    t = torch.randint(0, 100, (n,), generator=g)
    loss = td.ddpm_loss(gaussian_eps, s, x0, t, torch.randn(n, 1, generator=g)).item()
    per_t = ab * v / (ab * v + 1 - ab)
    assert loss == pytest.approx(per_t[t].mean().item(), abs=4 * per_t.max().item() * math.sqrt(2 / n))
    assert abs(per_t.mean().item() - per_t[t].mean().item()) < 0.01


def test_the_loss_through_averaged_model_is_the_models():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = td.Denoiser(td.DenoiserConfig(data_dim=3))
    X = torch.randn(64, 3, dtype=torch.float64) * 50 + 100
    model.set_data_stats(X)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99))
    s, t, noise = td.NoiseScheduler(), torch.randint(0, 100, (64,)), torch.randn(64, 3)
    assert torch.equal(td.ddpm_loss(ema, s, X, t, noise), td.ddpm_loss(model, s, X, t, noise))


def test_the_loss_has_gradients_for_every_parameter():
    torch.manual_seed(0)
    model, s = td.Denoiser(td.DenoiserConfig(attn_layers=1, ssm_layers=2)), td.NoiseScheduler()
    model.set_data_stats(torch.randn(100, 2))
    td.ddpm_loss(model, s, torch.randn(32, 2)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("low_t,low_frac", [(2, 0.5), (10, 0.25), (1, 0.9), (2, 0.0)])
def test_sample_timesteps_draws_the_stated_mixture(low_t, low_frac):
    """p(t) = low_frac / low_t [t < low_t] + (1 - low_frac) / T, by a chi-square test against the closed form."""
    n, T = 200_000, 100
    t = td.sample_timesteps(n, T, low_t, low_frac, generator=torch.Generator().manual_seed(0))
    assert t.shape == (n,) and t.dtype == torch.long
    counts = np.bincount(t.numpy(), minlength=T)
    p = (1 - low_frac) / T + low_frac / low_t * (np.arange(T) < low_t)
    assert len(counts) == T and counts.sum() == n
    assert scipy.stats.chisquare(counts, n * p).pvalue > 1e-3


@pytest.mark.parametrize("kind", td.PREDICTION_TYPES)
def test_the_epsilon_weighting_is_the_mse_of_the_implied_noise(kind):
    """Reference, in closed form: eps_hat - eps = alpha (v_hat - v) for v, -(alpha / sigma)(x0_hat - x0) for x_0, so the
    epsilon weighting is the target MSE weighted per row by alpha^2, (alpha / sigma)^2, or 1."""
    torch.manual_seed(0)
    s = td.NoiseScheduler(beta_schedule="logsnr", prediction_type=kind)
    model = td.Denoiser(td.DenoiserConfig()).eval()
    x0 = torch.randn(64, 2)
    model.set_data_stats(x0, standardize=False, moments=False)
    t, noise = torch.arange(0, 64) + 18, torch.randn(64, 2)
    out = model(s.add_noise(x0, noise, t), t)
    alpha, sigma = s.sqrt_alphas_cumprod[t, None], s.sqrt_one_minus_alphas_cumprod[t, None]
    w = {"epsilon": torch.ones_like(alpha), "v_prediction": alpha**2, "sample": (alpha / sigma) ** 2}[kind]
    want = (w * (out - s.get_target(x0, noise, t)) ** 2).mean()
    got = td.ddpm_loss(model, s, x0, t, noise, weighting="epsilon")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    if kind == "epsilon":
        torch.testing.assert_close(td.ddpm_loss(model, s, x0, t, noise), got)
    with pytest.raises(ValueError, match="unknown weighting 'elbo'"):
        td.ddpm_loss(model, s, x0, t, noise, weighting="elbo")
