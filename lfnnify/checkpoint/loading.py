"""Loading a checkpoint: the model rebuilt and converted as it was saved, or its weights copied into a model."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

import lfnnify.checkpoint.files as fileio
import lfnnify.checkpoint.store as store

from ..errors import CheckpointError, LfnnifyError
from ..surgery.conversion import convert
from ..surgery.facts import rebuild_model
from ..surgery.model import LFNNModel
from ..surgery.options import HEADS, ConvertOptions
from .description import WEIGHTS, read_meta
from .saving import fingerprint

__all__ = ["load", "load_weights_into", "read_weights"]


def _tensors(folder: Path, meta: dict, name: str) -> dict:
    return fileio.load_tensors(folder / name, meta.get("files", {}).get(name))


def read_weights(folder: Path, meta: dict) -> dict:
    if "pipeline" in meta:  # one file per block, written by each rank of a pipeline run
        weights = {}
        for k in range(meta["pipeline"]["blocks"]):
            weights.update(_tensors(folder, meta, f"block{k}.safetensors"))
        return weights
    return _tensors(folder, meta, WEIGHTS)


def load(
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    head=None,
    leaf_modules=(),
) -> LFNNModel:
    """Rebuild a converted model from a checkpoint folder written by :func:`save`.

    timm and torchvision architectures are rebuilt by their recorded names; for any other model pass
    an instance of the architecture as ``model=`` (its weights are replaced; it is not modified).
    Custom heads need ``head=`` again, custom leaf modules ``leaf_modules=``.

    Raises:
        lfnnify.CheckpointError: not a checkpoint; a damaged, truncated or changed file (checksums);
            an architecture that does not fit the weights or computes something else.
    """
    path = Path(path)
    with store.reading(path) as (folder, digest):
        meta = read_meta(folder, digest)
        weights = read_weights(folder, meta)
    shapes = {k: tuple(v) for k, v in meta.get("source_state_shapes", {}).items()}
    source = model if model is not None else rebuild_model(meta["model"], shapes)
    config = meta["config"]
    saved_head = config.get("head", "linear")
    if saved_head not in HEADS and head is None:
        raise CheckpointError(
            f"the checkpoint was trained with a custom head ({saved_head!r}); pass the same factory: "
            f"lfnnify.load(path, head=...)"
        )
    saved = {f.name: config[f.name] for f in dataclasses.fields(ConvertOptions)
             if f.name in config and f.name not in ("blocks", "cuts", "head", "num_classes")}
    try:
        net = convert(source, **saved, cuts=meta["cuts"], head=head or saved_head, num_classes=config["num_classes"],
                      example_input=torch.zeros(meta["input_shape"]), leaf_modules=leaf_modules)
    except LfnnifyError as exc:
        if model is None:
            raise
        raise CheckpointError(  # the user's model=, not the checkpoint, is what failed to convert
            f"{path}: the model= given cannot be converted as the saved one was (cuts {meta['cuts']}, inputs shaped "
            f"{tuple(meta['input_shape'])}), so it is not the architecture the checkpoint was saved from; pass that "
            f"one as model=. (Converting it said: {exc})"
        ) from exc
    net.config["model"] = meta["model"]
    fix = "Pass the architecture it was saved from as model=."
    _refuse_other_shapes(net, weights, f"{path} does not fit this architecture", fix)
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit this architecture: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}). {fix}"
        )
    expected = meta.get("fingerprint")
    if expected is not None:
        got = fingerprint(net, meta["input_shape"])
        if not torch.allclose(torch.tensor(got), torch.tensor(expected), rtol=1e-3, atol=1e-4):
            raise CheckpointError(
                f"{path}: the rebuilt {type(source).__name__} loads the weights but computes something else than "
                f"the saved model (outputs on a fixed input differ), so its architecture differs in a way the weights "
                f"don't show. Pass the exact architecture: lfnnify.load(path, model=...)"
            )
    return net


def _refuse_other_shapes(net: nn.Module, weights: dict[str, torch.Tensor], what: str, fix: str) -> None:
    """Refuse, naming them, the tensors whose shape in ``weights`` differs from ``net``'s (``load_state_dict`` would
    raise its own RuntimeError for them, even with ``strict=False``)."""
    own = net.state_dict()
    wrong = [f"{k}: {tuple(weights[k].shape)} saved, {tuple(own[k].shape)} here" for k in sorted(weights)
             if k in own and own[k].shape != weights[k].shape]
    if wrong:
        raise CheckpointError(f"{what}: {len(wrong)} tensor(s) differ in shape (e.g. {'; '.join(wrong[:2])}). {fix}")


def load_weights_into(net: LFNNModel, path: str | os.PathLike) -> LFNNModel:
    """Copy a checkpoint's weights into ``net``, a model converted the same way (used to resume runs)."""
    path = Path(path)
    with store.reading(path) as (folder, digest):
        meta = read_meta(folder, digest)
        if meta["cuts"] != net.plan.cuts:
            raise CheckpointError(f"{path} was cut at {meta['cuts']}, this model at {net.plan.cuts}; convert it the "
                                  f"same way")
        weights = read_weights(folder, meta)
    partial = net.held_blocks != list(range(net.num_blocks))
    if partial:  # a pipeline rank holds only its own blocks and heads
        held = tuple(f"{part}.{k}." for k in net.held_blocks for part in ("blocks", "heads"))
        weights = {k: v for k, v in weights.items() if k.startswith(held)}
    _refuse_other_shapes(net, weights, f"{path} does not fit this model", "Convert the same architecture the same way.")
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if unexpected or (not partial and missing):
        raise CheckpointError(f"{path} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return net
