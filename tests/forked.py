"""Real processes without an interpreter to start: a function run in a child forked from the test's process.

A new Python process spends seconds importing torch and timm on this project's slower machine kind, far more than
what the crash-safety and side-by-side tests do in it. A forked child already has them. It computes on one
thread: a forked OpenMP pool of several threads hangs, and what these children do (saves, loads) rounds nothing.
"""

import os
import signal
import time
import traceback
import warnings
from pathlib import Path

import torch


class Forked:
    """``target()`` in a child process, with ``env`` added to its environment; :meth:`wait` gives its exit status
    as ``subprocess`` writes it (0: returned, 1: raised, written to ``errors``; -9: killed by SIGKILL)."""

    def __init__(self, target, *, errors: Path, env: dict | None = None):
        self.errors = errors
        with warnings.catch_warnings():  # Python 3.12 warns of forking a process with threads (pytest-xdist's)
            warnings.simplefilter("ignore", DeprecationWarning)
            self.pid = os.fork()
        if self.pid == 0:  # the child: it never returns into pytest
            code = 1
            try:
                torch.set_num_threads(1)
                os.environ.update(env or {})
                target()
                code = 0
            except BaseException:
                errors.write_text(traceback.format_exc())
            finally:
                os._exit(code)

    def wait(self, timeout_s: float = 120) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"a forked child was still running after {timeout_s} s")

    def error(self) -> str:
        return self.errors.read_text() if self.errors.exists() else ""
