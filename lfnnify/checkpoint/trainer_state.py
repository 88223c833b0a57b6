"""A trainer's state in a checkpoint: two files per trainer (JSON, and a safetensors file of its tensors), one pair per
pipeline rank, and how they are read back."""

from __future__ import annotations

import os
from pathlib import Path

import lfnnify.checkpoint.files as fileio
import lfnnify.checkpoint.store as store

from ..errors import CheckpointError
from .description import read_meta

__all__ = ["trainer_names", "trainer_blobs", "parse_trainer_state", "read_trainer_blobs", "read_trainer_state"]

TRAINER_META, TRAINER_TENSORS = "trainer.json", "trainer.safetensors"
_TRAINER_KEYS = ("step", "epoch", "step_in_epoch", "optimizers", "schedulers", "rng", "epoch_counts")


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
    try:
        state = fileio.unflatten(stored["state"], tensors)
    except CheckpointError as exc:
        raise CheckpointError(f"{folder / names[0]}: {exc}") from None
    except (TypeError, ValueError, AttributeError):
        raise CheckpointError(f"{folder / names[0]} is damaged: its 'state' is not what lfnnify writes") from None
    missing = [k for k in _TRAINER_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{folder / names[0]} is damaged: the trainer state lacks "
                              f"{', '.join(map(repr, missing))}")
    return state


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
    return {name: fileio.read_verified(folder / name, sums.get(name),
                                       limit=fileio.MAX_JSON_BYTES if name.endswith(".json") else None)
            for name in names}
