"""Fixtures and set-up for the fused_lstm tests; the shared helper functions are tests/helpers.py.

* Every test runs with its own seed (derived from its node id), so inputs are fresh random values
  per test yet a failure reproduces exactly.
* Without an installed fused_lstm, the tests import the source tree's.
* ``cuda_path``: sets the environment that the CUDA ops read on every call (tests/test_cuda.py
  on a GPU, tests/test_cuda_compile.py on the CPU emulation).
"""

from __future__ import annotations

import importlib.util
import sys
import zlib

import pytest
import torch

from helpers import PATH_ENV, ROOT

if importlib.util.find_spec("fused_lstm") is None:  # not installed: test the source tree
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """A distinct, reproducible seed for every test (and every parametrization)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def cuda_path(monkeypatch):
    """cuda_path(mode, units=None, tile=None, k_split=None, device=None, coresident=None) sets
    the environment that the CUDA ops read on every call: FUSED_LSTM_CUDA_PATH=mode and the
    plan's overrides; device and coresident are the CPU emulation's (tests/test_cuda_compile.py)
    device limits and occupancy answer. None leaves a variable unset; every one starts unset."""
    def set_path(mode, units=None, tile=None, k_split=None, device=None, coresident=None):
        monkeypatch.setenv("FUSED_LSTM_CUDA_PATH", mode)
        for name, value in zip(PATH_ENV[1:], (units, tile, k_split, device, coresident)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, str(value))
    for name in PATH_ENV:
        monkeypatch.delenv(name, raising=False)
    return set_path
