"""Checkpoints: save and load a converted model (and its trainer), export it back, read pretrained weights."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .._version import __version__
from ..errors import CheckpointError, ConfigError, DataNotFoundError
from ..surgery.conversion import convert
from ..surgery.facts import classifier_parameter_names, describe_model, find_classifier, rebuild_model
from ..surgery.heads import HEADS
from ..surgery.model import LFNNModel, main_output
from . import files as fileio
from . import store

__all__ = ["save", "load", "export", "load_pretrained", "read_trainer_state", "load_weights_into", "exists",
           "describe_checkpoint", "trainer_names", "trainer_blobs", "parse_trainer_state", "read_trainer_blobs",
           "read_meta"]

WEIGHTS, TRAINER_META, TRAINER_TENSORS = "model.safetensors", "trainer.json", "trainer.safetensors"
_META_KEYS = ("format", "config", "cuts", "input_shape", "model")
_CONFIG_KEYS = ("workers", "leaders", "mode", "follower_weight", "num_classes")
_TRAINER_KEYS = ("step", "epoch", "step_in_epoch", "optimizers", "schedulers", "rng", "epoch_counts")
exists = store.exists


# ---------------------------------------------------------------- save


def describe_checkpoint(net: LFNNModel, source_shapes: dict | None = None) -> dict:
    """The description ``lfnnify.json`` holds: how the model was converted and how to rebuild it."""
    return {
        "format": fileio.FORMAT,
        "format_version": 2,
        "lfnnify_version": __version__,
        "config": net.config,
        "cuts": net.plan.cuts,
        "input_shape": list(net.plan.input_shape),
        "model": net.config.get("model") or describe_model(net._source),
        "source_state_shapes": source_shapes or {k: list(v.shape) for k, v in net._source.state_dict().items()},
    }


def trainer_names(block: int | None = None, replica: int = 0) -> tuple[str, str]:
    """The two files of a trainer's state (JSON, tensors): one process's, or a pipeline rank's by its block and
    replica."""
    if block is None:
        return TRAINER_META, TRAINER_TENSORS
    stem = f"trainer-block{block}" + (f"-replica{replica}" if replica else "")
    return f"{stem}.json", f"{stem}.safetensors"


def trainer_blobs(trainer, names: tuple[str, str]) -> dict[str, bytes]:
    """A trainer's state as the bytes of its two files: JSON, and a safetensors file of its tensors."""
    tensors: dict = {}
    content = {"state": fileio.flatten(trainer.state_dict(), tensors, "trainer")}
    return {names[0]: fileio.json_bytes(content), names[1]: fileio.tensor_bytes(tensors)}


def parse_trainer_state(blobs: dict[str, bytes], names: tuple[str, str], folder: Path) -> dict:
    """The trainer state in the bytes of its two files (read from ``folder``, where errors say they are)."""
    tensors = fileio.tensors_from_bytes(blobs[names[1]], folder / names[1])
    stored = fileio.json_from_bytes(blobs[names[0]], folder / names[0], ("state",))
    state = fileio.unflatten(stored["state"], tensors)
    missing = [k for k in _TRAINER_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{folder / names[0]} is damaged: the trainer state lacks "
                              f"{', '.join(map(repr, missing))}")
    return state


def save(net: LFNNModel, path: str | os.PathLike, *, trainer=None) -> Path:
    """Save a converted model (and optionally its trainer's state, to resume) as a checkpoint folder.

    The folder holds ``model.safetensors`` and ``lfnnify.json`` (plan, configuration, how to rebuild the
    architecture, a checksum of every file), plus ``trainer.safetensors``/``trainer.json`` when ``trainer``
    is given. A new version is written completely beside the old one and then made current by replacing a
    small pointer file atomically, so a save killed at any moment leaves the previous checkpoint loadable.
    Under :class:`~lfnnify.PipelineTrainer` every rank calls ``save``; each writes its own block.

    Example:
        >>> lfnnify.save(net, "runs/x/ckpt", trainer=trainer)

    Raises:
        lfnnify.CheckpointError: ``path`` is a file (nothing is touched then).
    """
    if not isinstance(net, LFNNModel):
        raise ConfigError(f"save() takes a model from lfnnify.convert, got {type(net).__name__}")
    path = Path(path)
    shard = getattr(net, "_shard", None)
    if shard is not None:  # a pipeline rank: the pipeline side writes per-block files
        return shard.save(net, path, trainer=trainer)
    refuse_nonfinite(nonfinite(net.state_dict()), path)
    meta = describe_checkpoint(net)
    meta["fingerprint"] = fingerprint(net, meta["input_shape"])
    store.fault_point("before-write")
    with store.writing(path) as tmp:
        fileio.write_tensors(tmp / WEIGHTS, net.state_dict())
        store.fault_point("mid-write")
        files = [WEIGHTS]
        if trainer is not None:
            for name, data in trainer_blobs(trainer, trainer_names()).items():
                (tmp / name).write_bytes(data)
                files.append(name)
        meta["files"] = {name: fileio.sha256(tmp / name) for name in files}
        fileio.write_json(tmp / store.META, meta)
    return path


def nonfinite(state: dict) -> list[str]:
    """The names of the tensors in ``state`` that hold inf or nan."""
    return [k for k, v in state.items() if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all())]


def refuse_nonfinite(bad: list[str], path: Path) -> None:
    """Refuse to save weights or statistics that hold inf or nan (``bad`` names them): the save would replace the
    last good checkpoint with a model that cannot predict."""
    if bad:
        raise CheckpointError(
            f"the model holds inf or nan in {len(bad)} tensor{'s' if len(bad) > 1 else ''} ({', '.join(bad[:3])}), "
            f"so it was not saved to {path}: the last good checkpoint there stays current. This follows a "
            f"non-finite loss; resume from that checkpoint with a lower learning rate or grad_clip="
        )


def fingerprint(net: LFNNModel, input_shape) -> list[float]:
    """The model's eval-mode outputs on a fixed input: ``load`` checks that the rebuilt model agrees,
    so an architecture rebuilt differently (a changed layer without weights) can't pass silently."""
    device = next(net.parameters()).device
    x = fingerprint_input(input_shape).to(device)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = main_output(net(x)).float().flatten()
    finally:
        net.train(was_training)
    return out[:32].cpu().tolist()


def fingerprint_input(input_shape) -> torch.Tensor:
    return torch.randn(2, *input_shape[1:], generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- load


def read_meta(folder: Path, digest: str | None) -> dict:
    """The validated description of the checkpoint version in ``folder`` (from :func:`_store.reading`)."""
    store.check_description(folder, digest)
    meta = fileio.read_json(folder / store.META, _META_KEYS, expected_sha256=digest)
    if meta.get("format") != fileio.FORMAT:
        raise CheckpointError(f"{folder / store.META} is not an lfnnify checkpoint description "
                              f"(format={meta.get('format')!r})")
    missing = [k for k in _CONFIG_KEYS if k not in meta["config"]]
    if missing:
        raise CheckpointError(f"{folder / store.META} is damaged: its 'config' lacks {', '.join(map(repr, missing))}")
    return meta


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
    net = convert(
        source,
        cuts=meta["cuts"],
        workers=config["workers"],
        leaders=config["leaders"],
        mode=config["mode"],
        follower_weight=config["follower_weight"],
        local_weight=config.get("local_weight", 0.0),
        weight_stashing=config.get("weight_stashing", False),
        weight_prediction=config.get("weight_prediction", False),
        spike_compensation=config.get("spike_compensation", False),
        head=head or saved_head,
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
        got = fingerprint(net, meta["input_shape"])
        if not torch.allclose(torch.tensor(got), torch.tensor(expected), rtol=1e-3, atol=1e-4):
            raise CheckpointError(
                f"{path}: the rebuilt {type(source).__name__} loads the weights but computes something else than "
                f"the saved model (outputs on a fixed input differ), so its architecture differs in a way the weights "
                f"don't show. Pass the exact architecture: lfnnify.load(path, model=...)"
            )
    return net


def load_weights_into(net: LFNNModel, path: str | os.PathLike) -> LFNNModel:
    """Copy a checkpoint's weights into ``net``, a model converted the same way (used to resume runs)."""
    path = Path(path)
    with store.reading(path) as (folder, digest):
        meta = read_meta(folder, digest)
        if meta["cuts"] != net.plan.cuts:
            raise CheckpointError(f"{path} was cut at {meta['cuts']}, this model at {net.plan.cuts}; convert it the "
                                  f"same way")
        weights = read_weights(folder, meta)
    shard = getattr(net, "_shard", None)
    if shard is not None:  # a pipeline rank holds only its own block and head
        weights = shard.own(weights)
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if unexpected or (shard is None and missing):
        raise CheckpointError(f"{path} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return net


def read_trainer_state(path: str | os.PathLike, *, block: int | None = None, replica: int = 0) -> dict:
    """The trainer state stored by ``save(net, path, trainer=...)``, for ``Trainer.load_state_dict``.

    For a checkpoint written by a pipeline run, ``block=`` and ``replica=`` pick that rank's state
    (``PipelineTrainer.stage`` and ``.replica``); every rank's is kept.
    """
    path = Path(path)
    with store.reading(path) as (folder, digest):
        meta = read_meta(folder, digest)
        if "pipeline" in meta and block is None:
            raise CheckpointError(f"{path} was written by a pipeline run: pass block=trainer.stage (and "
                                  f"replica=trainer.replica)")
        names = trainer_names(block if "pipeline" in meta else None, replica)
        blobs = read_trainer_blobs(folder, meta, names, path)
    return parse_trainer_state(blobs, names, folder)


def read_trainer_blobs(folder: Path, meta: dict, names: tuple[str, str], path: Path) -> dict[str, bytes]:
    """The bytes of a trainer state's two files in the checkpoint version ``folder``, checked against its sums."""
    sums = meta.get("files", {})
    if not (folder / names[0]).exists():
        if names[0] in sums:
            raise CheckpointError(f"{folder / names[0]} is missing (the checkpoint was saved with its trainer "
                                  f"state, which is gone); the checkpoint is incomplete, so it cannot resume")
        raise CheckpointError(f"{path} holds no trainer state for {names[0].removesuffix('.json')}; it was saved "
                              f"without trainer= (or by another layout), so it cannot resume")
    return {name: fileio.read_verified(folder / name, sums.get(name)) for name in names}


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
        if path.is_dir():
            raise CheckpointError(f"{path} is a folder; export writes one .safetensors file: give a file name")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        try:
            save_file(fileio.unshare(model.state_dict()), str(tmp))
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    return model


_PREFIXES = ("module.", "model.", "_orig_mod.")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise DataNotFoundError(f"no weights file at {path}; pass the path of a .safetensors or .pth file")
    if path.suffix == ".safetensors":
        return fileio.load_tensors(path)
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
