"""What a checkpoint's files hold and how they are checked: safetensors and JSON, with sha256 checksums.

How the files lie in a checkpoint folder (versions, the pointer, the locks) is :mod:`lfnnify.checkpoint.store`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from ..errors import CheckpointError

__all__ = ["FORMAT", "FORMAT_VERSION", "sha256", "verify", "write_tensors", "write_json", "load_tensors", "read_json",
           "flatten", "unflatten", "unshare", "tensor_bytes", "json_bytes", "read_verified", "tensors_from_bytes",
           "json_from_bytes", "check_name", "describe", "description_intact", "MAX_JSON_BYTES"]

FORMAT = "lfnnify-checkpoint"
FORMAT_VERSION = 2  # the newest description this lfnnify reads and writes
MAX_JSON_BYTES = 64 << 20  # a description or a trainer's JSON is far smaller; anything larger is not read
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # a plain file name: no folder, no '..', no leading dot


# ---------------------------------------------------------------- files


def sha256(file: Path) -> str:
    return hashlib.sha256(read_verified(file)).hexdigest()


def check_name(name, where: Path) -> str:
    """A file name a checkpoint lists: a plain name inside its own folder, never a path that leads out of it."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise CheckpointError(f"{where} lists a file {str(name)[:80]!r}, which is not a plain file name inside the "
                              f"checkpoint's folder; a checkpoint reads only its own files, so it was refused")
    return name


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


def read_verified(file: Path, expected_sha256: str | None = None, *, limit: int | None = None,
                  follow_symlinks: bool = False) -> bytes:
    """A checkpoint file's bytes, refused when they differ from those recorded at the save.

    It is opened without following a symbolic link (``follow_symlinks`` for a file the user names, such as
    pretrained weights in a cache) and without waiting on a FIFO, and read only when it is a regular file of at
    most ``limit`` bytes: anything else (a link to a device, a pipe, a huge file) is refused before a byte is
    read, with one message whatever it holds."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(file, flags)
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise _not_regular(file) from None
        raise
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(file)
        if limit is not None and info.st_size > limit:
            raise CheckpointError(f"{file} holds {info.st_size:,} bytes, more than such a file of a checkpoint can "
                                  f"({limit:,}); it was not read")
        data = f.read(info.st_size + 1)
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise _damaged(file)
    return data


def _not_regular(file: Path) -> CheckpointError:
    return CheckpointError(f"{file} is not a regular file (a symbolic link, a folder, a pipe or a device); a "
                           f"checkpoint holds only regular files, so it was not read")


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
    except RecursionError:
        raise CheckpointError(f"{file} is damaged: it nests deeper than any file lfnnify writes") from None
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


def load_tensors(file: Path, expected_sha256: str | None = None, *, follow_symlinks: bool = False) -> dict:
    """A checkpoint's (or a weights file's) tensors: a regular file, checked against its recorded checksum."""
    return tensors_from_bytes(read_verified(file, expected_sha256, follow_symlinks=follow_symlinks), file)


def read_json(file: Path, required: tuple[str, ...] = (), expected_sha256: str | None = None) -> dict:
    """A checkpoint's JSON file, checked (see :func:`json_from_bytes`)."""
    return json_from_bytes(read_verified(file, expected_sha256, limit=MAX_JSON_BYTES), file, required)


# ---------------------------------------------------------------- the description's own checksum
# CURRENT records the description's checksum. Should the two disagree, the description's own checksum, over its
# other contents, says which of the two changed since the save.


def describe(meta: dict) -> bytes:
    """The bytes of a checkpoint's description, with its own checksum (``self_sha256``) added."""
    body = {k: v for k, v in meta.items() if k != "self_sha256"}
    return json_bytes({**body, "self_sha256": hashlib.sha256(json_bytes(body)).hexdigest()})


def description_intact(data: bytes) -> bool | None:
    """Whether a description's bytes are as they were saved (its own checksum holds); None when it has none (written
    before it was recorded) or cannot be parsed."""
    try:
        meta = json.loads(data.decode())
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("self_sha256"), str):
        return None
    body = {k: v for k, v in meta.items() if k != "self_sha256"}
    return hashlib.sha256(json_bytes(body)).hexdigest() == meta["self_sha256"]


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


def unflatten(value, tensors: dict, depth: int = 0):
    if depth > 64:
        raise CheckpointError("the trainer state nests deeper than any lfnnify writes; it is damaged")
    if isinstance(value, dict):
        if "__tensor__" in value:
            key = value["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"the trainer state refers to tensor {key!r}, which its tensor file lacks")
            return tensors[key]
        if "__dict__" in value:
            items = value["__dict__"]
            if not isinstance(items, list) or not all(isinstance(i, list) and len(i) == 2 for i in items):
                raise CheckpointError("the trainer state is damaged: a '__dict__' entry is not a list of key, value")
            return {k: unflatten(v, tensors, depth + 1) for k, v in items}
        return {k: unflatten(v, tensors, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [unflatten(v, tensors, depth + 1) for v in value]
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
