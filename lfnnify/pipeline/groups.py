"""The process groups a pipeline rank talks over: made by every rank in one order, opened before the first step.

- ``replicas``: the ranks holding the same block (gradient average, BatchNorm statistics);
- ``channels[(src, dst)]``: one group per direction of every neighbouring pair. With one communicator per
  direction, the activation a rank sends down never queues behind the gradient it waits for from above: under
  NCCL, ungrouped point-to-point operations on one communicator run in order on one stream, so rank k sending
  activation t+1 while rank k+1 sends gradient t would each wait for the other once a message is larger than
  NCCL's buffers. Gloo gets the same groups, so CPU tests run the same code;
- ``objects``: where checkpoints, log records and decisions travel as Python objects: a gloo group when the
  pipeline talks over NCCL (they then never take GPU memory), else None (the default group).

NCCL builds a communicator on its first use and blocks there until every member has arrived (pytorch/pytorch#108378).
Done in the middle of a step, that first use waits on a neighbour that may itself be waiting for this rank.
:func:`make_groups` therefore opens every communicator before the first step with one tiny message, in one global
order (see :func:`open_channels`), so that a step only ever uses communicators that exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Groups", "make_groups", "channel_order"]


@dataclass
class Groups:
    replicas: object
    channels: dict[tuple[int, int], object]
    objects: object | None


def make_groups(blocks: int, replicas: int, rank: int, comm_device: torch.device) -> Groups:
    """This rank's groups (see the module docstring). Every rank calls it, at the same point: torch.distributed
    requires every rank to create every group, members or not, in the same order."""
    by_block = [dist.new_group([k * replicas + r for r in range(replicas)]) for k in range(blocks)]
    channels = {}
    for src, dst in channel_order(blocks, replicas):
        channels[(src, dst)] = dist.new_group(sorted((src, dst)))
    objects = dist.new_group(backend="gloo") if dist.get_backend() == "nccl" else None
    mine = {pair: g for pair, g in channels.items() if rank in pair}
    groups = Groups(replicas=by_block[rank // replicas], channels=mine, objects=objects)
    _open(groups, rank, replicas, comm_device)
    return groups


def channel_order(blocks: int, replicas: int) -> list[tuple[int, int]]:
    """Every channel (src, dst), in the one order all ranks create and open them: by the lower rank of the pair,
    then the higher, the downward direction (activations) before the upward one (gradients)."""
    pairs = []
    for k in range(blocks - 1):
        for r in range(replicas):
            a, b = k * replicas + r, (k + 1) * replicas + r
            pairs += [(a, b), (b, a)]
    return sorted(pairs, key=lambda p: (min(p), max(p), p[0] > p[1]))


def _open(groups: Groups, rank: int, replicas: int, comm_device: torch.device) -> None:
    """Use every group of this rank once, so that NCCL builds its communicators here and not inside a step.

    Why this order cannot deadlock. First the replica group: each rank belongs to exactly one, and every member
    opens it first, so all of them meet there. Then the channels, each rank going through its own in
    :func:`channel_order`, a blocking send (``src``) or receive (``dst``) of one number on each. Take the first
    channel in that order that is not yet opened: both its ranks have opened every earlier channel of theirs (each
    of those is earlier in the order, so opened by the choice of this one), so both are now at this channel, and it
    opens. By induction every channel opens: no rank can wait on a peer that waits, directly or in a chain, on it.
    """
    tiny = torch.zeros(1, device=comm_device)
    if replicas > 1:
        dist.all_reduce(tiny, group=groups.replicas)
    for src, dst in channel_order(int(dist.get_world_size() // replicas), replicas):
        if rank == src:
            dist.send(tiny, dst=dst, group=groups.channels[(src, dst)])
        elif rank == dst:
            dist.recv(tiny, src=src, group=groups.channels[(src, dst)])
    if groups.objects is not None:
        dist.barrier(group=groups.objects)
