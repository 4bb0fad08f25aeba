"""What a user would pick instead of a diffusion model, beside every NLL tinydiff reports: simple density models
fitted on the run's training rows and scored on the same held-out rows, in data units, each with the paired standard
error of the difference (model - baseline), point by point.

  gaussian   a full-covariance Gaussian; per class for labels; for numbers, a linear fit x = A c + b with a
             Gaussian residual
  kde        scipy's gaussian_kde, its bandwidth (a multiple of Scott's) chosen on a validation split of the training
             rows; per class for labels
  gmm        scikit-learn's GaussianMixture (full covariances, the number of components by BIC), where scikit-learn
             is installed; per class for labels

KDE and GMM are left out for numeric conditions (no conditional density in closed form here).
"""

import numpy as np
from scipy import stats

MAX_FIT = 20_000  # training rows a baseline is fitted on (a random subset beyond this), so that it costs seconds
KDE_FACTORS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5)  # multiples of Scott's factor tried on the validation split
GMM_COMPONENTS = (1, 2, 4, 8, 16, 32)
RIDGE = 1e-9  # times the mean variance, added to a covariance so that a flat direction does not make it singular


def gaussian(train, x, rng=None):
    """log N(x; mean, cov) of the training rows' moments."""
    D = train.shape[1]
    cov = np.cov(train.T, ddof=1).reshape(D, D)
    cov += RIDGE * max(np.trace(cov) / D, 1e-300) * np.eye(D)
    return stats.multivariate_normal(train.mean(0), cov).logpdf(x).reshape(len(x))


def kde(train, x, rng):
    """scipy's gaussian_kde at the bandwidth factor that scores best on a fifth of the training rows (at most
    2,000), fitted on the rest; then refitted on every row at that factor."""
    n, D = train.shape
    order = rng.permutation(n)
    val, fit = train[order[: min(n // 5, 2000)]], train[order[min(n // 5, 2000) :]]
    scott = len(fit) ** (-1 / (D + 4))
    score = lambda f: stats.gaussian_kde(fit.T, bw_method=scott * f).logpdf(val.T).mean()
    best = max(KDE_FACTORS, key=score)  # then the same multiple of Scott's factor for all n rows
    return stats.gaussian_kde(train.T, bw_method=best * n ** (-1 / (D + 4))).logpdf(x.T)


def gmm(train, x, rng):
    """scikit-learn's GaussianMixture with the number of components (at most a tenth of the rows) of lowest BIC."""
    from sklearn.mixture import GaussianMixture

    seed = int(rng.integers(2**31))
    ks = [k for k in GMM_COMPONENTS if k <= max(1, len(train) // 10)]
    fits = [GaussianMixture(k, covariance_type="full", reg_covar=1e-6, random_state=seed).fit(train) for k in ks]
    return min(fits, key=lambda g: g.bic(train)).score_samples(x)


def per_class(fit, train, train_y, x, y, rng):
    """fit(train rows of class k, held-out rows of class k) for every class the held-out rows hold."""
    out = np.empty(len(x))
    for k in np.unique(y):
        out[y == k] = fit(train[train_y == k], x[y == k], rng)
    return out


def linear_gaussian(train, c_train, x, c):
    """log N(x; A c + b, residual cov), A and b by least squares on the training rows."""
    design = lambda c: np.column_stack([c, np.ones(len(c))])
    coef = np.linalg.lstsq(design(c_train), train, rcond=None)[0]
    return gaussian(train - design(c_train) @ coef, x - design(c) @ coef)


def have_sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return False
    return True


def nll_baselines(train, x, model_nats, train_y=None, y=None, kind=None, seed=0):
    """{name: {nll_bits, diff_bits, diff_se}} for each baseline that applies: its mean NLL on the held-out rows x, and
    the model's NLL (model_nats, per point) minus it, with the paired standard error. A baseline that cannot be fitted
    on these rows (too few of a class, a flat direction) is left out with its reason in "skipped"."""
    rng = np.random.default_rng(seed)
    train, x = np.asarray(train, dtype=np.float64), np.asarray(x, dtype=np.float64)
    if len(train) > MAX_FIT:
        rows = rng.choice(len(train), MAX_FIT, replace=False)
        train, train_y = train[rows], None if train_y is None else np.asarray(train_y)[rows]
    fits = {"gaussian": gaussian, "kde": kde} | ({"gmm": gmm} if have_sklearn() else {})
    model_bits = np.asarray(model_nats, dtype=np.float64) / np.log(2)
    out, skipped = {}, {}
    for name, fit in fits.items():
        try:
            if kind == "numbers":
                if name != "gaussian":
                    continue
                logp = linear_gaussian(train, np.asarray(train_y, float), x, np.asarray(y, float))
            elif kind == "labels":
                logp = per_class(fit, train, np.asarray(train_y), x, np.asarray(y), rng)
            else:
                logp = fit(train, x, rng)
        except (np.linalg.LinAlgError, ValueError) as e:
            skipped[name] = " ".join(str(e).split())[:120]
            continue
        bits = -logp / np.log(2)
        diff = model_bits - bits
        if not np.isfinite(diff).all():
            skipped[name] = "its density is 0 at some held-out rows"
            continue
        se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else None
        out[name] = dict(nll_bits=float(bits.mean()), diff_bits=float(diff.mean()), diff_se=se)
    return out | ({"skipped": skipped} if skipped else {})


NAMES = {"gaussian": "a Gaussian", "kde": "a Gaussian KDE", "gmm": "a Gaussian mixture"}


def losses(baselines):
    """One line per baseline the model loses to by more than 2 paired standard errors."""
    return [
        f"note: {NAMES[k]} fits the held-out rows better than the model ({b['nll_bits']:.3f} bits per point; the "
        f"model's is higher by {b['diff_bits']:.3f} ± {b['diff_se']:.3f})"
        for k, b in baselines.items()
        if k in NAMES and b["diff_se"] is not None and b["diff_bits"] > 2 * b["diff_se"]
    ]
