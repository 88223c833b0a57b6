"""Building the blocks of a chosen split: one GraphModule per block (a train and an eval graph where they differ).

Where the cuts go is decided in :mod:`splitting`; the cut points themselves are found in :mod:`cuts`."""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx, nn

from .cuts import NONE_VALUE, input_dependent_nodes

__all__ = ["node_params", "split_graph", "subgraph", "DualGraphModule", "dual_block",
           "attr_at"]

_MISSING = object()


def attr_at(module: nn.Module, path: str, default=_MISSING):
    """The attribute at dotted ``path`` under ``module`` (``"layer1.0.conv1.weight"``); ``default`` if absent."""
    value = module
    for part in path.split("."):
        value = getattr(value, part, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise AttributeError(f"{type(module).__name__} has no attribute {path!r}")
            return default
    return value


def node_params(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> int:
    """Parameters used by ``nodes`` (each counted once)."""
    seen: set[int] = set()
    total = 0
    for n in nodes:
        if n.op == "call_module":
            tensors = list(gm.get_submodule(n.target).parameters())
        elif n.op == "get_attr":
            value = attr_at(gm, n.target)
            tensors = [value] if isinstance(value, nn.Parameter) else []
        else:
            continue
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
    return total


def _copy_attr(source: nn.Module, target: nn.Module, path: str) -> None:
    """Make ``target.<path>`` refer to the same object as ``source.<path>`` (no copy)."""
    parent, _, leaf = path.rpartition(".")
    src = attr_at(source, parent) if parent else source
    dst = target
    for part in parent.split(".") if parent else ():
        if not hasattr(dst, part):
            dst.add_module(part, nn.Module())
        dst = getattr(dst, part)
    value = getattr(src, leaf)
    if isinstance(value, nn.Module):
        dst.add_module(leaf, value)
    elif isinstance(value, nn.Parameter):
        dst.register_parameter(leaf, value)
    elif leaf in getattr(src, "_buffers", {}):
        dst.register_buffer(leaf, value, persistent=leaf not in src._non_persistent_buffers_set)
    else:
        setattr(dst, leaf, value)


def split_graph(gm: fx.GraphModule, cut_nodes: Sequence[str], *, class_name: str = "Block") -> list[fx.GraphModule]:
    """Split ``gm`` after each node in ``cut_nodes`` into ``len(cut_nodes) + 1`` graphs.

    Block k > 0 takes the activation of cut k - 1 as its only input. Values that don't
    depend on the input are recomputed in every block that uses them. Parameters and
    submodules are shared with ``gm`` and keep their qualified names.
    """
    nodes = list(gm.graph.nodes)
    position = {n.name: i for i, n in enumerate(nodes)}
    bounds = [position[c] for c in cut_nodes]
    dependent = input_dependent_nodes(gm.graph)
    ranges = list(zip([-1, *bounds], [*bounds, len(nodes) - 1]))

    graphs = []
    for k, (start, end) in enumerate(ranges):
        members = [n for n in nodes[start + 1 : end + 1] if n.op == "output" or n in dependent]
        output = None if k == len(ranges) - 1 else nodes[end]
        graphs.append(subgraph(gm, nodes[start] if k > 0 else None, members, output, f"{class_name}{k}",
                               dependent=dependent))
    return graphs


def subgraph(gm: fx.GraphModule, incoming: fx.Node | None, members: Sequence[fx.Node], output: fx.Node | None,
             class_name: str, *, dependent: set[fx.Node] | None = None) -> fx.GraphModule:
    """A GraphModule that runs ``members`` (nodes of ``gm``, in order) on one input that stands for
    ``incoming`` (or on ``gm``'s own input when None) and returns ``output`` (or what ``gm``'s output node
    returns, when ``members`` holds it). Input-independent values are recomputed; parameters are shared."""
    dependent = dependent if dependent is not None else input_dependent_nodes(gm.graph)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if incoming is not None:
        env[incoming] = graph.placeholder("x")
        if any(_mutates_input(u, incoming, gm) for u in incoming.users):
            # an in-place op (ReLU(inplace=True)) would overwrite the previous block's output,
            # which that block's head saved for backward: work on a copy instead
            env[incoming] = graph.call_method("clone", (env[incoming],))

    def fetch(n: fx.Node) -> fx.Node | None:
        if n.meta.get(NONE_VALUE):
            return None  # it returned None when profiled: pass the constant, compute nothing
        if n not in env:
            if n in dependent:
                raise RuntimeError(f"{class_name} needs {n.name}, which crosses a cut: not a valid cut")
            env[n] = graph.node_copy(n, fetch)  # recompute an input-independent value here
        return env[n]

    for n in members:
        if n.op == "output":
            graph.node_copy(n, fetch)
        else:
            env[n] = graph.node_copy(n, fetch)
    if output is not None:
        graph.output(env[output])
    graph.lint()
    block = fx.GraphModule(nn.Module(), fx.Graph(), class_name)
    _attach(gm, block, graph)
    return block


def _mutates_input(node: fx.Node, value: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` may write into ``value`` in place."""
    if not node.args or node.args[0] is not value:
        return False
    if node.kwargs.get("inplace"):
        return True
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    name = getattr(node.target, "__name__", str(node.target))
    return node.op in ("call_method", "call_function") and name.endswith("_") and not name.endswith("__")


def _attach(root: nn.Module, block: fx.GraphModule, graph: fx.Graph) -> None:
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr") and attr_at(block, n.target, None) is None:
            _copy_attr(root, block, n.target)
    block.graph = graph  # the setter recompiles forward()


class DualGraphModule(fx.GraphModule):
    """A block with one graph for training and another for evaluation, picked by ``.train()``.

    Used only when a model's train- and eval-mode traces differ (auxiliary outputs,
    functional dropout). Both graphs share the same parameters. The graphs live in
    ``meta`` so that ``copy.deepcopy`` (which re-runs ``__init__``) keeps them.
    """

    def train(self, mode: bool = True):
        graphs = self.meta.get("lfnnify_graphs")
        if graphs is not None and self.graph is not graphs[mode]:
            self.graph = graphs[mode]
        return super().train(mode)


def dual_block(train_block: fx.GraphModule, eval_block: fx.GraphModule, class_name: str) -> DualGraphModule:
    """Merge two blocks cut at the same place into one module that switches graph with the mode."""
    block = DualGraphModule(nn.Module(), fx.Graph(), class_name)
    _attach(train_block, block, train_block.graph)
    _attach(eval_block, block, eval_block.graph)
    block.meta["lfnnify_graphs"] = {True: train_block.graph, False: eval_block.graph}
    block.graph = train_block.graph
    return block
