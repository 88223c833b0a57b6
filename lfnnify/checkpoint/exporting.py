"""Weights in the original library's layout, both ways: export a converted model back to its original architecture,
and load a timm or torchvision checkpoint into a model before converting it."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes
from torch import nn

import lfnnify.checkpoint.files as fileio
import lfnnify.checkpoint.store as store

from .._writing import check_writable, write_regular
from ..errors import CheckpointError, DataNotFoundError
from ..surgery.facts import classifier_parameter_names, find_classifier
from ..surgery.model import LFNNModel

__all__ = ["export", "load_pretrained", "original_state_dict"]


def original_state_dict(net: LFNNModel) -> dict[str, torch.Tensor]:
    """The converted model's weights under the original model's keys (heads left out)."""
    state = dict(net._source.state_dict())
    for key, value in net.blocks.state_dict().items():
        original = key.split(".", 1)[1]
        if original in state:
            state[original] = value
    return state


def export(net: LFNNModel, path: str | os.PathLike | None = None) -> nn.Module:
    """The original architecture (same class) with the converted model's trained weights.

    With ``path``, also writes its state dict as safetensors (atomically; an existing file is replaced only if it
    is a safetensors file, an earlier export, or empty; never anything else), which
    ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=N), num_classes=N)``
    or ``torchvision_model.load_state_dict(safetensors.torch.load_file(path))`` read back.
    The converted model is not modified.
    """
    model = copy.deepcopy(net._source)
    model.load_state_dict(original_state_dict(net), strict=True)
    model.train(net.training)
    if path is not None:
        path = Path(path)
        if path.is_dir() and not path.is_symlink():
            raise CheckpointError(f"{path} is a folder; export writes one .safetensors file: give a file name")
        holder = store.holding_checkpoint(path)
        if holder is not None:
            raise CheckpointError(
                f"{path} is inside the checkpoint at {holder}: an export there would replace or add to the "
                f"checkpoint's own files, and it would no longer load. Export to a path outside it")
        check_writable(path, CheckpointError)  # a link, a device or a pipe: refused by name
        if path.exists() and path.stat().st_size > 0 and not _is_safetensors(path):  # an empty file holds nothing
            raise CheckpointError(
                f"{path} exists and is not a safetensors file: an export replaces only an earlier export, so "
                f"nothing was written. Give another file name, or remove {path} yourself")
        write_regular(path, save_bytes(fileio.unshare(model.state_dict())), error=CheckpointError)
    return model


def _is_safetensors(path: Path) -> bool:
    """Whether the regular file ``path`` reads as a safetensors file (an earlier export, or weights like it)."""
    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except Exception:  # safetensors raises its own error for a file that is not one, OSError for one it cannot read
        return False
    return True


_PREFIXES = ("module.", "model.", "_orig_mod.")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise DataNotFoundError(f"no weights file at {path}; pass the path of a .safetensors or .pth file")
    if path.suffix == ".safetensors":
        return fileio.load_tensors(path, follow_symlinks=True)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncation: one clear message
        raise CheckpointError(
            f"{path} could not be read as a weights-only PyTorch file ({type(exc).__name__}: {exc}); "
            f"lfnnify never unpickles arbitrary objects"
        ) from None
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return data


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a ``.safetensors``/``.pth`` checkpoint in timm or torchvision layout into ``model`` (in place).

    Prefixes such as ``module.`` are stripped. When the classifier's shape differs (another
    ``num_classes``), the classifier is re-initialised instead of loaded. Returns ``model``.
    """
    path = Path(path)
    state = _read_weights(path)
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    own = model.state_dict()
    classifier = find_classifier(model)
    classifier_keys = classifier_parameter_names(model)
    reinit = [k for k in classifier_keys if k in state and k in own and state[k].shape != own[k].shape]
    if reinit:
        for k in reinit:
            state.pop(k)
        classifier.reset_parameters()
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if mismatched:
        raise CheckpointError(
            f"{path} does not fit {type(model).__name__}: shapes differ for {mismatched[:3]} "
            f"(checkpoint {tuple(state[mismatched[0]].shape)} vs model {tuple(own[mismatched[0]].shape)})"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in reinit]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit {type(model).__name__}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return model
