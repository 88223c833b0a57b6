"""Placing heads: where each head goes, how it pools, what it costs, and building it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .analysis import Analysis, node_params
from .cuts import CutPoint
from .errors import ConfigError
from .facts import channels_of, head_layout
from .heads import Pool, build_head, head_param_count
from .lookahead import build_lookahead_head, first_stage_end, stage_cost

__all__ = ["HeadSite", "head_site", "head_cost", "build_site_head"]


@dataclass
class HeadSite:
    """Where a head goes (after a candidate cut) and what it is: enough to build it and to cost it."""

    cut: CutPoint
    layout: str
    token: bool
    prefix_tokens: int
    channels: int
    stage: HeadSite | None = None  # head="lookahead": the site where the copied first stage ends

    def pool(self) -> Pool:
        return Pool(self.layout, token=self.token, prefix_tokens=self.prefix_tokens)


# ---------------------------------------------------------------- the plan


def head_site(model: nn.Module, cut: CutPoint, staged: list[CutPoint], limit: int) -> HeadSite:
    """The head after ``cut``: how it pools, its channels, and (for look-ahead heads) where the copied
    first stage of the next block ends, no further than node ``limit``."""
    layout, token, prefix = head_layout(model, cut.output_shape)
    end = first_stage_end(cut, staged, limit)
    stage = head_site(model, end, [], -1) if end is not None else None
    return HeadSite(cut, layout, token, prefix, channels_of(layout, cut.output_shape), stage)


def head_cost(head, site: HeadSite, analysis: Analysis, num_classes: int, workers: int) -> tuple[int, int, str]:
    """(parameters, forward FLOPs per example, a label) of the head at ``site``."""
    if head == "lookahead" and site.stage is not None:
        nodes = list(analysis.traced.graph_module.graph.nodes)
        end, channels = site.stage.cut, site.stage.channels
        params = node_params(analysis.traced.graph_module, nodes[site.cut.index + 1 : end.index + 1])
        params += head_param_count(channels, num_classes, 1)
        flops = stage_cost(nodes, site.cut, end, analysis.profile) + 2 * channels * num_classes
        return params, flops, f"lookahead (copies {end.name})"
    if head in ("linear", "lookahead"):  # a look-ahead head with no stage to copy is the paper's head
        label = "linear" if head == "linear" else "linear (lookahead: no stage to copy before the next cut)"
        return head_param_count(site.channels, num_classes, workers), 2 * site.channels * num_classes, label
    module = build_site_head(head, site, analysis, num_classes, workers)
    x = torch.zeros(1, *site.cut.output_shape[1:], dtype=analysis.example_input.dtype,
                    device=analysis.example_input.device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module.eval()(x)
    name = getattr(head, "__name__", type(head).__name__)
    return sum(p.numel() for p in module.parameters()), counter.get_total_flops(), name


def build_site_head(head, site: HeadSite, analysis: Analysis, num_classes: int, workers: int) -> nn.Module:
    """The head module for ``site``: the paper's, a look-ahead head, or the user's (checked for shape)."""
    if head == "lookahead" and site.stage is not None:
        return build_lookahead_head(analysis.traced.graph_module, site.cut, site.stage.cut, num_classes=num_classes,
                                    pool=site.stage.pool(), channels=site.stage.channels)
    if head in ("linear", "lookahead"):
        return build_head("linear", channels=site.channels, num_classes=num_classes, workers=workers, pool=site.pool())
    module = build_head(head, channels=site.channels, num_classes=num_classes, workers=workers, pool=site.pool())
    if not isinstance(module, nn.Module):
        raise ConfigError(f"head={head!r} returned {type(module).__name__}; a head factory must return an nn.Module")
    x = torch.zeros(2, *site.cut.output_shape[1:], dtype=analysis.example_input.dtype,
                    device=analysis.example_input.device)
    try:
        with torch.no_grad():
            out = module.to(x.device).eval()(x)
    except Exception as exc:
        raise ConfigError(
            f"the custom head for the cut after {site.cut.name!r} failed on that block's output, shape "
            f"(2, {', '.join(map(str, site.cut.output_shape[1:]))}): {type(exc).__name__}: {exc}. "
            f"A head receives the block's raw output."
        ) from exc
    module.train()
    ok = (2, num_classes) if workers == 1 else (workers, 2, num_classes)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
    if shape not in (ok, (workers, 2, num_classes)):
        raise ConfigError(
            f"the custom head for the cut after {site.cut.name!r} returned "
            f"{shape if shape is not None else type(out).__name__} for a batch of 2; it must return logits "
            f"shaped {ok}" + (" or (1, 2, classes)" if workers == 1 else "") + f" (num_classes={num_classes})"
        )
    return module
