#!/usr/bin/env python
"""How much faster is FusedLSTM than torch.nn.LSTM on this machine, and do both compute the same?

    python benchmarks/compare.py [--device cpu|cuda|all] [--quick] [--workloads NAME ...]
                                 [--dtype float32|bfloat16|float16] [--out DIR]

For every device present (or the one asked for), every workload that fits it and both modes
(``train``: forward, then ``torch.autograd.backward([output, h_n, c_n], upstream_grads)`` with
random upstream gradients made once, as PyTorch's fastrnns benchmark does; ``infer``: forward
under ``no_grad``), nn.LSTM, FusedLSTM and, where importable, haste and FlashRNN run on the same
weights and inputs:

1. check: outputs and gradients are compared with a float64 nn.LSTM on the same (rounded)
   weights and inputs. An implementation passes when it is at most twice as far from the float64
   result as nn.LSTM in the same dtype is, plus a floor of ``TOLERANCE[dtype]`` times the
   tensor's magnitude. A row that fails is marked ``mismatch`` and not timed;
2. time: ``torch.utils.benchmark`` blocked autorange, in rounds that alternate the
   implementations (ABBAAB...), so that drift of the machine hits all of them. Each round's
   block-size estimation runs untimed first and doubles as warm-up; the reported median and
   IQR are over every block of every round;
3. memory: the peak of one more call above the memory held when it starts:
   ``torch.cuda.max_memory_allocated`` on CUDA; on CPU, the bytes held by PyTorch's CPU
   allocator as seen by ``torch.profiler`` memory profiling.

Two ceilings on the speedup are measured in the same run, next to the timings:

- the framework floor: ``floor (empty op)``, a module with FusedLSTM's call structure (one
  Python ``torch.autograd.Function`` taking x, h0, c0 and the flat weights) that does no
  arithmetic, timed with the others (in inference, without grad, only the module call and
  the three outputs' allocation: no autograd Function is needed there). ``nn.LSTM / floor`` is
  the largest speedup any implementation called through PyTorch's autograd this way can show.
  It is not checked and plays no part in the exit status;
- the GEMM rate: the machine's best GEMM rate in the dtype (the best of ``torch.mm`` and, on
  CPU, oneDNN's inner product through ``torch.ops.mkldnn._linear_pointwise``, over a few large
  shapes and each workload's input projection), measured once per run before the workloads.
  ``nn.LSTM / (LSTM GEMM FLOPs / peak rate)`` is the largest speedup a GEMM-bound
  implementation can reach on this machine.

It prints one table per device and dtype, and one of the ceilings; ``--out DIR`` writes
``results.json``, ``results.md`` and ``speedup.png`` (``--targets`` adds the table of the
issues' speedup targets to ``results.md``). The exit status is 1 when a FusedLSTM row failed
its check or raised, 0 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import importlib
import importlib.util
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
import xml.etree.ElementTree as ElementTree
import zlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils import benchmark

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MODES = ("train", "infer")
BASELINE = "nn.LSTM"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The check's floor, relative to the tensor's magnitude: torch.testing's default tolerance for
# the dtype (its atol for float32, its rtol for the half types, whose rounding unit is 2^-8 and
# 2^-11). Above the floor, the rule is relative to nn.LSTM's own error in the same dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}
# Seconds of timing per implementation, workload and mode (three implementations on CPU: with
# the floor, 3 x 4 s per workload and mode, where it was 2 x 5 s before the floor was added).
MIN_RUN_TIME = 4.0
QUICK_MIN_RUN_TIME = 1.0
FLOOR = "floor (empty op)"
# The GEMM peak: shapes (M, K, N) of [M, K] x [K, N] measured besides each workload's input
# projection, and seconds of timing per shape and library (the best block counts).
PEAK_SHAPES = ((2048, 2048, 2048), (4096, 1024, 4096))
PEAK_MIN_RUN_TIME = 0.5
QUICK_PEAK_MIN_RUN_TIME = 0.2
ROUNDS = 5
QUICK_ROUNDS = 3
MEMORY_NOTE = {
    "cpu": "peak bytes held by PyTorch's CPU allocator during one call, above what was held "
           "when it started (torch.profiler memory profiling; outputs, saved activations and "
           "temporaries count, inputs and weights do not)",
    "cuda": "torch.cuda.max_memory_allocated during one call, above what was allocated when "
            "it started",
}


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for torch.float32."""
    return str(dtype).removeprefix("torch.")


CHECK_NOTE = ("outputs and gradients (input, h0, c0, weights) vs a float64 nn.LSTM on the same "
              "weights and inputs: max error <= 2 x nn.LSTM's max error in the same dtype + "
              "tol x max(1, max |reference|), tol = "
              + ", ".join(f"{tol:g} ({dtype_name(dtype)})" for dtype, tol in TOLERANCE.items()))


# ---------------------------------------------------------------------------------------------
# What is measured


@dataclass(frozen=True)
class Workload:
    """An LSTM size to measure; ``streaming``: one time step per call, the state carried over
    from the previous call."""

    name: str
    input_size: int
    hidden_size: int
    num_layers: int
    seq_len: int
    batch: int
    streaming: bool = False
    gpu_only: bool = False
    dtype: torch.dtype = torch.float32  # unless --dtype says otherwise

    def shape(self) -> str:
        """``name (input, hidden, layers, seq, batch)``."""
        seq = "1 step/call" if self.streaming else self.seq_len
        return (f"{self.name} ({self.input_size}, {self.hidden_size}, {self.num_layers}, "
                f"{seq}, {self.batch})")


WORKLOADS = (
    Workload("seed-tiny", 1, 3, 2, 4, 92),
    Workload("small", 5, 10, 2, 3, 10),
    Workload("stream-step", 64, 256, 2, 1, 1, streaming=True),
    Workload("medium", 128, 256, 2, 100, 32),
    Workload("fastrnns", 512, 512, 1, 100, 64),
    Workload("flashrnn", 768, 768, 1, 1024, 16, gpu_only=True, dtype=torch.bfloat16),
)


@dataclass(frozen=True)
class Impl:
    """An LSTM implementation. ``build(lstm)`` returns a module called like nn.LSTM,
    ``module(x, (h0, c0)) -> (output, (h_n, c_n))``, holding ``lstm``'s weights.

    How the check tells that the implementation computed a result with its own kernels, not
    by falling back to nn.LSTM: an operator whose name starts with ``kernel_prefix`` ran, and
    no ``fallback_warning`` was raised. ``floor``: not an LSTM but the framework floor (no
    check, status ``floor``, no speedup, not in the exit status)."""

    name: str
    build: Callable[[nn.LSTM], nn.Module]
    devices: tuple[str, ...] = ("cpu", "cuda")
    kernel_prefix: Optional[str] = None
    fallback_warning: Optional[type[Warning]] = None
    floor: bool = False


class HasteLSTM(nn.Module):
    """haste_pytorch.LSTM layers stacked to ``lstm.num_layers``, with ``lstm``'s weights.

    haste keeps its own weight layout, so only the outputs and the input, h0 and c0 gradients
    are checked, not the weight gradients."""

    def __init__(self, haste, lstm: nn.LSTM):
        super().__init__()
        self.layers = nn.ModuleList()
        for k in range(lstm.num_layers):
            layer = haste.LSTM(lstm.input_size if k == 0 else lstm.hidden_size, lstm.hidden_size)
            with torch.no_grad():
                layer.from_native_weights(*(getattr(lstm, f"{name}_l{k}") for name in
                                            ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))
            self.layers.append(layer)

    def forward(self, x, hx):
        """nn.LSTM's call: ``x [T, B, I]``, ``hx = (h0, c0)`` each ``[layers, B, H]``."""
        h0, c0 = hx
        h_n, c_n = [], []
        for k, layer in enumerate(self.layers):
            x, (h, c) = layer(x, (h0[k:k + 1], c0[k:k + 1]))
            h_n.append(h)
            c_n.append(c)
        return x, (torch.cat(h_n), torch.cat(c_n))


class FlashRNNLSTM(nn.Module):
    """FlashRNN's fused LSTM kernel (``backend="cuda_fused"``) layer by layer, with nn.LSTM's
    parameters (same names and layout, so their gradients are checked too). The input
    projection ``x W_ih^T``, which FlashRNN expects done, is part of every call."""

    def __init__(self, flashrnn, lstm: nn.LSTM):
        super().__init__()
        self.flashrnn = flashrnn
        self.num_layers, self.hidden_size = lstm.num_layers, lstm.hidden_size
        for name, param in lstm.named_parameters():
            self.register_parameter(name, nn.Parameter(param.detach().clone()))

    def forward(self, x, hx):
        """nn.LSTM's call: ``x [T, B, I]``, ``hx = (h0, c0)`` each ``[layers, B, H]``."""
        h0, c0 = hx
        seq_len, batch, hidden = x.size(0), x.size(1), self.hidden_size
        h_n, c_n = [], []
        for k in range(self.num_layers):
            # FlashRNN's layouts: Wx [B, T, gates, heads, H], R [gates, heads, H_out, H_in],
            # b [gates, heads, H], states [(h, c), B, 1, heads, H]; gate order i, f, g, o.
            wx = F.linear(x, getattr(self, f"weight_ih_l{k}")).transpose(0, 1)
            bias = getattr(self, f"bias_ih_l{k}") + getattr(self, f"bias_hh_l{k}")
            states, last = self.flashrnn(
                wx.reshape(batch, seq_len, 4, 1, hidden),
                getattr(self, f"weight_hh_l{k}").view(4, 1, hidden, hidden),
                bias.view(4, 1, hidden),
                states=torch.stack((h0[k], c0[k])).view(2, batch, 1, 1, hidden),
                function="lstm", backend="cuda_fused", dtype=dtype_name(x.dtype),
            )
            x = states[0].reshape(batch, seq_len, hidden).transpose(0, 1)
            h_n.append(last[0].reshape(1, batch, hidden))
            c_n.append(last[1].reshape(1, batch, hidden))
        return x, (torch.cat(h_n), torch.cat(c_n))


class EmptyLSTMFunction(torch.autograd.Function):
    """FusedLSTM's op call without the arithmetic: ``(x, h0, c0, *weights) -> (output, h_n,
    c_n)``, outputs and gradients allocated (``torch.empty``) in the right shapes and never
    written. Unidirectional, no projection: output ``[T, B, h0.size(-1)]``.

    It saves its inputs for backward, as any LSTM must (the gradients need x, the states and
    the weights)."""

    @staticmethod
    def forward(ctx, x, h0, c0, *weights):
        ctx.save_for_backward(x, h0, c0, *weights)
        output = x.new_empty((*x.shape[:-1], h0.size(-1)))
        return output, torch.empty_like(h0), torch.empty_like(c0)

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n):
        return tuple(torch.empty_like(t) for t in ctx.saved_tensors)


class FloorLSTM(nn.Module):
    """The framework floor: nn.LSTM's call, ``module(x, (h0, c0)) -> (output, (h_n, c_n))``,
    through :class:`EmptyLSTMFunction` on copies of ``lstm``'s parameters (the same names, so
    the same number of AccumulateGrad leaves), with the argument handling of a minimal module.
    Its results are garbage: it is timed, never checked."""

    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        for name, param in lstm.named_parameters():
            self.register_parameter(name, nn.Parameter(param.detach().clone()))
        self.weight_names = list(lstm._flat_weights_names)

    def forward(self, x, hx):
        """nn.LSTM's call: ``x [T, B, I]``, ``hx = (h0, c0)`` each ``[layers, B, H]``. Without
        grad, only the three outputs' allocation: an implementation need not go through an
        autograd Function there (FusedLSTM's does not), so Function.apply is no floor for it."""
        h0, c0 = hx
        if not torch.is_grad_enabled():
            return x.new_empty((*x.shape[:-1], h0.size(-1))), (torch.empty_like(h0),
                                                                 torch.empty_like(c0))
        params = self._parameters
        output, h_n, c_n = EmptyLSTMFunction.apply(x, h0, c0,
                                                   *[params[n] for n in self.weight_names])
        return output, (h_n, c_n)


def fused_lstm_copy(fused_lstm_class: type, lstm: nn.LSTM) -> nn.Module:
    """A FusedLSTM configured like ``lstm``, loaded with its state_dict."""
    param = lstm.weight_ih_l0
    fused = fused_lstm_class(lstm.input_size, lstm.hidden_size, lstm.num_layers,
                             device=param.device, dtype=param.dtype)
    fused.load_state_dict(lstm.state_dict())
    return fused


def implementations(fused_lstm) -> tuple[list[Impl], list[str]]:
    """The implementations to measure, and one line for each third-party one that is not
    importable."""
    impls = [
        Impl(BASELINE, lambda lstm: lstm),
        Impl("FusedLSTM", lambda lstm: fused_lstm_copy(fused_lstm.FusedLSTM, lstm),
             kernel_prefix="fused_lstm::",
             fallback_warning=fused_lstm.FusedLSTMFallbackWarning),
        Impl(FLOOR, FloorLSTM, floor=True),
    ]
    skipped = []
    try:
        haste = importlib.import_module("haste_pytorch")
        impls.append(Impl("haste", lambda lstm: HasteLSTM(haste, lstm), devices=("cuda",)))
    except (ImportError, OSError) as error:
        skipped.append(f"haste: skipped, haste_pytorch is not importable ({error})")
    try:
        flashrnn = importlib.import_module("flashrnn.flashrnn").flashrnn
        impls.append(Impl("FlashRNN", lambda lstm: FlashRNNLSTM(flashrnn, lstm),
                          devices=("cuda",)))
    except (ImportError, OSError, AttributeError) as error:
        skipped.append(f"FlashRNN: skipped, flashrnn is not importable ({error})")
    return impls, skipped


# ---------------------------------------------------------------------------------------------
# One workload on one device and dtype: weights, inputs, the check


@dataclass
class Case:
    """nn.LSTM weights and inputs shared by every implementation. ``x``, ``h0`` and ``c0``
    require grad; ``upstream``: the gradients of (output, h_n, c_n), made once."""

    lstm: nn.LSTM
    x: torch.Tensor
    h0: torch.Tensor
    c0: torch.Tensor
    upstream: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def make_case(workload: Workload, device: torch.device, dtype: torch.dtype) -> Case:
    """Random weights (nn.LSTM's initialisation) and random inputs, seeded by the workload."""
    torch.manual_seed(zlib.crc32(workload.name.encode()))
    w = workload
    lstm = nn.LSTM(w.input_size, w.hidden_size, w.num_layers, device=device, dtype=dtype)

    def randn(*shape, requires_grad=False):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=requires_grad)

    state_shape = (w.num_layers, w.batch, w.hidden_size)
    return Case(
        lstm=lstm,
        x=randn(w.seq_len, w.batch, w.input_size, requires_grad=True),
        h0=randn(*state_shape, requires_grad=True),
        c0=randn(*state_shape, requires_grad=True),
        upstream=(randn(w.seq_len, w.batch, w.hidden_size), randn(*state_shape),
                  randn(*state_shape)),
    )


def run_for_check(module: nn.Module, case: Case) -> dict[str, dict[str, torch.Tensor]]:
    """Per mode, the tensors to compare: train: output, h_n, c_n and the gradients of x, h0,
    c0 and of every parameter named as in nn.LSTM; infer (eval mode, no_grad): output, h_n,
    c_n."""
    module.train()
    output, (h_n, c_n) = module(case.x, (case.h0, case.c0))
    lstm_names = dict(case.lstm.named_parameters())
    params = {f"grad {name}": p for name, p in module.named_parameters() if name in lstm_names}
    wrt = {"grad input": case.x, "grad h0": case.h0, "grad c0": case.c0, **params}
    grads = torch.autograd.grad((output, h_n, c_n), list(wrt.values()), case.upstream)
    train = {"output": output, "h_n": h_n, "c_n": c_n, **dict(zip(wrt, grads, strict=True))}
    module.eval()
    with torch.no_grad():
        output, (h_n, c_n) = module(case.x, (case.h0, case.c0))
    return {"train": train, "infer": {"output": output, "h_n": h_n, "c_n": c_n}}


def as_float64(case: Case) -> Case:
    """The same case in float64: the values already rounded to the case's dtype, so that the
    reference measures arithmetic error only."""
    def leaf(t):
        return t.detach().double().requires_grad_(t.requires_grad)

    return Case(copy.deepcopy(case.lstm).double(), leaf(case.x), leaf(case.h0), leaf(case.c0),
                tuple(t.double() for t in case.upstream))


def first_mismatch(result: dict[str, torch.Tensor], baseline: dict[str, torch.Tensor],
                   reference: dict[str, torch.Tensor], dtype: torch.dtype) -> Optional[str]:
    """Why ``result`` fails the check against the float64 ``reference``, or None if it passes."""
    for name, result_tensor in result.items():
        ref = reference[name]
        if result_tensor.shape != ref.shape:
            return f"{name}: shape {list(result_tensor.shape)}, expected {list(ref.shape)}"
        error = (result_tensor.double() - ref).abs().max().item()
        baseline_error = (baseline[name].double() - ref).abs().max().item()
        allowed = 2 * baseline_error + TOLERANCE[dtype] * max(1.0, ref.abs().max().item())
        if not error <= allowed:  # NaN fails too
            return (f"{name}: max error {error:.2e} > allowed {allowed:.2e} "
                    f"(nn.LSTM's error {baseline_error:.2e})")
    return None


def check(case: Case, modules: dict[str, nn.Module], impls: dict[str, Impl],
          dtype: torch.dtype) -> dict[str, dict[str, tuple[str, str]]]:
    """``{impl: {mode: (status, detail)}}``; status "ok", "mismatch", "fallback" (the
    implementation's kernels did not run) or "error" (it raised). The floor is not checked:
    it has no verdict here."""
    reference_case = as_float64(case)
    reference = run_for_check(reference_case.lstm, reference_case)
    baseline = run_for_check(modules[BASELINE], case)
    verdicts = {BASELINE: {mode: ("ok", "") for mode in MODES}}
    for name, module in modules.items():
        impl = impls[name]
        if name == BASELINE or impl.floor:
            continue
        try:
            with warnings.catch_warnings(record=True) as caught, \
                    profile(activities=[ProfilerActivity.CPU]) as prof:
                warnings.simplefilter("always")
                result = run_for_check(module, case)
        except Exception as error:  # reported in the row, and in the exit status
            verdicts[name] = {mode: ("error", describe(error)) for mode in MODES}
            continue
        fallbacks = [str(w.message) for w in caught
                     if impl.fallback_warning and issubclass(w.category, impl.fallback_warning)]
        if impl.kernel_prefix and not any(e.name.startswith(impl.kernel_prefix)
                                          for e in prof.events()):
            fallbacks.append(f"no {impl.kernel_prefix}* operator ran")
        if fallbacks:
            detail = f"{name} ran nn.LSTM's implementation: {fallbacks[0]}"
            verdicts[name] = {mode: ("fallback", detail) for mode in MODES}
            continue
        verdicts[name] = {}
        for mode in MODES:
            why = first_mismatch(result[mode], baseline[mode], reference[mode], dtype)
            verdicts[name][mode] = ("mismatch", why) if why else ("ok", "")
    return verdicts


def describe(error: BaseException) -> str:
    """``Type: first line of the message``."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


# ---------------------------------------------------------------------------------------------
# Timing and memory


def make_step(module: nn.Module, case: Case, mode: str, streaming: bool) -> Callable[[], None]:
    """One timed call. Streaming workloads carry (h, c) from one call to the next (detached in
    train mode: one step forward and backward)."""
    x, hx, upstream = case.x, (case.h0, case.c0), case.upstream
    if not streaming:
        if mode == "train":
            def step():
                output, (h_n, c_n) = module(x, hx)
                torch.autograd.backward((output, h_n, c_n), upstream)
        else:
            def step():
                with torch.no_grad():
                    module(x, hx)
        return step

    state = (case.h0.detach().clone(), case.c0.detach().clone())
    if mode == "train":
        def step():
            nonlocal state
            output, (h_n, c_n) = module(x, state)
            torch.autograd.backward((output, h_n, c_n), upstream)
            state = (h_n.detach(), c_n.detach())
    else:
        def step():
            nonlocal state
            with torch.no_grad():
                _, state = module(x, state)
    return step


def time_interleaved(steps: dict[str, Callable[[], None]], min_run_time: float,
                     rounds: int) -> dict[str, benchmark.Measurement]:
    """Times every step for about ``min_run_time`` seconds in ``rounds`` rounds, alternating
    the order (ABBAAB...); returns one merged Measurement per step."""
    timers = {name: benchmark.Timer("step()", globals={"step": step}, description=name,
                                    num_threads=torch.get_num_threads())
              for name, step in steps.items()}
    blocks: dict[str, list[benchmark.Measurement]] = {name: [] for name in timers}
    order = list(timers)
    for round_index in range(rounds):
        for name in order if round_index % 2 == 0 else reversed(order):
            blocks[name].append(timers[name].blocked_autorange(min_run_time=min_run_time / rounds))
    return {name: benchmark.Measurement.merge(measurements)[0]
            for name, measurements in blocks.items()}


def peak_memory_bytes(new_step: Callable[[], Callable[[], None]], device: torch.device) -> int:
    """The peak memory of one call of a fresh step, above the memory held when it starts
    (see MEMORY_NOTE). The step is made inside the measurement so that nothing the call frees
    was allocated before it (the profiler cannot size such blocks)."""
    if device.type == "cuda":
        step = new_step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start

    window_name = "compare.py: measured call"
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step = new_step()
        with record_function(window_name):
            step()
    events, pending = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        events.append(event)
        pending.extend(event.children)
    window = next(e for e in events if e.name == window_name)
    allocations = sorted((e for e in events if e.tag == _EventType.Allocation),
                         key=lambda e: e.start_time_ns)
    held = 0  # bytes allocated minus bytes freed since the profiler started
    start = peak = None
    for allocation in allocations:
        if start is None and allocation.start_time_ns >= window.start_time_ns:
            start = peak = held
        held += allocation.extra_fields.alloc_size
        if start is not None and allocation.start_time_ns <= window.end_time_ns:
            peak = max(peak, held)
    return 0 if start is None else peak - start


# ---------------------------------------------------------------------------------------------
# The grid


@dataclass
class Row:
    """One line of the results: a workload, mode and implementation on a device and dtype."""

    device: str
    workload: str
    mode: str
    dtype: str
    impl: str
    status: str  # ok | mismatch | fallback | error | floor (the framework floor: not checked)
    median_ms: Optional[float] = None
    iqr_ms: Optional[float] = None
    peak_mem_mb: Optional[float] = None
    speedup: Optional[float] = None  # nn.LSTM's median / this median; None for the floor
    gflops: Optional[float] = None  # the LSTM's GEMM FLOPs / this median; None for the floor
    detail: str = ""


class Progress:
    """A progress bar over the grid on stderr; one line per step where stderr is no terminal."""

    def __init__(self, total: int):
        self.total, self.done, self.started = total, 0, time.monotonic()
        self.live = sys.stderr.isatty()

    def elapsed(self) -> str:
        """Time since the start, ``m:ss``."""
        seconds = int(time.monotonic() - self.started)
        return f"{seconds // 60}:{seconds % 60:02d}"

    def step(self, label: str) -> None:
        """Shows that the next step, ``label``, starts."""
        count = f"{self.done + 1}/{self.total}  {self.elapsed()}  {label}"
        if self.live:
            filled = 24 * self.done // self.total
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (24 - filled)}] {count}\033[K")
        else:
            sys.stderr.write(f"[{count}]\n")
        sys.stderr.flush()
        self.done += 1

    def close(self) -> None:
        """Ends the bar's line."""
        if self.live:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def measure_workload(workload: Workload, device: torch.device, dtype: torch.dtype,
                     impls: list[Impl], min_run_time: float, rounds: int,
                     progress: Progress) -> list[Row]:
    """Checks, times and measures every implementation on one workload, in both modes."""
    label = f"{device.type} {dtype_name(dtype)} {workload.name}"
    progress.step(f"{label} check")
    case = make_case(workload, device, dtype)
    by_name = {impl.name: impl for impl in impls}
    modules, verdicts, cases = {}, {}, {}
    for impl in impls:
        cases[impl.name] = floor_case(case) if impl.floor else case
        try:
            modules[impl.name] = impl.build(case.lstm)
        except Exception as error:  # reported in the row, and in the exit status
            verdicts[impl.name] = {mode: ("error", describe(error)) for mode in MODES}
            continue
        if impl.floor:
            verdicts[impl.name] = {mode: ("floor", "") for mode in MODES}
    verdicts.update(check(case, modules, by_name, dtype))

    rows = []
    for mode in MODES:
        progress.step(f"{label} {mode}")
        flops = lstm_gemm_flops(workload, mode)
        for module in modules.values():
            module.train(mode == "train")
        timed = [impl.name for impl in impls if verdicts[impl.name][mode][0] in ("ok", "floor")]
        steps = {name: make_step(modules[name], cases[name], mode, workload.streaming)
                 for name in timed}
        measurements = time_interleaved(steps, min_run_time, rounds)
        baseline = measurements.get(BASELINE)
        for impl in impls:
            status, detail = verdicts[impl.name][mode]
            row = Row(device.type, workload.name, mode, dtype_name(dtype), impl.name, status,
                      detail=detail)
            if impl.name in measurements:
                measurement = measurements[impl.name]
                row.median_ms, row.iqr_ms = measurement.median * 1e3, measurement.iqr * 1e3
                if not impl.floor:
                    row.gflops = flops / measurement.median / 1e9
                    if baseline is not None:
                        row.speedup = baseline.median / measurement.median
                new_step = functools.partial(make_step, modules[impl.name], cases[impl.name],
                                             mode, workload.streaming)
                row.peak_mem_mb = peak_memory_bytes(new_step, device) / 1e6
            rows.append(row)
    return rows


def floor_case(case: Case) -> Case:
    """The case with x, h0 and c0 copied into leaves of their own (requiring grad as well):
    the floor's gradients are garbage, and go to these leaves, not to the shared ones."""
    def leaf(t):
        return t.detach().clone().requires_grad_(t.requires_grad)

    return Case(case.lstm, leaf(case.x), leaf(case.h0), leaf(case.c0), case.upstream)


def plan(args: argparse.Namespace, impls: list[Impl]) -> tuple[list, list[str]]:
    """The grid, ``[(device, workload, dtype, impls)]``, and one line per thing left out."""
    notes = []
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        devices.remove("cuda")
        notes.append("cuda: skipped, no CUDA device (torch.cuda.is_available() is False)")
    names = set(args.workloads or [w.name for w in WORKLOADS])
    grid = []
    for device_type in devices:
        for workload in WORKLOADS:
            if workload.name not in names:
                continue
            if workload.gpu_only and device_type != "cuda":
                notes.append(f"{workload.name}: GPU-only workload, not run on {device_type}")
                continue
            here = [impl for impl in impls if device_type in impl.devices]
            grid.append((torch.device(device_type), workload,
                         DTYPES[args.dtype] if args.dtype else workload.dtype, here))
        for impl in impls:
            if device_type not in impl.devices:
                notes.append(f"{impl.name}: CUDA-only kernels, not run on {device_type}")
    return grid, notes


# ---------------------------------------------------------------------------------------------
# The ceilings: the framework floor and the GEMM rate


def lstm_gemm_flops(workload: Workload, mode: str, num_directions: int = 1,
                    proj_size: int = 0) -> float:
    """The GEMM FLOPs of one call (a multiply-add counts 2; the cell's elementwise math is not
    counted). Per layer l and direction, with rows = seq_len * batch, H the hidden size,
    out = proj_size or H and I_l the layer's input size (input_size for l = 0, then
    num_directions * out):

        forward = 2 * rows * 4H * (I_l + out)  [+ 2 * rows * H * proj_size with a projection]

    (the input projection and the T recurrent products). ``infer`` is the forward; ``train``
    is 3 x forward: the forward, the data gradients (dgates W_ih for dx, dgates W_hh for dh:
    as many FLOPs as the forward's products) and the weight gradients (dgates^T x and
    dgates^T h: as many again)."""
    w = workload
    rows, hidden = w.seq_len * w.batch, w.hidden_size
    out = proj_size or hidden
    forward = 0
    for layer in range(w.num_layers):
        layer_input = w.input_size if layer == 0 else num_directions * out
        per_direction = 2 * rows * 4 * hidden * (layer_input + out)
        if proj_size:
            per_direction += 2 * rows * hidden * proj_size
        forward += num_directions * per_direction
    return float(3 * forward if mode == "train" else forward)


FLOPS_NOTE = ("GFLOP/s: the LSTM's GEMM FLOPs / the row's median. FLOPs per layer (l) and "
              "direction, rows = seq * batch: forward 2 * rows * 4H * (I_l + H) (input "
              "projection and recurrence; I_l = input size, then H); train = 3 x forward (the "
              "forward, the data gradients dgates W_ih and dgates W_hh, the weight gradients "
              "dgates^T x and dgates^T h); infer = forward; elementwise cell math not counted")


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
    """PEAK_SHAPES and each workload's input projection [T*B, I] x [I, 4H], as (M, K, N)."""
    shapes = list(PEAK_SHAPES)
    shapes += [(w.seq_len * w.batch, w.input_size, 4 * w.hidden_size) for w in workloads]
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


@dataclass
class Ceiling:
    """The two ceilings of one workload and mode on a device and dtype. ``floor_ceiling``:
    nn.LSTM's median / the floor's median; ``gemm_bound_ms``: the LSTM's GEMM FLOPs at the
    peak rate; ``gemm_ceiling``: nn.LSTM's median / gemm_bound_ms; ``ceiling``: the smaller
    of the two (None where neither was measured)."""

    device: str
    workload: str
    mode: str
    dtype: str
    gflop: float  # GEMM GFLOP of one call
    baseline_ms: Optional[float] = None
    floor_ms: Optional[float] = None
    floor_ceiling: Optional[float] = None
    gemm_bound_ms: Optional[float] = None
    gemm_ceiling: Optional[float] = None
    ceiling: Optional[float] = None
    fused_speedup: Optional[float] = None


def ceilings(rows: list[Row], peaks: list[GemmPeak],
             workloads: list[Workload]) -> list[Ceiling]:
    """One Ceiling per (device, dtype, workload, mode) in ``rows``."""
    by_name = {w.name: w for w in workloads}
    peak = {(p.device, p.dtype): p.gflops for p in peaks}
    cells = {}
    for row in rows:
        key = (row.device, row.workload, row.mode, row.dtype)
        if key not in cells:
            gflop = lstm_gemm_flops(by_name[row.workload], row.mode) / 1e9
            cells[key] = Ceiling(*key, gflop=gflop)
        cell = cells[key]
        if row.impl == BASELINE:
            cell.baseline_ms = row.median_ms
        elif row.impl == FLOOR:
            cell.floor_ms = row.median_ms
        elif row.impl == "FusedLSTM":
            cell.fused_speedup = row.speedup
    for (device, _, _, dtype), cell in cells.items():
        rate = peak.get((device, dtype))
        if rate:
            cell.gemm_bound_ms = cell.gflop / rate * 1e3
        if cell.baseline_ms is not None:
            if cell.floor_ms:
                cell.floor_ceiling = cell.baseline_ms / cell.floor_ms
            if cell.gemm_bound_ms:
                cell.gemm_ceiling = cell.baseline_ms / cell.gemm_bound_ms
        bounds = [c for c in (cell.floor_ceiling, cell.gemm_ceiling) if c is not None]
        cell.ceiling = min(bounds) if bounds else None
    return list(cells.values())


@dataclass(frozen=True)
class Target:
    """A speedup target of FusedLSTM over nn.LSTM (``kind`` "speedup"), or a share of the peak
    GEMM rate (``kind`` "peak share": FusedLSTM's GFLOP/s / the peak)."""

    issue: int
    device: str
    dtype: str
    workload: str
    mode: str
    value: float
    kind: str = "speedup"


def _targets(issue: int, device: str, entries) -> tuple[Target, ...]:
    return tuple(Target(issue, device, dtype, workload, mode, value)
                 for workload, dtype, modes, value in entries for mode in modes)


INFER = ("infer",)
# Issue 5 (CPU, float32) and issue 8 (CUDA).
TARGETS = (
    *_targets(5, "cpu", (("seed-tiny", "float32", MODES, 10.0), ("small", "float32", MODES, 10.0),
                         ("stream-step", "float32", INFER, 5.0),
                         ("medium", "float32", MODES, 1.2), ("fastrnns", "float32", MODES, 1.0))),
    Target(5, "cpu", "float32", "fastrnns", "infer", 0.8, kind="peak share"),
    *_targets(8, "cuda", (("seed-tiny", "float32", MODES, 5.0), ("small", "float32", MODES, 5.0),
                          ("stream-step", "float32", INFER, 3.0),
                          ("medium", "float32", MODES, 1.5), ("fastrnns", "float32", MODES, 1.0),
                          ("flashrnn", "bfloat16", MODES, 1.0))),
)


def evaluate_targets(rows: list[Row], cells: list[Ceiling],
                     peaks: list[GemmPeak]) -> list[dict]:
    """Each target whose workload and mode were measured: the measured value, the smaller
    ceiling and the verdict, ``met``, ``not met``, ``above ceiling`` (the target exceeds the
    ceiling measured in this run) or ``not measured (status)`` (FusedLSTM's row was not timed).
    For a peak share, the ceiling is min(1, GEMM bound / floor median)."""
    fused = {(r.device, r.dtype, r.workload, r.mode): r for r in rows if r.impl == "FusedLSTM"}
    by_key = {(c.device, c.dtype, c.workload, c.mode): c for c in cells}
    peak = {(p.device, p.dtype): p.gflops for p in peaks}
    results = []
    for target in TARGETS:
        key = (target.device, target.dtype, target.workload, target.mode)
        if key not in by_key or key not in fused:
            continue
        cell, row = by_key[key], fused[key]
        if target.kind == "speedup":
            measured = row.speedup
            limits = {"floor": cell.floor_ceiling, "GEMM": cell.gemm_ceiling}
        else:
            rate = peak.get((target.device, target.dtype))
            measured = row.gflops / rate if row.gflops is not None and rate else None
            limits = {"GEMM peak": 1.0 if rate else None,
                      "floor": (cell.gemm_bound_ms / cell.floor_ms
                                if cell.gemm_bound_ms and cell.floor_ms else None)}
        limits = {name: value for name, value in limits.items() if value is not None}
        bound = min(limits, key=limits.get) if limits else None
        ceiling = limits[bound] if bound else None
        if measured is None:
            verdict = f"not measured ({row.status})"
        elif measured >= target.value:
            verdict = "met"
        elif ceiling is not None and target.value > ceiling:
            verdict = "above ceiling"
        else:
            verdict = "not met"
        results.append({**asdict(target), "measured": measured, "ceiling": ceiling,
                        "ceiling_from": bound, "verdict": verdict})
    return results



# ---------------------------------------------------------------------------------------------
# The machine, and the results as text


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


def three_digits(value: float) -> str:
    """``value`` to three significant digits, trailing zeros kept: ``1.00``, ``12.3``, ``412``."""
    decimals = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return f"{value:.{decimals}f}"


def format_time(ms: Optional[float]) -> str:
    """``412 us``, ``1.23 ms``, ``2.05 s``; ``-`` for None."""
    if ms is None:
        return "-"
    unit, scale = ("s", 1e3) if ms >= 1e3 else ("ms", 1.0) if ms >= 1 else ("us", 1e-3)
    return f"{three_digits(ms / scale)} {unit}"


def format_mb(mb: Optional[float]) -> str:
    """``812 kB``, ``12.3 MB``; ``-`` for None."""
    if mb is None:
        return "-"
    return f"{three_digits(mb)} MB" if mb >= 1 else f"{three_digits(mb * 1e3)} kB"


def format_speedup(speedup: Optional[float]) -> str:
    """``0.87x``, ``12.3x``, ``140x``; ``-`` for None."""
    return "-" if speedup is None else f"{three_digits(speedup)}x"


def format_rate(gflops: Optional[float]) -> str:
    """GFLOP/s or GFLOP: ``412``, ``12.3``, ``0.0123``; ``-`` for None."""
    if gflops is None:
        return "-"
    return three_digits(gflops) if gflops >= 1 else f"{gflops:.3g}"


COLUMNS = ("workload", "mode", "impl", "median", "IQR", "peak mem", "speedup", "GFLOP/s",
           "status")
CEILING_COLUMNS = ("workload", "mode", "GFLOP/call", "nn.LSTM", "floor", "floor ceiling",
                   "GEMM bound", "GEMM ceiling", "ceiling", "FusedLSTM")
TARGET_COLUMNS = ("issue", "workload", "mode", "target", "FusedLSTM", "ceiling", "verdict")
LEFT = {"workload", "mode", "impl", "status", "verdict"}


def table_cells(rows: list[Row]) -> list[tuple[str, ...]]:
    """The table's cells, in COLUMNS order."""
    return [(r.workload, r.mode, r.impl, format_time(r.median_ms), format_time(r.iqr_ms),
             format_mb(r.peak_mem_mb), format_speedup(r.speedup), format_rate(r.gflops),
             r.status) for r in rows]


def ceiling_cells(cells: list[Ceiling]) -> list[tuple[str, ...]]:
    """The ceilings table's cells, in CEILING_COLUMNS order."""
    return [(c.workload, c.mode, format_rate(c.gflop), format_time(c.baseline_ms),
             format_time(c.floor_ms), format_speedup(c.floor_ceiling),
             format_time(c.gemm_bound_ms), format_speedup(c.gemm_ceiling),
             format_speedup(c.ceiling), format_speedup(c.fused_speedup)) for c in cells]


def format_target(value: Optional[float], kind: str) -> str:
    """``10.0x`` for a speedup, ``80%`` for a peak share; ``-`` for None."""
    if value is None:
        return "-"
    return format_speedup(value) if kind == "speedup" else f"{value:.0%}"


def target_cells(targets: list[dict]) -> list[tuple[str, ...]]:
    """The targets table's cells, in TARGET_COLUMNS order."""
    cells = []
    for t in targets:
        kind = t["kind"]
        goal = f">= {format_target(t['value'], kind)}"
        if kind != "speedup":
            goal += " of peak GEMM rate"
        ceiling = format_target(t["ceiling"], kind)
        if t["ceiling_from"]:
            ceiling += f" ({t['ceiling_from']})"
        cells.append((str(t["issue"]), t["workload"], t["mode"], goal,
                      format_target(t["measured"], kind), ceiling, t["verdict"]))
    return cells


def tables(rows: list) -> dict[tuple[str, str], list]:
    """Rows (or ceilings, or targets) grouped by (device, dtype), in order of appearance."""
    grouped: dict[tuple[str, str], list] = {}
    for row in rows:
        key = (row["device"], row["dtype"]) if isinstance(row, dict) else (row.device, row.dtype)
        grouped.setdefault(key, []).append(row)
    return grouped


def text_table(rows: list[Row], columns: tuple[str, ...] = COLUMNS,
               cells: Optional[list[tuple[str, ...]]] = None) -> str:
    """An aligned plain-text table (numbers right-aligned); ``cells`` default to the rows'."""
    lines = [columns, *(table_cells(rows) if cells is None else cells)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(w) if name in LEFT else cell.rjust(w)
                  for cell, w, name in zip(line, widths, columns, strict=True)).rstrip()
        for line in lines)


def markdown_table(rows: list[Row], columns: tuple[str, ...] = COLUMNS,
                   cells: Optional[list[tuple[str, ...]]] = None) -> str:
    """A GitHub-flavoured markdown table; ``cells`` default to the rows'."""
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---" if c in LEFT else "---:" for c in columns) + "|"]
    lines += ["| " + " | ".join(line) + " |"
              for line in (table_cells(rows) if cells is None else cells)]
    return "\n".join(lines)


def failures(rows: list[Row]) -> list[str]:
    """One line per row that was not timed, with the reason."""
    return [f"{r.device} {r.dtype} {r.workload} {r.mode} {r.impl}: {r.status}: {r.detail}"
            for r in rows if r.status not in ("ok", "floor")]


def machine_lines(machine: dict, tests: Optional[dict]) -> list[str]:
    """The machine and versions, as ``key: value`` lines."""
    lines = [
        f"cpu: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} torch threads",
        f"gpu: {machine['gpu'] or 'none'}",
        f"torch: {machine['torch']}, CUDA {machine['cuda'] or 'none'}, "
        f"Python {machine['python']}",
        f"fused_lstm: {machine['fused_lstm']}",
        f"commit: {machine['commit']}",
        f"date: {machine['date']}",
    ]
    if tests is not None:
        lines.append(f"tests: {tests['passed']} passed, {tests['failed']} failed, "
                     f"{tests['skipped']} skipped")
    return lines


def peak_lines(peaks: list[GemmPeak]) -> list[str]:
    """One line per measured GEMM peak: the rate, the library and what it ran, the shape;
    the other libraries' best rates."""
    lines = []
    for p in peaks:
        head = f"GEMM peak ({p.device}, {p.dtype}, {p.threads} threads): "
        if p.gflops is None:
            lines.append(head + "not measured: " + "; ".join(p.notes))
            continue
        names = {library: f"{library} ({entry['ran']})" if entry.get("ran") else library
                 for library, entry in p.libraries.items()}
        others = []
        for library in p.libraries:
            rates = [s["gflops"][library] for s in p.shapes
                     if s["gflops"].get(library) is not None]
            if library != p.library and rates:
                others.append(f"{names[library]} best {format_rate(max(rates))} GFLOP/s")
        lines.append(head + f"{format_rate(p.gflops)} GFLOP/s by {names[p.library]} at "
                     f"{'x'.join(map(str, p.shape))} (MxKxN)"
                     + (f"; {', '.join(others)}" if others else ""))
    return lines


def ceiling_paragraph(targets: list[dict]) -> str:
    """Which issue targets exceed the ceiling measured in this run."""
    if not targets:
        return "No issue target applies to the workloads, devices and dtypes measured."
    above = [t for t in targets if t["verdict"] == "above ceiling"]
    issues = " and ".join(f"issue {i}" for i in sorted({t["issue"] for t in targets}))
    if not above:
        return (f"No {issues} target measured here exceeds its ceiling in this run: each is "
                "reachable in principle on this machine.")
    items = [f"{t['workload']} {t['mode']} (>= {format_target(t['value'], t['kind'])}"
             + (" of peak" if t["kind"] != "speedup" else "")
             + f", ceiling {format_target(t['ceiling'], t['kind'])} from the "
             f"{t['ceiling_from']}, {t['device']} {t['dtype']})" for t in above]
    return (f"Targets of {issues} above the ceiling measured in this run (the largest speedup "
            "this machine allows, see the ceilings table): " + "; ".join(items)
            + ". Every other target measured here is below its ceiling.")


def legend_lines(workloads: list[Workload], devices: set[str]) -> list[str]:
    """What the workloads are and how each column is measured."""
    return [
        "workloads (input, hidden, layers, seq, batch): "
        + ", ".join(w.shape() for w in workloads),
        "median, IQR: time of one call; train: forward + backward of output, h_n and c_n; "
        "infer: forward under no_grad, eval mode",
        "speedup: nn.LSTM's median / this row's median",
        f"check: {CHECK_NOTE}",
        *(f"peak mem ({device}): {MEMORY_NOTE[device]}" for device in sorted(devices)),
        f"{FLOOR}: the framework floor, timed in the same interleaved rounds as the others and "
        "not checked (status floor): FusedLSTM's call structure with no arithmetic, a module "
        "that unpacks (h0, c0) and calls one Python torch.autograd.Function on (x, h0, c0, "
        "the 8 flat weights, its own copies of the parameters) that saves them for backward "
        "and returns torch.empty outputs (forward) and gradients (backward). Train: its time "
        "is the autograd engine's graph task, the Function's node, the AccumulateGrad of "
        "every leaf (x, h0, c0 and the weights all require grad), the Python module call and "
        "the allocations; infer: the module call and the three outputs' allocation (no "
        "autograd Function: none is needed without grad, and FusedLSTM's no-grad call goes "
        "through none)",
        "GEMM peak: the best GEMM rate in the run's dtype (float32 unless --dtype), "
        "2 M N K / the best timed block's time per call, over the shapes "
        + ", ".join("x".join(map(str, s)) for s in PEAK_SHAPES)
        + " and each workload's input projection [T*B, I] x [I, 4H] (MxKxN), in the "
        "benchmark's thread count, measured once before the workloads. CPU: torch.mm (MKL "
        "sgemm on x86) and oneDNN's inner product (torch.ops.mkldnn._linear_pointwise, weight "
        "prepacked by torch.ops.mkldnn._reorder_linear_weight); the kernel each ran is read "
        "from MKL's and oneDNN's verbose logs. CUDA: torch.mm with TF32 off",
        FLOPS_NOTE,
        "ceilings: floor ceiling = nn.LSTM's median / the floor's median, the largest speedup "
        "any implementation called through PyTorch's autograd this way can show; GEMM bound = "
        "GEMM FLOPs / the peak rate; GEMM ceiling = nn.LSTM's median / the GEMM bound, the "
        "largest speedup a GEMM-bound implementation can reach on this machine (the peak is "
        "the best block, nn.LSTM's time a median: both err in the target's favour); ceiling: "
        "the smaller of the two",
    ]


def write_plot(rows: list[Row], path: pathlib.Path,
               cells: Optional[list[Ceiling]] = None) -> Optional[str]:
    """Bar chart of the speedups over nn.LSTM per workload and mode (log scale), one bar per
    implementation, one panel per device and dtype, the ceiling of each workload and mode
    marked. Returns why it was not written, if not."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return "matplotlib is not installed: speedup.png not written (pip install matplotlib)"
    panels = {key: [r for r in group if r.impl != BASELINE and r.speedup is not None]
              for key, group in tables(rows).items()}
    panels = {key: group for key, group in panels.items() if group}
    if not panels:
        return "no speedups measured: speedup.png not written"
    ceiling = {(c.device, c.dtype, c.workload, c.mode): c.ceiling for c in cells or ()}
    # Log-scale ticks labelled 0.5x, 1x, 2x, 5x, 10x...
    ticks = FuncFormatter(lambda value, _: f"{value:g}x" if f"{value:e}"[0] in "125" else "")
    widest = max(len({(r.workload, r.mode) for r in group}) for group in panels.values())
    figure = Figure(figsize=(max(6.0, 1.3 * widest + 1), 4.2 * len(panels)),
                    layout="constrained")
    all_axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    for axes, ((device, dtype), group) in zip(all_axes, panels.items(), strict=True):
        cells_here = list(dict.fromkeys((r.workload, r.mode) for r in group))
        names = list(dict.fromkeys(r.impl for r in group))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            speedup = {(r.workload, r.mode): r.speedup for r in group if r.impl == name}
            positions = [j + (i - (len(names) - 1) / 2) * width
                         for j, cell in enumerate(cells_here) if cell in speedup]
            values = [speedup[cell] for cell in cells_here if cell in speedup]
            # Bars start at 1 (nn.LSTM), so a slowdown points down.
            bars = axes.bar(positions, [v - 1 for v in values], width, bottom=1, label=name)
            axes.bar_label(bars, labels=[format_speedup(v) for v in values], fontsize=8)
        marks = [(j, ceiling.get((device, dtype, *cell))) for j, cell in enumerate(cells_here)]
        marks = [(j, value) for j, value in marks if value is not None]
        if marks:
            axes.hlines([value for _, value in marks], [j - 0.45 for j, _ in marks],
                        [j + 0.45 for j, _ in marks], colors="black", linewidth=1.5,
                        label="ceiling")
        axes.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="nn.LSTM")
        axes.set_yscale("log")
        axes.margins(y=0.15)  # room for the bar labels
        axes.yaxis.set_major_formatter(ticks)
        axes.yaxis.set_minor_formatter(ticks)
        axes.set_xticks(range(len(cells_here)), [f"{w}\n{m}" for w, m in cells_here])
        axes.set_ylabel("speedup over nn.LSTM (log)")
        axes.set_title(f"{device}, {dtype}: nn.LSTM time / implementation time")
        axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.savefig(path, dpi=120)
    return None


def write_results(out: pathlib.Path, machine: dict, rows: list[Row], tests: Optional[dict],
                  workloads: list[Workload], peaks: list[GemmPeak], cells: list[Ceiling],
                  targets: list[dict], targets_table: bool = False,
                  ) -> tuple[list[pathlib.Path], Optional[str]]:
    """Writes results.json, results.md and speedup.png under ``out``; returns the paths
    written, and why the plot was not, if it was not."""
    out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "gemm_peaks": [asdict(p) for p in peaks],
              "rows": [asdict(row) for row in rows], "ceilings": [asdict(c) for c in cells],
              "targets": targets}
    if tests is not None:
        report["tests"] = tests
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    written = [out / "results.json", out / "results.md"]
    plot_note = write_plot(rows, out / "speedup.png", cells)
    if plot_note is None:
        written.append(out / "speedup.png")
    md = ["# FusedLSTM vs torch.nn.LSTM", ""]
    md += [f"- {line}" for line in machine_lines(machine, tests) + peak_lines(peaks)]
    ceilings_by = tables(cells)
    for key, group in tables(rows).items():
        md += ["", f"## {key[0]}, {key[1]}", "", markdown_table(group)]
        if ceilings_by.get(key):
            md += ["", "Ceilings (how far any implementation could go; see below):", "",
                   markdown_table([], CEILING_COLUMNS, ceiling_cells(ceilings_by[key]))]
    md += ["", ceiling_paragraph(targets)]
    if targets_table and targets:
        md += ["", "## Targets", "", "Issue 5 (CPU, float32) and issue 8 (CUDA): FusedLSTM's "
               "speedup over nn.LSTM against the target and the smaller of the two ceilings "
               "(for fastrnns infer also its GEMM rate as a share of the peak GEMM rate).", ""]
        for (device, dtype), group in tables(targets).items():
            md += [f"{device}, {dtype}:", "",
                   markdown_table([], TARGET_COLUMNS, target_cells(group)), ""]
        md.pop()
    if failures(rows):
        md += ["", "Not timed:", ""] + [f"- {line}" for line in failures(rows)]
    if plot_note is None:
        md += ["", "![speedup over nn.LSTM](speedup.png)"]
    md += ["", "## How it was measured", ""]
    md += [f"- {line}" for line in legend_lines(workloads, {row.device for row in rows})]
    (out / "results.md").write_text("\n".join(md) + "\n")
    return written, plot_note


# ---------------------------------------------------------------------------------------------


def import_fused_lstm():
    """The installed fused_lstm, or else this checkout's (compiled on first import)."""
    if importlib.util.find_spec("fused_lstm") is None:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module("fused_lstm")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="Times FusedLSTM against torch.nn.LSTM (and haste, FlashRNN where "
                    "installed) after checking that they compute the same.",
        epilog="Exit status 1 when a FusedLSTM row fails its check or raises.")
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="default: every device present")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_MIN_RUN_TIME:g} s of timing per row instead of "
                             f"{MIN_RUN_TIME:g} (under 2 minutes on a 2-core CPU)")
    parser.add_argument("--workloads", nargs="+", metavar="NAME",
                        choices=[w.name for w in WORKLOADS],
                        help="default: all that fit the device: "
                             + ", ".join(w.shape() for w in WORKLOADS)
                             + " (input, hidden, layers, seq, batch); flashrnn runs on GPU only")
    parser.add_argument("--dtype", choices=DTYPES,
                        help="default: float32, and bfloat16 for flashrnn")
    parser.add_argument("--out", type=pathlib.Path, metavar="DIR",
                        help="write results.json, results.md and speedup.png there")
    parser.add_argument("--min-run-time", type=float, metavar="SECONDS",
                        help="seconds of timing per implementation, workload and mode "
                             "(overrides the --quick default)")
    parser.add_argument("--targets", action="store_true",
                        help="also list the issues' targets (issue 5: CPU float32, issue 8: "
                             "CUDA) with FusedLSTM's measured speedup, the smaller ceiling and "
                             "a verdict (printed, and in results.md)")
    parser.add_argument("--tests-junit", metavar="FILE",
                        help="JUnit XML of a test run (pytest --junitxml=FILE) to report "
                             "alongside the timings")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Runs the benchmark; returns the exit status."""
    args = parse_args(argv)
    try:
        tests = read_junit(args.tests_junit) if args.tests_junit else None
    except (OSError, ElementTree.ParseError) as error:
        sys.exit(f"compare.py: --tests-junit {args.tests_junit}: {error}")
    # Kineto's own log lines (profiler start/stop) would interleave with the progress bar.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    fused_lstm = import_fused_lstm()
    impls, notes = implementations(fused_lstm)
    grid, plan_notes = plan(args, impls)
    devices = {device.type for device, *_ in grid}
    machine = machine_info(devices, fused_lstm)
    workloads = list(dict.fromkeys(workload for _, workload, _, _ in grid))

    print("FusedLSTM vs torch.nn.LSTM")
    print("\n".join(f"  {line}" for line in machine_lines(machine, tests)))
    print("\n".join(notes + list(dict.fromkeys(plan_notes))), flush=True)
    if not grid:
        print("nothing to measure here with these options")
        return 0

    min_run_time = args.min_run_time or (QUICK_MIN_RUN_TIME if args.quick else MIN_RUN_TIME)
    rounds = QUICK_ROUNDS if args.quick else ROUNDS
    peak_run_time = min(min_run_time, QUICK_PEAK_MIN_RUN_TIME if args.quick
                        else PEAK_MIN_RUN_TIME)
    # The GEMM peak of each device and dtype, then per workload: check, then each mode.
    peak_keys = list(dict.fromkeys((device, dtype) for device, _, dtype, _ in grid))
    progress = Progress(total=len(peak_keys) + len(grid) * (1 + len(MODES)))
    peaks = []
    for device, dtype in peak_keys:
        progress.step(f"{device.type} {dtype_name(dtype)} GEMM peak")
        here = [w for d, w, t, _ in grid if (d, t) == (device, dtype)]
        try:
            peaks.append(measure_gemm_peak(device, dtype, here, peak_run_time))
        except Exception as error:  # the timings still run, without the GEMM ceiling
            peaks.append(GemmPeak(device.type, dtype_name(dtype), torch.get_num_threads(),
                                  notes=[describe(error)]))
    rows = []
    for device, workload, dtype, here in grid:
        try:
            rows += measure_workload(workload, device, dtype, here, min_run_time, rounds,
                                     progress)
        except Exception as error:  # e.g. out of memory: the other workloads still run
            rows += [Row(device.type, workload.name, mode, dtype_name(dtype), impl.name,
                         "error", detail=describe(error))
                     for mode in MODES for impl in here]
    progress.close()
    cells = ceilings(rows, peaks, workloads)
    targets = evaluate_targets(rows, cells, peaks)

    def wrapped(lines):
        return "\n".join(textwrap.fill(line, 100, subsequent_indent="    ") for line in lines)

    print("\n" + wrapped(peak_lines(peaks)))
    ceilings_by = tables(cells)
    for key, group in tables(rows).items():
        print(f"\n{key[0]}, {key[1]}\n{text_table(group)}")
        if ceilings_by.get(key):
            print(f"\nceilings\n{text_table([], CEILING_COLUMNS, ceiling_cells(ceilings_by[key]))}")
    print("\n" + wrapped([ceiling_paragraph(targets)]))
    if args.targets:
        for (device, dtype), group in tables(targets).items():
            print(f"\ntargets, {device}, {dtype}\n"
                  f"{text_table([], TARGET_COLUMNS, target_cells(group))}")
    if failures(rows):
        print("\nNot timed:\n" + "\n".join(failures(rows)))
    print("\n" + wrapped(legend_lines(workloads, devices)))
    if args.out is not None:
        written, plot_note = write_results(args.out, machine, rows, tests, workloads, peaks,
                                           cells, targets, targets_table=args.targets)
        print(("" if plot_note is None else f"\n{plot_note}")
              + "\nwrote " + ", ".join(str(path) for path in written))
    print(f"measured in {progress.elapsed()}")
    failed = any(r.impl == "FusedLSTM" and r.status in ("mismatch", "error") for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
