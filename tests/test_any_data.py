"""Points beyond the study's 2-D datasets, as a user brings them: 3-D and 8-D files trained with the
default flags, data that no longer fit a run, data no metric can score, and the library example run exactly as
written."""

import json
import os
import runpy

import numpy as np
import pytest
import torch
from conftest import ROOT, refused, run_here
from test_reliability import TINY

import evaluate
import runs
import tinydiff as td

# the default flags, made shorter: 1,500 steps, 2,000 samples from DPM-Solver++ (20 network evaluations)
FLAGS = [
    "--train_steps",
    1500,
    "--batch_size",
    256,
    "--n",
    2000,
    "--sampler",
    "dpm++",
    "--log_interval",
    500,
]


def run(script, *args, check=True):
    p = run_here(script, *args)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def sphere(n, rng):
    x = rng.normal(size=(n, 3))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.slow  # 20 s; the README's library script trains a 3-D swiss roll by default
def test_points_on_a_sphere_train_onto_the_sphere(tmp_path):
    """Reference: kNN KL of a fresh draw from the sphere (a perfect model) and of N(0, I)."""
    rng = np.random.default_rng(0)
    S = sphere(20_000, rng)
    np.savetxt(
        tmp_path / "sphere.csv", S, delimiter=",", header="x,y,z", comments=""
    )  # a header row, as people write them
    p = run("train.py", "--dataset", tmp_path / "sphere.csv", *FLAGS, "--out_dir", tmp_path / "run")
    assert "skipped the header row" in p.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    samples = np.load(tmp_path / "run" / "samples.npy")
    assert samples.shape == (2000, 3) and m["hist_kl_pairs"] == 3 and np.isfinite(m["hist_kl_nats"])
    held = runs.load_data(
        str(tmp_path / "sphere.csv")
    ).held  # the tenth of the file the model never saw, which the metrics use
    assert len(held) == 2000 and m["knn_kl_bits"] == pytest.approx(evaluate.knn_kl(held, samples), abs=1e-9)
    perfect, noise = evaluate.knn_kl(held, sphere(2000, rng)), evaluate.knn_kl(held, rng.normal(size=(2000, 3)))
    assert m["knn_kl_bits"] < perfect + 0.5 and m["knn_kl_bits"] < noise - 2.5, (m["knn_kl_bits"], perfect, noise)
    assert np.abs(np.linalg.norm(samples, axis=1) - 1).mean() < 0.05  # on the manifold
    assert (tmp_path / "run" / "samples.png").stat().st_size > 0


@pytest.mark.slow  # the 3-D sphere above covers D > 2 by default
def test_an_8d_gaussian_mixture_trains_to_its_modes(tmp_path):
    """Reference: N(0, I), and the Gaussian with the data's mean and covariance (which misses the modes)."""
    rng = np.random.default_rng(1)
    means = rng.choice([-2.0, 2.0], size=(4, 8))
    X = means[rng.integers(0, 4, 20_000)] + 0.4 * rng.normal(size=(20_000, 8))
    np.save(tmp_path / "mix.npy", X)
    run("train.py", "--dataset", tmp_path / "mix.npy", *FLAGS, "--out_dir", tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    samples = np.load(tmp_path / "run" / "samples.npy")
    assert samples.shape == (2000, 8) and m["hist_kl_pairs"] == 28
    noise = evaluate.knn_kl(X, rng.normal(size=(2000, 8)))
    moments = evaluate.knn_kl(X, rng.multivariate_normal(X.mean(0), np.cov(X.T), 2000))
    assert m["knn_kl_bits"] < noise / 5 and m["knn_kl_bits"] < moments / 3, (m["knn_kl_bits"], noise, moments)
    nearest = np.linalg.norm(samples[:, None] - means[None], axis=2).argmin(1)
    np.testing.assert_allclose(np.bincount(nearest, minlength=4) / len(samples), 0.25, atol=0.05)  # every mode, equally


def test_data_that_no_longer_fit_the_run_are_refused_in_one_line(tmp_path):
    P = np.random.default_rng(0).normal(size=(500, 2))
    np.savetxt(tmp_path / "p.csv", P, delimiter=",")
    run(
        "train.py",
        "--dataset",
        tmp_path / "p.csv",
        "--train_steps",
        4,
        "--ckpt_interval",
        2,
        "--n",
        100,
        "--out_dir",
        tmp_path / "run",
    )
    np.savetxt(tmp_path / "one.csv", P[:, :1], delimiter=",")
    p = run("evaluate.py", "--out_dir", tmp_path / "run", "--dataset", tmp_path / "one.csv", "--n", 100, check=False)
    assert p.returncode == 2 and "holds 1-D points but the checkpoint's model makes 2-D ones" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    np.savetxt(tmp_path / "p.csv", P[:, :1], delimiter=",")  # the run's own file, now with one column
    p = run("train.py", "--out_dir", tmp_path / "run", "--resume", "--train_steps", 8, check=False)
    assert (
        p.returncode == 2
        and "has changed since this run was trained" in p.stderr
        and "500 points of 2 coordinates then, 500 points of 1 coordinate now" in p.stderr
    ), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    p = run("sample.py", "--out_dir", tmp_path / "run", "--n", 50, "--out", tmp_path / "s")
    assert "plotting the samples alone" in p.stdout and np.load(tmp_path / "s.npy").shape == (50, 2)


def test_the_readme_library_script_runs_as_written_and_learns_the_roll(tmp_path, monkeypatch):
    """The python block under "Use the library" in README.md, executed exactly as printed. Reference:
    the Gaussian with the data's mean and covariance, which has the right moments but not the roll; for the
    model it saves and loads with torch alone, the samples of the model in memory."""
    text = open(os.path.join(ROOT, "README.md")).read()
    code = text[text.index("## Use the library") :].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "example.py").write_text(code)
    monkeypatch.chdir(tmp_path)  # it saves its model where it runs
    out = runpy.run_path(str(tmp_path / "example.py"), run_name="__main__")
    again = td.sample(out["again"], out["scheduler"], 2000, sampler="dpm++", generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, out["samples"])
    x, samples = out["x"].numpy(), out["samples"].numpy()
    assert samples.shape == (2000, 3) and np.isfinite(samples).all()
    gauss = np.random.default_rng(0).multivariate_normal(x.mean(0), np.cov(x.T), 2000)
    assert evaluate.knn_kl(x, samples) < evaluate.knn_kl(x, gauss) - 1
    # on the roll, the angle of (x1, x3) around the centre equals its radius (in units of 10 cm), modulo 2 pi
    r = np.hypot(samples[:, 0] - 500, samples[:, 2] - 500) / 10
    gap = np.remainder(np.arctan2(samples[:, 2] - 500, samples[:, 0] - 500) - r + np.pi, 2 * np.pi) - np.pi
    assert np.median(np.abs(gap)) < 0.3


@pytest.mark.parametrize("kind", ["rounded", "repeated"])
def test_discrete_data_get_no_meaningless_knn_kl_or_nll_but_a_warning(tmp_path, kind):
    """Rounded data (few distinct points, each many times) and repeated rows (each of 60 points 10 times, none with
    5 copies among the held-out rows, so no distance is 0 there) put atoms in the data, where a density scores any
    number: the kNN KL and the NLL are left out, here and in evaluate.py --samples, with one warning."""
    rng = np.random.default_rng(0)
    X = (
        np.round(rng.normal(size=(2000, 2)) * 2)
        if kind == "rounded"
        else np.repeat(rng.normal(size=(60, 2)), 10, axis=0)
    )
    np.savetxt(tmp_path / "points.csv", X, delimiter=",")
    p = run(
        "train.py",
        "--dataset",
        tmp_path / "points.csv",
        "--train_steps",
        3,
        *TINY,
        "--nll",
        10,
        "--eval_interval",
        3,
        "--out_dir",
        tmp_path / "run",
    )
    said = "is an integer with at most" if kind == "rounded" else "repeat another exactly"
    assert p.returncode == 0 and said in p.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["knn_kl_bits"] is None and m["knn_kl_floor"] is None and m["nll_bits"] is None and m["hist_kl_nats"] >= 0
    assert [w for w in m["warnings"] if said in w] and not [w for w in m["warnings"] if "zero distance" in w]
    assert m["curve"][-1]["knn_kl_bits"] is None and not (tmp_path / "run" / "kl.png").exists()
    e = run(
        "evaluate.py", "--samples", tmp_path / "run" / "samples.npy", "--dataset", tmp_path / "points.csv", "--json"
    )
    assert e.returncode == 0 and json.loads(e.stdout)["knn_kl_bits"] is None and said in e.stderr


def test_evaluate_scores_a_files_samples_against_the_rows_train_py_held_out(tmp_path):
    np.savetxt(tmp_path / "points.csv", np.random.default_rng(1).normal(size=(400, 2)), delimiter=",")
    assert (
        run(
            "train.py", "--dataset", tmp_path / "points.csv", "--train_steps", 3, *TINY, "--out_dir", tmp_path / "run"
        ).returncode
        == 0
    )
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    e = json.loads(
        run(
            "evaluate.py", "--samples", tmp_path / "run" / "samples.npy", "--dataset", tmp_path / "points.csv", "--json"
        ).stdout
    )
    for key in ("knn_kl_bits", "knn_kl_floor", "hist_kl_nats", "dcr_ratio", "near_copy_frac"):
        assert e[key] == pytest.approx(m[key], rel=1e-12), key
    samples = np.load(tmp_path / "run" / "samples.npy")
    np.save(tmp_path / "nan.npy", np.vstack([samples, np.full((100, 2), np.nan)]))  # counted, then left out
    e = json.loads(
        run("evaluate.py", "--samples", tmp_path / "nan.npy", "--dataset", tmp_path / "points.csv", "--json").stdout
    )
    assert e["nonfinite_frac"] == pytest.approx(100 / (len(samples) + 100)) and e["knn_kl_bits"] == pytest.approx(
        m["knn_kl_bits"], rel=1e-12
    )
    np.savetxt(tmp_path / "other.csv", np.random.default_rng(2).normal(size=(400, 2)), delimiter=",")
    p = run("evaluate.py", "--out_dir", tmp_path / "run", "--dataset", tmp_path / "other.csv", "--n", 200, "--json")
    assert json.loads(p.stdout)["dcr_ratio"] is None and "holds other points than the run trained on" in p.stderr


def test_data_that_no_metric_can_score_are_refused_before_training(tmp_path):
    rng = np.random.default_rng(0)
    flat = np.column_stack([rng.normal(size=300), np.full(300, 1.5)])
    np.save(tmp_path / "flat.npy", flat)
    assert "1 of the 2 coordinates of" in refused(
        "train.py", "--dataset", tmp_path / "flat.npy", "--out_dir", tmp_path / "a"
    )
    np.savetxt(tmp_path / "small.csv", rng.normal(size=(80, 2)), delimiter=",")
    assert "give --holdout 0.25, or --nll 0" in refused(
        "train.py", "--dataset", tmp_path / "small.csv", "--nll", 10, "--out_dir", tmp_path / "b"
    )
    np.savetxt(tmp_path / "plain.csv", rng.normal(size=(300, 2)), delimiter=",")
    assert "give --holdout 0.1, or --nll 0" in refused(
        "train.py", "--dataset", tmp_path / "plain.csv", "--holdout", 0, "--nll", 10, "--out_dir", tmp_path / "c"
    )
    assert not any((tmp_path / d).exists() for d in "abc")


def test_integer_pixels_get_one_refusal_naming_every_constant_column_or_train_with_dequantize(tmp_path):
    """Pixel-like integers 0..16 in 6 columns, two of them always 0. Reference: the file's own columns, and the
    --dequantize run's metrics: a density is scored (no discrete warning), and its held-out rows lie in [x, x + 1)."""
    rng = np.random.default_rng(3)
    X = rng.integers(0, 17, size=(400, 6)).astype(float)
    X[:, [1, 4]] = 0
    path = tmp_path / "pixels.csv"
    path.write_text("p0,p1,p2,p3,p4,p5\n" + "".join(",".join(f"{v:g}" for v in row) + "\n" for row in X))
    p = run_here("train.py", "--dataset", path, "--out_dir", tmp_path / "a")
    message = p.stderr.strip().splitlines()[-1]  # after the note that the header row named the columns
    assert p.returncode == 2 and "Traceback" not in p.stderr and not (tmp_path / "a").exists()
    assert "2 of the 6 coordinates" in message and "'p1' (0)" in message and "'p4' (0)" in message
    assert "--dequantize" in message
    flags = ("--dataset", path, "--dequantize", "--train_steps", 3, *TINY, "--nll", 10, "--out_dir", tmp_path / "b")
    p = run("train.py", *flags)
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert p.returncode == 0 and m["nll_bits"] is not None and not any("integer" in w for w in m.get("warnings", []))
    data = runs.run_data(str(path), m["args"])
    both = np.vstack([data.points, data.held])
    assert (both - np.floor(both) > 0).all() and sorted(map(tuple, np.floor(both))) == sorted(map(tuple, X))
    np.save(tmp_path / "real.npy", np.column_stack([rng.integers(0, 9, 100), rng.normal(size=100)]))
    assert "coordinate 2 of" in refused("train.py", "--dataset", tmp_path / "real.npy", "--dequantize")
    assert "the named datasets are continuous" in refused("train.py", "--dataset", "moons", "--dequantize")


def test_a_150_row_file_is_scored_at_the_default_holdout(tmp_path):
    """--holdout 0.1 of 150 rows is 15, fewer than a floor needs: the fewest that score (20) are held out, and said.
    Reference: the split's own sizes, and the NLL of exactly those rows."""
    np.savetxt(tmp_path / "small.csv", np.random.default_rng(4).normal(size=(150, 2)), delimiter=",")
    data = runs.load_data(str(tmp_path / "small.csv"))
    assert (len(data.points), len(data.held)) == (130, 20) and "held out 20 of the 150 points (13%)" in data.note
    p = run(
        "train.py",
        "--dataset",
        tmp_path / "small.csv",
        "--train_steps",
        3,
        *TINY,
        "--nll",
        20,
        "--out_dir",
        tmp_path / "run",
    )
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert p.returncode == 0 and "held out 20 of the 150" in p.stderr and m["nll_points"] == 20
