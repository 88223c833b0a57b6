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
a temporary folder holding the marker every save writes first (``.lfnnify-writing``), a pointer that reads as one, and
a temporary folder or pointer that is empty (it holds nothing to lose). An old version is removed marked and renamed
first, its marker last, so a save killed while removing it leaves a leftover the next save removes. It refuses a
folder that holds anything else, and a folder inside another checkpoint. Saves and loads of one folder
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
from contextlib import contextmanager, suppress
from pathlib import Path

from ..errors import CheckpointError
from .files import MAX_JSON_BYTES, check_name, description_intact, read_verified, sha256, verify
from .locks import lock as _lock
from .locks import locked as _locked
from .ownership import (
    FLAT_FILES,
    MARKER,
    META,
    POINTER,
    VERSION,
    holding_checkpoint,
    is_flat_checkpoint,
    is_leftover_of_0_1,
    is_version,
    ours,
    saves_name,
)

__all__ = ["META", "check_target", "writing", "reading", "check_description", "exists", "fault_point",
           "holding_checkpoint"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_READ_ATTEMPTS = 20  # a load retries when the version it was about to read was replaced under it


_REACHED: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Tests of crash safety kill the process here for real (``LFNNIFY_KILL_AT=name``, or ``name:N`` for the N-th
    time this point is reached), and tests of saves and loads side by side widen the window here
    (``LFNNIFY_PAUSE_AT=name,name,...``: 0.1 s); otherwise nothing."""
    _REACHED[name] = _REACHED.get(name, 0) + 1
    kill = os.environ.get("LFNNIFY_KILL_AT", "")
    if kill and kill in (name, f"{name}:{_REACHED[name]}"):
        os.kill(os.getpid(), signal.SIGKILL)
    if name in os.environ.get("LFNNIFY_PAUSE_AT", "").split(","):
        time.sleep(0.1)


# ---------------------------------------------------------------- versions and the pointer


def check_target(path: Path, *, locked: bool = False) -> None:
    """Refuse, before touching anything, a save path that lfnnify could not write without destroying what it
    did not write: a file, a folder holding other files, or a folder inside a checkpoint.

    Without the save lock (``locked=False``) another save may be mid-way in ``path``: its temporary version, its
    temporary pointer and a version it is removing pass through states that prove nothing (an empty folder, an
    empty file, a folder whose description is gone). So only the save holding the lock judges what carries the
    names saves write; the check before it refuses early whatever else is there."""
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
        flat = is_flat_checkpoint(path)
        foreign = sorted(c.name for c in path.iterdir()
                         if (locked or not saves_name(c.name)) and not ours(c, flat=flat))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise CheckpointError(
                f"{path} holds files lfnnify did not write ({shown}); a save replaces the folder's contents, so it "
                f"only writes into a new or empty folder or an existing checkpoint. Save into a sub-folder "
                f"(e.g. {path / 'checkpoint'}) or another path."
            )


@contextmanager
def writing(path: Path) -> Iterator[Path]:
    """Write the next version of the checkpoint at ``path``: yield an empty temporary folder to fill, then
    publish it when the block ends normally (and remove it when the block raises). Saves of one folder take
    turns: each holds an exclusive lock on it from here to its clean-up."""
    check_target(path)
    path.mkdir(parents=True, exist_ok=True)
    with _locked(path, fcntl.LOCK_EX):
        check_target(path, locked=True)  # the check that counts: no other save is mid-way now
        tmp = _new_version(path)
        try:
            yield tmp
        except BaseException:
            with suppress(OSError):  # what the block raised is the error to report; a leftover is removed later
                _remove_marked(tmp)
            raise
        _publish(tmp)


def _new_version(path: Path) -> Path:
    """Remove leftovers of killed saves (only those it can prove a save made) and return a fresh temporary folder
    for the next version, its marker written first."""
    for child in path.iterdir():
        if ".tmp-" in child.name and ours(child, flat=False):  # no other save runs: we hold the lock
            if child.is_dir():
                _remove_marked(child)
            else:
                child.unlink(missing_ok=True)
    for stale in path.parent.glob(f".{path.name}.*-*"):  # lfnnify 0.1's temporary folders next to the path
        if is_leftover_of_0_1(stale):
            shutil.rmtree(stale, ignore_errors=True)
    numbers = [int(m.group(1)) for c in path.iterdir() if (m := VERSION.match(c.name))]
    number = max(numbers, default=0) + 1
    tmp = path / f"v{number:06d}.tmp-{os.getpid()}"
    tmp.mkdir()
    fault_point("before-marker")
    (tmp / MARKER).write_bytes(b"a save of lfnnify writes here; a later save removes what a killed one left\n")
    return tmp


def _publish(tmp: Path) -> Path:
    """Make the completely written ``tmp`` the checkpoint its parent folder points to, atomically; then
    remove what the pointer no longer names (each old version once no load is reading it)."""
    path = tmp.parent
    flat = is_flat_checkpoint(path)
    final = path / tmp.name.split(".tmp-")[0]
    _fsync_folder(tmp)
    tmp.rename(final)
    (final / MARKER).unlink(missing_ok=True)  # the version is complete; should this not happen, it is still ours
    fault_point("before-pointer")
    meta_hash = sha256(final / META)
    pointer_tmp = path / f"{POINTER}.tmp-{os.getpid()}"
    with open(pointer_tmp, "w") as f:
        fault_point("mid-pointer")
        f.write(f"{final.name} {meta_hash}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, path / POINTER)
    _fsync_folder(path)
    fault_point("after-pointer")
    for child in path.iterdir():  # older versions, and the files of a 0.1-style flat checkpoint
        if child.name in (final.name, POINTER):
            continue
        if VERSION.match(child.name) and is_version(child):
            try:
                with _locked(child, fcntl.LOCK_EX):  # waits for loads still reading it, for a bounded time
                    _remove_version(child)
            except FileNotFoundError:
                pass
            except CheckpointError as exc:  # a load still holds it: the save is done, and the next one removes it
                warnings.warn(f"lfnnify.save: {child.name} is still being read by {getattr(exc, 'holders', 'a load')}, "
                              f"so it stays in {path} until the next save removes it", UserWarning, stacklevel=4)
        elif flat and child.is_file() and FLAT_FILES.match(child.name):
            child.unlink(missing_ok=True)
    return final


def _remove_version(folder: Path) -> None:
    """Remove an old version so that a save killed at any point of it leaves what the next save proves its own and
    removes: the version marked as a leftover, renamed to a temporary name, its marker removed last."""
    (folder / MARKER).write_bytes(b"an old version a save is removing\n")
    gone = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    folder.rename(gone)
    _remove_marked(gone)


def _remove_marked(folder: Path) -> None:
    """Remove a folder a save marked, its marker last, so that whatever an interrupted removal leaves is still
    marked (or empty)."""
    for child in folder.iterdir():
        if child.name == MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
        fault_point("mid-removal")
    (folder / MARKER).unlink(missing_ok=True)
    folder.rmdir()


def _pointed(path: Path) -> tuple[Path, str | None] | None:
    pointer = path / POINTER
    if not pointer.exists() and not pointer.is_symlink():
        return None
    try:
        parts = read_verified(pointer, limit=256).decode().split()
    except UnicodeDecodeError:
        parts = []
    if not parts or not VERSION.match(parts[0]):
        raise CheckpointError(f"{pointer} is damaged (it should name a version folder such as v000001)")
    return path / parts[0], parts[1] if len(parts) > 1 else None


@contextmanager
def reading(path: Path) -> Iterator[tuple[Path, str | None]]:
    """Read the checkpoint at ``path``: yield the folder of its current version and the expected sha256 of its
    description (None for a 0.1-style flat checkpoint), holding a shared lock on that folder so that a save
    beside this load does not remove it mid-read. Raises :class:`CheckpointError` when ``path`` is not a
    checkpoint."""
    for _ in range(_READ_ATTEMPTS):
        current = _current_folder(path)
        if current is None:
            time.sleep(0.01)
            continue
        folder, digest = current
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


def _current_folder(path: Path) -> tuple[Path, str | None] | None:
    """The folder the checkpoint at ``path`` names now, and its description's expected sha256; None when a save
    replaced it while we looked (read again)."""
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is not an lfnnify checkpoint: checkpoints are folders written by lfnnify.save"
            + (" (this is a file; for plain weights use lfnnify.load_pretrained)" if path.is_file()
               else " (it does not exist)")
        )
    pointed = _pointed(path)
    fault_point("pointer-read")
    if pointed is not None:
        folder, digest = pointed
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise CheckpointError(f"{path / POINTER} names {folder.name}, which is not a folder of its own (a symbolic "
                                  f"link or a file); a checkpoint reads only its own folders, so it was not read")
        if not folder.is_dir():
            if _pointed(path) != pointed:
                return None  # a save replaced that version (and removed it) after we read the pointer
            raise CheckpointError(f"{path / POINTER} names {folder.name}, which is missing: the checkpoint is damaged")
        return folder, digest
    if (path / META).exists():
        return path, None
    versions = sorted((c for c in path.iterdir() if VERSION.match(c.name) and (c / META).is_file()), reverse=True)
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
