"""Score generated points (any dimension D) against a dataset.

    python evaluate.py --samples out/dino-base/samples.npy --dataset dino
    python evaluate.py --out_dir out/dino-base            # samples from the checkpoint itself
    python evaluate.py --out_dir out/dino-base --sampler dpm++ --json

Metrics (train.py writes the same ones into metrics.json; this file is their one home):
  knn_kl   the study's kNN estimator of KL(data || samples), in bits (Wang, Kulkarni & Verdu 2009):
           k = 5, max-norm, in D dimensions: a named dataset's 100,000 training points against the samples,
           or a file's held-out points (references).
  hist_kl  grid-histogram KL(data || samples), in nats: 100 bins per coordinate for both sets, eps = 1e-6
           added to every bin's probability, scipy.stats.entropy. The grid (grid_box) is the study's
           [-5, 5] per coordinate for data that fill it (the named datasets), else the data's bounding
           box plus 5% on each side; samples outside it are dropped. D = 2: the 2-D histogram; D > 2:
           the mean over all D(D-1)/2 coordinate pairs of their 2-D marginals' KL ("pair hist KL",
           with hist_kl_pairs in metrics.json); D = 1: the 1-D histogram.
  floors   each metric for points the model never made: a fresh draw of the same size from a named
           dataset's generator (another seed), or a file's training points against its held-out ones.
           What a perfect model scores; the kNN estimator is biased, so floors can be < 0.
  per_class, fidelity   a class-conditional run: kNN KL per class, and the share of samples whose
           10 nearest training points mostly carry the label asked for, each with its floor.
  dcr_ratio, near_copy_frac   memorisation: distances to the nearest training point (memorisation).
  nll_bits, exact_kl_bits, data_entropy_bits   with --nll N: the likelihood of N unseen points
           (likelihood.py), and where the data's density is known, the exact KL and H(p).
  eval_loss, inference_s   with a checkpoint: noise-prediction MSE of the EMA model on held-out
           points with fixed seeds (in the model's standardized space for a user's file), and the
           time to draw the samples.
"""

import itertools
import os
import sys
import time

import numpy as np
import torch
from scipy.spatial import cKDTree
from scipy.stats import entropy

import baselines
import datasets
import runs
import tinydiff as td

KNN_K = 5
HIST_LIM, HIST_BINS, HIST_EPS = 5.0, 100, 1e-6
HELDOUT_SEED, FLOOR_SEED = 1, 2  # the training data use seed 42
CURVE_N = 2000  # samples per point of the KL-during-training curve


def check_samples(samples, dim=None):
    """Refuse a wrong shape (dim: the data's D); drop non-finite rows, returning them as a fraction (never silently)."""
    samples = np.asarray(samples)
    if np.iscomplexobj(samples) or not np.issubdtype(samples.dtype, np.number):
        raise ValueError(f"samples hold {samples.dtype} values; they must be real numbers")
    samples = samples.astype(np.float64)
    if samples.ndim != 2 or (dim is not None and samples.shape[1] != dim):
        raise ValueError(
            f"samples have shape {samples.shape}; they must be an (N, {dim or 'D'}) array of points, as many "
            "coordinates as the data"
        )
    finite = np.isfinite(samples).all(1)
    if not finite.any():
        raise ValueError("every sample is NaN or infinite; the model diverged, so retrain it (a lower --lr helps)")
    return samples[finite], 1.0 - finite.mean()


def knn_kl(data, samples, k=KNN_K, data_tree=None, rho=None):
    """KL(data || samples) in bits: [ln m - ln(n-1) + d (mean ln nu_k - mean ln rho_k)] / ln 2.

    rho_k: max-norm distance from each data point to its k-th nearest other data point;
    nu_k: to its k-th nearest sample. Pass data_tree / rho to reuse them across calls. NaN where a
    distance is 0 (k exact duplicates: rounded data, or samples that copy a point): the estimator is
    undefined there, and any floor put under log(0) would only pick the answer (knn_kl_warning says why).
    """
    n, d = data.shape
    m = len(samples)
    if rho is None:
        data_tree = data_tree or cKDTree(data)
        rho = data_tree.query(data, k=k + 1, p=np.inf)[0][:, k]  # k+1: the nearest is the point itself
    nu = cKDTree(samples).query(data, k=k, p=np.inf)[0][:, k - 1]
    if not (rho > 0).all() or not (nu > 0).all():
        return float("nan")
    return (np.log(m) - np.log(n - 1) + d * (np.log(nu).mean() - np.log(rho).mean())) / np.log(2)


def knn_kl_warning(data, samples, rho, k=KNN_K):
    """Why the kNN KL is undefined for these points, in one sentence (None when it is defined)."""
    dup = int((rho == 0).sum())
    if dup:
        return (
            f"{dup} of {len(data)} data points have {k} or more exact duplicates (rounded or discrete data), where "
            "the kNN KL divides by a"
            " zero distance; it is left out (null): compare hist KL, or add noise below the data's resolution"
        )
    on = int((cKDTree(samples).query(data, k=k, p=np.inf)[0][:, k - 1] == 0).sum())
    return (
        (
            f"{k} or more samples fall exactly on {on} of the data points (a model that copies its training points?), "
            "where the kNN KL"
            " divides by a zero distance; it is left out (null)"
        )
        if on
        else None
    )


def grid_box(data):
    """(lo, hi) per coordinate for the histogram and the plots: the study's square [-5, 5] when the data
    lie inside it and span at least 2 in every coordinate (the named datasets do), else the data's
    bounding box widened by 5% on each side, so that valid data never fall off the grid."""
    lo, hi = data.min(0), data.max(0)
    if (lo >= -HIST_LIM).all() and (hi <= HIST_LIM).all() and (hi - lo >= 2).all():
        return np.full(data.shape[1], -HIST_LIM), np.full(data.shape[1], HIST_LIM)
    pad = np.maximum(
        0.05 * (hi - lo), 1e-6 * np.maximum(np.abs(lo), np.abs(hi)) + 1e-12
    )  # > 0 for a constant coordinate too
    return lo - pad, hi + pad


def hist_kl(data, samples, box=None, bins=HIST_BINS, eps=HIST_EPS):
    """KL(data || samples) in nats over a grid on box (default grid_box(data)), both histograms
    eps-smoothed. For D > 2, the mean over coordinate pairs of the 2-D marginals' KL: a joint grid of
    100^D bins would be almost empty."""
    lo, hi = grid_box(data) if box is None else box
    if data.shape[1] > 2:
        pairs = [list(p) for p in itertools.combinations(range(data.shape[1]), 2)]
        return float(np.mean([hist_kl(data[:, p], samples[:, p], (lo[p], hi[p]), bins, eps) for p in pairs]))
    edges = [np.linspace(a, b, bins + 1) for a, b in zip(lo, hi)]
    p = np.histogramdd(data, bins=edges)[0].ravel()
    q = np.histogramdd(samples, bins=edges)[0].ravel()
    # flattened to 1-D: scipy.stats.entropy sums over axis 0 only, which is wrong for a 2-D histogram
    return float(entropy(p / p.sum() + eps, q / max(q.sum(), 1) + eps))


def compute_metrics(data, samples, floor_samples=None, density=True):
    """The KL metrics (and their floors, if floor_samples is given) for one set of samples; density=False (discrete
    data, discrete_warning): the kNN KL and its floor are null."""
    samples, bad = check_samples(samples, data.shape[1])
    if len(data) <= KNN_K:
        raise ValueError(
            f"{len(data)} data points are too few to score (the kNN KL uses {KNN_K} nearest neighbours); give more "
            f"than {KNN_K}"
        )
    if len(samples) < KNN_K:
        raise ValueError(
            f"only {len(samples)} samples are finite, too few to score; the model diverged, so retrain it (a lower "
            "--lr helps)"
            if bad
            else f"{len(samples)} samples are too few to score (the kNN KL uses {KNN_K} nearest neighbours); draw at "
            f"least {KNN_K}"
        )
    rho = cKDTree(data).query(data, k=KNN_K + 1, p=np.inf)[0][:, KNN_K]
    knn = (lambda x: float(knn_kl(data, x, rho=rho))) if density else (lambda x: None)
    out = dict(
        knn_kl_bits=knn(samples), hist_kl_nats=hist_kl(data, samples), nonfinite_frac=float(bad), n_samples=len(samples)
    )
    warning = knn_kl_warning(data, samples, rho) if density else None
    if warning:
        out["warnings"] = [warning]
    if floor_samples is not None:
        out["knn_kl_floor"] = knn(floor_samples)
        out["hist_kl_floor"] = hist_kl(data, floor_samples)
    if data.shape[1] > 2:  # say what hist_kl_nats is
        out["hist_kl_pairs"] = data.shape[1] * (data.shape[1] - 1) // 2
    return out


def floor_draw(dataset, m):
    """A fresh draw of m points from a named dataset's generator, or None for a user's file."""
    return datasets.load_dataset(dataset, n=m, seed=FLOOR_SEED) if dataset in datasets.DATASETS else None


def heldout_points(dataset, data, n=10_000):
    """(points, conditions) for the eval loss: a fresh draw of a named dataset, a file's held-out points
    (its training points when it holds none out)."""
    if dataset in datasets.DATASETS:
        return (
            datasets.load_labeled(dataset, n, HELDOUT_SEED)[:2]
            if data.kind == "labels"
            else (datasets.load_dataset(dataset, n, HELDOUT_SEED), None)
        )
    points, cond = (data.points, data.cond) if data.held is None else (data.held, data.held_cond)
    return points[:n], None if cond is None else cond[:n]


COPYING = 0.5  # a dcr_ratio below this is copying: the kNN KL is then marked unreliable, with a warning
NEAR_COPY = 0.1  # a sample nearer a training point than this share of fresh points' median distance is a near-copy
INTEGER_LEVELS = 256  # integer coordinates with at most this many values each are discrete data (pixels, counts)
REPEATS = 0.01  # data with more than this share of repeated rows are discrete: the kNN KL and the NLL assume a density


def discrete_warning(data, dataset):
    """Why the kNN KL and the NLL mean nothing for a file's points (None when they may have a density): rows repeated
    exactly, as rounded or discrete data have, put atoms in the data, against which a model's density can score any
    number (a model that puts narrow peaks on them scores far below 0 bits). The named datasets have densities."""
    if dataset in datasets.DATASETS:
        return None
    points = data.points if data.held is None else np.vstack([data.points, data.held])
    repeated = len(points) - len(np.unique(points, axis=0))
    levels = max(len(np.unique(column)) for column in points.T)
    if (points == np.round(points)).all() and levels <= INTEGER_LEVELS:
        return (
            f"every coordinate of the data is an integer with at most {levels} values (pixels, counts), where the kNN "
            "KL and the NLL, which assume a density, mean nothing; they are left out (null): train with --dequantize"
        )
    if repeated <= REPEATS * len(points):
        return None
    return (
        f"{repeated} of the data's {len(points)} rows repeat another exactly (rounded or discrete data), where the "
        "kNN KL and the NLL, which assume a density, mean nothing; they are left out (null): compare hist KL, or "
        "train with --dequantize if the values are integers"
    )


VOTE_K = 10  # neighbours in the class-fidelity vote


def references(data, dataset, n):
    """What n samples are scored against: (points, conditions) of the reference and of the floor. A named dataset:
    its training draw and a fresh draw; a file: its held-out points and a training subsample of the same size, or every
    training point when there are fewer (the same estimator, given points the model never made); a file with nothing
    held out: its points, no floor."""
    if dataset in datasets.DATASETS:
        fresh = (
            datasets.load_labeled(dataset, n, FLOOR_SEED)[:2]
            if data.kind == "labels"
            else (floor_draw(dataset, n), None)
        )
        return (data.points, data.cond), fresh
    if data.held is None:
        return (data.points, data.cond), (None, None)
    rows = np.random.default_rng(FLOOR_SEED).choice(len(data.points), min(n, len(data.points)), replace=False)
    return (data.held, data.held_cond), (data.points[rows], None if data.cond is None else data.cond[rows])


def sample_conditions(model, data, ref_cond, n, seed=0):
    """The conditions to sample n points with: labels in the training shares, or the reference's numbers."""
    if data.kind == "labels":
        return td.draw_labels(model, n, torch.Generator().manual_seed(seed))
    if data.kind == "numbers":
        return torch.as_tensor(
            ref_cond[np.random.default_rng(seed).integers(len(ref_cond), size=n)], dtype=torch.float64
        )
    return None


def unit_scale(points):
    """Each coordinate's sd, or 1 for a constant one: distances in units of the data's spread."""
    sd = points.std(0)
    return np.where(sd > 0, sd, 1.0)


def class_metrics(data, ref, floor, samples, labels, floor_in_training=False, density=True):
    """Per class k: kNN KL of class k's samples against class k's reference points, and class fidelity, the share
    of class-k samples whose VOTE_K nearest training points are mostly labelled k; each with its floor (the floor
    points scored alike; floor_in_training: they are training points, whose own vote is left out).
    Returns {class name: {...}} and the overall fidelity with its floor."""
    scale = unit_scale(data.points)
    tree = cKDTree(data.points / scale)
    votes = lambda x, skip: data.cond[tree.query(x / scale, k=VOTE_K + skip)[1][:, skip:]]
    vote = lambda x, skip=0: np.array([np.bincount(row, minlength=len(data.names)).argmax() for row in votes(x, skip)])
    won, won_floor = (
        vote(samples) == labels,
        None if floor[0] is None else vote(floor[0], int(floor_in_training)) == floor[1],
    )
    per_class = {}
    for k, name in enumerate(data.names):
        mine, theirs = samples[labels == k], ref[0][ref[1] == k]
        row = dict(n=int(len(mine)), fidelity=float(won[labels == k].mean()) if len(mine) else None)
        row["knn_kl_bits"] = (
            float(knn_kl(theirs, mine)) if density and len(mine) > KNN_K and len(theirs) > KNN_K else None
        )
        if floor[0] is not None:
            f = floor[0][floor[1] == k]
            row["knn_kl_floor"] = (
                float(knn_kl(theirs, f)) if density and len(f) > KNN_K and len(theirs) > KNN_K else None
            )
            row["fidelity_floor"] = float(won_floor[floor[1] == k].mean()) if len(f) else None
        per_class[name] = row
    return per_class, float(won.mean()), None if won_floor is None else float(won_floor.mean())


def memorisation(train, samples, fresh):
    """Distance to the nearest training point (in units of the data's sd per coordinate) of each sample, against
    the same for points the model never saw. dcr_ratio = the ratio of their medians: about 1 without copying,
    well below 1 when samples copy training points. near_copy_frac: the share of samples nearer than NEAR_COPY
    times the fresh points' median (near_copy_ref: the fresh points' own share, what no copying gives)."""
    scale = unit_scale(train)
    tree = cKDTree(train / scale)
    d_samples, d_fresh = (tree.query(x / scale)[0] for x in (samples, fresh))
    median, copies = np.median(d_fresh), int((d_fresh == 0).sum())
    if copies:  # duplicated rows: the unseen points are not unseen, and a distance of 0 is no yardstick
        return dict(
            dcr_ratio=None,
            near_copy_frac=None,
            near_copy_ref=None,
            warnings=[
                f"{copies} of the {len(fresh)} held-out points are exact copies of training points (duplicated rows), "
                "so the memorisation"
                " check has no unseen points to compare with; dcr_ratio and the near-copy share are left out (null)"
            ],
        )
    out = dict(
        dcr_ratio=float(np.median(d_samples) / median),
        near_copy_frac=float((d_samples < NEAR_COPY * median).mean()),
        near_copy_ref=float((d_fresh < NEAR_COPY * median).mean()),
    )
    if out["dcr_ratio"] < COPYING:  # a model that copies its training rows scores a kNN KL below any honest one
        out["knn_kl_reliable"] = False
        out["warnings"] = [
            f"the samples copy the training points (dcr_ratio {out['dcr_ratio']:.3f}, below {COPYING}: their median "
            f"distance to the nearest training point is {out['dcr_ratio']:.0%} of unseen points'; "
            f"{out['near_copy_frac']:.0%} are near-copies), so the kNN KL, which rewards copying, is unreliable "
            "here: train for fewer steps, or on more points"
        ]
    return out


def progress_lines(what, every=5.0):
    """A progress(done, total) that prints a line on stderr at most every `every` seconds."""
    start = last = time.perf_counter()

    def report(done, total):
        nonlocal last
        if (now := time.perf_counter()) - last >= every:
            last = now
            print(f"{what}: {done:,.0f} of {total:,} points ({now - start:.0f} s)", file=sys.stderr, flush=True)

    return report


def likelihood_metrics(model, scheduler, data, dataset, n, device):
    """NLL (bits per point, the probability-flow ODE's density) of n points the model never saw: held-out points
    of a file, a fresh draw of a named dataset; where the data's density is known, also the exact KL(p || q) =
    E_p[log p - log q] on the same points, and the data's entropy H(p)."""
    import likelihood

    runs.check_nll(dataset, data, n)
    x, y = heldout_points(dataset, data, n)
    if len(x) < n:
        print(
            f"note: --nll {n} asks for more points than the {len(x)} held out; the NLL scores those {len(x)}",
            file=sys.stderr,
        )
    y_t = None if y is None else torch.as_tensor(y, dtype=torch.long if data.kind == "labels" else torch.float64)
    t0 = time.perf_counter()
    nats = likelihood.nll(model.to(device), scheduler.to(device), x, y=y_t, progress=progress_lines("NLL"))
    out = {**likelihood.summarize(nats, x.shape[1]), "nll_points": len(x), "nll_s": time.perf_counter() - t0}
    # the same held-out rows under what a user would pick instead, fitted on the run's training rows
    out["nll_baselines"] = baselines.nll_baselines(data.points, x, nats, data.cond, y, data.kind)
    if dataset in datasets.DENSITIES:
        gap = (datasets.log_density(dataset, x, y) + nats) / np.log(2)  # log p - log q, in bits, point by point
        out.update(exact_kl_bits=float(gap.mean()), exact_kl_se=float(gap.std(ddof=1) / np.sqrt(len(gap))))
        if y is None:
            out["data_entropy_bits"], out["data_entropy_se"] = datasets.entropy_bits(dataset)
        else:  # H(x | class): the mean of -log2 p(x | class) over a fresh labelled draw
            X, labels, _ = datasets.load_labeled(dataset, 200_000, 7)
            bits = -datasets.log_density(dataset, X, labels) / np.log(2)
            out["data_entropy_bits"], out["data_entropy_se"] = (
                float(bits.mean()),
                float(bits.std() / np.sqrt(len(bits))),
            )
    return out


def score(model, scheduler, data, dataset, n, device, seed=0, guidance=1.0, nll=0, **sampling):
    """Sample n points from a model (with conditions as sample_conditions draws them) and score them: the KL
    metrics with floors, per class for labels, memorisation, eval loss, and (nll > 0) the likelihood.
    Returns (samples, their conditions, metrics)."""
    ref, floor = references(data, dataset, n)
    cond = sample_conditions(model, data, ref[1], n, seed)
    samples, seconds = timed_sample(model, scheduler, n, device, seed, y=cond, guidance=guidance, **sampling)
    metrics, samples, cond = score_points(data, dataset, ref, floor, samples, cond)
    metrics.update(inference_s=seconds, eval_loss=eval_loss(model, scheduler, *heldout_points(dataset, data), device))
    if nll and guidance != 1:
        metrics["warnings"] = metrics.get("warnings", []) + [
            f"the NLL and the exact KL score the conditional model (w = 1): guidance at w = {guidance:g} mixes two "
            "flows and has no density of its own"
        ]
    if nll and discrete_warning(data, dataset) is None:
        import likelihood

        try:
            metrics.update(likelihood_metrics(model, scheduler, data, dataset, nll, device))
        except likelihood.StiffFlow as e:  # the samples' metrics stand; the NLL is null, with the reason
            metrics["nll_bits"] = None
            metrics["warnings"] = metrics.get("warnings", []) + [str(e)]
    elif nll:
        metrics["nll_bits"] = None
    return samples, None if cond is None else cond.numpy(), metrics


def score_points(data, dataset, ref, floor, samples, cond=None):
    """The metrics of given samples (and their conditions) against the reference and floor of references(): the KL
    metrics, per class for labels, memorisation; those that assume a density are null for discrete data, with the
    warning. Returns (metrics, the finite samples, their conditions)."""
    discrete = discrete_warning(data, dataset)
    metrics = compute_metrics(ref[0], samples, floor[0], density=discrete is None)
    finite = np.isfinite(samples).all(
        1
    )  # compute_metrics counted and dropped the others; the checks below use the rest
    samples, cond = samples[finite], None if cond is None else cond[torch.as_tensor(finite)]
    if data.kind == "labels":
        metrics["per_class"], metrics["fidelity"], metrics["fidelity_floor"] = class_metrics(
            data, ref, floor, samples, cond.numpy(), dataset not in datasets.DATASETS, density=discrete is None
        )
    warnings = metrics.pop("warnings", []) + ([discrete] if discrete else [])
    fresh = floor[0] if dataset in datasets.DATASETS else data.held
    if fresh is not None:
        memo = memorisation(data.points, samples, fresh)
        warnings += memo.pop("warnings", [])
        metrics.update(memo)
    return ({**metrics, "warnings": warnings} if warnings else metrics), samples, cond


@torch.no_grad()
def eval_loss(model, scheduler, points, cond, device, seed=0, batch_size=None):
    """Noise-prediction MSE on the given points (with their conditions, never dropped), t ~ U{0..T-1} and noise
    from a fixed seed. With a batch_size: the mean of the per-batch losses over one pass, as the study reports it."""
    g = torch.Generator(device=device).manual_seed(seed)
    x0 = torch.as_tensor(points, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    numbers = (
        torch.float32 if device.type == "mps" else torch.float64
    )  # conditions far from 0 are standardised in float64
    y = (
        None
        if cond is None
        else torch.as_tensor(cond, device=device, dtype=numbers if np.asarray(cond).ndim == 2 else torch.long)
    )
    T, losses, size = scheduler.num_train_timesteps, [], batch_size or len(x0)
    for i, b in enumerate(x0.split(size)):
        t = td.sample_timesteps(len(b), T, low_frac=0.0, generator=g, device=device)
        losses.append(
            td.ddpm_loss(
                model,
                scheduler,
                b,
                t,
                generator=g,
                y=None if y is None else y[i * size : i * size + len(b)],
                p_uncond=0.0,
            )
        )
    return float(torch.stack(losses).mean())


class CurveEval:
    """kNN KL of a model during training: CURVE_N samples from DPM-Solver++ with 20 steps and a fixed seed (with
    conditions as score draws them), against the points score() uses. The reference's kNN radii and the floor for
    this sample size are computed once."""

    def __init__(self, data, dataset, device):
        self.data, self.device = data, device
        (self.ref, self.ref_cond), (floor, _) = references(data, dataset, CURVE_N)
        self.rho = cKDTree(self.ref).query(self.ref, k=KNN_K + 1, p=np.inf)[0][:, KNN_K]
        self.density = discrete_warning(data, dataset) is None  # else the kNN KL means nothing: NaN, without sampling
        self.floor = None if floor is None or not self.density else float(knn_kl(self.ref, floor, rho=self.rho))

    def __call__(self, model, scheduler):
        if not self.density:
            return float("nan")
        g = torch.Generator(device=self.device).manual_seed(0)
        y = sample_conditions(model, self.data, self.ref_cond, CURVE_N)
        x = td.sample(model, scheduler, CURVE_N, "dpm++", generator=g, device=self.device, y=y).cpu().numpy()
        x, _ = check_samples(x)
        return float(knn_kl(self.ref, x, rho=self.rho))


def timed_sample(model, scheduler, n, device, seed=0, **kw):
    """Draw n samples with a fixed seed; return them (numpy) and the seconds it took."""
    g = torch.Generator(device=device).manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    x = td.sample(model, scheduler, n, generator=g, device=device, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return x.cpu().numpy(), time.perf_counter() - t0


def format_table(metrics):
    hist = (
        "pair hist KL (nats)" if "hist_kl_pairs" in metrics else "hist KL (nats)"
    )  # D > 2: the mean over the 2-D marginals
    value = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) and np.isfinite(v) else "n/a"
    rows = [
        ("kNN KL (bits)", "knn_kl_bits", "knn_kl_floor"),
        (hist, "hist_kl_nats", "hist_kl_floor"),
        ("class fidelity", "fidelity", "fidelity_floor"),
        ("dcr_ratio", "dcr_ratio", None),
        ("near-copy share", "near_copy_frac", "near_copy_ref"),
        ("NLL (bits/point)", "nll_bits", None),
        ("exact KL (bits)", "exact_kl_bits", None),
        ("H(data) (bits)", "data_entropy_bits", None),
    ]
    for name, b in metrics.get("nll_baselines", {}).items():
        if name in baselines.NAMES:
            metrics = {**metrics, f"nll_{name}": b["nll_bits"], f"nll_{name}_diff": b}
            rows.append((f"NLL, {name} (bits)", f"nll_{name}", None))
    classes = [f"  {name} kNN KL" for name in metrics.get("per_class", {})]
    w = max([20] + [len(c) + 1 for c in classes])  # class names in full: two names may share their first letters
    lines = [f"{'metric':<{w}}{'value':>10}{'floor':>10}"]
    for name, key, floor in rows:
        if key in metrics:
            se = metrics.get(
                {"nll_bits": "nll_bits_se", "exact_kl_bits": "exact_kl_se", "data_entropy_bits": "data_entropy_se"}.get(
                    key, ""
                )
            )
            diff = metrics.get(f"{key}_diff")
            lines.append(
                f"{name:<{w}}{value(metrics[key]):>10}{value(metrics.get(floor)) if floor else '':>10}"
                + (f"   ± {se:.4f} (1 se)" if se else "")
                + (f"   model − it: {diff['diff_bits']:+.4f} ± {diff['diff_se']:.4f} (paired)" if diff else "")
            )
    for label, row in zip(classes, metrics.get("per_class", {}).values()):
        lines.append(
            f"{label:<{w}}{value(row['knn_kl_bits']):>10}{value(row.get('knn_kl_floor')):>10}"
            f"   fidelity {value(row['fidelity'])} (floor {value(row.get('fidelity_floor'))}), {row['n']} samples"
        )
    for key in (
        "eval_loss",
        "inference_s",
        "nonfinite_frac",
        "n_samples",
        "hist_kl_pairs",
        "holdout",
        "nll_points",
        "nll_s",
    ):
        if key in metrics:
            v = metrics[key]
            lines.append(f"{key:<{w}}{v:>10}" if isinstance(v, int) else f"{key:<{w}}{v:>10.4g}")
    return "\n".join(lines + baselines.losses(metrics.get("nll_baselines", {})))


@runs.script
def main(argv=None):
    p = runs.ArgumentParser(description="Score samples against a dataset (KL metrics with floors, eval loss).")
    p.add_argument("--samples", help="an (N, D) .npy of samples to score")
    p.add_argument("--out_dir", help="a run directory: sample from its ckpt.pt (EMA weights)")
    p.add_argument("--ckpt", help="a checkpoint file to sample from (instead of --out_dir)")
    p.add_argument("--dataset", help="dataset name or data file (default: the checkpoint's)")
    p.add_argument("--n", type=int, default=10_000, help="samples to draw from a checkpoint")
    p.add_argument("--sampler", choices=td.SAMPLERS, default="ddpm", help="sampler for a checkpoint")
    p.add_argument(
        "--sample_steps", "--steps", type=int, default=None, help="network evaluations (default: all T; dpm++: 20)"
    )
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta in [0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        help="guidance weight w for a conditional checkpoint (1: conditional, 0: unconditional)",
    )
    p.add_argument(
        "--nll",
        type=int,
        nargs="?",
        const=1000,
        default=0,
        help="also the exact NLL of this many held-out points (--nll alone: 1000)",
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=None,
        help="with --samples and a data file: the share of its rows the run held out (train.py's --holdout, default "
        "0.1)",
    )
    p.add_argument("--json", action="store_true", help="print strict JSON on stdout instead of a table")
    args = p.parse_args(argv)
    try:
        runs.check_sampling_flags(args)
        if args.holdout is not None and not (args.samples and 0 <= args.holdout <= 0.5):
            raise ValueError(
                f"--holdout must lie in [0, 0.5], such as 0.1, got {args.holdout}"
                if args.samples
                else "--holdout applies to --samples with a data file; a run's held-out rows are in its checkpoint"
            )
        metrics = run(args)
    except (ValueError, OSError) as e:
        runs.fail(str(e))
    for w in metrics.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    print(runs.to_json(metrics) if args.json else format_table(metrics))


def run(args):
    torch.set_num_threads(1)  # fastest for this model size on small CPUs; see README
    metrics = {}
    if args.samples:
        if args.nll:
            raise ValueError(
                "--nll scores a checkpoint's model, and --samples holds points only; give --out_dir instead"
            )
        if not os.path.isfile(args.samples):
            raise ValueError(
                f"no samples file at {runs.quote(args.samples)}; write one with `python sample.py --out_dir out/<run>`"
            )
        samples = datasets.read_npy(
            args.samples, datasets.check_file(args.samples)
        )  # a forged header is refused before it allocates
        dataset = args.dataset
        if dataset is None:
            raise ValueError("say which data the samples should match with --dataset (a name or a data file)")
        return score_samples(samples, dataset, 0.1 if args.holdout is None else args.holdout)
    else:
        if not (args.ckpt or args.out_dir):
            raise ValueError("give --samples X.npy, or --out_dir / --ckpt to sample from a checkpoint")
        ckpt = runs.load_checkpoint(args.ckpt or os.path.join(args.out_dir, "ckpt.pt"))
        model, scheduler = runs.model_from_checkpoint(ckpt)
        steps = runs.sampler_steps(args.sampler, args.sample_steps, scheduler.num_train_timesteps)
        runs.check_flag_memory("--n", args.n, args.n * model.cfg.data_dim * 64)
        dataset = args.dataset or runs.run_dataset(ckpt)
        if args.dataset is None and dataset not in datasets.DATASETS and not os.path.isfile(dataset):
            raise ValueError(
                f"the run's data file {runs.quote(dataset)} (recorded as {ckpt['data'].get('path') or dataset}) is "
                "not found from here;"
                " give its path with --dataset"
            )
        a = ckpt["args"]
        data = runs.run_data(dataset, a)
        if "meaning" in ckpt["data"] and data.fingerprint.get("meaning") != ckpt["data"]["meaning"]:
            raise ValueError(
                f"{dataset}'s class or column names have changed since the run was trained on it, so its classes "
                "would be scored by position under other names; restore the names, or give --dataset the file as it was"
            )
        if data.points.shape[1] != model.cfg.data_dim:
            raise ValueError(
                f"{dataset} holds {data.points.shape[1]}-D points but the checkpoint's model makes "
                f"{model.cfg.data_dim}-D ones;"
                " score it against the data it was trained on (leave out --dataset)"
            )
        runs.check_guidance(args.guidance, model.conditional, a.get("p_uncond"))
        if note := runs.unfinished(ckpt, "scores"):
            metrics["unfinished"] = note
        model.eval()
        _, _, scored = score(
            model,
            scheduler,
            data,
            dataset,
            args.n,
            torch.device("cpu"),
            args.seed,
            args.guidance,
            args.nll,
            sampler=args.sampler,
            steps=steps,
            eta=args.eta,
        )
        if data.fingerprint["sha256"] != ckpt["data"]["sha256"] and scored.get("dcr_ratio") is not None:
            scored.update(dcr_ratio=None, near_copy_frac=None, near_copy_ref=None)
            scored["warnings"] = scored.get("warnings", []) + [
                f"{dataset} holds other points than the run trained on, so the memorisation check cannot measure "
                "copying of its training"
                " points; dcr_ratio and the near-copy share are left out (null)"
            ]
        return {**scored, **metrics, "dataset": dataset}


def score_samples(samples, dataset, holdout):
    """Score a .npy of samples as train.py scores its own: against a named dataset's training draw with a fresh
    draw's floor, or against the file's held-out rows (the split train.py made with this --holdout) with a
    training subsample's floor; memorisation against either. An unconditional model's samples."""
    data = runs.load_data(dataset, holdout=holdout)
    if data.note:
        print(f"note: {data.note}", file=sys.stderr)
    D = data.points.shape[1]
    if np.ndim(samples) == 2 and np.shape(samples)[1] == D - 1:
        raise ValueError(
            f"the samples have {D - 1} coordinates and {dataset} has {D} columns; if one column is a label or a "
            "condition, score the run itself (evaluate.py --out_dir RUN), which knows its columns"
        )
    n = len(check_samples(samples, D)[0])
    ref, floor = references(data, dataset, n)
    return {**score_points(data, dataset, ref, floor, samples)[0], "dataset": dataset}


if __name__ == "__main__":
    main()
