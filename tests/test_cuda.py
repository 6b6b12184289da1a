"""The CUDA kernels on a GPU: float64 gradcheck over every option, parity with cuDNN's nn.LSTM
(output, h_n, c_n and every gradient), the low-precision accuracy rule, agreement with the CPU
kernels (reserve layout included), packed / unbatched / dropout, CUDA graph capture, streams, no
host synchronisation, determinism. Then the same properties of the persistent kernels
(csrc/cuda/lstm_persistent.*), forced with FUSED_LSTM_CUDA_PATH=persistent and checked with
fused_lstm.explain to have run: against the CPU kernels and the step path (float64, every option
and several launch plans), cuDNN (float32 across hidden sizes around the rule's limits, bfloat16,
float16), gradcheck, graph capture, no synchronisation, determinism.

Skipped where no GPU is present; tests/test_cuda_compile.py checks there what can be checked
without one (the sources compile with nvcc; the host code, emulated on the CPU, matches the CPU
kernels).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from fused_lstm import FusedLSTM, ops

from helpers import (
    GRID,
    GRID_IDS,
    PERSISTENT_GRID,
    PERSISTENT_GRID_IDS,
    assert_results_and_grads_close,
    differentiable,
    make_case,
    op_args,
    randn,
    reserve_in_common_layout,
    zeros_state,
)

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    # A fallback to nn.LSTM would make the module parity tests pass vacuously.
    pytest.mark.filterwarnings("error::fused_lstm.FusedLSTMFallbackWarning"),
]

CUDA = "cuda"
LSTM_FORWARD = torch.ops.fused_lstm.lstm_forward.default
LSTM_BACKWARD = torch.ops.fused_lstm.lstm_backward.default


@pytest.fixture(autouse=True)
def _exact_float32():
    """cuDNN's RNNs use TF32 by default (torch.backends.cudnn.allow_tf32 is True): float32
    parity needs full float32 products on both sides."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def on(a, device=CUDA, dtype=None, requires_grad=None):
    """make_case's arguments as fresh leaves on `device` (batch_sizes stays a CPU tensor)."""
    def move(t, grad):
        if t is None:
            return None
        t = t.detach().to(device=device, dtype=dtype or t.dtype)
        return t.requires_grad_(grad)

    def grad_of(t):
        return t is not None and (t.requires_grad if requires_grad is None else requires_grad)

    b = dict(a)
    for key in ("input", "hx", "cx"):
        b[key] = move(a[key], grad_of(a[key]))
    b["dropout_mask"] = move(a["dropout_mask"], False)
    b["weights"] = [move(w, grad_of(w)) for w in a["weights"]]
    return b


def aten_lstm(a):
    """nn.LSTM's own kernel (cuDNN on a CUDA device) on the same tensors: (output, h_n, c_n)."""
    hx = (a["hx"], a["cx"]) if a["hx"] is not None else zeros_state(a)
    with warnings.catch_warnings():  # weights not in one flat buffer: cuDNN copies them
        warnings.simplefilter("ignore", UserWarning)
        if a["batch_sizes"] is not None:
            return torch._VF.lstm(a["input"], a["batch_sizes"], hx, a["weights"], a["has_biases"],
                                  a["num_layers"], 0.0, False, a["bidirectional"])
        return torch._VF.lstm(a["input"], hx, a["weights"], a["has_biases"], a["num_layers"],
                              0.0, False, a["bidirectional"], False)


def test_cuda_kernels_are_registered():
    """On a GPU machine a build without the CUDA kernels is a failure, not a skip."""
    for op in ("lstm_forward", "lstm_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_lstm::{op}", "CUDA"), op


# --- gradients ---------------------------------------------------------------------------------

@pytest.mark.parametrize("num_layers,bias,bidirectional,proj_size,packed", GRID, ids=GRID_IDS)
def test_gradcheck_cuda(num_layers, bias, bidirectional, proj_size, packed):
    _, a = make_case(num_layers, bias, bidirectional, proj_size, packed, with_state=True,
                     input_size=2, hidden_size=3, seq_len=3, batch=3, dropout=0.5)
    a = on(a)
    inputs = differentiable(a)

    def f(*tensors):
        b = dict(a, input=tensors[0], hx=tensors[1], cx=tensors[2], weights=list(tensors[3:]))
        return ops.lstm(*op_args(b))

    assert torch.autograd.gradcheck(f, inputs)


# --- parity with cuDNN ---------------------------------------------------------------------------

@pytest.mark.parametrize("with_state", [True, False], ids=["state", "nostate"])
@pytest.mark.parametrize("num_layers,bias,bidirectional,proj_size,packed", GRID, ids=GRID_IDS)
def test_float32_parity_with_cudnn(num_layers, bias, bidirectional, proj_size, packed,
                                   with_state):
    """Every output and every gradient, against cuDNN's LSTM on the same float32 tensors."""
    _, a = make_case(num_layers, bias, bidirectional, proj_size, packed, with_state,
                     dtype=torch.float32, input_size=5, hidden_size=6, seq_len=5, batch=4)
    a = on(a)
    assert_results_and_grads_close(ops.lstm(*op_args(a)), aten_lstm(a), differentiable(a), 1e-5)


def _results_and_grads(case, exact):
    """(ours, cuDNN's, float64's) outputs followed by their gradients for the same random
    upstream gradients: ``case`` on the GPU, ``exact`` its float64 CPU copy."""
    ours, theirs, expected = ops.lstm(*op_args(case)), aten_lstm(case), aten_lstm(exact)
    upstream = [torch.randn_like(t) for t in ours]
    ours_g = torch.autograd.grad(ours, differentiable(case), upstream)
    theirs_g = torch.autograd.grad(theirs, differentiable(case), upstream)
    expected_g = torch.autograd.grad(expected, differentiable(exact),
                                     [u.double().cpu() for u in upstream])
    return [*ours, *ours_g], [*theirs, *theirs_g], [*expected, *expected_g]


def _relative_error(x, reference):
    return ((x.double() - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def test_float32_accuracy_at_a_realistic_size():
    """hidden 256, 50 steps, two bidirectional layers: float32 accumulation stays as accurate
    as cuDNN's (TF32 off), measured against float64 on the CPU."""
    _, a = make_case(2, True, True, 0, False, with_state=True, dtype=torch.float32,
                     input_size=128, hidden_size=256, seq_len=50, batch=32, requires_grad=False)
    for w in a["weights"]:
        w.mul_(0.2)  # make_case's scale would saturate every gate at this width
    exact = aten_lstm(on(a, device="cpu", dtype=torch.float64))
    g = on(a)
    ours, theirs = ops.lstm(*op_args(g)), aten_lstm(g)
    for o, t, e in zip(ours, theirs, exact):
        e = e.to(CUDA)
        assert _relative_error(o, e) <= max(2 * _relative_error(t, e), 1e-5)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_low_precision_error_within_twice_cudnn(dtype, packed):
    """The flash-attention rule: our distance to the float64 result (on the same rounded
    inputs) is at most twice cuDNN's own in that dtype, plus a few units in the last place, for
    the outputs and for every gradient."""
    _, a64 = make_case(2, True, True, 0, packed, with_state=True, input_size=16, hidden_size=32,
                       seq_len=20, batch=8, requires_grad=False)
    low = on(a64, dtype=dtype, requires_grad=True)
    # The rounded inputs, held exactly: the errors measured are the computations' alone.
    exact = on(low, dtype=torch.float64, device="cpu", requires_grad=True)
    eps = torch.finfo(dtype).eps
    names = ["output", "h_n", "c_n", "grad_input", "grad_hx", "grad_cx"] + [
        f"grad_weight{i}" for i in range(len(a64["weights"]))]
    for name, o, t, e in zip(names, *_results_and_grads(low, exact)):
        assert o.dtype == dtype, name
        e = e.to(CUDA)
        our_error = (o.double() - e).abs().max().item()
        their_error = (t.double() - e).abs().max().item()
        slack = 4 * eps * max(1.0, e.abs().max().item())
        assert our_error <= 2 * their_error + slack, (name, our_error, their_error)


# --- the same results as the CPU kernels ------------------------------------------------------

@pytest.mark.parametrize("with_state", [True, False], ids=["state", "nostate"])
@pytest.mark.parametrize("num_layers,bias,bidirectional,proj_size,packed", GRID, ids=GRID_IDS)
def test_cuda_matches_cpu_kernels(num_layers, bias, bidirectional, proj_size, packed, with_state):
    """float64, with a dropout mask between layers: output, h_n, c_n, the whole reserve (the
    CPU's in the common layout) and every gradient of the backward op."""
    _, a = make_case(num_layers, bias, bidirectional, proj_size, packed, with_state,
                     input_size=3, hidden_size=5, seq_len=6, batch=4, dropout=0.4,
                     requires_grad=False)
    g = on(a)
    expected = LSTM_FORWARD(*op_args(a))
    got = LSTM_FORWARD(*op_args(g))
    for x, y in zip(got, [*expected[:3], reserve_in_common_layout(expected[3], a)]):
        assert x.device.type == CUDA and x.dtype == y.dtype and x.shape == y.shape
        torch.testing.assert_close(x.cpu(), y, rtol=1e-10, atol=1e-10)
    upstream = [torch.randn_like(t) for t in expected[:3]]
    b, c = op_args(a), op_args(g)
    e = LSTM_BACKWARD(*b[:6], expected[3], *upstream, *b[6:])
    r = LSTM_BACKWARD(*c[:6], got[3], *[u.to(CUDA) for u in upstream], *c[6:])
    for x, y in zip([*r[:3], *r[3]], [*e[:3], *e[3]]):
        torch.testing.assert_close(x.cpu(), y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["f32", "bf16", "f16"])
def test_cuda_matches_cpu_kernels_low_precision(dtype):
    _, a = make_case(2, True, True, 2, True, with_state=True, input_size=4, hidden_size=6,
                     seq_len=7, batch=5, dropout=0.3, requires_grad=False)
    cpu = on(a, device="cpu", dtype=dtype)
    got = LSTM_FORWARD(*op_args(on(cpu)))
    expected = LSTM_FORWARD(*op_args(cpu))
    expected = [*expected[:3], reserve_in_common_layout(expected[3], cpu)]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for x, y in zip(got, expected):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x.cpu(), y, **tol)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_dropout_mask_parity_with_cpu(packed):
    """The same mask, on both devices, gives the same outputs and gradients."""
    _, a = make_case(3, True, True, 2, packed, with_state=True, dropout=0.5, seq_len=6, batch=5)
    assert (a["dropout_mask"] == 0).any()
    g = on(a)
    got, expected = ops.lstm(*op_args(g)), ops.lstm(*op_args(a))
    upstream = [torch.randn_like(t) for t in expected]
    got_g = torch.autograd.grad(got, differentiable(g), [u.to(CUDA) for u in upstream])
    expected_g = torch.autograd.grad(expected, differentiable(a), upstream)
    for x, y in zip([*got, *got_g], [*expected, *expected_g]):
        torch.testing.assert_close(x.cpu(), y, rtol=1e-10, atol=1e-10)


# --- the module on CUDA --------------------------------------------------------------------------

def crandn(*shape):
    return randn(*shape, dtype=torch.float32).to(CUDA)


def _module_pair(**kwargs):
    torch_lstm = nn.LSTM(**kwargs).to(CUDA)
    fused = FusedLSTM(**kwargs).to(CUDA)
    fused.load_state_dict(torch_lstm.state_dict())
    return torch_lstm, fused


@pytest.mark.parametrize("layout", ["batch_first", "packed_unsorted", "unbatched"])
def test_module_on_cuda_matches_cudnn(layout):
    """FusedLSTM runs its CUDA kernels (no fallback warning) and matches nn.LSTM (cuDNN)."""
    kwargs = dict(input_size=5, hidden_size=7, num_layers=2, bidirectional=True, proj_size=3,
                  batch_first=layout == "batch_first", dtype=torch.float32)
    torch_lstm, fused = _module_pair(**kwargs)
    T, B = 6, 4
    if layout == "unbatched":
        leaf = crandn(T, 5).requires_grad_()
        inp = leaf
        hx = (crandn(4, 3), crandn(4, 7))
    elif layout == "batch_first":
        leaf = crandn(B, T, 5).requires_grad_()
        inp = leaf
        hx = None
    else:
        leaf = crandn(T, B, 5).requires_grad_()
        inp = pack_padded_sequence(leaf, [4, 6, 2, 5], enforce_sorted=False)
        hx = (crandn(4, B, 3), crandn(4, B, 7))
    results = []
    for module in (fused, torch_lstm):
        out, (h, c) = module(inp, hx) if hx is not None else module(inp)
        out = out.data if isinstance(out, PackedSequence) else out
        results.append((out, h, c))
    (o1, h1, c1), (o2, h2, c2) = results
    for x, y in zip((o1, h1, c1), (o2, h2, c2)):
        assert x.device.type == CUDA
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    upstream = [torch.randn_like(t) for t in (o1, h1, c1)]
    g1 = torch.autograd.grad((o1, h1, c1), [leaf, *fused.parameters()], upstream,
                             retain_graph=True)  # the packing's graph is shared
    g2 = torch.autograd.grad((o2, h2, c2), [leaf, *torch_lstm.parameters()], upstream)
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_module_training_with_dropout_and_eval_backward():
    fused = FusedLSTM(4, 6, num_layers=3, dropout=0.5, bidirectional=True).to(CUDA)
    x = crandn(5, 3, 4).requires_grad_()
    fused.train()
    out, (h, c) = fused(x)
    (out.sum() + h.sum() + c.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters())
    fused.eval()  # backward in eval mode: no mask
    x.grad = None
    out, _ = fused(x)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_autocast_behaves_like_nn_lstm():
    torch_lstm, fused = _module_pair(input_size=3, hidden_size=4, num_layers=2)
    x = crandn(5, 2, 3)
    with torch.autocast(CUDA, dtype=torch.float16):
        ours, theirs = fused(x), torch_lstm(x)
    assert ours[0].dtype == theirs[0].dtype
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)


# --- sizes at the edges --------------------------------------------------------------------------

@pytest.mark.parametrize("proj_size", [0, 2])
def test_zero_batch(proj_size):
    _, a = make_case(2, True, True, proj_size, False, with_state=True, batch=0)
    a = on(a)
    output, hy, cy = ops.lstm(*op_args(a))
    out = proj_size or 4
    assert output.shape == (4, 0, 2 * out) and hy.shape == (4, 0, out) and cy.shape == (4, 0, 4)
    grads = torch.autograd.grad(output.sum() + hy.sum(), differentiable(a))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_single_step_batch_one():
    _, a = make_case(2, True, True, 0, False, with_state=False, seq_len=1, batch=1,
                     dtype=torch.float32)
    a = on(a)
    for g, e in zip(ops.lstm(*op_args(a)), aten_lstm(a)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


# --- streams, graphs, synchronisation, determinism ---------------------------------------------


def forward_backward_without_sync(a):
    """One forward and backward op call under torch's sync debug mode, which raises on any call
    that waits for the GPU (.item(), device-to-host copies)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        output, hy, cy, reserve = LSTM_FORWARD(*op_args(a))
        c = op_args(a)
        LSTM_BACKWARD(*c[:6], reserve, torch.ones_like(output), torch.ones_like(hy), None, *c[6:])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_no_host_synchronisation():
    """Forward and backward never wait for the GPU (no .item(), no device-to-host copies):
    torch's sync debug mode raises on any synchronising call."""
    _, a = make_case(2, True, True, 2, True, with_state=True, dropout=0.5, requires_grad=False,
                     dtype=torch.float32)
    a = on(a)
    forward_backward_without_sync(a)


def test_runs_on_the_current_stream():
    _, a = make_case(2, True, True, 2, True, with_state=True, dtype=torch.float32,
                     requires_grad=False, hidden_size=64, input_size=32, seq_len=30, batch=16)
    a = on(a)
    expected = LSTM_FORWARD(*op_args(a))
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = LSTM_FORWARD(*op_args(a))
    stream.synchronize()
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cuda_graph_capture_of_forward_and_backward(packed, dtype):
    """Both ops are capturable: everything on the current stream, no synchronisation, no host
    reads of device data. Replays on new input values equal eager calls."""
    _, a = make_case(2, True, True, 2, packed, with_state=True, dropout=0.5, requires_grad=False,
                     input_size=8, hidden_size=16, seq_len=7, batch=5)
    static = on(a, dtype=dtype, requires_grad=False)
    # Replay and eager run the same kernels; a tolerance only in case cuBLAS picks another
    # algorithm under capture.
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    upstream = None

    def step():
        output, hy, cy, reserve = LSTM_FORWARD(*op_args(static))
        c = op_args(static)
        grads = LSTM_BACKWARD(*c[:6], reserve, upstream[0], upstream[1], upstream[2], *c[6:])
        return [output, hy, cy, reserve, grads[0], grads[1], grads[2], *grads[3]]

    probe = LSTM_FORWARD(*op_args(static))
    upstream = [torch.randn_like(t) for t in probe[:3]]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (cuBLAS handles, workspaces) outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        static["input"].copy_(torch.randn_like(static["input"]))
        static["hx"].copy_(torch.randn_like(static["hx"]))
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for x, y in zip(captured, eager):
            torch.testing.assert_close(x, y, **tol)


def test_deterministic_run_to_run():
    _, a = make_case(2, True, True, 2, True, with_state=True, input_size=32, hidden_size=64,
                     seq_len=10, batch=16, dtype=torch.float32)
    a = on(a)
    first = ops.lstm(*op_args(a))
    upstream = [torch.randn_like(t) for t in first]
    g1 = torch.autograd.grad(first, differentiable(a), upstream)
    second = ops.lstm(*op_args(a))
    g2 = torch.autograd.grad(second, differentiable(a), upstream)
    for x, y in zip([*first, *g1], [*second, *g2]):
        assert torch.equal(x, y)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_inputs_device_not_the_current_one():
    _, a = make_case(2, True, True, 2, True, with_state=True, dtype=torch.float32,
                     requires_grad=False)
    expected = LSTM_FORWARD(*op_args(on(a, device="cuda:0")))
    with torch.cuda.device(0):
        got = LSTM_FORWARD(*op_args(on(a, device="cuda:1")))
    for x, y in zip(got, expected):
        assert x.device == torch.device("cuda:1")
        assert torch.equal(x.cpu(), y.cpu())


def test_mixed_devices_are_rejected():
    _, a = make_case(1, True, False, 0, False, with_state=True, requires_grad=False)
    b = on(a)
    b["hx"] = a["hx"]  # left on the CPU
    with pytest.raises(RuntimeError, match="hx"):
        LSTM_FORWARD(*op_args(b))


# --- torch.library -------------------------------------------------------------------------------

OPCHECK_CASES = [
    dict(packed=False, with_state=True, dropout=0.0, proj_size=0, bidirectional=False),
    dict(packed=True, with_state=True, dropout=0.5, proj_size=2, bidirectional=True),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=["padded", "packed-dropout-proj"])
def test_opcheck_on_cuda(case):
    _, a = make_case(2, True, case["bidirectional"], case["proj_size"], case["packed"],
                     case["with_state"], dropout=case["dropout"])
    a = on(a)
    torch.library.opcheck(LSTM_FORWARD, op_args(a))
    with torch.no_grad():
        output, hy, cy, reserve = LSTM_FORWARD(*op_args(a))
    c = [t.detach() if isinstance(t, torch.Tensor) else t for t in op_args(a)]
    c[4] = [w.detach() for w in a["weights"]]
    torch.library.opcheck(LSTM_BACKWARD, (*c[:6], reserve, torch.randn_like(output),
                                          torch.randn_like(hy), None, *c[6:]))



# --- the persistent kernels (csrc/cuda/lstm_persistent.*) --------------------------------------
# FUSED_LSTM_CUDA_PATH=persistent runs them wherever they can run (no projection; W_hh fits on
# chip); each test asserts with fused_lstm.explain that they did. The tests above run whatever
# the automatic rule picks (the persistent kernels at most of their sizes; benchmarks/
# gpu_check.sh runs this file again with FUSED_LSTM_CUDA_PATH=persistent and =step).

def explain_case(a):
    """fused_lstm.explain for an op call's arguments."""
    from fused_lstm import explain

    hidden = a["weights"][0].shape[0] // 4
    sizes = dict(hidden_size=hidden, num_layers=a["num_layers"],
                 bidirectional=a["bidirectional"], proj_size=a["proj_size"])
    x = a["input"]
    if a["batch_sizes"] is not None:
        x = PackedSequence(x, a["batch_sizes"])
    return explain(sizes, x)


def assert_path(a, path, backward=True):
    result = explain_case(a)
    assert result["forward"]["path"] == path, result["summary"]
    if backward:
        assert result["backward"]["path"] == path, result["summary"]
    return result



@pytest.mark.parametrize("num_layers,bias,bidirectional,packed", PERSISTENT_GRID,
                         ids=PERSISTENT_GRID_IDS)
def test_persistent_gradcheck(cuda_path, num_layers, bias, bidirectional, packed):
    cuda_path("persistent", units=2)  # 2 blocks per direction at hidden 3
    _, a = make_case(num_layers, bias, bidirectional, 0, packed, with_state=True,
                     input_size=2, hidden_size=3, seq_len=3, batch=3, dropout=0.5)
    a = on(a)
    assert_path(a, "persistent")
    inputs = differentiable(a)

    def f(*tensors):
        b = dict(a, input=tensors[0], hx=tensors[1], cx=tensors[2], weights=list(tensors[3:]))
        return ops.lstm(*op_args(b))

    assert torch.autograd.gradcheck(f, inputs)


def _forward_backward(a, upstream):
    """Results and gradients of the ops, the reserve in the common layout (for comparing
    devices)."""
    output, hy, cy, reserve = LSTM_FORWARD(*op_args(a))
    c = op_args(a)
    grads = LSTM_BACKWARD(*c[:6], reserve, *upstream, *c[6:])
    return [output, hy, cy, reserve_in_common_layout(reserve, a), grads[0], grads[1], grads[2],
            *grads[3]]


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "nostate"])
@pytest.mark.parametrize("num_layers,bias,bidirectional,packed", PERSISTENT_GRID,
                         ids=PERSISTENT_GRID_IDS)
def test_persistent_matches_cpu_kernels_and_step_path(cuda_path, num_layers, bias,
                                                      bidirectional, packed, with_state):
    """float64 with a dropout mask: output, h_n, c_n, the whole reserve and every gradient of
    the persistent path equal the CPU kernels' and the CUDA step path's."""
    _, a = make_case(num_layers, bias, bidirectional, 0, packed, with_state, input_size=3,
                     hidden_size=5, seq_len=6, batch=4, dropout=0.4, requires_grad=False)
    g = on(a)
    upstream = [torch.randn_like(t) for t in LSTM_FORWARD(*op_args(a))[:3]]
    expected = _forward_backward(a, upstream)
    cuda_path("step")
    assert_path(g, "step")
    step = _forward_backward(g, [u.to(CUDA) for u in upstream])
    cuda_path("persistent", units=2)
    assert_path(g, "persistent")
    got = _forward_backward(g, [u.to(CUDA) for u in upstream])
    for x, y, z in zip(got, expected, step):
        assert x.device.type == CUDA and x.shape == y.shape and x.dtype == y.dtype
        torch.testing.assert_close(x.cpu(), y, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(x, z, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("units,tile,k_split", [
    (None, None, None), (1, None, None), (1, 4, 1), (2, 4, 2), (3, 8, 32), (4, 4, 8),
    (5, 4, 16), (7, None, 4), (9, 8, None),
])
def test_persistent_plans_match_cpu_kernels(cuda_path, units, tile, k_split):
    """Blocks per direction 7 to 1 (ragged last block), batch tiles of 4 and 8 rows over 9 rows
    (partial last tile), 1 to 32 lanes per dot product; packed, bidirectional, float64."""
    cuda_path("persistent", units=units, tile=tile, k_split=k_split)
    _, a = make_case(2, True, True, 0, True, True, input_size=3, hidden_size=7, seq_len=6,
                     batch=9, dropout=0.5, requires_grad=False)
    g = on(a)
    assert_path(g, "persistent")
    upstream = [torch.randn_like(t) for t in LSTM_FORWARD(*op_args(a))[:3]]
    expected = _forward_backward(a, upstream)
    got = _forward_backward(g, [u.to(CUDA) for u in upstream])
    for x, y in zip(got, expected):
        torch.testing.assert_close(x.cpu(), y, rtol=1e-10, atol=1e-10)


# Hidden sizes around the rule's limits on an H100/H200 (float32, batch 64, forced persistent):
# up to 768 (1024 unidirectional) W_hh fits on chip, beyond it the step path runs; 31-33 and
# 255-257 straddle the 32-element padding of the shared-memory rows.
@pytest.mark.parametrize("hidden", [1, 31, 32, 33, 255, 256, 257, 512, 768, 1024])
@pytest.mark.parametrize("bidirectional,packed", [(False, False), (True, True)],
                         ids=["uni-padded", "bi-packed"])
def test_persistent_float32_parity_with_cudnn_across_hidden_sizes(cuda_path, hidden,
                                                                   bidirectional, packed):
    """Forced persistent where it fits (explain tells), else the step path; both against cuDNN
    (TF32 off) by the float32 accuracy rule: at most twice cuDNN's distance to float64."""
    cuda_path("persistent")
    _, a = make_case(1, True, bidirectional, 0, packed, with_state=True, dtype=torch.float32,
                     input_size=16, hidden_size=hidden, seq_len=8, batch=64,
                     requires_grad=False)
    scale = min(0.5, 2.0 / hidden ** 0.5)  # keep the gates off saturation at every width
    for w in a["weights"]:
        w.mul_(scale / 0.5)
    result = explain_case(on(a))
    # Where W_hh cannot stay on chip the step path runs, and is checked the same way.
    assert result["forward"]["reason"] in ("forced_persistent", "does_not_fit",
                                           "occupancy_refused"), result
    g = on(a, requires_grad=True)
    exact = on(a, device="cpu", dtype=torch.float64, requires_grad=True)
    for o, t, e in zip(*_results_and_grads(g, exact)):
        e = e.to(CUDA)
        assert _relative_error(o, e) <= max(2 * _relative_error(t, e), 1e-5)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_persistent_low_precision_error_within_twice_cudnn(cuda_path, dtype, packed):
    cuda_path("persistent")
    _, a64 = make_case(2, True, True, 0, packed, with_state=True, input_size=16, hidden_size=32,
                       seq_len=20, batch=8, requires_grad=False)
    low = on(a64, dtype=dtype, requires_grad=True)
    assert_path(low, "persistent")
    exact = on(low, dtype=torch.float64, device="cpu", requires_grad=True)
    eps = torch.finfo(dtype).eps
    for o, t, e in zip(*_results_and_grads(low, exact)):
        assert o.dtype == dtype
        e = e.to(CUDA)
        slack = 4 * eps * max(1.0, e.abs().max().item())
        assert (o.double() - e).abs().max().item() <= 2 * (t.double() - e).abs().max().item() + slack


def test_persistent_at_the_fastrnns_size(cuda_path):
    """hidden 512, batch 64 (fastrnns; 20 steps here): the automatic rule picks the persistent
    forward (and, by its cost model, the step path's backward), within the float32 accuracy
    rule against float64."""
    cuda_path("auto")
    _, a = make_case(1, True, False, 0, False, with_state=True, dtype=torch.float32,
                     input_size=512, hidden_size=512, seq_len=20, batch=64, requires_grad=False)
    for w in a["weights"]:
        w.mul_(0.1)
    g = on(a)
    result = assert_path(g, "persistent", backward=False)
    assert result["forward"]["reason"] == "auto"
    exact = aten_lstm(on(a, device="cpu", dtype=torch.float64))
    ours, theirs = ops.lstm(*op_args(g)), aten_lstm(g)
    for o, t, e in zip(ours, theirs, exact):
        e = e.to(CUDA)
        assert _relative_error(o, e) <= max(2 * _relative_error(t, e), 1e-5)


def test_persistent_falls_back_where_it_cannot_run(cuda_path):
    cuda_path("persistent")
    _, a = make_case(2, True, True, 2, True, with_state=True, requires_grad=False)
    assert explain_case(on(a))["forward"]["reason"] == "projection"
    from fused_lstm import explain

    big = explain(dict(hidden_size=8192), torch.empty(2, 2, 2, device=CUDA))  # W_hh: 1 GB
    assert big["forward"]["reason"] == big["backward"]["reason"] == "does_not_fit"
    cuda_path("step")
    assert explain_case(on(a))["forward"]["reason"] == "forced_step"
    with pytest.raises(ValueError, match="'auto', 'persistent' or 'step'"):
        cuda_path("fastest")


def test_persistent_no_host_synchronisation(cuda_path):
    cuda_path("persistent")
    _, a = make_case(2, True, True, 0, True, with_state=True, dropout=0.5, requires_grad=False,
                     dtype=torch.float32)
    a = on(a)
    assert_path(a, "persistent")
    forward_backward_without_sync(a)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_persistent_cuda_graph_capture(cuda_path, packed):
    """cudaLaunchCooperativeKernel under stream capture (recent drivers support it; this is
    where that is checked): replays equal eager calls."""
    cuda_path("persistent")
    _, a = make_case(2, True, True, 0, packed, with_state=True, dropout=0.5, requires_grad=False,
                     input_size=8, hidden_size=16, seq_len=7, batch=5)
    static = on(a, dtype=torch.float32, requires_grad=False)
    assert_path(static, "persistent")
    probe = LSTM_FORWARD(*op_args(static))
    upstream = [torch.randn_like(t) for t in probe[:3]]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _forward_backward(static, upstream)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _forward_backward(static, upstream)
    for _ in range(2):
        static["input"].copy_(torch.randn_like(static["input"]))
        static["hx"].copy_(torch.randn_like(static["hx"]))
        graph.replay()
        torch.cuda.synchronize()
        for x, y in zip(captured, _forward_backward(static, upstream)):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_persistent_deterministic_and_on_the_current_stream(cuda_path):
    cuda_path("persistent")
    _, a = make_case(2, True, True, 0, True, with_state=True, input_size=32, hidden_size=64,
                     seq_len=10, batch=16, dtype=torch.float32, requires_grad=False)
    a = on(a)
    assert_path(a, "persistent")
    upstream = [torch.randn_like(t) for t in LSTM_FORWARD(*op_args(a))[:3]]
    first = _forward_backward(a, upstream)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        second = _forward_backward(a, upstream)
    stream.synchronize()
    for x, y in zip(first, second):
        assert torch.equal(x, y)  # no atomics: bit-identical


def test_explain_reports_the_cuda_path(cuda_path):
    """explain() on CUDA: the automatic choice with its plan, the forced ones, and the module
    running what explain said (the persistent forward gives the same as the step path)."""
    import fused_lstm

    cuda_path("auto")
    lstm = FusedLSTM(8, 32, 2, batch_first=True, bidirectional=True).to(CUDA)
    x = crandn(4, 10, 8)
    result = fused_lstm.explain(lstm, x)
    assert result["device"].startswith("cuda") and result["path"] == "persistent"
    forward = result["forward"]
    assert forward["reason"] == "auto" and forward["blocks"] >= 1 and forward["smem_bytes"] > 0
    assert forward["blocks"] * 2 <= forward["coresident_blocks"]
    proj = FusedLSTM(8, 32, 2, proj_size=4).to(CUDA)
    assert fused_lstm.explain(proj, x)["forward"]["reason"] == "projection"
    persistent = lstm(x)
    cuda_path("step")
    assert fused_lstm.explain(lstm, x)["path"] == "step"
    step = lstm(x)
    torch.testing.assert_close(persistent[0], step[0], rtol=1e-5, atol=1e-5)
    assert fused_lstm.explain(lstm, x.cpu())["path"] == "cpu"
