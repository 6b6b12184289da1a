"""Eager-mode quantization treats a FusedLSTM as the nn.LSTM it replaces.

``torch.ao.quantization.quantize_dynamic(model, {nn.LSTM})`` (and its default spec, and
``dtype=torch.float16``) finds the modules to quantize by exact type: ``_propagate_qconfig_helper``
looks up ``type_before_parametrizations(module)`` in the spec, and ``convert`` swaps a module
whose exact type is in the mapping. A FusedLSTM would be left float32 without a word.
:func:`install` makes both see it as an nn.LSTM:

* the mapping: ``FusedLSTM -> _DynamicQuantizedLSTM`` in torch's default dynamic quantization
  mappings (``get_default_dynamic_quant_module_mappings()`` returns that dict), whose
  ``from_float`` gives torch's dynamic quantized LSTM (``torch.ao.nn.quantized.dynamic.LSTM``),
  built from an nn.LSTM that shares the FusedLSTM's parameters: exactly what nn.LSTM becomes;
* the spec: ``_propagate_qconfig_helper`` is wrapped so that a spec naming ``nn.LSTM`` but not
  FusedLSTM gives FusedLSTM nn.LSTM's qconfig (an entry for FusedLSTM itself wins).

FX graph-mode quantization (``prepare_fx``/``prepare_qat_fx`` then ``convert_fx``) also matches
modules by exact type: a FusedLSTM, one ``call_module`` node like a leaf nn.LSTM, would be left
float32 where a dynamic qconfig quantizes nn.LSTM. :func:`install` makes it see nn.LSTM too:

* the backend config: torch builds its BackendConfigs (``get_native_backend_config()``, the
  default of ``prepare_fx``/``convert_fx``, and the fbgemm, qnnpack, x86 and onednn ones) afresh
  on each call, with ``_get_rnn_op_configs`` for the RNN patterns. That function is wrapped (in
  each module that imported it) so that the nn.LSTM pattern config comes with a copy of itself
  for each registered class: same dtype configs (dynamic qint8 and float16) and reference
  module (``torch.ao.nn.quantized.reference.LSTM``, whose ``from_float`` reads only what
  nn.LSTM has), root module the class. ``convert_fx`` then lowers it to torch's dynamic
  quantized LSTM, as it lowers nn.LSTM; with a static qconfig it stays float, as nn.LSTM does;
* the qconfig mapping: ``_get_object_type_qconfig`` (fx/qconfig_mapping_utils.py) is wrapped so
  that a QConfigMapping with ``set_object_type(nn.LSTM, ...)`` but no entry for the class gives
  it nn.LSTM's qconfig.

The quantized module is PyTorch's: it does not run the fused kernels. Should torch's internals
differ (no ``_propagate_qconfig_helper``, ``_get_rnn_op_configs`` or
``_get_object_type_qconfig`` where expected, or a BackendPatternConfig that cannot be copied),
that part is left alone: then only what names FusedLSTM itself quantizes it (a ``{FusedLSTM}``
spec; for FX, ``set_object_type(FusedLSTM, ...)`` and a BackendConfig with a pattern config for
it), and the quantization tests in tests/test_transforms.py fail.
"""

from __future__ import annotations

import importlib
import sys

from torch import nn

_MARK = "_fused_lstm_qconfig_hook"


class _DynamicQuantizedLSTM:
    """The mapping's target for FusedLSTM: ``from_float`` as torch's dynamic quantized LSTM
    has it, for the nn.LSTM that the FusedLSTM replaces (same Parameters and qconfig)."""

    @staticmethod
    def from_float(mod, use_precomputed_fake_quant=False):
        from torch.ao.nn.quantized.dynamic import LSTM

        from .module import revert

        return LSTM.from_float(revert(mod), use_precomputed_fake_quant=use_precomputed_fake_quant)


# The classes install() registered (FusedLSTM; the ScriptableFusedLSTM torch.jit.script leaves).
_classes: list = []


def install(fused_class: type) -> None:
    """Registers ``fused_class`` with eager-mode and FX graph-mode quantization (see the
    module docstring). Idempotent; never raises."""
    from torch.ao.quantization import quantization_mappings

    quantization_mappings.get_default_dynamic_quant_module_mappings().setdefault(
        fused_class, _DynamicQuantizedLSTM)
    if fused_class not in _classes:
        _classes.append(fused_class)
    _install_fx()
    quantize = sys.modules.get("torch.ao.quantization.quantize")
    original = getattr(quantize, "_propagate_qconfig_helper", None)
    if original is None or getattr(original, _MARK, False):
        return

    def _propagate_qconfig_helper(module, qconfig_dict, *args, **kwargs):
        if nn.LSTM in qconfig_dict and any(c not in qconfig_dict for c in _classes):
            qconfig_dict = {**{c: qconfig_dict[nn.LSTM] for c in _classes}, **qconfig_dict}
        return original(module, qconfig_dict, *args, **kwargs)

    _propagate_qconfig_helper.__wrapped__ = original
    _propagate_qconfig_helper.__doc__ = original.__doc__
    setattr(_propagate_qconfig_helper, _MARK, True)
    quantize._propagate_qconfig_helper = _propagate_qconfig_helper


def _module(name: str):
    """torch's module ``name``, imported; None where it is not there."""
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - torch without it: leave that part alone
        return None


def _marked(wrapper, original):
    wrapper.__wrapped__ = original
    wrapper.__doc__ = original.__doc__
    setattr(wrapper, _MARK, True)
    return wrapper


_BACKEND_CONFIG = "torch.ao.quantization.backend_config."
# The modules that build a BackendConfig with _get_rnn_op_configs (imported by name).
_RNN_CONFIG_USERS = ("native", "fbgemm", "qnnpack", "x86", "onednn")


def _with_twins(configs: list) -> list:
    """``configs`` and, for the nn.LSTM pattern config, the same config for each registered
    class (pattern and root module the class) that ``configs`` does not configure itself.
    ``configs`` alone should torch's BackendPatternConfig differ."""
    try:
        from torch.ao.quantization.backend_config import BackendPatternConfig

        patterns = [config.pattern for config in configs]
        twins = []
        for config in configs:
            if config.pattern is not nn.LSTM:
                continue
            for fused_class in _classes:
                if fused_class in patterns:
                    continue
                twin = BackendPatternConfig.from_dict(config.to_dict()).set_pattern(fused_class)
                if config.root_module is nn.LSTM:
                    twin.set_root_module(fused_class)
                twins.append(twin)
        return [*configs, *twins]
    except Exception:  # noqa: BLE001 - leave torch's configs as they are (tests detect it)
        return configs


def _install_fx() -> None:
    """Makes FX graph-mode quantization see the classes in ``_classes`` as nn.LSTM (see the
    module docstring). Idempotent; never raises."""
    common = _module(_BACKEND_CONFIG + "_common_operator_config_utils")
    original = getattr(common, "_get_rnn_op_configs", None)
    if original is not None and not getattr(original, _MARK, False):
        def _get_rnn_op_configs(*args, **kwargs):
            return _with_twins(original(*args, **kwargs))

        wrapper = _marked(_get_rnn_op_configs, original)
        common._get_rnn_op_configs = wrapper
        for name in _RNN_CONFIG_USERS:
            user = _module(_BACKEND_CONFIG + name)
            if getattr(user, "_get_rnn_op_configs", None) is original:
                user._get_rnn_op_configs = wrapper

    utils = _module("torch.ao.quantization.fx.qconfig_mapping_utils")
    lookup = getattr(utils, "_get_object_type_qconfig", None)
    if lookup is not None and not getattr(lookup, _MARK, False):
        def _get_object_type_qconfig(qconfig_mapping, object_type, *args, **kwargs):
            qconfigs = getattr(qconfig_mapping, "object_type_qconfigs", {})
            if (object_type in _classes and object_type not in qconfigs
                    and nn.LSTM in qconfigs):
                object_type = nn.LSTM
            return lookup(qconfig_mapping, object_type, *args, **kwargs)

        utils._get_object_type_qconfig = _marked(_get_object_type_qconfig, lookup)
