"""The fused LSTM op's math in plain PyTorch: the readable spec, the test oracle, and the path
for double backward (``create_graph=True``).

``lstm_forward`` takes exactly the arguments of ``fused_lstm::lstm_forward`` (see ``ops.py``) and
returns ``(output, h_n, c_n)``. It loops over layers, directions and time steps in Python, so it
is slow, but every operation is an ordinary differentiable PyTorch op without in-place updates:
it can be differentiated any number of times.

This module imports nothing but torch, so it works without the compiled library.

Semantics (those of ``torch.nn.LSTM``):

* gate order i, f, g, o: ``gates = x W_ih^T + b_ih + h W_hh^T + b_hh``;
  ``c' = sigmoid(f) * c + sigmoid(i) * tanh(g)``; ``h' = sigmoid(o) * tanh(c')``, then
  ``h' = h' W_hr^T`` when ``proj_size > 0``;
* packed input (``batch_sizes`` given): step ``t`` holds the first ``batch_sizes[t]`` sequences
  (rows ``offset[t] : offset[t] + batch_sizes[t]`` of the data). A sequence that has ended keeps
  its state, so ``h_n`` holds every sequence's state after its own last step. The reverse
  direction runs from the last step to the first; a sequence joins, starting from its h0/c0, at
  its own last step;
* each layer's output (all directions concatenated) is multiplied by ``dropout_mask[layer]``
  before it feeds the next layer; the last layer's output is not masked.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["lstm_forward", "lstm_cell"]


def lstm_cell(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    w_hr: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """One LSTM step for a batch of rows.

    x: [N, I], h: [N, out_size], c: [N, hidden]; returns (h', c') of the same shapes as h, c.
    """
    gates = x @ w_ih.t() + h @ w_hh.t()  # [N, 4*hidden]
    if b_ih is not None:
        gates = gates + b_ih + b_hh
    in_gate, forget_gate, cell_gate, out_gate = gates.chunk(4, dim=1)
    c_next = torch.sigmoid(forget_gate) * c + torch.sigmoid(in_gate) * torch.tanh(cell_gate)
    h_next = torch.sigmoid(out_gate) * torch.tanh(c_next)
    if w_hr is not None:
        h_next = h_next @ w_hr.t()
    return h_next, c_next


def _run_direction(
    steps: List[Tensor],
    order: Sequence[int],
    h0: Tensor,
    c0: Tensor,
    layer_weights: Sequence[Optional[Tensor]],
) -> Tuple[List[Optional[Tensor]], Tensor, Tensor]:
    """Runs one layer in one direction over the per-step inputs ``steps[t]`` ([batch_t, I]).

    ``order`` is the order of the time steps (forwards or backwards). The state tensors always
    hold the whole batch; step t updates its first ``batch_t`` rows and the rest keep their state,
    which is what both packed directions need because batch sizes never increase.
    Returns the per-step outputs (indexed by t), h_n and c_n.
    """
    h, c = h0, c0
    outputs: List[Optional[Tensor]] = [None] * len(steps)
    for t in order:
        x = steps[t]
        rows = x.shape[0]
        h_step, c_step = lstm_cell(x, h[:rows], c[:rows], *layer_weights)
        outputs[t] = h_step
        if rows == h.shape[0]:
            h, c = h_step, c_step
        else:
            h = torch.cat([h_step, h[rows:]], dim=0)
            c = torch.cat([c_step, c[rows:]], dim=0)
    return outputs, h, c


def lstm_forward(
    input: Tensor,
    batch_sizes: Optional[Tensor],
    hx: Optional[Tensor],
    cx: Optional[Tensor],
    weights: Sequence[Tensor],
    dropout_mask: Optional[Tensor],
    num_layers: int,
    bidirectional: bool,
    has_biases: bool,
    proj_size: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The stacked LSTM; same arguments and results as ``fused_lstm.ops.lstm``.

    input: [T, B, I] time-major, or packed data [rows, I] when batch_sizes ([T], int64) is given.
    hx: [L*D, B, out_size] or None (zeros); cx: [L*D, B, hidden] or None (zeros).
    weights: nn.LSTM's ``_flat_weights`` order: per layer, per direction
        w_ih, w_hh, [b_ih, b_hh if has_biases], [w_hr if proj_size > 0].
    dropout_mask: [L-1, *input.shape[:-1], D*out_size] or None.
    Returns output [*input.shape[:-1], D*out_size], h_n [L*D, B, out_size], c_n [L*D, B, hidden].
    """
    num_directions = 2 if bidirectional else 1
    weights_per_direction = 2 + (2 if has_biases else 0) + (1 if proj_size > 0 else 0)
    if len(weights) != num_layers * num_directions * weights_per_direction:
        raise ValueError(
            f"expected {num_layers * num_directions * weights_per_direction} weight tensors, "
            f"got {len(weights)}"
        )
    hidden_size = weights[0].shape[0] // 4
    out_size = proj_size if proj_size > 0 else hidden_size

    # Split the input into per-step tensors; offsets locate each step's rows in packed data.
    if batch_sizes is None:
        if input.dim() != 3:
            raise ValueError(f"input must be [T, B, I], got {input.dim()} dimensions")
        seq_len, batch = input.shape[0], input.shape[1]
        sizes = [batch] * seq_len
        steps = list(input.unbind(0))
    else:
        if input.dim() != 2:
            raise ValueError(f"packed input must be [rows, I], got {input.dim()} dimensions")
        sizes = [int(s) for s in batch_sizes.tolist()]
        seq_len = len(sizes)
        batch = sizes[0] if sizes else 0
        if sum(sizes) != input.shape[0]:
            raise ValueError(f"batch_sizes sum to {sum(sizes)}, packed input has {input.shape[0]} rows")
        steps = list(input.split(sizes, dim=0))
    if seq_len == 0:
        raise ValueError("input sequence length must be > 0")
    if any(sizes[t] < sizes[t + 1] for t in range(seq_len - 1)):
        raise ValueError(f"batch_sizes must be non-increasing, got {sizes}")

    layers_dirs = num_layers * num_directions
    if hx is None:
        hx = input.new_zeros((layers_dirs, batch, out_size))
    if cx is None:
        cx = input.new_zeros((layers_dirs, batch, hidden_size))

    forward_order = range(seq_len)
    reverse_order = range(seq_len - 1, -1, -1)
    h_n: List[Tensor] = []
    c_n: List[Tensor] = []
    for layer in range(num_layers):
        if layer > 0 and dropout_mask is not None:
            mask = dropout_mask[layer - 1]
            mask_steps = mask.unbind(0) if batch_sizes is None else mask.split(sizes, dim=0)
            steps = [x * m for x, m in zip(steps, mask_steps)]
        direction_outputs = []
        for direction in range(num_directions):
            index = layer * num_directions + direction
            first = index * weights_per_direction
            w = list(weights[first:first + weights_per_direction])
            w_ih, w_hh = w[0], w[1]
            b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
            w_hr = w[-1] if proj_size > 0 else None
            outputs, h_last, c_last = _run_direction(
                steps,
                forward_order if direction == 0 else reverse_order,
                hx[index],
                cx[index],
                (w_ih, w_hh, b_ih, b_hh, w_hr),
            )
            direction_outputs.append(outputs)
            h_n.append(h_last)
            c_n.append(c_last)
        if num_directions == 1:
            steps = direction_outputs[0]
        else:
            steps = [torch.cat(pair, dim=1) for pair in zip(*direction_outputs)]

    if batch_sizes is None:
        output = torch.stack(steps, dim=0)
    else:
        output = torch.cat(steps, dim=0)
    return output, torch.stack(h_n, dim=0), torch.stack(c_n, dim=0)
