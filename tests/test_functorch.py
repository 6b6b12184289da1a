"""FusedLSTM under torch.func (grad, vjp, jacrev, vmap), batched gradients of the regular autograd
graph (is_grads_batched, jacobian/hessian(vectorize=True), gradcheck(check_batched_grad=True)),
forward-mode AD and ExpandedWeights (fused_lstm/_functorch.py).

Every test compares with nn.LSTM on identical weights (float64) and asserts that no warning is
raised. Where the fused kernels are meant to run, ``fused_only`` makes FusedLSTM's hand-off to
nn.LSTM raise, so a test passes only if the fused ops computed the result."""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vjp, vmap
from torch.nn.utils.rnn import PackedSequence
from torch.testing import assert_close

import fused_lstm
from fused_lstm import FusedLSTM
from fused_lstm import module as fused_module

from helpers import randn

F64 = torch.float64


def pair(input_size=3, hidden_size=4, **kwargs):
    """(nn.LSTM, FusedLSTM) with the same weights, float64."""
    ref = nn.LSTM(input_size, hidden_size, dtype=F64, **kwargs)
    fused = fused_lstm.convert(copy.deepcopy(ref))
    assert type(fused) is FusedLSTM
    return ref, fused


def detached_params(module):
    return {k: v.detach() for k, v in module.named_parameters()}


@pytest.fixture
def fused_only(monkeypatch):
    """FusedLSTM may not hand the call to nn.LSTM's implementation."""

    def refuse(module, input, hx):  # noqa: A002
        raise AssertionError("FusedLSTM ran nn.LSTM's implementation")

    monkeypatch.setattr(fused_module, "_nn_lstm_forward", refuse)


@contextmanager
def no_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


def loss_of(module):
    """A loss of every output of ``module`` called with parameters ``p`` on ``x``."""

    def loss(p, x, *state):
        out, (h_n, c_n) = functional_call(module, p, (x, state) if state else (x,))
        if isinstance(out, PackedSequence):
            out = out.data
        return out.sin().sum() + (h_n * h_n).sum() + c_n.cos().sum()

    return loss


def assert_dicts_close(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        assert_close(got[key], expected[key], msg=key)


# ---- torch.func: the fused kernels run -------------------------------------------------------


def test_grad_runs_fused(fused_only):
    ref, fused = pair(num_layers=2)
    x = randn(5, 2, 3)
    h0, c0 = randn(2, 2, 4), randn(2, 2, 4)
    expected = grad(loss_of(ref), argnums=(0, 1, 2, 3))(detached_params(ref), x, h0, c0)
    with no_warnings():
        got = grad(loss_of(fused), argnums=(0, 1, 2, 3))(detached_params(fused), x, h0, c0)
    assert_dicts_close(got[0], expected[0])
    for g, e in zip(got[1:], expected[1:]):
        assert_close(g, e)


def test_vjp_runs_fused(fused_only):
    ref, fused = pair(num_layers=2, bidirectional=True)
    x = randn(4, 3, 3)
    with torch.no_grad():
        upstream = randn(*ref(x)[0].shape)
    out_ref, vjp_ref = vjp(lambda x: ref(x)[0], x)
    with no_warnings():
        out, vjp_fused = vjp(lambda x: fused(x)[0], x)
        got = vjp_fused(upstream)
    assert_close(out, out_ref)
    assert_close(got, vjp_ref(upstream))


def test_jacrev_runs_fused(fused_only):
    ref, fused = pair(proj_size=2)
    x = randn(3, 2, 3)
    expected = jacrev(lambda p, x: functional_call(ref, p, (x,))[0], argnums=(0, 1))(
        detached_params(ref), x)
    with no_warnings():
        got = jacrev(lambda p, x: functional_call(fused, p, (x,))[0], argnums=(0, 1))(
            detached_params(fused), x)
    assert_dicts_close(got[0], expected[0])
    assert_close(got[1], expected[1])


def test_jacrev_with_weights_requiring_grad(fused_only):
    """Weights that are Parameters requiring grad, grad mode on: the jacobian stays
    differentiable with respect to them (the reference path of the backward), as nn.LSTM's."""
    ref, fused = pair()
    x = randn(3, 2, 3)
    expected = jacrev(lambda x: ref(x)[0])(x)
    with no_warnings():
        got = jacrev(lambda x: fused(x)[0])(x)
    assert_close(got, expected)
    w_ref = torch.autograd.grad(expected.sin().sum(), ref.weight_hh_l0)[0]
    w_got = torch.autograd.grad(got.sin().sum(), fused.weight_hh_l0)[0]
    assert_close(w_got, w_ref)


def test_nested_jacrev_hessian(fused_only):
    """jacrev(jacrev(f)): the inner backward must itself be differentiable (the outer level
    differentiates it)."""
    ref, fused = pair(2, 2)
    x = randn(2, 1, 2)
    expected = jacrev(jacrev(lambda x: ref(x)[0].pow(2).sum()))(x)
    with no_warnings():
        got = jacrev(jacrev(lambda x: fused(x)[0].pow(2).sum()))(x)
    assert_close(got, expected)


PER_SAMPLE_CONFIGS = {
    "batched": dict(kwargs={}, shape=(5, 2, 3)),
    "unbatched": dict(kwargs={}, shape=(5, 3)),
    "batch_first": dict(kwargs=dict(batch_first=True), shape=(2, 5, 3)),
    "bidirectional": dict(kwargs=dict(bidirectional=True, num_layers=2), shape=(5, 2, 3)),
    "proj_size": dict(kwargs=dict(proj_size=2, num_layers=2), shape=(5, 2, 3)),
}


@pytest.mark.parametrize("config", list(PER_SAMPLE_CONFIGS))
def test_per_sample_grads_vmap_grad(config, fused_only):
    """vmap(grad(loss)) over samples, weights shared (not batched): per-sample weight gradients.
    nn.LSTM itself raises under this vmap in float64 (torch 2.13, CPU: "output with shape [...]
    doesn't match the broadcast shape"; float32 works), so the expected values are a loop of
    torch.autograd.grad over the samples."""
    spec = PER_SAMPLE_CONFIGS[config]
    ref, fused = pair(**spec["kwargs"])
    samples = randn(6, *spec["shape"])
    params = detached_params(ref)
    expected = {k: [] for k in params}
    for x in samples:
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        grads = torch.autograd.grad(loss_of(ref)(p, x), list(p.values()))
        for k, g in zip(p, grads):
            expected[k].append(g)
    expected = {k: torch.stack(v) for k, v in expected.items()}
    with no_warnings():
        got = vmap(grad(loss_of(fused)), in_dims=(None, 0))(detached_params(fused), samples)
    assert_dicts_close(got, expected)


def test_per_sample_grads_packed(fused_only):
    """Packed input per sample: vmap over the packed data with shared batch_sizes (a
    PackedSequence built inside the vmapped function; packing itself, pack_padded_sequence,
    has no batching rule in torch, so packing under vmap is not meaningful)."""
    ref, fused = pair(num_layers=2, bidirectional=True)
    batch_sizes = torch.tensor([3, 2, 2, 1])
    data = randn(5, int(batch_sizes.sum()), 3)

    def loss(module):
        def f(p, d):
            out, (h_n, c_n) = functional_call(module, p, (PackedSequence(d, batch_sizes),))
            return out.data.sin().sum() + (h_n * c_n).sum()
        return f

    params = detached_params(ref)
    expected = {k: [] for k in params}
    for d in data:
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        for k, g in zip(p, torch.autograd.grad(loss(ref)(p, d), list(p.values()))):
            expected[k].append(g)
    expected = {k: torch.stack(v) for k, v in expected.items()}
    with no_warnings():
        got = vmap(grad(loss(fused)), in_dims=(None, 0))(detached_params(fused), data)
    assert_dicts_close(got, expected)


def test_vmap_over_models(fused_only):
    """Batched weights: vmap over a stack of models (and of inputs)."""
    ref, fused = pair(num_layers=2)
    models = 4
    stacked = {k: v.detach() + 0.1 * randn(models, *v.shape) for k, v in ref.named_parameters()}
    xs = randn(models, 5, 2, 3)
    expected = {k: [] for k in stacked}
    outputs = []
    for i in range(models):
        p = {k: v[i].clone().requires_grad_() for k, v in stacked.items()}
        outputs.append(functional_call(ref, p, (xs[i],))[0].detach())
        for k, g in zip(p, torch.autograd.grad(loss_of(ref)(p, xs[i]), list(p.values()))):
            expected[k].append(g)
    expected = {k: torch.stack(v) for k, v in expected.items()}
    with no_warnings():
        got = vmap(grad(loss_of(fused)))(stacked, xs)
        out = vmap(lambda p, x: functional_call(fused, p, (x,))[0], in_dims=(0, None))(
            stacked, xs[0])
    assert_dicts_close(got, expected)
    for i in range(models):
        p = {k: v[i] for k, v in stacked.items()}
        assert_close(out[i], functional_call(ref, p, (xs[0],))[0].detach())


def test_vmap_inference(fused_only):
    """vmap of the module's call (no gradient): one fused call with the vmap dimension folded
    into the LSTM batch. nn.LSTM raises here ("Batching rule not implemented for
    aten::lstm.input"); FusedLSTM computes what a loop of nn.LSTM calls gives."""
    ref, fused = pair(num_layers=2, bidirectional=True, batch_first=True)
    xs = randn(3, 2, 5, 3)
    h0 = randn(3, 4, 2, 4)
    with torch.no_grad():
        expected = [ref(x, (h, h * 0.5)) for x, h in zip(xs, h0)]
        with no_warnings():
            out, (h_n, c_n) = vmap(fused)(xs, (h0, h0 * 0.5))
    for i, (o, (h, c)) in enumerate(expected):
        assert_close(out[i], o)
        assert_close(h_n[i], h)
        assert_close(c_n[i], c)


def test_plain_call_keeps_the_cpp_autograd_kernel(monkeypatch):
    """Without transforms nothing goes through the Python autograd.Function."""

    from fused_lstm import _functorch

    def refuse(*args):
        raise AssertionError("LSTMFunction used without a transform")

    monkeypatch.setattr(_functorch.LSTMFunction, "apply", refuse)
    ref, fused = pair()
    x = randn(5, 2, 3).requires_grad_()
    fused(x)[0].sum().backward()  # the C++ entry
    fused(x[:, 0])[0].sum().backward()  # unbatched: FusedLSTM's Python path
    x_ref = x.detach().requires_grad_()
    ref(x_ref)[0].sum().backward()
    ref(x_ref[:, 0])[0].sum().backward()
    assert_close(x.grad, x_ref.grad)


# ---- batched gradients of the regular autograd graph -----------------------------------------


def test_is_grads_batched(fused_only):
    ref, fused = pair(num_layers=2, proj_size=2)
    x = randn(4, 2, 3)
    outs = {}
    for name, module in (("ref", ref), ("fused", fused)):
        xx = x.clone().requires_grad_()
        outs[name] = (xx, module(xx)[0])
    upstream = randn(3, *outs["ref"][1].shape)
    wrt_ref = (outs["ref"][0], *ref.parameters())
    wrt_fused = (outs["fused"][0], *fused.parameters())
    expected = torch.autograd.grad(outs["ref"][1], wrt_ref, upstream, is_grads_batched=True)
    with no_warnings():
        got = torch.autograd.grad(outs["fused"][1], wrt_fused, upstream, is_grads_batched=True)
    for g, e in zip(got, expected):
        assert_close(g, e)


def test_jacobian_vectorize(fused_only):
    ref, fused = pair(bidirectional=True)
    x = randn(3, 2, 3)
    expected = torch.autograd.functional.jacobian(lambda x: ref(x)[0], x, vectorize=True)
    with no_warnings():
        got = torch.autograd.functional.jacobian(lambda x: fused(x)[0], x, vectorize=True)
    assert_close(got, expected)


def test_hessian_vectorize(fused_only):
    ref, fused = pair(2, 2)
    x = randn(2, 1, 2)
    expected = torch.autograd.functional.hessian(lambda x: ref(x)[0].pow(2).sum(), x,
                                                 vectorize=True)
    with no_warnings():
        got = torch.autograd.functional.hessian(lambda x: fused(x)[0].pow(2).sum(), x,
                                                vectorize=True)
    assert_close(got, expected)


def test_gradcheck_check_batched_grad(fused_only):
    _, fused = pair(2, 3, num_layers=2)
    names = [n for n, _ in fused.named_parameters()]
    x, h0, c0 = randn(3, 2, 2), randn(2, 2, 3), randn(2, 2, 3)
    weights = [p.detach().clone() for p in fused.parameters()]

    def f(x, h0, c0, *w):
        out, (h_n, c_n) = functional_call(fused, dict(zip(names, w)), (x, (h0, c0)))
        return out, h_n, c_n

    inputs = [t.requires_grad_() for t in (x, h0, c0, *weights)]
    with no_warnings():
        assert torch.autograd.gradcheck(f, inputs, check_batched_grad=True)


# ---- handed to nn.LSTM's implementation, quietly ---------------------------------------------


def test_forward_ad_matches_nn_lstm():
    ref, fused = pair(num_layers=2)
    x, t = randn(4, 2, 3), randn(4, 2, 3)
    expected = jvp(lambda x: ref(x)[0], (x,), (t,))  # imports torch's jvp decompositions
    with no_warnings():
        got = jvp(lambda x: fused(x)[0], (x,), (t,))
        jac = jacfwd(lambda x: fused(x)[0])(x)
    assert_close(got, expected)
    assert_close(jac, jacfwd(lambda x: ref(x)[0])(x))
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode), forward_ad.dual_level():
            dual = forward_ad.make_dual(x, t)
            expected = forward_ad.unpack_dual(ref(dual)[0])
            with no_warnings():
                got = forward_ad.unpack_dual(fused(dual)[0])
            assert got.tangent is not None
            assert_close(got.primal, expected.primal)
            assert_close(got.tangent, expected.tangent)


def test_expanded_weights_per_sample_grads():
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

    ref, fused = pair(num_layers=2, batch_first=True)
    x = randn(5, 4, 3)
    call_for_per_sample_grads(ref)(x)[0].sin().sum().backward()
    with no_warnings():
        call_for_per_sample_grads(fused)(x)[0].sin().sum().backward()
    for p_ref, p_fused in zip(ref.parameters(), fused.parameters()):
        assert_close(p_fused.grad_sample, p_ref.grad_sample)
