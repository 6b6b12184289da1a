"""Forecast monthly airline passengers (1949-1960) with a small 2-layer LSTM.

The classic time-series tutorial: min-max scale the 144 monthly totals, cut them into sliding
windows of 4 months, and train an LSTM to predict the next month from each window. It trains on
the first two thirds of the series, predicts all of it, prints the test error and plots the
forecast.

    python examples/airline_passengers.py [--impl fused|torch|both] [--epochs 3000] [--plot PATH]

``--impl both`` trains nn.LSTM and FusedLSTM from the same initial weights, prints their two loss
curves side by side (they agree to 1e-4 relative) and the wall time of each.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from torch import nn

from _common import (impl_names, make_parser, max_rel_diff, print_curves, print_times,
                     same_init_models, timed)

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "airline_passengers.csv"
WINDOW = 4          # months of history the model sees to predict the next month
HIDDEN_SIZE = 3
NUM_LAYERS = 2
# Adam's default. Some tutorials use 0.01; with it, this full-batch training turns unstable part way
# (with seed 0 near epoch 1300, where the loss jumps), and from there any rounding difference
# doubles every epoch: two nn.LSTM runs whose weights differ in one bit part ways exactly as
# nn.LSTM and FusedLSTM do, in float64 too. Two runs can only be compared on a stable trajectory.
LEARNING_RATE = 1e-3
TOLERANCE = 1e-4    # --impl both: largest relative difference allowed between the loss curves


def load_series(path: Path = DATA) -> tuple[list[str], torch.Tensor]:
    """The months ("1949-01", ...) and the passengers of each month (thousands)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["Month"] for r in rows], torch.tensor([float(r["Passengers"]) for r in rows])


def sliding_windows(series: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x[k] = series[k : k+window] and y[k] = series[k+window], shaped for a batch_first LSTM:
    x is [N, window, 1] (batch, time, features), y is [N, 1]."""
    x = series.unfold(0, window, 1)[:-1]  # every window that still has a next month
    y = series[window:]
    return x.unsqueeze(-1), y.unsqueeze(-1)


class Forecaster(nn.Module):
    """LSTM over the window, then a Linear layer on the last layer's final hidden state."""

    def __init__(self, lstm_class=nn.LSTM):
        super().__init__()
        self.lstm = lstm_class(input_size=1, hidden_size=HIDDEN_SIZE, num_layers=NUM_LAYERS,
                               batch_first=True)
        self.head = nn.Linear(HIDDEN_SIZE, 1)

    def forward(self, x):              # x: [batch, WINDOW, 1]
        _, (h_n, _) = self.lstm(x)     # h_n: [NUM_LAYERS, batch, HIDDEN_SIZE]
        return self.head(h_n[-1])      # h_n[-1] is the top layer's -> [batch, 1]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> list[float]:
    """Full-batch Adam on the mean squared error; returns the loss of every epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = nn.MSELoss()
    losses = []
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def plot(path: Path, months: list[str], series: torch.Tensor, predictions: dict, boundary: int):
    """Writes a PNG of the actual series against each implementation's prediction."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return None
    matplotlib.use("Agg")  # write a file, never open a window
    import matplotlib.pyplot as plt

    years = [int(m[:4]) + (int(m[5:7]) - 1) / 12 for m in months]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(years, series, color="black", label="actual")
    styles = {"torch": dict(color="tab:orange", linestyle="--", zorder=3),  # dashed, on top
              "fused": dict(color="tab:blue", zorder=2)}
    for impl, predicted in predictions.items():
        # The first prediction is for month WINDOW: the months before it only serve as input.
        ax.plot(years[WINDOW:], predicted, label=f"predicted ({impl})", **styles[impl])
    ax.axvline(years[boundary], color="gray", linestyle=":", label="train | test")
    ax.set(xlabel="year", ylabel="passengers (thousands)",
           title="Monthly airline passengers: LSTM forecast, one month ahead")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot written to {path}")
    return path


def main(argv=None) -> dict:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3000)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--plot", type=Path, default=HERE / "airline_passengers.png",
                        help="where to write the forecast PNG")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    months, passengers = load_series()
    train_size = len(passengers) * 2 // 3       # 96 months: 1949-01 .. 1956-12

    # Min-max scaling to [0, 1], fitted on the training months only (the test months must not
    # leak into training); test values above the training maximum scale above 1.
    low, high = passengers[:train_size].min(), passengers[:train_size].max()
    scaled = (passengers - low) / (high - low)

    x, y = sliding_windows(scaled, WINDOW)     # 140 windows
    train_windows = train_size - WINDOW        # the 92 windows whose target is a training month
    x_train, y_train = x[:train_windows], y[:train_windows]

    models = same_init_models(Forecaster, impl_names(args.impl), args.seed)
    losses, seconds, test_rmse, predictions = {}, {}, {}, {}
    for impl, model in models.items():
        losses[impl], seconds[impl] = timed(train, model, x_train, y_train, args.epochs)
        with torch.no_grad():
            predicted = model.eval()(x).squeeze(-1) * (high - low) + low  # back to passengers
        predictions[impl] = predicted
        test_error = predicted[train_windows:] - passengers[train_size:]
        test_rmse[impl] = test_error.pow(2).mean().sqrt().item()

    print_curves(losses, args.log_every)
    print_times(seconds)
    for impl, rmse in test_rmse.items():
        print(f"{impl:>5} test RMSE: {rmse:.1f} thousand passengers "
              f"(months {months[train_size]} .. {months[-1]})")
    result = dict(losses=losses, seconds=seconds, test_rmse=test_rmse, plot=None)
    if len(losses) == 2:
        result["max_rel_diff"] = max_rel_diff(losses["fused"], losses["torch"])
        print(f"loss curves: largest relative difference over {args.epochs} epochs "
              f"{result['max_rel_diff']:.1e} (tolerance {TOLERANCE:.0e})")
    if not args.no_plot:
        result["plot"] = plot(args.plot, months, passengers, predictions, train_size)
    if result.get("max_rel_diff", 0.0) > TOLERANCE:
        raise SystemExit("FusedLSTM and nn.LSTM loss curves disagree")
    return result


if __name__ == "__main__":
    main()
