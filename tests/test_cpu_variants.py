"""Every CPU kernel variant, by name (csrc/cpu/plan.h), and the settings that choose them.

Each case names the variant and the product libraries it must run; the test asserts that
``fused_lstm.explain`` reports exactly those for the case (so a change of the rule cannot
silently move a case to another variant), then checks the call against nn.LSTM: forward,
inference and gradients, padded and packed. The settings (``fused_lstm.backends.cpu``) reach,
in this process, what this CPU would not pick by default: the BLAS where brgemm would run, the
generic cell pass where AVX-512 is, float32 products for bf16 models, the row-wise path where
the thin kernel would run.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_lstm
from fused_lstm import FusedLSTM
from helpers import randn, random_lengths

pytestmark = pytest.mark.filterwarnings(  # nn.LSTM's own, for the projection cases
    "ignore:LSTM with projections is not supported with oneDNN:UserWarning")

CPU = fused_lstm.backends.cpu
F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16


def _features() -> dict[str, bool]:
    plan = fused_lstm.explain(dict(hidden_size=32), torch.empty(2, 2, 4))["forward"]
    return {k: v == "1" for k, v in (w.split(":") for w in plan["cpu"].split())}


FEATURES = _features()
needs = {
    "brgemm": pytest.mark.skipif(not FEATURES["brgemm"],
                                 reason="this torch's brgemm micro-kernel does not run here"),
    "avx512_bf16": pytest.mark.skipif(not FEATURES["avx512_bf16"],
                                      reason="the bf16 products need AVX512_BF16"),
    "avx512": pytest.mark.skipif(not FEATURES["avx512"], reason="the 16-lane cell pass needs "
                                 "AVX-512"),
}

# id: (settings, module kwargs, seq_len, batch, dtype, train, the plan's entries, CPU need)
# `train`: a training call (forward with a reserve, then backward) or inference (no_grad).
CASES = {
    "small_hidden-wide-bi": (
        {}, dict(input_size=5, hidden_size=7, num_layers=2, bidirectional=True), 9, 12, F64,
        True, {"variant": "small_hidden", "input_projection.0": "small-hidden product (inline)",
               "recurrent_product": "small-hidden product (inline)",
               "backward_dh_product": "small-hidden product (inline)"}, None),
    "small_hidden-narrow-proj": (
        {}, dict(input_size=40, hidden_size=9, proj_size=4, num_layers=2), 8, 3, F64, True,
        {"variant": "small_hidden", "input_projection.0": "blas",
         "input_projection.1": "small-hidden product (inline)"}, None),
    "small_hidden-inference": (
        {}, dict(input_size=6, hidden_size=12, num_layers=3), 11, 5, F32, False,
        {"variant": "small_hidden", "inference": True}, None),
    "row_wise-brgemm-fused": (
        {}, dict(input_size=16, hidden_size=64, num_layers=2), 12, 16, F32, True,
        {"variant": "row_wise", "input_projection.0": "brgemm, fused into the steps",
         "recurrent_product": "brgemm", "backward_dh_product": "brgemm"}, "brgemm"),
    "row_wise-brgemm-unfused": (
        {"allow_fused_input_projection": False},
        dict(input_size=16, hidden_size=64, num_layers=2, bidirectional=True), 12, 16, F32, True,
        {"variant": "row_wise", "input_projection.0": "blas", "recurrent_product": "brgemm"},
        "brgemm"),
    "row_wise-brgemm-inference-proj": (
        {}, dict(input_size=24, hidden_size=48, proj_size=20, num_layers=2), 10, 12, F32, False,
        {"variant": "row_wise", "recurrent_product": "brgemm", "inference": True}, "brgemm"),
    "row_wise-blas": (
        {"allow_brgemm": False}, dict(input_size=16, hidden_size=64, num_layers=2), 12, 16, F32,
        True, {"variant": "row_wise", "input_projection.0": "blas", "recurrent_product": "blas",
               "backward_dh_product": "blas"}, None),
    "row_wise-float64": (
        {}, dict(input_size=10, hidden_size=20, num_layers=2, bidirectional=True,
                 proj_size=6), 7, 5, F64, True,
        {"variant": "row_wise", "recurrent_product": "blas", "cell_pass":
         "vectorised loops (target_clones)"}, None),
    "row_wise-generic-cell": (
        {"allow_vec16_cell": False}, dict(input_size=12, hidden_size=40, num_layers=2), 9, 9,
        F32, True, {"variant": "row_wise", "cell_pass": "vectorised loops (target_clones)"},
        None),
    "row_wise-vec16-cell": (
        {}, dict(input_size=12, hidden_size=40, num_layers=2), 9, 9, F32, True,
        {"variant": "row_wise", "cell_pass": "avx512 (16 lanes)"}, "avx512"),
    "row_wise-bf16_gemm": (
        {}, dict(input_size=24, hidden_size=32, num_layers=2, bidirectional=True), 10, 12, BF16,
        True, {"variant": "row_wise", "recurrent_product": "bf16_gemm", "keep_bf16": "true",
               "backward_dh_product": "bf16_gemm", "backward_weight_products": "bf16_gemm"},
        "avx512_bf16"),
    "row_wise-bf16_gemm-unfused": (
        {"allow_fused_input_projection": False},
        dict(input_size=24, hidden_size=32, num_layers=2, proj_size=12), 10, 12, BF16, True,
        {"variant": "row_wise", "input_projection.0": "bf16_gemm",
         "recurrent_product": "bf16_gemm"}, "avx512_bf16"),
    "row_wise-bf16-float32-products": (
        {"allow_bf16_products": False},
        dict(input_size=24, hidden_size=32, num_layers=2, bidirectional=True), 10, 12, BF16,
        True, {"variant": "row_wise", "keep_bf16": "false", "backward_dh_product": "brgemm"},
        "brgemm"),
    "thin-one-step": (
        {}, dict(input_size=64, hidden_size=48, num_layers=2, bidirectional=True), 1, 3, F32,
        False, {"variant": "thin", "recurrent_product": "thin kernel (dot products)"}, None),
    "thin-steps": (
        {}, dict(input_size=40, hidden_size=32, num_layers=3), 20, 8, F64, False,
        {"variant": "thin"}, None),
    "thin-off": (
        {"allow_thin": False}, dict(input_size=40, hidden_size=32, num_layers=3), 20, 8, F64,
        False, {"variant": "row_wise", "why": "hidden_size >= 16; the thin kernel is off "
                "(allow_thin)"}, None),
    "thin-sizes-training": (
        {}, dict(input_size=64, hidden_size=48, num_layers=1), 1, 3, F32, True,
        {"variant": "row_wise", "why": "hidden_size >= 16; the thin kernel serves inference "
                                       "only"}, None),
}
# Float tolerances of the comparison with float64 (see check_against_nn_lstm).
FLOOR = {F64: 1e-10, F32: 2e-6, BF16: torch.finfo(BF16).eps}


def case_params():
    for name, case in CASES.items():
        need = case[-1]
        yield pytest.param(name, marks=[needs[need]] if need else [], id=name)


def _inputs(module, seq_len, batch, packed, dtype):
    x = randn(seq_len, batch, module.input_size).to(dtype)
    layers_dirs = module.num_layers * (2 if module.bidirectional else 1)
    out = module.proj_size or module.hidden_size
    hx = (randn(layers_dirs, batch, out).to(dtype),
          randn(layers_dirs, batch, module.hidden_size).to(dtype))
    lengths = random_lengths(batch, seq_len, sort=True) if packed else None
    return x, hx, lengths


def _run(module, x, hx, lengths, upstream, train):
    """Outputs (and with `train`, the gradients of input, h0, c0 and every weight), float64."""
    leaves = [x.clone().requires_grad_(train), *(t.clone().requires_grad_(train) for t in hx)]
    inp = pack_padded_sequence(leaves[0], lengths) if lengths else leaves[0]
    with torch.set_grad_enabled(train):
        out, (h_n, c_n) = module(inp, tuple(leaves[1:]))
    out = out.data if lengths else out
    results = [out, h_n, c_n]
    if train:
        results += torch.autograd.grad([out, h_n, c_n], leaves + list(module.parameters()),
                                       [u.to(t.dtype) for u, t in zip(upstream, results)])
    return [t.detach().double() for t in results]


def check_against_nn_lstm(kwargs, seq_len, batch, dtype, train, packed):
    """FusedLSTM in `dtype` against nn.LSTM in float64 on the same (rounded) weights and inputs:
    within twice nn.LSTM's own error in `dtype`, plus FLOOR relative to the values (float64:
    within FLOOR of nn.LSTM)."""
    torch_lstm = nn.LSTM(dtype=dtype, **kwargs)
    fused = FusedLSTM(dtype=dtype, **kwargs)
    fused.load_state_dict(torch_lstm.state_dict())
    exact = nn.LSTM(dtype=F64, **kwargs)
    exact.load_state_dict({k: v.double() for k, v in torch_lstm.state_dict().items()})
    x, hx, lengths = _inputs(fused, seq_len, batch, packed, dtype)
    rows = sum(lengths) if lengths else seq_len * batch
    d_out = (2 if kwargs.get("bidirectional") else 1) * (kwargs.get("proj_size") or
                                                         kwargs["hidden_size"])
    upstream = (randn(*((rows, d_out) if lengths else (seq_len, batch, d_out))),
                randn(*hx[0].shape), randn(*hx[1].shape))
    ours = _run(fused, x, hx, lengths, upstream, train)
    expected = _run(exact, x.double(), tuple(t.double() for t in hx), lengths, upstream, train)
    theirs = _run(torch_lstm, x, hx, lengths, upstream, train) if dtype != F64 else expected
    assert len(ours) == len(expected) == len(theirs)
    for i, (o, e, t) in enumerate(zip(ours, expected, theirs)):
        assert not torch.isnan(o).any(), i
        scale = max(1.0, e.abs().max().item())
        our_error = (o - e).abs().max().item()
        their_error = (t - e).abs().max().item()
        assert our_error <= 2 * their_error + FLOOR[dtype] * scale, (i, our_error, their_error)
    return fused, x, lengths


def plan_of(module, x, lengths, train):
    inp = pack_padded_sequence(x, lengths) if lengths else x
    with torch.set_grad_enabled(train):
        return fused_lstm.explain(module, inp)["forward"]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("name", list(case_params()))
def test_variant(name, packed):
    settings, kwargs, seq_len, batch, dtype, train, expected, _ = CASES[name]
    with CPU.flags(**settings):
        module = FusedLSTM(dtype=dtype, **kwargs)
        x, _, lengths = _inputs(module, seq_len, batch, packed, dtype)
        plan = plan_of(module, x, lengths, train)
        assert plan["inference"] is not train
        for key, value in expected.items():
            assert plan[key] == value, (key, plan)
        check_against_nn_lstm(kwargs, seq_len, batch, dtype, train, packed)


@pytest.mark.parametrize("setting,case,key,bits_differ", [
    ("allow_brgemm", "row_wise-brgemm-fused", "recurrent_product", False),
    ("allow_fused_input_projection", "row_wise-brgemm-fused", "input_projection.0", False),
    ("allow_vec16_cell", "row_wise-vec16-cell", "cell_pass", True),
    ("allow_thin", "thin-one-step", "variant", True),
    ("allow_bf16_products", "row_wise-bf16_gemm", "recurrent_product", True),
])
def test_setting_switches_the_kernel(setting, case, key, bits_differ):
    """Turning a setting off changes the plan the kernels read (explain), and both plans agree
    with each other closely. Where the two compute differently on every CPU (another exp, other
    summation orders, bf16 rounding), the results also differ in bits: the switch did reach the
    kernel. (brgemm and MKL's sgemm, fused or not, sum in the same order on some CPUs.)"""
    need = CASES[case][-1]
    if need and not FEATURES[need]:
        pytest.skip(f"this CPU lacks {need}")
    _, kwargs, seq_len, batch, dtype, train, _, _ = CASES[case]
    module = FusedLSTM(dtype=dtype, **kwargs)
    x, hx, lengths = _inputs(module, seq_len, batch, False, dtype)
    upstream = [randn(*t.shape) for t in (module(x, hx)[0], *hx)]
    default = _run(module, x, hx, lengths, upstream, train)
    default_plan = plan_of(module, x, lengths, train)
    with CPU.flags(**{setting: False}):
        switched = _run(module, x, hx, lengths, upstream, train)
        switched_plan = plan_of(module, x, lengths, train)
    assert switched_plan[key] != default_plan[key], (key, default_plan[key])
    if bits_differ:
        assert any(not torch.equal(a, b) for a, b in zip(default, switched))
    tol = 0.05 if dtype == BF16 else 1e-5
    for a, b in zip(default, switched):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert all(a.equal(b) for a, b in zip(default, _run(module, x, hx, lengths, upstream, train)))


def test_flags_restore_every_setting_even_after_an_error():
    before = CPU.as_dict()
    with pytest.raises(KeyError):
        with CPU.flags(allow_thin=False, allow_brgemm=False):
            assert not CPU.allow_thin and not CPU.allow_brgemm
            raise KeyError("inside")
    assert CPU.as_dict() == before


def test_settings_reject_unknown_names_and_bad_values():
    with pytest.raises(AttributeError, match="no setting 'allow_everything'"):
        CPU.allow_everything = True
    with pytest.raises(AttributeError, match="no setting"):
        with CPU.flags(allow_thinn=False):
            pass
    with pytest.raises(TypeError, match="takes a bool"):
        CPU.allow_thin = 0
    cuda = fused_lstm.backends.cuda
    with pytest.raises(ValueError, match="'auto', 'persistent' or 'step'"):
        cuda.path = "fast"
    with pytest.raises(ValueError, match="power of two"):
        cuda.persistent_k_split = 3
    with pytest.raises(ValueError, match=r"\[1, 64\]"):
        cuda.persistent_tile = 65
    assert CPU.allow_thin is True and cuda.path == "auto"
    with cuda.flags(path="step", persistent_units=4):
        assert (cuda.path, cuda.persistent_units) == ("step", 4)
    assert (cuda.path, cuda.persistent_units) == ("auto", None)


def test_a_setting_applies_from_the_next_call():
    module = FusedLSTM(64, 48)
    x = randn(1, 2, 64, dtype=F32)
    with torch.no_grad():
        assert fused_lstm.explain(module, x)["path"] == "thin"
        CPU.allow_thin = False
        try:
            assert fused_lstm.explain(module, x)["path"] == "row_wise"
        finally:
            CPU.allow_thin = True
        assert fused_lstm.explain(module, x)["path"] == "thin"


def test_environment_gives_the_defaults_at_import(tmp_path):
    """The environment variables are read once, at import, as the settings' defaults (a fresh
    process is what this test is about); an invalid value is refused with its name."""
    env = dict(os.environ, FUSED_LSTM_NO_THIN="1", FUSED_LSTM_NO_BRGEMM="0",
               FUSED_LSTM_UNFUSED_INPUT="1", FUSED_LSTM_CUDA_PATH="step",
               FUSED_LSTM_CUDA_PERSISTENT_TILE="8")
    code = ("import fused_lstm, os; b = fused_lstm.backends; "
            "os.environ['FUSED_LSTM_NO_BRGEMM'] = '1'; "  # read at import only
            "print(b.cpu.allow_thin, b.cpu.allow_brgemm, b.cpu.allow_fused_input_projection, "
            "b.cuda.path, b.cuda.persistent_tile)")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["False", "True", "False", "step", "8"]
    env["FUSED_LSTM_CUDA_PATH"] = "fastest"
    run = subprocess.run([sys.executable, "-c", "import fused_lstm"], env=env,
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode != 0 and "FUSED_LSTM_CUDA_PATH='fastest'" in run.stderr
