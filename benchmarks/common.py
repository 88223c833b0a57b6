"""Shared by the benchmarks: the environment block every result file carries, JSON output, and what the two
multi-host benchmarks share (their testbed's preflight and the measured-time split)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import subprocess
from pathlib import Path

import torch

from lfnnify._machine import cpu_name, status_bytes

RESULTS = Path(__file__).resolve().parent / "results"


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "../lfnnify", "*.py", "*.sh"], capture_output=True, text=True,
                cwd=Path(__file__).parent
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({cpu_name()})"


def environment(threads: int | None = None) -> dict:
    return {
        "commit": commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device_name(),
        "cores": os.cpu_count(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "host": socket.gethostname(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg": os.getloadavg(),
        "allocator_env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "LD_PRELOAD"))},
    }


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (VmHWM), in bytes; 0 where /proc is missing."""
    return status_bytes("VmHWM")


def hardware_tag() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace(" ", "-").lower()
    return f"cpu{os.cpu_count()}"


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
    return path


def hosts_ready(script: str) -> dict:
    """Before a run across hosts: stop with one line where this machine cannot build them, remove hosts an earlier
    run left behind, and return the environment as it was at the start."""
    from lfnnify._testbed import Hosts, missing

    reason = missing()
    if reason:
        raise SystemExit(f"{script}: {reason}")
    Hosts.remove_stale()
    return environment(1)


def time_balanced_plan(model_name: str, *, batch: int, example_shape: tuple[int, ...], link: str, **model_kwargs):
    """The two-block plan balanced by measured time at the training batch, on one thread (as a host runs it)."""
    import lfnnify
    from lfnnify.zoo import create_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10, **model_kwargs)
    return lfnnify.plan(model, blocks=2, balance="time", example_input=torch.randn(batch, *example_shape),
                        batch_size=batch, link=link)
