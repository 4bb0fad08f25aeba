"""Each dataset's statistics against its definition; users' files as people write them; bad files refused."""

import math

import numpy as np
import pytest
from scipy import integrate, stats

import datasets


def close(value, expected, se, n_sigma=5):
    assert abs(value - expected) < n_sigma * se, (value, expected, se)


DIMS = {"circle": 2, "dino": 2, "line": 2, "moons": 2, "ring8": 2, "swissroll3d": 3}


def test_defaults_are_100k_points_from_seed_42_and_reproducible():
    assert set(DIMS) == set(datasets.DATASETS)
    for name in datasets.DATASETS:
        X = datasets.load_dataset(name)
        assert X.shape == (100_000, DIMS[name]) and np.isfinite(X).all()
        # inside the study's square [-5, 5]^D and spread over it: evaluate's fixed grid and plots fit them
        assert np.abs(X).max() < 5 and (X.max(0) - X.min(0) > 2).all()
        assert np.array_equal(X, datasets.DATASETS[name](100_000, np.random.default_rng(42)))
        assert not np.array_equal(X[:100], datasets.load_dataset(name, seed=1)[:100])


def test_circle_is_16_blobs_at_radius_3_plus_the_origin():
    X = datasets.load_dataset("circle")
    r = np.hypot(X[:, 0], X[:, 1])
    at_origin = r < 0.2
    # P(x rounds to 0) = P(|U(-.5,.5)| < 0.1) = 0.2 per axis, so 0.04 of points sit at the origin
    close(at_origin.mean(), 0.04, math.sqrt(0.04 * 0.96 / len(X)))
    assert np.all(np.abs(r[~at_origin] - 3) <= 0.09 + 1e-9)
    # the 16 directions of the nonzero grid points {-2..2}^2
    grid = [(a, b) for a in range(-2, 3) for b in range(-2, 3) if (a, b) != (0, 0)]
    dirs = np.unique(np.round(np.arctan2([b for a, b in grid], [a for a, b in grid]), 9))
    assert len(dirs) == 16
    ang = np.arctan2(X[~at_origin, 1], X[~at_origin, 0])
    gap = np.abs(np.angle(np.exp(1j * (ang[:, None] - dirs[None]))))  # wrapped angular distance
    assert gap.min(1).max() < 0.09 / 2.9  # every point within its blob's angular radius
    assert np.all(np.bincount(gap.argmin(1), minlength=16) > 1000)  # and every blob is used


def test_line_is_uniform_on_its_box():
    X = datasets.load_dataset("line")
    assert X[:, 0].min() >= -2 and X[:, 0].max() <= 2 and X[:, 1].min() >= -4 and X[:, 1].max() <= 4
    assert stats.kstest(X[:, 0], stats.uniform(-2, 4).cdf).pvalue > 1e-3
    assert stats.kstest(X[:, 1], stats.uniform(-4, 8).cdf).pvalue > 1e-3


def test_moons_moments_match_the_definition():
    X = datasets.load_dataset("moons")
    n, s2 = len(X), 0.03**2
    # theta uniform on [0, pi]: E cos = 0, E sin = 2/pi, E cos^2 = E sin^2 = 1/2
    Es = 2 / math.pi
    mx, my = 0.5, 0.25  # (0 + 1) / 2 and (2/pi + 0.5 - 2/pi) / 2
    Ex2 = (0.5 + (1 + 0.5)) / 2
    Ey2 = (0.5 + (0.25 - Es + 0.5)) / 2
    vx, vy = Ex2 - mx**2 + s2, Ey2 - my**2 + s2
    close(X[:, 0].mean(), (mx + 0.3) * 2 - 1, 2 * math.sqrt(vx / n))
    close(X[:, 1].mean(), (my + 0.3) * 3 - 1, 3 * math.sqrt(vy / n))
    close(X[:, 0].var(), 4 * vx, 4 * vx * 0.02)
    close(X[:, 1].var(), 9 * vy, 9 * vy * 0.02)


def test_dino_moments_match_the_datasaurus_points():
    X = datasets.load_dataset("dino")
    pts = np.loadtxt(datasets.DINO_TSV, skiprows=1)
    assert pts.shape == (142, 2)
    assert pts.mean(0) == pytest.approx([54.2633, 47.8323], abs=1e-3)  # as the data's README states
    n, scale = len(X), np.array([4 / 54, 4 / 48])
    mean = (pts.mean(0) * scale) - 4
    var = (pts.var(0) + 0.15**2) * scale**2  # resampling with replacement, plus the jitter
    for d in range(2):
        close(X[:, d].mean(), mean[d], math.sqrt(var[d] / n))
        close(X[:, d].var(), var[d], var[d] * 0.02)


def test_swissroll3d_matches_its_definition():
    """Moments against the integrals of its definition (scipy.integrate.quad), and the roll itself:
    the angle of (x1, x3) equals the radius (times 3.6), up to the noise."""
    X = datasets.load_dataset("swissroll3d")
    n, a, b, s2 = len(X), 1.5 * np.pi, 4.5 * np.pi, 0.05**2
    Ex = integrate.quad(lambda t: t * np.cos(t), a, b)[0] / (b - a) / 3.6
    Ez = integrate.quad(lambda t: t * np.sin(t), a, b)[0] / (b - a) / 3.6
    Ex2 = integrate.quad(lambda t: (t * np.cos(t)) ** 2, a, b, limit=200)[0] / (b - a) / 3.6**2
    Ez2 = integrate.quad(lambda t: (t * np.sin(t)) ** 2, a, b, limit=200)[0] / (b - a) / 3.6**2
    Exz = integrate.quad(lambda t: t * t * np.cos(t) * np.sin(t), a, b, limit=200)[0] / (b - a) / 3.6**2
    vx, vy, vz = Ex2 - Ex**2 + s2, 21**2 / 12 / 3.6**2 + s2, Ez2 - Ez**2 + s2
    for d, mean, var in ((0, Ex, vx), (1, 0.0, vy), (2, Ez, vz)):
        close(X[:, d].mean(), mean, math.sqrt(var / n))
        close(X[:, d].var(), var, var * 0.02)
    close(np.cov(X[:, 0], X[:, 2])[0, 1], Exz - Ex * Ez, math.sqrt(vx * vz / n) * 2)
    t = 3.6 * np.hypot(X[:, 0], X[:, 2])
    gap = np.abs(np.angle(np.exp(1j * (np.arctan2(X[:, 2], X[:, 0]) - t))))  # wrapped
    assert np.median(gap) < 0.2 and np.quantile(gap, 0.99) < 1.0  # uniform angles would give pi/2 and 3.1
    assert abs(X[:, 1]).max() < 10.5 / 3.6 + 0.05 * 6


@pytest.mark.parametrize("D", [1, 2, 3, 5])
def test_user_points_load_from_csv_txt_and_npy_in_any_dimension(tmp_path, D):
    P = np.random.default_rng(0).normal(size=(50, D)) * 1e4 + 3
    np.savetxt(tmp_path / "p.csv", P, delimiter=",")
    np.savetxt(tmp_path / "p.tsv", P, delimiter="\t")
    np.savetxt(tmp_path / "p.txt", P)
    np.savetxt(tmp_path / "p.semi.csv", P, delimiter=";")
    np.save(tmp_path / "p.npy", P)
    with open(tmp_path / "P.NPY", "wb") as f:  # np.save would append .npy
        np.save(f, P.astype(np.float32))
    for f in ("p.csv", "p.tsv", "p.txt", "p.semi.csv", "p.npy", "P.NPY"):
        X = datasets.load_dataset(str(tmp_path / f))
        assert X.dtype == np.float64 and X.shape == (50, D)
        np.testing.assert_allclose(X, P, rtol=1e-6 if f == "P.NPY" else 1e-12)


def test_text_as_people_write_it_bom_comments_and_a_header(tmp_path, capsys):
    P = np.random.default_rng(1).normal(size=(20, 3))
    rows = "\n".join(",".join(f"{v:.17g}" for v in row) for row in P)
    text = f"\ufeff# exported by my tool\n# units: m\nx,y,z\n{rows}\n# the end\n"
    (tmp_path / "p.csv").write_bytes(text.encode("utf-8"))
    np.testing.assert_allclose(datasets.load_dataset(str(tmp_path / "p.csv")), P, rtol=1e-15)
    out = capsys.readouterr()
    assert "skipped the header row" in out.err and "x,y,z" not in out.out
    (tmp_path / "q.csv").write_bytes(f"\ufeff{rows}\n".encode())  # a BOM, no header: nothing skipped
    np.testing.assert_allclose(datasets.load_dataset(str(tmp_path / "q.csv")), P, rtol=1e-15)
    assert capsys.readouterr().out == ""


def test_row_labels_are_dropped_and_an_index_like_column_is_flagged(tmp_path, capsys):
    """pandas' DataFrame.to_csv writes its row index as a first column with an empty name (',x,y'; with
    sep='\\t' the header is one field short), 'Unnamed: 0' once such a file is read back and written
    again; R's write.csv writes quoted row names 1..N under '""'. After filtering, an index skips values."""
    P = np.random.default_rng(2).normal(size=(30, 2))
    body = lambda labels, sep=",": "\n".join(f"{i}{sep}{x:.17g}{sep}{y:.17g}" for i, (x, y) in zip(labels, P))
    files = {
        "df.csv": f",x,y\n{body(range(30))}",
        "quoted.csv": f'"",x,y\n{body(range(30))}',
        "again.csv": f"Unnamed: 0,x,y\n{body(range(30))}",
        "tab.tsv": f"\tx\ty\n{body(range(30), chr(9))}",
        "r.csv": '"","x","y"\n' + body(f'"{i + 1}"' for i in range(30)),
        "filtered.csv": f",x,y\n{body(range(3, 93, 3))}",
        "two.csv": ",x,y\n" + "\n".join(body(range(30)).splitlines()[:2]),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text + "\n")
        np.testing.assert_allclose(
            datasets.load_dataset(str(tmp_path / name)), P[: 2 if name == "two.csv" else 30], rtol=1e-15
        )
        assert "dropped its first column" in capsys.readouterr().err, name
    for text in (
        f"id,x,y\n{body(range(30))}\n",
        f"{body(range(30))}\n",
    ):  # a named column, or no header: kept, with a warning
        (tmp_path / "ix.csv").write_text(text)
        np.testing.assert_array_equal(datasets.load_dataset(str(tmp_path / "ix.csv"))[:, 0], np.arange(30))
        err = capsys.readouterr().err
        assert "counts 0, 1, 2, ... like a row index" in err and "dropped its" not in err
    (tmp_path / "floats.csv").write_text(",x,y\n" + body(P[:, 0] + 1) + "\n")  # unnamed, but not labels: data
    assert (
        datasets.load_dataset(str(tmp_path / "floats.csv")).shape == (30, 3)
        and "dropped its" not in capsys.readouterr().err
    )


def test_column_names_come_from_the_header_without_its_row_label_field(tmp_path):
    """The plot's axis names: the header's fields for the coordinates that load_dataset returns."""
    files = {
        "xyz.csv": ("# units: m\nx,y,z\n1,2,3\n", ["x", "y", "z"]),
        "df.csv": (",lon,lat\n0,1,2\n", ["lon", "lat"]),
        "r.csv": ('"","a","b"\n"1",1,2\n', ["a", "b"]),
        "tab.tsv": ("\tu\tv\n0\t1\t2\n", ["u", "v"]),
        "blank.csv": ("a,,c\n1,2,3\n", ["a", "x2", "c"]),
        "plain.csv": ("1,2,3\n", None),
        "quoted.csv": ('"lon, deg",lat\n1,2\n', ["lon, deg", "lat"]),
        "one.csv": ("x\n1\n2\n", ["x"]),
        "semi.csv": ("\ufeffx;y\n1;2\n", ["x", "y"]),
        "space.txt": ("x y\n1 2\n", ["x", "y"]),
        "trailing.csv": ("x,y,\n1,2\n", None),
        "named-extra.csv": ("id,x,y,z\n1,2,3\n", None),
        "spaced.tsv": ("east coord\tnorth coord\n1\t2\n", ["east coord", "north coord"]),
        "quoted-semi.csv": ('"lon;deg",lat\n1,2\n', ["lon;deg", "lat"]),
        "trailing-tab.tsv": ("1\t2\t\n3\t4\t\n", None),
    }
    for name, (text, names) in files.items():
        (tmp_path / name).write_text(text)
        D = datasets.load_dataset(str(tmp_path / name)).shape[1]
        assert datasets.column_names(str(tmp_path / name), D) == names, name
    assert datasets.load_dataset(str(tmp_path / "trailing-tab.tsv")).shape == (2, 2)  # no header: both rows are points
    np.save(tmp_path / "p.npy", np.zeros((3, 2)))
    for name in ("dino", str(tmp_path / "p.npy"), str(tmp_path / "gone.csv")):
        assert datasets.column_names(name, 2) is None


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("ragged.csv", "1,2\n3,4,5\n", "has 3 columns in data row 2 and 2 before it; give every row the same columns"),
        ("nan.csv", "1,2\nnan,5\n", r"NaN or infinite values in 1 of its 2 points \(the first is point 2\)"),
        ("inf.txt", "1 2\n3 4\ninf 5\n-inf 6\n", r"in 2 of its 4 points \(the first is point 3\)"),
        ("empty.csv", "", "holds no points"),
        ("euro.csv", "x;y\n2,5;1,0\n3,5;2,0\n", "decimal commas"),
        ("euro-no-header.csv", "2,5;1,0\n3,5;2,0\n", "decimal commas"),
        ("semi-text.csv", '# a, b\n1;2\n3;"n/a, missing"\n', "not a table of numbers"),
        ("quoted-cell.csv", '1,2\n"7886;5",3\n', "could not convert string '7886;5'"),
        ("header-only.csv", "# comment\nx,y\n", "holds no points"),
        ("words.csv", "x,y\na,b\n", "not a table of numbers"),
        ("complex.txt", "1+2j 3\n4-1j 5\n", "not a table of numbers"),
    ],
)
def test_malformed_text_files_are_refused(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=match):
        datasets.load_dataset(str(tmp_path / name))


def with_shape(raw, shape):
    """A version 1.0 .npy file's bytes with the header's shape replaced, the header kept at its length."""
    n = int.from_bytes(raw[8:10], "little")
    header = raw[10 : 10 + n].decode("latin1").rstrip()
    assert "(4, 2)" in header
    return raw[:10] + (header.replace("(4, 2)", shape).ljust(n - 1) + "\n").encode("latin1") + raw[10 + n :]


def test_malformed_npy_files_are_refused_in_one_line(tmp_path):
    np.save(tmp_path / "flat.npy", np.arange(10.0))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "complex.npy", np.ones((5, 2)) + 1j)
    np.save(tmp_path / "words.npy", np.array([["a", "b"]]))
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    np.save(tmp_path / "good.npy", np.zeros((4, 2)))
    raw = (tmp_path / "good.npy").read_bytes()
    (tmp_path / "forged.npy").write_bytes(with_shape(raw, "(9**99,)"))  # an expression, not a shape
    (tmp_path / "huge.npy").write_bytes(with_shape(raw, "(9999999999, 2)"))  # 160 GB promised, 32 bytes there
    (tmp_path / "truncated.npy").write_bytes(raw[:-8])
    cases = {
        "flat.npy": r"shape \(10,\); it must be \(N, D\)",
        "obj.npy": "object values; it must hold real numbers",
        "complex.npy": "complex numbers",
        "words.npy": "<U1 values",
        "junk.npy": "not a readable .npy file",
        "forged.npy": "not a readable .npy file",
        "huge.npy": "does not match the file's",
        "truncated.npy": "does not match the file's",
    }
    for f, match in cases.items():
        with pytest.raises(ValueError, match=match) as e:
            datasets.load_dataset(str(tmp_path / f))
        assert str(e.value).startswith(str(tmp_path / f)) and "\n" not in str(e.value)


def test_files_too_large_to_read_are_refused_before_reading(tmp_path, monkeypatch):
    big = tmp_path / "big.csv"
    with open(big, "wb") as f:  # sparse: takes no disk space, but reading it would take a while
        f.truncate(datasets.MAX_FILE_BYTES + 1)
    with pytest.raises(ValueError, match="larger than the 1 GB"):
        datasets.load_dataset(str(big))
    P = np.random.default_rng(0).normal(size=(1000, 4))
    np.savetxt(tmp_path / "p.csv", P, delimiter=",")
    np.save(tmp_path / "p.npy", P)
    monkeypatch.setattr(datasets, "available_memory", lambda: P.nbytes)  # less than the parsed points and their copy
    for f in ("p.csv", "p.npy"):
        with pytest.raises(ValueError, match="would need about .* GiB of memory"):
            datasets.load_dataset(str(tmp_path / f))
    monkeypatch.setattr(datasets, "available_memory", lambda: 10 * P.nbytes)
    for f in ("p.csv", "p.npy"):
        np.testing.assert_allclose(datasets.load_dataset(str(tmp_path / f)), P)


def test_unknown_names_and_missing_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'spiral'"):
        datasets.load_dataset("spiral")
    with pytest.raises(ValueError, match="no data file at"):
        datasets.load_dataset(str(tmp_path / "missing.csv"))


def test_labels_are_read_exactly_by_one_documented_normalisation(tmp_path):
    """Reference: the classes written into the file. '#' inside a field is data; NFC and NFD spellings of a name,
    and "1" / "1.0" / the .npy's 1.0, are one class each; missing markers are refused naming the row."""
    cafe_nfc, cafe_nfd = "caf\u00e9", "cafe\u0301"
    rows = [(i % 5, i % 3, lab) for i, lab in enumerate(["C", "C#", "D", cafe_nfc, cafe_nfd, " D "] * 20)]
    (tmp_path / "a.csv").write_text("# notes\nx,y,k\n" + "".join(f"{x},{y},{k}\n" for x, y, k in rows))
    X, y, names, _ = datasets.load_conditioned(str(tmp_path / "a.csv"), label_column="k")
    assert names == ["C", "C#", "D", cafe_nfc] and len(X) == 120
    assert [names[k] for k in y[:6]] == ["C", "C#", "D", cafe_nfc, cafe_nfc, "D"]
    (tmp_path / "b.csv").write_text("x,k\n" + "".join(f"{i},{['1', '1.0', '2'][i % 3]}\n" for i in range(60)))
    np.save(tmp_path / "b.npy", np.column_stack([np.arange(60.0), [[1.0, 1.0, 2.0][i % 3] for i in range(60)]]))
    for path in ("b.csv", "b.npy"):
        _, y, names, _ = datasets.load_conditioned(str(tmp_path / path), label_column="k" if "csv" in path else "1")
        assert names == ["1", "2"] and y.tolist() == [[0, 0, 1][i % 3] for i in range(60)], path
    for marker in ("NA", "n/a", "", "null"):
        (tmp_path / "c.csv").write_text("x,k\n" + "".join(f"{i},{'ab'[i % 2]}\n" for i in range(40)) + f"41,{marker}\n")
        with pytest.raises(ValueError, match=r"missing label .* data row 41"):
            datasets.load_conditioned(str(tmp_path / "c.csv"), label_column="k")


def test_an_npys_coordinates_beside_a_label_column_are_its_float64_values(tmp_path):
    """Reference: the array saved. Values of 3e19 once came back through int64 as -9.22e18."""
    X = np.column_stack([np.linspace(3e19, 4e19, 40), np.linspace(-1, 1, 40) ** 3, np.arange(40) % 2])
    np.save(tmp_path / "big.npy", X)
    got, y, names, _ = datasets.load_conditioned(str(tmp_path / "big.npy"), label_column="2")
    assert np.array_equal(got, X[:, :2]) and names == ["0", "1"] and np.array_equal(y, X[:, 2])


def test_a_form_feed_line_before_the_header_loses_no_row(tmp_path):
    """Reference: the rows written. str.splitlines splits at a form feed and a file's lines do not."""
    rows = "".join(f"{i},{i * 2}\n" for i in range(30))
    (tmp_path / "ff.csv").write_text("\f\nx,y\n" + rows)
    assert len(datasets.load_dataset(str(tmp_path / "ff.csv"))) == 30
    (tmp_path / "ffk.csv").write_text("\f\nx,y,k\n" + "".join(f"{i},{i * 2},{'ab'[i % 2]}\n" for i in range(30)))
    assert len(datasets.load_conditioned(str(tmp_path / "ffk.csv"), label_column="k")[0]) == 30


def test_a_label_with_a_space_in_a_space_separated_file_is_named_with_the_file(tmp_path):
    """numpy's "the number of columns changed ... use usecols" becomes one sentence naming the file and the fix."""
    path = tmp_path / "pets.txt"
    path.write_text("x y k\n1 2 big cat\n" + "".join(f"{i} {i} dog\n" for i in range(30)))
    with pytest.raises(ValueError, match=r"pets.txt has 3 columns in data row 2 and 4 before it \(a space inside"):
        datasets.load_conditioned(str(path), label_column="k")


def test_labels_beyond_float64_stay_apart_a_headerless_labelled_file_keeps_its_first_row_and_big_ints_are_refused(
    tmp_path,
):
    """Reference: the rows and classes written. 12345678901234567890 and ...891 are one float64; a first row that
    is numeric wherever the next is (a label column beside numbers) is data, not a header; int64 beyond 2^53 would
    round."""
    (tmp_path / "huge.csv").write_text("x,kind\n" + "".join(f"{i},{12345678901234567890 + i % 2}\n" for i in range(60)))
    _, y, names, _ = datasets.load_conditioned(str(tmp_path / "huge.csv"), label_column="kind")
    assert names == ["12345678901234567890", "12345678901234567891"] and y.tolist() == [i % 2 for i in range(60)]
    (tmp_path / "nohdr.csv").write_text("".join(f"{i * 0.1:.2f},{i * 0.2:.2f},{'AB'[i % 2]}\n" for i in range(60)))
    X, y, names, _ = datasets.load_conditioned(str(tmp_path / "nohdr.csv"), label_column="2")
    assert X.shape == (60, 2) and X[0].tolist() == [0.0, 0.0] and names == ["A", "B"]
    np.save(tmp_path / "big.npy", (2**62 + np.arange(40, dtype=np.int64)).reshape(20, 2))
    with pytest.raises(ValueError, match="integers beyond 2\\^53"):
        datasets.load_dataset(str(tmp_path / "big.npy"))


def test_a_first_row_with_other_columns_and_comment_lines_among_labels_are_said(tmp_path, capsys):
    """Reference: the file's own rows. A first row of 3 fields over rows of 4 (a label with a space) is refused in
    one sentence; lines starting with '#' are comments, and a note counts them, so no row goes unseen."""
    (tmp_path / "first.txt").write_text("0.1 0.2 cat\n" + "".join(f"{i / 7} {i / 3} big dog\n" for i in range(30)))
    with pytest.raises(ValueError, match="first row has 3 fields and its other rows 4"):
        datasets.load_conditioned(str(tmp_path / "first.txt"), label_column="2")
    (tmp_path / "hash.csv").write_text(
        "k,x,y\n" + "".join(f"{'#A' if i % 3 == 0 else 'BC'[i % 2]},{i},{i % 7}\n" for i in range(60))
    )
    X, _, names, _ = datasets.load_conditioned(str(tmp_path / "hash.csv"), label_column="k")
    assert len(X) == 40 and names == ["B", "C"] and "skipped 20 line(s)" in capsys.readouterr().err
