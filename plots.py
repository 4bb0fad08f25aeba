"""The figures the scripts write: samples beside the data, guidance panels, the loss and the kNN KL curve.
Each figure is made here and written by save(), on matplotlib's file-only Agg backend.
"""

import itertools

import numpy as np
import torch

import tinydiff as td
from evaluate import CURVE_N, HIST_BINS, grid_box


def save(fig, path, rect=None):
    """Lay the figure out, write it as a PNG and free it."""
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110, format="png")
    pyplot().close(fig)


def frame(ax, lo, hi, i, j, axis_names=None):
    """Panel (i, j) of points in the box [lo, hi]: the same scale on both axes unless the coordinates' ranges differ
    more than 4-fold (other units: then the panel is filled), and the axes named (parse_math=False: a header field
    such as "$x_1" is a name, not TeX)."""
    ax.set_xlim(lo[i], hi[i])
    ax.set_ylim(lo[j], hi[j])
    wi, wj = hi[i] - lo[i], hi[j] - lo[j]
    ax.set_aspect("equal" if max(wi, wj) < 4 * min(wi, wj) else "auto")
    if axis_names is not None:
        ax.set_xlabel(axis_names[i], parse_math=False)
        ax.set_ylabel(axis_names[j], parse_math=False)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pairs(D):
    """The coordinate pairs plot_samples shows: all of them up to D = 5, else (x1, x2), (x2, x3), ... (at most 12)."""
    return list(itertools.combinations(range(D), 2)) if D <= 5 else [(i, i + 1) for i in range(min(D - 1, 12))]


def plot_samples(data, samples, path, title="", axis_names=None, data_labels=None, sample_labels=None, classes=None):
    """Data (left) and samples (right) on the same axes (grid_box of the data). D > 2: one such pair of
    panels per coordinate pair (plot_pairs), two pairs to a row from four pairs on; D = 1: histograms.
    data=None: the samples alone. axis_names: the coordinates' names (datasets.column_names); without
    them x1, x2, ... from D = 3 on. data_labels / sample_labels (ints indexing classes): points coloured by class."""
    plt = pyplot()

    D = samples.shape[1]
    if axis_names is not None and len(axis_names) != D:
        raise ValueError(f"axis_names has {len(axis_names)} entries for {D}-D points; give one name per coordinate")
    labels = axis_names or [f"x{i + 1}" for i in range(D)]
    lo, hi = grid_box(samples if data is None else data)
    pairs = plot_pairs(D) if D > 1 else [(0, 0)]
    per_row = 1 if len(pairs) <= 3 else 2
    rows = -(-len(pairs) // per_row)
    pick = None if data is None else np.random.default_rng(0).permutation(len(data))[: len(samples)]
    shown = None if data is None else data[pick]
    colours = [None if data is None or data_labels is None else data_labels[pick], sample_labels]
    panels = ([] if data is None else [(shown, f"data ({len(shown)} shown)", colours[0])]) + [
        (samples, f"samples ({len(samples)})", colours[1])
    ]
    n = len(panels)
    fig, axes = plt.subplots(
        rows, n * per_row, figsize=(4 * n * per_row, 4.2 * rows if D <= 2 else 3.8 * rows + 0.4), squeeze=False
    )
    cmap = plt.get_cmap("tab10" if classes is None or len(classes) <= 10 else "tab20")
    for k, (i, j) in enumerate(pairs):
        for m, (pts, name, c) in enumerate(panels):
            ax = axes[k // per_row, n * (k % per_row) + m]
            if D == 1:
                ax.hist(pts[:, 0], bins=HIST_BINS, range=(lo[0], hi[0]), density=True)
            else:
                ax.scatter(
                    pts[:, i],
                    pts[:, j],
                    s=1,
                    alpha=0.4,
                    linewidths=0,
                    **({} if c is None else dict(c=c, cmap=cmap, vmin=0, vmax=cmap.N - 1)),
                )
                frame(ax, lo, hi, i, j, labels if axis_names or D > 2 else None)
            if D == 1 and axis_names:
                ax.set_xlabel(labels[0], parse_math=False)
            if k < per_row:
                ax.set_title(name)
    if D == 1:  # one density scale for data and samples
        top = max(ax.get_ylim()[1] for ax in axes[0, :n])
        for ax in axes[0, :n]:
            ax.set_ylim(0, top)
    for ax in axes.flat[n * len(pairs) :]:
        ax.set_visible(False)
    if classes is not None and sample_labels is not None and len(classes) <= 20:
        handles = [plt.Line2D([], [], ls="", marker="o", color=cmap(k), label=name) for k, name in enumerate(classes)]
        axes[0, n - 1].legend(handles=handles, fontsize=7, loc="upper right", markerscale=0.8, framealpha=0.6)
    fig.suptitle(title)
    save(fig, path, (0, 0, 1, 1 - 0.3 / fig.get_figheight()) if D > 2 else None)  # room for the title above the panels'


GUIDANCE_PLOT = (0.0, 1.0, 3.0)


def plot_guidance(model, scheduler, data, device, path, title, n=2000):
    """A class-conditional model's samples at guidance w = 0, 1 and 3, side by side, coloured by class (the same
    labels and starting noise in each panel): w = 0 ignores the label, w > 1 pulls each class to its own mode."""
    plt = pyplot()
    labels = td.draw_labels(model, n, torch.Generator().manual_seed(0))
    fig, axes = plt.subplots(1, len(GUIDANCE_PLOT), figsize=(4 * len(GUIDANCE_PLOT), 4.4), squeeze=False)
    lo, hi = grid_box(data.points)
    cmap = plt.get_cmap("tab10" if len(data.names) <= 10 else "tab20")
    for ax, w in zip(axes[0], GUIDANCE_PLOT):
        x = (
            td.sample(
                model,
                scheduler,
                n,
                "dpm++",
                generator=torch.Generator(device=device).manual_seed(0),
                device=device,
                y=labels,
                guidance=w,
            )
            .cpu()
            .numpy()
        )
        ax.scatter(
            x[:, 0],
            x[:, 1 % x.shape[1]],
            s=1,
            alpha=0.4,
            linewidths=0,
            c=labels.numpy(),
            cmap=cmap,
            vmin=0,
            vmax=cmap.N - 1,
        )
        frame(ax, lo, hi, 0, 1 % len(lo), data.columns or [f"x{i + 1}" for i in range(len(lo))])
        ax.set_title(f"w = {w:g}" + (" (unconditional)" if w == 0 else " (conditional)" if w == 1 else " (guided)"))
    if len(data.names) <= 20:
        handles = [
            plt.Line2D([], [], ls="", marker="o", color=cmap(k), label=name) for k, name in enumerate(data.names)
        ]
        axes[0, -1].legend(handles=handles, fontsize=7, loc="upper right", framealpha=0.6)
    fig.suptitle(f"{title} · DPM++ 20 steps, {n} samples, coloured by the label asked for")
    save(fig, path)


def plot_loss(losses, path):
    """The training loss per step (log scale), with a running mean over 1% of the run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.3, alpha=0.4, label="per step")
    w = max(1, len(losses) // 100)
    if w > 1:
        ax.plot(
            np.arange(w - 1, len(losses)),
            np.convolve(losses, np.ones(w) / w, mode="valid"),
            label=f"running mean of {w} steps",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (MSE of the network's output)")
    ax.set_yscale("log")
    ax.legend()
    save(fig, path)


def plot_curve(curve, floor, path, title):
    """kNN KL of the EMA model against training step (--eval_interval), with the floor if known."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(
        [c["step"] for c in curve],
        [c["knn_kl_bits"] for c in curve],
        marker="o",
        ms=3,
        label=f"EMA model, {CURVE_N} DPM++-20 samples",
    )
    if floor is not None:
        ax.axhline(floor, color="gray", ls="--", lw=1, label=f"floor {floor:.3f} (a perfect model)")
    ax.set_xlabel("step")
    ax.set_ylabel("kNN KL (bits)")
    ax.set_title(title)
    ax.legend()
    save(fig, path)


def sample_title(prefix, metrics):
    """What a reader needs to judge the picture: the kNN KL, its floor, and the excess (0 = perfect)."""
    kl, floor = metrics["knn_kl_bits"], metrics.get("knn_kl_floor")
    if kl is None or not np.isfinite(kl):
        return f"{prefix} · kNN KL undefined (exact duplicates)"
    if floor is None:
        return f"{prefix} · kNN KL {kl:.3f} bits (lower is better)"
    return f"{prefix} · kNN KL {kl:.3f} bits, excess over floor {kl - floor:.3f} (0 = perfect)"
