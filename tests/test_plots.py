"""The figures: any dimension, axes named by the data's columns, equal scales where the units agree."""

import itertools

import numpy as np
import pytest

import plots


@pytest.mark.parametrize("D", [1, 3, 8])
def test_plots_in_any_dimension(tmp_path, D):
    data = np.random.default_rng(0).normal(size=(2000, D)) * 1e6 + 5e6
    plots.plot_samples(data, data[:500] * 1.01, str(tmp_path / "s.png"), "title")
    assert (tmp_path / "s.png").stat().st_size > 10_000
    pairs = plots.plot_pairs(D)
    assert pairs == (list(itertools.combinations(range(D), 2)) if D <= 5 else [(i, i + 1) for i in range(D - 1)])


def test_plot_axes_are_named_by_the_columns(tmp_path, monkeypatch):
    import matplotlib.axes

    seen = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xlabel", lambda ax, s, *a, **k: seen.append(("x", s)))
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel", lambda ax, s, *a, **k: seen.append(("y", s)))
    data = np.random.default_rng(0).normal(size=(500, 3))
    path = str(tmp_path / "s.png")
    for D, names in ((3, ["lon", "lat", "depth"]), (3, None), (2, ["u", "v"]), (2, None), (1, ["h"]), (1, None)):
        seen.clear()
        plots.plot_samples(data[:, :D], data[:, :D], path, "title", axis_names=names)
        labels = names or [f"x{i + 1}" for i in range(D)]
        if D == 1:
            want = [("x", labels[0])] * 2 if names else []
        else:
            want = [
                (axis, labels[k]) for i, j in plots.plot_pairs(D) for _ in range(2) for axis, k in (("x", i), ("y", j))
            ]
        assert seen == (want if names or D > 2 else []), (D, names)
    seen.clear()  # the samples alone (the data file is gone): one panel per pair
    plots.plot_samples(None, data, path, "title", axis_names=["lon", "lat", "depth"])
    assert seen == [
        (axis, ["lon", "lat", "depth"][k]) for i, j in plots.plot_pairs(3) for axis, k in (("x", i), ("y", j))
    ]
    with pytest.raises(ValueError, match="one name per coordinate"):
        plots.plot_samples(data, data, path, "title", axis_names=["a", "b"])
    monkeypatch.undo()  # the real labels: a field that would be broken TeX is drawn as text
    plots.plot_samples(data, data, path, "title", axis_names=["$a_b_c$", "lat", "$\\frac{1}$"])
