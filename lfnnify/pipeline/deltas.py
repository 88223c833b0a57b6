"""int8 sends of each sample's change (AQ-SGD: Wang et al., "Fine-tuning language models over slow networks using
activation quantization with guarantees", NeurIPS 2022): the two ends of a link remember what the receiver last
got for every training sample, and each later visit sends only the int8-rounded difference.

Both ends hold a :class:`SampleMemory`, ``m[i]``, zero for a sample not seen yet. Sending sample ``i``'s
activation ``a``: ``q = quantize(a - m[i])`` goes over the link (int8 with a scale per channel, as
:mod:`~lfnnify.pipeline.quantize` sends), then both ends set ``m[i] += dequantize(q)`` and the receiver computes on
``m[i]``. A sample's first visit is therefore the plain int8 send; later ones round only how far its activation
moved since, so the receiver's error shrinks as training settles, instead of staying at half a step of the
activation's own range. This is the error feedback of AQ-SGD on the quantisation residual: what one visit rounded
away stays in ``a - m[i]`` and is sent again at the next.

Why the two memories cannot drift apart: the sender computes ``m[i] + dequantize(q)`` from the same int8 values and
scales the receiver gets, with the same float operations, on the CPU at both ends (the memories live in host memory
whatever the device), so both hold the same bits after every message; and the two ends of a link see the same
messages in the same order (one sender, one receiver, in-order point-to-point). Nothing is checkpointed: after a
restore both ends start from zeros again, which costs one plain int8 visit per sample and nothing else.

Memory: one activation per training sample at each end of each cut, in float32 and in host memory: the training
set's size times four times the elements of one sample's activation at the cut (:func:`lfnnify.plan` shows each
block's output shape). Evaluations send plain int8 (their samples are other samples), and replay's gradients too
(as in AQ-SGD, which sends gradients directly quantised).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import DataError
from . import quantize

__all__ = ["SampleMemory"]


class SampleMemory:
    """What the receiver of one link holds for every training sample, kept alike at both ends (see the module).

    Rows grow with the largest sample index seen (doubling), zero until a sample's first visit."""

    def __init__(self):
        self.rows: Tensor | None = None

    def encode(self, x: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """The int8 values and per-channel scales that carry ``x`` (a batch, one row per index of ``ids``) as its
        change since each sample's last visit; this end's memory moves as the receiver's will."""
        rows = self._rows(x, ids)
        before = self.rows[rows]
        values, scales = quantize.quantize(x.detach().float().to(before.device) - before)
        self.rows[rows] = before + quantize.dequantize(values, scales)
        return values, scales

    def decode(self, values: Tensor, scales: Tensor, ids: Tensor, dtype: torch.dtype) -> Tensor:
        """The batch the sender encoded, as this end's memory holds it after adding the change."""
        rows = self._rows(values, ids)
        now = self.rows[rows] + quantize.dequantize(values.to(self.rows.device), scales.to(self.rows.device))
        self.rows[rows] = now
        return now.to(dtype)

    @property
    def nbytes(self) -> int:
        return 0 if self.rows is None else self.rows.numel() * self.rows.element_size()

    def _rows(self, x: Tensor, ids: Tensor) -> Tensor:
        """``ids`` as row indices, after checking them against ``x`` and growing the memory to hold them."""
        ids = ids.reshape(-1).to(device="cpu", dtype=torch.int64)
        if len(ids) != len(x):
            raise DataError(f"a batch of {len(x)} activations came with {len(ids)} sample indices; give one index "
                            f"per sample (lfnnify.data.WithIndex, or make_loader(..., indexed=True))")
        if len(ids) and int(ids.min()) < 0:
            raise DataError(f"sample index {int(ids.min())} in a batch: indices name rows of the training set and "
                            f"must be >= 0 (lfnnify.data.WithIndex gives each sample its position)")
        if len(torch.unique(ids)) != len(ids):
            twice = [int(i) for i, n in zip(*torch.unique(ids, return_counts=True)) if n > 1]
            raise DataError(f"sample indices {twice[:5]} appear twice in one batch; each sample's change is sent "
                            f"against its own memory, so a batch must hold distinct samples (index the dataset's "
                            f"items, not their labels or an epoch's positions)")
        shape = tuple(x.shape[1:])
        if self.rows is not None and tuple(self.rows.shape[1:]) != shape:
            raise DataError(f"an activation of shape {shape} per sample after earlier ones of "
                            f"{tuple(self.rows.shape[1:])}: send_deltas remembers one activation per sample, so every "
                            f"training batch must have the same image size; resize the inputs, or turn "
                            f"send_deltas off")
        need = int(ids.max()) + 1 if len(ids) else 0
        have = 0 if self.rows is None else len(self.rows)
        if need > have:
            grown = torch.zeros((max(need, 2 * have), *shape), dtype=torch.float32)
            if self.rows is not None:
                grown[:have] = self.rows
            self.rows = grown
        return ids
