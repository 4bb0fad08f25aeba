"""The condition token, classifier-free guidance and condition dropout, against two separate calls and their
distributions."""

import numpy as np
import pytest
import scipy.stats
import torch

import tinydiff as td

pytestmark = pytest.mark.unit

K, C = 3, 2


def build(kind, **kw):
    torch.manual_seed(0)
    model = td.Denoiser(
        td.DenoiserConfig(**{"attn_layers": 1, **({"num_classes": K} if kind == "labels" else {"cond_dim": C}), **kw})
    ).eval()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (300,), generator=g) if kind == "labels" else torch.randn(300, C, generator=g) * 4 + 1
    model.set_data_stats(X, y)
    return model, y


def inputs(n=16, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g), torch.randint(0, 100, (n,), generator=g)


@pytest.mark.parametrize("mixer", [dict(), dict(attn_layers=0, ssm_layers=2)], ids=["attention", "ssm"])
@pytest.mark.parametrize("kind", ["labels", "numbers"])
def test_the_condition_is_a_token_that_attention_reads(kind, mixer):
    """With a mixer (attention, or the bidirectional SSM), the coordinates' tokens change with y: the MLP's slots for
    x1, x2, t."""
    model, y = build(kind, **mixer)
    x, t = inputs()
    seen = []
    model.mlp.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    other = (y[:16] + 1) % K if kind == "labels" else y[:16] + 3
    out_a, out_b = model(x, t, y[:16]), model(x, t, other)
    assert seen[0].shape == (16, 4 * 128)
    assert not torch.allclose(
        seen[0][:, : 3 * 128], seen[1][:, : 3 * 128]
    )  # information moved from the condition token
    assert not torch.allclose(out_a, out_b)


def test_the_label_token_is_the_label_embedding():
    """Without mixers the MLP sees [x1, x2, t, label_emb(y)]; drop puts the null label K in its place."""
    torch.manual_seed(0)
    model = td.Denoiser(td.DenoiserConfig(num_classes=K))
    x, t = inputs()
    y, drop = torch.arange(16) % K, torch.arange(16) % 2 == 0
    seen = []
    model.mlp.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    model(x, t, y, drop)
    torch.testing.assert_close(seen[0][:, 3 * 128 :], model.label_emb.weight[torch.where(drop, K, y)])


@pytest.mark.parametrize("kind", ["labels", "numbers"])
def test_dropped_rows_are_the_unconditional_model(kind):
    model, y = build(kind)
    x, t = inputs()
    null = model(x, t)
    torch.testing.assert_close(model(x, t, y[:16], torch.ones(16, dtype=torch.bool)), null)
    drop = torch.arange(16) % 2 == 0
    mixed, cond = model(x, t, y[:16], drop), model(x, t, y[:16])
    torch.testing.assert_close(mixed[drop], null[drop])
    torch.testing.assert_close(mixed[~drop], cond[~drop])


def test_bad_conditions_are_refused_in_library_terms():
    labels, _ = build("labels")
    numbers, _ = build("numbers")
    plain = td.Denoiser(td.DenoiserConfig())
    x, t = inputs(4)
    cases = [
        (labels, torch.tensor([0, 1, 4, 0]), "label 4 is out of range for num_classes=3: use 0..2"),
        (labels, torch.tensor([0, -1, 2, 0]), "label -1 is out of range"),
        (labels, torch.tensor([0.0, 1.0, 2.0, 0.0]), r"y must be \(4,\) integer labels in 0..2 for num_classes=3"),
        (labels, torch.tensor([True, False, True, False]), "integer labels"),
        (labels, torch.zeros(4, 1, dtype=torch.long), r"of shape \(4, 1\)"),
        (numbers, torch.zeros(4, 3), r"y must be \(4, 2\) float conditions for cond_dim=2"),
        (numbers, torch.zeros(4, 2, dtype=torch.long), "float conditions"),
        (plain, torch.zeros(4, dtype=torch.long), "this Denoiser is unconditional"),
    ]
    for model, y, words in cases:
        with pytest.raises(ValueError, match=words):
            model(x, t, y)
    with pytest.raises(ValueError, match="label 3 is out of range for num_classes=3: use 0..2"):
        labels(x, t, torch.tensor([0, 1, 3, 2]))  # K is the null label, which only drop selects
    s = td.NoiseScheduler()
    plain.set_data_stats(torch.randn(10, 2))
    with pytest.raises(ValueError, match="guidance 2.0 needs a conditional Denoiser"):
        td.sample(plain, s, 4, guidance=2.0)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be a number >= 0"):
            td.sample(labels, s, 4, guidance=bad)
    with pytest.raises(ValueError, match="label 5 is out of range"):
        td.sample(labels, s, 4, y=torch.tensor([0, 1, 5, 0]))
    with pytest.raises(ValueError, match="draw_labels needs a class-conditional Denoiser"):
        td.draw_labels(numbers, 4)


@pytest.mark.parametrize("kind", ["labels", "numbers"])
@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_guided_output_is_the_cfg_combination_of_two_separate_calls(kind, w):
    model, y = build(kind)
    x, t = inputs()
    eps_cond, eps_null = model(x, t, y[:16]), model(x, t)
    ref = eps_null + w * (eps_cond - eps_null)
    torch.testing.assert_close(td.guided_output(model, x, t, y[:16], w), ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(
        td.guided_output(model, x, 37, y[:16], w), td.guided_output(model, x, torch.full((16,), 37), y[:16], w)
    )  # an int t is every row's


@pytest.mark.parametrize("kind", ["labels", "numbers"])
def test_ddpm_loss_drops_the_condition_with_p_uncond_or_where_drop_says(kind):
    model, y = build(kind)
    s = td.NoiseScheduler()
    X = torch.randn(32, 2)
    g = torch.Generator().manual_seed(3)
    t, noise = torch.randint(0, 100, (32,), generator=g), torch.randn(32, 2, generator=g)
    uncond = td.ddpm_loss(model, s, X, t, noise)
    torch.testing.assert_close(td.ddpm_loss(model, s, X, t, noise, y[:32], p_uncond=1.0), uncond)
    torch.testing.assert_close(
        td.ddpm_loss(model, s, X, t, noise, y[:32], p_uncond=0.0, drop=torch.ones(32, dtype=torch.bool)), uncond
    )
    cond = td.ddpm_loss(model, s, X, t, noise, y[:32], p_uncond=0.0)
    z = model.data_map.to_model(X)
    torch.testing.assert_close(cond, ((model(s.add_noise(z, noise, t), t, y[:32]) - noise) ** 2).mean())
    assert not torch.allclose(cond, uncond)


class RecordDrop(torch.nn.Module):
    def forward(self, x, t, y=None, drop=None):
        self.drop = drop
        return torch.zeros_like(x)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_the_drop_rate_is_p_uncond(p):
    model, n = RecordDrop(), 20_000
    td.ddpm_loss(
        model,
        td.NoiseScheduler(),
        torch.zeros(n, 2),
        y=torch.zeros(n, dtype=torch.long),
        p_uncond=p,
        generator=torch.Generator().manual_seed(0),
    )
    assert model.drop.shape == (n,) and model.drop.dtype == torch.bool
    assert scipy.stats.binomtest(int(model.drop.sum()), n, p).pvalue > 1e-3


def test_set_data_stats_keeps_the_class_shares_and_the_conditions_standardization():
    labels, y = build("labels")
    np.testing.assert_allclose(labels.class_freq.numpy(), np.bincount(y.numpy(), minlength=K) / len(y), rtol=1e-6)
    assert torch.equal(td.Denoiser(td.DenoiserConfig(num_classes=4)).class_freq, torch.full((4,), 0.25))
    numbers, c = build("numbers")
    u = numbers.cond_map.to_model(c).double().numpy()
    np.testing.assert_allclose(u.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(u.std(0), 1, rtol=1e-5)


class Spy(torch.nn.Module):
    """A wrapper (like DDP) that records the conditions the sampler passes."""

    def __init__(self, net):
        super().__init__()
        self.module, self.ys = net, []

    def forward(self, x, t, y=None, drop=None):
        self.ys.append(y)
        return self.module(x, t, y, drop)


def test_sampling_without_labels_draws_them_in_the_training_shares():
    model = td.Denoiser(td.DenoiserConfig(num_classes=K, hidden=16, emb_dim=16, hidden_layers=1)).eval()
    y = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    model.set_data_stats(torch.randn(1000, 2), y)
    p = np.array([0.6, 0.3, 0.1])
    n = 20_000
    labels = td.draw_labels(model, n, torch.Generator().manual_seed(0))
    assert labels.shape == (n,) and scipy.stats.chisquare(np.bincount(labels.numpy(), minlength=K), n * p).pvalue > 1e-3
    spy = Spy(model)
    td.sample(spy, td.NoiseScheduler(10), 5000, "ddim", steps=1, generator=torch.Generator().manual_seed(1))
    drawn = torch.cat(spy.ys)  # the rows of every network call at the one step
    assert scipy.stats.chisquare(np.bincount(drawn.numpy(), minlength=K), 5000 * p).pvalue > 1e-3


@pytest.mark.parametrize("kind", ["labels", "numbers"])
@pytest.mark.parametrize("sampler", td.SAMPLERS)
def test_every_sampler_runs_with_guidance_in_float64(kind, sampler):
    model, y = build(kind)
    s = td.NoiseScheduler(10)
    run = lambda w: td.sample(
        model, s, 24, sampler, steps=4, y=y[:24], guidance=w, generator=torch.Generator().manual_seed(0)
    )
    x0, x1, x3 = run(0.0), run(1.0), run(3.0)
    assert all(x.dtype == torch.float64 and x.shape == (24, 2) and torch.isfinite(x).all() for x in (x0, x1, x3))
    assert not torch.allclose(x1, x3) and not torch.allclose(x0, x1)
    if kind == "numbers":  # guidance 0 with numbers is the unconditional model, which y=None also gives
        torch.testing.assert_close(
            x0,
            td.sample(model, s, 24, sampler, steps=4, generator=torch.Generator().manual_seed(0)),
            atol=1e-6,
            rtol=1e-6,
        )


def test_the_sampler_starts_each_class_from_its_own_moments():
    """x_T of class k: the Gaussian with q(x_T | k)'s moments, sqrt(ab) mu_k and ab Sigma_k + (1 - ab) I, from numpy's
    class moments."""
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, K, (3000,), generator=g)
    X = (
        torch.randn(3000, 2, generator=g, dtype=torch.float64) * torch.tensor([[0.5, 2.0]], dtype=torch.float64)
        + 3.0 * y[:, None]
    )
    model = td.Denoiser(td.DenoiserConfig(num_classes=K))
    model.set_data_stats(X, y, standardize=False)
    scheduler, ab = td.NoiseScheduler(), td.NoiseScheduler().alphas_cumprod[-1].double()
    labels = torch.arange(K).repeat_interleave(20_000)
    mean, cov, groups = model.start_moments(labels)
    x_T = scheduler.prior(len(labels), mean, cov, torch.Generator().manual_seed(4), groups=groups).double()
    for k in range(K):
        Xk = X[y == k].numpy()
        np.testing.assert_allclose(model.class_mean[k].numpy(), Xk.mean(0), atol=1e-5)
        np.testing.assert_allclose(model.class_cov[k].numpy(), np.cov(Xk.T, bias=True), atol=1e-5)
        xk = x_T[labels == k].numpy()
        np.testing.assert_allclose(xk.mean(0), ab.sqrt().item() * Xk.mean(0), atol=0.05)
        np.testing.assert_allclose(
            np.cov(xk.T), ab.item() * np.cov(Xk.T, bias=True) + (1 - ab.item()) * np.eye(2), atol=0.05
        )
    mean, cov, groups = model.start_moments(None)  # no condition: the data's moments
    assert groups is None and torch.allclose(mean.double(), X.mean(0), atol=1e-5)


def test_numbers_start_from_a_linear_fit_of_the_data_on_them():
    """Data z = A c + b + noise: cond_coef and cond_cov are numpy's least squares on the standardised c and its
    residuals."""
    g = np.random.default_rng(5)
    c = g.normal(size=(4000, C)) * [2.0, 0.5] + [1.0, -3.0]
    z = c @ np.array([[1.0, -0.5], [2.0, 0.3]]) + 0.2 * g.normal(size=(4000, 2)) + 4.0
    model = td.Denoiser(td.DenoiserConfig(cond_dim=C))
    model.set_data_stats(torch.as_tensor(z), torch.as_tensor(c), standardize=False)
    cs = (c - c.mean(0)) / c.std(0)
    coef, *_ = np.linalg.lstsq(np.column_stack([cs, np.ones(len(cs))]), z, rcond=None)
    np.testing.assert_allclose(model.cond_coef.numpy(), coef[:C], rtol=1e-4, atol=1e-4)
    resid = z - np.column_stack([cs, np.ones(len(cs))]) @ coef
    np.testing.assert_allclose(model.cond_cov.numpy(), np.cov(resid.T, bias=True), atol=1e-4)
    mean, _, _ = model.start_moments(torch.as_tensor(c[:5], dtype=torch.float32))
    np.testing.assert_allclose(mean.numpy(), z.mean(0) + cs[:5] @ coef[:C], atol=1e-3)


def test_the_library_takes_numpy_lists_and_numbers_as_it_takes_tensors():
    """Reference: the same call with tensors. One label or one vector of C numbers stands for every row."""
    model, y = build("labels")
    x, t = inputs(4)
    want = model(x, t, y[:4])
    torch.testing.assert_close(model(x.numpy(), t.numpy(), y[:4].numpy()), want)
    torch.testing.assert_close(model(x.tolist(), t.tolist(), y[:4].tolist()), want)
    torch.testing.assert_close(model(x, 7, 1), model(x, torch.full((4,), 7), torch.ones(4, dtype=torch.long)))
    numbers, c = build("numbers")
    torch.testing.assert_close(numbers(x, t, [0.5, -1.0]), numbers(x, t, torch.tensor([[0.5, -1.0]]).expand(4, 2)))
    s = td.NoiseScheduler()
    g = lambda: torch.Generator().manual_seed(0)
    data, labels = torch.randn(50, 2), torch.arange(50) % 3
    model.set_data_stats(data.numpy(), labels.tolist())
    keep = torch.zeros(50, dtype=torch.bool)  # no row dropped, so that the two losses see the same rows
    loss = td.ddpm_loss(model, s, data.numpy(), t=t.repeat(13)[:50].numpy(), noise=data.flip(0).numpy(), y=1, drop=keep)
    want = td.ddpm_loss(model, s, data, t=t.repeat(13)[:50], noise=data.flip(0), y=torch.ones(50).long(), drop=keep)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(
        td.sample(model, s, 5, "ddim", 3, y=2, generator=g()),
        td.sample(model, s, 5, "ddim", 3, y=torch.full((5,), 2), generator=g()),
    )
    for bad, words in (
        ("abc", "y must be a tensor, numpy array, list or number, not str"),
        ([[1, 2], [3]], "y could not be read as numbers"),
    ):
        with pytest.raises(ValueError, match=words):
            model(x, t, bad)


def test_set_data_stats_refuses_before_it_changes_anything():
    """Reference: the buffers as they were. Label K (the null label) and NaN conditions are refused."""
    model, _ = build("labels")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for y in (torch.arange(20) % 4, torch.full((20,), -1)):
        with pytest.raises(ValueError, match="out of range for num_classes=3: use 0..2"):
            model.set_data_stats(torch.randn(20, 2) * 5 + 3, y)
    numbers, _ = build("numbers")
    with pytest.raises(ValueError, match="NaN or infinite conditions"):
        numbers.set_data_stats(torch.randn(20, 2), torch.full((20, 2), float("nan")))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_inf_points_and_fractional_or_negative_counts_are_refused_in_one_sentence():
    """Reference: the library's own words; before, ddpm_loss returned nan and torch raised from deep inside."""
    model, _ = build("labels")
    s = td.NoiseScheduler()
    with pytest.raises(ValueError, match="x0 holds NaN or infinite values"):
        td.ddpm_loss(model, s, np.full((4, 2), np.inf), y=[0, 1, 2, 0])
    with pytest.raises(ValueError, match="n 2.5 must be a whole number of points"):
        td.sample(model, s, 2.5, "dpm++")
    with pytest.raises(ValueError, match="n -3 must be a whole number of labels"):
        td.draw_labels(model, -3)
    assert td.draw_labels(model, np.int64(3)).shape == (3,)


def test_the_loss_and_the_scheduler_refuse_what_they_cannot_mean():
    """Reference: the library's own words; before, these wrapped around, broadcast, or returned nan."""
    model, _ = build("labels")
    s = td.NoiseScheduler()
    x, y = torch.randn(8, 2), torch.zeros(8, dtype=torch.long)
    cases = [
        (dict(t=100), "t must lie in 0..99"),
        (dict(t=-1), "t must lie in 0..99"),
        (dict(t=2.5), "t must hold integer timesteps"),
        (dict(noise=np.full((8, 2), np.nan)), "noise holds NaN"),
        (dict(noise=np.zeros((3, 2))), "noise must have x0's shape"),
    ]
    for kw, words in cases:
        with pytest.raises(ValueError, match=words):
            td.ddpm_loss(model, s, x, y=y, **kw)
    plain = td.Denoiser(td.DenoiserConfig())
    plain.set_data_stats(x)
    with pytest.raises(ValueError, match="x0 holds no points"):
        td.ddpm_loss(plain, s, np.zeros((0, 2)))
    for kw, words in ((dict(n=True), "whole number of points"), (dict(n=5, steps=2.5), "steps 2.5 must be a whole")):
        with pytest.raises(ValueError, match=words):
            td.sample(model, s, sampler="ddim", **kw)
    for kw in (dict(num_train_timesteps=0), dict(num_train_timesteps=2.5), dict(beta_end=1.5)):
        with pytest.raises(ValueError, match="must be a whole number|betas must lie in"):
            td.NoiseScheduler(**kw)
