"""The data path of one pipeline rank: a training phase's loop (the first stage feeds, the others follow) and
the step it runs on each batch (forward, send the output on, learn, send a gradient back).

:class:`DataPath` is the part of :class:`~lfnnify.PipelineTrainer` that moves batches; the trainer sets up what it
reads (``link``, ``stages``, the ranks of its neighbours) and calls :meth:`DataPath._feed` or
:meth:`DataPath._follow` once per phase.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import DataError, PipelineError
from ..training.inputs import check_batch, pair
from .comm import END, EPOCH_DONE, EVALUATE, GRAD, TRAIN, WEIGHTS
from .processes import fault
from .replicas import broadcast_buffers

__all__ = ["DataPath"]


class DataPath:
    """A pipeline rank's phase loops and step (a part of :class:`~lfnnify.PipelineTrainer`)."""

    def _stage_step(self, x: Tensor, y: Tensor, ids: Tensor | None = None) -> dict:
        """This rank's block on batch ``x``: forward, pass the output on, then its update (and, in replay
        mode, the gradient of an earlier batch's input back to the previous rank). ``ids``: the batch's sample
        indices, passed on with it (``send_deltas``: the key of each sample's change).

        Why this order cannot deadlock, under NCCL's rule that a send may not complete before its receive is
        posted. Every send here is asynchronous (``Link.send`` posts it and returns; it waits only for sends more
        than ``max_in_flight`` old), and nothing in the step waits for the whole device (``_now`` waits for the
        compute stream only, never for a send), so a rank blocks only in a receive, or on an old send. Block k
        receives from k-1 the activation of step t, which k-1 posted before it could block in its step t; and from
        k+1 the gradient (or look-ahead weights) k+1 posted at the end of its step t-1, which needed from k only
        the activation of step t-1, posted earlier still. So every wait is for a message posted earlier in the
        order (step, then block for activations, block reversed for gradients), and the last block waits only for
        activations: no cycle of waits can form. Each direction has its own communicator (``groups``), so an
        activation never queues behind a gradient, and every communicator was opened before the first step. The
        replicas' all-reduce and broadcast run in the same order on every replica of a block.

        With ``overlap_sends=False`` the step ends in ``Link.flush``: it waits until its own sends have completed, each
        once its receiver has taken it. That adds no cycle either. Rank each flush by 2t + k (block k, step t). Block
        k's flush at step t waits for k+1 to take activation t, which k+1 does when it starts step t, after its flush at
        t-1 (2t + k - 1); for k-1 to take the weights k sent when it started step t, in k-1's step t after its flush at
        t-1; and for k-1 to take gradient t, first thing after its forward in step t+1 (``_refresh_head`` takes the
        gradient before the weights), after its flush at t (2t + k - 1) and k-2's at t (2t + k - 2), whose activation it
        needs. Every flush waits only for receives that follow flushes ranked lower, which finish by induction. Each
        replica's chain of blocks is such a pipeline, and a block's replicas meet in their collectives of step t before
        any of them flushes it.

        With ``receive_ahead=True`` block k+1 waits, before it computes step t, for the header of k's next message
        (activation t+1, or the end of the phase) and posts its receives. Between its posts of activation t and of
        activation t+1, block k waits only for what k+1 posted before that wait: the gradient of step t-1 (posted at
        the end of k+1's step t-1) and the weights of step t (posted at the start of step t, just above); its own
        receives from k-1, its sends' completions at k-1 and its replicas' collectives of step t involve no message of
        k+1's step t, only blocks below, for which the same holds one block lower (block 0 receives nothing ahead). So
        the wait ends, and the order of everything else is as above.
        """
        start = self._now()
        t, stage = self.step, self.stages[self.stage]
        fault(self.rank, t)
        self.net.train()
        if not self.first and self._refresh_due(self.stage - 1, t):  # block k-1's look-ahead head copies this block
            self.link.send(self.prev_rank, WEIGHTS, self.net.heads[self.stage - 1].flat_weights(stage.block))
        if not self.first and self.receive_ahead:  # the next batch crosses while this one computes
            self.link.receive_ahead(self.prev_rank)
        out = stage.forward(x, y, t)
        if not self.last:
            self.timing["busy_s"] += self._now() - start
            self.link.send(self.next_rank, TRAIN, out.detach(), y, ids=ids)  # the next stage starts now
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
        if self.replicas > 1:  # the replicas hold the same statistics after every step
            with self.link.named(self._other_replicas(), "sharing BatchNorm statistics"):
                broadcast_buffers(self.net, self.stage, self.replicas, self.group, self.link.comm_device)
        self.step += 1
        self.step_in_epoch += 1
        self.timing["steps"] += 1
        self.timing["busy_s"] += self._now() - start
        if not self.overlap_sends:  # the next step's compute starts once this step's sends have completed
            self.link.flush()
        self._after_step()
        return record

    def _now(self) -> float:
        """A timestamp after this rank's compute stream has finished the work queued on it, so that busy and waiting
        times mean what they say on a GPU (where kernels run asynchronously); on the CPU a plain clock. Never the
        whole device: that would also wait for NCCL's sends, each of which waits for its receiver."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return time.perf_counter()

    def _take_grad(self) -> Tensor:
        if self._early_grad is not None:
            grad, self._early_grad = self._early_grad, None
            return grad
        return self._recv_from_next(GRAD, "a gradient")

    def _recv_from_next(self, expected: int, what: str) -> Tensor:
        kind, _, tensor, _, _ = self.link.recv(self.next_rank)
        if kind != expected:
            raise PipelineError(f"{self._label(self.rank)} expected {what}, got message kind {kind}")
        return tensor

    def _refresh_head(self, t: int) -> None:
        """Block k+1's weights as they are after its step t-1, which it sent when it started step t (after the
        gradient it sent at step t-1, which is kept for this step)."""
        if self.stages[self.stage].expects_grad(t) and self._early_grad is None:
            self._early_grad = self._take_grad()
        flat = self._recv_from_next(WEIGHTS, "weights")
        self.net.heads[self.stage].refresh_from_flat(flat, self.net.blocks[self.stage + 1],
                                                     self.options.refresh_momentum)

    def _end_phase(self) -> None:
        """Take the gradient the next rank sent at its last step (it is for this rank's next step), so that no
        message is left in flight across an evaluation, a checkpoint or the end of training."""
        if self.stages[self.stage].expects_grad(self.step) and self._early_grad is None:
            self._early_grad = self._take_grad()
        self.link.flush()

    def _feed(self, loader, max_steps, records, *, evaluate: bool) -> int:
        """First stage: read this replica's batches, run block 0, and pass them down the pipe."""
        self._start_epoch(loader, replicas=self.replicas)
        rounds = len(loader) // self.replicas  # every replica takes the same number of steps
        if rounds == 0:
            raise DataError(f"the training loader has {len(loader)} batches, fewer than block 0's {self.replicas} "
                            f"replicas, so no replica gets a batch; use a smaller batch_size or fewer replicas")
        batches = iter(loader)
        bar = tqdm(total=rounds, initial=self.step_in_epoch, disable=not self.options.progress, leave=False,
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
            x, y, ids = self._batch(chunk[self.replica])
            start = self._now()
            x, y = x.to(self.device), y.to(self.device)
            self.timing["busy_s"] += self._now() - start
            records.append(self._stage_step(x, y, ids))
            bar.update(1)
            # reading the loss waits for the device: only as often as the bar shows it
            if records[-1] and self.options.progress and self.step % self.options.log_every == 0:
                bar.set_postfix(loss=f"{float(records[-1]['loss']):.3f}")
        bar.close()
        reached = max_steps is not None and self.step >= max_steps
        wanted = evaluate and (finished or reached) and not self._stop  # a stop request returns at once
        flags = (EPOCH_DONE if finished else 0) | (EVALUATE if wanted else 0)
        if not self.last:
            self.link.send(self.next_rank, END, flag=flags)
        self._end_phase()
        return flags

    def _batch(self, batch) -> tuple[Tensor, Tensor, Tensor | None]:
        """(images, labels, sample indices or None) of one batch of the training loader, checked."""
        where = "PipelineTrainer.fit"
        x, y, *rest = pair(batch, where=where, indexed=self.link.send_deltas)
        x, y = check_batch(x, y, self.batch_rules, where=where)
        if not rest:
            return x, y, None
        ids = rest[0]
        if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.shape != (len(x),):
            what = f"shape {tuple(ids.shape)}, dtype {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
            raise DataError(f"the sample indices given to {where} are {what}; give one integer per image, a 1-d "
                            f"tensor of {len(x)} (lfnnify.data.WithIndex returns each item's position)")
        return x, y, ids.to(torch.int64)

    def _follow(self, records) -> int:
        """Later stages: receive, train, pass on, until the end-of-phase message."""
        if self.step_in_epoch == 0 and self.options.reselect == "epoch":
            self.net.fixed_leaders = [None] * len(self.net.heads)
        while True:
            kind, flag, x, y, ids = self.link.recv(self.prev_rank, dtype=self._dtype())
            if kind == END:
                if not self.last:
                    self.link.send(self.next_rank, END, flag=flag)
                self._end_phase()
                return flag
            if kind != TRAIN:
                raise PipelineError(f"rank {self.rank} expected a training batch, got message kind {kind}")
            records.append(self._stage_step(x, y, ids))

    def _dtype(self) -> torch.dtype | None:
        return next((p.dtype for p in self.net.blocks[self.stage].parameters() if p.is_floating_point()), None)
