"""The machine's best GEMM rate in a dtype (torch.mm and, on CPU, oneDNN's inner product), and
which kernel each library ran according to MKL's and oneDNN's verbose logs."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils import benchmark

from .check import describe
from .workloads import Workload, dtype_name, rows_per_call


# The GEMM peak: shapes (M, K, N) of [M, K] x [K, N] measured besides each workload's input
# projection, and seconds of timing per shape and library (the best block counts).
PEAK_SHAPES = ((2048, 2048, 2048), (4096, 1024, 4096))
PEAK_MIN_RUN_TIME = 0.5
QUICK_PEAK_MIN_RUN_TIME = 0.2


@dataclass
class GemmPeak:
    """The best GEMM rate measured on a device in a dtype: ``gflops`` by ``library`` at
    ``shape`` (M, K, N); ``shapes``: every shape's rate per library (None: it failed);
    ``libraries``: per library, the ``call`` timed and (CPU) the kernel it ``ran`` at its best
    shape, as MKL's and oneDNN's verbose logs say."""

    device: str
    dtype: str
    threads: int
    gflops: Optional[float] = None
    library: Optional[str] = None
    shape: Optional[list[int]] = None
    shapes: list[dict] = field(default_factory=list)
    libraries: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


ONEDNN = "oneDNN"
MM = "torch.mm"


@contextlib.contextmanager
def ieee_fp32_matmul(device: torch.device):
    """On CUDA: float32 matmuls without TF32 for the duration (the rate of true float32)."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    previous = getattr(matmul, name)
    setattr(matmul, name, "ieee" if name == "fp32_precision" else False)
    try:
        yield
    finally:
        setattr(matmul, name, previous)


def gemm_libraries(device: torch.device) -> dict[str, Callable]:
    """``{library: make(a, w) -> call}``, each call computing ``a [M, K] x w [N, K]^T``.

    torch.mm is MKL's sgemm on x86 CPUs in float32 (cuBLAS on CUDA, TF32 off). oneDNN (CPU
    only): its inner product primitive, through ``torch.ops.mkldnn._linear_pointwise`` with
    the weight prepacked once by ``torch.ops.mkldnn._reorder_linear_weight`` (what inductor
    does for frozen linear layers): dense input and output, no bias, no post-op. In float32
    oneDNN runs it as an f32 GEMM (brgemm matmul on AVX-512 machines); torch.mm does not reach
    oneDNN in float32 on x86."""
    libraries = {MM: lambda a, w: functools.partial(torch.mm, a, w.t())}
    if (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        def onednn(a, w):
            packed = torch.ops.mkldnn._reorder_linear_weight(w, a.size(0))
            return functools.partial(torch.ops.mkldnn._linear_pointwise, a, packed, None,
                                     "none", [], "")
        libraries[ONEDNN] = onednn
    return libraries


def captured_stdout(call: Callable[[], object]) -> str:
    """What ``call`` writes to file descriptor 1, C libraries' printf included."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 1)
            try:
                call()
            finally:
                with contextlib.suppress(Exception):
                    import ctypes
                    ctypes.CDLL(None).fflush(None)
                os.dup2(saved, 1)
            tmp.seek(0)
            return tmp.read().decode(errors="replace")
    finally:
        os.close(saved)


def what_ran(call: Callable[[], object]) -> str:
    """The GEMM kernel ``call`` ran according to MKL's and oneDNN's verbose logs (CPU):
    ``MKL SGEMM``, ``oneDNN inner_product brg_matmul:avx512_core (src f32, wei f32, dst f32)``;
    ``unknown`` when neither logged a GEMM."""
    def logged():
        with contextlib.ExitStack() as stack:
            for verbose in (torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON),
                            torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON)):
                with contextlib.suppress(Exception):  # e.g. a build without MKL
                    stack.enter_context(verbose)
            call()

    try:
        log = captured_stdout(logged)
    except Exception as error:  # noqa: BLE001 (an unverified label, not a failed run)
        return f"unknown ({describe(error)})"
    found = []
    for line in log.splitlines():
        mkl = re.match(r"MKL_VERBOSE (\w+)\(", line)
        if mkl:
            found.append(f"MKL {mkl.group(1)}")
        fields = line.split(",")
        if "exec" in fields and fields.index("exec") + 3 < len(fields):
            at = fields.index("exec")
            kind, kernel = fields[at + 2], fields[at + 3]
            if kind in ("inner_product", "matmul"):
                types = ", ".join(f"{arg} {t}" for arg, t in
                                  re.findall(r"\b(src|wei|dst):(\w+)", line))
                found.append(f"oneDNN {kind} {kernel} ({types})")
    return "; ".join(dict.fromkeys(found)) or "unknown"


def gemm_shapes(workloads: list[Workload]) -> list[tuple[int, int, int]]:
    """PEAK_SHAPES and each workload's input projection [T*B, I] x [I, 4H], as (M, K, N)
    (packed: the sum of the lengths for T*B)."""
    shapes = list(PEAK_SHAPES)
    shapes += [(rows_per_call(w), w.input_size, 4 * w.hidden_size) for w in workloads]
    return list(dict.fromkeys(shapes))


def measure_gemm_peak(device: torch.device, dtype: torch.dtype, workloads: list[Workload],
                      min_run_time: float) -> GemmPeak:
    """The best GEMM rate over gemm_shapes and gemm_libraries: ``2 M N K`` / the best block's
    time per call (torch.utils.benchmark blocked autorange, the benchmark's thread count). On
    CPU, each library's call at its best shape runs once more under MKL's and oneDNN's verbose
    logging, which says what it ran."""
    peak = GemmPeak(device.type, dtype_name(dtype), torch.get_num_threads())
    libraries = gemm_libraries(device)
    generator = torch.Generator(device=device).manual_seed(0)

    def operands(m, k, n):
        return (torch.randn(m, k, generator=generator, device=device, dtype=dtype),
                torch.randn(n, k, generator=generator, device=device, dtype=dtype))

    best = {}  # library -> (rate, shape)
    for m, k, n in gemm_shapes(workloads):
        a, w = operands(m, k, n)
        rates = {}
        for library, make in libraries.items():
            try:
                call = make(a, w)
                with ieee_fp32_matmul(device):
                    timer = benchmark.Timer("call()", globals={"call": call},
                                            num_threads=torch.get_num_threads())
                    seconds = min(timer.blocked_autorange(min_run_time=min_run_time).times)
                rates[library] = 2 * m * n * k / seconds / 1e9
            except Exception as error:  # noqa: BLE001 (the other libraries still count)
                rates[library] = None
                peak.notes.append(f"{library} at {m}x{k}x{n}: {describe(error)}")
            if rates[library] is not None and rates[library] > best.get(library, (0,))[0]:
                best[library] = (rates[library], (m, k, n))
        peak.shapes.append({"m": m, "k": k, "n": n, "gflops": rates})
        del a, w
    for library, make in libraries.items():
        entry = {"call": "torch.mm(a, w.t())" if library == MM else
                 "torch.ops.mkldnn._linear_pointwise(a, packed w, None, 'none', [], ''), w "
                 "prepacked by torch.ops.mkldnn._reorder_linear_weight(w, M)"}
        if device.type == "cpu" and library in best:
            try:
                entry["ran"] = what_ran(make(*operands(*best[library][1])))
            except Exception as error:  # noqa: BLE001 (an unverified label, not a failed run)
                entry["ran"] = f"unknown ({describe(error)})"
        peak.libraries[library] = entry
    if best:
        peak.library = max(best, key=lambda library: best[library][0])
        peak.gflops, peak.shape = best[peak.library][0], list(best[peak.library][1])
    return peak
