"""What the one-device trainer and the pipeline trainer share: checks, block updates and stages, epochs, state."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from .._jsonl import append_jsonl
from ..errors import ConfigError, NonFiniteLossError
from ..surgery.facts import find_classifier
from ..surgery.lookahead import LookaheadHead
from ..surgery.model import LFNNModel
from .inputs import batch_rules
from .options import AMP_DTYPES, TrainerOptions
from .step import BlockStep, ModeSchedule
from .update import BlockUpdate

__all__ = ["TrainerBase", "block_parameters", "AMP_DTYPES"]

# on a GPU the losses are checked on the device and the flag is read every this many steps (and at the end of every
# fit), so that training does not wait for the GPU each step; on the CPU every loss is checked at once
FINITE_CHECK_EVERY = 25


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


class TrainerBase:
    """Checks, per-block updates and stages for the blocks this process trains, epochs, records and state.

    ``owned`` lists the blocks this process trains: all of them on one device, one in a pipeline rank.
    """

    def __init__(self, net: LFNNModel, *, owned: list[int], options: TrainerOptions):
        options.check_for(net)
        self.options = options  # every setting is read from here (nothing copied onto the trainer)
        self.net = net
        self.schedule = ModeSchedule.of(net.mode, options)
        self.device = next((p.device for p in net.blocks[owned[0]].parameters()), torch.device("cpu"))
        self.groups = block_parameters(net)
        self.batch_rules = batch_rules(net)  # what every training and evaluation batch must satisfy
        classifier = find_classifier(net._source)
        keep = {id(p) for p in classifier.parameters()} if classifier is not None else set()
        keep |= {id(p) for head in net.heads for p in head.parameters()}
        # Eq. 1 sends one global loss through every block: one loss scale for all of them
        amp = options.amp
        shared = torch.amp.GradScaler(self.device.type) if amp == "fp16" and net.mode == "lfnn" else None
        self.scaler = shared
        self.updates: dict[int, BlockUpdate] = {}
        self.stages: dict[int, BlockStep] = {}
        for k in owned:
            scaler = shared or (torch.amp.GradScaler(self.device.type) if amp == "fp16" else None)
            self.updates[k] = BlockUpdate(
                self.groups[k], optimizer=options.optimizer, scheduler=options.scheduler, scaler=scaler,
                owns_scaler=shared is None, grad_clip=options.grad_clip,
                frozen_in_warmup=[p for p in self.groups[k] if id(p) not in keep], block=k,
            )
            self.updates[k].track_updates = bool(net.config.get("weight_prediction", False))
            if net.config.get("spike_compensation") and k < net.num_blocks - 1:  # the last block has no delay
                self.updates[k].compensate_spikes(net.blocks[k].parameters(), block=k)
            self.stages[k] = BlockStep(net, k, self.updates[k], schedule=self.schedule, autocast=self._autocast,
                                        check_finite=self._check_finite)
        self.step = 0  # optimizer steps taken (one per batch; every block steps once)
        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0
        self._epoch_counts = torch.zeros(len(net.heads), net.config["workers"], dtype=torch.long, device=self.device)
        self._first_bad_step = torch.full((net.num_blocks,), -1, dtype=torch.long, device=self.device)
        self.leadership: list[list[list[int]]] = []  # per epoch, per hidden block, times each worker led
        self.history: list[dict] = []
        self._stop = False
        self._broken: str | None = None  # why this trainer can no longer train (a non-finite loss)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers of the blocks this process trains, in block order."""
        return [u.optimizer for u in self.updates.values()]

    @property
    def schedulers(self) -> list:
        return [u.scheduler for u in self.updates.values()]

    def request_stop(self) -> None:
        """Ask ``fit`` to return after the current step (signal handlers call this)."""
        self._stop = True

    # ------------------------------------------------------------------ pieces of a step

    def _autocast(self):
        if self.options.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=AMP_DTYPES[self.options.amp])

    def _check_finite(self, k: int, loss: Tensor) -> None:
        """A non-finite loss stops training with an error naming the block: at once on the CPU; on a GPU at the
        next read of the on-device flag (:meth:`_raise_if_nonfinite`), which names the step it first happened."""
        bad = ~torch.isfinite(loss.detach()).all()
        if loss.device.type == "cpu":
            if bad:
                self._nonfinite(k, self.step, loss.detach().float().sum().item())
            return
        first = self._first_bad_step[k]
        self._first_bad_step[k] = torch.where(bad & (first < 0), self.step, first)

    def _raise_if_nonfinite(self) -> None:
        """Read the device's flag (one synchronisation): every ``FINITE_CHECK_EVERY`` steps and at the end of a fit."""
        steps = self._first_bad_step.tolist()
        for k, step in enumerate(steps):
            if step >= 0:
                self._nonfinite(k, step)

    def _after_step(self) -> None:
        if self.step % FINITE_CHECK_EVERY == 0 and self.device.type != "cpu":
            self._raise_if_nonfinite()

    def _nonfinite(self, k: int, step: int, value: float | None = None):
        what = "not finite (inf or nan)" if value is None else f"{value}"
        self._broken = (
            f"this trainer stopped at step {step} on a non-finite loss in block {k}; the model's weights or BatchNorm "
            f"statistics may now hold inf or nan, so it cannot go on training or evaluating. Load the last "
            f"checkpoint (lfnnify.load and Trainer.load_state_dict) and train again with a lower learning rate or "
            f"grad_clip="
        )
        raise NonFiniteLossError(
            f"block {k}'s loss is {what} at step {step}; training stopped. "
            f"Lower the learning rate, set grad_clip=, or check the inputs of block {k}."
        )

    def _check_usable(self) -> None:
        """Refuse to train or evaluate after a non-finite loss left the model in an unknown state."""
        if self._broken is not None:
            raise NonFiniteLossError(self._broken)

    def _refresh_due(self, k: int, step: int) -> bool:
        """Whether head ``k`` takes block k+1's weights at ``step`` (as they are after block k+1's step - 1)."""
        every = self.options.refresh_heads_every
        return bool(every) and step > 0 and step % every == 0 and isinstance(self.net.heads[k], LookaheadHead)

    def _count_leaders(self, k: int, leaders: Tensor | None) -> None:
        if leaders is None:
            return
        self._epoch_counts[k].index_add_(0, leaders.to(self._epoch_counts.device),
                                         torch.ones(len(leaders), dtype=torch.long, device=self._epoch_counts.device))
        if self.options.reselect == "epoch" and self.net.fixed_leaders[k] is None:
            self.net.fixed_leaders[k] = leaders.detach().clone()

    # ------------------------------------------------------------------ epochs

    def _start_epoch(self, loader, *, replicas: int = 1) -> None:
        """Position the loader's sampler at this epoch and, after a resume, at the current step."""
        sampler = getattr(loader, "sampler", None)
        batch_size = getattr(loader, "batch_size", None) or 1
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
            if self.step_in_epoch and hasattr(sampler, "skip"):
                sampler.skip(self.step_in_epoch * replicas * batch_size)
        if self.step_in_epoch == 0 and self.options.reselect == "epoch":
            self.net.fixed_leaders = [None] * len(self.net.heads)

    def _end_epoch(self) -> None:
        self.leadership.append(self._epoch_counts.tolist())
        self._epoch_counts.zero_()
        self.epoch += 1
        self.step_in_epoch = 0

    @staticmethod
    def _summary(records: list[dict], key: str) -> float:
        """The mean of ``key`` over the records (floats, or tensors still on the device: one read for all)."""
        values = [r[key] for r in records if key in r]
        if not values:
            return float("nan")
        if isinstance(values[0], Tensor):
            return torch.stack([v.double() for v in values]).mean().item()
        return sum(values) / len(values)

    def _log(self, record: dict) -> None:
        if self.options.log_path is not None:
            append_jsonl(self.options.log_path, record)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Everything needed to resume: counters, optimizer/scheduler/scaler states, random states (CPU and
        CUDA), leadership, and in replay mode the batches kept for delayed backward passes."""
        updates = [u.state_dict() for u in self.updates.values()]
        return {
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "optimizers": [u["optimizer"] for u in updates],
            "schedulers": [u["scheduler"] for u in updates],
            "scalers": [u["scaler"] for u in updates],
            "last_updates": [u["last_update"] for u in updates],
            "shared_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if _cuda_in_use() else [],
            "epoch_counts": self._epoch_counts.cpu(),
            "leadership": self.leadership,
            "fixed_leaders": [t.clone() if t is not None else None for t in self.net.fixed_leaders],
            "history": self.history,
            "stages": [s.state_dict() for s in self.stages.values()],
            "conversion": self._conversion(),
        }

    def _conversion(self) -> dict:
        """The conversion settings a trainer state depends on: a resume into another conversion is refused."""
        return {"mode": self.net.mode, "weight_stashing": bool(self.net.config.get("weight_stashing", False))}

    def load_state_dict(self, state: dict) -> None:
        if len(state["optimizers"]) != len(self.updates):
            raise ConfigError(
                f"the checkpoint has {len(state['optimizers'])} block optimizers but this trainer has "
                f"{len(self.updates)}; resume with the model the checkpoint was saved from"
            )
        saved = state.get("conversion")
        if saved is None:  # states written before the conversion was recorded: what their kept batches show
            stashed = any(e.get("weights") is not None for st in state.get("stages", []) for e in st.get("kept", []))
            saved = {"mode": "replay", "weight_stashing": True} if stashed else None
        if saved is not None and saved != self._conversion():
            raise ConfigError(
                f"this trainer state was saved from a model converted with mode={saved['mode']!r}, "
                f"weight_stashing={saved['weight_stashing']}, but this model has mode={self.net.mode!r}, "
                f"weight_stashing={self._conversion()['weight_stashing']}: its kept batches and optimizer states "
                f"would be used for another method. Convert the model the same way to resume (lfnnify.load(path) "
                f"rebuilds it), or start a new trainer"
            )
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        scalers = state.get("scalers") or [None] * len(self.updates)
        last = state.get("last_updates") or [None] * len(self.updates)
        for update, opt, sched, scaler, moved in zip(self.updates.values(), state["optimizers"], state["schedulers"],
                                                     scalers, last):
            update.load_state_dict({"optimizer": opt, "scheduler": sched, "scaler": scaler, "last_update": moved})
        if self.scaler is not None and state.get("shared_scaler") is not None:
            self.scaler.load_state_dict(state["shared_scaler"])
        torch.set_rng_state(state["rng"])
        cuda_states = state.get("cuda_rng") or []
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
        self._epoch_counts = state["epoch_counts"].clone().to(self.device)
        self.leadership = [list(map(list, epoch)) for epoch in state.get("leadership", [])]
        fixed = state.get("fixed_leaders") or [None] * len(self.net.heads)
        self.net.fixed_leaders = [t.clone() if t is not None else None for t in fixed]
        self.history = list(state.get("history", []))
        for stage, stage_state in zip(self.stages.values(), state.get("stages", [])):
            stage.load_state_dict(stage_state)


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()
