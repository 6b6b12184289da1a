"""float64 gradcheck of FusedLSTM over input, h0, c0 and every weight, for the layouts the module
builds on top of the op (batch_first, unbatched, unsorted PackedSequence); the op's own grid
(padded and sorted packed) is in test_ops.py."""

import itertools

import pytest
import torch
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

from fused_lstm import FusedLSTM

LAYOUTS = ["batch_first", "unbatched", "packed_unsorted"]
GRID = list(itertools.product([1, 2, 3], [True, False], [False, True], [0, 2], LAYOUTS))


@pytest.mark.parametrize(
    "num_layers,bias,bidirectional,proj_size,layout", GRID,
    ids=[f"L{l}-{'bias' if b else 'nobias'}-{'bi' if d else 'uni'}-proj{p}-{k}"
         for l, b, d, p, k in GRID],
)
def test_module_gradcheck(num_layers, bias, bidirectional, proj_size, layout):
    torch.manual_seed(1000 + len(layout) * 7 + num_layers)
    input_size, hidden_size, seq_len, batch = 2, 3, 3, 3
    lstm = FusedLSTM(input_size, hidden_size, num_layers, bias=bias, batch_first=layout == "batch_first",
                     bidirectional=bidirectional, proj_size=proj_size, dtype=torch.float64)
    num_directions = 2 if bidirectional else 1
    out_size = proj_size or hidden_size
    names = list(lstm._flat_weights_names)
    weights = [torch.randn_like(getattr(lstm, n)).requires_grad_() for n in names]
    if layout == "batch_first":
        x = torch.randn(batch, seq_len, input_size, dtype=torch.float64, requires_grad=True)
    elif layout == "unbatched":
        batch = 1
        x = torch.randn(seq_len, input_size, dtype=torch.float64, requires_grad=True)
    else:
        x = torch.randn(seq_len, batch, input_size, dtype=torch.float64, requires_grad=True)
    state_shape = (num_layers * num_directions,) + (() if layout == "unbatched" else (batch,))
    h0 = torch.randn(*state_shape, out_size, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(*state_shape, hidden_size, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([2, 3, 1])  # unsorted: exercises sorted/unsorted_indices

    def f(x, h0, c0, *ws):
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if layout == "packed_unsorted" else x
        out, (h_n, c_n) = functional_call(lstm, dict(zip(names, ws)), (inp, (h0, c0)))
        if layout == "packed_unsorted":
            out = out.data
        return out, h_n, c_n

    assert torch.autograd.gradcheck(f, (x, h0, c0, *weights))
