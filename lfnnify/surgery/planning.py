"""Where to cut a model into K blocks, what each block costs, and how balanced it is."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from .analysis import Analysis, analyse
from .cuts import CutPoint
from .facts import resolve_num_classes
from .options import ConvertOptions, signature_with
from .splitting import BlockInfo, Split, choose_split
from .traffic import traffic

__all__ = ["Plan", "BlockInfo", "plan", "make_plan"]


@dataclass
class Plan:
    """The valid cut points of a model and, when blocks or cuts were asked for, the chosen split.

    ``str(plan)`` is a table. ``plan.blocks`` lists :class:`BlockInfo`; ``plan.cuts`` the cut names;
    ``plan.split`` the decisions behind them (the cut points and each head's site), which :func:`lfnnify.convert`
    builds exactly, so that a converted model is the plan it printed.
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
    traffic: object = None  # a lfnnify.surgery.traffic.Traffic when plan() was given batch_size= or link=
    split: Split | None = field(default=None, repr=False, compare=False)  # what was chosen; convert builds exactly it

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


def make_plan(model: nn.Module, analysis: Analysis, options: ConvertOptions) -> Plan:
    """The plan of ``model``: its valid cut points and, with ``blocks`` or ``cuts``, the chosen split
    (:func:`~lfnnify.surgery.splitting.choose_split`), whose decisions the plan keeps (``plan.split``)."""
    o = options
    name = getattr(model, "default_cfg", {}).get("architecture") if hasattr(model, "default_cfg") else None
    name = name or type(model).__name__
    result = Plan(name, analysis.cut_points, balance=o.balance, workers=o.workers,
                  input_shape=tuple(analysis.example_input.shape), mode=o.mode,
                  model_params=sum(p.numel() for p in model.parameters()),
                  weight_stashing=o.weight_stashing and o.mode == "replay")
    if o.blocks is None and o.cuts is None:
        return result
    result.num_classes = resolve_num_classes(model, o.num_classes)
    result.split = choose_split(model, analysis, blocks=o.blocks, cuts=o.cuts, workers=o.workers,
                                num_classes=result.num_classes, head=o.head, balance=o.balance, mode=o.mode,
                                stashing=result.weight_stashing, name=name)
    result.blocks, result.cuts = result.split.rows, [c.name for c in result.split.chosen]
    return result


def plan(
    model: nn.Module,
    *,
    example_input: torch.Tensor | None = None,
    leaf_modules: Sequence[type] = (),
    concrete_args: dict | None = None,
    fallback: bool | str = True,
    batch_size: int | None = None,
    send_dtype: torch.dtype | None = None,
    link: str | None = None,
    **settings,
) -> Plan:
    """List where ``model`` can be cut and, with ``blocks=`` or ``cuts=``, where it will be.

    The model is not modified (its ``training`` flag is restored after tracing).

    Example:
        >>> print(lfnnify.plan(timm.create_model("resnet101"), blocks=4))

    Args:
        model: any module torch.fx can trace (with timm's leaf modules).
        blocks, cuts, workers, head, mode, balance, num_classes, ...: convert's settings (:func:`lfnnify.convert`;
            those that do not change the plan are checked and left aside). Without ``blocks`` or ``cuts`` the plan
            lists the valid cut points only.
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
            data-parallel backprop on as many devices sends (plain, with the fp16 or PowerSGD communication hook, and
            local SGD), and, at ``link`` (``"1gbit"``), how long each takes (``plan.traffic``;
            :mod:`lfnnify.surgery.traffic`). ``link`` alone assumes ``example_input``'s batch size.

    Returns:
        A :class:`Plan`; ``str(plan)`` is a table.

    Raises:
        lfnnify.ConfigError: bad knobs; :class:`~lfnnify.CutError` for impossible cuts;
        :class:`~lfnnify.TraceError` when torch.fx can't trace the model.
    """
    if not isinstance(model, nn.Module):
        hint = f" For a timm name, pass timm.create_model({model!r})." if isinstance(model, str) else ""
        raise ConfigError(f"plan() takes a torch.nn.Module, got {type(model).__name__} {model!r:.60}.{hint}")
    options = ConvertOptions.from_settings("plan", settings)
    analysis = analyse(model, example_input=example_input, leaf_modules=leaf_modules, concrete_args=concrete_args,
                       fallback=fallback)
    result = make_plan(model, analysis, options)
    if (batch_size is not None or link is not None) and result.blocks:
        batch = batch_size if batch_size is not None else int(analysis.example_batch.shape[0])
        result.traffic = traffic(result, batch_size=batch, send_dtype=send_dtype, link=link,
                                 param_shapes=[tuple(p.shape) for p in model.parameters()])
    return result


def _size(n: int) -> str:
    """Bytes as people read them: 3.1 KiB, 1.50 MiB."""
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


plan.__signature__ = signature_with(plan)
