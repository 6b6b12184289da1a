"""The plain-PyTorch reference (``fused_lstm.reference``) against torch.nn.LSTM, in float64.

The reference is the spec the kernels are tested against and the double-backward path, so it is
held to nn.LSTM's outputs AND gradients over the full configuration grid. These tests need no
compiled code.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence
from torch.testing import assert_close

from helpers import load_reference, num_directions, out_size, randn, random_lengths

reference = load_reference()

F64 = torch.float64
INPUT_SIZE, HIDDEN, SEQ_LEN, BATCH = 3, 5, 6, 4

GRID = list(itertools.product(
    [1, 2, 3],                                      # num_layers
    [True, False],                                  # bias
    [False, True],                                  # bidirectional
    [0, 2],                                         # proj_size
    ["padded", "packed_sorted", "packed_unsorted"],  # layout
    [True, False],                                  # h0/c0 given
))


def _ids(params):
    layers, bias, bidir, proj, layout, given = params
    return (f"L{layers}-{'bias' if bias else 'nobias'}-{'bi' if bidir else 'uni'}-proj{proj}-"
            f"{layout}-{'hx' if given else 'nohx'}")


def _reference_call(lstm, inp, hx, dropout_mask=None):
    """Runs the reference the way FusedLSTM calls the op: packed data with hx permuted into
    sorted order, results permuted back. Returns (output data, h_n, c_n)."""
    layers_dirs = lstm.num_layers * num_directions(lstm)
    if isinstance(inp, PackedSequence):
        data, batch_sizes = inp.data, inp.batch_sizes
        if hx is not None and inp.sorted_indices is not None:
            hx = tuple(t.index_select(1, inp.sorted_indices) for t in hx)
    else:
        data, batch_sizes = inp, None
    h0, c0 = hx if hx is not None else (None, None)
    output, h_n, c_n = reference.lstm_forward(
        data, batch_sizes, h0, c0, lstm._flat_weights, dropout_mask, lstm.num_layers,
        lstm.bidirectional, lstm.bias, lstm.proj_size,
    )
    assert h_n.shape[0] == layers_dirs
    if isinstance(inp, PackedSequence) and inp.unsorted_indices is not None:
        h_n = h_n.index_select(1, inp.unsorted_indices)
        c_n = c_n.index_select(1, inp.unsorted_indices)
    return output, h_n, c_n


def _make_input(layout):
    x = randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=F64).requires_grad_()
    if layout == "padded":
        return x, x
    lengths = random_lengths(BATCH, SEQ_LEN, sort=layout == "packed_sorted")
    return pack_padded_sequence(x, lengths, enforce_sorted=layout == "packed_sorted"), x


@pytest.mark.parametrize("params", GRID, ids=_ids)
def test_reference_matches_nn_lstm(params):
    layers, bias, bidir, proj, layout, given = params
    lstm = nn.LSTM(INPUT_SIZE, HIDDEN, layers, bias=bias, bidirectional=bidir, proj_size=proj,
                   dtype=F64)
    inp, leaf = _make_input(layout)
    hx = None
    if given:
        layers_dirs = layers * num_directions(lstm)
        hx = (randn(layers_dirs, BATCH, out_size(lstm), dtype=F64).requires_grad_(),
              randn(layers_dirs, BATCH, HIDDEN, dtype=F64).requires_grad_())

    expected_out, (expected_h, expected_c) = lstm(inp, hx)
    expected_out = expected_out.data if isinstance(expected_out, PackedSequence) else expected_out
    out, h_n, c_n = _reference_call(lstm, inp, hx)
    assert_close(out, expected_out)
    assert_close(h_n, expected_h)
    assert_close(c_n, expected_c)

    wrt = [leaf, *(hx or ()), *lstm._flat_weights]
    upstream = [randn(*t.shape, dtype=F64) for t in (out, h_n, c_n)]
    expected_grads = torch.autograd.grad((expected_out, expected_h, expected_c), wrt, upstream,
                                         retain_graph=True)  # packing is shared
    grads = torch.autograd.grad((out, h_n, c_n), wrt, upstream)
    for got, expected in zip(grads, expected_grads, strict=True):
        assert_close(got, expected)


@pytest.mark.parametrize("layout", ["padded", "packed_unsorted"])
def test_short_sequences_keep_their_final_state(layout):
    """Packed h_n of a short sequence is its state at its own last step: the same as running
    that sequence alone."""
    lstm = nn.LSTM(INPUT_SIZE, HIDDEN, 2, bidirectional=True, dtype=F64)
    lengths = [SEQ_LEN, 2, 4, 1]
    x = randn(SEQ_LEN, len(lengths), INPUT_SIZE, dtype=F64)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    _, h_n, c_n = _reference_call(lstm, packed, None)
    for b, length in enumerate(lengths):
        _, h_alone, c_alone = reference.lstm_forward(
            x[:length, b:b + 1], None, None, None, lstm._flat_weights, None, 2, True, True, 0)
        assert_close(h_n[:, b:b + 1], h_alone)
        assert_close(c_n[:, b:b + 1], c_alone)


def _mask_shape(lstm, data):
    return (lstm.num_layers - 1, *data.shape[:-1], num_directions(lstm) * out_size(lstm))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_dropout_mask_of_ones_is_no_mask(packed):
    lstm = nn.LSTM(INPUT_SIZE, HIDDEN, 3, bidirectional=True, proj_size=2, dtype=F64)
    inp, _ = _make_input("packed_unsorted" if packed else "padded")
    data = inp.data if packed else inp
    ones = torch.ones(_mask_shape(lstm, data), dtype=F64)
    for got, expected in zip(_reference_call(lstm, inp, None, ones),
                             _reference_call(lstm, inp, None)):
        assert_close(got, expected)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_dropout_mask_scales_each_layers_output(packed):
    """With a random mask, layer k+1 sees layer k's output times mask[k]: the same as a chain of
    single-layer nn.LSTMs with the mask applied in between. A zero mask means zero input."""
    layers, bidir, proj = 3, True, 2
    lstm = nn.LSTM(INPUT_SIZE, HIDDEN, layers, bidirectional=bidir, proj_size=proj, dtype=F64)
    inp, _ = _make_input("packed_sorted" if packed else "padded")
    data = inp.data if packed else inp
    p = 0.5
    mask = torch.empty(_mask_shape(lstm, data), dtype=F64).bernoulli_(1 - p).div_(1 - p)
    mask[0, 1] = 0  # one whole step (padded) / row (packed) dropped: next layer sees zeros
    hx = (randn(layers * 2, BATCH, proj, dtype=F64), randn(layers * 2, BATCH, HIDDEN, dtype=F64))
    out, h_n, c_n = _reference_call(lstm, inp, hx, mask)

    layer_input = data
    hs, cs = [], []
    for layer in range(layers):
        single = nn.LSTM(layer_input.shape[-1], HIDDEN, 1, bidirectional=bidir, proj_size=proj,
                         dtype=F64)
        names = [n.replace("_l0", f"_l{layer}") for n in single._flat_weights_names]
        with torch.no_grad():
            for name, param in zip(names, single._flat_weights):
                param.copy_(getattr(lstm, name))
        if layer > 0:
            layer_input = layer_input * mask[layer - 1]
        state = (hx[0][2 * layer:2 * layer + 2], hx[1][2 * layer:2 * layer + 2])
        if packed:
            y, (h, c) = single(PackedSequence(layer_input, inp.batch_sizes), state)
            layer_input = y.data
        else:
            layer_input, (h, c) = single(layer_input, state)
        hs.append(h)
        cs.append(c)
    assert_close(out, layer_input)
    assert_close(h_n, torch.cat(hs))
    assert_close(c_n, torch.cat(cs))


def test_zero_mask_means_next_layer_sees_zero_input():
    lstm = nn.LSTM(INPUT_SIZE, HIDDEN, 2, dtype=F64)
    x = randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=F64)
    zeros = torch.zeros(1, SEQ_LEN, BATCH, HIDDEN, dtype=F64)
    out, h_n, c_n = reference.lstm_forward(x, None, None, None, lstm._flat_weights, zeros, 2,
                                           False, True, 0)
    top = nn.LSTM(HIDDEN, HIDDEN, 1, dtype=F64)
    with torch.no_grad():
        for name, param in zip(top._flat_weights_names, top._flat_weights):
            param.copy_(getattr(lstm, name.replace("_l0", "_l1")))
    expected_out, (expected_h, expected_c) = top(torch.zeros(SEQ_LEN, BATCH, HIDDEN, dtype=F64))
    assert_close(out, expected_out)
    assert_close(h_n[1:], expected_h)
    assert_close(c_n[1:], expected_c)


def test_reference_is_twice_differentiable():
    lstm = nn.LSTM(2, 3, 2, bidirectional=True, proj_size=1, dtype=F64)
    x = randn(3, 2, 2, dtype=F64).requires_grad_()
    h0 = randn(4, 2, 1, dtype=F64).requires_grad_()
    c0 = randn(4, 2, 3, dtype=F64).requires_grad_()
    weights = [w.detach().clone().requires_grad_() for w in lstm._flat_weights]

    def fn(x, h0, c0, *weights):
        return reference.lstm_forward(x, None, h0, c0, weights, None, 2, True, True, 1)

    assert torch.autograd.gradgradcheck(fn, (x, h0, c0, *weights), fast_mode=True)


def test_reference_packed_is_twice_differentiable():
    lstm = nn.LSTM(2, 3, 1, bidirectional=True, dtype=F64)
    batch_sizes = torch.tensor([3, 2, 1])
    data = randn(6, 2, dtype=F64).requires_grad_()
    h0 = randn(2, 3, 3, dtype=F64).requires_grad_()
    weights = [w.detach().clone().requires_grad_() for w in lstm._flat_weights]

    def fn(data, h0, *weights):
        return reference.lstm_forward(data, batch_sizes, h0, None, weights, None, 1, True, True, 0)

    assert torch.autograd.gradgradcheck(fn, (data, h0, *weights), fast_mode=True)


def test_zero_batch():
    lstm = nn.LSTM(INPUT_SIZE, HIDDEN, 2, bidirectional=True, dtype=F64)
    x = randn(SEQ_LEN, 0, INPUT_SIZE, dtype=F64)
    expected_out, (expected_h, expected_c) = lstm(x)
    out, h_n, c_n = reference.lstm_forward(x, None, None, None, lstm._flat_weights, None, 2, True,
                                           True, 0)
    assert out.shape == expected_out.shape
    assert h_n.shape == expected_h.shape
    assert c_n.shape == expected_c.shape


def test_nan_propagates():
    lstm = nn.LSTM(INPUT_SIZE, HIDDEN, 2, dtype=F64)
    x = randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=F64)
    x[2, 1, 0] = float("nan")
    expected_out, (expected_h, expected_c) = lstm(x)
    out, h_n, c_n = reference.lstm_forward(x, None, None, None, lstm._flat_weights, None, 2, False,
                                           True, 0)
    for got, expected in ((out, expected_out), (h_n, expected_h), (c_n, expected_c)):
        assert torch.equal(got.isnan(), expected.isnan())
        assert_close(got, expected, equal_nan=True)
