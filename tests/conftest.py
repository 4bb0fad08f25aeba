import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(1)  # the suite runs on 2 shared cores; more threads only contend


def pytest_addoption(parser):
    parser.addoption(
        "--slow",
        action="store_true",
        help="also run the tests marked slow (the longest trainings, and torch.compile, which needs a C++ compiler)",
    )


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """-n auto: a worker per core, at most 4. Each worker runs torch on one thread; beyond 4 the longest
    test file, not the number of workers, sets the time."""
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )  # the cores this process may use
    return max(1, min(4, cores))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: off by default; python -m pytest --slow runs them too")
    config.addinivalue_line(
        "markers",
        "unit: the library's tier, each piece of tinydiff.py against a reference; python -m pytest -q -m unit",
    )


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--slow"):
        skip = pytest.mark.skip(reason="slow: run with --slow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


def refused(script, *args):
    """What a script said on stderr when it refused its command line: exit code 2, one line, no traceback."""
    p = run_here(script, *args)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    return p.stderr


def run_here(script, *args):
    """A script's main(args) in this process, as subprocess.run would report it (returncode, stdout,
    stderr), without an interpreter start-up per call. argv, the working directory, signal handlers,
    torch's threads and RNG are restored afterwards. The scripts' process behaviour (signals, locks,
    the exit code a shell sees) is tested with real processes elsewhere."""
    import contextlib
    import gc
    import importlib
    import io
    import signal
    import traceback
    from types import SimpleNamespace

    saved = dict(
        argv=sys.argv,
        cwd=os.getcwd(),
        threads=torch.get_num_threads(),
        handlers={s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)},
    )
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        os.chdir(ROOT)
        sys.argv = [script, *map(str, args)]  # argparse names the script in its messages
        with torch.random.fork_rng(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            importlib.import_module(script.removesuffix(".py")).main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            err.write(f"{e.code}\n")
    except Exception:
        code = 1
        err.write(traceback.format_exc())
    finally:
        # a refused run's frames hold its folder lock (an open file); a process would have closed it on exit
        gc.collect()
        os.chdir(saved["cwd"])
        sys.argv = saved["argv"]
        torch.set_num_threads(saved["threads"])
        for s, h in saved["handlers"].items():
            signal.signal(s, h)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def run(script, *args, check=True):
    """run_here, and a failed test with the script's output when it did not exit 0 (unless check=False)."""
    p = run_here(script, *args)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


# a short moons run's flags: the trained fixture's, and test_scripts' run on the same points moved and scaled
TRAINED = ["--train_steps", 600, "--batch_size", 256, "--lr", "1e-3", "--n", 2000, "--log_interval", 500]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short moons run, shared by a file's tests (test_scripts, test_sample, test_runs)."""
    out = tmp_path_factory.mktemp("run") / "moons"
    p = run("train.py", "--dataset", "moons", *TRAINED, "--out_dir", out)
    return out, p.stdout
