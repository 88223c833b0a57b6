"""Valid cut points of a traced graph (one live activation) and what each node costs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx
from torch.utils._pytree import tree_map_only
from torch.utils.flop_counter import FlopCounterMode

from ..errors import ConfigError

__all__ = ["CutPoint", "GraphProfile", "profile_graph", "find_cut_points", "input_dependent_nodes"]


@dataclass(frozen=True)
class CutPoint:
    """A place after which the graph can be cut: exactly one input-dependent tensor is live."""

    name: str  # the outermost module path whose output this is, e.g. "layer1"
    aliases: tuple[str, ...]  # every name that refers to this cut, outermost first
    node: str  # fx node name of the activation that crosses the cut
    index: int  # position of that node in the graph
    output_shape: tuple[int, ...]  # shape of the activation for the example input


@dataclass
class GraphProfile:
    """Per-node forward FLOPs and outputs of one run of the graph on an example input."""

    flops: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...] | None] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)  # size of each node's output: activation memory


class _Profiler(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, profile: GraphProfile):
        super().__init__(gm)
        self.profile = profile

    def fetch_args_kwargs_from_env(self, n: fx.Node):
        # Under no_grad, a view of a parameter (``latent.expand(...)``) still says requires_grad but has no
        # grad_fn, and FlopCounterMode's module tracker then fails on it; detached inputs compute the same.
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return tree_map_only(torch.Tensor, torch.Tensor.detach, (args, kwargs))

    def run_node(self, n: fx.Node):
        if n.op in ("placeholder", "output", "get_attr"):
            result = super().run_node(n)
            flops = 0
        else:
            with FlopCounterMode(display=False) as counter:
                result = super().run_node(n)
            flops = counter.get_total_flops()
        self.profile.flops[n.name] = flops
        if result is None and n.op != "output":
            n.meta[NONE_VALUE] = True  # e.g. timm's create_attention_mask(None, dtype=x.dtype): nothing to carry
        self.profile.shapes[n.name] = tuple(result.shape) if isinstance(result, torch.Tensor) else None
        computed = isinstance(result, torch.Tensor) and n.op not in ("placeholder", "get_attr", "output")
        self.profile.bytes[n.name] = result.numel() * result.element_size() if computed else 0
        return result


def profile_graph(gm: fx.GraphModule, example_input: torch.Tensor, *, given_shape=None) -> GraphProfile:
    """Run ``gm`` once in eval mode without gradients, recording each node's FLOPs and shape.

    Eval mode keeps BatchNorm running statistics untouched; ``gm.training`` is restored. ``given_shape`` is
    the shape of the batch the user gave (the profile runs on its first example), for the error message.
    """
    profile = GraphProfile()
    was_training = gm.training
    gm.eval()
    profiler = _Profiler(gm, profile)
    try:
        with torch.no_grad():
            profiler.run(example_input)
    except Exception as exc:
        node = next((n for n in gm.graph.nodes if n.name not in profile.shapes), None)
        where = f"at {node.op} {node.target!s}" if node is not None else "in the graph"
        raise ConfigError(
            f"{type(gm).__name__} could not run on an example input of shape "
            f"{tuple(given_shape or example_input.shape)} "
            f"({where}): {type(exc).__name__}: {str(exc).splitlines()[0]}. Pass example_input= with a "
            f"size the model accepts (its pretrained_cfg input size, for instance)."
        ) from exc
    finally:
        gm.train(was_training)
    return profile


NONE_VALUE = "lfnnify_none"  # node.meta key: the node returned None when the graph was profiled


def input_dependent_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on a graph input; everything else can be recomputed anywhere.

    A node that returned None when profiled (an optional mask built from ``x.dtype`` when no mask was
    given) carries no data: it is not counted, and every block that uses it gets the constant None.
    """
    dependent: set[fx.Node] = set()
    for n in graph.nodes:
        if n.meta.get(NONE_VALUE):
            continue
        if n.op == "placeholder" or any(a in dependent for a in n.all_input_nodes):
            dependent.add(n)
    return dependent


def find_cut_points(gm: fx.GraphModule, qualnames: dict[str, str], profile: GraphProfile) -> list[CutPoint]:
    """Every position where exactly one input-dependent tensor (of rank >= 2) is live.

    Values that do not depend on the input (parameters, buffers, constants, shapes of
    parameters) are ignored: the block that needs them recomputes them.
    """
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    dependent = input_dependent_nodes(gm.graph)
    last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in dependent}
    first_compute = next(
        (i for i, n in enumerate(nodes) if n in dependent and n.op not in ("placeholder",)), len(nodes)
    )
    # the last block must compute something: no cut after the last input-dependent compute node
    last_compute = max(
        (i for i, n in enumerate(nodes) if n in dependent and n.op not in ("placeholder", "output")), default=-1
    )

    # a module path names the cut after the last node that belongs to it
    last_node_of: dict[str, int] = {}
    for i, n in enumerate(nodes):
        if n.op in ("placeholder", "output", "get_attr") or n not in dependent:
            continue
        parts = qualnames.get(n.name, n.name).split(".")
        for depth in range(1, len(parts) + 1):
            last_node_of[".".join(parts[:depth])] = i
    names_at: dict[int, list[str]] = {}
    for path, i in last_node_of.items():
        names_at.setdefault(i, []).append(path)

    cuts: list[CutPoint] = []
    live: set[fx.Node] = set()
    for i, n in enumerate(nodes):
        if n in dependent:
            live.add(n)
        live = {m for m in live if last_use[m] > i}
        if i < first_compute or i >= last_compute:
            continue
        if len(live) != 1 or n not in live:
            continue
        shape = profile.shapes.get(n.name)
        if shape is None or len(shape) < 2:
            continue
        # name cuts by module paths only: a cut inside a module's forward (between a residual
        # add and its activation, say) is valid but is not a place anyone means to cut
        names = sorted((p for p in names_at.get(i, []) if _is_submodule(gm, p)), key=lambda p: (p.count("."), p))
        if names:
            cuts.append(CutPoint(names[0], tuple(names), n.name, i, shape))
    return cuts


def _is_submodule(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
    except AttributeError:
        return False
    return True
