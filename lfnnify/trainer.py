"""One-device trainer: block after block, each with its own optimizer, activations freed as it goes."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .model import LFNNModel, main_output
from .plan import find_classifier

__all__ = ["Trainer", "block_parameters"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], object]
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def block_parameters(net: LFNNModel) -> list[list[nn.Parameter]]:
    """Trainable parameters of each block plus its head; a parameter two blocks share goes to the first."""
    seen: set[int] = set()
    groups = []
    for k, block in enumerate(net.blocks):
        params = list(block.parameters())
        if k < len(net.heads):
            params += list(net.heads[k].parameters())
        group = []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                group.append(p)
        groups.append(group)
    return groups


class Trainer:
    """Trains an :class:`~lfnnify.LFNNModel` on one device, one block at a time.

    Each step runs, for every block in turn: forward, local loss, backward, optimizer step,
    then drops the block's graph before the next block runs, so peak activation memory is
    about one block's. Each block has its own optimizer and scheduler (as in the pipeline,
    where each block steps on its own). In ``mode="lfnn"`` the global loss needs the whole
    graph, so the step is the full :meth:`LocalLosses.backward` followed by every optimizer.

    Example:
        >>> trainer = lfnnify.Trainer(net, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
        >>> trainer.fit(train_loader, epochs=1, val_loader=test_loader)
        >>> trainer.evaluate(test_loader)["accuracy"]

    Args:
        net: the converted model.
        optimizer: factory ``optimizer(params) -> torch.optim.Optimizer``, called once per block.
        scheduler: optional factory ``scheduler(optimizer)``; stepped after every optimizer step.
        amp: ``None``, ``"bf16"`` or ``"fp16"`` autocast (fp16 with a gradient scaler per block).
        grad_clip: clip each block's gradient norm to this value.
        head_warmup_steps: for this many steps train only the heads and the model's own classifier
            (for pretrained checkpoints: random heads would otherwise push noise into the features).
        reselect: ``"batch"`` re-selects leaders every batch; ``"epoch"`` selects them on the first
            batch of each epoch and keeps them for the rest of it.
        log_path: a JSONL file that receives per-step and per-epoch records.
        log_every: steps between JSONL records.
        progress: show a tqdm progress bar.
    """

    def __init__(
        self,
        net: LFNNModel,
        *,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        amp: str | None = None,
        grad_clip: float | None = None,
        head_warmup_steps: int = 0,
        reselect: str = "batch",
        log_path: str | Path | None = None,
        log_every: int = 20,
        progress: bool = True,
    ):
        if not isinstance(net, LFNNModel):
            raise TypeError(f"Trainer needs a model from lfnnify.convert, got {type(net).__name__}")
        if amp not in (None, *AMP_DTYPES):
            raise ValueError(f"amp={amp!r} must be None, 'bf16' or 'fp16'")
        if reselect not in ("batch", "epoch"):
            raise ValueError(f"reselect={reselect!r} must be 'batch' or 'epoch'")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip={grad_clip!r} must be a positive number or None")
        if not isinstance(head_warmup_steps, int) or head_warmup_steps < 0:
            raise ValueError(f"head_warmup_steps={head_warmup_steps!r} must be an int >= 0")
        self.net = net
        self.device = next(net.parameters()).device
        self.groups = block_parameters(net)
        self.optimizers = [optimizer(group) for group in self.groups]
        self.schedulers = [scheduler(opt) if scheduler is not None else None for opt in self.optimizers]
        self.amp, self.grad_clip, self.reselect = amp, grad_clip, reselect
        self.scalers = [torch.amp.GradScaler(self.device.type) if amp == "fp16" else None for _ in self.optimizers]
        self.head_warmup_steps = head_warmup_steps
        classifier = find_classifier(net._source)
        self._classifier_ids = {id(p) for p in classifier.parameters()} if classifier is not None else set()
        self.log_path = Path(log_path) if log_path is not None else None
        self.log_every, self.progress = log_every, progress
        self.step = 0  # optimizer steps taken (one per batch; every block steps once)
        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0
        workers = net.config["workers"]
        self._epoch_counts = torch.zeros(len(net.heads), workers, dtype=torch.long)
        self.leadership: list[list[list[int]]] = []  # per epoch, per hidden block, times each worker led
        self.history: list[dict] = []
        self._stop = False

    def request_stop(self) -> None:
        """Ask ``fit`` to return after the current step (signal handlers call this)."""
        self._stop = True

    # ------------------------------------------------------------------ the data path

    def train_step(self, x: Tensor, y: Tensor) -> dict:
        """One optimizer step of every block on batch ``(x, y)``; returns per-block losses/accuracies."""
        self.net.train()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.net.mode == "lfnn":
            record = self._global_step(x, y)
        else:
            record = self._local_step(x, y)
        self.step += 1
        self.step_in_epoch += 1
        return record

    def _local_step(self, x: Tensor, y: Tensor) -> dict:
        warmup = self.step < self.head_warmup_steps
        losses, accs = [], []
        h = x
        last = self.net.num_blocks - 1
        for k, block in enumerate(self.net.blocks):
            inp = h.detach() if k > 0 else h
            with self._autocast():
                if warmup and k < last:
                    with torch.no_grad():
                        out = block(inp)
                else:
                    out = block(inp)
                if k < last:
                    result = self.net.head_loss(k, out, y)
                    loss, logits = result.loss, result.best_logits
                    self._count_leaders(k, result.leaders)
                else:
                    loss, logits = self.net.output_loss(out, y)
            self._check_finite(k, loss)
            self._backward_and_step(k, loss, only_classifier=warmup and k == last)
            losses.append(loss.detach().item())
            accs.append((logits.detach().argmax(-1) == y).float().mean().item())
            h = (out if k < last else h).detach()
            del out, loss, logits  # free this block's graph before the next block runs
        return {"step": self.step, "loss": sum(losses), "block_losses": losses, "block_accuracy": accs}

    def _global_step(self, x: Tensor, y: Tensor) -> dict:
        with self._autocast():
            out = self.net.local_losses(x, y)
        for k, loss in enumerate(out.block_losses):
            self._check_finite(k, loss)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        out.backward()
        for k, leaders in enumerate(out.leaders[: len(self.net.heads)]):
            self._count_leaders(k, leaders)
        for k in range(len(self.optimizers)):
            self._clip_and_step(k)
        acc = (out.logits.detach().argmax(-1) == y).float().mean().item()
        losses = [v.detach().item() for v in out.block_losses]
        return {"step": self.step, "loss": sum(losses), "block_losses": losses, "block_accuracy": [acc]}

    # ------------------------------------------------------------------ pieces of a step

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=AMP_DTYPES[self.amp])

    def _check_finite(self, k: int, loss: Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f"block {k}'s loss is {loss.detach().item()} at step {self.step}; training stopped. "
                f"Lower the learning rate, set grad_clip=, or check the inputs of block {k}."
            )

    def _backward_and_step(self, k: int, loss: Tensor, *, only_classifier: bool = False) -> None:
        opt, scaler = self.optimizers[k], self.scalers[k]
        opt.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if only_classifier:  # head warm-up: the trunk of the last block keeps its weights
            for p in self.groups[k]:
                if id(p) not in self._classifier_ids:
                    p.grad = None
        self._clip_and_step(k)

    def _clip_and_step(self, k: int) -> None:
        opt, scaler, scheduler = self.optimizers[k], self.scalers[k], self.schedulers[k]
        if self.grad_clip is not None:
            if scaler is not None:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p for p in self.groups[k] if p.grad is not None], self.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)  # gradients are dead now; freeing them lowers peak memory
        if scheduler is not None:
            scheduler.step()

    def _count_leaders(self, k: int, leaders: Tensor) -> None:
        self._epoch_counts[k].index_add_(0, leaders.cpu(), torch.ones(len(leaders), dtype=torch.long))
        if self.reselect == "epoch" and self.net.fixed_leaders[k] is None:
            self.net.fixed_leaders[k] = leaders.detach().clone()

    # ------------------------------------------------------------------ loops

    def fit(self, loader, *, epochs: int = 1, max_steps: int | None = None, val_loader=None) -> list[dict]:
        """Train until ``epochs`` epochs or ``max_steps`` optimizer steps in all (counted from the
        start of training, so a resumed trainer stops where an uninterrupted one would).

        Returns the per-epoch history (train loss, step, wall time, and validation metrics).
        """
        if max_steps is not None and max_steps < 0:
            raise ValueError(f"max_steps={max_steps} must be >= 0")
        sampler = getattr(loader, "sampler", None)
        batch_size = getattr(loader, "batch_size", None) or 1
        while self.epoch < epochs and (max_steps is None or self.step < max_steps):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
                if self.step_in_epoch and hasattr(sampler, "skip"):
                    sampler.skip(self.step_in_epoch * batch_size)
            if self.step_in_epoch == 0 and self.reselect == "epoch":
                self.net.fixed_leaders = [None] * len(self.net.heads)
            total = len(loader)
            bar = tqdm(
                total=total, initial=self.step_in_epoch, disable=not self.progress, desc=f"epoch {self.epoch + 1}/{epochs}",
                unit="batch", dynamic_ncols=True, leave=False,
            )
            start, seen, running = time.perf_counter(), 0, []
            batches = iter(loader)
            # check the budget before fetching: a fetched batch draws augmentation randomness
            while (max_steps is None or self.step < max_steps) and not self._stop:
                try:
                    x, y = next(batches)
                except StopIteration:
                    break
                record = self.train_step(x, y)
                seen += len(y)
                running.append(record["loss"])
                rate = seen / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{record['loss']:.3f}", samples_s=f"{rate:.0f}")
                bar.update(1)
                if self.log_path is not None and self.step % self.log_every == 0:
                    self._log({"kind": "step", "epoch": self.epoch, **record, "samples_per_s": rate})
            bar.close()
            finished = self.step_in_epoch >= total
            entry = {
                "epoch": self.epoch + (1 if finished else 0),
                "step": self.step,
                "train_loss": sum(running) / max(len(running), 1),
                "seconds": time.perf_counter() - start,
                "samples_per_s": seen / max(time.perf_counter() - start, 1e-9),
            }
            if finished:
                self._end_epoch()
            if val_loader is not None and (finished or (max_steps is not None and self.step >= max_steps)):
                entry.update({f"val_{k}": v for k, v in self.evaluate(val_loader).items()})
            self.history.append(entry)
            self._log({"kind": "epoch", **entry})
            if not finished or self._stop:
                break
        return self.history

    def _end_epoch(self) -> None:
        self.leadership.append(self._epoch_counts.tolist())
        self._epoch_counts.zero_()
        self.epoch += 1
        self.step_in_epoch = 0

    @torch.no_grad()
    def evaluate(self, loader) -> dict:
        """Accuracy of the model's output and of every head (the best worker of each block).

        Returns ``{"accuracy", "loss", "block_accuracy": [...], "worker_accuracy": [[...], ...]}``;
        ``block_accuracy`` has one entry per block, the last being the model's own accuracy.
        """
        was_training = self.net.training
        self.net.eval()
        heads = len(self.net.heads)
        workers = self.net.config["workers"]
        correct_workers = torch.zeros(heads, workers)
        correct, total, loss_sum = 0, 0, 0.0
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            h = x
            with self._autocast():
                for k, block in enumerate(self.net.blocks):
                    h = block(h)
                    if k < heads:
                        logits = self.net.heads[k](h)
                        logits = logits.unsqueeze(0) if logits.dim() == 2 else logits
                        correct_workers[k] += (logits.argmax(-1) == y).sum(-1).float().cpu()
                logits = main_output(h)
                loss_sum += torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            total += len(y)
        self.net.train(was_training)
        total = max(total, 1)
        worker_acc = (correct_workers / total).tolist()
        accuracy = correct / total
        return {
            "accuracy": accuracy,
            "loss": loss_sum / total,
            "block_accuracy": [max(w) for w in worker_acc] + [accuracy],
            "worker_accuracy": worker_acc,
        }

    def _log(self, record: dict) -> None:
        if self.log_path is None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Everything needed to resume: counters, optimizer/scheduler/scaler states, RNG, leadership."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "schedulers": [s.state_dict() if s is not None else None for s in self.schedulers],
            "scalers": [s.state_dict() if s is not None else None for s in self.scalers],
            "rng": torch.get_rng_state(),
            "epoch_counts": self._epoch_counts.clone(),
            "leadership": self.leadership,
            "fixed_leaders": [t.clone() if t is not None else None for t in self.net.fixed_leaders],
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError(
                f"the checkpoint has {len(state['optimizers'])} block optimizers but this model has "
                f"{len(self.optimizers)} blocks; resume with the model the checkpoint was saved from"
            )
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        for sched, s in zip(self.schedulers, state["schedulers"]):
            if sched is not None and s is not None:
                sched.load_state_dict(s)
        for scaler, s in zip(self.scalers, state.get("scalers", [])):
            if scaler is not None and s is not None:
                scaler.load_state_dict(s)
        torch.set_rng_state(state["rng"])
        self._epoch_counts = state["epoch_counts"].clone()
        self.leadership = [list(map(list, epoch)) for epoch in state.get("leadership", [])]
        self.net.fixed_leaders = [t.clone() if t is not None else None for t in state.get("fixed_leaders", [])] or [
            None
        ] * len(self.net.heads)
        self.history = list(state.get("history", []))


def _jsonable(value):
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)
