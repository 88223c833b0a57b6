"""Evaluation counts, kept one way for both trainers: what each head's workers and the model's output got right.

The one-device trainer runs every block on a batch and counts all of them; a pipeline rank counts its own
block's head (or, on the last rank, the model's output) and the ranks sum their counts with one all-reduce.
Either way the counts are summed here and turned into the same record by :meth:`EvalCounts.metrics`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError, NonFiniteLossError

__all__ = ["EvalCounts"]


class EvalCounts:
    """Running sums of one evaluation, in one float64 tensor on ``device`` (no read until :meth:`metrics`):
    ``[correct of every head's every worker..., correct of the output, summed loss of the output, examples]``."""

    def __init__(self, heads: int, workers: int, device: torch.device):
        self.heads, self.workers = heads, workers
        self.totals = torch.zeros(heads * workers + 3, dtype=torch.float64, device=device)

    def head(self, k: int, logits: Tensor, y: Tensor) -> None:
        """Count what each worker of head ``k`` got right; ``logits`` (batch, classes) or (workers, batch, classes)."""
        logits = logits.unsqueeze(0) if logits.dim() == 2 else logits
        offset = k * self.workers
        self.totals[offset : offset + self.workers] += (logits.argmax(-1) == y).sum(-1).double()

    def output(self, logits: Tensor, y: Tensor) -> None:
        """Count the model's output on a batch: correct, summed cross-entropy, examples."""
        logits = logits.float()
        self.totals[-3] += (logits.argmax(-1) == y).sum()
        self.totals[-2] += torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        self.totals[-1] += len(y)

    def metrics(self) -> dict:
        """``{"accuracy", "loss", "block_accuracy": [...], "worker_accuracy": [[...], ...]}`` (one read);
        ``block_accuracy`` has one entry per block, the best worker of each head, the last being the model's."""
        totals = self.totals.cpu()
        total = totals[-1].item()
        if total <= 0:
            raise ConfigError(
                "evaluate() got a loader with no examples, so there is no accuracy to report; pass a non-empty loader"
            )
        if not torch.isfinite(totals[-2]):
            raise NonFiniteLossError(
                "the model's outputs on the evaluation data are not finite (inf or nan): its weights or BatchNorm "
                "statistics hold non-finite values, so its accuracy means nothing. Load the last good checkpoint"
            )
        worker_acc = (totals[: self.heads * self.workers].view(self.heads, self.workers) / total).tolist()
        accuracy = totals[-3].item() / total
        return {
            "accuracy": accuracy,
            "loss": totals[-2].item() / total,
            "block_accuracy": [max(w) for w in worker_acc] + [accuracy],
            "worker_accuracy": worker_acc,
        }
