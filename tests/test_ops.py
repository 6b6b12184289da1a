"""The fused ops themselves: float64 gradcheck over every option, gradgradcheck, opcheck,
parity with nn.LSTM's own kernel and with the reference, dtypes, NaN, bad arguments."""

import contextlib
import os
import pathlib
import subprocess
import sys

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


def test_reserve_size_matches_python_formula():
    _, a = make_case(3, True, True, 2, True, with_state=True, requires_grad=False)
    reserve = call(LSTM_FORWARD, a)[3]
    assert reserve.numel() == ops.reserve_numel(a["input"].shape[0], 3, 2, 4, 2)
    assert reserve.dtype == torch.float64


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


@contextlib.contextmanager
def num_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def two_threads():
    with num_threads(2):
        yield


def assert_matches_nn_lstm(a, weight_scale, tol, inference_tol):
    """Outputs and every gradient of the op against nn.LSTM's own kernel (torch._VF.lstm) on the
    same tensors, the weights first scaled by ``weight_scale``; then lstm_inference against
    lstm_forward. make_case's weights (0.5 * randn) saturate tens of hidden units and grow the
    gradients to ~1e3 over tens of steps, so larger cases scale them to about nn.LSTM's own
    initialisation (1/sqrt(hidden))."""
    a["weights"] = [(w.detach() * weight_scale).requires_grad_() for w in a["weights"]]
    hx = (a["hx"], a["cx"])
    flags = (a["has_biases"], a["num_layers"], 0.0, False, a["bidirectional"])
    if a["batch_sizes"] is not None:
        expected = torch._VF.lstm(a["input"], a["batch_sizes"], hx, a["weights"], *flags)
    else:
        expected = torch._VF.lstm(a["input"], hx, a["weights"], *flags, False)
    got = call(ops.lstm, a)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)
    grads = [torch.randn_like(t) for t in got]
    wrt = differentiable(a)
    for g, e in zip(torch.autograd.grad(got, wrt, grads), torch.autograd.grad(expected, wrt, grads)):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)
    with torch.no_grad():
        for g, e in zip(call(LSTM_INFERENCE, a), got):
            torch.testing.assert_close(g, e, rtol=inference_tol, atol=inference_tol)


@pytest.mark.parametrize("bidirectional,proj_size,packed",
                         [(False, 0, False), (True, 0, True), (True, 16, False), (False, 16, True)])
def test_batch_split_over_threads(two_threads, bidirectional, proj_size, packed):
    """With two threads and enough recurrent work, each thread runs every step for its own slice
    of the batch (csrc/cpu: for_each_batch_slice), forward and backward; an odd batch makes the
    slices unequal and packed lengths make a slice run out of rows before the other. float64."""
    _, a = make_case(2, True, bidirectional, proj_size, packed, with_state=True,
                     input_size=5, hidden_size=64, seq_len=24, batch=9)
    assert_matches_nn_lstm(a, 1 / 8, tol=1e-10, inference_tol=1e-12)


@pytest.mark.parametrize("bidirectional,packed", [(False, False), (True, True)])
def test_thin_products_split_over_threads(two_threads, bidirectional, packed):
    """A batch of a few rows with a large hidden size (streaming inference): the products are
    split by columns over the threads (csrc/cpu gemm, kThinRows), the gradients' products of a
    few rows too. float64."""
    _, a = make_case(2, True, bidirectional, 0, packed, with_state=True,
                     input_size=7, hidden_size=256, seq_len=3, batch=2)
    assert_matches_nn_lstm(a, 1 / 32, tol=1e-10, inference_tol=1e-12)


SMALL_HIDDEN_CASES = [  # hidden, proj_size, batch, bidirectional, packed
    (3, 0, 1, False, False),
    (3, 0, 7, True, True),  # narrow: batch columns 4 + 2 + 1
    (3, 2, 6, False, True),  # narrow: 4 + 2, projection
    (5, 3, 10, False, False),  # batch blocks 8 + 2; rows of W_hr (3) and W_hh^T not in 4s
    (3, 0, 29, True, False),  # batch blocks 16 + 8 + 4 + 1
    (7, 5, 13, True, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("hidden,proj_size,batch,bidirectional,packed", SMALL_HIDDEN_CASES,
                         ids=[f"H{h}-P{p}-B{b}-{'bi' if d else 'uni'}-{'packed' if k else 'padded'}"
                              for h, p, b, d, k in SMALL_HIDDEN_CASES])
def test_small_hidden_products_match_nn_lstm(dtype, hidden, proj_size, batch, bidirectional,
                                             packed):
    """Hidden sizes below 16 run in the batch-fastest layout (csrc/cpu: tiny_product): batches
    of 8 and more in blocks of 16, 8, 4, 2, 1 columns, weight rows 4 at a time and the rest one
    by one (W_hr's proj_size rows, W_hh^T's out rows in the backward); narrower batches along the
    weight rows, 4 batch columns at a time, then 2, then 1. Forward, every gradient and
    inference against nn.LSTM on the same tensors."""
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    _, a = make_case(2, True, bidirectional, proj_size, packed, with_state=True, dtype=dtype,
                     input_size=4, hidden_size=hidden, seq_len=5, batch=batch)
    assert_matches_nn_lstm(a, 1 / 2, tol=tol, inference_tol=tol / 10)


@pytest.mark.parametrize("hidden,batch", [(48, 9), (80, 70)], ids=["one-block", "blocks"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bidirectional,proj_size,packed",
                         [(False, 0, False), (True, 0, True), (True, 8, False), (False, 8, True)])
def test_float32_row_wise_path_matches_nn_lstm(threads, bidirectional, proj_size, packed, hidden,
                                                batch):
    """float32 at a hidden size of the row-wise path (>= 16): the recurrent products (forward
    and backward) go through oneDNN's brgemm micro-kernel where torch has it (csrc/cpu:
    brgemm_product, in blocks of 64 rows and 256 columns: 80 hidden units are 320 gate columns,
    70 rows two row blocks on one thread), on one thread or split over two by batch rows."""
    with num_threads(threads):
        _, a = make_case(2, True, bidirectional, proj_size, packed, with_state=True,
                         dtype=torch.float32, input_size=5, hidden_size=hidden, seq_len=12,
                         batch=batch)
        assert_matches_nn_lstm(a, 1 / 4, tol=1e-5, inference_tol=1e-6)


THIN_CASES = [  # hidden, input, batch, num_layers, bias, bidirectional, with_state
    (16, 11, 1, 1, True, False, True),
    (17, 5, 3, 2, False, True, False),
    (17, 2000, 2, 1, True, False, True),  # split over 2 threads: 16 units and 1
    (33, 19, 8, 3, True, True, True),
    (48, 27, 5, 1, True, False, False),
    (200, 40, 3, 2, True, True, True),  # 2 threads: the split crosses the directions
    (256, 64, 1, 2, True, False, True),  # stream-step
    (256, 64, 2, 2, False, True, True),
    (33, 19, 7, 2, True, False, True),
]


@pytest.mark.parametrize("seq_len", [1, 3])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("hidden,input_size,batch,num_layers,bias,bidirectional,with_state",
                         THIN_CASES,
                         ids=[f"H{h}-I{i}-B{b}-L{l}-{'bias' if bi else 'nobias'}-{'bi' if d else 'uni'}"
                              f"-{'state' if s else 'nostate'}" for h, i, b, l, bi, d, s in THIN_CASES])
def test_thin_inference_matches_nn_lstm(seq_len, threads, dtype, hidden, input_size, batch,
                                        num_layers, bias, bidirectional, with_state):
    """Streaming inference (a batch of at most 8 rows, a hidden size from 16 on, no projection):
    lstm_inference takes the thin kernel (csrc/cpu: thin_inference; each thread owns a range of
    hidden units, dot products along the weight rows in blocks of 1 to 4 batch rows, scalar
    tails where the row lengths are not multiples of the vector width, units split unevenly
    over the threads). Against nn.LSTM on the same weights, and against lstm_forward; seq_len 3
    runs it step by step and, packed, with rows ending early (the reverse direction's rows then
    start from h0 and c0 at different steps)."""
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for packed in ([False, True] if seq_len > 1 and batch > 1 else [False]):
        lstm, a = make_case(num_layers, bias, bidirectional, 0, packed, with_state, dtype=dtype,
                            input_size=input_size, hidden_size=hidden, seq_len=seq_len,
                            batch=batch, requires_grad=False, seed=hidden + batch)
        a["weights"] = [w / hidden ** 0.5 for w in a["weights"]]
        a["input"] = a["input"] * (hidden / input_size) ** 0.5
        hx = None if a["hx"] is None else (a["hx"], a["cx"])
        flags = (bias, num_layers, 0.0, False, bidirectional)
        with num_threads(threads):
            got = call(LSTM_INFERENCE, a)
            forward = call(LSTM_FORWARD, a)[:3]
        if hx is None:
            D = 2 if bidirectional else 1
            zeros = torch.zeros(num_layers * D, batch, hidden, dtype=dtype)
            hx = (zeros, zeros)
        if packed:
            expected = torch._VF.lstm(a["input"], a["batch_sizes"], hx, a["weights"], *flags)
        else:
            expected = torch._VF.lstm(a["input"], hx, a["weights"], *flags, False)
        for g, e, f in zip(got, expected, forward):
            torch.testing.assert_close(g, e, rtol=tol, atol=tol)
            torch.testing.assert_close(g, f, rtol=tol, atol=tol)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias,bidirectional,proj_size,packed,hidden,batch",
                         [(True, False, 0, False, 80, 70), (False, True, 0, True, 40, 9),
                          (True, True, 8, True, 40, 70), (True, False, 8, False, 40, 9)])
def test_float32_fused_input_projection_matches_nn_lstm(threads, bias, bidirectional, proj_size,
                                                         packed, hidden, batch):
    """float32, hidden >= 16, seq_len >= 2: each step's gates are b + x_t W_ih^T + h W_hh^T,
    both products through brgemm on the thread that runs the step (csrc/cpu: forward_step with
    x_t; W_ih transposed once per call by use_brgemm), training forward, backward and inference.
    Inputs wider than the hidden size and three layers (the deeper layers' input is the previous
    layer's D * out), with and without biases; 70 rows are two row blocks on one thread; 40
    hidden units are 160 gate columns, panels of 64 columns and a tail of 32."""
    with num_threads(threads):
        _, a = make_case(3, bias, bidirectional, proj_size, packed, with_state=True,
                         dtype=torch.float32, input_size=37, hidden_size=hidden, seq_len=9,
                         batch=batch)
        assert_matches_nn_lstm(a, 1 / 4, tol=1e-5, inference_tol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bidirectional,packed", [(False, False), (True, True)])
def test_float32_fused_input_projection_same_as_unfused(monkeypatch, threads, bidirectional,
                                                        packed):
    """The fused input projection against the separate one (FUSED_LSTM_UNFUSED_INPUT=1, read per
    call): same outputs, the same reserve (the activated gates and cells backward reads), the
    same inference results; with a dropout mask between layers and a projection; gradients
    against the plain PyTorch reference."""
    with num_threads(threads):
        _, a = make_case(3, True, bidirectional, 8, packed, with_state=True, dtype=torch.float32,
                         input_size=24, hidden_size=36, seq_len=10, batch=11, dropout=0.3)
        a["weights"] = [(w.detach() / 4).requires_grad_() for w in a["weights"]]
        with torch.no_grad():
            fused = call(LSTM_FORWARD, a)
            fused_inference = call(LSTM_INFERENCE, a)
            monkeypatch.setenv("FUSED_LSTM_UNFUSED_INPUT", "1")
            unfused = call(LSTM_FORWARD, a)
            unfused_inference = call(LSTM_INFERENCE, a)
            monkeypatch.delenv("FUSED_LSTM_UNFUSED_INPUT")
        for f, u in zip(fused, unfused):  # output, h_n, c_n, reserve
            torch.testing.assert_close(f, u, rtol=1e-5, atol=1e-5)
        for f, u in zip(fused_inference, unfused_inference):
            torch.testing.assert_close(f, u, rtol=1e-5, atol=1e-5)
        for f, u in zip(fused_inference, fused[:3]):
            torch.testing.assert_close(f, u, rtol=1e-6, atol=1e-6)
        assert_results_and_grads_close(call(ops.lstm, a), call(reference.lstm_forward, a),
                                       differentiable(a), 1e-5, grad_tol=1e-4)


THREE_LAYER_CASES = [(False, 0, False, False), (True, 0, True, True), (True, 8, False, True),
                    (False, 8, True, False)]  # bidirectional, proj_size, packed, with_state


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bidirectional,proj_size,packed,with_state", THREE_LAYER_CASES,
                         ids=[f"{'bi' if d else 'uni'}-P{p}-{'packed' if k else 'padded'}-"
                              f"{'state' if w else 'nostate'}" for d, p, k, w in THREE_LAYER_CASES])
def test_float32_fused_inference_three_layers(threads, bidirectional, proj_size, packed,
                                              with_state):
    """float32 inference with every layer's input projection fused into its steps (csrc/cpu:
    inference_impl, use_brgemm), three layers whose outputs alternate between two buffers.
    Against nn.LSTM and lstm_forward; h_t kept in the layer output between steps (padded) or in
    h_n (packed lengths); without hx, the first step's product is skipped."""
    with num_threads(threads):
        _, a = make_case(3, True, bidirectional, proj_size, packed, with_state=with_state,
                         dtype=torch.float32, input_size=20, hidden_size=24, seq_len=9, batch=7,
                         requires_grad=False)
        a["weights"] = [w / 4 for w in a["weights"]]
        hx = (a["hx"], a["cx"]) if with_state else zeros_state(a)
        flags = (True, 3, 0.0, False, bidirectional)
        if packed:
            expected = torch._VF.lstm(a["input"], a["batch_sizes"], hx, a["weights"], *flags)
        else:
            expected = torch._VF.lstm(a["input"], hx, a["weights"], *flags, False)
        got = call(LSTM_INFERENCE, a)
        for g, e, f in zip(got, expected, call(LSTM_FORWARD, a)):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(g, f, rtol=1e-6, atol=1e-6)


# ---- The float32 cell pass's activations (csrc/cpu/fast_math.h) ------------------------------

def cell_pass_case(hidden, batch, seed):
    """One layer whose gate pre-activations are its input: W_ih = I (input 4H), W_hh = 0, b_hh = 0,
    b_ih small, so every product is exact and the cell pass alone rounds. Inputs spread over
    [-20, 20] (every regime of sigmoid and tanh), two steps from h0 = 0 and a random c0."""
    _, a = make_case(1, True, False, 0, False, with_state=True, dtype=torch.float32,
                     input_size=4 * hidden, hidden_size=hidden, seq_len=2, batch=batch, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    a["input"] = (torch.rand(2, batch, 4 * hidden, generator=gen) * 40 - 20).requires_grad_()
    a["hx"] = torch.zeros(1, batch, hidden, requires_grad=True)
    a["cx"] = (torch.randn(1, batch, hidden, generator=gen) * 3).requires_grad_()
    bias = torch.rand(4 * hidden, generator=gen) * 2 - 1
    a["weights"] = [w.requires_grad_() for w in (torch.eye(4 * hidden), torch.zeros(4 * hidden, hidden),
                                                 bias, torch.zeros(4 * hidden))]
    return a


def cell_pass_errors(a, got):
    """The largest errors of (output, h_n, c_n) = got against float64, in units of 2^-24 times the
    magnitude of what was rounded: c_t = f c_{t-1} + i g by |f c_{t-1}| + |i g|, h_t = o tanh(c_t)
    by |h_t| + |o| (1 - tanh^2 c_t) times c_t's scale (where c_t's error reaches h_t)."""
    pre = (a["input"].detach() + a["weights"][2].detach()).double()  # x + b, rounded as the op does
    c = a["cx"].detach()[0].double()
    c_scale = torch.zeros_like(c)
    unit = 2.0 ** -24
    out, h_n, c_n = got
    h_err = 0.0
    for t in range(pre.shape[0]):
        pi, pf, pg, po = pre[t].chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(pi), torch.sigmoid(pf), torch.tanh(pg), torch.sigmoid(po)
        fc, ig = f * c, i * g
        c_scale = fc.abs() + ig.abs() + f * c_scale
        c = fc + ig
        h = o * torch.tanh(c)
        h_scale = h.abs() + o * (1 - torch.tanh(c) ** 2) * c_scale
        h_err = max(h_err, ((out[t].double() - h).abs() / (unit * h_scale + 1e-45)).max().item())
    h_err = max(h_err, ((h_n[0].double() - h).abs() / (unit * h_scale + 1e-45)).max().item())
    c_err = ((c_n[0].double() - c).abs() / (unit * c_scale + 1e-45)).max().item()
    return h_err, c_err


CELL_PASS_CASES = [(40, 9), (7, 12), (256, 4)]  # hidden, batch: a partial vector, the tiny path, 16s


def check_cell_pass(hidden, batch, seed=0):
    """Training (the pass that keeps the gates) and inference: within the activations' measured
    errors (sigmoid <= 3.8 ulp, tanh <= 5.3 ulp, NOTES.md section 19) plus the cell's own
    roundings, with room: 12 units for c, 16 for h (1 ulp is 1 to 2 units; 2 to 5 measured).
    Returns the outputs."""
    a = cell_pass_case(hidden, batch, seed)
    trained = call(ops.lstm, a)
    with torch.no_grad():
        inferred = call(LSTM_INFERENCE, a)
    for got in (trained, inferred):
        h_err, c_err = cell_pass_errors(a, [t.detach() for t in got])
        assert c_err <= 12 and h_err <= 16, (hidden, batch, h_err, c_err)
    return [t.detach() for t in (*trained, *inferred)]


@pytest.mark.parametrize("hidden,batch", CELL_PASS_CASES, ids=[f"H{h}-B{b}" for h, b in CELL_PASS_CASES])
def test_float32_cell_pass_accuracy(hidden, batch):
    """The float32 cell pass this CPU runs (on AVX-512: 16 elements at a time, exp through a
    table, csrc/cpu: cell_forward_vec16; else the vectorised scalar functions) against float64,
    over pre-activations spread across [-20, 20]."""
    check_cell_pass(hidden, batch)


def test_float32_generic_cell_pass(tmp_path):
    """The generic float32 cell pass (what CPUs without AVX-512 run), forced with
    FUSED_LSTM_NO_VEC16_CELL=1 in a fresh process: the same accuracy bounds, parity with nn.LSTM
    through the row-wise and tiny paths, training and inference; and on an AVX-512 CPU, results
    that are not bitwise this process's (the variable did switch the pass) yet agree closely."""
    tests = pathlib.Path(__file__).resolve().parent
    code = f"""
import sys, torch
sys.path.insert(0, {str(tests)!r})
import test_ops as t
outs = [t.check_cell_pass(h, b) for h, b in t.CELL_PASS_CASES]
for hidden, batch, proj, packed in [(40, 9, 0, False), (24, 5, 8, True), (7, 12, 0, True)]:
    _, a = t.make_case(2, True, True, proj, packed, with_state=True, dtype=torch.float32,
                       input_size=6, hidden_size=hidden, seq_len=7, batch=batch)
    t.assert_matches_nn_lstm(a, 1 / 4, tol=1e-5, inference_tol=1e-6)
torch.save(outs, {str(tmp_path / 'generic.pt')!r})
"""
    env = dict(os.environ, FUSED_LSTM_NO_VEC16_CELL="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    generic = torch.load(tmp_path / "generic.pt")
    here = [check_cell_pass(h, b) for h, b in CELL_PASS_CASES]
    differ = False
    for g_case, h_case in zip(generic, here):
        for g, h in zip(g_case, h_case):
            torch.testing.assert_close(g, h, rtol=2e-6, atol=2e-6)
            differ = differ or not torch.equal(g, h)
    if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX"):
        assert differ


def test_reserve_size_is_the_kernels_formula_also_with_symbolic_sizes():
    """The fake kernel takes the reserve size from the C++ formula (fused_lstm::reserve_numel),
    with symbolic sizes too: the expression it builds evaluates to the kernel's reserve size."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    for packed in (False, True):
        _, a = make_case(3, True, True, 2, packed, with_state=True, requires_grad=False)
        reserve = call(LSTM_FORWARD, a)[3]
        mode = FakeTensorMode(shape_env=ShapeEnv())
        fake = {k: mode.from_tensor(v, static_shapes=k not in ("input", "hx", "cx"))
                if isinstance(v, torch.Tensor) else
                [mode.from_tensor(w) for w in v] if k == "weights" else v for k, v in a.items()}
        with mode:
            numel = call(LSTM_FORWARD, fake)[3].numel()
        assert isinstance(numel, torch.SymInt)
        assert numel.node.hint == reserve.numel()
