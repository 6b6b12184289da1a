"""The CPU ops' outputs, bit for bit, over cases that reach every kernel variant: save them at one
commit, compare another commit's against them (a refactoring that must change no result).

    python benchmarks/experiments/variant_outputs.py save /tmp/before.pt     # at the old commit
    python benchmarks/experiments/variant_outputs.py compare /tmp/before.pt  # at the new one

lstm_inference, lstm_forward (with its reserve) and lstm_backward for float32, float64 and
bfloat16, small and row-wise hidden sizes, thin batches, projections, packed sequences, both
directions, dropout masks. Which variant runs is the kernel choice's (csrc/cpu/plan.h); to save
and compare a variant this CPU does not pick by default, set the matching environment variable
(FUSED_LSTM_NO_BRGEMM=1, FUSED_LSTM_UNFUSED_INPUT=1, FUSED_LSTM_NO_THIN=1,
FUSED_LSTM_NO_BF16_GEMM=1, FUSED_LSTM_NO_VEC16_CELL=1: the settings' defaults, which older
commits read inside the kernels) for both runs. Exit status 1 when any tensor differs."""
import sys

import torch

import fused_lstm  # noqa: F401  (registers the ops)

ops = torch.ops.fused_lstm
torch.set_num_threads(2)

def weights(I, H, L, D, P, bias, dtype, g):
    out = P if P > 0 else H
    ws = []
    for l in range(L):
        for d in range(D):
            isz = I if l == 0 else D * out
            ws.append(torch.randn(4 * H, isz, generator=g).mul_(0.2).to(dtype))
            ws.append(torch.randn(4 * H, out, generator=g).mul_(0.2).to(dtype))
            if bias:
                ws.append(torch.randn(4 * H, generator=g).mul_(0.2).to(dtype))
                ws.append(torch.randn(4 * H, generator=g).mul_(0.2).to(dtype))
            if P > 0:
                ws.append(torch.randn(P, H, generator=g).mul_(0.2).to(dtype))
    return ws

CASES = []
for dtype in (torch.float32, torch.float64, torch.bfloat16):
    for (I, H, L, T, B) in [(8, 4, 2, 7, 12), (8, 4, 1, 7, 3), (5, 12, 2, 9, 20),
                            (64, 256, 2, 5, 4), (64, 256, 2, 1, 1), (200, 64, 1, 3, 2),
                            (32, 128, 2, 40, 64), (64, 512, 1, 30, 16), (40, 96, 3, 6, 9)]:
        for bidir, P, bias, packed, hx in [(False, 0, True, False, True), (True, 0, True, False, False),
                                           (False, 0, False, True, True), (True, 0, True, True, False),
                                           (False, 3 if H < 16 else H // 2, True, False, True)]:
            if P >= H: continue
            CASES.append((dtype, I, H, L, T, B, bidir, P, bias, packed, hx))

def run_case(c):
    dtype, I, H, L, T, B, bidir, P, bias, packed, hx = c
    g = torch.Generator().manual_seed(hash(c[1:]) % (2**31))
    D = 2 if bidir else 1
    out = P if P > 0 else H
    ws = weights(I, H, L, D, P, bias, dtype, g)
    if packed:
        lengths = torch.sort(torch.randint(1, T + 1, (B,), generator=g), descending=True).values
        lengths[0] = T
        bs = torch.tensor([(lengths > t).sum().item() for t in range(T)], dtype=torch.int64)
        x = torch.randn(int(bs.sum()), I, generator=g).to(dtype)
    else:
        bs = None
        x = torch.randn(T, B, I, generator=g).to(dtype)
    h0 = torch.randn(L * D, B, out, generator=g).to(dtype) if hx else None
    c0 = torch.randn(L * D, B, H, generator=g).to(dtype) if hx else None
    mask = None
    if L > 1 and not packed:
        mask = (torch.rand(L - 1, T, B, D * out, generator=g) > 0.3).to(dtype) / 0.7
    res = {}
    o, hy, cy = ops.lstm_inference(x, bs, h0, c0, ws, mask, L, bidir, bias, P)
    res["inf"] = [o, hy, cy]
    o, hy, cy, r = ops.lstm_forward(x, bs, h0, c0, ws, mask, L, bidir, bias, P)
    res["fwd"] = [o, hy, cy, r]
    go = torch.randn(o.shape, generator=g).to(dtype)
    ghy = torch.randn(hy.shape, generator=g).to(dtype)
    gcy = torch.randn(cy.shape, generator=g).to(dtype)
    gi, ghx, gcx, gw = ops.lstm_backward(x, bs, h0, c0, ws, mask, r, go, ghy, gcy, L, bidir, bias, P)
    res["bwd"] = [gi, ghx, gcx, *gw]
    return res

def main():
    mode, path = sys.argv[1], sys.argv[2]
    results = {str(c): run_case(c) for c in CASES}
    if mode == "save":
        torch.save(results, path)
        print("saved", len(results), "cases to", path)
        return
    ref = torch.load(path)
    bad = 0
    for key, parts in results.items():
        for part, tensors in parts.items():
            for i, (a, b) in enumerate(zip(tensors, ref[key][part])):
                if not same_bits(a, b):
                    bad += 1
                    if bad < 10:
                        print("DIFF", key, part, i)
    print(f"{len(results)} cases, {bad} differing tensors")
    sys.exit(1 if bad else 0)


def same_bits(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.numel() == 0 or torch.equal(a.reshape(-1).view(torch.uint8),
                                         b.reshape(-1).view(torch.uint8))


if __name__ == "__main__":
    main()
