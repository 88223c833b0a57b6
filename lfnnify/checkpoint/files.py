"""What a checkpoint's files hold and how they are checked: safetensors and JSON, with sha256 checksums.

How the files lie in a checkpoint folder (versions, the pointer, the locks) is :mod:`lfnnify.checkpoint.store`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from ..errors import CheckpointError

__all__ = ["FORMAT", "sha256", "verify", "write_tensors", "write_json", "load_tensors", "read_json", "flatten",
           "unflatten", "unshare", "tensor_bytes", "json_bytes", "read_verified", "tensors_from_bytes",
           "json_from_bytes"]

FORMAT = "lfnnify-checkpoint"


# ---------------------------------------------------------------- files


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _damaged(file: Path) -> CheckpointError:
    return CheckpointError(
        f"{file} is damaged: its checksum differs from the one recorded when it was saved, so its contents "
        f"changed on disk. Restore it from a copy, or use another checkpoint."
    )


def verify(file: Path, expected: str | None) -> None:
    """Refuse a file whose bytes changed since it was saved."""
    if expected is None:
        return
    if not file.exists():
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete")
    if sha256(file) != expected:
        raise _damaged(file)


def read_verified(file: Path, expected_sha256: str | None = None) -> bytes:
    """A checkpoint file's bytes, refused when they differ from those recorded at the save."""
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete") from None
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise _damaged(file)
    return data


# ---------------------------------------------------------------- the files' contents, as bytes
# A pipeline rank serialises its part of a checkpoint to these bytes, which rank 0 writes as files: a file holds
# exactly what the wire carried, and one parser reads both.


def tensor_bytes(tensors: dict) -> bytes:
    return save_bytes(unshare(tensors), metadata={"format": FORMAT})


def json_bytes(content: dict) -> bytes:
    return json.dumps(content, indent=1, default=str).encode()


def tensors_from_bytes(data: bytes, file: Path) -> dict:
    """The tensors of ``file``'s bytes; a damaged or truncated file is refused, naming it."""
    try:
        return load_bytes(data)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is damaged or truncated ({exc}); the checkpoint cannot be read") from None


def json_from_bytes(data: bytes, file: Path, required: tuple[str, ...] = ()) -> dict:
    """A checkpoint's JSON file, checked: it parses, it is an object, and it has every ``required`` key."""
    try:
        content = json.loads(data.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is damaged ({exc}); the checkpoint cannot be read") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{file} is damaged: it holds a {type(content).__name__}, not a JSON object")
    missing = [k for k in required if k not in content]
    if missing:
        raise CheckpointError(
            f"{file} is damaged or not written by lfnnify: it lacks the key{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(k) for k in missing)}"
        )
    return content


def write_tensors(file: Path, tensors: dict) -> None:
    file.write_bytes(tensor_bytes(tensors))


def write_json(file: Path, content: dict) -> None:
    file.write_bytes(json_bytes(content))


def load_tensors(file: Path, expected_sha256: str | None = None) -> dict:
    return tensors_from_bytes(read_verified(file, expected_sha256), file)


def read_json(file: Path, required: tuple[str, ...] = (), expected_sha256: str | None = None) -> dict:
    """A checkpoint's JSON file, checked (see :func:`json_from_bytes`)."""
    return json_from_bytes(read_verified(file, expected_sha256), file, required)


# ---------------------------------------------------------------- tensors and JSON


def flatten(value, tensors: dict, path: str):
    """Nested dicts/lists with tensors -> JSON with tensor references, tensors collected by key."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, dict):
        return {"__dict__": [[k, flatten(v, tensors, f"{path}.{k}")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {path} in a checkpoint (only tensors and JSON values)")


def unflatten(value, tensors: dict):
    if isinstance(value, dict):
        if "__tensor__" in value:
            key = value["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"the trainer state refers to tensor {key!r}, which its tensor file lacks")
            return tensors[key]
        if "__dict__" in value:
            return {k: unflatten(v, tensors) for k, v in value["__dict__"]}
        return {k: unflatten(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [unflatten(v, tensors) for v in value]
    return value


def unshare(state: dict) -> dict:
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
