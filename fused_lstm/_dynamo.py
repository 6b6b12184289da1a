"""Lets ``torch.compile`` trace FusedLSTM without ``torch._dynamo.config.allow_rnn``.

Dynamo refuses every ``nn.RNN``/``nn.GRU``/``nn.LSTM`` instance unless
``torch._dynamo.config.allow_rnn`` is set: the only read of that flag is one
``isinstance(value, (torch.nn.RNN, torch.nn.GRU, torch.nn.LSTM))`` check in
``VariableBuilder.wrap_module`` (``torch/_dynamo/variables/builder.py``, in that form from torch
2.0 to 2.13). FusedLSTM is an nn.LSTM, but its forward is one custom op with a fake kernel,
which Dynamo traces like any other op.

:func:`install` wraps ``VariableBuilder.wrap_module`` so that, for a FusedLSTM value only, it runs
under ``config.patch(allow_rnn=True)``: just the call that turns that module into a Dynamo
variable. Every other module, a plain nn.LSTM next to a FusedLSTM included, goes through the
unchanged method and keeps Dynamo's default (refused; a graph break, or an error under
``fullgraph=True``). The patch is thread-local (config patches are per thread) and Dynamo
compiles under its global ``compile_lock``.

``import torch`` does not import ``torch._dynamo`` (about 2 s), so neither does :func:`install`:
when ``torch._dynamo.variables.builder`` is not loaded yet, a one-shot ``sys.meta_path`` finder
wraps the method right after that module is first imported. :func:`install` is idempotent.
Should the internals it relies on be missing (no ``VariableBuilder.wrap_module``, the check no
longer reading ``allow_rnn`` there, no ``config.allow_rnn``/``config.patch``), it does nothing:
FusedLSTM then needs ``allow_rnn`` as plain nn.LSTM does, and :func:`active` returns False.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from typing import Optional, Tuple

import torch

__all__ = ["install", "active"]

_BUILDER = "torch._dynamo.variables.builder"
_MARK = "_fused_lstm_allow_rnn_hook"
_RNN_TYPES = (torch.nn.RNN, torch.nn.GRU, torch.nn.LSTM)

_lock = threading.Lock()
_allowed: Tuple[type, ...] = ()
_state = threading.local()  # inside: True while this thread wraps a FusedLSTM under the patch


def install(*module_types: type) -> None:
    """Lets Dynamo wrap instances of ``module_types`` (FusedLSTM) without ``allow_rnn``: now if
    Dynamo's builder is loaded, else right after it is first imported. Idempotent."""
    global _allowed
    with _lock:
        _allowed = tuple(dict.fromkeys(_allowed + module_types))
        builder = sys.modules.get(_BUILDER)
        if builder is not None and hasattr(builder, "VariableBuilder"):
            _patch(builder)
        elif not any(isinstance(finder, _ImportHook) for finder in sys.meta_path):
            sys.meta_path.insert(0, _ImportHook())


def active() -> bool:
    """Whether Dynamo's ``wrap_module`` currently lets FusedLSTM through."""
    builder = sys.modules.get(_BUILDER)
    variable_builder = getattr(builder, "VariableBuilder", None)
    return getattr(getattr(variable_builder, "wrap_module", None), _MARK, False)


def _patch(builder) -> bool:
    """Wraps ``builder.VariableBuilder.wrap_module``; False (and nothing changed) where the
    internals are not the expected ones. Never raises."""
    try:
        variable_builder = getattr(builder, "VariableBuilder", None)
        original = getattr(variable_builder, "wrap_module", None)
        config = getattr(builder, "config", None)  # the object the check reads
        if original is None or config is None:
            return False
        if getattr(original, _MARK, False):
            return True
        code = getattr(original, "__code__", None)
        if (
            code is None
            or "allow_rnn" not in code.co_names  # the refusal is no longer in this method
            or not isinstance(getattr(config, "allow_rnn", None), bool)
            or not callable(getattr(config, "patch", None))
        ):
            return False
        variable_builder.wrap_module = _make_wrapper(original, config)
        return True
    except Exception:  # an unexpected torch: stay inactive, never break Dynamo's import
        return False


def _make_wrapper(original, config):
    def wrap_module(self, value, *args, **kwargs):
        if isinstance(value, _allowed) and not config.allow_rnn:
            outer = getattr(_state, "inside", False)
            _state.inside = True
            try:
                with config.patch(allow_rnn=True):
                    return original(self, value, *args, **kwargs)
            finally:
                _state.inside = outer
        if (
            getattr(_state, "inside", False)
            and isinstance(value, _RNN_TYPES)
            and not isinstance(value, _allowed)
        ):
            # Another RNN module wrapped from within a FusedLSTM's wrap_module (torch 2.13 never
            # does that): the flag is the user's again, and the user had not set it.
            with config.patch(allow_rnn=False):
                return original(self, value, *args, **kwargs)
        return original(self, value, *args, **kwargs)

    wrap_module.__name__ = original.__name__
    wrap_module.__qualname__ = original.__qualname__
    wrap_module.__doc__ = original.__doc__
    wrap_module.__wrapped__ = original
    setattr(wrap_module, _MARK, True)
    return wrap_module


class _ImportHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for Dynamo's builder module only, it takes the spec the other
    finders give and runs :func:`_patch` once the module has executed; then removes itself."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _BUILDER:
            return None
        spec = None
        for finder in list(sys.meta_path):
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or isinstance(finder, _ImportHook) or find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PatchingLoader(spec.loader)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self._loader = loader

    def __getattr__(self, name):  # get_source, get_filename... of the real loader
        return getattr(self._loader, name)

    def create_module(self, spec) -> Optional[object]:
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        # The module carries the real loader from here on.
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        with _lock:
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _ImportHook)]
            _patch(module)
