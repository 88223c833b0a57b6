"""Prediction heads for workers: global pooling then one linear layer per worker, batched."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["HEADS", "LinearHeads", "Pool", "build_head", "head_param_count"]

HeadFactory = Callable[[int, int, int], nn.Module]
from .options import HEADS  # noqa: E402 - the built-in heads' names, declared with convert's settings


class Pool(nn.Module):
    """Global pooling to (B, C) for any feature layout, whatever the spatial size.

    ``layout``: ``"nchw"`` (conv maps), ``"nhwc"`` (channels-last maps), ``"nlc"``
    (token sequences), or ``"nc"`` (already flat). For tokens, ``token=True`` takes the
    class token (index 0); otherwise tokens after ``prefix_tokens`` are averaged.
    """

    def __init__(self, layout: str, *, token: bool = False, prefix_tokens: int = 0):
        super().__init__()
        self.layout, self.token, self.prefix_tokens = layout, token, prefix_tokens

    def forward(self, x: Tensor) -> Tensor:
        if self.layout == "nchw":
            return x.flatten(2).mean(-1)
        if self.layout == "nhwc":
            return x.flatten(1, -2).mean(1)
        if self.layout == "nlc":
            return x[:, 0] if self.token else x[:, self.prefix_tokens :].mean(1)
        return x.flatten(1)

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}" + (", token=True" if self.token else "")


class LinearHeads(nn.Module):
    """The paper's head for N workers: global average pooling, then ``Linear(C/N, classes)`` each.

    The block's C output channels are split into ``workers`` equal groups; group w feeds
    worker w's linear layer. All workers are computed in one batched matmul.
    Returns logits of shape (workers, B, num_classes).
    """

    def __init__(self, channels: int, num_classes: int, *, workers: int = 1, pool: Pool):
        super().__init__()
        if channels % workers:
            raise ConfigError(f"channels={channels} is not divisible by workers={workers}; use a divisor of {channels}")
        self.pool = pool
        self.workers, self.group = workers, channels // workers
        self.weight = nn.Parameter(torch.empty(workers, self.group, num_classes))
        self.bias = nn.Parameter(torch.empty(workers, num_classes))
        bound = 1 / math.sqrt(self.group)  # nn.Linear's default initialisation, per worker
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(x).reshape(x.shape[0], self.workers, self.group)
        return torch.einsum("bwc,wck->wbk", pooled, self.weight) + self.bias[:, None, :]

    def extra_repr(self) -> str:
        return f"workers={self.workers}, channels_per_worker={self.group}, num_classes={self.bias.shape[1]}"


def head_param_count(channels: int, num_classes: int, workers: int = 1) -> int:
    """Parameters of ``LinearHeads``: one (C/N)×classes weight and one bias per worker."""
    return channels * num_classes + workers * num_classes


def build_head(head: str | HeadFactory, *, channels: int, num_classes: int, workers: int, pool: Pool) -> nn.Module:
    """``head="linear"`` builds the paper's head; a callable ``head(channels, num_classes, workers)``
    builds a custom one, which receives the block's raw output and returns (workers, B, classes)
    logits, or (B, classes) when ``workers == 1``."""
    if head == "linear":
        return LinearHeads(channels, num_classes, workers=workers, pool=pool)
    return head(channels, num_classes, workers)
