"""What FusedLSTM's eager forward (module.py) and its TorchScript forward (_script.py) share:
plain functions TorchScript compiles, so the two paths cannot drift apart."""

from typing import List, Optional, Tuple

import torch
from torch import Tensor


def is_batched_input(input: Tensor) -> bool:  # noqa: A002 (nn.LSTM's argument name)
    """Whether a padded input is batched (3-D) or unbatched (2-D); nn.LSTM's ValueError for
    any other number of dimensions."""
    dim = input.dim()
    if dim != 3 and dim != 2:
        raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {dim}D instead")
    return dim == 3


def state_for_op(h: Tensor, c: Tensor, is_batched: bool) -> Tuple[Tensor, Tensor]:
    """The given (h_0, c_0) as the op takes them, ``[L*D, B, size]``: nn.LSTM's dimension check
    (its RuntimeError and message), and a batch of one for unbatched input."""
    if is_batched:
        if h.dim() != 3 or c.dim() != 3:
            raise RuntimeError(
                "For batched 3-D input, hx and cx should "
                f"also be 3-D but got ({h.dim()}-D, {c.dim()}-D) tensors"
            )
        return h, c
    if h.dim() != 2 or c.dim() != 2:
        raise RuntimeError(
            "For unbatched 2-D input, hx and cx should "
            f"also be 2-D but got ({h.dim()}-D, {c.dim()}-D) tensors"
        )
    return h.unsqueeze(1), c.unsqueeze(1)


def dropout_mask(x: Tensor, p: float, training: bool, num_layers: int,
                 layer_out: int) -> Optional[Tensor]:
    """Inter-layer dropout as a mask ``[L-1, *x.shape[:-1], layer_out]`` of 0 and 1/(1-p), or
    None when there is no dropout (eval mode, p == 0, or a single layer). ``layer_out``: a
    layer's output width, D * (proj_size or hidden_size)."""
    if not (p > 0 and training and num_layers > 1):
        return None
    shape: List[int] = [num_layers - 1] + list(x.shape[:-1]) + [layer_out]
    if p >= 1:
        return torch.zeros(shape, dtype=x.dtype, device=x.device)
    return torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - p).div_(1 - p)
