"""The processes of a pipeline: starting torch.distributed (which backend, which device), naming ranks and hosts in
messages, telling whether a process that stopped answering is this machine's (and ending it), and the fault hook the
tests use."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .. import errors
from ..errors import PipelineError
from .comm import PeerError

__all__ = ["init_distributed", "choose_backend", "host_name", "machine_identity", "stage_device", "fault",
           "name_the_rank", "process_identity", "end_if_here"]


def choose_backend(requested: str | None, *, gpus: int, local_processes: int) -> tuple[str, str | None]:
    """(backend, a note to print or None): NCCL only when every process on this machine has a GPU of its own;
    otherwise gloo, and the note says why. ``requested`` ("nccl" or "gloo") overrides."""
    if requested is not None:
        if requested not in ("nccl", "gloo"):
            raise PipelineError(f"backend={requested!r} must be 'nccl' or 'gloo' (or None to choose)")
        if requested == "nccl" and not gpus:
            raise errors.ConfigError("backend='nccl' talks between GPUs, and this process has none (torch sees no GPU, "
                                     "or the pipeline keeps its block on the CPU); use backend='gloo', or None to "
                                     "choose by itself")
        return requested, None
    if gpus and gpus >= local_processes and dist.is_nccl_available():
        return "nccl", None
    if gpus:
        return "gloo", (f"lfnnify: {local_processes} processes on this machine share {gpus} GPU(s), so they talk "
                        f"over gloo (through the CPU), not NCCL; start one process per GPU, or pass backend='nccl'")
    return "gloo", None


def init_distributed(timeout: datetime.timedelta, backend: str | None = None, *, use_gpus: bool = True) -> None:
    """Join the process group torchrun describes (see :func:`choose_backend`), once, and always put this process
    on its own GPU (``LOCAL_RANK``), also when the caller initialised the group itself."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if not dist.is_initialized():
            raise PipelineError(
                "PipelineTrainer runs one process per block, started by torchrun: "
                "torchrun --nproc-per-node K your_script.py (RANK and WORLD_SIZE are not set here)"
            )
    gpus = torch.cuda.device_count() if torch.cuda.is_available() and use_gpus else 0
    if not dist.is_initialized():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        backend, note = choose_backend(backend, gpus=gpus, local_processes=local)
        if note and int(os.environ.get("LOCAL_RANK", 0)) == 0:
            sys.stderr.write(note + "\n")
        # NCCL: the default group's communicator is built now (device_id), not at its first use inside a step
        dist.init_process_group(backend=backend, timeout=timeout,
                                device_id=stage_device() if backend == "nccl" and gpus else None)
    if gpus:
        torch.cuda.set_device(stage_device())


def stage_device() -> torch.device:
    """This rank's device: GPU ``LOCAL_RANK`` (modulo the GPUs there are) when there are GPUs, else the CPU."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % gpus)
    return torch.device("cpu")


def name_the_rank(exc: BaseException, label: str) -> None:
    """Say on which rank an error happened: an attribute the command line prints, and a note in tracebacks."""
    if isinstance(exc, (KeyboardInterrupt, PeerError)) or getattr(exc, "pipeline_rank", None):
        return
    try:
        exc.pipeline_rank = label
    except AttributeError:
        return
    if hasattr(exc, "add_note"):
        exc.add_note(f"lfnnify: this happened on {label}")


def fault(rank: int, step: int) -> None:
    """The fault suite's hook: ``LFNNIFY_FAULT=raise|kill|stop`` with ``LFNNIFY_FAULT_RANK`` and
    ``LFNNIFY_FAULT_STEP`` makes that rank fail for real at that step, in torchrun's first attempt only (or the
    attempt ``LFNNIFY_FAULT_ATTEMPT`` names, counted as ``TORCHELASTIC_RESTART_COUNT``). Unset, it does nothing."""
    kind = os.environ.get("LFNNIFY_FAULT")
    at = (int(os.environ.get("LFNNIFY_FAULT_RANK", -1)), int(os.environ.get("LFNNIFY_FAULT_STEP", 0)))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) == int(os.environ.get("LFNNIFY_FAULT_ATTEMPT", 0))
    if not kind or at != (rank, step) or not attempt:
        return
    print(f"lfnnify-fault: {kind} on rank {rank} at step {step}, time {time.time():.3f}", file=sys.stderr, flush=True)
    if kind == "raise":
        raise RuntimeError(f"injected failure at step {step}")
    os.kill(os.getpid(), {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}[kind])


def host_name() -> str:
    """The name messages give this machine: ``LFNNIFY_HOST`` if set (the hosts testbed sets it), else its host name."""
    return os.environ.get("LFNNIFY_HOST") or socket.gethostname()


def process_identity() -> tuple[str, int, int]:
    """(machine, pid, start time) of this process: what a neighbour must check before it ever signals it."""
    return machine_identity(), os.getpid(), _start_time(os.getpid())


def _state(pid: int) -> str:
    """The state letter of process ``pid`` (/proc/<pid>/stat, field 3: T is stopped, S sleeping, R running)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def _start_time(pid: int) -> int:
    """When process ``pid`` started, in clock ticks since boot (/proc/<pid>/stat, field 22); -1 where unknown.
    A PID that names a new process after the old one exited has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return -1


def machine_identity() -> str:
    """What says two processes can signal each other: this kernel's boot id and this PID namespace. Host names
    collide (containers, cloned machines); a boot id does not, and a PID only means something inside its namespace."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return f"unknown-{socket.gethostname()}-{os.getpid()}"  # never equal to another process's: never signalled
    return f"{boot}/{namespace}"


def end_if_here(process: tuple[str, int, int]) -> bool:
    """End a neighbour ``process_identity()`` that stopped answering, when it runs on this machine and in this PID
    namespace, is still the same process, and is shown to be stuck: stopped (SIGSTOP; it ignores torchrun's SIGTERM
    for 30 s). A neighbour that is only waiting, perhaps for another rank that is stuck, is left alone; so is a
    process elsewhere, and one whose PID now names another process (its start time differs): the checks are made on
    a pidfd, which keeps naming the process it was opened for, so the signal cannot reach a process that took the
    PID after them. Returns whether it was ended."""
    machine, pid, started = process
    if machine != machine_identity() or machine.startswith("unknown-") or pid == os.getpid():
        return False
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        if started < 0 or _start_time(pid) != started:  # the neighbour is gone and its PID was reused
            return False
        if _state(pid) not in ("T", "t"):  # running or waiting: not shown to be stuck
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    finally:
        os.close(fd)
    return True
