"""One thread's GFLOP/s of bf16 products on AMX tiles: oneDNN's brgemm through ATen (as
csrc/cpu/amx.h calls it) against a plain hand-written tile kernel (amx_tiles.cpp), on the
shapes of a bf16 LSTM's steps (C += h W_hh^T for a thread's rows: B read from L2 or L3 by its
size) and of its input projection (a chunk's rows per thread, C = x W_ih^T), with whether the two
results agree bit for bit. Needs AMX-BF16 and a torch whose oneDNN packs bf16 for it.

    python benchmarks/experiments/micro/amx_tiles.py

Builds amx_tiles.cpp as a torch extension (~30 s) into $AMX_TILES_BUILD (default
/tmp/amx_tiles_build). benchmarks/notes/bf16.md, "A hand-written AMX tile kernel against ATen's
brgemm".
"""

import os
import pathlib

import torch
from torch.utils import cpp_extension

HERE = pathlib.Path(__file__).resolve().parent

# (name, M, N, K, rows per ATen call, add): the steps of fastrnns (hidden 512) and medium (256)
# per thread of two (batch split: half the batch; hidden split: every row, half the columns),
# and one thread's share of a projection chunk.
SHAPES = [
    ("fastrnns step, batch split (B 2 MB)", 32, 2048, 512, 64, True),
    ("fastrnns step, hidden split (B 1 MB)", 64, 1024, 512, 64, True),
    ("medium step, batch split (B 0.5 MB)", 32, 1024, 256, 64, True),
    ("fastrnns projection chunk (256 rows)", 256, 2048, 512, 64, False),
    ("fastrnns projection chunk, 128-row calls", 256, 2048, 512, 128, False),
    ("medium projection chunk (512 rows, K 256)", 512, 1024, 256, 64, False),
]


def main():
    build = pathlib.Path(os.environ.get("AMX_TILES_BUILD", "/tmp/amx_tiles_build"))
    build.mkdir(parents=True, exist_ok=True)
    mod = cpp_extension.load("fused_lstm_amx_tiles_micro", [str(HERE / "amx_tiles.cpp")],
                             extra_cflags=["-O3"], build_directory=str(build))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for name, M, N, K, mb, add in SHAPES:
        a = torch.randn(M, K).bfloat16()
        b_packed = mod.pack_b(torch.randn(K, N).bfloat16())
        flops = 2 * M * N * K
        results, rates = [], []
        for ours in (False, True):
            c = torch.zeros(M, N)
            mod.product_seconds(a, b_packed, c, ours, mb, False, 1)
            results.append(c)
            timed = torch.zeros(M, N)
            best = min(mod.product_seconds(a, b_packed, timed, ours, mb, add, 50)
                       for _ in range(5))
            rates.append(flops / best / 1e9)
        same = torch.equal(results[0], results[1])
        print(f"{name}: M {M} N {N} K {K}: ATen brgemm {rates[0]:.0f}, hand-written "
              f"{rates[1]:.0f} GFLOP/s; bit for bit {same}")


if __name__ == "__main__":
    main()
