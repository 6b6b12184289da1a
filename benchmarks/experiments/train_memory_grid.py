"""Training peak memory of one call, FusedLSTM against nn.LSTM in the same dtype, at sizes
compare.py does not run (2 layers; input, hidden, steps, batch below), with compare.py's case,
step and memory probe (gradients accumulating). CPU. benchmarks/notes/memory.md, "float16
training from 9 rows up to ~1,000".

    python benchmarks/experiments/train_memory_grid.py float16
"""

from __future__ import annotations

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import fused_lstm  # noqa: E402
from lstm_bench.implementations import fused_lstm_copy  # noqa: E402
from lstm_bench.timing import make_step, peak_memory_bytes  # noqa: E402
from lstm_bench.workloads import Workload, make_case  # noqa: E402

SIZES = [(64, 256, 1, 8), (64, 256, 1, 16), (64, 256, 8, 16), (64, 256, 32, 32),
         (128, 512, 1, 16), (32, 64, 8, 16)]


def main() -> None:
    dtype_name = sys.argv[1] if len(sys.argv) > 1 else "float16"
    dtype, cpu = getattr(torch, dtype_name), torch.device("cpu")
    for input_size, hidden, steps, batch in SIZES:
        case = make_case(Workload("probe", input_size, hidden, 2, steps, batch), cpu, dtype)
        peaks = []
        for module in (case.lstm, fused_lstm_copy(fused_lstm.FusedLSTM, case.lstm)):
            module.train()
            for _ in range(3):  # warm, and leave gradients behind
                make_step(module, case, "train", False)()
            peaks.append(peak_memory_bytes(lambda: make_step(module, case, "train", False), cpu))
        print(f"{dtype_name} ({input_size}, {hidden}, 2, {steps}, {batch}) rows {steps * batch:5d}"
              f"  nn.LSTM {peaks[0]:>11,d}  FusedLSTM {peaks[1]:>11,d}"
              f"  ratio {peaks[1] / peaks[0]:.2f}")


if __name__ == "__main__":
    main()
