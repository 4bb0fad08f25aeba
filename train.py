"""Train a 2-D diffusion model, then evaluate it. Top to bottom, nanoGPT style.

    python train.py --dataset dino                          # tinydiff defaults
    python train.py --dataset dino --attn_layers 2 --heads 4
    python train.py --dataset moons --preset paper          # the study's code path
    python train.py --dataset dino --resume                 # continue out/dino-base
    torchrun --standalone --nproc_per_node=2 train.py --dataset dino   # data-parallel (DDP)

Under torchrun every process draws the same global batch (--batch_size) and takes its own share of
the rows; rank 0 alone logs, writes checkpoints and evaluates.
"""
import glob
import math
import os
import signal
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

import datasets
import evaluate
import tinydiff as td

# Settings that differ between the study ("paper": its template code, setting by setting) and
# tinydiff's measured defaults (see README).
PRESETS = {
    "paper": dict(block="relu", lr=3e-4, warmup_steps=0, grad_clip=0.5, ema_decay=0.995, ema_every=10, ema_warmup=100, batches="epochs",
                  num_timesteps=100, beta_schedule="linear", coord_scale=25.0, prior="standard", low_t=0, low_frac=0.0, eval_loss="raw-train"),
    "tinydiff": dict(block="gelu", lr=2e-3, warmup_steps=0, grad_clip=10.0, ema_decay=0.995, ema_every=1, ema_warmup=100, batches="random",
                     num_timesteps=100, beta_schedule="linear", coord_scale=50.0, prior="data", low_t=2, low_frac=0.25, eval_loss="ema-heldout"),
}
# What runs from before an option existed did: they read as if run with these values.
LEGACY_ARGS = dict(low_t=0, low_frac=0.0, block="gelu", ema_every=1, ema_warmup=0, batches="random", eval_loss="ema-heldout")
# Arguments that define the run's math: --resume takes them from the checkpoint and refuses others.
RUN_KEYS = ("dataset", "preset", "attn_layers", "heads", "ssm_layers", "hidden", "block", "coord_scale", "num_timesteps", "beta_schedule", "prior",
            "low_t", "low_frac", "train_steps", "batch_size", "batches", "lr", "warmup_steps", "ema_decay", "ema_every", "ema_warmup", "grad_clip",
            "eval_loss", "seed", "threads", "dtype")


def preset_value(key):
    """'tinydiff: X, paper: Y', for the help of a flag that a preset sets."""
    return ", ".join(f"{name}: {p[key]}" for name, p in PRESETS.items())


def get_parser(p=None, skip=()):
    """train.py's flags, added to p (sweep.py passes its own parser and the flags the grid sets)."""
    p = p or evaluate.ArgumentParser(description="Train a DDPM on low-dimensional points, then evaluate it.")
    a = lambda flag, **kw: None if flag[2:] in skip else p.add_argument(flag, **kw)
    pre = lambda text, key: f"{text} (default from --preset: {preset_value(key)})"
    a("--dataset", default="dino", help=f"{', '.join(datasets.DATASETS)}, or a path to an (N, D) .csv/.tsv/.txt/.npy file")
    a("--preset", choices=sorted(PRESETS), default="tinydiff", help="tinydiff (measured defaults) or paper (the study's code path)")
    a("--attn_layers", type=int, default=0, help="self-attention layers over the tokens [x1, ..., xD, t]")
    a("--heads", type=int, default=4, help="attention heads; must divide 128")
    a("--ssm_layers", type=int, default=0, help="bidirectional SSM (Mamba) blocks over the tokens")
    a("--hidden", type=int, default=256, help="width of the residual MLP")
    a("--block", choices=["gelu", "relu"], default=None, help=pre("residual MLP form: gelu = Linear-GELU-(x+GELU(Wx))-Linear, relu = the study's Linear-(x+W ReLU(x))-ReLU-Linear", "block"))
    a("--coord_scale", type=float, default=None, help=pre("sinusoidal-embedding scale of the coordinates", "coord_scale"))
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
      help=pre("eval loss: EMA model on 10,000 held-out points (a file: 10,000 of its own points), or the study's raw model over one pass of the training points", "eval_loss"))
    a("--eval_interval", type=int, default=0, help="every this many steps, record the EMA model's kNN KL (2,000 DPM++-20 samples) and draw kl.png (0 = off)")
    a("--seed", type=int, default=0, help="seeds model init, batches, timesteps and noise")
    a("--device", default="auto", help="auto (cuda -> mps -> cpu), cpu, cuda, cuda:1, mps")
    a("--threads", type=int, default=None, help="CPU threads (default 1: fastest for this model size; docs/performance.md)")
    a("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 autocasts the forward pass")
    a("--compile", action="store_true", help="torch.compile the model (off by default)")
    a("--out_dir", default=None, help="run directory (default out/<dataset>-<config>)")
    a("--resume", action="store_true", help="continue the run in --out_dir from its ckpt.pt, with its settings")
    a("--auto_resume", action="store_true", help="resume if --out_dir holds a checkpoint, else start; a finished run is left as it is (for job arrays)")
    a("--overwrite", action="store_true", help="replace the run already in --out_dir")
    a("--ckpt_interval", type=int, default=1000, help="save a checkpoint every this many steps")
    a("--eval_batch_size", type=int, default=10_000, help="samples drawn for the final evaluation")
    a("--sampler", choices=td.SAMPLERS, default="ddpm", help="sampler for the final evaluation")
    a("--sample_steps", type=int, default=None, help="network evaluations for the final evaluation (default: all T; dpm++: 20)")
    a("--log_interval", type=int, default=500, help="print a log line every this many steps")
    return p


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


def sub_seed(seed, k):
    """A seed of its own for the k-th stream of a run (an epoch's order, a resume on another device)."""
    return (seed * 1_000_003 + k) % 2**63


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
            self.perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(sub_seed(self.seed, epoch)))
        return self.perm[j * self.batch_size : (j + 1) * self.batch_size]


fail = evaluate.fail
RUN_FILES = ("ckpt.pt", "metrics.json", "samples.npy", "samples.png", "loss.png", "kl.png")
RESUME_FREE = ("threads", "train_steps")  # run settings that --resume lets a user change (train_steps: only upwards)


def fill_preset(args):
    """Settings left unset on the command line take the preset's value."""
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.low_frac == 0:  # oversampling off: one way to write it
        args.low_t = 0
    return args


def check_settings(args, data_file=None):
    """Fill in the preset and check every flag before any work; fail with one line on a bad value.
    Returns the data (read from data_file, default --dataset), the DenoiserConfig and the NoiseScheduler's keyword arguments."""
    fill_preset(args)
    data_file = data_file or args.dataset
    for name in ("train_steps", "batch_size", "eval_batch_size", "log_interval", "ckpt_interval", "heads", "hidden", "ema_every", "num_timesteps"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.sample_steps is not None and args.sample_steps < 1:
        fail(f"--sample_steps must be a positive integer, got {args.sample_steps}")
    if args.eval_batch_size <= evaluate.KNN_K:
        fail(f"--eval_batch_size must be more than {evaluate.KNN_K} (the kNN estimator's k), got {args.eval_batch_size}")
    for name in ("eval_interval", "attn_layers", "ssm_layers", "warmup_steps", "ema_warmup", "low_t"):
        if getattr(args, name) < 0:
            fail(f"--{name} must be 0 or more, got {getattr(args, name)}")
    checks = [("lr", math.isfinite(args.lr) and args.lr > 0, "a positive number, such as 1e-3"),
              ("grad_clip", args.grad_clip > 0, "a positive number (inf = no clipping)"),
              ("coord_scale", math.isfinite(args.coord_scale) and args.coord_scale > 0, "a positive number"),
              ("ema_decay", 0 <= args.ema_decay < 1, "in [0, 1), such as 0.995"),
              ("threads", args.threads is None or args.threads >= 1, "a positive integer"),
              ("seed", 0 <= args.seed < 2**63, "an integer in [0, 2^63)")]
    for name, ok, valid in checks:  # written so that NaN fails too
        if not ok:
            fail(f"--{name} must be {valid}, got {getattr(args, name)}")
    if not 0 <= args.low_frac <= 1 or (args.low_frac > 0 and not 1 <= args.low_t <= args.num_timesteps):
        fail(f"--low_frac must lie in [0, 1] and --low_t in [1, T={args.num_timesteps}] (got {args.low_frac:g} and {args.low_t})")
    if args.attn_layers and 128 % args.heads:
        fail(f"--heads {args.heads} must divide the token width 128; use 1, 2, 4, 8, 16, 32, 64 or 128")
    device = pick_device(args.device)
    try:
        X = datasets.load_dataset(data_file)
        cfg = td.DenoiserConfig(attn_layers=args.attn_layers, heads=args.heads, ssm_layers=args.ssm_layers, hidden=args.hidden, block=args.block,
                                coord_scale=args.coord_scale, data_dim=X.shape[1])
        sched_cfg = dict(num_train_timesteps=args.num_timesteps, beta_schedule=args.beta_schedule)
        sched = td.NoiseScheduler(**sched_cfg)
        evaluate.check_steps(sched, args.sample_steps or td.DEFAULT_STEPS.get(args.sampler, args.num_timesteps))  # refused now, not after training
    except ValueError as e:
        fail(str(e))
    if len(X) <= evaluate.KNN_K:
        fail(f"{data_file} holds {len(X)} point{'s' * (len(X) != 1)}; scoring a model needs more than {evaluate.KNN_K}"
             f" (the kNN KL compares each point with its {evaluate.KNN_K} nearest neighbours); give more points")
    if not np.isfinite(X.astype(np.float32)).all():
        fail(f"{data_file} holds values beyond float32's range (|x| up to {np.abs(X).max():.3g}); rescale the data")
    try:  # samples: their copies in the sampler and the k-d tree
        evaluate.check_flag_memory("--batch_size", args.batch_size, args.batch_size * activation_bytes_per_row(td.Denoiser(cfg), sched, X.shape[1]), device)
        evaluate.check_flag_memory("--eval_batch_size", args.eval_batch_size, args.eval_batch_size * X.shape[1] * 64, device)
    except ValueError as e:
        fail(str(e))
    return X, cfg, sched_cfg


def activation_bytes_per_row(model, scheduler, dim, rows=32):
    """Bytes that autograd saves for the backward pass, per batch row, measured on a small batch."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        td.ddpm_loss(model, scheduler, torch.zeros(rows, dim))
    return sum(saved) / rows


def config_name(args):
    parts = ([f"attn{args.attn_layers}x{args.heads}"] if args.attn_layers else []) + ([f"ssm{args.ssm_layers}"] if args.ssm_layers else [])
    return "-".join(parts) or "base"


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        fail(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); use --device cpu or auto")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        fail("--device mps: MPS is not available here; use --device cpu or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        fail(f"--device {name}: tinydiff runs on cpu, cuda or mps")
    return device


def given_flags(argv):
    """The flags written on the command line (abbreviations are off, so the tokens are exact)."""
    return {tok[2:].split("=")[0] for tok in argv if tok.startswith("--")}


def take_settings_from(ckpt, args, given, ckpt_path):
    """--resume: flags not given take the checkpoint's value; a given math flag must agree with it."""
    saved = {**LEGACY_ARGS, **ckpt["args"]}
    for k, v in saved.items():
        if k in ("resume", "auto_resume", "overwrite", "out_dir") or not hasattr(args, k):
            continue
        if k not in given:
            setattr(args, k, v)
        elif k == "dataset" and ckpt.get("data_path") and os.path.abspath(args.dataset) == ckpt["data_path"]:
            args.dataset = v  # the same file, named from another folder
        elif k in RUN_KEYS and k not in RESUME_FREE and getattr(args, k) != v:
            fail(f"--{k} {getattr(args, k)} differs from this run's {v} (in {ckpt_path}); a resumed run keeps its settings: "
                 f"drop the flag, or start a new run with --overwrite or another --out_dir")
    if args.train_steps < saved["train_steps"]:
        fail(f"--train_steps {args.train_steps} is below this run's {saved['train_steps']}; a run can be extended, not shortened")
    print(f"resuming {ckpt_path} at step {ckpt['step']} of {args.train_steps}; from the checkpoint: "
          + ", ".join(f"{k} {getattr(args, k)}" for k in RUN_KEYS if k not in given))
    if args.train_steps > saved["train_steps"]:
        print(f"extending the run from {saved['train_steps']} to {args.train_steps} steps: the cosine schedule is stretched to the new end")


def claim_run_dir(path):
    """Make the run folder and lock it for this process: a second process refuses. The lock goes
    with the process, even when it is killed. (POSIX; on Windows there is no lock.)"""
    try:
        os.makedirs(path, exist_ok=True)
        f = open(os.path.join(path, ".lock"), "a")
    except OSError as e:
        fail(f"cannot write to --out_dir {path} ({e.strerror}); choose a writable directory")
    try:
        import fcntl

        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass
    except OSError:
        fail(f"another process is using {path} right now; wait for it to finish, or choose another --out_dir")
    return f  # the lock lasts as long as this file stays open


def write_or_fail(path, write, advice="free some space, then rerun with --resume (the last checkpoint is intact)"):
    """Write one output file atomically; a failed write (a full disk, say) costs one line and leaves
    the file's previous version as it was."""
    try:
        td.atomic_write(path, write)
    except OSError as e:
        fail(f"could not write {path} ({e.strerror or e}); {advice}")


def init_ddp(args, device):
    """Under torchrun (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on CUDA) and return
    (rank, world size, this process's device); alone: (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if args.batch_size % world:
        fail(f"--batch_size {args.batch_size} does not split over {world} processes; use a multiple of {world}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_available() or not dist.is_backend_available(backend):
        fail(f"this torch has no {backend} backend for data-parallel training on {device.type}; run without torchrun")
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        fail(f"data-parallel training runs on cpu or cuda, not {device.type}; pass --device cpu")
    dist.init_process_group(backend)
    if rank:
        sys.stdout = open(os.devnull, "w")  # rank 0 alone logs
    return rank, world, device


def main(argv=None):
    """SIGINT / SIGTERM during training: finish the step, save, stop with one line. A second signal,
    or one outside the training loop, stops at once; files are written atomically, so none is torn."""
    sig = dict(signum=None, training=False)

    def on_signal(signum, _frame):
        if sig["signum"] is not None or not sig["training"]:
            raise KeyboardInterrupt
        sig["signum"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where a caller ignores it
        signal.signal(signal.SIGINT, on_signal)
    try:
        return train(sys.argv[1:] if argv is None else [str(a) for a in argv], sig)
    except KeyboardInterrupt:
        fail("interrupted; every file already written is intact: rerun the same command (add --resume if the run folder holds a ckpt.pt)", code=130)


def train(argv, sig):
    args = get_parser().parse_args(argv)
    given = given_flags(argv)
    # -------------------------------------------------------------------------
    # settings: checks first, so that a bad command line costs nothing
    stem, ext = os.path.splitext(os.path.basename(args.dataset))
    args.out_dir = args.out_dir or os.path.join("out", f"{stem}{'-' + ext[1:].lower() if ext else ''}-{config_name(args)}"
                                                       + ("-paper" if args.preset == "paper" else ""))
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if (args.resume or args.auto_resume) and args.overwrite:
        fail("--resume continues the run in --out_dir and --overwrite replaces it; give one of them")
    if args.auto_resume:
        args.resume = os.path.isfile(ckpt_path)
    if args.resume and not os.path.isfile(ckpt_path):
        fail(f"--resume found no checkpoint at {ckpt_path}; run without --resume to start, or point --out_dir at the run")
    lead = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 holds the folder
    lock = claim_run_dir(args.out_dir) if args.resume and lead else None  # the run exists: hold it before reading it
    ckpt = None
    if args.resume:
        try:
            ckpt = td.load_checkpoint(ckpt_path)
        except td.CheckpointError as e:
            fail(str(e))
        finished = ckpt["step"] >= ckpt["args"]["train_steps"] and os.path.isfile(os.path.join(args.out_dir, "metrics.json"))
        if finished and args.auto_resume and ("train_steps" not in given or args.train_steps <= ckpt["step"]):
            print(f"{args.out_dir} is finished ({ckpt['step']} steps); nothing to do")
            return None
        if finished and ("train_steps" not in given or args.train_steps <= ckpt["step"]):
            fail(f"{args.out_dir} is already finished ({ckpt['step']} steps); pass a larger --train_steps to train it further")
        take_settings_from(ckpt, args, given, ckpt_path)
    if "heads" in given and not args.attn_layers:
        print("warning: --heads has no effect without --attn_layers (this run has no attention layers)", file=sys.stderr)
    data_file = evaluate.run_dataset(ckpt) if ckpt else args.dataset  # a resumed run's file where it was trained, from any folder
    X, cfg, sched_cfg = check_settings(args, data_file)
    names = datasets.column_names(data_file, X.shape[1])  # a text file's header, for the plot's axes: read with X
    data_path = None if data_file in datasets.DATASETS else os.path.abspath(data_file)  # for sample.py and --resume run from elsewhere
    rank, world, device = init_ddp(args, pick_device(args.device))
    lock = lock or claim_run_dir(args.out_dir) if rank == 0 else None
    if args.resume and rank == 0 and args.train_steps > ckpt["args"]["train_steps"]:  # an extension: the old results no longer describe the run
        if os.path.isfile(os.path.join(args.out_dir, "metrics.json")):
            os.remove(os.path.join(args.out_dir, "metrics.json"))
        drawn = sorted(glob.glob(os.path.join(glob.escape(args.out_dir), "samples-*")))  # sample.py's files, from the shorter run
        if drawn:
            print(f"note: {', '.join(map(os.path.basename, drawn))} in {args.out_dir} were drawn at step {ckpt['step']}; "
                  "rerun sample.py once the extended run is done")
    if not args.resume and rank == 0:
        old = [f for f in RUN_FILES if os.path.isfile(os.path.join(args.out_dir, f))]
        if old and not args.overwrite:
            fail(f"{args.out_dir} already holds a run ({', '.join(old)}); continue it with --resume, replace it with --overwrite, or choose another --out_dir")
        for f in old:
            os.remove(os.path.join(args.out_dir, f))

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
    schedule = lr_lambda(args.warmup_steps, args.train_steps)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    gen = torch.Generator(device=device).manual_seed(args.seed)  # batches, timesteps and noise
    step, losses, train_time, curve, saved_step = 0, [], 0.0, [], None
    if args.eval_interval or (ckpt and ckpt.get("curve")):  # KL during training: a fixed small sample, its floor and the data's kNN radii computed once
        curve_eval = evaluate.CurveEval(X, args.dataset, device)
    if ckpt is not None:
        try:
            td.load_weights(model, ckpt["model"])
            td.load_weights(ema.module, ckpt["ema"])
            ema.n_averaged.fill_(ckpt["ema_n_averaged"])
            optimizer.load_state_dict(ckpt["optimizer"])
            lr_sched.load_state_dict(ckpt["lr_scheduler"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            step, losses, train_time, curve = ckpt["step"], ckpt["losses"], ckpt["train_time"], ckpt.get("curve", [])
            saved_on = ckpt["rng"].get("device")  # absent in checkpoints from before it was recorded
            if len(ckpt["rng"]["gen"]) == len(gen.get_state()) or saved_on == device.type:
                gen.set_state(ckpt["rng"]["gen"])  # a wrong length on the same kind of device is a damaged file (RuntimeError)
            else:  # another kind of device, whose generator state has another form: a stream of its own for this seed and step
                gen.manual_seed(sub_seed(args.seed, step))
                print(f"note: {ckpt_path} was saved on {saved_on or 'another kind of device'}, whose random-generator state {device.type} "
                      "cannot use; the run goes on with a new random stream (from --seed and the step)")
        except ValueError as e:  # the data now have another number of columns
            fail(f"cannot resume {ckpt_path} with {args.dataset}: {e}")
        except (KeyError, TypeError, RuntimeError) as e:
            fail(f"{ckpt_path} does not hold a complete training state ({type(e).__name__}: {str(e)[:80]}); start a new run with --overwrite")
        for group, base in zip(optimizer.param_groups, lr_sched.base_lrs):  # the schedule's value now (differs only when extended)
            group["lr"] = base * schedule(step)
        saved_step = step
    fwd = DistributedDataParallel(model) if world > 1 else model
    fwd = torch.compile(fwd) if args.compile else fwd
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.dataset}: {len(X)} points | {config_name(args)}: {n_params:,} params | device {device}"
          f"{f' ({args.threads} thread)' if device.type == 'cpu' else ''} | T={args.num_timesteps} {args.beta_schedule}, alpha_bar_T={scheduler.alpha_bar_T:.3f}, prior {args.prior}"
          + (f", {args.low_frac:.0%} of each batch at t < {args.low_t}" if args.low_frac > 0 else "") + (f" | {world} processes" if world > 1 else ""), flush=True)

    def save():
        state = dict(
            format="tinydiff-1", args={k: v for k, v in vars(args).items()}, model_config=asdict(cfg), scheduler_config=sched_cfg, data_path=data_path,
            step=step, model=model.state_dict(), ema=ema.module.state_dict(), ema_n_averaged=int(ema.n_averaged),
            optimizer=optimizer.state_dict(), lr_scheduler=lr_sched.state_dict(),
            rng=dict(torch=torch.get_rng_state(), gen=gen.get_state(), device=device.type), losses=losses, train_time=train_time, curve=curve,
        )
        if rank == 0:
            write_or_fail(ckpt_path, lambda f: torch.save(state, f))
        return step

    # -------------------------------------------------------------------------
    # training loop
    model.train()
    t_log = time.perf_counter()
    step_at_log = step
    sig["training"] = True
    while step < args.train_steps:
        stop = sig["signum"]
        if world > 1:  # every process stops at the same step: share whether any was signalled (its own signal may come later)
            flag = torch.tensor([float(stop or 0)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = int(flag.item()) or None
        if stop is not None:  # SIGINT / SIGTERM: save at this step boundary, then stop
            save()
            fail(f"stopped by {signal.Signals(stop).name} at step {step}; saved {ckpt_path}; continue with: "
                 f"python train.py --out_dir {args.out_dir} --resume", code=128 + stop)
        t0 = time.perf_counter()
        rows = epochs.rows(step).to(device) if epochs else torch.randint(0, len(data), (args.batch_size,), device=device, generator=gen)
        x0 = data[rows]
        share = slice(rank * len(x0) // world, (rank + 1) * len(x0) // world) if world > 1 else None  # this process's rows of the batch
        with autocast:
            loss = td.ddpm_loss(fwd, scheduler, x0, generator=gen, low_t=args.low_t, low_frac=args.low_frac, rows=share) * world  # DDP averages over ranks
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        loss_val = loss.item()
        if not (math.isfinite(loss_val) and math.isfinite(grad_norm.item())):  # stop before the bad update
            kept = f"the last good checkpoint (step {saved_step}) is kept in {ckpt_path}" if saved_step is not None else "no checkpoint was written"
            fail(f"the run diverged at step {step} (loss {loss_val:.4g}, grad norm {grad_norm.item():.4g}); start again with a lower --lr "
                 f"(now {args.lr:g}) and --overwrite; {kept}", code=1)
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
            print(f"step {step:6d} | loss {np.mean(losses[-args.log_interval:]):.4f} | lr {lr_sched.get_last_lr()[0]:.2e} | {ms:.2f} ms/step | ETA {eta:.0f}s", flush=True)
            t_log, step_at_log = time.perf_counter(), step
        if args.eval_interval and rank == 0 and (step % args.eval_interval == 0 or step == args.train_steps):
            t_eval = time.perf_counter()
            curve.append(dict(step=step, train_time_s=train_time, knn_kl_bits=curve_eval(ema.module, scheduler)))
            t_log += time.perf_counter() - t_eval  # the log's ms/step counts training only
        if step % args.ckpt_interval == 0 or step == args.train_steps:
            saved_step = save()
    sig["training"] = False
    if sig["signum"] is not None:  # a signal during the last save: the run is saved; stop before evaluating
        fail(f"stopped by {signal.Signals(sig['signum']).name} after the last step; saved {ckpt_path}; evaluate it with: "
             f"python train.py --out_dir {args.out_dir} --resume", code=128 + sig["signum"])
    if world > 1:  # leave together: a rank that tears gloo down while the other still talks to it can abort
        dist.barrier()
        dist.destroy_process_group()
        if rank:
            return None

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
    out = lambda name: os.path.join(args.out_dir, name)
    title = f"{args.dataset} · {config_name(args)} · {args.preset} preset"
    if curve:
        metrics.update(curve=curve, curve_floor=curve_eval.floor, curve_samples=evaluate.CURVE_N)
        write_or_fail(out("kl.png"), lambda f: plot_curve(curve, curve_eval.floor, f, title))
    write_or_fail(out("samples.npy"), lambda f: np.save(f, samples))
    write_or_fail(out("samples.png"), lambda f: evaluate.plot_samples(X, samples, f, evaluate.sample_title(title, metrics), names))
    write_or_fail(out("loss.png"), lambda f: plot_loss(losses, f))
    write_or_fail(out("metrics.json"), lambda f: f.write(evaluate.to_json(metrics).encode()))  # last: it marks the run finished
    print(f"\n{title} · {n_params:,} params · {args.train_steps} steps · batch {args.batch_size}")
    print(f"training time   {train_time:8.1f} s   ({metrics['ms_per_step']:.2f} ms/step)")
    print(f"inference time  {metrics['inference_s']:8.2f} s   ({args.eval_batch_size} samples, {args.sampler})")
    print(evaluate.format_table({k: v for k, v in metrics.items() if k not in ("inference_s",)}))
    print(f"wrote {args.out_dir}/: " + " ".join(f for f in RUN_FILES if os.path.isfile(out(f))))
    return metrics


def plot_loss(losses, path):
    plt = evaluate.pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.3, alpha=0.4, label="per step")
    w = max(1, len(losses) // 100)
    if w > 1:
        ax.plot(np.arange(w - 1, len(losses)), np.convolve(losses, np.ones(w) / w, mode="valid"), label=f"running mean of {w} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("noise MSE")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
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
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


if __name__ == "__main__":
    main()
