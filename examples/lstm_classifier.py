"""Classify random walks as falling, flat or rising with an LSTM and a two-layer head.

A synthetic task the program generates itself: each sample is a random walk of 24 steps whose
steps drift down, not at all, or up (the three classes) under noise. The model passes explicit zero
initial states to the LSTM, reshapes h_n (the final hidden state of every layer) into one feature
vector per sample, and feeds it through Linear -> ReLU -> Linear.

    python examples/lstm_classifier.py [--impl fused|torch|both] [--epochs 10]

``--impl both`` trains nn.LSTM and FusedLSTM from the same initial weights on the same batches
and prints the two loss curves side by side (they agree to 1e-4 relative).
"""

from __future__ import annotations

import torch
from torch import nn

from _common import (impl_names, make_parser, max_rel_diff, print_curves, print_times,
                     same_init_models, timed)

SEQ_LEN = 24
NUM_CLASSES = 3
HIDDEN_SIZE = 16
NUM_LAYERS = 2
BATCH_SIZE = 32
TOLERANCE = 1e-4    # --impl both: largest relative difference allowed between the loss curves


def make_walks(num_samples: int, generator: torch.Generator):
    """x: [num_samples, SEQ_LEN, 1] random walks; y: [num_samples] 0 falling, 1 flat, 2 rising.

    Each step is drift + noise with drift -0.2, 0 or +0.2 and noise of standard deviation 0.3: the
    noise hides the drift of some walks, so about 93% is the best accuracy any model can reach.
    """
    y = torch.randint(0, NUM_CLASSES, (num_samples,), generator=generator)
    drift = 0.2 * (y - 1).float()
    steps = drift[:, None] + 0.3 * torch.randn(num_samples, SEQ_LEN, generator=generator)
    return steps.cumsum(dim=1).unsqueeze(-1), y


class WalkClassifier(nn.Module):
    def __init__(self, lstm_class=nn.LSTM):
        super().__init__()
        self.lstm = lstm_class(input_size=1, hidden_size=HIDDEN_SIZE, num_layers=NUM_LAYERS,
                               batch_first=True)
        self.fc1 = nn.Linear(NUM_LAYERS * HIDDEN_SIZE, 32)
        self.fc2 = nn.Linear(32, NUM_CLASSES)

    def forward(self, x):                                   # x: [batch, SEQ_LEN, 1]
        batch = x.size(0)
        # Explicit zero initial states (what the LSTM assumes when none are given).
        # Their shape is [num_layers, batch, hidden] even with batch_first=True.
        h0 = torch.zeros(NUM_LAYERS, batch, HIDDEN_SIZE, device=x.device, dtype=x.dtype)
        c0 = torch.zeros(NUM_LAYERS, batch, HIDDEN_SIZE, device=x.device, dtype=x.dtype)
        _, (h_n, _) = self.lstm(x, (h0, c0))               # h_n: [NUM_LAYERS, batch, HIDDEN]
        # One feature vector per sample: every layer's final state side by side. (Beware
        # h_n.view(-1, HIDDEN_SIZE): it would make each layer an extra row of the batch.)
        features = h_n.transpose(0, 1).reshape(batch, NUM_LAYERS * HIDDEN_SIZE)
        return self.fc2(torch.relu(self.fc1(features)))    # logits: [batch, NUM_CLASSES]


def train(model, x, y, epochs: int, seed: int) -> list[float]:
    """Adam on shuffled mini-batches; returns the mean loss of each epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(seed)  # the same batches for every implementation
    losses = []
    for _ in range(epochs):
        total = 0.0
        for batch in torch.randperm(len(x), generator=shuffle).split(BATCH_SIZE):
            optimizer.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        losses.append(total / len(x))
    return losses


def main(argv=None) -> dict:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=1024)
    args = parser.parse_args(argv)

    data = torch.Generator().manual_seed(args.seed)
    x_train, y_train = make_walks(args.train_size, data)
    x_test, y_test = make_walks(512, data)

    models = same_init_models(WalkClassifier, impl_names(args.impl), args.seed)
    losses, seconds, accuracy = {}, {}, {}
    for impl, model in models.items():
        losses[impl], seconds[impl] = timed(train, model, x_train, y_train, args.epochs, args.seed)
        with torch.no_grad():
            predicted = model.eval()(x_test).argmax(dim=1)
        accuracy[impl] = (predicted == y_test).float().mean().item()

    print_curves(losses, every=1)
    print_times(seconds)
    for impl, acc in accuracy.items():
        print(f"{impl:>5} test accuracy: {acc:.1%} "
              f"({len(y_test)} samples; chance 33%, best possible ~93%)")
    result = dict(losses=losses, seconds=seconds, accuracy=accuracy)
    if len(losses) == 2:
        result["max_rel_diff"] = max_rel_diff(losses["fused"], losses["torch"])
        print(f"loss curves: largest relative difference {result['max_rel_diff']:.1e} "
              f"(tolerance {TOLERANCE:.0e})")
        if result["max_rel_diff"] > TOLERANCE:
            raise SystemExit("FusedLSTM and nn.LSTM loss curves disagree")
    return result


if __name__ == "__main__":
    main()
