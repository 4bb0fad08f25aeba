"""The study's kNN KL beside the exact KL, for one seed of each grid configuration, and whether they rank alike.

    python sweep.py --seeds 1 --nll 1000 --out_dir results/exact-kl     # the grid, with --nll 1000 for every run
    python docs/exact_kl.py results/exact-kl                            # writes results/exact-kl/exact-kl.md

exact KL = mean over 1,000 fresh points x ~ p of log2 p(x) - log2 q(x), q the model's probability-flow density
(likelihood.py), p the dataset's exact density (datasets.log_density); its standard error is over the points.
Rank agreement: Kendall's tau between the two orderings of the configurations (scipy.stats.kendalltau).
"""
import glob
import json
import os
import sys

from scipy.stats import kendalltau

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import runs  # noqa: E402

CONFIGS = list(runs.CONFIGS)


def main(folder):
    rows = {}
    for path in glob.glob(os.path.join(folder, "*", "metrics.json")):
        m = json.load(open(path))
        if "exact_kl_bits" in m:
            rows[m["dataset"], m["config"]] = m
    lines = ["| dataset | configuration | kNN KL (bits) | kNN floor | exact KL (bits) | ± se | NLL (bits/point) | H(p) (bits) |",
             "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for dataset in sorted({d for d, _ in rows}):
        have = [c for c in CONFIGS if (dataset, c) in rows]
        for c in have:
            m = rows[dataset, c]
            lines.append(f"| {dataset} | {c} | {m['knn_kl_bits']:.4f} | {m['knn_kl_floor']:.4f} | {m['exact_kl_bits']:.4f} | {m['exact_kl_se']:.4f} "
                         f"| {m['nll_bits']:.3f} | {m['data_entropy_bits']:.3f} |")
        if len(have) > 2:
            knn, exact = [rows[dataset, c]["knn_kl_bits"] for c in have], [rows[dataset, c]["exact_kl_bits"] for c in have]
            tau = kendalltau(knn, exact)
            best_knn, best_exact = have[knn.index(min(knn))], have[exact.index(min(exact))]
            spread = max(exact) - min(exact)
            se = max(rows[dataset, c]["exact_kl_se"] for c in have)
            verdicts.append(f"- {dataset}: Kendall's tau {tau.statistic:.2f} (p = {tau.pvalue:.2f}) over {len(have)} configurations; best by kNN KL "
                            f"{best_knn}, by exact KL {best_exact}; exact KL spans {spread:.4f} bits, its largest standard error is {se:.4f}")
    text = "\n".join(lines) + "\n\n" + "\n".join(verdicts) + "\n"
    with open(os.path.join(folder, "exact-kl.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/exact-kl")
