"""Nothing saved is lost and nothing wrong is silent: reruns, locks, full disks, signals, bad flags, strict JSON."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, refused, run_here

import evaluate
import runs
import settings

PY = sys.executable
TINY = ["--batch_size", "32", "--n", "200", "--log_interval", "10"]


run = run_here  # a script's main() in this process; run_process when the process itself is tested


def run_process(script, *args, timeout=600):
    return subprocess.run(
        [PY, os.path.join(ROOT, script), *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def one_line(p, code=2):
    """The process failed with the given code and said so in one line, without a traceback."""
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    return p.stderr


def start(script, *args, **kw):
    """The script as a child process that takes Ctrl-C as a terminal's foreground job does, even when
    this suite runs in the background (where a shell starts it with SIGINT ignored)."""
    return subprocess.Popen(
        [PY, os.path.join(ROOT, script), *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **kw,
    )


def wait_for(cond, timeout=300):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow  # 14 s, five trainings
def test_a_run_on_a_relative_data_path_is_found_from_any_folder_and_a_missing_file_is_said(tmp_path):
    """train.py records the data file's absolute path; sample.py, evaluate.py and --resume use it when
    the path as given does not exist from where they run. A file gone: sample.py plots the samples
    alone, with a note (never the samples in the data's panel); evaluate.py refuses in one line."""
    work = tmp_path / "work"
    work.mkdir()
    np.savetxt(
        work / "pts.csv",
        np.random.default_rng(0).normal(size=(300, 2)) * [3, 1] + [50, -20],
        delimiter=",",
        header="a,b",
        comments="",
    )
    out = tmp_path / "run"
    p = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            "--dataset",
            "pts.csv",
            "--train_steps",
            "5",
            *TINY,
            "--out_dir",
            out,
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert not os.path.exists(
        os.path.join(ROOT, "pts.csv")
    )  # the tests' scripts run from ROOT, where the relative path is not
    s = run("sample.py", "--out_dir", out, "--n", 100)
    assert (
        s.returncode == 0
        and "plotting the samples alone" not in s.stdout
        and len(list(out.glob("samples-ddpm100-n100-*.png"))) == 1
    )
    assert run("evaluate.py", "--out_dir", out, "--n", 100, "--json").returncode == 0
    assert run("train.py", "--out_dir", out, "--resume", "--train_steps", 8).returncode == 0
    assert (
        run("train.py", "--out_dir", out, "--resume", "--dataset", work / "pts.csv", "--train_steps", 9).returncode == 0
    )  # the same file
    p = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            "--dataset",
            "pts.csv",
            "--out_dir",
            out,
            "--resume",
            "--train_steps",
            "10",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )  # and again from where it began, as it began
    assert p.returncode == 0, p.stderr
    assert json.loads((out / "metrics.json").read_text())["dataset"] == "pts.csv"  # the name as given, in every record
    (work / "pts.csv").unlink()
    s = run("sample.py", "--out_dir", out, "--n", 100, "--out", tmp_path / "alone")
    assert s.returncode == 0 and "could not read the run's data" in s.stdout and (tmp_path / "alone.png").is_file()
    assert "not found from" in refused("evaluate.py", "--out_dir", out, "--n", 100)


def test_too_few_points_to_score_are_refused_before_training(tmp_path):
    """The kNN KL needs k + 1 data points (each point's k-th nearest other point) and k samples; with
    fewer it is -inf or NaN. Refused in one line; k + 1 points train and score to a finite number."""
    k = evaluate.KNN_K
    pts = np.random.default_rng(0).normal(size=(k + 1, 2))
    np.savetxt(tmp_path / "few.csv", pts[:k], delimiter=",")
    assert f"holds {k} points; scoring a model needs more than {k}" in refused(
        "train.py", "--dataset", tmp_path / "few.csv", "--out_dir", tmp_path / "a"
    )
    assert not (tmp_path / "a").exists()
    np.savetxt(tmp_path / "enough.csv", pts, delimiter=",")
    assert (
        run(
            "train.py", "--dataset", tmp_path / "enough.csv", "--train_steps", 2, *TINY, "--out_dir", tmp_path / "b"
        ).returncode
        == 0
    )
    assert np.isfinite(json.loads((tmp_path / "b" / "metrics.json").read_text())["knn_kl_bits"])
    with pytest.raises(ValueError, match="too few to score"):
        evaluate.compute_metrics(pts[:k], pts)
    with pytest.raises(ValueError, match="too few to score"):
        evaluate.compute_metrics(pts, pts[: k - 1])


def test_a_rerun_never_overwrites_a_finished_run(tmp_path):
    out = tmp_path / "run"
    assert run("train.py", "--dataset", "moons", "--train_steps", 20, *TINY, "--out_dir", out).returncode == 0
    before = {f: (out / f).read_bytes() for f in ("ckpt.pt", "metrics.json", "samples.npy")}
    msg = one_line(run("train.py", "--dataset", "moons", "--train_steps", 6, *TINY, "--out_dir", out))
    assert "already holds a run" in msg and "--resume" in msg and "--overwrite" in msg
    assert all((out / f).read_bytes() == b for f, b in before.items())  # untouched
    assert "already finished" in one_line(run("train.py", "--out_dir", out, "--resume"))
    p = run("train.py", "--dataset", "moons", "--train_steps", 6, *TINY, "--out_dir", out, "--overwrite")
    assert p.returncode == 0 and runs.load_checkpoint(str(out / "ckpt.pt"))["step"] == 6


@pytest.mark.slow  # three trainings in subprocesses
def test_a_users_file_a_named_dataset_and_the_paper_preset_get_different_default_folders(tmp_path):

    named = settings.get_parser().parse_args(["--dataset", "dino"])
    mine = settings.get_parser().parse_args(["--dataset", str(tmp_path / "dino.csv")])
    folder = lambda a: os.path.join(
        "out",
        f"{os.path.splitext(os.path.basename(a.dataset))[0]}"
        + ("-csv" if a.dataset.endswith(".csv") else "")
        + "-base",
    )
    assert folder(named) != folder(mine)
    np.savetxt(tmp_path / "dino.csv", np.random.default_rng(0).normal(size=(300, 2)), delimiter=",")
    p = subprocess.run(
        [PY, os.path.join(ROOT, "train.py"), "--dataset", str(tmp_path / "dino.csv"), "--train_steps", "2", *TINY],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out" / "dino-csv-base" / "metrics.json").exists() and not (
        tmp_path / "out" / "dino-base"
    ).exists()
    for preset, folder in (
        ("tinydiff", "moons-base"),
        ("paper", "moons-base-paper"),
    ):  # one after the other, neither refused
        p = subprocess.run(
            [PY, os.path.join(ROOT, "train.py"), "--dataset", "moons", "--preset", preset, "--train_steps", "2", *TINY],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
        )
        assert p.returncode == 0, p.stderr
        assert json.loads((tmp_path / "out" / folder / "metrics.json").read_text())["args"]["preset"] == preset


def test_a_flag_without_effect_gets_a_warning(tmp_path):
    p = run("train.py", "--dataset", "moons", "--train_steps", 2, "--heads", 3, *TINY, "--out_dir", tmp_path / "a")
    assert p.returncode == 0 and "--heads has no effect without --attn_layers" in p.stderr
    p = run(
        "train.py",
        "--dataset",
        "moons",
        "--train_steps",
        2,
        "--heads",
        8,
        "--attn_layers",
        1,
        *TINY,
        "--out_dir",
        tmp_path / "b",
    )
    assert p.returncode == 0 and "no effect" not in p.stderr


def test_resume_takes_the_runs_settings_refuses_contradictions_and_extends(tmp_path):
    out = tmp_path / "run"
    run(
        "train.py",
        "--dataset",
        "line",
        "--preset",
        "paper",
        "--lr",
        "5e-4",
        "--train_steps",
        30,
        *TINY,
        "--out_dir",
        out,
    )
    msg = one_line(run("train.py", "--out_dir", out, "--resume", "--train_steps", 40, "--lr", "1e-3"))
    assert "--lr 0.001 differs from this run's 0.0005" in msg
    (out / "samples-ddpm100.npy").write_bytes(b"drawn by sample.py from the 30-step model")
    p = run("train.py", "--out_dir", out, "--resume", "--train_steps", 40, "--n", 200)
    assert p.returncode == 0, p.stderr
    assert "samples-ddpm100.npy in" in p.stdout and "were drawn at step 30; rerun sample.py" in p.stdout
    assert (out / "samples-ddpm100.npy").exists()  # kept: only the user knows whether it is still wanted
    assert (
        "from the checkpoint: dataset line, preset paper" in p.stdout
        and "lr 0.0005" in p.stdout
        and "extending the run from 30 to 40" in p.stdout
    )
    ck = runs.load_checkpoint(str(out / "ckpt.pt"))
    assert ck["step"] == 40 and ck["args"]["lr"] == 5e-4 and ck["args"]["dataset"] == "line"
    # the cosine schedule stretched to the new end: the last step's lr is lr * lambda(39) of a 40-step schedule
    import train

    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-4 * train.lr_lambda(0, 40)(40), abs=1e-12)
    assert "already finished (40 steps)" in one_line(run("train.py", "--out_dir", out, "--resume", "--train_steps", 10))


@pytest.mark.slow  # four trainings
def test_a_run_saved_on_another_kind_of_device_continues_with_a_note(tmp_path):
    """A CUDA generator's state (16 bytes) cannot seed a CPU generator: the run goes on with a new,
    reproducible random stream and says so, instead of calling the checkpoint incomplete. The same
    wrong state from the same kind of device is a damaged file, and is refused."""
    base = tmp_path / "base"
    run("train.py", "--dataset", "moons", "--train_steps", 20, *TINY, "--out_dir", base)
    ck = runs.load_checkpoint(str(base / "ckpt.pt"))
    cuda_gen = torch.zeros(16, dtype=torch.uint8)  # the form a CUDA generator's state takes

    def resumed(name, rng):
        (tmp_path / name).mkdir()
        torch.save({**ck, "rng": rng}, tmp_path / name / "ckpt.pt")
        return run("train.py", "--out_dir", tmp_path / name, "--resume", "--train_steps", 30)

    stayed = resumed("stayed", ck["rng"])
    moved = [resumed(f"moved{i}", dict(torch=ck["rng"]["torch"], gen=cuda_gen, device="cuda")) for i in range(2)]
    for p in [stayed, *moved]:
        assert p.returncode == 0, p.stderr
    assert "was saved on cuda, whose random-generator state cpu cannot use" in moved[0].stdout
    assert "random-generator" not in stayed.stdout
    losses = {
        name: runs.load_checkpoint(str(tmp_path / name / "ckpt.pt"))["losses"]
        for name in ("stayed", "moved0", "moved1")
    }
    n = len(
        ck["losses"]
    )  # the same run up to the checkpoint, then another stream of batches and noise, the same each time
    assert all(v[:n] == ck["losses"] and len(v) == 30 for v in losses.values())
    assert losses["moved0"] == losses["moved1"] and losses["moved0"][n:] != losses["stayed"][n:]
    damaged = resumed("damaged", dict(torch=ck["rng"]["torch"], gen=cuda_gen, device="cpu"))
    assert "does not hold a complete training state" in one_line(damaged)


@pytest.mark.slow  # the folder lock is tested by default in test_hostile
def test_two_processes_never_share_a_run_folder(tmp_path):
    out = tmp_path / "run"
    first = start("train.py", "--dataset", "moons", "--train_steps", 100000, *TINY, "--out_dir", out)
    try:
        wait_for(lambda: first.stdout.readline().startswith("moons:"))  # past its checks: it holds the folder
        msg = one_line(
            run("train.py", "--dataset", "moons", "--train_steps", 5, *TINY, "--out_dir", out, "--overwrite")
        )
        assert "another process is using" in msg
        assert "another process is using" in one_line(run("train.py", "--out_dir", out, "--auto_resume"))
    finally:
        first.kill()
        first.wait()


def test_a_full_disk_costs_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    import train

    out = tmp_path / "run"
    calls = []
    real_save = torch.save

    def save(obj, f, *a, **kw):  # the second checkpoint write hits a full disk halfway
        calls.append(1)
        if len(calls) == 2:
            f.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset", "moons", "--train_steps", 40, "--ckpt_interval", 20, *TINY, "--out_dir", out])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "ckpt.pt" in err[0]
    assert sorted(os.listdir(out)) == ["ckpt.pt"]  # no temporary file left behind
    monkeypatch.setattr(torch, "save", real_save)
    assert runs.load_checkpoint(str(out / "ckpt.pt"))["step"] == 20  # the previous one, intact


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)]
)  # SIGHUP: test_hostile
def test_a_signal_stops_training_with_one_line_and_a_checkpoint_to_resume(tmp_path, sig):
    out = tmp_path / "run"
    p = start(
        "train.py", "--dataset", "moons", "--train_steps", 100000, *TINY, "--ckpt_interval", 100000, "--out_dir", out
    )
    wait_for(lambda: p.stdout.readline().startswith("step"))  # training
    p.send_signal(sig)
    _, err = p.communicate(timeout=300)
    assert (
        p.returncode == 128 + sig
        and len(err.strip().splitlines()) == 1
        and f"stopped by {signal.Signals(sig).name} at step" in err
    ), err
    step = runs.load_checkpoint(str(out / "ckpt.pt"))["step"]
    assert step >= 10 and f"at step {step}" in err  # saved where it stopped, though no checkpoint was due
    assert not (out / "metrics.json").exists()


BAD_FLAGS = [
    ("train.py", ["--swe"], "unrecognized arguments: --swe"),
    ("train.py", ["--nll", "100000000"], "--nll must be a number of points from 0 (off) to 100,000"),
    ("sweep.py", ["--dequantize"], "the named datasets are continuous"),
    ("train.py", ["--n", "200", "--eval_batch_size", "300"], "--eval_batch_size and --n are one flag"),
    ("train.py", ["--lr", "-1"], "--lr must be a positive number"),
    ("train.py", ["--lr", "nan"], "--lr must be a positive number"),
    ("train.py", ["--lr", "0"], "--lr must be a positive number"),
    ("train.py", ["--grad_clip", "-1"], "--grad_clip must be a positive number"),
    ("train.py", ["--grad_clip", "0"], "--grad_clip must be a positive number"),
    ("train.py", ["--ema_decay", "1.5"], "--ema_decay must be in [0, 1)"),
    ("train.py", ["--ema_decay", "nan"], "--ema_decay must be in [0, 1)"),
    ("train.py", ["--hidden", "-5"], "--hidden must be a positive integer"),
    ("train.py", ["--hidden", "0"], "--hidden must be a positive integer"),
    ("train.py", ["--threads", "-1"], "--threads must be a positive integer"),
    ("train.py", ["--coord_scale", "nan"], "--coord_scale must be a positive number"),
    ("train.py", ["--device", "nonsense"], "--device 'nonsense' is not a device"),
    ("train.py", ["--device", "cuda:7"], "CUDA device"),
    ("train.py", ["--num_timesteps", "10", "--sample_steps", "20"], "--sample_steps must be in 1..10"),
    ("train.py", ["--hidden", "1000000"], "--hidden 1000000 needs about"),
    ("train.py", ["--batch_size", "100000000"], "--batch_size 100000000 needs about"),
    ("train.py", ["--n", "1000000000"], "--n 1000000000 needs about"),
    ("train.py", ["--resume", "--overwrite"], "give one of them"),
    ("train.py", ["--lr"], "expected one argument"),
    ("sweep.py", ["--jobs", "-2"], "--jobs must be a positive integer"),
    ("sample.py", ["--out_dir", "{run}", "--eta", "nan"], "--eta must be"),
    ("sample.py", ["--out_dir", "{run}", "--n", "1000000000000"], "--n 1000000000000 needs about"),
    ("sample.py", ["--out_dir", "{run}", "--out", "/proc/nope/x"], "cannot write"),
    ("sample.py", ["--out_dir", "{run}", "--sample_steps", "0"], "--sample_steps must be"),
    ("sample.py", ["--out_dir", "{run}", "--sampler", "ddim", "--eta", "-1"], "--eta must be"),
    ("evaluate.py", ["--out_dir", "{run}", "--n", "-5"], "--n must be a positive integer"),
    ("evaluate.py", ["--out_dir", "{run}", "--steps", "1000"], "--sample_steps must be"),
    ("evaluate.py", ["--out_dir", "{run}", "--eta", "inf"], "--eta must be"),
    ("bench.py", ["--threads", "0"], "--threads must be a positive integer"),
    ("bench.py", ["--batch_size", "-1"], "--batch_size must be a positive integer"),
    ("bench.py", ["--only", "transformer"], "unknown backbone"),
    ("bench.py", ["--batch_size", "1000000000000"], "--batch_size 1000000000000 needs about"),
    ("bench.py", ["--device", "cuda:7"], "CUDA device"),
    ("bench.py", ["--json", "/no/such/folder/bench.json"], "its folder does not exist"),
    ("bench.py", ["--json", "/tmp"], "is a folder; give a file path in it"),
    ("bench.py", ["--only"], "--only names no backbone"),
    ("sweep.py", ["--collect", "--costs", "/no/such/bench.json"], "is not a `bench.py --json` file"),
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert run("train.py", "--dataset", "moons", "--train_steps", 5, *TINY, "--out_dir", out).returncode == 0
    return out


@pytest.mark.parametrize("script,args,message", BAD_FLAGS, ids=[f"{s}{' '.join(a)}" for s, a, _ in BAD_FLAGS])
def test_every_bad_flag_gets_one_line_and_exit_2(tiny_run, tmp_path, script, args, message):
    err = refused(
        script,
        *[a.format(run=tiny_run) for a in args],
        *(["--out_dir", tmp_path / "x"] if script == "train.py" else []),
    )
    assert message in err
    assert not (tmp_path / "x").exists()  # refused before any folder was made


FIRST_PER_SCRIPT = list({s: (s, a, m) for s, a, m in reversed(BAD_FLAGS)}.values())  # each script's first row


@pytest.mark.parametrize(
    "script,args,message",
    [row if row[0] == "train.py" else pytest.param(*row, marks=pytest.mark.slow) for row in FIRST_PER_SCRIPT],
    ids=[s for s, _, _ in FIRST_PER_SCRIPT],
)  # one script by default: they share runs.script
def test_a_refusal_is_the_process_exit_code_and_one_line(tiny_run, tmp_path, script, args, message):
    """The same refusals as whole processes, one per script: what a shell sees."""
    p = run_process(
        script,
        *[a.format(run=tiny_run) for a in args],
        *(["--out_dir", tmp_path / "x"] if script == "train.py" else []),
        timeout=300,
    )
    assert message in one_line(p)


def test_metrics_json_is_strict_json_even_for_degenerate_data(tmp_path):
    np.savetxt(
        tmp_path / "same.csv", np.tile([[1.0, 1.0], [2.0, 3.0]], (25, 1)), delimiter=","
    )  # two points, 25 times each
    p = run("train.py", "--dataset", tmp_path / "same.csv", "--train_steps", 3, *TINY, "--out_dir", tmp_path / "run")
    assert p.returncode == 0, p.stderr

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    m = json.loads((tmp_path / "run" / "metrics.json").read_text(), parse_constant=refuse)
    assert m["dataset"].endswith("same.csv") and m["knn_kl_bits"] is None


def test_auto_resume_on_a_finished_run_refuses_contradicting_flags_as_on_an_unfinished_one(tmp_path):
    """Reference: the same flag on a run that can continue is refused; the finished run's files stay as they were."""
    out = tmp_path / "run"
    assert run("train.py", "--dataset", "moons", "--train_steps", 3, *TINY, "--out_dir", out).returncode == 0
    before = (out / "ckpt.pt").read_bytes()
    again = run("train.py", "--dataset", "moons", "--train_steps", 3, *TINY, "--out_dir", out, "--auto_resume")
    assert again.returncode == 0 and "nothing to do" in again.stdout
    msg = refused("train.py", "--dataset", "moons", "--lr", "5e-4", *TINY, "--out_dir", out, "--auto_resume")
    assert "--lr 0.0005 differs from this run's" in msg and (out / "ckpt.pt").read_bytes() == before


def test_a_folder_whose_files_cannot_be_removed_costs_one_line(tmp_path, monkeypatch):
    """A read-only folder, as root sees none: os.remove raising PermissionError stands in. Reference: the run's
    checkpoint is untouched."""
    out = tmp_path / "run"
    assert run("train.py", "--dataset", "moons", "--train_steps", 3, *TINY, "--out_dir", out).returncode == 0
    before = (out / "ckpt.pt").read_bytes()

    def refuse(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "remove", refuse)
    msg = refused("train.py", "--dataset", "moons", "--train_steps", 3, *TINY, "--out_dir", out, "--overwrite")
    assert "cannot remove" in msg and "Permission denied" in msg and "writable" in msg
    monkeypatch.undo()
    assert (out / "ckpt.pt").read_bytes() == before
