"""The study's four 2-D datasets, ring8, a 3-D swiss roll, and loading a user's own points; exact densities. numpy,
scipy.

Each named dataset has n = 100,000 points by default, drawn with np.random.default_rng(42).
The named datasets lie inside [-5, 5]^D; a user's points may have any offset and scale (the
model standardizes them: tinydiff.Denoiser.set_data_stats).
"""

import csv
import decimal
import math
import os
import re
import sys
import unicodedata
import warnings

import numpy as np
from scipy.special import logsumexp

DINO_TSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "datasaurus_dino.tsv")


def moons(n, rng, labels=False):
    """Two interleaving half circles, 50/50 and shuffled, noise sd 0.03, then rescaled.
    labels=True: also each point's class, 0 = "upper" (the cos/sin half circle), 1 = "lower"."""
    n_out, n_in = n // 2, n - n // 2
    th_out, th_in = np.linspace(0, np.pi, n_out), np.linspace(0, np.pi, n_in)
    x = np.concatenate([np.cos(th_out), 1 - np.cos(th_in)])
    y = np.concatenate([np.sin(th_out), 1 - np.sin(th_in) - 0.5])
    order = rng.permutation(n)
    X = np.stack([x, y], 1)[order] + 0.03 * rng.normal(size=(n, 2))
    X = np.stack([(X[:, 0] + 0.3) * 2 - 1, (X[:, 1] + 0.3) * 3 - 1], 1)
    return (X, (order >= n_out).astype(np.int64)) if labels else X


def line(n, rng):
    """Uniform on the box [-2, 2] x [-4, 4]."""
    x = rng.uniform(-0.5, 0.5, n)
    y = rng.uniform(-1, 1, n)
    return np.stack([x, y], 1) * 4


def circle(n, rng):
    """16 tight blobs on the circle of radius 3 (plus about 4% at the origin)."""
    x = np.round(rng.uniform(-0.5, 0.5, n) / 2, 1) * 2
    y = np.round(rng.uniform(-0.5, 0.5, n) / 2, 1) * 2
    norm = np.sqrt(x**2 + y**2) + 1e-10
    x, y = x / norm, y / norm  # (0, 0) stays at the origin
    theta = 2 * np.pi * rng.uniform(0, 1, n)
    r = rng.uniform(0, 0.03, n)
    return np.stack([x + r * np.cos(theta), y + r * np.sin(theta)], 1) * 3


def dino(n, rng):
    """The 142 Datasaurus points, resampled with 0.15 jitter (in the original units), then rescaled."""
    pts = np.loadtxt(DINO_TSV, skiprows=1)
    ix = rng.integers(0, len(pts), n)
    x = pts[ix, 0] + 0.15 * rng.normal(size=n)
    y = pts[ix, 1] + 0.15 * rng.normal(size=n)
    return np.stack([(x / 54 - 1) * 4, (y / 48 - 1) * 4], 1)


def swissroll3d(n, rng):
    """A 3-D swiss roll (sklearn's make_swiss_roll): angle t = 1.5 pi (1 + 2u), u ~ U(0, 1), the point
    (t cos t, h, t sin t) with height h ~ U(0, 21), then centred in h, divided by 3.6 (inside [-4, 4]^3)
    and jittered with noise sd 0.05."""
    t = 1.5 * np.pi * (1 + 2 * rng.uniform(0, 1, n))
    h = rng.uniform(0, 21, n)
    X = np.stack([t * np.cos(t), h - 10.5, t * np.sin(t)], 1) / 3.6
    return X + 0.05 * rng.normal(size=(n, 3))


def ring8(n, rng, labels=False):
    """8 Gaussian classes (sd 0.25) centred on the circle of radius 3 at 0, 45, ..., 315 degrees, in equal
    shares and shuffled. labels=True: also each point's class, 0..7 counterclockwise from "E" (CLASSES)."""
    k = rng.permutation(np.arange(n) % 8)
    X = RING8_CENTRES[k] + RING8_SD * rng.normal(size=(n, 2))
    return (X, k) if labels else X


RING8_SD = 0.25
RING8_CENTRES = 3 * np.stack([np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], 1)  # (8, 2)
DATASETS = {"circle": circle, "dino": dino, "line": line, "moons": moons, "ring8": ring8, "swissroll3d": swissroll3d}
MAX_FILE_BYTES = 10**9  # larger files are refused before they are read: subsample them first


class DataError(ValueError):
    """A data file that cannot be used, told in one sentence that names it."""


def available_memory():
    """Bytes of memory available now (Linux: MemAvailable; elsewhere the free pages), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_file_memory(path, n_bytes):
    """Refuse to read a file whose points would need more memory than is available."""
    free = available_memory()
    if free is not None and n_bytes > free:
        raise DataError(
            f"{path} would need about {n_bytes / 2**30:.1f} GiB of memory to read, more than the {free / 2**30:.1f} "
            "GiB available; subsample it first"
        )


def read_npy(path, size):
    """np.load, after checking the header against the file, so that a forged or truncated header, or
    a dtype that is not real numbers, is refused in one sentence before anything large is allocated."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}[version]
            shape, _, dtype = read_header(f)
            header_bytes = f.tell()
    except (ValueError, TypeError, KeyError, SyntaxError, EOFError, OSError) as e:
        reason = str(e).strip().splitlines()[0][:80] if str(e).strip() else type(e).__name__
        raise DataError(f"{path} is not a readable .npy file ({reason}); save your points with numpy.save") from None
    if dtype.kind == "c":
        raise DataError(
            f"{path} holds complex numbers ({dtype}); give real coordinates, e.g. the real and imaginary parts as two "
            "columns"
        )
    if dtype.kind not in "iuf":
        raise DataError(f"{path} holds {dtype} values; it must hold real numbers (integers or floats)")
    n_items = math.prod(shape)
    if header_bytes + n_items * dtype.itemsize != size:
        raise DataError(
            f"{path} has a header for an array of shape {shape} ({dtype}) that does not match the file's {size} bytes;"
            " the file is truncated or corrupt, so save it again with numpy.save"
        )
    check_file_memory(path, 2 * n_items * 8)  # the array, then its float64 copy
    X = np.load(path, allow_pickle=False)
    if dtype.kind in "iu" and X.size and np.abs(X.astype(np.float64)).max() > 2**53:
        largest = np.abs(X.astype(np.float64)).max()
        raise DataError(
            f"{path} holds integers beyond 2^53 (up to {largest:.3g}), which float64 rounds; subtract an offset or "
            "rescale them first"
        )
    return X


ROW_LABEL_FIELDS = (
    "",
    "Unnamed: 0",
)  # the header field above a first column of row labels: pandas, R (""), pandas read back


def head_lines(path):
    """The complete lines in the first MiB of a text file (enough to find its header), without a BOM."""
    with open(path, encoding="utf-8-sig") as f:
        head = f.read(1 << 20)
    # split at newlines only, as a file is read line by line (str.splitlines would also split at \f, \v, \x1c ...)
    return head.split("\n")[: -1 if len(head) == 1 << 20 else None]  # the last line may be cut


def delimiter(row):
    """The column separator of one row, decided outside quoted fields: ';' first (with it, a ',' is a
    decimal comma), then ','; None for tabs or spaces."""
    bare = "".join(row.split('"')[::2])
    return ";" if ";" in bare else "," if "," in bare else None


def first_row(lines):
    """(index, text, delimiter, header fields or None) of the first line that is not blank or a comment.
    The delimiter is the data's: with a header, the next row's (a header may hold ';' or ',' in a name)."""
    rows = [i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")]
    if not rows:
        return None, "", None, None
    first, row = rows[0], lines[rows[0]].split("#")[0]
    split = lambda sep, **kw: [field.strip() for field in next(csv.reader([row.strip()], delimiter=sep, **kw))]
    try:
        delim = delimiter(row)
        [float(field.strip('"')) for field in (split(delim) if delim else row.split())]
        return first, row, delim, None
    except ValueError:  # a header row, unless it is numeric wherever the next row is (a row with a label column)
        following = lines[rows[1]].split("#")[0] if len(rows) > 1 else None
        delim = delimiter(following) if following is not None else delimiter(row)
        fields = split(delim) if delim else split("\t") if "\t" in row else split(" ", skipinitialspace=True)
        if following is not None:
            cells = lambda text: [f.strip().strip('"') for f in (text.split(delim) if delim else text.split())]
            mine, theirs = cells(row), cells(following)
            numeric = [j for j, v in enumerate(theirs) if is_number(v)]
            if len(mine) == len(theirs) and numeric and all(is_number(mine[j]) for j in numeric):
                return first, row, delim, None
        return first, row, delim, fields


def column_names(name, D):
    """The names a text file's header gives its D coordinates (for plot axes), or None: no header, a named
    dataset, an .npy, or a header that does not match D columns by read_text's rule for row labels."""
    if name in DATASETS or name.lower().endswith(".npy") or not os.path.isfile(name):
        return None
    try:
        header = first_row(head_lines(name))[3]
    except (OSError, UnicodeDecodeError):
        return None
    if header and len(header) == D + 1 and header[0] in ROW_LABEL_FIELDS:  # the dropped row labels' field
        header = header[1:]
    if not header or len(header) != D:
        return None
    return [field or f"x{i + 1}" for i, field in enumerate(header)]


def read_text(path, size):
    """Text as people write it: an optional UTF-8 BOM, '#' comments, and one header row (skipped, with
    a note); columns separated by commas, semicolons, tabs or spaces. A first column of row labels
    (distinct integers) under an unnamed header field, as pandas' to_csv and R's write.csv write
    them, is dropped with the note; a first column that counts 0, 1, 2, ... otherwise gets a warning."""
    lines = head_lines(path)  # enough to find the header and estimate the parsed size
    first, row, delim, header = first_row(lines)
    if first is None:
        return np.zeros((0, 0))
    body = lines[first + 1 if header else 0 :]
    values = sum(len(line.split("#")[0].split(delim)) for line in body if line.split("#")[0].strip())
    if values:  # float64 points, and as much again while numpy parses them
        check_file_memory(path, 2 * 8 * values * size / max(1, sum(len(line.encode()) for line in body)))
    with warnings.catch_warnings():  # an empty file is reported by the caller, in one sentence
        warnings.simplefilter("ignore", UserWarning)
        try:
            X = np.loadtxt(
                path,
                delimiter=delim,
                comments="#",
                skiprows=first + 1 if header else 0,
                quotechar='"',
                ndmin=2,
                encoding="utf-8-sig",
            )
        except ValueError as e:
            if "number of columns changed" in str(e):
                raise DataError(ragged(path, e, delim)) from None
            if delim == ";" and re.search(
                r"string '[^']*\d,\d", str(e)
            ):  # the value numpy could not read has a decimal comma
                raise DataError(
                    f"{path} separates columns with ';' and writes decimal commas (1,5); write the numbers with '.' "
                    "as the"
                    " decimal point (a spreadsheet: export CSV with '.' as the decimal separator)"
                ) from None
            raise
    col = X[:, 0] if len(X) and X.shape[1] > 1 else None
    if header:
        # an unnamed first field, or one field fewer than the columns (a tab- or space-separated pandas file)
        labels = col is not None and (header[0] in ROW_LABEL_FIELDS or len(header) == X.shape[1] - 1)
        labels = labels and np.array_equal(col, np.round(col)) and len(np.unique(col)) == len(col)
        print(
            f"note: skipped the header row of {path}: {row.strip()[:80]}"
            + (
                "; and dropped its first column, unnamed row labels (pandas: save with to_csv(index=False))"
                if labels
                else ""
            ),
            file=sys.stderr,
        )
        if labels:
            return X[:, 1:]
    if col is not None and len(X) > 2 and np.array_equal(col, np.arange(len(X))):
        print(
            f"warning: the first column of {path} counts 0, 1, 2, ... like a row index, and is used as a coordinate;"
            " if it is an index, save the file without it",
            file=sys.stderr,
        )
    return X


def check_file(path):
    """A data file's size, after refusing a folder, a pipe, a missing file or one larger than MAX_FILE_BYTES."""
    if os.path.isdir(path):
        raise ValueError(
            f"{path} is a folder, not a data file; give the path of an (N, D) .csv, .tsv, .txt or .npy file"
        )
    if os.path.exists(path) and not os.path.isfile(path):
        raise ValueError(
            f"{path} is not a regular file (a pipe or a device?); save the points to a .csv, .tsv, .txt or .npy file "
            "first"
        )
    if not os.path.isfile(path):
        raise ValueError(
            f"no data file at {path}; give a dataset name ({', '.join(DATASETS)}) or a path to an (N, D) .csv, .tsv, "
            ".txt or .npy file"
        )
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise ValueError(
            f"{path} is {size / 1e9:.1f} GB, larger than the {MAX_FILE_BYTES / 1e9:.0f} GB tinydiff reads; subsample "
            "it first"
        )
    return size


def load_points(path):
    """A user's points (N, D), D >= 1 columns, as float64: .npy, or text (.csv, .tsv, .txt; any case).
    Refused in one sentence: a missing or larger than 1 GB file, one that would not fit in memory,
    text that is not a table of numbers, complex, non-numeric or non-finite values."""
    size = check_file(path)
    try:
        X = read_npy(path, size) if path.lower().endswith(".npy") else read_text(path, size)
    except DataError:
        raise
    except ValueError as e:  # numpy's reason, up to its first '; '
        reason = (str(e).strip() or type(e).__name__).splitlines()[0].split("; ")[0][:100]
        raise ValueError(
            f"{path} is not a table of numbers ({reason}); give numeric columns, one point per row"
        ) from None
    except (OSError, EOFError) as e:
        raise ValueError(
            f"{path} could not be read as points ({e}); give an (N, D) .npy or a text file with numeric columns"
        ) from None
    if X.ndim == 2 and X.shape[0] == 0:
        raise ValueError(
            f"{path} holds no points (no rows of numbers); give one point per row, its coordinates as columns"
        )
    if X.ndim != 2 or X.shape[1] == 0:
        raise ValueError(
            f"{path} holds an array of shape {X.shape}; it must be (N, D) with N >= 1 rows (points) and D >= 1 columns"
            " (coordinates); save 1-D points as one column, x.reshape(-1, 1)"
        )
    if np.iscomplexobj(X) or not np.issubdtype(X.dtype, np.number):
        raise ValueError(f"{path} holds {X.dtype} values; it must hold real numbers")
    bad = np.flatnonzero(~np.isfinite(X).all(1))
    if len(bad):
        raise ValueError(
            f"{path} has NaN or infinite values in {len(bad)} of its {len(X)} points (the first is point "
            f"{bad[0] + 1}); remove those rows"
        )
    return X.astype(np.float64)


MISSING = ("", "na", "n/a", "nan", "null", "none")  # label fields that mark a missing value (any case): refused


def number_text(v):
    """A number as a label's text, exactly: integral values as integers at any size (2.0 and 2 are "2", 3e19 is
    "30000000000000000000"), others by repr (the shortest text that reads back as the same float64)."""
    v = float(v)
    return str(int(v)) if v.is_integer() else repr(v)


def label_text(field):
    """The one normalisation of a label field: Unicode NFC and no surrounding whitespace; a number is read exactly
    (decimal, not through float64) and written as number_text writes it, so "1", "1.0" and 1.0 in an .npy are one
    class while 12345678901234567890 and 12345678901234567891 stay two."""
    text = unicodedata.normalize("NFC", str(field)).strip()
    try:
        value = decimal.Decimal(text)
    except decimal.InvalidOperation:
        return text
    if not value.is_finite():
        return text
    return str(int(value)) if value == value.to_integral_value() else number_text(text)


def read_table(path):
    """A text file's header (or None), its fields as strings (N, M), and None; an .npy: None, its numbers as label
    texts, and the numbers themselves (so that coordinates never pass through text). In a text file '#' starts a
    comment only at the start of a line: inside a field (a label "C#") it is data."""
    if path.lower().endswith(".npy"):
        X = load_points(path)
        return None, np.vectorize(number_text, otypes=[str])(X) if X.size else X.astype(str), X
    first, _, delim, header = first_row(head_lines(path))
    if first is None:
        raise ValueError(f"{path} holds no rows; give one point per row")
    with open(path, encoding="utf-8-sig") as f:  # the same lines as head_lines: split at newlines only
        lines = f.read().split("\n")[first + 1 if header else first :]
    rows = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    comments = sum(1 for line in lines if line.lstrip().startswith("#"))
    if comments:  # a label that starts with '#' would be one of these: say so rather than drop rows unseen
        print(f"note: skipped {comments} line(s) of {path} that start with '#', as comments", file=sys.stderr)
    try:
        fields = np.loadtxt(rows, dtype=str, delimiter=delim, comments=None, quotechar='"', ndmin=2)
    except ValueError as e:
        raise DataError(ragged(path, e, delim)) from None
    first = fields[:, 0] if fields.size else []
    index = len(set(first)) == len(first) and all(is_number(v) and float(v).is_integer() for v in first)
    if header and len(header) == fields.shape[1] - 1 and index:  # pandas' unnamed column of row labels
        header = ["", *header]
    if header and len(header) != fields.shape[1]:
        raise DataError(
            f"{path}'s first row has {len(header)} fields and its other rows {fields.shape[1]}; give every row the "
            "same columns (a space inside a name splits it in two: separate the columns with commas or tabs)"
        )
    return header, np.char.strip(fields), None


def ragged(path, error, delim):
    """numpy's "the number of columns changed" as one sentence that names the file and what to do."""
    found = re.search(r"changed from (\d+) to (\d+) at row (\d+)", str(error))
    if not found:
        return f"{path} could not be read as a table ({' '.join(str(error).split())[:120]}); give one point per row"
    was, now, row = found.groups()
    spaces = " (a space inside a name splits it in two: separate the columns with commas or tabs, or quote the name)"
    return (
        f"{path} has {now} columns in data row {row} and {was} before it{spaces if delim is None else ''}; give "
        "every row the same columns"
    )


def column_index(spec, header, n_cols, path, flag):
    """The 0-based column that NAME (a header field) or an index names."""
    if header and spec in header:
        return header.index(spec)
    if spec.isdigit() and int(spec) < n_cols:
        return int(spec)
    named = f"; its columns are {', '.join(header)}" if header else f" (no header: give a 0-based index below {n_cols})"
    raise ValueError(f"{flag} {spec!r} names no column of {path}{named}")


def load_conditioned(path, label_column=None, cond_columns=None):
    """(X (N, D) float64 points, y, names, the coordinates' names or None) from a file whose label column (category
    names or integers) or condition columns (numbers) are not coordinates. y: (N,) int labels indexing names, the sorted
    class names; or (N, C) float64 conditions, names the columns'. Refused in one sentence: a missing column, empty or
    NaN labels
    (naming the first bad row), one class, more classes than a tenth of the points, a non-numeric condition."""
    check_file(path)
    header, fields, numbers = read_table(path)
    flag = "--label_column" if label_column is not None else "--cond_columns"
    specs = [label_column] if label_column is not None else [c.strip() for c in cond_columns.split(",")]
    cols = [column_index(spec, header, fields.shape[1], path, flag) for spec in specs]
    if len(set(cols)) != len(cols):
        raise ValueError(f"{flag} {','.join(specs)} names a column of {path} twice; name each column once")
    if len(cols) >= fields.shape[1]:
        raise ValueError(
            f"{flag} {','.join(specs)} leaves no coordinates in {path} (it has {fields.shape[1]} columns); name fewer "
            "columns"
        )
    keep = [
        j for j in range(fields.shape[1]) if j not in cols and not (j == 0 and header and header[0] in ROW_LABEL_FIELDS)
    ]
    try:
        X = numbers[:, keep] if numbers is not None else fields[:, keep].astype(np.float64)
    except ValueError:  # name the column and the value
        j = next(j for j in keep if not all(is_number(v) for v in fields[:, j]))
        bad = next(v for v in fields[:, j] if not is_number(v))
        raise ValueError(
            f"column {header[j] if header else j} of {path} is not numeric (it holds {str(bad)!r}); name it with {flag}"
            " if it is the condition, or remove it"
        ) from None
    columns = (
        [header[j] for j in keep] if header and len(header) == fields.shape[1] else None
    )  # the coordinates' names, for plots
    if not np.isfinite(X).all():
        raise ValueError(
            f"{path} has NaN or infinite coordinates (the first in data row "
            f"{np.flatnonzero(~np.isfinite(X).all(1))[0] + 1}); remove those rows"
        )
    names = [header[j] if header else str(j) for j in cols]
    if label_column is None:
        try:
            y = numbers[:, cols] if numbers is not None else fields[:, cols].astype(np.float64)
        except ValueError:
            bad = next(j for j in cols if not all(is_number(v) for v in fields[:, j]))
            raise ValueError(
                f"condition column {names[cols.index(bad)]!r} of {path} is not numeric; give numbers, or use it as "
                "--label_column"
            ) from None
        if not np.isfinite(y).all():
            raise ValueError(
                f"{path} has an empty or NaN condition in data row {np.flatnonzero(~np.isfinite(y).all(1))[0] + 1}; "
                "fill or remove those rows"
            )
        return X, y, names, columns
    labels = np.array([label_text(v) for v in fields[:, cols[0]].tolist()], dtype=object)
    bad = [i for i, v in enumerate(labels) if v.lower() in MISSING]
    if bad:
        raise ValueError(
            f"{path} has a missing label ({str(fields[bad[0], cols[0]])!r}) in column {names[0]!r}, data row "
            f"{bad[0] + 1}; give every point a label, or remove those rows"
        )
    classes = sorted(set(labels.tolist()), key=lambda v: (0, float(v), v) if is_number(v) else (1, 0, v))
    if len(classes) < 2 or len(classes) > max(2, len(labels) // 10):
        raise ValueError(
            f"label column {names[0]!r} of {path} has {len(classes)} class{'es' * (len(classes) != 1)} in "
            f"{len(labels)} points; "
            "a label needs 2 to a tenth as many classes as points (numbers that vary continuously: use --cond_columns)"
        )
    index = {c: i for i, c in enumerate(classes)}
    return X, np.array([index[v] for v in labels.tolist()]), classes, columns


def is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def load_dataset(name, n=100_000, seed=42):
    """(n, D) float64 points: a named dataset drawn with default_rng(seed), or a user's file as it is."""
    if name in DATASETS:
        return DATASETS[name](n, np.random.default_rng(seed))
    if os.path.splitext(name)[1].lower() in (".csv", ".txt", ".tsv", ".npy") or os.path.sep in name:
        return load_points(name)
    raise ValueError(
        f"unknown dataset {name!r}; use one of {', '.join(DATASETS)} or a path to a .csv, .tsv, .txt or .npy file"
    )


# -----------------------------------------------------------------------------
# Labels and exact densities of the named 2-D datasets (scipy for logsumexp and Gauss-Legendre nodes)

CLASSES = {"moons": ("upper", "lower"), "ring8": ("E", "NE", "N", "NW", "W", "SW", "S", "SE")}
DENSITIES = ("circle", "dino", "line", "moons", "ring8")  # the named datasets whose density log_density writes down
MOONS_SD = (0.03 * 2, 0.03 * 3)  # the noise sd 0.03 after the rescaling x -> 2x - 0.4, y -> 3y - 0.1
MOONS_PANELS, MOONS_NODES = 100, 16  # composite Gauss-Legendre over the angle: 1600 nodes per half circle
CIRCLE_BLOB = 0.09  # a blob's radius, 3 x 0.03


def load_labeled(name, n=100_000, seed=42):
    """(X (n, 2), labels (n,) int, class names) of a named dataset with classes (CLASSES), drawn as load_dataset draws
    it."""
    if name not in CLASSES:
        raise ValueError(f"{name!r} has no classes; labeled datasets are {', '.join(CLASSES)}")
    X, labels = DATASETS[name](n, np.random.default_rng(seed), labels=True)
    return X, labels, CLASSES[name]


def moons_curves(theta):
    """The two half circles' centre lines at angles theta (K,), in the rescaled units: (2, K, 2), upper then lower."""
    upper = np.stack([np.cos(theta), np.sin(theta)], -1)
    lower = np.stack([1 - np.cos(theta), 1 - np.sin(theta) - 0.5], -1)
    return (np.stack([upper, lower]) + 0.3) * np.array([2, 3]) - 1


def circle_blobs():
    """(centres (17, 2), probabilities (17,)) of circle's blobs. Each coordinate is round(U(-0.25, 0.25), 1),
    doubled: -0.2, -0.1, 0, 0.1, 0.2 (before doubling) with probability 1/5 each, so the 25 grid points have 1/25 each.
    Normalizing merges those in one direction: (1, 0) and (2, 0) on the 4 axes and (1, 1) and (2, 2) on the
    4 diagonals give 2/25 each, the 8 others (1, 2) ... 1/25 each, and (0, 0) stays at the origin (1/25).
    (The sampler's norm + 1e-10 moves the centres by under 1e-9, which is ignored.)"""
    grid = [(a, b) for a in range(-2, 3) for b in range(-2, 3)]
    centres, probs = {}, {}
    for a, b in grid:
        g = math.gcd(a, b) or 1
        key = (a // g, b // g)
        centres[key] = 3 * np.array([a, b]) / (math.hypot(a, b) or 1)
        probs[key] = probs.get(key, 0) + 1 / 25
    return np.array(list(centres.values())), np.array(list(probs.values()))


def gaussian_mixture_log_density(x, centres, sd, weights):
    """log sum_k weights_k N(x; centres_k, diag(sd^2)) (N,) at x (N, 2). The exponent is affine in each point's
    coordinates, so one matrix product gives all N x K of them; exp(. - row max) keeps the sum in range."""
    a = np.concatenate([x / sd**2, np.ones((len(x), 1))], 1)  # (N, 3)
    b = np.concatenate([centres.T, -0.5 * ((centres / sd) ** 2).sum(1)[None]], 0)  # (3, K)
    out = np.empty(len(x))
    for i in range(0, len(x), 4096):  # (rows, K) at a time
        e = a[i : i + 4096] @ b
        m = e.max(1)
        with np.errstate(divide="ignore"):
            out[i : i + 4096] = m + np.log(np.exp(e - m[:, None]) @ weights)
    return out - 0.5 * ((x / sd) ** 2).sum(1) - np.log(2 * np.pi * sd.prod())


def class_log_densities(name, x):
    """(log p(x | k) (N, K), log weights (K,)) of a named 2-D dataset: its classes (CLASSES), or K = 1."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"log_density takes 2-D points (N, 2), got shape {x.shape}")
    if name == "ring8":
        sd = np.full(2, RING8_SD)
        return np.stack([gaussian_mixture_log_density(x, c[None], sd, np.ones(1)) for c in RING8_CENTRES], 1), np.full(
            8, -np.log(8)
        )
    if name == "dino":  # the 142 points, each with weight 1/142, jittered by 0.15 in the original units
        pts = np.loadtxt(DINO_TSV, skiprows=1)
        centres, sd = (
            np.stack([(pts[:, 0] / 54 - 1) * 4, (pts[:, 1] / 48 - 1) * 4], 1),
            np.array([0.15 * 4 / 54, 0.15 * 4 / 48]),
        )
        return gaussian_mixture_log_density(x, centres, sd, np.full(len(pts), 1 / len(pts)))[:, None], np.zeros(1)
    if name == "line":
        inside = (np.abs(x[:, 0]) <= 2) & (np.abs(x[:, 1]) <= 4)
        return np.where(inside, -np.log(32), -np.inf)[:, None], np.zeros(1)
    if name == "circle":
        centres, probs = circle_blobs()
        rho = np.sqrt(((x[:, None, :] - centres) ** 2).sum(-1))  # (N, 17)
        # radius 3r, r ~ U(0, 0.03): density 1 / (0.09 * 2 pi rho) at distance rho < 0.09 from a blob's centre
        with np.errstate(divide="ignore", over="ignore"):
            p = np.where(rho < CIRCLE_BLOB, 1 / (CIRCLE_BLOB * 2 * np.pi * np.maximum(rho, 1e-300)), 0) @ probs
            return np.log(p)[:, None], np.zeros(1)
    if name == "moons":
        # each half circle: the angle uniform on [0, pi] (linspace, for large n), then Gaussian noise;
        # p(x | k) = (1/pi) int_0^pi N(x; c_k(theta), diag(MOONS_SD^2)) dtheta by composite Gauss-Legendre,
        # within 1e-10 of scipy.integrate.quad in log p (tests/test_densities.py checks it)
        u, w = np.polynomial.legendre.leggauss(MOONS_NODES)
        edges = np.linspace(0, np.pi, MOONS_PANELS + 1)
        half = np.diff(edges)[:, None] / 2
        theta, weights = (edges[:-1, None] + half * (u + 1)).ravel(), (half * w).ravel() / np.pi
        sd = np.array(MOONS_SD)
        return np.stack([gaussian_mixture_log_density(x, c, sd, weights) for c in moons_curves(theta)], 1), np.full(
            2, -np.log(2)
        )
    have = ", ".join(n for n in DATASETS if n != "swissroll3d")
    raise ValueError(f"no exact density for dataset {name!r}; densities exist for {have}")


def log_density(name, x, label=None):
    """log p(x) (N,) in nats of a named 2-D dataset at points x (N, 2), float64; -inf off its support.
    label (an int, or (N,) ints, for a dataset in CLASSES): the class's density log p(x | label) instead."""
    lp, log_w = class_log_densities(name, x)
    if label is None:
        return logsumexp(lp + log_w, axis=1)
    if name not in CLASSES:
        raise ValueError(
            f"{name!r} has no classes, so no conditional density; labeled datasets are {', '.join(CLASSES)}"
        )
    label = np.broadcast_to(np.asarray(label), (len(lp),))
    if not np.isin(label, np.arange(len(CLASSES[name]))).all():
        raise ValueError(f"labels of {name} are 0..{len(CLASSES[name]) - 1} ({', '.join(CLASSES[name])})")
    return lp[np.arange(len(lp)), label]


def entropy_bits(name, n=200_000, seed=7):
    """(H, se): the entropy of a named 2-D dataset in bits, with its standard error. Exact for line
    (log2 32 = 5) and circle (below); else Monte Carlo, -mean(log2 p(x)) over n fresh points drawn with seed."""
    if name == "line":
        return 5.0, 0.0
    if name == "circle":
        # the blob choice's entropy plus one blob's differential entropy: rho ~ U(0, a), a = 0.09, with
        # density 1 / (a 2 pi rho), so h = E[log(2 pi a rho)] = log(2 pi a) + log a - 1 nats
        probs = circle_blobs()[1]
        h = -(probs * np.log(probs)).sum() + np.log(2 * np.pi * CIRCLE_BLOB**2) - 1
        return h / np.log(2), 0.0
    class_log_densities(name, np.zeros((0, 2)))  # refuses a dataset without a density
    bits = -log_density(name, DATASETS[name](n, np.random.default_rng(seed))) / np.log(2)
    return bits.mean(), bits.std() / math.sqrt(n)
