"""Where to cut a model into K blocks, what each block costs, and how balanced it is."""

from __future__ import annotations

import difflib
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ._knobs import validate_knobs
from .analysis import Analysis, analyse, measured_piece_times, node_params
from .cuts import CutPoint, GraphProfile
from .errors import ConfigError, CutError
from .facts import resolve_num_classes
from .headplan import build_site_head, head_cost, head_site
from .partition import balanced_partition

__all__ = ["Plan", "BlockInfo", "plan", "make_plan", "validate_knobs", "staged_cut_points"]

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
class Plan:
    """The valid cut points of a model and, when blocks or cuts were asked for, the chosen split.

    ``str(plan)`` is a table. ``plan.blocks`` lists :class:`BlockInfo`; ``plan.cuts`` the cut names.
    """

    model_name: str
    cut_points: list[CutPoint]
    cuts: list[str] = field(default_factory=list)
    blocks: list[BlockInfo] = field(default_factory=list)
    balance: str = "flops"
    num_classes: int | None = None
    workers: int = 1
    input_shape: tuple[int, ...] = ()
    mode: str = "local"
    model_params: int = 0
    weight_stashing: bool = False
    traffic: object = None  # a lfnnify.traffic.Traffic when plan() was given batch_size= or link=

    @property
    def imbalance(self) -> float:
        """Cost of the most expensive block divided by the mean block cost (1.0 is perfect)."""
        costs = [b.cost for b in self.blocks]
        return max(costs) / statistics.fmean(costs) if costs and statistics.fmean(costs) > 0 else 1.0

    @property
    def total_head_params(self) -> int:
        return sum(b.head_params for b in self.blocks)

    def __str__(self) -> str:
        lines = [f"{self.model_name}: {len(self.cut_points)} valid cut points (input {tuple(self.input_shape)})"]
        if not self.blocks:
            lines.append(f"{'cut after':<28} {'output shape':<22} {'aliases'}")
            for c in self.cut_points:
                lines.append(f"{c.name:<28} {str(c.output_shape):<22} {', '.join(c.aliases[1:])}")
            lines.append("Pick some with cuts=[...], or let blocks=K choose a balanced split.")
            return "\n".join(lines)
        total = sum(b.flops for b in self.blocks) or 1
        kinds = sorted({b.head.split(" ")[0] for b in self.blocks if b.head})
        lines.append(
            f"{len(self.blocks)} blocks, balanced by {self.balance}; {'/'.join(kinds) or 'no'} heads, "
            f"{self.workers} worker(s) per head, {self.num_classes} classes; mode={self.mode!r}"
        )
        w = max(14, *(len(b.start) + 2 for b in self.blocks), *(len(b.end) + 2 for b in self.blocks))
        header = (
            f"{'block':<6}{'from':<{w}}{'to (cut after)':<{w}}{'params':>12}{'head params':>13}"
            f"{'GFLOPs':>9}{'share':>7}{'head GFLOPs':>13}  output"
        )
        lines += [header, "-" * len(header)]
        for b in self.blocks:
            lines.append(
                f"{b.index:<6}{b.start:<{w}}{b.end:<{w}}{b.params:>12,}{b.head_params:>13,}"
                f"{b.flops / 1e9:>9.3f}{100 * b.flops / total:>6.1f}%{b.head_flops / 1e9:>13.4f}  {b.output_shape}"
            )
        share = (f" ({100 * self.total_head_params / self.model_params:.2f}% of the model's)"
                 if self.model_params else "")
        lines.append(
            f"heads add {self.total_head_params:,} parameters{share}; largest block / mean = {self.imbalance:.3f} "
            f"({self.balance})"
        )
        kept = ", ".join(f"block {b.index}: {b.stored_inputs}" for b in self.blocks)
        if self.mode == "replay" and self.weight_stashing:
            lines.append(
                f"replay with weight stashing keeps the first pass's graph of each pending batch and the weights it "
                f"used ({kept}): {_size(sum(b.stashed_weight_bytes for b in self.blocks))} of weight copies, plus "
                f"those batches' activations"
            )
        elif self.mode == "replay":
            lines.append(
                f"replay keeps earlier batches' inputs for the delayed backward ({kept}); "
                f"{_size(sum(b.stored_bytes for b in self.blocks))} per example of the batch in all"
            )
        if self.traffic is not None:
            lines += self.traffic.lines()
        return "\n".join(lines)


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


def make_plan(
    model: nn.Module,
    analysis: Analysis,
    *,
    blocks: int | None,
    cuts: Sequence[str] | None,
    workers: int,
    num_classes: int | None,
    head,
    balance: str,
    mode: str = "local",
    weight_stashing: bool = False,
) -> Plan:
    """Choose the cuts (``blocks=K`` balanced, or explicit ``cuts=``) and cost every block and head."""
    name = getattr(model, "default_cfg", {}).get("architecture") if hasattr(model, "default_cfg") else None
    name = name or type(model).__name__
    cut_points = analysis.cut_points
    result = Plan(name, cut_points, balance=balance, workers=workers, input_shape=tuple(analysis.example_input.shape),
                  mode=mode, model_params=sum(p.numel() for p in model.parameters()),
                  weight_stashing=weight_stashing and mode == "replay")
    if blocks is None and cuts is None:
        return result
    result.num_classes = resolve_num_classes(model, num_classes)
    gm = analysis.traced.graph_module
    nodes = list(gm.graph.nodes)
    staged = staged_cut_points(analysis)
    if cuts is not None:
        chosen = _resolve_cut_names(cuts, cut_points, name)
        candidates = cut_points
    else:
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
        chosen, candidates = None, staged
    end_of_graph = len(nodes) - 1
    sites = [head_site(model, c, staged, end_of_graph, analysis=analysis, head=head) for c in candidates]

    bounds = [-1] + [c.index for c in candidates] + [end_of_graph]
    pieces = [nodes[a + 1 : b + 1] for a, b in zip(bounds, bounds[1:])]
    if chosen is None:
        if balance == "flops":
            atom_costs = [sum(analysis.profile.flops.get(n.name, 0) for n in p) for p in pieces]
            cut_costs = [_candidate_cost(head, s, analysis, result.num_classes, 1) for s in sites]
        elif balance == "memory":  # activations a block keeps for its backward: bounds the one-device peak
            atom_costs = [sum(analysis.profile.bytes.get(n.name, 0) for n in p) for p in pieces]
            cut_costs = [0.0 if _candidate_cost(head, s, analysis, result.num_classes, 1) < INF else INF
                         for s in sites]
        elif balance == "params":
            atom_costs = [node_params(gm, p) for p in pieces]
            cut_costs = [_candidate_cost(head, s, analysis, result.num_classes, 1, part=0) for s in sites]
        else:
            heads = [_candidate_head(head, s, analysis, result.num_classes) for s in sites]
            atom_costs, cut_costs = measured_piece_times(gm, candidates, analysis.example_batch, heads)
        chosen = [candidates[j] for j in balanced_partition(atom_costs, cut_costs, blocks)]
    else:
        atom_costs = cut_costs = None

    position = {c.index: j for j, c in enumerate(candidates)}
    edges = [-1] + [c.index for c in chosen] + [end_of_graph]
    input_bytes = analysis.example_input.numel() * analysis.example_input.element_size()
    element = next((q.element_size() for q in model.parameters()), 4)
    infos = []
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
            h_params, h_flops, h_name = head_cost(head, site, analysis, result.num_classes, workers)
        if atom_costs is not None:
            lo = 0 if a < 0 else position[a] + 1
            hi = len(candidates) if last else position[b]
            cost = sum(atom_costs[lo : hi + 1]) + (0 if last else cut_costs[position[b]])
        else:
            cost = flops + h_flops
        kept = len(edges) - 2 - k if mode == "replay" else 0
        in_bytes = input_bytes if a < 0 else analysis.profile.bytes.get(nodes[a].name, 0)
        params = node_params(gm, block_nodes)
        infos.append(
            BlockInfo(
                index=k,
                start="input" if a < 0 else candidates[position[a]].name,
                end="output" if last else candidates[position[b]].name,
                flops=int(flops),
                params=params,
                output_shape=tuple(out_shape),
                head_params=int(h_params),
                head_flops=int(h_flops),
                layout=layout,
                cost=float(cost),
                head=h_name,
                stored_inputs=kept,
                stored_bytes=kept * int(in_bytes),
                stashed_weight_bytes=kept * params * element if result.weight_stashing else 0,
            )
        )
    result.cuts = [c.name for c in chosen]
    result.blocks = infos
    return result


INF = float("inf")


def _candidate_cost(head, site, analysis: Analysis, num_classes: int, workers: int, part: int = 1) -> float:
    """A head's FLOPs (``part=1``) or parameters (``part=0``) at a candidate cut; infinite where a custom head
    cannot take that block's output (such a cut is never chosen)."""
    try:
        return float(head_cost(head, site, analysis, num_classes, workers)[part])
    except ConfigError:
        return INF


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


def plan(
    model: nn.Module,
    *,
    blocks: int | None = None,
    cuts: Sequence[str] | None = None,
    workers: int = 1,
    num_classes: int | None = None,
    head="linear",
    mode: str = "local",
    balance: str = "flops",
    example_input: torch.Tensor | None = None,
    leaf_modules: Sequence[type] = (),
    concrete_args: dict | None = None,
    fallback: bool | str = True,
    batch_size: int | None = None,
    send_dtype: torch.dtype | None = None,
    link: str | None = None,
) -> Plan:
    """List where ``model`` can be cut and, with ``blocks=`` or ``cuts=``, where it will be.

    The model is not modified (its ``training`` flag is restored after tracing).

    Example:
        >>> print(lfnnify.plan(timm.create_model("resnet101"), blocks=4))

    Args:
        model: any module torch.fx can trace (with timm's leaf modules).
        blocks: choose ``blocks - 1`` cuts minimising the most expensive block's cost.
        cuts: explicit cut names (see the listing of ``plan(model)``).
        workers: filter-wise workers per head (1 = block-wise).
        num_classes: classes the heads predict; read from the model's classifier by default.
        head: ``"linear"``, ``"lookahead"``, ``"lookahead-layer"`` or a callable
            ``head(channels, num_classes, workers)``; its parameters and FLOPs are reported per block.
        mode: the training mode (``"local"``, ``"lfnn"``, ``"replay"``); for ``"replay"`` the plan says how
            many earlier inputs each block keeps and what they cost.
        balance: ``"flops"`` (forward FLOPs, the default), ``"time"`` (measured forward+backward
            seconds, at ``example_input``'s batch size: pass a training-sized batch), ``"params"``, or
            ``"memory"`` (the activations a block produces, which bound the one-device trainer's peak
            memory). Each block's head is part of its cost (except for memory).
        example_input: an input batch used to profile (FLOPs are per sample); by default one sample of
            timm's ``pretrained_cfg`` size.
        leaf_modules: module classes to keep whole when tracing (cuts inside them are impossible).
        concrete_args: values for optional forward arguments (all default ones are fixed anyway).
        fallback: as for :func:`lfnnify.convert` (module boundaries where torch.fx fails; ``"children"``
            also accepts a ``forward()`` that branches on its input's values).
        batch_size, send_dtype, link: with a split, also say what each cut sends per step at this training batch
            (in ``send_dtype``, float32 by default; twice in replay mode, the gradient coming back), what
            data-parallel backprop on as many devices sends, and, at ``link`` (``"1gbit"``), how long each takes
            (``plan.traffic``; :mod:`lfnnify.traffic`). ``link`` alone assumes ``example_input``'s batch size.

    Returns:
        A :class:`Plan`; ``str(plan)`` is a table.

    Raises:
        lfnnify.ConfigError: bad knobs; :class:`~lfnnify.CutError` for impossible cuts;
        :class:`~lfnnify.TraceError` when torch.fx can't trace the model.
    """
    if not isinstance(model, nn.Module):
        hint = f" For a timm name, pass timm.create_model({model!r})." if isinstance(model, str) else ""
        raise ConfigError(f"plan() takes a torch.nn.Module, got {type(model).__name__} {model!r:.60}.{hint}")
    validate_knobs(blocks=blocks, cuts=cuts, workers=workers, leaders=1.0, balance=balance, head=head)
    analysis = analyse(model, example_input=example_input, leaf_modules=leaf_modules, concrete_args=concrete_args,
                       fallback=fallback)
    result = make_plan(model, analysis, blocks=blocks, cuts=cuts, workers=workers, num_classes=num_classes,
                       head=head, balance=balance, mode=mode)
    if (batch_size is not None or link is not None) and result.blocks:
        from .traffic import traffic

        batch = batch_size if batch_size is not None else int(analysis.example_input.shape[0])
        result.traffic = traffic(result, batch_size=batch, send_dtype=send_dtype, link=link)
    return result


def _size(n: int) -> str:
    """Bytes as people read them: 3.1 KiB, 1.50 MiB."""
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
