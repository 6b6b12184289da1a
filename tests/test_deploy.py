"""FusedLSTM where a model is deployed: torch.jit.script, ONNX export (both exporters), an input
made under torch.inference_mode and a batch_first input edited in place between forward and
backward. Each test runs the same model with nn.LSTM and with FusedLSTM (identical weights):
values, gradients, exceptions and warnings must be nn.LSTM's."""

from __future__ import annotations

import copy
import importlib.util
import io
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence
from torch.testing import assert_close

import fused_lstm
from fused_lstm import FusedLSTM

from helpers import ROOT, randn

F32, F64 = torch.float32, torch.float64


class Model(nn.Module):
    """An LSTM (2 layers, batch_first) with a linear head: what a user deploys."""

    def __init__(self, dtype=F64, batch_first=True):
        super().__init__()
        self.lstm = nn.LSTM(3, 4, num_layers=2, batch_first=batch_first, dtype=dtype)
        self.head = nn.Linear(4, 2, dtype=dtype)

    def forward(self, x):
        output, (h_n, c_n) = self.lstm(x)
        return self.head(output), h_n, c_n


def pair(dtype=F64, batch_first=True):
    """(the nn.LSTM model, the same model converted), sharing no Parameters."""
    plain = Model(dtype, batch_first)
    fused = fused_lstm.convert(copy.deepcopy(plain))
    assert type(fused.lstm) is FusedLSTM
    return plain, fused


def loss_of(outs):
    return sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum()
               for o in outs)


def caught(fn, *args, **kwargs):
    """fn's result and the warnings it gave, as (category, message) pairs."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    return result, [(w.category, str(w.message)) for w in record]


# --- torch.jit.script -----------------------------------------------------------------------


def _scripted_ops(scripted):
    """The fused_lstm::lstm and aten::lstm calls in a scripted model's inlined graph."""
    found = []

    def walk(nodes):
        for node in nodes:
            if node.kind() in ("fused_lstm::lstm", "aten::lstm"):
                found.append(node.kind())
            for block in node.blocks():
                walk(block.nodes())

    walk(scripted.inlined_graph.nodes())
    return sorted(found)


def _ran_ops(fn, *args):
    """fn's result, and which of fused_lstm::lstm and aten::lstm ran (the profiler's record)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn(*args)
    names = {event.name for event in prof.events()}
    return result, sorted(names & {"fused_lstm::lstm", "aten::lstm"})


def test_jit_script_compiles_saves_loads_and_trains_like_nn_lstm(tmp_path):
    """torch.jit.script of a model holding a FusedLSTM: the scripted graph calls the fused op
    (nn.LSTM's model: aten::lstm); the same warnings, outputs, gradients and training step as
    the nn.LSTM model, on the FusedLSTM's own Parameters; the saved module loads where
    fused_lstm is imported, and not where it is not (the op is unknown there)."""
    plain, fused = pair()
    fused_params = list(fused.parameters())
    scripted_plain, plain_warnings = caught(torch.jit.script, plain)
    scripted_fused, fused_warnings = caught(torch.jit.script, fused)
    assert set(fused_warnings) == set(plain_warnings)  # (the number of repeats varies)
    assert _scripted_ops(scripted_plain) == ["aten::lstm"]
    # The fused op, and nn.LSTM's implementation for the calls the op does not take.
    assert _scripted_ops(scripted_fused) == ["aten::lstm", "fused_lstm::lstm"]
    # The scripted model's Parameters are the FusedLSTM's own objects.
    assert all(a is b for a, b in zip(scripted_fused.parameters(), fused_params))
    # torch.jit.script put the scriptable FusedLSTM into the Python model (README): still a
    # FusedLSTM on the same Parameters, and revert still gives an nn.LSTM.
    assert isinstance(fused.lstm, FusedLSTM)
    assert all(a is b for a, b in zip(fused.parameters(), fused_params))

    x = randn(4, 6, 3)
    expected = scripted_plain(x)
    got, ran = _ran_ops(scripted_fused, x)
    assert ran == ["fused_lstm::lstm"]
    for e, g in zip(expected, got):
        assert_close(g, e)
    loss_of(expected).backward()
    loss_of(got).backward()
    for p, q in zip(plain.parameters(), fused_params):
        assert q.grad is not None
        assert_close(q.grad, p.grad)
    with torch.no_grad():
        for e, g in zip(fused(x), plain(x)):  # the Python model, after scripting
            assert_close(g, e)

    # One SGD step through each scripted model trains the Parameters alike.
    for params in (list(plain.parameters()), fused_params):
        torch.optim.SGD(params, lr=0.1).step()
    for p, q in zip(plain.parameters(), fused_params):
        assert_close(q, p)

    path = tmp_path / "scripted.pt"
    torch.jit.save(scripted_fused, str(path))
    y = randn(2, 5, 3)
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        expected = [t for t in scripted_plain(y)]
        for e, g in zip(expected, loaded(y)):
            assert_close(g, e)
    torch.save({"y": y, "expected": expected}, str(tmp_path / "io.pt"))
    for imported in (True, False):
        code = (
            "import sys, torch\n"
            + ("import fused_lstm\n" if imported else "")
            + f"m = torch.jit.load({str(path)!r})\n"
            f"d = torch.load({str(tmp_path / 'io.pt')!r})\n"
            "with torch.no_grad():\n"
            "    for e, g in zip(d['expected'], m(d['y'])):\n"
            "        torch.testing.assert_close(g, e)\n"
            "print('ok')\n"
        )
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=str(ROOT), timeout=300)
        if imported:
            assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
        else:
            assert run.returncode != 0 and "Unknown builtin op: fused_lstm::" in run.stderr, run.stderr

    assert type(fused_lstm.revert(fused).lstm) is nn.LSTM


def test_jit_script_dropout_training_matches_eager():
    """Scripted, a FusedLSTM with dropout in training mode draws the mask as the eager
    FusedLSTM does: under the same seed, the same outputs and gradients."""
    torch.manual_seed(0)
    lstm = FusedLSTM(3, 4, num_layers=3, dropout=0.4, batch_first=True, dtype=F64)
    eager = copy.deepcopy(lstm)
    scripted = torch.jit.script(WithState(lstm))
    x, h, c = randn(5, 7, 3), randn(3, 5, 4), randn(3, 5, 4)
    results = []
    for run in (lambda: WithState(eager)(x, h, c), lambda: scripted(x, h, c)):
        torch.manual_seed(1)
        outs = run()
        module = eager if len(results) == 0 else lstm
        grads = torch.autograd.grad(loss_of(outs), list(module.parameters()))
        results.append([o.detach() for o in outs] + list(grads))
    for e, g in zip(*results):
        assert_close(g, e)


class WithState(nn.Module):
    """An LSTM called with a given state, on padded or packed input (TorchScript compiles
    each of nn.LSTM's two forward overloads where it is called)."""

    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        output, (h_n, c_n) = self.lstm(x, (h, c))
        return output, h_n, c_n


class Packed(WithState):
    def forward(self, x: PackedSequence, h: torch.Tensor, c: torch.Tensor):
        output, (h_n, c_n) = self.lstm(x, (h, c))
        return output.data, h_n, c_n


@pytest.mark.parametrize("layout", ["padded", "unbatched", "packed"])
def test_jit_script_bidirectional_with_state(layout):
    """Scripted, a bidirectional FusedLSTM called with a state, on padded, unbatched or packed
    input, gives what the scripted nn.LSTM gives, on the same weights (both overloads of
    nn.LSTM's forward)."""
    wrapper = Packed if layout == "packed" else WithState
    torch.manual_seed(0)
    plain = nn.LSTM(3, 5, num_layers=2, bidirectional=True, dtype=F64)
    fused = FusedLSTM(3, 5, num_layers=2, bidirectional=True, dtype=F64)
    fused.load_state_dict(plain.state_dict())
    scripted_plain = torch.jit.script(wrapper(plain))
    scripted_fused = torch.jit.script(wrapper(fused))
    x = randn(6, 3, 3)
    h, c = randn(4, 3, 5), randn(4, 3, 5)
    if layout == "packed":
        x = pack_padded_sequence(x, torch.tensor([6, 4, 2]), enforce_sorted=False)
    elif layout == "unbatched":
        x, h, c = x[:, 0], h[:, 0], c[:, 0]
    got, ran = _ran_ops(scripted_fused, x, h, c)
    assert ran == ["fused_lstm::lstm"]
    for e, g in zip(scripted_plain(x, h, c), got):
        assert_close(g, e)


def test_quantize_dynamic_after_jit_script():
    """torch.jit.script leaves a ScriptableFusedLSTM in the Python model; quantize_dynamic
    still quantizes it as it quantizes nn.LSTM (same module type, same outputs)."""
    plain, fused = pair(F32)
    torch.jit.script(fused)
    assert type(fused.lstm) is not FusedLSTM and isinstance(fused.lstm, FusedLSTM)
    expected_model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(plain), {nn.LSTM})
    got_model = torch.ao.quantization.quantize_dynamic(fused, {nn.LSTM})
    assert type(got_model.lstm) is type(expected_model.lstm)
    assert type(got_model.lstm) is not nn.LSTM
    x = randn(2, 5, 3, dtype=F32)
    with torch.no_grad():
        for e, g in zip(expected_model(x), got_model(x)):
            assert_close(g, e)


# --- torch.jit.script: argument errors, and the calls nn.LSTM's implementation computes ----------


class NoState(WithState):
    def forward(self, x: torch.Tensor):
        output, (h_n, c_n) = self.lstm(x)
        return output, h_n, c_n


class PackedNoState(WithState):
    def forward(self, x: PackedSequence):
        output, (h_n, c_n) = self.lstm(x)
        return output.data, h_n, c_n


def _scripted_pair(wrapper, **kwargs):
    """(scripted nn.LSTM, scripted FusedLSTM) in ``wrapper``, on identical weights."""
    torch.manual_seed(0)
    plain = nn.LSTM(**kwargs)
    fused = FusedLSTM(**kwargs)
    fused.load_state_dict(plain.state_dict())
    return torch.jit.script(wrapper(plain)), torch.jit.script(wrapper(fused))


def _script_error(error):
    """A TorchScript exception as (class, message): the message without the TorchScript
    traceback (which names each model's own source lines)."""
    text = str(error)
    lines = text.split("\n")
    if lines[0].startswith("The following operation failed in the TorchScript interpreter"):
        start = next(i for i, line in enumerate(lines)
                     if i > 1 and line and not line.startswith(" "))
        text = "\n".join(lines[start:]).rstrip("\n")
    return type(error), text


def _outcome(fn, *args):
    """fn's outputs, or its exception as (class, message), and which LSTM ops ran."""
    try:
        result, ran = _ran_ops(fn, *args)
    except Exception as error:  # noqa: BLE001 (compared with nn.LSTM's)
        return _script_error(error), None
    return [t.detach() for t in result], ran


def _script_case_args(args):
    """A test_errors case's arguments as a scripted wrapper takes them, or None where
    TorchScript's types reject the call before it runs (hx not a pair, input not a tensor)."""
    x = args[0]
    if not isinstance(x, (torch.Tensor, PackedSequence)):
        return None
    if len(args) == 1:
        return (PackedNoState if isinstance(x, PackedSequence) else NoState), (x,)
    hx = args[1]
    if not (isinstance(hx, tuple) and len(hx) == 2
            and all(isinstance(t, torch.Tensor) for t in hx)):
        return None
    return (Packed if isinstance(x, PackedSequence) else WithState), (x, *hx)


def _script_error_cases():
    from test_errors import BASE, CASES

    cases = []
    for name, extra, make_args, _ in CASES:
        torch.manual_seed(0)
        if _script_case_args(make_args()) is not None:
            cases.append(pytest.param({**BASE, **extra}, make_args, id=name))
    return cases


@pytest.mark.parametrize("kwargs, make_args", _script_error_cases())
def test_jit_script_raises_like_scripted_nn_lstm(kwargs, make_args):
    """The argument errors test_errors.py checks in eager mode, scripted: wrong input
    dimensions, sizes and dtypes, empty sequences, hidden states of the wrong shape, number of
    dimensions or dtype, packed input: the scripted FusedLSTM raises what the scripted nn.LSTM
    raises (class and message; compiled, nn.LSTM leaves the input's dtype to its C++ code)."""
    wrapper, args = _script_case_args(make_args())
    scripted_plain, scripted_fused = _scripted_pair(wrapper, **kwargs)
    expected, _ = _outcome(scripted_plain, *args)
    got, _ = _outcome(scripted_fused, *args)
    assert isinstance(expected, tuple), "nn.LSTM accepted the call"
    assert got == expected


LAYOUTS = ["batch_first", "time_major", "unbatched", "packed"]


def _layout_args(layout, dtype=F64, state_dtype=None, seq_len=5):
    """Arguments for a scripted wrapper of an LSTM(3, 4, num_layers=2, bidirectional,
    batch_first for "batch_first" and "unbatched") in the given layout, with a state."""
    state_dtype = state_dtype or dtype
    batch = 3
    h, c = randn(4, batch, 4, dtype=state_dtype), randn(4, batch, 4, dtype=state_dtype)
    if layout == "batch_first":
        return randn(batch, seq_len, 3, dtype=dtype), h, c
    if layout == "time_major":
        return randn(seq_len, batch, 3, dtype=dtype), h, c
    if layout == "unbatched":
        return randn(seq_len, 3, dtype=dtype), h[:, 0], c[:, 0]
    x = pack_padded_sequence(randn(seq_len, batch, 3, dtype=dtype),
                             torch.tensor([seq_len, 2, 1]), enforce_sorted=False)
    return x, h, c


def _layout_pair(layout, dtype=F64):
    return _scripted_pair(Packed if layout == "packed" else WithState, input_size=3,
                          hidden_size=4, num_layers=2, bidirectional=True, dtype=dtype,
                          batch_first=layout in ("batch_first", "unbatched"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_jit_script_autocast_runs_nn_lstm(layout):
    """Under autocast, the scripted FusedLSTM hands the call to nn.LSTM's implementation, as
    the eager FusedLSTM does: autocast's dtype and nn.LSTM's values, as the scripted
    nn.LSTM gives them; outside autocast the fused op runs again."""
    scripted_plain, scripted_fused = _layout_pair(layout, F32)
    args = _layout_args(layout, F32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_ran = _outcome(scripted_plain, *args)
        got, ran = _outcome(scripted_fused, *args)
    assert expected_ran == ["aten::lstm"] and ran == ["aten::lstm"]
    if layout != "packed":  # (autocast casts nn.LSTM's padded call only)
        assert expected[0].dtype == torch.bfloat16
    for e, g in zip(expected, got):
        assert g.dtype == e.dtype
        assert_close(g, e)
    got, ran = _outcome(scripted_fused, *args)
    assert ran == ["fused_lstm::lstm"] and got[0].dtype == F32


# (id, the arguments' changes: input dtype, state dtype, sequence length)
FALLBACK_CASES = [
    ("input-float32-weights-float64", dict(dtype=F32, state_dtype=F64)),
    ("input-and-state-float32", dict(dtype=F32)),
    ("state-float32", dict(state_dtype=F32)),
    ("input-int64", dict(dtype=torch.int64)),
    ("empty-sequence", dict(seq_len=0)),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("change", [c[1] for c in FALLBACK_CASES],
                         ids=[c[0] for c in FALLBACK_CASES])
def test_jit_script_calls_the_op_rejects_go_to_nn_lstm(layout, change):
    """Calls the fused op does not take but nn.LSTM's C++ implementation judges (an input or
    state whose dtype is not the weights', an empty sequence): the scripted FusedLSTM gives
    what the scripted nn.LSTM gives, its result or its exception (class and message), never
    the op's."""
    if layout == "packed" and change.get("seq_len") == 0:
        pytest.skip("pack_padded_sequence takes no empty sequence")
    if layout == "packed" and change.get("dtype") == torch.int64:
        pytest.skip("pack_padded_sequence takes no integer input")
    scripted_plain, scripted_fused = _layout_pair(layout, F64)
    if change.get("dtype") == torch.int64:
        args = list(_layout_args(layout, F64))
        args[0] = torch.randint(-3, 3, args[0].shape)
    else:
        args = _layout_args(layout, **change)
    expected, expected_ran = _outcome(scripted_plain, *args)
    got, ran = _outcome(scripted_fused, *args)
    if isinstance(expected, tuple):  # nn.LSTM raised
        assert got == expected
        return
    assert ran == expected_ran == ["aten::lstm"]
    for e, g in zip(expected, got):
        assert g.dtype == e.dtype
        assert_close(g, e)


@pytest.mark.parametrize("wrong", ["h0-batch", "c0-hidden"])
def test_jit_script_packed_equal_lengths_wrong_state_raises_as_eager(wrong):
    """Packed sequences of equal length with a hidden state of the wrong shape, float32: nn.LSTM
    skips its shape check for packed input and its oneDNN kernel then reads and writes past
    the state (no exception to compare with). The scripted FusedLSTM raises the eager
    FusedLSTM's RuntimeError instead of handing the call to it."""
    torch.manual_seed(0)
    lstm = FusedLSTM(3, 5, num_layers=2, dtype=F32)
    scripted = torch.jit.script(Packed(lstm))
    x = pack_padded_sequence(randn(4, 2, 3, dtype=F32), torch.tensor([4, 4]))
    h, c = randn(2, 2, 5, dtype=F32), randn(2, 2, 5, dtype=F32)
    if wrong == "h0-batch":
        h = randn(2, 3, 5, dtype=F32)
    else:
        c = randn(2, 2, 6, dtype=F32)
    with pytest.raises(RuntimeError) as eager:
        lstm(x, (h, c))
    got, _ = _outcome(scripted, x, h, c)
    assert got == (torch.jit.Error, f"builtins.RuntimeError: {eager.value}")


def test_runs_fused_op():
    """fused_lstm::runs_fused, which the scripted forward asks: a kernel for the device type
    (as the eager FusedLSTM's check says) and no autocast."""
    from fused_lstm import module as fused_module

    runs_fused = torch.ops.fused_lstm.runs_fused
    assert runs_fused(torch.device("cpu"))
    for device_type in ("cuda", "meta"):
        assert runs_fused(torch.device(device_type)) == \
            fused_module._fused_kernel_available(device_type)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not runs_fused(torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert runs_fused(torch.device("cpu"))


# --- ONNX export ----------------------------------------------------------------------------
# onnx, onnxscript and onnxruntime are in the `test` extra (pyproject.toml); without them
# these tests skip.


def _onnx_export(model, x, dynamo):
    import onnx

    if dynamo:
        return torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript_exporter", "dynamo_exporter"])
def test_onnx_export_gives_the_standard_lstm_op(dynamo):
    """torch.onnx.export of a FusedLSTM model, without revert: the graph nn.LSTM's model gives
    (ONNX's LSTM op, one per layer), the same warnings, and onnxruntime's outputs match eager;
    torch.export outside ONNX export still records the fused op."""
    pytest.importorskip("onnx")
    if dynamo:
        pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    plain, fused = pair(F32)
    plain.eval()
    fused.eval()
    x = randn(2, 5, 3, dtype=F32)
    plain_graph, plain_warnings = caught(_onnx_export, plain, x, dynamo)
    fused_graph, fused_warnings = caught(_onnx_export, fused, x, dynamo)
    assert type(fused.lstm) is FusedLSTM  # export leaves the model as it was
    assert fused_warnings == plain_warnings
    ops = [n.op_type for n in fused_graph.graph.node]
    assert ops == [n.op_type for n in plain_graph.graph.node]
    assert ops.count("LSTM") == 2

    session = ort.InferenceSession(fused_graph.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    y = randn(2, 5, 3, dtype=F32)  # fresh values, the exported shape
    got = session.run(None, {session.get_inputs()[0].name: y.numpy()})
    with torch.no_grad():
        expected = fused(y)
        assert_close(expected, plain(y), rtol=1e-5, atol=1e-6)
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert_close(torch.from_numpy(g), e, rtol=1e-5, atol=1e-6)

    exported = torch.export.export(fused, (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert "fused_lstm.lstm.default" in targets


class ScriptedWithState(nn.Module):
    """A time-major bidirectional LSTM called with a given state, and a linear head."""

    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        output, (h_n, c_n) = self.lstm(x, (h, c))
        return self.head(output), h_n, c_n


@pytest.mark.parametrize("model_kind", ["batch_first", "with_state"])
def test_onnx_export_of_a_scripted_model_gives_nn_lstm_graph(model_kind):
    """ONNX export (TorchScript exporter) of an already scripted model: the scripted FusedLSTM
    model gives the scripted nn.LSTM model's graph (ONNX's LSTM op, one per layer), and
    onnxruntime's outputs match eager on fresh inputs; the scripted model still runs the fused
    op afterwards."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import onnx

    if model_kind == "batch_first":
        plain, fused = pair(F32)
        args = (randn(2, 5, 3, dtype=F32),)
    else:
        plain = ScriptedWithState(nn.LSTM(3, 4, num_layers=2, bidirectional=True))
        fused = fused_lstm.convert(copy.deepcopy(plain))
        args = (randn(5, 2, 3, dtype=F32), randn(4, 2, 4, dtype=F32), randn(4, 2, 4, dtype=F32))
    plain.eval()
    fused.eval()
    scripted_plain, scripted_fused = torch.jit.script(plain), torch.jit.script(fused)
    graphs, warned = [], []
    for scripted in (scripted_plain, scripted_fused):
        buffer = io.BytesIO()
        _, record = caught(torch.onnx.export, scripted, args, buffer, dynamo=False)
        graphs.append(buffer.getvalue())
        warned.append(set(record))
    assert warned[1] == warned[0]  # the exporter's own warnings (the number of repeats varies)
    expected, got = ([n.op_type for n in onnx.load_from_string(g).graph.node] for g in graphs)
    assert got == expected
    assert got.count("LSTM") == 2

    session = ort.InferenceSession(graphs[1], providers=["CPUExecutionProvider"])
    fresh = tuple(randn(*a.shape, dtype=F32) for a in args)
    outputs = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), fresh)})
    with torch.no_grad():
        eager = plain(*fresh)
        scripted_outputs, ran = _ran_ops(scripted_fused, *fresh)
    assert ran == ["fused_lstm::lstm"]
    assert len(outputs) == len(eager)
    for e, s, o in zip(eager, scripted_outputs, outputs):
        assert_close(s, e, rtol=1e-5, atol=1e-6)
        assert_close(torch.from_numpy(o), e, rtol=1e-5, atol=1e-6)


# --- inference-mode input, in-place edited input --------------------------------------------


def _train_step(model, x, hx):
    """Outputs and weight gradients of a training forward and backward, or the exception."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback to nn.LSTM would warn
            output, (h_n, c_n) = model.lstm(x, hx)
            outs = (model.head(output), h_n, c_n)
            grads = torch.autograd.grad(loss_of(outs), list(model.parameters()))
    except Exception as error:  # noqa: BLE001 (compared with nn.LSTM's)
        return error
    return [o.detach() for o in outs] + list(grads)


@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_inference_mode_input_trains_like_nn_lstm(batch_first, with_state):
    """An input (and state) made under torch.inference_mode, then a training forward and
    backward outside it. nn.LSTM trains on a batch_first input without a state (it saves a
    contiguous copy of the transposed input) and so does FusedLSTM, with nn.LSTM's outputs
    and weight gradients and no warning; where nn.LSTM saves an inference tensor (time-major
    input, a given state) it raises, and FusedLSTM raises the same exception."""
    plain, fused = pair(F64, batch_first)
    shape = (4, 6, 3) if batch_first else (6, 4, 3)
    values = randn(*shape)
    states = (randn(2, 4, 4), randn(2, 4, 4))
    with torch.inference_mode():
        x = values.clone()
        hx = tuple(s.clone() for s in states) if with_state else None
    assert x.is_inference()
    expected = _train_step(plain, x, hx)
    got = _train_step(fused, x, hx)
    if batch_first and not with_state:
        assert not isinstance(expected, Exception), expected
    if isinstance(expected, Exception):
        assert type(got) is type(expected)
        assert str(got).startswith(str(expected))  # (FusedLSTM may add the op's note)
        return
    assert not isinstance(got, Exception), got
    for e, g in zip(expected, got):
        assert_close(g, e)


@pytest.mark.parametrize("input_requires_grad", [False, True], ids=["data", "differentiable"])
def test_batch_first_input_edited_in_place_after_forward(input_requires_grad):
    """A batch_first input edited in place between forward and backward: nn.LSTM's gradients
    are those of the values at forward time, and so are FusedLSTM's (no error)."""
    plain, fused = pair(F64, batch_first=True)
    values = randn(4, 6, 3)
    results = []
    for model in (plain, fused):
        leaf = values.clone().requires_grad_(input_requires_grad)
        x = leaf * 1.0 if input_requires_grad else leaf  # a non-leaf may be edited in place
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            outs = model(x)
            x.add_(randn(*x.shape))
            wrt = [leaf, *model.parameters()] if input_requires_grad else list(model.parameters())
            grads = torch.autograd.grad(loss_of(outs), wrt)
        results.append(([o.detach() for o in outs], grads))
    # The gradients at the forward-time values, without any edit.
    x = values.clone().requires_grad_(input_requires_grad)
    outs = plain(x)
    wrt = [x, *plain.parameters()] if input_requires_grad else list(plain.parameters())
    unedited = torch.autograd.grad(loss_of(outs), wrt)
    (expected, expected_grads), (got, got_grads) = results
    for e, u in zip(expected_grads, unedited):
        assert_close(e, u)  # nn.LSTM: the forward-time values
    for e, g in zip(expected + list(expected_grads), got + list(got_grads)):
        assert_close(g, e)


@pytest.mark.parametrize("layout", ["time_major", "unbatched"])
def test_contiguous_input_edited_in_place_raises_as_nn_lstm(layout):
    """A time-major (or unbatched) input is saved as it is, by nn.LSTM too: an in-place edit
    before backward raises autograd's RuntimeError for both."""
    for lstm_class in (nn.LSTM, FusedLSTM):
        torch.manual_seed(0)
        lstm = lstm_class(3, 4, num_layers=2, dtype=F64)
        leaf = randn(6, 4, 3) if layout == "time_major" else randn(6, 3)
        leaf.requires_grad_()
        x = leaf * 1.0
        output, _ = lstm(x)
        x.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            output.sum().backward()


def test_batch_first_double_backward_reaches_the_input():
    """The saved copy of a batch_first input is made through autograd: double backward
    (create_graph=True) still reaches the caller's tensor (gradgradcheck, float64)."""
    torch.manual_seed(0)
    lstm = FusedLSTM(2, 3, num_layers=2, batch_first=True, dtype=F64)
    x = randn(2, 3, 2).requires_grad_()

    def fn(x):
        output, (h_n, c_n) = lstm(x)
        return output, h_n, c_n

    assert torch.autograd.gradgradcheck(fn, (x,))
