"""The framework floor: a module with FusedLSTM's call structure (one Python
``torch.autograd.Function`` taking x, h0, c0 and the flat weights) that does no arithmetic. It is
timed next to the LSTMs; ``nn.LSTM / floor`` is the largest speedup any implementation called
through PyTorch's autograd this way can show."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .workloads import Case


FLOOR = "floor (empty op)"


class EmptyLSTMFunction(torch.autograd.Function):
    """FusedLSTM's op call without the arithmetic: ``(x, h0, c0, *weights) -> (output, h_n,
    c_n)``, outputs and gradients allocated (``torch.empty``) in the right shapes and never
    written. Unidirectional, no projection: output ``[T, B, h0.size(-1)]``.

    It saves its inputs for backward, as any LSTM must (the gradients need x, the states and
    the weights)."""

    @staticmethod
    def forward(ctx, x, h0, c0, *weights):
        ctx.save_for_backward(x, h0, c0, *weights)
        output = x.new_empty((*x.shape[:-1], h0.size(-1)))
        return output, torch.empty_like(h0), torch.empty_like(c0)

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n):
        return tuple(torch.empty_like(t) if needed else None
                     for t, needed in zip(ctx.saved_tensors, ctx.needs_input_grad))


class FloorLSTM(nn.Module):
    """The framework floor: nn.LSTM's call, ``module(x, (h0, c0)) -> (output, (h_n, c_n))``,
    through :class:`EmptyLSTMFunction` on copies of ``lstm``'s parameters (the same names, so
    the same number of AccumulateGrad leaves), with the argument handling of a minimal module.
    Its results are garbage: it is timed, never checked."""

    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        for name, param in lstm.named_parameters():
            self.register_parameter(name, nn.Parameter(param.detach().clone()))
        self.weight_names = list(lstm._flat_weights_names)

    def forward(self, x, hx):
        """nn.LSTM's call: ``x [T, B, I]``, ``hx = (h0, c0)`` each ``[layers, B, H]``. Without
        grad, only the three outputs' allocation: an implementation need not go through an
        autograd Function there (FusedLSTM's does not), so Function.apply is no floor for it."""
        h0, c0 = hx
        packing = None
        if isinstance(x, PackedSequence):  # the op takes the packed data, as FusedLSTM's does
            x, packing = x.data, x[1:]
        if not torch.is_grad_enabled():
            output, h_n, c_n = (x.new_empty((*x.shape[:-1], h0.size(-1))),
                                torch.empty_like(h0), torch.empty_like(c0))
        else:
            params = self._parameters
            output, h_n, c_n = EmptyLSTMFunction.apply(x, h0, c0,
                                                       *[params[n] for n in self.weight_names])
        return (output if packing is None else PackedSequence(output, *packing)), (h_n, c_n)


def floor_case(case: Case) -> Case:
    """The case with x, h0 and c0 copied into leaves of their own (requiring grad as well):
    the floor's gradients are garbage, and go to these leaves, not to the shared ones."""
    def leaf(t):
        return t.detach().clone().requires_grad_(t.requires_grad)

    return Case(case.lstm, leaf(case.x), leaf(case.h0), leaf(case.c0), case.upstream,
                case.packing, case.lengths)
