"""The classifier-free guidance trade-off of a class-conditional run, measured: for each guidance weight w, per-class
kNN KL(class data || class samples) and class fidelity (evaluate.class_metrics, with their floors from a fresh draw),
the samples' mean log-density under the dataset's exact class density (datasets.log_density: how far inside its class
each sample lands), and the seconds to draw them.

    python train.py --dataset ring8 --conditional --out_dir out/ring8-cond
    python train.py --dataset moons --conditional --out_dir out/moons-cond
    python docs/guidance.py out/ring8-cond out/moons-cond          # writes docs/guidance.png, prints the table
"""

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import evaluate  # noqa: E402
import plots  # noqa: E402
import runs  # noqa: E402
import tinydiff as td  # noqa: E402

WEIGHTS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0)
N = 8000  # samples per weight


def measure(run_dir):
    ckpt = runs.load_checkpoint(os.path.join(run_dir, "ckpt.pt"))
    model, scheduler = runs.model_from_checkpoint(ckpt)
    model.eval()
    name = ckpt["args"]["dataset"]
    data = runs.load_data(name, conditional=True)
    ref, floor = evaluate.references(data, name, N)
    labels = td.draw_labels(model, N, torch.Generator().manual_seed(0))
    rows = []
    for w in WEIGHTS:
        t0 = time.perf_counter()
        x = td.sample(
            model, scheduler, N, "dpm++", generator=torch.Generator().manual_seed(0), y=labels, guidance=w
        ).numpy()
        seconds = time.perf_counter() - t0
        per_class, fidelity, fidelity_floor = evaluate.class_metrics(data, ref, floor, x, labels.numpy())
        kl = np.mean([c["knn_kl_bits"] for c in per_class.values()])
        kl_floor = np.mean([c["knn_kl_floor"] for c in per_class.values()])
        log_p = datasets.log_density(name, x, labels.numpy()).mean() / np.log(2)
        rows.append(
            dict(
                w=w,
                kl=kl,
                kl_floor=kl_floor,
                fidelity=fidelity,
                fidelity_floor=fidelity_floor,
                log_p=log_p,
                seconds=seconds,
            )
        )
    fresh_log_p = datasets.log_density(name, floor[0], floor[1]).mean() / np.log(2)
    return name, ckpt["step"], rows, fresh_log_p


def main(run_dirs):
    torch.set_num_threads(1)
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for run_dir in run_dirs:
        name, steps, rows, fresh_log_p = measure(run_dir)
        print(f"\n{name} (--conditional, {steps} steps), {N} DPM++-20 samples per weight, 1 CPU thread")
        print("| w | per-class kNN KL (bits) | class fidelity | mean log2 p(x given class) (bits) | seconds |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['w']:g} | {r['kl']:.3f} | {r['fidelity']:.4f} | {r['log_p']:.3f} | {r['seconds']:.2f} |")
        print(
            f"| fresh draw (floor) | {rows[0]['kl_floor']:.3f} | {rows[0]['fidelity_floor']:.4f} | {fresh_log_p:.3f} "
            "| |"
        )
        w = [r["w"] for r in rows]
        for ax, key, floor in zip(
            axes, ("kl", "fidelity", "log_p"), (rows[0]["kl_floor"], rows[0]["fidelity_floor"], fresh_log_p)
        ):
            (line,) = ax.plot(w, [r[key] for r in rows], "o-", label=name)
            ax.axhline(floor, color=line.get_color(), ls=":", lw=1)
    for ax, title in zip(
        axes,
        (
            "per-class kNN KL (bits; dotted: floor)",
            "class fidelity (dotted: fresh draw)",
            "mean log2 p(x | class) of the samples (dotted: data)",
        ),
    ):
        ax.set_xlabel("guidance weight w")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(os.path.dirname(os.path.abspath(__file__)), "guidance.png"), dpi=110)


if __name__ == "__main__":
    main(sys.argv[1:])
