"""What a hostile or clumsy user does, and what tinydiff promises then: no silent wrong number, a run is
what it says, nothing saved is lost, every signal and pipe, every flag checked first, messages that paste."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, refused, run_here
from test_reliability import TINY, one_line, start, wait_for

import runs

PY = sys.executable
run = run_here


def test_points_a_billion_spreads_from_the_origin_train_as_the_centred_points(tmp_path):
    """Standardised in float64 before any cast: float32 cannot even hold 1e9 + x (its step there is 64)."""
    rng = np.random.default_rng(0)
    X = np.stack([rng.uniform(0, 1, 1000), rng.normal(size=1000)], 1)
    offset = np.array([1e9, -3e9])
    np.save(tmp_path / "centred.npy", X)
    np.save(tmp_path / "far.npy", X + offset)
    kl = {}
    for name in ("centred", "far"):
        out = tmp_path / name
        assert (
            run(
                "train.py",
                "--dataset",
                tmp_path / f"{name}.npy",
                "--train_steps",
                300,
                *TINY,
                "--n",
                1000,
                "--out_dir",
                out,
            ).returncode
            == 0
        )
        kl[name] = json.loads((out / "metrics.json").read_text())["knn_kl_bits"]
        samples = np.load(out / "samples.npy")
        assert samples.dtype == np.float64
    far = np.load(tmp_path / "far" / "samples.npy") - offset
    assert len(np.unique(far[:, 0])) > 900  # not a handful of float32 values
    assert abs(kl["far"] - kl["centred"]) < 0.05, kl  # float32 standardisation scored about 11 bits here
    assert np.abs(far.mean(0) - np.load(tmp_path / "centred" / "samples.npy").mean(0)).max() < 0.05


def test_resume_refuses_a_data_file_that_changed(tmp_path):
    rng = np.random.default_rng(1)
    data = tmp_path / "pts.csv"
    np.savetxt(data, rng.normal(size=(300, 2)), delimiter=",")
    out = tmp_path / "run"
    assert (
        run("train.py", "--dataset", data, "--train_steps", 4, "--ckpt_interval", 2, *TINY, "--out_dir", out).returncode
        == 0
    )
    np.savetxt(data, rng.normal(size=(300, 2)) * 10, delimiter=",")  # same name, other points
    msg = refused("train.py", "--out_dir", out, "--resume", "--train_steps", 8)
    assert "has changed since this run was trained on it" in msg and "--overwrite" in msg
    assert runs.load_checkpoint(str(out / "ckpt.pt"))["step"] == 4  # untouched
    named = tmp_path / "named.csv"
    named.write_text("x,y\n" + "".join(f"{u},{v}\n" for u, v in rng.normal(size=(300, 2))))
    flags = ("--dataset", named, "--train_steps", 4, "--ckpt_interval", 2, *TINY, "--out_dir", tmp_path / "n")
    assert run("train.py", *flags).returncode == 0
    named.write_text(named.read_text().replace("x,y", "east,north", 1))  # the same values, the axes renamed
    p = run("train.py", "--out_dir", tmp_path / "n", "--resume", "--train_steps", 8)
    assert p.returncode == 2 and "other class or column names" in p.stderr.strip().splitlines()[-1]


def test_resume_refuses_renamed_labels_and_a_class_only_held_out_is_refused(tmp_path):
    """The fingerprint covers what the values mean: cat, dog renamed dog, emu is other data (--label dog would draw
    the old cat cluster). Reference: the file's own rows; a class whose rows all fall in the held-out share is
    refused before training, since its label would never be trained."""
    rng = np.random.default_rng(2)
    rows = lambda a, b: (
        "x,y,k\n" + "".join(f"{u},{v},{(a, b)[i % 2]}\n" for i, (u, v) in enumerate(rng.normal(size=(200, 2))))
    )
    data, out = tmp_path / "pets.csv", tmp_path / "run"
    data.write_text(rows("cat", "dog"))
    flags = ("--label_column", "k", "--ckpt_interval", 2, *TINY, "--out_dir", out)
    assert run("train.py", "--dataset", data, "--train_steps", 4, *flags).returncode == 0
    text = data.read_text().replace("dog", "emu").replace("cat", "dog")  # the same rows, the classes renamed
    data.write_text(text)
    msg = refused("train.py", "--out_dir", out, "--resume", "--train_steps", 8)
    assert "the same values, other class or column names" in msg
    held = np.random.default_rng(runs.SPLIT_SEED).permutation(200)[:20]  # the rows --holdout 0.1 holds out of 200
    kinds = ["rare" if i in held[:12] else "ab"[i % 2] for i in range(200)]
    lines = "".join(f"{u},{v},{k}\n" for (u, v), k in zip(rng.normal(size=(200, 2)), kinds))
    (tmp_path / "rare.csv").write_text("x,y,k\n" + lines)
    flags = ("--label_column", "k", "--train_steps", 4, *TINY, "--out_dir", tmp_path / "r")
    msg = refused("train.py", "--dataset", tmp_path / "rare.csv", *flags)
    assert "class 'rare'" in msg and "all its 12 rows in the held-out share" in msg


@pytest.mark.parametrize(
    "flags",
    [["--low_t", "5", "--low_frac", "0"], pytest.param(["--preset", "paper", "--lr", "3e-4"], marks=pytest.mark.slow)],
    ids=["low_t-off", "paper"],
)
def test_the_command_that_made_a_run_resumes_it(tmp_path, flags):
    """The settings stored in the checkpoint compare equal to the command line that made them."""
    out = tmp_path / "run"
    cmd = ["--dataset", "moons", *flags, *TINY, "--out_dir", out]
    assert run("train.py", *cmd, "--train_steps", 4).returncode == 0
    p = run("train.py", *cmd, "--train_steps", 6, "--resume")
    assert p.returncode == 0 and "differs" not in p.stderr, p.stderr
    assert "nothing to do" in run("train.py", *cmd, "--train_steps", 6, "--auto_resume").stdout


def test_a_run_folders_lock_is_not_a_file_that_can_be_deleted(tmp_path):
    out = tmp_path / "run"
    first = start("train.py", "--dataset", "moons", "--train_steps", 100000, *TINY, "--out_dir", out)
    try:
        wait_for(lambda: first.stdout.readline().startswith("moons:"))
        for f in out.iterdir():  # a user tidying up: nothing here keeps the lock
            if f.name.startswith("."):
                f.unlink()
        assert "another process is using" in one_line(
            run("train.py", "--dataset", "moons", "--train_steps", 5, *TINY, "--out_dir", out, "--overwrite")
        )
    finally:
        first.kill()
        first.wait()


def test_overwrite_removes_the_old_runs_sample_files_and_says_so(tmp_path):
    out = tmp_path / "run"
    assert run("train.py", "--dataset", "moons", "--train_steps", 3, *TINY, "--out_dir", out).returncode == 0
    assert run("sample.py", "--out_dir", out, "--n", 20, "--sampler", "dpm++").returncode == 0
    p = run("train.py", "--dataset", "moons", "--train_steps", 3, *TINY, "--out_dir", out, "--overwrite")
    (npy,) = re.findall(r"samples-dpm\+\+20-n20-\w{8}\.npy", p.stdout)
    assert f"removed sample.py's {npy}" in p.stdout and not (out / npy).exists()


def test_evaluate_says_when_a_run_is_unfinished(tmp_path):
    out = tmp_path / "run"
    p = start("train.py", "--dataset", "moons", "--train_steps", 100000, *TINY, "--ckpt_interval", 20, "--out_dir", out)
    wait_for(lambda: (out / "ckpt.pt").exists())
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=120)
    e = run("evaluate.py", "--out_dir", out, "--n", 100, "--json")
    assert e.returncode == 0 and "stopped at step" in e.stderr
    assert json.loads(e.stdout)["unfinished"].endswith("of 100000")
    d = run("sample.py", "--out_dir", out, "--n", 20, "--sampler", "ddim", "--sample_steps", 2)
    assert d.returncode == 0 and "stopped at step" in d.stderr and "this draws from the model" in d.stderr
    np.savetxt(tmp_path / "pts.csv", np.random.default_rng(3).normal(size=(300, 2)), delimiter=",")
    assert (
        run("train.py", "--dataset", tmp_path / "pts.csv", "--train_steps", 3, *TINY, "--out_dir", out / "f").returncode
        == 0
    )
    n = run("evaluate.py", "--out_dir", out / "f", "--n", 100, "--nll", 50, "--json")  # 30 rows are held out
    assert json.loads(n.stdout)["nll_points"] == 30 and "--nll 50 asks for more points than the 30 held out" in n.stderr


def test_a_closed_stdout_does_not_stop_training(tmp_path):
    out = tmp_path / "run"
    args = ["train.py", "--dataset", "moons", "--train_steps", 100, "--log_interval", 1, *TINY[:4], "--out_dir", out]
    p = subprocess.Popen([PY, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()  # `| head -n 1`
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0 and "Traceback" not in err, err
    assert json.loads((out / "metrics.json").read_text())["args"]["train_steps"] == 100


def test_sighup_stops_a_run_like_sigterm_and_the_hint_pastes_into_a_shell(tmp_path):
    out = tmp_path / "my run"
    p = start(
        "train.py", "--dataset", "moons", "--train_steps", 100000, *TINY, "--ckpt_interval", 100000, "--out_dir", out
    )
    wait_for(lambda: p.stdout.readline().startswith("step"))
    p.send_signal(signal.SIGHUP)
    _, err = p.communicate(timeout=120)
    assert (
        p.returncode == 128 + signal.SIGHUP
        and "stopped by SIGHUP" in err
        and "Traceback" not in err
        and len(err.strip().splitlines()) == 1
    ), err
    hint = err.split("continue with: ")[1].strip()
    assert shlex.split(hint)[2:5] == ["--out_dir", str(out), "--resume"]  # the path survives the shell


@pytest.mark.parametrize(
    "content,message",
    [
        ("a;b,c\n1,2\n3,4\n5,6\n7,8\n9,10\n11,12\n", None),  # a ';' inside a header name, ',' between columns
        ("a,b\tc,d\n1\t2\n3\t4\n5\t6\n7\t8\n9\t10\n11\t12\n", None),  # commas in a tab-separated header
        ("x;y\n2,5;1,0\n", "decimal commas"),
    ],
)
def test_text_files_are_read_by_their_data_rows_delimiter(tmp_path, content, message):
    import datasets

    (tmp_path / "f.csv").write_text(content)
    if message:
        with pytest.raises(ValueError, match=message):
            datasets.load_points(str(tmp_path / "f.csv"))
    else:
        assert datasets.load_points(str(tmp_path / "f.csv")).shape == (6, 2)


def test_a_folder_or_a_pipe_as_the_dataset_is_named_for_what_it_is(tmp_path):
    (tmp_path / "d.csv").mkdir()
    os.mkfifo(tmp_path / "p.csv")
    assert "is a folder, not a data file" in refused(
        "train.py", "--dataset", tmp_path / "d.csv", "--out_dir", tmp_path / "x"
    )
    assert "is not a regular file" in refused("train.py", "--dataset", tmp_path / "p.csv", "--out_dir", tmp_path / "x")
