"""How the kNN KL depends on the number of samples: the measurement behind docs/study.md, "KL during training".

    python docs/sample_size.py results/paper/*-base-s0      # any finished run directories of named datasets

For each run, the excess kNN KL (KL less the floor drawn at the same size) of its final 10,000
DDPM-100 samples, and of disjoint subsets of them of 2,000 and 1,000 points (mean and sd over the
subsets). The same samples score differently at different sizes, so a curve drawn from 2,000 samples
is compared only with other curves drawn the same way.
Run from the repository root.
"""

import argparse
import json
import os
import sys

import numpy as np
from scipy.spatial import cKDTree

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import evaluate  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("run_dirs", nargs="+")
args = p.parse_args()

sizes = (10_000, 2_000, 1_000)
print("| run | " + " | ".join(f"excess at {n:,}" for n in sizes) + " |")
print("|---" * (len(sizes) + 1) + "|")
for run in args.run_dirs:
    with open(os.path.join(run, "metrics.json")) as f:
        dataset = json.load(f)["dataset"]
    samples = np.load(os.path.join(run, "samples.npy"))
    X = datasets.load_dataset(dataset)  # the training points, as train.py draws them
    rho = cKDTree(X).query(X, k=evaluate.KNN_K + 1, p=np.inf)[0][:, evaluate.KNN_K]
    cells = []
    for n in sizes:
        floor = evaluate.knn_kl(X, evaluate.floor_draw(dataset, n), rho=rho)
        kl = [evaluate.knn_kl(X, samples[i * n : (i + 1) * n], rho=rho) for i in range(len(samples) // n)]
        cells.append(f"{np.mean(kl) - floor:.3f}" + (f" ± {np.std(kl, ddof=1):.3f}" if len(kl) > 1 else ""))
    print(f"| {os.path.basename(os.path.normpath(run))} | " + " | ".join(cells) + " |")
