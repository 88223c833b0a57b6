"""Starting pipeline runs the way users start them (torch.distributed.run), and one launch per world size.

A launch costs more than what it trains here (every process imports torch and timm), so each world size's
scenarios of tests/pipeline_worker.py run in one launch, once per test process: :func:`scenarios_run`. Tests
that read a launch carry ``xdist_group`` marks so that one pytest worker runs all of them.
"""

import atexit
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests import pipeline_worker as worker

WORKER = Path(worker.__file__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args, timeout: float = 240, env: dict | None = None, script: Path = WORKER):
    """(completed process, seconds) of ``torchrun --nproc-per-node nproc <script> args`` (by default
    tests/pipeline_worker.py)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--max-restarts", "0",
        "--monitor-interval", "0.5", str(script), *map(str, args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return proc, time.monotonic() - start


def names(world: int) -> list[str]:
    return [n for n in worker.SCENARIOS if worker.world(n) == world]


@functools.cache
def scenarios_run(world: int) -> Path:
    """The folder holding every scenario of this world size, trained in one launch (once per test process)."""
    out = Path(tempfile.mkdtemp(prefix=f"lfnnify-pipeline-{world}-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    proc, seconds = torchrun(world, "--scenarios", *names(world), "--out", out, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"the {world}-process launch failed after {seconds:.0f} s:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return out


def on_hosts(hosts, script: list[str], *, port: int | None = None, timeout: float = 300, envs=None, during=None,
             **torchrun):
    """Run ``script`` under torchrun on every host of ``hosts`` (tests/../lfnnify/app/testbed.py) and wait for all.

    ``during(procs)`` runs while they do (to cut a link, kill a host). Returns (processes, outputs, seconds from the
    end of ``during`` until the last process ended)."""
    port = port or free_port()
    procs = [hosts.popen(i, hosts.torchrun(i, script, port=port, **torchrun), env=(envs[i] if envs else hosts.env(i)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(hosts.count)]
    started = time.monotonic()
    try:
        if during is not None:
            during(procs)
            started = time.monotonic()
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return procs, outputs, time.monotonic() - started
