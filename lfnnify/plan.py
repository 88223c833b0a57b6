"""Where to cut a model into K blocks, what each block costs, and how balanced it is."""

from __future__ import annotations

import copy
import difflib
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .cuts import CutPoint, GraphProfile, find_cut_points, profile_graph
from .errors import CutError, TraceError
from .fallback import sequential_children
from .heads import Pool, build_head, head_param_count
from .partition import balanced_partition, split_graph
from .trace import Traced, trace

__all__ = ["Plan", "BlockInfo", "plan"]

BALANCES = ("flops", "time", "params", "memory")


@dataclass
class BlockInfo:
    """One block of a plan. FLOPs are forward FLOPs for one example (batch 1)."""

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
        lines.append(
            f"{len(self.blocks)} blocks, balanced by {self.balance}; {self.workers} worker(s) per head, "
            f"{self.num_classes} classes"
        )
        w = max(14, *(len(b.start) + 2 for b in self.blocks), *(len(b.end) + 2 for b in self.blocks))
        header = (
            f"{'block':<6}{'from':<{w}}{'to (cut after)':<{w}}{'params':>12}{'head params':>13}"
            f"{'GFLOPs':>9}{'share':>7}  output"
        )
        lines += [header, "-" * len(header)]
        for b in self.blocks:
            lines.append(
                f"{b.index:<6}{b.start:<{w}}{b.end:<{w}}{b.params:>12,}{b.head_params:>13,}"
                f"{b.flops / 1e9:>9.3f}{100 * b.flops / total:>6.1f}%  {b.output_shape}"
            )
        lines.append(
            f"heads add {self.total_head_params:,} parameters; largest block / mean = {self.imbalance:.3f} "
            f"({self.balance})"
        )
        return "\n".join(lines)


# ---------------------------------------------------------------- model facts


def find_classifier(model: nn.Module) -> nn.Linear | None:
    """The model's final Linear classifier: timm's ``get_classifier()``, or torchvision's
    ``fc``/``classifier``/``head``/``heads`` (the last Linear inside a container)."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            layer = get()
        except Exception:  # some timm models raise for unusual heads; fall back to attributes
            layer = None
        if isinstance(layer, nn.Linear):
            return layer
    for name in ("fc", "classifier", "head", "heads", "last_linear"):
        layer = getattr(model, name, None)
        if isinstance(layer, nn.Linear):
            return layer
        if isinstance(layer, nn.Module):
            linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
            if linears:
                return linears[-1]
    return None


def resolve_num_classes(model: nn.Module, num_classes: int | None) -> int:
    """The number of classes the heads predict: ``num_classes=`` or the model's classifier."""
    if num_classes is not None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r} must be a positive int")
        return num_classes
    found = getattr(model, "num_classes", None)
    if isinstance(found, int) and found > 0:
        return found
    classifier = find_classifier(model)
    if classifier is not None:
        return classifier.out_features
    raise ValueError(
        f"{type(model).__name__} has no classifier lfnnify can find (num_classes="
        f"{getattr(model, 'num_classes', None)!r}, no fc/classifier/head Linear), so the heads "
        f"don't know how many classes to predict. Pass num_classes=N."
    )


def _input_channels(model: nn.Module, default: int) -> int:
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return m.in_channels
    return default


def example_input_for(model: nn.Module, example_input: torch.Tensor | None = None) -> torch.Tensor:
    """``example_input=``, or a batch-1 input of timm's ``pretrained_cfg`` size (224 otherwise)."""
    if example_input is not None:
        if not isinstance(example_input, torch.Tensor):
            raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
        return example_input
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and all(isinstance(v, int) for v in img_size):
        h, w = img_size
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else "cpu"
    return torch.randn(1, _input_channels(model, c), h, w, dtype=dtype, device=device)


def head_layout(model: nn.Module, shape: Sequence[int]) -> tuple[str, bool, int]:
    """How a head pools an activation of ``shape``: (layout, use class token, prefix tokens)."""
    if len(shape) == 4:
        return ("nhwc" if str(getattr(model, "output_fmt", "")).upper() == "NHWC" else "nchw"), False, 0
    if len(shape) == 3:
        prefix = getattr(model, "num_prefix_tokens", None)
        has_cls = getattr(model, "cls_token", None) is not None or getattr(model, "class_token", None) is not None
        if prefix is None:
            prefix = 1 if has_cls else 0
        token = has_cls and getattr(model, "global_pool", "token") in ("token", None)
        return "nlc", bool(token), int(prefix)
    return "nc", False, 0


def channels_of(layout: str, shape: Sequence[int]) -> int:
    return shape[1] if layout in ("nchw", "nc") else shape[-1]


# ---------------------------------------------------------------- costs


def _node_params(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> int:
    seen: set[int] = set()
    total = 0
    for n in nodes:
        if n.op == "call_module":
            tensors = list(gm.get_submodule(n.target).parameters())
        elif n.op == "get_attr":
            value = _get_path(gm, n.target)
            tensors = [value] if isinstance(value, nn.Parameter) else []
        else:
            continue
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
    return total


def _get_path(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _time_fwd_bwd(fn, x: torch.Tensor, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats + 1):
        inp = x.detach().requires_grad_(x.is_floating_point())
        start = time.perf_counter()
        out = fn(inp)
        out = out if isinstance(out, torch.Tensor) else out[0]
        out.float().sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _measured_atom_times(gm: fx.GraphModule, cut_points: list[CutPoint], x: torch.Tensor, heads: list) -> tuple:
    """Forward+backward seconds of each piece between candidate cuts, and of each head.

    Runs in train mode on a copy (BatchNorm statistics of the model stay untouched), with a
    batch of two so that train-mode normalisation of 1×1 maps works.
    """
    gm = copy.deepcopy(gm).train()
    if x.shape[0] < 2:
        x = torch.cat([x, x])
    atoms = split_graph(gm, [c.node for c in cut_points], class_name="Piece")
    atom_times, head_times = [], []
    h = x
    for j, atom in enumerate(atoms):
        atom_times.append(_time_fwd_bwd(atom, h))
        with torch.no_grad():
            h = atom(h)
        if j < len(heads):
            head_times.append(_time_fwd_bwd(heads[j], h))
    return atom_times, head_times


# ---------------------------------------------------------------- the plan


def validate_knobs(*, blocks, cuts, workers, leaders, balance) -> None:
    if blocks is not None and cuts is not None:
        raise ValueError(f"give blocks= or cuts=, not both (got blocks={blocks!r}, cuts={list(cuts)!r})")
    if blocks is not None and (not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1):
        raise ValueError(f"blocks={blocks!r} must be an int >= 1 (the paper uses 4)")
    if cuts is not None and (isinstance(cuts, str) or not all(isinstance(c, str) for c in cuts)):
        raise TypeError(f"cuts={cuts!r} must be a list of cut names, e.g. cuts=['layer1', 'layer2']")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers={workers!r} must be an int >= 1 (1 = block-wise workers)")
    if isinstance(leaders, bool) or not isinstance(leaders, (int, float)) or not 0 < leaders <= 1:
        raise ValueError(
            f"leaders={leaders!r} must be a fraction in (0, 1]: the share of workers that lead "
            f"(the paper's default is 0.7; 1.0 makes every worker a leader)"
        )
    if balance not in BALANCES:
        raise ValueError(f"balance={balance!r} must be one of {BALANCES}")


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


@dataclass
class _Analysis:
    traced: Traced
    profile: GraphProfile
    cut_points: list[CutPoint]
    example_input: torch.Tensor
    example_batch: torch.Tensor  # the whole example batch: balance="time" measures at this size


def analyse(
    model: nn.Module, *, example_input=None, leaf_modules=(), concrete_args=None, fallback=True
) -> _Analysis:
    """Trace, profile once on an example input, and find the valid cut points."""
    try:
        traced = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args, fallback=fallback)
        batch = example_input_for(model, example_input)
    except TraceError as exc:
        if not fallback or getattr(exc, "module_path", None):
            raise
        # the model's own forward() failed: cut between its children if they run in sequence
        batch = example_input_for(model, example_input)
        children = sequential_children(model, batch[:1], exc)
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__}.forward() "
            f"({str(exc.__cause__ or exc).splitlines()[0][:120]}); its top-level children run one after another "
            f"give the same outputs, so lfnnify traced those instead (cuts between and inside them). "
            f"Pass fallback=False to get the error instead.",
            stacklevel=3,
        )
        traced = trace(children, leaf_modules=leaf_modules, fallback=fallback)
    x = batch[:1]  # FLOPs and shapes per sample
    profile = profile_graph(traced.graph_module, x)
    cut_points = find_cut_points(traced.graph_module, traced.qualnames, profile)
    if traced.eval_graph_module is not None:  # a cut must exist in both graphs
        eval_profile = profile_graph(traced.eval_graph_module, x)
        in_eval = {c.name for c in find_cut_points(traced.eval_graph_module, traced.eval_qualnames, eval_profile)}
        cut_points = [c for c in cut_points if c.name in in_eval]
    return _Analysis(traced, profile, cut_points, x, batch)


def make_plan(
    model: nn.Module,
    analysis: _Analysis,
    *,
    blocks: int | None,
    cuts: Sequence[str] | None,
    workers: int,
    num_classes: int | None,
    head,
    balance: str,
) -> Plan:
    name = getattr(model, "default_cfg", {}).get("architecture") if hasattr(model, "default_cfg") else None
    name = name or type(model).__name__
    cut_points = analysis.cut_points
    result = Plan(name, cut_points, balance=balance, workers=workers, input_shape=tuple(analysis.example_input.shape))
    if blocks is None and cuts is None:
        return result
    result.num_classes = resolve_num_classes(model, num_classes)
    gm = analysis.traced.graph_module
    nodes = list(gm.graph.nodes)
    if cuts is not None:
        chosen = _resolve_cut_names(cuts, cut_points, name)
    else:
        if blocks - 1 > len(cut_points):
            raise CutError(
                f"blocks={blocks} but {name} has {len(cut_points)} places where it can be cut, so at most "
                f"{len(cut_points) + 1} blocks; lfnnify.plan(model) lists them"
            )
        chosen = None

    if chosen is None:
        cut_points = _collapse_free_cuts(cut_points, nodes, analysis.profile)
        if blocks - 1 > len(cut_points):
            raise CutError(
                f"blocks={blocks} but {name} has only {len(cut_points)} cut points with compute between them "
                f"(of {len(analysis.cut_points)} valid ones), so at most {len(cut_points) + 1} blocks; pick "
                f"explicit cuts=[...] from lfnnify.plan(model)"
            )
    # per candidate: head cost; per piece between candidates: trunk cost
    layouts = [head_layout(model, c.output_shape) for c in cut_points]
    channels = [channels_of(layout[0], c.output_shape) for layout, c in zip(layouts, cut_points)]

    def head_cost_flops(j: int) -> float:
        return 2.0 * channels[j] * result.num_classes

    bounds = [-1] + [c.index for c in cut_points] + [len(nodes) - 1]
    pieces = [nodes[a + 1 : b + 1] for a, b in zip(bounds, bounds[1:])]
    piece_flops = [sum(analysis.profile.flops.get(n.name, 0) for n in p) for p in pieces]
    if chosen is None:
        if balance == "flops":
            atom_costs, cut_costs = piece_flops, [head_cost_flops(j) for j in range(len(cut_points))]
        elif balance == "memory":  # activations a block keeps for its backward: bounds the one-device peak
            atom_costs = [sum(analysis.profile.bytes.get(n.name, 0) for n in p) for p in pieces]
            cut_costs = [0.0] * len(cut_points)
        elif balance == "params":
            atom_costs = [_node_params(gm, p) for p in pieces]
            cut_costs = [head_param_count(channels[j], result.num_classes, 1) for j in range(len(cut_points))]
        else:
            heads = [
                build_head(
                    head,
                    channels=channels[j],
                    num_classes=result.num_classes,
                    workers=1,
                    pool=Pool(layouts[j][0], token=layouts[j][1], prefix_tokens=layouts[j][2]),
                )
                for j in range(len(cut_points))
            ]
            atom_costs, cut_costs = _measured_atom_times(gm, cut_points, analysis.example_batch, heads)
        picked = balanced_partition(atom_costs, cut_costs, blocks)
        chosen = [cut_points[j] for j in picked]
    else:
        atom_costs = cut_costs = None

    position = {c.index: j for j, c in enumerate(cut_points)}
    edges = [-1] + [c.index for c in chosen] + [len(nodes) - 1]
    infos = []
    for k, (a, b) in enumerate(zip(edges, edges[1:])):
        block_nodes = nodes[a + 1 : b + 1]
        last = k == len(edges) - 2
        flops = sum(analysis.profile.flops.get(n.name, 0) for n in block_nodes)
        if last:
            out_shape = analysis.profile.shapes.get(_output_source(nodes[-1])) or ()
            layout, h_params, h_flops = "", 0, 0
        else:
            j = position[b]
            out_shape = cut_points[j].output_shape
            layout = layouts[j][0]
            _check_workers(workers, channels[j], cut_points[j].name)
            h_params = head_param_count(channels[j], result.num_classes, workers)
            h_flops = int(head_cost_flops(j))
        if atom_costs is not None:
            lo = 0 if a < 0 else position[a] + 1
            hi = len(cut_points) if last else position[b]
            cost = sum(atom_costs[lo : hi + 1]) + (0 if last else cut_costs[position[b]])
        else:
            cost = flops + h_flops
        infos.append(
            BlockInfo(
                index=k,
                start="input" if a < 0 else cut_points[position[a]].name,
                end="output" if last else cut_points[position[b]].name,
                flops=int(flops),
                params=_node_params(gm, block_nodes),
                output_shape=tuple(out_shape),
                head_params=h_params,
                head_flops=h_flops,
                layout=layout,
                cost=float(cost),
            )
        )
    result.cuts = [c.name for c in chosen]
    result.blocks = infos
    return result


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
        raise ValueError(
            f"workers={workers} but the activation after {cut!r} has only {channels} channels; a filter-wise "
            f"worker needs at least one channel. Use workers <= {channels}, or cut elsewhere."
        )
    if channels % workers:
        raise ValueError(
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
    balance: str = "flops",
    example_input: torch.Tensor | None = None,
    leaf_modules: Sequence[type] = (),
    concrete_args: dict | None = None,
    fallback: bool = True,
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
        head: ``"linear"`` or a callable ``head(channels, num_classes, workers)``.
        balance: ``"flops"`` (forward FLOPs, the default), ``"time"`` (measured forward+backward
            seconds, at ``example_input``'s batch size: pass a training-sized batch), ``"params"``, or
            ``"memory"`` (the activations a block produces, which bound the one-device trainer's peak
            memory). Each block's head is part of its cost (except for memory).
        example_input: an input batch used to profile (FLOPs are per sample); by default one sample of
            timm's ``pretrained_cfg`` size.
        leaf_modules: module classes to keep whole when tracing (cuts inside them are impossible).
        concrete_args: values for optional forward arguments (all default ones are fixed anyway).
        fallback: keep a submodule torch.fx cannot trace whole and retry (with a warning), instead of
            raising :class:`~lfnnify.TraceError`.

    Returns:
        A :class:`Plan`; ``str(plan)`` is a table.

    Raises:
        ValueError: bad knobs; :class:`~lfnnify.CutError` for impossible cuts;
        :class:`~lfnnify.TraceError` when torch.fx can't trace the model.
    """
    validate_knobs(blocks=blocks, cuts=cuts, workers=workers, leaders=1.0, balance=balance)
    analysis = analyse(model, example_input=example_input, leaf_modules=leaf_modules, concrete_args=concrete_args,
                       fallback=fallback)
    return make_plan(
        model,
        analysis,
        blocks=blocks,
        cuts=cuts,
        workers=workers,
        num_classes=num_classes,
        head=head,
        balance=balance,
    )
