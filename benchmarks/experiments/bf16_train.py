"""bf16 vs float32 FusedLSTM training at compare.py's `medium` workload, in one process.

Forward + backward of (output, h_n, c_n) with upstream gradients, as compare.py's train mode;
also the forward alone (with autograd, so it writes the reserve). The machine may be shared, so
each configuration is timed in interleaved rounds and reported as the minimum and median wall
time per call and the median CPU time per call (time.process_time: all threads of the process).

    python benchmarks/experiments/bf16_train.py [--threads 2] [--rounds 15] [--calls 3]
"""

import argparse
import statistics
import time

import torch

from fused_lstm import FusedLSTM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=3, help="calls per timed sample")
    p.add_argument("--size", default="128,256,2,100,32", help="input,hidden,layers,seq,batch")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    I, H, L, T, B = (int(v) for v in args.size.split(","))
    torch.manual_seed(0)
    steps = {}
    for dtype in (torch.float32, torch.bfloat16):
        m = FusedLSTM(I, H, L).to(dtype)
        x = torch.randn(T, B, I, dtype=dtype, requires_grad=True)
        hx = tuple(torch.randn(L, B, H, dtype=dtype, requires_grad=True) for _ in range(2))
        up = [torch.randn(T, B, H, dtype=dtype), torch.randn(L, B, H, dtype=dtype),
              torch.randn(L, B, H, dtype=dtype)]

        def train(m=m, x=x, hx=hx, up=up):
            out, (h, c) = m(x, hx)
            torch.autograd.backward((out, h, c), up)

        def forward(m=m, x=x, hx=hx):
            m(x, hx)

        name = str(dtype).replace("torch.", "")
        steps[f"{name} train"] = train
        steps[f"{name} forward"] = forward
    for f in steps.values():  # warm up (buffer cache, packed kernels)
        f(), f()
    wall = {k: [] for k in steps}
    cpu = {k: [] for k in steps}
    names = list(steps)
    for r in range(args.rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.calls):
                steps[k]()
            wall[k].append((time.perf_counter() - w0) / args.calls * 1e3)
            cpu[k].append((time.process_time() - c0) / args.calls * 1e3)
    print(f"{args.size} threads={args.threads} rounds={args.rounds} calls={args.calls}")
    print(f"{'':18s} {'wall min':>9s} {'wall med':>9s} {'cpu med':>9s} {'cpu min':>9s}  (ms/call)")
    for k in names:
        print(f"{k:18s} {min(wall[k]):9.1f} {statistics.median(wall[k]):9.1f} "
              f"{statistics.median(cpu[k]):9.1f} {min(cpu[k]):9.1f}")


if __name__ == "__main__":
    main()
