"""Data-parallel training under torchrun (2 gloo processes on the CPU) against one process."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT

import runs
import tinydiff as td

PY = sys.executable
ARGS = ["--dataset", "moons", "--batch_size", "64", "--n", "200", "--log_interval", "10"]


def torchrun(*args, wait=True):
    cmd = [
        PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(ROOT, "train.py"),
        *map(str, args),
    ]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def workers(out):
    """PIDs of the train.py processes that torchrun started for this run folder (read from /proc)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if str(out) in cmd and not any("torch.distributed.run" in c for c in cmd):
            pids.append(int(pid))
    return pids


def weights(out, key="model"):
    return runs.load_checkpoint(str(out / "ckpt.pt"))[key]


@pytest.mark.slow  # 16 s; torchrun itself runs by default in the refusal test below
@pytest.mark.parametrize("condition", [[], ["--conditional"]], ids=["plain", "conditional"])
def test_two_processes_train_the_weights_of_one_process_fed_the_same_rows(tmp_path, condition):
    # lr 1e-3, clip 1: Adam divides by the root of each weight's squared-gradient average, so for a weight whose
    # gradient is near zero it turns the last-bit differences of the reordered sums into visible ones.
    # At 1e-3 they stay under the tolerance below (the largest seen: 2.7e-6, one weight of 65,536, conditional, on one
    # of
    # two CPUs of the same kind; 1.1e-6 on the other); at 2e-3 they grow. A wrong split or average moves weights by ~lr.
    args = [*ARGS, "--train_steps", 40, "--lr", "1e-3", "--grad_clip", "1", *condition]
    p = torchrun(*args, "--out_dir", tmp_path / "ddp")
    assert "2 processes" in p.stdout and p.stdout.count("step     10 |") == 1  # rank 0 alone logs
    one = subprocess.run(
        [PY, os.path.join(ROOT, "train.py"), *map(str, args), "--out_dir", str(tmp_path / "one")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    for k in a:  # the same draws, split in two: equal up to the order of the gradient sums
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
    assert not torch.equal(
        weights(tmp_path / "one")["mlp.0.weight"], td.Denoiser(td.DenoiserConfig()).state_dict()["mlp.0.weight"]
    )
    assert sorted(f.name for f in (tmp_path / "ddp").iterdir()) == sorted(f.name for f in (tmp_path / "one").iterdir())
    # the logged loss is the whole batch's, not rank 0's share of it
    losses = [runs.load_checkpoint(str(tmp_path / run / "ckpt.pt"))["losses"] for run in ("ddp", "one")]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # 30 s; kill-and-resume is tested by default for one process (test_scripts), DDP training above
def test_stop_and_resume_under_ddp_equals_an_uninterrupted_ddp_run(tmp_path):
    torchrun(*ARGS, "--train_steps", 400, "--out_dir", tmp_path / "whole")
    p = torchrun(*ARGS, "--train_steps", 400, "--ckpt_interval", 1000, "--out_dir", tmp_path / "cut", wait=False)
    deadline = time.time() + 120
    while "step     20 |" not in p.stdout.readline():
        assert time.time() < deadline and p.poll() is None
    pids = workers(tmp_path / "cut")  # found while the run is young: it must not finish first
    assert len(pids) == 2, pids
    for pid in pids:  # as a scheduler stopping the job does: every process gets SIGTERM
        os.kill(pid, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert err.count("stopped by SIGTERM at step") == 1, err[-2000:]  # rank 0 speaks for both
    said = int(err.split("stopped by SIGTERM at step ")[1].split(";")[0])
    step = runs.load_checkpoint(str(tmp_path / "cut" / "ckpt.pt"))[
        "step"
    ]  # the only checkpoint is the stop's (--ckpt_interval 1000)
    assert 20 <= step < 400 and step == said
    torchrun("--out_dir", tmp_path / "cut", "--resume", "--n", 200)
    for key in ("model", "ema"):
        a, b = weights(tmp_path / "whole", key), weights(tmp_path / "cut", key)
        assert all(torch.equal(a[k], b[k]) for k in a), key


def test_a_batch_that_does_not_split_is_refused_in_one_line(tmp_path):
    cmd = [
        PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(ROOT, "train.py"),
        "--batch_size",
        "63",
        "--out_dir",
        str(tmp_path / "x"),
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "--batch_size 63 does not split over 2 processes; use a multiple of 2" in p.stderr
