"""The fused_lstm ops: fake kernels, autograd, and typed Python wrappers.

The ops are declared in ``csrc/ops.cpp`` (``TORCH_LIBRARY(fused_lstm, m)``) and implemented
per backend in ``csrc/cpu`` and ``csrc/cuda``. This module loads the compiled library, then
registers what PyTorch needs in Python:

* ``register_fake`` for both ops, so ``torch.compile`` and ``torch.export`` can trace them;
* the implementation of ``lstm_backward_composite``: the gradients computed by differentiating
  the plain-PyTorch reference (``reference.py``), which the C++ autograd kernel
  (``csrc/autograd.cpp``) calls when a graph of the backward is requested
  (``create_graph=True``, double backward): slower, but exact and itself differentiable.

Autograd itself is registered in C++ (``csrc/autograd.cpp``), not with
``torch.library.register_autograd``: at tutorial sizes the wrapper is the cost, and the C++
kernel's fixed cost is about half of ``register_autograd``'s
(``benchmarks/notes/python-overhead.md``, "Autograd wiring: a C++ autograd kernel"). Its
backward is ONE call of ``lstm_backward`` for the whole stack.

Argument conventions (shared with the C++ schema; :class:`LSTMArgs` is the argument list of
``lstm_forward``, ``lstm_inference``, ``lstm`` and :func:`lstm`, in the schema's order):

* ``input``: time-major ``[T, B, I]``, or packed data ``[rows, I]`` with ``batch_sizes``
  (CPU int64 ``[T]``, non-increasing) as in ``PackedSequence``;
* ``hx`` ``[L*D, B, out_size]`` and ``cx`` ``[L*D, B, hidden]``, or None for zeros;
* ``weights``: nn.LSTM's ``_flat_weights`` order;
* ``dropout_mask``: ``[L-1, *input.shape[:-1], D*out_size]`` already scaled by ``1/(1-p)``,
  applied to each layer's output before it feeds the next layer; None for no dropout.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ._loader import load_library

load_library()

_ops = torch.ops.fused_lstm
_lstm = _ops.lstm.default
_reserve_numel = _ops.reserve_numel.default


class LSTMArgs(NamedTuple):
    """The arguments of ``lstm_forward``, ``lstm_inference`` and :func:`lstm`, in the schema's
    order (csrc/ops.cpp): the one place the Python side spells them out. ``op(*args)`` calls
    an op with them; the backward ops take them with their gradient arguments in between."""

    input: Tensor
    batch_sizes: Optional[Tensor]
    hx: Optional[Tensor]
    cx: Optional[Tensor]
    weights: Sequence[Tensor]
    dropout_mask: Optional[Tensor]
    num_layers: int
    bidirectional: bool
    has_biases: bool
    proj_size: int


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute and save in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reserve_numel(rows, num_layers, num_directions, hidden_size, proj_size, gates=True):
    """Elements of the reserve buffer, from the C++ formula (``reserve_numel_of`` in
    csrc/lstm.h, through the ``fused_lstm::reserve_numel`` op); ``rows`` and ``hidden_size``
    may be SymInts. ``gates``: whether the reserve keeps the gates (:func:`gates_in_reserve`)."""
    return _reserve_numel(rows, num_layers, num_directions, hidden_size, proj_size, gates)


def gates_in_reserve(input: Tensor, batch_sizes: Optional[Tensor], rows, hidden_size: int,  # noqa: A002
                     out_size: int, num_directions: int, num_layers: int) -> bool:
    """Whether lstm_forward's reserve keeps the gates: all but, on the CPU, packed bfloat16
    calls and float16 calls of more than 8 rows whose backward recomputes them
    (``gates_in_reserve`` in csrc/lstm.h): from a hidden size of 16, where the gates have at
    least twice as many rows (rows x layers x directions) as the widest layer input plus out;
    below it, where no layer input is wider than 32 and every layer and direction's gates
    (4H x rows) are at least the widest layer input plus out plus 3H for each row of a step
    (the batch, or every row where the batch is packed). ``rows`` may be a SymInt."""
    if input.device.type != "cpu":
        return True
    if batch_sizes is not None and input.dtype == torch.bfloat16:
        return False
    if input.dtype != torch.float16 or rows < 9:
        return True
    widest_input = max(input.shape[-1], num_directions * out_size if num_layers > 1 else 0)
    layers = num_layers * num_directions
    if hidden_size < 16:
        if widest_input > 32:
            return True
        step_rows = rows if batch_sizes is not None else input.shape[1]
        return 4 * hidden_size * rows * layers < (widest_input + out_size + 3 * hidden_size) * step_rows
    return rows * layers < 2 * (widest_input + out_size)


def _state_shapes(a: LSTMArgs):
    """``(hidden_size, out_size, hy's shape)`` of a call; cy's shape ends in hidden_size."""
    hidden_size = a.weights[0].shape[0] // 4
    out_size = a.proj_size if a.proj_size > 0 else hidden_size
    if a.batch_sizes is None:
        batch = a.input.shape[1]
    elif a.hx is not None:
        batch = a.hx.shape[1]
    elif a.cx is not None:
        batch = a.cx.shape[1]
    else:  # batch_sizes[0]: a value only known at run time
        batch = torch.library.get_ctx().new_dynamic_size()
    return hidden_size, out_size, (a.num_layers * (2 if a.bidirectional else 1), batch, out_size)


@torch.library.register_fake("fused_lstm::lstm_forward")
def _lstm_forward_fake(*args):
    a = LSTMArgs(*args)
    hidden_size, out_size, hy_shape = _state_shapes(a)
    num_directions = 2 if a.bidirectional else 1
    input = a.input  # noqa: A001
    rows = input.shape[0] if a.batch_sizes is not None else input.shape[0] * input.shape[1]
    output = input.new_empty((*input.shape[:-1], num_directions * out_size))
    hy = input.new_empty(hy_shape)
    cy = input.new_empty((*hy_shape[:2], hidden_size))
    reserve = input.new_empty(
        (reserve_numel(rows, a.num_layers, num_directions, hidden_size, a.proj_size,
                       gates_in_reserve(input, a.batch_sizes, rows, hidden_size, out_size,
                                        num_directions, a.num_layers)),),
        dtype=math_dtype(input.dtype),
    )
    return output, hy, cy, reserve


@torch.library.register_fake("fused_lstm::lstm_inference")
def _lstm_inference_fake(*args):
    return _lstm_forward_fake(*args)[:3]


@torch.library.register_fake("fused_lstm::lstm_backward")
def _lstm_backward_fake(*args):
    # (the forward's arguments, with reserve, grad_output, grad_hy, grad_cy after dropout_mask,
    # then input_grad: without it grad_input is an empty [0] tensor)
    a = LSTMArgs(*args[:6], *args[10:14])
    input_grad = args[14] if len(args) > 14 else True
    hidden_size, _, hy_shape = _state_shapes(a)
    # Contiguous, as the kernels allocate them (at::empty(sizes)): empty_like would copy the
    # strides of a non-contiguous input (batch_first input reaches the op transposed), and
    # compiled code checks the real strides against these.
    return (
        a.input.new_empty(a.input.shape if input_grad else (0,)),
        a.input.new_empty(hy_shape),
        a.input.new_empty((*hy_shape[:2], hidden_size)),
        [w.new_empty(w.shape) for w in a.weights],
    )


@torch.library.impl("fused_lstm::lstm_backward_composite", "CompositeImplicitAutograd")
def _lstm_backward_composite(*args):
    """lstm_backward's gradients, differentiable again: the forward is recomputed through the
    reference from the saved tensors themselves, so the gradient's graph reaches them (and the
    upstream gradients). Called by the C++ autograd kernel when backward runs with
    create_graph=True; tensors that do not require grad get zero gradients."""
    from . import reference

    # (the forward's arguments, with grad_output, grad_hy, grad_cy after dropout_mask)
    a = LSTMArgs(*args[:6], *args[9:])
    grad_output, grad_hy, grad_cy = args[6:9]
    outputs = reference.lstm_forward(*a)
    hx, cx = a.hx, a.cx
    if hx is None:
        hx = outputs[1].new_zeros(outputs[1].shape)
    if cx is None:
        cx = outputs[2].new_zeros(outputs[2].shape)
    wrt = [a.input, hx, cx, *a.weights]
    pairs = [(o, g) for o, g in zip(outputs, (grad_output, grad_hy, grad_cy)) if g is not None]
    differentiable = [t.requires_grad for t in wrt]
    targets = [t for t, d in zip(wrt, differentiable) if d]
    grads = iter(torch.autograd.grad(
        [o for o, _ in pairs], targets, [g for _, g in pairs], create_graph=True,
        allow_unused=True, materialize_grads=True,
    ) if pairs and targets else ())
    full = [next(grads) if d else torch.zeros_like(t) for t, d in zip(wrt, differentiable)]
    return full[0], full[1], full[2], full[3:]


def lstm(*args, **kwargs) -> tuple[Tensor, Tensor, Tensor]:
    """The stacked LSTM in one op call: ``lstm(input, batch_sizes, hx, cx, weights,
    dropout_mask, num_layers, bidirectional, has_biases, proj_size)`` (:class:`LSTMArgs`, see
    the module docstring); returns ``(output, h_n, c_n)``.

    Calls ``fused_lstm::lstm``, whose C++ kernel (csrc/lstm.cpp) decides: when a gradient can
    flow (grad mode on and an argument requiring grad), ``lstm_forward``, else
    ``lstm_inference``, which stores nothing for backward. FusedLSTM's C++ entry
    (csrc/python_entry.cpp) calls the same kernel, so the rule is written once."""
    a = LSTMArgs(*args, **kwargs)
    if type(a.weights) is not list:  # the ops take a list
        a = a._replace(weights=list(a.weights))
    return _lstm(*a)


lstm.__signature__ = inspect.signature(LSTMArgs)  # type: ignore[attr-defined]
