"""The results as text: the terminal's tables, results.json, results.md and speedup.png."""

from __future__ import annotations

import json
import pathlib
import textwrap
from dataclasses import asdict, dataclass
from typing import Optional

from .ceilings import Ceiling
from .check import CHECK_NOTE
from .floor import FLOOR
from .gemm_peak import PEAK_SHAPES, GemmPeak
from .grid import Row
from .implementations import BASELINE
from .machine import ISA_FLAGS
from .ort import ORT
from .timing import MEMORY_NOTE
from .workloads import FLOPS_NOTE, Workload


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
LEFT = {"workload", "mode", "impl", "status", "fastest other"}


PEER_COLUMNS = ("workload", "mode", "fastest other", "its median", "FusedLSTM", "speedup")
FUSED = "FusedLSTM"


@dataclass
class PeerCell:
    """FusedLSTM against the fastest other implementation timed (status ok) on one workload,
    mode, device and dtype: nn.LSTM, ONNX Runtime, haste, FlashRNN (never the floor).
    ``speedup``: the peer's median / FusedLSTM's."""

    device: str
    workload: str
    mode: str
    dtype: str
    peer: str
    peer_ms: float
    fused_ms: float
    speedup: float


def fastest_peers(rows: list[Row]) -> list[PeerCell]:
    """One PeerCell per (device, dtype, workload, mode) where FusedLSTM and another
    implementation were timed."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.device, row.workload, row.mode, row.dtype), []).append(row)
    cells = []
    for key, group in groups.items():
        timed = [r for r in group if r.status == "ok" and r.median_ms is not None]
        fused = next((r for r in timed if r.impl == FUSED), None)
        peers = [r for r in timed if r.impl != FUSED]
        if fused is None or not peers:
            continue
        best = min(peers, key=lambda r: r.median_ms)
        cells.append(PeerCell(*key, best.impl, best.median_ms, fused.median_ms,
                              best.median_ms / fused.median_ms))
    return cells


def peer_table_wanted(rows: list[Row]) -> bool:
    """Whether the fastest-peer table says more than the speedup column: an implementation
    other than nn.LSTM, FusedLSTM and the floor has rows."""
    return any(r.impl not in (BASELINE, FUSED, FLOOR) for r in rows)


def peer_cells(cells: list[PeerCell]) -> list[tuple[str, ...]]:
    """The fastest-peer table's cells, in PEER_COLUMNS order."""
    return [(c.workload, c.mode, c.peer, format_time(c.peer_ms), format_time(c.fused_ms),
             format_speedup(c.speedup)) for c in cells]


PEER_TITLE = ("FusedLSTM vs the fastest other implementation (speedup: its median / "
              "FusedLSTM's)")


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


def tables(rows: list) -> dict[tuple[str, str], list]:
    """Rows (or ceilings) grouped by (device, dtype), in order of appearance."""
    grouped: dict[tuple[str, str], list] = {}
    for row in rows:
        grouped.setdefault((row.device, row.dtype), []).append(row)
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


RAN_TITLE = "What FusedLSTM ran (fused_lstm.explain after the timed calls)"


def ran_lines(rows: list[Row]) -> list[str]:
    """One line per row whose implementation said what it ran (Row.ran)."""
    return [f"{r.workload} {r.mode}: {r.ran}" for r in rows if r.ran]


def cpu_line(machine: dict) -> str:
    """``Intel(R) Xeon(R) Processor (GenuineIntel, family 6, model 143, stepping 8)``: the model
    name, then what /proc/cpuinfo gave of the vendor and CPUID numbers."""
    ids = [machine.get("cpu_vendor")] + [
        f"{key} {machine[f'cpu_{key}']}" for key in ("family", "model", "stepping")
        if machine.get(f"cpu_{key}") is not None]
    ids = [part for part in ids if part]
    return machine["cpu"] + (f" ({', '.join(ids)})" if ids else "")


def isa_line(machine: dict) -> str:
    """The ISA features of ISA_FLAGS the CPU has, then those it lacks."""
    have = machine.get("isa", [])
    lacks = [name for name, _ in ISA_FLAGS if name not in have]
    return (", ".join(have) or "none of " + ", ".join(name for name, _ in ISA_FLAGS)) + (
        f"; not {', '.join(lacks)}" if lacks and have else "")


def machine_lines(machine: dict, tests: Optional[dict]) -> list[str]:
    """The machine and versions, as ``key: value`` lines."""
    lines = [
        f"cpu: {cpu_line(machine)}, {machine['cores']} cores, {machine['threads']} torch "
        "threads",
        f"isa: {isa_line(machine)}",
        f"blas: {machine.get('blas', 'unknown')}",
        f"malloc: {machine.get('malloc', 'not recorded')}",
        f"gpu: {machine['gpu'] or 'none'}",
        f"torch: {machine['torch']}, CUDA {machine['cuda'] or 'none'}, "
        f"Python {machine['python']}",
        f"onnxruntime: {machine.get('onnxruntime') or 'not installed'}",
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


def legend_lines(workloads: list[Workload], devices: set[str],
                 impls: Optional[set[str]] = None) -> list[str]:
    """What the workloads are and how each column is measured; ``impls``: the implementations
    in the results (their notes; None: none beyond nn.LSTM, FusedLSTM and the floor)."""
    lines = [
        "workloads (input, hidden, layers, seq, batch): "
        + ", ".join(w.shape() for w in workloads),
        "median, IQR: time of one call; train: forward + backward of output, h_n and c_n; "
        "infer: forward under no_grad, eval mode",
    ]
    if any(w.packed for w in workloads):
        lines.append(
            "packed workloads: sequence lengths drawn uniformly in [seq/2, seq] (a fixed seed: "
            "the same lengths for every implementation and run), the input packed once with "
            "pack_padded_sequence(..., enforce_sorted=False) and every LSTM called with that "
            "PackedSequence; train backpropagates from the output's data, h_n and c_n; "
            "GFLOP/s counts the sum of the lengths as rows")
    if any(not w.input_grad for w in workloads):
        lines.append(
            "input without grad (--no-input-grad): train calls each LSTM on an input that "
            "requires no gradient, as a training step on a batch of data does; h0, c0 and the "
            "weights still require grad; no dL/dx is computed, checked or counted in GFLOP/s")
    if any(not w.profile_memory for w in workloads):
        lines.append(
            "peak mem not measured (-) on " + ", ".join(w.name for w in workloads
                                                        if not w.profile_memory)
            + ": torch.profiler's memory profiling of nn.LSTM's packed backward over 1000 "
            "steps took over 10 GB on a 2-core box")
    if impls and ORT in impls:
        lines.append(
            f"{ORT}: inference only, float32, CPU: the nn.LSTM exported with "
            "torch.onnx.export(dynamo=False) (one standard ONNX LSTM node per layer; packed "
            "workloads: the padded input and a sequence_lens input given to every LSTM node), "
            "an InferenceSession with intra_op_num_threads = torch's thread count and "
            "inter_op_num_threads = 1; the timed call is session.run on numpy inputs made once "
            "(streaming: h_n, c_n carried into the next call). Checked like the others on its "
            "outputs; peak mem not measured (its allocator is not PyTorch's)")
    return lines + [
        "speedup: nn.LSTM's median / this row's median",
        f"check: {CHECK_NOTE}",
        *(f"peak mem ({device}): {MEMORY_NOTE[device]}" for device in sorted(devices)),
        f"{FLOOR}: the framework floor, timed in the same interleaved rounds as the others and "
        "not checked (status floor): FusedLSTM's call structure with no arithmetic, a module "
        "that unpacks (h0, c0) and calls one Python torch.autograd.Function on (x, h0, c0, "
        "the 8 flat weights, its own copies of the parameters) that saves them for backward "
        "and returns torch.empty outputs (forward) and gradients (backward). Train: its time "
        "is the autograd engine's graph task, the Function's node, the AccumulateGrad of "
        "every leaf (x, unless --no-input-grad, h0, c0 and the weights), the Python module "
        "call and the allocations; infer: the module call and the three outputs' allocation (no "
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
        "the best block, nn.LSTM's time a median: both err towards a higher ceiling); ceiling: "
        "the smaller of the two",
    ]


def wrapped(lines: list[str]) -> str:
    """``lines`` filled to 100 columns, continuation lines indented."""
    return "\n".join(textwrap.fill(line, 100, subsequent_indent="    ") for line in lines)


def print_results(rows: list[Row], cells: list[Ceiling], peaks: list[GemmPeak],
                  workloads: list[Workload], devices: set[str]) -> None:
    """Prints the GEMM peaks, one table per device and dtype with its ceilings, the rows not
    timed and the legend."""
    print("\n" + wrapped(peak_lines(peaks)))
    ceilings_by = tables(cells)
    peers_by = tables(fastest_peers(rows))
    for key, group in tables(rows).items():
        print(f"\n{key[0]}, {key[1]}\n{text_table(group)}")
        if ceilings_by.get(key):
            print(f"\nceilings\n{text_table([], CEILING_COLUMNS, ceiling_cells(ceilings_by[key]))}")
        if peer_table_wanted(group) and peers_by.get(key):
            print(f"\n{PEER_TITLE}\n"
                  f"{text_table([], PEER_COLUMNS, peer_cells(peers_by[key]))}")
        if ran_lines(group):
            print(f"\n{RAN_TITLE}:\n" + wrapped(ran_lines(group)))
    if failures(rows):
        print("\nNot timed:\n" + "\n".join(failures(rows)))
    print("\n" + wrapped(legend_lines(workloads, devices, {r.impl for r in rows})))


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
                  ) -> tuple[list[pathlib.Path], Optional[str]]:
    """Writes results.json, results.md and speedup.png under ``out``; returns the paths
    written, and why the plot was not, if it was not."""
    out.mkdir(parents=True, exist_ok=True)
    peers = fastest_peers(rows)
    report = {"machine": machine, "gemm_peaks": [asdict(p) for p in peaks],
              "rows": [asdict(row) for row in rows], "ceilings": [asdict(c) for c in cells],
              "fastest_peers": [asdict(c) for c in peers]}
    if tests is not None:
        report["tests"] = tests
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    written = [out / "results.json", out / "results.md"]
    plot_note = write_plot(rows, out / "speedup.png", cells)
    if plot_note is None:
        written.append(out / "speedup.png")
    md = ["# FusedLSTM vs torch.nn.LSTM", ""]
    md += [f"- {line}" for line in machine_lines(machine, tests) + peak_lines(peaks)]
    ceilings_by, peers_by = tables(cells), tables(peers)
    for key, group in tables(rows).items():
        md += ["", f"## {key[0]}, {key[1]}", "", markdown_table(group)]
        if ceilings_by.get(key):
            md += ["", "Ceilings (how far any implementation could go; see below):", "",
                   markdown_table([], CEILING_COLUMNS, ceiling_cells(ceilings_by[key]))]
        if peer_table_wanted(group) and peers_by.get(key):
            md += ["", PEER_TITLE + ":", "",
                   markdown_table([], PEER_COLUMNS, peer_cells(peers_by[key]))]
        if ran_lines(group):
            md += ["", RAN_TITLE + ":", ""] + [f"- {line}" for line in ran_lines(group)]
    if failures(rows):
        md += ["", "Not timed:", ""] + [f"- {line}" for line in failures(rows)]
    if plot_note is None:
        md += ["", "![speedup over nn.LSTM](speedup.png)"]
    md += ["", "## How it was measured", ""]
    md += [f"- {line}" for line in legend_lines(workloads, {row.device for row in rows},
                                                {row.impl for row in rows})]
    (out / "results.md").write_text("\n".join(md) + "\n")
    return written, plot_note
