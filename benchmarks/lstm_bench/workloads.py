"""What is measured: the workloads (LSTM sizes), the dtypes and modes, one workload's weights
and inputs (:class:`Case`), and the GEMM FLOPs of one call."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence


MODES = ("train", "infer")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for torch.float32."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Workload:
    """An LSTM size to measure; ``streaming``: one time step per call, the state carried over
    from the previous call; ``packed``: variable-length sequences, the input a PackedSequence
    (:func:`sequence_lengths`: lengths in [seq_len / 2, seq_len]); ``quick_seq_len``: the
    sequence length under ``--quick`` where it differs (:meth:`quick`); ``input_grad``: whether
    training makes the input require grad (compare.py's ``--no-input-grad`` turns it off: the
    usual training call, whose batch of data needs no gradient)."""

    name: str
    input_size: int
    hidden_size: int
    num_layers: int
    seq_len: int
    batch: int
    streaming: bool = False
    packed: bool = False
    quick_seq_len: Optional[int] = None
    profile_memory: bool = True  # False: no peak memory (see WORKLOADS)
    gpu_only: bool = False
    dtype: torch.dtype = torch.float32  # unless --dtype says otherwise
    input_grad: bool = True

    def shape(self) -> str:
        """``name (input, hidden, layers, seq, batch)``."""
        seq = ("1 step/call" if self.streaming
               else f"packed {self.seq_len // 2}-{self.seq_len}" if self.packed else self.seq_len)
        return (f"{self.name} ({self.input_size}, {self.hidden_size}, {self.num_layers}, "
                f"{seq}, {self.batch})" + ("" if self.input_grad else " input without grad"))

    def quick(self) -> Workload:
        """The workload as ``--quick`` runs it: shorter sequences where ``quick_seq_len`` says
        so (the packed workloads, whose checks alone take tens of seconds at full length on 2
        cores: nn.LSTM's packed path in float32 and float64), the same otherwise."""
        return self if self.quick_seq_len is None else replace(
            self, seq_len=self.quick_seq_len, quick_seq_len=None)


WORKLOADS = (
    Workload("seed-tiny", 1, 3, 2, 4, 92),
    Workload("small", 5, 10, 2, 3, 10),
    Workload("stream-step", 64, 256, 2, 1, 1, streaming=True),
    Workload("medium", 128, 256, 2, 100, 32),
    Workload("fastrnns", 512, 512, 1, 100, 64),
    # Variable-length batches, packed (pack_padded_sequence(..., enforce_sorted=False));
    # --quick runs them 10 and 20 times shorter.
    Workload("packed-medium", 128, 256, 2, 200, 32, packed=True, quick_seq_len=20),
    # No peak memory for packed-long: torch.profiler's memory profiling of nn.LSTM's packed
    # backward over 1000 steps took over 10 GB on a 2-core box (and got the run OOM-killed).
    Workload("packed-long", 64, 128, 1, 1000, 16, packed=True, quick_seq_len=50,
             profile_memory=False),
    Workload("flashrnn", 768, 768, 1, 1024, 16, gpu_only=True, dtype=torch.bfloat16),
)


def sequence_lengths(workload: Workload) -> Optional[torch.Tensor]:
    """A packed workload's sequence lengths, drawn uniformly in [seq_len // 2, seq_len] with a
    generator seeded by the workload's name (the same lengths on every run and for every
    implementation); None for the others."""
    if not workload.packed:
        return None
    generator = torch.Generator().manual_seed(zlib.crc32(workload.name.encode()))
    return torch.randint(workload.seq_len // 2, workload.seq_len + 1, (workload.batch,),
                         generator=generator)


def rows_per_call(workload: Workload) -> int:
    """The (time step, sequence) pairs one call computes: seq_len * batch, or the sum of the
    lengths for a packed workload."""
    lengths = sequence_lengths(workload)
    return workload.seq_len * workload.batch if lengths is None else int(lengths.sum())


@dataclass
class Case:
    """nn.LSTM weights and inputs shared by every implementation. ``x``, ``h0`` and ``c0``
    require grad; ``upstream``: the gradients of (output, h_n, c_n), made once.

    Packed workloads: ``x`` is the packed data ``[sum(lengths), I]`` (a leaf, so that its
    gradient is the input's), ``packing`` the rest of the PackedSequence (batch_sizes,
    sorted_indices, unsorted_indices) and ``lengths`` the sequence lengths; ``inputs()`` is
    the PackedSequence every implementation is called with, and the output's upstream
    gradient is that of its data."""

    lstm: nn.LSTM
    x: torch.Tensor
    h0: torch.Tensor
    c0: torch.Tensor
    upstream: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    packing: Optional[tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]] = None
    lengths: Optional[torch.Tensor] = None

    def inputs(self, x: Optional[torch.Tensor] = None):
        """The LSTM's input: ``x`` (default: the case's), packed with the case's packing for
        a packed workload."""
        x = self.x if x is None else x
        return x if self.packing is None else PackedSequence(x, *self.packing)


def output_data(output) -> torch.Tensor:
    """The output's tensor: the data of a PackedSequence."""
    return output.data if isinstance(output, PackedSequence) else output


def make_case(workload: Workload, device: torch.device, dtype: torch.dtype) -> Case:
    """Random weights (nn.LSTM's initialisation) and random inputs, seeded by the workload."""
    torch.manual_seed(zlib.crc32(workload.name.encode()))
    w = workload
    lstm = nn.LSTM(w.input_size, w.hidden_size, w.num_layers, device=device, dtype=dtype)

    def randn(*shape, requires_grad=False):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=requires_grad)

    state_shape = (w.num_layers, w.batch, w.hidden_size)
    lengths = sequence_lengths(w)
    if lengths is None:
        x, packing = randn(w.seq_len, w.batch, w.input_size, requires_grad=w.input_grad), None
    else:
        packed = pack_padded_sequence(randn(w.seq_len, w.batch, w.input_size), lengths,
                                      enforce_sorted=False)
        x = packed.data.detach().requires_grad_(w.input_grad)
        packing = (packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
    output_shape = (w.seq_len, w.batch) if lengths is None else (x.size(0),)
    return Case(
        lstm=lstm,
        x=x,
        h0=randn(*state_shape, requires_grad=True),
        c0=randn(*state_shape, requires_grad=True),
        upstream=(randn(*output_shape, w.hidden_size), randn(*state_shape),
                  randn(*state_shape)),
        packing=packing,
        lengths=lengths,
    )


def lstm_gemm_flops(workload: Workload, mode: str, num_directions: int = 1,
                    proj_size: int = 0) -> float:
    """The GEMM FLOPs of one call (a multiply-add counts 2; the cell's elementwise math is not
    counted). Per layer l and direction, with rows = seq_len * batch, H the hidden size,
    out = proj_size or H and I_l the layer's input size (input_size for l = 0, then
    num_directions * out):

        forward = 2 * rows * 4H * (I_l + out)  [+ 2 * rows * H * proj_size with a projection]

    (the input projection and the T recurrent products; rows = the sum of the lengths for a
    packed workload). ``infer`` is the forward; ``train``
    is 3 x forward: the forward, the data gradients (dgates W_ih for dx, dgates W_hh for dh:
    as many FLOPs as the forward's products) and the weight gradients (dgates^T x and
    dgates^T h: as many again); without ``input_grad``, less layer 0's dL/dx = dgates W_ih,
    2 * rows * 4H * input_size per direction."""
    w = workload
    rows, hidden = rows_per_call(w), w.hidden_size
    out = proj_size or hidden
    forward = 0
    for layer in range(w.num_layers):
        layer_input = w.input_size if layer == 0 else num_directions * out
        per_direction = 2 * rows * 4 * hidden * (layer_input + out)
        if proj_size:
            per_direction += 2 * rows * hidden * proj_size
        forward += num_directions * per_direction
    if mode != "train":
        return float(forward)
    input_grad = 0 if w.input_grad else num_directions * 2 * rows * 4 * hidden * w.input_size
    return float(3 * forward - input_grad)


FLOPS_NOTE = ("GFLOP/s: the LSTM's GEMM FLOPs / the row's median. FLOPs per layer (l) and "
              "direction, rows = seq * batch (packed: the sum of the lengths): forward 2 * rows * 4H * (I_l + H) (input "
              "projection and recurrence; I_l = input size, then H); train = 3 x forward (the "
              "forward, the data gradients dgates W_ih and dgates W_hh, the weight gradients "
              "dgates^T x and dgates^T h; the input requiring no grad: less layer 0's "
              "dgates W_ih); infer = forward; elementwise cell math not counted")
