"""The issues' speedup targets and their verdicts against the measured ceilings."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .ceilings import Ceiling
from .gemm_peak import GemmPeak
from .grid import Row
from .workloads import MODES


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
