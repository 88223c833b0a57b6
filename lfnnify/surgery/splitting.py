"""Choosing a split: where the cuts go, what each candidate block and head costs, and the plan's rows.

:func:`choose_split` runs the three steps and returns its decisions (:class:`Split`: the chosen cut points and
each head's site besides the rows); the plan keeps them, so that :func:`lfnnify.convert` builds exactly what the
plan describes without choosing again.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

from torch import fx, nn

from ..errors import ConfigError, CutError
from .analysis import Analysis, measured_piece_times
from .blocks import node_params
from .cuts import CutPoint, GraphProfile
from .headplan import HeadSite, build_site_head, head_cost, head_site
from .options import HEADS

__all__ = ["BlockInfo", "Split", "choose_split", "balanced_partition", "staged_cut_points"]

INF = float("inf")


@dataclass
class BlockInfo:
    """One block of a plan. FLOPs and bytes are per example (batch 1)."""

    index: int
    start: str  # the cut it starts after, or "input"
    end: str  # the cut it ends at, or "output"
    flops: int
    params: int
    output_shape: tuple[int, ...]
    head_params: int
    head_flops: int
    layout: str  # "nchw", "nhwc", "nlc" or "nc": how the head pools the block output
    cost: float  # what the partition balanced (flops, seconds or params), head included
    head: str = ""  # "linear", "lookahead (copies layer2.0)", a custom head's name; "" for the last block
    stored_inputs: int = 0  # mode="replay": inputs of earlier batches this block keeps (K - 1 - k)
    stored_bytes: int = 0  # bytes those stored inputs take per example of the batch
    stashed_weight_bytes: int = 0  # weight_stashing=True: bytes of the weight copies kept for pending batches


@dataclass
class Split:
    """What a split decided, handed on to :func:`lfnnify.convert`: the chosen cut points, the site of each
    block's head, and one row per block."""

    chosen: list[CutPoint]
    sites: list[HeadSite]
    rows: list[BlockInfo]


def choose_split(model: nn.Module, analysis: Analysis, *, blocks: int | None, cuts: Sequence[str] | None,
                 workers: int, num_classes: int, head, balance: str, mode: str, stashing: bool, name: str) -> Split:
    """Choose the cuts (``blocks=K`` balanced, or explicit ``cuts=``), then cost every block and head."""
    staged = staged_cut_points(analysis)
    if cuts is not None:
        chosen, candidates, costs = _resolve_cut_names(cuts, analysis.cut_points, name), analysis.cut_points, None
    else:
        candidates = _balancing_candidates(blocks, analysis.cut_points, staged, name)
        atom_costs, cut_costs, sites = _candidate_costs(model, analysis, candidates, staged, head=head,
                                                        balance=balance, num_classes=num_classes)
        if head not in HEADS:
            _check_head_serves(head, sites, [c < INF for c in cut_costs], blocks, analysis, num_classes, name)
        chosen = [candidates[j] for j in balanced_partition(atom_costs, cut_costs, blocks)]
        costs = (atom_costs, cut_costs)
    rows, sites = _rows(model, analysis, candidates, chosen, staged, costs, head=head, workers=workers,
                        num_classes=num_classes, mode=mode, stashing=stashing)
    return Split(chosen, sites, rows)


def _balancing_candidates(blocks: int, cut_points: list[CutPoint], staged: list[CutPoint], name: str):
    """The cut points ``blocks=K`` chooses among (those with compute between them), or why K is too many."""
    if blocks - 1 > len(cut_points):
        raise CutError(
            f"blocks={blocks} but {name} has {len(cut_points)} places where it can be cut, so at most "
            f"{len(cut_points) + 1} blocks; lfnnify.plan(model) lists them"
        )
    if blocks - 1 > len(staged):
        raise CutError(
            f"blocks={blocks} but {name} has only {len(staged)} cut points with compute between them "
            f"(of {len(cut_points)} valid ones), so at most {len(staged) + 1} blocks; pick "
            f"explicit cuts=[...] from lfnnify.plan(model)"
        )
    return staged


def _candidate_costs(model, analysis: Analysis, candidates: list[CutPoint], staged, *, head, balance: str,
                     num_classes: int) -> list:
    """``[piece costs, cut costs, head sites]``: what each piece between candidate cuts costs, what a block
    ending at each candidate pays for its head (infinite where a custom head cannot serve it), and each site."""
    nodes = list(analysis.traced.graph_module.graph.nodes)
    end_of_graph = len(nodes) - 1
    sites = [head_site(model, c, staged, end_of_graph, analysis=analysis, head=head) for c in candidates]
    bounds = [-1] + [c.index for c in candidates] + [end_of_graph]
    pieces = [nodes[a + 1 : b + 1] for a, b in zip(bounds, bounds[1:])]
    if balance == "flops":
        atom_costs = [sum(analysis.profile.flops.get(n.name, 0) for n in p) for p in pieces]
        cut_costs = [_candidate_cost(head, s, analysis, num_classes, 1) for s in sites]
    elif balance == "memory":  # activations a block keeps for its backward: bounds the one-device peak
        atom_costs = [sum(analysis.profile.bytes.get(n.name, 0) for n in p) for p in pieces]
        cut_costs = [0.0 if _candidate_cost(head, s, analysis, num_classes, 1) < INF else INF for s in sites]
    elif balance == "params":
        atom_costs = [node_params(analysis.traced.graph_module, p) for p in pieces]
        cut_costs = [_candidate_cost(head, s, analysis, num_classes, 1, part=0) for s in sites]
    else:
        heads = [_candidate_head(head, s, analysis, num_classes) for s in sites]
        atom_costs, cut_costs = measured_piece_times(analysis.traced.graph_module, candidates,
                                                     analysis.example_batch, heads)
        cut_costs = [c if h is not None else INF for c, h in zip(cut_costs, heads)]
    return [atom_costs, cut_costs, sites]


def _rows(model, analysis: Analysis, candidates, chosen, staged, costs, *, head, workers: int, num_classes: int,
          mode: str, stashing: bool) -> tuple[list[BlockInfo], list[HeadSite]]:
    """One :class:`BlockInfo` per block of the chosen split, and the site of each block's head."""
    gm = analysis.traced.graph_module
    nodes = list(gm.graph.nodes)
    position = {c.index: j for j, c in enumerate(candidates)}
    edges = [-1] + [c.index for c in chosen] + [len(nodes) - 1]
    input_bytes = analysis.example_input.numel() * analysis.example_input.element_size()
    element = next((q.element_size() for q in model.parameters()), 4)
    infos, sites = [], []
    for k, (a, b) in enumerate(zip(edges, edges[1:])):
        block_nodes = nodes[a + 1 : b + 1]
        last = k == len(edges) - 2
        flops = sum(analysis.profile.flops.get(n.name, 0) for n in block_nodes)
        if last:
            out_shape = analysis.profile.shapes.get(_output_source(nodes[-1])) or ()
            layout, h_params, h_flops, h_name = "", 0, 0, ""
        else:
            j = position[b]
            site = head_site(model, candidates[j], staged, edges[k + 2], analysis=analysis, head=head)
            out_shape, layout = candidates[j].output_shape, site.layout
            _check_workers(workers, site.channels, candidates[j].name)
            h_params, h_flops, h_name = head_cost(head, site, analysis, num_classes, workers)
            sites.append(site)
        if costs is not None:
            atom_costs, cut_costs = costs
            lo = 0 if a < 0 else position[a] + 1
            hi = len(candidates) if last else position[b]
            cost = sum(atom_costs[lo : hi + 1]) + (0 if last else cut_costs[position[b]])
        else:
            cost = flops + h_flops
        kept = len(edges) - 2 - k if mode == "replay" else 0
        in_bytes = input_bytes if a < 0 else analysis.profile.bytes.get(nodes[a].name, 0)
        params = node_params(gm, block_nodes)
        infos.append(BlockInfo(
            index=k, start="input" if a < 0 else candidates[position[a]].name,
            end="output" if last else candidates[position[b]].name, flops=int(flops), params=params,
            output_shape=tuple(out_shape), head_params=int(h_params), head_flops=int(h_flops), layout=layout,
            cost=float(cost), head=h_name, stored_inputs=kept, stored_bytes=kept * int(in_bytes),
            stashed_weight_bytes=kept * params * element if stashing else 0,
        ))
    return infos, sites


def _resolve_cut_names(names: Sequence[str], cut_points: list[CutPoint], model_name: str) -> list[CutPoint]:
    by_name = {alias: c for c in cut_points for alias in c.aliases}
    chosen = []
    for name in names:
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise CutError(
                f"cut {name!r} is not a valid cut point of {model_name}: a cut needs exactly one live "
                f"activation after a module's output.{hint} lfnnify.plan(model) lists all "
                f"{len(cut_points)} valid cut points."
            )
        chosen.append(by_name[name])
    chosen.sort(key=lambda c: c.index)
    for a, b in zip(chosen, chosen[1:]):
        if a.index == b.index:
            raise CutError(f"cuts {list(names)!r} name the same cut point twice ({a.name!r}); give each once")
    return chosen


def _candidate_cost(head, site, analysis: Analysis, num_classes: int, workers: int, part: int = 1) -> float:
    """A head's FLOPs (``part=1``) or parameters (``part=0``) at a candidate cut; infinite where a custom head
    cannot take that block's output (such a cut is never chosen)."""
    try:
        return float(head_cost(head, site, analysis, num_classes, workers)[part])
    except ConfigError:
        return INF


def _check_head_serves(head, sites, servable: list[bool], blocks: int, analysis: Analysis, num_classes: int,
                       name: str) -> None:
    """Refuse a custom head that can serve fewer cuts than ``blocks`` needs, with the error of the first it can't."""
    if sum(servable) >= blocks - 1:
        return
    failed = next(s for s, ok in zip(sites, servable) if not ok)
    try:
        build_site_head(head, failed, analysis, num_classes, 1)
        reason = ""
    except ConfigError as exc:
        reason = f" At the cut after {failed.cut.name!r}: {exc}"
    label = getattr(head, "__name__", type(head).__name__)
    raise CutError(
        f"blocks={blocks} needs {blocks - 1} cuts, but head={label} can serve only {sum(servable)} of the "
        f"{len(sites)} places where {name} can be cut (a head must take the block's output and return logits)."
        f"{reason} Fix the head factory, or ask for at most {sum(servable) + 1} blocks."
    )


def _candidate_head(head, site, analysis: Analysis, num_classes: int):
    try:
        return build_site_head(head, site, analysis, num_classes, 1)
    except ConfigError:
        return None


def staged_cut_points(analysis: Analysis) -> list[CutPoint]:
    """The cut points with compute between them (of a conv -> bn -> relu run, only the last): what balancing
    chooses among, and where look-ahead heads' copied stages end."""
    return _collapse_free_cuts(analysis.cut_points, list(analysis.traced.graph_module.graph.nodes), analysis.profile)


def _collapse_free_cuts(cut_points: list[CutPoint], nodes: list[fx.Node], profile: GraphProfile) -> list[CutPoint]:
    """Of cut points with no FLOPs between them (conv -> bn -> relu), keep only the last.

    They cost the same, and a head placed after the normalisation and activation sees the
    features the next layer sees; automatic balancing only chooses among these.
    """
    kept = []
    for j, cut in enumerate(cut_points):
        if j + 1 < len(cut_points):
            between = nodes[cut.index + 1 : cut_points[j + 1].index + 1]
            if sum(profile.flops.get(n.name, 0) for n in between) == 0:
                continue
        kept.append(cut)
    return kept


def _output_source(output_node: fx.Node) -> str:
    arg = output_node.args[0]
    while isinstance(arg, (tuple, list)) and arg:
        arg = arg[0]
    return arg.name if isinstance(arg, fx.Node) else ""


def _check_workers(workers: int, channels: int, cut: str) -> None:
    if workers > channels:
        raise ConfigError(
            f"workers={workers} but the activation after {cut!r} has only {channels} channels; a filter-wise "
            f"worker needs at least one channel. Use workers <= {channels}, or cut elsewhere."
        )
    if channels % workers:
        raise ConfigError(
            f"workers={workers} does not divide the {channels} channels after {cut!r}; each worker takes an "
            f"equal group of channels. Use a divisor of {channels}, e.g. {_divisor_near(channels, workers)}."
        )


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - k))


def balanced_partition(atom_costs: Sequence[float], cut_costs: Sequence[float], blocks: int) -> list[int]:
    """Choose ``blocks - 1`` cuts that minimise the cost of the most expensive block.

    ``atom_costs[j]`` is the cost of the piece between candidate cut ``j - 1`` and ``j``
    (``len(cut_costs) + 1`` pieces). ``cut_costs[j]`` is what a block ending at candidate
    ``j`` pays on top (its prediction head). Exact O(K·M²) dynamic program over prefixes.
    Returns the indices of the chosen candidate cuts, ascending.
    """
    m = len(atom_costs)
    if len(cut_costs) != m - 1:
        raise ValueError(f"need {m - 1} cut costs for {m} pieces, got {len(cut_costs)}")
    if not 1 <= blocks <= m:
        raise ValueError(f"blocks={blocks} must be between 1 and {m}")
    prefix = [0.0]
    for c in atom_costs:
        prefix.append(prefix[-1] + c)

    def cost(i: int, j: int) -> float:  # block made of pieces i..j-1
        extra = cut_costs[j - 1] if j < m else 0.0
        return prefix[j] - prefix[i] + extra

    inf = float("inf")
    # best[k][j]: smallest possible max block cost covering pieces 0..j-1 with k blocks
    best = [[inf] * (m + 1) for _ in range(blocks + 1)]
    choice = [[0] * (m + 1) for _ in range(blocks + 1)]
    best[0][0] = 0.0
    for k in range(1, blocks + 1):
        for j in range(k, m - (blocks - k) + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], cost(i, j))
                if value < best[k][j]:
                    best[k][j], choice[k][j] = value, i
    cuts, j = [], m
    for k in range(blocks, 0, -1):
        j = choice[k][j]
        cuts.append(j)
    # cuts holds the start piece of blocks K..1; the cut before piece i is candidate i - 1
    return sorted(i - 1 for i in cuts if i > 0)
