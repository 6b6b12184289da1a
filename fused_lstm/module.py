"""``FusedLSTM``: torch.nn.LSTM's contract, computed by one fused op call.

``FusedLSTM`` subclasses ``nn.LSTM`` and changes nothing but ``forward``: the constructor,
parameters, ``state_dict``, ``all_weights``, ``_flat_weights`` and ``flatten_parameters()`` are
nn.LSTM's own. ``forward`` repeats nn.LSTM's argument checks with the same exception classes and
messages, brings the input into the op's layout once (time-major ``[T, B, I]``, or packed data
plus batch sizes), calls ``fused_lstm.ops.lstm`` once for the whole stack and returns what
nn.LSTM returns.

Where the fused op cannot run the call, ``nn.LSTM.forward`` does (never a wrong result):

* no fused kernel for the input's device: a one-time ``FusedLSTMFallbackWarning`` per device type;
* autocast is enabled: nn.LSTM has its own autocast rules (dtype casts, skipped dtype check);
* ONNX export (either exporter): ONNX has no fused op, and nn.LSTM's call becomes ONNX's LSTM op;
* forward-mode AD (dual tensors, torch.func.jvp/jacfwd) and ExpandedWeights: nn.LSTM has rules
  for them, the fused op does not (fused_lstm/_functorch.py, which also runs the fused op under
  the other torch.func transforms and vmap);
* arguments nn.LSTM rejects only inside its C++ implementation (hx of the wrong dtype or device,
  an hx that is not a pair, empty sequences, bad packed-sequence shapes...): nn.LSTM raises its
  own exception, so the exception class and message are exactly nn.LSTM's. Should nn.LSTM accept
  a call the op rejected, its result is returned with a ``FusedLSTMFallbackWarning``.

``convert`` and ``revert`` swap nn.LSTM and FusedLSTM modules inside a model.
"""

from __future__ import annotations

import copy
import warnings
from typing import Dict, Optional, Set

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from . import _functorch, ops
from ._checks import dropout_mask, is_batched_input, state_for_op
from ._loader import python_entry

__all__ = ["FusedLSTM", "FusedLSTMFallbackWarning", "convert", "revert"]

_lstm_op = ops.lstm
# FusedLSTM's plain call in C++ (csrc/python_entry.cpp), with or without grad: the result,
# None when the call is not a plain one, or the op's exception when the op rejects it; and
# the same file's check of the weights (module._flat_weights when current, else None). Both
# None when the library could not be imported as a Python module.
_entry = python_entry()
_fast_forward = _entry.forward if _entry is not None else None
_current_weights = _entry.current_weights if _entry is not None else None
_is_autocast_enabled = torch._C._is_any_autocast_enabled
_is_compiling = torch.compiler.is_compiling


@torch.compiler.disable  # nn.LSTM does not compile (torch 2.13); run it eagerly under compile
def _nn_lstm_forward(module: nn.LSTM, input, hx):  # noqa: A002
    """nn.LSTM's own forward, for the calls FusedLSTM hands to it (autocast, a device without a
    kernel, arguments only nn.LSTM's C++ rejects)."""
    return nn.LSTM.forward(module, input, hx)


def _fx_tracer(input, hx):  # noqa: A002
    """The torch.fx tracer whose Proxy is the input or part of hx, else None."""
    for value in (input, *(hx if isinstance(hx, (tuple, list)) else (hx,))):
        if isinstance(value, torch.fx.Proxy):
            return value.tracer
    return None


# ONNX export: FusedLSTM computes nn.LSTM's call, which the exporters write as ONNX's LSTM op.
try:  # the flags torch.onnx.is_in_onnx_export() reads, without its two imports per call
    from torch.onnx._internal.exporter import _flags as _onnx_flags
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS as _onnx_globals

    def _in_onnx_export() -> bool:
        if torch.compiler.is_dynamo_compiling():  # Dynamo skips the flags' files; this one it
            return torch.onnx.is_in_onnx_export()  # knows (a constant)
        return _onnx_globals.in_onnx_export or _onnx_flags._is_onnx_exporting
except ImportError:  # another torch layout
    _in_onnx_export = torch.onnx.is_in_onnx_export


class FusedLSTMFallbackWarning(UserWarning):
    """A FusedLSTM call was computed by torch.nn.LSTM instead of the fused op."""


# Device type -> whether the fused op has a kernel for it. Filled on first use of each type.
_has_kernel: Dict[str, bool] = {}
_warned_devices: Set[str] = set()


@torch.compiler.assume_constant_result  # constant per device type; torch.compile need not trace it
def _fused_kernel_available(device_type: str) -> bool:
    has = _has_kernel.get(device_type)
    if has is None:
        try:
            key = torch._C._dispatch_key_for_device(device_type)
            has = torch._C._dispatch_has_kernel_for_dispatch_key("fused_lstm::lstm_forward", key)
        except RuntimeError:  # a device type without a dispatch key of its own
            has = False
        _has_kernel[device_type] = has
    return has


# The exceptions the op raises for arguments it rejects (c10's errors as torch translates them):
# only these are put to nn.LSTM's implementation. Anything else was raised by code the op called
# back into and goes on to its caller: a saved-tensor hook, as torch.utils.checkpoint's
# (use_reentrant=False) raises one to stop its recomputation once it has what it saved.
_OP_REJECTIONS = (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError)


class FusedLSTM(nn.LSTM):
    """Drop-in replacement for :class:`torch.nn.LSTM` computed by the fused ``fused_lstm`` op.

    Same constructor, parameters, ``state_dict`` and results as ``nn.LSTM`` (see its
    documentation); an nn.LSTM ``state_dict`` loads unchanged.
    """

    def forward(self, input, hx=None):  # noqa: A002 (nn.LSTM's argument name)
        # The plain call, all in C++: the checks of the path below and the op call without
        # torch.ops' boxing (benchmarks/notes/python-overhead.md, "A C++ entry for the module
        # call"). None: not a plain call. An exception: the op
        # rejected the call, which the path below then does not put to the op again.
        op_error = None
        if _fast_forward is not None and not _is_compiling():
            try:
                result = _fast_forward(self, input, hx)
            except _OP_REJECTIONS as error:  # the path below decides what to raise
                op_error = error
            else:
                if result is not None:
                    return result
        return self._forward(input, hx, op_error)

    def _forward(self, input, hx, op_error: Optional[Exception]):  # noqa: A002
        """Every call the C++ entry does not compute (packed or unbatched input, a torch
        function or dispatch mode, weights to refresh, dropout, autocast, compiled code...),
        and the calls the op rejected there (``op_error``: its exception, for a padded call
        with no dropout mask, whose arguments this path gives the op exactly as the entry did).
        At most one op call; nn.LSTM raises its own exception for whatever the op rejects."""
        tracer = _fx_tracer(input, hx)
        if tracer is not None and tracer.root is not self:
            # torch.fx symbolic tracing: one call_module node, as a leaf nn.LSTM gives (FX's
            # Tracer.is_leaf_module takes only modules defined under torch.nn as leaves).
            args = (input,) if hx is None else (input, hx)
            return tracer.create_proxy("call_module", tracer.path_of_module(self), args, {})
        if _in_onnx_export():
            # ONNX export, either exporter (the C++ entry leaves traced calls to this path):
            # nn.LSTM's computation, which the exporters write as ONNX's LSTM op. torch.export
            # alone keeps the fused op.
            return nn.LSTM.forward(self, input, hx)
        weights = self._current_flat_weights()
        if _is_autocast_enabled():
            return _nn_lstm_forward(self, input, hx)
        # Forward-mode AD and ExpandedWeights: nn.LSTM's implementation (fused_lstm/_functorch.py)
        if not _is_compiling() and _functorch.hands_to_nn_lstm(input, hx, weights):
            return _nn_lstm_forward(self, input, hx)
        num_layers = self.num_layers
        bidirectional = self.bidirectional
        proj_size = self.proj_size
        hidden_size = self.hidden_size
        num_directions = 2 if bidirectional else 1
        out_size = proj_size if proj_size > 0 else hidden_size

        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            if not _fused_kernel_available(data.device.type):
                return self._forward_without_kernel(input, hx, data.device.type)
            if hx is None:
                # Explicit zeros (nn.LSTM does the same): they carry the batch size, which a
                # fake kernel cannot read from batch_sizes while tracing.
                batch = int(batch_sizes[0])
                h0 = torch.zeros(num_layers * num_directions, batch, out_size,
                                 dtype=data.dtype, device=data.device)
                c0 = torch.zeros(num_layers * num_directions, batch, hidden_size,
                                 dtype=data.dtype, device=data.device)
            else:
                if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                    return self._forward_by_nn_lstm(input, hx)
                h0, c0 = hx[0], hx[1]
                if sorted_indices is not None:
                    # Each hidden state row belongs to the sequence the caller put there.
                    h0 = h0.index_select(1, sorted_indices)
                    c0 = c0.index_select(1, sorted_indices)
            try:
                output, h_n, c_n = self._fused(data, batch_sizes, h0, c0, weights)
            except _OP_REJECTIONS as op_error:  # nn.LSTM decides: its exception, or its result
                if hx is not None:
                    self._check_packed_hidden(h0, c0, batch_sizes, op_error)
                return self._forward_by_nn_lstm(input, hx, op_error)
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            if unsorted_indices is not None:
                h_n = h_n.index_select(1, unsorted_indices)
                c_n = c_n.index_select(1, unsorted_indices)
            return output, (h_n, c_n)

        is_batched = is_batched_input(input)
        batch_first = self.batch_first
        # Time-major view for the op: unbatched input is a batch of one.
        if not is_batched:
            x = input.unsqueeze(1)
        elif batch_first:
            x = input.transpose(0, 1)
        else:
            x = input
        if not _fused_kernel_available(x.device.type):
            return self._forward_without_kernel(input, hx, x.device.type)

        if hx is None:
            h0 = c0 = None
        else:
            h0, c0 = state_for_op(hx[0], hx[1], is_batched)

        # nn.LSTM.check_forward_args, in its order (autocast never reaches this point).
        weight_dtype = weights[0].dtype
        if input.dtype != weight_dtype:
            raise ValueError(
                f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight_dtype}). "
                f"Convert input: input.to({weight_dtype}), or convert model: model.to({input.dtype})"
            )
        if self.input_size != x.size(-1):
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                f"got {x.size(-1)}"
            )
        if h0 is not None:
            layers_dirs = num_layers * num_directions
            batch = x.size(1)
            if h0.size() != (layers_dirs, batch, out_size):
                raise RuntimeError(
                    f"Expected hidden[0] size {(layers_dirs, batch, out_size)}, "
                    f"got {list(h0.size())}"
                )
            if c0.size() != (layers_dirs, batch, hidden_size):
                raise RuntimeError(
                    f"Expected hidden[1] size {(layers_dirs, batch, hidden_size)}, "
                    f"got {list(c0.size())}"
                )
            # nn.LSTM's C++ rejects it; unbatched, nn.LSTM itself rebuilds the pair from
            # hx[0] and hx[1] first, so a longer sequence is accepted there (and here).
            if is_batched and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
                return self._forward_by_nn_lstm(input, hx)
        if x.size(0) == 0:  # nn.LSTM raises for an empty sequence; let it say so
            return self._forward_by_nn_lstm(input, hx)

        try:
            if op_error is not None:  # the op's answer, from the C++ entry: not asked again
                raise op_error
            output, h_n, c_n = self._fused(x, None, h0, c0, weights)
        except _OP_REJECTIONS as op_error:  # nn.LSTM decides: its exception, or its result
            return self._forward_by_nn_lstm(input, hx, op_error)
        if not is_batched:
            return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script compiles a ScriptableFusedLSTM in place of this module: the same
        module (shared Parameters and attributes) with a forward TorchScript compiles, which
        calls the fused op (fused_lstm/_script.py)."""
        from ._script import scriptable

        return scriptable(self)

    def _check_packed_hidden(self, h0, c0, batch_sizes, op_error: Exception) -> None:
        """Raises a RuntimeError for packed input whose sequences all have the same length and
        whose hidden state has the wrong shape, instead of handing it to nn.LSTM.

        nn.LSTM skips its shape check for packed input (``check_forward_args`` runs only for
        padded input). With equal lengths its oneDNN kernel (float32) then reads and writes
        past the hidden state's end: heap corruption and an abort (torch 2.13), or a silently
        wrong result when the state is too large. Its native kernel raises a RuntimeError for
        the same call, hence the class. Other packed calls still get nn.LSTM's own exception.
        Only called after the op rejected the call, so the hot path pays nothing.
        """
        if batch_sizes.numel() == 0 or bool((batch_sizes != batch_sizes[0]).any()):
            return
        num_directions = 2 if self.bidirectional else 1
        layers_dirs = self.num_layers * num_directions
        batch = int(batch_sizes[0]) if batch_sizes.numel() else 0
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        for name, tensor, size in (("hidden[0]", h0, out_size),
                                   ("hidden[1]", c0, self.hidden_size)):
            expected = (layers_dirs, batch, size)
            if not isinstance(tensor, Tensor) or tensor.size() != expected:
                got = list(tensor.size()) if isinstance(tensor, Tensor) else type(tensor).__name__
                raise RuntimeError(f"Expected {name} size {expected}, got {got}") from op_error

    def _current_flat_weights(self):
        """``self._flat_weights`` after ``nn.LSTM._update_flat_weights()``, without its cost
        (about 10 us: two ``Module.__getattr__`` calls per weight) when no weight changed: the
        C++ entry's check (``current_weights``, csrc/python_entry.cpp) says when. Compiled code
        traces nn.LSTM's own method."""
        if _current_weights is not None and not _is_compiling():
            weights = _current_weights(self)
            if weights is not None:
                return weights
        self._update_flat_weights()
        return self._flat_weights

    def _fused(self, x: Tensor, batch_sizes: Optional[Tensor], h0, c0, weights):
        """The one op call: x is time-major [T, B, I], or packed data with batch_sizes. Under a
        functorch transform, through a Python autograd.Function (fused_lstm/_functorch.py)."""
        op = _functorch.lstm if not _is_compiling() and _functorch.active() else _lstm_op
        return op(*ops.LSTMArgs(
            x, batch_sizes, h0, c0, weights, self._dropout_mask(x), self.num_layers,
            self.bidirectional, self.bias, self.proj_size,
        ))

    def _dropout_mask(self, x: Tensor) -> Optional[Tensor]:
        """Inter-layer dropout as a mask ``[L-1, *x.shape[:-1], D*out_size]`` of 0 and 1/(1-p),
        or None when there is no dropout (eval mode, p == 0, or a single layer)."""
        layer_out = (2 if self.bidirectional else 1) * (self.proj_size or self.hidden_size)
        return dropout_mask(x, self.dropout, self.training, self.num_layers, layer_out)

    def _forward_without_kernel(self, input, hx, device_type: str):
        if device_type not in _warned_devices:
            _warned_devices.add(device_type)
            warnings.warn(
                f"fused_lstm has no fused kernel for device type '{device_type}' (this build "
                "has none, or it was not compiled for it); FusedLSTM runs torch.nn.LSTM's "
                "implementation there instead. Results are nn.LSTM's, without the speed-up.",
                FusedLSTMFallbackWarning,
                stacklevel=4,
            )
        return _nn_lstm_forward(self, input, hx)

    def _forward_by_nn_lstm(self, input, hx, op_error: Optional[Exception] = None):
        """nn.LSTM's forward for a call the fused op does not take: nn.LSTM raises its own
        exception for it, exactly as a plain nn.LSTM would (with the op's own, often clearer,
        diagnosis attached as a note). Should it not raise, its result stands (correct, only
        slower), and a warning says so."""
        try:
            result = _nn_lstm_forward(self, input, hx)
        except Exception as error:
            if op_error is not None and hasattr(error, "add_note"):  # Python >= 3.11
                note = str(op_error)
                error.add_note(note if note.startswith("fused_lstm") else f"fused_lstm: {note}")
                error.__suppress_context__ = True  # the note says what the op found
            raise
        warnings.warn(
            "fused_lstm: the fused op rejected a call that torch.nn.LSTM accepts"
            + (f" ({op_error})" if op_error is not None else "")
            + "; this call ran nn.LSTM's implementation instead. Please report it with the "
            "input shapes, dtypes and devices.",
            FusedLSTMFallbackWarning,
            stacklevel=4,
        )
        return result


# ---------------------------------------------------------------------------------------------
# convert / revert


def _base_class(module: nn.Module) -> type:
    """The module's class, looking through the class parametrize.register_parametrization
    substitutes (``Parametrized<Base>``, a direct subclass of the original class)."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]
    return cls


def _retyped(module: nn.Module, new_class: type) -> nn.Module:
    """A new module of ``new_class`` that shares ``module``'s Parameters, buffers, submodules
    (parametrizations included), hooks and every other attribute; the containers holding them
    are copied, so the two modules can be changed independently afterwards."""
    new = new_class.__new__(new_class)
    state = module.__dict__.copy()
    for name, value in state.items():
        if isinstance(value, (dict, list, set)):
            state[name] = copy.copy(value)
    new.__dict__.update(state)
    if parametrize.is_parametrized(module):
        # Re-create parametrize's class and properties for the new module: they are bound to
        # the module they were made for.
        parametrize._inject_new_class(new)
        for tensor_name in module.parametrizations:
            parametrize._inject_property(new, tensor_name)
    return new


def _swap(model: nn.Module, source: type, target: type) -> nn.Module:
    memo: Dict[int, nn.Module] = {}

    def swap(module: nn.Module) -> nn.Module:
        if _base_class(module) is source:
            if id(module) not in memo:  # a module used twice stays one module
                memo[id(module)] = _retyped(module, target)
            return memo[id(module)]
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            new_child = swap(child)
            if new_child is not child:
                setattr(module, name, new_child)
        return module

    return swap(model)


def convert(model: nn.Module) -> nn.Module:
    """Replaces every ``torch.nn.LSTM`` inside ``model`` by a ``FusedLSTM``, in place, and returns
    ``model`` (a new FusedLSTM when ``model`` itself is an nn.LSTM).

    The FusedLSTM takes over the nn.LSTM's Parameter objects (an optimizer built before keeps
    working), parametrizations, hooks, training mode, device and dtype, under the same attribute
    name. Only exact ``nn.LSTM`` instances are converted: a subclass may override ``forward``.
    """
    return _swap(model, nn.LSTM, FusedLSTM)


def revert(model: nn.Module) -> nn.Module:
    """The inverse of :func:`convert`: every FusedLSTM becomes a ``torch.nn.LSTM`` sharing its
    Parameters. Returns ``model``, or a new nn.LSTM when ``model`` itself is a FusedLSTM."""
    from ._script import ScriptableFusedLSTM  # what torch.jit.script put into a model

    return _swap(_swap(model, ScriptableFusedLSTM, nn.LSTM), FusedLSTM, nn.LSTM)
