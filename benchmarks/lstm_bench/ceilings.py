"""The ceilings on the speedup of each workload and mode: the framework floor's and the GEMM
rate's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .floor import FLOOR
from .gemm_peak import GemmPeak
from .grid import Row
from .implementations import BASELINE
from .workloads import Workload, lstm_gemm_flops


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
