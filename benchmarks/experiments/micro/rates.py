"""Per-product rates at `medium` and `fastrnns` float32 (benchmarks/notes/float32-bound.md,
"Intel Xeon: where the time goes"): each product of the call through MKL's sgemm, oneDNN's
matmul and brgemm (one thread, or the batch split over the threads), GFLOP/s. Rounds
interleave every (product, library) pair; the figure is the median over rounds of each round's
minimum. MKL and oneDNN run with the process's threads (--threads), brgemm on one thread. Builds rates.cpp into $RATES_BUILD (default /tmp/rates_micro_build).

    python benchmarks/experiments/micro/rates.py [--threads 2] [--rounds 5]
"""

import argparse
import ctypes
import os
import pathlib
import statistics

import torch
from torch.utils import cpp_extension

# name: (trans_a, trans_b, m, n, k, libraries). The kernels' products (csrc/cpu/forward.h,
# backward.h): the input projection x W_ih^T over every step, one step's recurrent product
# (the batch split: each thread its rows), the weight gradients dgates^T x / dgates^T h_prev and
# dL/dx = dgates W_ih.
PRODUCTS = {
    "fastrnns input projection [6400,512]x[512,2048]": (0, 1, 6400, 2048, 512, (0, 1)),
    "fastrnns step [64,512]x[512,2048]": (0, 0, 64, 2048, 512, (0, 1)),
    "fastrnns fused step, one slice [32,1024]x[1024,2048] 1 thread": (0, 0, 32, 2048, 1024,
                                                                       (2,)),
    "fastrnns step, one slice [32,512]x[512,2048] 1 thread": (0, 0, 32, 2048, 512, (2,)),
    "fastrnns backward dh, one slice [32,2048]x[2048,512] 1 thread": (0, 0, 32, 512, 2048,
                                                                      (2, 5)),
    "fastrnns dW [2048,6400]x[6400,512]": (1, 0, 2048, 512, 6400, (0, 1)),
    "fastrnns dx [6400,2048]x[2048,512]": (0, 0, 6400, 512, 2048, (0, 1)),
    "medium input projection l0 [3200,128]x[128,1024]": (0, 1, 3200, 1024, 128, (0, 1)),
    "medium input projection l1 [3200,256]x[256,1024]": (0, 1, 3200, 1024, 256, (0, 1)),
    "medium step [32,256]x[256,1024]": (0, 0, 32, 1024, 256, (0, 1)),
    "medium step, one slice [16,256]x[256,1024] 1 thread": (0, 0, 16, 1024, 256, (2,)),
    "medium backward dh, one slice [16,1024]x[1024,256] 1 thread": (0, 0, 16, 256, 1024, (2, 5)),
    "medium dW_ih l0 [1024,3200]x[3200,128]": (1, 0, 1024, 128, 3200, (0, 1)),
    "medium dW [1024,3200]x[3200,256]": (1, 0, 1024, 256, 3200, (0, 1)),
    "medium dx l1 [3200,1024]x[1024,256]": (0, 0, 3200, 256, 1024, (0, 1)),
}
LIBS = {0: "mkl", 1: "onednn", 2: "brgemm(1t)", 3: "brgemm rows", 4: "brgemm cols",
        5: "brgemm(1t) B as stored"}


def build():
    directory = pathlib.Path(os.environ.get("RATES_BUILD", "/tmp/rates_micro_build"))
    directory.mkdir(parents=True, exist_ok=True)
    path = cpp_extension.load(
        name="rates_micro", sources=[str(pathlib.Path(__file__).with_name("rates.cpp"))],
        extra_cflags=["-O3", "-DNDEBUG"], build_directory=str(directory), is_python_module=False)
    so = ctypes.CDLL(path)
    i64 = ctypes.c_int64
    so.rt_product.argtypes = [ctypes.c_int] * 3 + [i64] * 3 + [ctypes.c_int] * 2
    so.rt_product.restype = ctypes.c_double
    return so


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    so = build()
    times = {}
    for _ in range(args.rounds):
        for name, (ta, tb, m, n, k, libs) in PRODUCTS.items():
            if args.only not in name:
                continue
            flop = 2 * m * n * k
            reps = max(1, int(2e8 / flop))
            for lib in libs:
                times.setdefault((name, lib), []).append(so.rt_product(lib, ta, tb, m, n, k, reps, 3))
    print(f"threads={args.threads} rounds={args.rounds} (GFLOP/s: median of round minima)")
    for (name, lib), ts in times.items():
        ta, tb, m, n, k, _ = PRODUCTS[name]
        t = statistics.median(ts)
        print(f"{name:55s} {LIBS[lib]:13s} {2 * m * n * k / t / 1e9:7.1f} GFLOP/s  {t * 1e6:9.1f} us")


if __name__ == "__main__":
    main()
