"""Pipeline-parallel trainer: one block per process/device over torch.distributed, started by torchrun."""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
import warnings

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError, PipelineError
from ..surgery.model import LFNNModel
from ..training.base import TrainerBase
from ..training.inputs import check_batch, check_fit, pair
from ..training.options import PipelineOptions, TrainerOptions, signature_with_options
from .balance import CHECK_AFTER_STEPS, balance_report
from .comm import (
    END,
    EPOCH_DONE,
    EVALUATE,
    GRAD,
    TRAIN,
    WEIGHTS,
    Link,
    end_if_here,
    fault,
    host_name,
    init_distributed,
    machine_identity,
    name_the_rank,
    pair_channels,
    peer_failures,
    stage_device,
)
from .evaluation import evaluate_stage
from .replicas import average_gradients, broadcast_from_first_replica
from .shards import Shard, keep_only_stage

__all__ = ["PipelineTrainer", "StageTiming"]


class StageTiming(dict):
    """Seconds a rank spent busy (compute), waiting to receive, and waiting for sends, plus step count."""


class PipelineTrainer(TrainerBase):
    """Trains an :class:`~lfnnify.LFNNModel` with one block per process, started by ``torchrun``.

    With world size K×R (K blocks, R replicas), rank ``r`` trains block ``r // R`` as replica
    ``r % R``. The first stage's ranks read the input batches (replica i takes batches i, i+R, ...);
    labels travel with the activations. Block k sends its output to block k+1 right after its forward
    pass and then runs its own update (:class:`lfnnify.training.stage.BlockStage`, the same code the one-device
    trainer runs), so block k works on batch t while block k+1 works on batch t−1. In ``mode="replay"``
    block k+1 also sends back the gradient of each batch's input, which block k applies one step later;
    no rank waits for more than its neighbour's previous step. Replicas of a block average their
    gradients with an all-reduce in the block's process group. With the same seed and data order the
    pipeline computes what :class:`~lfnnify.Trainer` computes (when the blocks draw no random numbers;
    each rank has its own generator for dropout).

    Example (every rank runs the same script, ``torchrun --nproc-per-node 4 train.py``):
        >>> net = lfnnify.convert(model, blocks=int(os.environ["WORLD_SIZE"]))
        >>> trainer = lfnnify.PipelineTrainer(net, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
        >>> trainer.fit(train_loader, epochs=1, val_loader=test_loader)   # only rank 0 reads the data

    Args:
        net: the converted model (every rank converts the same model; each keeps only its block).
        optimizer, scheduler, amp, grad_clip, head_warmup_steps, reselect, switch_mode_at, switch_to,
            refresh_heads_every, refresh_momentum, delay_lr_warmup, log_path, log_every, progress: as for
            :class:`~lfnnify.Trainer`
            (block k+1's rank sends its weights to block k's head when it starts a refresh step).
        max_in_flight: outgoing messages allowed in flight before a stage waits (memory bound).
        send_dtype: send activations and gradients in this dtype (``torch.bfloat16`` halves traffic).
        timeout_s: how long a rank waits for a neighbour before giving up; a failed rank's neighbours
            stop within this bound (torchrun also stops the others when one process exits with an error).
        threads: torch threads for this process (set it: oversubscribed cores are very slow).
        backend: ``"nccl"`` or ``"gloo"`` when this call starts the process group; by default NCCL when every
            process on the machine has a GPU of its own, else gloo (with a line saying why).
        device: ``None``: this rank's GPU (``LOCAL_RANK``) when there are GPUs, else the CPU; ``"cpu"`` keeps the
            block on the CPU (and talks over gloo).

    On a GPU, the timestamps behind :meth:`stage_timings` wait for the device (``torch.cuda.synchronize``), and
    a non-finite loss is detected on the device and read every ``FINITE_CHECK_EVERY`` (25) steps and at the end
    of every ``fit`` phase; the error names the block and the step where it first happened.
    """

    def __init__(
        self,
        net: LFNNModel,
        *,
        max_in_flight: int = 2,
        send_dtype: torch.dtype | None = None,
        timeout_s: float = 120.0,
        threads: int | None = None,
        backend: str | None = None,
        device: str | None = None,
        **settings,
    ):
        options = TrainerOptions.from_settings("PipelineTrainer", settings)
        own = PipelineOptions(max_in_flight, send_dtype, timeout_s, threads, backend, device)
        if not isinstance(net, LFNNModel):
            raise ConfigError(f"PipelineTrainer needs a model from lfnnify.convert, got {type(net).__name__}")
        own.check_for(net)
        if threads is not None:
            torch.set_num_threads(threads)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        on_cpu = device == "cpu"
        init_distributed(self.timeout, "gloo" if on_cpu and backend is None else backend, use_gpus=not on_cpu)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        blocks = net.num_blocks
        if self.world % blocks:
            raise ConfigError(
                f"world size {self.world} is not a multiple of the model's {blocks} blocks; start K×R processes "
                f"(K blocks, R replicas each), e.g. torchrun --nproc-per-node {blocks}, or convert with "
                f"blocks={self.world}"
            )
        self.replicas = self.world // blocks
        self.stage, self.replica = divmod(self.rank, self.replicas)
        self.first, self.last = self.stage == 0, self.stage == blocks - 1
        self.prev_rank = self.rank - self.replicas if not self.first else None
        self.next_rank = self.rank + self.replicas if not self.last else None
        cuts: list = [None] * self.world
        dist.all_gather_object(cuts, net.plan.cuts)
        if any(c != cuts[0] for c in cuts):
            raise ConfigError(
                f"ranks converted the model with different cuts ({cuts}); every rank must cut at the same places: "
                f"pass explicit cuts=[...] (balance='time' measures on each rank and can disagree)"
            )
        # every rank creates every group, in the same order (torch.distributed's rule)
        groups = [dist.new_group([k * self.replicas + r for r in range(self.replicas)]) for k in range(blocks)]
        self.group = groups[self.stage]
        channels = pair_channels(blocks, self.replicas)
        shapes = {k: list(v.shape) for k, v in net._source.state_dict().items()}  # before other blocks are freed
        keep_only_stage(net, self.stage, torch.device("cpu") if on_cpu else stage_device())
        super().__init__(net, owned=[self.stage], options=dataclasses.replace(
            options, log_path=options.log_path if self.last else None, progress=options.progress and self.rank == 0))
        self.timing = StageTiming(busy_s=0.0, recv_wait_s=0.0, send_wait_s=0.0, steps=0)
        self.balance: dict | None = None  # the blocks' busy time per step, once gathered (see _balance.py)
        processes: list = [None] * self.world
        dist.all_gather_object(processes, (machine_identity(), os.getpid(), host_name()))
        self._processes = [(machine, pid) for machine, pid, _ in processes]
        hosts = [host for _, _, host in processes]
        self._hosts = hosts if len(set(hosts)) > 1 else None  # named in messages when the ranks span machines
        self.link = Link(rank=self.rank, prev_rank=self.prev_rank, next_rank=self.next_rank, device=self.device,
                         timeout=self.timeout, max_in_flight=max_in_flight, send_dtype=send_dtype, timing=self.timing,
                         label=self._label, on_hung=lambda rank: end_if_here(self._processes[rank]),
                         channels={pair: g for pair, g in channels.items() if self.rank in pair}, clock=self._now)
        self._early_grad: Tensor | None = None  # replay: a gradient received at the end of a phase
        if self.replicas > 1:
            self.updates[self.stage].reduce = lambda grads: average_gradients(grads, self.group, self.replicas,
                                                                              self.link.comm_device)
            broadcast_from_first_replica(self.net, self.stage, self.replicas, self.group, self.link.comm_device)
        net._shard = Shard(stage=self.stage, replica=self.replica, replicas=self.replicas, rank=self.rank,
                           source_shapes=shapes, talking=self.talking)

    # ------------------------------------------------------------------ the data path of one stage

    def _stage_step(self, x: Tensor, y: Tensor) -> dict:
        """This rank's block on batch ``x``: forward, pass the output on, then its update (and, in replay
        mode, the gradient of an earlier batch's input back to the previous rank)."""
        start = self._now()
        t, stage = self.step, self.stages[self.stage]
        fault(self.rank, t)
        self.net.train()
        if not self.first and self._refresh_due(self.stage - 1, t):  # block k-1's look-ahead head copies this block
            self.link.send(self.prev_rank, WEIGHTS, self.net.heads[self.stage - 1].flat_weights(stage.block))
        out = stage.forward(x, y, t)
        if not self.last:
            self.timing["busy_s"] += self._now() - start
            self.link.send(self.next_rank, TRAIN, out.detach(), y)  # the next stage starts now
            if self._refresh_due(self.stage, t):
                self._refresh_head(t)
            start = self._now()
        grad = None
        if stage.expects_grad(t):
            grad = self._take_grad()
            start = self._now()
        below, record = stage.learn(grad, t)
        del out
        if below is not None:
            self.link.send(self.prev_rank, GRAD, below)
        if record:
            self._count_leaders(self.stage, record["leaders"])
        self.step += 1
        self.step_in_epoch += 1
        self.timing["steps"] += 1
        self.timing["busy_s"] += self._now() - start
        self._after_step()
        return record

    def _now(self) -> float:
        """A timestamp after the device has finished the work queued so far, so that busy and waiting times mean
        what they say on a GPU (where kernels run asynchronously); on the CPU a plain clock."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _take_grad(self) -> Tensor:
        if self._early_grad is not None:
            grad, self._early_grad = self._early_grad, None
            return grad
        return self._recv_from_next(GRAD, "a gradient")

    def _recv_from_next(self, expected: int, what: str) -> Tensor:
        kind, _, tensor, _ = self.link.recv(self.next_rank)
        if kind != expected:
            raise PipelineError(f"{self._label(self.rank)} expected {what}, got message kind {kind}")
        return tensor

    def _refresh_head(self, t: int) -> None:
        """Block k+1's weights as they are after its step t-1, which it sent when it started step t (after the
        gradient it sent at step t-1, which is kept for this step)."""
        if self.stages[self.stage].expects_grad(t) and self._early_grad is None:
            self._early_grad = self._take_grad()
        flat = self._recv_from_next(WEIGHTS, "weights")
        self.net.heads[self.stage].refresh_from_flat(flat, self.net.blocks[self.stage + 1], self.refresh_momentum)

    def _end_phase(self) -> None:
        """Take the gradient the next rank sent at its last step (it is for this rank's next step), so that no
        message is left in flight across an evaluation, a checkpoint or the end of training."""
        if self.stages[self.stage].expects_grad(self.step) and self._early_grad is None:
            self._early_grad = self._take_grad()
        self.link.flush()

    def train_step(self, x: Tensor, y: Tensor) -> dict:
        raise PipelineError("PipelineTrainer steps inside fit(); every rank calls fit() with the same arguments")

    # ------------------------------------------------------------------ loops

    def talking(self, what: str):
        """A context in which another rank that stops answering ends this one with one line that names it."""
        others = [r for r in range(self.world) if r != self.rank]
        named = self._label(others[0]) if len(others) == 1 else f"another rank of {self.world}"
        return peer_failures(self._label(self.rank), named, self.timeout, what)

    def _label(self, rank: int) -> str:
        host = f", on {self._hosts[rank]}" if getattr(self, "_hosts", None) else ""
        return f"rank {rank} (block {rank // self.replicas}{host})"

    def fit(self, loader=None, *, epochs: int = 1, max_steps: int | None = None, val_loader=None) -> list[dict]:
        """Train in pipeline mode. Every rank calls ``fit`` with the same ``epochs``/``max_steps``;
        only the first stage reads ``loader`` (other ranks may pass ``None``).

        ``max_steps`` counts optimizer steps of each rank (one per batch of its replica).
        Returns the per-epoch history (the last stage's losses and accuracy).

        Raises:
            lfnnify.PipelineError: a neighbour exited or stopped answering within ``timeout_s`` (the message
                names it). Any error raised on this rank carries ``pipeline_rank``, e.g. "rank 1 (block 1)".
        """
        try:
            with self.talking("training"):
                return self._fit(loader, epochs=epochs, max_steps=max_steps, val_loader=val_loader)
        except BaseException as exc:
            name_the_rank(exc, self._label(self.rank))
            raise

    def _fit(self, loader, *, epochs, max_steps, val_loader):
        if self.first and loader is None:
            raise ConfigError(f"rank {self.rank} runs block 0 and reads the data: pass the training loader to fit()")
        check_fit(loader if self.first else None, epochs=epochs, max_steps=max_steps, where="PipelineTrainer.fit")
        self._check_usable()
        while self.epoch < epochs and (max_steps is None or self.step < max_steps):
            start, records = self._now(), []
            if self.first:
                flags = self._feed(loader, max_steps, records, evaluate=val_loader is not None)
            else:
                flags = self._follow(records)
            finished = bool(flags & EPOCH_DONE)
            entry = {
                "epoch": self.epoch + (1 if finished else 0),
                "step": self.step,
                "train_loss": self._summary(records, "loss"),
                "train_accuracy": self._summary(records, "accuracy"),
                "seconds": self._now() - start,
                "rank": self.rank,
                "block": self.stage,
            }
            if finished:
                self._end_epoch()
            if flags & EVALUATE:  # decided by the first stage, so every rank evaluates together
                entry.update({f"val_{k}": v for k, v in self.evaluate(val_loader).items()})
            self.history.append(entry)
            if self.last:
                self._log({"kind": "epoch", **entry})
            if not finished:
                break
        self._raise_if_nonfinite()
        if self.balance is None and self.world > 1 and self.timing["steps"] >= CHECK_AFTER_STEPS:
            self._check_balance()
        return self.history

    def _check_balance(self) -> None:
        """Once, after the first steps (every rank has taken the same number): gather every rank's busy time, keep
        the report in ``self.balance``, and warn on rank 0 when one block is much slower than the others."""
        self.balance = balance_report(self.stage_timings(), self.replicas, self.net.config.get("balance"))
        if self.balance["warning"] and self.rank == 0:
            warnings.warn(self.balance["warning"], UserWarning, stacklevel=3)
        if self.last:
            self._log({"kind": "balance", **self.balance})

    def _feed(self, loader, max_steps, records, *, evaluate: bool) -> int:
        """First stage: read this replica's batches, run block 0, and pass them down the pipe."""
        self._start_epoch(loader, replicas=self.replicas)
        rounds = len(loader) // self.replicas  # every replica takes the same number of steps
        if rounds == 0:
            raise DataError(f"the training loader has {len(loader)} batches, fewer than block 0's {self.replicas} "
                            f"replicas, so no replica gets a batch; use a smaller batch_size or fewer replicas")
        batches = iter(loader)
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
            x, y = check_batch(*pair(chunk[self.replica], where="PipelineTrainer.fit"), self.batch_rules,
                               where="PipelineTrainer.fit")
            start = self._now()
            x, y = x.to(self.device), y.to(self.device)
            self.timing["busy_s"] += self._now() - start
            records.append(self._stage_step(x, y))
            bar.update(1)
            if records[-1] and self.progress and self.step % self.log_every == 0:  # reading it waits for the device
                bar.set_postfix(loss=f"{float(records[-1]['loss']):.3f}")
        bar.close()
        reached = max_steps is not None and self.step >= max_steps
        wanted = evaluate and (finished or reached) and not self._stop  # a stop request returns at once
        flags = (EPOCH_DONE if finished else 0) | (EVALUATE if wanted else 0)
        if not self.last:
            self.link.send(self.next_rank, END, flag=flags)
        self._end_phase()
        return flags

    def _follow(self, records) -> int:
        """Later stages: receive, train, pass on, until the end-of-phase message."""
        if self.step_in_epoch == 0 and self.reselect == "epoch":
            self.net.fixed_leaders = [None] * len(self.net.heads)
        while True:
            kind, flag, x, y = self.link.recv(self.prev_rank, dtype=self._dtype())
            if kind == END:
                if not self.last:
                    self.link.send(self.next_rank, END, flag=flag)
                self._end_phase()
                return flag
            if kind != TRAIN:
                raise PipelineError(f"rank {self.rank} expected a training batch, got message kind {kind}")
            records.append(self._stage_step(x, y))

    def _dtype(self) -> torch.dtype | None:
        return next((p.dtype for p in self.net.blocks[self.stage].parameters() if p.is_floating_point()), None)

    def evaluate(self, loader=None) -> dict:
        """Evaluate in pipeline mode (every rank calls it; the first stage reads ``loader``).

        Every rank returns the same metrics (as :meth:`Trainer.evaluate`): the counts of all stages
        are summed with one all-reduce, and the last stage computes the model's accuracy and loss.
        """
        self._check_usable()
        with self.talking("evaluating"):
            return evaluate_stage(self, loader)

    def stage_timings(self) -> list[StageTiming]:
        """Every rank's busy / waiting-to-receive / waiting-to-send seconds (a collective: all ranks call it)."""
        gathered: list = [None] * self.world
        with self.talking("gathering the stage timings"):
            dist.all_gather_object(gathered, {**self.timing, "rank": self.rank, "block": self.stage})
        return [StageTiming(t) for t in gathered]

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["stage"] = self.stage
        state["early_grad"] = self._early_grad
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("stage", self.stage) != self.stage:
            raise ConfigError(f"this trainer state belongs to block {state['stage']}, not block {self.stage}")
        super().load_state_dict(state)
        early = state.get("early_grad")
        self._early_grad = early.to(self.device) if early is not None else None


PipelineTrainer.__init__.__signature__ = signature_with_options(PipelineTrainer.__init__)
