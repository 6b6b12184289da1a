"""benchmarks/compare.py runs end to end and writes well-formed results.

One run of the script (a subprocess, as a user runs it) on the two smallest workloads with
almost no timing; the tests read what it wrote. The other tests call the package behind the
script, benchmarks/lstm_bench, directly. No assertion is made about the times: a
benchmark's numbers belong in its results, not in CI's verdict.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import pathlib
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPT = BENCH / "compare.py"
BENCH_MODULES = ("workloads", "implementations", "floor", "check", "gemm_peak", "ceilings", "grid",
                 "report")
WORKLOADS = ("seed-tiny", "small")
FLOOR = "floor (empty op)"
IMPLS = ("nn.LSTM", "FusedLSTM", FLOOR)
# The GEMM shapes (M, K, N) the peak is taken over: the two large ones and the workloads' input
# projections [T*B, I] x [I, 4H].
GEMM_SHAPES = {(2048, 2048, 2048), (4096, 1024, 4096), (4 * 92, 1, 4 * 3), (3 * 10, 5, 4 * 10)}
JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="2" skipped="3" tests="20" time="1.0">
</testsuite></testsuites>
"""


def load_bench(monkeypatch):
    """The package behind benchmarks/compare.py (benchmarks/lstm_bench), imported as the script
    imports it (benchmarks/ on sys.path for the duration of the test): one attribute per module."""
    monkeypatch.syspath_prepend(str(BENCH))
    return types.SimpleNamespace(**{name: importlib.import_module(f"lstm_bench.{name}")
                                    for name in BENCH_MODULES})


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
    assert set(report) == {"machine", "gemm_peaks", "rows", "ceilings", "tests"}
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
        assert row["status"] == ("floor" if row["impl"] == FLOOR else "ok"), row
        assert row["dtype"] == "float32"
        assert row["device"] == "cpu"
        for key in ("median_ms", "iqr_ms", "peak_mem_mb"):
            assert isinstance(row[key], float), (key, row)
        assert row["median_ms"] > 0 and row["iqr_ms"] >= 0 and row["peak_mem_mb"] >= 0
        if row["impl"] == FLOOR:  # not an LSTM: no speedup, no rate
            assert row["speedup"] is None and row["gflops"] is None, row
            continue
        for key in ("speedup", "gflops"):
            assert isinstance(row[key], float) and row[key] > 0, (key, row)
        if row["impl"] == "nn.LSTM":
            assert row["speedup"] == 1.0


def _close(a, b):
    return a == pytest.approx(b, rel=1e-9)


def test_json_gemm_peak(run):
    out, _ = run
    report = json.loads((out / "results.json").read_text())
    (peak,) = report["gemm_peaks"]
    assert (peak["device"], peak["dtype"]) == ("cpu", "float32")
    assert peak["threads"] == report["machine"]["threads"]
    assert {(s["m"], s["k"], s["n"]) for s in peak["shapes"]} == GEMM_SHAPES
    onednn = torch.backends.mkldnn.is_available()
    assert set(peak["libraries"]) == ({"torch.mm", "oneDNN"} if onednn else {"torch.mm"})
    for library in peak["libraries"].values():
        assert library["call"] and library["ran"]
    rates = [(rate, library, [s["m"], s["k"], s["n"]]) for s in peak["shapes"]
             for library, rate in s["gflops"].items() if rate is not None]
    assert all(rate > 0 for rate, _, _ in rates)
    # Both libraries measured the large shapes; the peak is the best of all.
    large = [s for s in peak["shapes"] if s["m"] >= 2048]
    assert all(all(s["gflops"][library] for library in peak["libraries"]) for s in large)
    best = max(rates, key=lambda r: r[0])
    assert (peak["gflops"], peak["library"], peak["shape"]) == best
    # What ran, according to the libraries' verbose logs (x86 with MKL and oneDNN here).
    if "Math Kernel Library" in torch.__config__.show():
        assert "MKL SGEMM" in peak["libraries"]["torch.mm"]["ran"]
    if onednn:
        assert "oneDNN" in peak["libraries"]["oneDNN"]["ran"]
        assert "src f32" in peak["libraries"]["oneDNN"]["ran"]


def test_json_ceilings(run, monkeypatch):
    out, _ = run
    bench = load_bench(monkeypatch)
    report = json.loads((out / "results.json").read_text())
    peak = report["gemm_peaks"][0]["gflops"]
    rows = {(r["workload"], r["mode"], r["impl"]): r for r in report["rows"]}
    workloads = {w.name: w for w in bench.workloads.WORKLOADS}
    cells = {(c["workload"], c["mode"]): c for c in report["ceilings"]}
    assert set(cells) == {(w, m) for w in WORKLOADS for m in ("train", "infer")}
    for (workload, mode), cell in cells.items():
        baseline = rows[workload, mode, "nn.LSTM"]["median_ms"]
        floor = rows[workload, mode, FLOOR]["median_ms"]
        gflop = bench.workloads.lstm_gemm_flops(workloads[workload], mode) / 1e9
        assert (cell["device"], cell["dtype"]) == ("cpu", "float32")
        assert _close(cell["gflop"], gflop)
        assert cell["baseline_ms"] == baseline and cell["floor_ms"] == floor
        assert _close(cell["floor_ceiling"], baseline / floor)
        assert _close(cell["gemm_bound_ms"], gflop / peak * 1e3)
        assert _close(cell["gemm_ceiling"], baseline / cell["gemm_bound_ms"])
        assert cell["ceiling"] == min(cell["floor_ceiling"], cell["gemm_ceiling"])
        assert cell["ceiling"] > 0
        assert cell["fused_speedup"] == rows[workload, mode, "FusedLSTM"]["speedup"]
        for impl in ("nn.LSTM", "FusedLSTM"):  # GFLOP/s consistent with the medians
            row = rows[workload, mode, impl]
            assert _close(row["gflops"], gflop / row["median_ms"] * 1e3)


def test_markdown_has_the_table(run):
    out, _ = run
    text = (out / "results.md").read_text()
    lines = text.splitlines()
    header = lines.index("| workload | mode | impl | median | IQR | peak mem | speedup | GFLOP/s "
                         "| status |")
    assert lines[header + 1].startswith("|---")
    body = lines[header + 2:header + 2 + 2 * 2 * len(IMPLS)]
    assert all(line.startswith("| ") for line in body), body
    assert all(line.endswith(" | floor |" if FLOOR in line else " | ok |") for line in body)
    assert {line.split(" | ")[0].lstrip("| ") for line in body} == set(WORKLOADS)
    assert sum(FLOOR in line for line in body) == 2 * len(WORKLOADS)

    ceilings = lines.index("| workload | mode | GFLOP/call | nn.LSTM | floor | floor ceiling "
                           "| GEMM bound | GEMM ceiling | ceiling | FusedLSTM |")
    assert len([line for line in lines[ceilings + 2:] if line.startswith("| ")][:4]) == 4
    assert any(line.startswith("- GEMM peak (cpu, float32, ") and "GFLOP/s by " in line
               for line in lines)
    assert "issue" not in text.lower()  # no old issues' targets in the results
    measured = text[text.index("## How it was measured"):]
    for note in (f"- {FLOOR}: the framework floor", "AccumulateGrad", "- GEMM peak: ",
                 "- GFLOP/s: ", "- ceilings: "):
        assert note in measured, note


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
    assert "GEMM peak (cpu, float32" in proc.stdout
    assert "floor ceiling" in proc.stdout  # the ceilings table
    assert "issue" not in proc.stdout.lower()
    assert "[7/7" in proc.stderr  # progress: GEMM peak; check, train, infer for each workload


def test_plot_skipped_without_matplotlib(monkeypatch, tmp_path):
    bench = load_bench(monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    row = bench.grid.Row("cpu", "small", "train", "float32", "FusedLSTM", "ok", 1.0, 0.1, 0.5, 2.0)
    note = bench.report.write_plot([row], tmp_path / "speedup.png")
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

    bench = load_bench(monkeypatch)
    small = next(w for w in bench.workloads.WORKLOADS if w.name == "small")
    case = bench.workloads.make_case(small, torch.device("cpu"), torch.float32)
    fused = bench.implementations.fused_lstm_copy(FusedLSTM, case.lstm)
    impls = {
        "nn.LSTM": bench.implementations.Impl("nn.LSTM", lambda lstm: lstm),
        "FusedLSTM": bench.implementations.Impl("FusedLSTM", None, kernel_prefix="fused_lstm::",
                                  fallback_warning=FusedLSTMFallbackWarning),
        "not fused": bench.implementations.Impl("not fused", None, kernel_prefix="fused_lstm::"),
        "wrong": bench.implementations.Impl("wrong", None),
        "close": bench.implementations.Impl("close", None),
    }
    modules = {"nn.LSTM": case.lstm, "FusedLSTM": fused, "not fused": copy.deepcopy(case.lstm),
               "wrong": _Shifted(case.lstm, 1e-3), "close": _Shifted(case.lstm, 1e-7)}
    verdicts = bench.check.check(case, modules, impls, torch.float32)
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


def test_gemm_flops(monkeypatch):
    bench = load_bench(monkeypatch)
    workloads = {w.name: w for w in bench.workloads.WORKLOADS}
    # medium (128, 256, 2 layers, T 100, B 32): 2 * 3200 * 1024 * ((128 + 256) + (256 + 256)),
    # the 5.87 GFLOP of benchmarks/notes/float32-bound.md, "The work, and where the time went
    # first".
    assert bench.workloads.lstm_gemm_flops(workloads["medium"], "infer") == 5_872_025_600
    assert bench.workloads.lstm_gemm_flops(workloads["medium"], "train") == 3 * 5_872_025_600
    # fastrnns (512, 512, 1 layer, T 100, B 64)
    assert bench.workloads.lstm_gemm_flops(workloads["fastrnns"], "infer") == 2 * 6400 * 2048 * 1024
    # A projection adds 2 * rows * H * P per layer, and P replaces H as the recurrent width.
    one = bench.workloads.Workload("p", 4, 8, 1, 2, 3)
    assert (bench.workloads.lstm_gemm_flops(one, "infer", proj_size=5)
            == 2 * 6 * 32 * (4 + 5) + 2 * 6 * 8 * 5)


def test_floor_module_shapes(monkeypatch):
    bench = load_bench(monkeypatch)
    small = next(w for w in bench.workloads.WORKLOADS if w.name == "small")
    case = bench.floor.floor_case(bench.workloads.make_case(small, torch.device("cpu"),
                                                            torch.float32))
    floor = bench.floor.FloorLSTM(case.lstm)
    assert [n for n, _ in floor.named_parameters()] == [n for n, _ in case.lstm.named_parameters()]
    output, (h_n, c_n) = floor(case.x, (case.h0, case.c0))
    assert output.shape == (small.seq_len, small.batch, small.hidden_size)
    assert h_n.shape == case.h0.shape and c_n.shape == case.c0.shape
    torch.autograd.backward((output, h_n, c_n), case.upstream)
    for leaf in (case.x, case.h0, case.c0, *floor.parameters()):
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape
    with torch.no_grad():  # inference: the outputs only
        output, (h_n, c_n) = floor(case.x, (case.h0, case.c0))
    assert output.shape == (small.seq_len, small.batch, small.hidden_size)
    assert h_n.shape == case.h0.shape and c_n.shape == case.c0.shape
    assert output.grad_fn is None

