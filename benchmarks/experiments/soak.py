"""Soak test: many forward+backward iterations of a small FusedLSTM; resident memory must not grow.

    python benchmarks/experiments/soak.py         # 10,000 iterations (about a minute on 2 cores)
    python benchmarks/experiments/soak.py --iterations 500 --every 50

Prints the resident set size (RSS, from /proc/self/statm; ru_maxrss where /proc is missing)
every ``--every`` iterations. Growth is measured from the end of a warm-up (the first third of
the run: allocator pools, autograd and thread-pool caches fill up there) to the end, and must
stay under ``--max-growth`` (1%) of the warm RSS plus ``--slack-mb`` (2 MB: the allocator's
free lists and Python's arenas move by a few hundred KB from run to run, which is not a leak;
a leak of even 1 KB per iteration shows up as 10 MB over the default run). Exit status 1 when
it grows more. Each iteration makes fresh random inputs, an optional carried state, packed and
padded inputs alternately, and runs backward, so every path that allocates is exercised.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import sys

import torch

try:
    import fused_lstm  # noqa: F401
except ImportError:  # a source checkout without an install
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from fused_lstm import FusedLSTM  # noqa: E402


def rss_bytes() -> int:
    """Current resident set size of this process, in bytes."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no /proc (macOS): the peak, which still shows a steady leak
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def soak(iterations: int = 10_000, every: int = 1000, *, seed: int = 0, verbose: bool = True):
    """Runs the soak loop; returns a list of (iteration, rss_bytes) samples, the first taken
    before the first iteration and the last after the final one."""
    torch.manual_seed(seed)
    model = FusedLSTM(8, 16, num_layers=2, bidirectional=True, dropout=0.1)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    samples = [(0, rss_bytes())]
    for i in range(1, iterations + 1):
        seq_len, batch = 5 + i % 7, 1 + i % 4
        x = torch.randn(seq_len, batch, 8)
        hx = None
        if i % 2:
            hx = (torch.randn(4, batch, 16), torch.randn(4, batch, 16))
        if i % 3 == 0:
            lengths = torch.randint(1, seq_len + 1, (batch,))
            lengths[0] = seq_len
            x = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        output, (h_n, c_n) = model(x, hx)
        out = output.data if isinstance(output, torch.nn.utils.rnn.PackedSequence) else output
        loss = out.square().mean() + h_n.sum() + c_n.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i % every == 0 or i == iterations:
            samples.append((i, rss_bytes()))
            if verbose:
                print(f"iteration {i:>7}: RSS {samples[-1][1] / 2**20:8.1f} MB", flush=True)
    return samples


def growth(samples, warmup_fraction: float = 1 / 3):
    """(warm RSS, final RSS): the sample nearest after ``warmup_fraction`` of the run, and the
    last sample."""
    last_iteration = samples[-1][0]
    warm = next(rss for i, rss in samples if i >= warmup_fraction * last_iteration)
    return warm, samples[-1][1]


def within_limit(warm: int, final: int, max_growth: float = 0.01, slack_mb: float = 2.0) -> bool:
    return final - warm <= max_growth * warm + slack_mb * 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=1000, help="print RSS every N iterations")
    parser.add_argument("--max-growth", type=float, default=0.01,
                        help="allowed growth after warm-up, as a fraction (default 0.01)")
    parser.add_argument("--slack-mb", type=float, default=2.0,
                        help="allowed absolute growth on top of --max-growth (default 2 MB)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.iterations} iterations")
    samples = soak(args.iterations, args.every)
    warm, final = growth(samples)
    change = (final - warm) / warm
    ok = within_limit(warm, final, args.max_growth, args.slack_mb)
    print(f"RSS after warm-up {warm / 2**20:.1f} MB, at the end {final / 2**20:.1f} MB: "
          f"{change:+.2%} ({'OK' if ok else 'FAIL'}: limit {args.max_growth:.0%} + "
          f"{args.slack_mb} MB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
