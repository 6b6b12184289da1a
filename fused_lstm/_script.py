"""TorchScript support: ``torch.jit.script`` of a model holding a FusedLSTM.

TorchScript cannot compile ``FusedLSTM.forward`` (try blocks, the C++ entry, Python-only
checks). ``FusedLSTM.__prepare_scriptable__`` hands ``torch.jit.script`` a ``ScriptableFusedLSTM``
instead: the same module (it shares the Parameters, buffers, hooks and every other attribute,
as ``convert`` does) whose class has a forward TorchScript compiles. Compiled, that forward is
nn.LSTM's own forward (the same argument checks and messages, the same state handling for
padded, unbatched and packed input) with nn.LSTM's ``_VF.lstm`` call replaced by one
``fused_lstm::lstm`` call, so the scripted model runs the fused kernels, trains the same
Parameters, and needs the fused_lstm library loaded wherever it runs (``import fused_lstm``, or
``torch.ops.load_library`` of its library). In eager Python it is a FusedLSTM: torch.jit.script
puts what ``__prepare_scriptable__`` returns into the model it scripts, so the model keeps
running FusedLSTM's forward afterwards.
"""

from typing import List, Optional, Tuple, overload

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from .module import FusedLSTM, _retyped


class ScriptableFusedLSTM(FusedLSTM):
    """A FusedLSTM whose forward TorchScript compiles (see the module docstring)."""

    def __prepare_scriptable__(self):
        return self

    @overload  # type: ignore[override]
    @torch._jit_internal._overload_method
    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
                ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:  # noqa: A002
        pass

    @overload
    @torch._jit_internal._overload_method
    def forward(self, input: PackedSequence, hx: Optional[Tuple[Tensor, Tensor]] = None  # noqa: F811
                ) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:  # noqa: A002
        pass

    def forward(self, input, hx=None):  # noqa: A002, F811
        if torch.jit.is_scripting():
            return self._scripted_forward(input, hx)
        else:
            return FusedLSTM.forward(self, input, hx)

    def _script_dropout_mask(self, x: Tensor) -> Optional[Tensor]:
        """FusedLSTM._dropout_mask, in TorchScript."""
        p = self.dropout
        if not (p > 0 and self.training and self.num_layers > 1):
            return None
        layer_out = (2 if self.bidirectional else 1) * (
            self.proj_size if self.proj_size > 0 else self.hidden_size)
        shape: List[int] = [self.num_layers - 1] + x.shape[:-1] + [layer_out]
        if p >= 1:
            return torch.zeros(shape, dtype=x.dtype, device=x.device)
        return torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - p).div_(1 - p)

    @overload
    @torch._jit_internal._overload_method
    def _scripted_forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
                          ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:  # noqa: A002
        pass

    @overload
    @torch._jit_internal._overload_method
    def _scripted_forward(self, input: PackedSequence,  # noqa: F811
                          hx: Optional[Tuple[Tensor, Tensor]] = None
                          ) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:  # noqa: A002
        pass

    def _scripted_forward(self, input, hx=None):  # noqa: A002, F811
        # nn.LSTM.forward (torch 2.13), with its _VF.lstm calls replaced by fused_lstm::lstm.
        self._update_flat_weights()

        orig_input = input
        batch_sizes = None
        num_directions = 2 if self.bidirectional else 1
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = batch_sizes[0]
            if hx is None:
                h_zeros = torch.zeros(self.num_layers * num_directions, max_batch_size,
                                      real_hidden_size, dtype=input.dtype, device=input.device)
                c_zeros = torch.zeros(self.num_layers * num_directions, max_batch_size,
                                      self.hidden_size, dtype=input.dtype, device=input.device)
                hx = (h_zeros, c_zeros)
            else:
                hx = self.permute_hidden(hx, sorted_indices)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead"
                )
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
            sorted_indices = None
            unsorted_indices = None
            if hx is None:
                h_zeros = torch.zeros(self.num_layers * num_directions, max_batch_size,
                                      real_hidden_size, dtype=input.dtype, device=input.device)
                c_zeros = torch.zeros(self.num_layers * num_directions, max_batch_size,
                                      self.hidden_size, dtype=input.dtype, device=input.device)
                hx = (h_zeros, c_zeros)
                self.check_forward_args(input, hx, batch_sizes)
            else:
                if is_batched:
                    if hx[0].dim() != 3 or hx[1].dim() != 3:
                        msg = (
                            "For batched 3-D input, hx and cx should "
                            f"also be 3-D but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                        )
                        raise RuntimeError(msg)
                else:
                    if hx[0].dim() != 2 or hx[1].dim() != 2:
                        msg = (
                            "For unbatched 2-D input, hx and cx should "
                            f"also be 2-D but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                        )
                        raise RuntimeError(msg)
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
                self.check_forward_args(input, hx, batch_sizes)
                hx = self.permute_hidden(hx, sorted_indices)

        if batch_sizes is None:
            x = input.transpose(0, 1) if self.batch_first else input
            output, h_n, c_n = torch.ops.fused_lstm.lstm(
                x, None, hx[0], hx[1], self._flat_weights, self._script_dropout_mask(x),
                self.num_layers, self.bidirectional, self.bias, self.proj_size)
            if self.batch_first:
                output = output.transpose(0, 1)
        else:
            output, h_n, c_n = torch.ops.fused_lstm.lstm(
                input, batch_sizes, hx[0], hx[1], self._flat_weights,
                self._script_dropout_mask(input), self.num_layers, self.bidirectional,
                self.bias, self.proj_size)
        hidden = (h_n, c_n)
        if isinstance(orig_input, PackedSequence):
            output_packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return output_packed, self.permute_hidden(hidden, unsorted_indices)
        else:
            if not is_batched:
                output = output.squeeze(batch_dim)
                hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1))
            return output, self.permute_hidden(hidden, unsorted_indices)


def scriptable(module: FusedLSTM) -> ScriptableFusedLSTM:
    """The module as a ScriptableFusedLSTM sharing everything with it."""
    return _retyped(module, ScriptableFusedLSTM)
