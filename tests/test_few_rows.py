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
from helpers import allocation_sizes, isa_cap, isa_levels, memory_events, randn

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


# ---- W_ih's and W_hh's gradients apart (csrc/autograd.cpp, lstm.h cpu_weight_grads_apart) ----
# input, hidden, layers, bidirectional, proj_size, seq_len, batch, dropout, packed, with hx
APART_CASES = {
    "stream-step": (64, 256, 2, False, 0, 1, 1, 0.0, False, True),
    "bidirectional": (37, 70, 2, True, 0, 2, 3, 0.0, False, True),
    "projection": (24, 40, 3, False, 16, 1, 4, 0.0, False, True),
    "dropout-no-hx": (24, 40, 3, False, 0, 2, 2, 0.4, False, False),
    "packed": (20, 48, 2, True, 0, 3, 2, 0.0, True, True),
}
_WEIGHT_NODE = "WeightGradNode"


def _weight_nodes(t):
    """The names of the weights' own nodes (WeightGradNode) in t's autograd graph."""
    found, pending, seen = [], [t.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if _WEIGHT_NODE in node.name():
            found.append(node.name())
        pending.extend(n for n, _ in node.next_functions)
    return found


# From 9 rows: a float16 model's row-wise backward with the gates kept, where the factors are
# fewer floats than the float32 gradients (csrc/cpu/plan.h apart_rows); 11 to 30 rows.
ROWS_APART_CASES = {
    "one-step": (48, 96, 2, False, 0, 1, 12, 0.0, False, True),
    "steps": (37, 70, 2, False, 0, 5, 6, 0.0, False, True),
    "bidirectional": (20, 48, 2, True, 0, 4, 5, 0.0, False, True),
    "projection": (24, 40, 3, False, 16, 3, 4, 0.0, False, True),
    "dropout-no-hx": (24, 40, 3, False, 0, 3, 4, 0.4, False, False),
    "packed": (20, 48, 2, True, 0, 5, 4, 0.0, True, True),
}


def _apart_case(name, dtype, cases=APART_CASES):
    I, H, L, bi, proj, T, B, p, packed, with_hx = cases[name]
    torch.manual_seed(3)
    model = FusedLSTM(I, H, L, bidirectional=bi, proj_size=proj, dropout=p, dtype=dtype)
    D, out = (2 if bi else 1), (proj or H)
    x = randn(T, B, I).to(dtype)
    hx = (randn(L * D, B, out).to(dtype), randn(L * D, B, H).to(dtype)) if with_hx else None
    up = (randn(T, B, D * out).to(dtype), randn(L * D, B, out).to(dtype),
          randn(L * D, B, H).to(dtype))
    lengths = torch.tensor([T, T - 1][:B] + [1] * max(0, B - 2)) if packed else None
    return model, x, hx, up, lengths


def _apart_results(model, x, hx, up, lengths, input_grad=True):
    """output, h_n, c_n, the gradients of x, h0, c0 and every parameter, and whether W_ih's and
    W_hh's gradients were made apart (their own autograd nodes in the graph)."""
    x = x.detach().clone().requires_grad_(input_grad)
    hx = None if hx is None else tuple(t.detach().clone().requires_grad_() for t in hx)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout mask
    if lengths is None:
        out, (h_n, c_n) = model(x, hx)
        y, ups = out, up
    else:
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, (h_n, c_n) = model(packed, hx)
        y, ups = out.data, (up[0].view(-1, up[0].shape[-1])[: out.data.shape[0]], *up[1:])
    apart = bool(_weight_nodes(h_n))
    torch.autograd.backward((y, h_n, c_n), ups)
    grads = [x.grad, *(() if hx is None else (t.grad for t in hx)),
             *(p.grad for p in model.parameters())]
    return [y, h_n, c_n, *grads], apart


# (bfloat16 at one step: from two steps a bf16 model's products are bf16 ones, another backward.)
@pytest.mark.parametrize("dtype,name", [
    (dtype, name) for dtype in (F32, F16, BF16) for name in APART_CASES
    if dtype != BF16 or APART_CASES[name][5] == 1],
    ids=lambda v: {F32: "f32", F16: "f16", BF16: "bf16"}.get(v, v))
def test_weight_grads_apart_bit_for_bit(dtype, name):
    """A few-row training call makes W_ih's and W_hh's gradients in autograd nodes of their own
    (explain says so, and the graph has them); every result and gradient is the one the op's
    backward returns with the setting off, bit for bit (the same outer products, from the same
    dL/dgates and rows), with and without the input's gradient."""
    model, x, hx, up, lengths = _apart_case(name, dtype)
    with torch.enable_grad():
        assert fused_lstm.explain(model, x)["backward"]["weight_grads_apart"] == "true"
    for input_grad in (True, False):
        apart, took = _apart_results(model, x, hx, up, lengths, input_grad)
        assert took, name
        with CPU.flags(allow_weight_grads_apart=False):
            together, took = _apart_results(model, x, hx, up, lengths, input_grad)
            assert not took
        for a, b in zip(apart, together):
            if b is None:
                assert a is None
            else:
                assert a.dtype == dtype and torch.equal(a, b), (name, (a - b).abs().max())


def _peak_bytes(fn):
    """The most bytes held at once during fn() above what was held when it started (its CPU
    allocations and frees in order)."""
    events = sorted(memory_events(fn), key=lambda e: e.start_time_ns)
    held = peak = 0
    for e in events:
        held += e.extra_fields.alloc_size
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("dtype", [F32, F16], ids=["f32", "f16"])
def test_weight_grads_apart_hold_one_gradient_at_a_time(dtype):
    """With the gradients accumulating (.grad already there), each weight's gradient is added
    and freed before the next is made: a training call's peak holds about the largest one
    (W_hh of layer 1 here), where the op's backward returning them together holds them all."""
    model = FusedLSTM(64, 256, 2, dtype=dtype)
    x = randn(1, 1, 64).to(dtype)
    hx = tuple(randn(2, 1, 256).to(dtype) for _ in range(2))

    def step():
        out, (h, c) = model(x, hx)
        (out.sum() + h.sum() + c.sum()).backward()

    def peak():
        step()  # .grad made, scratch buffers warm
        return _peak_bytes(step)

    size = torch.finfo(dtype).bits // 8
    largest = max(p.numel() for p in model.parameters()) * size
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2) * size
    apart = peak()
    with CPU.flags(allow_weight_grads_apart=False):
        together = peak()
    assert together >= matrices, (together, matrices)
    assert largest <= apart < largest + matrices // 8, (apart, largest, matrices)


def _stream_step(dtype=F32):
    model = FusedLSTM(24, 40, 2, dtype=dtype)
    x = randn(1, 2, 24).to(dtype).requires_grad_()
    hx = tuple(randn(2, 2, 40).to(dtype).requires_grad_() for _ in range(2))
    return model, x, hx


@pytest.mark.parametrize("name", list(ROWS_APART_CASES))
def test_weight_grads_apart_from_nine_rows_float16(name):
    """From 9 rows a float16 model's training makes W_ih's and W_hh's gradients apart too (explain
    says so, and the graph has their nodes). The outputs and the gradients of the input, the
    states and the biases are the setting-off call's bit for bit (the same dL/dgates and dL/dx
    products); W_ih's and W_hh's are the same float32 sums in another order, rounded once to
    float16: each within one unit in the last place of the setting-off call's (above
    float16's subnormals), most equal."""
    model, x, hx, up, lengths = _apart_case(name, F16, ROWS_APART_CASES)
    with torch.enable_grad():
        assert fused_lstm.explain(model, x)["backward"]["weight_grads_apart"] == "true"
    n_states = 0 if hx is None else 2
    names = [n for n, _ in model.named_parameters()]
    for input_grad in (True, False):
        apart, took = _apart_results(model, x, hx, up, lengths, input_grad)
        assert took, name
        with CPU.flags(allow_weight_grads_apart=False):
            together, took = _apart_results(model, x, hx, up, lengths, input_grad)
            assert not took
        for i, (a, b) in enumerate(zip(apart, together)):
            if b is None:
                assert a is None
                continue
            assert a.dtype == F16
            k = i - 4 - n_states  # the parameter's index
            if k >= 0 and names[k].startswith(("weight_ih", "weight_hh")):
                # (atol: where a sum cancels into float16's subnormals, the float32 sums' own
                # difference, ~2^-23 of the terms' size, can span two of their units)
                torch.testing.assert_close(a.float(), b.float(), rtol=2**-10, atol=2**-20)
                assert (a == b).float().mean() > 0.9, (names[k], (a != b).sum())
            else:
                assert torch.equal(a, b), (name, i, (a - b).abs().max())


def test_weight_grads_apart_from_nine_rows_memory():
    """float16, 16 rows (one step of 16 sequences, hidden 256): the op's backward returning
    W_ih's and W_hh's gradients together holds at least their float32 sums; apart, the call's
    peak is lower by at least half of those (benchmarks/notes/memory.md, "float16 training from
    9 rows up to ~1,000")."""
    model = FusedLSTM(64, 256, 2, dtype=F16)
    x = randn(1, 16, 64).to(F16)

    def step():
        out, (h, c) = model(x)
        (out.float().sum() + h.float().sum()).backward()

    def peak():
        step()  # .grad made, scratch buffers warm
        return _peak_bytes(step)

    sums = sum(p.numel() for p in model.parameters() if p.dim() == 2) * 4
    apart = peak()
    with CPU.flags(allow_weight_grads_apart=False):
        together = peak()
    assert together >= sums, (together, sums)
    assert apart <= together - sums // 2, (apart, together, sums)


@pytest.mark.parametrize("state", ["none", "h0-no-grad"])
@pytest.mark.parametrize("dtype,steps,batch", [(F32, 1, 4), (F32, 2, 3), (F16, 1, 4),
                                               (F16, 1, 16), (F16, 3, 5)],
                         ids=["f32-1x4", "f32-2x3", "f16-1x4", "f16-1x16", "f16-3x5"])
def test_weight_grads_apart_without_h0_gradient(dtype, steps, batch, state):
    """Where h0 needs no gradient (hx None, or h0 given without requires_grad, c0 with it), the
    backward with the gradients apart skips the first step's dL/dh_{t-1} product, which only
    h0's gradient reads (lstm.h cpu_backward's state_grad), and with one step reads no W_hh at
    all; a float16 one-step forward without hx packs no W_hh either (weights.h use_brgemm). Every
    gradient it returns is the setting-off call's (which computes them all): bit for bit, W_ih's
    and W_hh's within a unit in the last place from 9 rows (a float16 model's other sums); the
    outputs agree with nn.LSTM in float64."""
    torch.manual_seed(11)
    model = FusedLSTM(24, 40, 2, dtype=dtype)
    exact = nn.LSTM(24, 40, 2, dtype=torch.float64)
    exact.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    x0 = randn(steps, batch, 24).to(dtype)
    c00 = randn(2, batch, 40).to(dtype)
    h00 = randn(2, batch, 40).to(dtype)

    def results():
        x = x0.clone().requires_grad_()
        model.zero_grad(set_to_none=True)
        c0 = c00.clone().requires_grad_()
        hx = None if state == "none" else (h00.clone(), c0)
        out, (h_n, c_n) = model(x, hx)
        apart = bool(_weight_nodes(h_n))
        (out.float().pow(2).sum() + h_n.float().sum() + c_n.float().sum()).backward()
        grads = [x.grad, *(() if hx is None else (c0.grad,)), *(p.grad for p in model.parameters())]
        return [out, h_n, c_n], grads, apart

    outs, grads, apart = results()
    assert apart
    with CPU.flags(allow_weight_grads_apart=False):
        outs_off, grads_off, apart_off = results()
    assert not apart_off
    names = ["x", *(() if state == "none" else ("c0",)), *(n for n, _ in model.named_parameters())]
    for a, b in zip(outs, outs_off):
        assert torch.equal(a, b)
    for name, a, b in zip(names, grads, grads_off):
        if dtype == F16 and steps * batch > 8 and name.startswith(("weight_ih", "weight_hh")):
            torch.testing.assert_close(a.float(), b.float(), rtol=2**-10, atol=2**-20)
        else:
            assert torch.equal(a, b), (name, (a - b).abs().max())
    hx64 = None if state == "none" else (h00.double(), c00.double())
    want = exact(x0.double(), hx64)
    tol = 2e-3 if dtype == F16 else 1e-5
    for a, b in zip(outs, (want[0], *want[1])):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


def test_weight_grads_apart_double_backward():
    """create_graph=True: the weights' nodes pass on the differentiable gradients the LSTM node
    computed; gradients of a function of them equal the setting-off call's."""
    def second_order(apart):
        model, x, hx = _stream_step()
        with CPU.flags(allow_weight_grads_apart=apart):
            out, (h, c) = model(x, hx)
            params = list(model.parameters())
            grads = torch.autograd.grad(out.pow(2).sum() + h.sum() * c.sum(), [x, *params],
                                        create_graph=True)
            assert all(g.requires_grad for g in grads)
            penalty = sum(g.pow(2).sum() for g in grads)
            return [*grads, *torch.autograd.grad(penalty, [x, *hx, *params])]

    torch.manual_seed(8)
    apart = second_order(True)
    torch.manual_seed(8)
    together = second_order(False)
    for a, b in zip(apart, together):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_weight_grads_apart_retain_graph_and_partial_gradients():
    """Each backward of a retained graph makes the weights' gradients again (accumulating: twice
    the one call's); a backward that asks for some gradients only leaves nothing behind that a
    later backward would take for its own."""
    model, x, hx = _stream_step()
    out, (h, c) = model(x, hx)
    loss = out.sum() + (h * c).sum()
    (w_hh_only,) = torch.autograd.grad(loss, [model.weight_hh_l1], retain_graph=True)
    (x_only,) = torch.autograd.grad(loss, [x], retain_graph=True)
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in model.parameters()]
    assert torch.equal(once[model._flat_weights_names.index("weight_hh_l1")], w_hh_only)
    assert torch.equal(x.grad, x_only)
    loss.backward()
    for p, g in zip(model.parameters(), once):
        torch.testing.assert_close(p.grad, 2 * g, rtol=0, atol=0)
    with CPU.flags(allow_weight_grads_apart=False):
        model.zero_grad(set_to_none=True)
        out, (h, c) = model(x, hx)
        (out.sum() + (h * c).sum()).backward()
    for p, g in zip(model.parameters(), once):
        assert torch.equal(p.grad, g)


def test_weight_grads_apart_only_where_every_weight_trains():
    """A frozen weight (requires_grad False) keeps the op's backward returning every gradient;
    the gradients are still right (the unfrozen ones equal the setting-off call's)."""
    model, x, hx = _stream_step()
    model.weight_ih_l0.requires_grad_(False)
    out, (h, c) = model(x, hx)
    assert not _weight_nodes(h)
    (out.sum() + h.sum()).backward()
    got = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    with CPU.flags(allow_weight_grads_apart=False):
        out, (h, c) = model(x, hx)
        (out.sum() + h.sum()).backward()
    assert all(torch.equal(a, p.grad) for a, p in
               zip(got, (p for p in model.parameters() if p.requires_grad)))
    assert model.weight_ih_l0.grad is None


def test_weight_grads_apart_when_the_backward_is_planned_otherwise():
    """A setting changed between the forward (gradients apart) and the backward (allow_few_rows
    off: the general backward, which makes whole gradients): the weights' nodes pass on the
    gradients the backward made, the general backward's values."""
    model, x, hx = _stream_step()

    def grads(apart):
        model.zero_grad(set_to_none=True)
        with CPU.flags(allow_weight_grads_apart=apart):
            out, (h, c) = model(x, hx)  # the thin forward, either way
        assert bool(_weight_nodes(h)) == apart
        with CPU.flags(allow_few_rows=False):
            (out.sum() + h.sum()).backward()
        return [p.grad.clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(grads(True), grads(False)))


def test_weight_grads_apart_batched_gradients():
    """autograd.grad with is_grads_batched=True (legacy vmap over the upstream gradients): the
    LSTM node's backward takes the op (its batching rule) and the weights' nodes pass on its
    batched gradients; each equals that upstream gradient's own backward."""
    model, x, hx = _stream_step()
    out, (h, c) = model(x, hx)
    assert _weight_nodes(out)
    params = list(model.parameters())
    ups = randn(3, *out.shape).float()
    batched = torch.autograd.grad(out, params, ups, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        single = torch.autograd.grad(out, params, ups[i], retain_graph=True)
        for a, b in zip(batched, single):
            torch.testing.assert_close(a[i], b, rtol=1e-6, atol=1e-6)


def test_weight_grads_apart_over_several_calls_and_computed_weights():
    """Streaming training's usual loop: several one-step calls, the state carried, one backward
    at the end (each call's weight nodes add into the same gradients); and weights computed from
    parameters each call (weight norm: the weight nodes' gradients flow on to g and v). Both
    equal the setting-off calls' gradients bit for bit."""
    def run(apart, computed):
        torch.manual_seed(4)
        model = FusedLSTM(24, 40, 2)
        if computed:
            model = nn.utils.parametrizations.weight_norm(model, "weight_hh_l0")
        xs = randn(5, 1, 2, 24).float()
        state = None
        with CPU.flags(allow_weight_grads_apart=apart):
            loss = 0
            for x in xs:
                out, state = model(x, state)
                loss = loss + out.pow(2).sum()
            assert bool(_weight_nodes(out)) == apart
            loss.backward()
        return [p.grad for p in model.parameters()]

    for computed in (False, True):
        apart, together = run(True, computed), run(False, computed)
        assert len(apart) == len(together)
        assert all(torch.equal(a, b) for a, b in zip(apart, together)), computed
