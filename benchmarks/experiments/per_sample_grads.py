"""Per-sample gradients, ``vmap(grad(loss), in_dims=(None, 0))(params, samples)``, with FusedLSTM
(fused kernels through fused_lstm/_functorch.py) against nn.LSTM (its functorch path) on the
same weights; float32, CPU. Each sample is one sequence ``[T, 1, I]``; the loss sums the output.

Timings are medians of interleaved runs (A/B/A/B in one process). Usage:
    python benchmarks/experiments/per_sample_grads.py [--reps-small 30] [--reps-medium 5]
Notes: benchmarks/notes/transforms.md, "Per-sample gradients (vmap(grad))".
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import fused_lstm

SIZES = {
    # name: (input_size, hidden_size, num_layers, seq_len, samples)
    "small": (5, 10, 2, 3, 10),
    "medium": (128, 256, 2, 100, 32),
}


def per_sample_grads(module):
    def loss(params, x):
        return functional_call(module, params, (x,))[0].sum()

    return vmap(grad(loss), in_dims=(None, 0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps-small", type=int, default=30)
    parser.add_argument("--reps-medium", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # nn.LSTM's "no batching rule for aten::lstm" warning
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name, (i, h, layers, t, samples) in SIZES.items():
        ref = nn.LSTM(i, h, layers)
        fused = fused_lstm.convert(copy.deepcopy(ref))
        params = {k: v.detach() for k, v in ref.named_parameters()}
        xs = torch.randn(samples, t, 1, i)
        fns = {"FusedLSTM": per_sample_grads(fused), "nn.LSTM": per_sample_grads(ref)}
        results = {k: fn(params, xs) for k, fn in fns.items()}  # warm-up, and the check
        diff = max((results["FusedLSTM"][k] - results["nn.LSTM"][k]).abs().max().item()
                   for k in params)
        times = {k: [] for k in fns}
        reps = args.reps_small if name == "small" else args.reps_medium
        for _ in range(reps):
            for k, fn in fns.items():
                start = time.perf_counter()
                fn(params, xs)
                times[k].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{name} (I={i}, H={h}, L={layers}, T={t}, {samples} samples), {reps} reps: "
              f"FusedLSTM {med['FusedLSTM'] * 1e3:.2f} ms, nn.LSTM {med['nn.LSTM'] * 1e3:.2f} ms,"
              f" ratio {med['FusedLSTM'] / med['nn.LSTM']:.2f}x; max |diff| {diff:.2e}")


if __name__ == "__main__":
    main()
