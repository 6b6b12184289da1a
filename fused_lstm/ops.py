"""The fused_lstm ops: fake kernels, autograd, and typed Python wrappers.

The ops are declared in ``csrc/lstm.cpp`` (``TORCH_LIBRARY(fused_lstm, m)``) and implemented
per backend in ``csrc/cpu`` and ``csrc/cuda``. This module loads the compiled library, then
registers what PyTorch needs in Python:

* ``register_fake`` for both ops, so ``torch.compile`` and ``torch.export`` can trace them;
* the implementation of ``lstm_backward_composite``: the gradients computed by differentiating
  the plain-PyTorch reference (``reference.py``), which the C++ autograd kernel
  (``csrc/autograd.cpp``) calls when a graph of the backward is requested
  (``create_graph=True``, double backward): slower, but exact and itself differentiable.

Autograd itself is registered in C++ (``csrc/autograd.cpp``), not with
``torch.library.register_autograd``: at tutorial sizes the wrapper is the cost, and the C++
kernel's fixed cost is about half of ``register_autograd``'s (``benchmarks/NOTES.md``). Its
backward is ONE call of ``lstm_backward`` for the whole stack.

Argument conventions (shared with the C++ schema):

* ``input``: time-major ``[T, B, I]``, or packed data ``[rows, I]`` with ``batch_sizes``
  (CPU int64 ``[T]``, non-increasing) as in ``PackedSequence``;
* ``hx`` ``[L*D, B, out_size]`` and ``cx`` ``[L*D, B, hidden]``, or None for zeros;
* ``weights``: nn.LSTM's ``_flat_weights`` order;
* ``dropout_mask``: ``[L-1, *input.shape[:-1], D*out_size]`` already scaled by ``1/(1-p)``,
  applied to each layer's output before it feeds the next layer; None for no dropout.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ._loader import load_library

load_library()

_ops = torch.ops.fused_lstm
_lstm_forward = _ops.lstm_forward.default
_lstm_inference = _ops.lstm_inference.default


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute and save in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reserve_numel(rows, num_layers, num_directions, hidden_size, proj_size):
    """Elements of the reserve buffer; must match ``LSTMShape::reserve_numel`` in csrc/lstm.h."""
    out_size = proj_size if proj_size > 0 else hidden_size
    per_direction = rows * (5 * hidden_size + (hidden_size if proj_size > 0 else 0))
    return num_layers * (rows * num_directions * out_size + num_directions * per_direction)


@torch.library.register_fake("fused_lstm::lstm_forward")
def _lstm_forward_fake(
    input, batch_sizes, hx, cx, weights, dropout_mask, num_layers, bidirectional, has_biases,
    proj_size,
):
    hidden_size = weights[0].shape[0] // 4
    num_directions = 2 if bidirectional else 1
    out_size = proj_size if proj_size > 0 else hidden_size
    if batch_sizes is None:
        batch = input.shape[1]
        rows = input.shape[0] * input.shape[1]
    else:
        rows = input.shape[0]
        if hx is not None:
            batch = hx.shape[1]
        elif cx is not None:
            batch = cx.shape[1]
        else:  # batch_sizes[0]: a value only known at run time
            batch = torch.library.get_ctx().new_dynamic_size()
    output = input.new_empty((*input.shape[:-1], num_directions * out_size))
    hy = input.new_empty((num_layers * num_directions, batch, out_size))
    cy = input.new_empty((num_layers * num_directions, batch, hidden_size))
    reserve = input.new_empty(
        (reserve_numel(rows, num_layers, num_directions, hidden_size, proj_size),),
        dtype=math_dtype(input.dtype),
    )
    return output, hy, cy, reserve


@torch.library.register_fake("fused_lstm::lstm_inference")
def _lstm_inference_fake(
    input, batch_sizes, hx, cx, weights, dropout_mask, num_layers, bidirectional, has_biases,
    proj_size,
):
    output, hy, cy, _ = _lstm_forward_fake(
        input, batch_sizes, hx, cx, weights, dropout_mask, num_layers, bidirectional, has_biases,
        proj_size,
    )
    return output, hy, cy


@torch.library.register_fake("fused_lstm::lstm_backward")
def _lstm_backward_fake(
    input, batch_sizes, hx, cx, weights, dropout_mask, reserve, grad_output, grad_hy, grad_cy,
    num_layers, bidirectional, has_biases, proj_size,
):
    hidden_size = weights[0].shape[0] // 4
    num_directions = 2 if bidirectional else 1
    out_size = proj_size if proj_size > 0 else hidden_size
    if batch_sizes is None:
        batch = input.shape[1]
    elif hx is not None:
        batch = hx.shape[1]
    elif cx is not None:
        batch = cx.shape[1]
    else:
        batch = torch.library.get_ctx().new_dynamic_size()
    layers_dirs = num_layers * num_directions
    # Contiguous, as the kernels allocate them (at::empty(sizes)): empty_like would copy the
    # strides of a non-contiguous input (batch_first input reaches the op transposed), and
    # compiled code checks the real strides against these.
    return (
        input.new_empty(input.shape),
        input.new_empty((layers_dirs, batch, out_size)),
        input.new_empty((layers_dirs, batch, hidden_size)),
        [w.new_empty(w.shape) for w in weights],
    )


@torch.library.impl("fused_lstm::lstm_backward_composite", "CompositeImplicitAutograd")
def _lstm_backward_composite(
    input, batch_sizes, hx, cx, weights, dropout_mask, grad_output, grad_hy, grad_cy,
    num_layers, bidirectional, has_biases, proj_size,
):
    """lstm_backward's gradients, differentiable again: the forward is recomputed through the
    reference from the saved tensors themselves, so the gradient's graph reaches them (and the
    upstream gradients). Called by the C++ autograd kernel when backward runs with
    create_graph=True; tensors that do not require grad get zero gradients."""
    from . import reference

    outputs = reference.lstm_forward(
        input, batch_sizes, hx, cx, weights, dropout_mask, num_layers, bidirectional, has_biases,
        proj_size,
    )
    if hx is None:
        hx = outputs[1].new_zeros(outputs[1].shape)
    if cx is None:
        cx = outputs[2].new_zeros(outputs[2].shape)
    wrt = [input, hx, cx, *weights]
    pairs = [(o, g) for o, g in zip(outputs, (grad_output, grad_hy, grad_cy)) if g is not None]
    differentiable = [t.requires_grad for t in wrt]
    targets = [t for t, d in zip(wrt, differentiable) if d]
    grads = iter(torch.autograd.grad(
        [o for o, _ in pairs], targets, [g for _, g in pairs], create_graph=True,
        allow_unused=True, materialize_grads=True,
    ) if pairs and targets else ())
    full = [next(grads) if d else torch.zeros_like(t) for t, d in zip(wrt, differentiable)]
    return full[0], full[1], full[2], full[3:]


def lstm(
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
) -> tuple[Tensor, Tensor, Tensor]:
    """The stacked LSTM in one op call; returns ``(output, h_n, c_n)`` (see module docstring).

    When no gradient can flow (grad mode off, or no argument requires grad), the call goes to
    ``lstm_inference``, which stores nothing for backward."""
    if torch.is_grad_enabled() and (
        input.requires_grad
        or any(w.requires_grad for w in weights)
        or (hx is not None and hx.requires_grad)
        or (cx is not None and cx.requires_grad)
    ):
        output, hy, cy, _reserve = _lstm_forward(
            input, batch_sizes, hx, cx, list(weights), dropout_mask, num_layers, bidirectional,
            has_biases, proj_size,
        )
        return output, hy, cy
    return _lstm_inference(
        input, batch_sizes, hx, cx, list(weights), dropout_mask, num_layers, bidirectional,
        has_biases, proj_size,
    )
