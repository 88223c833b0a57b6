"""Pipeline messages over torch.distributed point-to-point: a fixed header, then the tensors; bounded and timed."""

from __future__ import annotations

import collections
import contextlib
import datetime
import time
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import errors
from ..errors import PipelineError
from . import quantize
from .deltas import SampleMemory

__all__ = ["Link", "Message", "PeerError", "TRAIN", "EVAL", "END", "GRAD", "WEIGHTS", "EPOCH_DONE", "EVALUATE",
           "peer_failures", "is_peer_failure", "decided_by_rank0"]

# message kinds in the header
TRAIN, EVAL, END, GRAD, WEIGHTS = 1, 2, 3, 4, 5  # WEIGHTS: a block's weights for the previous block's head
EPOCH_DONE, EVALUATE = 1, 2  # flags of an END message after a training phase
_HEADER = 16  # int64 slots: kind, flag, ndim, dims[8], dtype code, labels, int8 sends' float dtype code + 1, sample
# indices (-1: none), 1 if the int8 values are each sample's change against the link's memory (see deltas)
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.uint8, torch.int8]


class Message(NamedTuple):
    """One received message: its kind (``TRAIN``, ``GRAD``, ...), flag, tensor, labels and sample indices."""

    kind: int
    flag: int
    tensor: Tensor | None
    labels: Tensor | None
    ids: Tensor | None


class PeerError(PipelineError):
    """A neighbour stopped answering: usually secondary to a failure elsewhere."""


_PEER_FAILURES = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "connection refused",
                  "no route to host", "network is unreachable")


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (from torch.distributed or gloo) says another process stopped answering or went away."""
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, OSError)) and any(words in text for words in _PEER_FAILURES)


@contextlib.contextmanager
def peer_failures(me: str, others: str, timeout: datetime.timedelta, what: str):
    """Turn a collective that failed because another rank stopped answering (a timeout, a closed connection, a link
    that went down) into one :class:`PeerError` line: "<me> stops: <others> did not answer ... while <what>"."""
    try:
        yield
    except PeerError:
        raise
    except Exception as exc:
        if not is_peer_failure(exc):
            raise
        hung = "time" in str(exc).lower()
        how = (f"did not answer within {timeout.total_seconds():g} s (stopped, hung, or the link is down)" if hung
               else "went away")
        raise PeerError(f"{me} stops: {others} {how}, while {what}") from None


def decided_by_rank0(decide, *, group=None):
    """Run ``decide()`` on rank 0 only and give every rank its result, or make every rank raise its error: what only
    rank 0 can see (its own disk: a checkpoint, a run folder) is decided once, for all, so that no rank goes on
    alone into a collective the others will never join. A collective: every rank of ``group`` calls it."""
    outcome: list = [None]
    failure = None
    if dist.get_rank() == 0:
        try:
            outcome = [("ok", decide())]
        except Exception as exc:  # noqa: BLE001 - handed to every rank, then raised here as it was
            failure = exc
            kind = type(exc).__name__ if isinstance(exc, errors.LfnnifyError) else "PipelineError"
            text = str(exc) if isinstance(exc, errors.LfnnifyError) else f"rank 0 failed: {type(exc).__name__}: {exc}"
            outcome = [("error", kind, text)]
    dist.broadcast_object_list(outcome, src=0, group=group)
    if failure is not None:
        raise failure
    if outcome[0][0] == "error":
        _, kind, text = outcome[0]
        raise getattr(errors, kind, PipelineError)(text)
    return outcome[0][1]


class Link:
    """The messages one rank exchanges with its neighbours: activations down, gradients up.

    Sends are asynchronous; at most ``max_in_flight`` are pending before a send waits for the oldest.
    Every wait is bounded by ``timeout``. ``timing`` collects the seconds spent waiting, read with ``clock``
    (which waits for the compute stream first on a GPU). Each direction of each pair has its own process group
    (``channels``, from :func:`lfnnify.pipeline.groups.make_groups`), so no two messages can wait for each other.

    With ``send_deltas`` (and int8 sends), a training batch sent with its sample indices goes as each sample's change
    since its last visit (:mod:`lfnnify.pipeline.deltas`), against a memory this link keeps for each neighbour.
    """

    def __init__(self, *, rank: int, prev_rank: int | None, next_rank: int | None, device: torch.device,
                 timeout: datetime.timedelta, max_in_flight: int, send_dtype: torch.dtype | None, timing: dict,
                 label, on_hung=None, channels: dict | None = None, clock=time.perf_counter,
                 send_deltas: bool = False):
        self.channels, self.clock = channels or {}, clock
        self.rank, self.prev_rank, self.next_rank = rank, prev_rank, next_rank
        self.device, self.timeout = device, timeout
        self.max_in_flight, self.send_dtype = max_in_flight, send_dtype
        self.send_deltas = send_deltas  # PipelineOptions refuses it without int8 sends
        self.memories: dict[int, SampleMemory] = {}  # neighbour's rank -> what the receiver holds per sample
        self.timing = timing
        self.label = label  # rank -> "rank 1 (block 1)"
        self.on_hung = on_hung  # called with a rank that did not answer within the timeout
        self._pending: collections.deque = collections.deque()
        self._ahead: dict[int, tuple] = {}  # source rank -> a message whose receives are posted (receive_ahead)

    @property
    def comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def send(self, dst: int, kind: int, tensor: Tensor | None = None, labels: Tensor | None = None,
             flag: int = 0, ids: Tensor | None = None) -> None:
        """Post one message to ``dst``; ``ids``: the batch's sample indices (sent with it, and the key of each
        sample's change when this link sends deltas)."""
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[0], header[1] = kind, flag
        header[14] = -1
        payload = []
        if tensor is not None:
            scales = None
            if self.send_dtype is not None and tensor.is_floating_point() and kind != WEIGHTS:  # weights: exact
                if self.send_dtype == torch.int8:
                    header[13] = _DTYPES.index(tensor.dtype) + 1  # what the receiver gets back
                    if self.send_deltas and kind == TRAIN and ids is not None:
                        header[15] = 1
                        tensor, scales = self._memory(dst).encode(tensor, ids)
                    else:
                        tensor, scales = quantize.quantize(tensor)
                else:
                    tensor = tensor.to(self.send_dtype)
            tensor = tensor.detach().contiguous()
            if tensor.dim() > 8:
                raise PipelineError(f"cannot send a {tensor.dim()}-d activation (at most 8 dimensions)")
            header[2] = tensor.dim()
            header[3 : 3 + tensor.dim()] = torch.tensor(tensor.shape)
            header[11] = _DTYPES.index(tensor.dtype)
            header[12] = -1 if labels is None else len(labels)
            payload = [tensor] + ([scales] if scales is not None else [])
            payload += [labels.to(torch.int64).contiguous()] if labels is not None else []
            if ids is not None:
                header[14] = len(ids)
                payload.append(ids.to(torch.int64).contiguous())
        messages = [header.to(self.comm_device), *(t.to(self.comm_device) for t in payload)]
        try:
            group = self.channels.get((self.rank, dst))
            works = [dist.isend(m, dst=dst, group=group) for m in messages]
        except Exception as exc:  # a neighbour that is gone refuses at once
            raise self._peer_error(dst, exc) from None
        self._pending.append((works, messages, dst))
        while len(self._pending) > self.max_in_flight:
            self._wait_oldest()

    def recv(self, src: int, *, dtype: torch.dtype | None = None) -> Message:
        """The next message from ``src`` (the one :meth:`receive_ahead` already posted, if any); its tensor cast to
        ``dtype``."""
        start = self.clock()
        posted = self._ahead.pop(src, None) or self._post(src)
        message = self._finish(src, *posted)
        self.timing["recv_wait_s"] += self.clock() - start
        tensor = message.tensor
        if tensor is not None and dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            message = message._replace(tensor=tensor.to(dtype))
        return message

    def receive_ahead(self, src: int) -> None:
        """Post the receive of the next message from ``src`` now, so that it crosses the link while this rank
        computes (a send completes only once its receive is posted, under gloo as under NCCL, so without this the
        next batch starts crossing only when this rank asks for it). Waits for its header: until ``src`` has posted
        the message. :meth:`recv` then finishes it."""
        if src not in self._ahead:
            start = self.clock()
            self._ahead[src] = self._post(src)
            self.timing["recv_wait_s"] += self.clock() - start

    def _post(self, src: int) -> tuple:
        """Receive the header of the next message from ``src`` and post the receives of its tensors."""
        header = torch.empty(_HEADER, dtype=torch.int64, device=self.comm_device)
        self._recv_into(header, src)
        header = header.cpu()
        if int(header[0]) == END:
            return header, {}, []
        parts = {"tensor": torch.empty(header[3 : 3 + int(header[2])].tolist(), dtype=_DTYPES[int(header[11])],
                                       device=self.comm_device)}
        if int(header[13]) > 0:  # int8 values, then their scales: one per channel (see quantize)
            parts["scales"] = torch.empty(quantize.scale_count(parts["tensor"].shape), dtype=torch.float32,
                                          device=self.comm_device)
        if int(header[12]) >= 0:
            parts["labels"] = torch.empty(int(header[12]), dtype=torch.int64, device=self.comm_device)
        if int(header[14]) >= 0:
            parts["ids"] = torch.empty(int(header[14]), dtype=torch.int64, device=self.comm_device)
        group = self.channels.get((src, self.rank))
        try:  # in the order the sender posted them
            works = [dist.irecv(t, src=src, group=group) for t in parts.values()]
        except Exception as exc:
            raise self._peer_error(src, exc) from None
        return header, parts, works

    def _finish(self, src: int, header: Tensor, parts: dict, works: list) -> Message:
        try:
            for work in works:
                work.wait(self.timeout)
        except Exception as exc:
            raise self._peer_error(src, exc) from None
        kind, flag = int(header[0]), int(header[1])
        if kind == END:
            return Message(kind, flag, None, None, None)
        tensor, scales, labels, ids = (parts.get(k) for k in ("tensor", "scales", "labels", "ids"))
        if int(header[15]):  # each sample's change since its last visit (see deltas)
            tensor = self._memory(src).decode(tensor, scales, ids, _DTYPES[int(header[13]) - 1])
        elif scales is not None:
            tensor = quantize.dequantize(tensor, scales, _DTYPES[int(header[13]) - 1])
        labels, ids = (t.to(self.device) if t is not None else None for t in (labels, ids))
        return Message(kind, flag, tensor.to(self.device), labels, ids)

    def _memory(self, peer: int) -> SampleMemory:
        return self.memories.setdefault(peer, SampleMemory())

    def flush(self) -> None:
        while self._pending:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        works, _, dst = self._pending.popleft()
        start = self.clock()
        try:
            for w in works:
                w.wait(self.timeout)
        except Exception as exc:
            raise self._peer_error(dst, exc) from None
        self.timing["send_wait_s"] += self.clock() - start

    def _recv_into(self, tensor: Tensor, src: int) -> None:
        try:
            work = dist.irecv(tensor, src=src, group=self.channels.get((src, self.rank)))
            work.wait(self.timeout)
        except Exception as exc:
            raise self._peer_error(src, exc) from None

    def _peer_error(self, peer: int, exc: Exception) -> PeerError:
        """One line that names the rank that stopped answering, and how: it hung (timeout) or it exited."""
        text = str(exc)
        hung = "timed out" in text.lower() or "timeout" in text.lower()
        if hung:
            what = f"did not answer within {self.timeout.total_seconds():g} s"
            if self.on_hung is not None and self.on_hung(peer):
                what += " (it was stopped); ended it"
            else:
                what += " (stopped, hung, or itself waiting for another rank)"
        else:
            what = "exited"
        return PeerError(f"{self.label(self.rank)} stops: {self.label(peer)} {what}")

    def named(self, others: str, what: str):
        """The context in which a collective with ``others`` (a label) that fails names them (see
        :func:`peer_failures`)."""
        return peer_failures(self.label(self.rank), others, self.timeout, what)
