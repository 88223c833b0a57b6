"""Look-ahead heads: a copy of what the next block does first, then global pooling and a linear layer.

A block's paper head (pooling + linear) asks its features to be linearly separable already, which
pushes early blocks towards greedy features. A look-ahead head (AugLocal, ICLR 2024; Momentum
Auxiliary Networks, 2024) first runs a copy of what the *next* block does first, initialised from that
block's weights, so a block is judged by features one stage deeper. Two depths:

- ``head="lookahead"``: the next block's first stage (its first residual block, transformer block, or
  convolution with what follows it: the span up to the next cut point with compute).
- ``head="lookahead-layer"``: only the first layer with compute that reads the block's output (a ResNet's
  ``conv1``, ``bn1``, ``act1`` of the next residual block), far fewer parameters. Where no single layer
  reads it alone (a residual stream), it is the first stage.

The copy has its own parameters: gradient isolation between blocks is untouched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx, nn

from .blocks import node_params, subgraph
from .cuts import CutPoint, GraphProfile, input_dependent_nodes
from .heads import LinearHeads, Pool

__all__ = ["LOOKAHEADS", "LookaheadHead", "Stage", "next_stage", "build_lookahead_head"]

LOOKAHEADS = ("lookahead", "lookahead-layer")


@dataclass(frozen=True)
class Stage:
    """The nodes a look-ahead head copies: they read the cut's activation and end in ``end``."""

    name: str  # module path of what is copied, e.g. "layer2.0" or "layer2.0.conv1"
    members: tuple[str, ...]  # fx node names, in graph order
    end: CutPoint  # the last node, as a cut point (its output shape and position)


def next_stage(gm: fx.GraphModule, qualnames: dict[str, str], profile: GraphProfile, cut: CutPoint,
               staged: list[CutPoint], limit: int, depth: str) -> Stage | None:
    """What a look-ahead head after ``cut`` copies, ending no further than node ``limit`` (the next block's
    end); None when nothing fits (the head is then the paper's)."""
    nodes = list(gm.graph.nodes)
    dependent = input_dependent_nodes(gm.graph)
    if depth == "lookahead-layer":
        chain = _first_layer(nodes, dependent, profile, cut, limit)
        if chain:
            end = chain[-1]
            name = qualnames.get(chain[0].name, chain[0].name)
            point = CutPoint(name, (name,), end.name, nodes.index(end), tuple(profile.shapes.get(end.name) or ()))
            return Stage(name, tuple(n.name for n in chain), point)
    end = next((c for c in staged if cut.index < c.index <= limit), None)
    if end is None:
        return None
    members = tuple(n.name for n in nodes[cut.index + 1 : end.index + 1] if n in dependent)
    return Stage(end.name, members, end)


def _first_layer(nodes, dependent, profile: GraphProfile, cut: CutPoint, limit: int) -> list[fx.Node]:
    """The first node with FLOPs that reads the cut's activation and nothing else input-dependent, followed by
    the compute-free nodes that continue it one after another (normalisation, activation, identities)."""
    index = {n: i for i, n in enumerate(nodes)}
    start = nodes[cut.index]
    readers = sorted((u for u in start.users if u in dependent and u.op != "output"), key=index.get)
    first = next((u for u in readers if profile.flops.get(u.name, 0) > 0), None)
    if first is None or index[first] > limit or [a for a in first.all_input_nodes if a in dependent] != [start]:
        return []
    chain = [first]
    while True:
        users = [u for u in chain[-1].users if u in dependent]
        if len(users) != 1:
            break
        u = users[0]
        if u.op == "output" or index[u] > limit or profile.flops.get(u.name, 0) > 0:
            break
        if [a for a in u.all_input_nodes if a in dependent] != [chain[-1]]:
            break
        chain.append(u)
    return chain if profile.shapes.get(chain[-1].name) else []


def stage_params_and_flops(gm: fx.GraphModule, profile: GraphProfile, stage: Stage) -> tuple[int, int]:
    """Parameters and forward FLOPs per example of a stage (parameters counted once)."""
    names = set(stage.members)
    members = [n for n in gm.graph.nodes if n.name in names]
    attrs = {a for n in members for a in n.all_input_nodes if a.op == "get_attr"}  # weights read functionally
    return node_params(gm, [*members, *attrs]), sum(profile.flops.get(n.name, 0) for n in members)


class LookaheadHead(nn.Module):
    """``stage`` (a copy of what the next block does first), then the paper's head on its output.

    Returns logits of shape (1, B, num_classes), like :class:`~lfnnify.surgery.heads.LinearHeads` with one worker.
    """

    def __init__(self, stage: fx.GraphModule, linear: LinearHeads, *, source: str):
        super().__init__()
        self.stage = stage
        self.linear = linear
        self.source = source  # the module path of what it copies, e.g. "layer2.0"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.stage(x))

    def shared_names(self, next_block: nn.Module) -> list[str]:
        """The parameters of the copy that the next block also has (by name), in the copy's order."""
        theirs = {name for name, _ in next_block.named_parameters()}
        return [name for name, _ in self.stage.named_parameters() if name in theirs]

    def refresh(self, next_block: nn.Module, momentum: float = 0.0) -> int:
        """Pull the next block's current weights into the copy: ``p = momentum·p + (1 - momentum)·q``
        (0 copies them). Returns how many tensors were refreshed."""
        return self.refresh_from_flat(self.flat_weights(next_block), next_block, momentum)

    def flat_weights(self, next_block: nn.Module) -> torch.Tensor:
        """The next block's weights that the copy takes, as one flat tensor (what a pipeline rank sends)."""
        theirs = dict(next_block.named_parameters())
        return torch.cat([theirs[name].detach().reshape(-1) for name in self.shared_names(next_block)])

    @torch.no_grad()
    def refresh_from_flat(self, flat: torch.Tensor, next_block: nn.Module, momentum: float = 0.0) -> int:
        """:meth:`refresh` from :meth:`flat_weights` (``next_block`` only names the tensors: on a pipeline rank
        its weights live on another process)."""
        mine, names = dict(self.stage.named_parameters()), self.shared_names(next_block)
        sizes = [mine[name].numel() for name in names]
        if flat.numel() != sum(sizes):
            raise ValueError(f"look-ahead head copying {self.source!r}: received {flat.numel()} weights, expected "
                             f"{sum(sizes)}")
        for name, q in zip(names, flat.split(sizes)):
            p = mine[name]
            p.mul_(momentum).add_(q.view_as(p).to(p.device, p.dtype), alpha=1 - momentum)
        return len(names)

    def extra_repr(self) -> str:
        return f"copies={self.source!r}"


def build_lookahead_head(gm: fx.GraphModule, cut: CutPoint, stage: Stage, *, num_classes: int, pool: Pool,
                         channels: int) -> LookaheadHead:
    """A :class:`LookaheadHead` whose stage is an independent copy of ``stage``'s nodes of ``gm``."""
    by_name = {n.name: n for n in gm.graph.nodes}
    module = subgraph(gm, by_name[cut.node], [by_name[m] for m in stage.members], by_name[stage.end.node],
                      "Lookahead")
    module = copy.deepcopy(module).train(gm.training)
    return LookaheadHead(module, LinearHeads(channels, num_classes, workers=1, pool=pool), source=stage.name)
