"""How a checkpoint folder lies on disk: versioned sub-folders, an atomically replaced pointer, checksums.

::

    ckpt/
      CURRENT              "v000007 <sha256 of v000007/lfnnify.json>", replaced atomically (write + rename)
      v000007/             the complete checkpoint CURRENT names
        lfnnify.json       description, with the sha256 of every other file
        model.safetensors  ...

A save writes ``v000008.tmp-<pid>/`` completely, renames it to ``v000008/``, then replaces ``CURRENT``;
only then are older versions removed. So at every instant ``CURRENT`` names a complete checkpoint, and a
save killed at any point leaves the previous one loadable. Leftovers of killed saves are removed by the
next save. A folder written by lfnnify 0.1 (files directly in ``ckpt/``, no ``CURRENT``) still loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

__all__ = ["FORMAT", "META", "check_target", "new_version", "publish", "current_folder", "exists", "read_json",
           "load_tensors", "write_tensors", "write_json", "sha256", "verify", "flatten", "unflatten", "unshare",
           "fault_point"]

FORMAT = "lfnnify-checkpoint"
META = "lfnnify.json"
POINTER = "CURRENT"
_VERSION = re.compile(r"^v(\d{6})$")


def fault_point(name: str) -> None:
    """Tests of crash safety kill the process here for real (``LFNNIFY_KILL_AT=name``); otherwise nothing."""
    if os.environ.get("LFNNIFY_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- versions and the pointer


def check_target(path: Path) -> None:
    """Refuse, before touching anything, a save path that is a file rather than a checkpoint folder."""
    if path.exists() and not path.is_dir():
        raise CheckpointError(
            f"{path} is a file, not a checkpoint folder; lfnnify.save writes a folder there and will not replace "
            f"a file. Choose another path or remove the file yourself."
        )


def new_version(path: Path) -> Path:
    """Create ``path`` if needed, remove leftovers of killed saves, and return a fresh temporary folder for the
    next version (renamed into place by :func:`publish`)."""
    check_target(path)
    path.mkdir(parents=True, exist_ok=True)
    for child in path.iterdir():
        if ".tmp-" in child.name:  # a save that was killed before it finished
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    for stale in path.parent.glob(f".{path.name}.*-*"):  # lfnnify 0.1's temporary folders next to the path
        if stale.is_dir() and re.search(r"\.(tmp|old)-\d+$", stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    numbers = [int(m.group(1)) for c in path.iterdir() if (m := _VERSION.match(c.name))]
    number = max(numbers, default=0) + 1
    tmp = path / f"v{number:06d}.tmp-{os.getpid()}"
    tmp.mkdir()
    return tmp


def publish(tmp: Path) -> Path:
    """Make the completely written ``tmp`` the checkpoint its parent folder points to, atomically; then
    remove what the pointer no longer names."""
    path = tmp.parent
    final = path / tmp.name.split(".tmp-")[0]
    _fsync_folder(tmp)
    tmp.rename(final)
    fault_point("before-pointer")
    meta_hash = sha256(final / META)
    pointer_tmp = path / f"{POINTER}.tmp-{os.getpid()}"
    with open(pointer_tmp, "w") as f:
        f.write(f"{final.name} {meta_hash}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, path / POINTER)
    _fsync_folder(path)
    fault_point("after-pointer")
    for child in path.iterdir():  # older versions, and the files of a 0.1-style flat checkpoint
        if child.name in (final.name, POINTER):
            continue
        if child.is_dir() and _VERSION.match(child.name):
            shutil.rmtree(child, ignore_errors=True)
        elif child.is_file() and child.suffix in (".json", ".safetensors"):
            child.unlink(missing_ok=True)
    return final


def _pointed(path: Path) -> tuple[Path, str | None] | None:
    pointer = path / POINTER
    if not pointer.is_file():
        return None
    parts = pointer.read_text().split()
    if not parts or not _VERSION.match(parts[0]):
        raise CheckpointError(f"{pointer} is damaged (it should name a version folder such as v000001)")
    return path / parts[0], parts[1] if len(parts) > 1 else None


def current_folder(path: Path) -> tuple[Path, str | None]:
    """The folder holding the checkpoint at ``path`` and the expected sha256 of its description (None for a
    0.1-style flat checkpoint). Raises :class:`CheckpointError` when ``path`` is not a checkpoint."""
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is not an lfnnify checkpoint: checkpoints are folders written by lfnnify.save"
            + (" (this is a file; for plain weights use lfnnify.load_pretrained)" if path.is_file()
               else " (it does not exist)")
        )
    pointed = _pointed(path)
    if pointed is not None:
        folder, digest = pointed
        if not folder.is_dir():
            raise CheckpointError(f"{path / POINTER} names {folder.name}, which is missing: the checkpoint is damaged")
        return folder, digest
    if (path / META).exists():
        return path, None
    raise CheckpointError(f"{path} is not an lfnnify checkpoint: it has no {META}")


def exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a checkpoint (complete or legacy), without reading it."""
    path = Path(path)
    return (path / POINTER).is_file() or (path / META).is_file()


def _fsync_folder(folder: Path) -> None:
    for child in [folder, *folder.iterdir()] if folder.is_dir() else [folder]:
        try:
            fd = os.open(child, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


# ---------------------------------------------------------------- files


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(file: Path, expected: str | None) -> None:
    """Refuse a file whose bytes changed since it was saved."""
    if expected is None:
        return
    if not file.exists():
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete")
    if sha256(file) != expected:
        raise CheckpointError(
            f"{file} is damaged: its checksum differs from the one recorded when it was saved, so its contents "
            f"changed on disk. Restore it from a copy, or use another checkpoint."
        )


def write_tensors(file: Path, tensors: dict) -> None:
    save_file(unshare(tensors), str(file), metadata={"format": FORMAT})


def write_json(file: Path, content: dict) -> None:
    file.write_text(json.dumps(content, indent=1, default=str))


def load_tensors(file: Path, expected_sha256: str | None = None) -> dict:
    verify(file, expected_sha256)
    try:
        return load_file(str(file))
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is damaged or truncated ({exc}); the checkpoint cannot be read") from None


def read_json(file: Path, required: tuple[str, ...] = (), expected_sha256: str | None = None) -> dict:
    """A checkpoint's JSON file, checked: it parses, it is an object, and it has every ``required`` key."""
    verify(file, expected_sha256)
    try:
        content = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete") from None
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
