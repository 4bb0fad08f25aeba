"""Draw samples from a trained run, with its EMA weights.

    python sample.py --out_dir out/dino-base                        # 10,000 DDPM samples
    python sample.py --out_dir out/dino-base --sampler dpm++ --sample_steps 20
    python sample.py --out_dir out/dino-base --gif                   # animate the reverse process

Writes <name>.npy and <name>.png (samples beside the data) into the run directory (or --out),
and <name>.gif with --gif.
"""
import os
import sys
import tempfile
import time

import numpy as np
import torch

import datasets
import evaluate
import runs
import tinydiff as td


def save_gif(trajectory, f, box, fps=12, max_points=3000):
    """One frame per reverse step on fixed axes (box: evaluate.grid_box of the data), holding the last
    frame for a second. Written into the open file f."""
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

    with tempfile.TemporaryDirectory() as tmp:  # Pillow picks the format from the file name, so write a .gif, then copy it
        FuncAnimation(fig, draw, frames=frames, blit=False).save(os.path.join(tmp, "a.gif"), writer=PillowWriter(fps=fps))
        with open(os.path.join(tmp, "a.gif"), "rb") as g:
            f.write(g.read())
    plt.close(fig)
    return len(frames)


@runs.script
def main(argv=None):
    p = runs.ArgumentParser(description="Sample from a trained tinydiff run (EMA weights).")
    p.add_argument("--out_dir", help="run directory holding ckpt.pt")
    p.add_argument("--ckpt", help="checkpoint file (instead of --out_dir)")
    p.add_argument("--n", type=int, default=10_000, help="number of samples")
    p.add_argument("--sampler", choices=td.SAMPLERS, default="ddpm")
    p.add_argument("--sample_steps", "--steps", type=int, default=None, help="network evaluations (default: all T; dpm++: 20)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise in [0, 1]: 0 deterministic, 1 as DDPM")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="use the raw (non-EMA) weights")
    p.add_argument("--gif", action="store_true", help="also write an animation of the reverse process")
    p.add_argument("--out", default=None, help="output path stem (default <run>/samples-<sampler><steps>)")
    args = p.parse_args(argv)
    try:
        if not (args.ckpt or args.out_dir):
            raise ValueError("give --out_dir of a run (or --ckpt) to sample from")
        runs.check_sampling_flags(args)
        ckpt_path = args.ckpt or os.path.join(args.out_dir, "ckpt.pt")
        ckpt = runs.load_checkpoint(ckpt_path)
        model, scheduler = runs.model_from_checkpoint(ckpt, key="model" if args.raw else "ema")
        steps = runs.sampler_steps(args.sampler, args.sample_steps, scheduler.num_train_timesteps)
        frames = steps + 1 if args.gif else 1
        runs.check_flag_memory("--n", args.n, args.n * model.cfg.data_dim * 8 * (frames + 4))  # the samples (each frame for --gif) and the sampler's copies
        stem = args.out or os.path.join(os.path.dirname(ckpt_path), f"samples-{args.sampler}{steps}")
        check_out(stem, args.gif)
    except ValueError as e:
        runs.fail(str(e))
    torch.set_num_threads(1)  # fastest for this model size on small CPUs; see README
    model.eval()
    g = torch.Generator().manual_seed(args.seed)
    print(f"sampling {args.n:,} points with {args.sampler} ({steps} steps)", flush=True)
    t0 = time.perf_counter()
    show = lambda i, n: print(f"\rsampling {args.n:,} points: step {i + 1}/{n} ({time.perf_counter() - t0:.0f} s)", end="", file=sys.stderr, flush=True)
    out = td.sample(model, scheduler, args.n, sampler=args.sampler, steps=steps, eta=args.eta, generator=g, return_trajectory=args.gif,
                    callback=show if sys.stderr.isatty() else None)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    samples = (out[-1] if args.gif else out).numpy()
    bad = (~np.isfinite(samples).all(1)).sum()
    if bad:  # never a silent wrong result
        runs.fail(f"{bad} of {len(samples)} samples are NaN or infinite: the model or the sampler diverged; nothing was written", code=1)
    dataset = runs.run_dataset(ckpt)
    data, names = run_data(ckpt, dataset, samples.shape[1])
    write = lambda path, fn: runs.write_or_fail(path, fn)
    write(stem + ".npy", lambda f: np.save(f, samples))
    write(stem + ".png", lambda f: evaluate.plot_samples(data, samples, f, f"{dataset} · {args.sampler} · {steps} steps · seed {args.seed}", names))
    wrote = [stem + ".npy", stem + ".png"]
    if args.gif:
        write(stem + ".gif", lambda f: save_gif(out, f, evaluate.grid_box(samples if data is None else data)))
        wrote.append(stem + ".gif")
    print(f"wrote {' '.join(wrote)} ({time.perf_counter() - t0:.1f} s)")


def check_out(stem, gif):
    """--out must be writable, and never one of train.py's own files in a run folder (samples.npy there
    is what metrics.json describes)."""
    folder = os.path.dirname(os.path.abspath(stem))
    if not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
        raise ValueError(f"cannot write to {runs.quote(folder)} (--out {runs.quote(stem)}); choose a writable folder that exists")
    is_run = any(os.path.isfile(os.path.join(folder, f)) for f in ("ckpt.pt", "metrics.json"))
    for ext in (".npy", ".png") + ((".gif",) if gif else ()):
        if is_run and os.path.basename(stem) + ext in runs.RUN_FILES:
            raise ValueError(f"--out {runs.quote(stem)} would write over train.py's {os.path.basename(stem) + ext} in that run folder;"
                             " choose another name, such as the default samples-<sampler><steps>")


def run_data(ckpt, dataset, D):
    """The run's points and their column names, for the plot; (None, None), with a note, when they cannot be read."""
    try:
        data = datasets.load_dataset(dataset)
    except ValueError as e:  # the run's data file has moved or changed: plot the samples alone
        where = f"{dataset} (recorded as {ckpt['data']['path']})" if ckpt["data"].get("path") else dataset
        print(f"note: could not read the run's data, {where}: {str(e).split(';')[0]}; plotting the samples alone")
        return None, None
    if data.shape[1] != D:
        print(f"note: {dataset} now holds {data.shape[1]}-D points, not the model's {D}-D ones; plotting the samples alone")
        return None, None
    return data, datasets.column_names(dataset, D)


if __name__ == "__main__":
    main()
