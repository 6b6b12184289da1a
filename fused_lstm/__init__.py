"""fused_lstm: a drop-in replacement for torch.nn.LSTM backed by fused C++ ops.

Importing the package loads the compiled library (``fused_lstm.ops``), which registers the
``torch.ops.fused_lstm`` ops. ``fused_lstm.reference`` (plain PyTorch) depends on torch only.
"""

from . import backends, ops
from .explain import explain
from .module import FusedLSTM, FusedLSTMFallbackWarning, convert, revert
from . import _dynamo, _quantization, _script

_dynamo.install(FusedLSTM)  # torch.compile traces FusedLSTM without allow_rnn (see _dynamo.py)
_quantization.install(FusedLSTM)  # quantize_dynamic quantizes it as nn.LSTM (_quantization.py)
_quantization.install(_script.ScriptableFusedLSTM)  # what torch.jit.script leaves in a model

__version__ = "0.1.0"

__all__ = ["FusedLSTM", "FusedLSTMFallbackWarning", "backends", "convert", "explain", "revert",
           "ops",
           "__version__"]
