"""ONNX Runtime as an inference peer: the nn.LSTM exported to ONNX and run by an
``onnxruntime.InferenceSession`` on the CPU, float32, inference only.

The export is TorchScript's (``torch.onnx.export(..., dynamo=False)``): one standard ONNX
``LSTM`` operator per layer, with nn.LSTM's weights (reordered to ONNX's gate order by the
exporter), time and batch dimensions dynamic. For packed workloads the same graph gets a
``sequence_lens`` input wired to every LSTM node (ONNX's LSTM takes the padded input and the
lengths; outputs past a sequence's length are zero, ``Y_h`` and ``Y_c`` are each sequence's last
valid state), and the call gets the padded input and the lengths.

The session runs with ``intra_op_num_threads`` = torch's thread count and
``inter_op_num_threads`` = 1, its other options at ONNX Runtime's defaults. The timed call is
``session.run`` on numpy inputs made once; the check converts the outputs to tensors (packing
them again for packed workloads) outside the timing."""

from __future__ import annotations

import copy
import importlib
import io
import warnings
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .workloads import Case


ORT = "ONNX Runtime"
OPSET = 17
INPUT_NAMES = ("x", "h0", "c0")
OUTPUT_NAMES = ("output", "h_n", "c_n")


def import_onnxruntime():
    """``(onnxruntime, onnx)``, or the ImportError (or OSError) of the first that is not
    importable."""
    return importlib.import_module("onnxruntime"), importlib.import_module("onnx")


def onnxruntime_version() -> Optional[str]:
    """``onnxruntime 1.x (onnx 1.y)``, or None when either is not importable."""
    try:
        ort, onnx = import_onnxruntime()
    except (ImportError, OSError):
        return None
    return f"{ort.__version__} (onnx {onnx.__version__})"


class _FlatLSTM(nn.Module):
    """nn.LSTM with flat inputs and outputs, for the export: ``(x, h0, c0) -> (output, h_n,
    c_n)``."""

    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        self.lstm = lstm

    def forward(self, x, h0, c0):
        output, (h_n, c_n) = self.lstm(x, (h0, c0))
        return output, h_n, c_n


def export_lstm(onnx, lstm: nn.LSTM):
    """The ONNX model of ``lstm`` (a float32 copy in eval mode), checked to hold one ONNX LSTM
    node per layer and direction (one node per layer: bidirectional nodes hold both)."""
    flat = _FlatLSTM(copy.deepcopy(lstm).float().cpu().eval())
    layers, hidden = lstm.num_layers, lstm.hidden_size
    directions = 2 if lstm.bidirectional else 1
    example = (torch.randn(2, 1, lstm.input_size), torch.zeros(layers * directions, 1, hidden),
               torch.zeros(layers * directions, 1, hidden))
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # About exports whose h0 and c0 are not inputs: here they are.
        warnings.filterwarnings("ignore", "Exporting a model to ONNX with a batch_size other "
                                "than 1", UserWarning)
        # The tracer's notes on nn.LSTM's Python shape checks, which the export leaves out.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # The TorchScript exporter's notice of its own deprecation (it is the path that gives
        # ONNX's LSTM op for nn.LSTM).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(flat, example, buffer, dynamo=False, opset_version=OPSET,
                          input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                          dynamic_axes={"x": {0: "T", 1: "B"}, "h0": {1: "B"}, "c0": {1: "B"},
                                        "output": {0: "T", 1: "B"}, "h_n": {1: "B"},
                                        "c_n": {1: "B"}})
    model = onnx.load_from_string(buffer.getvalue())
    nodes = [node for node in model.graph.node if node.op_type == "LSTM"]
    if len(nodes) != layers:
        raise RuntimeError(f"the export has {len(nodes)} ONNX LSTM nodes, expected {layers}")
    return model


def with_sequence_lens(onnx, model):
    """A copy of ``model`` with an int32 graph input ``sequence_lens [B]`` given to every LSTM
    node (its fifth input)."""
    model = copy.deepcopy(model)
    model.graph.input.append(onnx.helper.make_tensor_value_info(
        "sequence_lens", onnx.TensorProto.INT32, ["B"]))
    for node in model.graph.node:
        if node.op_type == "LSTM":
            while len(node.input) < 5:
                node.input.append("")
            node.input[4] = "sequence_lens"
    onnx.checker.check_model(model)
    return model


def numpy_of(t: torch.Tensor) -> np.ndarray:
    """A contiguous float32 (or int32 lengths) numpy copy of ``t``."""
    return np.ascontiguousarray(t.detach().cpu().numpy())


class OrtLSTM(nn.Module):
    """nn.LSTM's call, ``module(x, (h0, c0)) -> (output, (h_n, c_n))``, computed by ONNX
    Runtime on the exported ``lstm`` (inference only: no autograd, float32 CPU tensors). A
    PackedSequence input runs padded with ``sequence_lens`` and its output is packed again.
    ``make_step`` gives the timed call, ``session.run`` on numpy inputs made once."""

    def __init__(self, ort, onnx, lstm: nn.LSTM):
        super().__init__()
        if lstm.proj_size or lstm.bidirectional or lstm.batch_first:
            raise NotImplementedError("only unidirectional, time-major LSTMs without projection")
        self.ort, self.onnx = ort, onnx
        self.model = export_lstm(onnx, lstm)
        self.sessions = {}

    def session(self, packed: bool):
        """The InferenceSession of the graph, with ``sequence_lens`` if ``packed``."""
        if packed not in self.sessions:
            options = self.ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            model = with_sequence_lens(self.onnx, self.model) if packed else self.model
            self.sessions[packed] = self.ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return self.sessions[packed]

    @staticmethod
    def feeds(x, h0: torch.Tensor, c0: torch.Tensor) -> tuple[dict, Optional[torch.Tensor]]:
        """The session's numpy inputs for nn.LSTM's ``(x, (h0, c0))``, and the lengths of a
        packed ``x`` (None otherwise)."""
        lengths = None
        if isinstance(x, PackedSequence):
            x, lengths = pad_packed_sequence(x)  # [T_max, B, I], the batch in input order
        feeds = {"x": numpy_of(x), "h0": numpy_of(h0), "c0": numpy_of(c0)}
        if lengths is not None:
            feeds["sequence_lens"] = numpy_of(lengths.to(torch.int32))
        return feeds, lengths

    def forward(self, x, hx):
        """The check's call, under no_grad: tensors in and out."""
        if torch.is_grad_enabled():
            raise NotImplementedError("ONNX Runtime runs inference only (call under no_grad)")
        feeds, lengths = self.feeds(x, *hx)
        output, h_n, c_n = (torch.from_numpy(a) for a in
                            self.session(lengths is not None).run(list(OUTPUT_NAMES), feeds))
        if lengths is not None:
            output = pack_padded_sequence(output, lengths, enforce_sorted=False)
        return output, (h_n, c_n)

    def make_step(self, case: Case, mode: str, streaming: bool) -> Callable[[], None]:
        """The timed call (inference only): ``session.run`` on numpy inputs made once;
        streaming carries (h_n, c_n) into the next call's (h0, c0), as arrays."""
        if mode != "infer":
            raise NotImplementedError("ONNX Runtime runs inference only")
        feeds, lengths = self.feeds(case.inputs(), case.h0, case.c0)
        session, names = self.session(lengths is not None), list(OUTPUT_NAMES)
        if not streaming:
            def step():
                session.run(names, feeds)
        else:
            def step():
                _, feeds["h0"], feeds["c0"] = session.run(names, feeds)
        step.feeds = feeds  # the inputs (and the carried state), for inspection
        return step
