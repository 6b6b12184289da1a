"""One thread's rate of an LSTM step's bf16 product (C[M, 4H] += h[M, H] W_hh^T, float32 sums):
oneDNN's brgemm micro-kernel through ATen (AMX tiles where the CPU has AMX-BF16; B packed once,
in panels) against fused_lstm's bf16_gemm (AVX512_BF16 dot products). Prints GFLOP/s per size.

    python benchmarks/experiments/micro/amx_bf16.py

Builds amx_bf16.cpp with csrc/cpu/bf16_gemm.cpp (~20 s) into $AMX_BF16_BUILD (default
/tmp/amx_bf16_build). Sizes: the step of the `medium` (hidden 256) and `fastrnns` (hidden 512)
workloads for batch slices of 8 to 64 rows, and the input projection of `medium` (K = 128).
"""

import ctypes
import os
import pathlib
import platform

import torch
from torch.utils import cpp_extension

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[2]


def build():
    out = pathlib.Path(os.environ.get("AMX_BF16_BUILD", "/tmp/amx_bf16_build"))
    out.mkdir(parents=True, exist_ok=True)
    path = cpp_extension.load(
        "fused_lstm_amx_bf16_micro",
        [str(HERE / "amx_bf16.cpp"), str(ROOT / "csrc" / "cpu" / "bf16_gemm.cpp")],
        extra_cflags=["-O2", "-DNDEBUG", "-fopenmp"], extra_ldflags=["-fopenmp"],
        build_directory=str(out), is_python_module=False)
    lib = ctypes.CDLL(path)
    i64 = ctypes.c_int64
    lib.brgemm_gflops.restype = lib.bf16_gemm_gflops.restype = ctypes.c_double
    lib.brgemm_gflops.argtypes = [i64, i64, i64, i64]
    lib.bf16_gemm_gflops.argtypes = [i64, i64, i64]
    return lib


def main():
    torch.set_num_threads(1)
    lib = build()
    info = pathlib.Path("/proc/cpuinfo").read_text(errors="ignore") if os.path.exists(
        "/proc/cpuinfo") else ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines()
             if line.startswith("model name")]
    cpu = names[0] if names else platform.processor() or "cpu"
    flags = info
    print(f"{cpu}; amx_bf16: {'amx_bf16' in flags}, avx512_bf16: {'avx512_bf16' in flags}; "
          f"oneDNN brgemm packs bf16 (AMX): {bool(lib.amx_could_pack())}; torch {torch.__version__}")
    print(f"{'M':>4} {'K':>5} {'N':>5}  {'brgemm nb=32':>13} {'nb=64':>8} {'bf16_gemm':>10}  GFLOP/s")
    for K in (128, 256, 512):
        N = 4 * (256 if K == 128 else K)
        for M in (8, 16, 32, 64):
            rates = [lib.brgemm_gflops(M, N, K, 32), lib.brgemm_gflops(M, N, K, 64),
                     lib.bf16_gemm_gflops(M, N, K)]
            print(f"{M:>4} {K:>5} {N:>5}  " + " ".join(
                f"{r:>{w}.1f}" if r >= 0 else f"{'n/a':>{w}}" for r, w in zip(rates, (13, 8, 10))))


if __name__ == "__main__":
    main()
