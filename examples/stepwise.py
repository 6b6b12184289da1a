"""Feed an LSTM one step at a time, carrying its state: the same as the whole sequence at once.

This is how an LSTM runs on a stream (one new input per call): pass the (h, c) returned by one
call into the next. Here an LSTM(5, 3, 2) reads a random sequence both ways, from a random (non
zero) initial state; the program prints both outputs, checks that they agree, and times one
streaming step.

    python examples/stepwise.py [--impl fused|torch|both]
"""

from __future__ import annotations

import torch

from _common import impl_names, make_parser, print_times, same_init_models, timed

INPUT_SIZE, HIDDEN_SIZE, NUM_LAYERS = 5, 3, 2
SEQ_LEN = 6
ATOL = 1e-6         # float32: one step at a time rounds a little differently than all at once
TIMING_REPEATS = 200


def run_both_ways(lstm, x, state):
    """x: [SEQ_LEN, 1, INPUT_SIZE] (time-major: the default layout), state: (h0, c0), each
    [NUM_LAYERS, 1, HIDDEN_SIZE]. Returns (stepwise output, its final state, whole output, its
    final state)."""
    outputs = []
    step_state = state
    for x_t in x:                                    # x_t: [1, INPUT_SIZE]
        # A sequence of length 1: [1, 1, INPUT_SIZE]. The state returned is fed back in.
        out_t, step_state = lstm(x_t.unsqueeze(0), step_state)
        outputs.append(out_t)
    stepwise = torch.cat(outputs)                    # [SEQ_LEN, 1, HIDDEN_SIZE]

    whole, whole_state = lstm(x, state)              # all SEQ_LEN steps in one call
    return stepwise, step_state, whole, whole_state


def time_one_step(lstm, x_t, state) -> float:
    """Streaming latency: seconds per call with one new time step x_t: [1, 1, INPUT_SIZE]."""
    lstm(x_t, state)  # warm-up: the first call pays one-time costs
    _, seconds = timed(lambda: [lstm(x_t, state) for _ in range(TIMING_REPEATS)])
    return seconds / TIMING_REPEATS


def fmt(values) -> str:
    return "[" + " ".join(f"{v:9.6f}" for v in values.tolist()) + "]"


def main(argv=None) -> dict:
    args = make_parser(__doc__.splitlines()[0]).parse_args(argv)
    models = same_init_models(
        lambda lstm_class: lstm_class(INPUT_SIZE, HIDDEN_SIZE, NUM_LAYERS),
        impl_names(args.impl), args.seed)
    x = torch.randn(SEQ_LEN, 1, INPUT_SIZE)
    state = (torch.randn(NUM_LAYERS, 1, HIDDEN_SIZE), torch.randn(NUM_LAYERS, 1, HIDDEN_SIZE))

    result = {}
    with torch.no_grad():
        for impl, lstm in models.items():
            stepwise, (h_step, c_step), whole, (h_whole, c_whole) = run_both_ways(lstm, x, state)
            print(f"{impl}: top layer's output at each time step")
            print(f"{'t':>3}  {'one step at a time':^30}  {'whole sequence at once':^30}")
            for t in range(SEQ_LEN):
                print(f"{t:>3}  {fmt(stepwise[t, 0])}  {fmt(whole[t, 0])}")
            max_diff = max((a - b).abs().max().item() for a, b in
                           ((stepwise, whole), (h_step, h_whole), (c_step, c_whole)))
            print(f"{impl}: output, h_n and c_n agree: {max_diff <= ATOL} "
                  f"(largest difference {max_diff:.1e})\n")
            result[impl] = dict(output=whole, h_n=h_whole, c_n=c_whole, max_diff=max_diff)

            result[impl]["step_seconds"] = time_one_step(lstm, x[:1], state)

    print_times({impl: r["step_seconds"] for impl, r in result.items()}, "one streaming step")

    failed = [impl for impl, r in result.items() if r["max_diff"] > ATOL]
    if len(result) == 2:
        impl_diff = max((result["fused"][k] - result["torch"][k]).abs().max().item()
                        for k in ("output", "h_n", "c_n"))
        result["impl_max_diff"] = impl_diff
        print(f"fused against torch: largest difference {impl_diff:.1e}")
        if impl_diff > ATOL:
            failed.append("fused against torch")
    if failed:
        raise SystemExit(f"results disagree: {', '.join(failed)}")
    return result


if __name__ == "__main__":
    main()
