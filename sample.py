"""Draw samples from a trained run, with its EMA weights.

    python sample.py --out_dir out/dino-base                        # 10,000 DDPM samples
    python sample.py --out_dir out/dino-base --sampler dpm++ --sample_steps 20
    python sample.py --out_dir out/dino-base --gif                   # animate the reverse process
    python sample.py --out_dir out/moons-base-cond --label upper --guidance 3   # a class-conditional run
    python sample.py --out_dir out/f-csv-base-cond --cond a=1.5,b=-2       # a run with --cond_columns a,b

Writes <name>.npy and <name>.png (samples beside the data) into the run directory (or --out), <name> being
samples-<sampler><steps> and the settings that differ from the defaults (-seed5, -raw, -n300, ...);
<name>_labels.npy (each sample's class name) for a class-conditional run, and <name>.gif with --gif.
"""

import hashlib
import json
import math
import os
import sys
import tempfile
import time
import urllib.parse

import numpy as np
import torch

import datasets
import evaluate
import plots
import runs
import tinydiff as td


def save_gif(trajectory, f, box, fps=12, max_points=3000):
    """One frame per reverse step on fixed axes (box: evaluate.grid_box of the data), holding the last
    frame for a second. Written into the open file f."""
    plt = plots.pyplot()
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

    with (
        tempfile.TemporaryDirectory() as tmp
    ):  # Pillow picks the format from the file name, so write a .gif, then copy it
        FuncAnimation(fig, draw, frames=frames, blit=False).save(
            os.path.join(tmp, "a.gif"), writer=PillowWriter(fps=fps)
        )
        with open(os.path.join(tmp, "a.gif"), "rb") as g:
            f.write(g.read())
    plt.close(fig)
    return len(frames)


N_DEFAULT = 10_000  # samples; a draw of another size carries its size in its file name


@runs.script
def main(argv=None):
    p = runs.ArgumentParser(description="Sample from a trained tinydiff run (EMA weights).")
    p.add_argument("--out_dir", help="run directory holding ckpt.pt")
    p.add_argument("--ckpt", help="checkpoint file (instead of --out_dir)")
    p.add_argument("--n", type=int, default=N_DEFAULT, help="number of samples")
    p.add_argument("--sampler", choices=td.SAMPLERS, default="ddpm")
    p.add_argument(
        "--sample_steps", "--steps", type=int, default=None, help="network evaluations (default: all T; dpm++: 20)"
    )
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise in [0, 1]: 0 deterministic, 1 as DDPM")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="use the raw (non-EMA) weights")
    p.add_argument("--gif", action="store_true", help="also write an animation of the reverse process")
    p.add_argument(
        "--label",
        action="append",
        help="a class to sample (repeat for several: n is split evenly); default: the training shares",
    )
    p.add_argument(
        "--cond",
        action="append",
        help="the condition of a run trained with --cond_columns: NAME=VALUE,NAME=VALUE (every column), once",
    )
    p.add_argument(
        "--guidance", type=float, default=1.0, help="guidance weight w: 1 conditional, 0 unconditional, > 1 guided"
    )
    p.add_argument(
        "--out",
        default=None,
        help="output path stem (default <run>/samples-<sampler><steps>, then the settings that differ from the "
        "defaults)",
    )
    p.add_argument("--overwrite", action="store_true", help="let --out replace files that exist")
    args = p.parse_args(argv)
    try:
        if not (args.ckpt or args.out_dir):
            raise ValueError("give --out_dir of a run (or --ckpt) to sample from")
        runs.check_sampling_flags(args)
        if args.cond is not None and len(args.cond) > 1:
            raise ValueError(
                f"--cond was given {len(args.cond)} times; give one condition, NAME=VALUE for each column, once"
            )
        args.cond = args.cond[0] if args.cond else None
        ckpt_path = args.ckpt or os.path.join(args.out_dir, "ckpt.pt")
        ckpt = runs.load_checkpoint(ckpt_path)
        model, scheduler = runs.model_from_checkpoint(ckpt, key="model" if args.raw else "ema")
        runs.unfinished(ckpt, "draws from")
        steps = runs.sampler_steps(args.sampler, args.sample_steps, scheduler.num_train_timesteps)
        frames = steps + 1 if args.gif else 1
        runs.check_flag_memory(
            "--n", args.n, args.n * model.cfg.data_dim * 8 * (frames + 4)
        )  # the samples (each frame for --gif) and the sampler's copies
        y, label_names = condition(args, ckpt, model)
        stem = args.out or os.path.join(os.path.dirname(ckpt_path), default_name(args, steps, ckpt))
        check_out(stem, args.gif, replace=args.overwrite or not args.out)
    except ValueError as e:
        runs.fail(str(e))
    torch.set_num_threads(1)  # fastest for this model size on small CPUs; see README
    model.eval()
    g = torch.Generator().manual_seed(args.seed)
    print(f"sampling {args.n:,} points with {args.sampler} ({steps} steps)", flush=True)
    t0 = time.perf_counter()
    show = lambda i, n: print(
        f"\rsampling {args.n:,} points: step {i + 1}/{n} ({time.perf_counter() - t0:.0f} s)",
        end="",
        file=sys.stderr,
        flush=True,
    )
    if y is None and label_names is not None:  # a class-conditional run without --label: the training shares
        y = td.draw_labels(model, args.n, g)
    out = td.sample(
        model,
        scheduler,
        args.n,
        sampler=args.sampler,
        steps=steps,
        eta=args.eta,
        generator=g,
        y=y,
        guidance=args.guidance,
        return_trajectory=args.gif,
        callback=show if sys.stderr.isatty() else None,
    )
    if sys.stderr.isatty():
        print(file=sys.stderr)
    samples = (out[-1] if args.gif else out).numpy()
    bad = (~np.isfinite(samples).all(1)).sum()
    if bad:  # never a silent wrong result
        runs.fail(
            f"{bad} of {len(samples)} samples are NaN or infinite: the model or the sampler diverged; nothing was "
            "written",
            code=1,
        )
    far = int(
        (model.data_map.to_model(torch.as_tensor(samples)).abs() > 25 * td.MODEL_SD).any(1).sum()
    )  # 25 of the data's sd out
    if far:
        print(
            f"warning: {far} of {len(samples)} samples lie more than 25 standard deviations of the training data away "
            "from its mean;"
            " a guidance weight or a condition far outside what the model was trained on gives such samples",
            file=sys.stderr,
        )
    dataset = runs.run_dataset(ckpt)
    data, axis_names, data_labels = run_data(ckpt, dataset, samples.shape[1])
    write = lambda path, fn: runs.write_or_fail(path, fn)
    write(stem + ".npy", lambda f: np.save(f, samples))
    wrote = [stem + ".npy", stem + ".png"]
    colours = {}
    if label_names is not None:
        write(stem + "_labels.npy", lambda f: np.save(f, np.array(label_names)[y.numpy()]))
        wrote.insert(1, stem + "_labels.npy")
        colours = dict(data_labels=data_labels, sample_labels=y.numpy(), classes=label_names)
    title = (
        f"{dataset} · {args.sampler} · {steps} steps · seed {args.seed}"
        + (f" · w={args.guidance:g}" if args.guidance != 1 else "")
        + (f" · {args.cond}" if args.cond else "")
    )
    write(stem + ".png", lambda f: plots.plot_samples(data, samples, f, title, axis_names, **colours))
    if args.gif:
        write(stem + ".gif", lambda f: save_gif(out, f, evaluate.grid_box(samples if data is None else data)))
        wrote.append(stem + ".gif")
    print(f"wrote {' '.join(wrote)} ({time.perf_counter() - t0:.1f} s)")


def default_name(args, steps, ckpt):
    """samples-<sampler><steps>, then every setting that changes the draw and is not its default, readable and cut
    to a short length, then a hash of the exact settings and of the checkpoint drawn from (its step and data): each
    draw keeps its own file (w 2 and w 2.0000001, --label a+b and --label a --label b, a run before and after it was
    resumed, differ), and only the same draw from the same checkpoint is written again, with the same values."""
    asked = "+".join(args.label) if args.label else args.cond
    parts = [
        f"eta{args.eta:g}" if args.sampler == "ddim" and args.eta else "",
        f"w{args.guidance:g}" if args.guidance != 1 else "",
        urllib.parse.quote(asked, safe="=+,.-")[:40] if asked else "",
        f"n{args.n}" if args.n != N_DEFAULT else "",
        f"seed{args.seed}" if args.seed else "",
        "raw" if args.raw else "",
        os.path.splitext(os.path.basename(args.ckpt))[0][:40]
        if args.ckpt and os.path.basename(args.ckpt) != "ckpt.pt"
        else "",
    ]
    exact = [args.sampler, steps, repr(args.eta), repr(args.guidance), args.label, args.cond, args.n, args.seed]
    exact += [args.raw, os.path.abspath(args.ckpt) if args.ckpt else None, ckpt["step"], ckpt["data"].get("sha256")]
    digest = hashlib.sha256(json.dumps(exact).encode()).hexdigest()[:8]
    return "-".join([f"samples-{args.sampler}{steps}", *(p for p in parts if p), digest])


def check_out(stem, gif, replace=False):
    """--out must be writable, and never one of train.py's own files in a run folder (samples.npy there
    is what metrics.json describes)."""
    if not os.path.basename(stem) or stem.endswith(os.sep):
        raise ValueError(f"--out {runs.quote(stem)} names a folder; give a file stem in it, such as {stem}draw")
    folder = os.path.dirname(os.path.abspath(stem))
    if not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
        raise ValueError(
            f"cannot write to {runs.quote(folder)} (--out {runs.quote(stem)}); choose a writable folder that exists"
        )
    is_run = any(os.path.isfile(os.path.join(folder, f)) for f in ("ckpt.pt", "metrics.json"))
    for ext in (".npy", ".png") + ((".gif",) if gif else ()):
        if is_run and os.path.basename(stem) + ext in runs.RUN_FILES:
            raise ValueError(
                f"--out {runs.quote(stem)} would write over train.py's {os.path.basename(stem) + ext} in that run "
                "folder;"
                " choose another name, such as the default samples-<sampler><steps>"
            )
    taken = [stem + ext for ext in (".npy", ".png") + ((".gif",) if gif else ()) if os.path.exists(stem + ext)]
    if taken and not replace:
        raise ValueError(f"{runs.quote(taken[0])} exists; give another --out, or add --overwrite to replace it")


def condition(args, ckpt, model):
    """(y, class names) from --label / --cond, checked against the run's condition; y None: none asked for."""
    kind, names = ckpt["condition"]["kind"], ckpt["condition"]["names"]
    if args.label and kind != "labels":
        raise ValueError(
            "--label needs a run trained with labels (--label_column or --conditional); "
            + ("this one is conditioned on numbers: use --cond" if kind else "this run is unconditional")
        )
    if args.cond is not None and kind != "numbers":
        raise ValueError(
            "--cond needs a run trained with --cond_columns; "
            + ("this one has labels: use --label" if kind else "this run is unconditional")
        )
    runs.check_guidance(args.guidance, bool(kind), ckpt["args"].get("p_uncond"))
    if kind == "labels" and args.label:
        args.label = [datasets.label_text(name) for name in args.label]  # the file's reader: " 1.0" is class 1
        unknown = [name for name in args.label if name not in names]
        if unknown:
            raise ValueError(
                f"--label {unknown[0]} is not a class of this run; its classes are {', '.join(map(str, names))}"
            )
        share = np.array_split(np.arange(args.n), len(args.label))
        return torch.cat([torch.full((len(rows),), names.index(name)) for name, rows in zip(args.label, share)]), names
    if kind == "numbers":
        if args.cond is None and args.guidance != 1:
            raise ValueError(
                "--guidance needs --cond on this run: without a condition there is nothing to guide towards"
            )
        if args.cond is None:
            print("note: no --cond, so this samples the unconditional model (the run's null condition)")
            return None, None
        pairs = [part.split("=", 1) if "=" in part else (part, "") for part in args.cond.split(",")]
        values = dict(pairs)
        if (
            len(values) != len(pairs)
            or sorted(values) != sorted(names)
            or not all(datasets.is_number(v) and math.isfinite(float(v)) for v in values.values())
        ):
            raise ValueError(
                f"--cond {args.cond} must give one finite number for each of this run's condition columns: "
                + ",".join(f"{name}=VALUE" for name in names)
            )
        return torch.tensor([[float(values[name]) for name in names]] * args.n, dtype=torch.float64), None
    return None, names if kind == "labels" else None


def run_data(ckpt, dataset, D):
    """The run's training points, their column names and labels, for the plot; Nones, with a note, when they cannot be
    read."""
    a = ckpt["args"]
    try:
        data = runs.run_data(dataset, a)
    except ValueError as e:  # the run's data file has moved or changed: plot the samples alone
        where = f"{dataset} (recorded as {ckpt['data']['path']})" if ckpt["data"].get("path") else dataset
        print(f"note: could not read the run's data, {where}: {str(e).split(';')[0]}; plotting the samples alone")
        return None, None, None
    if data.points.shape[1] != D:
        print(
            f"note: {dataset} now holds {data.points.shape[1]}-D points, not the model's {D}-D ones; plotting the "
            "samples alone"
        )
        return None, None, None
    if data.fingerprint["sha256"] != ckpt["data"]["sha256"]:
        print(f"note: {dataset} has changed since the run was trained on it; the plot shows the data as they are now")
    return (
        data.points,
        data.columns if data.kind else datasets.column_names(dataset, D),
        data.cond if data.kind == "labels" else None,
    )


if __name__ == "__main__":
    main()
