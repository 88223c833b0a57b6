"""The one JSONL writer and reader: run logs, trainer logs and benchmark records all go through it."""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

__all__ = ["append_jsonl", "read_jsonl"]


def _jsonable(value):
    # json calls this only for what it cannot write itself (floats, NaN included, never get here)
    return value.tolist() if isinstance(value, Tensor) else str(value)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append ``record`` as one JSON line (tensors as lists; anything else JSON lacks as its ``str``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, default=_jsonable) + "\n")


def read_jsonl(path: str | Path, kind: str | None = None) -> list[dict]:
    """The records in ``path`` (those whose ``"kind"`` is ``kind``, if given); [] when the file is missing."""
    path = Path(path)
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]
