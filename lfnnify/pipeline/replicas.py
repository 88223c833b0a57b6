"""Replicas of one pipeline block: they start from the same state and average their gradients every step."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["trained_state", "broadcast_from_first_replica", "average_gradients"]


def trained_state(net, stage: int) -> list[Tensor]:
    """Everything a replica of block ``stage`` trains or keeps: the block's weights and buffers, and its head's
    (a look-ahead head's copies of the next block included)."""
    parts = [net.blocks[stage]]
    if stage < len(net.heads):
        parts.append(net.heads[stage])
    return [t for part in parts for t in part.state_dict().values()]


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
