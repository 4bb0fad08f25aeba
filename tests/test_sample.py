"""sample.py on a trained run: its files, seeds, refusals and Ctrl-C, checked against its own repeated draws and the
files the run already holds."""

import signal

import numpy as np
import pytest
from conftest import refused, run
from test_reliability import TINY, start


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
    assert np.load(one(out.glob("samples-dpm++20-n300-*.npy"))).shape == (300, 2)


def test_sample_py_never_writes_over_the_runs_own_samples(tmp_path):
    out = tmp_path / "run"
    assert run("train.py", "--dataset", "moons", "--train_steps", 3, *TINY, "--out_dir", out).returncode == 0
    before = (out / "samples.npy").read_bytes()
    assert "would write over train.py's samples.npy" in refused(
        "sample.py", "--out_dir", out, "--n", 20, "--out", out / "samples"
    )
    assert (out / "samples.npy").read_bytes() == before
    assert (
        run("sample.py", "--out_dir", out, "--n", 20, "--out", tmp_path / "samples").returncode == 0
    )  # elsewhere, that name is fine


def test_sample_py_keeps_each_draw_in_its_own_file(tmp_path):
    """Draws that differ in seed, weights or count never replace one another; the same draw again rewrites its file."""
    out = tmp_path / "run"
    assert run("train.py", "--dataset", "moons", "--train_steps", 3, *TINY, "--out_dir", out).returncode == 0
    draws = [(), ("--seed", 5), ("--seed", 5, "--raw"), ("--n", 30)]
    for flags in draws + [()]:
        assert run("sample.py", "--out_dir", out, "--n", 20, "--sampler", "dpm++", *flags).returncode == 0
    assert len(list(out.glob("samples-*.npy"))) == len(draws)
    plain, seeded = (
        one(out.glob("samples-dpm++20-n20-????????.npy")),
        one(out.glob("samples-dpm++20-n20-seed5-????????.npy")),
    )
    assert not np.array_equal(np.load(plain), np.load(seeded))


def test_draws_that_differ_in_any_setting_never_share_a_file(tmp_path):
    """Reference: the file names themselves. Settings equal when printed with :g, labels joined by + and a folder as
    --out were the collisions; a long label keeps the name within the file system's limit."""
    out = tmp_path / "run"
    kinds = ("a", "b", "a+b")
    (tmp_path / "pts.csv").write_text("x,y,k\n" + "".join(f"{i % 7},{i % 5},{kinds[i % 3]}\n" for i in range(60)))
    flags = ("--dataset", tmp_path / "pts.csv", "--label_column", "k", "--train_steps", 3, *TINY, "--out_dir", out)
    assert run("train.py", *flags).returncode == 0
    draws = [("--guidance", 2), ("--guidance", 2.0000001), ("--label", "a+b"), ("--label", "a", "--label", "b")]
    draws += [("--guidance", 2)]  # the first draw again: the same file
    for flags in draws:
        run("sample.py", "--out_dir", out, "--n", 20, "--sampler", "ddim", "--sample_steps", 2, *flags)
    assert len([p for p in out.glob("samples-ddim2-*.npy") if not p.stem.endswith("_labels")]) == len(draws) - 1
    assert "names a folder" in refused("sample.py", "--out_dir", out, "--n", 20, "--out", f"{tmp_path}/")


def one(paths):
    (path,) = list(paths)
    return path


def test_ctrl_c_in_sample_py_is_one_line(tmp_path):
    out = tmp_path / "run"
    assert run("train.py", "--dataset", "moons", "--train_steps", 3, *TINY, "--out_dir", out).returncode == 0
    p = start("sample.py", "--out_dir", out, "--n", 3_000_000)
    assert p.stdout.readline().startswith("sampling 3,000,000 points")  # past the checks, into sampling
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert (
        p.returncode == 130
        and "interrupted by SIGINT" in err
        and "Traceback" not in err
        and len(err.strip().splitlines()) == 1
    ), err
    assert not list(out.glob("samples-*"))


def test_a_draw_names_its_checkpoint_and_never_replaces_another_files(tmp_path):
    """Reference: the files and their bytes. The same settings from a run before and after it was resumed are two
    draws; --out onto an existing file is refused without --overwrite; --label 1.0 is the file's class 1."""
    out = tmp_path / "run"
    path = tmp_path / "k.csv"
    path.write_text("x,y,k\n" + "".join(f"{i % 9},{i % 7 / 3},{['1', '1.0', '2'][i % 3]}\n" for i in range(90)))
    flags = ("--dataset", path, "--label_column", "k", *TINY, "--ckpt_interval", 2, "--out_dir", out)
    run("train.py", "--train_steps", 2, *flags)
    draw = ("sample.py", "--out_dir", out, "--n", 20, "--sampler", "ddim", "--sample_steps", 2, "--label", "1.0")
    run(*draw)
    run("train.py", "--out_dir", out, "--resume", "--train_steps", 4)
    run(*draw)
    assert len([p for p in out.glob("samples-ddim2-*.npy") if not p.stem.endswith("_labels")]) == 2
    run(*draw, "--out", tmp_path / "mine")
    before = (tmp_path / "mine.npy").read_bytes()
    assert "mine.npy" in refused(*draw, "--out", tmp_path / "mine", "--seed", 5) and "--overwrite" in refused(
        *draw, "--out", tmp_path / "mine", "--seed", 5
    )
    assert (tmp_path / "mine.npy").read_bytes() == before
    run(*draw, "--out", tmp_path / "mine", "--seed", 5, "--overwrite")
    assert (tmp_path / "mine.npy").read_bytes() != before
