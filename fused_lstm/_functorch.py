"""FusedLSTM under torch.func transforms, vmap, batched gradients, forward AD and ExpandedWeights.

The op's autograd is a C++ ``torch::autograd::Function`` (csrc/autograd.cpp): the fast path for
plain eager calls, but functorch refuses C++ Functions ("cannot use C++ torch::autograd::Function
with functorch transforms"). So, while a functorch transform is active (the C++ entry,
csrc/python_entry.cpp, returns None then, and FusedLSTM's Python path asks :func:`active`), the
one op call goes through :class:`LSTMFunction`, a Python ``torch.autograd.Function`` with
``setup_context`` (functorch supports those) whose forward calls ``fused_lstm::lstm_forward`` and
whose backward calls ``fused_lstm::lstm_backward`` (or ``lstm_backward_composite`` when the
gradient must itself be differentiable), the same ops the C++ kernel calls.

vmap: batching rules for ``lstm_forward``, ``lstm_inference`` and ``lstm_backward``
(``torch.library.register_vmap``, which takes ops defined in C++: it registers a Python kernel
for the FuncTorchBatched key), and ``generate_vmap_rule = True`` on the Function, so that its
forward and backward are vmapped through those rules. The scheme:

* ``lstm_forward`` and ``lstm_backward``: one fused call per vmap element, results stacked. The
  reserve ``lstm_forward`` returns is then per element (``[N, reserve_numel]``), which is what
  the per-element backward needs. Folding the vmap dimension into the LSTM batch would make the
  forward one call, but the fused backward sums weight gradients over the batch, and per-sample
  gradients (``vmap(grad(loss))`` with weights shared) need them per element: the backward has to
  run per element, on a per-element reserve, so the forward does too.
* ``lstm_inference`` (no reserve, no backward): when the weights are not batched and the input
  is padded, the vmap dimension is folded into the LSTM batch dimension, one fused call;
  otherwise one call per element.

These rules also serve the regular autograd graph's backward under vmap
(``autograd.grad(..., is_grads_batched=True)``, ``jacobian(vectorize=True)``,
``gradcheck(check_batched_grad=True)``): the C++ kernel's backward calls ``lstm_backward`` with
batched gradients. That vmap is torch's legacy one (``torch._vmap_internals``, the Batched key),
whose rule for ``lstm_backward`` is in C++ (csrc/legacy_vmap.cpp). With create_graph=True
(``hessian(vectorize=True)``) the C++ kernel's differentiable backward records plain PyTorch ops,
which that vmap then differentiates op by op. ``lstm_backward_composite`` has a per-element rule
here for functorch's vmap.

Handed to nn.LSTM's implementation (quietly, results are nn.LSTM's; :func:`hands_to_nn_lstm`):

* forward-mode AD (``torch.func.jvp``/``jacfwd``, ``torch.autograd.forward_ad`` dual tensors):
  the fused op has no forward derivative;
* ExpandedWeights (``torch.nn.utils._per_sample_grad.call_for_per_sample_grads``, Opacus):
  nn.LSTM has its own ExpandedWeights rule.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.nn.utils._expanded_weights import ExpandedWeight

from . import ops

__all__ = ["LSTMFunction", "active", "hands_to_nn_lstm", "lstm"]

_ops = torch.ops.fused_lstm
_forward_op = _ops.lstm_forward.default
_inference_op = _ops.lstm_inference.default
_backward_op = _ops.lstm_backward.default
_composite_op = _ops.lstm_backward_composite.default

_peek_interpreter = torch._C._functorch.peek_interpreter_stack
_interpreter_stack = torch._C._functorch.get_interpreter_stack
_TransformType = torch._C._functorch.TransformType
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_unwrapped = torch._C._functorch.get_unwrapped


def active() -> bool:
    """Whether a functorch transform (grad, vjp, jacrev, jvp, vmap...) is active."""
    return _peek_interpreter() is not None


def _has_tangent(tensors) -> bool:
    for t in tensors:
        if isinstance(t, Tensor) and forward_ad.unpack_dual(t).tangent is not None:
            return True
    return False


def hands_to_nn_lstm(input, hx, weights) -> bool:  # noqa: A002
    """Whether FusedLSTM hands this call to nn.LSTM's implementation (quietly): forward-mode AD
    (a functorch jvp transform, or dual tensors of torch.autograd.forward_ad) or ExpandedWeights
    (see the top of this file)."""
    if isinstance(weights[0], ExpandedWeight):
        return True
    stack = _interpreter_stack()
    if stack and any(i.key() == _TransformType.Jvp for i in stack):
        return True
    if forward_ad._current_level >= 0:  # a dual level is open: are any tangents attached?
        states = hx if isinstance(hx, (tuple, list)) else (hx,)
        data = input.data if isinstance(input, torch.nn.utils.rnn.PackedSequence) else input
        return _has_tangent((data, *states, *weights))
    return False


def _bottom(t: Optional[Tensor]) -> Optional[Tensor]:
    """The plain tensor under every functorch wrapper."""
    while t is not None and _is_wrapped(t):
        t = _unwrapped(t)
    return t


def _differentiable_backward(tensors) -> bool:
    """Whether the backward must itself be differentiable, as the C++ kernel's
    ``GradMode::is_enabled()`` (create_graph=True) says without functorch.

    Under functorch, the backward of a transform level runs with grad mode on (torch.func.grad
    differentiates with create_graph=True) even when nothing will differentiate the result, so
    grad mode alone would always choose the slow composite. The result needs a graph when a
    differentiating transform lies below the level running this backward (jacrev(jacrev(f)),
    jacfwd(jacrev(f)), grad(grad(f))), or when plain autograd below every transform records
    (grad mode was on when the bottom transform was entered and a plain tensor requires grad).
    """
    stack = _interpreter_stack()
    if not stack:
        return torch.is_grad_enabled()
    # The level running this backward is the topmost grad level (above it, at most the vmap
    # of jacrev or of vmap(grad)).
    keys = [i.key() for i in stack]
    running = max((k for k, key in enumerate(keys) if key == _TransformType.Grad), default=0)
    if any(key in (_TransformType.Grad, _TransformType.Jvp) for key in keys[:running]):
        return True
    bottom = stack[0]
    if bottom.key() == _TransformType.Grad:
        grad_mode = torch._C._functorch.CGradInterpreterPtr(bottom).prevGradMode()
    else:  # vmap or functionalize at the bottom: plain autograd's grad mode is the current one
        grad_mode = torch.is_grad_enabled()
    if not grad_mode:
        return False
    return any(t is not None and _bottom(t).requires_grad for t in tensors)


def _differentiable_gradients(input, batch_sizes, hx, cx, weights, mask, grad_output,  # noqa: A002
                              grad_hy, grad_cy, num_layers, bidirectional, has_biases,
                              proj_size):
    """``lstm_backward_composite``'s gradients, differentiable again, as functorch computes
    them: ``torch.func.vjp`` of the plain-PyTorch reference. (The composite op itself asks
    ``requires_grad`` and calls ``torch.autograd.grad``, which see only plain autograd, not
    the functorch level differentiating the result.)"""
    from . import reference

    primals = [t for t in (input, hx, cx, *weights) if t is not None]

    def forward(*primals):
        it = iter(primals)
        values = [None if t is None else next(it) for t in (input, hx, cx)]
        return reference.lstm_forward(values[0], batch_sizes, values[1], values[2], list(it),
                                      mask, num_layers, bidirectional, has_biases, proj_size)

    outputs, vjp_fn = torch.func.vjp(forward, *primals)
    cotangents = tuple(torch.zeros_like(o) if g is None else g
                       for o, g in zip(outputs, (grad_output, grad_hy, grad_cy)))
    grads = iter(vjp_fn(cotangents))
    grad_input, grad_hx, grad_cx = (None if t is None else next(grads) for t in (input, hx, cx))
    return grad_input, grad_hx, grad_cx, list(grads)


class LSTMFunction(torch.autograd.Function):
    """``fused_lstm::lstm_forward`` with its backward, for functorch transforms (see the top).

    ``apply(input, batch_sizes, hx, cx, dropout_mask, num_layers, bidirectional, has_biases,
    proj_size, *weights)`` (the weights last, each one an argument, so autograd sees them);
    returns ``(output, h_n, c_n, reserve)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, batch_sizes, hx, cx, dropout_mask, num_layers, bidirectional,  # noqa: A002
                has_biases, proj_size, *weights):
        return _forward_op(input, batch_sizes, hx, cx, list(weights), dropout_mask, num_layers,
                           bidirectional, has_biases, proj_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, batch_sizes, hx, cx, mask, num_layers, bidirectional, has_biases, proj_size = (
            inputs[:9])
        weights = inputs[9:]
        reserve = output[3]
        ctx.mark_non_differentiable(reserve)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(input, batch_sizes, hx, cx, mask, reserve, *weights)
        ctx.config = (num_layers, bidirectional, has_biases, proj_size)

    @staticmethod
    def backward(ctx, grad_output, grad_hy, grad_cy, _grad_reserve):
        input, batch_sizes, hx, cx, mask, reserve, *weights = ctx.saved_tensors  # noqa: A001
        num_layers, bidirectional, has_biases, proj_size = ctx.config
        none = (None,) * (9 + len(weights))
        if grad_output is None and grad_hy is None and grad_cy is None:
            return none
        tensors = (input, hx, cx, *weights, grad_output, grad_hy, grad_cy)
        if _differentiable_backward(tensors):
            grad_input, grad_hx, grad_cx, grad_weights = _differentiable_gradients(
                input, batch_sizes, hx, cx, weights, mask, grad_output, grad_hy, grad_cy,
                num_layers, bidirectional, has_biases, proj_size)
        else:  # (no dL/dx of layer 0 where the input needs no gradient: input_grad)
            grad_input, grad_hx, grad_cx, grad_weights = _backward_op(
                input, batch_sizes, hx, cx, weights, mask, reserve, grad_output, grad_hy,
                grad_cy, num_layers, bidirectional, has_biases, proj_size,
                ctx.needs_input_grad[0])
        if not ctx.needs_input_grad[0]:
            grad_input = None
        return (grad_input, None, grad_hx if hx is not None else None,
                grad_cx if cx is not None else None, None, None, None, None, None,
                *grad_weights)


def _needs_grad(a: ops.LSTMArgs) -> bool:
    """csrc/lstm.cpp's needs_grad, asked here of functorch's wrapped tensors: below the
    transform's level (where the C++ kernel would ask it) their requires_grad is not the one
    the transform sees, so the choice is made before LSTMFunction.apply."""
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in (a.input, a.hx, a.cx, *a.weights))


def lstm(*args) -> tuple:
    """``fused_lstm.ops.lstm`` under functorch transforms: :class:`LSTMFunction` when a gradient
    can flow, else ``lstm_inference`` (as the C++ ``lstm`` kernel decides)."""
    a = ops.LSTMArgs(*args)
    if _needs_grad(a):
        output, h_n, c_n, _ = LSTMFunction.apply(
            a.input, a.batch_sizes, a.hx, a.cx, a.dropout_mask, a.num_layers, a.bidirectional,
            a.has_biases, a.proj_size, *a.weights)
        return output, h_n, c_n
    return _inference_op(a.input, a.batch_sizes, a.hx, a.cx, list(a.weights), a.dropout_mask,
                         a.num_layers, a.bidirectional, a.has_biases, a.proj_size)


# ---------------------------------------------------------------------------------------------
# Batching rules


def _select(t: Optional[Tensor], dim: Optional[int], index: int) -> Optional[Tensor]:
    return t if dim is None else t.select(dim, index)


def _per_element(info, in_dims, op, args):
    """``op`` once per vmap element on the element's slices; every output stacked on dim 0.
    ``args``: the op's arguments in schema order, the weights a list (``in_dims`` alike)."""
    results = []
    for n in range(info.batch_size):
        call = []
        for value, dim in zip(args, in_dims):
            if isinstance(value, (list, tuple)):
                dims = dim if isinstance(dim, (list, tuple)) else [dim] * len(value)
                call.append([_select(v, d, n) for v, d in zip(value, dims)])
            elif isinstance(value, Tensor):
                call.append(_select(value, dim, n))
            else:
                call.append(value)
        results.append(op(*call))
    stacked = []
    out_dims = []
    for outputs in zip(*results):
        if isinstance(outputs[0], (list, tuple)):
            stacked.append([torch.stack(ts) for ts in zip(*outputs)])
            out_dims.append([0] * len(outputs[0]))
        else:
            stacked.append(torch.stack(outputs))
            out_dims.append(0)
    return tuple(stacked), tuple(out_dims)


def _weights_batched(weight_dims) -> bool:
    dims = weight_dims if isinstance(weight_dims, (list, tuple)) else [weight_dims]
    return any(d is not None for d in dims)


@torch.library.register_vmap("fused_lstm::lstm_forward")
def _lstm_forward_vmap(info, in_dims, *args):
    return _per_element(info, in_dims, _forward_op, args)


@torch.library.register_vmap("fused_lstm::lstm_backward")
def _lstm_backward_vmap(info, in_dims, *args):
    return _per_element(info, in_dims, _backward_op, args)


# The differentiable backward (plain PyTorch, implemented in Python) gets no decomposition
# under vmap by itself: one call per element too.
@torch.library.register_vmap("fused_lstm::lstm_backward_composite")
def _lstm_backward_composite_vmap(info, in_dims, *args):
    return _per_element(info, in_dims, _composite_op, args)


def _fold(t: Tensor, dim: Optional[int], batch_dim: int, size: int) -> Tensor:
    """``t`` (vmapped at ``dim``, or shared when None) as one tensor whose ``batch_dim`` holds
    the vmap elements one after the other: [..., N * B, ...]."""
    if dim is None:
        t = t.unsqueeze(batch_dim).expand(*t.shape[:batch_dim], size, *t.shape[batch_dim:])
    else:
        t = t.movedim(dim, batch_dim)
    return t.reshape(*t.shape[:batch_dim], -1, *t.shape[batch_dim + 2:])


def _unfold(t: Tensor, batch_dim: int, size: int) -> Tensor:
    """The inverse of :func:`_fold`, the vmap dimension first."""
    t = t.reshape(*t.shape[:batch_dim], size, -1, *t.shape[batch_dim + 1:])
    return t.movedim(batch_dim, 0)


@torch.library.register_vmap("fused_lstm::lstm_inference")
def _lstm_inference_vmap(info, in_dims, *args):
    a = ops.LSTMArgs(*args)
    dims = ops.LSTMArgs(*in_dims)
    if a.batch_sizes is not None or _weights_batched(dims.weights):
        return _per_element(info, in_dims, _inference_op, args)
    # Shared weights, padded input: the vmap elements side by side in the LSTM batch.
    size = info.batch_size
    x = _fold(a.input, dims.input, 1, size)
    hx = None if a.hx is None else _fold(a.hx, dims.hx, 1, size)
    cx = None if a.cx is None else _fold(a.cx, dims.cx, 1, size)
    mask = None if a.dropout_mask is None else _fold(a.dropout_mask, dims.dropout_mask, 2, size)
    output, h_n, c_n = _inference_op(x, None, hx, cx, list(a.weights), mask, a.num_layers,
                                     a.bidirectional, a.has_biases, a.proj_size)
    return ((_unfold(output, 1, size), _unfold(h_n, 1, size), _unfold(c_n, 1, size)),
            (0, 0, 0))
