"""What one block does in one training step, in every mode: the function both trainers run per block.

``forward`` runs the block on batch t; ``learn`` then updates the block:

- ``mode="local"`` (LFNN-ℓ, Eq. 2): the block's own loss on batch t (its head's, or the model's output
  loss for the last block). No gradient crosses a block boundary.
- ``mode="replay"`` (delayed end-to-end gradients, Features Replay / DDG): block k of K keeps the inputs
  of its last ``K-1-k`` batches. At step t it recomputes batch ``t-(K-1-k)`` with its current weights
  (same dropout draws as the first pass, BatchNorm statistics left as the first pass left them) and
  back-propagates the gradient block k+1 computed for that batch at step t-1, plus ``local_weight`` times
  its head loss. It hands the gradient of that batch's input to block k-1, for step t+1. The last block
  has no delay; with one block, replay is backprop.
  *Filling*: in the first ``K-1-k`` steps of a replay period no delayed gradient exists yet, and block k
  (trunk and head) does not update; it only passes its batches on. Every batch therefore counts exactly
  once in every block, end-to-end gradient and local loss alike, at its delayed backward.

The delays are fixed, so the one-device trainer and the pipeline compute the same numbers.
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import DataError
from ..surgery.model import LFNNModel
from .update import BlockUpdate

__all__ = ["ModeSchedule", "BlockStep"]


@dataclass(frozen=True)
class ModeSchedule:
    """Which mode runs at which step: ``mode`` from the start, ``switch_to`` from step ``switch_mode_at`` on.

    Steps before ``head_warmup_steps`` are head warm-up (local, trunks frozen); replay starts after them.
    ``delay_lr_warmup``: see :meth:`lr_scale`.
    """

    mode: str
    switch_mode_at: int | None = None
    switch_to: str | None = None
    head_warmup_steps: int = 0
    delay_lr_warmup: int | None = None

    @classmethod
    def of(cls, mode: str, options) -> ModeSchedule:
        """The schedule a trainer's options (:class:`~lfnnify.training.options.TrainerOptions`) set for ``mode``."""
        return cls(mode, options.switch_mode_at, options.switch_to, options.head_warmup_steps, options.delay_lr_warmup)

    def mode_at(self, step: int) -> str:
        if step < self.head_warmup_steps:
            return "local"
        if self.switch_mode_at is not None and step >= self.switch_mode_at:
            return self.switch_to
        return self.mode

    def replay_start(self, step: int) -> int:
        """The first step of the replay period ``step`` belongs to (call only where ``mode_at(step)`` is replay)."""
        if self.switch_mode_at is not None and step >= self.switch_mode_at:
            return max(self.switch_mode_at, self.head_warmup_steps)
        return self.head_warmup_steps

    def lr_scale(self, step: int, delay: int) -> float:
        """Delay-aware step size (PipeMare's learning-rate rescheduling, Yang et al. 2021): in the first
        ``delay_lr_warmup`` steps s of a replay period a block with ``delay`` steps with ``delay^-(1 - s/N)`` times
        its learning rate, from ``1/delay`` up to the full rate; 1 afterwards, without delay, or when off."""
        if self.delay_lr_warmup is None or delay == 0:
            return 1.0
        done = min((step - self.replay_start(step)) / self.delay_lr_warmup, 1.0)
        return float(delay) ** (done - 1.0)

    def delayed_batch(self, step: int, delay: int) -> int | None:
        """The batch a block with ``delay`` back-propagates at ``step`` in replay mode, or None (local mode, or
        the first ``delay`` steps of a replay period, when no delayed gradient exists yet)."""
        if self.mode_at(step) != "replay":
            return None
        batch = step - delay
        return batch if batch >= self.replay_start(step) else None


@contextlib.contextmanager
def _one_value_per_channel_named(k: int, batch: int | None):
    """torch's refusal to train BatchNorm on one value per channel (a batch of 1 whose feature map is 1x1 there, or
    a BatchNorm1d), as one line that says where and what to do. Only where torch refuses: a batch of 1 at 64x64
    gives each channel 4096 values, and trains."""
    try:
        yield
    except ValueError as exc:
        if "Expected more than 1 value per channel when training" not in str(exc):
            raise
        size = str(exc).rsplit("got input size ", 1)[-1]
        examples = f"a batch of {batch} example{'s' if batch != 1 else ''}" if batch is not None else "a batch"
        raise DataError(
            f"{examples} leaves a BatchNorm layer of block {k} (or its head) with one value per channel (its input is "
            f"{size}), from which training cannot compute statistics. Use batches of at least 2 (a short last batch: "
            f"DataLoader(..., drop_last=True)) or larger images") from None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``weight`` (the local loss's weight in replay)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.weight, None


@dataclass
class _Stored:
    """A batch kept for the delayed backward: the block's input, labels and the random state of the first pass;
    with weight stashing also the weights that pass used and its graph (``out``; None after a resume)."""

    step: int
    x: Tensor
    y: Tensor
    rng: Tensor
    cuda_rng: Tensor | None
    weights: dict | None = None
    out: Tensor | None = None


class BlockStep:
    """Block ``k`` of ``net`` in training: forward on a batch, then its update (see the module docstring).

    ``forward(x, y, step)`` returns the output to pass on (the caller detaches it). ``expects_grad(step)``
    says whether ``learn`` at that step takes a gradient from block k+1; ``learn(grad, step)`` updates the
    block and returns the gradient for block k-1 (or None) and a record ``{"loss", "accuracy", "leaders"}``.
    """

    def __init__(self, net: LFNNModel, k: int, update: BlockUpdate, *, schedule: ModeSchedule, autocast,
                 check_finite):
        self.net, self.k, self.update, self.schedule = net, k, update, schedule
        self.last = k == net.num_blocks - 1
        self.delay = net.num_blocks - 1 - k
        self.local_weight = float(net.config.get("local_weight", 0.0))
        self.stash = bool(net.config.get("weight_stashing", False))
        self.predict = bool(net.config.get("weight_prediction", False)) and self.delay > 0
        self._autocast, self._check_finite = autocast, check_finite
        self._line: collections.deque[_Stored] = collections.deque()
        self._current: tuple | None = None  # (x, y, out) of this step's forward, when learn needs them

    @property
    def block(self):
        return self.net.blocks[self.k]

    # ------------------------------------------------------------------ the step

    def forward(self, x: Tensor, y: Tensor, step: int) -> Tensor:
        with _one_value_per_channel_named(self.k, len(x)):
            return self._forward(x, y, step)

    def _forward(self, x: Tensor, y: Tensor, step: int) -> Tensor:
        mode = self.schedule.mode_at(step)
        warmup = step < self.schedule.head_warmup_steps
        if mode != "replay":
            self._line.clear()  # a switch to local mode drops the delayed work
            with self._autocast():
                if warmup and not self.last:  # the trunk is frozen: no graph needed, the head trains alone
                    with torch.no_grad():
                        out = self.block(x)
                else:
                    out = self.block(x)
            self._current = (x, y, out)
            return out
        if self.last:  # no delay: forward with a graph, and the input's gradient goes down
            x = x.detach().requires_grad_(self.k > 0)
            with self._autocast():
                out = self.block(x)
            self._current = (x, y, out)
            return out
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" else None
        self._line.append(_Stored(step, x.detach(), y, rng, cuda_rng))
        weights = self._forward_weights()
        if self.stash:  # keep this pass's graph and the weights it used: no recompute, more memory
            stored = self._line[-1]
            stored.weights = {n: w.detach().clone().requires_grad_(w.requires_grad) for n, w in weights.items()}
            stored.x = x.detach().requires_grad_(self.k > 0)
            with self._autocast():
                stored.out = self._stashed_forward(stored)
            self._current = None
            return stored.out
        with self._autocast(), torch.no_grad():  # the graph is rebuilt when this batch's gradient arrives
            out = self.block(x) if not self.predict else torch.func.functional_call(self.block, weights, (x,))
        self._current = None
        return out

    def _forward_weights(self) -> dict[str, Tensor]:
        """The weights of this step's first pass: the block's own, or with weight prediction the weights it will
        have when this batch's gradient is applied, ``delay`` steps on: ``w + delay·Δw``, where Δw is the block's
        last update (for SGD with momentum ``-lr·v``: linear weight prediction, Kosson et al. 2021)."""
        params = dict(self.block.named_parameters())
        if not self.predict:
            return params
        predicted = {}
        for name, p in params.items():
            moved = self.update.last_update(p)
            predicted[name] = p if moved is None else (p.detach() + self.delay * moved).requires_grad_(p.requires_grad)
        return predicted

    def expects_grad(self, step: int) -> bool:
        """Whether block k+1 handed this block a gradient at its step ``step - 1`` (for this step)."""
        if self.last or step < 1:
            return False
        return self.schedule.delayed_batch(step - 1, self.delay - 1) is not None

    def learn(self, grad: Tensor | None, step: int) -> tuple[Tensor | None, dict]:
        with _one_value_per_channel_named(self.k, None):  # a head may hold BatchNorm too
            return self._learn(grad, step)

    def _learn(self, grad: Tensor | None, step: int) -> tuple[Tensor | None, dict]:
        mode = self.schedule.mode_at(step)
        warmup = step < self.schedule.head_warmup_steps
        if mode != "replay":
            x, y, out = self._take_current()
            loss, logits, leaders = self._loss(out, y)
            self._backward(loss)
            self.update.step(warmup=warmup)
            return None, self._record(loss, logits, y, leaders)
        if self.last:
            x, y, out = self._take_current()
            loss, logits, leaders = self._loss(out, y)
            self._backward(loss)
            below = x.grad.detach() if self.k > 0 else None
            self.update.step()
            return below, self._record(loss, logits, y, leaders)
        batch = self.schedule.delayed_batch(step, self.delay)
        if batch is None:  # filling: no delayed gradient exists yet, so the block (and its head) waits
            self.update.skip()
            return None, {}
        if grad is None:
            raise RuntimeError(f"block {self.k} needs the delayed gradient of batch {batch} at step {step}, but got "
                               f"none")
        stored = self._line.popleft()
        if stored.step != batch:
            raise RuntimeError(f"block {self.k} kept batch {stored.step}, but step {step} back-propagates batch "
                               f"{batch}")
        return self._replay(stored, grad, step)

    # ------------------------------------------------------------------ pieces

    def _replay(self, stored: _Stored, grad: Tensor, step: int) -> tuple[Tensor | None, dict]:
        x = stored.x.requires_grad_(self.k > 0)
        devices = [x.device] if stored.cuda_rng is not None else []
        with self._buffers_kept(), torch.random.fork_rng(devices=devices):
            torch.set_rng_state(stored.rng)  # the first pass's dropout masks
            if stored.cuda_rng is not None:
                torch.cuda.set_rng_state(stored.cuda_rng, x.device)
            with self._autocast():
                if stored.weights is None:
                    out = self.block(x)  # recompute with the current weights
                else:  # the stashed pass (recomputed with the stashed weights only after a resume)
                    out = stored.out if stored.out is not None else self._stashed_forward(stored)
            features = out.detach() if self.local_weight == 0 else _ScaleGrad.apply(out, self.local_weight)
            loss, logits, leaders = self._loss(features, stored.y)
            self._check_finite(self.k, loss)
            self.update.zero_grad()
            torch.autograd.backward([out, self.update.scaled(loss)], [grad.to(out.dtype), None])
        if stored.weights is not None:  # gradients at the stashed weights, applied to the current ones
            self._take_stashed_grads(stored)
        below = x.grad.detach() if self.k > 0 else None
        self.update.step(lr_scale=self.schedule.lr_scale(step, self.delay), delay=self.delay)
        return below, self._record(loss, logits, stored.y, leaders)

    def _take_stashed_grads(self, stored: _Stored) -> None:
        for name, p in self.block.named_parameters():
            w = stored.weights[name]
            if w.grad is not None:
                p.grad = w.grad if p.grad is None else p.grad + w.grad
                w.grad = None

    def _stashed_forward(self, stored: _Stored) -> Tensor:
        """The block with the stashed weights. BatchNorm updates copies of its statistics, which go back into
        the block at once (the batch counts once); the graph keeps the copies, which later passes leave alone."""
        buffers = {n: b.clone() for n, b in self.block.named_buffers()}
        out = torch.func.functional_call(self.block, {**stored.weights, **buffers}, (stored.x,))
        with torch.no_grad():
            for n, b in self.block.named_buffers():
                b.copy_(buffers[n])
        return out

    @contextlib.contextmanager
    def _buffers_kept(self):
        """BatchNorm statistics (any buffer) as they were: the recompute must not count a batch twice.
        Restored after the backward, which may still read them."""
        saved = [(b, b.detach().clone()) for b in self.block.buffers()]
        try:
            yield
        finally:
            with torch.no_grad():
                for b, value in saved:
                    b.copy_(value)

    def _take_current(self):
        current, self._current = self._current, None
        return current

    def _loss(self, out: Tensor, y: Tensor):
        with self._autocast():
            if self.last:
                loss, logits = self.net.output_loss(out, y)
                return loss, logits, None
            result = self.net.head_loss(self.k, out, y)
        return result.loss, result.best_logits, result.leaders

    def _backward(self, loss: Tensor) -> None:
        self._check_finite(self.k, loss)
        self.update.zero_grad()
        if loss.requires_grad:
            self.update.scaled(loss).backward()

    @staticmethod
    def _record(loss: Tensor, logits: Tensor, y: Tensor, leaders) -> dict:
        """Detached tensors, left on the device: reading them (``.item()``) would make a GPU wait each step."""
        return {
            "loss": loss.detach(),
            "accuracy": (logits.detach().argmax(-1) == y).float().mean(),
            "leaders": leaders,
        }

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """The batches kept for delayed backward passes (replay; with the stashed weights when stashing), so
        that a resume is exact (a stashed pass is recomputed from its weights and random state)."""
        kept = []
        for s in self._line:
            entry = {"step": s.step, "x": s.x.detach(), "y": s.y, "rng": s.rng}
            if s.cuda_rng is not None:
                entry["cuda_rng"] = s.cuda_rng
            if s.weights is not None:
                entry["weights"] = {n: w.detach() for n, w in s.weights.items()}
            kept.append(entry)
        return {"kept": kept}

    def load_state_dict(self, state: dict) -> None:
        device = next((p.device for p in self.block.parameters()), torch.device("cpu"))
        self._line = collections.deque()
        for s in state.get("kept", []):
            weights = s.get("weights")
            if weights is not None:
                weights = {n: w.to(device).requires_grad_(w.is_floating_point()) for n, w in weights.items()}
            self._line.append(_Stored(int(s["step"]), s["x"].to(device), s["y"].to(device), s["rng"],
                                      s.get("cuda_rng"), weights))
