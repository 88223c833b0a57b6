"""Facts about a user's model: its classifier, classes, input, feature layout, and how to rebuild it by name."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._checks import is_count
from ..errors import CheckpointError, ConfigError

__all__ = [
    "find_classifier",
    "classifier_parameter_names",
    "resolve_num_classes",
    "example_input_for",
    "head_layout",
    "channels_of",
    "describe_model",
    "rebuild_model",
    "cifar_variant",
]


# ---------------------------------------------------------------- the classifier and the classes


def find_classifier(model: nn.Module) -> nn.Linear | None:
    """The model's final Linear classifier: timm's ``get_classifier()``, or torchvision's
    ``fc``/``classifier``/``head``/``heads`` (the last Linear inside a container)."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            layer = get()
        except Exception:  # some timm models raise for unusual heads; fall back to attributes
            layer = None
        if isinstance(layer, nn.Linear):
            return layer
    for name in ("fc", "classifier", "head", "heads", "last_linear"):
        layer = getattr(model, name, None)
        if isinstance(layer, nn.Linear):
            return layer
        if isinstance(layer, nn.Module):
            linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
            if linears:
                return linears[-1]
    return None


def classifier_parameter_names(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier's weight and bias (empty when there is no classifier)."""
    classifier = find_classifier(model)
    if classifier is None:
        return set()
    name = next(n for n, m in model.named_modules() if m is classifier)
    return {f"{name}.{p}" if name else p for p, _ in classifier.named_parameters()}


def resolve_num_classes(model: nn.Module, num_classes: int | None) -> int:
    """The number of classes the heads predict: ``num_classes=`` or the model's classifier."""
    if num_classes is not None:
        if not is_count(num_classes, 1):
            raise ConfigError(f"num_classes={num_classes!r} must be a positive int")
        return num_classes
    found = getattr(model, "num_classes", None)
    if isinstance(found, int) and found > 0:
        return found
    classifier = find_classifier(model)
    if classifier is not None:
        return classifier.out_features
    raise ConfigError(
        f"{type(model).__name__} has no classifier lfnnify can find (num_classes="
        f"{getattr(model, 'num_classes', None)!r}, no fc/classifier/head Linear), so the heads "
        f"don't know how many classes to predict. Pass num_classes=N."
    )


# ---------------------------------------------------------------- the input


def input_channels(model: nn.Module, default: int = 3) -> int:
    """Channels of the first convolution (what an example input needs), else ``default``."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return m.in_channels
    return default


def example_input_for(model: nn.Module, example_input: torch.Tensor | None = None) -> torch.Tensor:
    """``example_input=``, or a batch-1 input of timm's ``pretrained_cfg`` size (224 otherwise)."""
    if example_input is not None:
        if not isinstance(example_input, torch.Tensor):
            raise ConfigError(f"example_input must be a tensor, got {type(example_input).__name__}")
        if not example_input.is_floating_point():
            raise ConfigError(
                f"example_input has dtype {example_input.dtype}; models take floating-point images. "
                f"Pass e.g. torch.zeros({', '.join(map(str, example_input.shape))})"
            )
        if example_input.dim() == 0 or example_input.shape[0] < 1:
            raise ConfigError(
                f"example_input has shape {tuple(example_input.shape)}; give a batch with at least one "
                f"example, e.g. torch.zeros(1, 3, 224, 224)"
            )
        return example_input
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and all(isinstance(v, int) for v in img_size):
        h, w = img_size
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else "cpu"
    return torch.randn(1, input_channels(model, c), h, w, dtype=dtype, device=device)


# ---------------------------------------------------------------- feature layout


def head_layout(model: nn.Module, shape: Sequence[int]) -> tuple[str, bool, int]:
    """How a head pools an activation of ``shape``: (layout, use class token, prefix tokens)."""
    if len(shape) == 4:
        return ("nhwc" if str(getattr(model, "output_fmt", "")).upper() == "NHWC" else "nchw"), False, 0
    if len(shape) == 3:
        prefix = getattr(model, "num_prefix_tokens", None)
        has_cls = getattr(model, "cls_token", None) is not None or getattr(model, "class_token", None) is not None
        if prefix is None:
            prefix = 1 if has_cls else 0
        token = has_cls and getattr(model, "global_pool", "token") in ("token", None)
        return "nlc", bool(token), int(prefix)
    return "nc", False, 0


def channels_of(layout: str, shape: Sequence[int]) -> int:
    """The channel count of an activation of ``shape`` in ``layout``."""
    return shape[1] if layout in ("nchw", "nc") else shape[-1]


# ---------------------------------------------------------------- describing and rebuilding by name


def describe_model(model: nn.Module) -> dict:
    """What :func:`rebuild_model` needs: timm's architecture name and arguments, or torchvision's
    class (the builder is found at load time), or just the class for anything else."""
    cls = type(model)
    spec: dict = {"class": f"{cls.__module__}.{cls.__qualname__}"}
    if isinstance(getattr(model, "maxpool", None), nn.Identity):
        spec["cifar_variant"] = True  # cifar_variant below: no weights show it, so record it
    cfg = getattr(model, "pretrained_cfg", None)
    if cls.__module__.startswith("timm.") and isinstance(cfg, dict) and cfg.get("architecture"):
        kwargs = {"num_classes": getattr(model, "num_classes", None)}
        first_conv = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv1d))), None)
        if first_conv is not None:
            kwargs["in_chans"] = first_conv.in_channels
        patch_embed = getattr(model, "patch_embed", None)
        for attr, key in (("img_size", "img_size"), ("patch_size", "patch_size")):
            value = getattr(patch_embed, attr, None)
            if isinstance(value, (tuple, list)) and len(value) == 2 and value[0] == value[1]:
                kwargs[key] = int(value[0])
        spec.update(library="timm", name=cfg["architecture"], kwargs=kwargs)
    elif cls.__module__.startswith("torchvision.models"):
        classifier = find_classifier(model)
        spec.update(library="torchvision", kwargs={"num_classes": classifier.out_features} if classifier else {})
    else:
        spec["library"] = None
    return spec


def rebuild_model(spec: dict, state_shapes: dict[str, tuple]) -> nn.Module:
    """A fresh model (random weights) of the architecture ``spec`` describes (:func:`describe_model`).

    torchvision models are recognised by class and by the shapes of their weights (``state_shapes``).
    Raises :class:`~lfnnify.CheckpointError` when the architecture cannot be rebuilt by name.
    """
    model = _rebuild_by_name(spec, state_shapes)
    if spec.get("cifar_variant"):
        cifar_variant(model)
    return model


# the keyword arguments a checkpoint may ask an architecture to be built with: what describe_model records, sizes only
ARCHITECTURE_KWARGS = {"timm": ("num_classes", "in_chans", "img_size", "patch_size"), "torchvision": ("num_classes",)}


def _checked_spec(spec) -> tuple[str | None, dict]:
    """The library and keyword arguments of a checkpoint's model description, refused unless they only name an
    architecture: a checkpoint may come from anyone, and a name or argument such as ``hf-hub:...``,
    ``local-dir:...`` or ``checkpoint_path`` would make a load read other files or reach the network."""
    where = "the checkpoint's description (lfnnify.json, 'model')"
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where} is not an object; the checkpoint is damaged or not written by lfnnify")
    library = spec.get("library")
    if library not in (None, *ARCHITECTURE_KWARGS):
        raise CheckpointError(f"{where} names the library {str(library)[:40]!r}; lfnnify rebuilds only timm and "
                              f"torchvision models by name. Pass the architecture: lfnnify.load(path, model=...)")
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{where}: 'kwargs' is not an object; the checkpoint is damaged")
    allowed = ARCHITECTURE_KWARGS.get(library, ())
    for key, value in kwargs.items():
        if key not in allowed:
            raise CheckpointError(
                f"{where} asks for the argument {str(key)[:40]!r}, which does not only size an architecture (a "
                f"checkpoint names only {', '.join(allowed) or 'none'}), so lfnnify does not build from it. If you "
                f"trust this checkpoint, pass the architecture yourself: lfnnify.load(path, model=...)")
        if value is not None and not (is_count(value, 1) and value <= 1 << 20):
            raise CheckpointError(f"{where}: {key}={str(value)[:40]!r} is not a size (a whole number from 1)")
    if library is not None and (not isinstance(spec.get("class"), str) or
                                (library == "timm" and not isinstance(spec.get("name"), str))):
        raise CheckpointError(f"{where} lacks the architecture's name; the checkpoint is damaged")
    return library, {k: v for k, v in kwargs.items() if v is not None}


def _rebuild_by_name(spec: dict, state_shapes: dict[str, tuple]) -> nn.Module:
    library, kwargs = _checked_spec(spec)
    if library == "timm":
        import timm

        name = spec["name"]
        if not timm.is_model(name) or ":" in name:  # only timm's own registry: no hub, no local folder
            raise CheckpointError(
                f"the checkpoint names the timm architecture {name[:60]!r}, which is not in timm {timm.__version__}'s "
                f"registry (timm.list_models()); lfnnify rebuilds only registered architectures, and never fetches "
                f"or reads one from elsewhere. Pass the architecture: lfnnify.load(path, model=...)")
        return timm.create_model(name, pretrained=False, **kwargs)
    if library == "torchvision":
        import torchvision

        for name in torchvision.models.list_models(module=torchvision.models):
            builder = torchvision.models.get_model_builder(name)
            if f"{builder.__module__}.{_returns(builder)}" != spec["class"]:
                continue
            try:
                candidate = torchvision.models.get_model(name, weights=None, **kwargs)
            except (TypeError, ValueError):
                continue
            shapes = {k: tuple(v.shape) for k, v in candidate.state_dict().items()}
            if shapes == state_shapes:
                return candidate
        raise CheckpointError(
            f"no torchvision builder makes a {spec['class']} with the checkpoint's weights; "
            f"pass the architecture yourself: lfnnify.load(path, model=torchvision.models.<name>(...))"
        )
    raise CheckpointError(
        f"the checkpoint holds a {spec.get('class')}, which lfnnify cannot rebuild by name (only timm and "
        f"torchvision models can be); pass it: lfnnify.load(path, model=<an instance of that architecture>)"
    )


def _returns(builder) -> str:
    annotation = getattr(builder, "__annotations__", {}).get("return")
    return getattr(annotation, "__name__", str(annotation))


def cifar_variant(model: nn.Module) -> nn.Module:
    """Adapt an ImageNet ResNet for 32×32 inputs the way SEDONA and the paper do: remove the
    max-pool after the first convolution (timm and torchvision ResNets keep every other layer).
    Models without such a max-pool are returned unchanged. Modifies and returns ``model``."""
    if isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        model.maxpool = nn.Identity()
    return model
