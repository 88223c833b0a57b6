"""What the trainers accept from a loader, checked at their door: one line per problem, naming the fix.

Without these checks a wrong batch reaches torch, which fails deep inside a convolution or a loss
("Input type (double) and bias type (float) should be the same"), or trains on nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import is_count, is_number
from ..errors import ConfigError, DataError
from ..surgery.leadership import check_labels

__all__ = ["check_fit", "pair", "check_batch", "batch_rules"]


def check_fit(loader, *, epochs, max_steps, where: str) -> None:
    """Refuse ``fit()`` arguments that would train something other than what was asked."""
    if not is_count(epochs, 0):
        part = " (for part of an epoch, pass max_steps=)" if is_number(epochs) else ""
        raise ConfigError(f"epochs={epochs!r} given to {where} must be a whole number >= 0{part}")
    if max_steps is not None and not is_count(max_steps, 0):
        raise ConfigError(f"max_steps={max_steps!r} given to {where} must be an int >= 0 or None")
    if loader is not None:
        try:
            size = len(loader)
        except TypeError:  # an iterable without a length: counted as it is read
            return
        if size == 0:
            raise DataError(
                f"the training loader given to {where} yields no batches (len 0), so there is nothing to train on; "
                f"check the dataset's size, and that batch_size is not larger than it with drop_last=True"
            )


def batch_rules(net: nn.Module) -> dict:
    """What every batch must satisfy for ``net``, worked out once per trainer."""
    params = [p for p in net.parameters() if p.is_floating_point()]
    return {
        "input_shape": tuple(net.plan.input_shape),
        "dtype": params[0].dtype if params else torch.float32,
        "num_classes": net.config["num_classes"],
    }


def pair(batch, *, where: str, indexed: bool = False) -> tuple:
    """``(images, labels)`` from one batch of a loader (its contents are checked by :func:`check_batch`);
    ``indexed``: ``(images, labels, sample indices)``, what a pipeline sending deltas reads."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2 + indexed:
        got = f"{len(batch)} items" if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}"
        if indexed:
            raise DataError(
                f"a batch from the loader given to {where} has {got}; with send_deltas=True each batch is (images, "
                f"labels, sample indices), because each sample's change is sent against what was sent for it "
                f"last. Wrap the dataset: lfnnify.data.WithIndex(dataset), or make_loader(..., indexed=True)"
            )
        raise DataError(
            f"a batch from the loader given to {where} has {got}; the trainers take (images, labels) pairs. "
            f"Make the dataset return (image, label), or wrap the loader, e.g. [(x, y) for x, y, *_ in loader]"
        )
    return tuple(batch)


def check_batch(x, y, rules: dict, *, where: str) -> tuple[Tensor, Tensor]:
    """Refuse images and labels the model cannot take; integer labels come back as ``torch.long``."""
    expected = rules["input_shape"]
    if not isinstance(x, Tensor):
        raise DataError(f"the images given to {where} are a {type(x).__name__}; pass a tensor shaped like {expected}")
    if x.dtype == torch.uint8:
        raise DataError(
            f"the images given to {where} have dtype {x.dtype}; the model computes in {rules['dtype']}. Convert "
            f"them, e.g. x.float() / 255 (torchvision: transforms.ToDtype(torch.float32, scale=True))"
        )
    if x.is_floating_point() and x.dtype != rules["dtype"]:
        raise DataError(
            f"the images given to {where} have dtype {x.dtype}, the model's weights {rules['dtype']}; convert the "
            f"images (x.to({rules['dtype']})) or the model before converting it"
        )
    if x.dim() != len(expected) or (len(expected) >= 2 and x.shape[1] != expected[1]):
        raise DataError(
            f"the images given to {where} have shape {tuple(x.shape)}, but the model was converted for inputs "
            f"shaped like {expected} ({expected[1]} channels); give images with that layout and channel count"
        )
    check_labels(y, rules["num_classes"], where=where)
    if len(y) != len(x):
        raise DataError(f"{where} got {len(x)} images but {len(y)} labels in one batch; give one label per image")
    if y.dtype != torch.long:
        y = y.long()
    return x, y
