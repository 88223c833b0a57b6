"""Locks on a checkpoint's folders (``flock``), each wait bounded and, when it runs out, the holder named."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import CheckpointError

__all__ = ["LOCK_WAIT_S", "lock", "locked"]

LOCK_WAIT_S = 120.0  # the longest a save or a load waits for another's lock before it says who holds it


def lock(folder: Path, kind: int, wait_s: float | None = None) -> int:
    """An open descriptor of ``folder`` holding ``flock(kind)`` (released by closing it), waited for at most
    ``wait_s`` (``LOCK_WAIT_S``): then :class:`CheckpointError` names the process that holds it. Raises
    FileNotFoundError when the folder is gone; where the file system has no ``flock`` it holds no lock."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    deadline = time.monotonic() + (LOCK_WAIT_S if wait_s is None else wait_s)
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holders = _holders(fd)
                os.close(fd)
                error = CheckpointError(
                    f"{folder} is locked by {holders}, which has held it for more than "
                    f"{LOCK_WAIT_S if wait_s is None else wait_s:g} s: another save or load of this checkpoint that "
                    f"is stopped or stuck. End it, or wait for it, then try again")
                error.holders = holders
                raise error from None
            time.sleep(0.05)
        except OSError:  # no flock on this file system (some network mounts): go on without
            return fd


def _holders(fd: int) -> str:
    """The processes that hold a lock on the file open as ``fd`` (from /proc/locks), for a message."""
    info = os.fstat(fd)
    pids = []
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 6 and fields[1] == "FLOCK":
                major, minor, inode = fields[5].split(":")
                if int(inode) == info.st_ino and os.makedev(int(major, 16), int(minor, 16)) == info.st_dev:
                    pids.append(int(fields[4]))
    except (OSError, ValueError):
        pass
    if not pids:
        return "another process"
    described = []
    for pid in sorted(set(pids))[:3]:
        try:
            command = " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split())[:80]
        except OSError:
            command = ""
        described.append(f"process {pid}" + (f" ({command})" if command else ""))
    return ", ".join(described)


@contextmanager
def locked(folder: Path, kind: int, wait_s: float | None = None) -> Iterator[None]:
    fd = lock(folder, kind, wait_s)
    try:
        yield
    finally:
        os.close(fd)
