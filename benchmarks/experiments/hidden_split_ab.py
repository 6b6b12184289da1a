"""Interleaved A/B of the hidden split against the batch split and nn.LSTM in one process
(benchmarks/notes/float32-bound.md, "The hidden split on the Intel Xeon, float32 and bf16"):
inference (no_grad), 2 threads; per round each variant runs one warm-up call and 3 timed calls;
medians / minima in ms over the rounds, with the load average and the plan's step_split lines.

    python benchmarks/experiments/hidden_split_ab.py ROUNDS DTYPES WORKLOADS
    python benchmarks/experiments/hidden_split_ab.py 8 float32,bfloat16 fastrnns,medium
"""

import os
import statistics
import sys
import time

import torch

import fused_lstm
from fused_lstm import FusedLSTM

WORKLOADS = {"medium": (128, 256, 2, 100, 32), "fastrnns": (512, 512, 1, 100, 64)}


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    cpu = fused_lstm.backends.cpu
    rounds = int(sys.argv[1])
    dtypes = [getattr(torch, d) for d in sys.argv[2].split(",")]
    for dtype in dtypes:
        for name in sys.argv[3].split(","):
            I, H, L, T, B = WORKLOADS[name]
            ref = torch.nn.LSTM(I, H, L).to(dtype)
            m = FusedLSTM(I, H, L).to(dtype)
            m.load_state_dict(ref.state_dict())
            x = torch.randn(T, B, I, dtype=dtype)
            with torch.no_grad():
                plan = fused_lstm.explain(m, x)["forward"]
            print(name, dtype, {k: v for k, v in plan.items() if "split" in k}, flush=True)
            variants = {"nn": (ref, {}), "batch": (m, dict(allow_hidden_split=False)),
                        "hidden": (m, dict(hidden_split_by_measured_rates=False))}
            times = {k: [] for k in variants}
            with torch.no_grad():
                for _ in range(rounds):
                    for k, (module, flags) in variants.items():
                        with cpu.flags(**flags):
                            module(x)
                            for _ in range(3):
                                t0 = time.perf_counter()
                                module(x)
                                times[k].append(time.perf_counter() - t0)
            print("   load %.1f " % os.getloadavg()[0]
                  + "  ".join(f"{k} {1e3 * statistics.median(v):.2f}/{1e3 * min(v):.2f}"
                              for k, v in times.items()), flush=True)


if __name__ == "__main__":
    main()
