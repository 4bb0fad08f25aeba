"""Train a 2-D diffusion model, then evaluate it. Top to bottom, nanoGPT style.

    python train.py --dataset dino                          # tinydiff defaults
    python train.py --dataset dino --attn_layers 2 --heads 4
    python train.py --dataset moons --preset paper          # the study's exact settings
    python train.py --dataset dino --resume                 # continue out/dino-base
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

import datasets
import evaluate
import tinydiff as td

# Settings that differ between the study ("paper": its template code, setting by setting) and
# tinydiff's measured defaults (see README).
PRESETS = {
    "paper": dict(block="relu", lr=3e-4, warmup_steps=0, grad_clip=0.5, ema_decay=0.995, ema_every=10, ema_warmup=100, batches="epochs",
                  num_timesteps=100, beta_schedule="linear", coord_scale=25.0, prior="standard", low_t=0, low_frac=0.0, eval_loss="raw-train"),
    "tinydiff": dict(block="gelu", lr=1e-3, warmup_steps=0, grad_clip=1.0, ema_decay=0.995, ema_every=1, ema_warmup=0, batches="random",
                     num_timesteps=100, beta_schedule="linear", coord_scale=50.0, prior="data", low_t=2, low_frac=0.25, eval_loss="ema-heldout"),
}
# What runs from before an option existed did: they read as if run with these values.
LEGACY_ARGS = dict(low_t=0, low_frac=0.0, block="gelu", ema_every=1, ema_warmup=0, batches="random", eval_loss="ema-heldout")
# Arguments that define the run's math; --resume takes them from the checkpoint.
RUN_KEYS = ("dataset", "preset", "attn_layers", "heads", "ssm_layers", "hidden", "block", "coord_scale", "num_timesteps", "beta_schedule", "prior",
            "low_t", "low_frac", "train_steps", "batch_size", "batches", "lr", "warmup_steps", "ema_decay", "ema_every", "ema_warmup", "grad_clip",
            "eval_loss", "seed", "threads", "dtype")


def preset_value(key):
    """'tinydiff: X, paper: Y', for the help of a flag that a preset sets."""
    return ", ".join(f"{name}: {p[key]}" for name, p in PRESETS.items())


def get_parser():
    p = argparse.ArgumentParser(description="Train a DDPM on 2-D points, then evaluate it.", allow_abbrev=False)
    a = p.add_argument
    pre = lambda text, key: f"{text} (default from --preset: {preset_value(key)})"
    a("--dataset", default="dino", help=f"{', '.join(datasets.DATASETS)}, or a path to an (N, D) .csv/.txt/.npy file")
    a("--preset", choices=sorted(PRESETS), default="tinydiff", help="tinydiff (measured defaults) or paper (the study's code path)")
    a("--attn_layers", type=int, default=0, help="self-attention layers over the tokens [x1, x2, t]")
    a("--heads", type=int, default=4, help="attention heads; must divide 128")
    a("--ssm_layers", type=int, default=0, help="bidirectional SSM (Mamba) blocks over the tokens")
    a("--hidden", type=int, default=256, help="width of the residual MLP")
    a("--block", choices=["gelu", "relu"], default=None, help=pre("residual MLP form: gelu = Linear-GELU-(x+GELU(Wx))-Linear, relu = the study's Linear-(x+W ReLU(x))-ReLU-Linear", "block"))
    a("--coord_scale", type=float, default=None, help=pre("sinusoidal-embedding scale of x1, x2", "coord_scale"))
    a("--num_timesteps", type=int, default=None, help=pre("diffusion steps T", "num_timesteps"))
    a("--beta_schedule", choices=["linear", "quadratic", "cosine"], default=None, help=pre("noise schedule", "beta_schedule"))
    a("--prior", choices=["data", "standard"], default=None,
      help=pre("sampler start: data = Gaussian with the moments of q(x_T) given the data's mean and covariance, standard = N(0, I)", "prior"))
    a("--low_t", type=int, default=None, help=pre("oversample timesteps t < low_t in training (0 = off)", "low_t"))
    a("--low_frac", type=float, default=None, help=pre("share of each batch drawn from t < low_t", "low_frac"))
    a("--train_steps", type=int, default=10_000, help="optimizer steps")
    a("--batch_size", type=int, default=256)
    a("--batches", choices=["random", "epochs"], default=None,
      help=pre("random = rows drawn with replacement; epochs = shuffled passes without replacement, as a DataLoader", "batches"))
    a("--lr", type=float, default=None, help=pre("peak AdamW learning rate", "lr"))
    a("--warmup_steps", type=int, default=None, help=pre("linear LR warm-up steps before the cosine decay", "warmup_steps"))
    a("--ema_decay", type=float, default=None, help=pre("EMA decay of the weights used for sampling", "ema_decay"))
    a("--ema_every", type=int, default=None, help=pre("update the EMA every this many steps", "ema_every"))
    a("--ema_warmup", type=int, default=None,
      help=pre("0 = constant decay; N > 0 = the study's EMA: copy the weights for N steps, then decay min(ema_decay, 1 - (1 + s - N)^(-2/3))", "ema_warmup"))
    a("--grad_clip", type=float, default=None, help=pre("gradient-norm clip", "grad_clip"))
    a("--eval_loss", choices=["ema-heldout", "raw-train"], default=None,
      help=pre("eval loss: EMA model on 10,000 held-out points, or the study's raw model over one pass of the training points", "eval_loss"))
    a("--eval_interval", type=int, default=0, help="every this many steps, record the EMA model's kNN KL (2,000 DPM++-20 samples) and draw kl.png (0 = off)")
    a("--seed", type=int, default=0, help="seeds model init, batches, timesteps and noise")
    a("--device", default="auto", help="auto (cuda -> mps -> cpu), cpu, cuda, cuda:1, mps")
    a("--threads", type=int, default=None, help="CPU threads (default 1: fastest for this model size; see README)")
    a("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 autocasts the forward pass")
    a("--compile", action="store_true", help="torch.compile the model (off by default)")
    a("--out_dir", default=None, help="run directory (default out/<dataset>-<config>)")
    a("--resume", action="store_true", help="continue from out_dir/ckpt.pt")
    a("--ckpt_interval", type=int, default=1000, help="save a checkpoint every this many steps")
    a("--eval_batch_size", type=int, default=10_000, help="samples drawn for the final evaluation")
    a("--sampler", choices=["ddpm", "ddim", "dpm++"], default="ddpm", help="sampler for the final evaluation")
    a("--sample_steps", type=int, default=None, help="network evaluations for the final evaluation (default: all T; dpm++: 20)")
    a("--log_interval", type=int, default=500, help="print a log line every this many steps")
    a("--sweep", action="store_true", help="train and evaluate the study's grid instead (see README)")
    a("--seeds", type=int, default=3, help="--sweep: seeds per configuration and dataset")
    a("--jobs", type=int, default=os.cpu_count(), help="--sweep: runs in parallel (1 thread each)")
    return p


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def fill_preset(args):
    """Settings left unset on the command line take the preset's value."""
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.low_frac == 0:  # oversampling off: one way to write it
        args.low_t = 0
    return args


def check_settings(args):
    """Fill in the preset and check everything but the run folder; fail with one line on a bad value.
    Returns the data, the DenoiserConfig and the NoiseScheduler's keyword arguments."""
    for name in ("train_steps", "batch_size", "eval_batch_size", "log_interval", "ckpt_interval"):
        if getattr(args, name) <= 0:
            fail(f"--{name} must be a positive integer, got {getattr(args, name)}")
    fill_preset(args)
    if not 0 <= args.low_frac <= 1 or (args.low_frac > 0 and not 1 <= args.low_t <= args.num_timesteps):
        fail(f"--low_frac must lie in [0, 1] and --low_t in [1, T={args.num_timesteps}] (got {args.low_frac:g} and {args.low_t})")
    try:
        X = datasets.load_dataset(args.dataset)
        cfg = td.DenoiserConfig(attn_layers=args.attn_layers, heads=args.heads, ssm_layers=args.ssm_layers, hidden=args.hidden, block=args.block,
                                coord_scale=args.coord_scale, data_dim=X.shape[1])
        td.Denoiser(cfg)  # raises for heads that do not divide the width
        sched_cfg = dict(num_train_timesteps=args.num_timesteps, beta_schedule=args.beta_schedule)
        sched = td.NoiseScheduler(**sched_cfg)
        if args.sample_steps is not None:  # refused now rather than after training
            sched.set_timesteps(args.sample_steps)
    except ValueError as e:
        fail(str(e))
    return X, cfg, sched_cfg


def config_name(args):
    parts = ([f"attn{args.attn_layers}x{args.heads}"] if args.attn_layers else []) + ([f"ssm{args.ssm_layers}"] if args.ssm_layers else [])
    return "-".join(parts) or "base"


def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def lr_lambda(warmup, total):
    """Linear warm-up, then cosine annealing to 0 over the rest of the run."""

    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


def ema_update(decay, every, warmup):
    """AveragedModel's update rule, called every `every` steps (n = updates so far, so the update
    of step s = n * every). warmup = 0: a constant decay. warmup > 0: the study's EMA (ema_pytorch
    with update_after_step=warmup, inv_gamma=1, power=2/3): copy the weights while s <= warmup, then
    decay by min(decay, 1 - (1 + s - warmup)^(-2/3)), which reaches 0.995 near s = 2,900 for warmup 100."""

    @torch.no_grad()
    def update(ema_params, params, n):
        s = int(n) * every
        d = decay if warmup == 0 else 0.0 if s <= warmup else min(decay, 1 - (1 + s - warmup) ** (-2 / 3))
        for e, p in zip(ema_params, params):
            e.lerp_(p, 1 - d)

    return update


class EpochBatches:
    """The study's batches: shuffled passes over the data without replacement (a DataLoader with
    shuffle=True), the last batch of each pass short. A function of the step alone, so resuming
    draws the same rows."""

    def __init__(self, n, batch_size, seed):
        self.n, self.batch_size, self.seed, self.epoch, self.perm = n, batch_size, seed, None, None

    def rows(self, step):
        epoch, j = divmod(step, -(-self.n // self.batch_size))  # ceil(n / batch) batches per pass
        if epoch != self.epoch:
            self.epoch = epoch
            self.perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return self.perm[j * self.batch_size : (j + 1) * self.batch_size]


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.sweep:
        return sweep(args)
    # -------------------------------------------------------------------------
    # settings: checks first, so that a bad command line costs nothing
    args.out_dir = args.out_dir or os.path.join("out", f"{os.path.splitext(os.path.basename(args.dataset))[0]}-{config_name(args)}")
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = None
    if args.resume:
        if not os.path.isfile(ckpt_path):
            fail(f"--resume found no checkpoint at {ckpt_path}; run without --resume to start, or point --out_dir at the run")
        try:
            ckpt = td.load_checkpoint(ckpt_path)
        except td.CheckpointError as e:
            fail(str(e))
        given = vars(args)
        for k in RUN_KEYS:  # the run's math comes from the checkpoint
            given[k] = ckpt["args"].get(k, LEGACY_ARGS.get(k, given[k]))
    X, cfg, sched_cfg = check_settings(args)
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        probe = os.path.join(args.out_dir, ".write-test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        fail(f"cannot write to --out_dir {args.out_dir} ({e.strerror}); choose a writable directory")

    device = pick_device(args.device)
    if device.type == "cpu":
        args.threads = args.threads or 1
        torch.set_num_threads(args.threads)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    # -------------------------------------------------------------------------
    # data, model, optimizer
    torch.manual_seed(args.seed)
    data = torch.as_tensor(X, dtype=torch.float32, device=device)
    model = td.Denoiser(cfg).to(device)
    # a user's file is standardized inside the model (named datasets keep the study's coordinates); prior data: start from the data's moments
    model.set_data_stats(torch.as_tensor(X), standardize=args.dataset not in datasets.DATASETS, moments=args.prior == "data")
    scheduler = td.NoiseScheduler(**sched_cfg).to(device)
    ema = AveragedModel(model, multi_avg_fn=ema_update(args.ema_decay, args.ema_every, args.ema_warmup))
    epochs = EpochBatches(len(data), args.batch_size, args.seed) if args.batches == "epochs" else None
    fused = device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=fused)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, args.train_steps))
    gen = torch.Generator(device=device).manual_seed(args.seed)  # batches, timesteps and noise
    step, losses, train_time, curve = 0, [], 0.0, []
    if args.eval_interval:  # KL during training: a fixed small sample, its floor and the data's kNN radii computed once
        curve_eval = evaluate.CurveEval(X, args.dataset, device)
    if ckpt is not None:
        try:
            td.load_weights(model, ckpt["model"])
            td.load_weights(ema.module, ckpt["ema"])
        except ValueError as e:  # the data now have another number of columns
            fail(f"cannot resume {ckpt_path} with {args.dataset}: {e}")
        except RuntimeError:
            fail(f"{ckpt_path} does not fit this model's config; it was written by an incompatible version")
        ema.n_averaged.fill_(ckpt["ema_n_averaged"])
        optimizer.load_state_dict(ckpt["optimizer"])
        lr_sched.load_state_dict(ckpt["lr_scheduler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        gen.set_state(ckpt["rng"]["gen"].to(gen.get_state().device))
        step, losses, train_time, curve = ckpt["step"], ckpt["losses"], ckpt["train_time"], ckpt.get("curve", [])
        print(f"resuming {ckpt_path} at step {step}")
    fwd = torch.compile(model) if args.compile else model
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.dataset}: {len(X)} points | {config_name(args)}: {n_params:,} params | device {device}"
          f"{f' ({args.threads} thread)' if device.type == 'cpu' else ''} | T={args.num_timesteps} {args.beta_schedule}, alpha_bar_T={scheduler.alpha_bar_T:.3f}, prior {args.prior}"
          + (f", {args.low_frac:.0%} of each batch at t < {args.low_t}" if args.low_frac > 0 else ""))

    def save():
        td.save_checkpoint(dict(
            format="tinydiff-1", args={k: v for k, v in vars(args).items()}, model_config=asdict(cfg), scheduler_config=sched_cfg,
            step=step, model=model.state_dict(), ema=ema.module.state_dict(), ema_n_averaged=int(ema.n_averaged),
            optimizer=optimizer.state_dict(), lr_scheduler=lr_sched.state_dict(),
            rng=dict(torch=torch.get_rng_state(), gen=gen.get_state()), losses=losses, train_time=train_time, curve=curve,
        ), ckpt_path)

    # -------------------------------------------------------------------------
    # training loop
    model.train()
    t_log = time.perf_counter()
    step_at_log = step
    while step < args.train_steps:
        t0 = time.perf_counter()
        rows = epochs.rows(step).to(device) if epochs else torch.randint(0, len(data), (args.batch_size,), device=device, generator=gen)
        x0 = data[rows]
        with autocast:
            loss = td.ddpm_loss(fwd, scheduler, x0, generator=gen, low_t=args.low_t, low_frac=args.low_frac)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        loss_val = loss.item()
        if not (math.isfinite(loss_val) and math.isfinite(grad_norm.item())):  # stop before the bad update
            print(f"error: the run diverged at step {step} (loss {loss_val:.4g}, grad norm {grad_norm.item():.4g}); try a lower --lr"
                  f" (now {args.lr:g}). The last good checkpoint is kept in {ckpt_path}.", file=sys.stderr)
            sys.exit(1)
        optimizer.step()
        lr_sched.step()
        if step % args.ema_every == 0:
            ema.update_parameters(model)
        losses.append(loss_val)
        step += 1
        train_time += time.perf_counter() - t0
        if step % args.log_interval == 0 or step == args.train_steps:
            ms = (time.perf_counter() - t_log) / (step - step_at_log) * 1e3
            eta = ms * (args.train_steps - step) / 1e3
            print(f"step {step:6d} | loss {np.mean(losses[-args.log_interval:]):.4f} | lr {lr_sched.get_last_lr()[0]:.2e} | {ms:.2f} ms/step | ETA {eta:.0f}s")
            t_log, step_at_log = time.perf_counter(), step
        if args.eval_interval and (step % args.eval_interval == 0 or step == args.train_steps):
            t_eval = time.perf_counter()
            curve.append(dict(step=step, train_time_s=train_time, knn_kl_bits=curve_eval(ema.module, scheduler)))
            t_log += time.perf_counter() - t_eval  # the log's ms/step counts training only
        if step % args.ckpt_interval == 0 or step == args.train_steps:
            save()

    # -------------------------------------------------------------------------
    # evaluation with the EMA weights: the study's columns, plus the floors of both KL metrics
    model_ema = ema.module.eval()
    metrics = dict(train_time_s=train_time, ms_per_step=train_time / max(1, len(losses)) * 1e3)
    if args.eval_loss == "raw-train":  # the study's: the raw model over one pass of the training points
        metrics["eval_loss"] = evaluate.eval_loss(model.eval(), scheduler, X, device, batch_size=args.batch_size)
    else:
        metrics["eval_loss"] = evaluate.eval_loss(model_ema, scheduler, evaluate.heldout_points(args.dataset, X=X), device)
    samples, metrics["inference_s"] = evaluate.timed_sample(model_ema, scheduler, args.eval_batch_size, device, sampler=args.sampler, steps=args.sample_steps)
    metrics.update(evaluate.compute_metrics(X, samples, evaluate.floor_draw(args.dataset, len(samples))))
    metrics.update(dataset=args.dataset, config=config_name(args), params=n_params, alpha_bar_T=scheduler.alpha_bar_T,
                   device=str(device), threads=args.threads, args=vars(args))
    if curve:
        metrics.update(curve=curve, curve_floor=curve_eval.floor, curve_samples=evaluate.CURVE_N)
        plot_curve(curve, curve_eval.floor, os.path.join(args.out_dir, "kl.png"), f"{args.dataset} · {config_name(args)}")
    with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    np.save(os.path.join(args.out_dir, "samples.npy"), samples)
    evaluate.plot_samples(X, samples, os.path.join(args.out_dir, "samples.png"),
                          f"{args.dataset} · {config_name(args)} · kNN-KL {metrics['knn_kl_bits']:.3f} bits"
                          + (f" (floor {metrics['knn_kl_floor']:.3f})" if "knn_kl_floor" in metrics else ""))  # a user's file has no floor
    plot_loss(losses, os.path.join(args.out_dir, "loss.png"))
    print(f"\n{args.dataset} · {config_name(args)} · {n_params:,} params · {args.train_steps} steps · batch {args.batch_size}")
    print(f"training time   {train_time:8.1f} s   ({metrics['ms_per_step']:.2f} ms/step)")
    print(f"inference time  {metrics['inference_s']:8.2f} s   ({args.eval_batch_size} samples, {args.sampler})")
    print(evaluate.format_table({k: v for k, v in metrics.items() if k not in ("inference_s",)}))
    print(f"wrote {args.out_dir}/: ckpt.pt metrics.json samples.npy samples.png loss.png" + (" kl.png" if curve else ""))
    return metrics


def plot_loss(losses, path):
    plt = evaluate.pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.3, alpha=0.4, label="per step")
    w = max(1, len(losses) // 100)
    if len(losses) >= w:
        ax.plot(np.arange(w - 1, len(losses)), np.convolve(losses, np.ones(w) / w, mode="valid"), label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("noise MSE")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curve(curve, floor, path, title):
    """kNN KL of the EMA model against training step (--eval_interval), with the floor if known."""
    plt = evaluate.pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([c["step"] for c in curve], [c["knn_kl_bits"] for c in curve], marker="o", ms=3, label=f"EMA model, {evaluate.CURVE_N} DPM++-20 samples")
    if floor is not None:
        ax.axhline(floor, color="gray", ls="--", lw=1, label=f"floor {floor:.3f} (a perfect model)")
    ax.set_xlabel("step")
    ax.set_ylabel("kNN KL (bits)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------
# --sweep: the study's grid (its Tables 1-5) plus the SSM rows, each run a subprocess of this script

SWEEP_CONFIGS = {"base": [], "attn1x4": ["--attn_layers", "1", "--heads", "4"], "attn1x8": ["--attn_layers", "1", "--heads", "8"],
                 "attn1x16": ["--attn_layers", "1", "--heads", "16"], "attn2x4": ["--attn_layers", "2", "--heads", "4"],
                 "ssm1": ["--ssm_layers", "1"], "ssm2": ["--ssm_layers", "2"]}
SWEEP_DATASETS = ["circle", "dino", "line", "moons"]


def sweep(args):
    from concurrent.futures import ThreadPoolExecutor

    root = args.out_dir or os.path.join("out", f"sweep-{args.preset}-{args.train_steps}")
    passed = [a for a in (sys.argv[1:]) if a != "--sweep"]
    for flag in ("--out_dir", "--seeds", "--jobs"):  # sweep-only flags are not passed on
        while flag in passed:
            i = passed.index(flag)
            del passed[i : i + 2]
    # the study's tables first (baseline, then attention), then the SSM rows; rerunning resumes
    runs = [(c, d, s) for c in SWEEP_CONFIGS for d in SWEEP_DATASETS for s in range(args.seeds)]
    run_args = lambda c, d, s: [*passed, "--dataset", d, *SWEEP_CONFIGS[c], "--seed", str(s), "--threads", "1"]

    # a bad setting is refused once, here, rather than by each run
    for name in ("seeds", "jobs"):
        if getattr(args, name) <= 0:
            fail(f"--{name} must be a positive integer, got {getattr(args, name)}")
    for c, d in dict.fromkeys((c, d) for c, d, _ in runs):
        check_settings(get_parser().parse_args(run_args(c, d, 0)))
    os.makedirs(root, exist_ok=True)
    # rerunning resumes: finished runs are kept and killed ones continue, but only if they were made with these settings
    for c, d, s in runs:
        out, want = os.path.join(root, f"{d}-{c}-s{s}"), vars(fill_preset(get_parser().parse_args(run_args(c, d, s))))
        try:
            if os.path.isfile(os.path.join(out, "metrics.json")):
                with open(os.path.join(out, "metrics.json")) as f:
                    have = json.load(f)["args"]
            elif os.path.isfile(os.path.join(out, "ckpt.pt")):
                have = td.load_checkpoint(os.path.join(out, "ckpt.pt"))["args"]
            else:
                continue
        except (OSError, ValueError, KeyError) as e:
            fail(f"cannot read the earlier run in {out} ({e}); delete that folder and rerun the sweep")
        differ = [k for k in RUN_KEYS if have.get(k, LEGACY_ARGS.get(k)) != want[k]]
        if differ:
            fail(f"{root} holds runs made with other settings ({', '.join(differ)} differ in {out}); "
                 f"pass --out_dir for a new sweep, or delete the old one")

    def one(run):
        c, d, s = run
        out = os.path.join(root, f"{d}-{c}-s{s}")
        if os.path.isfile(os.path.join(out, "metrics.json")):
            return
        cmd = [sys.executable, os.path.abspath(__file__), *run_args(c, d, s), "--out_dir", out, "--log_interval", str(10**9)]
        if os.path.isfile(os.path.join(out, "ckpt.pt")):
            cmd.append("--resume")
        with open(os.path.join(root, f"{d}-{c}-s{s}.log"), "w") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
        print(f"{'done' if rc == 0 else f'FAILED ({rc})'}: {d} {c} seed {s}", flush=True)

    t0 = time.time()
    print(f"sweep: {len(runs)} runs, {args.jobs} at a time, into {root}/")
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, runs))
    print(f"sweep finished in {time.time() - t0:.0f}s")
    write_results(root, args, " ".join(["python train.py --sweep", *passed]))


def write_results(root, args, command="python train.py --sweep"):
    """results.md (one table per configuration, mean +- sd over seeds) and samples.png (datasets x configs)."""
    plt = evaluate.pyplot()

    cols = [("train_time_s", "train time (s)", 1), ("eval_loss", "eval loss", 4), ("inference_s", "inference (s)", 2),
            ("knn_kl_bits", "kNN KL (bits)", 3), ("hist_kl_nats", "hist KL (nats)", 3)]
    lines = [f"# Sweep results ({args.preset} preset, {args.train_steps} steps, batch {args.batch_size})", "",
             "Mean +- sample sd over seeds (n = seeds found). Floors: the metric for a fresh draw from the data's own generator.",
             f"Excess = kNN KL - its floor. Written by `{command}`.", ""]
    cell, found = {}, 0  # (config, dataset) -> excess kNN KL, for the summary table; runs found
    # mean +- sample sd over seeds (just the value for a single seed)
    mean_sd = lambda v, nd: f"{np.mean(v):.{nd}f}" + (f" +- {np.std(v, ddof=1):.{nd}f}" if len(v) > 1 else "")
    fig, axes = plt.subplots(len(SWEEP_DATASETS), len(SWEEP_CONFIGS), figsize=(2.2 * len(SWEEP_CONFIGS), 2.2 * len(SWEEP_DATASETS)), squeeze=False)
    for j, c in enumerate(SWEEP_CONFIGS):
        lines += [f"## {c}", "", "| dataset | n | " + " | ".join(h for _, h, _ in cols) + " | kNN floor | excess kNN KL | hist floor |",
                  "|---" * (len(cols) + 5) + "|"]
        for i, d in enumerate(SWEEP_DATASETS):
            ms = []
            for s in range(args.seeds):
                f = os.path.join(root, f"{d}-{c}-s{s}", "metrics.json")
                if os.path.isfile(f):
                    with open(f) as fh:
                        ms.append(json.load(fh))
            ax = axes[i, j]
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_xlim(-5, 5), ax.set_ylim(-5, 5)
            if i == 0:
                ax.set_title(c, fontsize=9)
            if j == 0:
                ax.set_ylabel(d, fontsize=9)
            if not ms:
                continue
            found += len(ms)
            fmt = lambda k, nd: mean_sd([m[k] for m in ms], nd)
            excess = [m["knn_kl_bits"] - m["knn_kl_floor"] for m in ms]
            cell[c, d] = f"{mean_sd(excess, 3)} ({len(ms)})"
            lines.append(f"| {d} | {len(ms)} | " + " | ".join(fmt(k, nd) for k, _, nd in cols)
                         + f" | {np.mean([m['knn_kl_floor'] for m in ms]):.3f} | {mean_sd(excess, 3)}"
                         + f" | {np.mean([m['hist_kl_floor'] for m in ms]):.3f} |")
            shown = [f for f in (os.path.join(root, f"{d}-{c}-s{s}", "samples.npy") for s in range(args.seeds)) if os.path.isfile(f)]
            if shown:  # the lowest seed that finished
                pts = np.load(shown[0])
                ax.scatter(pts[:, 0], pts[:, 1], s=0.3, alpha=0.3, linewidths=0)
                ax.text(-4.8, -4.8, f"{np.mean(excess):.2f}", fontsize=7)
        lines.append("")
    total = len(SWEEP_CONFIGS) * len(SWEEP_DATASETS) * args.seeds
    summary = [f"Runs finished: {found} of {total}" + ("." if found == total else " (rerun the same command to finish the rest)."), "",
               "## Summary: excess kNN KL (bits), mean +- sample sd (n seeds)", "",
               "| configuration | " + " | ".join(SWEEP_DATASETS) + " |", "|---" * (len(SWEEP_DATASETS) + 1) + "|"]
    summary += [f"| {c} | " + " | ".join(cell.get((c, d), "-") for d in SWEEP_DATASETS) + " |" for c in SWEEP_CONFIGS]
    lines[5:5] = summary + [""]
    fig.tight_layout()
    fig.savefig(os.path.join(root, "samples.png"), dpi=100)
    plt.close(fig)
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {root}/results.md and {root}/samples.png")


if __name__ == "__main__":
    main()
