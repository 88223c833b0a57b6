"""Checkpoints (safetensors + JSON, written atomically), export to the original architecture, pretrained weights."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .errors import CheckpointError
from .model import LFNNModel
from .plan import find_classifier

__all__ = ["save", "load", "export", "load_pretrained", "describe_model", "read_trainer_state"]

FORMAT = "lfnnify-checkpoint"
META, WEIGHTS, TRAINER_META, TRAINER_TENSORS = "lfnnify.json", "model.safetensors", "trainer.json", "trainer.safetensors"


# ---------------------------------------------------------------- describing a model so load() can rebuild it


def describe_model(model: nn.Module) -> dict:
    """What ``load`` needs to rebuild ``model``: timm's architecture name and arguments, or
    torchvision's class (the builder is found at load time), or just the class for anything else."""
    cls = type(model)
    spec: dict = {"class": f"{cls.__module__}.{cls.__qualname__}"}
    if isinstance(getattr(model, "maxpool", None), nn.Identity):
        spec["cifar_variant"] = True  # lfnnify.models.cifar_variant: no weights show it, so record it
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


def _rebuild(spec: dict, state_keys: dict[str, tuple]) -> nn.Module:
    model = _rebuild_by_name(spec, state_keys)
    if spec.get("cifar_variant"):
        from .models import cifar_variant

        cifar_variant(model)
    return model


def _rebuild_by_name(spec: dict, state_keys: dict[str, tuple]) -> nn.Module:
    library = spec.get("library")
    if library == "timm":
        import timm

        kwargs = {k: v for k, v in spec.get("kwargs", {}).items() if v is not None}
        return timm.create_model(spec["name"], pretrained=False, **kwargs)
    if library == "torchvision":
        import torchvision

        for name in torchvision.models.list_models(module=torchvision.models):
            builder = torchvision.models.get_model_builder(name)
            if f"{builder.__module__}.{_returns(builder)}" != spec["class"]:
                continue
            try:
                candidate = torchvision.models.get_model(name, weights=None, **spec.get("kwargs", {}))
            except (TypeError, ValueError):
                continue
            shapes = {k: tuple(v.shape) for k, v in candidate.state_dict().items()}
            if shapes == state_keys:
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


# ---------------------------------------------------------------- tensors and JSON


def _flatten(value, tensors: dict, path: str):
    """Nested dicts/lists with tensors -> JSON with tensor references, tensors collected by key."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, dict):
        return {"__dict__": [[k, _flatten(v, tensors, f"{path}.{k}")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {path} in a checkpoint (only tensors and JSON values)")


def _unflatten(value, tensors: dict):
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__dict__" in value:
            return {k: _unflatten(v, tensors) for k, v in value["__dict__"]}
        return {k: _unflatten(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    return value


def _unshare(state: dict) -> dict:
    """safetensors refuses tensors that share memory (tied parameters, views): copy those."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


# ---------------------------------------------------------------- save / load


def save(net: LFNNModel, path: str | os.PathLike, *, trainer=None) -> Path:
    """Save a converted model (and optionally its trainer's state, to resume) as a checkpoint folder.

    The folder holds ``model.safetensors`` and ``lfnnify.json`` (plan, configuration, how to rebuild
    the architecture), plus ``trainer.safetensors``/``trainer.json`` when ``trainer`` is given. It is
    written next to ``path`` first and then swapped in, so an existing checkpoint is never half-overwritten.

    Example:
        >>> lfnnify.save(net, "runs/x/ckpt", trainer=trainer)
    """
    if not isinstance(net, LFNNModel):
        raise TypeError(f"save() takes a model from lfnnify.convert, got {type(net).__name__}")
    path = Path(path)
    meta = {
        "format": FORMAT,
        "format_version": 1,
        "lfnnify_version": __version__,
        "config": net.config,
        "cuts": net.plan.cuts,
        "input_shape": list(net.plan.input_shape),
        "model": net.config.get("model") or describe_model(net._source),
        "source_state_shapes": {k: list(v.shape) for k, v in net._source.state_dict().items()},
    }
    stage = getattr(net, "_pipeline", None)
    if stage is not None:
        return _save_pipeline_stage(net, path, meta, trainer, stage)
    meta["fingerprint"] = _fingerprint(net, meta["input_shape"])
    files: dict[str, object] = {WEIGHTS: _unshare(net.state_dict()), META: meta}
    if trainer is not None:
        tensors: dict = {}
        files[TRAINER_META] = {"state": _flatten(trainer.state_dict(), tensors, "trainer")}
        files[TRAINER_TENSORS] = _unshare(tensors)
    _write_folder_atomically(path, files)
    return path


def _save_pipeline_stage(net: LFNNModel, path: Path, meta: dict, trainer, stage: dict) -> Path:
    """Called on every rank: replica 0 of each block writes its block, head and trainer state; rank 0
    writes the description and swaps the finished folder in. All ranks must share the filesystem."""
    import torch.distributed as dist

    k, rank = stage["stage"], stage["rank"]
    tmp = path.parent / f".{path.name}.tmp"
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    if stage["replica"] == 0:
        prefixes = (f"blocks.{k}.", f"heads.{k}.")
        own = {n: t for n, t in net.state_dict().items() if n.startswith(prefixes)}
        save_file(_unshare(own), str(tmp / f"block{k}.safetensors"), metadata={"format": FORMAT})
        if trainer is not None:
            tensors: dict = {}
            state = {"state": _flatten(trainer.state_dict(), tensors, "trainer")}
            (tmp / f"trainer-block{k}.json").write_text(json.dumps(state, default=str))
            save_file(_unshare(tensors), str(tmp / f"trainer-block{k}.safetensors"), metadata={"format": FORMAT})
    dist.barrier()
    if rank == 0:
        meta["pipeline"] = {"blocks": net.num_blocks, "replicas": stage["replicas"]}
        (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
        _swap_in(tmp, path)
    dist.barrier()
    return path


def _fingerprint(net: LFNNModel, input_shape) -> list[float]:
    """The model's eval-mode outputs on a fixed input: ``load`` checks that the rebuilt model agrees,
    so an architecture rebuilt differently (a changed layer without weights) can't pass silently."""
    from .model import main_output

    device = next(net.parameters()).device
    x = torch.randn(2, *input_shape[1:], generator=torch.Generator().manual_seed(0)).to(device)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = main_output(net(x)).float().flatten()
    finally:
        net.train(was_training)
    return out[:32].cpu().tolist()


def _write_folder_atomically(path: Path, files: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, content in files.items():
        if name.endswith(".safetensors"):
            save_file(content, str(tmp / name), metadata={"format": FORMAT})
        else:
            (tmp / name).write_text(json.dumps(content, indent=1, default=str))
    _swap_in(tmp, path)


def _swap_in(finished: Path, path: Path) -> None:
    """Replace ``path`` by the completely written folder ``finished``; the old one goes only afterwards."""
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.exists():
        path.rename(old)
    finished.rename(path)
    if old.exists():
        shutil.rmtree(old)


def _read_meta(path: Path) -> dict:
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is not an lfnnify checkpoint: checkpoints are folders written by lfnnify.save"
            + (" (this is a file; for plain weights use lfnnify.load_pretrained)" if path.is_file() else " (it does not exist)")
        )
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not an lfnnify checkpoint: it has no {META}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / META} is damaged ({exc}); the checkpoint cannot be read") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / META} is not an lfnnify checkpoint description (format={meta.get('format')!r})")
    return meta


def _load_tensors(file: Path) -> dict:
    try:
        return load_file(str(file))
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is damaged or truncated ({exc}); the checkpoint cannot be read") from None


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
        lfnnify.CheckpointError: not a checkpoint, damaged or truncated files, architecture mismatch.
    """
    from .convert import convert

    path = Path(path)
    meta = _read_meta(path)
    weights = _read_weights_of(path, meta)
    shapes = {k: tuple(v) for k, v in meta.get("source_state_shapes", {}).items()}
    source = model if model is not None else _rebuild(meta["model"], shapes)
    config = meta["config"]
    if config.get("head") not in ("linear", None) and head is None:
        raise CheckpointError(
            f"the checkpoint was trained with a custom head ({config['head']!r}); pass the same factory: "
            f"lfnnify.load(path, head=...)"
        )
    net = convert(
        source,
        cuts=meta["cuts"],
        workers=config["workers"],
        leaders=config["leaders"],
        mode=config["mode"],
        follower_weight=config["follower_weight"],
        head=head or "linear",
        num_classes=config["num_classes"],
        example_input=torch.zeros(meta["input_shape"]),
        leaf_modules=leaf_modules,
    )
    net.config["model"] = meta["model"]
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit this architecture: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}). Pass the architecture it was saved from as model=."
        )
    expected = meta.get("fingerprint")
    if expected is not None:
        got = _fingerprint(net, meta["input_shape"])
        if not torch.allclose(torch.tensor(got), torch.tensor(expected), rtol=1e-3, atol=1e-4):
            raise CheckpointError(
                f"{path}: the rebuilt {type(source).__name__} loads the weights but computes something else than "
                f"the saved model (outputs on a fixed input differ), so its architecture differs in a way the weights "
                f"don't show. Pass the exact architecture: lfnnify.load(path, model=...)"
            )
    return net


def _read_weights_of(path: Path, meta: dict) -> dict:
    if "pipeline" in meta:  # one file per block, written by each rank of a pipeline run
        weights = {}
        for k in range(meta["pipeline"]["blocks"]):
            weights.update(_load_tensors(path / f"block{k}.safetensors"))
        return weights
    return _load_tensors(path / WEIGHTS)


def load_weights_into(net: LFNNModel, path: str | os.PathLike) -> LFNNModel:
    """Copy a checkpoint's weights into ``net``, a model converted the same way (used to resume runs)."""
    path = Path(path)
    meta = _read_meta(path)
    if meta["cuts"] != net.plan.cuts:
        raise CheckpointError(f"{path} was cut at {meta['cuts']}, this model at {net.plan.cuts}; convert it the same way")
    stage = getattr(net, "_pipeline", None)
    weights = _read_weights_of(path, meta)
    if stage is not None:  # a pipeline rank holds only its own block and head
        own = (f"blocks.{stage['stage']}.", f"heads.{stage['stage']}.")
        weights = {k: v for k, v in weights.items() if k.startswith(own)}
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if unexpected or (stage is None and missing):
        raise CheckpointError(f"{path} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return net


def read_trainer_state(path: str | os.PathLike, *, block: int | None = None) -> dict:
    """The trainer state stored by ``save(net, path, trainer=...)``, for ``Trainer.load_state_dict``.

    For a checkpoint written by a pipeline run, ``block=`` picks that block's rank's state
    (``PipelineTrainer.stage``).
    """
    path = Path(path)
    meta = _read_meta(path)
    names = (TRAINER_META, TRAINER_TENSORS)
    if "pipeline" in meta:
        if block is None:
            raise CheckpointError(f"{path} was written by a pipeline run: pass block=trainer.stage")
        names = (f"trainer-block{block}.json", f"trainer-block{block}.safetensors")
    if not (path / names[0]).exists():
        raise CheckpointError(f"{path} holds no trainer state; it was saved without trainer=, so it cannot resume")
    tensors = _load_tensors(path / names[1])
    try:
        stored = json.loads((path / names[0]).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / names[0]} is damaged ({exc})") from None
    return _unflatten(stored["state"], tensors)


# ---------------------------------------------------------------- export and pretrained weights


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

    With ``path``, also writes its state dict as safetensors (atomically), which
    ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=N), num_classes=N)``
    or ``torchvision_model.load_state_dict(safetensors.torch.load_file(path))`` read back.
    The converted model is not modified.
    """
    model = copy.deepcopy(net._source)
    model.load_state_dict(original_state_dict(net), strict=True)
    model.train(net.training)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        save_file(_unshare(model.state_dict()), str(tmp))
        tmp.replace(path)
    return model


_PREFIXES = ("module.", "model.", "_orig_mod.")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix == ".safetensors":
        return _load_tensors(path)
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
    classifier_keys = set()
    if classifier is not None:
        name = next(n for n, m in model.named_modules() if m is classifier)
        classifier_keys = {f"{name}.weight", f"{name}.bias"}
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
