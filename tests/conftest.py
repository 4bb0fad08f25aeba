import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(1)  # the suite runs on 2 shared cores; more threads only contend


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (the longest trainings, and torch.compile, which needs a C++ compiler)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: off by default; python -m pytest --slow runs them too")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--slow"):
        skip = pytest.mark.skip(reason="slow: run with --slow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


def refused(capsys, script, *args):
    """Run a script's main() in this process (no interpreter start-up) and return what it said on
    stderr, after checking that it refused: exit code 2, one line, no traceback."""
    import importlib
    import signal

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # train.py installs its own
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as e:
            importlib.import_module(script.removesuffix(".py")).main([str(a) for a in args])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    err = capsys.readouterr().err
    assert e.value.code == 2, (e.value.code, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def run_here(script, *args):
    """A script's main(args) in this process, as subprocess.run would report it (returncode, stdout,
    stderr), without an interpreter start-up per call. The scripts' own process behaviour (signals,
    locks, exit codes seen by a shell) is tested with real processes elsewhere."""
    import contextlib
    import gc
    import importlib
    import io
    import signal
    import traceback
    from types import SimpleNamespace

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out, err, code, cwd = io.StringIO(), io.StringIO(), 0, os.getcwd()
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            importlib.import_module(script.removesuffix(".py")).main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except Exception:
        code = 1
        err.write(traceback.format_exc())
    finally:
        gc.collect()  # a refused run's frames hold its folder lock (an open file); a process would have closed it on exit
        os.chdir(cwd)
        for s, h in handlers.items():
            signal.signal(s, h)
        torch.set_num_threads(1)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
