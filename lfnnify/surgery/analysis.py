"""Analysing a model once: trace it (falling back to module boundaries), profile it, find its cut points."""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..errors import ConfigError, TraceError
from .blocks import split_graph
from .cuts import CutPoint, GraphProfile, find_cut_points, profile_graph
from .facts import example_input_for
from .fallback import sequential_children
from .trace import Traced, trace

__all__ = ["Analysis", "analyse", "measured_piece_times", "FALLBACKS"]

FALLBACKS = (True, False, "children")


@dataclass
class Analysis:
    """What one trace and one profiling run of a model tell: its graph, costs and valid cut points."""

    traced: Traced
    profile: GraphProfile
    cut_points: list[CutPoint]
    example_input: torch.Tensor  # one example: FLOPs and shapes are per example
    example_batch: torch.Tensor  # the whole example batch: balance="time" measures at this size


def analyse(
    model: nn.Module, *, example_input=None, leaf_modules=(), concrete_args=None, fallback=True
) -> Analysis:
    """Trace ``model``, profile it once on an example input, and find the valid cut points."""
    if fallback not in FALLBACKS:
        raise ConfigError(
            f"fallback={fallback!r} must be True (fall back to module boundaries when that is exact), False (raise), "
            f"or 'children' (also accept running the top-level children of a forward() that branches on its "
            f"input's values)"
        )
    batch = example_input_for(model, example_input)
    try:
        traced = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args, fallback=bool(fallback))
    except TraceError as exc:
        if not fallback or getattr(exc, "module_path", None):
            raise
        # the model's own forward() failed: cut between its children if they run in sequence
        children = sequential_children(model, batch[:1], exc)
        name, reason = type(model).__name__, str(exc.__cause__ or exc).splitlines()[0][:120]
        if getattr(exc, "branch_on", None) == "values" and fallback != "children":
            raise TraceError(
                f"torch.fx could not trace {name}.forward(): it branches on the values of its input ({reason}). "
                f"Its top-level children, run one after another, match forward() on the example input, but no input "
                f"can show they match on every input: the branch may go the other way on another batch, and the "
                f"converted model would then compute something else. If the branch only checks or rescales inputs "
                f"your data never triggers, accept it with fallback='children'; otherwise make forward() traceable "
                f"(move the check out of forward(), or wrap it in a function registered with torch.fx.wrap)."
            ) from exc.__cause__
        accepted = (" You accepted it with fallback='children', although forward() branches on its input's values: "
                    "on inputs that take the other branch the outputs differ." if fallback == "children" else "")
        warnings.warn(
            f"torch.fx could not trace {name}.forward() ({reason}); running its top-level children one after "
            f"another gives the same outputs on the example input, so lfnnify traced those instead (cuts between and "
            f"inside them).{accepted} Pass fallback=False to get the error instead.",
            stacklevel=3,
        )
        traced = trace(children, leaf_modules=leaf_modules, fallback=True)
    x = batch[:1]
    profile = profile_graph(traced.graph_module, x, given_shape=tuple(batch.shape))
    cut_points = find_cut_points(traced.graph_module, traced.qualnames, profile)
    if traced.eval_graph_module is not None:  # a cut must exist in both graphs
        eval_profile = profile_graph(traced.eval_graph_module, x, given_shape=tuple(batch.shape))
        in_eval = {c.name for c in find_cut_points(traced.eval_graph_module, traced.eval_qualnames, eval_profile)}
        cut_points = [c for c in cut_points if c.name in in_eval]
    return Analysis(traced, profile, cut_points, x, batch)


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


def measured_piece_times(
    gm: fx.GraphModule, cut_points: list[CutPoint], x: torch.Tensor, heads: list
) -> tuple[list[float], list[float]]:
    """Forward+backward seconds of each piece between candidate cuts, and of each head.

    Runs in train mode on a copy (BatchNorm statistics of the model stay untouched), with a
    batch of two at least, so that train-mode normalisation of 1×1 maps works.
    """
    gm = copy.deepcopy(gm).train()
    if x.shape[0] < 2:
        x = torch.cat([x, x])
    pieces = split_graph(gm, [c.node for c in cut_points], class_name="Piece")
    piece_times, head_times = [], []
    h = x
    for j, piece in enumerate(pieces):
        piece_times.append(_time_fwd_bwd(piece, h))
        with torch.no_grad():
            h = piece(h)
        if j < len(heads):  # a head that cannot take this output makes the cut impossible
            head_times.append(_time_fwd_bwd(heads[j], h) if heads[j] is not None else float("inf"))
    return piece_times, head_times
