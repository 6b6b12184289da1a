"""Timing (interleaved rounds of torch.utils.benchmark blocked autorange) and the peak memory of
one call."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils import benchmark

from .workloads import Case, output_data


# Seconds of timing per implementation, workload and mode (three implementations on CPU: with
# the floor, 3 x 4 s per workload and mode, where it was 2 x 5 s before the floor was added).
MIN_RUN_TIME = 4.0
QUICK_MIN_RUN_TIME = 1.0
ROUNDS = 5
QUICK_ROUNDS = 3
MEMORY_NOTE = {
    "cpu": "peak bytes held by PyTorch's CPU allocator during one call, above what was held "
           "when it started (torch.profiler memory profiling; outputs, saved activations and "
           "temporaries count, inputs and weights do not)",
    "cuda": "torch.cuda.max_memory_allocated during one call, above what was allocated when "
            "it started",
}


def make_step(module: nn.Module, case: Case, mode: str, streaming: bool) -> Callable[[], None]:
    """One timed call. Streaming workloads carry (h, c) from one call to the next (detached in
    train mode: one step forward and backward). Packed workloads call with the PackedSequence
    (made once) and backward from its output's data. A module with a ``make_step`` method (an
    implementation outside PyTorch) makes its own."""
    if hasattr(module, "make_step"):
        return module.make_step(case, mode, streaming)
    x, hx, upstream = case.inputs(), (case.h0, case.c0), case.upstream
    if not streaming:
        if mode == "train":
            def step():
                output, (h_n, c_n) = module(x, hx)
                torch.autograd.backward((output_data(output), h_n, c_n), upstream)
        else:
            def step():
                with torch.no_grad():
                    module(x, hx)
        return step

    state = (case.h0.detach().clone(), case.c0.detach().clone())
    if mode == "train":
        def step():
            nonlocal state
            output, (h_n, c_n) = module(x, state)
            torch.autograd.backward((output, h_n, c_n), upstream)
            state = (h_n.detach(), c_n.detach())
    else:
        def step():
            nonlocal state
            with torch.no_grad():
                _, state = module(x, state)
    return step


def time_interleaved(steps: dict[str, Callable[[], None]], min_run_time: float,
                     rounds: int) -> dict[str, benchmark.Measurement]:
    """Times every step for about ``min_run_time`` seconds in ``rounds`` rounds, alternating
    the order (ABBAAB...); returns one merged Measurement per step."""
    timers = {name: benchmark.Timer("step()", globals={"step": step}, description=name,
                                    num_threads=torch.get_num_threads())
              for name, step in steps.items()}
    blocks: dict[str, list[benchmark.Measurement]] = {name: [] for name in timers}
    order = list(timers)
    for round_index in range(rounds):
        for name in order if round_index % 2 == 0 else reversed(order):
            blocks[name].append(timers[name].blocked_autorange(min_run_time=min_run_time / rounds))
    return {name: benchmark.Measurement.merge(measurements)[0]
            for name, measurements in blocks.items()}


def profiled_events(prof: profile) -> list:
    """Every event ``prof`` recorded, nested ones included (kineto's event tree, flattened)."""
    events, pending = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        events.append(event)
        pending.extend(event.children)
    return events


def peak_memory_bytes(new_step: Callable[[], Callable[[], None]], device: torch.device) -> int:
    """The peak memory of one call of a fresh step, above the memory held when it starts
    (see MEMORY_NOTE). The step is made inside the measurement so that nothing the call frees
    was allocated before it (the profiler cannot size such blocks)."""
    if device.type == "cuda":
        step = new_step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start

    window_name = "compare.py: measured call"
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step = new_step()
        with record_function(window_name):
            step()
    events = profiled_events(prof)
    window = next(e for e in events if e.name == window_name)
    allocations = sorted((e for e in events if e.tag == _EventType.Allocation),
                         key=lambda e: e.start_time_ns)
    held = 0  # bytes allocated minus bytes freed since the profiler started
    start = peak = None
    for allocation in allocations:
        if start is None and allocation.start_time_ns >= window.start_time_ns:
            start = peak = held
        held += allocation.extra_fields.alloc_size
        if start is not None and allocation.start_time_ns <= window.end_time_ns:
            peak = max(peak, held)
    return 0 if start is None else peak - start
