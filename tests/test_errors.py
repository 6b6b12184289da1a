"""Bad arguments: FusedLSTM raises what torch.nn.LSTM raises (same class, same message)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from fused_lstm import FusedLSTM

from helpers import randn

# The op rejecting a call that nn.LSTM accepts would show up as this warning: make it fail.
pytestmark = pytest.mark.filterwarnings("error::fused_lstm.FusedLSTMFallbackWarning")

F32 = torch.float32
BASE = dict(input_size=3, hidden_size=5, num_layers=2)


def _packed(seq_len=4, batch=3, input_size=3, dtype=F32, sorted_=False):
    x = randn(seq_len, batch, input_size, dtype=dtype)
    lengths = [seq_len, 2, 1] if sorted_ else [2, seq_len, 1]
    return pack_padded_sequence(x, lengths[:batch], enforce_sorted=sorted_)


def _state(layers_dirs, batch, h_size, c_size, dtype=F32):
    h_shape = (layers_dirs, batch, h_size) if batch is not None else (layers_dirs, h_size)
    c_shape = (layers_dirs, batch, c_size) if batch is not None else (layers_dirs, c_size)
    return randn(*h_shape, dtype=dtype), randn(*c_shape, dtype=dtype)


# (id, extra module kwargs, function making the call's arguments, phrase the message contains)
CASES = [
    # input
    ("input-size", {}, lambda: (randn(4, 2, 7, dtype=F32),), "input.size(-1) must be equal to input_size"),
    ("input-size-unbatched", {}, lambda: (randn(4, 7, dtype=F32),), "input.size(-1) must be equal to input_size"),
    ("input-size-batch-first", dict(batch_first=True), lambda: (randn(2, 4, 7, dtype=F32),), "input.size(-1)"),
    ("input-size-packed", {}, lambda: (_packed(input_size=7),), "shapes cannot be multiplied"),
    ("input-1d", {}, lambda: (randn(3, dtype=F32),), "Expected input to be 2D or 3D, got 1D"),
    ("input-4d", {}, lambda: (randn(1, 4, 2, 3, dtype=F32),), "Expected input to be 2D or 3D, got 4D"),
    ("input-0d", {}, lambda: (randn((), dtype=F32),), "Expected input to be 2D or 3D, got 0D"),
    ("input-not-a-tensor", {}, lambda: ([[1.0, 2.0, 3.0]],), "has no attribute 'dim'"),
    ("dtype-float64", {}, lambda: (randn(4, 2, 3),), "does not match weight dtype"),
    ("dtype-int", {}, lambda: (torch.randint(1, 5, (4, 2, 3)),), "does not match weight dtype"),
    ("dtype-unbatched", {}, lambda: (randn(4, 3),), "does not match weight dtype"),
    ("dtype-packed", {}, lambda: (_packed(dtype=torch.float64),), "must have the same dtype"),
    ("empty-sequence", {}, lambda: (randn(0, 2, 3, dtype=F32),), "sequence length to be larger than 0"),
    ("empty-sequence-batch-first", dict(batch_first=True), lambda: (randn(2, 0, 3, dtype=F32),),
     "sequence length to be larger than 0"),
    ("empty-sequence-unbatched", {}, lambda: (randn(0, 3, dtype=F32),), "sequence length to be larger than 0"),
    ("empty-sequence-and-batch", {}, lambda: (randn(0, 0, 3, dtype=F32),), "sequence length to be larger than 0"),
    ("empty-sequence-with-state", {}, lambda: (randn(0, 2, 3, dtype=F32), _state(2, 2, 5, 5)),
     "sequence length to be larger than 0"),
    # hidden state shapes
    ("h0-batch", {}, lambda: (randn(4, 2, 3, dtype=F32), _state(2, 3, 5, 5)), "Expected hidden[0] size (2, 2, 5), got [2, 3, 5]"),
    ("h0-layers", {}, lambda: (randn(4, 2, 3, dtype=F32), _state(1, 2, 5, 5)), "Expected hidden[0] size"),
    ("h0-hidden", {}, lambda: (randn(4, 2, 3, dtype=F32), _state(2, 2, 4, 5)), "Expected hidden[0] size"),
    ("c0-hidden", {}, lambda: (randn(4, 2, 3, dtype=F32), _state(2, 2, 5, 6)), "Expected hidden[1] size (2, 2, 5), got [2, 2, 6]"),
    ("c0-batch", {}, lambda: (randn(4, 2, 3, dtype=F32), _state(2, 2, 5, 5)[:1] + (randn(2, 1, 5, dtype=F32),)), "Expected hidden[1] size"),
    ("bidirectional-h0-layers", dict(bidirectional=True), lambda: (randn(4, 2, 3, dtype=F32), _state(2, 2, 5, 5)),
     "Expected hidden[0] size (4, 2, 5)"),
    ("proj-h0-is-hidden-size", dict(proj_size=2), lambda: (randn(4, 2, 3, dtype=F32), _state(2, 2, 5, 5)),
     "Expected hidden[0] size (2, 2, 2), got [2, 2, 5]"),
    ("proj-c0-is-proj-size", dict(proj_size=2), lambda: (randn(4, 2, 3, dtype=F32), _state(2, 2, 2, 2)),
     "Expected hidden[1] size (2, 2, 5), got [2, 2, 2]"),
    ("unbatched-state-size", {}, lambda: (randn(4, 3, dtype=F32), _state(2, None, 5, 4)), "Expected hidden[1] size (2, 1, 5)"),
    ("batch-first-state-uses-batch", dict(batch_first=True), lambda: (randn(2, 4, 3, dtype=F32), _state(2, 4, 5, 5)),
     "Expected hidden[0] size (2, 2, 5)"),
    # hidden state dimensions
    ("batched-input-2d-state", {}, lambda: (randn(4, 2, 3, dtype=F32), _state(2, None, 5, 5)),
     "For batched 3-D input, hx and cx should also be 3-D but got (2-D, 2-D) tensors"),
    ("batched-input-mixed-state", {}, lambda: (randn(4, 2, 3, dtype=F32), (randn(2, 2, 5, dtype=F32), randn(2, 5, dtype=F32))),
     "hx and cx should also be 3-D but got (3-D, 2-D)"),
    ("unbatched-input-3d-state", {}, lambda: (randn(4, 3, dtype=F32), _state(2, 1, 5, 5)),
     "For unbatched 2-D input, hx and cx should also be 2-D but got (3-D, 3-D) tensors"),
    ("state-is-one-tensor", {}, lambda: (randn(4, 2, 3, dtype=F32), randn(2, 2, 5, dtype=F32)), "should also be 3-D"),
    ("state-is-stacked-tensor", {}, lambda: (randn(4, 2, 3, dtype=F32), randn(2, 2, 2, 5, dtype=F32)), "invalid combination of arguments"),
    ("state-has-three-tensors", {}, lambda: (randn(4, 2, 3, dtype=F32), _state(2, 2, 5, 5) + (randn(2, 2, 5, dtype=F32),)),
     "lstm expects two hidden states"),
    ("state-dtype", {}, lambda: (randn(4, 2, 3, dtype=F32), _state(2, 2, 5, 5, dtype=torch.float64)), ""),
    ("state-dtype-c0-only", {}, lambda: (randn(4, 2, 3, dtype=F32), (randn(2, 2, 5, dtype=F32), randn(2, 2, 5))), ""),
    # packed sequences (checked by nn.LSTM's C++ implementation only)
    ("packed-h0-batch", {}, lambda: (_packed(sorted_=True), _state(2, 2, 5, 5)), ""),
    ("packed-c0-hidden", {}, lambda: (_packed(sorted_=True), _state(2, 3, 5, 6)), ""),
    ("packed-2d-state", {}, lambda: (_packed(sorted_=True), _state(2, None, 5, 5)), "Dimension out of range"),
    ("packed-unsorted-h0-batch", {}, lambda: (_packed(), _state(2, 2, 5, 5)), ""),
    ("packed-state-dtype", {}, lambda: (_packed(), _state(2, 3, 5, 5, dtype=torch.float64)), "must have the same dtype"),
    ("packed-state-is-three-tensors", {}, lambda: (_packed(sorted_=True), _state(2, 3, 5, 5) + (randn(2, 3, 5, dtype=F32),)),
     "lstm expects two hidden states"),
]


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])  # two call paths
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_raises_like_nn_lstm(case, grad):
    _, extra, make_args, phrase = case
    kwargs = {**BASE, **extra}
    torch_lstm, fused = nn.LSTM(**kwargs), FusedLSTM(**kwargs)
    fused.load_state_dict(torch_lstm.state_dict())
    args = make_args()
    with pytest.raises(Exception) as theirs, torch.set_grad_enabled(grad):
        torch_lstm(*args)
    with pytest.raises(Exception) as ours, torch.set_grad_enabled(grad):
        fused(*args)
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value) == str(theirs.value)
    assert phrase in str(ours.value)


CONSTRUCTOR_CASES = [
    ("dropout-negative", dict(input_size=3, hidden_size=4, dropout=-0.1), ValueError, "dropout should be a number in range [0, 1]"),
    ("dropout-above-one", dict(input_size=3, hidden_size=4, dropout=1.5), ValueError, "dropout should be a number"),
    ("dropout-string", dict(input_size=3, hidden_size=4, dropout="0.5"), ValueError, "dropout should be a number"),
    ("dropout-bool", dict(input_size=3, hidden_size=4, dropout=True), ValueError, "dropout should be a number"),
    ("proj-equal-hidden", dict(input_size=3, hidden_size=4, proj_size=4), ValueError, "proj_size has to be smaller than hidden_size"),
    ("proj-above-hidden", dict(input_size=3, hidden_size=4, proj_size=6), ValueError, "proj_size has to be smaller"),
    ("proj-negative", dict(input_size=3, hidden_size=4, proj_size=-1), ValueError, "proj_size should be a positive integer or zero"),
    ("hidden-zero", dict(input_size=3, hidden_size=0), ValueError, "hidden_size must be greater than zero"),
    ("hidden-negative", dict(input_size=3, hidden_size=-2), ValueError, "hidden_size must be greater than zero"),
    ("input-zero", dict(input_size=0, hidden_size=4), ValueError, "input_size must be greater than zero"),
    ("input-negative", dict(input_size=-1, hidden_size=4), ValueError, "input_size must be greater than zero"),
    ("layers-zero", dict(input_size=3, hidden_size=4, num_layers=0), ValueError, "num_layers must be greater than zero"),
    ("input-float", dict(input_size=3.0, hidden_size=4), TypeError, "input_size should be of type int"),
    ("hidden-float", dict(input_size=3, hidden_size=4.5), TypeError, "hidden_size should be of type int"),
    ("bias-not-bool", dict(input_size=3, hidden_size=4, bias="yes"), TypeError, "bias should be of type bool"),
    ("batch-first-not-bool", dict(input_size=3, hidden_size=4, batch_first=1), TypeError, "batch_first should be of type bool"),
]


@pytest.mark.parametrize("case", CONSTRUCTOR_CASES, ids=[c[0] for c in CONSTRUCTOR_CASES])
def test_constructor_raises_like_nn_lstm(case):
    _, kwargs, error, phrase = case
    with pytest.raises(error) as theirs:
        nn.LSTM(**kwargs)
    with pytest.raises(error) as ours:
        FusedLSTM(**kwargs)
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value) == str(theirs.value)
    assert phrase in str(ours.value)


def test_dropout_with_one_layer_warns_like_nn_lstm():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        FusedLSTM(3, 4, num_layers=1, dropout=0.5)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes need Python 3.11")
def test_errors_nn_lstm_leaves_unclear_carry_the_ops_diagnosis():
    """For packed input nn.LSTM's C++ code reports a wrong c0 size as "got an incorrect number
    of RNN parameters"; the fused op's own finding is attached as a note."""
    fused = FusedLSTM(**BASE)
    with pytest.raises(RuntimeError, match="incorrect number of RNN parameters") as error:
        fused(_packed(sorted_=True), _state(2, 3, 5, 6))
    notes = getattr(error.value, "__notes__", [])
    assert any(note.startswith("fused_lstm") and "cx" in note for note in notes), notes
