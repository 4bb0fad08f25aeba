"""The samplers against exact denoisers (a point mass, Gaussian data), and against themselves run in one batch."""

import pytest
import torch

import tinydiff as td

pytestmark = pytest.mark.unit


class OracleEps(torch.nn.Module):
    """The exact noise prediction for data that are a single point x*: eps = (x_t - sqrt(ab) x*) / sqrt(1-ab)."""

    def __init__(self, s, point):
        super().__init__()
        self.s, self.point, self.calls = s, torch.tensor(point), 0

    def forward(self, x, t):
        self.calls += 1
        return (x - self.s.sqrt_alphas_cumprod[t, None] * self.point) / self.s.sqrt_one_minus_alphas_cumprod[t, None]


class GaussianEps(torch.nn.Module):
    """The exact noise prediction for Gaussian data N(mu, S): E[eps | x_t] = sqrt(1-ab) (ab S + (1-ab) I)^-1 (x_t -
    sqrt(ab) mu)."""

    def __init__(self, s, mu, S):
        super().__init__()
        self.s, self.mu, self.S = s, mu, S

    def forward(self, x, t):
        ab = self.s.alphas_cumprod[t[0]]  # one timestep per call
        P = torch.linalg.inv(ab * self.S + (1 - ab) * torch.eye(len(self.mu)))
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.mu) @ P.T


@pytest.mark.parametrize(
    "sampler,steps", [("ddpm", None), ("ddpm", 10), ("ddim", 20), ("ddim", 1), ("dpm++", 20), ("dpm++", 5)]
)
def test_samplers_recover_a_point_mass_from_the_exact_denoiser(sampler, steps):
    s = td.NoiseScheduler()
    model = OracleEps(s, [1.5, -2.0])
    x = td.sample(model, s, 500, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0), dim=2)
    torch.testing.assert_close(x, torch.tensor([[1.5, -2.0]], dtype=x.dtype).expand(500, 2), atol=1e-4, rtol=0)
    assert model.calls == (steps or {"dpm++": 20}.get(sampler, 100))  # one network evaluation per step


def test_sampling_is_reproducible_and_returns_the_trajectory():
    torch.manual_seed(0)
    model, s = td.Denoiser(td.DenoiserConfig()).eval(), td.NoiseScheduler(20)
    model.set_data_stats(torch.randn(100, 2))
    run = lambda seed, **kw: td.sample(model, s, 50, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    traj = run(1, return_trajectory=True)
    assert traj.shape == (21, 50, 2) and torch.equal(traj[-1], run(1)) and traj.dtype == torch.float64
    seen = []
    assert run(1, sampler="ddim", steps=5, return_trajectory=True, callback=lambda i, n: seen.append((i, n))).shape == (
        6,
        50,
        2,
    )
    assert seen == [(i, 5) for i in range(5)]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_sampling_in_chunks_gives_the_samples_of_one_batch(sampler):
    """Reference: the whole batch in one network call. 7 does not divide 50, so the last chunk is short."""
    torch.manual_seed(0)
    model, s = td.Denoiser(td.DenoiserConfig(attn_layers=1, ssm_layers=2)).eval(), td.NoiseScheduler(20)
    model.set_data_stats(torch.randn(100, 2))
    run = lambda b: td.sample(
        model, s, 50, sampler=sampler, steps=5, generator=torch.Generator().manual_seed(1), batch_size=b
    )
    torch.testing.assert_close(run(7), run(50), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="batch_size 0"):
        run(0)


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


@pytest.mark.parametrize(
    "sampler,steps,tol,gauss",
    [("ddpm", None, 0.03, None), ("dpm++", 20, 0.01, None), ("dpm++", 20, 0.01, GAUSS_3D)],
    ids=["ddpm", "dpm++", "dpm++-3d"],
)
def test_samplers_recover_gaussian_data_from_the_exact_denoiser(sampler, steps, tol, gauss):
    s, (mu, S) = td.NoiseScheduler(), gauss or (torch.tensor([1.0, -0.5]), torch.tensor([[0.3, 0.2], [0.2, 0.5]]))
    model = GaussianEps(s, mu, S)
    model.data_mean, model.data_cov = mu, S
    x = td.sample(model, s, 100_000, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
    assert (x.mean(0) - mu).abs().max() < tol and (torch.cov(x.T) - S).abs().max() < tol


@pytest.mark.parametrize("sampler", td.SAMPLERS)
def test_a_denoiser_samples_in_data_units_in_float64(sampler):
    """Reference: the model's space mapped back by hand, x = mean + sd / MODEL_SD * z (float64)."""
    torch.manual_seed(0)
    X = torch.randn(400, 2, dtype=torch.float64) * torch.tensor([1e-3, 20.0]) + torch.tensor([1e6, -5.0])
    model, s = td.Denoiser(td.DenoiserConfig()).eval(), td.NoiseScheduler(20)
    model.set_data_stats(X)
    x = td.sample(model, s, 64, sampler, steps=5, generator=torch.Generator().manual_seed(1))
    assert x.dtype == torch.float64 and x.shape == (64, 2)
    model.data_map.set(torch.zeros(2), torch.ones(2))
    z = td.sample(model, s, 64, sampler, steps=5, generator=torch.Generator().manual_seed(1))
    scale = X.std(0, correction=0) / td.MODEL_SD
    assert ((x - (X.mean(0) + scale * z)) / scale).abs().max() < 1e-6  # to a millionth of each coordinate's spread


def test_sampling_through_averaged_model_uses_the_wrapped_statistics():
    """Reference: the wrapped Denoiser itself. Without unwrapping, the EMA wrapper would start at N(0, I)
    in the model's space and return points without the map back to data units."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = td.Denoiser(td.DenoiserConfig(data_dim=3)).eval()
    model.set_data_stats(torch.randn(1000, 3, dtype=torch.float64) * 50 + 100)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99))
    s = td.NoiseScheduler()
    run = lambda m: td.sample(m, s, 300, "ddim", steps=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(run(ema), run(model))


def test_bad_sampler_arguments_are_refused():
    model, s = td.Denoiser(td.DenoiserConfig()), td.NoiseScheduler()
    with pytest.raises(ValueError, match="call model.set_data_stats"):  # its map to data units would be the identity
        td.sample(model, s, 4)
    model.set_data_stats(torch.randn(100, 2))
    for kw, message in (
        (dict(steps=0), "steps must be in 1..100, got 0"),
        (dict(sampler="ddim", eta=2.0), r"eta 2.0 must be in \[0, 1\]"),
        (dict(n=0), "n 0 must be a whole number of points, at least 1"),
    ):
        with pytest.raises(ValueError, match=message):
            td.sample(model, s, **{"n": 4, **kw})
    with pytest.raises(ValueError, match="unknown sampler 'euler'; use ddpm, ddim or dpm\\+\\+"):
        td.sample(model, s, 4, "euler")
    with pytest.raises(ValueError, match="steps must be in 1..100"):
        td.sample(model, s, 4, "ddim", steps=101)


class OraclePoint(torch.nn.Module):
    """The exact output, by prediction_type, for data that are a single point x*: eps = (x_t - alpha x*) / sigma,
    x_0 = x*, v = alpha eps - sigma x* (Salimans & Ho 2022, sec. 4)."""

    def __init__(self, s, point):
        super().__init__()
        self.s, self.point = s, torch.tensor(point)

    def forward(self, x, t):
        alpha, sigma = self.s.sqrt_alphas_cumprod[t, None], self.s.sqrt_one_minus_alphas_cumprod[t, None]
        eps = (x - alpha * self.point) / sigma
        kind = self.s.prediction_type
        return {"epsilon": eps, "sample": self.point.expand_as(x), "v_prediction": alpha * eps - sigma * self.point}[
            kind
        ]


@pytest.mark.parametrize("kind", td.PREDICTION_TYPES)
@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", 20), ("dpm++", 20)])
def test_every_sampler_follows_the_prediction_type_on_a_schedule_that_reaches_noise(kind, sampler, steps):
    """The cosine schedule ends at alpha_bar_T ~ 1e-9 (pure noise); each sampler converts each kind of output back."""
    s = td.NoiseScheduler(beta_schedule="cosine", prediction_type=kind)
    assert s.alpha_bar_T < 1e-6
    x = td.sample(
        OraclePoint(s, [1.5, -2.0]), s, 300, sampler, steps, generator=torch.Generator().manual_seed(0), dim=2
    )
    torch.testing.assert_close(x, torch.tensor([[1.5, -2.0]], dtype=x.dtype).expand(300, 2), atol=2e-3, rtol=0)
