"""Replicas of one pipeline block: they start from the same state, average their gradients every step (one all-reduce,
or through torch's PowerSGD: :class:`PowerSGDAverage`), and hold the same buffers (BatchNorm statistics) after every
step."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["trained_state", "broadcast_from_first_replica", "average_gradients", "PowerSGDAverage", "broadcast_buffers"]


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


def _flatten(tensors: list[Tensor], device: torch.device) -> Tensor:
    """``tensors`` as one flat tensor on ``device``: one message for all of them."""
    return torch.cat([t.reshape(-1) for t in tensors]).to(device)


def _copy_back(flat: Tensor, tensors: list[Tensor]) -> None:
    """Each of ``tensors`` takes its part of ``flat`` (as :func:`_flatten` laid them out), in place."""
    flat = flat.to(tensors[0].device)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def average_gradients(grads: list[Tensor], group, replicas: int, comm_device: torch.device) -> None:
    """Average ``grads`` in place over the block's replicas: one all-reduce of all of them, flattened."""
    if not grads:
        return
    flat = _flatten(grads, comm_device)
    dist.all_reduce(flat, group=group)
    _copy_back(flat / replicas, grads)


class _Bucket:
    """What torch's DDP communication hooks read from a ``dist.GradBucket`` (which Python cannot construct): one
    flat buffer, the gradients as views of it, its index (the key of PowerSGD's error and warm-start memories) and
    whether it is the step's last bucket (PowerSGD counts steps on it)."""

    def __init__(self, index: int, flat: Tensor, shapes: list[torch.Size]):
        self._index, self._flat, self._shapes = index, flat, shapes

    def index(self) -> int:
        return self._index

    def buffer(self) -> Tensor:
        return self._flat

    def gradients(self) -> list[Tensor]:
        views, offset = [], 0
        for shape in self._shapes:
            n = shape.numel()
            views.append(self._flat[offset : offset + n].view(shape if len(shape) else (1,)))
            offset += n
        return views

    def is_last(self) -> bool:
        return True


class PowerSGDAverage:
    """Average a block's replicas' gradients through torch's PowerSGD (Vogels et al., 2019), as DDP's
    ``powerSGD_hook`` does for DDP: plain all-reduces for the first ``start`` steps, then each weight matrix's average
    as a rank-``rank`` product ``P Q^T`` (two small all-reduces), with error feedback (what one step's compression
    left out is added to the next step's gradient) and warm start. Every replica applies the same average.

    The gradients of a step go as one bucket; a step whose set of gradients differs from earlier ones (a head that
    took no gradient) gets a bucket index of its own, so each layout keeps its own error memory.

    Why this cannot deadlock: every replica of a block calls it once per step, at the same point of the step (the
    update, before the optimizer), with the same layout, so the replicas issue the same collectives in the same order
    on their own group. Under NCCL the hook waits for the whole GPU once (``torch.cuda.synchronize``, in torch's
    code), which also waits for this rank's sends still in flight: the activation of this step (its receiver takes it
    when it starts this step, having finished the previous one) and replay's gradient of the previous step (its
    receiver takes it in this step, before its own update). Each of those waits is for a rank at an earlier point
    of the order in ``DataPath._stage_step``'s note, so no cycle of waits can form.
    """

    def __init__(self, group, *, rank: int, start: int, comm_device: torch.device):
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

        self._hook = powersgd.powerSGD_hook
        self.state = powersgd.PowerSGDState(process_group=group, matrix_approximation_rank=rank,
                                            start_powerSGD_iter=start, use_error_feedback=True, warm_start=True,
                                            random_seed=0)  # the same first Q on every replica
        self.comm_device = comm_device
        self._layouts: dict[tuple, int] = {}

    def __call__(self, grads: list[Tensor]) -> None:
        if not grads:
            return
        shapes = [g.shape for g in grads]
        index = self._layouts.setdefault(tuple(shapes), len(self._layouts))
        averaged = self._hook(self.state, _Bucket(index, _flatten(grads, self.comm_device), shapes)).wait()
        _copy_back(averaged, grads)


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
        flat = _flatten(items, comm_device)
        dist.broadcast(flat, src=stage * replicas, group=group)
        _copy_back(flat, items)
