"""torch.fx tracing with timm's no-trace registries, in train and eval mode."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx, nn
from torchvision.models.feature_extraction import NodePathTracer

from ..errors import TraceError

__all__ = ["Traced", "trace"]


def _timm_leaf_modules() -> list[type]:
    try:
        from timm.layers import DropPath, get_notrace_modules
    except ImportError:  # timm is a dependency, but keep tracing usable without it
        return []
    # DropPath branches on self.training; as a leaf it stays one node, so the train and
    # eval graphs agree and the module's own flag decides at run time, as in eager mode.
    return [*get_notrace_modules(), DropPath]


def _timm_autowrap_functions() -> list:
    try:
        from timm.layers import get_notrace_functions
    except ImportError:
        return []
    return list(get_notrace_functions())


class _Tracer(NodePathTracer):
    """torchvision's path-recording tracer that also remembers where tracing failed."""

    def __init__(self, leaf_modules: Iterable[type], autowrap_functions: Iterable):
        super().__init__(
            leaf_modules=list(dict.fromkeys(leaf_modules)),
            autowrap_functions=tuple(dict.fromkeys(autowrap_functions)),
        )
        self.failed_at: str | None = None
        self.branch_on: str | None = None  # "values" or "shapes": what a failing Python branch depended on

    def to_bool(self, obj):
        # torch.fx cannot branch on a traced value; remember whether the branch read the input's values (its
        # outcome can change from one batch to the next) or only its shape (fixed for a given input size)
        self.branch_on = "values" if _reads_values(obj.node) else "shapes"
        return super().to_bool(obj)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:  # the innermost module: call_module unwinds outwards
                self.failed_at = self.path_of_module(m)
            raise


_SHAPE_READS = {"size", "dim", "numel", "ndimension"}


def _reads_shape(n: fx.Node) -> bool:
    if n.op == "call_function" and n.target is getattr:
        return len(n.args) > 1 and n.args[1] in ("shape", "ndim")
    return n.op == "call_method" and n.target in _SHAPE_READS


def _reads_values(node: fx.Node) -> bool:
    """Whether ``node`` depends on the input's values, not only on its shape (``x.shape``, ``x.size(1)``)."""
    seen: dict[fx.Node, bool] = {}

    def visit(n: fx.Node) -> bool:
        if n not in seen:
            if n.op == "placeholder":
                seen[n] = True
            elif _reads_shape(n):
                seen[n] = False
            else:
                seen[n] = False  # provisional, for cycles (there are none in a trace)
                seen[n] = any(visit(a) for a in n.all_input_nodes)
        return seen[n]

    return visit(node)


@dataclass
class Traced:
    """A traced model: the train-mode graph, the eval-mode graph when it differs, node paths."""

    graph_module: fx.GraphModule
    qualnames: dict[str, str]  # fx node name -> module path (torchvision's node names)
    eval_graph_module: fx.GraphModule | None = None
    eval_qualnames: dict[str, str] | None = None


def _default_concrete_args(model: nn.Module) -> dict:
    """Fix every optional forward argument (masks, flags) to its default value.

    Left as placeholders they would be live across every block boundary (ViT's
    ``attn_mask``) or turn into inputs the graph cannot run without (hiera's ``mask``).
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    fixed = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is not inspect.Parameter.empty:
            fixed[p.name] = p.default
    return fixed


def _trace_once(
    model: nn.Module,
    *,
    training: bool,
    leaf_modules: list[type],
    autowrap_functions: list,
    concrete_args: dict,
) -> tuple[fx.GraphModule, dict[str, str]]:
    tracer = _Tracer(leaf_modules, autowrap_functions)
    was_training = model.training
    model.train(training)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args or None)
    except Exception as exc:
        where = tracer.failed_at
        module = model.get_submodule(where) if where else model
        place = f"inside module '{where}' ({type(module).__name__})" if where else "in its forward()"
        error = TraceError(
            f"torch.fx could not trace {type(model).__name__} ({'train' if training else 'eval'} mode): "
            f"it failed {place}: {type(exc).__name__}: {exc}. "
            f"Fix: mark that module as a leaf so it runs as one step, e.g. "
            f"lfnnify.convert(model, ..., leaf_modules=[{type(module).__name__}]) "
            f"(cuts inside a leaf are then impossible), or fix an optional forward argument "
            f"with concrete_args={{...}}."
        )
        error.module_path = where
        error.branch_on = tracer.branch_on
        raise error from exc
    finally:
        model.train(was_training)
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    qualnames = {node.name: tracer.node_to_qualname.get(node, node.name) for node in graph.nodes}
    return gm, qualnames


def _signature(gm: fx.GraphModule) -> list[tuple]:
    # arguments matter: F.dropout(x, training=self.training) differs only in a constant
    return [(n.op, str(n.target), str(n.args), str(n.kwargs)) for n in gm.graph.nodes]


_MAX_FALLBACKS = 8


def _failing_class(model: nn.Module, exc: TraceError) -> type | None:
    path = getattr(exc, "module_path", None)
    if not path:
        return None  # the model's own forward failed: no module to keep whole
    return type(model.get_submodule(path))


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[type] = (),
    concrete_args: dict | None = None,
    fallback: bool = True,
) -> Traced:
    """Trace ``model`` in train mode, check the eval graph, and restore ``model.training``.

    The model's parameters are shared with the returned graph modules, not copied.
    A warning says so when the train and eval graphs differ; both are then kept.
    With ``fallback=True``, a submodule torch.fx cannot trace is kept whole (a leaf) and
    tracing is retried, with a warning naming it; cuts then fall on module boundaries around it.
    """
    leaves = [*_timm_leaf_modules(), *leaf_modules]
    autowrap = _timm_autowrap_functions()
    args = {**_default_concrete_args(model), **(concrete_args or {})}
    fallbacks: list[str] = []
    while True:
        try:
            with torch.no_grad():
                train_gm, train_names = _trace_once(
                    model, training=True, leaf_modules=leaves, autowrap_functions=autowrap, concrete_args=args
                )
                eval_gm, eval_names = _trace_once(
                    model, training=False, leaf_modules=leaves, autowrap_functions=autowrap, concrete_args=args
                )
            break
        except TraceError as exc:
            failed = _failing_class(model, exc)
            if not fallback or failed is None or failed in leaves or len(fallbacks) >= _MAX_FALLBACKS:
                raise
            # fall back to a coarser graph: keep the module that failed whole, cut only around it
            leaves.append(failed)
            fallbacks.append(f"{failed.__name__} "
                             f"({str(exc.__cause__).splitlines()[0][:120] if exc.__cause__ else exc})")
    if fallbacks:
        warnings.warn(
            f"torch.fx could not trace inside {', '.join(fallbacks)}; lfnnify kept those modules whole "
            f"(module-boundary cuts around them). Pass leaf_modules=[...] to choose this yourself, or "
            f"fallback=False to get the error instead.",
            stacklevel=3,
        )
    if _signature(train_gm) == _signature(eval_gm):
        return Traced(train_gm, train_names)
    warnings.warn(
        f"{type(model).__name__} traces to different graphs in train and eval mode "
        f"(a self.training branch: auxiliary outputs, dropout written as a function, ...). "
        f"lfnnify keeps both and switches with .train()/.eval(); cuts must exist in both.",
        stacklevel=3,
    )
    return Traced(train_gm, train_names, eval_gm, eval_names)
