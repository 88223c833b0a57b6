"""How lfnnify writes a file it makes (an export, a plot, a run's recipe, log and results): only regular files,
never through a symbolic link, and a whole file replaced at once.

A path that exists and is anything but a regular file (a symbolic link, a folder, a device such as /dev/null, a pipe)
is refused by name, with nothing written: replacing it would lose what the user put there, and writing through it
would change a file lfnnify did not make.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import ConfigError

__all__ = ["check_writable", "write_regular", "append_line"]


def check_writable(path: Path, error: type[Exception] = ConfigError) -> None:
    """Refuse ``path`` unless it is missing or a regular file (not a link to one)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(info.st_mode):
        return
    kind = ("a symbolic link" if stat.S_ISLNK(info.st_mode) else "a folder" if stat.S_ISDIR(info.st_mode)
            else "a device or a pipe")
    raise error(f"{path} is {kind}, not a regular file; lfnnify writes only regular files, so nothing was written "
                f"there: choose another path, or remove it yourself")


def write_regular(path: str | os.PathLike, data: bytes, *, error: type[Exception] = ConfigError) -> Path:
    """Write ``data`` as the regular file ``path``: to a temporary file beside it, then renamed over it, so that a
    reader sees the old file or the new one, and a link at ``path`` is never followed."""
    path = Path(path)
    check_writable(path, error)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` to the regular file ``path`` (made if missing), never through a link."""
    path = Path(path)
    check_writable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "a") as f:
        f.write(line)
