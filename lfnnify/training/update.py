"""One block's update, the one definition both trainers use: warm-up mask, replica average, clip, step, schedule."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["BlockUpdate", "OptimizerFactory", "SchedulerFactory"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], object]


def make_optimizer(factory: OptimizerFactory, params: list[nn.Parameter], block: int) -> torch.optim.Optimizer:
    """``factory(params)``, checked: lfnnify needs one optimizer per block, so it takes a factory."""
    if isinstance(factory, torch.optim.Optimizer):
        raise ConfigError(
            f"optimizer= got a {type(factory).__name__} instance; lfnnify makes one optimizer per block, so it "
            f"takes a factory: optimizer=lambda params: torch.optim.{type(factory).__name__}(params, lr=...)"
        )
    if not callable(factory):
        raise ConfigError(f"optimizer={factory!r} must be a factory: optimizer=lambda params: "
                          f"torch.optim.SGD(params, lr=0.1)")
    try:
        opt = factory(params)
    except Exception as exc:  # the user's factory, or torch refusing its arguments: say which call it was
        raise ConfigError(
            f"the optimizer factory raised {type(exc).__name__} ({exc}) when called with block {block}'s parameters; "
            f"it is called once per block and must return a torch.optim.Optimizer, e.g. optimizer=lambda params: "
            f"torch.optim.SGD(params, lr=0.1)"
        ) from exc
    if not isinstance(opt, torch.optim.Optimizer):
        raise ConfigError(
            f"optimizer factory returned {type(opt).__name__} for block {block}; it must return a torch.optim.Optimizer"
        )
    return opt


def make_scheduler(factory: SchedulerFactory | None, opt: torch.optim.Optimizer):
    """``factory(optimizer)`` or None, checked like :func:`make_optimizer`."""
    if factory is None:
        return None
    if hasattr(factory, "step") and hasattr(factory, "optimizer"):
        raise ConfigError(
            f"scheduler= got a {type(factory).__name__} instance; lfnnify makes one scheduler per block optimizer, "
            f"so it takes a factory: scheduler=lambda opt: torch.optim.lr_scheduler.{type(factory).__name__}(opt, ...)"
        )
    if not callable(factory):
        raise ConfigError(f"scheduler={factory!r} must be a factory: scheduler=lambda opt: ...(opt, ...)")
    try:
        return factory(opt)
    except Exception as exc:
        raise ConfigError(
            f"the scheduler factory raised {type(exc).__name__} ({exc}) when called with a block's optimizer; it is "
            f"called once per block, e.g. scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=10)"
        ) from exc


class BlockUpdate:
    """How one block's parameters (its trunk and its head) change once its gradients are in.

    :meth:`step` is the whole sequence: drop the gradients of parameters frozen during head warm-up,
    average over replicas (pipeline), unscale and clip, step the optimizer (through the gradient scaler
    for fp16), free the gradients, step the scheduler. Both trainers call it, in every mode.

    Args:
        params: the block's trainable parameters and its head's.
        optimizer, scheduler: factories (see :class:`~lfnnify.Trainer`).
        scaler: a ``torch.amp.GradScaler`` for fp16, or None. ``owns_scaler=False`` when several
            blocks share one scaler (``mode="lfnn"``): the trainer then calls ``scaler.update()`` once.
        grad_clip: clip the block's gradient norm to this value.
        frozen_in_warmup: parameters that keep their values during head warm-up.
        block: the block's index, for error messages.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        *,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scaler: torch.amp.GradScaler | None = None,
        owns_scaler: bool = True,
        grad_clip: float | None = None,
        frozen_in_warmup: Iterable[nn.Parameter] = (),
        block: int = 0,
    ):
        self.params = params
        self.optimizer = make_optimizer(optimizer, params, block)
        self.scheduler = make_scheduler(scheduler, self.optimizer)
        self.scaler, self.owns_scaler = scaler, owns_scaler
        self.grad_clip = grad_clip
        self._frozen = {id(p) for p in frozen_in_warmup}
        self.reduce: Callable[[list[Tensor]], None] | None = None  # replicas: average gradients in place
        self.track_updates = False  # keep the last step's change of every parameter (weight prediction)
        self._last_update: dict[int, Tensor] = {}
        self._compensated: set[int] = set()  # the parameters whose delayed steps are spike-compensated

    def compensate_spikes(self, params: Iterable[nn.Parameter], block: int) -> None:
        """Spike compensation (Kosson et al. 2021) for ``params``, the trunk's: a step with ``delay=D`` moves them
        by ``-lr·(m^D·v + (1 - m^D)/(1 - m)·g)`` instead of SGD's ``-lr·v``. A gradient that arrives D steps late
        then has, from its first step on, the total effect momentum SGD would have given it without the delay:
        the D steps it missed (``1 + m + ... + m^(D-1)``) at once, and its later share of the momentum scaled
        by ``m^D``. The rule is SGD's, so the optimizer must be plain momentum SGD."""
        opt = self.optimizer
        bad = next((g for g in opt.param_groups if not (g.get("momentum", 0) > 0 and g.get("dampening", 0) == 0
                                                        and not g.get("nesterov") and not g.get("maximize"))), None)
        if not isinstance(opt, torch.optim.SGD) or bad is not None:
            got = type(opt).__name__ + ("" if bad is None else f" with momentum={bad.get('momentum')}, "
                                        f"dampening={bad.get('dampening')}, nesterov={bad.get('nesterov')}")
            raise ConfigError(
                f"spike_compensation=True rescales momentum SGD's step for the delay of block {block}'s gradients, so "
                f"its optimizer must be torch.optim.SGD with momentum > 0, no dampening and no Nesterov; it is "
                f"{got}. Use such an optimizer, or convert with spike_compensation=False"
            )
        self._compensated = {id(p) for p in params}

    def scaled(self, loss: Tensor) -> Tensor:
        """The loss to call backward on (multiplied by the fp16 loss scale, if any)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    @property
    def grad_scale(self) -> float:
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, *, warmup: bool = False, lr_scale: float = 1.0, delay: int = 0) -> None:
        """Apply the gradients the block's backward left in ``.grad``; ``lr_scale`` multiplies every learning rate
        for this step only (the scheduler's values are left as they were). ``delay``: how many steps late the
        trunk's gradients are, for spike compensation (:meth:`compensate_spikes`; 0 = none)."""
        if warmup:  # head warm-up: only the heads and the model's own classifier learn
            for p in self.params:
                if id(p) in self._frozen:
                    p.grad = None
        before = [p.detach().clone() for p in self.params] if self.track_updates else None
        if self.reduce is not None:
            self.reduce([p.grad for p in self.params if p.grad is not None])
        if self.grad_clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], self.grad_clip)
        rates = [group["lr"] for group in self.optimizer.param_groups]
        for group, lr in zip(self.optimizer.param_groups, rates):
            group["lr"] = lr * lr_scale
        delayed = self._delayed_gradients() if delay and self._compensated else None
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            if self.owns_scaler:
                self.scaler.update()
        else:
            self.optimizer.step()
        if delayed:
            self._compensate(delayed, delay)
        for group, lr in zip(self.optimizer.param_groups, rates):
            group["lr"] = lr
        if before is not None:
            self._last_update = {id(p): p.detach() - b for p, b in zip(self.params, before)}
        self._advance()

    @torch.no_grad()
    def _delayed_gradients(self) -> dict[int, Tensor]:
        """The gradient SGD adds to its momentum for each compensated parameter: ``grad + weight_decay·w``."""
        out = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) in self._compensated and p.grad is not None:
                    out[id(p)] = p.grad + group["weight_decay"] * p if group["weight_decay"] else p.grad.clone()
        return out

    @torch.no_grad()
    def _compensate(self, delayed: dict[int, Tensor], delay: int) -> None:
        """SGD moved each parameter by ``-lr·v``; move it on to ``-lr·(a·v + b·g)``, a = m^D, b = (1-m^D)/(1-m)."""
        for group in self.optimizer.param_groups:
            m, lr = group["momentum"], group["lr"]
            a = m**delay
            b = (1 - a) / (1 - m)
            for p in group["params"]:
                g = delayed.get(id(p))
                if g is not None:
                    p.add_(self.optimizer.state[p]["momentum_buffer"], alpha=lr * (1 - a)).add_(g, alpha=-lr * b)

    def last_update(self, param: nn.Parameter) -> Tensor | None:
        """How the last :meth:`step` changed ``param`` (with ``track_updates``); None before the first step.
        For SGD with momentum this is ``-lr·v``, the step that linear weight prediction extrapolates."""
        return self._last_update.get(id(param))

    def skip(self) -> None:
        """A step without gradients (replay's first steps, before a delayed gradient arrives): the
        parameters keep their values, and the learning-rate schedule still advances with the step count."""
        self.zero_grad()
        self.optimizer.step()  # a no-op without gradients; keeps the scheduler's order check satisfied
        self._advance()

    def _advance(self) -> None:
        self.zero_grad()  # gradients are dead now; freeing them lowers peak memory
        if self.scheduler is not None:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None and self.owns_scaler else None,
            "last_update": [self._last_update.get(id(p)) for p in self.params] if self.track_updates else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and self.owns_scaler and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        if state.get("last_update") is not None:
            self._last_update = {id(p): u.to(p.device) for p, u in zip(self.params, state["last_update"])
                                 if u is not None}
