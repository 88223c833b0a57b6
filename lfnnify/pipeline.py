"""Pipeline-parallel trainer: one block per process/device over torch.distributed, started by torchrun."""

from __future__ import annotations

import collections
import contextlib
import datetime
import os
import sys
import time
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .model import LFNNModel, main_output
from .trainer import Trainer, block_parameters

__all__ = ["PipelineTrainer", "StageTiming"]

# message kinds in the header
_TRAIN, _EVAL, _END = 1, 2, 3
_EPOCH_DONE, _EVALUATE = 1, 2  # flags of an _END message after a training phase
_HEADER = 16  # int64 slots: kind, flag, ndim, dims[8], dtype code, labels, unused
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.uint8]


class StageTiming(dict):
    """Seconds a rank spent busy (compute), waiting to receive, and waiting for sends, plus step count."""


class PipelineTrainer(Trainer):
    """Trains an :class:`~lfnnify.LFNNModel` with one block per process, started by ``torchrun``.

    With world size K×R (K blocks, R replicas), rank ``r`` trains block ``r // R`` as replica
    ``r % R``. The first stage's ranks read the input batches (replica i takes batches i, i+R, ...);
    labels travel with the activations. Block k sends its output to block k+1 right after its forward
    pass and then runs its own loss, backward and optimizer step, so block k works on batch t while
    block k+1 works on batch t−1. Replicas of a block average their gradients with an all-reduce
    in the block's process group. LFNN-ℓ has no staleness: with the same seed and data order the
    pipeline computes what :class:`~lfnnify.Trainer` computes (when the blocks draw no random numbers;
    each rank has its own generator for dropout).

    Example (every rank runs the same script, ``torchrun --nproc-per-node 4 train.py``):
        >>> net = lfnnify.convert(model, blocks=int(os.environ["WORLD_SIZE"]))
        >>> trainer = lfnnify.PipelineTrainer(net, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
        >>> trainer.fit(train_loader, epochs=1, val_loader=test_loader)   # only rank 0 reads the data

    Args:
        net: the converted model (every rank converts the same model; each keeps only its block).
        optimizer, scheduler, amp, grad_clip, head_warmup_steps, reselect, log_path, progress:
            as for :class:`~lfnnify.Trainer`.
        max_in_flight: outgoing activation messages allowed in flight before a stage waits (memory bound).
        send_dtype: send activations in this dtype (``torch.bfloat16`` halves traffic); default: as computed.
        timeout_s: how long a rank waits for a neighbour before giving up; a failed rank's neighbours
            stop within this bound (torchrun also stops the others when one process exits with an error).
        threads: torch threads for this process (set it: oversubscribed cores are very slow).
    """

    def __init__(
        self,
        net: LFNNModel,
        *,
        optimizer,
        scheduler=None,
        max_in_flight: int = 2,
        send_dtype: torch.dtype | None = None,
        timeout_s: float = 120.0,
        threads: int | None = None,
        amp: str | None = None,
        grad_clip: float | None = None,
        head_warmup_steps: int = 0,
        reselect: str = "batch",
        log_path=None,
        log_every: int = 20,
        progress: bool = True,
    ):
        if not isinstance(net, LFNNModel):
            raise TypeError(f"PipelineTrainer needs a model from lfnnify.convert, got {type(net).__name__}")
        if net.mode != "local":
            raise ValueError(
                f"mode={net.mode!r}: the pipeline trains LFNN-ℓ (mode='local'); Eq. 1's global loss needs backward "
                f"through every block, which is backward locking. Use lfnnify.Trainer for mode='lfnn'."
            )
        if not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"max_in_flight={max_in_flight!r} must be an int >= 1")
        if threads is not None:
            torch.set_num_threads(threads)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        _init_distributed(self.timeout)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        blocks = net.num_blocks
        if self.world % blocks:
            raise ValueError(
                f"world size {self.world} is not a multiple of the model's {blocks} blocks; start K×R processes "
                f"(K blocks, R replicas each), e.g. torchrun --nproc-per-node {blocks}, or convert with blocks={self.world}"
            )
        self.replicas = self.world // blocks
        self.stage, self.replica = divmod(self.rank, self.replicas)
        self.first, self.last = self.stage == 0, self.stage == blocks - 1
        self.prev_rank = self.rank - self.replicas if not self.first else None
        self.next_rank = self.rank + self.replicas if not self.last else None
        cuts: list = [None] * self.world
        dist.all_gather_object(cuts, net.plan.cuts)
        if any(c != cuts[0] for c in cuts):
            raise ValueError(
                f"ranks converted the model with different cuts ({cuts}); every rank must cut at the same places: "
                f"pass explicit cuts=[...] (balance='time' measures on each rank and can disagree)"
            )
        # every rank creates every group, in the same order (torch.distributed's rule)
        groups = [dist.new_group([k * self.replicas + r for r in range(self.replicas)]) for k in range(blocks)]
        self.group = groups[self.stage]
        self.device = _stage_device()
        _keep_only_stage(net, self.stage, self.device)
        self.max_in_flight, self.send_dtype = max_in_flight, send_dtype
        self._pending: collections.deque = collections.deque()
        self.timing = StageTiming(busy_s=0.0, recv_wait_s=0.0, send_wait_s=0.0, steps=0)

        # the one-device trainer's bookkeeping, restricted to this rank's block
        super().__init__(
            net, optimizer=optimizer, scheduler=scheduler, amp=amp, grad_clip=grad_clip,
            head_warmup_steps=head_warmup_steps, reselect=reselect, log_path=log_path if self.last else None,
            log_every=log_every, progress=progress and self.rank == 0,
        )
        self.device = _stage_device()
        own = block_parameters(net)[self.stage]
        self.groups = [own if k == self.stage else [] for k in range(blocks)]
        self.optimizers = [optimizer(own) if k == self.stage else None for k in range(blocks)]
        self.schedulers = [
            scheduler(self.optimizers[k]) if scheduler is not None and k == self.stage else None for k in range(blocks)
        ]
        self.scalers = [s if k == self.stage else None for k, s in enumerate(self.scalers)]
        net._pipeline = {"stage": self.stage, "replica": self.replica, "replicas": self.replicas, "rank": self.rank}
        if self.replicas > 1:  # replicas start from the same weights
            for tensor in net.blocks[self.stage].state_dict().values():
                dist.broadcast(tensor, src=self.stage * self.replicas, group=self.group)

    # ------------------------------------------------------------------ the data path of one stage

    def _stage_step(self, x: Tensor, y: Tensor) -> dict:
        """Forward this rank's block on batch ``x``, pass the output on, then its own loss and update."""
        start = time.perf_counter()
        net, k = self.net, self.stage
        net.train()
        warmup = self.step < self.head_warmup_steps
        with self._autocast():
            if warmup and not self.last:
                with torch.no_grad():
                    out = net.blocks[k](x)
            else:
                out = net.blocks[k](x)
        if not self.last:
            self.timing["busy_s"] += time.perf_counter() - start
            self._send(_TRAIN, out.detach(), y)  # the next stage starts now; our backward overlaps it
            start = time.perf_counter()
            with self._autocast():
                result = net.head_loss(k, out, y)
            loss, logits = result.loss, result.best_logits
            self._count_leaders(k, result.leaders)
        else:
            with self._autocast():
                loss, logits = net.output_loss(out, y)
        self._check_finite(k, loss)
        opt, scaler = self.optimizers[k], self.scalers[k]
        opt.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if warmup and self.last:
            for p in self.groups[k]:
                if id(p) not in self._classifier_ids:
                    p.grad = None
        if self.replicas > 1:
            self._average_gradients()
        self._clip_and_step(k)
        self.step += 1
        self.step_in_epoch += 1
        self.timing["steps"] += 1
        self.timing["busy_s"] += time.perf_counter() - start
        return {"step": self.step, "loss": loss.detach().item(),
                "accuracy": (logits.detach().argmax(-1) == y).float().mean().item()}

    def train_step(self, x: Tensor, y: Tensor) -> dict:
        raise RuntimeError("PipelineTrainer steps inside fit(); every rank calls fit() with the same arguments")

    # ------------------------------------------------------------------ messages

    def _send(self, kind: int, tensor: Tensor | None = None, labels: Tensor | None = None, flag: int = 0) -> None:
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[0], header[1] = kind, flag
        payload = []
        if tensor is not None:
            if self.send_dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(self.send_dtype)
            tensor = tensor.contiguous()
            if tensor.dim() > 8:
                raise ValueError(f"cannot send a {tensor.dim()}-d activation (at most 8 dimensions)")
            header[2] = tensor.dim()
            header[3 : 3 + tensor.dim()] = torch.tensor(tensor.shape)
            header[11] = _DTYPES.index(tensor.dtype)
            header[12] = len(labels)
            payload = [tensor, labels.to(torch.int64).contiguous()]
        messages = [header.to(self._comm_device), *(t.to(self._comm_device) for t in payload)]
        works = [dist.isend(m, dst=self.next_rank) for m in messages]
        self._pending.append((works, messages))
        while len(self._pending) > self.max_in_flight:
            self._wait_oldest_send()

    def _wait_oldest_send(self) -> None:
        works, _ = self._pending.popleft()
        start = time.perf_counter()
        for w in works:
            w.wait(self.timeout)
        self.timing["send_wait_s"] += time.perf_counter() - start

    def _flush_sends(self) -> None:
        while self._pending:
            self._wait_oldest_send()

    def _recv(self) -> tuple[int, int, Tensor | None, Tensor | None]:
        start = time.perf_counter()
        header = torch.empty(_HEADER, dtype=torch.int64, device=self._comm_device)
        self._recv_into(header)
        header = header.cpu()
        kind, flag = int(header[0]), int(header[1])
        if kind == _END:
            self.timing["recv_wait_s"] += time.perf_counter() - start
            return kind, flag, None, None
        shape = header[3 : 3 + int(header[2])].tolist()
        tensor = torch.empty(shape, dtype=_DTYPES[int(header[11])], device=self._comm_device)
        labels = torch.empty(int(header[12]), dtype=torch.int64, device=self._comm_device)
        self._recv_into(tensor)
        self._recv_into(labels)
        self.timing["recv_wait_s"] += time.perf_counter() - start
        dtype = next((p.dtype for p in self.net.blocks[self.stage].parameters() if p.is_floating_point()), tensor.dtype)
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return kind, flag, tensor.to(self.device), labels.to(self.device)

    def _recv_into(self, tensor: Tensor) -> None:
        work = dist.irecv(tensor, src=self.prev_rank)
        try:
            work.wait(self.timeout)
        except Exception as exc:
            raise _PeerError(
                f"rank {self.rank} (block {self.stage}) got nothing from rank {self.prev_rank} within "
                f"{self.timeout.total_seconds():.0f} s: {type(exc).__name__}"
            ) from exc

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _average_gradients(self) -> None:
        grads = [p.grad for p in self.groups[self.stage] if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.group)
        flat /= self.replicas
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    # ------------------------------------------------------------------ loops

    def fit(self, loader=None, *, epochs: int = 1, max_steps: int | None = None, val_loader=None) -> list[dict]:
        """Train in pipeline mode. Every rank calls ``fit`` with the same ``epochs``/``max_steps``;
        only the first stage reads ``loader`` (other ranks may pass ``None``).

        ``max_steps`` counts optimizer steps of each rank (one per batch of its replica).
        Returns the per-epoch history (the last stage's losses and accuracy).
        """
        try:
            return self._fit(loader, epochs=epochs, max_steps=max_steps, val_loader=val_loader)
        except BaseException as exc:
            self._report_failure(exc)
            raise

    def _fit(self, loader, *, epochs, max_steps, val_loader):
        if self.first and loader is None:
            raise ValueError(f"rank {self.rank} runs block 0 and reads the data: pass the training loader to fit()")
        while self.epoch < epochs and (max_steps is None or self.step < max_steps):
            if self.step_in_epoch == 0 and self.reselect == "epoch":
                self.net.fixed_leaders = [None] * len(self.net.heads)
            start, records = time.perf_counter(), []
            if self.first:
                flags = self._feed(loader, max_steps, records, evaluate=val_loader is not None)
            else:
                flags = self._follow(records)
            finished = bool(flags & _EPOCH_DONE)
            entry = {
                "epoch": self.epoch + (1 if finished else 0),
                "step": self.step,
                "train_loss": sum(r["loss"] for r in records) / max(len(records), 1),
                "train_accuracy": sum(r["accuracy"] for r in records) / max(len(records), 1),
                "seconds": time.perf_counter() - start,
                "rank": self.rank,
                "block": self.stage,
            }
            if finished:
                self._end_epoch()
            if flags & _EVALUATE:  # decided by the first stage, so every rank evaluates together
                entry.update({f"val_{k}": v for k, v in self.evaluate(val_loader).items()})
            self.history.append(entry)
            if self.last:
                self._log({"kind": "epoch", **entry})
            if not finished:
                break
        return self.history

    def _feed(self, loader, max_steps, records, *, evaluate: bool) -> int:
        """First stage: read this replica's batches, run block 0, and pass them down the pipe."""
        sampler = getattr(loader, "sampler", None)
        batch_size = getattr(loader, "batch_size", None) or 1
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
            if self.step_in_epoch and hasattr(sampler, "skip"):
                sampler.skip(self.step_in_epoch * self.replicas * batch_size)
        rounds = len(loader) // self.replicas  # every replica takes the same number of steps
        batches = iter(loader)
        from tqdm.auto import tqdm

        bar = tqdm(total=rounds, initial=self.step_in_epoch, disable=not self.progress, leave=False,
                   desc=f"epoch {self.epoch + 1} (pipeline, {self.world} ranks)", unit="batch", dynamic_ncols=True)
        finished = False
        while (max_steps is None or self.step < max_steps) and not self._stop:
            if self.step_in_epoch >= rounds:
                finished = True
                break
            try:
                chunk = [next(batches) for _ in range(self.replicas)]
            except StopIteration:
                finished = True
                break
            x, y = chunk[self.replica]
            start = time.perf_counter()
            x, y = x.to(self.device), y.to(self.device)
            self.timing["busy_s"] += time.perf_counter() - start
            records.append(self._stage_step(x, y))
            bar.update(1)
            bar.set_postfix(loss=f"{records[-1]['loss']:.3f}")
        bar.close()
        reached = max_steps is not None and self.step >= max_steps
        wanted = evaluate and (finished or reached) and not self._stop  # a stop request returns at once
        flags = (_EPOCH_DONE if finished else 0) | (_EVALUATE if wanted else 0)
        if not self.last:
            self._send(_END, flag=flags)
        self._flush_sends()
        return flags

    def _follow(self, records) -> int:
        """Later stages: receive, train, pass on, until the end-of-phase message."""
        while True:
            kind, flag, x, y = self._recv()
            if kind == _END:
                if not self.last:
                    self._send(_END, flag=flag)
                self._flush_sends()
                return flag
            if kind != _TRAIN:
                raise RuntimeError(f"rank {self.rank} expected a training batch, got message kind {kind}")
            records.append(self._stage_step(x, y))

    @torch.no_grad()
    def evaluate(self, loader=None) -> dict:
        """Evaluate in pipeline mode (every rank calls it; the first stage reads ``loader``).

        Every rank returns the same metrics (as :meth:`Trainer.evaluate`): the counts of all stages
        are summed with one all-reduce, and the last stage computes the model's accuracy and loss.
        """
        heads, workers = len(self.net.heads), self.net.config["workers"]
        # [per head-worker correct..., final correct, final loss sum, samples]
        totals = torch.zeros(heads * workers + 3, dtype=torch.float64)
        block = self.net.blocks[self.stage]
        was_training = block.training
        self.net.eval()

        def run(x, y):
            with self._autocast():
                out = block(x)
            if not self.last:
                self._send(_EVAL, out, y)
                logits = self.net.heads[self.stage](out)
                logits = logits.unsqueeze(0) if logits.dim() == 2 else logits
                offset = self.stage * workers
                totals[offset : offset + workers] += (logits.argmax(-1) == y).sum(-1).double().cpu()
            else:
                logits = main_output(out).float()
                totals[-3] += (logits.argmax(-1) == y).sum().item()
                totals[-2] += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
                totals[-1] += len(y)

        if self.first:
            if loader is None:
                raise ValueError(f"rank {self.rank} runs block 0: pass the evaluation loader to evaluate()")
            for i, (x, y) in enumerate(loader):
                if i % self.replicas == self.replica:
                    run(x.to(self.device), y.to(self.device))
            if not self.last:
                self._send(_END)
        else:
            while True:
                kind, _, x, y = self._recv()
                if kind == _END:
                    if not self.last:
                        self._send(_END)
                    break
                run(x, y)
        self._flush_sends()
        self.net.train(was_training)
        totals = totals.to(self._comm_device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(totals)
        totals = totals.cpu()
        samples = max(totals[-1].item(), 1.0)
        worker_acc = (totals[: heads * workers].view(heads, workers) / samples).tolist()
        accuracy = totals[-3].item() / samples
        return {
            "accuracy": accuracy,
            "loss": totals[-2].item() / samples,
            "block_accuracy": [max(w) for w in worker_acc] + [accuracy],
            "worker_accuracy": worker_acc,
        }

    def stage_timings(self) -> list[StageTiming]:
        """Every rank's busy / waiting-to-receive / waiting-to-send seconds (a collective: all ranks call it)."""
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, {**self.timing, "rank": self.rank, "block": self.stage})
        return [StageTiming(t) for t in gathered]

    def _report_failure(self, exc: BaseException) -> None:
        if isinstance(exc, _PeerError):
            print(f"lfnnify: rank {self.rank} (block {self.stage}) stopping: {exc}", file=sys.stderr, flush=True)
        elif not isinstance(exc, KeyboardInterrupt):
            print(f"lfnnify: rank {self.rank} (block {self.stage}) failed: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        with self._own_stage_only():
            state = super().state_dict()
        state["stage"] = self.stage
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("stage", self.stage) != self.stage:
            raise ValueError(f"this trainer state belongs to block {state['stage']}, not block {self.stage}")
        with self._own_stage_only():
            super().load_state_dict(state)

    @contextlib.contextmanager
    def _own_stage_only(self):
        """Expose only this rank's optimizer/scheduler/scaler to the one-device trainer's state code."""
        saved = self.optimizers, self.schedulers, self.scalers
        self.optimizers, self.schedulers, self.scalers = ([lst[self.stage]] for lst in saved)
        try:
            yield
        finally:
            self.optimizers, self.schedulers, self.scalers = saved


class _PeerError(RuntimeError):
    """A neighbour stopped answering: secondary to a failure elsewhere."""


def _init_distributed(timeout: datetime.timedelta) -> None:
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "PipelineTrainer runs one process per block, started by torchrun: "
            "torchrun --nproc-per-node K your_script.py (RANK and WORLD_SIZE are not set here)"
        )
    backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=timeout)


def _stage_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _keep_only_stage(net: LFNNModel, stage: int, device: torch.device) -> None:
    """Free the other blocks' parameters on this rank and move its own block and head to ``device``."""
    own = [net.blocks[stage]] + ([net.heads[stage]] if stage < len(net.heads) else [])
    keep = {id(p) for p in _tensors(*own)}
    for k in range(net.num_blocks):
        if k != stage:
            for p in _tensors(net.blocks[k], net.heads[k] if k < len(net.heads) else None):
                if id(p) not in keep:
                    p.data = torch.empty(0, dtype=p.dtype)
    for m in own:
        m.to(device)


def _tensors(*modules: nn.Module | None) -> Iterable[Tensor]:
    for m in modules:
        if m is not None:
            yield from m.parameters()
