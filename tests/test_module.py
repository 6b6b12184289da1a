"""FusedLSTM against torch.nn.LSTM: same results, same gradients, same module behaviour."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from torch.testing import assert_close

import fused_lstm
from fused_lstm import FusedLSTM, FusedLSTMFallbackWarning
from fused_lstm import module as fused_module

from helpers import (
    load_reference,
    lstm_pair,
    make_input,
    make_state,
    randn,
    run_and_grad,
)

# A fallback to nn.LSTM's implementation would make every parity test below pass vacuously.
pytestmark = pytest.mark.filterwarnings("error::fused_lstm.FusedLSTMFallbackWarning")

F32, F64 = torch.float32, torch.float64
INPUT_SIZE, HIDDEN, PROJ, SEQ_LEN, BATCH = 3, 5, 2, 5, 4


# --- the configuration grid ------------------------------------------------------------------

FACTORS = {
    "num_layers": [1, 2, 3],
    "bias": [True, False],
    "bidirectional": [False, True],
    "proj_size": [0, PROJ],
    "batch_first": [False, True],
    "layout": ["padded", "packed_sorted", "packed_unsorted", "unbatched"],
    "state": ["given", "none"],
    "dtype": [F32, F64],
}


def _pairwise(factors):
    """A small set of configurations that covers every pair of values of any two factors
    (greedy covering array; deterministic)."""
    names = list(factors)
    uncovered = {
        (a, va, b, vb)
        for a, b in itertools.combinations(range(len(names)), 2)
        for va in range(len(factors[names[a]]))
        for vb in range(len(factors[names[b]]))
    }
    candidates = list(itertools.product(*(range(len(factors[n])) for n in names)))
    chosen = []
    while uncovered:
        def gain(row):
            return sum((a, row[a], b, row[b]) in uncovered
                       for a, b in itertools.combinations(range(len(names)), 2))
        best = max(candidates, key=gain)
        uncovered -= {(a, best[a], b, best[b]) for a, b in itertools.combinations(range(len(names)), 2)}
        chosen.append({n: factors[n][i] for n, i in zip(names, best)})
    return chosen


def _config_id(config):
    return "-".join([
        f"L{config['num_layers']}",
        "bias" if config["bias"] else "nobias",
        "bi" if config["bidirectional"] else "uni",
        f"proj{config['proj_size']}",
        "bf" if config["batch_first"] else "tm",
        config["layout"],
        "hx" if config["state"] == "given" else "nohx",
        str(config["dtype"]).replace("torch.", ""),
    ])


# Every pair of option values, plus the full structural grid (layers x bias x direction x
# projection x layout) in float64 with the remaining options cycling.
_STRUCTURAL = [
    dict(num_layers=layers, bias=bias, bidirectional=bidir, proj_size=proj, layout=layout,
         batch_first=bool(i % 2), state="given" if (i // 2) % 2 else "none", dtype=F64)
    for i, (layers, bias, bidir, proj, layout) in enumerate(itertools.product(
        FACTORS["num_layers"], FACTORS["bias"], FACTORS["bidirectional"], FACTORS["proj_size"],
        FACTORS["layout"]))
]
GRID = list({_config_id(c): c for c in _pairwise(FACTORS) + _STRUCTURAL}.values())


def _assert_same_grads(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        if expected[name] is None:
            assert got[name] is None, name
        else:
            assert got[name] is not None, name
            assert_close(got[name], expected[name], msg=lambda m: f"gradient of {name}: {m}")


@pytest.mark.parametrize("config", GRID, ids=_config_id)
def test_matches_nn_lstm(config):
    config = dict(config)
    layout, state, dtype = config.pop("layout"), config.pop("state"), config.pop("dtype")
    torch_lstm, fused = lstm_pair(input_size=INPUT_SIZE, hidden_size=HIDDEN, dtype=dtype, **config)
    inp, leaf = make_input(fused, layout, seq_len=SEQ_LEN, batch=BATCH, dtype=dtype)
    hx = (make_state(fused, BATCH, dtype, unbatched=layout == "unbatched")
          if state == "given" else None)

    out, h_n, c_n, grads, upstream = run_and_grad(fused, inp, leaf, hx)
    expected_out, expected_h, expected_c, expected_grads, _ = run_and_grad(
        torch_lstm, inp, leaf, hx, upstream=upstream)

    assert_close(out, expected_out)
    assert_close(h_n, expected_h)
    assert_close(c_n, expected_c)
    _assert_same_grads(grads, expected_grads)


def test_grid_covers_every_option_value():
    for name, values in FACTORS.items():
        assert {str(c[name]) for c in GRID} == {str(v) for v in values}, name


@pytest.mark.parametrize("layout", ["padded", "packed_unsorted", "unbatched"])
def test_return_types_and_layouts_match(layout):
    torch_lstm, fused = lstm_pair(input_size=INPUT_SIZE, hidden_size=HIDDEN, num_layers=2,
                                  batch_first=True, bidirectional=True, dtype=F64)
    inp, _ = make_input(fused, layout, seq_len=SEQ_LEN, batch=BATCH, dtype=F64)
    expected_out, expected_state = torch_lstm(inp)
    out, state = fused(inp)
    assert type(out) is type(expected_out)
    assert type(state) is tuple and len(state) == 2
    if isinstance(out, PackedSequence):
        assert torch.equal(out.batch_sizes, expected_out.batch_sizes)
        assert torch.equal(out.sorted_indices, expected_out.sorted_indices)
        assert torch.equal(out.unsorted_indices, expected_out.unsorted_indices)
        out, expected_out = out.data, expected_out.data
    assert out.shape == expected_out.shape
    assert out.stride() == expected_out.stride()  # batch_first output is a transposed view too
    for got, expected in zip(state, expected_state):
        assert got.shape == expected.shape


# --- precision --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_low_precision_error_within_twice_nn_lstm(dtype, bidirectional):
    """bf16 keeps 8 significant bits, f16 11: both implementations round. The rule (as in
    flash-attention's tests): our distance to the float64 result is at most twice nn.LSTM's
    distance in the same dtype, plus the dtype's machine epsilon (one unit in the last place at
    magnitude 1, where these outputs live), the rounding either implementation may legitimately
    do differently in a single element."""
    kwargs = dict(input_size=8, hidden_size=16, num_layers=2, bidirectional=bidirectional,
                  proj_size=0)
    torch_lstm, fused = lstm_pair(dtype=dtype, **kwargs)
    exact = nn.LSTM(dtype=F64, **kwargs)
    exact.load_state_dict(torch_lstm.state_dict())  # the low-precision weights, held exactly
    x = randn(12, 6, 8, dtype=dtype)
    hx = tuple(t.detach() for t in make_state(fused, 6, dtype))
    with torch.no_grad():
        expected = exact(x.double(), tuple(t.double() for t in hx))
        ours = fused(x, hx)
        theirs = torch_lstm(x, hx)
    for name, e, o, t in zip(("output", "h_n", "c_n"), (expected[0], *expected[1]),
                             (ours[0], *ours[1]), (theirs[0], *theirs[1])):
        assert o.dtype == dtype
        our_error = (o.double() - e).abs().max().item()
        their_error = (t.double() - e).abs().max().item()
        assert our_error <= 2 * their_error + torch.finfo(dtype).eps, (name, our_error, their_error)


def test_is_an_nn_lstm_with_the_same_repr():
    torch_lstm, fused = lstm_pair(input_size=4, hidden_size=6, num_layers=2, dropout=0.25,
                                  bidirectional=True, proj_size=3, batch_first=True)
    assert isinstance(fused, nn.LSTM)
    assert repr(fused) == repr(torch_lstm).replace("LSTM", "FusedLSTM", 1)


def test_state_dict_loads_both_ways():
    kwargs = dict(input_size=4, hidden_size=6, num_layers=2, bidirectional=True, proj_size=3)
    torch_lstm, fused = nn.LSTM(**kwargs), FusedLSTM(**kwargs)
    assert list(fused.state_dict()) == list(torch_lstm.state_dict())
    fused.load_state_dict(torch_lstm.state_dict(), strict=True)
    for name, value in torch_lstm.state_dict().items():
        assert torch.equal(fused.state_dict()[name], value)

    fresh_fused, fresh_torch = FusedLSTM(**kwargs), nn.LSTM(**kwargs)
    fresh_torch.load_state_dict(fresh_fused.state_dict(), strict=True)
    x = randn(5, 2, 4, dtype=F32)
    assert_close(fresh_torch(x)[0], fresh_fused(x)[0])


def test_all_weights_flat_weights_and_flatten_parameters():
    torch_lstm, fused = lstm_pair(input_size=4, hidden_size=6, num_layers=2, bidirectional=True,
                                  proj_size=3)
    assert fused._flat_weights_names == torch_lstm._flat_weights_names
    assert [w is getattr(fused, n) for w, n in
            zip(fused._flat_weights, fused._flat_weights_names)] == [True] * 20
    assert [[w.shape for w in ws] for ws in fused.all_weights] == \
        [[w.shape for w in ws] for ws in torch_lstm.all_weights]
    assert all(w is getattr(fused, n) for ws, names in zip(fused.all_weights, fused._all_weights)
               for w, n in zip(ws, names))
    x = randn(5, 2, 4)
    before = fused(x)[0]
    fused.flatten_parameters()
    assert_close(fused(x)[0], before)
    assert_close(fused(x)[0], torch_lstm(x)[0])


def test_dtype_conversion_after_construction():
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, num_layers=2, dtype=F32)
    torch_lstm.double()
    fused.double()
    x = randn(4, 2, 3)
    assert_close(fused(x)[0], torch_lstm(x)[0])


def test_reassigned_weight_is_used():
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, num_layers=2)
    new = nn.Parameter(randn(16, 4))
    torch_lstm.weight_hh_l1 = new
    fused.weight_hh_l1 = new
    x = randn(4, 2, 3)
    assert_close(fused(x)[0], torch_lstm(x)[0])
    (fused(x)[0].sum()).backward()
    expected = new.grad.clone()
    new.grad = None
    (torch_lstm(x)[0].sum()).backward()
    assert_close(expected, new.grad)


def test_tied_weights_share_gradients():
    """weight_hh is [4H, H] in every layer: tie layer 1's to layer 0's."""
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, num_layers=3)
    for m in (torch_lstm, fused):
        m.weight_hh_l1 = m.weight_hh_l0
        m.weight_hh_l2 = m.weight_hh_l0
    assert len(list(fused.parameters())) == len(list(torch_lstm.parameters())) == 10
    x = randn(6, 2, 3)
    grads = [torch.autograd.grad(m(x)[0].pow(2).sum(), m.weight_hh_l0)[0]
             for m in (fused, torch_lstm)]
    assert_close(*grads)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing(reentrant):
    """torch.utils.checkpoint around the module: FusedLSTM's results and gradients are
    nn.LSTM's under the same checkpointing, with no warning; non-reentrant, they are the plain
    call's (the same dropout mask: checkpoint restores the RNG state). Non-reentrant
    checkpointing stops its recomputation by raising from a saved-tensor hook inside the op's
    call, which must reach checkpoint (not be taken for the op rejecting the call). float64
    (the general kernels) and a float32 streaming step (the few-row backward, its weight
    gradients apart)."""
    from torch.utils.checkpoint import checkpoint

    cases = ((F64, 5, 3, 0.0), (F64, 5, 3, 0.3), (F32, 1, 2, 0.0), (F32, 1, 2, 0.3))
    for dtype, T, B, p in cases:
        torch_lstm, fused = lstm_pair(input_size=3, hidden_size=16, num_layers=2, dropout=p,
                                      dtype=dtype)
        x = randn(T, B, 3, dtype=dtype)
        hx = tuple(t.detach() for t in make_state(torch_lstm, B, dtype=dtype))
        results = {}
        for name, module in (("nn", torch_lstm), ("fused", fused)):
            for checkpointed in (False, True):
                torch.manual_seed(7)
                leaf = x.clone().requires_grad_()
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    if checkpointed:
                        out, (h, c) = checkpoint(module, leaf, hx, use_reentrant=reentrant)
                    else:
                        out, (h, c) = module(leaf, hx)
                    module.zero_grad(set_to_none=True)
                    (out.pow(2).sum() + (h * c).sum()).backward()  # (reentrant: no .grad())
                grads = [leaf.grad, *(q.grad for q in module.parameters())]
                results[name, checkpointed] = [out, *grads]
        # Non-reentrant: the plain call's output and gradients, bit for bit. (Reentrant
        # checkpointing tracks only the tensors returned at the top level, not the (h_n, c_n)
        # pair, so the loss's h * c term gives no gradient there, nn.LSTM's as well as ours:
        # compared with nn.LSTM below.)
        if not reentrant:
            for a, b in zip(results["fused", True], results["fused", False]):
                assert torch.equal(a, b)
        if p == 0:  # (the two implementations draw their dropout masks differently)
            tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == F32 else {}
            for a, b in zip(results["fused", True], results["nn", True]):
                assert_close(a, b, **tol)


def test_functional_call_with_other_weights():
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    params = {n: randn(*p.shape).requires_grad_() for n, p in fused.named_parameters()}
    x = randn(5, 2, 3)
    ours = torch.func.functional_call(fused, params, (x,))
    theirs = torch.func.functional_call(torch_lstm, params, (x,))
    assert_close(ours[0], theirs[0])
    assert_close(torch.autograd.grad(ours[0].sum(), list(params.values())),
                 torch.autograd.grad(theirs[0].sum(), list(params.values())))
    assert_close(fused(x)[0], torch_lstm(x)[0])  # back to the module's own weights


def test_weight_norm_parametrization():
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, num_layers=2)
    for m in (torch_lstm, fused):
        torch.nn.utils.parametrizations.weight_norm(m, "weight_hh_l0")
    assert list(fused.state_dict()) == list(torch_lstm.state_dict())
    fused.load_state_dict(torch_lstm.state_dict())
    x = randn(6, 2, 3)

    def grads(m):
        out, (h, c) = m(x)
        loss = out.pow(2).sum() + h.sum() + c.sum()
        params = dict(m.named_parameters())
        return out, torch.autograd.grad(loss, list(params.values())), list(params)

    out, ours, names = grads(fused)
    expected_out, theirs, expected_names = grads(torch_lstm)
    assert names == expected_names
    assert "parametrizations.weight_hh_l0.original0" in names
    assert_close(out, expected_out)
    assert_close(ours, theirs)


# --- dropout ----------------------------------------------------------------------------------

def test_dropout_has_no_effect_in_eval_mode():
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, num_layers=3, dropout=0.5)
    torch_lstm.eval()
    fused.eval()
    x = randn(5, 2, 3, requires_grad=True)
    ours, theirs = fused(x), torch_lstm(x)
    assert_close(ours, theirs)
    assert_close(torch.autograd.grad(ours[0].sum(), x), torch.autograd.grad(theirs[0].sum(), x))


def test_dropout_in_training_is_random_finite_and_seedable():
    fused = FusedLSTM(3, 4, num_layers=3, dropout=0.5, dtype=F64)
    x = randn(5, 2, 3)
    first, second = fused(x)[0], fused(x)[0]
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    assert not torch.equal(first, second)
    torch.manual_seed(1234)
    again = fused(x)
    torch.manual_seed(1234)
    once_more = fused(x)
    assert torch.equal(again[0], once_more[0])
    assert torch.equal(again[1][0], once_more[1][0]) and torch.equal(again[1][1], once_more[1][1])


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_dropout_is_the_reference_with_a_bernoulli_mask(packed):
    """In training, layer k+1 sees layer k's output times a mask of 0 and 1/(1-p) drawn from
    torch's generator (Bernoulli(1-p) per element)."""
    reference = load_reference()
    p = 0.3
    fused = FusedLSTM(3, 4, num_layers=3, dropout=p, bidirectional=True, proj_size=2, dtype=F64)
    inp, _ = make_input(fused, "packed_unsorted" if packed else "padded", seq_len=SEQ_LEN,
                        batch=BATCH, dtype=F64)
    data = inp.data if packed else inp
    torch.manual_seed(99)
    output, (h_n, c_n) = fused(inp)
    torch.manual_seed(99)
    mask = torch.empty(2, *data.shape[:-1], 4, dtype=F64).bernoulli_(1 - p).div_(1 - p)
    assert 0 < (mask == 0).double().mean() < 1
    expected = reference.lstm_forward(data, inp.batch_sizes if packed else None, None, None,
                                      fused._flat_weights, mask, 3, True, True, 2)
    if packed:
        expected = (expected[0], expected[1].index_select(1, inp.unsorted_indices),
                    expected[2].index_select(1, inp.unsorted_indices))
    assert_close(output.data if packed else output, expected[0])
    assert_close(h_n, expected[1])
    assert_close(c_n, expected[2])


def test_dropout_one_zeroes_the_upper_layers_input():
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, num_layers=2, dropout=1.0)
    x = randn(5, 2, 3, requires_grad=True)
    out, (h_n, c_n) = fused(x)
    top = nn.LSTM(4, 4, dtype=F64)
    with torch.no_grad():
        for name, param in zip(top._flat_weights_names, top._flat_weights):
            param.copy_(getattr(fused, name.replace("_l0", "_l1")))
    expected_out, (expected_h, _) = top(torch.zeros(5, 2, 4, dtype=F64))
    assert_close(out, expected_out)
    assert_close(h_n[1:], expected_h)
    # nn.LSTM's dropout(p=1) is deterministic too: the same results and gradients.
    theirs = torch_lstm(x)
    assert_close(out, theirs[0])
    assert_close(c_n, theirs[1][1])
    assert_close(torch.autograd.grad(out.sum() + c_n.sum(), x)[0],
                 torch.autograd.grad(theirs[0].sum() + theirs[1][1].sum(), x)[0])


# --- autograd ---------------------------------------------------------------------------------

def test_backward_in_eval_mode_and_frozen_weights():
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    for m in (torch_lstm, fused):
        m.eval()
        m.requires_grad_(False)
    x = randn(5, 2, 3, requires_grad=True)
    hx = make_state(fused, 2, F64)
    ours = torch.autograd.grad(fused(x, hx)[0].sum(), (x, *hx))
    theirs = torch.autograd.grad(torch_lstm(x, hx)[0].sum(), (x, *hx))
    assert_close(ours, theirs)


def test_inference_under_no_grad_and_inference_mode():
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, num_layers=2)
    x = randn(5, 2, 3)
    with torch.no_grad():
        out, (h_n, _) = fused(x)
    assert out.grad_fn is None and h_n.grad_fn is None
    with torch.inference_mode():
        inf_out = fused(x)[0]
        assert_close(inf_out, torch_lstm(x)[0])
    assert_close(out, inf_out)


@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "eval_no_grad"])
@pytest.mark.parametrize("entry", ["cpp", "python"])
def test_no_grad_call_goes_straight_to_the_inference_op(batch_first, with_state, mode, entry,
                                                         monkeypatch):
    """Without grad, a plain batched call is ONE fused_lstm::lstm call that chose
    lstm_inference, with nn.LSTM's results: the C++ entry's (csrc/python_entry.cpp), which
    calls the op's kernel itself and not ops.lstm, or without the entry, the Python path's one
    ops.lstm call. The profiler sees the same events either way."""
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, num_layers=2, dropout=0.3,
                                  bidirectional=True, batch_first=batch_first)
    if mode == "eval_no_grad":  # in training mode, dropout needs the full path (its mask)
        torch_lstm.eval(), fused.eval()
    else:
        torch_lstm.dropout = fused.dropout = 0.0
    calls = []
    real = fused_module._lstm_op
    if entry == "cpp":
        assert fused_module._fast_forward is not None
        monkeypatch.setattr(fused_module, "_lstm_op", lambda *a: pytest.fail("Python path taken"))
    else:
        monkeypatch.setattr(fused_module, "_fast_forward", None)
        monkeypatch.setattr(fused_module, "_lstm_op", lambda *a: calls.append(a) or real(*a))
    x = randn(2, 5, 3) if batch_first else randn(5, 2, 3)
    hx = make_state(fused, 2, F64) if with_state else None
    context = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with context:
        with torch.profiler.profile() as prof:
            ours = fused(x, hx)
        theirs = torch_lstm(x, hx)
    assert len(calls) == (1 if entry == "python" else 0)
    names = [e.name for e in prof.events() if e.name.startswith("fused_lstm::")]
    assert names == ["fused_lstm::lstm", "fused_lstm::lstm_inference"]
    assert_close(ours, theirs)
    assert ours[0].shape == theirs[0].shape
    assert type(ours) is tuple and type(ours[1]) is tuple


class _NoteCalls(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    pass


class _Double(nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_cpp_entry_declines_every_call_that_is_not_plain():
    """The C++ entry answers None (and leaves the call to the Python path, which decides and
    raises nn.LSTM's exceptions) for anything but a plain call, and never computes such a call
    itself. A plain call the op rejects raises the op's own exception (which FusedLSTM hands
    to the Python path as the op's answer)."""
    entry = fused_module._fast_forward
    fused = FusedLSTM(3, 4, num_layers=2, dtype=F64).eval()
    x = randn(5, 2, 3)
    with torch.no_grad():
        assert type(entry(fused, x, None)) is tuple  # the plain call, for contrast
        cases = {
            "2-D input": (fused, randn(5, 3), None),
            "input subclass": (fused, x.as_subclass(_Subclass), None),
            "not a tensor": (fused, x.tolist(), None),
            "hx a list": (fused, x, list(make_state(fused, 2, F64))),
            "hx of three": (fused, x, (*make_state(fused, 2, F64), randn(1))),
            "hx not tensors": (fused, x, (1, 2)),
            "not a module": (object(), x, None),
        }
        for name, args in cases.items():
            assert entry(*args) is None, name
        rejected = {
            "wrong input size": (fused, randn(5, 2, 4), None),
            "wrong dtype": (fused, randn(5, 2, 3).float(), None),
            "wrong hx shape": (fused, x, (randn(2, 3, 4), randn(2, 3, 4))),
            "empty sequence": (fused, randn(0, 2, 3), None),
        }
        for name, args in rejected.items():
            with pytest.raises((RuntimeError, ValueError), match="^fused_lstm: "):
                entry(*args)
        with _NoteCalls():
            assert entry(fused, x, None) is None, "torch function mode"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert entry(fused, x, None) is None, "autocast"
        dropping = FusedLSTM(3, 4, num_layers=2, dropout=0.5, dtype=F64)  # training mode
        assert entry(dropping, x, None) is None, "dropout mask to draw"
        dropping.eval()
        assert type(entry(dropping, x, None)) is tuple
        # A Parameter put into _parameters directly (nn.LSTM's __setattr__ not called): not
        # the one in _flat_weights, which the Python path then updates.
        replaced = nn.Parameter(randn(16, 4))
        fused._parameters["weight_hh_l1"] = replaced
        assert entry(fused, x, None) is None, "weight replaced in _parameters"
        fused(x)
        assert fused._flat_weights[fused._flat_weights_names.index("weight_hh_l1")] is replaced
        assert type(entry(fused, x, None)) is tuple
        # A parametrized weight is not the Parameter in _flat_weights: the Python path
        # recomputes it on every call.
        parametrize.register_parametrization(fused, "weight_hh_l1", _Double())
        assert entry(fused, x, None) is None, "parametrized weight"
    with pytest.raises(TypeError):
        entry(fused, x)


@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
@pytest.mark.parametrize("grads", ["all", "weights_only", "input_only", "h0_only", "c0_only"])
def test_training_call_goes_through_the_cpp_entry(batch_first, grads, monkeypatch):
    """With grad, a plain call is also the C++ entry's (not the Python full path): lstm_forward
    through the dispatcher, whose autograd kernel records the graph; nn.LSTM's results and
    gradients, whichever leaves require grad."""
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, num_layers=2,
                                  bidirectional=True, batch_first=batch_first)
    monkeypatch.setattr(fused_module, "_lstm_op", lambda *a: pytest.fail("full path taken"))
    if grads not in ("all", "weights_only"):
        for module in (torch_lstm, fused):
            module.requires_grad_(False)
    x = randn(2, 5, 3) if batch_first else randn(5, 2, 3)
    hx = make_state(fused, 2, F64)
    wanted = {"all": "x h0 c0", "weights_only": "", "input_only": "x", "h0_only": "h0",
              "c0_only": "c0"}[grads].split()
    leaves = [t.requires_grad_(name in wanted) for name, t in zip(("x", "h0", "c0"), (x, *hx))]
    ours, theirs = fused(x, hx), torch_lstm(x, hx)
    assert_close(ours, theirs)
    wrt = [t for t in (*leaves, *fused.parameters()) if t.requires_grad]
    wrt_theirs = [t for t in (*leaves, *torch_lstm.parameters()) if t.requires_grad]
    loss = lambda out: out[0].pow(2).sum() + out[1][0].sum() + out[1][1].pow(2).sum()  # noqa: E731
    assert_close(torch.autograd.grad(loss(ours), wrt), torch.autograd.grad(loss(theirs), wrt_theirs))


def test_cpp_entry_without_anything_requiring_grad_stores_nothing():
    """Grad mode on but no leaf requiring grad: lstm_inference (fused_lstm::lstm's rule), no
    graph."""
    fused = FusedLSTM(3, 4, num_layers=2, dtype=F64).requires_grad_(False)
    with torch.profiler.profile() as prof:
        out, (h_n, c_n) = fused(randn(5, 2, 3))
    names = [e.name for e in prof.events()]
    assert "fused_lstm::lstm_inference" in names and "fused_lstm::lstm_forward" not in names
    assert out.grad_fn is None and h_n.grad_fn is None


def test_cpp_entry_sees_reassigned_and_updated_weights():
    """The entry reads the module's weights on every call: a reassigned Parameter (nn.LSTM's
    __setattr__ puts it into _flat_weights) and an in-place update are both used at once."""
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, num_layers=2)
    fused.eval(), torch_lstm.eval()
    x = randn(5, 2, 3)
    entry = fused_module._fast_forward
    with torch.no_grad():
        first = entry(fused, x, None)
        assert_close(first, torch_lstm(x))
        new = randn(16, 4)
        fused.weight_hh_l1 = nn.Parameter(new.clone())
        torch_lstm.weight_hh_l1 = nn.Parameter(new.clone())
        second = entry(fused, x, None)
        assert_close(second, torch_lstm(x))
        fused.bias_ih_l0.add_(1.0), torch_lstm.bias_ih_l0.add_(1.0)
        third = entry(fused, x, None)
        assert_close(third, torch_lstm(x))
    assert not torch.allclose(first[0], second[0]) and not torch.allclose(second[0], third[0])


def test_no_grad_training_dropout_takes_the_full_path(monkeypatch):
    """Dropout in training mode needs its mask even without grad: that call is not short-cut."""
    fused = FusedLSTM(3, 4, num_layers=2, dropout=0.5, dtype=F64)
    masks = []
    op = fused_module._lstm_op
    monkeypatch.setattr(fused_module, "_lstm_op", lambda *a: masks.append(a[5]) or op(*a))
    with torch.no_grad():
        fused(randn(5, 2, 3))
    assert len(masks) == 1 and masks[0] is not None


def test_retain_graph_gives_the_same_gradients_twice():
    fused = FusedLSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, dtype=F64)
    x = randn(5, 2, 3, requires_grad=True)
    out, (h_n, c_n) = fused(x)
    loss = out.pow(2).sum() + h_n.sum() + c_n.sum()
    params = [x, *fused.parameters()]
    first = torch.autograd.grad(loss, params, retain_graph=True)
    second = torch.autograd.grad(loss, params)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_gradients_only_through_some_outputs():
    """Upstream gradient for output only, for h_n only, for c_n only."""
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, num_layers=2, proj_size=2)
    x = randn(5, 2, 3, requires_grad=True)
    for pick in range(3):
        ours = fused(x)
        theirs = torch_lstm(x)
        ours, theirs = (ours[0], *ours[1])[pick], (theirs[0], *theirs[1])[pick]
        assert_close(torch.autograd.grad(ours.sum(), x), torch.autograd.grad(theirs.sum(), x))


def test_double_backward_matches_nn_lstm_and_gradgradcheck():
    torch_lstm, fused = lstm_pair(input_size=2, hidden_size=3, num_layers=2, bidirectional=True,
                                  proj_size=1)
    x = randn(3, 2, 2, requires_grad=True)
    hx = make_state(fused, 2, F64)
    second = []
    for m in (fused, torch_lstm):
        out, (h_n, c_n) = m(x, hx)
        loss = out.pow(2).sum() + h_n.sum() + c_n.pow(2).sum()
        first = torch.autograd.grad(loss, (x, *hx, m.weight_hh_l0), create_graph=True)
        penalty = sum(g.pow(2).sum() for g in first)
        second.append(torch.autograd.grad(penalty, (x, *hx, m.weight_ih_l1)))
    assert_close(second[0], second[1])

    names = [n for n, _ in fused.named_parameters()]

    def fn(x, h0, c0, *weights):
        out, (h_n, c_n) = torch.func.functional_call(fused, dict(zip(names, weights)),
                                                     (x, (h0, c0)))
        return out, h_n, c_n

    weights = [p.detach().clone().requires_grad_() for p in fused.parameters()]
    small_x = randn(2, 1, 2, requires_grad=True)
    small_hx = make_state(fused, 1, F64)
    assert torch.autograd.gradgradcheck(fn, (small_x, *small_hx, *weights), fast_mode=True)


# --- inputs -----------------------------------------------------------------------------------

def test_non_contiguous_inputs_and_states():
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, num_layers=2, bidirectional=True,
                                  batch_first=True)
    base = randn(6, 10, 3, requires_grad=True)
    x = base[:, ::2]  # [6, 5, 3] with a step
    assert not x.is_contiguous()
    h_base = randn(6, 4, 4, requires_grad=True)  # [B, L*D, H]: transposed below
    c_base = randn(4, 6, 8, requires_grad=True)
    hx = (h_base.transpose(0, 1), c_base[:, :, ::2])
    assert not hx[0].is_contiguous() and not hx[1].is_contiguous()
    ours = fused(x, hx)
    theirs = torch_lstm(x, hx)
    contiguous = fused(x.contiguous(), tuple(t.contiguous() for t in hx))
    for a, b, c in zip((ours[0], *ours[1]), (theirs[0], *theirs[1]),
                       (contiguous[0], *contiguous[1])):
        assert_close(a, b)
        assert_close(a, c)
    assert_close(torch.autograd.grad(ours[0].sum() + ours[1][1].sum(), (base, h_base, c_base)),
                 torch.autograd.grad(theirs[0].sum() + theirs[1][1].sum(),
                                     (base, h_base, c_base)))


def test_expanded_input_and_non_contiguous_weights():
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, num_layers=2)
    for m in (torch_lstm, fused):  # the same values, held transposed
        m.weight_hh_l1 = nn.Parameter(m.weight_hh_l1.detach().t().contiguous().t())
        m.weight_ih_l0 = nn.Parameter(torch.cat([m.weight_ih_l0.detach()] * 2, 1)[:, ::2])
        assert not m.weight_hh_l1.is_contiguous() and not m.weight_ih_l0.is_contiguous()
    step = randn(1, 2, 3, requires_grad=True)
    x = step.expand(6, 2, 3)  # stride 0 along time
    ours, theirs = fused(x), torch_lstm(x)
    assert_close(ours, theirs)
    params = (step, fused.weight_hh_l1, fused.weight_ih_l0)
    expected_params = (step, torch_lstm.weight_hh_l1, torch_lstm.weight_ih_l0)
    assert_close(torch.autograd.grad(ours[0].pow(2).sum(), params),
                 torch.autograd.grad(theirs[0].pow(2).sum(), expected_params))


@pytest.mark.parametrize("layout", ["padded", "packed_unsorted", "unbatched"])
def test_one_op_call_per_forward(layout, monkeypatch):
    """The whole stack (3 layers, both directions, dropout) is ONE call of the fused op."""
    calls = []
    op = fused_module._lstm_op

    def counting_op(*args):
        calls.append(args)
        return op(*args)

    monkeypatch.setattr(fused_module, "_lstm_op", counting_op)
    fused = FusedLSTM(3, 4, num_layers=3, bidirectional=True, dropout=0.2, dtype=F64)
    inp, _ = make_input(fused, layout, seq_len=SEQ_LEN, batch=BATCH, dtype=F64)
    with torch.profiler.profile() as prof:
        output = fused(inp)
    assert len(calls) == 1
    mask = calls[0][5]
    assert mask.shape == (2, *calls[0][0].shape[:-1], 8)
    fused.eval()  # no mask: the C++ entry's call (padded input), else the Python path's
    with torch.profiler.profile() as eval_prof:
        fused(inp)
    for profile in (prof, eval_prof):
        names = [e.name for e in profile.events()]
        assert names.count("fused_lstm::lstm_forward") == 1 and "aten::lstm" not in names
    if layout == "padded":
        assert len(calls) == 1
    else:
        assert len(calls) == 2 and calls[1][5] is None
    assert output is not None


@pytest.mark.parametrize("batch_first", [False, True])
def test_zero_batch(batch_first):
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=5, num_layers=2, bidirectional=True,
                                  proj_size=2, batch_first=batch_first)
    x = randn(0, 4, 3) if batch_first else randn(4, 0, 3)
    x.requires_grad_()
    for hx in (None, make_state(fused, 0, F64)):
        ours, theirs = fused(x, hx), torch_lstm(x, hx)
        for a, b in zip((ours[0], *ours[1]), (theirs[0], *theirs[1])):
            assert a.shape == b.shape and a.dtype == b.dtype
        grad = torch.autograd.grad(ours[0].sum() + ours[1][0].sum(), x)[0]
        assert grad.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_zero_batch_weight_gradients_are_zero(dtype):
    """An empty batch at a size that takes the row-wise kernels (and the bf16 products for
    bf16): every weight gradient is zero, as nn.LSTM's, whatever the recycled buffers held."""
    torch_lstm, fused = lstm_pair(input_size=24, hidden_size=32, num_layers=2,
                                  bidirectional=True, dtype=dtype)
    warm = randn(5, 7, 24, dtype=dtype)
    fused(warm)[0].sum().backward()  # leaves non-zero data in the cached buffers
    x = randn(5, 0, 24, dtype=dtype).requires_grad_()
    for module in (fused, torch_lstm):
        output = module(x)[0]
        grads = torch.autograd.grad(output.sum(), [x, *module.parameters()])
        assert grads[0].shape == x.shape
        for g, p in zip(grads[1:], module.parameters()):
            assert g.shape == p.shape and g.dtype == p.dtype
            assert torch.equal(g, torch.zeros_like(p))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_zero_batch_16bit_inference(dtype):
    """Inference of an empty batch in 16 bits at a size that takes the row-wise kernels, whose
    16-bit output the steps write in its dtype (CpuPlan::output_16bit): results shaped and typed
    as nn.LSTM's, with no warning (an empty output has no data pointer; the op once rejected
    it, and nn.LSTM ran with the fallback warning)."""
    torch_lstm, fused = lstm_pair(input_size=24, hidden_size=32, num_layers=2,
                                  bidirectional=True, dtype=dtype)
    x = randn(5, 0, 24, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            for hx in (None, make_state(fused, 0, dtype)):
                ours, theirs = fused(x, hx), torch_lstm(x, hx)
                for a, b in zip((ours[0], *ours[1]), (theirs[0], *theirs[1])):
                    assert a.shape == b.shape and a.dtype == b.dtype


def test_single_step_and_single_sequence():
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    for shape in ((1, 1, 3), (1, 3), (1, 5, 3)):
        x = randn(*shape)
        ours, theirs = fused(x), torch_lstm(x)
        assert_close(ours, theirs)


@pytest.mark.parametrize("where", ["input", "h0"])
def test_nan_propagates_like_nn_lstm(where):
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    x = randn(6, 3, 3)
    hx = make_state(fused, 3, F64)
    hx = tuple(t.detach() for t in hx)
    if where == "input":
        x[2, 1, 0] = float("nan")
    else:
        hx[0][1, 0, 2] = float("nan")
    ours, theirs = fused(x, hx), torch_lstm(x, hx)
    for a, b in zip((ours[0], *ours[1]), (theirs[0], *theirs[1])):
        assert a.isnan().any()
        assert torch.equal(a.isnan(), b.isnan())
        assert_close(a, b, equal_nan=True)


def test_nan_survives_dropout_of_one():
    """A dropped NaN is NaN * 0 = NaN in nn.LSTM; never a silent zero."""
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, num_layers=2, dropout=1.0)
    x = randn(5, 2, 3)
    x[1, 0, 0] = float("nan")
    ours, theirs = fused(x), torch_lstm(x)
    for a, b in zip((ours[0], *ours[1]), (theirs[0], *theirs[1])):
        assert torch.equal(a.isnan(), b.isnan())


# --- what the tutorials do --------------------------------------------------------------------

def test_stepping_with_carried_state_equals_the_whole_sequence():
    fused = FusedLSTM(3, 6, num_layers=2, dtype=F64)
    x = randn(7, 2, 3)
    whole, (h_whole, c_whole) = fused(x)
    state = None
    steps = []
    for t in range(x.shape[0]):
        out, state = fused(x[t:t + 1], state)
        steps.append(out)
    assert_close(torch.cat(steps), whole)
    assert_close(state[0], h_whole)
    assert_close(state[1], c_whole)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_last_output_is_exactly_h_n(num_layers):
    fused = FusedLSTM(3, 6, num_layers=num_layers, batch_first=True)
    x = randn(4, 7, 3, dtype=F32)
    out, (h_n, _) = fused(x)
    assert torch.equal(out[:, -1], h_n[-1])
    unbatched_out, (unbatched_h, _) = fused(x[0])
    assert torch.equal(unbatched_out[-1], unbatched_h[-1])


def test_many_to_one_and_many_to_many_shapes():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = FusedLSTM(5, 8, num_layers=2, batch_first=True, bidirectional=True)
            self.per_step = nn.Linear(16, 3)
            self.per_sequence = nn.Linear(8, 2)

        def forward(self, x):
            out, (h_n, _) = self.lstm(x)
            return self.per_step(out), self.per_sequence(h_n[-1])

    model = Tagger()
    x = randn(4, 9, 5, dtype=F32)
    many, one = model(x)
    assert many.shape == (4, 9, 3)
    assert one.shape == (4, 2)
    (many.sum() + one.sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_packed_round_trip_with_pad_packed_sequence():
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, bidirectional=True,
                                  batch_first=True)
    x = randn(4, 6, 3)
    lengths = [3, 6, 1, 4]
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    ours, _ = pad_packed_sequence(fused(packed)[0], batch_first=True)
    theirs, _ = pad_packed_sequence(torch_lstm(packed)[0], batch_first=True)
    assert_close(ours, theirs)


# --- convert / revert -------------------------------------------------------------------------

class _Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
        self.blocks = nn.ModuleDict({
            "inner": nn.Sequential(nn.Linear(8, 8), nn.LSTM(8, 5, batch_first=True)),
        })
        self.shared = nn.LSTM(5, 5)
        self.stack = nn.ModuleList([self.shared, self.shared])
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        y, _ = self.encoder(x)
        y = self.blocks["inner"][0](y)
        y, _ = self.blocks["inner"][1](y.transpose(0, 1))
        y = y.transpose(0, 1)
        for lstm in self.stack:
            y, _ = lstm(y)
        return self.head(y)


def test_convert_replaces_nested_lstms_in_place():
    model = _Nested().double().eval()
    params_before = dict(model.named_parameters())
    x = randn(5, 2, 3)
    before = model(x)

    assert fused_lstm.convert(model) is model
    assert type(model.encoder) is FusedLSTM
    assert type(model.blocks["inner"][1]) is FusedLSTM
    assert type(model.shared) is FusedLSTM
    assert model.stack[0] is model.stack[1] is model.shared  # still one shared module
    assert type(model.head) is nn.Linear
    params_after = dict(model.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[n] is params_before[n] for n in params_before)
    assert not model.training and not model.encoder.training
    assert model.encoder.weight_ih_l0.dtype == F64
    assert_close(model(x), before)

    model.train()
    assert model.encoder.training
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).sum().backward()
    optimizer.step()
    assert not torch.equal(model.encoder.weight_hh_l0, snapshot["encoder.weight_hh_l0"])


def test_convert_root_lstm_and_idempotence():
    lstm = nn.LSTM(3, 4, num_layers=2, dtype=F64)
    x = randn(5, 2, 3)
    before = lstm(x)
    fused = fused_lstm.convert(lstm)
    assert type(fused) is FusedLSTM and type(lstm) is nn.LSTM
    assert fused.weight_hh_l1 is lstm.weight_hh_l1
    assert_close(fused(x), before)
    assert fused_lstm.convert(fused) is fused
    # The two modules are independent afterwards.
    fused.weight_hh_l0 = nn.Parameter(randn(16, 4))
    assert lstm.weight_hh_l0 is not fused.weight_hh_l0
    assert lstm._flat_weights[1] is lstm.weight_hh_l0


def test_convert_leaves_lstm_subclasses_alone():
    class MyLSTM(nn.LSTM):
        pass

    model = nn.Sequential(MyLSTM(3, 4))
    fused_lstm.convert(model)
    assert type(model[0]) is MyLSTM


def test_convert_keeps_parametrizations():
    lstm = nn.LSTM(3, 4, dtype=F64)
    torch.nn.utils.parametrizations.weight_norm(lstm, "weight_hh_l0")
    x = randn(5, 2, 3)
    before = lstm(x)[0]
    fused = fused_lstm.convert(lstm)
    assert isinstance(fused, FusedLSTM)
    assert parametrize.is_parametrized(fused, "weight_hh_l0")
    assert fused.parametrizations.weight_hh_l0.original0 is \
        lstm.parametrizations.weight_hh_l0.original0
    assert_close(fused(x)[0], before)
    reverted = fused_lstm.revert(fused)
    assert type(reverted).__bases__[0] is nn.LSTM
    assert_close(reverted(x)[0], before)
    parametrize.remove_parametrizations(reverted, "weight_hh_l0")
    assert type(reverted) is nn.LSTM


def test_revert_gives_plain_nn_lstm():
    model = nn.Sequential(FusedLSTM(3, 4, num_layers=2, dtype=F64))
    x = randn(5, 2, 3)
    before = model(x)
    param = model[0].weight_ih_l1
    assert fused_lstm.revert(model) is model
    assert type(model[0]) is nn.LSTM
    assert model[0].weight_ih_l1 is param
    assert_close(model(x), before)
    assert type(fused_lstm.revert(FusedLSTM(3, 4))) is nn.LSTM


def test_deepcopy_and_pickle_of_the_module():
    fused = FusedLSTM(3, 4, num_layers=2, dtype=F64)
    x = randn(5, 2, 3)
    clone = copy.deepcopy(fused)
    assert type(clone) is FusedLSTM
    assert_close(clone(x), fused(x))
    import io
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is FusedLSTM
    assert_close(loaded(x), fused(x))


# --- where the fused op does not run ----------------------------------------------------------

@pytest.mark.filterwarnings("default::fused_lstm.FusedLSTMFallbackWarning")
def test_device_without_kernel_falls_back_with_one_warning(monkeypatch):
    # Pretends the CPU has no kernel, which the C++ entry would not believe: for a device
    # really without one, the op raises there, the entry answers None and this path follows.
    monkeypatch.setattr(fused_module, "_fast_forward", None)
    monkeypatch.setitem(fused_module._has_kernel, "cpu", False)
    monkeypatch.setattr(fused_module, "_warned_devices", set())
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, num_layers=2)
    x = randn(5, 2, 3)
    with pytest.warns(FusedLSTMFallbackWarning, match="no fused kernel for device type 'cpu'"):
        out = fused(x)
    assert_close(out, torch_lstm(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused(x)  # once per device type


def test_autocast_behaves_like_nn_lstm():
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, num_layers=2, dtype=F32)
    x = randn(5, 2, 3, dtype=F32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = fused(x), torch_lstm(x)
    assert ours[0].dtype == theirs[0].dtype
    assert torch.equal(ours[0], theirs[0])


# --- torch.compile ----------------------------------------------------------------------------

def test_torch_compile_fullgraph_with_allow_rnn():
    """The user's allow_rnn flag (needed before fused_lstm._dynamo existed, and the fallback
    where that hook cannot install) still gives one graph, gradients included."""
    import torch._dynamo

    fused = FusedLSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, batch_first=True,
                      dtype=F64)
    x = randn(2, 4, 3, requires_grad=True)
    hx = make_state(fused, 2, F64)
    expected = fused(x, hx)
    expected_grads = torch.autograd.grad(expected[0].sum() + expected[1][1].sum(), (x, *hx))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
        got = compiled(x, hx)
        grads = torch.autograd.grad(got[0].sum() + got[1][1].sum(), (x, *hx))
    assert_close(got, expected)
    assert_close(grads, expected_grads)


def test_torch_compile_default_gives_nn_lstm_results():
    import torch._dynamo

    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, num_layers=2)
    x = randn(5, 2, 3)
    torch._dynamo.reset()
    compiled = torch.compile(nn.Sequential(fused, ), backend="aot_eager")
    assert_close(compiled(x), torch_lstm(x))


# --- one forward path: the op is asked once -------------------------------------------------


def _fused_op_calls(prof):
    return [e.name for e in prof.events() if e.name.startswith("fused_lstm::")]


@pytest.mark.parametrize("entry", ["cpp", "python"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("case", ["hx_dtype", "input_dtype", "input_size", "empty"])
def test_rejected_call_reaches_the_op_at_most_once(case, grad, entry, monkeypatch):
    """A call the op rejects reaches the op at most once on its way to nn.LSTM's exception
    (same class and message): a rejection by the C++ entry's op call is the Python path's
    answer, not asked again. hx of another dtype passes every Python check: only the op and
    nn.LSTM's C++ see it, so that call reaches the op exactly once."""
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, num_layers=2)
    if entry == "python":
        monkeypatch.setattr(fused_module, "_fast_forward", None)
    x = {"input_dtype": randn(5, 2, 3, dtype=F32), "input_size": randn(5, 2, 4),
         "empty": randn(0, 2, 3)}.get(case, randn(5, 2, 3)).requires_grad_(grad)
    hx = tuple(t.detach().to(F32 if case == "hx_dtype" else F64)
               for t in make_state(fused, 2, F64))
    with torch.set_grad_enabled(grad):
        with pytest.raises(Exception) as expected:
            torch_lstm(x, hx)
        with torch.profiler.profile() as prof, pytest.raises(type(expected.value)) as got:
            fused(x, hx)
    assert str(got.value) == str(expected.value)
    deciding = [c for c in _fused_op_calls(prof) if c == "fused_lstm::lstm"]
    calls = [c for c in _fused_op_calls(prof) if c != "fused_lstm::lstm"]  # the op it chose
    assert len(calls) <= 1 and len(deciding) == len(calls), _fused_op_calls(prof)
    if case == "hx_dtype":
        assert calls == ["fused_lstm::lstm_forward" if grad else "fused_lstm::lstm_inference"]


@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("requiring", ["nothing", "input", "h0", "c0", "weights"])
def test_entry_and_python_path_choose_the_same_op(grad_mode, requiring, monkeypatch):
    """The choice between lstm_forward and lstm_inference is fused_lstm::lstm's (needs_grad,
    csrc/ops.cpp, written once): the C++ entry calls that kernel directly, the Python path
    through torch.ops; for every case both record the same fused_lstm::lstm call and the op
    it chose (lstm_forward exactly when grad mode is on and an argument requires grad)."""
    fused = FusedLSTM(3, 4, num_layers=2, dtype=F64).requires_grad_(requiring == "weights")
    x = randn(5, 2, 3)
    h0, c0 = (t.detach() for t in make_state(fused, 2, F64))
    for name, t in (("input", x), ("h0", h0), ("c0", c0)):
        t.requires_grad_(name == requiring)
    expected = grad_mode and requiring != "nothing"
    op = "fused_lstm::lstm_forward" if expected else "fused_lstm::lstm_inference"
    with torch.set_grad_enabled(grad_mode):
        for entry in (fused_module._fast_forward, None):
            monkeypatch.setattr(fused_module, "_fast_forward", entry)
            with torch.profiler.profile() as prof:
                out = fused(x, (h0, c0))
            assert _fused_op_calls(prof) == ["fused_lstm::lstm", op]
            assert (out[0].grad_fn is not None) is expected


@pytest.mark.parametrize("check", ["cpp", "nn_lstm"])
def test_python_path_sees_reassigned_and_parametrized_weights(check, monkeypatch):
    """The Python path's weights: the C++ entry's currency check (current_weights), or
    without the binding nn.LSTM's _update_flat_weights(); reassigned, replaced and
    parametrized weights are used at once either way."""
    torch_lstm, fused = lstm_pair(input_size=3, hidden_size=4, num_layers=2)
    monkeypatch.setattr(fused_module, "_fast_forward", None)
    if check == "nn_lstm":
        monkeypatch.setattr(fused_module, "_current_weights", None)
    else:
        assert fused_module._current_weights(fused) is fused._flat_weights
    x = randn(5, 2, 3)
    assert_close(fused(x), torch_lstm(x))
    new = randn(16, 4)
    fused.weight_hh_l1 = nn.Parameter(new.clone())
    torch_lstm.weight_hh_l1 = nn.Parameter(new.clone())
    assert_close(fused(x), torch_lstm(x))
    replaced = randn(16, 3)
    fused._parameters["weight_ih_l0"] = nn.Parameter(replaced.clone())  # behind nn.LSTM's back
    torch_lstm._parameters["weight_ih_l0"] = nn.Parameter(replaced.clone())
    if check == "cpp":
        assert fused_module._current_weights(fused) is None
    assert_close(fused(x), torch_lstm(x))
    for module in (fused, torch_lstm):
        parametrize.register_parametrization(module, "weight_hh_l0", _Double())
    assert_close(fused(x), torch_lstm(x))
