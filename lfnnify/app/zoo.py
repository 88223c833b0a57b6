"""Building models by name for the command line, the recipes and the benchmarks: timm names and torchvision/<name>."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from ..surgery.facts import cifar_variant

__all__ = ["create_model"]


def create_model(name: str, *, num_classes: int | None = None, in_chans: int | None = None,
                 cifar: bool = False, **kwargs) -> nn.Module:
    """A model by name, never downloading weights: a timm name (``resnet101``) or ``torchvision/<name>``.

    ``cifar=True`` applies :func:`cifar_variant`.
    """
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if name.startswith(("torchvision/", "tv/")):
        import torchvision

        arch = name.split("/", 1)[1]
        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise ConfigError(f"unknown torchvision model {arch!r}; torchvision.models.list_models() lists them")
        if in_chans not in (None, 3):
            raise ConfigError(f"in_chans={in_chans}: torchvision models take 3 channels; use a timm model instead")
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
    else:
        import timm

        if not timm.is_model(name):
            close = timm.list_models(f"*{name}*")[:5]
            hint = f" Close: {', '.join(close)}." if close else ""
            raise ConfigError(f"unknown model {name!r}: give a timm model name, or torchvision/<name>.{hint}")
        if in_chans is not None:
            kwargs["in_chans"] = in_chans
        model = timm.create_model(name, pretrained=False, **kwargs)
    return cifar_variant(model) if cifar else model
