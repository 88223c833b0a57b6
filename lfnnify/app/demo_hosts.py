"""The demo's cross-host part: two hosts on this machine joined by a 1 Gbit/s link, the LFNN-ℓ pipeline against
data-parallel backprop, plain and with PowerSGD (what DDP's users turn on for a slow link), each for a few steps,
with the bytes each really sent (not a public module)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["cross_host", "verdict", "PIPELINE", "RATE"]

RATE = "1gbit"
PIPELINE = "LFNN-ℓ pipeline, K=2"
METHODS = {PIPELINE: "pipeline", "data-parallel backprop (DDP)": "ddp", "DDP with PowerSGD, rank 1": "ddp_powersgd"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cross_host(*, steps: int, model: str, batch: int, timeout: float = 240) -> dict | str:
    """Samples/s and bytes per step of each method across two hosts, or one line saying why it was skipped."""
    from .testbed import Hosts, TestbedError, missing

    reason = missing()
    if reason:
        return reason
    try:
        with Hosts(2, rate=RATE) as hosts, tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "hosts.json"
            script = ["-m", "lfnnify.app.demo_stage", "--hosts-methods", *METHODS.values(), "--steps", str(steps),
                      "--model", model, "--batch", str(batch), "--out", str(out)]
            port = _port()
            procs = [hosts.popen(i, hosts.torchrun(i, script, port=port), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for i in range(2)]
            started = time.monotonic()
            outputs = []
            for p in procs:
                try:
                    outputs.append(p.communicate(timeout=max(1.0, timeout - (time.monotonic() - started)))[0])
                except subprocess.TimeoutExpired:
                    p.kill()
                    outputs.append(p.communicate()[0])
            written = hosts.path(1, out)  # the last rank writes the results, on its own host's disk
            if any(p.returncode for p in procs) or not written.exists():
                return f"the runs across hosts failed: {(outputs[0] + outputs[1])[-600:]}"
            measured = json.loads(written.read_text())
    except TestbedError as exc:
        return str(exc)
    results = {name: measured[method] for name, method in METHODS.items()}
    return results


def verdict(hosts: dict) -> str:
    """The demo's line on the runs across hosts: which method trained the most samples/s, and what the pipeline ran
    and sent against each DDP. A few steps each: a first look, not a benchmark (benchmarks.multihost repeats)."""
    fastest = max(hosts, key=lambda n: hosts[n]["samples_per_s"])
    ours, against = hosts[PIPELINE], []
    for name, r in hosts.items():
        if name != PIPELINE:
            speed = ours["samples_per_s"] / r["samples_per_s"]
            against.append(f"{speed:.2f}x the samples/s of {name}, sending "
                           f"{_bytes_ratio(ours['bytes_per_step'], r['bytes_per_step'])}")
    return f"across two hosts at {RATE}, {fastest} trained the most samples/s; the {PIPELINE} ran {'; '.join(against)}"


def _bytes_ratio(ours: float, theirs: float) -> str:
    if ours <= theirs:
        return f"{theirs / max(ours, 1):.1f}x fewer bytes"
    return f"{ours / max(theirs, 1):.1f}x more bytes"


if __name__ == "__main__":  # a quick look: python -m lfnnify.app.demo_hosts
    print(json.dumps(cross_host(steps=4, batch=64, model=sys.argv[1] if len(sys.argv) > 1 else "resnet18"), indent=1))
