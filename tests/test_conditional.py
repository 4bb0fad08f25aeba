"""Conditional runs and honest numbers on a user's file, through the scripts: labels from a file's column or a
named dataset, continuous conditions, guidance, the held-out split, its floor and the memorisation check."""

import json

import numpy as np
import pytest
from conftest import refused, run_here
from scipy.spatial import cKDTree

import datasets
import evaluate
import runs

FAST = ["--batch_size", 128, "--n", 1000, "--log_interval", 1000, "--hidden", 128]


def train(*args):
    p = run_here("train.py", *args, *FAST)
    assert p.returncode == 0, p.stderr
    return p


def clusters(tmp_path, rng, n=2000):
    """Four labelled Gaussian clusters at the corners of a square, the labels as words in a CSV column."""
    centres = {"north": (0, 4), "east": (4, 0), "south": (0, -4), "west": (-4, 0)}
    names = rng.choice(list(centres), n)
    X = np.array([centres[k] for k in names]) + 0.3 * rng.normal(size=(n, 2))
    lines = ["x,kind,y"] + [f"{a:.6f},{k},{b:.6f}" for (a, b), k in zip(X, names)]
    (tmp_path / "c.csv").write_text("\n".join(lines) + "\n")
    return centres


def test_a_label_column_of_words_trains_each_class_to_its_own_cluster(tmp_path):
    centres = clusters(tmp_path, np.random.default_rng(0))
    out = tmp_path / "run"
    train("--dataset", tmp_path / "c.csv", "--label_column", "kind", "--train_steps", 800, "--out_dir", out)
    m = json.loads((out / "metrics.json").read_text())
    assert m["condition"] == dict(kind="labels", names=sorted(centres)) and m["holdout"] == 200
    assert m["fidelity"] > 0.95 and m["fidelity_floor"] > 0.95  # the vote itself is near-perfect on these clusters
    for name in ("north", "west"):
        p = run_here(
            "sample.py", "--out_dir", out, "--n", 400, "--sampler", "dpm++", "--label", name, "--out", tmp_path / name
        )
        assert p.returncode == 0, p.stderr
        x = np.load(tmp_path / f"{name}.npy")
        np.testing.assert_allclose(x.mean(0), centres[name], atol=0.3)
        assert (np.load(tmp_path / f"{name}_labels.npy") == name).all()


@pytest.mark.slow  # 13 s; the labelled-file test trains, samples and scores a conditional run by default
def test_conditional_moons_keep_each_moon_apart_and_guidance_sharpens_them(tmp_path):
    out = tmp_path / "run"
    train("--dataset", "moons", "--conditional", "--train_steps", 1200, "--out_dir", out, "--sampler", "dpm++")
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["per_class"]) == {"upper", "lower"} and m["fidelity"] > 0.97, m["fidelity"]
    assert (out / "guidance.png").is_file() and (
        np.load(out / "samples_labels.npy") == "upper"
    ).mean() == pytest.approx(0.5, abs=0.05)
    # the exact class densities as the reference: guided samples of "upper" are more likely under p(x | upper)
    for w in (1, 3):
        assert (
            run_here(
                "sample.py",
                "--out_dir",
                out,
                "--n",
                1000,
                "--sampler",
                "dpm++",
                "--label",
                "upper",
                "--guidance",
                w,
                "--out",
                tmp_path / f"w{w}",
            ).returncode
            == 0
        )
    x1, x3 = (np.load(tmp_path / f"w{w}.npy") for w in (1, 3))
    upper = lambda x: (datasets.log_density("moons", x, 0) > datasets.log_density("moons", x, 1)).mean()
    assert upper(x3) >= upper(x1) > 0.97
    assert np.median(datasets.log_density("moons", x3, 0)) > np.median(
        datasets.log_density("moons", x1, 0)
    )  # sharper: deeper inside


@pytest.mark.slow  # 20 s; numbers as conditions are checked by default in test_conditioning
def test_continuous_conditions_move_the_samples_along_f_of_c(tmp_path):
    rng = np.random.default_rng(1)
    c = rng.uniform(-2, 2, 3000)
    f = lambda c: np.stack([np.sin(1.5 * c) * 3, c**2 - 1], -1)  # x = f(c) + noise
    X = f(c) + 0.1 * rng.normal(size=(3000, 2))
    np.savetxt(tmp_path / "fc.csv", np.column_stack([c, X]), delimiter=",", header="c,x1,x2", comments="")
    out = tmp_path / "run"
    train("--dataset", tmp_path / "fc.csv", "--cond_columns", "c", "--train_steps", 2000, "--out_dir", out)
    for v in (-1.5, 0.0, 1.0):
        p = run_here(
            "sample.py", "--out_dir", out, "--n", 300, "--sampler", "dpm++", "--cond", f"c={v}", "--out", tmp_path / "s"
        )
        assert p.returncode == 0, p.stderr
        np.testing.assert_allclose(np.load(tmp_path / "s.npy").mean(0), f(np.array(v)), atol=0.35)


def test_bad_conditions_are_refused_in_one_line(tmp_path):
    rng = np.random.default_rng(2)
    X = rng.normal(size=(300, 2))
    write = lambda name, labels: np.savetxt(
        tmp_path / name, np.column_stack([X, labels]).astype(str), fmt="%s", delimiter=",", header="a,b,k", comments=""
    )
    write("one.csv", np.zeros(300))
    write("many.csv", np.arange(300))
    write("text.csv", rng.choice(["p", "q"], 300))
    lines = (tmp_path / "text.csv").read_text().splitlines()
    (tmp_path / "hole.csv").write_text("\n".join(lines[:5] + [lines[5].rsplit(",", 1)[0] + ","] + lines[6:]) + "\n")
    assert "has 1 class" in refused("train.py", "--dataset", tmp_path / "one.csv", "--label_column", "k")
    assert "has 300 classes" in refused("train.py", "--dataset", tmp_path / "many.csv", "--label_column", "k")
    assert "data row 5" in refused("train.py", "--dataset", tmp_path / "hole.csv", "--label_column", "k")
    assert "not numeric" in refused("train.py", "--dataset", tmp_path / "text.csv", "--cond_columns", "k")
    assert "names no column" in refused("train.py", "--dataset", tmp_path / "text.csv", "--label_column", "kind")
    assert "--conditional trains a named dataset's labels" in refused("train.py", "--dataset", "dino", "--conditional")
    assert "needs a conditional run" in refused("train.py", "--dataset", "moons", "--guidance", 3)
    out = tmp_path / "run"
    train("--dataset", tmp_path / "text.csv", "--label_column", "k", "--train_steps", 5, "--out_dir", out)
    assert "its classes are p, q" in refused("sample.py", "--out_dir", out, "--label", "r")
    for w in (-1, "nan", "inf"):  # the same rule as train.py's and the library's
        assert "--guidance must be a number >= 0" in refused("sample.py", "--out_dir", out, "--guidance", w)
    assert "needs a run trained with --cond_columns" in refused("sample.py", "--out_dir", out, "--cond", "k=1")
    train(
        "--dataset", tmp_path / "many.csv", "--train_steps", 5, "--out_dir", tmp_path / "plain"
    )  # k as a third coordinate
    assert "this run is unconditional" in refused("sample.py", "--out_dir", tmp_path / "plain", "--label", "p")


def test_held_out_points_never_reach_the_model_and_a_fresh_split_scores_near_zero(tmp_path):
    X = np.random.default_rng(3).normal(size=(20_000, 2)) * [3, 0.5] + [1e3, -7]
    np.save(tmp_path / "g.npy", X)
    data = runs.load_data(str(tmp_path / "g.npy"), holdout=0.1)
    rows = lambda A: {tuple(r) for r in A}
    assert (
        len(data.held) == 2000
        and rows(data.held) | rows(data.points) == rows(X)
        and not rows(data.held) & rows(data.points)
    )
    (ref, _), (floor, _) = evaluate.references(data, str(tmp_path / "g.npy"), 10_000)
    assert rows(ref) == rows(data.held) and rows(floor) <= rows(data.points) and len(floor) == 10_000
    assert abs(evaluate.knn_kl(ref, floor)) < 0.05  # the same distribution: the floor is near 0
    out = tmp_path / "run"
    train("--dataset", tmp_path / "g.npy", "--train_steps", 5, "--out_dir", out, "--n", 200)
    import torch

    shift = torch.load(out / "ckpt.pt", weights_only=True)["ema"]["data_map.shift"].double().numpy()
    np.testing.assert_allclose(shift, data.points.mean(0), rtol=1e-6)  # the statistics of the training rows alone
    assert json.loads((out / "metrics.json").read_text())["holdout"] == 2000


def test_a_small_file_holds_nothing_out_and_says_so(tmp_path):
    """Fewer than 100 points: a tenth is too few to score against, and 20 would take too many from training."""
    np.save(tmp_path / "s.npy", np.random.default_rng(4).normal(size=(99, 2)))
    p = train("--dataset", tmp_path / "s.npy", "--train_steps", 5, "--out_dir", tmp_path / "run", "--n", 100)
    assert "too few to hold out" in p.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["holdout"] == 0 and m.get("knn_kl_floor") is None and "dcr_ratio" not in m


def test_dcr_ratio_separates_copies_from_fresh_points():
    rng = np.random.default_rng(5)
    train, fresh = rng.normal(size=(500, 2)), rng.normal(size=(100, 2))
    copies = train[rng.integers(0, 500, 2000)] + 1e-3 * rng.normal(size=(2000, 2))
    honest = evaluate.memorisation(train, rng.normal(size=(2000, 2)), fresh)
    copied = evaluate.memorisation(train, copies, fresh)
    # the reference: brute-force nearest distances
    nearest = lambda x: np.sqrt(((x[:, None] / train.std(0) - train[None] / train.std(0)) ** 2).sum(-1)).min(1)
    assert copied["dcr_ratio"] == pytest.approx(np.median(nearest(copies)) / np.median(nearest(fresh)))
    assert (
        0.6 < honest["dcr_ratio"] < 1.6
        and copied["dcr_ratio"] < 0.1
        and copied["near_copy_frac"] > 0.9 > 0.1 > honest["near_copy_frac"]
    )
    duplicated = evaluate.memorisation(
        train, copies, np.concatenate([fresh, train[:3]])
    )  # "unseen" points that are training rows
    assert (
        duplicated["dcr_ratio"] is None
        and duplicated["near_copy_frac"] is None
        and "3 of the 103 held-out points" in duplicated["warnings"][0]
    )


@pytest.mark.slow  # 15 s; the README's library script runs by default
def test_the_conditioning_script_in_the_docs_runs_as_written_and_obeys_its_labels(tmp_path):
    """The python block in docs/conditioning.md, executed as printed. Reference: the script's own data, class by
    class."""
    import os
    import runpy

    from conftest import ROOT

    text = open(os.path.join(ROOT, "docs", "conditioning.md")).read()
    (tmp_path / "example.py").write_text(text.split("```python\n", 1)[1].split("```", 1)[0])
    out = runpy.run_path(str(tmp_path / "example.py"), run_name="__main__")
    x, y, lower = out["x"].numpy(), out["y"].numpy(), out["lower"].numpy()
    np.testing.assert_allclose(lower.mean(0), x[y == 1].mean(0), atol=0.1)
    votes = y[cKDTree(x).query(lower, k=10)[1]].mean(
        1
    )  # the share of each sample's 10 nearest data points that are "lower"
    assert (votes > 0.5).mean() > 0.97


def test_guidance_without_a_trained_unconditional_half_is_refused_everywhere(tmp_path):
    """--p_uncond 0 never trains the null condition, so any w != 1 would mix in an untrained model: train.py,
    sample.py and evaluate.py refuse it by one rule (runs.check_guidance). Reference: the run's own flags."""
    flags = ("--dataset", "moons", "--conditional", "--p_uncond", 0)
    assert "--p_uncond 0 never trains" in refused("train.py", *flags, "--guidance", 3)
    out = tmp_path / "run"
    train(*flags, "--train_steps", 5, "--out_dir", out)
    for script in ("sample.py", "evaluate.py"):
        assert "--p_uncond 0 never trains" in refused(script, "--out_dir", out, "--guidance", 0)


def test_evaluate_refuses_nll_for_samples_and_says_a_guided_nll_is_the_conditional_models(tmp_path):
    """--samples holds points, not a model: --nll is refused. At w != 1 the NLL is w = 1's, and a warning says so."""
    out = tmp_path / "run"
    train("--dataset", "moons", "--conditional", "--train_steps", 5, "--out_dir", out)
    assert "--nll scores a checkpoint's model" in refused(
        "evaluate.py", "--samples", out / "samples.npy", "--dataset", "moons", "--nll", 10
    )
    p = run_here("evaluate.py", "--out_dir", out, "--n", 200, "--guidance", 3, "--nll", 20, "--json")
    assert p.returncode == 0 and "score the conditional model (w = 1)" in p.stderr, p.stderr


def test_evaluate_refuses_a_file_whose_classes_were_renamed(tmp_path):
    """Scoring by position under other names would call class A "B"; the checkpoint's names hash says they changed."""
    rng = np.random.default_rng(6)
    path, out = tmp_path / "lab.csv", tmp_path / "run"
    path.write_text(
        "x,y,k\n" + "".join(f"{u},{v},{'AB'[i % 2]}\n" for i, (u, v) in enumerate(rng.normal(size=(300, 2))))
    )
    train("--dataset", path, "--label_column", "k", "--train_steps", 3, "--out_dir", out)
    path.write_text(path.read_text().replace(",A\n", ",Z\n"))
    assert "class or column names have changed" in refused("evaluate.py", "--out_dir", out, "--n", 50)
