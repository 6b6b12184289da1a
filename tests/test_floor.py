"""The nn.LSTM floor (csrc/cpu/floor_rule.h): an inference call may run what nn.LSTM runs for it
(``at::lstm``: oneDNN's LSTM) instead of the fused kernels, where the setting
``cpu.nn_lstm_floor`` says so ("always"), or where "auto" measured at::lstm faster by more than
3%. Forced by name here, at the smallest sizes where the floor is possible (batch 16,
4H * (input + hidden) * batch = 2^22 multiply-adds per step); "auto" from times recorded by the
test hook ``fused_lstm::_floor_record`` in both directions, and from a real measurement.

Where the floor runs, the results are nn.LSTM's bit for bit (the same at::lstm call on the same
tensors); which implementation ran is read from the profiler (``aten::lstm`` under the op), so
each test fails where the floor runs when it must not, or not when it must.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_lstm
from fused_lstm import FusedLSTM
from helpers import cpu_features, hidden_split_feature, randn, random_lengths

CPU = fused_lstm.backends.cpu
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
RECORD = torch.ops.fused_lstm._floor_record
FORGET = torch.ops.fused_lstm._floor_forget

# The smallest floor sizes: batch 16, 4 * 128 * (384 + 128) * 16 = 2^22 multiply-adds per step.
INPUT, HIDDEN, BATCH, STEPS = 384, 128, 16, 5


@pytest.fixture(autouse=True)
def _fresh_table():
    """Each test starts and ends with no measured keys (and every setting restored)."""
    FORGET()
    with CPU.flags():
        yield
    FORGET()


def _pair(dtype, **kwargs):
    kwargs = dict(input_size=INPUT, hidden_size=HIDDEN, **kwargs)
    torch_lstm = nn.LSTM(dtype=dtype, **kwargs).eval()
    fused = FusedLSTM(dtype=dtype, **kwargs).eval()
    fused.load_state_dict(torch_lstm.state_dict())
    return torch_lstm, fused


def _input(module, dtype, batch=BATCH, steps=STEPS):
    shape = (batch, steps, module.input_size) if module.batch_first else (steps, batch,
                                                                           module.input_size)
    return randn(*shape).to(dtype)


def _state(module, dtype, batch=BATCH):
    ld = module.num_layers * (2 if module.bidirectional else 1)
    return randn(ld, batch, module.hidden_size).to(dtype), randn(ld, batch,
                                                                 module.hidden_size).to(dtype)


def _ran_aten(fn):
    """(fn's result, how many aten::lstm calls ran in it), with no warning allowed."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            result = fn()
    return result, sum(e.name == "aten::lstm" for e in prof.events())


def _flat(result):
    output, (h, c) = result
    return [output, h, c]


def _assert_equal(got, expected):
    for g, e in zip(_flat(got), _flat(expected)):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert torch.equal(g, e), (g.float() - e.float()).abs().max()


def _assert_close(got, expected, dtype):
    # Ours against nn.LSTM's in the same dtype: bf16 products against oneDNN's; float16 ours
    # in float32, rounded at the end, against oneDNN's float16 (measured within 1e-3, one
    # float16 step at 1; the tolerance is five); float32 to its rounding.
    tol = {BF16: dict(atol=2e-2, rtol=2e-2), F16: dict(atol=5e-3, rtol=5e-3)}.get(
        dtype, dict(atol=1e-5, rtol=1e-5))
    for g, e in zip(_flat(got), _flat(expected)):
        torch.testing.assert_close(g, e, **tol)


def _floor_of(module, x):
    with torch.no_grad():
        return fused_lstm.explain(module, x)["forward"]


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("layers,bidirectional,bias,with_state,batch_first", [
    (1, False, True, False, False),
    (2, True, True, True, False),
    (2, False, False, True, True),
    (1, True, False, False, True),
], ids=["1layer", "2layer-bi-state", "2layer-nobias-state-batchfirst", "bi-nobias-batchfirst"])
def test_always_and_never_by_name(dtype, layers, bidirectional, bias, with_state, batch_first):
    """"always": at::lstm runs the call, results bit for bit nn.LSTM's, explain says so;
    "never": the fused kernels run (no aten::lstm), results within the dtype's rounding."""
    torch_lstm, fused = _pair(dtype, num_layers=layers, bidirectional=bidirectional, bias=bias,
                              batch_first=batch_first)
    x = _input(fused, dtype)
    args = (x, _state(fused, dtype)) if with_state else (x,)
    with torch.no_grad():
        expected = torch_lstm(*args)
        with CPU.flags(nn_lstm_floor="always"):
            got, aten_calls = _ran_aten(lambda: fused(*args))
            plan = _floor_of(fused, x)
        assert aten_calls == 1
        _assert_equal(got, expected)
        # nn.LSTM in training mode (no dropout) under no_grad calls at::lstm with train=True:
        # the same values as the floor's train=False call.
        _assert_equal(got, torch_lstm.train()(*args))
        assert plan["nn_lstm_floor_runs"] == "true" and plan["path"] == "nn.LSTM"
        assert plan["nn_lstm_floor"].startswith("always")
        assert plan["variant"] == "row_wise"
        with CPU.flags(nn_lstm_floor="never"):
            got, aten_calls = _ran_aten(lambda: fused(*args))
            plan = _floor_of(fused, x)
        assert aten_calls == 0
        _assert_close(got, expected, dtype)
        assert plan["nn_lstm_floor_runs"] == "false" and plan["path"] == "row_wise"
        assert plan["nn_lstm_floor"].startswith("never")


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["f32", "bf16", "f16"])
def test_auto_follows_the_measured_times(dtype):
    """"auto" runs at::lstm exactly where the key's times say it is more than 3% faster; the
    key covers batch and sequence length in the same power-of-two bucket, not the next."""
    torch_lstm, fused = _pair(dtype, num_layers=2, bidirectional=True)
    x = _input(fused, dtype)
    with torch.no_grad():
        expected = torch_lstm(x)
        plan = _floor_of(fused, x)
        assert plan["nn_lstm_floor"].startswith("not measured yet")
        assert plan["nn_lstm_floor_runs"] == "false"

        def record(fused_ms, aten_ms, batch=BATCH, steps=STEPS):
            RECORD(INPUT, HIDDEN, 2, True, True, batch, steps, dtype, fused_ms, aten_ms)

        record(10.0, 9.0)  # at::lstm 10% faster
        got, aten_calls = _ran_aten(lambda: fused(x))
        assert aten_calls == 1
        _assert_equal(got, expected)
        plan = _floor_of(fused, x)
        assert plan["path"] == "nn.LSTM" and plan["nn_lstm_floor_runs"] == "true"
        assert plan["nn_lstm_floor"].startswith("at::lstm: measured faster")
        assert "fused 10 ms, at::lstm 9 ms (recorded by a test" in plan["nn_lstm_floor_times"]
        # The same bucket: batch 16..31, 4..7 steps.
        x_bucket = _input(fused, dtype, batch=31, steps=7)
        assert _floor_of(fused, x_bucket)["nn_lstm_floor_runs"] == "true"
        _, aten_calls = _ran_aten(lambda: fused(x_bucket))
        assert aten_calls == 1
        # The next bucket is another key, not measured.
        x_next = _input(fused, dtype, batch=32)
        assert _floor_of(fused, x_next)["nn_lstm_floor"].startswith("not measured yet")

        record(10.0, 9.8)  # at::lstm 2% faster: a near tie keeps the fused kernels
        got, aten_calls = _ran_aten(lambda: fused(x))
        assert aten_calls == 0
        _assert_close(got, expected, dtype)
        plan = _floor_of(fused, x)
        assert plan["path"] == "row_wise" and plan["nn_lstm_floor_runs"] == "false"
        assert plan["nn_lstm_floor"].startswith("fused kernels: at::lstm not measured faster")

        # The kernel settings are part of the key: another setting, another measurement.
        record(10.0, 5.0)
        with CPU.flags(allow_vec16_cell=False):
            assert _floor_of(fused, x)["nn_lstm_floor"].startswith("not measured yet")


def test_auto_measures_once_and_keeps_its_choice():
    """An unmeasured key under "auto": the first call times both implementations (a few
    calls), returns the results of the one it chose, and every later call of the key runs that
    one, with the same results."""
    torch_lstm, fused = _pair(F32)
    x = _input(fused, F32)
    with torch.no_grad():
        expected = torch_lstm(x)
        first, aten_calls = _ran_aten(lambda: fused(x))
        # The measurement's at::lstm calls: 2 where it is far behind, else 6 for a call this
        # short (floor_rule.h, "The measurement"), its results returned from the one it chose.
        assert aten_calls in (2, 6)
        plan = _floor_of(fused, x)
        times = plan["nn_lstm_floor_times"]
        assert "wall time, least of interleaved calls" in times and "at batch 16, seq_len 5" in times
        fused_ms, aten_ms = (float(v) for v in
                             times.split(" ms (")[0].replace("fused ", "").split(" ms, at::lstm "))
        # Where the hidden split applies (these sizes, 2+ threads), our call with the other
        # split of the steps is timed too, and where one thread's step rates decided whether a
        # layer's input projection is fused, our call with the other choice; the fastest of
        # ours (the rule's on a tie) runs, and is what at::lstm must beat.
        split_times = plan.get("step_split_times")
        projection_times = plan.get("input_projection_times")
        assert (split_times is not None) == (torch.get_num_threads() > 1)
        ours = {"rule": fused_ms}
        for name, text, parse in (("split", split_times, _split_times),
                                  ("projection", projection_times, _projection_times)):
            if text is not None:
                rule_ms, other_ms = parse(text)
                assert rule_ms == fused_ms and text.endswith(" runs")
                ours[name] = other_ms
        runs = "rule"
        for name in ("split", "projection"):  # as the op compares them: strictly faster only
            if name in ours and ours[name] < ours[runs]:
                runs = name
        if split_times is not None:
            assert ("the rule's split runs" in split_times) == (runs != "split")
        if projection_times is not None:
            assert ("the rule's runs" in projection_times) == (runs != "projection")
        fused_ms = ours[runs]
        chose_aten = aten_ms * 1.03 < fused_ms
        assert plan["nn_lstm_floor_runs"] == ("true" if chose_aten else "false")
        second, aten_calls = _ran_aten(lambda: fused(x))
        assert aten_calls == (1 if chose_aten else 0)
        _assert_equal(second, first)
        if chose_aten:
            _assert_equal(first, expected)
        else:
            _assert_close(first, expected, F32)


@contextlib.contextmanager
def _two_threads():
    """The hidden split needs a parallel region of 2+ threads (also on a 1-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _ran_counted(fn, counter):
    """(fn's result, its aten::lstm calls, how far the test hook ``counter`` moved in it)."""
    before = counter()
    result, aten_calls = _ran_aten(fn)
    return result, aten_calls, counter() - before


def _ran_split(fn):
    """(fn's result, its aten::lstm calls, the chunks of steps it ran in the hidden split)."""
    return _ran_counted(fn, torch.ops.fused_lstm._hidden_split_chunks)


def _split_times(text):
    """(the rule's split's ms, the other split's ms) from explain's step_split_times."""
    rule, other = text.split(" (least of")[0].split(", the ")
    return float(rule.split(" split ")[1].split(" ms")[0]), float(other.split(" split ")[1].split(
        " ms")[0])


def _ran_fused(fn):
    """(fn's result, its aten::lstm calls, the layers it ran with the input projection fused)."""
    return _ran_counted(fn, torch.ops.fused_lstm._fused_projection_layers)


def _projection_times(text):
    """(the rule's ms, the other choice's ms) from explain's input_projection_times."""
    rule, other = text.split(" (least of")[0].split(" ms, ")
    return float(rule.split(" ")[-1]), float(other.split(" ")[-2])


@pytest.mark.parametrize("layers", [1, 2])
def test_auto_takes_the_projection_measured_faster(layers):
    """Where one thread's measured step rates decide whether a layer's input projection is
    fused into the steps (float32 on brgemm, the rule's batch split), the floor's measurement
    also times our call with the other choice (fused wherever the sizes allow where the rule
    fused no layer, else never fused; the batch split kept), and every call of the key runs whichever of ours measured fastest (explain's
    input_projection_times and input_projection.<layer> say which), at::lstm only where it beats
    that one by 3%. Each choice's results are told apart by running it by name."""
    torch_lstm, fused = _pair(F32, num_layers=layers)
    x = _input(fused, F32)

    def record(rule_ms, aten_ms, fusion_ms):
        RECORD(INPUT, HIDDEN, layers, False, True, BATCH, STEPS, F32, rule_ms, aten_ms, -1.0,
               fusion_ms)

    with torch.no_grad(), _two_threads(), CPU.flags(allow_hidden_split=False):
        plan = _floor_of(fused, x)
        if not any(k.startswith("fused_step_rates.") for k in plan):
            pytest.skip("no measured step rates here (brgemm not available on this CPU)")
        rule = {layer: plan[f"input_projection.{layer}"] for layer in range(layers)}
        other_fused = not any("fused into the steps" in v for v in rule.values())
        rule_fuses = sum("fused into the steps" in v for v in rule.values())
        with CPU.flags(nn_lstm_floor="never"):
            rule_out = fused(x)
            with CPU.flags(fuse_by_measured_rates=False):
                fused_out = fused(x)
            with CPU.flags(allow_fused_input_projection=False):
                unfused_out = fused(x)
        other_out = fused_out if other_fused else unfused_out
        expected = torch_lstm(x)
        other = "fused where the sizes allow" if other_fused else "never fused"

        record(10.0, 20.0, 9.0)  # the other choice 10% faster
        plan = _floor_of(fused, x)
        assert plan["input_projection_times"] == (
            f"the rule's 10 ms, {other} 9 ms (least of interleaved calls): {other} runs")
        for layer in range(layers):
            assert ("fused into the steps" in plan[f"input_projection.{layer}"]) == other_fused
        other_fuses = sum("fused into the steps" in plan[f"input_projection.{layer}"]
                          for layer in range(layers))
        assert other_fuses != rule_fuses
        got, aten_calls, fused_layers = _ran_fused(lambda: fused(x))
        assert aten_calls == 0 and fused_layers == other_fuses
        _assert_equal(got, other_out)
        _assert_close(got, expected, F32)

        record(10.0, 9.0, 9.0)  # at::lstm 10% faster than the rule's, level with the other
        assert _floor_of(fused, x)["nn_lstm_floor_runs"] == "false"
        got, aten_calls, fused_layers = _ran_fused(lambda: fused(x))
        assert aten_calls == 0 and fused_layers == other_fuses
        _assert_equal(got, other_out)
        record(10.0, 8.5, 9.0)  # at::lstm beats the faster of ours by more than 3%
        assert _floor_of(fused, x)["nn_lstm_floor_runs"] == "true"
        _, aten_calls = _ran_aten(lambda: fused(x))
        assert aten_calls == 1

        record(10.0, 20.0, 10.5)  # the rule's choice faster: as the rule says
        plan = _floor_of(fused, x)
        assert plan["input_projection_times"].endswith("the rule's runs")
        assert {layer: plan[f"input_projection.{layer}"] for layer in range(layers)} == rule
        got, aten_calls, fused_layers = _ran_fused(lambda: fused(x))
        assert aten_calls == 0 and fused_layers == rule_fuses
        _assert_equal(got, rule_out)

    # Where the rates decide no layer's choice (the fused step off, or fused wherever the
    # sizes allow), or the rule takes the hidden split (here forced wherever it applies: its
    # steps are never fused), the floor does not time the other choice.
    for flags in (dict(allow_hidden_split=False, allow_fused_input_projection=False),
                  dict(allow_hidden_split=False, fuse_by_measured_rates=False),
                  dict(hidden_split_by_measured_rates=False)):
        with _two_threads(), CPU.flags(**flags):
            with pytest.raises(ValueError, match="does not time the other choice"):
                record(10.0, 20.0, 9.0)
            record(10.0, 20.0, -1.0)
            assert "input_projection_times" not in _floor_of(fused, x)


@pytest.mark.parametrize("layers", [1, 2])
def test_auto_times_the_other_projection_whichever_split_the_rule_takes(layers):
    """With the hidden split allowed and chosen by the rates (the defaults), the floor times the
    batch split with the other choice of projection whichever split the rule took for each layer
    (before, only where it took the batch split for every layer: medium float32 inference on the
    Intel Xeon then ran a call 7% slower than the batch split with both projections unfused,
    benchmarks/notes/float32-bound.md). Where that call measured fastest, every layer runs the
    batch split, with the projections the batch split's rule would not choose."""
    torch_lstm, fused = _pair(F32, num_layers=layers)
    x = _input(fused, F32)

    def record(rule_ms, aten_ms, fusion_ms):
        RECORD(INPUT, HIDDEN, layers, False, True, BATCH, STEPS, F32, rule_ms, aten_ms, -1.0,
               fusion_ms)

    with torch.no_grad(), _two_threads():
        plan = _floor_of(fused, x)
        if not any(k.startswith("fused_step_rates.") for k in plan):
            pytest.skip("no measured step rates here (brgemm not available on this CPU)")
        with CPU.flags(allow_hidden_split=False):  # the batch split's own choice per layer
            batch_rule = _floor_of(fused, x)
            batch_fuses = [("fused into the steps" in batch_rule[f"input_projection.{layer}"])
                           for layer in range(layers)]
        other_fused = not any(batch_fuses)
        record(10.0, 20.0, 9.0)  # the batch split with the other projection 10% faster
        plan = _floor_of(fused, x)
        other = "fused where the sizes allow" if other_fused else "never fused"
        assert plan["input_projection_times"] == (
            f"the rule's 10 ms, {other} 9 ms (least of interleaved calls): {other} runs")
        for layer in range(layers):  # the batch split, named with why
            assert plan[f"step_split.{layer}"] == (
                "batch (the input projection's other choice, measured faster end to end "
                "(input_projection_times), runs the batch split)"), plan
            assert ("fused into the steps" in plan[f"input_projection.{layer}"]) == other_fused
        got, aten_calls, fused_layers = _ran_fused(lambda: fused(x))
        assert aten_calls == 0 and (fused_layers > 0) == other_fused
        _assert_close(got, torch_lstm(x), F32)
        _, aten_calls, hidden_chunks = _ran_split(lambda: fused(x))
        assert aten_calls == 0 and hidden_chunks == 0
        # A hidden split forced by the settings is left alone: no other projection timed.
        with CPU.flags(hidden_split_by_measured_rates=False):
            with pytest.raises(ValueError, match="does not time the other choice"):
                record(10.0, 20.0, 9.0)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["f32", "bf16", "f16"])
def test_auto_takes_the_split_measured_faster(dtype):
    """Where the hidden split of the steps applies and the rule decides it, the floor's
    measurement also times our call with the other split than the rule's, and every call of the
    key runs whichever of our two measured faster (explain's step_split says which, and why),
    at::lstm only where it beats the faster of them by 3%; forcing either split, or the floor
    off, leaves the rule's choice alone."""
    need = hidden_split_feature(dtype)
    if not cpu_features()[need]:
        pytest.skip(f"the hidden split needs {need}, which this CPU lacks")
    torch_lstm, fused = _pair(dtype, num_layers=2)
    x = _input(fused, dtype)
    with torch.no_grad(), _two_threads():
        expected = torch_lstm(x)
        rule = _floor_of(fused, x)
        rule_splits = {k: v.split(" ")[0] for k, v in rule.items() if k.startswith("step_split.")}
        assert sorted(rule_splits) == ["step_split.0", "step_split.1"], rule
        other = "batch" if "hidden" in rule_splits.values() else "hidden"

        def record(rule_ms, aten_ms, other_ms=-1.0):
            RECORD(INPUT, HIDDEN, 2, False, True, BATCH, STEPS, dtype, rule_ms, aten_ms, other_ms)

        record(10.0, 20.0, 9.0)  # the other split 10% faster
        plan = _floor_of(fused, x)
        assert plan["step_split_times"] == (
            f"the rule's split 10 ms, the {other} split 9 ms (least of interleaved calls): "
            f"the {other} split runs")
        for layer in (0, 1):
            assert plan[f"step_split.{layer}"] == (
                f"{other} (measured faster end to end than the rule's split: step_split_times)")
        got, aten_calls, hidden_chunks = _ran_split(lambda: fused(x))
        assert aten_calls == 0 and (hidden_chunks > 0) == (other == "hidden")
        _assert_close(got, expected, dtype)

        record(10.0, 8.5, 9.0)  # at::lstm beats the faster of ours by more than 3%
        plan = _floor_of(fused, x)
        assert plan["nn_lstm_floor_runs"] == "true"
        _, aten_calls = _ran_aten(lambda: fused(x))
        assert aten_calls == 1
        record(10.0, 9.0, 9.0)  # by more than 3% of the rule's split only: the other split
        plan = _floor_of(fused, x)
        assert plan["nn_lstm_floor_runs"] == "false"
        assert plan["step_split.0"].startswith(other + " (measured faster")
        _, aten_calls, hidden_chunks = _ran_split(lambda: fused(x))
        assert aten_calls == 0 and (hidden_chunks > 0) == (other == "hidden")

        record(10.0, 20.0, 10.5)  # the rule's split faster: as the rule says
        plan = _floor_of(fused, x)
        assert plan["step_split_times"].endswith("the rule's split runs")
        assert {k: plan[k].split(" ")[0] for k in rule_splits} == rule_splits
        assert "measured faster end to end" not in plan["step_split.0"]
        got, aten_calls, hidden_chunks = _ran_split(lambda: fused(x))
        assert aten_calls == 0 and (hidden_chunks > 0) == (other == "batch")
        _assert_close(got, expected, dtype)

        # A forced split, or the hidden split off, is another key, and the floor does not time
        # the other split there.
        for flags in (dict(hidden_split_by_measured_rates=False), dict(allow_hidden_split=False)):
            with CPU.flags(**flags):
                with pytest.raises(ValueError, match="does not time the other split"):
                    record(10.0, 20.0, 9.0)
                record(10.0, 20.0)
                assert "step_split_times" not in _floor_of(fused, x)


def _packed(fused, x, lengths):
    return lambda: fused(pack_padded_sequence(x, lengths))


def test_calls_the_floor_must_not_take():
    """Even with "always": packed input, a dropout mask, a training call, a projection, the thin
    and small-hidden sizes, too little work per step and float64 run the fused kernels (no
    aten::lstm, no warning), and explain says why."""
    cases = []
    torch_lstm, fused = _pair(F32, num_layers=2, dropout=0.5)
    x = _input(fused, F32)
    lengths = random_lengths(BATCH, STEPS, sort=True)
    cases.append(("packed", fused.eval(), _packed(fused, x, lengths),
                  pack_padded_sequence(x, lengths), "packed input"))
    fused_train = FusedLSTM(INPUT, HIDDEN, 2, dropout=0.5).train()
    cases.append(("dropout mask", fused_train, lambda: fused_train(x), x, "a dropout mask"))
    _, fused_proj = _pair(F32, proj_size=64)
    cases.append(("projection", fused_proj, lambda: fused_proj(x), x, "proj_size > 0"))
    thin = _input(fused, F32, batch=4, steps=1)
    cases.append(("thin", fused, lambda: fused(thin), thin, "the thin or small-hidden"))
    small_hidden = FusedLSTM(INPUT, 8).eval()
    cases.append(("small hidden", small_hidden, lambda: small_hidden(x), x,
                  "the thin or small-hidden"))
    one_step = _input(fused, F32, steps=1)
    cases.append(("one step", fused, lambda: fused(one_step), one_step, "too little work"))
    narrow = FusedLSTM(64, HIDDEN).eval()
    x_narrow = randn(STEPS, BATCH, 64).float()
    cases.append(("little work", narrow, lambda: narrow(x_narrow), x_narrow, "too little work"))
    m64 = FusedLSTM(INPUT, HIDDEN, dtype=torch.float64).eval()
    x64 = x.double()
    cases.append(("float64", m64, lambda: m64(x64), x64, "float32, bfloat16 and float16"))
    with CPU.flags(nn_lstm_floor="always"):
        for name, module, run, inp, why in cases:
            with torch.no_grad():
                _, aten_calls = _ran_aten(run)
                plan = fused_lstm.explain(module, inp)["forward"]
            assert aten_calls == 0, name
            assert plan["nn_lstm_floor_runs"] == "false", name
            assert plan["nn_lstm_floor"].startswith("not possible: " + why), (name, plan)
        # A training call: the fused forward and backward.
        train_x = x.clone().requires_grad_()
        (out, _), aten_calls = _ran_aten(lambda: fused(train_x))
        out.sum().backward()
        assert aten_calls == 0 and train_x.grad is not None
        plan = fused_lstm.explain(fused, train_x)["forward"]
        assert plan["nn_lstm_floor"].startswith("not possible: a training call")


@contextlib.contextmanager
def _always():
    with CPU.flags(nn_lstm_floor="always"), torch.no_grad():
        yield


class _Holder(nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x):
        return self.lstm(x)


def test_every_entry_path_sees_the_floor():
    """The choice is made inside the C++ op, so TorchScript, torch.jit.trace, torch.compile and
    the op called directly run at::lstm exactly as the eager module does, with nn.LSTM's
    results, and nothing is recorded for autograd."""
    torch_lstm, fused = _pair(F32, num_layers=2)
    x = _input(fused, F32)
    with torch.no_grad():
        expected = torch_lstm(x)
    weights = [p for p in fused._flat_weights]
    scripted = torch.jit.script(_Holder(FusedLSTM(INPUT, HIDDEN, 2).eval()))
    scripted.lstm.load_state_dict(torch_lstm.state_dict())
    with torch.no_grad():
        traced = torch.jit.trace(fused, (x,))
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    entries = {
        "op": lambda: (lambda o, h, c: (o, (h, c)))(*torch.ops.fused_lstm.lstm(
            x, None, None, None, weights, None, 2, False, True, 0)),
        "script": lambda: scripted(x),
        "trace": lambda: traced(x),
        "compile": lambda: compiled(x),
    }
    with _always():
        for name, run in entries.items():
            got, aten_calls = _ran_aten(run)
            assert aten_calls == 1, name
            _assert_equal(got, expected)
            assert all(t.grad_fn is None for t in _flat(got)), name
    # With "never", the same entries run the fused kernels.
    with CPU.flags(nn_lstm_floor="never"), torch.no_grad():
        for name, run in entries.items():
            _, aten_calls = _ran_aten(run)
            assert aten_calls == 0, name


def test_floor_setting_values():
    assert CPU.nn_lstm_floor == "auto"
    with CPU.flags(nn_lstm_floor="always"):
        assert CPU.nn_lstm_floor == "always"
    assert CPU.nn_lstm_floor == "auto"
    with pytest.raises(ValueError, match="'auto', 'never' or 'always'; got 'sometimes'"):
        CPU.nn_lstm_floor = "sometimes"
