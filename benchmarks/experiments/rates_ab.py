"""Interleaved A/B of FusedLSTM settings against nn.LSTM in one process (benchmarks/notes/
float32-bound.md, "Intel Xeon: where the time goes"): per round, one call of each
variant in turn; medians and minimums over rounds. Float32, 2 threads unless --threads.

    python benchmarks/experiments/rates_ab.py --workload fastrnns --mode infer \
        --variant default= --variant unfused=allow_fused_input_projection:0
"""

import argparse
import statistics
import time

import torch
from torch import nn

import fused_lstm
from fused_lstm import FusedLSTM

WORKLOADS = {  # input, hidden, layers, T, B
    "medium": (128, 256, 2, 100, 32),
    "fastrnns": (512, 512, 1, 100, 64),
}


def parse_variant(text):
    name, _, settings = text.partition("=")
    out = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition(":")
        out[key] = value if not value.isdigit() else bool(int(value))
    return name, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="fastrnns")
    ap.add_argument("--mode", default="infer", choices=["infer", "train"])
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-nn", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    I, H, L, T, B = WORKLOADS[args.workload]
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, L)
    fused = FusedLSTM(I, H, L)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I)
    variants = [parse_variant(v) for v in (args.variant or ["default="])]
    calls = [] if args.no_nn else [("nn.LSTM", ref, {})]
    calls += [(name, fused, settings) for name, settings in variants]

    def once(module, settings):
        with fused_lstm.backends.cpu.flags(**settings):
            t0 = time.perf_counter()
            if args.mode == "infer":
                with torch.no_grad():
                    module(x)
            else:
                xx = x.clone().requires_grad_()
                out, _ = module(xx)
                out.sum().backward()
            return time.perf_counter() - t0

    for name, module, settings in calls:  # warm-up, and the plan each variant runs
        once(module, settings)
        if module is fused:
            with fused_lstm.backends.cpu.flags(**settings), torch.set_grad_enabled(args.mode == "train"):
                plan = fused_lstm.explain(fused, x)["forward"]
            print(name, {k: v for k, v in plan.items() if "product" in k or "projection" in k})
    times = {name: [] for name, _, _ in calls}
    for _ in range(args.rounds):
        for name, module, settings in calls:
            times[name].append(once(module, settings))
    base = statistics.median(times[calls[0][0]])
    print(f"{args.workload} {args.mode} threads={args.threads} rounds={args.rounds}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:28s} median {med * 1e3:8.2f} ms  min {min(ts) * 1e3:8.2f} ms  "
              f"{base / med:5.2f}x of {calls[0][0]}")


if __name__ == "__main__":
    main()
