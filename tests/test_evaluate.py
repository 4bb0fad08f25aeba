"""The KL metrics against the analytic KL of two Gaussians, in any dimension; grids that fit the data;
refusals."""

import itertools
import math

import numpy as np
import pytest

import datasets
import evaluate


def gauss_kl_nats(mu, sigma, d=2):
    """KL(N(0, I) || N(mu, sigma^2 I)) in closed form."""
    return 0.5 * (d / sigma**2 + np.dot(mu, mu) / sigma**2 - d + 2 * d * math.log(sigma))


# sigma >= 1: for a narrower Q the estimator converges slowly from below (P's tails hold few
# samples); measured for sigma = 0.7: 0.39, 0.44, 0.455 bits at n = 20k, 200k, 1M vs 0.472 exact.
@pytest.mark.parametrize("mu,sigma", [((0.0, 0.0), 1.0), ((0.5, 0.0), 1.0), ((0.3, -0.4), 1.5), ((0.0, 0.0), 1.2)])
def test_knn_kl_matches_the_analytic_gaussian_kl(mu, sigma):
    rng = np.random.default_rng(0)
    P = rng.normal(size=(20_000, 2))
    Q = np.array(mu) + sigma * rng.normal(size=(20_000, 2))
    assert evaluate.knn_kl(P, Q) == pytest.approx(gauss_kl_nats(np.array(mu), sigma) / math.log(2), abs=0.05)


def test_hist_kl_matches_the_analytic_gaussian_kl_at_fine_bins():
    rng = np.random.default_rng(1)
    mu, sigma = np.array([0.5, 0.0]), 1.3
    P = rng.normal(size=(2_000_000, 2))
    Q = mu + sigma * rng.normal(size=(2_000_000, 2))
    # 0.1-wide bins; the plug-in estimate's bias at this n is ~ occupied bins / 2n ~ 1e-3 nats
    assert evaluate.hist_kl(P, Q) == pytest.approx(gauss_kl_nats(mu, sigma), abs=0.01)


def test_kl_of_a_distribution_with_itself_is_the_floor():
    data = datasets.load_dataset("moons")
    same = datasets.load_dataset("moons", n=10_000, seed=123)
    m = evaluate.compute_metrics(data, same, evaluate.floor_draw("moons", 10_000))
    assert abs(m["knn_kl_bits"] - m["knn_kl_floor"]) < 0.05
    assert abs(m["hist_kl_nats"] - m["hist_kl_floor"]) < 0.05
    far = evaluate.compute_metrics(data, np.random.default_rng(0).normal(size=(10_000, 2)))
    assert far["knn_kl_bits"] > m["knn_kl_bits"] + 1 and far["hist_kl_nats"] > m["hist_kl_nats"] + 0.5


def test_metrics_do_not_depend_on_the_order_of_samples():
    data = datasets.load_dataset("circle", n=20_000)
    S = np.random.default_rng(0).normal(size=(5_000, 2)) * 2
    perm = S[np.random.default_rng(1).permutation(len(S))]
    assert evaluate.knn_kl(data, S) == pytest.approx(evaluate.knn_kl(data, perm), abs=1e-12)
    assert evaluate.hist_kl(data, S) == pytest.approx(evaluate.hist_kl(data, perm), abs=1e-12)


def test_nonfinite_samples_are_reported_and_excluded():
    data = datasets.load_dataset("line", n=20_000)
    S = datasets.load_dataset("line", n=1000, seed=5)
    bad = S.copy()
    bad[:100] = np.nan
    bad[100:150, 1] = np.inf
    m = evaluate.compute_metrics(data, bad)
    assert m["nonfinite_frac"] == pytest.approx(0.15) and m["n_samples"] == 850
    assert m["knn_kl_bits"] == pytest.approx(evaluate.knn_kl(data, S[150:]))
    with pytest.raises(ValueError, match="every sample is NaN"):
        evaluate.compute_metrics(data, np.full((10, 2), np.nan))


@pytest.mark.parametrize("shape", [(10,), (10, 3), (10, 1), (2, 5, 2)])
def test_wrong_shapes_are_refused(shape):
    with pytest.raises(ValueError, match=r"must be an \(N, 2\) array"):
        evaluate.check_samples(np.zeros(shape), dim=2)
    data = datasets.load_dataset("moons", n=1000)
    with pytest.raises(ValueError, match=r"must be an \(N, 2\) array"):
        evaluate.compute_metrics(data, np.zeros(shape))


def test_complex_samples_are_refused():
    with pytest.raises(ValueError, match="real numbers"):
        evaluate.check_samples(np.ones((10, 2)) + 1j)


def test_knn_kl_matches_the_analytic_gaussian_kl_in_3d():
    rng = np.random.default_rng(0)
    mu, sigma = np.array([0.5, 0.0, -0.3]), 1.2
    P = rng.normal(size=(20_000, 3))
    Q = mu + sigma * rng.normal(size=(20_000, 3))
    assert evaluate.knn_kl(P, Q) == pytest.approx(gauss_kl_nats(mu, sigma, d=3) / math.log(2), abs=0.05)


def test_hist_kl_in_1d_and_the_pair_mean_in_3d_match_the_analytic_kl():
    """D = 1: the 1-D histogram; D = 3: the mean over the 3 coordinate pairs of the 2-D marginals' KL,
    each of which is the closed form for that pair's Gaussian marginals."""
    rng = np.random.default_rng(1)
    mu, sigma = np.array([0.5, 0.0, -0.3]), 1.3
    P = rng.normal(size=(2_000_000, 3))
    Q = mu + sigma * rng.normal(size=(2_000_000, 3))
    pairs = list(itertools.combinations(range(3), 2))
    expected = np.mean([gauss_kl_nats(mu[list(p)], sigma) for p in pairs])
    assert evaluate.hist_kl(P, Q) == pytest.approx(expected, abs=0.01)
    assert evaluate.hist_kl(P[:, :1], Q[:, :1]) == pytest.approx(gauss_kl_nats(mu[:1], sigma, d=1), abs=0.01)
    m = evaluate.compute_metrics(P[:20_000], Q[:5000])
    assert m["hist_kl_pairs"] == 3 and "pair hist KL (nats)" in evaluate.format_table(m)


def test_the_grid_is_the_studys_square_for_named_data_and_covers_any_other():
    for name in datasets.DATASETS:
        lo, hi = evaluate.grid_box(datasets.load_dataset(name, n=10_000))
        assert (lo == -5).all() and (hi == 5).all()
    data, samples = datasets.load_dataset("moons", n=20_000), datasets.load_dataset("moons", n=5000, seed=7)
    for scale, shift in ((50, 100), (1e-3, 0), (1e6, -3e6)):
        lo, hi = evaluate.grid_box(data * scale + shift)
        assert (lo < (data * scale + shift).min(0)).all() and (hi > (data * scale + shift).max(0)).all()
        # reference: the same grid mapped back onto the unscaled points gives the same KL
        kl = evaluate.hist_kl(data * scale + shift, samples * scale + shift)
        assert np.isfinite(kl) and kl == pytest.approx(
            evaluate.hist_kl(data, samples, box=((lo - shift) / scale, (hi - shift) / scale)), abs=1e-3
        )
    lo, hi = evaluate.grid_box(np.array([[1.0, 7.0], [2.0, 7.0]]))  # a constant coordinate still gets a box
    assert (hi > lo).all()


def test_floor_is_none_for_a_users_file_and_a_fresh_draw_otherwise():
    f = evaluate.floor_draw("dino", 1000)
    assert f.shape == (1000, 2) and not np.array_equal(f, datasets.load_dataset("dino", n=1000))
    assert evaluate.floor_draw("/tmp/some/points.csv", 1000) is None


def test_the_printed_table_names_each_class_in_full_with_its_values_aligned():
    row = lambda kl: dict(knn_kl_bits=kl, knn_kl_floor=0.01, fidelity=0.9, fidelity_floor=0.95, n=100)
    names = ["measurement_site_north", "measurement_site_south", "c"]
    table = evaluate.format_table(
        dict(
            knn_kl_bits=0.5,
            knn_kl_floor=0.02,
            eval_loss=0.7,
            per_class={n: row(k) for n, k in zip(names, (0.1, 0.2, 0.3))},
        )
    )
    lines = table.splitlines()
    for name, kl in zip(names, ("0.1000", "0.2000", "0.3000")):
        line = next(line for line in lines if line.startswith(f"  {name} kNN KL "))
        assert line.split()[3] == kl, line  # name, "kNN", "KL", value
    value_end = {line.index(v) + len(v) for line, v in zip(lines, ("value", "0.5000"))}
    value_end |= {line.index(k) + len(k) for line in lines for k in ("0.1000", "0.2000", "0.3000") if k in line}
    assert len(value_end) == 1, table  # one column of values, right-aligned


def test_the_knn_kl_is_left_out_where_a_distance_to_the_kth_neighbour_is_0():
    """Reference: the distances by brute force. A point repeated 6 times has its 5th other neighbour at distance 0,
    so the estimator would divide by 0; so do 5 samples on one data point."""
    rng = np.random.default_rng(0)
    data = np.vstack([rng.normal(size=(2000, 2)), np.repeat([[0.3, -0.2]], 6, axis=0)])
    fifth = np.sort(np.abs(data[:, None] - data[None]).max(-1), 1)[:, evaluate.KNN_K]  # column 0: the point itself
    assert (fifth == 0).sum() == 6
    m = evaluate.compute_metrics(data, rng.normal(size=(2000, 2)))
    assert math.isnan(m["knn_kl_bits"]) and "6 of 2006 data points have 5 or more exact duplicates" in m["warnings"][0]
    clean = data[:2000]
    m = evaluate.compute_metrics(clean, np.vstack([rng.normal(size=(1995, 2)), np.repeat(clean[:1], 5, axis=0)]))
    assert math.isnan(m["knn_kl_bits"]) and "5 or more samples fall exactly on 1 of the data points" in m["warnings"][0]
    assert "warnings" not in evaluate.compute_metrics(clean, rng.normal(size=(2000, 2)))


def test_samples_that_copy_the_training_rows_are_said_to_and_their_knn_kl_is_marked_unreliable():
    """Reference: copies (plus 1% of an sd of jitter) sit far nearer their training points than unseen draws do, and
    fresh draws of the same law do not; the kNN KL of the copies beats a fresh draw's, which is why it is flagged."""
    rng = np.random.default_rng(0)
    train, fresh = rng.normal(size=(150, 2)), rng.normal(size=(2000, 2))
    copies = train[rng.integers(0, 150, 2000)] + 0.01 * rng.normal(size=(2000, 2))
    memo = evaluate.memorisation(train, copies, fresh)
    assert memo["dcr_ratio"] < 0.1 and memo["knn_kl_reliable"] is False and "the samples copy" in memo["warnings"][0]
    honest = evaluate.memorisation(train, rng.normal(size=(2000, 2)), fresh)
    assert honest["dcr_ratio"] > 0.8 and "knn_kl_reliable" not in honest and "warnings" not in honest


def test_samples_one_coordinate_short_of_a_labelled_file_are_sent_to_the_run(tmp_path):
    """A file with a label column has one column more than the points: the refusal says to score the run itself."""
    rng = np.random.default_rng(1)
    (tmp_path / "k.csv").write_text(
        "x,y,k\n" + "".join(f"{u},{v},{i % 2}\n" for i, (u, v) in enumerate(rng.normal(size=(300, 2))))
    )
    with pytest.raises(ValueError, match="if one column is a label or a condition, score the run itself"):
        evaluate.score_samples(rng.normal(size=(100, 2)), str(tmp_path / "k.csv"), 0.1)
