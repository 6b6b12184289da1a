"""Helpers shared by the fused_lstm tests: ``from helpers import ...`` in any test module
(pytest puts tests/ on sys.path; tests/conftest.py holds the fixtures).

* Module-level: random tensors and modules (``randn``, ``make_input``, ``make_state``,
  ``lstm_pair``, ``run_and_grad``), the reference loaded even without a compiled library
  (``load_reference``).
* Op-level: one ``fused_lstm::lstm_forward`` call's arguments (``make_case``) and what is done
  with them (``op_args``, ``call``, ``differentiable``, ``zeros_state``,
  ``assert_results_and_grads_close``), over the option grid (``GRID``, ``PERSISTENT_GRID``).
* The CUDA emulation's device environment (``EMULATION_ENV``), read on every call.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import pathlib

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---- modules and their inputs --------------------------------------------------------------------

def load_reference():
    """``fused_lstm.reference``; loaded straight from its file when the package itself cannot be
    imported (compiled library missing), since the reference depends on torch only."""
    try:
        from fused_lstm import reference
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "fused_lstm_reference_standalone", ROOT / "fused_lstm" / "reference.py"
        )
        reference = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(reference)
    return reference


def randn(*shape, dtype=torch.float64, **kwargs):
    """Random normal values that are never exactly zero (a zero would hide broken wiring)."""
    t = torch.randn(*shape, dtype=dtype, **kwargs)
    return torch.where(t == 0, torch.ones((), dtype=dtype), t)


def num_directions(module) -> int:
    return 2 if module.bidirectional else 1


def out_size(module) -> int:
    return module.proj_size if module.proj_size > 0 else module.hidden_size


def random_lengths(batch: int, seq_len: int, *, sort: bool) -> list[int]:
    """Lengths in [1, seq_len] with at least one full-length sequence; descending when ``sort``."""
    lengths = torch.randint(1, seq_len + 1, (batch,))
    lengths[torch.randint(0, batch, ())] = seq_len
    lengths = lengths.tolist()
    return sorted(lengths, reverse=True) if sort else lengths


def make_state(module, batch, dtype, *, unbatched=False):
    """Random (h0, c0) of the shapes ``module`` expects, requiring grad."""
    layers_dirs = module.num_layers * num_directions(module)
    if unbatched:
        h_shape, c_shape = (layers_dirs, out_size(module)), (layers_dirs, module.hidden_size)
    else:
        h_shape = (layers_dirs, batch, out_size(module))
        c_shape = (layers_dirs, batch, module.hidden_size)
    return (randn(*h_shape, dtype=dtype).requires_grad_(),
            randn(*c_shape, dtype=dtype).requires_grad_())


def make_input(module, layout, *, seq_len, batch, dtype):
    """The module input for ``layout`` and the leaf tensor gradients are taken with respect to.

    layout: "padded" (3-D, honours batch_first), "packed_sorted", "packed_unsorted" (a
    PackedSequence from pack_padded_sequence) or "unbatched" (2-D [T, I]).
    """
    if layout == "unbatched":
        leaf = randn(seq_len, module.input_size, dtype=dtype).requires_grad_()
        return leaf, leaf
    shape = (batch, seq_len) if module.batch_first else (seq_len, batch)
    leaf = randn(*shape, module.input_size, dtype=dtype).requires_grad_()
    if layout == "padded":
        return leaf, leaf
    lengths = random_lengths(batch, seq_len, sort=layout == "packed_sorted")
    packed = pack_padded_sequence(
        leaf, lengths, batch_first=module.batch_first, enforce_sorted=layout == "packed_sorted"
    )
    return packed, leaf


def output_tensor(output):
    return output.data if isinstance(output, PackedSequence) else output


def lstm_pair(*, dtype=torch.float64, **kwargs):
    """(nn.LSTM, FusedLSTM) with identical configuration and weights (via load_state_dict)."""
    from fused_lstm import FusedLSTM

    torch_lstm = nn.LSTM(dtype=dtype, **kwargs)
    fused = FusedLSTM(dtype=dtype, **kwargs)
    fused.load_state_dict(torch_lstm.state_dict())
    return torch_lstm, fused


def run_and_grad(module, inp, leaf, hx, *, upstream=None):
    """Runs ``module`` and backpropagates fixed random upstream gradients into output, h_n and
    c_n. Returns (output, h_n, c_n, grads) where grads maps a name to the gradient of the input
    leaf, h0, c0 and every parameter (None where autograd produced none)."""
    output, (h_n, c_n) = module(inp, hx) if hx is not None else module(inp)
    out = output_tensor(output)
    if upstream is None:
        upstream = tuple(randn(*t.shape, dtype=t.dtype) for t in (out, h_n, c_n))
    wrt = {"input": leaf}
    if hx is not None:
        wrt["h0"], wrt["c0"] = hx
    wrt.update(dict(module.named_parameters()))
    grads = torch.autograd.grad((out, h_n, c_n), list(wrt.values()), upstream, allow_unused=True,
                                retain_graph=True)  # a packed input's graph is shared
    return out, h_n, c_n, dict(zip(wrt.keys(), grads)), upstream


# ---- one op call ---------------------------------------------------------------------------------

def make_case(num_layers, bias, bidirectional, proj_size, packed, with_state, *, dtype=torch.float64,
              input_size=3, hidden_size=4, seq_len=4, batch=3, dropout=0.0, requires_grad=True,
              seed=0):
    """Random weights and inputs (never zeros) for one op call, plus the nn.LSTM they came from.

    Returns (lstm, kwargs) where kwargs are lstm_forward's arguments by name."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(requires_grad)

    lstm = nn.LSTM(input_size, hidden_size, num_layers, bias=bias, bidirectional=bidirectional,
                   proj_size=proj_size, dtype=dtype)
    with torch.no_grad():
        for w in lstm.parameters():
            w.copy_(torch.randn(w.shape, generator=gen, dtype=dtype) * 0.5)
    weights = [w.detach().clone().requires_grad_(requires_grad) for w in lstm._flat_weights]
    num_directions = 2 if bidirectional else 1
    out_size = proj_size or hidden_size
    x = rand(seq_len, batch, input_size)
    batch_sizes = None
    if packed:
        lengths = torch.randint(1, seq_len + 1, (batch,), generator=gen).sort(descending=True).values
        lengths[0] = seq_len
        packed_seq = pack_padded_sequence(x.detach(), lengths)
        x = packed_seq.data.clone().requires_grad_(requires_grad)
        batch_sizes = packed_seq.batch_sizes
    hx = rand(num_layers * num_directions, batch, out_size) if with_state else None
    cx = rand(num_layers * num_directions, batch, hidden_size) if with_state else None
    mask = None
    if dropout > 0 and num_layers > 1:
        shape = (num_layers - 1, *x.shape[:-1], num_directions * out_size)
        mask = torch.empty(shape, dtype=dtype).bernoulli_(1 - dropout, generator=gen) / (1 - dropout)
    args = dict(input=x, batch_sizes=batch_sizes, hx=hx, cx=cx, weights=weights, dropout_mask=mask,
                num_layers=num_layers, bidirectional=bidirectional, has_biases=bias,
                proj_size=proj_size)
    return lstm, args


def op_args(a):
    """``make_case``'s arguments in lstm_forward's order (also lstm_inference's, and
    lstm_backward's around the reserve and the upstream gradients: ``b[:6]``, ``b[6:]``)."""
    return (a["input"], a["batch_sizes"], a["hx"], a["cx"], a["weights"], a["dropout_mask"],
            a["num_layers"], a["bidirectional"], a["has_biases"], a["proj_size"])


def call(fn, a):
    return fn(*op_args(a))


def differentiable(a):
    return [t for t in [a["input"], a["hx"], a["cx"], *a["weights"]] if t is not None]


def assert_results_and_grads_close(got, expected, wrt, tol, grad_tol=None):
    """``got`` equals ``expected`` within ``tol``, and so do their gradients with respect to
    ``wrt`` for the same random upstream gradients (``grad_tol``, default ``tol``)."""
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)
    grads = [torch.randn_like(t) for t in got]
    grad_tol = tol if grad_tol is None else grad_tol
    for g, e in zip(torch.autograd.grad(got, wrt, grads), torch.autograd.grad(expected, wrt, grads)):
        torch.testing.assert_close(g, e, rtol=grad_tol, atol=grad_tol)


GRID = list(itertools.product([1, 2, 3], [True, False], [False, True], [0, 2], [False, True]))
GRID_IDS = [f"L{l}-{'bias' if b else 'nobias'}-{'bi' if d else 'uni'}-proj{p}-{'packed' if k else 'padded'}"
            for l, b, d, p, k in GRID]


def zeros_state(a):
    """Zero (h0, c0) for ``make_case``'s arguments, on the input's device."""
    num_directions = 2 if a["bidirectional"] else 1
    hidden = a["weights"][0].shape[0] // 4
    out = a["proj_size"] or hidden
    batch = a["hx"].shape[1] if a["hx"] is not None else (
        int(a["batch_sizes"][0]) if a["batch_sizes"] is not None else a["input"].shape[1])
    layers_dirs = a["num_layers"] * num_directions
    x = a["input"]
    return (torch.zeros(layers_dirs, batch, out, dtype=x.dtype, device=x.device),
            torch.zeros(layers_dirs, batch, hidden, dtype=x.dtype, device=x.device))


# Below this hidden size the CPU kernels run the small-hidden variant (csrc/cpu/plan.h,
# kRowWiseHidden), whose reserve stores each step's gates and cells transposed (csrc/lstm.h).
CPU_ROW_WISE_HIDDEN = 16


def reserve_in_common_layout(reserve, a):
    """The reserve of lstm_forward for ``make_case``'s arguments ``a`` in the layout every backend
    shares (csrc/lstm.h: [rows, n] blocks, row-major). The CPU's small-hidden variant stores each
    step's gates and cells as [n][rows of the step] instead; those blocks are transposed back here,
    so that its reserve can be compared with the CUDA kernels'. Any other reserve: itself."""
    hidden = a["weights"][0].shape[0] // 4
    if reserve.device.type != "cpu" or hidden >= CPU_ROW_WISE_HIDDEN:
        return reserve
    x = a["input"]
    sizes = (a["batch_sizes"].tolist() if a["batch_sizes"] is not None
             else [x.shape[1]] * x.shape[0])
    rows, proj = sum(sizes), a["proj_size"]
    directions = 2 if a["bidirectional"] else 1
    # With the gates, or without (a packed bfloat16 call's CPU reserve: csrc/lstm.h,
    # gates_in_reserve), told apart by the size.
    gates_numel = rows * 4 * hidden
    for kept in (gates_numel, 0):
        direction_numel = kept + rows * (hidden + (hidden if proj > 0 else 0))
        layer_numel = rows * directions * (proj or hidden) + directions * direction_numel
        if reserve.numel() == a["num_layers"] * layer_numel:
            break
    else:
        raise AssertionError(f"reserve of {reserve.numel()} elements: not csrc/lstm.h's layout")
    common = reserve.clone()
    for layer in range(a["num_layers"]):
        for d in range(directions):
            gates = layer * layer_numel + rows * directions * (proj or hidden) + d * direction_numel
            blocks = ((gates, 4 * hidden), (gates + kept, hidden)) if kept else ((gates, hidden),)
            for start, n in blocks:
                offset = 0
                for bs in sizes:
                    block = slice(start + offset * n, start + (offset + bs) * n)
                    common[block] = reserve[block].view(n, bs).t().reshape(-1)
                    offset += bs
    return common


# The persistent CUDA kernels take no projection: GRID without proj_size.
PERSISTENT_GRID = [(l, b, d, k) for l, b, d, p, k in GRID if p == 0]
PERSISTENT_GRID_IDS = [f"L{l}-{'bias' if b else 'nobias'}-{'bi' if d else 'uni'}-"
                       f"{'packed' if k else 'padded'}" for l, b, d, k in PERSISTENT_GRID]


# ---- the CUDA emulation's device ------------------------------------------------------------------

# What the CPU emulation of the CUDA ops (tests/test_cuda_compile.py) reads on every call: the
# emulated device's limits and the occupancy API's answer.
EMULATION_ENV = ("FUSED_LSTM_EMULATED_DEVICE", "FUSED_LSTM_EMULATED_CORESIDENT")


# ---- the CPU ---------------------------------------------------------------------------------------

def cpu_features() -> dict[str, bool]:
    """What the CPU kernel choice sees of this CPU (fused_lstm.explain's "cpu" entry): avx512,
    avx512_bf16, brgemm, onednn_matmul."""
    import fused_lstm

    plan = fused_lstm.explain(dict(hidden_size=32), torch.empty(2, 2, 4))["forward"]
    return {k: v == "1" for k, v in (w.split(":") for w in plan["cpu"].split())}


def hidden_split_feature(dtype) -> str:
    """The cpu_features() entry the hidden split of inference steps needs for a model of
    `dtype` (csrc/cpu/plan.h, hidden_split_applies): AMX-BF16 for bfloat16 (its steps on AMX
    tiles; bf16_gemm's steps never split), brgemm otherwise (float32 steps, and a float16
    model's in float32)."""
    return "amx_bf16" if dtype == torch.bfloat16 else "brgemm"


# ---- Versions chosen by CPU feature (the tests' ISA cap) ---------------------------------------
def isa_levels():
    """The instruction-set levels this CPU runs (2 AVX-512, 1 AVX2, 0 baseline): 0 up to its own
    (the thin kernel's)."""
    return list(range(torch.ops.fused_lstm._isa_level(1) + 1))


@contextlib.contextmanager
def isa_cap(level):
    """The kernels chosen by CPU feature (fp16 conversions, thin kernel, few-row products) at
    most at `level` inside the block (the test hook _set_isa_level_cap)."""
    before = torch.ops.fused_lstm._set_isa_level_cap(level)
    try:
        yield
    finally:
        torch.ops.fused_lstm._set_isa_level_cap(before)


# ---- Memory events ------------------------------------------------------------------------------
def memory_events(fn):
    """The CPU allocation and free events of fn() (torch.profiler memory events, every level of
    the event tree, in no particular order)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, pending = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        events.append(event)
        pending.extend(event.children)
    return [e for e in events if e.tag == _EventType.Allocation]


def allocation_sizes(fn):
    """Sizes in bytes of the CPU allocations that fn() makes (torch.profiler memory events)."""
    return [e.extra_fields.alloc_size for e in memory_events(fn) if e.extra_fields.alloc_size > 0]
