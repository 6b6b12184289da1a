"""Shared helpers for the fused_lstm tests.

* Every test runs with its own seed (derived from its node id), so inputs are fresh random values
  per test yet a failure reproduces exactly.
* ``reference`` is importable even when the compiled library is not built: the reference tests
  must be able to run (and pin down the spec) before the kernels exist.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import zlib

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
if importlib.util.find_spec("fused_lstm") is None:  # not installed: test the source tree
    sys.path.insert(0, str(ROOT))


def load_reference():
    """``fused_lstm.reference``; loaded straight from its file when the package itself cannot be
    imported (compiled library missing), since the reference depends on torch only."""
    try:
        from fused_lstm import reference
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "fused_lstm_reference_standalone", ROOT / "fused_lstm" / "reference.py"
        )
        reference = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(reference)
    return reference


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """A distinct, reproducible seed for every test (and every parametrization)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def randn(*shape, dtype=torch.float64, **kwargs):
    """Random normal values that are never exactly zero (a zero would hide broken wiring)."""
    t = torch.randn(*shape, dtype=dtype, **kwargs)
    return torch.where(t == 0, torch.ones((), dtype=dtype), t)


def num_directions(module) -> int:
    return 2 if module.bidirectional else 1


def out_size(module) -> int:
    return module.proj_size if module.proj_size > 0 else module.hidden_size


def random_lengths(batch: int, seq_len: int, *, sort: bool) -> list[int]:
    """Lengths in [1, seq_len] with at least one full-length sequence; descending when ``sort``."""
    lengths = torch.randint(1, seq_len + 1, (batch,))
    lengths[torch.randint(0, batch, ())] = seq_len
    lengths = lengths.tolist()
    return sorted(lengths, reverse=True) if sort else lengths


def make_state(module, batch, dtype, *, unbatched=False):
    """Random (h0, c0) of the shapes ``module`` expects, requiring grad."""
    layers_dirs = module.num_layers * num_directions(module)
    if unbatched:
        h_shape, c_shape = (layers_dirs, out_size(module)), (layers_dirs, module.hidden_size)
    else:
        h_shape = (layers_dirs, batch, out_size(module))
        c_shape = (layers_dirs, batch, module.hidden_size)
    return (randn(*h_shape, dtype=dtype).requires_grad_(),
            randn(*c_shape, dtype=dtype).requires_grad_())


def make_input(module, layout, *, seq_len, batch, dtype):
    """The module input for ``layout`` and the leaf tensor gradients are taken with respect to.

    layout: "padded" (3-D, honours batch_first), "packed_sorted", "packed_unsorted" (a
    PackedSequence from pack_padded_sequence) or "unbatched" (2-D [T, I]).
    """
    if layout == "unbatched":
        leaf = randn(seq_len, module.input_size, dtype=dtype).requires_grad_()
        return leaf, leaf
    shape = (batch, seq_len) if module.batch_first else (seq_len, batch)
    leaf = randn(*shape, module.input_size, dtype=dtype).requires_grad_()
    if layout == "padded":
        return leaf, leaf
    lengths = random_lengths(batch, seq_len, sort=layout == "packed_sorted")
    packed = pack_padded_sequence(
        leaf, lengths, batch_first=module.batch_first, enforce_sorted=layout == "packed_sorted"
    )
    return packed, leaf


def output_tensor(output):
    return output.data if isinstance(output, PackedSequence) else output


def lstm_pair(*, dtype=torch.float64, **kwargs):
    """(nn.LSTM, FusedLSTM) with identical configuration and weights (via load_state_dict)."""
    from fused_lstm import FusedLSTM

    torch_lstm = nn.LSTM(dtype=dtype, **kwargs)
    fused = FusedLSTM(dtype=dtype, **kwargs)
    fused.load_state_dict(torch_lstm.state_dict())
    return torch_lstm, fused


def run_and_grad(module, inp, leaf, hx, *, upstream=None):
    """Runs ``module`` and backpropagates fixed random upstream gradients into output, h_n and
    c_n. Returns (output, h_n, c_n, grads) where grads maps a name to the gradient of the input
    leaf, h0, c0 and every parameter (None where autograd produced none)."""
    output, (h_n, c_n) = module(inp, hx) if hx is not None else module(inp)
    out = output_tensor(output)
    if upstream is None:
        upstream = tuple(randn(*t.shape, dtype=t.dtype) for t in (out, h_n, c_n))
    wrt = {"input": leaf}
    if hx is not None:
        wrt["h0"], wrt["c0"] = hx
    wrt.update(dict(module.named_parameters()))
    grads = torch.autograd.grad((out, h_n, c_n), list(wrt.values()), upstream, allow_unused=True,
                                retain_graph=True)  # a packed input's graph is shared
    return out, h_n, c_n, dict(zip(wrt.keys(), grads)), upstream
