"""benchmarks/compare.py runs end to end and writes well-formed results.

One run of the script (a subprocess, as a user runs it) on the two smallest workloads with
almost no timing; the tests read what it wrote. No assertion is made about the times: a
benchmark's numbers belong in its results, not in CI's verdict.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compare.py"
WORKLOADS = ("seed-tiny", "small")
IMPLS = ("nn.LSTM", "FusedLSTM")
JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="2" skipped="3" tests="20" time="1.0">
</testsuite></testsuites>
"""


def load_compare(monkeypatch):
    """benchmarks/compare.py as a module (it is a script, not part of the package), registered
    in sys.modules for the duration of the test (its dataclasses need that)."""
    spec = importlib.util.spec_from_file_location("benchmarks_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The script's output directory and completed process."""
    tmp = tmp_path_factory.mktemp("compare")
    junit = tmp / "junit.xml"
    junit.write_text(JUNIT)
    out = tmp / "results"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--min-run-time", "0.01",
         "--workloads", *WORKLOADS, "--tests-junit", str(junit), "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


def test_json_schema(run):
    out, _ = run
    report = json.loads((out / "results.json").read_text())
    assert set(report) == {"machine", "rows", "tests"}
    machine = report["machine"]
    for key in ("device", "cpu", "torch", "commit", "date"):
        assert isinstance(machine[key], str) and machine[key], key
    assert machine["device"] == "cpu"
    assert "cuda" in machine and (machine["cuda"] is None or isinstance(machine["cuda"], str))
    assert report["tests"] == {"passed": 14, "failed": 3, "skipped": 3}

    rows = report["rows"]
    cells = {(r["workload"], r["mode"], r["impl"]) for r in rows}
    assert cells == {(w, m, i) for w in WORKLOADS for m in ("train", "infer") for i in IMPLS}
    for row in rows:
        assert row["status"] == "ok", row
        assert row["dtype"] == "float32"
        assert row["device"] == "cpu"
        for key in ("median_ms", "iqr_ms", "peak_mem_mb", "speedup"):
            assert isinstance(row[key], float), (key, row)
        assert row["median_ms"] > 0 and row["iqr_ms"] >= 0 and row["peak_mem_mb"] >= 0
        assert row["speedup"] > 0
        if row["impl"] == "nn.LSTM":
            assert row["speedup"] == 1.0


def test_markdown_has_the_table(run):
    out, _ = run
    lines = (out / "results.md").read_text().splitlines()
    header = lines.index("| workload | mode | impl | median | IQR | peak mem | speedup | status |")
    assert lines[header + 1].startswith("|---")
    body = lines[header + 2:header + 2 + 2 * 2 * len(IMPLS)]
    assert all(line.startswith("| ") and line.endswith(" | ok |") for line in body), body
    assert {line.split(" | ")[0].lstrip("| ") for line in body} == set(WORKLOADS)


def test_plot_is_a_png(run):
    out, proc = run
    if importlib.util.find_spec("matplotlib") is None:
        assert not (out / "speedup.png").exists()
        assert "matplotlib is not installed" in proc.stdout
    else:
        assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_terminal_output(run):
    _, proc = run
    assert "torch: " in proc.stdout and "commit: " in proc.stdout
    assert "workload   mode   impl" in proc.stdout  # the aligned table's header
    assert "[6/6" in proc.stderr  # progress: check, train, infer for each workload


def test_plot_skipped_without_matplotlib(monkeypatch, tmp_path):
    compare = load_compare(monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    row = compare.Row("cpu", "small", "train", "float32", "FusedLSTM", "ok", 1.0, 0.1, 0.5, 2.0)
    note = compare.write_plot([row], tmp_path / "speedup.png")
    assert note.startswith("matplotlib is not installed")
    assert not (tmp_path / "speedup.png").exists()


class _Shifted(nn.Module):
    """nn.LSTM with every output moved by ``shift``: a wrong implementation."""

    def __init__(self, lstm, shift):
        super().__init__()
        self.lstm, self.shift = copy.deepcopy(lstm), shift

    def forward(self, x, hx):
        output, (h_n, c_n) = self.lstm(x, hx)
        return output + self.shift, (h_n, c_n)


def test_check_tells_ok_mismatch_and_fallback(monkeypatch):
    from fused_lstm import FusedLSTM, FusedLSTMFallbackWarning

    compare = load_compare(monkeypatch)
    small = next(w for w in compare.WORKLOADS if w.name == "small")
    case = compare.make_case(small, torch.device("cpu"), torch.float32)
    fused = compare.fused_lstm_copy(FusedLSTM, case.lstm)
    impls = {
        "nn.LSTM": compare.Impl("nn.LSTM", lambda lstm: lstm),
        "FusedLSTM": compare.Impl("FusedLSTM", None, kernel_prefix="fused_lstm::",
                                  fallback_warning=FusedLSTMFallbackWarning),
        "not fused": compare.Impl("not fused", None, kernel_prefix="fused_lstm::"),
        "wrong": compare.Impl("wrong", None),
        "close": compare.Impl("close", None),
    }
    modules = {"nn.LSTM": case.lstm, "FusedLSTM": fused, "not fused": copy.deepcopy(case.lstm),
               "wrong": _Shifted(case.lstm, 1e-3), "close": _Shifted(case.lstm, 1e-7)}
    verdicts = compare.check(case, modules, impls, torch.float32)
    statuses = {name: {mode: v[0] for mode, v in by_mode.items()}
                for name, by_mode in verdicts.items()}
    assert statuses == {
        "nn.LSTM": {"train": "ok", "infer": "ok"},
        "FusedLSTM": {"train": "ok", "infer": "ok"},
        "not fused": {"train": "fallback", "infer": "fallback"},
        "wrong": {"train": "mismatch", "infer": "mismatch"},
        "close": {"train": "ok", "infer": "ok"},
    }
    assert verdicts["wrong"]["train"][1].startswith("output: max error")
