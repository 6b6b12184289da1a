"""A pytest plugin for gpu_check.sh: ends the session cleanly at a deadline.

    GPU_CHECK_DEADLINE=<seconds since the epoch> GPU_CHECK_PYTEST_STATE=state.json \
        pytest -p pytest_deadline ...   (with this folder on PYTHONPATH)

A test step killed at its time limit would write no JUnit XML and lose every count; with this
plugin pytest stops starting tests once the deadline has passed (the test running then
finishes), reports as usual and writes its JUnit XML, and ``GPU_CHECK_PYTEST_STATE`` records how
many tests were collected, how many started, the last one started (the one that hung, if the
step was killed) and whether the deadline stopped the session.

With ``GPU_CHECK_ROUND_ROBIN=1`` the tests run round robin over the test functions (each
function's first parametrization, then each one's second, ...; the file order kept within a
round), so that a session stopped early has tried every function rather than only the first
few large grids. The tests seed themselves from their node ids: the order changes no input.
"""

from __future__ import annotations

import json
import os
import time

# last_started: the test running when the step was killed, if it was (a hung kernel, say).
_STATE = {"collected": 0, "started": 0, "stopped_at_deadline": False, "last_started": None}


def _deadline() -> float:
    return float(os.environ.get("GPU_CHECK_DEADLINE") or "inf")


def _write_state() -> None:
    path = os.environ.get("GPU_CHECK_PYTEST_STATE")
    if path:
        with open(path + ".partial", "w") as f:
            json.dump(_STATE, f)
        os.replace(path + ".partial", path)


def round_robin(items: list) -> list:
    """``items`` reordered by their rank within their test function (stable)."""
    seen: dict = {}
    ranks = []
    for item in items:
        function = (item.nodeid.split("::")[0], getattr(item, "originalname", item.name))
        ranks.append(seen.get(function, 0))
        seen[function] = ranks[-1] + 1
    return [item for _, item in sorted(zip(ranks, items), key=lambda pair: pair[0])]


def pytest_collection_modifyitems(session, config, items):
    if os.environ.get("GPU_CHECK_ROUND_ROBIN", "") not in ("", "0"):
        items[:] = round_robin(items)


def pytest_collection_finish(session):
    _STATE["collected"] = len(session.items)  # after every deselection (-k, -m)
    _write_state()


def pytest_runtest_protocol(item, nextitem):
    if time.time() >= _deadline():
        _STATE["stopped_at_deadline"] = True
        item.session.shouldstop = "gpu_check: the step's deadline has passed"
        _write_state()
        return True  # this test is not run; the session stops after it
    _STATE["started"] += 1
    _STATE["last_started"] = item.nodeid
    _write_state()
    return None


def pytest_sessionfinish(session, exitstatus):
    _write_state()
