"""The small-hidden kernel's AVX-512 variant (csrc/cpu/small_hidden_avx512.h: inline products
on 16 lanes with a masked tail, narrow transposes by permutes) computes what the generic code
computes, in the same order: the same bits, forward, inference and every gradient (but the
weight gradients summed along each step's rows, which the generic code does not have), at the
shapes whose edges it handles differently (batch tails of 1 to 15 lanes, narrow batches, rows
of every stride from 1 to 8 floats and wider, bidirectional outputs whose rows hold both
directions, projections, packed sequences whose steps shrink, float16 and bfloat16 models).
Where the CPU has no AVX-512 the variant is not built into the plan (explain says so) and the
test is skipped with that reason."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fused_lstm
from fused_lstm import FusedLSTM
from helpers import cpu_features, randn, random_lengths

CPU = fused_lstm.backends.cpu
pytestmark = pytest.mark.skipif(not cpu_features()["avx512"],
                                reason="the small-hidden AVX-512 variant needs AVX-512")

# (input, hidden, layers, bidirectional, proj, steps, batch, packed, dtype)
SHAPES = [
    (1, 3, 2, False, 0, 4, 92, False, torch.float32),   # seed-tiny
    (5, 10, 2, False, 0, 3, 10, False, torch.float32),  # small: one masked block of 10
    (3, 7, 2, True, 3, 5, 17, True, torch.float32),     # tail of 1, projection, packed
    (2, 3, 2, True, 0, 5, 20, False, torch.float32),    # rows of 6 floats, 3 per direction
    (6, 4, 1, False, 0, 6, 33, True, torch.float32),    # packed, shrinking steps
    (9, 2, 1, False, 0, 7, 8, False, torch.float32),    # input 9: rows wider than 8 floats
    (4, 8, 1, True, 0, 3, 16, False, torch.float32),    # whole vectors only
    (5, 10, 1, False, 0, 3, 3, False, torch.float32),   # narrow batch (the rows kernel)
    (40, 15, 2, False, 0, 4, 24, False, torch.float32), # input 40: a GEMM projection
    (1, 3, 2, False, 0, 4, 92, False, torch.float16),   # float16: gates recomputed
    (5, 10, 2, True, 0, 3, 10, True, torch.bfloat16),
]


def _results(module, x, hx, lengths, upstream, train):
    leaves = [x.clone().requires_grad_(train), *(t.clone().requires_grad_(train) for t in hx)]
    inp = pack_padded_sequence(leaves[0], lengths, enforce_sorted=False) if lengths else leaves[0]
    with torch.set_grad_enabled(train):
        out, (h_n, c_n) = module(inp, tuple(leaves[1:]))
    out = out.data if lengths else out
    results = [out, h_n, c_n]
    if train:
        results += torch.autograd.grad([out, h_n, c_n], leaves + list(module.parameters()),
                                       [u.to(t.dtype) for u, t in zip(upstream, results)])
    return [t.detach() for t in results]


@pytest.mark.parametrize("train", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)).replace("torch.", ""))
def test_same_bits_as_the_generic_kernels(shape, train):
    I, H, L, bi, proj, T, B, packed, dtype = shape
    module = FusedLSTM(I, H, L, bidirectional=bi, proj_size=proj, dtype=dtype)
    D = 2 if bi else 1
    x = randn(T, B, I).to(dtype)
    hx = (randn(L * D, B, proj or H).to(dtype), randn(L * D, B, H).to(dtype))
    lengths = random_lengths(B, T, sort=False) if packed else None
    rows = sum(lengths) if packed else None
    out_shape = (rows, D * (proj or H)) if packed else (T, B, D * (proj or H))
    upstream = [randn(*out_shape), randn(*hx[0].shape), randn(*hx[1].shape)]
    plans, results = [], []
    for allowed in (True, False):
        with CPU.flags(allow_small_hidden_avx512=allowed):
            inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
            with torch.set_grad_enabled(train):
                plans.append(fused_lstm.explain(module, inp)["forward"])
            results.append(_results(module, x, hx, lengths, upstream, train))
    assert plans[0]["small_hidden_kernels"].startswith("avx512"), plans[0]
    assert plans[1]["small_hidden_kernels"].startswith("target_clones"), plans[1]
    # The weight and bias gradients along each step's rows (batches the 16-lane sums do not
    # take) sum in another order than the products after the loop that replace them where
    # the variant is off: within float32's rounding of those sums. Everything else: the bits.
    weights = [plan.get("backward_weight_products") for plan in plans]
    rows = train and weights[0] == "small-hidden steps (along rows, avx512)"
    assert rows or weights[0] == weights[1]
    n_params = len(list(module.parameters()))
    for i, (a, b) in enumerate(zip(*results)):
        assert not a.isnan().any()
        if rows and i >= len(results[0]) - n_params:  # (16-bit: one rounding of the sums)
            tol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())
        else:
            assert torch.equal(a, b)
