#!/usr/bin/env python
"""How much faster is FusedLSTM than torch.nn.LSTM on this machine, and do both compute the same?

    python benchmarks/compare.py [--device cpu|cuda|all] [--quick] [--workloads NAME ...]
                                 [--dtype float32|bfloat16|float16] [--out DIR]

For every device present (or the one asked for), every workload that fits it and both modes
(``train``: forward, then ``torch.autograd.backward([output, h_n, c_n], upstream_grads)`` with
random upstream gradients made once, as PyTorch's fastrnns benchmark does; ``infer``: forward
under ``no_grad``), nn.LSTM, FusedLSTM and, where importable, ONNX Runtime (CPU, float32,
inference: the nn.LSTM exported to ONNX), haste and FlashRNN run on the same weights and inputs (for
the packed workloads, one PackedSequence of variable-length sequences):

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
``results.json``, ``results.md`` and ``speedup.png`` (``--out auto``: in
``benchmarks/results/<device>-<cpu or gpu model>-<date>[-<dtype>]``, named after this machine). The exit status is 1 when a FusedLSTM row
failed its check or raised, 0 otherwise.

The code is in the package next to this script, ``benchmarks/lstm_bench/`` (its ``__init__``
lists what each module holds); this script is the command line.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import xml.etree.ElementTree as ElementTree
from typing import Optional

# The package next to this script (benchmarks/lstm_bench), wherever the script is run from and
# also under ``python -P``.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from lstm_bench.ceilings import ceilings  # noqa: E402
from lstm_bench.gemm_peak import PEAK_MIN_RUN_TIME, QUICK_PEAK_MIN_RUN_TIME  # noqa: E402
from lstm_bench.grid import Progress, grid_steps, measure_grid, plan  # noqa: E402
from lstm_bench.implementations import implementations  # noqa: E402
from lstm_bench.machine import (RESULTS, import_fused_lstm, keep_malloc_memory,  # noqa: E402
                                machine_info, read_junit, results_folder_name)
from lstm_bench.report import machine_lines, print_results, write_results  # noqa: E402
from lstm_bench.timing import MIN_RUN_TIME, QUICK_MIN_RUN_TIME, QUICK_ROUNDS, ROUNDS  # noqa: E402
from lstm_bench.workloads import DTYPES, WORKLOADS  # noqa: E402


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
                             f"{MIN_RUN_TIME:g}, and the packed workloads' sequences 10-20 "
                             "times shorter")
    parser.add_argument("--workloads", nargs="+", metavar="NAME",
                        choices=[w.name for w in WORKLOADS],
                        help="default: all that fit the device: "
                             + ", ".join(w.shape() for w in WORKLOADS)
                             + " (input, hidden, layers, seq, batch); flashrnn runs on GPU only")
    parser.add_argument("--dtype", choices=DTYPES,
                        help="default: float32, and bfloat16 for flashrnn")
    parser.add_argument("--out", metavar="DIR",
                        help="write results.json, results.md and speedup.png there; 'auto': "
                             "in benchmarks/results/<device>-<cpu or gpu model>-<date>"
                             "[-<dtype>], named after this machine (e.g. "
                             "cpu-xeon-amx-2026-12-05, cpu-epyc-zen4-2026-11-22-bf16), the "
                             "folders of the runs kept in the repository; never overwritten")
    parser.add_argument("--no-input-grad", dest="input_grad", action="store_false",
                        help="training rows with an input that requires no gradient, the usual "
                             "training call (a batch of data): no dL/dx is computed or checked "
                             "(default: the input requires grad); --out auto adds "
                             "-no-input-grad to the folder's name")
    parser.add_argument("--min-run-time", type=float, metavar="SECONDS",
                        help="seconds of timing per implementation, workload and mode "
                             "(overrides the --quick default)")
    parser.add_argument("--malloc-keep", action="store_true",
                        help="set glibc's mmap and trim thresholds to 1 GB first, so that freed "
                             "CPU memory is reused without page faults (as jemalloc or tcmalloc "
                             "would): under glibc's defaults nn.LSTM's large training buffers are "
                             "fresh pages on every call, which FusedLSTM's own buffer cache "
                             "avoids; the header's malloc line says which")
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
    if args.malloc_keep:
        why_not = keep_malloc_memory()
        if why_not is not None:
            sys.exit(f"compare.py: --malloc-keep: {why_not}")
    fused_lstm = import_fused_lstm()
    impls, notes = implementations(fused_lstm)
    grid, plan_notes = plan(args, impls)
    devices = {device.type for device, *_ in grid}
    machine = machine_info(devices, fused_lstm, malloc_kept=args.malloc_keep)
    workloads = list(dict.fromkeys(workload for _, workload, _, _ in grid))
    out = None
    if args.out == "auto":  # named now, so that a clash stops the run before it starts
        out = RESULTS / (results_folder_name(machine, args.dtype, machine["date"][:10])
                         + ("" if args.input_grad else "-no-input-grad"))
        if out.exists():
            sys.exit(f"compare.py: --out auto: {out} exists (a kept run); move it away or "
                     "give --out DIR")
    elif args.out is not None:
        out = pathlib.Path(args.out)

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
    progress = Progress(total=grid_steps(grid))
    peaks, rows = measure_grid(grid, min_run_time, rounds, peak_run_time, progress)
    cells = ceilings(rows, peaks, workloads)

    print_results(rows, cells, peaks, workloads, devices)
    if out is not None:
        written, plot_note = write_results(out, machine, rows, tests, workloads, peaks, cells)
        print(("" if plot_note is None else f"\n{plot_note}")
              + "\nwrote " + ", ".join(str(path) for path in written))
    print(f"measured in {progress.elapsed()}")
    failed = any(r.impl == "FusedLSTM" and r.status in ("mismatch", "error") for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
