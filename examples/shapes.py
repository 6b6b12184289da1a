"""The shapes an LSTM takes and returns, and how output relates to h_n.

batch_first, initial states (an init_hidden helper), dropout between layers, bidirectional,
many-to-one and many-to-many heads.

Prints each shape and checks the facts people rely on, above all that the last time step of
``output`` IS the top layer's final hidden state ``h_n[-1]`` (and which halves of it when
bidirectional).

    python examples/shapes.py [--impl fused|torch|both]
"""

from __future__ import annotations

import torch
from torch import nn

from _common import LSTM_CLASSES, impl_names, make_parser

BATCH, SEQ_LEN, INPUT_SIZE, HIDDEN_SIZE, NUM_LAYERS = 4, 7, 5, 6, 2


def init_hidden(lstm: nn.LSTM, batch: int):
    """Zero (h0, c0). Their shape is [num_layers * num_directions, batch, hidden_size], with
    the batch in the middle even when the LSTM is batch_first."""
    directions = 2 if lstm.bidirectional else 1
    shape = (lstm.num_layers * directions, batch, lstm.hidden_size)
    return torch.zeros(shape), torch.zeros(shape)


def show(name: str, tensor: torch.Tensor, shapes: dict) -> None:
    shapes[name] = tuple(tensor.shape)
    print(f"  {name:<30} {list(tensor.shape)}")


def check(claim: str, holds: bool, checks: dict) -> None:
    checks[claim] = holds
    print(f"  check: {claim}: {'yes' if holds else 'NO'}")


def walk_through(lstm_class, seed: int) -> dict:
    torch.manual_seed(seed)
    shapes = {"one direction": {}, "bidirectional": {}, "time-major": {}}
    checks = {}
    x = torch.randn(BATCH, SEQ_LEN, INPUT_SIZE)  # batch_first: [batch, time, features]

    print("one direction, batch_first=True, dropout=0.3 between the two layers (training mode)")
    lstm = lstm_class(INPUT_SIZE, HIDDEN_SIZE, NUM_LAYERS, batch_first=True, dropout=0.3)
    h0, c0 = init_hidden(lstm, BATCH)
    output, (h_n, c_n) = lstm(x, (h0, c0))
    for name, t in [("input x", x), ("h0, c0", h0), ("output", output), ("h_n", h_n),
                    ("c_n", c_n)]:
        show(name, t, shapes["one direction"])
    # Dropout acts only between layers: the top layer's output is not dropped, so the last step
    # of output is still exactly the final hidden state of the top layer.
    check("output[:, -1] equals h_n[-1]", torch.equal(output[:, -1], h_n[-1]), checks)

    many_to_one = nn.Linear(HIDDEN_SIZE, 1)   # one prediction per sequence
    show("many-to-one: head(h_n[-1])", many_to_one(h_n[-1]), shapes["one direction"])
    many_to_many = nn.Linear(HIDDEN_SIZE, 1)  # one prediction per time step
    show("many-to-many: head(output)", many_to_many(output), shapes["one direction"])

    print("bidirectional, batch_first=True")
    lstm = lstm_class(INPUT_SIZE, HIDDEN_SIZE, NUM_LAYERS, batch_first=True, bidirectional=True)
    h0, c0 = init_hidden(lstm, BATCH)
    output, (h_n, c_n) = lstm(x, (h0, c0))
    for name, t in [("h0, c0", h0), ("output", output), ("h_n", h_n)]:
        show(name, t, shapes["bidirectional"])
    # output[..., :H] is the forward direction, output[..., H:] the backward one. h_n is ordered
    # (layer 0 forward, layer 0 backward, layer 1 forward, layer 1 backward). The backward
    # direction ends at time step 0, so output[:, -1] is NOT h_n[-1] here.
    forward_out, backward_out = output[..., :HIDDEN_SIZE], output[..., HIDDEN_SIZE:]
    check("output[:, -1, :H] equals h_n[-2] (forward)",
          torch.equal(forward_out[:, -1], h_n[-2]), checks)
    check("output[:, 0, H:] equals h_n[-1] (backward)",
          torch.equal(backward_out[:, 0], h_n[-1]), checks)
    # A many-to-one head on a bidirectional LSTM reads the top layer's two final states.
    show("cat([h_n[-2], h_n[-1]], dim=1)", torch.cat([h_n[-2], h_n[-1]], dim=1),
         shapes["bidirectional"])

    print("time-major (the default, batch_first=False), no initial state given")
    lstm = lstm_class(INPUT_SIZE, HIDDEN_SIZE, NUM_LAYERS)
    output, (h_n, c_n) = lstm(x.transpose(0, 1))  # [time, batch, features]
    for name, t in [("input x.transpose(0, 1)", x.transpose(0, 1)), ("output", output),
                    ("h_n", h_n)]:
        show(name, t, shapes["time-major"])
    check("output[-1] equals h_n[-1]", torch.equal(output[-1], h_n[-1]), checks)
    return dict(shapes=shapes, checks=checks)


def main(argv=None) -> dict:
    args = make_parser(__doc__.splitlines()[0]).parse_args(argv)
    result = {}
    for impl in impl_names(args.impl):
        print(f"=== {impl} ({LSTM_CLASSES[impl].__name__})")
        result[impl] = walk_through(LSTM_CLASSES[impl], args.seed)
    failed = [f"{impl}: {claim}" for impl, r in result.items()
              for claim, holds in r["checks"].items() if not holds]
    if len(result) == 2 and result["fused"]["shapes"] != result["torch"]["shapes"]:
        failed.append("fused and torch shapes differ")
    if failed:
        raise SystemExit("failed: " + "; ".join(failed))
    return result


if __name__ == "__main__":
    main()
