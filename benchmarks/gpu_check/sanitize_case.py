"""A small forward and backward of every CUDA code path, for compute-sanitizer (gpu_check.sh).

    compute-sanitizer --tool memcheck python benchmarks/gpu_check/sanitize_case.py
    python benchmarks/gpu_check/sanitize_case.py --device cpu   # the same calls on the CPU

The ops directly (padded and packed, bidirectional, projection, dropout mask, no initial state,
float32 and bfloat16), then, on the persistent path (``FUSED_LSTM_CUDA_PATH=persistent``),
several launch plans of the persistent kernels (blocks per direction with a ragged last block,
batch tiles, lanes per dot product; float32 and float64), and last the module through autograd
in training mode. Sizes are tiny: under a sanitizer every access is checked. ``--device cpu``
runs the same calls on the CPU kernels, which checks this script (the ops' signatures, the
settings' names) where no GPU is.
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fused_lstm

OPS = torch.ops.fused_lstm
L, D, I, H, P, T, B = 2, 2, 5, 8, 3, 6, 4
# The persistent kernels' plans: (units per block, batch tile, lanes per dot product); None lets
# the plan choose. 3 units of hidden 8: 3 blocks, the last one ragged; 9 rows in tiles of 4.
PLANS = [(None, None, None), (3, 4, 2), (1, None, 32)]
BATCH_FOR_PLANS = 9
LENGTHS_FOR_PLANS = [6, 6, 5, 5, 4, 3, 3, 2, 1]


def flat_weights(device, dtype, proj_size=0):
    lstm = torch.nn.LSTM(I, H, L, bidirectional=True, proj_size=proj_size)
    return [w.detach().to(device, dtype) for w in lstm._flat_weights]


def maybe_packed(x, lengths, packed):
    if not packed:
        return x, None
    seq = pack_padded_sequence(x, torch.tensor(lengths))
    return seq.data, seq.batch_sizes


def forward_backward(x, batch_sizes, hx, cx, weights, mask, proj_size, upstream_state=True):
    """One op forward and backward; the backward gets random upstream gradients."""
    out, hy, cy, reserve = OPS.lstm_forward(x, batch_sizes, hx, cx, weights, mask, L, True, True,
                                            proj_size)
    grad_hy = torch.randn_like(hy) if upstream_state else None
    grad_cy = torch.randn_like(cy) if upstream_state else None
    return OPS.lstm_backward(x, batch_sizes, hx, cx, weights, mask, reserve,
                             torch.randn_like(out), grad_hy, grad_cy, L, True, True, proj_size)


def every_feature(device):
    """Projection, dropout mask and initial state; then none of them."""
    for dtype in (torch.float32, torch.bfloat16):
        for packed in (False, True):
            x, batch_sizes = maybe_packed(torch.randn(T, B, I, device=device, dtype=dtype),
                                          [6, 5, 3, 1], packed)
            hx = torch.randn(L * D, B, P, device=device, dtype=dtype)
            cx = torch.randn(L * D, B, H, device=device, dtype=dtype)
            mask = (torch.rand(L - 1, *x.shape[:-1], D * P, device=device) > 0.5).to(dtype) * 2
            forward_backward(x, batch_sizes, hx, cx, flat_weights(device, dtype, P), mask, P)
            forward_backward(x, batch_sizes, None, None, flat_weights(device, dtype), None, 0,
                             upstream_state=False)


def persistent_plans(device):
    """The persistent kernels on several plans, each checked with fused_lstm.explain to run."""
    for units, tile, k_split in PLANS:
        with fused_lstm.backends.cuda.flags(persistent_units=units, persistent_tile=tile,
                                            persistent_k_split=k_split):
            for dtype in (torch.float32, torch.float64):
                for packed in (False, True):
                    x, batch_sizes = maybe_packed(
                        torch.randn(T, BATCH_FOR_PLANS, I, device=device, dtype=dtype),
                        LENGTHS_FOR_PLANS, packed)
                    if device == "cuda":
                        shown = PackedSequence(x, batch_sizes) if packed else x
                        choice = fused_lstm.explain(dict(hidden_size=H, num_layers=L,
                                                         bidirectional=True), shown)
                        assert choice["forward"]["path"] == "persistent", choice["summary"]
                        assert choice["backward"]["path"] == "persistent", choice["summary"]
                    hx = torch.randn(L * D, BATCH_FOR_PLANS, H, device=device, dtype=dtype)
                    cx = torch.randn(L * D, BATCH_FOR_PLANS, H, device=device, dtype=dtype)
                    forward_backward(x, batch_sizes, hx, cx, flat_weights(device, dtype), None, 0)


def module_training(device):
    """Through the module and autograd, training mode with dropout."""
    model = fused_lstm.FusedLSTM(I, H, L, dropout=0.5).to(device).train()
    y, (h, c) = model(torch.randn(T, B, I, device=device, requires_grad=True))
    (y.sum() + h.sum() + c.sum()).backward()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    device = parser.parse_args(argv).device
    torch.manual_seed(0)
    if device == "cuda":
        assert torch._C._dispatch_has_kernel_for_dispatch_key("fused_lstm::lstm_forward",
                                                              "CUDA"), "no CUDA kernels"
    path = fused_lstm.backends.cuda.path
    every_feature(device)
    if path == "persistent" or device == "cpu":
        persistent_plans(device)
    module_training(device)
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize_case: ok (device {device}, CUDA path setting {path!r})")


if __name__ == "__main__":
    main()
