"""The named datasets' exact densities against their samplers: each integrates to 1 (quadrature on a grid),
puts the samplers' share of points in each region (a chi-square test on coarse bins), and the exact
entropies match the mean log-density of fresh samples."""

import functools
import math

import numpy as np
import pytest
from scipy import integrate, spatial, special, stats

import datasets


def grid_cells(lo, hi, h, near=None, radius=None):
    """Cell centres (M, 2) of a midpoint grid over [lo, hi]^2, keeping only the cells within radius of the
    points `near` when given (the density is ~0 elsewhere)."""
    xs, ys = (np.arange(a + h / 2, b, h) for a, b in zip(lo, hi))
    cells = np.stack(np.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2)
    if near is not None:
        cells = cells[spatial.cKDTree(near).query(cells, distance_upper_bound=radius)[0] < np.inf]
    return cells


@functools.lru_cache
def on_grid(name):
    """(cells, log p(cell | class) (M, K), log class weights (K,), step) on the dataset's GRIDS entry, computed once."""
    lo, hi, h, near, radius = GRIDS[name]
    cells = grid_cells(lo, hi, h, near, radius)
    return (cells, *datasets.class_log_densities(name, cells), h)


def dino_centres():
    pts = np.loadtxt(datasets.DINO_TSV, skiprows=1)
    return np.stack([(pts[:, 0] / 54 - 1) * 4, (pts[:, 1] / 48 - 1) * 4], 1)


# (lo, hi, step, near, radius): steps at most half the noise sd make the midpoint rule exact to ~1e-9 for Gaussians;
# the cells tile the chi-square's 0.5-wide bins exactly
GRIDS = {
    "ring8": ((-5, -5), (5, 5), 0.05, None, None),
    "moons": ((-3.5, -2.5), (4.5, 4.0), 0.025, None, None),  # the curves span [-2.4, 3.6] x [-1.6, 2.9]
    "dino": ((-5, -5), (5, 5), 0.004, dino_centres(), 0.15),
}


@pytest.mark.parametrize("name", list(GRIDS))
def test_smooth_densities_integrate_to_one_and_match_the_sampler(name):
    cells, lp, log_w, h = on_grid(name)
    mass = np.exp(special.logsumexp(lp + log_w, axis=1)) * h * h
    assert np.log(mass[::97] / h / h) == pytest.approx(datasets.log_density(name, cells[::97]), rel=1e-12, abs=1e-9)
    assert mass.sum() == pytest.approx(1, abs=1e-6)
    # chi-square: counts of 100k fresh points in 0.5-wide bins against the density's mass there
    edges = [np.arange(-5, 5.01, 0.5)] * 2
    expected = np.histogram2d(cells[:, 0], cells[:, 1], edges, weights=mass)[0].ravel()
    X = datasets.DATASETS[name](100_000, np.random.default_rng(5))
    counts = np.histogram2d(X[:, 0], X[:, 1], edges)[0].ravel()
    keep = expected * len(X) > 5
    assert counts[~keep].sum() < 0.001 * len(X)
    expected_counts = expected[keep] / expected[keep].sum() * counts[keep].sum()
    assert stats.chisquare(counts[keep], expected_counts).pvalue > 1e-4


@pytest.mark.parametrize("name", list(datasets.CLASSES))
def test_each_class_density_integrates_to_one(name):
    cells, lp, log_w, h = on_grid(name)
    X, labels, names = datasets.load_labeled(name, n=20_000)
    assert len(names) == labels.max() + 1 and X.shape == (20_000, 2)
    for k in range(len(names)):
        assert datasets.log_density(name, cells[::97], label=k) == pytest.approx(lp[::97, k], rel=1e-12, abs=1e-9)
        assert np.exp(lp[:, k]).sum() * h * h == pytest.approx(1, abs=1e-6)
        # the class's own points are likelier under it than under any other class
        own = datasets.class_log_densities(name, X[labels == k])[0]
        assert (own.argmax(1) == k).mean() > 0.95


def test_line_is_uniform_on_its_box():
    x = np.random.default_rng(0).uniform([-3, -5], [3, 5], size=(200_000, 2))  # a box of area 60 around it
    p = np.exp(datasets.log_density("line", x))
    assert set(np.unique(p)) == {0, 1 / 32}
    assert 60 * p.mean() == pytest.approx(1, abs=4 * 60 * p.std() / math.sqrt(len(x)))
    assert np.isneginf(datasets.log_density("line", np.array([[2.01, 0], [0, -4.01]]))).all()


def test_circle_blob_masses_match_the_rounding_and_integrate_to_one():
    centres, probs = datasets.circle_blobs()
    assert (
        len(centres) == 17
        and probs.sum() == pytest.approx(1)
        and sorted(probs * 25) == pytest.approx([1] * 9 + [2] * 8)
    )
    # each blob's mass, in polar coordinates around its centre: int p(c + rho e(phi)) rho drho dphi (midpoint rule)
    rho = (np.arange(400) + 0.5) * 0.1 / 400
    phi = (np.arange(64) + 0.5) * 2 * np.pi / 64
    R, P = np.meshgrid(rho, phi, indexing="ij")
    masses = []
    for c in centres:
        pts = c + np.stack([R * np.cos(P), R * np.sin(P)], -1).reshape(-1, 2)
        masses.append((np.exp(datasets.log_density("circle", pts)) * R.ravel()).sum() * (0.1 / 400) * (2 * np.pi / 64))
    assert np.array(masses) == pytest.approx(probs, abs=1e-9)
    # and the sampler's points fall into the blobs in those shares
    X = datasets.load_dataset("circle", n=200_000, seed=6)
    nearest = spatial.cKDTree(centres).query(X)
    assert nearest[0].max() < 0.09
    share = np.bincount(nearest[1], minlength=17) / len(X)
    assert np.abs(share - probs).max() < 5 * np.sqrt(probs * (1 - probs) / len(X)).max()


def test_moons_density_matches_scipy_quad():
    X = datasets.moons(6, np.random.default_rng(4))
    X = np.concatenate([X, X + np.random.default_rng(5).normal(0, 0.15, X.shape)])  # on and off the curves
    sx, sy = datasets.MOONS_SD
    for x in X:
        for k in (0, 1):

            def f(th):
                c = datasets.moons_curves(np.array([th]))[k, 0]
                return stats.norm.pdf(x[0], c[0], sx) * stats.norm.pdf(x[1], c[1], sy) / np.pi

            ref = integrate.quad(
                f, 0, np.pi, points=np.linspace(0, np.pi, 40)[1:-1], limit=400, epsabs=0, epsrel=1e-11
            )[0]
            got = datasets.log_density("moons", x[None], k)[0]
            if ref > 1e-200:  # else quad's float64 underflows; logsumexp still gives a finite log p
                assert got == pytest.approx(np.log(ref), abs=1e-8)
            else:
                assert got < np.log(1e-200)
    both = np.logaddexp(datasets.log_density("moons", X, 0), datasets.log_density("moons", X, 1)) - np.log(2)
    assert datasets.log_density("moons", X) == pytest.approx(both, abs=1e-12)


@pytest.mark.parametrize("name", ["line", "circle", "ring8", "dino", "moons"])
def test_entropy_matches_the_mean_log_density_of_fresh_points(name):
    H, se = datasets.entropy_bits(name, n=20_000, seed=8)
    bits = -datasets.log_density(name, datasets.load_dataset(name, n=20_000, seed=9)) / np.log(2)
    assert abs(bits.mean() - H) <= 4 * math.hypot(se, bits.std() / math.sqrt(len(bits)))
    if name == "ring8":  # 8 blobs 9 sd apart barely overlap: log2 8 + log2(2 pi e sd^2)
        assert H == pytest.approx(3 + np.log2(2 * np.pi * np.e * 0.25**2), abs=4 * se + 1e-3)
    if name == "line":
        assert (H, se) == (5.0, 0.0)


def test_labels_and_points_agree():
    X = datasets.load_dataset("moons", n=10_001)
    X2, labels, names = datasets.load_labeled("moons", n=10_001)
    assert np.array_equal(X, X2) and names == ("upper", "lower")
    assert (labels == 0).sum() == 5000 and (labels == 1).sum() == 5001
    # upper points lie above the lower curve's reflection: the upper arc has y >= -1 + 0.3 * 3 - 3 * 0.03 * 4
    assert X2[labels == 0, 1].mean() > X2[labels == 1, 1].mean() + 1
    X, labels, names = datasets.load_labeled("ring8", n=8_000)
    assert np.array_equal(X, datasets.load_dataset("ring8", n=8_000)) and np.bincount(labels).tolist() == [1000] * 8
    angle = np.degrees(np.arctan2(X[:, 1], X[:, 0])) % 360
    assert np.abs((angle - 45 * labels + 180) % 360 - 180).max() < 45 / 2  # each point near its class's direction
    assert names[2] == "N" and np.abs(angle[labels == 2].mean() - 90) < 1


def test_unknown_or_densityless_datasets_are_refused():
    with pytest.raises(ValueError, match="circle, dino, line, moons, ring8"):
        datasets.log_density("spiral", np.zeros((1, 2)))
    with pytest.raises(ValueError, match="no exact density"):
        datasets.entropy_bits("swissroll3d")
    with pytest.raises(ValueError, match="no classes"):
        datasets.log_density("dino", np.zeros((1, 2)), label=0)
    with pytest.raises(ValueError, match="labels of ring8"):
        datasets.log_density("ring8", np.zeros((1, 2)), label=8)
    with pytest.raises(ValueError, match="no classes"):
        datasets.load_labeled("line")
