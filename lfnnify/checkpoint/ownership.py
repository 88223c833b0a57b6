"""What a save may remove: only what it can prove lfnnify wrote in a checkpoint folder (a version whose description
lists every file in it, a temporary folder holding the marker or empty, a pointer that reads as one or is empty),
and where a path lies inside another checkpoint. Judged by the save that holds the folder's lock (``store``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import CheckpointError
from .files import FORMAT, MAX_JSON_BYTES, read_verified

META = "lfnnify.json"
POINTER = "CURRENT"
MARKER = ".lfnnify-writing"  # the first file of every folder a save creates: what proves a leftover is lfnnify's
VERSION = re.compile(r"^v(\d{6})$")
# what a checkpoint written by lfnnify 0.1 held directly in its folder
FLAT_FILES = re.compile(r"^(lfnnify\.json|model\.safetensors|trainer\.(json|safetensors)|block\d+\.safetensors|"
                         r"trainer-block\d+\.(json|safetensors))$")


def saves_name(name: str) -> bool:
    """Whether a save names things so in a checkpoint folder (versions, the pointer, and their temporary names)."""
    base = name.split(".tmp-")[0]
    return bool(VERSION.match(base)) or base == POINTER


def holding_checkpoint(path: Path) -> Path | None:
    """The checkpoint folder ``path`` lies inside, if any (the outermost: a version folder inside a checkpoint
    looks like a 0.1 checkpoint)."""
    holders = [p for p in path.resolve().parents if (p / POINTER).is_file() or is_flat_checkpoint(p)]
    return holders[-1] if holders else None


def description(folder: Path) -> dict | None:
    """The description in ``folder`` if it is one lfnnify wrote (a regular file, an object of its format)."""
    try:
        meta = json.loads(read_verified(folder / META, limit=MAX_JSON_BYTES).decode())
    except (CheckpointError, OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def is_flat_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a checkpoint written by lfnnify 0.1 (files directly inside, no pointer)."""
    if folder.is_symlink() or not (folder / META).is_file() or (folder / POINTER).exists():
        return False
    return description(folder) is not None


def is_version(folder: Path) -> bool:
    """Whether ``folder`` is a version lfnnify wrote: a real folder whose description lists every file in it."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    meta = description(folder)
    listed = meta.get("files") if meta is not None else None
    if not isinstance(listed, dict):
        return False
    return all(c.name in (META, MARKER) or (c.name in listed and c.is_file() and not c.is_symlink())
               for c in folder.iterdir())


def is_pointer(file: Path) -> bool:
    """Whether ``file`` reads as a pointer lfnnify wrote: a small regular file naming a version."""
    try:
        parts = read_verified(file, limit=256).decode().split()
    except (CheckpointError, OSError, UnicodeDecodeError):
        return False
    return bool(parts) and bool(VERSION.match(parts[0]))


def ours(child: Path, *, flat: bool) -> bool:
    """Whether ``child`` of a checkpoint folder is something lfnnify can prove it wrote there."""
    name = child.name
    if child.is_symlink():
        return False
    if name == POINTER:
        return is_pointer(child)
    if name.startswith(f"{POINTER}.tmp-"):  # a save killed while writing the pointer: empty holds nothing to lose
        return is_pointer(child) or (child.is_file() and child.stat().st_size == 0)
    if VERSION.match(name):
        return is_version(child)
    if ".tmp-" in name and saves_name(name):  # a save killed while writing or removing a version: marked, or empty
        return child.is_dir() and (((child / MARKER).is_file() and not (child / MARKER).is_symlink())
                                   or not any(child.iterdir()))
    return flat and bool(FLAT_FILES.match(name)) and child.is_file()


def is_leftover_of_0_1(stale: Path) -> bool:
    """A temporary folder lfnnify 0.1 left beside a checkpoint: its name, and nothing in it but 0.1's own files."""
    if stale.is_symlink() or not stale.is_dir() or not re.search(r"\.(tmp|old)-\d+$", stale.name):
        return False
    children = list(stale.iterdir())
    return bool(children) and all(c.is_file() and not c.is_symlink() and FLAT_FILES.match(c.name)
                                  for c in children)
