"""The backward of a training call of at most 8 rows in all (csrc/cpu/few_rows.h): its products
read W_ih and W_hh as stored (float32, or 16-bit widened in registers), the weight gradients are
summed outer products. Each instruction-set version of the kernels (AVX-512, AVX2, baseline) is
forced by the tests' ISA cap, so a CPU checks the versions it would not pick too. The variants by
name against nn.LSTM are in test_cpu_variants.py (``few-rows-*``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fused_lstm
from fused_lstm import FusedLSTM
from helpers import allocation_sizes, isa_cap, isa_levels, randn

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
CPU = fused_lstm.backends.cpu

# input, hidden, layers, bidirectional, seq_len, batch, dtypes. Column tails (37 inputs, 70
# hidden: no multiple of a vector), passes of 4 rows and a rest (6 rows for dL/dx), and the
# stream-step size split over the threads by columns; bf16 at one step (from two steps a bf16
# model's products are bf16 ones, another kernel).
CASES = {
    "tails": (37, 70, 2, False, 2, 3, (F32, F16)),
    "tails-one-step": (37, 70, 2, True, 1, 5, (F32, F16, BF16)),
    "stream-step-split": (64, 256, 2, False, 1, 2, (F32, F16, BF16)),
}


def _training_results(module, x, hx, upstream):
    """output, h_n, c_n and the gradients of x, h0, c0 and every parameter."""
    x = x.detach().clone().requires_grad_()
    hx = tuple(t.detach().clone().requires_grad_() for t in hx)
    module.zero_grad(set_to_none=True)
    out, (h_n, c_n) = module(x, hx)
    torch.autograd.backward((out, h_n, c_n), upstream)
    return [out, h_n, c_n, x.grad, *(t.grad for t in hx), *(p.grad for p in module.parameters())]


def _case(name, dtype):
    I, H, L, bi, T, B, _ = CASES[name]
    exact = nn.LSTM(I, H, L, bidirectional=bi, dtype=F64)
    state = {k: v.to(dtype) for k, v in exact.state_dict().items()}  # rounded to dtype
    exact.load_state_dict({k: v.double() for k, v in state.items()})
    model = FusedLSTM(I, H, L, bidirectional=bi, dtype=dtype)
    model.load_state_dict(state)
    as_f32 = FusedLSTM(I, H, L, bidirectional=bi)
    as_f32.load_state_dict({k: v.float() for k, v in state.items()})
    D = 2 if bi else 1
    x = randn(T, B, I).to(dtype)
    hx = tuple(randn(L * D, B, H).to(dtype) for _ in range(2))
    upstream = (randn(T, B, D * H).to(dtype), randn(L * D, B, H).to(dtype),
                randn(L * D, B, H).to(dtype))
    return model, as_f32, exact, x, hx, upstream


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("level", [0, 1, 2], ids=["baseline", "avx2", "avx512"])
def test_few_rows_backward_at_every_isa_level(level, name):
    """At each ISA level: float32 within float32 rounding of nn.LSTM in float64 on the same
    weights; a float16 model's results and gradients bit for bit the float32 model's on the
    widened weights, rounded (the products read the 16-bit weights in place in the same order of
    sums, forward and backward); a bfloat16 model's within one bf16 rounding step of them (the
    thin forward's bf16 dot products sum even and odd elements apart: float32 summation error,
    which may round either way; test_cpu_variants' thin tests); and the few-row backward where
    explain says so."""
    if level not in isa_levels():
        pytest.skip(f"this CPU's vector ISA is below level {level}")
    with isa_cap(level):
        for dtype in CASES[name][-1]:
            model, as_f32, exact, x, hx, up = _case(name, dtype)
            with torch.enable_grad():
                plan = fused_lstm.explain(model, x)["backward"]
            assert plan["backward_dh_product"] == "few_rows (weights as stored)", plan
            assert plan["backward_weight_products"] == "few_rows (outer products)", plan
            widened = _training_results(as_f32, x.float(), tuple(t.float() for t in hx),
                                        tuple(u.float() for u in up))
            expected = _training_results(exact, x.double(), tuple(t.double() for t in hx),
                                         tuple(u.double() for u in up))
            for w, e in zip(widened, expected):
                scale = max(1.0, e.abs().max().item())
                torch.testing.assert_close(w.double(), e, rtol=1e-5, atol=1e-5 * scale)
            ours = _training_results(model, x, hx, up)
            for o, w in zip(ours, widened):
                assert o.dtype == dtype
                if dtype == BF16:
                    eps, scale = torch.finfo(BF16).eps, max(1.0, w.abs().max().item())
                    torch.testing.assert_close(o.double(), w.double(), rtol=eps,
                                               atol=eps * scale)
                else:
                    assert torch.equal(o, w.to(dtype)), (dtype, (o.float() - w).abs().max())


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["f32", "f16", "bf16"])
def test_few_rows_results_match_the_general_backward(dtype):
    """The few-row backward and the general one (allow_few_rows off: packed or widened weights,
    library products) agree: float32 within the suite's float32 tolerance (1e-5 of the values'
    scale: sums of up to 1,024 terms in other orders), 16-bit results within one rounding step of
    their dtype (the float32 sums differ in the last bits, which may round either way); and each
    call repeats its own results bit for bit."""
    model, _, _, x, hx, up = _case("stream-step-split", dtype)
    few = _training_results(model, x, hx, up)
    assert all(a.equal(b) for a, b in zip(few, _training_results(model, x, hx, up)))
    with CPU.flags(allow_few_rows=False):
        with torch.enable_grad():
            assert fused_lstm.explain(model, x)["backward"]["backward_dh_product"] != \
                "few_rows (weights as stored)"
        general = _training_results(model, x, hx, up)
    eps = 1e-5 if dtype == F32 else 2 * torch.finfo(dtype).eps
    for a, b in zip(few, general):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double(), b.double(), rtol=eps, atol=eps * scale)


def test_few_rows_only_up_to_eight_rows():
    """Nine rows (or more) take the general backward, as do float64 calls and inference."""
    model = FusedLSTM(16, 32, 1)
    with torch.enable_grad():
        assert fused_lstm.explain(model, randn(1, 8, 16).float())["backward"][
            "backward_dh_product"] == "few_rows (weights as stored)"
        assert fused_lstm.explain(model, randn(3, 3, 16).float())["backward"][
            "backward_dh_product"] != "few_rows (weights as stored)"
        assert fused_lstm.explain(model.double(), randn(1, 2, 16))["backward"][
            "backward_dh_product"] != "few_rows (weights as stored)"


@pytest.mark.parametrize("dtype", [F32, F16], ids=["f32", "f16"])
def test_few_rows_with_dropout_between_layers(dtype):
    """Dropout between layers in a few-row training call (thin forward, few-row backward): the
    same mask (the same seed) gives the general path's results and gradients, within the
    tolerance of test_few_rows_results_match_the_general_backward; and the mask did apply."""
    torch.manual_seed(5)
    model = FusedLSTM(24, 40, num_layers=3, dropout=0.4, dtype=dtype)
    x = randn(2, 3, 24).to(dtype)
    hx = tuple(randn(3, 3, 40).to(dtype) for _ in range(2))
    up = (randn(2, 3, 40).to(dtype), randn(3, 3, 40).to(dtype), randn(3, 3, 40).to(dtype))
    with torch.enable_grad():
        assert fused_lstm.explain(model, x)["backward"]["variant"] == "thin"

    def seeded(**flags):
        torch.manual_seed(11)
        with CPU.flags(**flags):
            return _training_results(model, x, hx, up)

    few, general = seeded(), seeded(allow_few_rows=False, allow_thin=False)
    model.eval()
    without_dropout = _training_results(model, x, hx, up)
    model.train()
    assert not torch.equal(few[0], without_dropout[0])
    eps = 1e-5 if dtype == F32 else 2 * torch.finfo(dtype).eps
    for a, b in zip(few, general):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double(), b.double(), rtol=eps, atol=eps * scale)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
def test_few_rows_16bit_gradients_are_written_in_their_dtype(dtype):
    """A 16-bit model's few-row backward writes W_ih's and W_hh's gradients in the model's dtype
    (one allocation each, 2 bytes per element) and allocates no float32 gradient or float32
    copy of those weights (4 bytes per element) on the way."""
    I, H = 40, 96  # no 16-bit size equal to a float32 one
    model = FusedLSTM(I, H, dtype=dtype)
    x = randn(1, 2, I).to(dtype).requires_grad_()
    with torch.enable_grad():
        assert fused_lstm.explain(model, x)["backward"]["backward_dh_product"] == \
            "few_rows (weights as stored)"
    model(x)[0].sum().backward()  # warm: scratch buffers made
    model.zero_grad(set_to_none=True)
    out = model(x)[0].sum()
    sizes = allocation_sizes(out.backward)
    G = 4 * H
    assert sizes.count(2 * G * H) == 1 and sizes.count(2 * G * I) == 1, sorted(sizes)
    assert 4 * G * H not in sizes and 4 * G * I not in sizes, sorted(sizes)
    assert model.weight_hh_l0.grad.dtype == dtype
