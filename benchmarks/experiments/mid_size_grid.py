"""Training or inference time of one call, FusedLSTM against nn.LSTM in the same dtype, at sizes
compare.py does not run: one step of batches 16-64 with weights up to hidden 1,024, and several
steps of a few rows (2 layers unless noted). Medians of 11 calls, the two alternating, CPU.
benchmarks/notes/fp16.md, "One step of float16 training with large weights".

    python benchmarks/experiments/mid_size_grid.py DTYPE train|infer
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import fused_lstm

# (input, hidden, steps, batch)
SIZES = [(64, 256, 1, 16), (64, 256, 1, 32), (128, 512, 1, 16), (128, 512, 1, 64),
         (256, 1024, 1, 16), (64, 256, 8, 16), (128, 512, 8, 16), (128, 512, 4, 64),
         (256, 512, 16, 8)]


def main() -> None:
    dtype_name = sys.argv[1] if len(sys.argv) > 1 else "float16"
    mode = sys.argv[2] if len(sys.argv) > 2 else "train"
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    for input_size, hidden, steps, batch in SIZES:
        reference = torch.nn.LSTM(input_size, hidden, 2, dtype=dtype)
        fused = fused_lstm.FusedLSTM(input_size, hidden, 2, dtype=dtype)
        fused.load_state_dict(reference.state_dict())
        x = torch.randn(steps, batch, input_size).to(dtype)

        def call(module):
            if mode == "train":
                out, (h, _) = module(x)
                (out.float().sum() + h.float().sum()).backward()
            else:
                with torch.no_grad():
                    module(x)

        times = {"nn.LSTM": [], "FusedLSTM": []}
        modules = {"nn.LSTM": reference, "FusedLSTM": fused}
        for name, module in modules.items():
            for _ in range(3):
                call(module)
        for _ in range(11):
            for name, module in modules.items():
                start = time.perf_counter()
                call(module)
                times[name].append(time.perf_counter() - start)
        ours, theirs = (statistics.median(times[k]) * 1e6 for k in ("FusedLSTM", "nn.LSTM"))
        print(f"{dtype_name} {mode} ({input_size}, {hidden}, 2, {steps}, {batch})"
              f"  nn.LSTM {theirs:9.0f} us  FusedLSTM {ours:9.0f} us  {theirs / ours:5.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
