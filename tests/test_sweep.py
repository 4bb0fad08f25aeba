"""sweep.py, the grid of runs: its refusals, its printed and parallel runs, its signals and the results.md it collects,
checked against hand-made runs of known numbers, the committed results/ tables and statistics recomputed here."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, run, run_here
from test_reliability import TINY, one_line, start, wait_for

import evaluate
import runs

PY = sys.executable


def processes_mentioning(text):
    """PIDs of live processes whose command line contains text (read from /proc)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if text in cmd and not zombie:
            pids.append(int(pid))
    return pids


def test_a_sweep_refuses_a_bad_setting_once_before_starting_anything(tmp_path):
    p = run("sweep.py", "--low_frac", 2, "--out_dir", tmp_path / "sweep", check=False)
    assert (
        p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--low_frac must lie in [0, 1]" in p.stderr
    ), p.stderr
    assert not (tmp_path / "sweep").exists()


def test_the_sweep_refuses_flags_that_would_change_its_configurations(tmp_path):
    for flags in (
        ["--attn_layers", "2"],
        ["--heads", "8"],
        ["--dataset", "dino"],
        ["--swe"],
        ["--sweep"],
        ["--seed", "3"],
    ):
        msg = one_line(run_here("sweep.py", *flags, "--out_dir", tmp_path / "grid"))
        assert "unrecognized arguments" in msg, flags
    assert not (tmp_path / "grid").exists()


def test_a_sweep_refuses_to_mix_runs_made_with_other_settings(tmp_path):
    flags = ["--batch_size", 64, "--n", 100]
    run(
        "train.py",
        "--dataset",
        "circle",
        "--seed",
        0,
        "--threads",
        1,
        "--train_steps",
        2,
        *flags,
        "--out_dir",
        tmp_path / "circle-base-s0",
    )
    p = run("sweep.py", "--train_steps", 3, *flags, "--out_dir", tmp_path, check=False)
    assert p.returncode == 2 and "holds runs made with other settings (train_steps differ" in p.stderr, p.stderr
    metrics = tmp_path / "circle-base-s0" / "metrics.json"
    m = json.loads(metrics.read_text())
    del m["args"]["low_t"], m["args"]["low_frac"]  # as written before --low_t existed
    metrics.write_text(json.dumps(m))
    p = run("sweep.py", "--train_steps", 2, *flags, "--out_dir", tmp_path, check=False)
    assert p.returncode == 2 and "(low_t, low_frac differ" in p.stderr and len(p.stderr.strip().splitlines()) == 1, (
        p.stderr
    )
    assert not (tmp_path / "dino-base-s0").exists()  # nothing was started


def test_a_sweep_refuses_a_folder_that_another_sweep_holds(tmp_path):
    import fcntl

    root = tmp_path / "grid"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)  # what runs.claim_run_dir locks: the folder itself
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert "another process is using" in one_line(
            run_here("sweep.py", "--train_steps", 2, "--seeds", 1, "--out_dir", root)
        )
    finally:
        os.close(fd)


@pytest.mark.slow  # a closed stdout is tested by default for train.py (test_hostile)
def test_the_sweeps_printed_runs_can_be_cut_short_by_a_pipe(tmp_path):
    # 840 lines (about 150 KB), more than a pipe holds (64 KB): the writer meets the closed pipe
    p = subprocess.run(
        f"{PY} sweep.py --print --seeds 30 --out_dir {tmp_path / 'grid'} | head -n 1",
        shell=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.stdout.startswith("python train.py") and len(p.stdout.splitlines()) == 1 and p.stderr == "", p.stderr


@pytest.mark.slow  # 15 s of training; --collect is tested by default below
def test_the_sweep_prints_runs_for_a_cluster_and_collects_them(tmp_path):
    root = tmp_path / "grid"
    p = run_here(
        "sweep.py",
        "--train_steps",
        2,
        "--seeds",
        1,
        "--batch_size",
        16,
        "--n",
        50,
        "--out_dir",
        root,
        "--print",
    )
    lines = p.stdout.strip().splitlines()
    assert (
        p.returncode == 0
        and len(lines) == 28
        and all(line.startswith("python train.py ") and "--auto_resume" in line for line in lines)
    )
    assert "--dataset circle" in lines[0] and "--ssm_layers 2" in lines[-1] and not root.exists()
    for line in lines[:2]:  # two runs, the way a job array would run them, the first one twice
        for _ in range(2 if line == lines[0] else 1):
            q = subprocess.run(
                line.replace("python", PY, 1), shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120
            )
            assert q.returncode == 0, q.stderr
    p = run_here(
        "sweep.py",
        "--train_steps",
        2,
        "--seeds",
        1,
        "--batch_size",
        16,
        "--n",
        50,
        "--out_dir",
        root,
        "--print",
    )
    assert len(p.stdout.strip().splitlines()) == 26  # the finished runs are not printed again
    run_here(
        "sweep.py",
        "--train_steps",
        2,
        "--seeds",
        1,
        "--batch_size",
        16,
        "--n",
        50,
        "--out_dir",
        root,
        "--collect",
    )
    text = (root / "results.md").read_text()
    assert "Runs finished: 2 of 28" in text and "| circle | 1 |" in text


def test_sighup_to_a_sweep_stops_every_run_and_leaves_no_child(tmp_path):
    root = tmp_path / "grid"
    p = start("sweep.py", "--train_steps", 100000, "--seeds", 1, "--jobs", 2, *TINY[:4], "--out_dir", root)
    wait_for(lambda: len(list(root.glob("*.log"))) == 2 and all(os.path.getsize(f) > 0 for f in root.glob("*.log")))
    p.send_signal(signal.SIGHUP)
    _, err = p.communicate(timeout=90)
    assert p.returncode == 128 + signal.SIGHUP and "sweep stopped by SIGHUP" in err, err
    assert processes_mentioning(str(root)) == []


@pytest.mark.slow  # the same path as SIGHUP, tested by default above
def test_sigterm_to_a_sweep_stops_every_run_and_leaves_no_child(tmp_path):
    root = tmp_path / "grid"
    p = start("sweep.py", "--train_steps", 100000, "--seeds", 1, "--jobs", 2, *TINY[:4], "--out_dir", root)
    wait_for(lambda: len(processes_mentioning(str(root) + "/")) >= 2)  # two runs started
    wait_for(lambda: all(os.path.getsize(f) > 0 for f in root.glob("*.log")) and len(list(root.glob("*.log"))) == 2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=90)
    assert p.returncode == 128 + signal.SIGTERM and "sweep stopped by SIGTERM" in err, err
    assert processes_mentioning(str(root)) == []  # no orphan keeps training
    assert len(list(root.glob("*/ckpt.pt"))) == 2  # each stopped run saved where it was


def test_collect_tables_runs_made_before_the_condition_flags_and_no_conditional_one(tmp_path, capsys):
    """results/tinydiff's runs record none of --conditional, --holdout, --p_uncond (they came later): those runs
    were unconditional, on whole named datasets, so they are this grid's. The same run recorded as conditional is
    not."""
    import sweep

    old = json.loads(open(os.path.join(ROOT, "results", "tinydiff", "dino-base-s0", "metrics.json")).read())
    assert not {"conditional", "holdout", "p_uncond", "label_column", "cond_columns"} & set(old["args"])  # the premise
    for name, args in (
        ("dino-base-s0", old["args"]),
        ("moons-base-s0", {**old["args"], "dataset": "moons", "conditional": True}),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({**old, "args": args}))
    sweep.main(["--seeds", "1", "--eval_interval", "500", "--out_dir", str(tmp_path), "--collect"])
    text, err = (tmp_path / "results.md").read_text(), capsys.readouterr().err
    assert (
        "Runs finished: 1 of 28" in text
        and f"| dino | 1 | {old['train_time_s']:.1f} | {old['eval_loss']:.4f} |" in text
    ), text
    assert "moons-base-s0 (made with other settings than this grid's: conditional True)" in err, err


def test_collect_tables_only_the_grids_runs_and_survives_any_metrics_json(tmp_path, capsys):
    import sweep

    root = tmp_path / "grid"
    for name, flags in (("dino-base-s0", []), ("moons-base-s0", ["--preset", "paper"])):
        assert (
            run_here(
                "train.py",
                "--dataset",
                name.split("-")[0],
                "--train_steps",
                2,
                *flags,
                *TINY,
                "--threads",
                1,
                "--out_dir",
                root / name,
            ).returncode
            == 0
        )
    for name, content in (("line-base-s0", "[1, 2]"), ("circle-base-s0", '{"eval_loss": null, "args": {}}')):
        (root / name).mkdir()
        (root / name / "metrics.json").write_text(content)
    sweep.main(
        [
            str(a)
            for a in (
                "--train_steps",
                2,
                "--seeds",
                1,
                "--batch_size",
                32,
                "--n",
                200,
                "--out_dir",
                root,
                "--collect",
            )
        ]
    )
    err = capsys.readouterr().err
    text = (root / "results.md").read_text()
    assert (
        "| dino | 1 |" in text
        and not any(line.startswith("| moons |") for line in text.splitlines())
        and "Runs finished: 1 of 28" in text
    )
    assert "moons-base-s0 (made with other settings than this grid's: preset paper" in err
    assert (
        "line-base-s0 (its metrics.json is not a tinydiff run's)" in err
        and "circle-base-s0 (its metrics.json has no number for" in err
    )


@pytest.mark.parametrize(
    "grid, flags",
    [
        ("tinydiff", ["--costs", "results/bench-cpu.json"]),
        ("paper", ["--preset", "paper", "--costs", "results/bench-cpu-relu.json"]),
    ],
)
def test_collect_rewrites_the_committed_results_md_from_the_committed_runs(tmp_path, grid, flags):
    import shutil

    import sweep

    shutil.copytree(
        os.path.join(ROOT, "results", grid), tmp_path / grid, ignore=shutil.ignore_patterns("*.png", "results.md")
    )
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)  # the committed command names its --costs file from the repository's root
        sweep.main(["--eval_interval", "500", "--seeds", "3", "--out_dir", str(tmp_path / grid), *flags, "--collect"])
    finally:
        os.chdir(cwd)
    want = open(os.path.join(ROOT, "results", grid, "results.md")).read()
    got = (tmp_path / grid / "results.md").read_text().replace(str(tmp_path / grid), f"results/{grid}")
    assert got == want


def test_sweep_results_are_mean_and_sample_sd_over_the_seeds_found(tmp_path):
    import statistics

    import sweep

    vals = {0: 0.30, 1: 0.25, 2: 0.41}
    args = sweep.get_parser().parse_args(["--out_dir", str(tmp_path)])  # the tinydiff preset, 10,000 steps, 3 seeds
    for s, kl in vals.items():
        d = tmp_path / f"dino-base-s{s}"
        d.mkdir()
        m = dict(
            train_time_s=70.0 + s,
            eval_loss=0.66,
            inference_s=12.0,
            knn_kl_bits=kl,
            knn_kl_floor=-0.07,
            hist_kl_nats=0.2,
            hist_kl_floor=0.03,
            args=json.loads(runs.to_json(vars(sweep.run_args(args, "base", "dino", s, str(d))))),
        )
        (d / "metrics.json").write_text(json.dumps(m))
        np.save(d / "samples.npy", np.zeros((10, 2)))
    sweep.write_results(str(tmp_path), args)
    text = (tmp_path / "results.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| dino | 3 |"))
    kl = list(vals.values())
    assert f"{statistics.mean(kl):.3f} +- {statistics.stdev(kl):.3f}" in row
    excess = [k + 0.07 for k in kl]
    assert f"{statistics.mean(excess):.3f} +- {statistics.stdev(excess):.3f}" in row
    assert not any(line.startswith("| circle |") for line in text.splitlines())  # no runs, no row
    assert "Runs finished: 3 of 84 (rerun" in text
    assert f"| base | - | {statistics.mean(excess):.3f} +- {statistics.stdev(excess):.3f} (3) | - | - |" in text
    assert (tmp_path / "samples.png").stat().st_size > 0


def test_a_corrupt_run_does_not_stop_the_results(tmp_path, capsys):
    import sweep

    args = sweep.get_parser().parse_args(["--train_steps", "10", "--seeds", "2", "--out_dir", str(tmp_path)])
    for s in range(2):
        d = tmp_path / f"dino-base-s{s}"
        d.mkdir()
        m = dict(
            train_time_s=1.0,
            eval_loss=0.6,
            inference_s=1.0,
            knn_kl_bits=0.3 + s,
            knn_kl_floor=-0.07,
            hist_kl_nats=0.2,
            hist_kl_floor=0.03,
            args=vars(sweep.run_args(args, "base", "dino", s, str(d))),
        )
        (d / "metrics.json").write_text(json.dumps(m))
        np.save(d / "samples.npy", np.zeros((10, 2)))
    (tmp_path / "dino-base-s0" / "samples.npy").write_bytes(
        (tmp_path / "dino-base-s0" / "samples.npy").read_bytes()[:60]
    )  # truncated
    sweep.write_results(str(tmp_path), args)
    assert "| dino | 2 |" in (tmp_path / "results.md").read_text()
    assert "leaving out the samples of" in capsys.readouterr().err


def test_time_to_quality_is_the_first_step_where_the_seed_mean_curve_reaches_the_paper_base(tmp_path, capsys):
    """Targets: the seed mean of the paper base runs' last curve points; the table's cell: the first
    curve step at or below it, found here by a plain loop over hand-made curves."""
    import sweep

    rng = np.random.default_rng(0)
    steps = list(range(500, 10_001, 500))

    def make(root, preset, c, d, s, kl):
        run = root / f"{d}-{c}-s{s}"
        run.mkdir(parents=True)
        curve = [dict(step=st, train_time_s=0.03 * st + s, knn_kl_bits=float(k)) for st, k in zip(steps, kl)]
        grid_args = sweep.get_parser().parse_args(["--preset", preset])
        m = dict(
            args=json.loads(runs.to_json(vars(sweep.run_args(grid_args, c, d, s, str(run))))),
            curve=curve,
            curve_floor=0.05,
            curve_samples=evaluate.CURVE_N,
            train_time_s=300.0,
            eval_loss=0.6,
            inference_s=9.0,
            knn_kl_bits=float(kl[-1]),
            knn_kl_floor=0.02,
            hist_kl_nats=0.1,
            hist_kl_floor=0.01,
        )
        (run / "metrics.json").write_text(json.dumps(m))
        np.save(run / "samples.npy", np.zeros((10, 2)))

    ref, grid = tmp_path / "paper", tmp_path / "grid"
    last = []
    for s in range(3):  # the reference: slowly falling curves
        kl = np.linspace(3.0, 1.0, len(steps)) + rng.normal(0, 0.05, len(steps))
        make(ref, "paper", "base", "dino", s, kl)
        last.append(kl[-1] - 0.05)
    curves = [
        np.geomspace(4.0, 0.3, len(steps)) + rng.normal(0, 0.05, len(steps)) for s in range(2)
    ]  # a faster grid run, 2 seeds
    for s, kl in enumerate(curves):
        make(grid, "tinydiff", "attn1x4", "dino", s, kl)
    args = sweep.get_parser().parse_args(["--reference", str(ref)])  # the tinydiff preset, 10,000 steps, 3 seeds
    assert sweep.reference_targets(args) == {"dino": pytest.approx(sum(last) / 3)}
    target = sum(last) / 3
    first = None
    for i, st in enumerate(steps):
        if (curves[0][i] + curves[1][i]) / 2 - 0.05 <= target:
            first = (st, (0.03 * st + 0.03 * st + 1) / 2)
            break
    assert first is not None and first[0] < 10_000
    sweep.write_results(str(grid), args)
    text = (grid / "results.md").read_text()
    assert f"dino ({target:.3f})" in text and "circle (no target)" in text
    assert f"| attn1x4 |  | {first[0]} ({first[1]:.0f} s) |  |  |" in text
    assert (grid / "curves.png").stat().st_size > 0
    # --costs: seconds are steps x bench.py's ms/step for the configuration, one sitting for all
    ms = {c: 5.0 + i for i, c in enumerate(sweep.CONFIG_FLAGS)}
    bench = dict(device="cpu", threads=1, compile=False, block="gelu", batch_size=256, dtype="fp32", ms_per_step=ms)
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    sweep.write_results(
        str(grid), sweep.get_parser().parse_args(["--reference", str(ref), "--costs", str(tmp_path / "bench.json")])
    )
    text = (grid / "results.md").read_text()
    assert (
        f"| attn1x4 |  | {first[0]} ({first[0] * ms['attn1x4'] / 1000:.0f} s) |  |  |" in text
        and "(cpu, 1 thread;" in text
    )
    for name, changed, message in (
        ("partial", dict(ms_per_step={"base": 5.0}), "lacks attn1x4"),
        ("relu", dict(block="relu"), "--block relu (this grid: gelu)"),
    ):
        (tmp_path / f"{name}.json").write_text(json.dumps({**bench, **changed}))
        with pytest.raises(SystemExit) as e:  # refused in one line, naming what does not fit
            sweep.read_costs(str(tmp_path / f"{name}.json"), args)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_collect_without_the_grids_flags_refuses_to_replace_its_results(tmp_path):
    """The committed paper grid collected as a tinydiff grid finds none of its runs. Reference: results.md and the
    figures byte for byte as they were, and the command that wrote them named in the one line."""
    import shutil

    shutil.copytree(os.path.join(ROOT, "results", "paper"), tmp_path / "paper")
    before = {p.name: p.read_bytes() for p in (tmp_path / "paper").iterdir() if p.is_file()}
    p = run_here("sweep.py", "--out_dir", tmp_path / "paper", "--seeds", 3, "--collect")
    message = p.stderr.strip().splitlines()[-1]  # after one warning per run it skips
    assert (
        p.returncode == 2
        and "Traceback" not in p.stderr
        and "results.md counts 84 finished runs and this grid finds 0" in message
        and "--preset paper" in message
    )
    assert {p.name: p.read_bytes() for p in (tmp_path / "paper").iterdir() if p.is_file()} == before


def test_collect_on_a_folder_without_the_grids_runs_writes_nothing(tmp_path):
    """Reference: the folder's files, none before and none after."""
    (tmp_path / "g").mkdir()
    p = run_here("sweep.py", "--out_dir", tmp_path / "g", "--seeds", 1, "--collect")
    assert (
        p.returncode == 2 and "holds no finished run of this grid" in p.stderr and not list((tmp_path / "g").iterdir())
    )
