import faulthandler
import os
import sys

import pytest

# helpers.py sits beside this file; make it importable however pytest is run.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# A test that runs longer than this is taken to hang (e.g. a kernel that never
# leaves its loop): the stacks are dumped and the run ends instead of blocking.
# A test that waits on work with a time limit of its own (a subprocess)
# declares a longer one, @pytest.mark.watchdog(seconds): the interpreter
# subset's process took 290-300 s of the 300 on this 2-core machine, and a
# `make test` on a fresh clone of de31d7e ended there, exit 1, the dump lost
# to pytest's capture.
WATCHDOG_S = float(os.environ.get("OTSEG_TEST_WATCHDOG_S", "300"))


@pytest.fixture(autouse=True)
def _watchdog(request):
    marker = request.node.get_closest_marker("watchdog")
    limit = max(WATCHDOG_S, float(marker.args[0])) if marker else WATCHDOG_S
    faulthandler.dump_traceback_later(limit, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def _fresh_backend_choices():
    """otseg.ops.mps remembers, per call signature, the backend a call resolved
    to; a test that monkeypatches what is available (or how a backend is
    chosen) must neither see earlier tests' choices nor leave its own."""
    import importlib

    dispatch = importlib.import_module("otseg.ops.mps")
    dispatch.forget_resolutions()
    yield
    dispatch.forget_resolutions()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``interpreter`` run only in a process started with
    TRITON_INTERPRET=1 (test_triton_interpreter.py starts one and checks it);
    elsewhere they are deselected, not reported as skipped."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("interpreter") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_runtest_logreport(report):
    """With OTSEG_TEST_LOG set (bench/gpu_check.sh sets it), append each test's
    outcome and time, and the traceback of a failure, to that file as soon as
    the test ends: a run cut short by a time limit (or a crashed worker) still
    says which tests failed and why. Written by the main process only."""
    path = os.environ.get("OTSEG_TEST_LOG")
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if report.when != "call" and not (report.failed or report.skipped):
        return
    with open(path, "a") as f:
        f.write(f"{report.outcome.upper():8s} {report.duration:7.2f} s  {report.nodeid} ({report.when})\n")
        if report.failed:
            f.write(report.longreprtext.rstrip() + "\n\n")
