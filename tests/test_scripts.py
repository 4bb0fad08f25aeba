"""The scripts as a user runs them: end to end, kill and resume, refused files, bad command lines."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, refused, run_here

import datasets
import evaluate
import runs
import tinydiff as td

PY = sys.executable
FAST = ["--batch_size", "64", "--eval_batch_size", "500", "--log_interval", "100"]


def run(script, *args, check=True):
    p = run_here(script, *args)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


TRAINED = ["--train_steps", 600, "--batch_size", 256, "--lr", "1e-3", "--eval_batch_size", 2000, "--log_interval", 500]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short moons run, shared by the tests below."""
    out = tmp_path_factory.mktemp("run") / "moons"
    p = run("train.py", "--dataset", "moons", *TRAINED, "--out_dir", out)
    return out, p.stdout


def test_train_writes_every_output_and_beats_noise(trained):
    out, stdout = trained
    for f in ("ckpt.pt", "metrics.json", "samples.npy", "samples.png", "loss.png"):
        assert (out / f).stat().st_size > 0, f
    assert "ms/step" in stdout and "ETA" in stdout and "kNN KL" in stdout
    m = json.loads((out / "metrics.json").read_text())
    for key in (
        "train_time_s",
        "eval_loss",
        "inference_s",
        "knn_kl_bits",
        "knn_kl_floor",
        "hist_kl_nats",
        "hist_kl_floor",
    ):
        assert np.isfinite(m[key]), key
    data = datasets.load_dataset("moons")
    samples = np.load(out / "samples.npy")
    assert samples.shape == (2000, 2)
    noise = evaluate.knn_kl(data, np.random.default_rng(0).normal(size=(2000, 2)))
    assert m["knn_kl_bits"] < noise / 3, (m["knn_kl_bits"], noise)
    assert m["knn_kl_bits"] == pytest.approx(evaluate.knn_kl(data, samples), abs=1e-9)


def test_checkpoint_holds_the_data_moments_and_the_paper_preset_does_not(trained, tmp_path):
    out, _ = trained
    ckpt = runs.load_checkpoint(str(out / "ckpt.pt"))
    data = datasets.load_dataset("moons")
    for key in ("model", "ema"):
        np.testing.assert_allclose(ckpt[key]["data_mean"].numpy(), data.mean(0), atol=1e-6)
        np.testing.assert_allclose(ckpt[key]["data_cov"].numpy(), np.cov(data.T, bias=True), atol=1e-6)
    run("train.py", "--dataset", "moons", "--preset", "paper", "--train_steps", 1, *FAST, "--out_dir", tmp_path)
    paper = runs.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert paper["args"]["prior"] == "standard" and paper["args"]["low_frac"] == 0
    assert torch.equal(paper["ema"]["data_mean"], torch.zeros(2)) and torch.equal(
        paper["ema"]["data_cov"], torch.eye(2)
    )


@pytest.mark.parametrize(
    "gif", [[], pytest.param(["--gif"], marks=pytest.mark.slow)], ids=["png", "gif"]
)  # the gif's 101 frames: 6 s
def test_sample_writes_files_gif_and_reproduces_seeds(trained, tmp_path, gif):
    out, _ = trained
    run("sample.py", "--out_dir", out, "--n", 300, "--seed", 3, *gif, "--out", tmp_path / "a")
    run("sample.py", "--out_dir", out, "--n", 300, "--seed", 3, "--out", tmp_path / "b")
    run(
        "sample.py",
        "--out_dir",
        out,
        "--n",
        300,
        "--seed",
        4,
        "--sampler",
        "ddim",
        "--sample_steps",
        10,
        "--out",
        tmp_path / "c",
    )
    a, b, c = (np.load(tmp_path / f"{k}.npy") for k in "abc")
    assert a.shape == (300, 2) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert (tmp_path / "a.png").stat().st_size > 0
    from PIL import Image

    if gif:
        with Image.open(tmp_path / "a.gif") as animation:
            assert animation.n_frames > 100  # 101 reverse-process frames (Pillow merges the held last frame into one)
    run("sample.py", "--out_dir", out, "--n", 300, "--sampler", "dpm++")  # 20 steps unless told
    assert np.load(out / "samples-dpm++20-n300.npy").shape == (300, 2)


def test_evaluate_cli_scores_samples_and_checkpoints(trained):
    out, _ = trained
    p = run("evaluate.py", "--samples", out / "samples.npy", "--dataset", "moons", "--json")
    m = json.loads(p.stdout)
    saved = json.loads((out / "metrics.json").read_text())
    assert m["knn_kl_bits"] == pytest.approx(saved["knn_kl_bits"]) and m["knn_kl_floor"] == pytest.approx(
        saved["knn_kl_floor"]
    )
    p = run("evaluate.py", "--out_dir", out, "--n", 1000, "--sampler", "ddim", "--steps", 20)
    assert "kNN KL (bits)" in p.stdout and "eval_loss" in p.stdout


def test_a_checkpoint_of_another_format_is_refused_in_one_line_that_names_it(tmp_path):
    run("train.py", "--dataset", "line", "--train_steps", 4, "--ckpt_interval", 2, *FAST, "--out_dir", tmp_path)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["format"], ckpt["step"] = "tinydiff-1", 2  # as an older tinydiff wrote it
    torch.save(ckpt, tmp_path / "ckpt.pt")
    for script, args in (
        ("train.py", ["--out_dir", tmp_path, "--resume"]),
        ("sample.py", ["--out_dir", tmp_path]),
        ("evaluate.py", ["--out_dir", tmp_path]),
    ):
        p = run(script, *args, check=False)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert f"format tinydiff-1, and this tinydiff reads {runs.FORMAT}" in p.stderr


def final_weights(out):
    return runs.load_checkpoint(str(out / "ckpt.pt"))["model"]


@pytest.mark.parametrize(
    "extra",
    [
        [],
        pytest.param(
            ["--preset", "paper", "--batch_size", 256, "--ckpt_interval", 130, "--eval_interval", 200],
            marks=pytest.mark.slow,
        ),
        pytest.param(["--dataset", "moons", "--conditional", "--attn_layers", 1], marks=pytest.mark.slow),
    ],
    ids=["tinydiff", "paper", "conditional"],
)
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, extra):
    # the paper preset: epochs of 391 batches, the EMA every 10 steps, checkpoints off both grids; KL recorded on the
    # way
    steps = 900 if "paper" in extra else 500  # the paper run: still two epoch boundaries (391 batches each)
    args = ["--dataset", "line", "--train_steps", steps, "--ckpt_interval", 100, *FAST, *extra]
    run("train.py", *args, "--out_dir", tmp_path / "whole")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [PY, os.path.join(ROOT, "train.py"), *map(str, args), "--out_dir", str(killed)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while not (killed / "ckpt.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = runs.load_checkpoint(str(killed / "ckpt.pt"))["step"]
    assert 100 <= step < steps, step  # killed mid-run, after at least one checkpoint
    p = run("train.py", "--out_dir", killed, "--resume", "--log_interval", 100, "--eval_batch_size", 500)
    assert f"resuming {killed / 'ckpt.pt'} at step {step}" in p.stdout
    a, b = final_weights(tmp_path / "whole"), final_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ea = runs.load_checkpoint(str(tmp_path / "whole" / "ckpt.pt"))["ema"]
    eb = runs.load_checkpoint(str(killed / "ckpt.pt"))["ema"]
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    if "--eval_interval" in extra:
        ca, cb = (json.loads((d / "metrics.json").read_text())["curve"] for d in (tmp_path / "whole", killed))
        assert [c["step"] for c in ca] == list(range(200, steps + 1, 200)) + [steps] and [
            c["knn_kl_bits"] for c in ca
        ] == [c["knn_kl_bits"] for c in cb]


def test_a_crash_between_write_and_replace_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    runs.save_checkpoint({"step": 1}, path)

    def crash(*a):
        raise KeyboardInterrupt("killed between write and replace")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        runs.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1 and os.listdir(tmp_path) == [
        "ckpt.pt"
    ]  # the old one, and no leftover


def test_an_interrupt_says_what_to_do_next_in_its_one_line(capsys):
    @runs.script
    def main(argv=None):
        raise KeyboardInterrupt(int(signal.SIGTERM), "evaluate it with: python train.py --out_dir x --resume")

    with pytest.raises(SystemExit) as e:
        main([])
    err = capsys.readouterr().err
    assert e.value.code == 128 + signal.SIGTERM and err.count("\n") == 1
    assert err.startswith("error: interrupted by SIGTERM; every file already written is intact; evaluate it with:")


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def bad_files(tmp_path, good_ckpt):
    raw = good_ckpt.read_bytes()
    files = {
        "random.pt": os.urandom(4096),
        "empty.pt": b"",
        "truncated.pt": raw[: len(raw) // 2],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    marker = tmp_path / "code-ran"
    torch.save({"format": runs.FORMAT, "evil": RunsCode(marker)}, tmp_path / "code.pt")
    torch.save({"hello": torch.zeros(3)}, tmp_path / "foreign.pt")
    ck = runs.load_checkpoint(str(good_ckpt))
    ck["model_config"]["attn_layers"] = 2  # weights of a baseline, config of an attention model
    torch.save(ck, tmp_path / "incompatible.pt")
    del ck["args"]  # hand-made: a checkpoint of this format without its settings
    torch.save(ck, tmp_path / "no-args.pt")
    return marker


@pytest.mark.parametrize(
    "name,message",
    [
        ("random.pt", "is not a readable tinydiff checkpoint"),
        ("empty.pt", "is not a readable tinydiff checkpoint"),
        ("truncated.pt", "is not a readable tinydiff checkpoint"),
        ("code.pt", "is not a readable tinydiff checkpoint"),
        ("foreign.pt", "is not a tinydiff checkpoint"),
        ("incompatible.pt", "do not fit its config"),
        ("no-args.pt", "lacks parts of a tinydiff checkpoint (args)"),
    ],
)
def test_bad_checkpoints_are_refused_without_running_their_code(trained, tmp_path, name, message):
    out, _ = trained
    marker = bad_files(tmp_path, out / "ckpt.pt")
    p = run("sample.py", "--ckpt", tmp_path / name, "--n", 10, check=False)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    with pytest.raises(runs.CheckpointError, match=re.escape(message)):
        runs.model_from_checkpoint(runs.load_checkpoint(str(tmp_path / name)))
    assert not marker.exists()  # the pickle's code never ran


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    p = run(
        "train.py",
        "--dataset",
        "moons",
        "--train_steps",
        200,
        "--lr",
        "1e12",
        "--ckpt_interval",
        1,
        *FAST,
        "--out_dir",
        tmp_path,
        check=False,
    )
    assert p.returncode == 1 and "diverged at step" in p.stderr and "--lr" in p.stderr, p.stderr
    if (tmp_path / "ckpt.pt").exists():  # every saved checkpoint holds finite weights
        ck = runs.load_checkpoint(str(tmp_path / "ckpt.pt"))
        assert all(torch.isfinite(v).all() for v in ck["model"].values())


@pytest.mark.slow  # test_hostile trains at an offset of 1e9 by default
def test_moons_at_another_offset_and_scale_train_as_well_with_the_default_flags(trained, tmp_path):
    """A user's moons, scaled by 50 and shifted by 100, with the flags of the run above. Reference: that
    run on the study's coordinates. The samples come back in the file's units; mapped back to the
    study's, they score about as well on its metrics (same grid)."""
    out, _ = trained
    data = datasets.load_dataset("moons")
    np.savetxt(tmp_path / "moons.csv", data * 50 + 100, delimiter=",")
    run("train.py", "--dataset", tmp_path / "moons.csv", *TRAINED, "--out_dir", tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert all(np.isfinite(m[k]) for k in ("knn_kl_bits", "hist_kl_nats", "eval_loss"))
    raw, scaled = np.load(out / "samples.npy"), (np.load(tmp_path / "run" / "samples.npy") - 100) / 50
    assert abs(evaluate.knn_kl(data, scaled) - evaluate.knn_kl(data, raw)) < 0.1
    assert abs(evaluate.hist_kl(data, scaled) - evaluate.hist_kl(data, raw)) < 0.15
    split = runs.load_data(str(tmp_path / "moons.csv"))  # scored against the held-out tenth, in the file's units
    assert m["knn_kl_bits"] == pytest.approx(evaluate.knn_kl(split.held, scaled * 50 + 100), abs=1e-6)
    ckpt = runs.load_checkpoint(
        str(tmp_path / "run" / "ckpt.pt")
    )  # the map is in the checkpoint, for sample.py and evaluate.py
    shift = ckpt["ema"]["data_map.shift"].double() + ckpt["ema"]["data_map.shift_lo"].double()
    np.testing.assert_allclose(shift.numpy(), split.points.mean(0), rtol=1e-9)
    np.testing.assert_allclose(ckpt["ema"]["data_map.scale"].numpy(), split.points.std(0) / td.MODEL_SD, rtol=1e-6)


def test_user_data_file_trains(tmp_path):
    pts = np.random.default_rng(0).normal(size=(500, 2))
    np.savetxt(tmp_path / "pts.csv", pts, delimiter=",")
    run("train.py", "--dataset", tmp_path / "pts.csv", "--train_steps", 50, *FAST, "--out_dir", tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (
        m["holdout"] == 50 and np.isfinite(m["knn_kl_bits"]) and np.isfinite(m["knn_kl_floor"])
    )  # held-out points give a file a floor


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("train.py", ["--dataset", "spiral"], "unknown dataset 'spiral'"),
        ("train.py", ["--attn_layers", "1", "--heads", "3"], "heads 3 must divide the token width 128"),
        ("train.py", ["--train_steps", "0"], "--train_steps must be a positive integer"),
        ("train.py", ["--batch_size", "-4"], "--batch_size must be a positive integer"),
        ("train.py", ["--sample_steps", "500"], "steps must be in 1..100"),
        ("train.py", ["--out_dir", "/etc/hostname/run"], "cannot use /etc/hostname/run as a run folder"),
        ("train.py", ["--out_dir", "{tmp}/nothing", "--resume"], "--resume found no checkpoint"),
        ("train.py", ["--dataset", "{tmp}/missing.csv"], "no data file at"),
        ("sweep.py", ["--jobs", "0", "--out_dir", "{tmp}/sweep"], "--jobs must be a positive integer"),
        ("sweep.py", ["--train_steps", "0", "--out_dir", "{tmp}/sweep"], "--train_steps must be a positive integer"),
        ("sample.py", ["--out_dir", "{tmp}/nothing"], "no checkpoint at"),
        ("evaluate.py", ["--samples", "{tmp}/missing.npy", "--dataset", "dino"], "no samples file at"),
        ("evaluate.py", ["--out_dir", "{tmp}/nothing"], "no checkpoint at"),
    ],
)
def test_bad_command_lines_get_one_line_and_exit_2(tmp_path, script, args, message):
    assert message in refused(script, *[a.format(tmp=tmp_path) for a in args])


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


def test_a_sweep_refuses_to_mix_runs_made_with_other_settings(tmp_path):
    flags = ["--batch_size", 64, "--eval_batch_size", 100]
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


def test_a_sweep_refuses_a_bad_setting_once_before_starting_anything(tmp_path):
    p = run("sweep.py", "--low_frac", 2, "--out_dir", tmp_path / "sweep", check=False)
    assert (
        p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--low_frac must lie in [0, 1]" in p.stderr
    ), p.stderr
    assert not (tmp_path / "sweep").exists()


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
    ms = {c: 5.0 + i for i, c in enumerate(sweep.CONFIGS)}
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


def test_bench_json_names_every_backbone_as_the_sweep_does_with_the_printed_cost(tmp_path):
    import sweep
    import train

    for name, kw in runs.CONFIGS.items():  # the sweep's flags for that name give the same model, and the name back
        flags = vars(train.get_parser().parse_args(sweep.CONFIGS[name]))
        assert {k: flags[k] for k in kw} == kw and all(
            flags[k] == 0 for k in ("attn_layers", "ssm_layers") if k not in kw
        ), name
        assert runs.config_name(**flags) == name
    out = run("bench.py", "--quick", "--only", "base", "ssm1", "--n", 200, "--json", tmp_path / "b.json").stdout
    printed = {
        line.split()[0]: float(line.split()[-6]) for line in out.splitlines() if line.startswith(("base", "ssm1"))
    }
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["ms_per_step"].keys() == {"base", "ssm1"} and record["threads"] == 1
    assert record["ms_per_step"]["base"] == pytest.approx(printed["base"], abs=0.006)
    assert record["ms_per_step"]["ssm1"] == pytest.approx(printed["ssm1"], abs=0.006)


def test_every_flag_the_readme_names_exists_in_its_script():
    """Each `--flag` in README.md is a flag of train.py's parser (or of the script named on the same
    line: sweep.py, sample.py, evaluate.py, bench.py), read from the parsers themselves."""
    import re

    import train

    def flags(script):
        p = run_here(script, "--help")
        assert p.returncode == 0, p.stderr
        return set(re.findall(r"--[a-z_]+", p.stdout))

    known = {s: flags(s) for s in ("train.py", "sweep.py", "sample.py", "evaluate.py", "bench.py")}
    assert {f"--{a.dest}" for a in train.get_parser()._actions} - {"--help"} <= known["train.py"]
    missing = []  # torchrun's and pytest's flags aside
    for line in open(os.path.join(ROOT, "README.md")).read().splitlines():
        scripts = [s for s in known if s in line] or ["train.py"]
        for flag in re.findall(r"(?<![\w-])--[a-z_]+", line):
            if flag not in ("--standalone", "--nproc_per_node", "--slow", "--pdb") and not any(
                flag in known[s] for s in scripts + ["train.py"]
            ):
                missing.append((flag, line.strip()[:60]))
    assert not missing, missing
