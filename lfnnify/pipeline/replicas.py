"""Replicas of one pipeline block: they start from the same state, average their gradients every step, and hold
the same buffers (BatchNorm statistics) after every step."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["trained_state", "broadcast_from_first_replica", "average_gradients", "broadcast_buffers"]


def _parts(net, stage: int) -> list:
    return [net.blocks[stage]] + ([net.heads[stage]] if stage < len(net.heads) else [])


def trained_state(net, stage: int) -> list[Tensor]:
    """Everything a replica of block ``stage`` trains or keeps: the block's weights and buffers, and its head's
    (a look-ahead head's copies of the next block included)."""
    return [t for part in _parts(net, stage) for t in part.state_dict().values()]


@torch.no_grad()
def broadcast_from_first_replica(net, stage: int, replicas: int, group, comm_device: torch.device) -> None:
    """Replicas start equal, however each rank was seeded: the block's first replica sends all it trains."""
    for tensor in trained_state(net, stage):
        moved = tensor.to(comm_device)
        dist.broadcast(moved, src=stage * replicas, group=group)
        if moved is not tensor:
            tensor.copy_(moved)


def average_gradients(grads: list[Tensor], group, replicas: int, comm_device: torch.device) -> None:
    """Average ``grads`` in place over the block's replicas: one all-reduce of all of them, flattened."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]).to(comm_device)
    dist.all_reduce(flat, group=group)
    flat = flat.to(grads[0].device) / replicas
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def broadcast_buffers(net, stage: int, replicas: int, group, comm_device: torch.device) -> None:
    """Every replica takes the first replica's buffers (BatchNorm's running statistics and batch counts), as DDP does
    with its default ``broadcast_buffers=True``: the replicas evaluate alike, and the checkpoint, which keeps the
    first replica's block, holds the statistics every replica used. One broadcast per dtype, after every step."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for part in _parts(net, stage):
        for b in part.buffers():
            by_dtype.setdefault(b.dtype, []).append(b)
    for items in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in items]).to(comm_device)
        dist.broadcast(flat, src=stage * replicas, group=group)
        offset = 0
        for b in items:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()
