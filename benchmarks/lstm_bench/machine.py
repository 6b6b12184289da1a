"""The machine the numbers depend on (CPU, GPU, versions, commit, date), a test run's counts,
and the fused_lstm to measure."""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import os
import pathlib
import platform
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import torch


REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def machine_info(devices: set[str], fused_lstm) -> dict:
    """What the numbers depend on: hardware, threads, versions, commit, date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "device": gpu if "cuda" in devices else "cpu",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "fused_lstm": f"{fused_lstm.__version__} ({fused_lstm._loader.load_library()}: "
                      f"{fused_lstm._loader.library_path()})",
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def git_commit() -> str:
    """This checkout's commit, ``+modified`` when tracked files differ from it; ``unknown``
    outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True,
                              text=True, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        return commit + ("+modified" if git("status", "--porcelain", "--untracked-files=no")
                         else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def read_junit(path: str) -> dict[str, int]:
    """Test counts from a JUnit XML file (``pytest --junitxml=FILE``)."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    failed = counts["failures"] + counts["errors"]
    return {"passed": counts["tests"] - failed - counts["skipped"], "failed": failed,
            "skipped": counts["skipped"]}


def import_fused_lstm():
    """The installed fused_lstm, or else this checkout's (compiled on first import)."""
    if importlib.util.find_spec("fused_lstm") is None:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module("fused_lstm")
