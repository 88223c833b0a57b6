"""Converting a model into K gradient-isolated blocks with prediction heads: lfnnify.convert."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .analysis import analyse
from .blocks import dual_block, split_graph
from .cuts import CutPoint
from .facts import describe_model
from .headplan import build_site_head
from .model import LFNNModel
from .options import ConvertOptions, signature_with
from .planning import make_plan

__all__ = ["convert"]


def convert(
    model: nn.Module,
    *,
    example_input: torch.Tensor | None = None,
    leaf_modules: Sequence[type] = (),
    concrete_args: dict | None = None,
    share_parameters: bool = False,
    fallback: bool | str = True,
    **settings,
) -> LFNNModel:
    """Convert ``model`` into a leader-follower network trained with local error signals.

    The input model is not modified: ``convert`` works on a deep copy, unless
    ``share_parameters=True``, in which case the blocks use (and train) the model's own
    parameters. ``net(x)`` returns exactly what ``model(x)`` returns.

    Example:
        >>> net = lfnnify.convert(timm.create_model("resnet101"), blocks=4)
        >>> net = lfnnify.convert(model, cuts=["layer1", "layer2", "layer3"])
        >>> net = lfnnify.convert(model, blocks=4, workers=8, leaders=0.7)
        >>> net = lfnnify.convert(model, blocks=4, mode="replay")      # delayed end-to-end gradients
        >>> net = lfnnify.convert(model, blocks=4, head="lookahead")   # heads that copy the next stage
        >>> net.local_losses(images, labels).backward()

    Args:
        model: any classifier torch.fx can trace with timm's leaf modules.
        blocks: number of blocks K; the K - 1 cuts minimise the most expensive block (default 4
            when ``cuts`` is not given).
        cuts: explicit cut names, as listed by :func:`lfnnify.plan`.
        workers: filter-wise workers per hidden block; each takes an equal group of the block's
            output channels and gets its own head. 1 = block-wise workers.
        leaders: share δ of workers that lead, in (0, 1]; 1.0 = every worker leads.
        mode: ``"local"`` (LFNN-ℓ, Eq. 2: each block's input detached), ``"lfnn"`` (Eq. 1: global
            loss through all blocks, follower channels masked, plus local losses; one device only), or
            ``"replay"`` (delayed end-to-end gradients: block k of K applies the gradient of the batch it
            saw K-1-k steps earlier, recomputed with its current weights; pipeline-capable; with one
            block it is backprop).
        follower_weight: λ, the weight of the followers' alignment loss.
        local_weight: the weight of each block's head loss added to the delayed gradient whenever the model
            trains in replay mode (from the start, or after a trainer's ``switch_to="replay"``); 0 = pure
            delayed backprop (the heads still learn, on detached features).
        weight_stashing: replay mode: keep each first pass's graph and the weights it used, and back-propagate
            the delayed gradient through them (PipeDream's weight stashing), instead of recomputing the pass
            with the current weights. No recompute, but K-1-k graphs and weight copies per block.
        weight_prediction: replay mode: run block k's first pass of each batch with the weights it is predicted
            to have when that batch's gradient is applied, K-1-k steps later: ``w + (K-1-k)·Δw``, Δw being the
            block's last update (linear weight prediction, Kosson et al. 2021: for SGD with momentum
            ``w - D·lr·v``). With ``weight_stashing`` the delayed gradient is taken at the predicted weights.
        spike_compensation: replay mode, SGD with momentum m: apply each delayed gradient so that its total effect
            on block k's trunk is what momentum SGD would have applied without the delay D = K-1-k (Kosson et al.
            2021): the step is ``w - lr·(m^D·v + (1 - m^D)/(1 - m)·g)`` instead of ``w - lr·v``, ``g`` being the
            gradient with weight decay. The heads, whose gradients are not delayed, step as usual.
        head: ``"linear"`` (global average pooling + Linear, the paper's), ``"lookahead"`` (a copy of the
            next block's first stage, initialised from it, then pooling + Linear; block-wise only),
            ``"lookahead-layer"`` (the same with only the next block's first layer), or a callable
            ``head(channels, num_classes, workers) -> nn.Module``.
        num_classes: classes the heads predict; read from the model's classifier by default.
        balance: cost the partition balances: ``"flops"`` (for pipelines), ``"time"``, ``"params"`` or
            ``"memory"`` (activation bytes: the lowest peak memory for the one-device trainer).
        example_input: a batch used to profile and check shapes; by default a random batch of
            timm's ``pretrained_cfg`` input size (224×224 otherwise).
        leaf_modules: module classes to keep whole when tracing.
        concrete_args: values for optional forward arguments.
        share_parameters: use the model's parameters instead of a copy.
        fallback: when torch.fx cannot trace inside a submodule, keep that module whole and retry (a warning
            names it; cuts fall on module boundaries around it); when it cannot trace the model's own
            ``forward()`` because of a shape check, run its top-level children one after another if that gives
            the same outputs. A ``forward()`` that branches on its input's *values* is refused unless
            ``fallback="children"`` (the branch may go another way on other inputs). ``False`` raises instead.

    Returns:
        An :class:`~lfnnify.LFNNModel`.

    Raises:
        lfnnify.ConfigError: bad knobs, with the rule and the fix.
        lfnnify.CutError: impossible cuts (too many blocks, unknown names).
        lfnnify.TraceError: torch.fx can't trace the model; names the failing module.
    """
    if isinstance(model, LFNNModel):
        raise ConfigError(
            f"the model is already converted ({model.num_blocks} blocks, cuts {model.config['cuts']}); convert the "
            f"original model again, or get it back with lfnnify.export(net) first"
        )
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if settings.get("blocks") is None and settings.get("cuts") is None:
        settings = {**settings, "blocks": 4}
    o = ConvertOptions.from_settings("convert", settings)

    source = model if share_parameters else copy.deepcopy(model)
    analysis = analyse(source, example_input=example_input, leaf_modules=leaf_modules, concrete_args=concrete_args,
                       fallback=fallback)
    the_plan = make_plan(source, analysis, o)
    block_modules = _build_blocks(analysis, the_plan.split.chosen)  # exactly what the plan chose
    heads = [build_site_head(o.head, site, analysis, the_plan.num_classes, o.workers) for site in the_plan.split.sites]
    param = next(source.parameters(), None)
    if param is not None:
        for h in heads:
            h.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)

    config = {  # the settings as the model was built: a checkpoint rebuilds it from them
        **{f.name: getattr(o, f.name) for f in dataclasses.fields(o)},
        "blocks": len(block_modules),
        "cuts": list(the_plan.cuts),
        "leaders": float(o.leaders),
        "follower_weight": float(o.follower_weight),
        "local_weight": float(o.local_weight),
        "head": o.head if isinstance(o.head, str) else getattr(o.head, "__name__", "custom"),
        "num_classes": the_plan.num_classes,
        "model": describe_model(model),
    }
    net = LFNNModel(block_modules, heads, plan=the_plan, config=config, source=source)
    net.train(source.training)
    return net


def _build_blocks(analysis, chosen: list[CutPoint]) -> list[nn.Module]:
    traced = analysis.traced
    train_blocks = split_graph(traced.graph_module, [c.node for c in chosen])
    if traced.eval_graph_module is None:
        return train_blocks
    # the same cut names, found again in the eval graph (node names can differ there)
    eval_nodes = {}
    for node in traced.eval_graph_module.graph.nodes:
        eval_nodes.setdefault(traced.eval_qualnames.get(node.name, node.name), node.name)
    eval_cut_nodes = [eval_nodes.get(traced.qualnames[c.node], c.node) for c in chosen]
    eval_blocks = split_graph(traced.eval_graph_module, eval_cut_nodes)
    return [dual_block(t, e, f"Block{k}") for k, (t, e) in enumerate(zip(train_blocks, eval_blocks))]


convert.__signature__ = signature_with(convert)
