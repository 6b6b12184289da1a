"""Driver for split_micro.cpp (benchmarks/notes/float32-bound.md, "The hidden split, measured
before building (not built)"): builds it (into $SPLIT_MICRO_BUILD, default
/tmp/split_micro_build) and prints, per thread, the CPU microseconds per step of the set of
configurations in main() and the GFLOP/s of the products (CPU time)."""

import ctypes
import os
import pathlib
import time

from torch.utils import cpp_extension

ROOT = pathlib.Path(__file__).resolve().parents[3]  # the repository root


def build():
    directory = pathlib.Path(os.environ.get("SPLIT_MICRO_BUILD", "/tmp/split_micro_build"))
    directory.mkdir(parents=True, exist_ok=True)
    path = cpp_extension.load(
        name="split_micro",
        sources=[str(pathlib.Path(__file__).with_name("split_micro.cpp"))],
        extra_cflags=["-O3", "-DNDEBUG", "-fno-trapping-math", "-fno-math-errno"],
        extra_include_paths=[str(ROOT / "csrc")],
        build_directory=str(directory),
        is_python_module=False,
    )
    so = ctypes.CDLL(path)
    i64 = ctypes.c_int64
    so.sm_run.argtypes = [ctypes.c_int, i64, i64, i64, i64] + [ctypes.c_int] * 6 + [
        ctypes.c_void_p]
    so.sm_k_blocks.restype = ctypes.c_double
    so.sm_k_blocks.argtypes = [ctypes.c_int, i64, i64, i64, i64, i64, ctypes.c_int, ctypes.c_int]
    return so


def run(so, threads, M, N, K_ih, K_hh, reps=200, trials=15, shared=1, cell=0, barrier=0, amx=0):
    out = (ctypes.c_double * (2 * threads))()
    so.sm_run(threads, M, N, K_ih, K_hh, reps, trials, shared, cell, barrier, amx, out)
    cpu = [out[2 * t] / 1e3 for t in range(threads)]
    wall = [out[2 * t + 1] / 1e3 for t in range(threads)]
    return cpu, wall




def fma_peak(so, iters=20_000_000, trials=5):
    so.sm_fma_peak.restype = ctypes.c_double
    so.sm_fma_peak.argtypes = [ctypes.c_int64, ctypes.c_int]
    return so.sm_fma_peak(iters, trials)


def main(rounds=4):
    """The measurements of benchmarks/notes/float32-bound.md, "The hidden split, measured before
    building (not built)" at `medium` (input 128, hidden 256): per layer,
    the batch split's step (16 rows x all 1024 gate columns, weights shared) against the hidden
    split's (32 rows x 512 columns, each thread its own weights), 1 and 2 threads, without and
    with the cell pass, and the hidden split with a barrier per step (1: after the cell pass;
    2: split phase, the next step's x part between arriving and waiting). Minima over
    `rounds` rounds, each itself a minimum over 15 runs of 200 steps."""
    so = build()
    best = {}

    def rec(key, vals):
        best[key] = [min(a, b) for a, b in zip(best.get(key, [1e30] * len(vals)), vals)]

    peak = max(fma_peak(so) for _ in range(3))
    for _ in range(rounds):
        for layer, k_ih in ((0, 128), (1, 256)):
            for threads in (1, 2):
                for cell in (0, 1):
                    rec((layer, threads, "batch", cell, 0),
                        run(so, threads, 16, 1024, k_ih, 256, cell=cell)[0])
                    rec((layer, threads, "hidden", cell, 0),
                        run(so, threads, 32, 512, k_ih, 256, shared=0, cell=cell)[0])
            for barrier in (1, 2):
                rec((layer, 2, "hidden", 1, barrier),
                    run(so, 2, 32, 512, k_ih, 256, shared=0, cell=1, barrier=barrier)[0])
        rec("barrier round trip", run(so, 2, 1, 64, 1, 1, reps=2000, barrier=1, shared=0)[1])
        rec("no barrier", run(so, 2, 1, 64, 1, 1, reps=2000, barrier=0, shared=0)[1])
    print(f"FMA peak {peak:.1f} GFLOP/s per core")
    for key, v in best.items():
        if isinstance(key, str):
            print(f"{key}: " + " ".join(f"{c:.2f}" for c in v) + " us wall per step")
            continue
        layer, threads, split, cell, barrier = key
        flop = 2 * 16 * 1024 * ((128 if layer == 0 else 256) + 256)
        print(f"layer {layer} {threads} thr {split:6s} cell={cell} barrier={barrier}: "
              + " ".join(f"{c:6.1f}" for c in v) + " us/step CPU; "
              + " ".join(f"{flop / c / 1e3:5.1f}" for c in v) + " GFLOP/s")


def xeon(rounds=4):
    """The hidden split at fastrnns' and medium's steps on the Intel Xeon (AMX) box
    (benchmarks/notes/float32-bound.md, "The hidden split on the Intel Xeon"): per shape, the batch
    split (each of 2 threads half the rows, every gate column, one weight copy) against the
    hidden split (every row, half the gate columns, a weight copy per thread), float32 through
    brgemm and bf16 on AMX tiles; products alone, with the bias rows and the cell pass (cell=1),
    and the hidden split with a barrier per step. K_ih = 0: the unfused step (the projection is
    one GEMM before the steps); K_ih = input: the fused step. Per thread CPU us per step, minima
    over `rounds` rounds of 15 runs of 200 steps."""
    so = build()
    best = {}

    def rec(key, vals):
        best[key] = [min(a, b) for a, b in zip(best.get(key, [1e30] * len(vals)), vals)]

    # name, rows (batch), gate columns, K_ih (fused) , K_hh
    shapes = [("fastrnns", 64, 2048, 512, 512), ("medium", 32, 1024, 256, 256)]
    peak = max(fma_peak(so) for _ in range(3))
    for _ in range(rounds):
        for name, B, N, k_in, k_hh in shapes:
            for amx in (0, 1):
                for k_ih in (0, k_in):
                    for cell in (0, 1):
                        for threads in (1, 2):
                            rec((name, amx, k_ih, threads, "batch", cell, 0),
                                run(so, threads, B // 2, N, k_ih, k_hh, cell=cell, amx=amx)[0])
                            rec((name, amx, k_ih, threads, "hidden", cell, 0),
                                run(so, threads, B, N // 2, k_ih, k_hh, shared=0, cell=cell,
                                    amx=amx)[0])
                    rec((name, amx, k_ih, 2, "hidden", 1, 1),
                        run(so, 2, B, N // 2, k_ih, k_hh, shared=0, cell=1, barrier=1,
                            amx=amx)[0])
        rec("barrier round trip", run(so, 2, 1, 64, 1, 1, reps=2000, barrier=1, shared=0)[1])
        rec("no barrier", run(so, 2, 1, 64, 1, 1, reps=2000, barrier=0, shared=0)[1])
    print(f"FMA peak {peak:.1f} GFLOP/s per core")
    for key, v in best.items():
        if isinstance(key, str):
            print(f"{key}: " + " ".join(f"{c:.2f}" for c in v) + " us wall per step")
            continue
        name, amx, k_ih, threads, split, cell, barrier = key
        B, N, k_hh = {s[0]: (s[1], s[2], s[4]) for s in shapes}[name]
        flop = 2 * (B // 2) * N * (k_ih + k_hh)  # one thread's share
        print(f"{name:8s} {'amx ' if amx else 'fp32'} K_ih={k_ih:3d} {threads} thr {split:6s} "
              f"cell={cell} barrier={barrier}: " + " ".join(f"{c:7.1f}" for c in v)
              + " us/step CPU; " + " ".join(f"{flop / c / 1e3:6.1f}" for c in v) + " GFLOP/s")


def k_blocks(rounds=3):
    """benchmarks/notes/float32-bound.md, "K in blocks; the layers on separate cores": the
    steps' products through brgemm calls over all of K (as the op) against K in blocks of
    kc (a panel's kc x 64 floats in L1) and at most mc rows per call, 1 and 2 threads (each its
    own weights); then medium's step as the batch split runs it (16 rows, one weight copy for
    both threads) against 32 rows with a weight copy per thread (one layer per core), products
    alone and with the cell pass. Slowest thread's CPU us per product, least over rounds."""
    so = build()
    shapes = [("fastrnns, hidden split", 64, 1024, 512), ("fastrnns, batch split", 32, 2048, 512),
              ("medium, batch split", 16, 1024, 256), ("medium, 32 rows", 32, 1024, 256)]
    best = {}
    for _ in range(rounds):
        for name, M, N, K in shapes:
            for threads in (1, 2):
                for kc in (K, 256, 128, 64):
                    for mc in sorted({M, 16, 8}, reverse=True):
                        ns = so.sm_k_blocks(threads, M, N, K, kc, mc, 100, 7)
                        key = (name, threads, kc, mc)
                        best[key] = min(best.get(key, 1e30), ns)
        for cell in (0, 1):
            for name, rows, shared in (("medium 16 rows, shared weights", 16, 1),
                                       ("medium 32 rows, own weights", 32, 0)):
                cpu, _ = run(so, 2, rows, 1024, 0, 256, shared=shared, cell=cell)
                best[(name, cell)] = min(best.get((name, cell), 1e30), max(cpu))
    print(f"FMA peak {max(fma_peak(so) for _ in range(3)):.1f} GFLOP/s per core")
    for key, us in best.items():
        if len(key) == 4:
            name, threads, kc, mc = key
            M, N, K = {s[0]: s[1:] for s in shapes}[name]
            print(f"{name:24s} {threads} thr kc={kc:3d} mc={mc:2d}: {us / 1e3:7.1f} us "
                  f"{2 * M * N * K / us:6.1f} GFLOP/s")
        else:
            name, cell = key
            rows = 32 if "32" in name else 16
            print(f"{name:32s} cell={cell}: {us:7.1f} us/step, "
                  f"{2 * rows * 1024 * 256 / us / 1e3:6.1f} GFLOP/s")


def layers(rounds=3, trials=30):
    """benchmarks/notes/float32-bound.md, "One layer per core, measured as a whole call":
    medium's two layers (input 128, hidden 256, 100 steps, batch 32) as a whole inference call
    on two threads, the batch split against one layer per thread (sm_layers), every product
    through brgemm; with and without the cell pass; medians and minima of the call's wall time
    and each thread's CPU time, next to FusedLSTM's own call (batch split, projections unfused)
    and nn.LSTM's in the same process. The two modes' outputs must agree to float rounding."""
    import statistics

    import numpy as np
    import torch

    import fused_lstm

    so = build()
    so.sm_layers.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                             ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                             ctypes.c_void_p]
    T, B, I, H = 100, 32, 128, 256
    torch.set_num_threads(2)
    ours = fused_lstm.convert(torch.nn.LSTM(I, H, 2))
    theirs = torch.nn.LSTM(I, H, 2)
    x = torch.randn(T, B, I)
    settings = dict(nn_lstm_floor="never", allow_hidden_split=False,
                    allow_fused_input_projection=False)
    for _ in range(rounds):
        outputs = {}
        for cell in (1, 0):
            for mode, name in ((0, "batch split"), (1, "one layer per thread")):
                times = (ctypes.c_double * (trials + 2))()
                y = np.zeros(T * B * H, np.float32)
                so.sm_layers(mode, T, B, I, H, cell, trials, times, y.ctypes.data)
                wall = sorted(times[i] / 1e6 for i in range(trials))
                if cell:
                    outputs[mode] = y
                print(f"{name:22s} cell={cell}: median {statistics.median(wall):6.2f} ms, "
                      f"min {wall[0]:6.2f}; CPU ms per thread {times[trials] / 1e6:.2f} "
                      f"{times[trials + 1] / 1e6:.2f}")
        print(f"  outputs differ by at most {np.abs(outputs[0] - outputs[1]).max():.2e} "
              f"(largest |h| {np.abs(outputs[0]).max():.2f})")
        with torch.no_grad():
            for name, module, flags in (("FusedLSTM", ours, settings), ("nn.LSTM", theirs, {})):
                with fused_lstm.backends.cpu.flags(**flags):
                    for _ in range(3):
                        module(x)
                    wall = []
                    for _ in range(trials):
                        t0 = time.perf_counter()
                        module(x)
                        wall.append((time.perf_counter() - t0) * 1e3)
                print(f"{name:22s}       : median {statistics.median(wall):6.2f} ms, "
                      f"min {min(wall):6.2f}")


if __name__ == "__main__":
    import sys

    modes = {"xeon": xeon, "k_blocks": k_blocks, "layers": layers}
    modes.get(sys.argv[1] if sys.argv[1:] else "", main)()
