"""Run-time settings of fused_lstm's kernels, in the spirit of ``torch.backends``.

    import fused_lstm

    fused_lstm.backends.cpu.allow_thin = False             # from the next call on
    with fused_lstm.backends.cpu.flags(allow_brgemm=False):
        model(x)                                            # restored on leaving the block
    fused_lstm.backends.cuda.path = "step"

Every setting has a default that lets the kernel choice (``fused_lstm.explain``) pick the fastest
variant; turning one off is for comparisons, tests and working around a problem. They are
process-wide (every thread), kept in C++ (``csrc/settings.h``) and read once per op call, so a
change applies from the next call.

``cpu``:

* ``allow_brgemm``: float32 recurrent products through oneDNN's brgemm micro-kernel (else BLAS);
* ``allow_vec16_cell``: the float32 cell pass on 16 AVX-512 lanes (else the generic
  vectorised loops);
* ``allow_fused_input_projection``: the input projection fused into each step's product where
  it pays (else one GEMM over every step);
* ``allow_thin``: the thin-batch inference kernel for a few rows and steps;
* ``allow_few_rows``: a training call of at most 8 rows in all (B x T, e.g. one streaming step):
  the backward's products read the weights as stored, 16-bit ones widened in registers (else
  packed or widened copies and library products, as for larger calls);
* ``allow_weight_grads_apart``: in those few-row training calls, and from 9 rows in a float16
  model's training whose reserve keeps the gates (where the factors are fewer floats than the
  float32 gradients), W_ih's and W_hh's gradients each made by an autograd node of their own,
  one after the other, from factors the backward leaves (so that autograd adds each into
  ``.grad`` and frees it before the next is made: the peak holds one weight's gradient, not all
  of them), where every weight requires grad and the tensors are plain CPU ones (else the op's
  backward returns them all: the same values up to 8 rows, within a unit in the last place from
  9);
* ``allow_small_products``: float32 products of at most 2^14 multiply-adds (the backward's at
  the tutorial sizes) on 16 AVX-512 lanes in place, on CPUs with AVX-512 (else the BLAS, or
  inline_gemv's loop for a matrix-vector product);
* ``allow_small_hidden_avx512``: the small-hidden kernel's (hidden sizes below 16) float32
  inline products on 16 AVX-512 lanes with a masked tail, and its narrow transposes by
  permutes, on CPUs with AVX-512 (else the generic target_clones blocks of 16, 8, 4, 2 and 1
  lanes, and transposes by gathers and scatters; the same results to the bit);
* ``allow_bf16_products``: bfloat16 models' products with bf16 operands and float32 sums on
  AVX512_BF16 CPUs (else computed in float32: results then differ by bf16 rounding);
* ``allow_amx``: on CPUs with AMX-BF16, those products, forward and backward, on AMX tiles
  (oneDNN's brgemm micro-kernel) instead of bf16_gemm's AVX512_BF16 dot products (both: bf16
  operands, float32 sums, in another order);
* ``gemm_library``: where the products that go to a library run: ``"auto"`` (float32 products
  large enough go to oneDNN's matmul where this machine's measured rates say its kernel is the
  faster for that class of product, measured once per process at the first need, a few tens
  of ms: on one thread for a product inside the steps' parallel region, on the process's
  thread count for one that runs on every thread; the rest to the BLAS), ``"blas"`` (the
  BLAS, MKL on x86) or ``"onednn_matmul"`` (oneDNN's matmul for every float32 product; float64
  stays on the BLAS). The choice is reported per
  product by ``fused_lstm.explain``; the libraries sum in different orders, so results differ
  in the last bits between them;
* ``fuse_by_measured_rates``: fuse the float32 input projection into the steps only where this
  machine's measured rates say the fused step is not slower than the projection GEMM plus the
  recurrent step alone (one thread's three products, timed together at the first call: explain's
  ``fused_step_rates``; else by the weights' size per row alone). Where ``nn_lstm_floor``
  ("auto") measures a call and these rates decided a layer's choice, it also times the call
  with the other choice end to end and keeps the fastest of ours for that shape (explain's
  ``input_projection_times``);
* ``nn_lstm_floor``: whether an inference call may run what nn.LSTM runs for it (``at::lstm``:
  oneDNN's LSTM) instead of the fused kernels: ``"auto"`` (where it measures faster by more
  than 3%: the first inference call of a shape times both, interleaved, once per process; large
  float32, bfloat16 and float16 calls only, see ``fused_lstm.explain``), ``"never"`` or ``"always"``
  (wherever the floor is possible: for tests and comparisons);
* ``allow_hidden_split`` (on; on an oversubscribed machine the per-step barrier can cost more
  than it gains: turn it off there): row-wise inference steps (float32 on brgemm, bf16 models on AMX tiles; every step
  with every row, no projection) split over the threads by hidden units, with a barrier per
  step, instead of by batch rows; where it pays (next setting);
* ``hidden_split_by_measured_rates``: take the hidden split (float32 models; a bfloat16
  model's AMX steps only with this setting off) only where this machine's measured rates say its step (every row, a thread's share of the gate columns) is faster than the batch
  split's (its rows, every column) by a margin for the barrier (else wherever it applies).
  Where ``nn_lstm_floor`` ("auto") measures a call, it also times the call with the other
  split end to end and keeps the faster for that shape (float32, bfloat16 and float16 models; explain's
  ``step_split_times``).

``cuda`` (the CUDA kernels have not yet run on a GPU):

* ``path``: ``"auto"``, ``"persistent"`` or ``"step"``;
* ``persistent_units``, ``persistent_tile``, ``persistent_k_split``: fix one parameter of the
  persistent kernel's launch plan, or ``None`` to let the plan choose.

Defaults come from the environment, read once when fused_lstm is imported:
``FUSED_LSTM_NO_BRGEMM``, ``FUSED_LSTM_NO_VEC16_CELL``, ``FUSED_LSTM_UNFUSED_INPUT``,
``FUSED_LSTM_NO_THIN``, ``FUSED_LSTM_NO_BF16_GEMM``, ``FUSED_LSTM_NO_AMX``,
``FUSED_LSTM_NO_MEASURED_FUSION``, ``FUSED_LSTM_NO_HIDDEN_SPLIT``,
``FUSED_LSTM_NO_MEASURED_HIDDEN_SPLIT``, ``FUSED_LSTM_NO_FEW_ROWS``,
``FUSED_LSTM_NO_WEIGHT_GRADS_APART``, ``FUSED_LSTM_NO_SMALL_PRODUCTS`` (``1`` turns the matching
CPU setting off),
``FUSED_LSTM_GEMM_LIBRARY`` (``auto``, ``blas`` or ``onednn_matmul``),
``FUSED_LSTM_NN_LSTM_FLOOR`` (``auto``, ``never`` or ``always``),
``FUSED_LSTM_CUDA_PATH`` and ``FUSED_LSTM_CUDA_PERSISTENT_UNITS`` / ``_TILE`` / ``_KSPLIT``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Dict, Iterator, Tuple

import torch

from . import ops  # noqa: F401  (loads the library that defines the settings' ops)

__all__ = ["cpu", "cuda"]

_get = torch.ops.fused_lstm._get_setting
_set = torch.ops.fused_lstm._set_setting

_CUDA_PATHS = ("auto", "persistent", "step")
_GEMM_LIBRARIES = ("auto", "blas", "onednn_matmul")
_FLOORS = ("auto", "never", "always")


def _flag(name: str, value: Any) -> int:
    if not isinstance(value, bool):
        raise TypeError(f"fused_lstm.backends.{name} takes a bool; got {value!r}")
    return int(value)


def _cuda_path(name: str, value: Any) -> int:
    if value not in _CUDA_PATHS:
        raise ValueError(f"fused_lstm.backends.{name} must be 'auto', 'persistent' or 'step'; "
                         f"got {value!r}")
    return _CUDA_PATHS.index(value)


def _gemm_library(name: str, value: Any) -> int:
    if value not in _GEMM_LIBRARIES:
        raise ValueError(f"fused_lstm.backends.{name} must be 'auto', 'blas' or 'onednn_matmul'; "
                         f"got {value!r}")
    return _GEMM_LIBRARIES.index(value)


def _floor(name: str, value: Any) -> int:
    if value not in _FLOORS:
        raise ValueError(f"fused_lstm.backends.{name} must be 'auto', 'never' or 'always'; "
                         f"got {value!r}")
    return _FLOORS.index(value)


def _plan_int(limit: int, power_of_two: bool = False) -> Callable[[str, Any], int]:
    def convert(name: str, value: Any) -> int:
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(f"fused_lstm.backends.{name} must be None or an integer in "
                             f"[1, {limit}]; got {value!r}")
        if power_of_two and value & (value - 1):
            raise ValueError(f"fused_lstm.backends.{name} must be a power of two; got {value}")
        return value
    return convert


# Python name -> (converter to the stored int, converter back, environment variable and how its
# text becomes the Python value). The C++ name is "<backend>.<python name>" (csrc/settings.h).
_Setting = Tuple[Callable[[str, Any], int], Callable[[int], Any], str, Callable[[str], Any]]


def _off_if_set(text: str) -> bool:
    return text in ("", "0")  # FUSED_LSTM_NO_X=1 turns X off


def _env_int(text: str):
    try:
        return int(text) if text else None
    except ValueError:
        return text  # the converter rejects it with the setting's message


_CPU: Dict[str, _Setting] = {
    "allow_brgemm": (_flag, bool, "FUSED_LSTM_NO_BRGEMM", _off_if_set),
    "allow_vec16_cell": (_flag, bool, "FUSED_LSTM_NO_VEC16_CELL", _off_if_set),
    "allow_fused_input_projection": (_flag, bool, "FUSED_LSTM_UNFUSED_INPUT", _off_if_set),
    "allow_thin": (_flag, bool, "FUSED_LSTM_NO_THIN", _off_if_set),
    "allow_bf16_products": (_flag, bool, "FUSED_LSTM_NO_BF16_GEMM", _off_if_set),
    "allow_amx": (_flag, bool, "FUSED_LSTM_NO_AMX", _off_if_set),
    "gemm_library": (_gemm_library, lambda i: _GEMM_LIBRARIES[i], "FUSED_LSTM_GEMM_LIBRARY",
                     lambda text: text or "auto"),
    "fuse_by_measured_rates": (_flag, bool, "FUSED_LSTM_NO_MEASURED_FUSION", _off_if_set),
    "nn_lstm_floor": (_floor, lambda i: _FLOORS[i], "FUSED_LSTM_NN_LSTM_FLOOR",
                      lambda text: text or "auto"),
    "allow_hidden_split": (_flag, bool, "FUSED_LSTM_NO_HIDDEN_SPLIT", _off_if_set),
    "hidden_split_by_measured_rates": (_flag, bool, "FUSED_LSTM_NO_MEASURED_HIDDEN_SPLIT",
                                       _off_if_set),
    "allow_few_rows": (_flag, bool, "FUSED_LSTM_NO_FEW_ROWS", _off_if_set),
    "allow_weight_grads_apart": (_flag, bool, "FUSED_LSTM_NO_WEIGHT_GRADS_APART", _off_if_set),
    "allow_small_products": (_flag, bool, "FUSED_LSTM_NO_SMALL_PRODUCTS", _off_if_set),
    "allow_small_hidden_avx512": (_flag, bool, "FUSED_LSTM_NO_SMALL_HIDDEN_AVX512", _off_if_set),
}
_CUDA: Dict[str, _Setting] = {
    "path": (_cuda_path, lambda i: _CUDA_PATHS[i], "FUSED_LSTM_CUDA_PATH",
             lambda text: text or "auto"),
    "persistent_units": (_plan_int(1 << 20), lambda i: i or None,
                         "FUSED_LSTM_CUDA_PERSISTENT_UNITS", _env_int),
    "persistent_tile": (_plan_int(64), lambda i: i or None, "FUSED_LSTM_CUDA_PERSISTENT_TILE",
                        _env_int),
    "persistent_k_split": (_plan_int(32, power_of_two=True), lambda i: i or None,
                           "FUSED_LSTM_CUDA_PERSISTENT_KSPLIT", _env_int),
}


class _Backend:
    """The settings of one backend: attributes read and written through to C++, and
    :meth:`flags`, a context manager that sets some and restores them all on exit."""

    def __init__(self, prefix: str, settings: Dict[str, _Setting]):
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_settings", settings)

    def _spec(self, name: str) -> _Setting:
        spec = self._settings.get(name)
        if spec is None:
            raise AttributeError(f"fused_lstm.backends.{self._prefix} has no setting {name!r}; "
                                 f"it has {', '.join(self._settings)}")
        return spec

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._spec(name)[1](_get(f"{self._prefix}.{name}"))

    def __setattr__(self, name: str, value: Any) -> None:
        stored = self._spec(name)[0](f"{self._prefix}.{name}", value)
        _set(f"{self._prefix}.{name}", stored)

    def __dir__(self):
        return [*self._settings, "flags", "as_dict"]

    def as_dict(self) -> Dict[str, Any]:
        """Every setting and its current value."""
        return {name: getattr(self, name) for name in self._settings}

    @contextlib.contextmanager
    def flags(self, **values: Any) -> Iterator[None]:
        """Sets the given settings for the block, and restores every setting on exit."""
        saved = self.as_dict()
        for name in values:
            self._spec(name)
        try:
            for name, value in values.items():
                setattr(self, name, value)
            yield
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    def __repr__(self) -> str:
        return f"fused_lstm.backends.{self._prefix}({self.as_dict()})"

    def _load_environment(self) -> None:
        for name, (_, _, variable, parse) in self._settings.items():
            text = os.environ.get(variable)
            if text is not None:
                try:
                    setattr(self, name, parse(text))
                except (TypeError, ValueError) as error:
                    raise ValueError(f"fused_lstm: the environment variable {variable}={text!r} "
                                     f"is not a valid default: {error}") from None


cpu = _Backend("cpu", _CPU)
cuda = _Backend("cuda", _CUDA)
cpu._load_environment()
cuda._load_environment()
