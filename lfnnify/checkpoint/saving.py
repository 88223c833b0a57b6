"""Saving a converted model (and its trainer) as a checkpoint folder: one new version, published when complete."""

from __future__ import annotations

import os
from pathlib import Path

import torch

import lfnnify.checkpoint.files as fileio
import lfnnify.checkpoint.store as store

from ..errors import CheckpointError, ConfigError
from ..surgery.model import LFNNModel, main_output
from .description import WEIGHTS, describe_checkpoint
from .trainer_state import trainer_blobs, trainer_names

__all__ = ["save", "nonfinite", "refuse_nonfinite", "fingerprint", "fingerprint_input"]


def save(net: LFNNModel, path: str | os.PathLike, *, trainer=None) -> Path:
    """Save a converted model (and optionally its trainer's state, to resume) as a checkpoint folder.

    The folder holds ``model.safetensors`` and ``lfnnify.json`` (plan, configuration, how to rebuild the
    architecture, a checksum of every file), plus ``trainer.safetensors``/``trainer.json`` when ``trainer``
    is given. A new version is written completely beside the old one and then made current by replacing a
    small pointer file atomically, so a save killed at any moment leaves the previous checkpoint loadable.
    Under :class:`~lfnnify.PipelineTrainer` every rank calls ``save`` with ``trainer=``: the trainer writes the
    whole model and every rank's state on rank 0's host (``PipelineTrainer.save_checkpoint``).

    Example:
        >>> lfnnify.save(net, "runs/x/ckpt", trainer=trainer)

    Raises:
        lfnnify.CheckpointError: ``path`` is a file (nothing is touched then).
    """
    if not isinstance(net, LFNNModel):
        raise ConfigError(f"save() takes a model from lfnnify.convert, got {type(net).__name__}")
    path = Path(path)
    writer = getattr(trainer, "save_checkpoint", None)  # a trainer that writes its own checkpoints: the pipeline
    if writer is not None:
        if getattr(trainer, "net", None) is not net:
            raise ConfigError("save(net, path, trainer=...): this trainer trains another model; pass its own, "
                              "trainer.net")
        return writer(path)
    if net.held_blocks != list(range(net.num_blocks)):
        raise ConfigError(
            f"this model holds only block(s) {net.held_blocks} (a pipeline rank frees the others), so it cannot be "
            f"saved alone: save it with its trainer, on every rank together: lfnnify.save(net, path, trainer=trainer)")
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
        (tmp / store.META).write_bytes(fileio.describe(meta))
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
