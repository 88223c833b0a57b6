"""Leader/follower selection and the local losses of one block's workers (vectorised)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import LabelError

__all__ = ["WorkerLosses", "check_labels", "leader_count", "worker_losses"]


def leader_count(workers: int, leaders: float) -> int:
    """``round(leaders · workers)`` (halves round up), at least 1."""
    return max(1, min(workers, int(leaders * workers + 0.5)))


@dataclass
class WorkerLosses:
    """One block's local loss and how it was made."""

    loss: Tensor  # mean leader CE + follower_weight · mean follower MSE, ready for backward()
    leaders: Tensor  # indices of the leader workers, best first
    best: int  # index of the best leader, the followers' target
    worker_ce: Tensor  # (workers,) cross-entropy of every worker, detached
    best_logits: Tensor  # (B, classes) the best leader's logits, detached (for accuracy)


def worker_losses(
    logits: Tensor,
    target: Tensor,
    *,
    leaders: float = 1.0,
    follower_weight: float = 1.0,
    fixed_leaders: Tensor | None = None,
) -> WorkerLosses:
    """Local loss of a block whose N workers each predict the label.

    ``logits`` is (N, B, classes). The ``leader_count(N, leaders)`` workers with the
    lowest cross-entropy lead and are trained on it; the others follow, trained with the
    MSE between their softmax and the best leader's (detached) softmax. The block loss is the
    *mean* leader cross-entropy plus ``follower_weight`` times the *mean* follower MSE (Eq. 2), so
    the trunk's effective learning rate does not grow with the number of workers.
    ``fixed_leaders`` (best first) skips selection, for per-epoch leadership.
    """
    n, b, c = logits.shape
    ce = F.cross_entropy(logits.reshape(n * b, c), target.repeat(n), reduction="none").view(n, b).mean(1)
    if fixed_leaders is None:
        order = torch.argsort(ce.detach())
        lead = order[: leader_count(n, leaders)]
    else:
        lead = fixed_leaders
    is_leader = torch.zeros(n, dtype=torch.bool, device=logits.device)
    is_leader[lead] = True
    loss = ce[is_leader].mean()
    best = int(lead[0])
    if not bool(is_leader.all()):
        probs = logits.softmax(-1)
        target_probs = probs[best].detach()
        follower_mse = (probs[~is_leader] - target_probs).pow(2).mean(dim=(1, 2))
        loss = loss + follower_weight * follower_mse.mean()
    return WorkerLosses(loss, lead, best, ce.detach(), logits[best].detach())


def check_labels(y, num_classes: int, *, where: str = "the trainer") -> None:
    """Labels must be a 1-D integer tensor of class indices in ``[0, num_classes)``; say how to fix them if not."""
    if not isinstance(y, Tensor):
        raise LabelError(f"labels given to {where} are a {type(y).__name__}; pass a tensor of class indices")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise LabelError(
            f"labels given to {where} have dtype {y.dtype}; lfnnify trains on class indices (torch.long). "
            f"For one-hot or soft labels, pass labels.argmax(1); for integer-valued floats, labels.long()."
        )
    if y.dim() != 1:
        fix = "labels.squeeze(1)" if y.dim() == 2 and y.shape[1] == 1 else "one class index per example"
        raise LabelError(f"labels given to {where} have shape {tuple(y.shape)}; expected (batch,): use {fix}")
    if y.numel():
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise LabelError(
                f"label {bad} given to {where} is outside [0, {num_classes}): block 0's head, every later head and "
                f"the model's output predict num_classes={num_classes} classes. Convert with num_classes= matching "
                f"the data, or remap the labels."
            )
