"""int8 sends: a tensor as int8 with one float32 scale per channel (dim 1), a quarter of float32's bytes.

Symmetric, round to nearest: channel c's values become ``round(x / s_c)`` in [-127, 127], with
``s_c = max|x[:, c]| / 127``, so each value comes back within ``s_c / 2`` of what was sent (a channel of zeros comes
back as zeros). Per channel because a block's output channels differ in range by orders of magnitude after
BatchNorm and ReLU; one scale for the whole tensor would round the small ones to zero.

A channel holding inf or nan comes back as nan: int8 cannot carry them, and a value that silently became a finite
number would hide a diverged block. The receiving block's loss is then not finite, and the trainer stops with its
usual message.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["quantize", "dequantize", "scale_count", "LEVELS"]

LEVELS = 127  # symmetric: -127..127 (int8's -128 is never used, so that x and -x round alike)


def scale_count(shape) -> int:
    """How many scales a tensor of ``shape`` is sent with: one per index of dim 1, or one for a 0-d or 1-d tensor."""
    return shape[1] if len(shape) >= 2 else 1


def _per_channel(t: Tensor) -> list[int]:
    """The shape that lines the scales up with ``t``'s dim 1 (or with all of a 0-d or 1-d tensor)."""
    return [1, -1] + [1] * (t.dim() - 2) if t.dim() >= 2 else [-1] * t.dim()


def quantize(t: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 values of ``t``'s shape, float32 scales): one scale per index of dim 1, or one for a 0-d or 1-d
    tensor."""
    x = t.detach().float()
    if not x.numel():
        absmax = x.new_zeros(scale_count(x.shape))
    elif x.dim() >= 2:
        absmax = x.abs().amax(dim=[d for d in range(x.dim()) if d != 1])
    else:
        absmax = x.abs().amax().reshape(1)
    shape = _per_channel(x)
    finite = torch.isfinite(absmax)
    scales = torch.where(finite, absmax / LEVELS, torch.full_like(absmax, float("nan")))
    divisor = torch.where(finite & (absmax > 0), scales, torch.ones_like(scales))
    values = torch.nan_to_num(x / divisor.reshape(shape), nan=0.0, posinf=0.0, neginf=0.0)
    return values.round_().clamp_(-LEVELS, LEVELS).to(torch.int8), scales


def dequantize(values: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """What :func:`quantize` was given, within half a scale step per value, in ``dtype``."""
    return (values.float() * scales.reshape(_per_channel(values))).to(dtype)
