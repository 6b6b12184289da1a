"""Fixtures and set-up for the fused_lstm tests; the shared helper functions are tests/helpers.py.

* Every test runs with its own seed (derived from its node id), so inputs are fresh random values
  per test yet a failure reproduces exactly.
* Without an installed fused_lstm, the tests import the source tree's.
* ``cuda_path``: sets the CUDA path settings that the CUDA ops read on every call
  (tests/test_cuda.py on a GPU, tests/test_cuda_compile.py on the CPU emulation).
"""

from __future__ import annotations

import importlib.util
import sys
import zlib

import pytest
import torch

from helpers import EMULATION_ENV, ROOT

if importlib.util.find_spec("fused_lstm") is None:  # not installed: test the source tree
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """A distinct, reproducible seed for every test (and every parametrization)."""
    nodeid = request.node.nodeid
    # A test moved from another file may keep that file's seed (its module's SEEDED_AS).
    moved_from = getattr(request.module, "SEEDED_AS", {}).get(request.node.originalname)
    if moved_from is not None:
        nodeid = moved_from + "::" + nodeid.split("::", 1)[1]
    torch.manual_seed(zlib.crc32(nodeid.encode()))


def _set_cuda_settings(values):
    """fused_lstm.backends.cuda's settings, and the same in the CPU emulation's own copy of the
    settings where tests/test_cuda_compile.py has loaded it (ops fused_lstm_emulated::*)."""
    import fused_lstm

    cuda = fused_lstm.backends.cuda
    for name, value in values.items():
        setattr(cuda, name, value)
        try:
            emulated_set = torch.ops.fused_lstm_emulated._set_setting
        except (AttributeError, RuntimeError):
            continue
        emulated_set(f"cuda.{name}", torch.ops.fused_lstm._get_setting(f"cuda.{name}"))


@pytest.fixture
def cuda_path(monkeypatch):
    """cuda_path(mode, units=None, tile=None, k_split=None, device=None, coresident=None) sets
    what the CUDA ops read on every call: the settings fused_lstm.backends.cuda.path = mode and
    the plan's overrides (None: the plan chooses); device and coresident are the CPU emulation's
    (tests/test_cuda_compile.py) device limits and occupancy answer, from its environment
    variables (None leaves one unset). Every one starts at its default; the settings in force
    before the test (the environment's defaults) are restored after it."""
    import fused_lstm

    def set_path(mode, units=None, tile=None, k_split=None, device=None, coresident=None):
        _set_cuda_settings(dict(path=mode, persistent_units=units, persistent_tile=tile,
                                persistent_k_split=k_split))
        for name, value in zip(EMULATION_ENV, (device, coresident)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, str(value))

    saved = fused_lstm.backends.cuda.as_dict()
    for name in EMULATION_ENV:
        monkeypatch.delenv(name, raising=False)
    _set_cuda_settings(dict(path="auto", persistent_units=None, persistent_tile=None,
                            persistent_k_split=None))
    yield set_path
    _set_cuda_settings(saved)
