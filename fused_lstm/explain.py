"""Which implementation a FusedLSTM call runs, and why: ``fused_lstm.explain(module, input)``.

On a CUDA device the answer comes from the compiled decision itself (the op
``fused_lstm::cuda_path_choice``, csrc/cuda/lstm_persistent.h): the persistent kernel (one
cooperative launch per layer, every step, both directions) or the step path (a GEMM and a fused
kernel per step), forward and backward separately, with the launch plan. On the CPU it says the
CPU kernels; where FusedLSTM has no kernel it says nn.LSTM.

The rule's size arithmetic is also written here (:func:`decide_cuda_path`), for machines without
a GPU: :func:`predict_cuda_path` answers for an assumed device (``H100_SXM`` by default), and
tests/test_cuda_compile.py checks that this copy and the C++ one agree (constants, loops and
text) on many sizes. Keep the two in sync.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

__all__ = ["H100_SXM", "H200", "REASONS", "DeviceLimits", "decide_cuda_path", "explain",
           "predict_cuda_path"]

# csrc/cuda/lstm_persistent.h's constants.
THREADS = 256
ROWS_PER_THREAD = 4
UNITS_PER_TEAM = 4
MAX_RUNS = 128
MAX_TILE = 64
MIN_FMA = 16384
GRID_SYNC_NS = 1500
STAGED_BYTES_PER_NS = 5500
SMEM_FMA_PER_10NS = 1123
PHASE_A_NS = 300
STEP_LAUNCH_NS = 5000
GEMM_FLOPS_PER_NS = 40000

REASONS = {
    "forced_step": "FUSED_LSTM_CUDA_PATH=step",
    "no_cooperative_launch": "the device cannot launch cooperative kernels",
    "empty_batch": "nothing to compute",
    "projection": "proj_size > 0: the persistent kernels do not handle the projection",
    "too_many_batch_size_runs": f"a packed sequence with more than {MAX_RUNS} distinct batch sizes",
    "does_not_fit": "W_hh does not fit in the shared memory of a grid the device holds at once",
    "step_path_predicted_faster": "the cost model predicts the step path faster at these "
                                  "sizes (persistent_ns vs step_path_ns per step)",
    "occupancy_refused": "the CUDA occupancy API holds fewer blocks at once than the plan needs",
    "auto": "W_hh fits on chip and the steps are small: one launch per layer runs every step",
    "forced_persistent": "FUSED_LSTM_CUDA_PATH=persistent",
}


@dataclasses.dataclass(frozen=True)
class DeviceLimits:
    """What a device offers the persistent kernel (lstm_persistent.h's DeviceLimits)."""

    cooperative_launch: bool
    sm_count: int
    smem_per_sm: int              # bytes, cudaDevAttrMaxSharedMemoryPerMultiprocessor
    smem_per_block_optin: int     # bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin
    reserved_smem_per_block: int  # bytes, cudaDevAttrReservedSharedMemoryPerBlock
    max_blocks_per_sm: int        # the kernel's limit from threads and registers

    def as_list(self):
        return [int(self.cooperative_launch), self.sm_count, self.smem_per_sm,
                self.smem_per_block_optin, self.reserved_smem_per_block, self.max_blocks_per_sm]


# Published sm_90 figures (132 SMs, 228 KB shared memory per SM, 227 KB per block, 1 KB
# reserved); two 256-thread blocks per SM by registers (nvcc 13.0 reports 84-110 registers per
# thread for the four kernels at sm_90). Not measured on a device.
H100_SXM = DeviceLimits(True, 132, 233472, 232448, 1024, 2)
H200 = DeviceLimits(True, 132, 233472, 232448, 1024, 2)


def _ceil_div(a, b):
    return -(-a // b)


def _round_up(a, b):
    return _ceil_div(a, b) * b


def _pow2_floor(x):
    p = 1
    while p * 2 <= x:
        p *= 2
    return p


def _pow2_ceil(x):
    p = 1
    while p < x:
        p *= 2
    return p


def _make_plan(hidden, batch, elem_size, backward, limits, units, batch_tile, k_split):
    R = ROWS_PER_THREAD
    K = 4 * hidden if backward else hidden
    plan = dict(units=units, blocks=_ceil_div(hidden, units), threads=THREADS, k_split=1,
                batch_tile=0, smem_bytes=0,
                w_rows=_round_up(units, UNITS_PER_TEAM) if backward else 4 * units)
    teams_per_group = _ceil_div(units, UNITS_PER_TEAM) if backward else units
    tile = _round_up(min(batch, batch_tile if batch_tile > 0 else MAX_TILE), R)
    while tile >= R:
        items = (tile // R) * teams_per_group
        ks = k_split if k_split > 0 else min(32, max(1, _pow2_floor(THREADS // items)),
                                             _pow2_ceil(K))
        stride = _round_up(K, 32) + ks % 32
        smem = (plan["w_rows"] * stride + tile * stride) * elem_size
        if smem <= limits.smem_per_block_optin:
            plan.update(k_split=ks, batch_tile=tile, smem_bytes=smem, x_stride=stride)
            return plan
        tile -= R
    return plan


def _coresident(limits, smem_bytes):
    if smem_bytes > limits.smem_per_block_optin:
        return 0
    by_smem = limits.smem_per_sm // (smem_bytes + limits.reserved_smem_per_block)
    return limits.sm_count * min(limits.max_blocks_per_sm, by_smem)


def _describe(persistent, reason, plan, coresident, fma, persistent_ns=0, step_path_ns=0):
    text = f"path={'persistent' if persistent else 'step'} reason={reason}"
    if plan is not None and plan["units"] > 0 and plan["batch_tile"] > 0:
        text += (f" units={plan['units']} blocks={plan['blocks']} threads={plan['threads']}"
                 f" k_split={plan['k_split']} batch_tile={plan['batch_tile']}"
                 f" smem_bytes={plan['smem_bytes']} coresident_blocks={coresident}"
                 f" fma_per_block_step={fma} persistent_ns={persistent_ns}"
                 f" step_path_ns={step_path_ns}")
    return text


def decide_cuda_path(hidden_size: int, proj_size: int, batch: int, seq_len: int,
                     num_directions: int, num_runs: int, elem_size: int, backward: bool,
                     limits: DeviceLimits, mode: str = "auto", units: int = 0,
                     batch_tile: int = 0, k_split: int = 0) -> str:
    """lstm_persistent.h's decide_cuda_path, line for line; returns its ``describe`` text."""
    if mode == "step":
        return _describe(False, "forced_step", None, 0, 0)
    if not limits.cooperative_launch:
        return _describe(False, "no_cooperative_launch", None, 0, 0)
    if batch <= 0 or seq_len <= 0 or hidden_size <= 0:
        return _describe(False, "empty_batch", None, 0, 0)
    if proj_size > 0:
        return _describe(False, "projection", None, 0, 0)
    if num_runs > MAX_RUNS:
        return _describe(False, "too_many_batch_size_runs", None, 0, 0)
    H, R = hidden_size, ROWS_PER_THREAD
    fma_per_unit = 4 * _round_up(batch, R) * H
    blocks_per_direction = max(1, limits.sm_count // num_directions)
    first = min(H, max(_ceil_div(MIN_FMA, fma_per_unit), _ceil_div(H, blocks_per_direction)))
    last = H
    if units > 0:
        first = last = min(units, H)
    plan, coresident, found = None, 0, False
    for u in range(first, last + 1):
        p = _make_plan(H, batch, elem_size, backward, limits, u, batch_tile, k_split)
        if p["batch_tile"] == 0:
            K = 4 * H if backward else H
            if (p["w_rows"] + R) * _round_up(K, 32) * elem_size > limits.smem_per_block_optin:
                break
            continue
        if u > first and _ceil_div(H, u) == _ceil_div(H, u - 1):
            continue
        plan, coresident = p, _coresident(limits, p["smem_bytes"])
        if p["blocks"] * num_directions <= coresident:
            found = True
            break
    if not found:
        return _describe(False, "does_not_fit", plan, coresident, 0)
    fma = fma_per_unit * plan["units"]
    # The cost model, in integers as in C++ (// is C++'s / on these non-negative values).
    width = elem_size // 4
    grid_blocks = plan["blocks"] * num_directions
    staged_bytes = grid_blocks * batch * plan["x_stride"] * elem_size
    busiest_sm_fma = _ceil_div(grid_blocks, limits.sm_count) * fma
    persistent_ns = (GRID_SYNC_NS + staged_bytes // STAGED_BYTES_PER_NS
                     + busiest_sm_fma * width * 10 // SMEM_FMA_PER_10NS
                     + (PHASE_A_NS if backward else 0))
    step_path_ns = num_directions * (2 * STEP_LAUNCH_NS
                                     + 2 * batch * 4 * H * H * width // GEMM_FLOPS_PER_NS)
    times = (persistent_ns, step_path_ns)
    if mode == "auto" and persistent_ns >= step_path_ns:
        return _describe(False, "step_path_predicted_faster", plan, coresident, fma, *times)
    return _describe(True, "auto" if mode == "auto" else "forced_persistent", plan, coresident,
                     fma, *times)


def parse_choice(text: str) -> dict[str, Any]:
    """``path=persistent reason=auto units=4 ...`` -> {"path": "persistent", "reason": "auto",
    "why": <sentence>, "units": 4, ...}."""
    out: dict[str, Any] = {}
    for word in text.split():
        key, _, value = word.partition("=")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    out["why"] = REASONS.get(out.get("reason", ""), out.get("reason", ""))
    return out


# --- sizes of a call ------------------------------------------------------------------------------

_SIZE_KEYS = ("hidden_size", "num_layers", "bidirectional", "proj_size", "batch_first", "bias")


def _sizes_of(module_or_sizes) -> dict[str, Any]:
    if isinstance(module_or_sizes, nn.LSTM):
        return {k: getattr(module_or_sizes, k) for k in _SIZE_KEYS}
    if isinstance(module_or_sizes, Mapping):
        if "hidden_size" not in module_or_sizes:
            raise ValueError("explain: sizes need at least 'hidden_size'")
        sizes = dict(num_layers=1, bidirectional=False, proj_size=0, batch_first=False,
                     bias=True)
        sizes.update({k: module_or_sizes[k] for k in _SIZE_KEYS if k in module_or_sizes})
        return sizes
    raise TypeError("explain: expected an nn.LSTM / FusedLSTM module or a mapping of sizes "
                    f"(hidden_size, num_layers, bidirectional, proj_size, batch_first), got "
                    f"{type(module_or_sizes).__name__}")


def _time_major(input, batch_first):
    """(data as the op sees it, batch_sizes or None)."""
    if isinstance(input, PackedSequence):
        return input.data, input.batch_sizes
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"explain: input must be a Tensor or PackedSequence, got {type(input)}")
    if input.dim() == 2:
        return input.unsqueeze(1), None
    if input.dim() != 3:
        raise ValueError(f"explain: expected 2-D or 3-D input, got {input.dim()}-D")
    return (input.transpose(0, 1) if batch_first else input), None


def _query(sizes, data, batch_sizes):
    if batch_sizes is not None:
        bs = [int(b) for b in batch_sizes]
        seq_len, batch = len(bs), (bs[0] if bs else 0)
        runs = sum(1 for t in range(len(bs)) if t == 0 or bs[t] != bs[t - 1])
    else:
        seq_len, batch, runs = data.shape[0], data.shape[1], 1
    return dict(hidden_size=sizes["hidden_size"], proj_size=sizes["proj_size"], batch=batch,
                seq_len=seq_len, num_directions=2 if sizes["bidirectional"] else 1,
                num_runs=runs, elem_size=8 if data.dtype == torch.float64 else 4)


def _result(device, forward: dict[str, Any], backward: dict[str, Any]) -> dict[str, Any]:
    summary = (f"{device}: forward {forward['path']} ({forward['why']}); "
               f"backward {backward['path']} ({backward['why']})")
    return {"device": str(device), "path": forward["path"], "forward": forward,
            "backward": backward, "summary": summary}


def _same_both(device, path, why):
    choice = {"path": path, "reason": path, "why": why}
    return _result(device, choice, dict(choice))


def _cpu_plan(sizes, data, batch_sizes, inference: bool) -> dict[str, Any]:
    """The CPU plan (csrc/cpu/plan.h) of the call, as the op fused_lstm::cpu_plan describes it:
    ``variant``, ``why``, and where each product goes."""
    steps = ([int(b) for b in batch_sizes] if batch_sizes is not None
             else [data.shape[1]] * data.shape[0])
    text = torch.ops.fused_lstm.cpu_plan(
        data.shape[-1], sizes["hidden_size"], sizes["proj_size"], sizes["num_layers"],
        bool(sizes["bidirectional"]), bool(sizes["bias"]), steps, data.dtype, inference)
    plan: dict[str, Any] = dict(line.split("=", 1) for line in text.splitlines())
    plan["path"] = plan["reason"] = plan["variant"]
    plan["inference"] = inference
    return plan


def _cpu_result(module_or_sizes, sizes, data, batch_sizes) -> dict[str, Any]:
    device = data.device
    if data.shape[0] == 0 or (batch_sizes is not None and len(batch_sizes) == 0):
        return _same_both(device, "nn.LSTM", "an empty sequence: nn.LSTM raises its error")
    if isinstance(module_or_sizes, nn.Module):
        weights_grad = any(p.requires_grad for p in module_or_sizes.parameters())
    else:
        weights_grad = bool(module_or_sizes.get("requires_grad", True))
    grad = torch.is_grad_enabled() and (weights_grad or data.requires_grad)
    forward = _cpu_plan(sizes, data, batch_sizes, inference=not grad)
    backward = _cpu_plan(sizes, data, batch_sizes, inference=False)
    return _result(device, forward, backward)


def explain(module_or_sizes: nn.LSTM | Mapping[str, Any], input) -> dict[str, Any]:
    """Which implementation ``FusedLSTM(...)(input)`` runs, forward and backward, and why.

    ``module_or_sizes``: an nn.LSTM or FusedLSTM (its sizes are read), or a mapping with
    ``hidden_size`` and optionally ``num_layers``, ``bidirectional``, ``proj_size``,
    ``batch_first``. ``input``: the tensor or PackedSequence the call would get (only its
    device, dtype and shape are used; nothing is computed).

    Returns a dict: ``device``; ``path`` (the forward's: ``"persistent"`` or ``"step"`` on
    CUDA; the CPU kernel variant, ``"row_wise"``, ``"small_hidden"`` or ``"thin"``; or
    ``"nn.LSTM"`` where FusedLSTM falls back); ``forward`` and ``backward``, each a dict with
    ``path``, ``reason`` (a word), ``why`` (a sentence) and, for the CUDA paths, the persistent
    plan (``units`` per block, ``blocks`` per direction, ``k_split``, ``batch_tile``,
    ``smem_bytes``, ...); on the CPU, ``variant``, ``inference`` (whether the call stores
    nothing for backward: no gradient can flow) and where each product goes
    (``input_projection.<layer>``, ``recurrent_product``, ``projection``,
    ``backward_dh_product``, ``backward_weight_products``: brgemm, bf16_gemm, onednn_matmul,
    blas, ...), with the ``cell_pass``, ``batch_slices``, ``settings`` and ``cpu`` features
    the choice read; ``summary``, one line.
    """
    from .module import _fused_kernel_available, _is_autocast_enabled

    sizes = _sizes_of(module_or_sizes)
    data, batch_sizes = _time_major(input, sizes["batch_first"])
    device = data.device
    if _is_autocast_enabled():
        return _same_both(device, "nn.LSTM", "autocast is on: FusedLSTM runs nn.LSTM's "
                          "implementation, with nn.LSTM's autocast rules")
    if not _fused_kernel_available(device.type):
        return _same_both(device, "nn.LSTM", f"no fused kernel for {device.type} in this build: "
                          "FusedLSTM runs nn.LSTM's implementation (FusedLSTMFallbackWarning)")
    if device.type == "cpu":
        return _cpu_result(module_or_sizes, sizes, data, batch_sizes)
    if device.type == "cuda":
        text = torch.ops.fused_lstm.cuda_path_choice(
            data, batch_sizes, sizes["hidden_size"], bool(sizes["bidirectional"]),
            sizes["proj_size"])
        lines = dict(line.split(": ", 1) for line in text.splitlines())
        return _result(device, parse_choice(lines["forward"]), parse_choice(lines["backward"]))
    return _same_both(device, device.type, f"the {device.type} kernels")


def predict_cuda_path(module_or_sizes: nn.LSTM | Mapping[str, Any], input,
                      limits: DeviceLimits = H100_SXM, mode: str = "auto",
                      device: str | None = None) -> dict[str, Any]:
    """What the CUDA rule would choose on a device with ``limits`` (no GPU needed; Python's
    copy of the rule, without the occupancy API's final word), in :func:`explain`'s form."""
    sizes = _sizes_of(module_or_sizes)
    data, batch_sizes = _time_major(input, sizes["batch_first"])
    q = _query(sizes, data, batch_sizes)
    forward = parse_choice(decide_cuda_path(**q, backward=False, limits=limits, mode=mode))
    backward = parse_choice(decide_cuda_path(**q, backward=True, limits=limits, mode=mode))
    name = device or ("assumed H100/H200" if limits == H100_SXM else
                      f"assumed device with {limits.sm_count} SMs")
    return _result(name, forward, backward)
