"""The correctness check: every implementation's outputs and gradients against a float64
nn.LSTM on the same weights and inputs, and whether its own kernels ran."""

from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from .implementations import BASELINE, Impl
from .workloads import MODES, Case, dtype_name, output_data


# The check's floor, relative to the tensor's magnitude: torch.testing's default tolerance for
# the dtype (its atol for float32, its rtol for the half types, whose rounding unit is 2^-8 and
# 2^-11). Above the floor, the rule is relative to nn.LSTM's own error in the same dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}


CHECK_NOTE = ("outputs and gradients (input, h0, c0, weights) vs a float64 nn.LSTM on the same "
              "weights and inputs: max error <= 2 x nn.LSTM's max error in the same dtype + "
              "tol x max(1, max |reference|), tol = "
              + ", ".join(f"{tol:g} ({dtype_name(dtype)})" for dtype, tol in TOLERANCE.items()))


def run_for_check(module: nn.Module, case: Case,
                  modes: tuple[str, ...] = MODES) -> dict[str, dict[str, torch.Tensor]]:
    """Per mode (of ``modes``), the tensors to compare: train: output, h_n, c_n and the
    gradients of x (where it requires grad), h0, c0 and of every parameter named as in
    nn.LSTM; infer (eval mode, no_grad): output, h_n, c_n. A packed output is compared by its
    data."""
    result = {}
    if "train" in modes:
        module.train()
        output, (h_n, c_n) = module(case.inputs(), (case.h0, case.c0))
        output = output_data(output)
        lstm_names = dict(case.lstm.named_parameters())
        params = {f"grad {name}": p for name, p in module.named_parameters()
                  if name in lstm_names}
        inputs = {"grad input": case.x} if case.x.requires_grad else {}
        wrt = {**inputs, "grad h0": case.h0, "grad c0": case.c0, **params}
        grads = torch.autograd.grad((output, h_n, c_n), list(wrt.values()), case.upstream)
        result["train"] = {"output": output, "h_n": h_n, "c_n": c_n,
                           **dict(zip(wrt, grads, strict=True))}
    if "infer" in modes:
        module.eval()
        with torch.no_grad():
            output, (h_n, c_n) = module(case.inputs(), (case.h0, case.c0))
        result["infer"] = {"output": output_data(output), "h_n": h_n, "c_n": c_n}
    return result


def as_float64(case: Case) -> Case:
    """The same case in float64: the values already rounded to the case's dtype, so that the
    reference measures arithmetic error only."""
    def leaf(t):
        return t.detach().double().requires_grad_(t.requires_grad)

    return Case(copy.deepcopy(case.lstm).double(), leaf(case.x), leaf(case.h0), leaf(case.c0),
                tuple(t.double() for t in case.upstream), case.packing, case.lengths)


def first_mismatch(result: dict[str, torch.Tensor], baseline: dict[str, torch.Tensor],
                   reference: dict[str, torch.Tensor], dtype: torch.dtype) -> Optional[str]:
    """Why ``result`` fails the check against the float64 ``reference``, or None if it passes."""
    for name, result_tensor in result.items():
        ref = reference[name]
        if result_tensor.shape != ref.shape:
            return f"{name}: shape {list(result_tensor.shape)}, expected {list(ref.shape)}"
        error = (result_tensor.double() - ref).abs().max().item()
        baseline_error = (baseline[name].double() - ref).abs().max().item()
        allowed = 2 * baseline_error + TOLERANCE[dtype] * max(1.0, ref.abs().max().item())
        if not error <= allowed:  # NaN fails too
            return (f"{name}: max error {error:.2e} > allowed {allowed:.2e} "
                    f"(nn.LSTM's error {baseline_error:.2e})")
    return None


def check(case: Case, modules: dict[str, nn.Module], impls: dict[str, Impl],
          dtype: torch.dtype) -> dict[str, dict[str, tuple[str, str]]]:
    """``{impl: {mode: (status, detail)}}``; status "ok", "mismatch", "fallback" (the
    implementation's kernels did not run) or "error" (it raised). The floor is not checked:
    it has no verdict here."""
    reference_case = as_float64(case)
    reference = run_for_check(reference_case.lstm, reference_case)
    baseline = run_for_check(modules[BASELINE], case)
    verdicts = {BASELINE: {mode: ("ok", "") for mode in MODES}}
    for name, module in modules.items():
        impl = impls[name]
        if name == BASELINE or impl.floor:
            continue
        modes = impl.modes
        try:
            with warnings.catch_warnings(record=True) as caught, \
                    profile(activities=[ProfilerActivity.CPU]) as prof:
                warnings.simplefilter("always")
                result = run_for_check(module, case, modes)
        except Exception as error:  # reported in the row, and in the exit status
            verdicts[name] = {mode: ("error", describe(error)) for mode in modes}
            continue
        fallbacks = [str(w.message) for w in caught
                     if impl.fallback_warning and issubclass(w.category, impl.fallback_warning)]
        if impl.kernel_prefix and not any(e.name.startswith(impl.kernel_prefix)
                                          for e in prof.events()):
            fallbacks.append(f"no {impl.kernel_prefix}* operator ran")
        if fallbacks:
            detail = f"{name} ran nn.LSTM's implementation: {fallbacks[0]}"
            verdicts[name] = {mode: ("fallback", detail) for mode in modes}
            continue
        verdicts[name] = {}
        for mode in modes:
            why = first_mismatch(result[mode], baseline[mode], reference[mode], dtype)
            verdicts[name][mode] = ("mismatch", why) if why else ("ok", "")
    return verdicts


def describe(error: BaseException) -> str:
    """``Type: first line of the message``."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
