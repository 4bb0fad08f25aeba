"""Where does a circle model lose its KL?  The measurements behind docs/tuning.md, "Circle, and low-t oversampling".

    python docs/circle_diagnosis.py out/circle-base            # any circle run directory
    python docs/circle_diagnosis.py out/circle-base --full     # also the exact denoiser at every step (slow)

1. A reference: each of the circle's discs replaced by a Gaussian with the disc's mean and covariance.
2. Per-timestep noise MSE of the model against a near-Bayes denoiser: the posterior mean of x_0 under
   a large fresh draw from the generator (60,000 points, never seen in training).
3. DDPM-100 sampling with that near-Bayes denoiser for t <= k and the model above k.
Run from the repository root. Single thread; the --full row takes several minutes.
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import evaluate  # noqa: E402
import tinydiff as td  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("run_dir")
p.add_argument("--full", action="store_true", help="also sample with the near-Bayes denoiser at every step")
args = p.parse_args()
torch.set_num_threads(1)

X = datasets.load_dataset("circle")
floor = evaluate.floor_draw("circle", 10_000)
excess = lambda s: (lambda m: m["knn_kl_bits"] - m["knn_kl_floor"])(evaluate.compute_metrics(X, s, floor))

# 1. moment-matched Gaussian discs: same centres and weights as circle(), radius 0.09 -> sd 0.09 / sqrt(6) per axis
rng = np.random.default_rng(5)
grid = lambda n: np.round(rng.uniform(-0.5, 0.5, n) / 2, 1) * 2
x, y = grid(10_000), grid(10_000)
norm = np.sqrt(x**2 + y**2) + 1e-10
blobs = 3 * np.stack([x / norm, y / norm], 1) + rng.normal(0, 0.09 / 6**0.5, (10_000, 2))
print(f"moment-matched Gaussian discs: excess kNN KL {excess(blobs):.3f} bits")

# 2. per-timestep noise MSE, model vs the near-Bayes denoiser
model, sched = td.model_from_checkpoint(td.load_checkpoint(os.path.join(args.run_dir, "ckpt.pt")))
model.eval()
R = torch.as_tensor(datasets.load_dataset("circle", n=60_000, seed=777), dtype=torch.float32)


def bayes_eps(x, t):
    """E[eps | x_t] under the empirical distribution of R, in chunks."""
    ab = sched.alphas_cumprod[t].double().item()
    out = []
    for xc in x.split(1000):
        w = torch.softmax(-torch.cdist(xc, ab**0.5 * R).pow(2) / (2 * (1 - ab)), 1)
        out.append((xc - ab**0.5 * (w @ R)) / (1 - ab) ** 0.5)
    return torch.cat(out)


P = torch.as_tensor(datasets.load_dataset("circle", n=10_000, seed=4242), dtype=torch.float32)
g = torch.Generator().manual_seed(1)
print("\n  t   sigma_t  near-Bayes MSE  model MSE")
for t in [0, 1, 2, 3, 5, 10, 20, 50, 99]:
    ab = sched.alphas_cumprod[t].item()
    eps = torch.randn(P.shape, generator=g)
    xt = ab**0.5 * P + (1 - ab) ** 0.5 * eps
    with torch.no_grad():
        mse = ((model(xt, torch.full((len(xt),), t)) - eps) ** 2).mean().item()
    print(f"{t:3d}   {(1 - ab) ** 0.5:.3f}    {((bayes_eps(xt, t) - eps) ** 2).mean().item():.4f}          {mse:.4f}")


# 3. sampling with the near-Bayes denoiser for t <= k
class Hybrid(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k, self.data_mean, self.data_cov = k, model.data_mean, model.data_cov

    def forward(self, x, t):
        return bayes_eps(x, int(t[0])) if int(t[0]) <= self.k else model(x, t)


print()
for k in [-1, 0, 1, 5] + ([99] if args.full else []):
    with torch.no_grad():
        s = td.sample(Hybrid(k), sched, 10_000, generator=torch.Generator().manual_seed(0)).numpy()
    label = "the model at every step" if k < 0 else f"near-Bayes for t <= {k}"
    print(f"DDPM-100, {label:24s}: excess kNN KL {excess(s):.3f} bits")
