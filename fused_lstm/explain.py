"""Which implementation a FusedLSTM call runs, and why: ``fused_lstm.explain(module, input)``.

On a CUDA device the answer comes from the compiled decision itself (the op
``fused_lstm::cuda_path_choice``, csrc/cuda/lstm_persistent.h): the persistent kernel (one
cooperative launch per layer, every step, both directions) or the step path (a GEMM and a fused
kernel per step), forward and backward separately, with the launch plan. On the CPU it says the
CPU kernels; where FusedLSTM has no kernel it says nn.LSTM.

Without a GPU, :func:`predict_cuda_path` answers for an assumed device (``H100_SXM`` by default)
with the same C++ rule (csrc/cuda/lstm_path_rule.h), which every build, the CPU-only one
included, registers as the op ``fused_lstm::cuda_path_predict`` (:func:`decide_cuda_path`).
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

REASONS = {
    "forced_step": "fused_lstm.backends.cuda.path is 'step'",
    "no_cooperative_launch": "the device cannot launch cooperative kernels",
    "empty_batch": "nothing to compute",
    "projection": "proj_size > 0: the persistent kernels do not handle the projection",
    # 128: lstm_path_rule.h's kPersistentMaxRuns (tests/test_cuda_compile.py checks the bound).
    "too_many_batch_size_runs": "a packed sequence with more than 128 distinct batch sizes",
    "does_not_fit": "W_hh does not fit in the shared memory of a grid the device holds at once",
    "step_path_predicted_faster": "the cost model predicts the step path faster at these "
                                  "sizes (persistent_ns vs step_path_ns per step)",
    "occupancy_refused": "the CUDA occupancy API holds fewer blocks at once than the plan needs",
    "auto": "W_hh fits on chip and the steps are small: one launch per layer runs every step",
    "forced_persistent": "fused_lstm.backends.cuda.path is 'persistent'",
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


def decide_cuda_path(hidden_size: int, proj_size: int, batch: int, seq_len: int,
                     num_directions: int, num_runs: int, elem_size: int, backward: bool,
                     limits: DeviceLimits, mode: str = "auto", units: int = 0,
                     batch_tile: int = 0, k_split: int = 0) -> str:
    """The CUDA path rule (csrc/cuda/lstm_path_rule.h's decide_cuda_path, through the op
    ``fused_lstm::cuda_path_predict``) for these sizes on a device with ``limits``; returns its
    ``describe`` text (:func:`parse_choice` reads it)."""
    return torch.ops.fused_lstm.cuda_path_predict(
        hidden_size, proj_size, batch, seq_len, num_directions, num_runs, elem_size, backward,
        limits.as_list(), mode, units, batch_tile, k_split)


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


def _cpu_plan(sizes, data, batch_sizes, inference: bool, dropout: bool = False
              ) -> dict[str, Any]:
    """The CPU plan (csrc/cpu/plan.h) of the call, as the op fused_lstm::cpu_plan describes it:
    ``variant``, ``why``, and where each product goes; ``nn_lstm_floor``: whether the call runs
    at::lstm instead (``path`` is then ``"nn.LSTM"``). ``dropout``: the call gets a dropout
    mask."""
    steps = ([int(b) for b in batch_sizes] if batch_sizes is not None
             else [data.shape[1]] * data.shape[0])
    text = torch.ops.fused_lstm.cpu_plan(
        data.shape[-1], sizes["hidden_size"], sizes["proj_size"], sizes["num_layers"],
        bool(sizes["bidirectional"]), bool(sizes["bias"]), steps, data.dtype, inference,
        dropout)
    plan: dict[str, Any] = dict(line.split("=", 1) for line in text.splitlines())
    plan["path"] = plan["reason"] = plan["variant"]
    if plan.get("nn_lstm_floor_runs") == "true":
        plan["path"] = "nn.LSTM"
        plan["reason"] = "nn_lstm_floor"
        plan["why"] = ("the nn.LSTM floor: at::lstm (what nn.LSTM runs) runs the call: "
                       + plan["nn_lstm_floor"])
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
    # A dropout mask: a module in training mode with dropout between layers.
    dropout = (isinstance(module_or_sizes, nn.Module) and module_or_sizes.training
               and module_or_sizes.dropout > 0 and sizes["num_layers"] > 1)
    forward = _cpu_plan(sizes, data, batch_sizes, inference=not grad, dropout=dropout)
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
    ``backward_dh_product``, ``backward_weight_products``, ``backward_data_product``: brgemm,
    bf16_gemm, onednn_matmul, blas, ...), ``backward_gates`` for a training call (the gates
    its backward reads: kept by the forward, or recomputed, a step or a chunk of steps at a
    time, where the reserve keeps none), ``weight_grads_apart`` for a training call (whether
    W_ih's and W_hh's gradients are made by autograd nodes of their own, one at a time: the
    few-row backward, and a float16 model's from 9 rows with the gates kept, where every weight
    requires grad), ``fp16_kept_weights`` for a float16 model's training (whether its forward
    reads W_ih and W_hh as given with the gates kept), with the ``cell_pass``, ``batch_slices``,
    ``settings`` and ``cpu`` features the choice read, and for float32 the measured rates it
    read (``library_rates``: one thread's GFLOP/s of the BLAS and of oneDNN's matmul per class
    of product; ``fused_step_rates.<layer>``: one thread's fused step against the recurrent
    step plus its rows' share of the projection, the three timed together); ``nn_lstm_floor``
    (whether the call may run, or runs, what nn.LSTM runs, ``at::lstm``, instead of the fused
    kernels, and why),
    ``nn_lstm_floor_runs`` (``"true"`` where it does: ``path`` is then ``"nn.LSTM"``, while
    ``variant`` names the kernels that would run otherwise) and ``nn_lstm_floor_times`` (the
    measured times behind an ``"auto"`` choice); ``summary``, one line.
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
    """What the CUDA rule would choose on a device with ``limits`` (no GPU needed: the compiled
    rule, :func:`decide_cuda_path`, without the occupancy API's final word), in
    :func:`explain`'s form."""
    sizes = _sizes_of(module_or_sizes)
    data, batch_sizes = _time_major(input, sizes["batch_first"])
    q = _query(sizes, data, batch_sizes)
    forward = parse_choice(decide_cuda_path(**q, backward=False, limits=limits, mode=mode))
    backward = parse_choice(decide_cuda_path(**q, backward=True, limits=limits, mode=mode))
    name = device or ("assumed H100/H200" if limits == H100_SXM else
                      f"assumed device with {limits.sm_count} SMs")
    return _result(name, forward, backward)
