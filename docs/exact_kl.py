"""The study's kNN KL beside the exact KL, for one seed of each grid configuration, and whether they rank alike.

    python sweep.py --seeds 1 --nll 1000 --out_dir results/exact-kl     # the grid, with --nll 1000 for every run
    python docs/exact_kl.py results/exact-kl                            # writes results/exact-kl/exact-kl.md
    python docs/exact_kl.py results/exact-kl results/tinydiff           # ... and how well the runs reproduce that
    grid's seed 0

exact KL = mean over 1,000 fresh points x ~ p of log2 p(x) - log2 q(x), q the model's probability-flow density
(likelihood.py), p the dataset's exact density (datasets.log_density); its standard error is over the points.
Rank agreement: Kendall's tau between the two orderings of the configurations (scipy.stats.kendalltau).

The ODE's density is that of the data smoothed by N(0, sigma_bar_0^2 I), sigma_bar_0 = sqrt(beta_0 / (1 - beta_0)), 0.01
for both presets' schedules (the first timestep's noise, likelihood.py): even a perfect noise predictor scores KL(p || p
* N(0, sigma_bar_0^2 I)) > 0. smoothing_floor() computes that floor by Monte Carlo where the smoothed density has a
closed form.
"""

import glob
import json
import os
import sys

import numpy as np
from scipy.stats import kendalltau, norm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import runs  # noqa: E402
import tinydiff as td  # noqa: E402

CONFIG_NAMES = list(runs.CONFIGS)


def sigma_0(num_timesteps, beta_schedule):
    """sigma_bar_0 = sqrt((1 - alpha_bar_0) / alpha_bar_0) of the runs' noise schedule."""
    ab_0 = td.NoiseScheduler(num_timesteps, beta_schedule=beta_schedule).alphas_cumprod[0].item()
    return ((1 - ab_0) / ab_0) ** 0.5


def smoothing_floor(name, sigma, n=200_000, seed=5):
    """(KL(p || p * N(0, sigma^2 I)) in bits, its standard error) by Monte Carlo over n points of p, or None where the
    smoothed density has no closed form here (circle)."""
    x = datasets.load_dataset(name, n, seed)
    widen = lambda sd: np.sqrt(np.asarray(sd) ** 2 + sigma**2)
    if name == "line":  # the box convolved with the Gaussian: a product of differences of normal CDFs
        smooth = sum(
            np.log((norm.cdf((h - v) / sigma) - norm.cdf((-h - v) / sigma)) / (2 * h)) for v, h in zip(x.T, (2, 4))
        )
    elif name == "dino":
        pts = np.loadtxt(datasets.DINO_TSV, skiprows=1)
        centres, sd = (
            np.stack([(pts[:, 0] / 54 - 1) * 4, (pts[:, 1] / 48 - 1) * 4], 1),
            np.array([0.15 * 4 / 54, 0.15 * 4 / 48]),
        )
        smooth = datasets.gaussian_mixture_log_density(x, centres, widen(sd), np.full(len(pts), 1 / len(pts)))
    elif name in ("moons", "ring8"):  # Gaussian noise around the curves or centres: the smoothing widens it
        key = "MOONS_SD" if name == "moons" else "RING8_SD"
        saved = getattr(datasets, key)
        setattr(datasets, key, tuple(widen(saved)) if name == "moons" else float(widen(saved)))
        try:
            smooth = datasets.log_density(name, x)
        finally:
            setattr(datasets, key, saved)
    else:
        return None
    gap = (datasets.log_density(name, x) - smooth) / np.log(2)
    return gap.mean(), gap.std() / np.sqrt(n)


def reproduction(rows, grid):
    """One line per backbone: the largest |kNN KL difference| between these runs and the same runs of another grid,
    and whether either side was compiled (compiled kernels round differently, so such pairs need not match to the
    bit)."""
    gaps = {}
    for (dataset, config), m in rows.items():
        path = os.path.join(grid, f"{dataset}-{config}-s{m['args']['seed']}", "metrics.json")
        if os.path.exists(path):
            other = json.load(open(path))
            compiled = {bool(m["args"].get("compile")), bool(other["args"].get("compile"))}
            gaps.setdefault((config, " / ".join(sorted({"compiled" if c else "eager" for c in compiled}))), []).append(
                abs(m["knn_kl_bits"] - other["knn_kl_bits"])
            )
    in_order = sorted(gaps.items(), key=lambda kv: CONFIG_NAMES.index(kv[0][0]))
    return [
        f"- {config} ({mode}, {len(g)} datasets): largest |difference| {max(g):.1e} bits"
        for (config, mode), g in in_order
    ]


def main(folder, grid=None):
    rows = {}
    for path in glob.glob(os.path.join(folder, "*", "metrics.json")):
        m = json.load(open(path))
        if "exact_kl_bits" in m:
            rows[m["dataset"], m["config"]] = m
    lines = [
        "| dataset | configuration | kNN KL (bits) | kNN floor | exact KL (bits) | ± se | NLL (bits/point) | H(p) "
        "(bits) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for dataset in sorted({d for d, _ in rows}):
        have = [c for c in CONFIG_NAMES if (dataset, c) in rows]
        for c in have:
            m = rows[dataset, c]
            lines.append(
                f"| {dataset} | {c} | {m['knn_kl_bits']:.4f} | {m['knn_kl_floor']:.4f} | {m['exact_kl_bits']:.4f} | "
                f"{m['exact_kl_se']:.4f} "
                f"| {m['nll_bits']:.3f} | {m['data_entropy_bits']:.3f} |"
            )
        if len(have) > 2:
            knn, exact = (
                [rows[dataset, c]["knn_kl_bits"] for c in have],
                [rows[dataset, c]["exact_kl_bits"] for c in have],
            )
            tau = kendalltau(knn, exact)
            best_knn, best_exact = have[knn.index(min(knn))], have[exact.index(min(exact))]
            spread = max(exact) - min(exact)
            se = max(rows[dataset, c]["exact_kl_se"] for c in have)
            verdicts.append(
                f"- {dataset}: Kendall's tau {tau.statistic:.2f} (p = {tau.pvalue:.2f}) over {len(have)} "
                "configurations; best by kNN KL "
                f"{best_knn}, by exact KL {best_exact}; exact KL spans {spread:.4f} bits, its largest standard error "
                f"is {se:.4f}"
            )
    schedules = {(m["args"]["num_timesteps"], m["args"]["beta_schedule"]) for m in rows.values()}
    if len(schedules) != 1:
        sys.exit(f"error: the runs in {folder} use {len(schedules)} noise schedules; one grid has one")
    sigma = sigma_0(*schedules.pop())
    floors = [
        f"- {d}: {f[0]:.4f} ± {f[1]:.4f} bits"
        for d in sorted({d for d, _ in rows})
        if (f := smoothing_floor(d, sigma)) is not None
    ]
    text = (
        "\n".join(lines)
        + "\n\n"
        + "\n".join(verdicts)
        + f"\n\nThe exact KL of a perfect model (the data smoothed by sigma_bar_0 = {sigma:.4f}):\n"
        + "\n".join(floors)
        + "\n"
    )
    if grid:
        text += (
            f"\nThe kNN KL of these runs against the same runs in {grid}:\n"
            + "\n".join(reproduction(rows, grid))
            + "\n"
        )
    with open(os.path.join(folder, "exact-kl.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main(*(sys.argv[1:3] or ["results/exact-kl"]))
