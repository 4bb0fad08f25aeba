"""The study's grid (its Tables 1-5) plus the SSM rows: 7 configurations x 4 datasets x seeds.

    python sweep.py                              # tinydiff's defaults, 3 seeds, into out/sweep-tinydiff-10000/
    python sweep.py --preset paper --eval_interval 500 --out_dir results/paper
    python sweep.py --print > runs.txt           # one train.py command per line, for a cluster
    python sweep.py --collect                    # results.md and the figures from the runs found
    python sweep.py --collect --costs results/bench-cpu.json   # seconds as steps x bench.py --json's ms/step

Each run is `python train.py ... --auto_resume` in its own folder, so rerunning the same command
continues a stopped grid, and the printed commands can run anywhere, in any order, more than once.
Any train.py flag that is not one of the grid's own (dataset, configuration, seed, folder) is passed on.
"""

import argparse
import glob
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import numpy as np

import evaluate
import plots
import runs
import settings  # train.py's flag table: the parser, the presets and the run keys

CONFIG_FLAGS = {
    name: [a for k, v in kw.items() for a in (f"--{k}", str(v))] for name, kw in runs.CONFIGS.items()
}  # as train.py flags
GRID_DATASETS = ["circle", "dino", "line", "moons"]
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "paper")  # the committed paper grid
GRID_FLAGS = (
    "dataset",
    "attn_layers",
    "heads",
    "ssm_layers",
    "seed",
    "out_dir",
    "resume",
    "auto_resume",
    "overwrite",
    "threads",
    "log_interval",
)


def get_parser():
    p = runs.ArgumentParser(description="Train and evaluate the study's grid, or print it for a cluster.")
    p.add_argument("--out_dir", default=None, help="the grid's folder (default out/sweep-<preset>-<train_steps>)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration and dataset")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="runs at a time, one CPU thread each")
    p.add_argument("--print", action="store_true", help="print the unfinished runs' commands, one per line, and exit")
    p.add_argument(
        "--collect", action="store_true", help="write results.md and the figures from the runs found, and exit"
    )
    p.add_argument(
        "--costs",
        default=None,
        help="a `bench.py --json` file: curves.png and the time-to-quality table count training seconds"
        " as steps x its ms/step, one sitting for every configuration (default: each run's own clock)",
    )
    p.add_argument(
        "--reference",
        default=REFERENCE,
        help="a paper-preset grid whose base runs' curves set the time-to-quality targets (default: the committed "
        "results/paper)",
    )
    return settings.get_parser(p, skip=GRID_FLAGS)


def passed_on(args):
    """The train.py flags given to the sweep, as arguments for each run."""
    own = {"out_dir", "seeds", "jobs", "print", "collect", "reference", "costs"}
    defaults = vars(settings.get_parser().parse_args([]))
    out = []
    for k, v in vars(args).items():
        if k in own or v == defaults[k]:
            continue
        out += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return out


def run_dirs(root, seeds):
    grid = [(c, d, s) for c in CONFIG_FLAGS for d in GRID_DATASETS for s in range(seeds)]
    return [(c, d, s, os.path.join(root, f"{d}-{c}-s{s}")) for c, d, s in grid]


def command(args, c, d, s, out):
    return [
        sys.executable,
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"),
        *passed_on(args),
        "--dataset",
        d,
        *CONFIG_FLAGS[c],
        "--seed",
        str(s),
        "--threads",
        "1",
        "--out_dir",
        out,
        "--log_interval",
        str(10**9),
        "--auto_resume",
    ]


def check(args, root):
    """Every setting, once, before any folder or run exists; and no earlier run made with other settings."""
    for name in ("seeds", "jobs"):
        if getattr(args, name) < 1:
            runs.fail(f"--{name} must be a positive integer, got {getattr(args, name)}")
    for c in CONFIG_FLAGS:
        settings.check_flags(run_args(args, c, "moons", 0, root))
    settings.check_condition_flags(run_args(args, "base", "moons", 0, root))  # the same for every configuration
    for c, d, s, out in run_dirs(root, args.seeds):
        have, unread = None, []
        for name in ("metrics.json", "ckpt.pt"):  # a run's settings from whichever of its records can be read
            path = os.path.join(out, name)
            if have is not None or not os.path.isfile(path):
                continue
            try:
                if name == "metrics.json":
                    with open(path) as f:
                        have = json.load(f)["args"]
                else:
                    have = runs.load_checkpoint(path)["args"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                unread.append(f"{name}: {runs.one_line(e, 80)}")
        if have is None:
            if unread:
                runs.fail(
                    f"cannot read the earlier run in {runs.quote(out)} ({'; '.join(unread)}); delete that folder and "
                    "rerun the sweep"
                )
            continue
        differ = settings_differ(have, args, c, d, s, out)
        if differ:
            runs.fail(
                f"{runs.quote(root)} holds runs made with other settings ({', '.join(differ)} differ in "
                f"{runs.quote(out)}); "
                f"pass --out_dir for a new sweep, or delete the old one"
            )


def run_args(args, c, d, s, out):
    """The settings train.py gives the grid's run (config c, dataset d, seed s), after its preset."""
    return settings.fill_preset(settings.get_parser().parse_args(command(args, c, d, s, out)[2:-1]))


def settings_differ(have, args, c, d, s, out):
    """The run keys in which a run's recorded settings (have: its metrics.json's or checkpoint's args) differ from the
    grid's."""
    if not isinstance(have, dict):
        raise TypeError("its settings are not a JSON object")
    want = json.loads(runs.to_json(vars(run_args(args, c, d, s, out))))  # as metrics.json holds it
    return [k for k in settings.RUN_KEYS if have.get(k, runs.BEFORE_FLAG.get(k)) != want[k]]


def run_grid(args, root):
    """Run the unfinished runs, `jobs` at a time. SIGINT / SIGTERM go to every running child, which
    saves and stops; the sweep waits for them, so no run is left behind without its parent."""
    todo = [r for r in run_dirs(root, args.seeds) if not os.path.isfile(os.path.join(r[3], "metrics.json"))]
    children, stopped, failed, lock = set(), [], [], threading.Lock()

    def on_signal(signum, _frame):
        stopped.append(signum)
        with lock:
            for p in children:
                p.send_signal(signal.SIGTERM)

    for s in runs.STOP_SIGNALS:  # SIGHUP too: a closed terminal must not leave the runs training on their own
        signal.signal(s, on_signal)
    queue = list(todo)

    def worker():
        while not stopped:
            with lock:
                if not queue or stopped:  # checked under the lock: no run starts after a signal
                    return
                c, d, s, out = queue.pop(0)
                os.makedirs(root, exist_ok=True)
                log = open(os.path.join(root, f"{d}-{c}-s{s}.log"), "a")
                # its own session: a Ctrl-C reaches the sweep, which passes one SIGTERM on
                p = subprocess.Popen(
                    command(args, c, d, s, out), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
                children.add(p)
            rc = p.wait()
            log.close()
            with lock:
                children.discard(p)
            if not stopped:
                print(f"{'done' if rc == 0 else f'FAILED ({rc}, see {log.name})'}: {d} {c} seed {s}", flush=True)
                if rc:
                    failed.append(log.name)

    t0 = time.time()
    print(
        f"sweep: {len(todo)} of {len(run_dirs(root, args.seeds))} runs to go, {args.jobs} at a time, into {root}/",
        flush=True,
    )
    threads = [threading.Thread(target=worker) for _ in range(min(args.jobs, len(todo)))]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):  # join with a timeout, so that signals are handled promptly
        for t in threads:
            t.join(0.2)
    if stopped:
        runs.fail(
            f"sweep stopped by {signal.Signals(stopped[0]).name}; stopped runs kept their checkpoints; rerun the same "
            "command to continue",
            code=128 + stopped[0],
        )
    print(
        f"sweep finished in {time.time() - t0:.0f}s"
        + (f"; {len(failed)} runs FAILED (see their logs)" if failed else "")
    )
    return len(failed)


@runs.script
def main(argv=None):
    args = get_parser().parse_args(argv)
    root = args.out_dir or os.path.join("out", f"sweep-{args.preset}-{args.train_steps}")
    extra = ([] if args.reference == REFERENCE else ["--reference", args.reference]) + (
        ["--costs", args.costs] if args.costs else []
    )
    if args.costs:
        read_costs(args.costs, args)  # refused now, not after the grid
    cmd = "python sweep.py " + " ".join(
        shlex.quote(a) for a in [*passed_on(args), "--out_dir", root, "--seeds", str(args.seeds), *extra]
    )
    if args.collect:
        if not os.path.isdir(root):
            runs.fail(f"no grid at {root}; give the --out_dir and the flags the grid was run with")
        return write_results(root, args, cmd)
    check(args, root)
    if args.print:
        try:
            for c, d, s, out in run_dirs(root, args.seeds):
                if not os.path.isfile(os.path.join(out, "metrics.json")):
                    print(shlex.join(["python", "train.py", *command(args, c, d, s, out)[2:]]), flush=True)
        except BrokenPipeError:  # the reader stopped early (`| head`): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    lock = runs.claim_run_dir(root)  # one sweep per folder
    failed = run_grid(args, root)
    write_results(root, args, cmd)
    lock.close()
    if failed:
        sys.exit(1)


TABLED = (
    "train_time_s",
    "eval_loss",
    "inference_s",
    "knn_kl_bits",
    "hist_kl_nats",
    "knn_kl_floor",
    "hist_kl_floor",
)  # what results.md reads


def load_run(out):
    """A finished run's metrics and samples: (None, None) for a folder without a finished run, and, with a
    warning, for one whose metrics.json is not a finished run's (any content: a list, nulls, missing keys)."""
    try:
        with open(os.path.join(out, "metrics.json")) as f:
            metrics = json.load(f)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as e:
        return skipped(out, f"{type(e).__name__}: {' '.join(str(e).split())[:80]}")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not isinstance(metrics, dict) or not isinstance(metrics.get("args"), dict):
        return skipped(out, "its metrics.json is not a tinydiff run's")
    missing = [k for k in TABLED if not number(metrics.get(k))]
    if missing:
        return skipped(out, f"its metrics.json has no number for {', '.join(missing)}")
    curve = metrics.get("curve")
    if curve is not None and not (
        isinstance(curve, list)
        and curve
        and all(
            isinstance(p, dict) and all(number(p.get(k)) for k in ("step", "train_time_s", "knn_kl_bits"))
            for p in curve
        )
    ):
        print(f"warning: leaving out the KL curve of {out} (not a list of steps with numbers)", file=sys.stderr)
        metrics["curve"] = None
    try:
        samples = np.load(os.path.join(out, "samples.npy"), allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        print(f"warning: leaving out the samples of {out} ({type(e).__name__})", file=sys.stderr)
        samples = None
    return metrics, samples


def skipped(out, why):
    print(f"warning: skipping {out} ({why})", file=sys.stderr)
    return None, None


def grid_run(root, args, c, d, s):
    """load_run for the grid's run (config c, dataset d, seed s), skipped with a warning if it was made with other
    settings."""
    out = os.path.join(root, f"{d}-{c}-s{s}")
    metrics, samples = load_run(out)
    if metrics is not None:
        differ = settings_differ(metrics["args"], args, c, d, s, out)
        if differ:
            made = ", ".join(f"{k} {metrics['args'].get(k)}" for k in differ)
            return skipped(out, f"made with other settings than this grid's: {made}")
    return metrics, samples


def keep_more_results(root, found):
    """Refuse to replace a results.md that counts more finished runs than this grid finds (the grid's flags were
    left out, or its runs removed): nothing is written, and the line says how to get the old table back."""
    try:
        with open(os.path.join(root, "results.md")) as f:
            text = f.read()
    except OSError:
        return
    had = re.search(r"Runs finished: (\d+) of", text)
    written = re.search(r"Written by `([^`]*)`", text)
    if had and int(had.group(1)) > found:
        runs.fail(
            f"{root}/results.md counts {had.group(1)} finished runs and this grid finds {found}, so its tables and "
            f"figures are left as they are; rerun the command that wrote them"
            + (f" ({written.group(1)})" if written else "")
            + ", or remove results.md to start the table again"
        )


def write_results(root, args, command="python sweep.py"):
    """results.md (one table per configuration, mean +- sd over seeds) and samples.png (datasets x configs)."""
    plt = plots.pyplot()

    cols = [
        ("train_time_s", "train time (s)", 1),
        ("eval_loss", "eval loss", 4),
        ("inference_s", "inference (s)", 2),
        ("knn_kl_bits", "kNN KL (bits)", 3),
        ("hist_kl_nats", "hist KL (nats)", 3),
    ]
    lines = [
        f"# Sweep results ({args.preset} preset, {args.train_steps} steps, batch {args.batch_size})",
        "",
        "Mean +- sample sd over seeds (n = seeds found). Floors: the metric for a fresh draw from the data's own "
        "generator.",
        f"Excess = kNN KL - its floor. Written by `{command}`.",
        "",
    ]
    cell, found = {}, 0  # (config, dataset) -> excess kNN KL, for the summary table; runs found
    loaded = {(c, d, s): grid_run(root, args, c, d, s) for c, d, s, _ in run_dirs(root, args.seeds)}
    found_runs = sum(m is not None for m, _ in loaded.values())
    keep_more_results(root, found_runs)
    if found_runs == 0:
        runs.fail(
            f"{root} holds no finished run of this grid, so there is no table to write; run the grid first (the same "
            "command without --collect), or give the flags the runs were made with"
        )
    # mean +- sample sd over seeds (just the value for a single seed)
    mean_sd = lambda v, nd: f"{np.mean(v):.{nd}f}" + (f" +- {np.std(v, ddof=1):.{nd}f}" if len(v) > 1 else "")
    n_data, n_configs = len(GRID_DATASETS), len(CONFIG_FLAGS)
    fig, axes = plt.subplots(n_data, n_configs, figsize=(2.2 * n_configs, 2.2 * n_data), squeeze=False)
    for j, c in enumerate(CONFIG_FLAGS):
        lines += [
            f"## {c}",
            "",
            "| dataset | n | " + " | ".join(h for _, h, _ in cols) + " | kNN floor | excess kNN KL | hist floor |",
            "|---" * (len(cols) + 5) + "|",
        ]
        for i, d in enumerate(GRID_DATASETS):
            found_runs = [loaded[c, d, s] for s in range(args.seeds)]
            ms = [m for m, _ in found_runs if m is not None]
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
            lines.append(
                f"| {d} | {len(ms)} | "
                + " | ".join(fmt(k, nd) for k, _, nd in cols)
                + f" | {np.mean([m['knn_kl_floor'] for m in ms]):.3f} | {mean_sd(excess, 3)}"
                + f" | {np.mean([m['hist_kl_floor'] for m in ms]):.3f} |"
            )
            shown = [
                pts
                for m, pts in found_runs
                if m is not None and pts is not None and pts.ndim == 2 and pts.shape[1] >= 2
            ]
            if shown:  # the lowest seed that finished
                ax.scatter(shown[0][:, 0], shown[0][:, 1], s=0.3, alpha=0.3, linewidths=0)
                ax.text(-4.8, -4.8, f"{np.mean(excess):.2f}", fontsize=7)
        lines.append("")
    total = len(CONFIG_FLAGS) * len(GRID_DATASETS) * args.seeds
    summary = [
        f"Runs finished: {found} of {total}"
        + ("." if found == total else " (rerun the same command to finish the rest)."),
        "",
        "## Summary: excess kNN KL (bits), mean +- sample sd (n seeds)",
        "",
        "| configuration | " + " | ".join(GRID_DATASETS) + " |",
        "|---" * (len(GRID_DATASETS) + 1) + "|",
    ]
    summary += [f"| {c} | " + " | ".join(cell.get((c, d), "-") for d in GRID_DATASETS) + " |" for c in CONFIG_FLAGS]
    lines[5:5] = summary + [""] + time_to_quality(root, args, loaded)
    fig.suptitle("the lowest finished seed's samples; corner: excess kNN KL (bits), the mean over seeds", fontsize=9)
    fig.tight_layout()
    runs.write_or_fail(
        os.path.join(root, "samples.png"),
        lambda f: fig.savefig(f, dpi=100, format="png"),
        "free some space, then rerun",
    )
    plt.close(fig)
    runs.write_or_fail(
        os.path.join(root, "results.md"), lambda f: f.write("\n".join(lines).encode()), "free some space, then rerun"
    )
    print(
        f"wrote {root}/results.md and {root}/samples.png"
        + (" and curves.png" if os.path.isfile(os.path.join(root, "curves.png")) else "")
    )


def curves(loaded):
    """{(config, dataset): [metrics of each seed]} of the runs with --eval_interval records ("curve")."""
    out = {}
    for (c, d, _seed), (m, _) in loaded.items():
        if m and m.get("curve"):
            out.setdefault((c, d), []).append(m)
    return out


def reference_targets(args):
    """{dataset: excess KL} that the study's MLP reaches after 10,000 steps, in the curve's own measure:
    the seed mean of the last curve point of the paper preset's base runs in --reference. The kNN KL
    depends on the sample count (circle's final DDPM-100 samples score 0.32 bits of excess at 10,000
    points and 0.17 at 2,000), so a curve is compared only with curves, never with Table 1 itself."""
    out = {}
    for d in GRID_DATASETS:
        last = []
        for run in sorted(glob.glob(os.path.join(args.reference, f"{d}-base-s*[0-9]"))):  # every seed there
            m, _ = load_run(run)
            if (
                m
                and m.get("curve")
                and m["args"].get("preset") == "paper"
                and m["curve"][-1]["step"] == 10_000
                and m.get("curve_floor") is not None
                and m.get("curve_samples") == evaluate.CURVE_N
            ):
                last.append(m["curve"][-1]["knn_kl_bits"] - m["curve_floor"])
        if last:
            out[d] = float(np.mean(last))
    return out


def read_costs(path, args):
    """{configuration: ms per training step} and a label for the seconds axis, from a `bench.py --json` file
    timed with the grid's block form, batch size and dtype."""
    try:
        with open(path) as f:
            bench = json.load(f)
        missing = [c for c in CONFIG_FLAGS if c not in bench["ms_per_step"]]
        ms = {c: float(bench["ms_per_step"][c]) for c in CONFIG_FLAGS if c not in missing}
        threads = f"{bench['threads']} thread{'s' if bench['threads'] > 1 else ''}"
        label = f"{bench['device']}, {threads}{', compiled' if bench.get('compile') else ''}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        runs.fail(
            f"--costs {path} is not a `bench.py --json` file ({type(e).__name__}: {str(e)[:80]}); write one with "
            "`python bench.py --json PATH`"
        )
    if missing:
        runs.fail(
            f"--costs {path} lacks {', '.join(missing)} (a bench run with --only?); write one with every backbone: "
            "`python bench.py --json PATH`"
        )
    grid = vars(settings.fill_preset(argparse.Namespace(**vars(args))))
    wrong = [
        f"--{k} {bench.get(k)} (this grid: {grid[k]})"
        for k in ("block", "batch_size", "dtype")
        if bench.get(k) != grid[k]
    ]
    if wrong:
        runs.fail(
            f"--costs {path} was timed with {', '.join(wrong)}; time this grid's model: `python bench.py --block "
            f"{grid['block']}"
            f" --batch_size {grid['batch_size']} --dtype {grid['dtype']} --json PATH`"
        )
    return ms, label


def time_to_quality(root, args, loaded):
    """curves.png (excess KL against step and against training seconds, a curve per configuration, a
    panel per dataset) and the markdown lines of a table: the first step, and its training seconds,
    at which the seed-mean curve reaches the study's final KL. Empty without --eval_interval runs."""
    found = curves(loaded)
    if not found:
        return []
    targets = reference_targets(args)
    costs, clock = read_costs(args.costs, args) if args.costs else (None, "each run's own clock")
    if not targets:
        print(
            f"warning: {args.reference} holds no paper-preset base runs with KL curves; the time-to-quality table has "
            "no targets "
            "(give --reference a grid made with --preset paper --eval_interval)",
            file=sys.stderr,
        )
    plt = plots.pyplot()
    fig, axes = plt.subplots(2, len(GRID_DATASETS), figsize=(3.6 * len(GRID_DATASETS), 6.4), squeeze=False)
    rows = [
        "## Time to the study's KL",
        "",
        "First step (training seconds) at which the seed mean of the excess kNN KL during training "
        f"({evaluate.CURVE_N} DPM++-20",
        "samples every --eval_interval steps, less the floor at that sample size) reaches the study's MLP after "
        "10,000 steps,",
        "measured the same way: the paper preset's base runs in "
        f"{'results/paper' if args.reference == REFERENCE else args.reference} (the target under each dataset).",
        "never = not reached by step 10,000; a blank = no runs. "
        + (
            f"Training seconds are steps x bench.py's ms/step from one sitting ({clock}; `--costs {args.costs}`)."
            if costs
            else "Training seconds are each run's own clock: on a shared machine, runs made on different days differ "
            "by up to 2x,"
            " so compare steps, or give --costs (bench.py's per-step costs from one sitting)."
        ),
        "",
        "| configuration | "
        + " | ".join(f"{d} ({targets[d]:.3f})" if d in targets else f"{d} (no target)" for d in GRID_DATASETS)
        + " |",
        "|---" * (len(GRID_DATASETS) + 1) + "|",
    ]
    for c in CONFIG_FLAGS:
        cells = []
        for j, d in enumerate(GRID_DATASETS):
            ms = found.get((c, d), [])
            same = [m["curve"] for m in ms if len(m["curve"]) == len(ms[0]["curve"])]
            if not same:
                cells.append("")
                continue
            step = np.array([p["step"] for p in same[0]])
            kl = np.mean([[p["knn_kl_bits"] for p in r] for r in same], 0)
            secs = step * costs[c] / 1e3 if costs else np.mean([[p["train_time_s"] for p in r] for r in same], 0)
            excess = kl - (ms[0].get("curve_floor") or 0.0)  # against the floor at the curve's sample size
            for ax, x in ((axes[0, j], step), (axes[1, j], secs)):
                ax.plot(x, excess, label=c)
            if d not in targets:
                cells.append("?")
                continue
            hit = np.flatnonzero(excess <= targets[d] + 1e-9)  # the reference's own last point reaches it
            cells.append(f"{step[hit[0]]} ({secs[hit[0]]:.0f} s)" if len(hit) else "never")
        if any(cells):
            rows.append(f"| {c} | " + " | ".join(cells) + " |")
    for j, d in enumerate(GRID_DATASETS):
        axes[0, j].set_title(d)
        for i, xlabel in enumerate(("step", f"training seconds ({'bench ms/step' if costs else clock})")):
            ax = axes[i, j]
            if d in targets:
                ax.axhline(targets[d], color="gray", ls="--", lw=1)
            ax.set_yscale("symlog", linthresh=0.1)  # log above 0.1 bits, linear through zero (excess can be negative)
            lo, hi = ax.get_ylim()
            ticks = [t for t in (-0.1, 0, 0.1, 0.2, 0.5, 1, 2, 5, 10) if lo <= t <= hi]
            ax.yaxis.set_major_locator(
                plt.FixedLocator(ticks) if len(ticks) > 2 else plt.MaxNLocator(4)
            )  # a narrow range gets linear ticks
            ax.yaxis.set_major_formatter(plt.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_locator(plt.NullLocator())
            ax.set_xlabel(xlabel)
        axes[0, j].set_ylabel("excess kNN KL (bits)" if j == 0 else "")
    next(ax for ax in axes[0] if ax.get_legend_handles_labels()[0]).legend(fontsize=7)  # on the first panel with curves
    fig.suptitle(
        f"{args.preset} preset: excess kNN KL during training (dashed: the study's MLP after 10,000 steps)"
        + (f"\nseconds = steps x bench.py's ms/step ({clock})" if costs else "")
    )
    fig.tight_layout()
    runs.write_or_fail(
        os.path.join(root, "curves.png"), lambda f: fig.savefig(f, dpi=100, format="png"), "free some space, then rerun"
    )
    plt.close(fig)
    return rows + [""]


if __name__ == "__main__":
    main()
