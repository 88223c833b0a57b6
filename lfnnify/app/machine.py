"""What the demo and the benchmarks say about the machine they ran on (Linux /proc; harmless elsewhere)."""

from __future__ import annotations

import platform
from pathlib import Path

__all__ = ["cpu_name", "status_bytes"]


def cpu_name() -> str:
    """The CPU's model name, e.g. "Intel(R) Xeon(R) Processor"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def status_bytes(key: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes (``"VmHWM"``: peak resident,
    ``"VmRSS"``: resident now); 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
