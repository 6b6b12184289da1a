"""The fused ops themselves: float64 gradcheck over every option, gradgradcheck, opcheck,
parity with nn.LSTM's own kernel and with the reference, dtypes, NaN, bad arguments."""

import pytest
import torch

from fused_lstm import ops, reference

from helpers import (
    GRID,
    GRID_IDS,
    assert_results_and_grads_close,
    call,
    differentiable,
    make_case,
    op_args,
    zeros_state,
)

LSTM_FORWARD = torch.ops.fused_lstm.lstm_forward.default
LSTM_BACKWARD = torch.ops.fused_lstm.lstm_backward.default


@pytest.mark.parametrize("num_layers,bias,bidirectional,proj_size,packed", GRID, ids=GRID_IDS)
def test_gradcheck(num_layers, bias, bidirectional, proj_size, packed):
    _, a = make_case(num_layers, bias, bidirectional, proj_size, packed, with_state=True,
                     input_size=2, hidden_size=3, seq_len=3, batch=3, dropout=0.5)
    inputs = differentiable(a)
    n_state = 3

    def f(*tensors):
        b = dict(a, input=tensors[0], hx=tensors[1], cx=tensors[2], weights=list(tensors[n_state:]))
        return call(ops.lstm, b)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("bidirectional,proj_size,packed", [(False, 0, False), (True, 2, True)])
def test_gradgradcheck(bidirectional, proj_size, packed):
    _, a = make_case(2, True, bidirectional, proj_size, packed, with_state=True, input_size=2,
                     hidden_size=3, seq_len=3, batch=2)
    inputs = differentiable(a)

    def f(*tensors):
        b = dict(a, input=tensors[0], hx=tensors[1], cx=tensors[2], weights=list(tensors[3:]))
        return call(ops.lstm, b)

    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("num_layers,bias,bidirectional,proj_size,packed", GRID, ids=GRID_IDS)
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "nostate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_parity_with_nn_lstm(num_layers, bias, bidirectional, proj_size, packed, with_state, dtype):
    """The op against nn.LSTM's own kernel (aten::lstm) on the same weights: every output and
    every gradient."""
    lstm, a = make_case(num_layers, bias, bidirectional, proj_size, packed, with_state, dtype=dtype,
                        input_size=5, hidden_size=6, seq_len=5, batch=4)
    # nn.LSTM on the same tensors (its parameters replaced by our leaf tensors).
    hx = (a["hx"], a["cx"]) if with_state else None
    if packed:
        expected = torch._VF.lstm(a["input"], a["batch_sizes"], hx or zeros_state(a),
                                  a["weights"], bias, num_layers, 0.0, False, bidirectional)
    else:
        expected = torch._VF.lstm(a["input"], hx or zeros_state(a), a["weights"], bias,
                                  num_layers, 0.0, False, bidirectional, False)
    got = call(ops.lstm, a)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **tol)
    grads = [torch.randn_like(t) for t in got]
    wrt = differentiable(a)
    got_grads = torch.autograd.grad(got, wrt, grads)
    expected_grads = torch.autograd.grad(expected, wrt, grads)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, **tol)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_dropout_mask_matches_reference(packed, bidirectional):
    """Inter-layer dropout: the op applies the given mask exactly as the reference does."""
    _, a = make_case(3, True, bidirectional, 2, packed, with_state=True, dropout=0.4)
    assert a["dropout_mask"] is not None and (a["dropout_mask"] == 0).any()
    assert_results_and_grads_close(call(ops.lstm, a), call(reference.lstm_forward, a),
                                   differentiable(a), 1e-10)


@pytest.mark.parametrize("packed", [False, True])
def test_bfloat16_error_within_twice_pytorchs(packed):
    """bfloat16 keeps 8 significant bits, so exact parity is meaningless; the rule (as in
    flash-attention) is that our error against a float64 reference is at most about twice
    PyTorch's own bfloat16 error, plus a few bfloat16 ulps of slack for tiny errors."""
    lstm64, a64 = make_case(2, True, True, 0, packed, with_state=True, input_size=16,
                            hidden_size=32, seq_len=20, batch=8, requires_grad=False)
    exact = call(ops.lstm, a64)
    a16 = {k: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
           for k, v in a64.items()}
    a16["weights"] = [w.to(torch.bfloat16) for w in a64["weights"]]
    ours = call(ops.lstm, a16)
    assert all(t.dtype == torch.bfloat16 for t in ours)
    if packed:
        theirs = torch._VF.lstm(a16["input"], a16["batch_sizes"], (a16["hx"], a16["cx"]),
                                a16["weights"], True, 2, 0.0, False, True)
    else:
        theirs = torch._VF.lstm(a16["input"], (a16["hx"], a16["cx"]), a16["weights"], True, 2,
                                0.0, False, True, False)
    eps = torch.finfo(torch.bfloat16).eps
    for o, t, e in zip(ours, theirs, exact):
        our_err = (o.double() - e).abs().max().item()
        their_err = (t.double() - e).abs().max().item()
        assert our_err <= 2 * their_err + 4 * eps, (our_err, their_err)


def test_nan_propagates():
    _, a = make_case(2, True, True, 0, False, with_state=True, requires_grad=False)
    a["input"] = a["input"].clone()
    a["input"][1, 0, 0] = float("nan")
    output, hy, cy = call(ops.lstm, a)
    # Batch row 0 sees the NaN from step 1 on (forward) and up to step 1 (reverse).
    assert torch.isnan(output[:, 0]).all()
    assert torch.isnan(hy[:, 0]).all() and torch.isnan(cy[:, 0]).all()
    assert not torch.isnan(output[:, 1:]).any()


def test_noncontiguous_arguments():
    _, a = make_case(2, True, True, 2, False, with_state=True, requires_grad=False)
    expected = call(ops.lstm, a)
    b = dict(a)
    b["input"] = a["input"].transpose(0, 1).contiguous().transpose(0, 1)
    assert not b["input"].is_contiguous()
    b["hx"] = a["hx"].transpose(0, 2).contiguous().transpose(0, 2)
    b["weights"] = [w.t().contiguous().t() if w.dim() == 2 else w for w in a["weights"]]
    for g, e in zip(call(ops.lstm, b), expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_deterministic_run_to_run():
    _, a = make_case(2, True, True, 2, True, with_state=True, input_size=32, hidden_size=64,
                     seq_len=10, batch=16)
    first = call(ops.lstm, a)
    grads = [torch.randn_like(t) for t in first]
    g1 = torch.autograd.grad(first, differentiable(a), grads)
    second = call(ops.lstm, a)
    g2 = torch.autograd.grad(second, differentiable(a), grads)
    for x, y in zip(list(first) + list(g1), list(second) + list(g2)):
        assert torch.equal(x, y)


OPCHECK_CASES = [
    dict(packed=False, with_state=True, dropout=0.0, proj_size=0, bidirectional=False),
    dict(packed=False, with_state=False, dropout=0.5, proj_size=2, bidirectional=True),
    dict(packed=True, with_state=True, dropout=0.5, proj_size=0, bidirectional=True),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=["padded", "nostate-dropout-proj", "packed"])
def test_opcheck_forward(case):
    _, a = make_case(2, True, case["bidirectional"], case["proj_size"], case["packed"],
                     case["with_state"], dropout=case["dropout"])
    args = (a["input"], a["batch_sizes"], a["hx"], a["cx"], a["weights"], a["dropout_mask"],
            a["num_layers"], a["bidirectional"], a["has_biases"], a["proj_size"])
    torch.library.opcheck(LSTM_FORWARD, args)


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=["padded", "nostate-dropout-proj", "packed"])
def test_opcheck_backward(case):
    _, a = make_case(2, True, case["bidirectional"], case["proj_size"], case["packed"],
                     case["with_state"], dropout=case["dropout"], requires_grad=False)
    output, hy, cy, reserve = call(LSTM_FORWARD, a)
    args = (a["input"], a["batch_sizes"], a["hx"], a["cx"], a["weights"], a["dropout_mask"], reserve,
            torch.randn_like(output), torch.randn_like(hy), None, a["num_layers"], a["bidirectional"],
            a["has_biases"], a["proj_size"])
    torch.library.opcheck(LSTM_BACKWARD, args)



@pytest.mark.parametrize("hidden_size", [4, 32], ids=["small-hidden", "row-wise"])
def test_opcheck_packed_bf16(hidden_size):
    """opcheck (the fake kernels against the CPU kernels) for packed bfloat16 calls, whose
    reserve keeps no gates."""
    _, a = make_case(2, True, True, 0, True, with_state=True, dtype=torch.bfloat16,
                     hidden_size=hidden_size, seq_len=6, batch=5, dropout=0.5,
                     requires_grad=False)
    args = (a["input"], a["batch_sizes"], a["hx"], a["cx"], a["weights"], a["dropout_mask"],
            a["num_layers"], a["bidirectional"], a["has_biases"], a["proj_size"])
    torch.library.opcheck(LSTM_FORWARD, args)
    output, hy, cy, reserve = call(LSTM_FORWARD, a)
    args = (*args[:6], reserve, torch.randn_like(output), torch.randn_like(hy), None, *args[6:])
    torch.library.opcheck(LSTM_BACKWARD, args)

@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("hidden_size,input_size,cases", [
    (32, 8, ((40, False), (2, True))),
    (4, 8, ((3, False), (1, True))),
    (4, 40, ((3, True),)),
], ids=["row-wise", "small-hidden", "small-hidden-wide-input"])
def test_opcheck_fp16_without_gates(packed, hidden_size, input_size, cases):
    """opcheck for float16 calls whose reserve keeps no gates (csrc/lstm.h, gates_in_reserve),
    2 layers, 2 directions, batch 6; the Python rule of the fake kernels, ops.gates_in_reserve,
    agrees on both sides of the rule's limits: hidden 32 with rows at least twice the widest
    layer input plus out (40 steps) and below it (2 steps); hidden 4 (the small-hidden kernel)
    with more than 8 rows (3 steps) and fewer (1 step), and with an input wider than 32, whose
    gates stay. The fake kernel's reserve is the CPU kernel's, with and without gates."""
    from fused_lstm import ops

    H = hidden_size
    for seq_len, gates in cases:
        _, a = make_case(2, True, True, 0, packed, with_state=True, dtype=torch.float16,
                         hidden_size=H, input_size=input_size, seq_len=seq_len, batch=6,
                         dropout=0.5, requires_grad=False)
        x = a["input"]
        rows = x.shape[0] if packed else x.shape[0] * x.shape[1]
        if gates is False and packed:
            assert rows >= 9, rows  # (make_case's random lengths)
        assert ops.gates_in_reserve(x, a["batch_sizes"], rows, H, H, 2, 2) == gates, rows
        args = (x, a["batch_sizes"], a["hx"], a["cx"], a["weights"], a["dropout_mask"],
                a["num_layers"], a["bidirectional"], a["has_biases"], a["proj_size"])
        torch.library.opcheck(LSTM_FORWARD, args)
        output, hy, cy, reserve = call(LSTM_FORWARD, a)
        assert reserve.numel() == ops.reserve_numel(rows, 2, 2, H, 0, gates)
        args = (*args[:6], reserve, torch.randn_like(output), torch.randn_like(hy), None,
                *args[6:])
        torch.library.opcheck(LSTM_BACKWARD, args)


@pytest.mark.parametrize("L,bidirectional,proj,packed,with_state,dropout,batch,H,T", [
    (2, False, 0, False, True, 0.0, 10, 10, 6),
    (1, False, 0, False, False, 0.0, 5, 10, 6),
    (2, True, 3, True, True, 0.5, 10, 10, 6),
    (3, True, 0, True, False, 0.5, 5, 10, 6),
    (2, False, 5, False, False, 0.5, 12, 10, 6),
    (2, True, 0, True, True, 0.0, 13, 15, 80),
], ids=["2-layers", "1-layer-no-hx-narrow", "bi-proj-packed-dropout",
        "3-layers-bi-packed-no-hx-narrow", "proj-no-hx-dropout", "batch-slices-bi-packed"])
def test_fp16_small_hidden_training_recomputes_the_gates_bit_for_bit(L, bidirectional, proj,
                                                                     packed, with_state, dropout,
                                                                     batch, H, T):
    """float16 training below 16 hidden units (the small-hidden kernel) whose reserve keeps no
    gates (csrc/lstm.h, gates_in_reserve): the backward recomputes each step's gates from the
    layer input, h_{t-1} and c_{t-1} in the reserve, as the forward computed them
    (csrc/cpu/small_hidden_backward.h, tiny_recompute_gates: the step's projection, the recurrent
    product, narrow batches through W_hh^T, the cell pass), and writes each gradient over its
    gate. Every result and gradient is the float32 call's on the same values, whose reserve
    keeps the gates, bit for bit; also without dL/dx (input_grad=False), and where the
    forward splits the batch over the threads (batch-slices: slices of 7 and 6 rows on two
    threads, narrow ones, where the backward recomputes the whole batch at once)."""
    _check_recomputed_gates(torch.float16, L, bidirectional, proj, packed, with_state, dropout,
                            batch, H, T, I=5)


@pytest.mark.parametrize("I", [5, 40], ids=["recomputed", "wide-input-forward-again"])
def test_packed_bf16_small_hidden_backward_recomputes_the_gates_bit_for_bit(I):
    """Packed bfloat16 training keeps no gates at any hidden size (csrc/lstm.h,
    gates_in_reserve). Below 16 hidden units the small-hidden backward recomputes a step's at a
    time where every layer input is at most 32 wide, and runs the forward again into a reserve
    with the gates where one is wider (csrc/cpu/backward.h): either way every result and
    gradient is the float32 call's on the same values, bit for bit."""
    _check_recomputed_gates(torch.bfloat16, 2, True, 0, True, True, 0.5, 10, 10, 6, I=I)


def _check_recomputed_gates(dtype, L, bidirectional, proj, packed, with_state, dropout, batch,
                            H, T, I):
    """A small-hidden training call in `dtype` whose reserve keeps no gates against the float32
    call on the same values (whose reserve keeps them): equal bit for bit, forward and
    backward, with and without dL/dx."""
    _, a = make_case(L, True, bidirectional, proj, packed, with_state, dtype=dtype,
                     input_size=I, hidden_size=H, seq_len=T, batch=batch, dropout=dropout,
                     requires_grad=False)
    a32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point()
               else [w.float() for w in v] if k == "weights" else v) for k, v in a.items()}
    D, out = (2 if bidirectional else 1), proj or H
    rows = a["input"].shape[0] * (1 if packed else a["input"].shape[1])
    output, hy, cy, reserve = call(LSTM_FORWARD, a)
    expected = call(LSTM_FORWARD, a32)
    assert reserve.numel() == ops.reserve_numel(rows, L, D, H, proj, False)
    assert expected[3].numel() == ops.reserve_numel(rows, L, D, H, proj, True)
    for ours, theirs in zip((output, hy, cy), expected[:3]):
        assert torch.equal(ours, theirs.to(dtype))
    ups = [torch.randn_like(t) for t in (output, hy, cy)]
    for input_grad in (True, False):
        got = LSTM_BACKWARD(*op_args(a)[:6], reserve, *ups, *op_args(a)[6:], input_grad)
        want = LSTM_BACKWARD(*op_args(a32)[:6], expected[3], *(u.float() for u in ups),
                             *op_args(a32)[6:], input_grad)
        assert got[0].numel() == (rows * I if input_grad else 0)
        for ours, theirs in zip([*got[:3], *got[3]], [*want[:3], *want[3]]):
            if ours is None:
                assert theirs is None
                continue
            assert not torch.isnan(ours).any()
            assert torch.equal(ours, theirs.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["f64", "f32", "bf16", "fp16"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_backward_without_input_grad(dtype, bidirectional):
    """lstm_backward(..., input_grad=False), which the autograd kernel passes where the input
    needs no gradient (the usual training call): grad_input is an empty [0] tensor, layer 0's
    dL/dx products are skipped, and every other gradient is the input_grad=True call's, bit for
    bit (float16 at sizes whose reserve keeps no gates too: its dL/dx by chunks). The fake
    kernel agrees (opcheck). Through autograd: an input that does not require grad gets the
    same weight, h0 and c0 gradients as one that does."""
    _, a = make_case(2, True, bidirectional, 0, False, with_state=True, dtype=dtype,
                     hidden_size=32, input_size=8, seq_len=40, batch=6, requires_grad=False)
    output, hy, cy, reserve = call(LSTM_FORWARD, a)
    args = (a["input"], a["batch_sizes"], a["hx"], a["cx"], a["weights"], a["dropout_mask"],
            reserve, torch.randn_like(output), torch.randn_like(hy), torch.randn_like(cy),
            a["num_layers"], a["bidirectional"], a["has_biases"], a["proj_size"])
    full = LSTM_BACKWARD(*args)
    without = LSTM_BACKWARD(*args, False)
    assert full[0].shape == a["input"].shape
    assert without[0].shape == (0,) and without[0].dtype == a["input"].dtype
    for x, y in zip([*full[1:3], *full[3]], [*without[1:3], *without[3]]):
        assert torch.equal(x, y)
    torch.library.opcheck(LSTM_BACKWARD, (*args, False))

    from fused_lstm import FusedLSTM
    torch.manual_seed(0)
    model = FusedLSTM(8, 32, num_layers=2, bidirectional=bidirectional).to(dtype)
    x = torch.randn(40, 6, 8, dtype=dtype)
    up = torch.randn(40, 6, 64 if bidirectional else 32, dtype=dtype)
    grads = []
    for needs in (True, False):
        model.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(needs)
        model(xx)[0].backward(up)
        assert (xx.grad is not None) == needs
        grads.append([p.grad for p in model.parameters()])
    for g, h in zip(*grads):
        assert torch.equal(g, h)


def test_reserve_size_matches_python_formula():
    _, a = make_case(3, True, True, 2, True, with_state=True, requires_grad=False)
    reserve = call(LSTM_FORWARD, a)[3]
    assert reserve.numel() == ops.reserve_numel(a["input"].shape[0], 3, 2, 4, 2)
    assert reserve.dtype == torch.float64


@pytest.mark.parametrize("hidden_size", [4, 32], ids=["small-hidden", "row-wise"])
def test_packed_bf16_reserve_keeps_no_gates(hidden_size):
    """A packed bfloat16 call on the CPU saves no gates (csrc/lstm.h, gates_in_reserve: its
    backward recomputes them): its reserve is the formula's without them, padded bf16 and
    packed float64 keep them; the backward's gradients are the same as from the same call
    padded (hidden 4: the small-hidden kernel, whose backward reruns the forward; hidden 32:
    the row-wise kernel, which recomputes each step's gates)."""
    H = hidden_size
    for packed, dtype, gates in ((True, torch.bfloat16, False), (False, torch.bfloat16, True),
                                 (True, torch.float64, True)):
        _, a = make_case(2, True, True, 0, packed, with_state=True, dtype=dtype, hidden_size=H,
                         seq_len=6, batch=5, requires_grad=False)
        rows = a["input"].shape[0] * (1 if packed else a["input"].shape[1])
        reserve = call(LSTM_FORWARD, a)[3]
        assert ops.gates_in_reserve(a["input"], a["batch_sizes"], rows, H, H, 2, 2) == gates
        assert reserve.numel() == ops.reserve_numel(rows, 2, 2, H, 0, gates)
        assert reserve.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ops.reserve_numel(rows, 2, 2, H, 0, False) < ops.reserve_numel(rows, 2, 2, H, 0)
    # every sequence of full length: the packed call and the padded one are the same LSTM
    _, a = make_case(2, True, True, 0, False, with_state=True, dtype=torch.bfloat16,
                     hidden_size=H, seq_len=6, batch=5, requires_grad=False)
    T, B = a["input"].shape[:2]
    packed = dict(a, input=a["input"].reshape(T * B, -1),
                  batch_sizes=torch.full((T,), B, dtype=torch.long))
    results = []
    for args in (a, packed):
        output, hy, cy, reserve = call(LSTM_FORWARD, args)
        up = [torch.randn(t.shape, generator=torch.Generator().manual_seed(3)).to(t.dtype)
              for t in (output, hy, cy)]
        back = torch.ops.fused_lstm.lstm_backward(
            args["input"], args["batch_sizes"], args["hx"], args["cx"], args["weights"], None,
            reserve, up[0].reshape(output.shape), up[1], up[2], 2, True, True, 0)
        results.append([output.reshape(T * B, -1), hy, cy, back[0].reshape(T * B, -1),
                        back[1], back[2], *back[3]])
    for x, y in zip(*results):
        assert torch.equal(x, y)


def test_zero_batch():
    _, a = make_case(2, True, True, 2, False, with_state=True, batch=0)
    output, hy, cy = call(ops.lstm, a)
    assert output.shape == (4, 0, 4) and hy.shape == (4, 0, 2) and cy.shape == (4, 0, 4)
    grads = torch.autograd.grad(output.sum() + hy.sum(), differentiable(a))
    assert all(g.abs().sum() == 0 for g in grads)


BAD_ARGS = {
    "too few weights": (lambda a: a.update(weights=a["weights"][:-1]), RuntimeError, "weight tensors"),
    "wrong input size": (lambda a: a.update(input=torch.randn(4, 3, 7, dtype=torch.float64)),
                         RuntimeError, "input_size"),
    "2-D unpacked input": (lambda a: a.update(input=torch.randn(4, 3, dtype=torch.float64)),
                           RuntimeError, "3 dimensions"),
    "empty sequence": (lambda a: a.update(input=torch.randn(0, 3, 3, dtype=torch.float64)),
                       RuntimeError, "sequence length"),
    "wrong hx shape": (lambda a: a.update(hx=torch.randn(2, 3, 5, dtype=torch.float64)),
                       RuntimeError, "hx"),
    "wrong cx batch": (lambda a: a.update(cx=torch.randn(2, 2, 4, dtype=torch.float64)),
                       RuntimeError, "cx"),
    "dtype mismatch": (lambda a: a.update(input=a["input"].float()), ValueError, "dtype"),
    "increasing batch_sizes": (lambda a: a.update(input=torch.randn(6, 3, dtype=torch.float64),
                                                  batch_sizes=torch.tensor([1, 2, 3])),
                               RuntimeError, "non-increasing"),
    "batch_sizes sum": (lambda a: a.update(input=torch.randn(5, 3, dtype=torch.float64),
                                           batch_sizes=torch.tensor([3, 3])),
                        RuntimeError, "sum to"),
    "mask shape": (lambda a: a.update(dropout_mask=torch.ones(1, 4, 3, 3, dtype=torch.float64)),
                   RuntimeError, "dropout_mask"),
    "integer input": (lambda a: a.update(input=torch.ones(4, 3, 3, dtype=torch.long)),
                      ValueError, "floating point"),
}


@pytest.mark.parametrize("name", list(BAD_ARGS))
def test_bad_arguments_raise_cleanly(name):
    mutate, exc, phrase = BAD_ARGS[name]
    _, a = make_case(2, True, False, 0, False, with_state=True, requires_grad=False)
    mutate(a)
    with pytest.raises(exc, match=phrase):
        call(LSTM_FORWARD, a)


def test_backward_rejects_foreign_reserve():
    _, a = make_case(2, True, False, 0, False, with_state=True, requires_grad=False)
    output, hy, cy, reserve = call(LSTM_FORWARD, a)
    with pytest.raises(RuntimeError, match="reserve"):
        LSTM_BACKWARD(a["input"], None, a["hx"], a["cx"], a["weights"], None, reserve[:-1],
                      output, None, None, 2, False, True, 0)


LSTM_INFERENCE = torch.ops.fused_lstm.lstm_inference.default


@pytest.mark.parametrize("num_layers,bias,bidirectional,proj_size,packed", GRID, ids=GRID_IDS)
def test_inference_op_matches_forward(num_layers, bias, bidirectional, proj_size, packed):
    """lstm_inference (no reserve, chunked input projection) computes what lstm_forward does."""
    _, a = make_case(num_layers, bias, bidirectional, proj_size, packed, with_state=True,
                     dropout=0.3, requires_grad=False)
    expected = call(LSTM_FORWARD, a)[:3]
    for g, e in zip(call(LSTM_INFERENCE, a), expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("packed", [False, True])
def test_inference_op_over_several_chunks(packed):
    # 64 rows x 4*512 gates per step: the input projection runs in chunks of 8 steps (3 here).
    _, a = make_case(2, True, True, 64, packed, with_state=False, dtype=torch.float32,
                     input_size=8, hidden_size=512, seq_len=20, batch=64, requires_grad=False)
    expected = call(LSTM_FORWARD, a)[:3]
    for g, e in zip(call(LSTM_INFERENCE, a), expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_opcheck_inference():
    _, a = make_case(2, True, True, 2, True, with_state=True, dropout=0.5, requires_grad=False)
    args = (a["input"], a["batch_sizes"], a["hx"], a["cx"], a["weights"], a["dropout_mask"],
            a["num_layers"], a["bidirectional"], a["has_biases"], a["proj_size"])
    torch.library.opcheck(LSTM_INFERENCE, args)


def test_ops_lstm_uses_inference_only_without_grad():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    _, a = make_case(1, True, False, 0, False, with_state=False)
    for grad_enabled, expected in [(True, "fused_lstm.lstm_forward"), (False, "fused_lstm.lstm_inference")]:
        with torch.set_grad_enabled(grad_enabled), Record() as record:
            call(ops.lstm, a)
        fused = [name for name in record.ops if name.startswith("fused_lstm.")]
        assert fused and all(name.startswith(expected) for name in fused), fused


def test_reserve_size_is_the_kernels_formula_also_with_symbolic_sizes():
    """The fake kernel takes the reserve size from the C++ formula (fused_lstm::reserve_numel),
    with symbolic sizes too: the expression it builds evaluates to the kernel's reserve size."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    for packed, dtype in ((False, torch.float64), (True, torch.float64),
                          (False, torch.bfloat16), (True, torch.bfloat16)):
        _, a = make_case(3, True, True, 2, packed, with_state=True, requires_grad=False,
                         dtype=dtype)
        reserve = call(LSTM_FORWARD, a)[3]
        mode = FakeTensorMode(shape_env=ShapeEnv())
        fake = {k: mode.from_tensor(v, static_shapes=k not in ("input", "hx", "cx"))
                if isinstance(v, torch.Tensor) else
                [mode.from_tensor(w) for w in v] if k == "weights" else v for k, v in a.items()}
        with mode:
            numel = call(LSTM_FORWARD, fake)[3].numel()
        assert isinstance(numel, torch.SymInt)
        assert numel.node.hint == reserve.numel()
