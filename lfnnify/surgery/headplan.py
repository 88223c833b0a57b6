"""Placing heads: where each head goes, how it pools, what it costs, and building it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import ConfigError
from .analysis import Analysis
from .cuts import CutPoint
from .facts import channels_of, head_layout
from .heads import Pool, build_head, head_param_count
from .lookahead import LOOKAHEADS, Stage, build_lookahead_head, next_stage, stage_params_and_flops

__all__ = ["HeadSite", "head_site", "head_cost", "build_site_head"]


@dataclass
class HeadSite:
    """Where a head goes (after a candidate cut) and what it is: enough to build it and to cost it."""

    cut: CutPoint
    layout: str
    token: bool
    prefix_tokens: int
    channels: int
    stage: HeadSite | None = None  # look-ahead heads: the site at the end of the copied stage
    copied: Stage | None = None  # look-ahead heads: the nodes the head copies

    def pool(self) -> Pool:
        return Pool(self.layout, token=self.token, prefix_tokens=self.prefix_tokens)


# ---------------------------------------------------------------- the plan


def head_site(model: nn.Module, cut: CutPoint, staged: list[CutPoint], limit: int, *, analysis: Analysis | None = None,
              head="linear") -> HeadSite:
    """The head after ``cut``: how it pools, its channels, and for look-ahead heads what they copy of the next
    block (no further than node ``limit``, where that block ends)."""
    layout, token, prefix = head_layout(model, cut.output_shape)
    site = HeadSite(cut, layout, token, prefix, channels_of(layout, cut.output_shape))
    if head in LOOKAHEADS and analysis is not None:
        traced = analysis.traced
        copied = next_stage(traced.graph_module, traced.qualnames, analysis.profile, cut, staged, limit, head)
        if copied is not None:
            site.copied, site.stage = copied, head_site(model, copied.end, [], -1)
    return site


def head_cost(head, site: HeadSite, analysis: Analysis, num_classes: int, workers: int) -> tuple[int, int, str]:
    """(parameters, forward FLOPs per example, a label) of the head at ``site``."""
    if head in LOOKAHEADS and site.copied is not None:
        params, flops = stage_params_and_flops(analysis.traced.graph_module, analysis.profile, site.copied)
        channels = site.stage.channels
        return (params + head_param_count(channels, num_classes, 1), flops + 2 * channels * num_classes,
                f"{head} (copies {site.copied.name})")
    if head == "linear" or head in LOOKAHEADS:  # a look-ahead head with nothing to copy is the paper's head
        label = "linear" if head == "linear" else f"linear ({head}: nothing to copy before the next cut)"
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
    if head in LOOKAHEADS and site.copied is not None:
        return build_lookahead_head(analysis.traced.graph_module, site.cut, site.copied, num_classes=num_classes,
                                    pool=site.stage.pool(), channels=site.stage.channels)
    if head == "linear" or head in LOOKAHEADS:
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
