"""Runs: what the scripts share that is not math. Run folders and their locks, checkpoints and
their format, atomic writes, the device, the command line's plumbing (one-line errors, signals,
closed pipes) and strict JSON. Imports tinydiff and datasets; every script may import it.

A run folder (train.py's --out_dir) holds:
  ckpt.pt       FORMAT: settings, weights, optimizer, RNG states, the data's fingerprint
  metrics.json  written last: its presence marks the run finished
  samples.npy, samples.png, loss.png, kl.png   train.py's outputs (RUN_FILES); a conditional run adds
  samples_labels.npy or samples_cond.npy (each sample's condition) and guidance.png
  samples-*     sample.py's outputs
"""

import argparse
import hashlib
import json
import math
import os
import shlex
import signal
import sys
from typing import NamedTuple

import numpy as np
import torch

import datasets
import tinydiff as td

FORMAT = "tinydiff-2"
RUN_FILES = (
    "ckpt.pt",
    "metrics.json",
    "samples.npy",
    "samples_labels.npy",
    "samples_cond.npy",
    "samples.png",
    "guidance.png",
    "loss.png",
    "kl.png",
)


# -----------------------------------------------------------------------------
# the command line: one-line errors, signals, pipes


def launch():
    """(world size, rank, local rank) from torchrun's variables, (1, 0, 0) without them. A stray or broken set (a
    WORLD_SIZE left in the shell, a non-number) is read as one process, so that the error that names it is seen."""
    try:
        world, rank, local = (
            int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0"))
        )
    except ValueError:
        return 1, 0, 0
    torchrun = all(k in os.environ for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))
    return (world, rank, local) if world > 1 and torchrun and 0 <= rank < world else (1, 0, 0)


def check_launch():
    """Refuse torchrun variables that do not describe a torchrun launch, before anything is written."""
    names = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
    given = {k: os.environ[k] for k in names if k in os.environ}
    if given and launch()[0] == 1 and given.get("WORLD_SIZE", "1").strip() != "1":
        shown = ", ".join(f"{k}={v}" for k, v in given.items())
        fail(
            f"{shown} is set, but this is not a torchrun launch with valid ranks; unset WORLD_SIZE to train in one "
            "process, or launch with torchrun --standalone --nproc_per_node=N train.py ..."
        )


def fail(msg, code=2, together=False):
    """A user's error: one line on stderr, then exit (2 unless told). Under torchrun only rank 0 speaks; with
    together, every process waits for it first (torchrun stops the others as soon as one exits with an error)."""
    if launch()[1] == 0:
        print(f"error: {msg}", file=sys.stderr, flush=True)
    if together and torch.distributed.is_initialized():
        torch.distributed.barrier()
    sys.exit(code)


def quote(path):
    """A path as it must be pasted into a shell."""
    return shlex.quote(str(path))


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' parser: no abbreviations (--swe is not --sweep), and a bad command line costs one line."""

    def __init__(self, **kw):
        super().__init__(allow_abbrev=False, **kw)

    def error(self, message):
        fail(f"{message} (see python {self.prog} --help)")


def given_flags(argv):
    """The flags written on the command line (abbreviations are off, so the tokens are exact)."""
    return {RENAMED.get(k, k) for k in (tok[2:].split("=")[0] for tok in argv if tok.startswith("--"))}


class QuietStdout:
    """sys.stdout that survives a closed pipe (`python train.py | head`): the first failed write
    silences it, and the program goes on (training and saving) without printing."""

    def __init__(self, stream):
        self.stream, self.closed_pipe = stream, False

    def write(self, text):
        if not self.closed_pipe:
            try:
                return self.stream.write(text)
            except (BrokenPipeError, ValueError):
                self.silence()
        return len(text)

    def flush(self):
        if not self.closed_pipe:
            try:
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                self.silence()

    def silence(self):
        self.closed_pipe = True
        try:  # what is still buffered goes nowhere, so that the exit's flush cannot fail either
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        except (OSError, ValueError):
            pass

    def __getattr__(self, name):
        return getattr(self.stream, name)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, kill, a closed terminal or SSH session


def script(main):
    """A script's entry point: a closed stdout does not stop it, and Ctrl-C (or SIGTERM, SIGHUP)
    outside a handled section costs one line, exit 130 (128 + the signal for the others)."""

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(signum)

    def run(argv=None):
        if not isinstance(sys.stdout, QuietStdout):
            sys.stdout = QuietStdout(sys.stdout)
        for s in STOP_SIGNALS:  # SIGINT only where a caller (a shell's background job) does not ignore it
            if s != signal.SIGINT or signal.getsignal(s) is signal.default_int_handler:
                signal.signal(s, on_signal)
        try:
            return main(argv)
        except KeyboardInterrupt as e:  # args: the signal's number, then what to do next; both optional
            signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
            then = f"; {e.args[-1]}" if e.args and isinstance(e.args[-1], str) else ""
            fail(
                f"interrupted by {signal.Signals(signum).name}; every file already written is intact{then}",
                code=128 + signum,
            )
        except (datasets.DataError, CheckpointError) as e:  # a user's file, refused where it was read
            fail(one_line(e, limit=400))
        except Exception as e:  # a defect, not a user's mistake (those exit through fail): one line and a report
            fail(f"unexpected {type(e).__name__}: {one_line(e)}; {traceback_note(e)}", code=1)

    return run


def one_line(e, limit=200):
    """An exception's message on one line, at most limit characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def traceback_note(e):
    """Write e's full traceback to a file in the temporary folder and say where, for a bug report."""
    import tempfile
    import traceback

    try:
        fd, path = tempfile.mkstemp(prefix="tinydiff-traceback-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write("".join(traceback.format_exception(e)))
        return f"the full traceback is in {path}; please report it with the command you ran"
    except OSError:
        return "please report it with the command you ran"


class StopFlag:
    """Signals that a loop handles itself: while `active`, the first SIGINT / SIGTERM / SIGHUP is recorded,
    so that the loop can save at a step boundary and stop; a second one, or one while not active, stops
    at once (KeyboardInterrupt, which `script` turns into one line)."""

    def __init__(self):
        self.signum, self.active = None, False
        for s in STOP_SIGNALS:
            if s != signal.SIGINT or signal.getsignal(s) is not signal.SIG_IGN:
                signal.signal(s, self.on_signal)

    def on_signal(self, signum, _frame):
        if self.signum is not None or not self.active:
            raise KeyboardInterrupt(signum)
        self.signum = signum

    @property
    def name(self):
        return signal.Signals(self.signum).name


def to_json(obj):
    """Strict JSON: NaN and infinities become null, which every JSON reader accepts."""
    clean = lambda v: (
        {k: clean(x) for k, x in v.items()}
        if isinstance(v, dict)
        else [clean(x) for x in v]
        if isinstance(v, (list, tuple))
        else None
        if isinstance(v, float) and not math.isfinite(v)
        else v
    )
    return json.dumps(clean(obj), indent=2, allow_nan=False)


# -----------------------------------------------------------------------------
# files: atomic writes, run folders and their locks


def atomic_write(path, write):
    """write(f) into a temporary file, then rename it over path: a crash at any moment leaves the
    old file intact, and a failed write (a full disk) removes the temporary file and re-raises."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_or_fail(path, write, advice="free some space, then rerun"):
    """Write one output file atomically; a failed write (a full disk, say) costs one line and leaves
    the file's previous version as it was."""
    try:
        atomic_write(path, write)
    except OSError as e:
        fail(f"could not write {quote(path)} ({e.strerror or e}); {advice}")


class DirLock:
    """An exclusive flock on a folder's own descriptor, released by close() or when the object or the process goes."""

    def __init__(self, fd, path=None, created=False):
        self.fd, self.path, self.created = fd, path, created

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def abandon(self):
        """Release the folder, and remove it if this process made it and left it empty: a refused command leaves
        nothing."""
        self.close()
        if self.created and os.path.isdir(self.path) and not os.listdir(self.path):
            os.rmdir(self.path)

    __del__ = close


def claim_run_dir(path):
    """Make the folder and lock it for this process: a second process refuses. The lock is held on the
    folder itself (flock on its descriptor), so no file can be deleted to defeat it, and it goes with the
    process, even when that is killed. POSIX; on Windows there is no lock."""
    created = not os.path.isdir(path)
    try:
        os.makedirs(path, exist_ok=True)
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        fail(f"cannot use {quote(path)} as a run folder ({e.strerror}); choose a writable directory")
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass
    except OSError:
        DirLock(fd).close()
        fail(f"another process is using {quote(path)} right now; wait for it to finish, or choose another --out_dir")
    return DirLock(fd, path, created)


# -----------------------------------------------------------------------------
# devices and memory


def pick_device(name):
    """auto: cuda -> mps -> cpu; else the device named, if this machine has it."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        fail(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); use --device cpu or auto")
    if device.type == "mps" and not mps:
        fail("--device mps: MPS is not available here; use --device cpu or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        fail(f"--device {name}: tinydiff runs on cpu, cuda or mps")
    return device


def available_memory(device=None):
    """Bytes free for new allocations on the device (CUDA: the driver's count; else the host's), or None."""
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return datasets.available_memory()


def sampler_steps(sampler, steps, T, T_flag="the checkpoint's schedule"):
    """Network evaluations for a sampler: --sample_steps, else the sampler's default (at most T);
    a value outside 1..T is refused in one sentence that names the flag."""
    if steps is None:
        return min(td.DEFAULT_STEPS.get(sampler, T), T)
    if not 1 <= steps <= T:
        raise ValueError(f"--sample_steps must be in 1..{T} (T of {T_flag}), got {steps}")
    return steps


def check_sampling_flags(args):
    """sample.py's and evaluate.py's shared flags; ValueError names the flag and what is valid."""
    if args.n < 1:
        raise ValueError(f"--n must be a positive integer, got {args.n}")
    if not 0 <= args.eta <= 1:  # NaN fails too
        raise ValueError(f"--eta must be in [0, 1] (0: deterministic DDIM, 1: as DDPM), got {args.eta}")
    if args.sample_steps is not None and args.sample_steps < 1:
        raise ValueError(f"--sample_steps must be a positive integer, got {args.sample_steps}")


def check_guidance(w, conditional, p_uncond=None):
    """--guidance, in every script: the library's rule (a finite w >= 0, on a conditional model), in flag terms; and
    w != 1 needs the unconditional half, which a run trained with --p_uncond 0 never learnt."""
    if not (math.isfinite(w) and w >= 0):
        raise ValueError(f"--guidance must be a number >= 0 (1: conditional, 0: unconditional, > 1: guided), got {w}")
    if w != 1 and not conditional:
        raise ValueError(
            "--guidance needs a conditional run (trained with --label_column, --cond_columns or --conditional); "
            "this one is unconditional"
        )
    if w != 1 and p_uncond == 0:
        raise ValueError(
            f"--guidance {w:g} mixes in the unconditional model, which --p_uncond 0 never trains; use --guidance 1, "
            "or train with --p_uncond 0.1"
        )


def param_bound(cfg):
    """An upper bound on the parameters of the Denoiser cfg describes, from its layer shapes, without building it: a
    huge
    --hidden is refused before anything is allocated (building it on the meta device costs seconds of imports)."""
    E, H, S, D = cfg.emb_dim, cfg.hidden, cfg.ssm_dim, cfg.data_dim
    mlp = (D + 2) * E * H + cfg.hidden_layers * H * (H + 1) + H * (D + 2)
    mixers = (
        cfg.attn_layers * (4 * E * E + 6 * E)
        + cfg.ssm_layers * (16 * S * S + 64 * S * (cfg.d_state + 2))
        + (2 * E * S + E + S)
    )
    condition = (cfg.num_classes + 1) * E + cfg.cond_dim * E + E * E + 3 * E
    return mlp + mixers + condition


def activation_bytes_per_row(model, scheduler, X, rows=32):
    """Bytes that autograd saves for the backward pass, per batch row, measured on a small batch."""
    saved, cfg, n = [], model.cfg, min(2 * rows, len(X))
    y = (
        torch.zeros(n, dtype=torch.long)
        if cfg.num_classes
        else torch.zeros(n, cfg.cond_dim, dtype=torch.float64)
        if cfg.cond_dim
        else None
    )
    model.set_data_stats(X[:n], y)
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t
    ):
        td.ddpm_loss(
            model, scheduler, torch.zeros(rows, X.shape[1]), y=None if y is None else y[:1].expand(rows, *y.shape[1:])
        )
    return sum(saved) / rows


def check_flag_memory(flag, value, nbytes, device=None):
    """Refuse a flag whose value would take more than half the memory free on the device."""
    free = available_memory(device)
    if free is not None and nbytes > free / 2:
        raise ValueError(
            f"{flag} {value} needs about {nbytes / 2**30:.1f} GiB, more than half of the {free / 2**30:.1f} GiB free; "
            "use a smaller value"
        )


# -----------------------------------------------------------------------------
# checkpoints: plain tensors and Python types only, written atomically, read with weights_only


class CheckpointError(ValueError):
    """A file that is not a usable tinydiff checkpoint; the message says what to do."""


CONFIGS = {
    "base": {},
    "attn1x4": dict(attn_layers=1, heads=4),
    "attn1x8": dict(attn_layers=1, heads=8),
    "attn1x16": dict(attn_layers=1, heads=16),
    "attn2x4": dict(attn_layers=2, heads=4),
    "ssm1": dict(ssm_layers=1),
    "ssm2": dict(ssm_layers=2),
}  # the study's grid, and bench.py's backbones


def config_name(attn_layers=0, heads=4, ssm_layers=0, **_):
    """A backbone's short name: base, attn2x4, ssm1, attn1x4-ssm1."""
    parts = ([f"attn{attn_layers}x{heads}"] if attn_layers else []) + ([f"ssm{ssm_layers}"] if ssm_layers else [])
    return "-".join(parts) or "base"


def fingerprint(X, names=None, columns=None):
    """What identifies a run's data: their shape, a SHA-256 of their float64 values, and one of what the values mean
    (the class or condition names and the coordinates' column names) where the file gives them; a checkpoint made
    before "meaning" was recorded is compared by its values alone."""
    X = np.ascontiguousarray(X, dtype=np.float64)
    out = dict(shape=list(X.shape), sha256=hashlib.sha256(X.tobytes()).hexdigest())
    if names is not None or columns is not None:
        text = json.dumps([names and [str(n) for n in names], columns], ensure_ascii=False)
        out["meaning"] = hashlib.sha256(text.encode()).hexdigest()
    return out


SPLIT_SEED = 0  # every run on a file holds out the same points, so that runs on it compare
SMALLEST_SCORED = 100  # files of at least this many points hold out MIN_HELDOUT rows when --holdout gives fewer
MIN_HELDOUT = 20  # fewer held-out points than this make no floor (the kNN KL uses 5 neighbours) worth the name


class RunData(NamedTuple):
    """A run's data: training points and their conditions, a file's held-out points, and what identifies them."""

    points: np.ndarray  # (N, D) training points, float64
    cond: object  # their conditions: (N,) labels, (N, C) numbers, or None
    held: object  # (M, D) held-out points of a file, or None (a named dataset draws fresh points instead)
    held_cond: object
    names: object  # the class names, or the condition columns' names
    kind: object  # "labels", "numbers" or None
    fingerprint: dict  # the whole file's shape and hash, conditions included
    note: object = None  # why nothing is held out, for the user
    columns: object = None  # a file's names for the coordinates, when a condition column was taken out


DEQUANTIZE_SEED = 1  # the uniform noise --dequantize adds, the same for every run on a file


def run_data(dataset, settings):
    """load_data with a run's settings (train.py's args, or a checkpoint's): the one reader every script uses."""
    get = settings.get if isinstance(settings, dict) else lambda k, d=None: getattr(settings, k, d)
    keys = ("label_column", "cond_columns", "conditional", "holdout", "dequantize")
    return load_data(dataset, *(get(k, BEFORE_FLAG.get(k)) for k in keys))


def load_data(dataset, label_column=None, cond_columns=None, conditional=False, holdout=0.1, dequantize=False):
    """The points a run trains on, split once with SPLIT_SEED: a share `holdout` of a file's rows is held out,
    unless that leaves fewer than MIN_HELDOUT (then nothing is, and the metrics compare with the training points).
    dequantize: integer values x become x + u, u ~ U(0, 1) drawn once with DEQUANTIZE_SEED, a density whose NLL
    bounds the integers' own -log2 P(x) from above (uniform dequantization, Theis et al. 2016)."""
    names = kind = y = columns = None
    if conditional:
        X, y, names = datasets.load_labeled(dataset)
    elif label_column is not None or cond_columns is not None:
        X, y, names, columns = datasets.load_conditioned(dataset, label_column, cond_columns)
    else:
        X = datasets.load_dataset(dataset)
    kind = None if y is None else "labels" if y.ndim == 1 else "numbers"
    axes = columns or datasets.column_names(dataset, X.shape[1])
    ident = fingerprint(X if y is None else np.column_stack([X, y]), names, axes)
    axis = lambda j: f"column {axes[j]!r}" if axes else f"coordinate {j + 1}"
    if dequantize:
        fraction = np.flatnonzero((X != np.round(X)).any(0))
        if dataset in datasets.DATASETS:
            raise ValueError("--dequantize spreads integer values over [x, x + 1); the named datasets are continuous")
        if len(fraction):
            j = fraction[0]
            raise ValueError(
                f"--dequantize spreads integer values over [x, x + 1), and {axis(j)} of {dataset} holds non-integers "
                f"such as {X[X[:, j] != np.round(X[:, j]), j][0]:g}; leave it out"
            )
        X = X + np.random.default_rng(DEQUANTIZE_SEED).uniform(0, 1, X.shape)
    constant = np.flatnonzero((X == X[0]).all(0)) if len(X) > 1 else []
    if len(constant):  # every metric would score a (D-1)-dimensional cloud as if it filled D dimensions
        shown = ", ".join(f"{axis(j)} ({X[0, j]:g})" for j in constant[:10]) + (" ..." if len(constant) > 10 else "")
        integers = (X == np.round(X)).all()
        raise ValueError(
            f"{len(constant)} of the {X.shape[1]} coordinates of {dataset} hold one value in every row: {shown}; a "
            "constant coordinate has no density to learn or score, so remove "
            + ("them, or spread the integer values with --dequantize" if integers else "them")
        )
    m = round(holdout * len(X)) if dataset not in datasets.DATASETS else 0
    note = None
    if 0 < m < MIN_HELDOUT and len(X) >= SMALLEST_SCORED:  # a small file: hold out the fewest rows that score
        note = (
            f"held out {MIN_HELDOUT} of the {len(X)} points ({MIN_HELDOUT / len(X):.0%}), the fewest that score a "
            f"model, where --holdout {holdout:g} is {m}"
        )
        m = MIN_HELDOUT
    if m < MIN_HELDOUT:
        note = (
            (
                f"{len(X)} points are too few to hold out {holdout:g} of them ({m} < {MIN_HELDOUT}); the metrics "
                "compare the samples with"
                " the training points, and have no floor"
            )
            if dataset not in datasets.DATASETS and holdout > 0
            else None
        )
        return RunData(X, y, None, None, names, kind, ident, note, columns)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(X))
    held, train = np.sort(perm[:m]), np.sort(perm[m:])
    if kind == "labels" and len(missing := sorted(set(range(len(names))) - set(y[train].tolist()))):
        raise ValueError(
            f"class {names[missing[0]]!r} of {dataset} has all its {int((y == missing[0]).sum())} rows in the held-out "
            f"share, so the model could never learn it; give it more rows, or --holdout 0"
        )
    pick = lambda v, rows: None if v is None else v[rows]
    return RunData(X[train], pick(y, train), X[held], pick(y, held), names, kind, ident, note, columns)


def check_nll(dataset, data, nll, holdout=0.1):
    """--nll scores points the model never saw: a file's run must hold some out. ValueError says what to give."""
    if not nll or dataset in datasets.DATASETS or data.held is not None:
        return
    n = len(data.points)
    least = math.ceil(100 * MIN_HELDOUT / n) / 100  # the smallest --holdout that holds out MIN_HELDOUT rows
    need = (
        "--holdout 0.1"
        if holdout == 0 and n >= SMALLEST_SCORED
        else f"--holdout {least:g}"
        if least <= 0.5
        else f"a file of {math.ceil(MIN_HELDOUT / max(holdout, 0.1))} points or more"
    )
    raise ValueError(
        f"--nll scores points the model never saw, and this run holds none of {dataset}'s {n} points out; give "
        f"{need}, or --nll 0"
    )


class DivergedError(ValueError):
    """A checkpoint was refused because a weight is not finite: the run diverged."""


def save_checkpoint(state, path):
    """Write {format, **state} atomically. A checkpoint with a non-finite weight is never written:
    whatever the caller calls "the last good checkpoint" is good. torch.save reports a full disk as a
    RuntimeError (PyTorch's zip writer), which is turned into the OSError it is."""
    for key in ("model", "ema"):
        bad = [k for k, v in state.get(key, {}).items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise DivergedError(f"{key} weight {bad[0]} is not finite")

    def write(f):
        try:
            torch.save({"format": FORMAT, **state}, f)
        except RuntimeError as e:  # "[enforce fail at inline_container.cc] ... unexpected pos": the disk is full
            raise OSError(0, f"the write failed ({one_line(e, 80)}); is the disk full?") from e

    atomic_write(path, write)


RENAMED = {"eval_batch_size": "n"}  # a setting's earlier name in a checkpoint -> its name now

# what a run did for a setting before its flag existed: a run recorded without the key is read with this value
BEFORE_FLAG = dict(
    label_column=None,
    cond_columns=None,
    conditional=False,
    p_uncond=0.1,
    holdout=0.1,
    prediction_type="epsilon",
    loss_weighting="target",
    dequantize=False,
)


def load_checkpoint(path):
    """A checkpoint written by train.py, read safely (weights_only: no code from the file runs);
    anything else raises one CheckpointError that says what to do."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {quote(path)}; train one first with `python train.py --dataset dino`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = " ".join(str(e).split())[:100] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{quote(path)} is not a readable tinydiff checkpoint ({reason}); use a ckpt.pt written by train.py"
        ) from None
    if not isinstance(ckpt, dict) or not str(ckpt.get("format", "")).startswith("tinydiff-"):
        raise CheckpointError(f"{quote(path)} is not a tinydiff checkpoint; use a ckpt.pt written by train.py")
    if ckpt["format"] != FORMAT:
        raise CheckpointError(
            f"{quote(path)} has checkpoint format {ckpt['format']}, and this tinydiff reads {FORMAT};"
            " train the run again with this version (--overwrite)"
        )
    missing = [k for k in ("args", "model_config", "scheduler_config", "model", "ema", "step", "data") if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{quote(path)} lacks parts of a tinydiff checkpoint ({', '.join(missing)}); use a ckpt.pt written by "
            "train.py"
        )
    ckpt.setdefault("condition", dict(kind=None, names=None))  # a run made before conditions existed had none
    saved = {RENAMED.get(k, k): v for k, v in ckpt["args"].items()}
    ckpt["args"] = {**BEFORE_FLAG, **saved}
    return ckpt


def unfinished(ckpt, does="scores"):
    """A stopped run's note (None for a finished one): its numbers describe a model still in training."""
    step, total = ckpt["step"], ckpt["args"]["train_steps"]
    if step >= total:
        return None
    print(f"note: this run stopped at step {step} of {total}; this {does} the model as it was then", file=sys.stderr)
    return f"step {step} of {total}"


def model_from_checkpoint(ckpt, key="ema"):
    """The Denoiser (with its EMA weights, or key="model" for the raw ones) and NoiseScheduler a checkpoint
    describes."""
    try:
        model = td.Denoiser(td.DenoiserConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt[key])
        scheduler = td.NoiseScheduler(**ckpt["scheduler_config"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:100]
        raise CheckpointError(
            f"the checkpoint's weights do not fit its config ({reason}); it is damaged, so train the run again"
        ) from None
    return model, scheduler


def run_dataset(ckpt):
    """The data a checkpoint was trained on: the file at the absolute path train.py recorded (found from
    any folder), else its --dataset as given (a named dataset, or a file that has moved)."""
    name, path = ckpt["args"]["dataset"], ckpt["data"].get("path")
    return path if path and os.path.isfile(path) else name
