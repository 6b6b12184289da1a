"""TorchScript support: ``torch.jit.script`` of a model holding a FusedLSTM.

TorchScript cannot compile ``FusedLSTM.forward`` (try blocks, the C++ entry, Python-only
checks). ``FusedLSTM.__prepare_scriptable__`` hands ``torch.jit.script`` a ``ScriptableFusedLSTM``
instead: the same module (it shares the Parameters, buffers, hooks and every other attribute,
as ``convert`` does) whose class has a forward TorchScript compiles. Compiled, that forward
follows ``FusedLSTM._forward``: the same layout handling, nn.LSTM's checks and messages (through
nn.LSTM's own check methods, which compiled leave the input's dtype to nn.LSTM's C++ code, as in
the scripted nn.LSTM), then one ``fused_lstm::lstm`` call. What the eager forward hands to
nn.LSTM (autocast, a device without a fused kernel, arguments the op rejects) goes to nn.LSTM's
implementation, ``torch._VF.lstm``, as the scripted nn.LSTM calls it; TorchScript has no
try/except, so ``_script_op_takes`` decides before the call. The scripted model runs the fused
kernels, trains the same Parameters, and needs the fused_lstm library loaded wherever it runs
(``import fused_lstm``, or ``torch.ops.load_library`` of its library). In eager Python it is a
FusedLSTM: torch.jit.script puts what ``__prepare_scriptable__`` returns into the model it
scripts, so the model keeps running FusedLSTM's forward afterwards.
"""

from typing import Optional, Tuple, overload

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from ._checks import dropout_mask, is_batched_input, state_for_op
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
        layer_out = (2 if self.bidirectional else 1) * (
            self.proj_size if self.proj_size > 0 else self.hidden_size)
        return dropout_mask(x, self.dropout, self.training, self.num_layers, layer_out)

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
        # FusedLSTM._forward (module.py) in TorchScript: the same layout handling and checks, in
        # the same order, with nn.LSTM's own check methods (compiled, check_input leaves out the
        # dtype check, as in nn.LSTM's scripted forward). _script_op_takes decides up front
        # whether the fused op computes the call; if not, nn.LSTM's implementation does.
        self._update_flat_weights()
        weights = self._flat_weights
        num_layers = self.num_layers
        layers_dirs = num_layers * (2 if self.bidirectional else 1)
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size

        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            if hx is None:
                batch = int(batch_sizes[0])
                h0 = torch.zeros(layers_dirs, batch, out_size, dtype=data.dtype, device=data.device)
                c0 = torch.zeros(layers_dirs, batch, self.hidden_size, dtype=data.dtype,
                                 device=data.device)
            else:
                # Each hidden state row belongs to the sequence the caller put there.
                h0, c0 = self.permute_hidden(hx, sorted_indices)
            if torch.ops.fused_lstm.runs_fused(data.device) and \
                    self._script_op_takes(data, batch_sizes, h0, c0):
                output, h_n, c_n = torch.ops.fused_lstm.lstm(
                    data, batch_sizes, h0, c0, weights, self._script_dropout_mask(data),
                    num_layers, self.bidirectional, self.bias, self.proj_size)
            else:
                if hx is not None:
                    self._script_check_packed_hidden(h0, c0, batch_sizes)
                output, h_n, c_n = torch._VF.lstm(
                    data, batch_sizes, (h0, c0), weights, self.bias, num_layers,
                    float(self.dropout), self.training, self.bidirectional)
            return (PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices),
                    self.permute_hidden((h_n, c_n), unsorted_indices))

        is_batched = is_batched_input(input)
        batch_first = self.batch_first
        # Time-major view for the op (unbatched input is a batch of one), and the batched input
        # in nn.LSTM's layout for its checks and its implementation.
        if not is_batched:
            x = input.unsqueeze(1)
            batched = input.unsqueeze(0) if batch_first else x
        else:
            x = input.transpose(0, 1) if batch_first else input
            batched = input

        h0: Optional[Tensor] = None
        c0: Optional[Tensor] = None
        if hx is None:
            self.check_input(batched, None)
        else:
            h, c = state_for_op(hx[0], hx[1], is_batched)
            self.check_forward_args(batched, (h, c), None)
            h0 = h
            c0 = c

        if not (torch.ops.fused_lstm.runs_fused(x.device)
                and self._script_op_takes(x, None, h0, c0)):
            if h0 is None or c0 is None:
                batch = x.size(1)
                h0 = torch.zeros(layers_dirs, batch, out_size, dtype=x.dtype, device=x.device)
                c0 = torch.zeros(layers_dirs, batch, self.hidden_size, dtype=x.dtype,
                                 device=x.device)
            output, h_n, c_n = torch._VF.lstm(
                batched, (h0, c0), weights, self.bias, num_layers, float(self.dropout),
                self.training, self.bidirectional, batch_first)
            if not is_batched:
                output = output.squeeze(0 if batch_first else 1)
        else:
            output, h_n, c_n = torch.ops.fused_lstm.lstm(
                x, None, h0, c0, weights, self._script_dropout_mask(x), num_layers,
                self.bidirectional, self.bias, self.proj_size)
            if not is_batched:
                output = output.squeeze(1)
            elif batch_first:
                output = output.transpose(0, 1)
        if not is_batched:
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1)
        return output, (h_n, c_n)

    def _script_op_takes(self, x: Tensor, batch_sizes: Optional[Tensor], h0: Optional[Tensor],
                         c0: Optional[Tensor]) -> bool:
        """Whether the fused op takes this call (its checks, asked up front: TorchScript has no
        try/except). False for the arguments the op would reject and the eager forward hands to
        nn.LSTM (dtypes or devices that differ, an empty sequence, packed data or states of the
        wrong shape), for which nn.LSTM's implementation gives its own result or exception.
        ``x`` is time-major [T, B, I], or packed data with ``batch_sizes``; the padded call's
        shapes are already checked. The forward asks ``fused_lstm::runs_fused`` (a kernel for
        the device, autocast off) first, on its own: ONNX export folds that constant (see
        ``_runs_fused_in_onnx``), which it cannot do through this method's loops."""
        dtype = x.dtype
        if not (dtype == torch.float32 or dtype == torch.float64 or dtype == torch.bfloat16
                or dtype == torch.float16):
            return False
        for w in self._flat_weights:
            if w.dtype != dtype or w.device != x.device:
                return False
        for state in (h0, c0):
            if state is not None and (state.dtype != dtype or state.device != x.device):
                return False
        if batch_sizes is None:
            return x.size(0) > 0
        if x.dim() != 2 or x.size(1) != self.input_size or batch_sizes.dim() != 1:
            return False
        if batch_sizes.numel() == 0 or batch_sizes.dtype != torch.int64:
            return False
        if not bool((batch_sizes > 0).all()) or int(batch_sizes.sum()) != x.size(0):
            return False
        if batch_sizes.numel() > 1 and bool((batch_sizes[1:] > batch_sizes[:-1]).any()):
            return False
        batch = int(batch_sizes[0])
        layers_dirs = self.num_layers * (2 if self.bidirectional else 1)
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        if h0 is not None and h0.size() != [layers_dirs, batch, out_size]:
            return False
        if c0 is not None and c0.size() != [layers_dirs, batch, self.hidden_size]:
            return False
        return True

    def _script_check_packed_hidden(self, h0: Tensor, c0: Tensor, batch_sizes: Tensor) -> None:
        """FusedLSTM._check_packed_hidden, in TorchScript: a RuntimeError where nn.LSTM's
        oneDNN kernel would read or write past a hidden state of the wrong shape (packed
        sequences of equal length)."""
        if batch_sizes.numel() == 0 or bool((batch_sizes != batch_sizes[0]).any()):
            return
        layers_dirs = self.num_layers * (2 if self.bidirectional else 1)
        batch = int(batch_sizes[0])
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        self.check_hidden_size(h0, (layers_dirs, batch, out_size),
                               "Expected hidden[0] size {}, got {}")
        self.check_hidden_size(c0, (layers_dirs, batch, self.hidden_size),
                               "Expected hidden[1] size {}, got {}")


def _runs_fused_in_onnx(g, device):
    """``fused_lstm::runs_fused`` for ONNX export of a scripted model (the TorchScript-based
    exporter): constant False, as ONNX has no fused op. The exporter then folds the scripted
    forward's choice away and writes only nn.LSTM's implementation, as ONNX's LSTM op: the graph
    it writes for the scripted nn.LSTM model (the eager FusedLSTM runs nn.LSTM's forward during
    export for the same reason)."""
    return g.op("Constant", value_t=torch.tensor(False))


torch.onnx.register_custom_op_symbolic("fused_lstm::runs_fused", _runs_fused_in_onnx, 9)


def scriptable(module: FusedLSTM) -> ScriptableFusedLSTM:
    """The module as a ScriptableFusedLSTM sharing everything with it."""
    return _retyped(module, ScriptableFusedLSTM)
