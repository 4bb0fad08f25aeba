"""Each dataset's statistics against its definition; bad files refused."""
import math

import numpy as np
import pytest
from scipy import stats

import datasets


def close(value, expected, se, n_sigma=5):
    assert abs(value - expected) < n_sigma * se, (value, expected, se)


def test_defaults_are_100k_points_from_seed_42_and_reproducible():
    for name in datasets.DATASETS:
        X = datasets.load_dataset(name)
        assert X.shape == (100_000, 2) and np.isfinite(X).all()
        assert np.array_equal(X, datasets.DATASETS[name](100_000, np.random.default_rng(42)))
        assert not np.array_equal(X[:100], datasets.load_dataset(name, seed=1)[:100])


def test_circle_is_16_blobs_at_radius_3_plus_the_origin():
    X = datasets.load_dataset("circle")
    r = np.hypot(X[:, 0], X[:, 1])
    at_origin = r < 0.2
    # P(x rounds to 0) = P(|U(-.5,.5)| < 0.1) = 0.2 per axis, so 0.04 of points sit at the origin
    close(at_origin.mean(), 0.04, math.sqrt(0.04 * 0.96 / len(X)))
    assert np.all(np.abs(r[~at_origin] - 3) <= 0.09 + 1e-9)
    # the 16 directions of the nonzero grid points {-2..2}^2
    grid = [(a, b) for a in range(-2, 3) for b in range(-2, 3) if (a, b) != (0, 0)]
    dirs = np.unique(np.round(np.arctan2([b for a, b in grid], [a for a, b in grid]), 9))
    assert len(dirs) == 16
    ang = np.arctan2(X[~at_origin, 1], X[~at_origin, 0])
    gap = np.abs(np.angle(np.exp(1j * (ang[:, None] - dirs[None]))))  # wrapped angular distance
    assert gap.min(1).max() < 0.09 / 2.9  # every point within its blob's angular radius
    assert np.all(np.bincount(gap.argmin(1), minlength=16) > 1000)  # and every blob is used


def test_line_is_uniform_on_its_box():
    X = datasets.load_dataset("line")
    assert X[:, 0].min() >= -2 and X[:, 0].max() <= 2 and X[:, 1].min() >= -4 and X[:, 1].max() <= 4
    assert stats.kstest(X[:, 0], stats.uniform(-2, 4).cdf).pvalue > 1e-3
    assert stats.kstest(X[:, 1], stats.uniform(-4, 8).cdf).pvalue > 1e-3


def test_moons_moments_match_the_definition():
    X = datasets.load_dataset("moons")
    n, s2 = len(X), 0.03**2
    # theta uniform on [0, pi]: E cos = 0, E sin = 2/pi, E cos^2 = E sin^2 = 1/2
    Es = 2 / math.pi
    mx, my = 0.5, 0.25  # (0 + 1) / 2 and (2/pi + 0.5 - 2/pi) / 2
    Ex2 = (0.5 + (1 + 0.5)) / 2
    Ey2 = (0.5 + (0.25 - Es + 0.5)) / 2
    vx, vy = Ex2 - mx**2 + s2, Ey2 - my**2 + s2
    close(X[:, 0].mean(), (mx + 0.3) * 2 - 1, 2 * math.sqrt(vx / n))
    close(X[:, 1].mean(), (my + 0.3) * 3 - 1, 3 * math.sqrt(vy / n))
    close(X[:, 0].var(), 4 * vx, 4 * vx * 0.02)
    close(X[:, 1].var(), 9 * vy, 9 * vy * 0.02)


def test_dino_moments_match_the_datasaurus_points():
    X = datasets.load_dataset("dino")
    pts = np.loadtxt(datasets.DINO_TSV, skiprows=1)
    assert pts.shape == (142, 2)
    assert pts.mean(0) == pytest.approx([54.2633, 47.8323], abs=1e-3)  # as the data's README states
    n, scale = len(X), np.array([4 / 54, 4 / 48])
    mean = (pts.mean(0) * scale) - 4
    var = (pts.var(0) + 0.15**2) * scale**2  # resampling with replacement, plus the jitter
    for d in range(2):
        close(X[:, d].mean(), mean[d], math.sqrt(var[d] / n))
        close(X[:, d].var(), var[d], var[d] * 0.02)


def test_user_points_load_from_csv_txt_and_npy(tmp_path):
    P = np.random.default_rng(0).normal(size=(50, 2))
    np.savetxt(tmp_path / "p.csv", P, delimiter=",")
    np.savetxt(tmp_path / "p.txt", P)
    np.save(tmp_path / "p.npy", P)
    for f in ("p.csv", "p.txt", "p.npy"):
        np.testing.assert_allclose(datasets.load_dataset(str(tmp_path / f)), P)


@pytest.mark.parametrize("name,content,match", [
    ("three.csv", "1,2,3\n4,5,6\n", "exactly 2 columns"),
    ("nan.csv", "1,2\nnan,5\n", "NaN or infinite"),
    ("inf.txt", "1 2\ninf 5\n", "NaN or infinite"),
    ("empty.csv", "", "N >= 1 rows"),
    ("words.csv", "x,y\na,b\n", "not a table of numbers"),
])
def test_malformed_text_files_are_refused(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=match):
        datasets.load_dataset(str(tmp_path / name))


def test_malformed_npy_files_are_refused(tmp_path):
    np.save(tmp_path / "flat.npy", np.arange(10.0))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(ValueError, match="exactly 2 columns"):
        datasets.load_dataset(str(tmp_path / "flat.npy"))
    for f in ("obj.npy", "junk.npy"):
        with pytest.raises(ValueError, match=f"{f}"):
            datasets.load_dataset(str(tmp_path / f))


def test_unknown_names_and_missing_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'spiral'"):
        datasets.load_dataset("spiral")
    with pytest.raises(ValueError, match="no data file at"):
        datasets.load_dataset(str(tmp_path / "missing.csv"))
