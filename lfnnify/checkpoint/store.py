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

A save only ever removes what it can prove lfnnify wrote: a version folder whose description lists every file in it,
a temporary folder holding the marker every save writes first (``.lfnnify-writing``), a pointer that reads as one.
It refuses a folder that holds anything else, and a folder inside another checkpoint. Saves and loads of one folder
may run side by side in several processes: a save holds an exclusive ``flock`` on the checkpoint folder from its
first write to its clean-up, so saves take turns, and a load holds a shared ``flock`` on the version folder it
reads, which the clean-up waits for before removing that version. Every wait for a lock is bounded
(``locks.LOCK_WAIT_S``) and names the process that holds it. (Without ``flock`` on the file system: no locks.)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import CheckpointError
from .files import FORMAT, MAX_JSON_BYTES, check_name, description_intact, read_verified, sha256, verify
from .locks import lock as _lock
from .locks import locked as _locked

__all__ = ["META", "check_target", "writing", "reading", "check_description", "exists", "fault_point",
           "holding_checkpoint"]

META = "lfnnify.json"
POINTER = "CURRENT"
MARKER = ".lfnnify-writing"  # the first file of every folder a save creates: what proves a leftover is lfnnify's
_VERSION = re.compile(r"^v(\d{6})$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# what a checkpoint written by lfnnify 0.1 held directly in its folder
_FLAT_FILES = re.compile(r"^(lfnnify\.json|model\.safetensors|trainer\.(json|safetensors)|block\d+\.safetensors|"
                         r"trainer-block\d+\.(json|safetensors))$")
_READ_ATTEMPTS = 20  # a load retries when the version it was about to read was replaced under it


_REACHED: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Tests of crash safety kill the process here for real (``LFNNIFY_KILL_AT=name``, or ``name:N`` for the N-th
    time this point is reached), and tests of saves and loads side by side widen the window here
    (``LFNNIFY_PAUSE_AT=name``: 0.1 s); otherwise nothing."""
    _REACHED[name] = _REACHED.get(name, 0) + 1
    kill = os.environ.get("LFNNIFY_KILL_AT", "")
    if kill and kill in (name, f"{name}:{_REACHED[name]}"):
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("LFNNIFY_PAUSE_AT") == name:
        time.sleep(0.1)


# ---------------------------------------------------------------- versions and the pointer


def check_target(path: Path) -> None:
    """Refuse, before touching anything, a save path that lfnnify could not write without destroying what it
    did not write: a file, a folder holding other files, or a folder inside a checkpoint."""
    if path.exists() and not path.is_dir():
        raise CheckpointError(
            f"{path} is a file, not a checkpoint folder; lfnnify.save writes a folder there and will not replace "
            f"a file. Choose another path or remove the file yourself."
        )
    parent = holding_checkpoint(path)
    if parent is not None:
        raise CheckpointError(
            f"{path} is inside the checkpoint at {parent}, whose next save would remove it; save to {parent} "
            f"itself (that writes a new version) or to a path outside it."
        )
    if path.is_dir():
        flat = _is_flat_checkpoint(path)
        foreign = sorted(c.name for c in path.iterdir() if not _ours(c, flat=flat))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise CheckpointError(
                f"{path} holds files lfnnify did not write ({shown}); a save replaces the folder's contents, so it "
                f"only writes into a new or empty folder or an existing checkpoint. Save into a sub-folder "
                f"(e.g. {path / 'checkpoint'}) or another path."
            )


def holding_checkpoint(path: Path) -> Path | None:
    """The checkpoint folder ``path`` lies inside, if any (the outermost: a version folder inside a checkpoint
    looks like a 0.1 checkpoint)."""
    holders = [p for p in path.resolve().parents if (p / POINTER).is_file() or _is_flat_checkpoint(p)]
    return holders[-1] if holders else None


def _description(folder: Path) -> dict | None:
    """The description in ``folder`` if it is one lfnnify wrote (a regular file, an object of its format)."""
    try:
        meta = json.loads(read_verified(folder / META, limit=MAX_JSON_BYTES).decode())
    except (CheckpointError, OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _is_flat_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a checkpoint written by lfnnify 0.1 (files directly inside, no pointer)."""
    if folder.is_symlink() or not (folder / META).is_file() or (folder / POINTER).exists():
        return False
    return _description(folder) is not None


def _is_version(folder: Path) -> bool:
    """Whether ``folder`` is a version lfnnify wrote: a real folder whose description lists every file in it."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    meta = _description(folder)
    listed = meta.get("files") if meta is not None else None
    if not isinstance(listed, dict):
        return False
    return all(c.name in (META, MARKER) or (c.name in listed and c.is_file() and not c.is_symlink())
               for c in folder.iterdir())


def _is_pointer(file: Path) -> bool:
    """Whether ``file`` reads as a pointer lfnnify wrote: a small regular file naming a version."""
    try:
        parts = read_verified(file, limit=256).decode().split()
    except (CheckpointError, OSError, UnicodeDecodeError):
        return False
    return bool(parts) and bool(_VERSION.match(parts[0]))


def _ours(child: Path, *, flat: bool) -> bool:
    """Whether ``child`` of a checkpoint folder is something lfnnify can prove it wrote there."""
    name = child.name
    if child.is_symlink():
        return False
    if name == POINTER or name.startswith(f"{POINTER}.tmp-"):
        return _is_pointer(child)
    if _VERSION.match(name):
        return _is_version(child)
    if ".tmp-" in name and _VERSION.match(name.split(".tmp-")[0]):  # a save that was killed before it finished
        return child.is_dir() and (child / MARKER).is_file() and not (child / MARKER).is_symlink()
    return flat and bool(_FLAT_FILES.match(name)) and child.is_file()


@contextmanager
def writing(path: Path) -> Iterator[Path]:
    """Write the next version of the checkpoint at ``path``: yield an empty temporary folder to fill, then
    publish it when the block ends normally (and remove it when the block raises). Saves of one folder take
    turns: each holds an exclusive lock on it from here to its clean-up."""
    check_target(path)
    path.mkdir(parents=True, exist_ok=True)
    with _locked(path, fcntl.LOCK_EX):
        check_target(path)  # again: another save may have finished while this one waited
        tmp = _new_version(path)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _publish(tmp)


def _new_version(path: Path) -> Path:
    """Remove leftovers of killed saves (only those it can prove a save made) and return a fresh temporary folder
    for the next version, its marker written first."""
    for child in path.iterdir():
        if ".tmp-" in child.name and _ours(child, flat=False):  # no other save runs: we hold the lock
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    for stale in path.parent.glob(f".{path.name}.*-*"):  # lfnnify 0.1's temporary folders next to the path
        if _is_leftover_of_0_1(stale):
            shutil.rmtree(stale, ignore_errors=True)
    numbers = [int(m.group(1)) for c in path.iterdir() if (m := _VERSION.match(c.name))]
    number = max(numbers, default=0) + 1
    tmp = path / f"v{number:06d}.tmp-{os.getpid()}"
    tmp.mkdir()
    (tmp / MARKER).write_bytes(b"a save of lfnnify writes here; a later save removes what a killed one left\n")
    return tmp


def _is_leftover_of_0_1(stale: Path) -> bool:
    """A temporary folder lfnnify 0.1 left beside a checkpoint: its name, and nothing in it but 0.1's own files."""
    if stale.is_symlink() or not stale.is_dir() or not re.search(r"\.(tmp|old)-\d+$", stale.name):
        return False
    children = list(stale.iterdir())
    return bool(children) and all(c.is_file() and not c.is_symlink() and _FLAT_FILES.match(c.name)
                                  for c in children)


def _publish(tmp: Path) -> Path:
    """Make the completely written ``tmp`` the checkpoint its parent folder points to, atomically; then
    remove what the pointer no longer names (each old version once no load is reading it)."""
    path = tmp.parent
    flat = _is_flat_checkpoint(path)
    final = path / tmp.name.split(".tmp-")[0]
    _fsync_folder(tmp)
    tmp.rename(final)
    (final / MARKER).unlink(missing_ok=True)  # the version is complete; should this not happen, it is still ours
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
        if _VERSION.match(child.name) and _is_version(child):
            try:
                with _locked(child, fcntl.LOCK_EX):  # waits for loads still reading it, for a bounded time
                    shutil.rmtree(child, ignore_errors=True)
            except FileNotFoundError:
                pass
            except CheckpointError as exc:  # a load still holds it: the save is done, and the next one removes it
                warnings.warn(f"lfnnify.save: {child.name} is still being read by {getattr(exc, 'holders', 'a load')}, "
                              f"so it stays in {path} until the next save removes it", UserWarning, stacklevel=4)
        elif flat and child.is_file() and _FLAT_FILES.match(child.name):
            child.unlink(missing_ok=True)
    return final


def _pointed(path: Path) -> tuple[Path, str | None] | None:
    pointer = path / POINTER
    if not pointer.exists() and not pointer.is_symlink():
        return None
    try:
        parts = read_verified(pointer, limit=256).decode().split()
    except UnicodeDecodeError:
        parts = []
    if not parts or not _VERSION.match(parts[0]):
        raise CheckpointError(f"{pointer} is damaged (it should name a version folder such as v000001)")
    return path / parts[0], parts[1] if len(parts) > 1 else None


@contextmanager
def reading(path: Path) -> Iterator[tuple[Path, str | None]]:
    """Read the checkpoint at ``path``: yield the folder of its current version and the expected sha256 of its
    description (None for a 0.1-style flat checkpoint), holding a shared lock on that folder so that a save
    beside this load does not remove it mid-read. Raises :class:`CheckpointError` when ``path`` is not a
    checkpoint."""
    for _ in range(_READ_ATTEMPTS):
        folder, digest = _current_folder(path)
        try:
            fd = _lock(folder, fcntl.LOCK_SH)
        except FileNotFoundError:
            fd = None
        if fd is not None:
            try:
                if folder.is_dir() and (digest is None or _pointed(path) == (folder, digest)):
                    fault_point("mid-read")
                    yield folder, digest
                    return
            finally:
                os.close(fd)
        time.sleep(0.01)  # a save replaced that version between our reading the pointer and locking it
    raise CheckpointError(f"{path} changed {_READ_ATTEMPTS} times while it was being read; try again when the "
                          f"saves writing it have finished")


def _current_folder(path: Path) -> tuple[Path, str | None]:
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is not an lfnnify checkpoint: checkpoints are folders written by lfnnify.save"
            + (" (this is a file; for plain weights use lfnnify.load_pretrained)" if path.is_file()
               else " (it does not exist)")
        )
    pointed = _pointed(path)
    if pointed is not None:
        folder, digest = pointed
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise CheckpointError(f"{path / POINTER} names {folder.name}, which is not a folder of its own (a symbolic "
                                  f"link or a file); a checkpoint reads only its own folders, so it was not read")
        if not folder.is_dir():
            raise CheckpointError(f"{path / POINTER} names {folder.name}, which is missing: the checkpoint is damaged")
        return folder, digest
    if (path / META).exists():
        return path, None
    versions = sorted((c for c in path.iterdir() if _VERSION.match(c.name) and (c / META).is_file()), reverse=True)
    if versions:
        raise CheckpointError(
            f"{path} has no {POINTER} pointer (it was deleted or never written), but it holds the version "
            f"folder{'s' if len(versions) > 1 else ''} {', '.join(v.name for v in versions[:3])}. To load the newest, "
            f"pass it directly: lfnnify.load({str(versions[0])!r}); the next save to {path} starts a new version."
        )
    raise CheckpointError(f"{path} is not an lfnnify checkpoint: it has no {META}")


def check_description(folder: Path, expected: str | None) -> None:
    """Refuse a description whose checksum differs from the one the pointer records, and say which of the two
    changed: the description's own checksum (over its other contents) tells whether it is as it was saved."""
    meta = folder / META
    if expected is None or not (meta.exists() or meta.is_symlink()):
        return
    data = read_verified(meta, limit=MAX_JSON_BYTES)
    if hashlib.sha256(data).hexdigest() == expected:
        return
    pointer, actual = folder.parent / POINTER, hashlib.sha256(data).hexdigest()
    intact = description_intact(data)
    if intact is True or not _SHA256.match(expected):
        listed = json.loads(data.decode()).get("files", {})
        for name, digest in (listed.items() if isinstance(listed, dict) else []):
            read_verified(folder / check_name(name, meta), digest if isinstance(digest, str) else None)
        raise CheckpointError(
            f"{pointer} is damaged: the checksum it records for {folder.name}/{META} differs from that file's, "
            f"while {META} and every file it lists are intact. Load the version directly "
            f"(lfnnify.load({str(folder)!r})), or rewrite {pointer} as '{folder.name} {actual}'."
        )
    if intact is None:
        raise CheckpointError(
            f"{pointer} and {folder.name}/{META} disagree: the checksum the pointer records differs from the file's, "
            f"and this checkpoint was written before lfnnify recorded the description's own checksum, so which of "
            f"the two changed cannot be told. Use a copy of the checkpoint, or another one.")
    verify(meta, expected)


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
