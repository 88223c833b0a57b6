"""Pipeline-parallel trainer: one block per process/device over torch.distributed, started by torchrun."""

from __future__ import annotations

import dataclasses
import datetime
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ConfigError, PipelineError
from ..surgery.model import LFNNModel
from ..training.base import TrainerBase
from ..training.inputs import check_fit
from ..training.options import PipelineOptions, TrainerOptions, signature_with_options
from .balance import CHECK_AFTER_STEPS, balance_report
from .comm import EPOCH_DONE, EVALUATE, Link, decided_by_rank0, peer_failures
from .datapath import DataPath
from .evaluation import evaluate_stage
from .groups import make_groups
from .processes import end_if_here, host_name, init_distributed, name_the_rank, process_identity, stage_device
from .replicas import PowerSGDAverage, average_gradients, broadcast_from_first_replica
from .shards import Shard, keep_only_stage

__all__ = ["PipelineTrainer", "StageTiming"]


class StageTiming(dict):
    """Seconds a rank spent busy (compute), waiting to receive, and waiting for sends, plus step count."""


class PipelineTrainer(DataPath, TrainerBase):
    """Trains an :class:`~lfnnify.LFNNModel` with one block per process, started by ``torchrun``.

    With world size K×R (K blocks, R replicas), rank ``r`` trains block ``r // R`` as replica
    ``r % R``. The first stage's ranks read the input batches (replica i takes batches i, i+R, ...);
    labels travel with the activations. Block k sends its output to block k+1 right after its forward
    pass and then runs its own update (:class:`lfnnify.training.step.BlockStep`, the same code the one-device
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
        send_dtype: send activations and gradients in this dtype (``torch.bfloat16`` halves traffic);
            ``torch.int8`` sends a quarter: int8 values with one float32 scale per channel, each value within half
            a step (1/254 of its channel's largest magnitude) of what was sent (:mod:`lfnnify.pipeline.quantize`).
            Weights a refresh sends are always exact.
        send_deltas: with ``send_dtype=torch.int8``, send each training sample's change since its last visit,
            rounded to int8, instead of its activation (AQ-SGD; :mod:`lfnnify.pipeline.deltas`): the same bytes plus
            8 per sample for its index, and what one visit rounds away is sent again at the next. The training
            loader then gives ``(images, labels, sample indices)`` (``lfnnify.data.WithIndex(dataset)``, or
            ``make_loader(..., indexed=True)``); each end of each cut keeps one float32 activation per training
            sample in host memory.
        overlap_sends: ``True`` (the default): a step's sends travel while the next steps compute. ``False``: each
            step ends by waiting until every send it posted has completed (its receiver has posted the receive, and
            gloo has handed the data to the network or NCCL has delivered it), so the sender computes no further
            step meanwhile; to measure what the overlap buys.
        receive_ahead: ``True``: a block posts the receive of its next batch before it computes this one, so that
            the next batch crosses the link while it computes. A send completes only once its receive is posted
            (gloo and NCCL alike), so by default (``False``) block k+1's next batch starts crossing only when block
            k+1 has finished its step: on a slow link the link then idles while the block computes, and the block
            while the link carries. It holds one more batch's activation on each receiving block, and waits for the
            next batch's header before computing: in ``mode="replay"`` that makes a block's step wait for the
            previous block's next forward, which measured slower (``benchmarks.multihost``'s ``*_ahead``).
        replicas_powersgd_rank, replicas_powersgd_start: with R > 1 replicas per block, average their gradients
            through torch's PowerSGD at this rank (error feedback, warm start; plain all-reduces for the first
            ``replicas_powersgd_start`` steps, 10 by default) instead of one all-reduce of the whole gradient
            (:class:`lfnnify.pipeline.replicas.PowerSGDAverage`).
        timeout_s: how long a rank waits for a neighbour before giving up; a failed rank's neighbours
            stop within this bound (torchrun also stops the others when one process exits with an error).
        threads: torch threads for this process (set it: oversubscribed cores are very slow).
        backend: ``"nccl"`` or ``"gloo"`` when this call starts the process group; by default NCCL when every
            process on the machine has a GPU of its own, else gloo (with a line saying why).
        device: ``None``: this rank's GPU (``LOCAL_RANK``) when there are GPUs, else the CPU; ``"cpu"`` keeps the
            block on the CPU (and talks over gloo).

    Checkpoints: ``lfnnify.save(net, path, trainer=trainer)`` on every rank writes the whole model and every rank's
    trainer state to ``path`` on rank 0's host (:mod:`lfnnify.pipeline.shards`: no shared file system needed);
    :meth:`restore` resumes every rank from it. Rank 0 also keeps the log (``log_path``).

    On a GPU, the timestamps behind :meth:`stage_timings` wait for this rank's compute stream (never for the whole
    device, which would wait for NCCL's sends too), and a non-finite loss is detected on the device and read every
    ``FINITE_CHECK_EVERY`` (25) steps and at the end of every ``fit`` phase; the error names the block and the step
    where it first happened.
    """

    def __init__(self, net: LFNNModel, **settings):
        mine = {f.name for f in dataclasses.fields(PipelineOptions)}
        own = PipelineOptions(**{k: v for k, v in settings.items() if k in mine})
        options = TrainerOptions.from_settings("PipelineTrainer", {k: v for k, v in settings.items() if k not in mine})
        max_in_flight, send_dtype, timeout_s = own.max_in_flight, own.send_dtype, own.timeout_s
        threads, backend, device = own.threads, own.backend, own.device
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
        shapes = {k: list(v.shape) for k, v in net._source.state_dict().items()}  # before other blocks are freed
        keep_only_stage(net, self.stage, torch.device("cpu") if on_cpu else stage_device())
        # rank 0 keeps the log (its host holds the run folder); the last stage's records reach it (_fit)
        super().__init__(net, owned=[self.stage], options=dataclasses.replace(
            options, log_path=options.log_path if self.rank == 0 else None,
            progress=options.progress and self.rank == 0))
        comm_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        self.groups = make_groups(blocks, self.replicas, self.rank, comm_device)  # every communicator opened now
        self.group = self.groups.replicas
        self.timing = StageTiming(busy_s=0.0, recv_wait_s=0.0, send_wait_s=0.0, steps=0)
        self.balance: dict | None = None  # the blocks' busy time per step, once gathered (see balance.py)
        processes: list = [None] * self.world
        dist.all_gather_object(processes, (process_identity(), host_name()), group=self.groups.objects)
        self._processes = [identity for identity, _ in processes]
        hosts = [host for _, host in processes]
        self._hosts = hosts if len(set(hosts)) > 1 else None  # named in messages when the ranks span machines
        self.link = Link(rank=self.rank, prev_rank=self.prev_rank, next_rank=self.next_rank, device=self.device,
                         timeout=self.timeout, max_in_flight=max_in_flight, send_dtype=send_dtype, timing=self.timing,
                         label=self._label, on_hung=lambda rank: end_if_here(self._processes[rank]),
                         channels=self.groups.channels, clock=self._now, send_deltas=own.send_deltas)
        self.overlap_sends = own.overlap_sends  # False: each step waits for its sends (DataPath._stage_step)
        self.receive_ahead = own.receive_ahead  # True: the next batch's receive is posted before this one computes
        self._early_grad: Tensor | None = None  # replay: a gradient received at the end of a phase
        self._powersgd = None
        if own.replicas_powersgd_rank is not None and self.replicas == 1:
            raise ConfigError(
                f"replicas_powersgd_rank={own.replicas_powersgd_rank}: PowerSGD averages a block's replicas, and this "
                f"run has one replica per block ({self.world} processes for {blocks} blocks); start K×R processes "
                f"(e.g. torchrun --nproc-per-node {2 * blocks}), or drop replicas_powersgd_rank"
            )
        if self.replicas > 1:
            self.updates[self.stage].reduce = self._average
            broadcast_from_first_replica(self.net, self.stage, self.replicas, self.group, self.link.comm_device)
            if own.replicas_powersgd_rank is not None:
                self._powersgd = PowerSGDAverage(self.group, rank=own.replicas_powersgd_rank,
                                                 start=own.replicas_powersgd_start, comm_device=self.link.comm_device)
        self.shard = Shard(stage=self.stage, replica=self.replica, replicas=self.replicas, rank=self.rank,
                           blocks=blocks, source_shapes=shapes, talking=self.talking, group=self.groups.objects)

    def train_step(self, x: Tensor, y: Tensor) -> dict:
        raise PipelineError("PipelineTrainer steps inside fit(); every rank calls fit() with the same arguments")

    # ------------------------------------------------------------------ loops (each phase's: datapath.py)

    def talking(self, what: str):
        """A context in which another rank that stops answering ends this one with one line that names it."""
        others = [r for r in range(self.world) if r != self.rank]
        named = self._label(others[0]) if len(others) == 1 else f"another rank of {self.world}"
        return peer_failures(self._label(self.rank), named, self.timeout, what)

    def _label(self, rank: int) -> str:
        host = f", on {self._hosts[rank]}" if getattr(self, "_hosts", None) else ""
        replica = f", replica {rank % self.replicas}" if self.replicas > 1 else ""
        return f"rank {rank} (block {rank // self.replicas}{replica}{host})"

    def _other_replicas(self) -> str:
        """The other replicas of this rank's block, named for a message (a replica group's collective failed)."""
        others = [self.stage * self.replicas + r for r in range(self.replicas) if r != self.replica]
        if len(others) == 1:
            return self._label(others[0])
        return f"a replica of block {self.stage} (ranks {', '.join(map(str, others))})"

    def _average(self, grads) -> None:
        with self.link.named(self._other_replicas(), "averaging gradients"):
            if self._powersgd is not None:
                self._powersgd(grads)
            else:
                average_gradients(grads, self.group, self.replicas, self.link.comm_device)

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
            entry = self._from_last_stage(entry)
            self.history.append(entry)
            self._log({"kind": "epoch", **entry})  # on rank 0 (the only rank with a log)
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
        self._log({"kind": "balance", **self.balance})  # on rank 0

    def _from_last_stage(self, entry: dict) -> dict:
        """The last stage's record of this phase (its losses and accuracy are the model's), on every rank."""
        holder = [entry]
        dist.broadcast_object_list(holder, src=(self.net.num_blocks - 1) * self.replicas, group=self.groups.objects)
        return holder[0]

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
        state["stage"], state["replica"] = self.stage, self.replica
        state["early_grad"] = self._early_grad
        return state

    def restore(self, path) -> None:
        """Resume every rank from the checkpoint ``lfnnify.save(net, path, trainer=trainer)`` wrote on rank 0's
        host: rank 0 reads it and sends each rank its block, head and trainer state, so the other hosts need no
        copy (nor a shared file system). A collective: every rank calls it, with the model converted the same way.

        Raises:
            lfnnify.CheckpointError: on every rank, in one line: no checkpoint there, a damaged file, or one saved by
                another layout (blocks x replicas) or with other cuts.
        """
        self.shard.restore(self.net, self, Path(path))

    def save_checkpoint(self, path) -> Path:
        """Save the whole model and every rank's trainer state to ``path`` on rank 0's host (what
        ``lfnnify.save(net, path, trainer=trainer)`` does under the pipeline). A collective: every rank calls it."""
        return self.shard.save(self.net, Path(path), trainer=self)

    def decide(self, decide):
        """``decide()`` run on rank 0 only, its result (or its error) on every rank: how the ranks act on what only
        rank 0's host can see, such as the run folder on its disk. A collective."""
        with self.talking("waiting for rank 0's decision"):
            return decided_by_rank0(decide, group=self.groups.objects)

    def max_over_ranks(self, value: int) -> int:
        """The largest of every rank's ``value``: how ranks agree, for instance on a stop that one of them was
        asked for (``lfnnify train`` then saves on every rank at the same step). A collective."""
        flag = torch.tensor([value], dtype=torch.int64)
        group = self.groups.objects
        if group is None and dist.get_backend() == "nccl":
            flag = flag.to(self.device)
        with self.talking("agreeing on a stop"):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return int(flag.item())

    def load_state_dict(self, state: dict) -> None:
        if state.get("stage", self.stage) != self.stage or state.get("replica", self.replica) != self.replica:
            raise ConfigError(f"this trainer state belongs to block {state['stage']}, replica "
                              f"{state.get('replica', 0)}, not to this rank's block {self.stage}, replica "
                              f"{self.replica}: read_trainer_state(path, block=trainer.stage, replica=trainer.replica)")
        super().load_state_dict(state)
        early = state.get("early_grad")
        self._early_grad = early.to(self.device) if early is not None else None


PipelineTrainer.__init__.__signature__ = signature_with_options(PipelineTrainer.__init__, PipelineOptions)
