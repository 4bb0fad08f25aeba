"""The study's four 2-D datasets, and loading a user's own points. numpy only.

Each named dataset has n = 100,000 points by default, drawn with np.random.default_rng(42).
"""
import os
import warnings

import numpy as np

DINO_TSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "datasaurus_dino.tsv")


def moons(n, rng):
    """Two interleaving half circles, 50/50 and shuffled, noise sd 0.03, then rescaled."""
    n_out, n_in = n // 2, n - n // 2
    th_out, th_in = np.linspace(0, np.pi, n_out), np.linspace(0, np.pi, n_in)
    x = np.concatenate([np.cos(th_out), 1 - np.cos(th_in)])
    y = np.concatenate([np.sin(th_out), 1 - np.sin(th_in) - 0.5])
    X = np.stack([x, y], 1)[rng.permutation(n)] + 0.03 * rng.normal(size=(n, 2))
    return np.stack([(X[:, 0] + 0.3) * 2 - 1, (X[:, 1] + 0.3) * 3 - 1], 1)


def line(n, rng):
    """Uniform on the box [-2, 2] x [-4, 4]."""
    x = rng.uniform(-0.5, 0.5, n)
    y = rng.uniform(-1, 1, n)
    return np.stack([x, y], 1) * 4


def circle(n, rng):
    """16 tight blobs on the circle of radius 3 (plus about 4% at the origin)."""
    x = np.round(rng.uniform(-0.5, 0.5, n) / 2, 1) * 2
    y = np.round(rng.uniform(-0.5, 0.5, n) / 2, 1) * 2
    norm = np.sqrt(x**2 + y**2) + 1e-10
    x, y = x / norm, y / norm  # (0, 0) stays at the origin
    theta = 2 * np.pi * rng.uniform(0, 1, n)
    r = rng.uniform(0, 0.03, n)
    return np.stack([x + r * np.cos(theta), y + r * np.sin(theta)], 1) * 3


def dino(n, rng):
    """The 142 Datasaurus points, resampled with 0.15 jitter (in the original units), then rescaled."""
    pts = np.loadtxt(DINO_TSV, skiprows=1)
    ix = rng.integers(0, len(pts), n)
    x = pts[ix, 0] + 0.15 * rng.normal(size=n)
    y = pts[ix, 1] + 0.15 * rng.normal(size=n)
    return np.stack([(x / 54 - 1) * 4, (y / 48 - 1) * 4], 1)


DATASETS = {"circle": circle, "dino": dino, "line": line, "moons": moons}


def load_points(path):
    """A user's points: .npy, or text (.csv / .txt / .tsv) with two numeric columns."""
    if not os.path.isfile(path):
        raise ValueError(f"no data file at {path}; give a dataset name ({', '.join(DATASETS)}) or a path to an (N, 2) .csv, .txt or .npy file")
    try:
        if path.endswith(".npy"):
            X = np.load(path, allow_pickle=False)
        else:
            with open(path) as f:
                first = f.readline()
            delim = "," if "," in first else None
            with warnings.catch_warnings():  # an empty file is reported below, in one sentence
                warnings.simplefilter("ignore", UserWarning)
                X = np.loadtxt(path, delimiter=delim, ndmin=2)
    except ValueError as e:  # non-numeric text, a pickled .npy, ...
        raise ValueError(f"{path} is not a table of numbers ({str(e).splitlines()[0][:80]}); give two numeric columns x, y, no header") from None
    except (OSError, EOFError) as e:
        raise ValueError(f"{path} could not be read as points ({e}); give an (N, 2) .npy or a two-column text file") from None
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] != 2 or X.shape[0] == 0:
        raise ValueError(f"{path} holds an array of shape {X.shape}; it must have N >= 1 rows and exactly 2 columns")
    if not np.issubdtype(X.dtype, np.number):
        raise ValueError(f"{path} holds {X.dtype} values; it must hold numbers")
    if not np.isfinite(X).all():
        raise ValueError(f"{path} contains NaN or infinite values; remove those rows")
    return X.astype(np.float64)


def load_dataset(name, n=100_000, seed=42):
    """(n, 2) float64 points: a named dataset drawn with default_rng(seed), or a user's file as it is."""
    if name in DATASETS:
        return DATASETS[name](n, np.random.default_rng(seed))
    if os.path.splitext(name)[1].lower() in (".csv", ".txt", ".tsv", ".npy") or os.path.sep in name:
        return load_points(name)
    raise ValueError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)} or a path to a .csv, .txt or .npy file")
