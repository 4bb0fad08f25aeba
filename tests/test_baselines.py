"""The baselines beside a run's NLL, against closed forms: on Gaussian data every baseline's NLL approaches the
data's entropy, 0.5 log2 det(2 pi e Sigma), and a model that is the true density loses to none of them."""

import numpy as np
import pytest
from scipy import stats

import baselines

MU, SIGMA = np.array([1.0, -2.0]), np.array([[2.0, 0.8], [0.8, 0.6]])
ENTROPY_BITS = 0.5 * np.log2(np.linalg.det(2 * np.pi * np.e * SIGMA))


def draw(n, seed, mu=MU):
    return np.random.default_rng(seed).multivariate_normal(mu, SIGMA, n)


def test_each_baseline_on_gaussian_data_scores_the_entropy_and_the_true_density_ties():
    train, held = draw(5000, 0), draw(2000, 1)
    true_nats = -stats.multivariate_normal(MU, SIGMA).logpdf(held)
    out = baselines.nll_baselines(train, held, true_nats)
    assert {"gaussian", "kde"} <= set(out)
    for name, b in out.items():
        assert abs(b["nll_bits"] - ENTROPY_BITS) < 0.1, name  # the held-out mean's se is ~0.03 bits
        assert b["diff_bits"] < 2 * b["diff_se"], name  # the true density loses to none
    assert abs(out["gaussian"]["diff_bits"]) < 0.01  # 5,000 rows pin the moments
    assert baselines.losses(out) == []


def test_a_worse_model_is_said_to_lose_in_one_line_per_baseline():
    """Reference: a model twice as wide as the data has a KL of log2(2) * D + ... > 0 bits against each baseline."""
    train, held = draw(3000, 2), draw(1000, 3)
    wide_nats = -stats.multivariate_normal(MU, 4 * SIGMA).logpdf(held)
    out = baselines.nll_baselines(train, held, wide_nats)
    lines = baselines.losses(out)
    assert len(lines) == len([k for k in out if k in baselines.NAMES]) >= 2
    assert all(line.startswith("note: a Gaussian") for line in lines)


def test_labels_get_one_fit_per_class_and_numbers_a_linear_gaussian():
    """Two classes 6 apart: per class, each baseline scores the class density's entropy, where one Gaussian over
    both would be far wider. Numbers: x = A c + noise, scored by the noise's entropy."""
    rng = np.random.default_rng(4)
    train = np.concatenate([draw(2000, 5, MU), draw(2000, 6, MU + 6)])
    train_y = np.repeat([0, 1], 2000)
    held, y = np.concatenate([draw(500, 7, MU), draw(500, 8, MU + 6)]), np.repeat([0, 1], 500)
    out = baselines.nll_baselines(train, held, np.zeros(len(held)), train_y, y, "labels")
    for name in ("gaussian", "kde"):
        assert abs(out[name]["nll_bits"] - ENTROPY_BITS) < 0.1, name
    pooled = baselines.nll_baselines(train, held, np.zeros(len(held)))["gaussian"]["nll_bits"]
    assert pooled > ENTROPY_BITS + 1
    c_train, c = rng.normal(size=(3000, 3)), rng.normal(size=(800, 3))
    A = rng.normal(size=(3, 2)) * 3
    x_train, x = c_train @ A + draw(3000, 9) - MU, c @ A + draw(800, 10) - MU
    out = baselines.nll_baselines(x_train, x, np.zeros(len(x)), c_train, c, "numbers")
    assert set(out) == {"gaussian"} and abs(out["gaussian"]["nll_bits"] - ENTROPY_BITS) < 0.1


@pytest.mark.parametrize("factor", [0.1, 1.0])
def test_the_kde_bandwidth_is_chosen_on_the_training_rows_alone(factor):
    """A narrow and a wide structure: the chosen KDE beats Scott's rule on held-out rows of a two-scale density, or
    ties it where Scott's rule is right (Gaussian data). Reference: scipy's gaussian_kde at Scott's factor."""
    rng = np.random.default_rng(11)
    make = lambda n: draw(n, int(rng.integers(1 << 30))) * np.where(rng.random((n, 1)) < 0.5, factor, 1.0)
    train, held = make(4000), make(1000)
    scott = -stats.gaussian_kde(train.T).logpdf(held.T).mean() / np.log(2)
    chosen = baselines.nll_baselines(train, held, np.zeros(len(held)))["kde"]["nll_bits"]
    assert chosen <= scott + 0.02
    if factor < 1:
        assert chosen < scott - 0.1
