"""The grid of runs, ``(device, workload, dtype, implementations)``, and its measurement: for each
workload the check, then the timings and peak memory of both modes, one :class:`Row` each."""

from __future__ import annotations

import argparse
import functools
import sys
import time
from dataclasses import dataclass, replace
from typing import Optional

import torch

from .check import check, describe
from .floor import floor_case
from .gemm_peak import GemmPeak, measure_gemm_peak
from .implementations import BASELINE, Impl
from .timing import make_step, peak_memory_bytes, time_interleaved
from .workloads import DTYPES, MODES, WORKLOADS, Workload, dtype_name, lstm_gemm_flops, make_case


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
    ran: str = ""  # what the call ran, where the implementation says (Impl.explain)


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
            verdicts[impl.name] = {mode: ("error", describe(error)) for mode in impl.modes}
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
        here = [impl for impl in impls if mode in impl.modes]
        timed = [impl.name for impl in here if verdicts[impl.name][mode][0] in ("ok", "floor")]
        steps = {name: make_step(modules[name], cases[name], mode, workload.streaming)
                 for name in timed}
        measurements = time_interleaved(steps, min_run_time, rounds)
        baseline = measurements.get(BASELINE)
        for impl in here:
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
                if not impl.foreign_memory and workload.profile_memory:
                    row.peak_mem_mb = peak_memory_bytes(new_step, device) / 1e6
                if impl.explain is not None:
                    row.ran = impl.explain(modules[impl.name], cases[impl.name], mode)
            rows.append(row)
    return rows


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
            if args.quick:
                workload = workload.quick()
            if not args.input_grad:
                workload = replace(workload, input_grad=False)
            dtype = DTYPES[args.dtype] if args.dtype else workload.dtype
            here = [impl for impl in impls if device_type in impl.devices]
            for impl in here:
                if impl.dtypes is not None and dtype not in impl.dtypes:
                    notes.append(f"{impl.name}: " + ", ".join(map(dtype_name, impl.dtypes))
                                 + f" only, not run in {dtype_name(dtype)}")
            here = [impl for impl in here if impl.dtypes is None or dtype in impl.dtypes]
            grid.append((torch.device(device_type), workload, dtype, here))
        for impl in impls:
            if device_type not in impl.devices:
                only = "CUDA-only kernels" if impl.devices == ("cuda",) else \
                    f"runs on {', '.join(impl.devices)} only"
                notes.append(f"{impl.name}: {only}, not run on {device_type}")
    return grid, notes


def grid_steps(grid: list) -> int:
    """The progress bar's steps over ``grid``: the GEMM peak of each device and dtype, then
    per workload the check and each mode."""
    peak_keys = {(device, dtype) for device, _, dtype, _ in grid}
    return len(peak_keys) + len(grid) * (1 + len(MODES))


def measure_grid(grid: list, min_run_time: float, rounds: int, peak_run_time: float,
                 progress: Progress) -> tuple[list[GemmPeak], list[Row]]:
    """The GEMM peak of each device and dtype, then per workload: check, then each mode."""
    peak_keys = list(dict.fromkeys((device, dtype) for device, _, dtype, _ in grid))
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
                     for mode in MODES for impl in here if mode in impl.modes]
    progress.close()
    return peaks, rows
