"""Draw samples from a trained run, with its EMA weights.

    python sample.py --out_dir out/dino-base                        # 10,000 DDPM samples
    python sample.py --out_dir out/dino-base --sampler dpm++ --steps 20
    python sample.py --out_dir out/dino-base --gif                   # animate the reverse process

Writes <name>.npy and <name>.png (samples beside the data) into the run directory (or --out),
and <name>.gif with --gif.
"""
import argparse
import os
import sys

import numpy as np
import torch

import datasets
import evaluate
import tinydiff as td


def save_gif(trajectory, path, box, fps=12, max_points=3000):
    """One frame per reverse step on fixed axes (box: evaluate.grid_box of the data), holding the last
    frame for a second."""
    plt = evaluate.pyplot()
    from matplotlib.animation import FuncAnimation, PillowWriter

    traj = trajectory[:, :max_points, :2].numpy()  # (S+1, n, 2): the first two coordinates
    if traj.shape[2] == 1:  # 1-D points: against a fixed random height
        height = np.random.default_rng(0).uniform(size=(traj.shape[1], 1))
        traj = np.concatenate([traj, np.broadcast_to(height, traj.shape)], 2)
        box = (np.append(box[0], 0.0), np.append(box[1], 1.0))
    fig, ax = plt.subplots(figsize=(4, 4))
    scat = ax.scatter(traj[0, :, 0], traj[0, :, 1], s=2, alpha=0.5, linewidths=0)
    ax.set_xlim(box[0][0], box[1][0])
    ax.set_ylim(box[0][1], box[1][1])
    ax.set_aspect("equal")
    title = ax.set_title("")
    frames = list(range(len(traj))) + [len(traj) - 1] * fps

    def draw(i):
        scat.set_offsets(traj[i])
        title.set_text(f"reverse step {i}/{len(traj) - 1}")
        return scat, title

    FuncAnimation(fig, draw, frames=frames, blit=False).save(path, writer=PillowWriter(fps=fps))
    plt.close(fig)
    return len(frames)


def main(argv=None):
    p = argparse.ArgumentParser(description="Sample from a trained tinydiff run (EMA weights).")
    p.add_argument("--out_dir", help="run directory holding ckpt.pt")
    p.add_argument("--ckpt", help="checkpoint file (instead of --out_dir)")
    p.add_argument("--n", type=int, default=10_000, help="number of samples")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++"], default="ddpm")
    p.add_argument("--steps", type=int, default=None, help="network evaluations (default: all T; dpm++: 20)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 as DDPM")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="use the raw (non-EMA) weights")
    p.add_argument("--gif", action="store_true", help="also write an animation of the reverse process")
    p.add_argument("--out", default=None, help="output path stem (default <run>/samples-<sampler><steps>)")
    args = p.parse_args(argv)
    try:
        if not (args.ckpt or args.out_dir):
            raise ValueError("give --out_dir of a run (or --ckpt) to sample from")
        if args.n <= 0:
            raise ValueError(f"--n must be positive, got {args.n}")
        ckpt_path = args.ckpt or os.path.join(args.out_dir, "ckpt.pt")
        ckpt = td.load_checkpoint(ckpt_path)
        model, scheduler = td.model_from_checkpoint(ckpt, key="model" if args.raw else "ema")
        steps = args.steps or td.DEFAULT_STEPS.get(args.sampler, scheduler.num_train_timesteps)
        scheduler.set_timesteps(steps)  # validates --steps
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(1)  # fastest for this model size on small CPUs; see README
    model.eval()
    g = torch.Generator().manual_seed(args.seed)
    out = td.sample(model, scheduler, args.n, sampler=args.sampler, steps=steps, eta=args.eta, generator=g, return_trajectory=args.gif)
    samples = (out[-1] if args.gif else out).numpy()
    stem = args.out or os.path.join(os.path.dirname(ckpt_path), f"samples-{args.sampler}{steps}")
    np.save(stem + ".npy", samples)
    dataset = ckpt["args"]["dataset"]
    try:
        data = datasets.load_dataset(dataset)
    except ValueError:  # the run's data file has moved: plot the samples alone
        data = samples
    if data.shape[1] != samples.shape[1]:
        print(f"note: {dataset} now holds {data.shape[1]}-D points, not the model's {samples.shape[1]}-D ones; plotting the samples alone")
        data = samples
    evaluate.plot_samples(data, samples, stem + ".png", f"{dataset} · {args.sampler} · {steps} steps · seed {args.seed}")
    wrote = [stem + ".npy", stem + ".png"]
    if args.gif:
        save_gif(out, stem + ".gif", evaluate.grid_box(data))
        wrote.append(stem + ".gif")
    print("wrote " + " ".join(wrote))


if __name__ == "__main__":
    main()
