"""The LSTM implementations compared: nn.LSTM (the baseline), FusedLSTM, the framework floor
and, where importable, ONNX Runtime (CPU inference), haste and FlashRNN."""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .floor import FLOOR, FloorLSTM
from .ort import ORT, OrtLSTM, import_onnxruntime
from .workloads import MODES, dtype_name


BASELINE = "nn.LSTM"


@dataclass(frozen=True)
class Impl:
    """An LSTM implementation. ``build(lstm)`` returns a module called like nn.LSTM,
    ``module(x, (h0, c0)) -> (output, (h_n, c_n))``, holding ``lstm``'s weights.

    How the check tells that the implementation computed a result with its own kernels, not
    by falling back to nn.LSTM: an operator whose name starts with ``kernel_prefix`` ran, and
    no ``fallback_warning`` was raised. ``floor``: not an LSTM but the framework floor (no
    check, status ``floor``, no speedup, not in the exit status). ``modes`` and ``dtypes``:
    what it runs (``dtypes`` None: every dtype); it has no rows elsewhere. ``foreign_memory``:
    it allocates outside PyTorch's allocators, so its peak memory is not measured.
    ``explain(module, case, mode)``: what the implementation's call of that mode ran, in a few
    words, asked after its timed calls (FusedLSTM: :func:`fused_lstm_ran`), or None."""

    name: str
    build: Callable[[nn.LSTM], nn.Module]
    devices: tuple[str, ...] = ("cpu", "cuda")
    kernel_prefix: Optional[str] = None
    fallback_warning: Optional[type[Warning]] = None
    floor: bool = False
    modes: tuple[str, ...] = MODES
    dtypes: Optional[tuple[torch.dtype, ...]] = None
    foreign_memory: bool = False  # its memory is not PyTorch's: no peak memory measured
    explain: Optional[Callable[[nn.Module, Case, str], str]] = None


class HasteLSTM(nn.Module):
    """haste_pytorch.LSTM layers stacked to ``lstm.num_layers``, with ``lstm``'s weights.

    haste keeps its own weight layout, so only the outputs and the input, h0 and c0 gradients
    are checked, not the weight gradients."""

    def __init__(self, haste, lstm: nn.LSTM):
        super().__init__()
        self.layers = nn.ModuleList()
        for k in range(lstm.num_layers):
            layer = haste.LSTM(lstm.input_size if k == 0 else lstm.hidden_size, lstm.hidden_size)
            with torch.no_grad():
                layer.from_native_weights(*(getattr(lstm, f"{name}_l{k}") for name in
                                            ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))
            self.layers.append(layer)

    def forward(self, x, hx):
        """nn.LSTM's call: ``x [T, B, I]``, ``hx = (h0, c0)`` each ``[layers, B, H]``."""
        h0, c0 = hx
        h_n, c_n = [], []
        for k, layer in enumerate(self.layers):
            x, (h, c) = layer(x, (h0[k:k + 1], c0[k:k + 1]))
            h_n.append(h)
            c_n.append(c)
        return x, (torch.cat(h_n), torch.cat(c_n))


class FlashRNNLSTM(nn.Module):
    """FlashRNN's fused LSTM kernel (``backend="cuda_fused"``) layer by layer, with nn.LSTM's
    parameters (same names and layout, so their gradients are checked too). The input
    projection ``x W_ih^T``, which FlashRNN expects done, is part of every call."""

    def __init__(self, flashrnn, lstm: nn.LSTM):
        super().__init__()
        self.flashrnn = flashrnn
        self.num_layers, self.hidden_size = lstm.num_layers, lstm.hidden_size
        for name, param in lstm.named_parameters():
            self.register_parameter(name, nn.Parameter(param.detach().clone()))

    def forward(self, x, hx):
        """nn.LSTM's call: ``x [T, B, I]``, ``hx = (h0, c0)`` each ``[layers, B, H]``."""
        h0, c0 = hx
        seq_len, batch, hidden = x.size(0), x.size(1), self.hidden_size
        h_n, c_n = [], []
        for k in range(self.num_layers):
            # FlashRNN's layouts: Wx [B, T, gates, heads, H], R [gates, heads, H_out, H_in],
            # b [gates, heads, H], states [(h, c), B, 1, heads, H]; gate order i, f, g, o.
            wx = F.linear(x, getattr(self, f"weight_ih_l{k}")).transpose(0, 1)
            bias = getattr(self, f"bias_ih_l{k}") + getattr(self, f"bias_hh_l{k}")
            states, last = self.flashrnn(
                wx.reshape(batch, seq_len, 4, 1, hidden),
                getattr(self, f"weight_hh_l{k}").view(4, 1, hidden, hidden),
                bias.view(4, 1, hidden),
                states=torch.stack((h0[k], c0[k])).view(2, batch, 1, 1, hidden),
                function="lstm", backend="cuda_fused", dtype=dtype_name(x.dtype),
            )
            x = states[0].reshape(batch, seq_len, hidden).transpose(0, 1)
            h_n.append(last[0].reshape(1, batch, hidden))
            c_n.append(last[1].reshape(1, batch, hidden))
        return x, (torch.cat(h_n), torch.cat(c_n))


def fused_lstm_copy(fused_lstm_class: type, lstm: nn.LSTM) -> nn.Module:
    """A FusedLSTM configured like ``lstm``, loaded with its state_dict."""
    param = lstm.weight_ih_l0
    fused = fused_lstm_class(lstm.input_size, lstm.hidden_size, lstm.num_layers,
                             device=param.device, dtype=param.dtype)
    fused.load_state_dict(lstm.state_dict())
    return fused


def fused_lstm_ran(fused_lstm, module: nn.Module, case: Case, mode: str) -> str:
    """What FusedLSTM's call of ``mode`` on ``case`` ran, from ``fused_lstm.explain`` (asked
    after the timed calls, so the nn.LSTM floor's first-call measurement is in it): the floor's
    at::lstm, or the kernel variant (the CUDA path), with the threads' split of each layer's
    steps and each layer's input projection where the CPU plan names them, and in training the
    backward's variant; then the floor's measured times where it measured the call
    (:func:`floor_times`)."""
    with torch.set_grad_enabled(mode == "train"):
        info = fused_lstm.explain(module, case.inputs())
    forward = info["forward"]
    if forward.get("nn_lstm_floor_runs") == "true":
        return "at::lstm (the nn.LSTM floor)" + floor_times(forward)

    def per_layer(key):
        return [v for k, v in sorted(forward.items()) if k.startswith(key + ".")]

    parts = [forward.get("variant", forward.get("path", "?"))]
    splits = [v.split()[0] for v in per_layer("step_split")]
    if splits:
        parts.append("steps split by " + "/".join(splits))
    # (each named by its first words: "blas", "thin kernel (dot products, every step)" ->
    # "thin kernel", "brgemm, fused into the steps" -> "fused")
    projections = ["fused" if "fused into" in v else re.split(r"[,(]", v)[0].strip()
                   for v in per_layer("input_projection")]
    if len(set(projections)) == 1 and len(projections) > 1:
        projections = [f"{projections[0]} (every layer)"]
    if projections:
        parts.append("input projection " + "/".join(projections))
    if mode == "train":
        backward = info["backward"]
        parts.append("backward " + backward.get("variant", backward.get("path", "?")))
    return ", ".join(parts) + floor_times(forward)


def floor_times(forward: dict) -> str:
    """``; the floor measured (least, ms): the rule's choice 97.8, at::lstm 95.2, hidden split
    93.1``:
    the nn.LSTM floor's first-call measurement behind the choice (explain's
    nn_lstm_floor_times, step_split_times, input_projection_times), or "" where there is none."""
    found = re.match(r"fused ([\d.e+-]+) ms, at::lstm ([\d.e+-]+) ms",
                     forward.get("nn_lstm_floor_times", ""))
    if not found:
        return ""
    times = [f"the rule's choice {float(found[1]):.3g}", f"at::lstm {float(found[2]):.3g}"]
    for key, pattern in (("step_split_times", r"the (hidden|batch) split ([\d.e+-]+) ms"),
                         ("input_projection_times", r"ms, (fused where the sizes allow|never "
                                                     r"fused) ([\d.e+-]+) ms")):
        other = re.search(pattern, forward.get(key, ""))
        if other:
            name = other[1] + (" split" if key == "step_split_times" else "")
            times.append(f"{name} {float(other[2]):.3g}")
    return "; the floor measured (least, ms): " + ", ".join(times)


def implementations(fused_lstm) -> tuple[list[Impl], list[str]]:
    """The implementations to measure, and one line for each third-party one that is not
    importable."""
    impls = [
        Impl(BASELINE, lambda lstm: lstm),
        Impl("FusedLSTM", lambda lstm: fused_lstm_copy(fused_lstm.FusedLSTM, lstm),
             kernel_prefix="fused_lstm::",
             fallback_warning=fused_lstm.FusedLSTMFallbackWarning,
             explain=lambda module, case, mode: fused_lstm_ran(fused_lstm, module, case, mode)),
        Impl(FLOOR, FloorLSTM, floor=True),
    ]
    skipped = []
    try:
        ort, onnx = import_onnxruntime()
        impls.append(Impl(ORT, lambda lstm: OrtLSTM(ort, onnx, lstm), devices=("cpu",),
                          modes=("infer",), dtypes=(torch.float32,), foreign_memory=True))
    except (ImportError, OSError) as error:
        skipped.append(f"{ORT}: skipped, onnxruntime and onnx are not both importable "
                       f"({error})")
    try:
        haste = importlib.import_module("haste_pytorch")
        impls.append(Impl("haste", lambda lstm: HasteLSTM(haste, lstm), devices=("cuda",)))
    except (ImportError, OSError) as error:
        skipped.append(f"haste: skipped, haste_pytorch is not importable ({error})")
    try:
        flashrnn = importlib.import_module("flashrnn.flashrnn").flashrnn
        impls.append(Impl("FlashRNN", lambda lstm: FlashRNNLSTM(flashrnn, lstm),
                          devices=("cuda",)))
    except (ImportError, OSError, AttributeError) as error:
        skipped.append(f"FlashRNN: skipped, flashrnn is not importable ({error})")
    return impls, skipped
