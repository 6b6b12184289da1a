"""Production concerns: threads, non-finite values, very long sequences, allocation failure,
determinism, torch.compile / torch.export / ONNX route, autocast, DDP, and a short soak run.

Every comparison is against torch.nn.LSTM on identical weights unless it says otherwise.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import pathlib
import threading
import time
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.testing import assert_close

import fused_lstm
from fused_lstm import FusedLSTM

from helpers import ROOT, allocation_sizes, cpu_features, lstm_pair, memory_events, randn

# The op rejecting a call that nn.LSTM accepts would show up as this warning: make it fail.
pytestmark = pytest.mark.filterwarnings("error::fused_lstm.FusedLSTMFallbackWarning")

F32, F64 = torch.float32, torch.float64


class Tagger(nn.Module):
    """A small model with an LSTM inside: embedding-free sequence tagger."""

    def __init__(self, lstm_class=FusedLSTM, dtype=F32, dropout=0.0):
        super().__init__()
        self.lstm = lstm_class(3, 6, num_layers=2, batch_first=True, bidirectional=True,
                               dropout=dropout, dtype=dtype)
        self.head = nn.Linear(12, 2, dtype=dtype)

    def forward(self, x):
        output, (h_n, c_n) = self.lstm(x)
        return self.head(output), h_n, c_n


# --- threads -------------------------------------------------------------------------------


def run_in_threads(run, inputs, rounds=1, threads=4):
    """run(x) for every input, spread over `threads` threads that start together and go over
    the inputs `rounds` times (so calls overlap); returns the results in input order."""
    results, errors = [None] * len(inputs), []
    barrier = threading.Barrier(threads)

    def work(worker):
        try:
            barrier.wait()
            for _ in range(rounds):
                for i in range(worker, len(inputs), threads):
                    results[i] = run(inputs[i])
        except BaseException as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    pool = [threading.Thread(target=work, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors
    return results


def test_threads_share_one_module_bit_identical():
    """Four threads running inference on one FusedLSTM give exactly the serial results."""
    model = FusedLSTM(4, 8, num_layers=2, bidirectional=True, proj_size=3).eval()
    inputs = [randn(5 + i % 4, 1 + i % 3, 4, dtype=F32) for i in range(48)]
    with torch.no_grad():
        serial = [model(x) for x in inputs]

    def run(x):
        with torch.no_grad():
            return model(x)

    results = run_in_threads(run, inputs, rounds=3)
    for i, (expected, got) in enumerate(zip(serial, results)):
        assert torch.equal(expected[0], got[0]), f"input {i}: output differs"
        assert torch.equal(expected[1][0], got[1][0]) and torch.equal(expected[1][1], got[1][1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_threads_16bit_bit_identical(dtype):
    """Four threads running a 16-bit model's inference and training (its widened tensors are
    float views of one scratch buffer per call, their TensorImpls pooled per thread) match the
    serial results bit for bit."""
    model = FusedLSTM(3, 5, num_layers=2, bidirectional=True).to(dtype)
    params = list(model.parameters())
    inputs = [randn(4 + i % 3, 1 + i % 5, 3, dtype=F32).to(dtype).requires_grad_()
              for i in range(24)]

    def run(x):
        output, (h_n, c_n) = model(x)
        grads = torch.autograd.grad(output.float().square().sum() + h_n.float().sum(),
                                    [x] + params)
        with torch.no_grad():
            again = model(x)
        return (output, h_n, c_n, again[0], *grads)

    serial = [run(x) for x in inputs]
    for expected, got in zip(serial, run_in_threads(run, inputs)):
        for e, g in zip(expected, got):
            assert torch.equal(e, g)


def test_threads_training_bit_identical():
    """Four threads each running forward+backward through one shared module (gradients taken
    with autograd.grad, so nothing is accumulated into .grad) match the serial results."""
    model = FusedLSTM(3, 5, num_layers=2)
    params = list(model.parameters())
    inputs = [randn(6, 2, 3, dtype=F32).requires_grad_() for _ in range(16)]

    def run(x):
        output, (h_n, c_n) = model(x)
        return torch.autograd.grad(output.square().sum() + h_n.sum() + c_n.sum(), [x] + params)

    serial = [run(x) for x in inputs]
    for expected, got in zip(serial, run_in_threads(run, inputs)):
        for e, g in zip(expected, got):
            assert torch.equal(e, g)


def test_threads_training_recycled_buffers_bit_identical():
    """Training calls whose reserve is large enough (here ~1.5-2.3 MB) to come from the CPU
    buffer cache (csrc/cpu/buffer_cache.cpp), run by four threads at once and with lengths that
    make a recycled block larger than the request: exactly the serial results, and a second
    serial pass (all blocks recycled) agrees too."""
    model = FusedLSTM(8, 64, num_layers=2)
    params = list(model.parameters())
    inputs = [randn(30 + (7 * i) % 16, 16, 8, dtype=F32).requires_grad_() for i in range(12)]

    def run(x):
        output, (h_n, c_n) = model(x)
        return torch.autograd.grad(output.square().sum() + h_n.sum() + c_n.sum(), [x] + params)

    serial = [run(x) for x in inputs]
    for results in (run_in_threads(run, inputs, rounds=2), [run(x) for x in inputs]):
        for expected, got in zip(serial, results):
            for e, g in zip(expected, got):
                assert torch.equal(e, g)


_memory_events, _allocation_sizes = memory_events, allocation_sizes  # helpers.py


def test_recycled_buffers_count_in_profiled_memory():
    """The CPU buffer cache reports the blocks it hands out and takes back to PyTorch's memory
    profiler, so profiled memory (benchmarks/compare.py's peak) sees the reserve even when it is
    a recycled block: the profiled allocations of a training forward cover its reserve."""
    from fused_lstm import ops

    model = FusedLSTM(8, 64, num_layers=2)
    x = randn(40, 16, 8, dtype=F32).requires_grad_()
    model(x)[0].sum().backward()  # the reserve's block is now in the cache
    reserve_bytes = 4 * ops.reserve_numel(40 * 16, 2, 1, 64, 0)
    assert reserve_bytes >= 1 << 20  # large enough to be recycled
    outputs = []
    sizes = _allocation_sizes(lambda: outputs.append(model(x)))
    assert max(sizes) >= reserve_bytes, (max(sizes), reserve_bytes)


def test_recycled_blocks_are_sized_to_the_request():
    """A packed training call after a larger model's training (every buffer 1.6x its size, so
    the larger blocks are in the CPU buffer cache) gets blocks of at most 9/8 of what it asks
    for (csrc/cpu/buffer_cache.cpp; a handed-out block counts in profiled peak memory at its
    size): the forward's largest allocation is its reserve, the backward's its dgates [rows, 4H],
    each within 9/8 of the size the formula gives for the packed rows."""
    from fused_lstm import ops

    I, H, L, B = 8, 64, 2, 16
    lengths = torch.tensor([120 - 4 * i for i in range(B)])
    rows = int(lengths.sum())
    # The blocks in the cache are this test's own: blocks other tests left there could serve
    # its requests at up to 8/7 of their size, above the 9/8 checked here.
    torch.ops.fused_lstm._empty_buffer_cache()
    big = FusedLSTM(I, H, num_layers=L)  # padded, 1.6x the rows of the packed call
    xb = randn(rows * 8 // (5 * B), B, I, dtype=F32).requires_grad_()
    assert xb.shape[0] * B == rows * 8 // 5
    big(xb)[0].sum().backward()
    model = FusedLSTM(I, H, num_layers=L)
    packed = pack_padded_sequence(randn(int(lengths[0]), B, I, dtype=F32), lengths,
                                  enforce_sorted=False)
    packed = packed._replace(data=packed.data.requires_grad_())
    up = randn(rows, H, dtype=F32)
    model(packed)[0].data.backward(up)  # warm: this call's own blocks are cached too
    reserve_bytes = 4 * ops.reserve_numel(rows, L, 1, H, 0)
    dgates_bytes = 4 * rows * 4 * H
    assert dgates_bytes >= 1 << 20  # both large enough to be recycled
    outputs = []
    forward = _allocation_sizes(lambda: outputs.append(model(packed)[0].data))
    backward = _allocation_sizes(lambda: outputs[0].backward(up))
    assert reserve_bytes <= max(forward) <= reserve_bytes * 9 // 8, (max(forward), reserve_bytes)
    assert dgates_bytes <= max(backward) <= dgates_bytes * 9 // 8, (max(backward), dgates_bytes)


def _cpu_has_avx512_bf16():
    return cpu_features()["avx512_bf16"]


def test_backward_makes_no_copy_of_grad_output_or_h_prev():
    """A one-layer backward reads grad_output in place and h_{t-1} from the layer output (every
    step has every row): nothing of grad_output's size, [rows, hidden] float32, is allocated
    (the input size differs, so grad_input does not count; benchmarks/notes/memory.md,
    "Training memory: the backward's copies")."""
    T, B, I, H = 30, 16, 24, 40
    model = FusedLSTM(I, H)
    x = randn(T, B, I, dtype=F32).requires_grad_()
    up = randn(T, B, H, dtype=F32)
    model(x)[0].backward(up)  # warm: buffers cached, x.grad allocated
    output, _ = model(x)
    sizes = _allocation_sizes(lambda: output.backward(up))
    grad_output_bytes = T * B * H * 4
    assert sizes and max(sizes) >= T * B * 4 * H * 4  # the profiler saw the backward's dgates
    assert grad_output_bytes not in sizes, sorted(sizes)


@pytest.mark.skipif(not _cpu_has_avx512_bf16(), reason="the bf16 products need AVX512_BF16")
def test_bf16_model_makes_no_float_copies_of_input_and_weights():
    """Where a bfloat16 model's products read bf16 operands (AVX512_BF16), the op reads the
    bf16 input, W_ih and W_hh as given: the forward and inference allocate nothing of their
    float32 sizes, and the backward only its float32 grad_input, dW_ih and dW_hh (one each);
    the backward reads the bf16 grad_output as given too (nothing of its float32 size)."""
    T, B, I, H = 30, 16, 24, 40
    model = FusedLSTM(I, H).to(torch.bfloat16)
    x = randn(T, B, I, dtype=torch.bfloat16).requires_grad_()
    up = randn(T, B, H, dtype=torch.bfloat16)
    model(x)[0].backward(up)  # warm: buffers cached, grads allocated
    copies = {"input": T * B * I * 4, "W_ih": 4 * H * I * 4, "W_hh": 4 * H * H * 4}
    assert len(set(copies.values())) == 3
    outputs = []
    forward = _allocation_sizes(lambda: outputs.append(model(x)[0]))
    with torch.no_grad():
        inference = _allocation_sizes(lambda: model(x))
    backward = _allocation_sizes(lambda: outputs[0].backward(up))
    for name, size in copies.items():
        assert size not in forward, (name, sorted(forward))
        assert size not in inference, (name, sorted(inference))
        assert backward.count(size) == 1, (name, sorted(backward))
    assert T * B * H * 4 not in backward, sorted(backward)



def _peak_bytes(fn):
    """The most bytes fn() holds at once in CPU allocations it makes (torch.profiler memory
    events in order, frees included)."""
    held = peak = 0
    for e in sorted(_memory_events(fn), key=lambda e: e.start_time_ns):
        held += e.extra_fields.alloc_size
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("brgemm", [True, False], ids=["brgemm", "no-brgemm"])
@pytest.mark.parametrize("dtype,seq_len", [(torch.bfloat16, 1), (torch.float16, 1),
                                           (torch.float16, 5)],
                         ids=["bf16-1step", "fp16-1step", "fp16-5steps"])
def test_16bit_float32_product_backward_widens_one_layer_at_a_time(brgemm, dtype, seq_len):
    """A bfloat16 or float16 model whose backward computes its products in float32 (bfloat16: a
    single step, no bf16 products; float16: always) reads W_ih and W_hh as given and widens one
    layer's at a time into one float32 buffer (csrc/cpu/backward.h; benchmarks/notes/memory.md,
    "bf16 training at the small sizes"): the backward makes no float32 copy of layer 0's W_ih
    (its float32 size is allocated once, for its gradient), and holds at most the float32
    gradients, that buffer and a few rows' scratch, with the gradients converted one at a time.
    The gradients are those of the same call computed in float32 from the 16-bit values (the
    widening is exact). The general backward, forced: these calls have at most 8 rows, which by
    default take the few-row backward that widens nothing (tests/test_few_rows.py), and the op's
    backward returning every gradient (float16 would make W_ih's and W_hh's apart:
    tests/test_few_rows.py)."""
    flags = dict(allow_brgemm=brgemm, allow_few_rows=False, allow_weight_grads_apart=False)
    I, H, L, B = 24, 40, 2, 3
    model = FusedLSTM(I, H, num_layers=L).to(dtype)
    x = randn(seq_len, B, I, dtype=dtype).requires_grad_()
    hx = tuple(randn(L, B, H, dtype=dtype).requires_grad_() for _ in range(2))
    up = randn(seq_len, B, H, dtype=dtype)
    with fused_lstm.backends.cpu.flags(**flags):
        assert fused_lstm.explain(model, x)["backward"]["backward_widens_16bit"] == "true"
        model(x, hx)[0].backward(up)  # warm: buffers cached, grads allocated
        outputs = []
        model.zero_grad(set_to_none=True)
        outputs.append(model(x, hx)[0])
        sizes = _allocation_sizes(lambda: outputs[0].backward(up))
        outputs.append(model(x, hx)[0])
        peak = _peak_bytes(lambda: outputs[1].backward(up))
    assert sizes.count(4 * 4 * H * I) == 1, sorted(sizes)
    G = 4 * H
    float_grads = 4 * sum(p.numel() for p in model.parameters())
    widened = 4 * G * max(I, H)
    rows_scratch = 4 * 64 * G  # dgates, the states and their gradients: a few rows each
    # (float16 over several steps: the float32 input, upstream gradient and grad_input too)
    rows_scratch += 3 * 4 * seq_len * B * max(I, H)
    assert peak <= float_grads + widened + rows_scratch, (peak, float_grads, widened)

    reference = FusedLSTM(I, H, num_layers=L)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    x32, h32, c32 = (t.detach().float().requires_grad_() for t in (x, *hx))
    with fused_lstm.backends.cpu.flags(**flags):
        reference(x32, (h32, c32))[0].backward(up.float())
    model.zero_grad(set_to_none=True)
    x.grad = None
    with fused_lstm.backends.cpu.flags(**flags):
        model(x, hx)[0].backward(up)
    # (A float16 model's one-step training runs brgemm's steps, packed from its weights
    # (CpuPlan::fp16_kept_weights), where a float32 model's single step runs the BLAS: sums in
    # another order where the two differ on this CPU, at most a unit in the last place apart
    # after rounding, above float16's subnormals.)
    other_kernels = dtype == torch.float16 and seq_len == 1 and brgemm
    tol = dict(rtol=2**-10, atol=2**-20) if other_kernels else dict(rtol=0, atol=0)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad.to(dtype), **tol)
    torch.testing.assert_close(x.grad, x32.grad.to(dtype), **tol)


@pytest.mark.skipif(not _cpu_has_avx512_bf16(), reason="the bf16 products need AVX512_BF16")
def test_bf16_packed_training_holds_no_gates_and_a_chunk_of_dgates():
    """Packed bfloat16 training on the CPU (benchmarks/notes/memory.md, "bf16 training at the
    small sizes"): the forward's reserve keeps no gates (csrc/lstm.h, gates_in_reserve; the
    backward recomputes them a step at a time), and where the backward runs the bf16 products
    its recurrence hands dgates to them a chunk of steps at a time (at most kBf16GradRows = 1024
    rows; csrc/cpu/backward_products.h, bf16_chunk_products): a packed two-layer backward over 3200 rows
    allocates no float32 dgates [rows, 4H] and gathers h_{t-1} a chunk at a time (the only
    [rows, hidden] float32 buffer is layer 1's dL/dx), and holds at most its float32 gradients,
    that dL/dx, a chunk's dgates and h_{t-1}, the bf16 operands of a chunk's products, the
    forward's packed weights (to recompute the gates) and a few rows' scratch; on AMX tiles also
    the chunk's dgates as bf16 rows."""
    from fused_lstm import ops

    I, H, L, B, chunk = 24, 64, 2, 16, 1024
    G = 4 * H
    lengths = torch.tensor([260 - 8 * i for i in range(B)])[torch.randperm(B)]
    rows = int(lengths.sum())
    assert rows == 3200 and rows > 3 * chunk
    model = FusedLSTM(I, H, num_layers=L).to(torch.bfloat16)
    packed = pack_padded_sequence(randn(int(lengths.max()), B, I, dtype=torch.bfloat16), lengths,
                                  enforce_sorted=False)
    packed = packed._replace(data=packed.data.requires_grad_())
    up = randn(rows, H, dtype=torch.bfloat16)
    products = fused_lstm.explain(model, packed)["backward"]["backward_weight_products"]
    assert products in ("amx_brgemm", "bf16_gemm"), products
    # Blocks other tests left in the buffer cache could serve this test's requests at up to 9/8
    # of their size (csrc/cpu/buffer_cache.cpp): the sizes below are this test's own.
    torch.ops.fused_lstm._empty_buffer_cache()
    model(packed)[0].data.backward(up)  # warm: buffers cached, grads allocated
    outputs = []
    forward = _allocation_sizes(lambda: outputs.append(model(packed)[0].data))
    assert 4 * ops.reserve_numel(rows, L, 1, H, 0, False) in forward, sorted(forward)
    assert 4 * ops.reserve_numel(rows, L, 1, H, 0) not in forward, sorted(forward)
    sizes = _allocation_sizes(lambda: outputs[0].backward(up))
    outputs.append(model(packed)[0].data)
    peak = _peak_bytes(lambda: outputs[1].backward(up))
    assert 4 * rows * G not in sizes, sorted(sizes)
    assert sizes.count(4 * rows * H) == 1, sorted(sizes)  # layer 1's dL/dx only
    float_grads = 4 * (sum(p.numel() for p in model.parameters()) + rows * I + 2 * L * B * H)
    dx = 4 * rows * H
    chunk_scratch = 4 * chunk * (G + H)  # a chunk's dgates and gathered h_{t-1}
    k = max(I, H)
    bf16_operands = 2 * (G * (k + H) + chunk * (k + H) + G * (chunk + 64))
    if products == "amx_brgemm":  # and the chunk's dgates as bf16 rows (Bf16Backward::dgates16)
        bf16_operands += 2 * chunk * G
    forward_weights = 2 * G * (k + H)
    rows_scratch = 4 * 64 * G
    bound = float_grads + dx + chunk_scratch + bf16_operands + forward_weights + rows_scratch
    assert peak <= bound, (peak, bound)


def _fp16_and_float32_models(I, H, L, bidirectional, proj_size=0):
    """A float16 FusedLSTM and the float32 one on the same (widened) weights."""
    model = FusedLSTM(I, H, num_layers=L, bidirectional=bidirectional,
                      proj_size=proj_size).to(torch.float16)
    reference = FusedLSTM(I, H, num_layers=L, bidirectional=bidirectional, proj_size=proj_size)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    return model, reference


def _outputs_and_grads(model, x, hx, up, lengths):
    """output, h_n, c_n and the gradients of x, h0, c0 (when given) and every parameter."""
    leaves = [x.detach().clone().requires_grad_()]
    if hx is not None:
        leaves += [t.detach().clone().requires_grad_() for t in hx]
    inp = pack_padded_sequence(leaves[0], lengths, enforce_sorted=False) if lengths is not None \
        else leaves[0]
    out, (h_n, c_n) = model(inp, tuple(leaves[1:]) if hx is not None else None)
    out = out.data if lengths is not None else out
    grads = torch.autograd.grad(out, leaves + list(model.parameters()), up.to(out.dtype))
    return [out, h_n, c_n], list(grads)


@pytest.mark.parametrize("L,bidirectional,proj,packed,with_hx,fused", [
    (1, False, 0, False, True, True),
    (1, False, 0, False, False, False),
    (1, True, 0, True, True, True),
    (1, True, 0, True, False, False),
    (2, True, 24, False, True, False),
    (3, False, 0, True, False, True),
], ids=["1-layer", "1-layer-no-hx-unfused", "bi-packed", "bi-packed-no-hx-unfused",
        "2-layers-bi-proj-unfused", "3-layers-packed-no-hx"])
def test_fp16_training_recomputes_the_gates_bit_for_bit(L, bidirectional, proj, packed, with_hx,
                                                        fused):
    """float16 training whose reserve keeps no gates (csrc/lstm.h, gates_in_reserve: at least
    twice as many rows as the widest layer input plus out): the forward projects the input by
    chunks of steps and its reserve has no gates; the backward projects the same chunks again,
    recomputes a chunk's gates at once from the h_{t-1} in the reserve (backward_products.h,
    recompute_chunk_gates; step by step for library products) and hands each chunk's dgates
    to its products (benchmarks/notes/memory.md, "float16 training: no gates kept"). At input
    24, hidden 256 and batch 16 a chunk is 32 steps, so 70 steps are three chunks. The results
    are the float32 model's on the same values: output, h_n and c_n bit for bit, and so the
    recomputed gates, which the h0 and c0 gradients of one layer show bit for bit too (they
    are the reverse recurrence's alone). The other gradients are float32 sums of the chunks'
    products, in another order than the float32 model's one product over every row: each
    within two float16 rounding steps of the largest value of its tensor, and at most 2% of
    the elements not equal.

    Bit for bit needs an input projection that gives a row the same bits however many rows the
    product has (the float16 model projects a chunk's rows, the float32 model every row at
    once). MKL's SGEMM on the AMD EPYC (Zen 5) does not: it gave one element of 438,272 another
    float16 rounding in the last chunk's rows, where oneDNN's matmul gave every case equal
    (repeated runs of the six), so the products are pinned to oneDNN's where this torch
    exports it."""
    from fused_lstm import ops

    I, H, T, B = 24, 256, 70, 16
    model, reference = _fp16_and_float32_models(I, H, L, bidirectional, proj)
    D, out_size = (2 if bidirectional else 1), proj or H
    x = randn(T, B, I, dtype=torch.float16)
    lengths = None
    if packed:
        lengths = torch.randint(T // 2, T + 1, (B,))
        lengths[0] = T
    rows = int(lengths.sum()) if packed else T * B
    hx = (randn(L * D, B, out_size, dtype=torch.float16),
          randn(L * D, B, H, dtype=torch.float16)) if with_hx else None
    up = randn(*((rows, D * out_size) if packed else (T, B, D * out_size)),
               dtype=torch.float16)
    settings = {} if fused else {"allow_fused_input_projection": False}
    if cpu_features()["onednn_matmul"]:
        settings["gemm_library"] = "onednn_matmul"
    with fused_lstm.backends.cpu.flags(**settings):
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        plan = fused_lstm.explain(model, inp)["backward"]
        assert plan["fp16_kept_training"] == "true", plan
        assert ops.gates_in_reserve(x, torch.ones(1) if packed else None, rows, H, out_size, D,
                                    L) is False
        results, grads = _outputs_and_grads(model, x, hx, up, lengths)
        expected, expected_grads = _outputs_and_grads(
            reference, x.float(), tuple(t.float() for t in hx) if hx else None, up.float(),
            lengths)
    for ours, theirs in zip(results, expected):
        assert torch.equal(ours, theirs.to(torch.float16))
    if L == 1 and with_hx:  # dL/dh0, dL/dc0: the reverse recurrence on the recomputed gates
        for ours, theirs in zip(grads[1:3], expected_grads[1:3]):
            assert torch.equal(ours, theirs.to(torch.float16))
    eps = torch.finfo(torch.float16).eps
    for i, (ours, theirs) in enumerate(zip(grads, expected_grads)):
        assert not torch.isnan(ours).any(), i
        theirs = theirs.to(torch.float16).float()
        diff = (ours.float() - theirs).abs()
        assert diff.max() <= 2 * eps * theirs.abs().max(), (i, diff.max(), theirs.abs().max())
        assert (diff > 0).float().mean() <= 0.02, (i, (diff > 0).float().mean())


def test_fp16_training_holds_less_than_half_the_float32_models_memory():
    """float16 training at medium's sizes (input 128, hidden 256, 2 layers, 100 steps, batch
    32, input 96 here to tell its sizes apart): the reserve keeps no gates, the forward keeps
    the float16 input, W_ih and W_hh and the backward the input and upstream gradient
    (CpuPlan::fp16_kept_training), the backward holds a chunk's float32 dgates (4H x 512 rows
    here, csrc/cpu/forward.h kTrainingChunkElements) and writes grad_input in float16 a chunk
    at a time (benchmarks/notes/memory.md, "float16 training: no gates kept"). No allocation of
    either call has every row's gates ([rows, 4H] float32), nor is a float32 copy of the input
    or of grad_input; and the training call's peak is below half the float32 model's (it was
    above the float32 model's while the float16 call kept the gates and widened its input)."""
    from fused_lstm import ops

    I, H, L, T, B = 96, 256, 2, 100, 32
    rows, G = T * B, 4 * H
    model, reference = _fp16_and_float32_models(I, H, L, False)
    x = randn(T, B, I, dtype=torch.float16).requires_grad_()
    up = randn(T, B, H, dtype=torch.float16)
    x32, up32 = x.detach().float().requires_grad_(), up.float()
    assert fused_lstm.explain(model, x)["forward"]["fp16_kept_training"] == "true"
    torch.ops.fused_lstm._empty_buffer_cache()
    for m, xx, uu in ((model, x, up), (reference, x32, up32)):
        m(xx)[0].backward(uu)  # warm: buffers cached, grads allocated
    outputs = []
    forward = _allocation_sizes(lambda: outputs.append(model(x)[0]))
    reserve = 4 * ops.reserve_numel(rows, L, 1, H, 0, False)
    assert reserve == 4 * rows * G  # two layers' h and c: every row's gates' size
    assert forward.count(reserve) == 1, sorted(forward)  # the reserve, and no gates buffer
    backward = _allocation_sizes(lambda: outputs[0].backward(up))
    assert 4 * rows * G not in backward, sorted(backward)
    for sizes in (forward, backward):
        assert 4 * rows * I not in sizes, sorted(sizes)
    assert 2 * rows * I in backward, sorted(backward)  # grad_input, float16
    peak = _peak_bytes(lambda: model(x)[0].backward(up))
    peak32 = _peak_bytes(lambda: reference(x32)[0].backward(up32))
    assert peak < peak32 / 2, (peak, peak32)


# --- non-finite values ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("config", [
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=1, proj_size=2),
    dict(num_layers=3, bias=False),
], ids=["bidirectional-2-layers", "projection", "3-layers-no-bias"])
def test_non_finite_values_propagate_like_nn_lstm(dtype, config):
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, dtype=dtype, **config)
    x = randn(7, 6, 3, dtype=dtype)
    x[1, 0, 0] = float("nan")
    x[2, 1, 1] = float("inf")
    x[3, 2, 2] = float("-inf")
    x[0, 3, :] = float("inf")
    x[5, 4, :] = float("nan")
    layers_dirs = config["num_layers"] * (2 if config.get("bidirectional") else 1)
    out_size = config.get("proj_size") or 4
    h0, c0 = randn(layers_dirs, 6, out_size, dtype=dtype), randn(layers_dirs, 6, 4, dtype=dtype)
    c0[0, 5, 0] = float("inf")  # an infinite cell state in the last batch entry
    h0[-1, 5, 1] = float("nan")
    expected = torch_lstm(x, (h0, c0))
    got = fused(x, (h0, c0))
    for name, e, g in (("output", expected[0], got[0]), ("h_n", *[r[1][0] for r in (expected, got)]),
                       ("c_n", *[r[1][1] for r in (expected, got)])):
        assert torch.equal(e.isnan(), g.isnan()), f"{name}: NaN pattern differs"
        assert torch.equal(e.isinf(), g.isinf()), f"{name}: inf pattern differs"
        assert torch.equal(e.isposinf(), g.isposinf()), f"{name}: +inf pattern differs"
        finite = e.isfinite()
        assert finite.any() and not finite.all()
        assert_close(g[finite], e[finite], rtol=1e-5 if dtype == F32 else 1e-10,
                     atol=1e-5 if dtype == F32 else 1e-10)


def test_non_finite_gradients_like_nn_lstm():
    """A NaN in the input: which gradient entries are NaN matches nn.LSTM."""
    torch_lstm, fused = lstm_pair(input_size=2, hidden_size=3, num_layers=2, dtype=F64)
    x = randn(5, 3, 2, dtype=F64)
    x[2, 1, 0] = float("nan")
    grads = []
    for module in (torch_lstm, fused):
        leaf = x.clone().requires_grad_()
        output, (h_n, c_n) = module(leaf)
        grads.append(torch.autograd.grad(output.sum() + c_n.sum(), leaf))
    assert torch.equal(grads[0][0].isnan(), grads[1][0].isnan())
    finite = grads[0][0].isfinite()
    assert_close(grads[1][0][finite], grads[0][0][finite], rtol=1e-10, atol=1e-10)


# --- very long sequences -------------------------------------------------------------------


def test_very_long_sequence_forward_backward():
    """T = 100,000 (input 2, hidden 4, batch 2, float64): forward and backward stay finite and
    match nn.LSTM at checkpoints, and one call equals ten chained calls of 10,000 steps.

    nn.LSTM itself takes about a minute for this length on 2 cores, so it is compared on the
    first and last 500 steps (the last from the state the fused run reached there): the
    gradient of the last steps' inputs depends only on those steps and the state they start
    from. The chained run (the same op on short pieces, state carried through autograd)
    checks every other step and every gradient, including the weights' (sums over all
    100,000 steps)."""
    steps, piece, check = 100_000, 10_000, 500
    torch_lstm, fused = lstm_pair(input_size=2, hidden_size=4, dtype=F64)
    x = randn(steps, 2, 2, dtype=F64).requires_grad_()
    h0, c0 = randn(1, 2, 4, dtype=F64).requires_grad_(), randn(1, 2, 4, dtype=F64).requires_grad_()
    params = list(fused.parameters())
    output, (h_n, c_n) = fused(x, (h0, c0))
    upstream = (randn(*output.shape, dtype=F64), randn(1, 2, 4, dtype=F64), randn(1, 2, 4, dtype=F64))
    grads = torch.autograd.grad((output, h_n, c_n), [x, h0, c0] + params, upstream)
    for t in (output, h_n, c_n, *grads):
        assert t.isfinite().all()
    assert output.abs().max() < 1 and c_n.abs().max() < 1e3  # tanh bounded, no blow-up

    # First steps: nn.LSTM from (h0, c0).
    with torch.no_grad():
        first, _ = torch_lstm(x[:check], (h0, c0))
    assert_close(output[:check], first, rtol=1e-10, atol=1e-12)

    # Last steps: nn.LSTM from the state the fused op reached at steps - check.
    with torch.no_grad():
        _, (h_mid, c_mid) = fused(x[:steps - check], (h0, c0))
    tail_x = x[steps - check:].detach().requires_grad_()
    tail_h, tail_c = h_mid.clone().requires_grad_(), c_mid.clone().requires_grad_()
    tail_out, (tail_hn, tail_cn) = torch_lstm(tail_x, (tail_h, tail_c))
    assert_close(output[steps - check:], tail_out, rtol=1e-10, atol=1e-12)
    assert_close(h_n, tail_hn, rtol=1e-10, atol=1e-12)
    assert_close(c_n, tail_cn, rtol=1e-10, atol=1e-12)
    (tail_grad,) = torch.autograd.grad(
        (tail_out, tail_hn, tail_cn), [tail_x], (upstream[0][steps - check:], *upstream[1:]))
    assert_close(grads[0][steps - check:], tail_grad, rtol=1e-10, atol=1e-12)

    # Chained pieces: every output and gradient.
    state = (h0, c0)
    outputs = []
    for start in range(0, steps, piece):
        out, state = fused(x[start:start + piece], state)
        outputs.append(out)
    chained_output = torch.cat(outputs)
    chained = torch.autograd.grad((chained_output, *state), [x, h0, c0] + params, upstream)
    assert_close(output, chained_output, rtol=1e-12, atol=1e-13)
    for name, g, e in zip(["input", "h0", "c0"] + [n for n, _ in fused.named_parameters()],
                          grads, chained):
        assert_close(g, e, rtol=1e-9, atol=1e-11, msg=lambda m, name=name: f"{name}: {m}")


# --- allocation failure --------------------------------------------------------------------

# [T, B, I] = [1e5, 1e6, 2] as a stride-0 view of 2 numbers: the input costs nothing, but the
# output alone would be 1e11 rows of 4 floats (1.6 TB). at::empty fails at once (no lazy
# overcommit for a request that size), so nothing is actually allocated.
_HUGE = (100_000, 1_000_000)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_allocation_failure_raises_cleanly(training):
    torch_lstm, fused = lstm_pair(input_size=2, hidden_size=4, dtype=F32)
    x = randn(1, 1, 2, dtype=F32).expand(*_HUGE, 2)
    if training:
        x = x.detach().requires_grad_()
    with pytest.raises(RuntimeError) as expected:
        with torch.set_grad_enabled(training):
            torch_lstm(x)
    with pytest.raises(type(expected.value), match="allocate"):
        with torch.set_grad_enabled(training):
            fused(x)
    # The op itself (no nn.LSTM behind it) fails the same way.
    with pytest.raises(RuntimeError, match="allocate"):
        with torch.set_grad_enabled(training):
            fused_lstm.ops.lstm(x, None, None, None, fused._flat_weights, None, 1, False, True, 0)
    # ... and the module is fine afterwards.
    small = randn(4, 2, 2, dtype=F32)
    assert_close(fused(small)[0], torch_lstm(small)[0], rtol=1e-5, atol=1e-6)


def test_allocation_failure_packed():
    """A huge packed batch (batch_sizes of 1e6 rows per step, data a stride-0 view)."""
    _, fused = lstm_pair(input_size=2, hidden_size=4, dtype=F32)
    steps, batch = 100_000, 1_000_000
    data = randn(1, 2, dtype=F32).expand(steps * batch, 2)
    batch_sizes = torch.full((steps,), batch, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="allocate"):
        fused_lstm.ops.lstm(data, batch_sizes, None, None, fused._flat_weights, None, 1, False,
                            True, 0)


# --- determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_runs_are_bit_identical(packed):
    """Same seed, same inputs: the same bits for outputs and every gradient, dropout included."""

    def run():
        torch.manual_seed(1234)
        model = FusedLSTM(3, 6, num_layers=3, bidirectional=True, dropout=0.4)
        x = torch.randn(9, 4, 3, requires_grad=True)
        inp = pack_padded_sequence(x, [9, 3, 7, 5], enforce_sorted=False) if packed else x
        output, (h_n, c_n) = model(inp)
        out = output.data if packed else output
        loss = out.square().sum() + h_n.sum() + c_n.sum()
        grads = torch.autograd.grad(loss, [x] + list(model.parameters()))
        return [out, h_n, c_n, *grads]

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_dropout_mask_follows_the_seed():
    """Different seeds give different dropout (the determinism above is not a constant mask)."""
    model = FusedLSTM(3, 6, num_layers=2, dropout=0.5)
    x = randn(5, 2, 3, dtype=F32)
    torch.manual_seed(1)
    a = model(x)[0]
    torch.manual_seed(2)
    b = model(x)[0]
    assert not torch.equal(a, b)


# --- torch.compile, torch.export, ONNX -----------------------------------------------------


def _fused_ops(graph_module):
    """The fused_lstm op calls in a Dynamo graph."""
    return [n.target for n in graph_module.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("fused_lstm.")]


def _counter(backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    return CompileCounterWithBackend(backend)  # counts frames and keeps Dynamo's graphs


# Dynamo's graphs hold fused_lstm::lstm (it decides at run time, by grad mode and requires_grad,
# between lstm_forward and lstm_inference); AOTAutograd's graphs hold the op it chose, and the
# backward's lstm_backward. Both are checked: one fused op per FusedLSTM in Dynamo's graph, and
# in the compiled graphs inference without a reserve (lstm_inference), training with one.
LSTM = torch.ops.fused_lstm.lstm.default
LSTM_FORWARD = torch.ops.fused_lstm.lstm_forward.default
LSTM_INFERENCE = torch.ops.fused_lstm.lstm_inference.default
LSTM_BACKWARD = torch.ops.fused_lstm.lstm_backward.default


def _aot_capturing():
    """An aot_eager-like backend that keeps AOTAutograd's forward and backward graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {"forward": [], "backward": []}

    def keep(kind):
        def compiler(graph_module, example_inputs):
            graphs[kind].append(graph_module)
            return make_boxed_func(graph_module.forward)
        return compiler

    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward")), graphs


def _inductor_post_grad_capture():
    """A custom post-grad pass for Inductor that keeps each graph's fused ops, in order."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class Capture(CustomGraphPass):
        def __init__(self):
            self.ops = []

        def __call__(self, graph):
            self.ops.append([n.target for n in graph.nodes if n.op == "call_function"
                             and str(n.target).startswith("fused_lstm.")])

        def uuid(self):
            return None  # not cacheable; fresh_dynamo turns the caches off anyway

    return Capture()


@pytest.fixture
def fresh_dynamo():
    """A clean Dynamo state, and no compiled code from the on-disk caches: their keys do not
    cover the fake kernels, so a cached graph could hide a change to them. allow_rnn is never
    set: importing fused_lstm lets Dynamo trace FusedLSTM without it (fused_lstm/_dynamo.py)."""
    import torch._functorch.config
    import torch._inductor.config

    assert not torch._dynamo.config.allow_rnn
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()
    assert not torch._dynamo.config.allow_rnn


def test_compile_fullgraph_inference_and_training(fresh_dynamo):
    """No allow_rnn: fullgraph=True compiles the model as one graph holding one fused op, with
    nn.LSTM's results and gradients."""
    torch.manual_seed(0)
    model = Tagger(dtype=F32)
    x = randn(4, 7, 3, dtype=F32)
    counter = _counter("inductor")
    capture = _inductor_post_grad_capture()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad(), torch._inductor.config.patch(post_grad_custom_pre_pass=capture):
        expected, got = model.eval()(x), compiled(x)
    for e, g in zip(expected, got):
        assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1
    assert _fused_ops(counter.graphs[0]) == [LSTM]
    assert capture.ops == [[LSTM_INFERENCE]]  # the compiled inference graph keeps no reserve

    model.train()
    params = list(model.parameters())
    leaf = x.clone().requires_grad_()
    upstream = [randn(*t.shape, dtype=F32) for t in expected]
    grads = []
    with torch._inductor.config.patch(post_grad_custom_pre_pass=capture):
        for module in (model, compiled):
            outs = module(leaf)
            grads.append(torch.autograd.grad(outs, [leaf] + params, upstream))
    for e, g in zip(*grads):
        assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 2  # the recompile for training mode and grad
    assert _fused_ops(counter.graphs[1]) == [LSTM]
    # forward with the reserve, then the backward graph's one backward op
    assert capture.ops[1:] == [[LSTM_FORWARD], [LSTM_BACKWARD]]


class TwoLSTMs(nn.Module):
    """Two LSTM modules in one model: FusedLSTM, FusedLSTM or nn.LSTM."""

    def __init__(self, second_class):
        super().__init__()
        self.first = FusedLSTM(3, 4, batch_first=True)
        self.second = second_class(4, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.second(self.first(x)[0])[0])


def test_compile_two_fused_lstms_one_graph(fresh_dynamo):
    model = TwoLSTMs(FusedLSTM)
    x = randn(2, 5, 3, dtype=F32, requires_grad=True)
    backend, aot_graphs = _aot_capturing()
    counter = _counter(backend)
    got = torch.compile(model, fullgraph=True, backend=counter)(x)
    expected = model(x)
    assert_close(got, expected)
    assert_close(torch.autograd.grad(got.sum(), x), torch.autograd.grad(expected.sum(), x))
    assert counter.frame_count == 1
    assert _fused_ops(counter.graphs[0]) == [LSTM] * 2
    assert [_fused_ops(g) for g in aot_graphs["forward"]] == [[LSTM_FORWARD] * 2]
    assert [_fused_ops(g) for g in aot_graphs["backward"]] == [[LSTM_BACKWARD] * 2]


@pytest.mark.parametrize("model_class", ["nn.LSTM", "nn.LSTM next to FusedLSTM"])
def test_compile_still_refuses_plain_nn_lstm(fresh_dynamo, model_class):
    """Only FusedLSTM gets through: Dynamo's rule for nn.LSTM is unchanged (refused under
    fullgraph=True, a graph break without it), also inside a model that holds a FusedLSTM."""
    if model_class == "nn.LSTM":
        model = Tagger(lstm_class=nn.LSTM)
    else:
        model = TwoLSTMs(nn.LSTM)
    x = randn(2, 5, 3, dtype=F32)
    with pytest.raises(Exception, match="allow_rnn"):
        torch.compile(model, fullgraph=True, backend="eager")(x)
    assert not torch._dynamo.config.allow_rnn
    torch._dynamo.reset()
    backend, aot_graphs = _aot_capturing()
    counter = _counter(backend)
    with torch.no_grad():
        got = torch.compile(model, backend=counter)(x)
        expected = model(x)
    for e, g in zip(expected if isinstance(expected, tuple) else [expected],
                    got if isinstance(got, tuple) else [got]):
        assert_close(g, e)
    ops = [op for graph in counter.graphs for op in _fused_ops(graph)]
    compiled_ops = [op for graph in aot_graphs["forward"] for op in _fused_ops(graph)]
    fused = model_class != "nn.LSTM"  # nn.LSTM: eager, not compiled
    assert ops == ([LSTM] if fused else [])
    assert compiled_ops == ([LSTM_INFERENCE] if fused else [])


def test_dynamo_hook_is_narrow_and_idempotent():
    """The wrapped VariableBuilder.wrap_module patches allow_rnn for a FusedLSTM value only, for
    that call only; another RNN module wrapped from within that call (torch never does so today)
    sees the user's setting again; installing twice wraps once."""
    from torch._dynamo.variables.builder import VariableBuilder

    from fused_lstm import _dynamo

    assert _dynamo.active()
    wrapped = VariableBuilder.wrap_module
    _dynamo.install(FusedLSTM)
    assert VariableBuilder.wrap_module is wrapped
    assert not getattr(wrapped.__wrapped__, "_fused_lstm_allow_rnn_hook", False)

    config = torch._dynamo.config
    fused, plain = FusedLSTM(2, 3), nn.LSTM(2, 3)
    seen = []

    def original(self, value, nested=(), fail=False):
        seen.append((type(value).__name__, config.allow_rnn))
        for inner in nested:
            hook(self, inner)
        if fail:
            raise RuntimeError("refused")

    hook = _dynamo._make_wrapper(original, config)
    hook(None, fused, nested=[plain, fused])
    hook(None, plain)
    with config.patch(allow_rnn=True):
        hook(None, plain)  # the user's own setting is left alone
    with pytest.raises(RuntimeError, match="refused"):
        hook(None, fused, fail=True)
    assert seen == [("FusedLSTM", True), ("LSTM", False), ("FusedLSTM", True), ("LSTM", False),
                    ("LSTM", True), ("FusedLSTM", True)]
    assert not config.allow_rnn and not getattr(_dynamo._state, "inside", False)


def test_dynamo_hook_waits_for_dynamo_import():
    """Installed before torch._dynamo is imported (import torch does not import it), the hook
    wraps the method once Dynamo's builder module is imported, and leaves no finder behind."""
    hook_path = pathlib.Path(fused_lstm.__file__).with_name("_dynamo.py")
    code = f"""
import importlib.util, sys, torch
from torch import nn
assert "torch._dynamo" not in sys.modules
spec = importlib.util.spec_from_file_location("hook_under_test", {str(hook_path)!r})
hook = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hook)
class MyLSTM(nn.LSTM):
    pass
hook.install(MyLSTM)
hook.install(MyLSTM)
assert "torch._dynamo" not in sys.modules and not hook.active()
import torch._dynamo
assert hook.active()
assert not any(isinstance(f, hook._ImportHook) for f in sys.meta_path)
builder = sys.modules["torch._dynamo.variables.builder"]
assert type(builder.__loader__).__name__ == "SourceFileLoader", builder.__loader__
x = torch.randn(5, 2, 3)
model = MyLSTM(3, 4)
torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x), model(x))
try:
    torch.compile(nn.LSTM(3, 4), fullgraph=True, backend="eager")(x)
except Exception as error:
    assert "allow_rnn" in str(error), error
else:
    raise AssertionError("nn.LSTM was not refused")
print("ok")
"""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


def test_compile_under_autocast_runs_nn_lstm_eagerly(fresh_dynamo):
    """Under autocast FusedLSTM hands the call to nn.LSTM's forward, which does not compile on
    CPU (torch 2.13): it runs eagerly (torch.compiler.disable), with nn.LSTM's exact results."""
    model = Tagger(dtype=F32)
    x = randn(2, 5, 3, dtype=F32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = model(x), torch.compile(model, backend="aot_eager")(x)
    for e, g in zip(expected, got):
        assert g.dtype == e.dtype
        assert torch.equal(g, e)


def test_export_contains_one_fused_op():
    model = Tagger(dtype=F32).eval()
    x = randn(2, 5, 3, dtype=F32)
    with warnings.catch_warnings():
        # nn.LSTM's own export warns the same: _update_flat_weights assigns _flat_weights.
        warnings.filterwarnings("ignore", message="The tensor attributes self._flat_weights")
        exported = torch.export.export(model, (x,))
    # The exported program holds the deciding op once (it chooses when the program runs);
    # decomposed to the inference IR, the op it chose there: lstm_inference, no reserve.
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert [t for t in targets if str(t).startswith("fused_lstm.")] == [LSTM]
    decomposed = exported.run_decompositions()
    assert _fused_ops(decomposed.graph_module) == [LSTM_INFERENCE]
    params = {s.target for s in exported.graph_signature.input_specs if s.kind.name == "PARAMETER"}
    assert {f"lstm.{name}" for name, _ in model.lstm.named_parameters()} <= params
    other = randn(2, 5, 3, dtype=F32)
    with torch.no_grad():
        for e, g in zip(model(other), exported.module()(other)):
            assert torch.equal(e, g)


def test_revert_for_onnx_keeps_outputs():
    """fused_lstm.revert turns the model back into plain nn.LSTM modules (for ONNX export):
    the same parameters, the outputs a plain nn.LSTM model gives, bit for bit."""
    plain = Tagger(lstm_class=nn.LSTM, dtype=F32).eval()
    x = randn(3, 6, 3, dtype=F32)
    with torch.no_grad():
        expected = plain(x)
        model = fused_lstm.convert(plain)
        assert type(model.lstm) is FusedLSTM
        fused_out = model(x)
        reverted = fused_lstm.revert(model)
        assert type(reverted.lstm) is nn.LSTM
        got = reverted(x)
    for e, g, f in zip(expected, got, fused_out):
        assert torch.equal(e, g)
        assert_close(f, e, rtol=1e-5, atol=1e-6)
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None:
        pytest.skip("onnx / onnxscript not installed: the ONNX export itself is not run")
    onnx_program = torch.onnx.export(reverted, (x,), dynamo=True)
    assert onnx_program is not None


# --- autocast ------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_autocast_matches_nn_lstm(packed):
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=5, num_layers=2, dtype=F32)
    x = randn(6, 3, 3, dtype=F32)
    inp = pack_padded_sequence(x, [6, 4, 2]) if packed else x
    results = []
    for module in (torch_lstm, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output, (h_n, c_n) = module(inp)
        results.append((output.data if packed else output, h_n, c_n))
    for e, g in zip(*results):
        assert g.dtype == e.dtype
        assert torch.equal(g, e)


# --- DDP -----------------------------------------------------------------------------------


def _train_steps(model, batches, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for x, target in batches:
        opt.zero_grad()
        prediction, _, _ = model(x)
        loss = (prediction - target).square().mean()
        loss.backward()
        opt.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _ddp_data(steps=3, batch=4):
    g = torch.Generator().manual_seed(99)
    return [(torch.randn(batch, 5, 3, generator=g, dtype=F64),
             torch.randn(batch, 5, 2, generator=g, dtype=F64)) for _ in range(steps)]


def _ddp_worker(rank, world_size, init_file, result_file):
    import torch.distributed as dist

    import datetime

    # Loopback: the hostname may resolve to an address the two processes cannot reach.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = Tagger(dtype=F64)
        ddp = nn.parallel.DistributedDataParallel(model)
        share = [(x.chunk(world_size)[rank], t.chunk(world_size)[rank]) for x, t in _ddp_data()]
        _train_steps(ddp, share)
        params = {name: p.detach().clone() for name, p in model.named_parameters()}
        if rank == 0:
            torch.save(params, result_file)
        dist.barrier()  # neither process leaves while the other still talks to it
        # The DDP wrapper (its Reducer holds the process group) goes first, while the group is
        # still registered: freed after destroy_process_group, the Reducer's deallocation holds
        # the GIL while ~ProcessGroupGloo joins gloo's worker thread, which may still be
        # destroying a finished work item whose thread-local state needs the GIL for a Python
        # decref. That deadlock (a PyTorch one, pytorch/pytorch#56297) hung this worker about
        # once in 40 runs.
        del ddp
        gc.collect()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # about 10 s: two fresh processes import torch and fused_lstm
def test_ddp_two_processes_match_one(tmp_path):
    """Two gloo processes on halves of each batch end with the parameters one process gets on
    the whole batch (DDP averages the gradients; the loss is a mean over equal halves)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import torch.multiprocessing as mp

    result_file = tmp_path / "params.pt"
    context = mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(result_file)),
                                 nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120  # never hang CI: a stuck worker fails the test
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "DDP workers did not finish within 120 s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    torch.manual_seed(0)
    single = _train_steps(Tagger(dtype=F64), _ddp_data())
    distributed = torch.load(result_file)
    assert single.keys() == distributed.keys()
    for name in single:
        assert_close(distributed[name], single[name], rtol=1e-10, atol=1e-12,
                     msg=lambda m, name=name: f"{name}: {m}")
    torch.manual_seed(0)
    initial = dict(Tagger(dtype=F64).named_parameters())
    assert not torch.equal(initial["lstm.weight_hh_l0"], single["lstm.weight_hh_l0"])


# --- soak ----------------------------------------------------------------------------------


def _load_soak():
    spec = importlib.util.spec_from_file_location(
        "fused_lstm_soak", ROOT / "benchmarks" / "experiments" / "soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    return soak


@pytest.mark.skipif(not pathlib.Path("/proc/self/statm").exists(),
                    reason="needs /proc/self/statm for the current RSS")
def test_soak_short_no_rss_growth():
    """500 forward+backward iterations (padded, packed, with and without state, dropout):
    resident memory after the first third (warm-up: allocator pools and caches filling) grows
    by at most 1% + 2 MB to the end. A leak of a few hundred bytes per iteration stays under
    this in 500 iterations; ``python benchmarks/experiments/soak.py`` (10,000 iterations) is the
    real soak. No timing is asserted."""
    soak = _load_soak()
    samples = soak.soak(500, every=50, verbose=False)
    warm, final = soak.growth(samples)
    assert soak.within_limit(warm, final), (
        f"RSS grew from {warm / 2**20:.1f} MB to {final / 2**20:.1f} MB: "
        + ", ".join(f"{i}: {rss / 2**20:.1f}" for i, rss in samples))


# --- no crash where nn.LSTM crashes ---------------------------------------------------------


@pytest.mark.parametrize("state_batch", [1, 3, 6])
def test_packed_equal_lengths_wrong_state_raises_not_crashes(state_batch):
    """Packed float32 input of equal lengths with a hidden state for another batch size:
    nn.LSTM (torch 2.13) corrupts the heap here (oneDNN, no shape check for packed input) and
    the process aborts; FusedLSTM must raise a RuntimeError without ever calling it."""
    fused = FusedLSTM(6, 7, bidirectional=True, bias=False)
    packed = pack_padded_sequence(randn(2, 4, 6, dtype=F32), [2, 2, 2, 2])
    for _ in range(20):  # heap corruption shows up only sometimes on the first call
        with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(2, 4, 7\)"):
            fused(packed, (randn(2, state_batch, 7, dtype=F32), randn(2, state_batch, 7, dtype=F32)))
