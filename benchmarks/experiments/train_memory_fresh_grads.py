"""Training peak memory of one call two ways (benchmarks/notes/memory.md, "Training memory with
the gradients set to None first"): as compare.py measures it (the parameters' gradients exist
from earlier calls, so each call's gradients are added into them and freed) and after
``zero_grad(set_to_none=True)`` (what ``optimizer.zero_grad()`` does by default, so the call's
gradients become the parameters' ``.grad``). compare.py's cases, steps and memory probe; CPU.

    python benchmarks/experiments/train_memory_fresh_grads.py [--dtype float16] [WORKLOAD ...]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import fused_lstm  # noqa: E402
from lstm_bench.implementations import fused_lstm_copy  # noqa: E402
from lstm_bench.timing import make_step, peak_memory_bytes  # noqa: E402
from lstm_bench.workloads import WORKLOADS, make_case  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="*", default=["small", "stream-step", "medium"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    dtype, cpu = getattr(torch, args.dtype), torch.device("cpu")
    by_name = {w.name: w for w in WORKLOADS}
    print(f"{args.dtype}, peak bytes of one training call above what was held at its start")
    for name in args.workloads:
        workload = by_name[name]
        case = make_case(workload, cpu, dtype)
        modules = {"nn.LSTM": case.lstm,
                   "FusedLSTM": fused_lstm_copy(fused_lstm.FusedLSTM, case.lstm)}
        for impl, module in modules.items():
            module.train()
            peaks = {}
            for grads in ("accumulate", "set to None"):
                def new_step():
                    if grads == "set to None":
                        module.zero_grad(set_to_none=True)
                        for tensor in (case.x, case.h0, case.c0):
                            tensor.grad = None
                    return make_step(module, case, "train", workload.streaming)
                for _ in range(3):  # warm, and leave gradients behind for "accumulate"
                    make_step(module, case, "train", workload.streaming)()
                peaks[grads] = peak_memory_bytes(new_step, cpu)
            print(f"{name:14s} {impl:10s} gradients accumulate: {peaks['accumulate']:>11,d}   "
                  f"set to None first: {peaks['set to None']:>11,d}")


if __name__ == "__main__":
    main()
