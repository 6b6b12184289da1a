"""Property tests (hypothesis): random configurations, inputs and malformed calls, FusedLSTM
against torch.nn.LSTM on identical weights.

* Well-formed calls: outputs, h_n, c_n and the gradients of the input, h0, c0 and every
  parameter agree with nn.LSTM's (float64 to about 1e-10, float32 to about 1e-5 scaled by the
  magnitude of the values compared).
* Malformed calls (wrong shapes, dimensions, dtypes, hidden states): FusedLSTM raises the same
  exception class as nn.LSTM, or both succeed with the same result; never a crash.
* The larger kernels (hidden sizes from 16: row-wise, thin, hidden split), float32, bfloat16,
  float16 and float64 models, 1 or 2 threads, with CPU kernel settings changed at random: within twice
  nn.LSTM's own error in the dtype of the float64 result, and no warning nn.LSTM does not give.

Example counts are bounded so CI stays fast (100 per test, about 5 s each here). A longer run:
``FUSED_LSTM_HYPOTHESIS_PROFILE=long pytest tests/test_properties.py`` (profiles
``fused_lstm-ci``, the default, and ``fused_lstm-long`` are registered below). Every example
draws its own torch seed, so hypothesis's printed falsifying example reproduces it exactly.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fused_lstm import FusedLSTMFallbackWarning

from helpers import lstm_pair, make_input, make_state, randn, run_and_grad

# The op rejecting a call that nn.LSTM accepts would show up as this warning: make it fail.
pytestmark = pytest.mark.filterwarnings("error::fused_lstm.FusedLSTMFallbackWarning")

settings.register_profile(
    "fused_lstm-ci", max_examples=100, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fused_lstm-long", max_examples=2000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_PROFILE = os.environ.get("FUSED_LSTM_HYPOTHESIS_PROFILE", "ci")
PROFILE = settings.get_profile(
    _PROFILE if _PROFILE.startswith("fused_lstm-") else f"fused_lstm-{_PROFILE}"
)

LAYOUTS = ("padded", "packed_sorted", "packed_unsorted", "unbatched")
DTYPES = (torch.float32, torch.float64)


@st.composite
def configs(draw):
    hidden_size = draw(st.integers(1, 7))
    return dict(
        input_size=draw(st.integers(1, 6)),
        hidden_size=hidden_size,
        num_layers=draw(st.integers(1, 3)),
        bidirectional=draw(st.booleans()),
        proj_size=draw(st.sampled_from([0, 0] + list(range(1, hidden_size)))),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
    )


def assert_near(got, expected, dtype, what):
    """float64: 1e-10 relative to the magnitude of the values; float32: 1e-5 likewise (the
    fused kernels sum in a different order than nn.LSTM's, so bits may differ)."""
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != {expected.dtype}"
    if expected.numel() == 0:
        return
    eps = 1e-10 if dtype == torch.float64 else 2e-5
    got, expected = got.detach(), expected.detach()
    scale = max(1.0, float(expected.abs().max()))
    error = float((got - expected).abs().max())
    assert error <= eps * scale, f"{what}: max error {error:.3g} > {eps * scale:.3g}"


@PROFILE
@given(
    config=configs(),
    layout=st.sampled_from(LAYOUTS),
    seq_len=st.integers(1, 6),
    batch=st.integers(1, 4),
    with_state=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_nn_lstm(config, layout, seq_len, batch, with_state, dtype, seed):
    torch.manual_seed(seed)
    torch_lstm, fused = lstm_pair(dtype=dtype, **config)
    inp, leaf = make_input(fused, layout, seq_len=seq_len, batch=batch, dtype=dtype)
    hx = make_state(fused, batch, dtype, unbatched=layout == "unbatched") if with_state else None

    expected = run_and_grad(torch_lstm, inp, leaf, hx)
    upstream = expected[4]
    got = run_and_grad(fused, inp, leaf, hx, upstream=upstream)
    for name, g, e in zip(("output", "h_n", "c_n"), got[:3], expected[:3]):
        assert_near(g, e, dtype, name)
    assert got[3].keys() == expected[3].keys()
    for name in expected[3]:
        e, g = expected[3][name], got[3][name]
        assert (g is None) == (e is None), f"gradient of {name}: {g} vs {e}"
        if e is not None:
            assert_near(g, e, dtype, f"gradient of {name}")


# --- malformed calls ------------------------------------------------------------------------

BAD_KINDS = (
    "input-dims", "input-size", "input-dtype", "h0-shape", "c0-shape", "state-dims",
    "state-dtype", "hx-not-a-pair", "empty-sequence",
)


def _perturb(shape, draw):
    """``shape`` with one dimension changed (to another size in 0..6)."""
    shape = list(shape)
    index = draw(st.integers(0, len(shape) - 1))
    shape[index] = draw(st.integers(0, 6).filter(lambda n, old=shape[index]: n != old))
    return shape


@st.composite
def malformed_calls(draw):
    """(module kwargs, dtype, kind, function making the call's arguments). The arguments are
    made by a function so that the same random values go to both modules."""
    config = draw(configs())
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(BAD_KINDS))
    seq_len, batch = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    unbatched = draw(st.booleans())
    layers_dirs = config["num_layers"] * (2 if config["bidirectional"] else 1)
    out_size = config["proj_size"] or config["hidden_size"]
    if unbatched:
        x_shape = [seq_len, config["input_size"]]
        h_shape, c_shape = [layers_dirs, out_size], [layers_dirs, config["hidden_size"]]
    else:
        x_shape = ([batch, seq_len] if config["batch_first"] else [seq_len, batch])
        x_shape = x_shape + [config["input_size"]]
        h_shape = [layers_dirs, batch, out_size]
        c_shape = [layers_dirs, batch, config["hidden_size"]]
    x_dtype = h_dtype = c_dtype = dtype
    with_state = kind in ("h0-shape", "c0-shape", "state-dims", "state-dtype", "hx-not-a-pair") \
        or draw(st.booleans())
    hx_form = "pair"
    if kind == "input-dims":
        x_shape = [draw(st.integers(1, 3)) for _ in range(draw(st.sampled_from([0, 1, 4, 5])))]
    elif kind == "input-size":
        x_shape[-1] = draw(st.integers(0, 8).filter(lambda n: n != config["input_size"]))
    elif kind == "input-dtype":
        x_dtype = draw(st.sampled_from(
            [d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64)
             if d != dtype]))
    elif kind == "h0-shape":
        h_shape = _perturb(h_shape, draw)
    elif kind == "c0-shape":
        c_shape = _perturb(c_shape, draw)
    elif kind == "state-dims":
        which = draw(st.sampled_from(["h", "c", "both"]))
        extra = draw(st.sampled_from(["drop", "add"]))
        for name in ("h", "c") if which == "both" else (which,):
            shape = h_shape if name == "h" else c_shape
            if extra == "drop":
                del shape[draw(st.integers(0, len(shape) - 1))]
            else:
                shape.insert(draw(st.integers(0, len(shape))), 1)
    elif kind == "state-dtype":
        other = draw(st.sampled_from(
            [d for d in (torch.float16, torch.float32, torch.float64) if d != dtype]))
        which = draw(st.sampled_from(["h", "c", "both"]))
        h_dtype = other if which in ("h", "both") else dtype
        c_dtype = other if which in ("c", "both") else dtype
    elif kind == "hx-not-a-pair":
        hx_form = draw(st.sampled_from(["tensor", "triple", "single"]))
    elif kind == "empty-sequence":
        x_shape[1 if (config["batch_first"] and not unbatched) else 0] = 0

    def make_args():
        if x_dtype == torch.int64:
            x = torch.randint(1, 5, x_shape)
        else:
            x = randn(*x_shape, dtype=x_dtype)
        if not with_state:
            return (x,)
        h0, c0 = randn(*h_shape, dtype=h_dtype), randn(*c_shape, dtype=c_dtype)
        hx = {"pair": (h0, c0), "tensor": h0, "triple": (h0, c0, h0), "single": (h0,)}[hx_form]
        return (x, hx)

    make_args.h_dtype = h_dtype
    return config, dtype, kind, make_args


def h_dtype_of(call):
    return call[3].h_dtype


@PROFILE
@given(call=malformed_calls(), seed=st.integers(0, 2**31 - 1))
def test_malformed_calls_raise_like_nn_lstm(call, seed):
    config, dtype, kind, make_args = call
    torch.manual_seed(seed)
    torch_lstm, fused = lstm_pair(dtype=dtype, **config)
    state = torch.random.get_rng_state()
    expected_error = got_error = expected = got = None
    try:
        expected = torch_lstm(*make_args())
    except Exception as error:  # noqa: BLE001 (the class is what is compared)
        expected_error = error
    torch.random.set_rng_state(state)  # the same random arguments for FusedLSTM
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FusedLSTMFallbackWarning)
        try:
            got = fused(*make_args())
        except Exception as error:  # noqa: BLE001
            got_error = error
    fell_back = any(issubclass(w.category, FusedLSTMFallbackWarning) for w in caught)
    # One known case where the op rejects what nn.LSTM accepts: only c0 of another floating
    # dtype (nn.LSTM's native path, used for float64 and for proj_size > 0, promotes c0; its
    # oneDNN path raises). FusedLSTM then returns nn.LSTM's own result with the warning.
    known_fallback = kind == "state-dtype" and h_dtype_of(call) == dtype
    assert not fell_back or known_fallback, f"{kind}: unexpected fallback: {caught[0].message}"
    if expected_error is None:
        assert got_error is None, f"{kind}: nn.LSTM accepted the call, FusedLSTM raised {got_error!r}"
        out_dtype = expected[0].dtype
        assert_near(got[0], expected[0], out_dtype, "output")
        assert_near(got[1][0], expected[1][0], out_dtype, "h_n")
        assert_near(got[1][1], expected[1][1], out_dtype, "c_n")
    else:
        assert got_error is not None, f"{kind}: nn.LSTM raised {expected_error!r}, FusedLSTM did not"
        assert type(got_error) is type(expected_error), (
            f"{kind}: FusedLSTM raised {type(got_error).__name__}: {got_error}; nn.LSTM raised "
            f"{type(expected_error).__name__}: {expected_error}"
        )


def _outcome(module, *args):
    """(result, None) or (None, exception) of ``module(*args)``."""
    try:
        return module(*args), None
    except Exception as error:  # noqa: BLE001 (the class is what is compared)
        return None, error


@PROFILE
@given(
    config=configs(),
    seq_len=st.integers(1, 5),
    batch=st.integers(1, 4),
    state_batch=st.integers(0, 6),
    enforce_sorted=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_packed_hidden_state_batch_like_nn_lstm(config, seq_len, batch, state_batch,
                                                 enforce_sorted, dtype, seed):
    """Packed input with a hidden state for a random (often wrong) batch size: the same
    exception class as nn.LSTM, or the same result where nn.LSTM accepts it (unsorted packed
    input selects the state's rows by index, so a larger state batch can be accepted), and
    never a crash."""
    torch.manual_seed(seed)
    torch_lstm, fused = lstm_pair(dtype=dtype, **config)
    x = randn(seq_len, batch, config["input_size"], dtype=dtype)
    lengths = torch.randint(1, seq_len + 1, (batch,)).tolist()
    if enforce_sorted:
        lengths.sort(reverse=True)
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    layers_dirs = config["num_layers"] * (2 if config["bidirectional"] else 1)
    out_size = config["proj_size"] or config["hidden_size"]
    hx = (randn(layers_dirs, state_batch, out_size, dtype=dtype),
          randn(layers_dirs, state_batch, config["hidden_size"], dtype=dtype))
    got, got_error = _outcome(fused, packed, hx)
    if enforce_sorted and state_batch != batch and len(set(lengths)) == 1:
        # nn.LSTM does not check the state's shape for packed input; with equal lengths its
        # oneDNN kernel then corrupts the heap (torch 2.13; an abort, so it cannot be called
        # here). Its native kernel raises a RuntimeError, and so must FusedLSTM (which does
        # not hand such a call on to nn.LSTM).
        assert isinstance(got_error, RuntimeError), got_error
        return
    expected, expected_error = _outcome(torch_lstm, packed, hx)
    if expected_error is not None:
        assert type(got_error) is type(expected_error), (got_error, expected_error)
    else:
        assert got_error is None, got_error
        assert_near(got[0].data, expected[0].data, dtype, "output")
        assert_near(got[1][0], expected[1][0], dtype, "h_n")
        assert_near(got[1][1], expected[1][1], dtype, "c_n")


# --- the larger kernels, 16-bit models and the kernel settings ------------------------------------

# The CPU kernel settings that turn a kernel or a choice off (fused_lstm.backends.cpu); an
# example turns up to three of them off, so that the variant a machine's rules would not pick
# is drawn too.
KERNEL_SWITCHES = (
    "allow_amx", "allow_bf16_products", "allow_brgemm", "allow_few_rows",
    "allow_fused_input_projection", "allow_hidden_split", "allow_small_products", "allow_thin",
    "allow_vec16_cell", "fuse_by_measured_rates", "hidden_split_by_measured_rates",
)
# The distance to the float64 result allowed beyond twice nn.LSTM's own, relative to the
# values' scale (as tests/test_cpu_variants.py's assert_within_twice_nn_lstm).
KERNEL_FLOOR = {torch.float64: 1e-10, torch.float32: 2e-6,
                torch.bfloat16: torch.finfo(torch.bfloat16).eps,
                torch.float16: torch.finfo(torch.float16).eps}


@st.composite
def kernel_configs(draw):
    """Hidden sizes from 16 up, where the row-wise, thin and hidden-split kernels run (configs()
    stays below 16, the small-hidden kernel's sizes): off the 16-column blocks too."""
    hidden_size = draw(st.sampled_from([16, 17, 20, 31, 32, 33, 48, 64, 65, 96, 130]))
    return dict(
        input_size=draw(st.sampled_from([1, 3, 16, 17, 64, 100, 129])),
        hidden_size=hidden_size,
        num_layers=draw(st.integers(1, 3)),
        bidirectional=draw(st.booleans()),
        proj_size=draw(st.sampled_from([0, 0, 0, hidden_size // 3, hidden_size - 1])),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
    )


@st.composite
def kernel_settings(draw):
    chosen = {name: False for name in draw(st.sets(st.sampled_from(KERNEL_SWITCHES), max_size=3))}
    chosen["nn_lstm_floor"] = draw(st.sampled_from(["auto", "never", "always"]))
    chosen["gemm_library"] = draw(st.sampled_from(["auto", "blas", "onednn_matmul"]))
    return chosen


def _as_dtype(inp, leaf, hx, dtype, batch_first):
    """The same input (the same packing) and state as new leaves in `dtype`."""
    new_leaf = leaf.detach().to(dtype).requires_grad_()
    new_inp = new_leaf
    if isinstance(inp, nn.utils.rnn.PackedSequence):
        _, lengths = nn.utils.rnn.pad_packed_sequence(inp, batch_first=batch_first)
        new_inp = nn.utils.rnn.pack_padded_sequence(
            new_leaf, lengths, batch_first=batch_first, enforce_sorted=inp.sorted_indices is None)
    new_hx = None if hx is None else tuple(t.detach().to(dtype).requires_grad_() for t in hx)
    return new_inp, new_leaf, new_hx


@PROFILE
@given(
    config=kernel_configs(),
    layout=st.sampled_from(LAYOUTS),
    seq_len=st.integers(1, 12),
    batch=st.sampled_from([1, 2, 3, 5, 8, 15, 16, 17, 31, 33, 40]),
    with_state=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    train=st.booleans(),
    threads=st.sampled_from([1, 2]),
    chosen=kernel_settings(),
    seed=st.integers(0, 2**31 - 1),
)
def test_kernel_variants_match_nn_lstm(config, layout, seq_len, batch, with_state, dtype, train,
                                       threads, chosen, seed):
    """Hidden sizes from 16, float32, bfloat16, float16 and float64 models, training and
    inference, 1 or 2 threads, any of the CPU kernel settings changed: outputs (and in training
    every gradient) within twice nn.LSTM's own distance in `dtype` to the float64 result on the
    same rounded weights and inputs, plus the dtype's epsilon relative to the values (float64:
    within 1e-10 of it); never NaN."""
    from fused_lstm import backends

    torch.manual_seed(seed)
    torch_lstm, fused = lstm_pair(dtype=dtype, **config)
    exact = nn.LSTM(dtype=torch.float64, **config)
    exact.load_state_dict({k: v.double() for k, v in torch_lstm.state_dict().items()})
    inp, leaf = make_input(fused, layout, seq_len=seq_len, batch=batch, dtype=dtype)
    hx = make_state(fused, batch, dtype, unbatched=layout == "unbatched") if with_state else None
    bf = config["batch_first"]

    def results(module, module_dtype, upstream=None):
        m_inp, m_leaf, m_hx = _as_dtype(inp, leaf, hx, module_dtype, bf)
        module.train(train)
        if train:
            out, h_n, c_n, grads, upstream = run_and_grad(module, m_inp, m_leaf, m_hx,
                                                          upstream=upstream)
            return [out, h_n, c_n, *grads.values()], upstream
        with torch.no_grad():
            output, (h_n, c_n) = module(m_inp, m_hx) if m_hx is not None else module(m_inp)
        return [output.data if isinstance(output, nn.utils.rnn.PackedSequence) else output,
                h_n, c_n], None

    def run_recording_warnings(module, upstream):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got, _ = results(module, dtype, upstream)
        return got, {str(w.message) for w in caught}

    # The upstream gradients drawn once, in float64, and rounded to `dtype` for the other two.
    expected, up64 = results(exact, torch.float64)
    upstream = None if up64 is None else tuple(u.to(dtype) for u in up64)
    theirs, their_warnings = run_recording_warnings(torch_lstm, upstream)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with backends.cpu.flags(**chosen):
            ours, our_warnings = run_recording_warnings(fused, upstream)
    finally:
        torch.set_num_threads(before)
    assert our_warnings <= their_warnings, our_warnings - their_warnings
    assert len(ours) == len(expected) == len(theirs)
    for i, (o, e, t) in enumerate(zip(ours, expected, theirs)):
        assert o.dtype == t.dtype and o.shape == t.shape, (i, o.dtype, o.shape, t.shape)
        assert not torch.isnan(o).any(), i
        if e.numel() == 0:
            continue
        scale = max(1.0, e.abs().max().item())
        our_error = (o.double() - e).abs().max().item()
        their_error = (t.double() - e).abs().max().item()
        assert our_error <= 2 * their_error + KERNEL_FLOOR[dtype] * scale, \
            (i, our_error, their_error)
