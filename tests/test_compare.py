"""benchmarks/compare.py runs end to end and writes well-formed results.

One run of the script (a subprocess, as a user runs it) on the two smallest workloads with
almost no timing; the tests read what it wrote. The other tests call the package behind the
script, benchmarks/lstm_bench, directly. No assertion is made about the times: a
benchmark's numbers belong in its results, not in CI's verdict.
"""

from __future__ import annotations

import copy
import dataclasses
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
                 "report", "machine", "ort", "timing")
WORKLOADS = ("seed-tiny", "small")
PACKED_WORKLOADS = ("packed-medium", "packed-long")
FLOOR = "floor (empty op)"
IMPLS = ("nn.LSTM", "FusedLSTM", FLOOR)
ORT = "ONNX Runtime"
# ONNX Runtime is an optional peer (pip install ".[bench]"): its rows are there when it is.
ORT_IMPORTABLE = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))
NO_ORT = "onnxruntime and onnx are not installed (pip install \".[bench]\")"


def expected_cells(workloads):
    """(workload, mode, impl) of every row a CPU float32 run of ``workloads`` has."""
    cells = {(w, m, i) for w in workloads for m in ("train", "infer") for i in IMPLS}
    return cells | ({(w, "infer", ORT) for w in workloads} if ORT_IMPORTABLE else set())
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
    assert set(report) == {"machine", "gemm_peaks", "rows", "ceilings", "fastest_peers", "tests"}
    machine = report["machine"]
    for key in ("device", "cpu", "torch", "commit", "date"):
        assert isinstance(machine[key], str) and machine[key], key
    assert machine["device"] == "cpu"
    assert "cuda" in machine and (machine["cuda"] is None or isinstance(machine["cuda"], str))
    assert report["tests"] == {"passed": 14, "failed": 3, "skipped": 3}

    rows = report["rows"]
    cells = {(r["workload"], r["mode"], r["impl"]) for r in rows}
    assert cells == expected_cells(WORKLOADS)
    for row in rows:
        assert row["status"] == ("floor" if row["impl"] == FLOOR else "ok"), row
        assert row["dtype"] == "float32"
        assert row["device"] == "cpu"
        for key in ("median_ms", "iqr_ms") + (() if row["impl"] == ORT else ("peak_mem_mb",)):
            assert isinstance(row[key], float), (key, row)
        assert row["median_ms"] > 0 and row["iqr_ms"] >= 0
        # ONNX Runtime's allocations are not PyTorch's: no peak memory.
        assert row["peak_mem_mb"] is None if row["impl"] == ORT else row["peak_mem_mb"] >= 0
        if row["impl"] == FLOOR:  # not an LSTM: no speedup, no rate
            assert row["speedup"] is None and row["gflops"] is None, row
            continue
        for key in ("speedup", "gflops"):
            assert isinstance(row[key], float) and row[key] > 0, (key, row)
        if row["impl"] == "nn.LSTM":
            assert row["speedup"] == 1.0
        # What the call ran: said by FusedLSTM (fused_lstm.explain), by no other implementation.
        if row["impl"] == "FusedLSTM":
            assert row["ran"].startswith(("small_hidden", "row_wise", "thin", "at::lstm")), row
            assert ("backward" in row["ran"]) == (row["mode"] == "train"), row
        else:
            assert row["ran"] == "", row


def test_what_fused_lstm_ran(monkeypatch):
    # fused_lstm_ran: the floor's at::lstm where the floor runs the call, else the CPU variant
    # with each layer's split of the steps and input projection; the backward's in training.
    import fused_lstm

    bench = load_bench(monkeypatch)
    workload = bench.workloads.Workload("w", 128, 256, 2, 4, 32)
    case = bench.workloads.make_case(workload, torch.device("cpu"), torch.float32)
    module = bench.implementations.fused_lstm_copy(fused_lstm.FusedLSTM, case.lstm)
    ran = bench.implementations.fused_lstm_ran
    with fused_lstm.backends.cpu.flags(nn_lstm_floor="always"):
        assert ran(fused_lstm, module, case, "infer") == "at::lstm (the nn.LSTM floor)"
        assert ran(fused_lstm, module, case, "train").startswith("row_wise, ")
    with fused_lstm.backends.cpu.flags(nn_lstm_floor="never", hidden_split_by_measured_rates=False,
                                       allow_fused_input_projection=False):
        # (the projection's library, BLAS or oneDNN's matmul, is chosen by measured rates)
        infer = ran(fused_lstm, module, case, "infer")
        assert infer.startswith("row_wise, steps split by hidden/hidden, input projection "), infer
        assert infer.endswith(" (every layer)") and "fused" not in infer, infer
        assert ran(fused_lstm, module, case, "train").endswith(", backward row_wise")
    with fused_lstm.backends.cpu.flags(nn_lstm_floor="never", allow_hidden_split=False):
        # (the split is reported where the hidden split is allowed; fusion by measured rates)
        assert ran(fused_lstm, module, case, "infer").startswith("row_wise, input projection ")
    # The floor's measurement (the default "auto"; a key of its own: these settings), after
    # the first inference call: its least times, whichever it chose.
    with fused_lstm.backends.cpu.flags(nn_lstm_floor="auto", allow_vec16_cell=False), \
            torch.no_grad():
        module.eval()
        module(case.inputs(), (case.h0, case.c0))
        infer = ran(fused_lstm, module, case, "infer")
    assert "; the floor measured (least, ms): the rule's choice " in infer, infer
    assert ", at::lstm " in infer.split("; the floor measured")[1], infer
    forward = {"nn_lstm_floor_times": "fused 97.8228 ms, at::lstm 95.2455 ms (wall time, ...)",
               "step_split_times": "the rule's split 97.8228 ms, the hidden split 93.0703 ms "
                                   "(least of interleaved calls): the hidden split runs",
               "input_projection_times": "the rule's 97.8228 ms, never fused 99.1 ms (least of "
                                         "interleaved calls): the rule's runs"}
    assert bench.implementations.floor_times(forward) == (
        "; the floor measured (least, ms): the rule's choice 97.8, at::lstm 95.2, hidden split "
        "93.1, never fused 99.1")
    assert bench.implementations.floor_times({}) == ""
    # The other variants, their projections named by their first words.
    for sizes, expected in (((5, 10, 2, 3, 10), "small_hidden, input projection small-hidden "
                             "product (every layer)"),
                            ((64, 256, 2, 1, 1), "thin, input projection thin kernel (every "
                             "layer)")):
        case = bench.workloads.make_case(bench.workloads.Workload("w", *sizes),
                                         torch.device("cpu"), torch.float32)
        module = bench.implementations.fused_lstm_copy(fused_lstm.FusedLSTM, case.lstm)
        assert ran(fused_lstm, module, case, "infer") == expected
        variant = expected.split(",")[0]
        assert ran(fused_lstm, module, case, "train") == f"{expected}, backward {variant}"


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
    body = lines[header + 2:header + 2 + len(expected_cells(WORKLOADS))]
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
    # An input that requires no grad: training less layer 0's dL/dx = dgates W_ih,
    # 2 * rows * 4H * I (inference unchanged).
    frozen = dataclasses.replace(workloads["medium"], input_grad=False)
    assert (bench.workloads.lstm_gemm_flops(frozen, "train")
            == 3 * 5_872_025_600 - 2 * 3200 * 1024 * 128)
    assert bench.workloads.lstm_gemm_flops(frozen, "infer") == 5_872_025_600


def test_check_without_input_grad(monkeypatch):
    # --no-input-grad: the case's input requires no grad (padded and packed), the check
    # compares every other gradient (no "grad input"), and still tells a wrong module.
    from fused_lstm import FusedLSTM

    bench = load_bench(monkeypatch)
    for name in ("small", "packed-medium"):
        workload = next(w for w in bench.workloads.WORKLOADS if w.name == name).quick()
        workload = dataclasses.replace(workload, input_grad=False)
        case = bench.workloads.make_case(workload, torch.device("cpu"), torch.float32)
        assert not case.x.requires_grad and case.h0.requires_grad
        fused = bench.implementations.fused_lstm_copy(FusedLSTM, case.lstm)
        result = bench.check.run_for_check(fused, case, ("train",))["train"]
        assert "grad input" not in result and "grad h0" in result
        assert "grad weight_ih_l0" in result and result["grad weight_ih_l0"].abs().sum() > 0
        modules = {"nn.LSTM": case.lstm, "FusedLSTM": fused}
        if not workload.packed:  # (_Shifted adds to a padded output)
            modules["wrong"] = _Shifted(case.lstm, 1e-3)
        impls = {n: bench.implementations.Impl(n, None) for n in modules}
        verdicts = bench.check.check(case, modules, impls, torch.float32)
        expected = {"nn.LSTM": "ok", "FusedLSTM": "ok"}
        if "wrong" in modules:
            expected["wrong"] = "mismatch"
        assert {n: v["train"][0] for n, v in verdicts.items()} == expected, verdicts


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



def test_json_fastest_peers(run):
    # FusedLSTM against the fastest other implementation timed (never the floor).
    out, _ = run
    report = json.loads((out / "results.json").read_text())
    rows = report["rows"]
    peers = {(c["workload"], c["mode"]): c for c in report["fastest_peers"]}
    assert set(peers) == {(w, m) for w in WORKLOADS for m in ("train", "infer")}
    for (workload, mode), cell in peers.items():
        others = [r for r in rows if (r["workload"], r["mode"]) == (workload, mode)
                  and r["impl"] not in ("FusedLSTM", FLOOR)]
        best = min(others, key=lambda r: r["median_ms"])
        fused = next(r for r in rows if (r["workload"], r["mode"], r["impl"])
                     == (workload, mode, "FusedLSTM"))
        assert (cell["peer"], cell["peer_ms"], cell["fused_ms"]) == (
            best["impl"], best["median_ms"], fused["median_ms"])
        assert _close(cell["speedup"], best["median_ms"] / fused["median_ms"])
    text = (out / "results.md").read_text()
    # The table is there when a peer other than nn.LSTM ran (ONNX Runtime, here).
    assert ("| workload | mode | fastest other | its median | FusedLSTM | speedup |" in text) \
        == ORT_IMPORTABLE


def _cpuinfo_model_and_isa():
    """The first processor's model name and the ISA names its flags give, read here
    independently of the benchmark's code."""
    text = pathlib.Path("/proc/cpuinfo").read_text()
    fields = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    names = {"avx2": "AVX2", "avx512f": "AVX-512F", "avx512_bf16": "AVX512_BF16",
             "avx512_fp16": "AVX512_FP16", "amx_bf16": "AMX-BF16", "amx_fp16": "AMX-FP16"}
    return fields.get("model name"), [name for flag, name in names.items() if flag in flags]


@pytest.mark.skipif(not pathlib.Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo")
def test_header_has_cpu_model_and_isa(run):
    out, proc = run
    model, isa = _cpuinfo_model_and_isa()
    md = (out / "results.md").read_text()
    for text in (proc.stdout, md):
        cpu = next(line for line in text.splitlines() if line.lstrip(" -").startswith("cpu: "))
        assert model and f"cpu: {model} (" in cpu, cpu
        assert " cores, " in cpu and "family " in cpu and "model " in cpu, cpu
        line = next(line for line in text.splitlines() if line.lstrip(" -").startswith("isa: "))
        have = line.split("isa: ", 1)[1].split("; not ")[0]
        assert have.split(", ") == isa or (not isa and have.startswith("none of")), line
        blas = next(line for line in text.splitlines() if line.lstrip(" -").startswith("blas: "))
        assert "ATen CPU capability " in blas, blas
        onnxruntime = next(line for line in text.splitlines()
                           if line.lstrip(" -").startswith("onnxruntime: "))
        assert onnxruntime.endswith("not installed") != ORT_IMPORTABLE, onnxruntime
    machine = json.loads((out / "results.json").read_text())["machine"]
    assert machine["isa"] == isa and machine["cpu"] == model


def test_header_has_the_malloc_settings(run):
    """The header says which C allocator settings the run had: under glibc's defaults
    nn.LSTM's large training buffers are fresh pages on every call (--malloc-keep changes that)."""
    out, proc = run
    md = (out / "results.md").read_text()
    for text in (proc.stdout, md):
        line = next(line for line in text.splitlines() if line.lstrip(" -").startswith("malloc: "))
        if sys.platform.startswith("linux"):
            assert "default thresholds" in line, line
    assert "malloc" in json.loads((out / "results.json").read_text())["machine"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_keep_sets_glibc_thresholds():
    """--malloc-keep's setting (lstm_bench.machine.keep_malloc_memory): glibc's mmap and trim
    thresholds at 1 GB, so a 64 MB block freed and asked for again comes back without a page
    fault; under the defaults it is a fresh mapping, faulted in again (minor faults counted by
    getrusage in a fresh interpreter, to leave this process's allocator as it is)."""
    code = (
        "import ctypes, resource, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from lstm_bench import machine\n"
        "if sys.argv[2] == 'keep':\n"
        "    assert machine.keep_malloc_memory() is None\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "n = 64 << 20\n"
        "def touch():\n"
        "    p = libc.malloc(n)\n"
        "    ctypes.memset(p, 1, n)\n"
        "    return p\n"
        "libc.free(touch())\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "libc.free(touch())\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
        "print(machine.malloc_info(sys.argv[2] == 'keep'))\n")
    faults = {}
    for mode in ("default", "keep"):
        proc = subprocess.run([sys.executable, "-c", code, str(BENCH), mode], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        count, info = proc.stdout.splitlines()
        faults[mode] = int(count)
        assert ("1 GB" in info) == (mode == "keep"), info
    pages = (64 << 20) // 4096
    assert faults["default"] >= pages // 2, faults
    assert faults["keep"] < pages // 16, faults


CPUINFO = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 17
model name	: AMD EPYC 9654 96-Core Processor
stepping	: 1
flags		: fpu sse2 avx avx2 avx512f avx512_bf16 avx512vl

processor	: 1
vendor_id	: AuthenticAMD
"""


def test_read_cpuinfo(monkeypatch):
    bench = load_bench(monkeypatch)
    info = bench.machine.read_cpuinfo(CPUINFO)
    assert info == {"cpu": "AMD EPYC 9654 96-Core Processor", "cpu_vendor": "AuthenticAMD",
                    "cpu_family": 25, "cpu_model": 17, "cpu_stepping": 1,
                    "isa": ["AVX2", "AVX-512F", "AVX512_BF16"]}
    machine = {**info, "cores": 2, "threads": 2, "gpu": None, "torch": "t", "cuda": None,
               "python": "p", "fused_lstm": "f", "commit": "c", "date": "d", "blas": "b",
               "onnxruntime": None}
    lines = bench.report.machine_lines(machine, None)
    assert lines[0] == ("cpu: AMD EPYC 9654 96-Core Processor (AuthenticAMD, family 25, "
                        "model 17, stepping 1), 2 cores, 2 torch threads")
    assert lines[1] == "isa: AVX2, AVX-512F, AVX512_BF16; not AVX512_FP16, AMX-BF16, AMX-FP16"
    assert "onnxruntime: not installed" in lines


def test_results_folder_name(monkeypatch):
    name = load_bench(monkeypatch).machine.results_folder_name
    xeon = {"device": "cpu", "cpu": "Intel(R) Xeon(R) Processor", "cpu_vendor": "GenuineIntel",
            "cpu_family": 6, "cpu_model": 143,
            "isa": ["AVX2", "AVX-512F", "AVX512_BF16", "AVX512_FP16", "AMX-BF16"]}
    assert name(xeon, None, "2026-12-05") == "cpu-xeon-amx-2026-12-05"
    assert name(xeon, "float32", "2026-12-05") == "cpu-xeon-amx-2026-12-05"
    assert name(xeon, "bfloat16", "2026-12-05") == "cpu-xeon-amx-2026-12-05-bf16"
    assert name(xeon, "float16", "2026-12-05") == "cpu-xeon-amx-2026-12-05-fp16"
    skylake = {**xeon, "cpu": "Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz", "cpu_model": 85,
               "isa": ["AVX2", "AVX-512F"]}
    assert name(skylake, None, "2026-12-05") == "cpu-xeon-avx512-2026-12-05"
    epyc = {"device": "cpu", "cpu": "AMD EPYC", "cpu_vendor": "AuthenticAMD", "cpu_family": 25,
            "cpu_model": 17, "isa": ["AVX2", "AVX-512F", "AVX512_BF16"]}
    assert name(epyc, None, "2026-11-22") == "cpu-epyc-zen4-2026-11-22"
    assert name(epyc, "bfloat16", "2026-11-22") == "cpu-epyc-zen4-2026-11-22-bf16"
    milan = {**epyc, "cpu": "AMD EPYC 7763 64-Core Processor", "cpu_model": 1,
             "isa": ["AVX2"]}
    assert name(milan, None, "2026-11-22") == "cpu-epyc-zen3-2026-11-22"
    h100 = {**xeon, "device": "NVIDIA H100 80GB HBM3", "gpu": "NVIDIA H100 80GB HBM3"}
    assert name(h100, None, "2026-12-06") == "gpu-h100-2026-12-06"
    assert name(h100, "bfloat16", "2026-12-06") == "gpu-h100-2026-12-06-bf16"


def test_packed_case(monkeypatch):
    # Lengths uniform in [T/2, T], the same on every call; the input packed unsorted.
    bench = load_bench(monkeypatch)
    workloads = {w.name: w for w in bench.workloads.WORKLOADS}
    assert [(w.input_size, w.hidden_size, w.num_layers, w.seq_len, w.batch)
            for w in (workloads[name] for name in PACKED_WORKLOADS)] == [
        (128, 256, 2, 200, 32), (64, 128, 1, 1000, 16)]
    for name in PACKED_WORKLOADS:
        workload = workloads[name]
        lengths = bench.workloads.sequence_lengths(workload)
        assert lengths.shape == (workload.batch,)
        assert workload.seq_len // 2 <= lengths.min() < lengths.max() <= workload.seq_len
        assert torch.equal(lengths, bench.workloads.sequence_lengths(workload))
        assert bench.workloads.rows_per_call(workload) == lengths.sum()
        quick = workload.quick()
        assert quick.name == name and quick.seq_len < workload.seq_len
        case = bench.workloads.make_case(quick, torch.device("cpu"), torch.float32)
        again = bench.workloads.make_case(quick, torch.device("cpu"), torch.float32)
        assert torch.equal(case.x, again.x) and torch.equal(case.lengths, again.lengths)
        packed = case.inputs()
        assert isinstance(packed, nn.utils.rnn.PackedSequence)
        assert packed.sorted_indices is not None  # enforce_sorted=False
        assert case.x.is_leaf and case.x.requires_grad
        padded, lengths = nn.utils.rnn.pad_packed_sequence(packed)
        assert torch.equal(lengths, case.lengths)
        assert case.x.shape == (int(lengths.sum()), quick.input_size)
        assert case.upstream[0].shape == (int(lengths.sum()), quick.hidden_size)
    flops = bench.workloads.lstm_gemm_flops(workloads["packed-long"], "infer")
    assert flops == 2 * int(bench.workloads.sequence_lengths(workloads["packed-long"]).sum()) \
        * 4 * 128 * (64 + 128)


class _PackedShifted(_Shifted):
    """_Shifted for packed input: the output's data moved."""

    def forward(self, x, hx):
        output, (h_n, c_n) = self.lstm(x, hx)
        return output._replace(data=output.data + self.shift), (h_n, c_n)


@pytest.mark.slow
def test_packed_check_passes_and_fails(monkeypatch):
    # The packed workloads' quick forms through the check: nn.LSTM and FusedLSTM (and ONNX
    # Runtime where installed) pass, a wrong output fails, in both modes.
    from fused_lstm import FusedLSTM, FusedLSTMFallbackWarning

    bench = load_bench(monkeypatch)
    workload = next(w for w in bench.workloads.WORKLOADS if w.name == "packed-medium").quick()
    case = bench.workloads.make_case(workload, torch.device("cpu"), torch.float32)
    Impl = bench.implementations.Impl
    impls = {"nn.LSTM": Impl("nn.LSTM", None),
             "FusedLSTM": Impl("FusedLSTM", None, kernel_prefix="fused_lstm::",
                               fallback_warning=FusedLSTMFallbackWarning),
             "wrong": Impl("wrong", None)}
    modules = {"nn.LSTM": case.lstm,
               "FusedLSTM": bench.implementations.fused_lstm_copy(FusedLSTM, case.lstm),
               "wrong": _PackedShifted(case.lstm, 1e-3)}
    if ORT_IMPORTABLE:
        import onnx
        import onnxruntime
        impls[ORT] = Impl(ORT, None, modes=("infer",))
        modules[ORT] = bench.ort.OrtLSTM(onnxruntime, onnx, case.lstm)
    verdicts = bench.check.check(case, modules, impls, torch.float32)
    statuses = {name: {mode: v[0] for mode, v in by_mode.items()}
                for name, by_mode in verdicts.items()}
    expected = {"nn.LSTM": {"train": "ok", "infer": "ok"},
                "FusedLSTM": {"train": "ok", "infer": "ok"},
                "wrong": {"train": "mismatch", "infer": "mismatch"}}
    if ORT_IMPORTABLE:
        expected[ORT] = {"infer": "ok"}
    assert statuses == expected, verdicts


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory):
    """compare.py --quick on the packed workloads (their quick forms): output directory and
    completed process."""
    out = tmp_path_factory.mktemp("packed") / "results"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--min-run-time", "0.01",
         "--workloads", *PACKED_WORKLOADS, "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=out.parent,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


@pytest.mark.slow
def test_packed_workloads_run_quick(packed_run):
    out, proc = packed_run
    report = json.loads((out / "results.json").read_text())
    rows = report["rows"]
    assert {(r["workload"], r["mode"], r["impl"]) for r in rows} == expected_cells(
        PACKED_WORKLOADS)
    for row in rows:
        assert row["status"] == ("floor" if row["impl"] == FLOOR else "ok"), row
        assert row["median_ms"] > 0
    # The quick forms, as the legend says: shorter sequences, the same sizes.
    assert "packed-medium (128, 256, 2, packed 10-20, 32)" in proc.stdout
    assert "packed-long (64, 128, 1, packed 25-50, 16)" in proc.stdout
    assert "pack_padded_sequence(..., enforce_sorted=False)" in (out / "results.md").read_text()


@pytest.mark.skipif(not ORT_IMPORTABLE, reason=NO_ORT)
def test_ort_peer(monkeypatch):
    # The export has one standard ONNX LSTM node per layer and runs with torch's thread count;
    # its outputs pass the check; streaming carries the state as nn.LSTM's does.
    import onnx
    import onnxruntime

    bench = load_bench(monkeypatch)
    workloads = {w.name: w for w in bench.workloads.WORKLOADS}
    Impl = bench.implementations.Impl
    impls = {"nn.LSTM": Impl("nn.LSTM", None), ORT: Impl(ORT, None, modes=("infer",)),
             "wrong": Impl("wrong", None, modes=("infer",))}
    for name in ("small", "stream-step"):
        case = bench.workloads.make_case(workloads[name], torch.device("cpu"), torch.float32)
        ort_lstm = bench.ort.OrtLSTM(onnxruntime, onnx, case.lstm)
        lstm_nodes = [n for n in ort_lstm.model.graph.node if n.op_type == "LSTM"]
        assert len(lstm_nodes) == case.lstm.num_layers
        perturbed = copy.deepcopy(case.lstm)
        with torch.no_grad():
            perturbed.weight_hh_l0.add_(1e-3)
        modules = {"nn.LSTM": case.lstm, ORT: ort_lstm,
                   "wrong": bench.ort.OrtLSTM(onnxruntime, onnx, perturbed)}
        verdicts = bench.check.check(case, modules, impls, torch.float32)
        assert verdicts[ORT] == {"infer": ("ok", "")}, verdicts
        assert verdicts["wrong"]["infer"][0] == "mismatch", verdicts
        session = ort_lstm.session(packed=False)
        assert session.get_session_options().intra_op_num_threads == torch.get_num_threads()
        assert session.get_session_options().inter_op_num_threads == 1

    # stream-step: three timed steps carry (h, c) like three nn.LSTM calls.
    step = bench.timing.make_step(ort_lstm, case, "infer", streaming=True)
    for _ in range(3):
        step()
    state = (case.h0.detach(), case.c0.detach())
    with torch.no_grad():
        for _ in range(3):
            _, state = case.lstm.eval()(case.x, state)
    torch.testing.assert_close(torch.from_numpy(step.feeds["h0"]), state[0])
    torch.testing.assert_close(torch.from_numpy(step.feeds["c0"]), state[1])


@pytest.mark.skipif(not ORT_IMPORTABLE, reason=NO_ORT)
def test_ort_packed_sequence_lens(monkeypatch):
    # Packed input: the padded input and sequence_lens on every LSTM node; the output packed
    # again matches nn.LSTM's on the PackedSequence, h_n/c_n each sequence's last step.
    import onnx
    import onnxruntime

    bench = load_bench(monkeypatch)
    workload = bench.workloads.Workload("packed-test", 3, 5, 2, 9, 6, packed=True)
    case = bench.workloads.make_case(workload, torch.device("cpu"), torch.float32)
    assert len(set(case.lengths.tolist())) > 1
    ort_lstm = bench.ort.OrtLSTM(onnxruntime, onnx, case.lstm)
    with torch.no_grad():
        expected, (h_n, c_n) = case.lstm.eval()(case.inputs(), (case.h0, case.c0))
        output, (ort_h, ort_c) = ort_lstm.eval()(case.inputs(), (case.h0, case.c0))
    torch.testing.assert_close(output.data, expected.data)
    assert torch.equal(output.batch_sizes, expected.batch_sizes)
    torch.testing.assert_close(ort_h, h_n)
    torch.testing.assert_close(ort_c, c_n)
    graph = bench.ort.with_sequence_lens(onnx, ort_lstm.model).graph
    assert all(n.input[4] == "sequence_lens" for n in graph.node if n.op_type == "LSTM")


def test_ort_absent(monkeypatch):
    # Without onnxruntime the peer is simply absent, and the header says so.
    bench = load_bench(monkeypatch)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime fails
    fused_lstm = types.SimpleNamespace(FusedLSTM=None, FusedLSTMFallbackWarning=Warning)
    impls, notes = bench.implementations.implementations(fused_lstm)
    assert ORT not in [impl.name for impl in impls]
    assert any(note.startswith(f"{ORT}: skipped") for note in notes)
    assert bench.ort.onnxruntime_version() is None


def test_plan_dtypes_and_quick_forms(monkeypatch):
    # A peer runs only in its dtypes (ONNX Runtime: float32), with a note elsewhere; --quick
    # runs the packed workloads' quick forms, the others as they are.
    import argparse

    bench = load_bench(monkeypatch)
    Impl = bench.implementations.Impl
    impls = [Impl("nn.LSTM", None),
             Impl(ORT, None, devices=("cpu",), modes=("infer",), dtypes=(torch.float32,))]
    args = argparse.Namespace(device="cpu", workloads=["small", "packed-long"],
                              dtype="bfloat16", quick=True, input_grad=True)
    grid, notes = bench.grid.plan(args, impls)
    assert [[impl.name for impl in here] for *_, here in grid] == [["nn.LSTM"], ["nn.LSTM"]]
    assert f"{ORT}: float32 only, not run in bfloat16" in notes
    assert [(w.name, w.seq_len) for _, w, _, _ in grid] == [("small", 3), ("packed-long", 50)]
    args = argparse.Namespace(device="cpu", workloads=["small", "packed-long"], dtype=None,
                              quick=False, input_grad=True)
    grid, notes = bench.grid.plan(args, impls)
    assert [[impl.name for impl in here] for *_, here in grid] == [["nn.LSTM", ORT]] * 2
    assert [(w.name, w.seq_len) for _, w, _, _ in grid] == [("small", 3), ("packed-long", 1000)]
    assert all(w.input_grad for _, w, _, _ in grid)
    assert not notes
    # --no-input-grad: every workload's training input requires no grad, and says so.
    args.input_grad = False
    grid, _ = bench.grid.plan(args, impls)
    assert [(w.name, w.input_grad) for _, w, _, _ in grid] == [("small", False),
                                                               ("packed-long", False)]
    assert grid[0][1].shape() == "small (5, 10, 2, 3, 10) input without grad"


def test_out_auto_names_the_folder_and_never_overwrites(monkeypatch, tmp_path):
    # --out auto names the folder after this machine, and stops before measuring anything
    # when that folder exists (a kept run).
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("compare_script", SCRIPT)
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    machine = compare.machine_info({"cpu"}, compare.import_fused_lstm())
    name = compare.results_folder_name(machine, None, machine["date"][:10])
    assert name.startswith("cpu-") and name.endswith(machine["date"][:10])
    (tmp_path / name).mkdir()
    monkeypatch.setattr(compare, "RESULTS", tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--device", "cpu", "--workloads", "small", "--out", "auto"])
    assert f"{tmp_path / name} exists" in str(exit_info.value)
    assert not any((tmp_path / name).iterdir())
    # --no-input-grad: the same name with -no-input-grad after it.
    (tmp_path / f"{name}-no-input-grad").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--device", "cpu", "--workloads", "small", "--out", "auto",
                      "--no-input-grad"])
    assert f"{tmp_path / name}-no-input-grad exists" in str(exit_info.value)
