"""Look-ahead heads: a copy of the first stage after a cut, then global pooling and a linear layer.

A block's paper head (pooling + linear) asks its features to be linearly separable already, which
pushes early blocks towards greedy features. A look-ahead head (AugLocal, ICLR 2024; Momentum
Auxiliary Networks, 2024) first runs a copy of what the *next* block does first (its first residual
block, or its first convolution with what follows it), initialised from that block's weights, so a
block is judged by features one stage deeper. The copy has its own parameters: gradient isolation
between blocks is untouched.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from .cuts import CutPoint, GraphProfile
from .heads import LinearHeads, Pool
from .partition import split_graph

__all__ = ["LookaheadHead", "first_stage_end", "build_lookahead_head"]


def first_stage_end(cut: CutPoint, candidates: list[CutPoint], limit: int) -> CutPoint | None:
    """The cut point that ends the first stage after ``cut``: the next candidate with compute in between
    (``candidates`` are the cut points with FLOPs between them), no further than node ``limit`` (where the
    next block ends). None when no stage ends before that."""
    for c in candidates:
        if cut.index < c.index <= limit:
            return c
    return None


class LookaheadHead(nn.Module):
    """``stage`` (a copy of the next block's first stage), then the paper's head on its output.

    Returns logits of shape (1, B, num_classes), like :class:`~lfnnify.heads.LinearHeads` with one worker.
    """

    def __init__(self, stage: fx.GraphModule, linear: LinearHeads, *, source: str):
        super().__init__()
        self.stage = stage
        self.linear = linear
        self.source = source  # the module path of the stage it copies, e.g. "layer2.0"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.stage(x))

    @torch.no_grad()
    def refresh(self, next_block: nn.Module, momentum: float = 0.0) -> int:
        """Pull the next block's current weights into the copy: ``p = momentum·p + (1 - momentum)·q``
        (0 copies them). Returns how many tensors were refreshed."""
        theirs = dict(next_block.named_parameters())
        count = 0
        for name, p in self.stage.named_parameters():
            q = theirs.get(name)
            if q is not None and q.shape == p.shape:
                p.mul_(momentum).add_(q.to(p.device, p.dtype), alpha=1 - momentum)
                count += 1
        return count

    def extra_repr(self) -> str:
        return f"copies={self.source!r}"


def stage_cost(nodes: list[fx.Node], cut: CutPoint, end: CutPoint, profile: GraphProfile) -> int:
    """Forward FLOPs per example of the stage between ``cut`` and ``end``."""
    return sum(profile.flops.get(n.name, 0) for n in nodes[cut.index + 1 : end.index + 1])


def build_lookahead_head(
    gm: fx.GraphModule, cut: CutPoint, end: CutPoint, *, num_classes: int, pool: Pool, channels: int
) -> LookaheadHead:
    """A :class:`LookaheadHead` whose stage is an independent copy of ``gm``'s nodes between ``cut`` and ``end``."""
    stage = copy.deepcopy(split_graph(gm, [cut.node, end.node], class_name="Lookahead")[1])
    stage.train(gm.training)
    return LookaheadHead(stage, LinearHeads(channels, num_classes, workers=1, pool=pool), source=end.name)
