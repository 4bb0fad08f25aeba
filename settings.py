"""train.py's settings: one table (FLAGS) gives the parser, both presets and the keys that --resume compares,
and the checks of each flag on its own, run before any work. sweep.py reads the same table.
"""

import math
import os
import sys
from typing import NamedTuple

import datasets
import evaluate
import runs
import tinydiff as td
from runs import fail


class Preset(NamedTuple):
    """A flag's value under each preset, when the command line does not give it."""

    tinydiff: object
    paper: object


# name, default (a Preset: set by --preset), run (True: defines the run; --resume keeps it), argparse keywords
FLAGS = [
    (
        "dataset",
        "dino",
        True,
        dict(help=f"{', '.join(datasets.DATASETS)}, or a path to an (N, D) .csv/.tsv/.txt/.npy file"),
    ),
    (
        "preset",
        "tinydiff",
        True,
        dict(choices=["tinydiff", "paper"], help="tinydiff (measured defaults) or paper (the study's code path)"),
    ),
    (
        "label_column",
        None,
        True,
        dict(
            help="a file's column of class labels (names or integers), by header name or 0-based index: trains p(x | "
            "label)"
        ),
    ),
    (
        "cond_columns",
        None,
        True,
        dict(help="a file's columns of numbers to condition on, NAME[,NAME...] or indices: trains p(x | c)"),
    ),
    (
        "conditional",
        False,
        True,
        dict(action="store_true", help=f"train a named dataset with its labels ({', '.join(datasets.CLASSES)})"),
    ),
    (
        "p_uncond",
        0.1,
        True,
        dict(
            type=float,
            help="share of rows trained without their condition, for classifier-free guidance; in [0, 1): the library "
            "takes 1 too, but a run that never sees its condition has nothing to train it for",
        ),
    ),
    (
        "holdout",
        0.1,
        True,
        dict(type=float, help="share of a file's points held out for the metrics, split with a fixed seed"),
    ),
    (
        "dequantize",
        False,
        True,
        dict(
            action="store_true",
            help="a file of integers (pixels, counts): add U(0, 1) noise once, so that the model learns a density; "
            "the NLL is then an upper bound on the integers' -log2 P(x)",
        ),
    ),
    ("attn_layers", 0, True, dict(type=int, help="self-attention layers over the tokens [x1, ..., xD, t]")),
    (
        "heads",
        4,
        True,
        dict(type=int, help=f"attention heads; must divide the token width {td.DenoiserConfig.emb_dim}"),
    ),
    ("ssm_layers", 0, True, dict(type=int, help="bidirectional SSM (Mamba) blocks over the tokens")),
    ("hidden", 256, True, dict(type=int, help="width of the residual MLP")),
    (
        "block",
        Preset("gelu", "relu"),
        True,
        dict(
            choices=["gelu", "relu"],
            help="residual MLP form: gelu = Linear-GELU-(x+GELU(Wx))-Linear, relu = the study's Linear-(x+W "
            "ReLU(x))-ReLU-Linear",
        ),
    ),
    ("coord_scale", Preset(50.0, 25.0), True, dict(type=float, help="sinusoidal-embedding scale of the coordinates")),
    ("num_timesteps", Preset(100, 100), True, dict(type=int, help="diffusion steps T")),
    (
        "beta_schedule",
        Preset("linear", "linear"),
        True,
        dict(
            choices=td.BETA_SCHEDULES,
            help="noise schedule; logsnr: log(alpha_t / sigma_t) even in t, from linear's first step to pure noise",
        ),
    ),
    (
        "prediction_type",
        Preset("epsilon", "epsilon"),
        True,
        dict(
            choices=td.PREDICTION_TYPES, help="what the network predicts: the noise, v = alpha eps - sigma x_0, or x_0"
        ),
    ),
    (
        "loss_weighting",
        Preset("target", "target"),
        True,
        dict(
            choices=td.LOSS_WEIGHTINGS,
            help="target: the MSE of what the network predicts; epsilon: the MSE of the noise it implies (with "
            "--beta_schedule logsnr and uniform t, the variational bound's weighting)",
        ),
    ),
    (
        "prior",
        Preset("data", "standard"),
        True,
        dict(
            choices=["data", "standard"],
            help="sampler start: data = Gaussian with the moments of q(x_T) given the data's mean and covariance, "
            "standard = N(0, I)",
        ),
    ),
    ("low_t", Preset(2, 0), True, dict(type=int, help="oversample timesteps t < low_t in training (0 = off)")),
    ("low_frac", Preset(0.25, 0.0), True, dict(type=float, help="share of each batch drawn from t < low_t")),
    ("train_steps", 10_000, True, dict(type=int, help="optimizer steps")),
    ("batch_size", 256, True, dict(type=int, help="rows per optimizer step")),
    (
        "batches",
        Preset("random", "epochs"),
        True,
        dict(
            choices=["random", "epochs"],
            help="random = rows drawn with replacement; epochs = shuffled passes without replacement, as a DataLoader",
        ),
    ),
    ("lr", Preset(2e-3, 3e-4), True, dict(type=float, help="peak AdamW learning rate")),
    ("warmup_steps", Preset(0, 0), True, dict(type=int, help="linear LR warm-up steps before the cosine decay")),
    ("ema_decay", Preset(0.995, 0.995), True, dict(type=float, help="EMA decay of the weights used for sampling")),
    ("ema_every", Preset(1, 10), True, dict(type=int, help="update the EMA every this many steps")),
    (
        "ema_warmup",
        Preset(100, 100),
        True,
        dict(
            type=int,
            help="0 = constant decay; N > 0 = the study's EMA: copy the weights for N steps, then decay "
            "min(ema_decay, 1 - (1 + s - N)^(-2/3))",
        ),
    ),
    ("grad_clip", Preset(10.0, 0.5), True, dict(type=float, help="gradient-norm clip")),
    (
        "eval_loss",
        Preset("ema-heldout", "raw-train"),
        True,
        dict(
            choices=["ema-heldout", "raw-train"],
            help="eval loss: EMA model on 10,000 fresh points (a file: its held-out points), or the study's raw model "
            "over one pass of the training points",
        ),
    ),
    ("seed", 0, True, dict(type=int, help="seeds model init, batches, timesteps and noise")),
    (
        "threads",
        None,
        True,
        dict(type=int, help="CPU threads (default 1: fastest for this model size; docs/performance.md)"),
    ),
    ("dtype", "fp32", True, dict(choices=["fp32", "bf16"], help="bf16 autocasts the forward pass")),
    (
        "eval_interval",
        0,
        False,
        dict(
            type=int,
            help="every this many steps, record the EMA model's kNN KL (2,000 DPM++-20 samples) and draw kl.png (0 = "
            "off)",
        ),
    ),
    ("device", "auto", False, dict(help="auto (cuda -> mps -> cpu), cpu, cuda, cuda:1, mps")),
    ("compile", False, False, dict(action="store_true", help="torch.compile the model (needs a C++ compiler on CPU)")),
    ("out_dir", None, False, dict(help="run directory (default out/<dataset>-<config>)")),
    (
        "resume",
        False,
        False,
        dict(action="store_true", help="continue the run in --out_dir from its ckpt.pt, with its settings"),
    ),
    (
        "auto_resume",
        False,
        False,
        dict(
            action="store_true",
            help="resume if --out_dir holds a checkpoint, else start; a finished run is left as it is",
        ),
    ),
    ("overwrite", False, False, dict(action="store_true", help="replace the run already in --out_dir")),
    ("ckpt_interval", 1000, False, dict(type=int, help="save a checkpoint every this many steps")),
    ("n", 10_000, False, dict(type=int, help="samples drawn for the final evaluation, as sample.py's --n")),
    ("sampler", "ddpm", False, dict(choices=td.SAMPLERS, help="sampler for the final evaluation")),
    (
        "sample_steps",
        None,
        False,
        dict(type=int, help="network evaluations for the final evaluation (default: all T; dpm++: 20, at most T)"),
    ),
    (
        "guidance",
        1.0,
        False,
        dict(
            type=float,
            help="guidance weight w for the final evaluation: 1 = conditional, 0 = unconditional, > 1 guided",
        ),
    ),
    (
        "nll",
        0,
        False,
        dict(
            type=int,
            nargs="?",
            const=1000,
            help="also compute the exact NLL (probability-flow ODE) of this many held-out points; --nll alone: 1000",
        ),
    ),
    ("log_interval", 500, False, dict(type=int, help="print a log line every this many steps")),
]
PRESETS = {name: {k: getattr(d, name) for k, d, _, _ in FLAGS if isinstance(d, Preset)} for name in Preset._fields}
RUN_KEYS = tuple(k for k, _, run, _ in FLAGS if run)
RESUME_FREE = ("threads", "train_steps")  # run settings that --resume lets a user change (train_steps: only upwards)
KEPT = (
    "eval_interval",
    "ckpt_interval",
    "n",
    "sampler",
    "sample_steps",
    "log_interval",
    "guidance",
    "nll",
)  # resumed unless given


MAX_NLL = 100_000  # --nll points at most: the ODE takes about 10 s per 1,000 points on one CPU thread

# earlier names a flag is still read by, from the one table of renamed settings (which checkpoints use too)
ALIASES = {new: tuple(old for old, n in runs.RENAMED.items() if n == new) for new in set(runs.RENAMED.values())}


def check_aliases(argv):
    """A flag and its earlier name both given would silently take the last; refuse that."""
    for name, earlier in ALIASES.items():
        spellings = {f"--{n}" for n in (name, *earlier)}
        given = sorted({tok.split("=")[0] for tok in argv if tok.split("=")[0] in spellings})
        if len(given) > 1:
            fail(f"{' and '.join(given)} are one flag (--{earlier[0]} is --{name}'s earlier name); give it once")


def get_parser(p=None, skip=()):
    """train.py's flags, added to p (sweep.py passes its own parser and the flags the grid sets)."""
    p = p or runs.ArgumentParser(description="Train a DDPM on low-dimensional points, then evaluate it.")
    for name, default, _, kw in FLAGS:
        if name in skip:
            continue
        if isinstance(default, Preset):
            kw = dict(
                kw, help=f"{kw['help']} (default from --preset: tinydiff: {default.tinydiff}, paper: {default.paper})"
            )
            default = None
        elif "action" not in kw:
            kw = dict(kw, help=f"{kw['help']} (default: {default})")
        p.add_argument(f"--{name}", *(f"--{a}" for a in ALIASES.get(name, ())), dest=name, default=default, **kw)
    return p


def fill_preset(args):
    """Settings left unset take the preset's value, then each setting gets its one written form, so
    that a command line and the settings stored from it compare equal."""
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.low_frac == 0 or args.low_t == 0:  # oversampling off ("--low_t 0 = off"): one written form
        args.low_t, args.low_frac = 0, 0.0
    return args


def default_out_dir(args):
    stem, ext = os.path.splitext(os.path.basename(args.dataset.rstrip("/")))
    condition = "-cond" if args.conditional or args.label_column is not None or args.cond_columns is not None else ""
    return os.path.join(
        "out",
        f"{stem}{'-' + ext[1:].lower() if ext else ''}-{runs.config_name(**vars(args))}{condition}"
        + ("-paper" if args.preset == "paper" else ""),
    )


def check_flags(args):
    """Every flag's value on its own, before any work: one line naming the flag and what is valid."""
    for name in (
        "train_steps",
        "batch_size",
        "n",
        "log_interval",
        "ckpt_interval",
        "heads",
        "hidden",
        "ema_every",
        "num_timesteps",
    ):
        if getattr(args, name) < 1:
            fail(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.sample_steps is not None and args.sample_steps < 1:
        fail(f"--sample_steps must be a positive integer, got {args.sample_steps}")
    if args.n <= evaluate.KNN_K:
        fail(f"--n must be more than {evaluate.KNN_K} (the kNN estimator's k), got {args.n}")
    for name in ("eval_interval", "attn_layers", "ssm_layers", "warmup_steps", "ema_warmup", "low_t"):
        if getattr(args, name) < 0:
            fail(f"--{name} must be 0 or more, got {getattr(args, name)}")
    checks = [
        ("lr", math.isfinite(args.lr) and args.lr > 0, "a positive number, such as 1e-3"),
        ("grad_clip", args.grad_clip > 0, "a positive number (inf = no clipping)"),
        ("coord_scale", math.isfinite(args.coord_scale) and args.coord_scale > 0, "a positive number"),
        ("ema_decay", 0 <= args.ema_decay < 1, "in [0, 1), such as 0.995"),
        ("threads", args.threads is None or args.threads >= 1, "a positive integer"),
        ("seed", 0 <= args.seed < 2**63, "an integer in [0, 2^63)"),
    ]
    for name, ok, valid in checks:  # written so that NaN fails too
        if not ok:
            fail(f"--{name} must be {valid}, got {getattr(args, name)}")
    if not 0 <= args.low_frac <= 1 or (args.low_frac > 0 and not 1 <= args.low_t <= args.num_timesteps):
        fail(
            f"--low_frac must lie in [0, 1] and --low_t in [1, T={args.num_timesteps}] (got {args.low_frac:g} and "
            f"{args.low_t})"
        )
    try:  # the library's own rules, in its words
        if args.attn_layers:
            td.SelfAttention(td.DenoiserConfig.emb_dim, args.heads)
    except ValueError as e:
        fail(f"--heads: {e}")
    try:
        runs.sampler_steps(args.sampler, args.sample_steps, args.num_timesteps, "--num_timesteps")
    except ValueError as e:
        fail(str(e))


def check_condition_flags(args, given=()):
    """The flags that choose the data's condition and held-out share, against the dataset (a resumed run's)."""
    named = args.dataset in datasets.DATASETS
    if args.label_column is not None and args.cond_columns is not None:
        fail("--label_column and --cond_columns both name a condition; give one of them")
    if named and (args.label_column is not None or args.cond_columns is not None):
        fail(
            "--label_column and --cond_columns read a file's columns; for a named dataset with labels use "
            f"--conditional ({', '.join(datasets.CLASSES)})"
        )
    if args.conditional and args.dataset not in datasets.CLASSES:
        fail(
            f"--conditional trains a named dataset's labels ({', '.join(datasets.CLASSES)} have them); for a file "
            "give --label_column NAME"
        )
    if not 0 <= args.p_uncond < 1:
        fail(f"--p_uncond must lie in [0, 1) (1 would never train the condition), such as 0.1, got {args.p_uncond}")
    if not 0 <= args.holdout <= 0.5:
        fail(f"--holdout must lie in [0, 0.5], such as 0.1, got {args.holdout}")
    conditional = args.conditional or args.label_column is not None or args.cond_columns is not None
    try:
        runs.check_guidance(args.guidance, conditional, args.p_uncond)
    except ValueError as e:
        fail(str(e))
    if not 0 <= args.nll <= MAX_NLL:
        fail(
            f"--nll must be a number of points from 0 (off) to {MAX_NLL:,} (about 10 s per 1,000 on one CPU thread), "
            f"got {args.nll:,}"
        )
    if args.dequantize and named:
        fail("--dequantize spreads integer values over [x, x + 1); the named datasets are continuous, so leave it out")
    if "p_uncond" in given and not conditional:
        print(
            "warning: --p_uncond has no effect on an unconditional run (no --label_column, --cond_columns or "
            "--conditional)",
            file=sys.stderr,
        )
    if "holdout" in given and named:
        print(
            f"warning: --holdout has no effect on a named dataset: {args.dataset} is scored against a fresh draw",
            file=sys.stderr,
        )
