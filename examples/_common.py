"""What the examples share: the ``--impl`` switch and the side-by-side report.

Every example builds its model from an LSTM *class*. ``--impl torch`` passes ``nn.LSTM``,
``--impl fused`` passes ``FusedLSTM``; nothing else in the program changes. ``--impl both`` builds
one model of each with the same initial weights, runs the same code on both and reports the two
results side by side.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from fused_lstm import FusedLSTM

LSTM_CLASSES = {"torch": nn.LSTM, "fused": FusedLSTM}


def make_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--impl", choices=("fused", "torch", "both"), default="fused",
                        help="LSTM implementation; 'both' runs the two from one initialisation")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def impl_names(choice: str) -> list[str]:
    return ["torch", "fused"] if choice == "both" else [choice]


def same_init_models(make_model, impls: list[str], seed: int) -> dict[str, nn.Module]:
    """One model per implementation, all starting from the same weights.

    ``make_model(lstm_class)`` builds the model. The first one is initialised from ``seed``; the
    others load its ``state_dict`` (an nn.LSTM state_dict loads unchanged into a FusedLSTM).
    """
    torch.manual_seed(seed)
    models: dict[str, nn.Module] = {}
    for impl in impls:
        model = make_model(LSTM_CLASSES[impl])
        if models:
            model.load_state_dict(next(iter(models.values())).state_dict())
        models[impl] = model
    return models


def timed(fn, *args, **kwargs):
    """(fn's result, wall seconds it took)."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def max_rel_diff(a: list[float], b: list[float]) -> float:
    """Largest |a - b| / |b| over two equally long curves."""
    a_t, b_t = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return ((a_t - b_t).abs() / b_t.abs()).max().item()


def print_curves(curves: dict[str, list[float]], every: int, label: str = "epoch") -> None:
    """Prints every ``every``-th value of each curve (1-based steps), one column per
    implementation, plus their relative difference when there are two."""
    names = list(curves)
    header = f"{label:>6}" + "".join(f"{name + ' loss':>14}" for name in names)
    print(header + (f"{'rel diff':>11}" if len(names) == 2 else ""))
    length = len(curves[names[0]])
    for step in list(range(every, length + 1, every)) or [length]:
        values = [curves[name][step - 1] for name in names]
        row = f"{step:>6}" + "".join(f"{v:>14.6f}" for v in values)
        if len(values) == 2:
            row += f"{abs(values[1] - values[0]) / abs(values[0]):>11.1e}"
        print(row)


def print_times(seconds: dict[str, float], what: str = "training") -> None:
    for name, sec in seconds.items():
        print(f"{name:>5} {what}: {format_seconds(sec)} ({torch.get_num_threads()} torch threads)")
    if len(seconds) == 2:
        print(f"fused is {seconds['torch'] / seconds['fused']:.1f}x as fast as torch.nn.LSTM")


def format_seconds(sec: float) -> str:
    if sec >= 1:
        return f"{sec:7.2f} s"
    return f"{sec * 1e3:7.2f} ms" if sec >= 1e-3 else f"{sec * 1e6:7.1f} us"
