"""The scripts as a user runs them: end to end, kill and resume, refused files, bad command lines."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, TRAINED, refused, run, run_here

import datasets
import evaluate
import runs
import settings
import tinydiff as td

PY = sys.executable
FAST = ["--batch_size", "64", "--n", "500", "--log_interval", "100"]


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
    p = run("train.py", "--out_dir", killed, "--resume", "--log_interval", 100, "--n", 500)
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


def test_bench_json_names_every_backbone_as_the_sweep_does_with_the_printed_cost(tmp_path):
    import sweep

    for name, kw in runs.CONFIGS.items():  # the sweep's flags for that name give the same model, and the name back
        flags = vars(settings.get_parser().parse_args(sweep.CONFIG_FLAGS[name]))
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

    def flags(script):
        p = run_here(script, "--help")
        assert p.returncode == 0, p.stderr
        return set(re.findall(r"--[a-z_]+", p.stdout))

    known = {s: flags(s) for s in ("train.py", "sweep.py", "sample.py", "evaluate.py", "bench.py")}
    assert {f"--{a.dest}" for a in settings.get_parser()._actions} - {"--help"} <= known["train.py"]
    missing = []  # torchrun's, pytest's and ruff's flags aside
    for line in open(os.path.join(ROOT, "README.md")).read().splitlines():
        scripts = [s for s in known if s in line] or ["train.py"]
        for flag in re.findall(r"(?<![\w-])--[a-z_]+", line):
            if flag not in ("--standalone", "--nproc_per_node", "--slow", "--pdb", "--check") and not any(
                flag in known[s] for s in scripts + ["train.py"]
            ):
                missing.append((flag, line.strip()[:60]))
    assert not missing, missing
