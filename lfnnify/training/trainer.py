"""One-device trainer: block after block, each with its own optimizer, activations freed as it goes."""

from __future__ import annotations

import time

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..surgery.model import LFNNModel, main_output
from .base import TrainerBase, block_parameters
from .evaluation import EvalCounts
from .inputs import check_batch, check_fit, pair
from .options import TrainerOptions, signature_with_options

__all__ = ["Trainer", "block_parameters"]


class Trainer(TrainerBase):
    """Trains an :class:`~lfnnify.LFNNModel` on one device, one block at a time.

    Each step runs, for every block in turn, the block's part of the step (:class:`lfnnify.training.step.BlockStep`):
    forward, its loss, backward, optimizer step, then drops the block's graph before the next block runs,
    so peak activation memory is about one block's. Each block has its own optimizer and scheduler (as in
    the pipeline, where each block steps on its own). In ``mode="replay"`` the delayed gradients are
    simulated exactly as the pipeline computes them. In ``mode="lfnn"`` the global loss needs the whole
    graph, so the step is the full :meth:`LocalLosses.backward` followed by every optimizer.

    Example:
        >>> trainer = lfnnify.Trainer(net, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
        >>> trainer.fit(train_loader, epochs=1, val_loader=test_loader)
        >>> trainer.evaluate(test_loader)["accuracy"]

    Args:
        net: the converted model.
        optimizer: factory ``optimizer(params) -> torch.optim.Optimizer``, called once per block.
        scheduler: optional factory ``scheduler(optimizer)``; stepped after every optimizer step.
        amp: ``None``, ``"bf16"`` or ``"fp16"`` autocast (fp16 with a gradient scaler per block; one
            shared scaler in ``mode="lfnn"``; replay takes bf16 only).
        grad_clip: clip each block's gradient norm to this value.
        head_warmup_steps: for this many steps train only the heads and the model's own classifier
            (for pretrained checkpoints: random heads would otherwise push noise into the features).
        reselect: ``"batch"`` re-selects leaders every batch; ``"epoch"`` selects them on the first
            batch of each epoch and keeps them for the rest of it.
        switch_mode_at, switch_to: from step ``switch_mode_at`` on, train in mode ``switch_to``
            (``"local"`` or ``"replay"``; the other one than the model was converted with).
        refresh_heads_every: look-ahead heads only: every this many steps, each head takes the weights of the
            next block (as they are after its previous step) before its loss of the step:
            ``p = refresh_momentum·p + (1 - refresh_momentum)·q``. ``None`` (default) never refreshes.
        refresh_momentum: see ``refresh_heads_every``; 0 copies the next block's weights.
        delay_lr_warmup: replay only: delay-aware step sizes (PipeMare, Yang et al. 2021). Block k, whose
            gradients are ``D = K-1-k`` steps late, starts a replay period at ``lr / D`` and reaches ``lr``
            geometrically over this many steps (``lr·D^-(1 - s/N)`` at step s); the block's head steps with it.
            ``None`` (default): every block at ``lr`` from the start.
        log_path: a JSONL file that receives per-step and per-epoch records.
        log_every: steps between JSONL records.
        progress: show a tqdm progress bar.

    Raises:
        lfnnify.ConfigError: a bad knob, or an optimizer instance instead of a factory.
    """

    def __init__(self, net: LFNNModel, **settings):
        blocks = net.num_blocks if isinstance(net, LFNNModel) else 0
        options = TrainerOptions.from_settings("Trainer", settings)
        super().__init__(net, owned=list(range(blocks)) or [0], options=options)
        self._grads: list[Tensor | None] = [None] * net.num_blocks  # replay: gradients for the next step

    # ------------------------------------------------------------------ the data path

    def train_step(self, x: Tensor, y: Tensor) -> dict:
        """One optimizer step of every block on batch ``(x, y)``; returns per-block losses/accuracies."""
        self._check_usable()
        x, y = check_batch(x, y, self.batch_rules, where="Trainer.train_step")
        self.net.train()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        for k, head in enumerate(self.net.heads):  # no block has run this step yet: block k+1 is after step - 1
            if self._refresh_due(k, self.step):
                head.refresh(self.net.blocks[k + 1], self.options.refresh_momentum)
        if self.schedule.mode_at(self.step) == "lfnn":
            record = self._global_step(x, y)
        else:
            record = self._blockwise_step(x, y)
        self.step += 1
        self.step_in_epoch += 1
        self._after_step()
        return record

    def _blockwise_step(self, x: Tensor, y: Tensor) -> dict:
        """Every block's stage in turn; in replay mode each hands its input's gradient down for the next step."""
        t, h = self.step, x
        grads: list[Tensor | None] = [None] * self.net.num_blocks
        losses, accs = [], []
        for k, stage in self.stages.items():
            out = stage.forward(h, y, t)
            grad = self._grads[k] if stage.expects_grad(t) else None
            below, record = stage.learn(grad, t)
            if k > 0:
                grads[k - 1] = below
            if record:
                self._count_leaders(k, record["leaders"])
                losses.append(record["loss"])
                accs.append(record["accuracy"])
            h = out.detach()
            del out  # free this block's graph before the next block runs
        self._grads = grads
        losses, accs = (torch.stack([t.double() for t in v]).tolist() if v else [] for v in (losses, accs))  # one read
        return {"step": t, "loss": sum(losses), "block_losses": losses, "block_accuracy": accs}

    def _global_step(self, x: Tensor, y: Tensor) -> dict:
        """Eq. 1: the global loss through every block (follower channels masked) plus the local losses."""
        with self._autocast():
            out = self.net.local_losses(x, y)
        for k, loss in enumerate(out.block_losses):
            self._check_finite(k, loss)
        for update in self.updates.values():
            update.zero_grad()
        # fp16: one loss scale for the whole graph (scale() also starts the scaler's bookkeeping)
        scale = self.scaler.scale(torch.ones((), device=self.device)) if self.scaler is not None else 1.0
        out.backward(gradient_scale=scale)
        for k, leaders in enumerate(out.leaders[: len(self.net.heads)]):
            self._count_leaders(k, leaders)
        for update in self.updates.values():
            update.step()
        if self.scaler is not None:
            self.scaler.update()
        acc = (out.logits.detach().argmax(-1) == y).float().mean().item()
        losses = [v.detach().item() for v in out.block_losses]
        return {"step": self.step, "loss": sum(losses), "block_losses": losses, "block_accuracy": [acc]}

    # ------------------------------------------------------------------ loops

    def fit(self, loader, *, epochs: int = 1, max_steps: int | None = None, val_loader=None) -> list[dict]:
        """Train until ``epochs`` epochs or ``max_steps`` optimizer steps in all (counted from the
        start of training, so a resumed trainer stops where an uninterrupted one would).

        Returns the per-epoch history (train loss, step, wall time, and validation metrics).
        """
        check_fit(loader, epochs=epochs, max_steps=max_steps, where="Trainer.fit")
        self._check_usable()
        while self.epoch < epochs and (max_steps is None or self.step < max_steps):
            self._start_epoch(loader)
            total = len(loader)
            bar = tqdm(
                total=total, initial=self.step_in_epoch, disable=not self.options.progress, unit="batch",
                desc=f"epoch {self.epoch + 1}/{epochs}", dynamic_ncols=True, leave=False,
            )
            start, seen, running = time.perf_counter(), 0, []
            batches = iter(loader)
            # check the budget before fetching: a fetched batch draws augmentation randomness
            while (max_steps is None or self.step < max_steps) and not self._stop:
                try:
                    x, y = pair(next(batches), where="Trainer.fit")
                except StopIteration:
                    break
                record = self.train_step(x, y)
                seen += len(y)
                running.append(record)
                rate = seen / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{record['loss']:.3f}", samples_s=f"{rate:.0f}")
                bar.update(1)
                if self.step % self.options.log_every == 0:
                    self._log({"kind": "step", "epoch": self.epoch, **record, "samples_per_s": rate})
            bar.close()
            finished = self.step_in_epoch >= total
            seconds = time.perf_counter() - start
            entry = {
                "epoch": self.epoch + (1 if finished else 0),
                "step": self.step,
                "train_loss": self._summary(running, "loss"),
                "seconds": seconds,
                "samples_per_s": seen / max(seconds, 1e-9),
            }
            if finished:
                self._end_epoch()
            if val_loader is not None and (finished or (max_steps is not None and self.step >= max_steps)):
                entry.update({f"val_{k}": v for k, v in self.evaluate(val_loader).items()})
            self.history.append(entry)
            self._log({"kind": "epoch", **entry})
            if not finished or self._stop:
                break
        self._raise_if_nonfinite()
        return self.history

    @torch.no_grad()
    def evaluate(self, loader) -> dict:
        """Accuracy of the model's output and of every head (the best worker of each block).

        Returns ``{"accuracy", "loss", "block_accuracy": [...], "worker_accuracy": [[...], ...]}``;
        ``block_accuracy`` has one entry per block, the last being the model's own accuracy.

        Raises:
            lfnnify.ConfigError: the loader yields no examples.
        """
        self._check_usable()
        was_training = self.net.training
        self.net.eval()
        heads = len(self.net.heads)
        counts = EvalCounts(heads, self.net.config["workers"], self.device)
        try:
            for batch in loader:
                x, y = check_batch(*pair(batch, where="Trainer.evaluate"), self.batch_rules, where="Trainer.evaluate")
                h, y = x.to(self.device), y.to(self.device)
                with self._autocast():
                    for k, block in enumerate(self.net.blocks):
                        h = block(h)
                        if k < heads:
                            counts.head(k, self.net.heads[k](h), y)
                    counts.output(main_output(h), y)
        finally:
            self.net.train(was_training)
        return counts.metrics()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["pending_grads"] = list(self._grads)
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        grads = state.get("pending_grads") or [None] * self.net.num_blocks
        self._grads = [g.to(self.device) if g is not None else None for g in grads]


Trainer.__init__.__signature__ = signature_with_options(Trainer.__init__)
