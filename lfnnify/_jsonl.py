"""The one JSONL writer and reader: run logs, trainer logs and benchmark records all go through it."""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from ._writing import append_line

__all__ = ["append_jsonl", "read_jsonl"]


def _jsonable(value):
    # json calls this only for what it cannot write itself (floats, NaN included, never get here)
    return value.tolist() if isinstance(value, Tensor) else str(value)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append ``record`` as one JSON line (tensors as lists; anything else JSON lacks as its ``str``)."""
    append_line(path, json.dumps(record, default=_jsonable) + "\n")


def read_jsonl(path: str | Path, kind: str | None = None) -> list[dict]:
    """The records in ``path`` (those whose ``"kind"`` is ``kind``, if given); [] when the file is missing. A last
    line cut short (the writer was killed mid-line) is skipped, as readers of an append-only log do."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # torn: the process that wrote it died mid-write
                break
            raise
    return [r for r in records if kind is None or r.get("kind") == kind]
