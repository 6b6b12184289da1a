"""What is measured: the workloads (LSTM sizes), the dtypes and modes, one workload's weights
and inputs (:class:`Case`), and the GEMM FLOPs of one call."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn


MODES = ("train", "infer")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for torch.float32."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Workload:
    """An LSTM size to measure; ``streaming``: one time step per call, the state carried over
    from the previous call."""

    name: str
    input_size: int
    hidden_size: int
    num_layers: int
    seq_len: int
    batch: int
    streaming: bool = False
    gpu_only: bool = False
    dtype: torch.dtype = torch.float32  # unless --dtype says otherwise

    def shape(self) -> str:
        """``name (input, hidden, layers, seq, batch)``."""
        seq = "1 step/call" if self.streaming else self.seq_len
        return (f"{self.name} ({self.input_size}, {self.hidden_size}, {self.num_layers}, "
                f"{seq}, {self.batch})")


WORKLOADS = (
    Workload("seed-tiny", 1, 3, 2, 4, 92),
    Workload("small", 5, 10, 2, 3, 10),
    Workload("stream-step", 64, 256, 2, 1, 1, streaming=True),
    Workload("medium", 128, 256, 2, 100, 32),
    Workload("fastrnns", 512, 512, 1, 100, 64),
    Workload("flashrnn", 768, 768, 1, 1024, 16, gpu_only=True, dtype=torch.bfloat16),
)


@dataclass
class Case:
    """nn.LSTM weights and inputs shared by every implementation. ``x``, ``h0`` and ``c0``
    require grad; ``upstream``: the gradients of (output, h_n, c_n), made once."""

    lstm: nn.LSTM
    x: torch.Tensor
    h0: torch.Tensor
    c0: torch.Tensor
    upstream: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def make_case(workload: Workload, device: torch.device, dtype: torch.dtype) -> Case:
    """Random weights (nn.LSTM's initialisation) and random inputs, seeded by the workload."""
    torch.manual_seed(zlib.crc32(workload.name.encode()))
    w = workload
    lstm = nn.LSTM(w.input_size, w.hidden_size, w.num_layers, device=device, dtype=dtype)

    def randn(*shape, requires_grad=False):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=requires_grad)

    state_shape = (w.num_layers, w.batch, w.hidden_size)
    return Case(
        lstm=lstm,
        x=randn(w.seq_len, w.batch, w.input_size, requires_grad=True),
        h0=randn(*state_shape, requires_grad=True),
        c0=randn(*state_shape, requires_grad=True),
        upstream=(randn(w.seq_len, w.batch, w.hidden_size), randn(*state_shape),
                  randn(*state_shape)),
    )


def lstm_gemm_flops(workload: Workload, mode: str, num_directions: int = 1,
                    proj_size: int = 0) -> float:
    """The GEMM FLOPs of one call (a multiply-add counts 2; the cell's elementwise math is not
    counted). Per layer l and direction, with rows = seq_len * batch, H the hidden size,
    out = proj_size or H and I_l the layer's input size (input_size for l = 0, then
    num_directions * out):

        forward = 2 * rows * 4H * (I_l + out)  [+ 2 * rows * H * proj_size with a projection]

    (the input projection and the T recurrent products). ``infer`` is the forward; ``train``
    is 3 x forward: the forward, the data gradients (dgates W_ih for dx, dgates W_hh for dh:
    as many FLOPs as the forward's products) and the weight gradients (dgates^T x and
    dgates^T h: as many again)."""
    w = workload
    rows, hidden = w.seq_len * w.batch, w.hidden_size
    out = proj_size or hidden
    forward = 0
    for layer in range(w.num_layers):
        layer_input = w.input_size if layer == 0 else num_directions * out
        per_direction = 2 * rows * 4 * hidden * (layer_input + out)
        if proj_size:
            per_direction += 2 * rows * hidden * proj_size
        forward += num_directions * per_direction
    return float(3 * forward if mode == "train" else forward)


FLOPS_NOTE = ("GFLOP/s: the LSTM's GEMM FLOPs / the row's median. FLOPs per layer (l) and "
              "direction, rows = seq * batch: forward 2 * rows * 4H * (I_l + H) (input "
              "projection and recurrence; I_l = input size, then H); train = 3 x forward (the "
              "forward, the data gradients dgates W_ih and dgates W_hh, the weight gradients "
              "dgates^T x and dgates^T h); infer = forward; elementwise cell math not counted")
