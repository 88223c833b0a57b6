"""The settings both trainers take, declared once: :class:`TrainerOptions`, checked in one place.

``Trainer(net, **settings)`` and ``PipelineTrainer(net, <its own settings>, **settings)`` build one
:class:`TrainerOptions` from the settings; :class:`~lfnnify.training.base.TrainerBase` takes it. What each setting
does is documented on :class:`lfnnify.Trainer`. The checks that need the model (which modes it can switch
between, whether it has look-ahead heads to refresh) are :meth:`TrainerOptions.check_for`.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch

from .._checks import is_count, is_number
from ..errors import ConfigError
from ..surgery.lookahead import LookaheadHead
from ..surgery.model import LFNNModel
from .update import OptimizerFactory, SchedulerFactory

__all__ = ["TrainerOptions", "PipelineOptions", "AMP_DTYPES", "SWITCHABLE", "SEND_DTYPES", "MAX_TIMEOUT_S",
           "signature_with_options"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SWITCHABLE = ("local", "replay")
SEND_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # activations and gradients cross as floats
MAX_TIMEOUT_S = 86400.0  # a day: a wait longer than that is a hang, and larger values overflow the backends' clocks


@dataclass(frozen=True)
class TrainerOptions:
    """What a trainer is asked to do, checked when it is made (every error names the value, the rule, the fix)."""

    optimizer: OptimizerFactory
    scheduler: SchedulerFactory | None = None
    amp: str | None = None
    grad_clip: float | None = None
    head_warmup_steps: int = 0
    reselect: str = "batch"
    switch_mode_at: int | None = None
    switch_to: str | None = None
    refresh_heads_every: int | None = None
    refresh_momentum: float = 0.0
    delay_lr_warmup: int | None = None
    log_path: str | Path | None = None
    log_every: int = 20
    progress: bool = True

    @classmethod
    def from_settings(cls, where: str, settings: dict) -> TrainerOptions:
        """The options from a trainer's keyword arguments; an unknown or missing one is named."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise ConfigError(f"{where} got unknown setting{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(map(repr, unknown))}; it takes {', '.join(names)}")
        if "optimizer" not in settings:
            raise ConfigError(f"{where} needs optimizer=, a factory: optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1)")
        return cls(**settings)

    def __post_init__(self):
        if self.amp not in (None, *AMP_DTYPES):
            raise ConfigError(f"amp={self.amp!r} must be None, 'bf16' or 'fp16'")
        if self.reselect not in ("batch", "epoch"):
            raise ConfigError(f"reselect={self.reselect!r} must be 'batch' or 'epoch'")
        if self.grad_clip is not None and (not is_number(self.grad_clip) or not self.grad_clip > 0):
            raise ConfigError(f"grad_clip={self.grad_clip!r} must be a positive number or None")
        if not is_count(self.head_warmup_steps, 0):
            raise ConfigError(f"head_warmup_steps={self.head_warmup_steps!r} must be an int >= 0")
        if not is_count(self.log_every, 1):
            raise ConfigError(f"log_every={self.log_every!r} must be an int >= 1")
        if (self.switch_mode_at is None) != (self.switch_to is None):
            raise ConfigError(
                f"switch_mode_at={self.switch_mode_at!r}, switch_to={self.switch_to!r}: give both (e.g. "
                f"switch_mode_at=1000, switch_to='replay') or neither"
            )
        if self.switch_mode_at is not None and not is_count(self.switch_mode_at, 0):
            raise ConfigError(f"switch_mode_at={self.switch_mode_at!r} must be a step count >= 0")
        every, momentum = self.refresh_heads_every, self.refresh_momentum
        if every is None and momentum != 0:
            raise ConfigError(f"refresh_momentum={momentum!r} is used only with refresh_heads_every=N (the steps "
                              f"between refreshes); set it, or drop refresh_momentum")
        if every is not None and not is_count(every, 1):
            raise ConfigError(f"refresh_heads_every={every!r} must be a step count >= 1 or None")
        if not is_number(momentum) or not 0 <= momentum < 1:
            raise ConfigError(f"refresh_momentum={momentum!r} must be a number in [0, 1) (0 copies the weights)")
        if self.delay_lr_warmup is not None and not is_count(self.delay_lr_warmup, 1):
            raise ConfigError(f"delay_lr_warmup={self.delay_lr_warmup!r} must be a step count >= 1 or None")

    def check_for(self, net) -> None:
        """The checks that need the model: what it can switch to, replay's precision, heads to refresh."""
        if not isinstance(net, LFNNModel):
            raise ConfigError(f"a trainer needs a model from lfnnify.convert, got {type(net).__name__}")
        if self.switch_mode_at is not None and (self.switch_to not in SWITCHABLE or net.mode not in SWITCHABLE
                                                or self.switch_to == net.mode):
            raise ConfigError(
                f"switch_to={self.switch_to!r} with a model converted with mode={net.mode!r}: training can switch "
                f"between 'local' and 'replay' (either way round); convert with one and switch to the other"
            )
        if (net.mode == "replay" or self.switch_to == "replay") and self.amp == "fp16":
            raise ConfigError(
                "amp='fp16' with mode='replay': delayed gradients travel between blocks that scale their losses "
                "differently, so replay supports amp='bf16' (no loss scaling) or full precision"
            )
        if self.delay_lr_warmup is not None and "replay" not in (net.mode, self.switch_to):
            raise ConfigError(
                f"delay_lr_warmup={self.delay_lr_warmup}: delay-aware step sizes apply to replay's delayed "
                f"gradients, and this model trains in mode={net.mode!r} throughout; convert with mode='replay' (or "
                f"switch_to='replay'), or drop delay_lr_warmup"
            )
        every = self.refresh_heads_every
        if every is not None and not any(isinstance(h, LookaheadHead) for h in net.heads):
            if net.config.get("head") in ("lookahead", "lookahead-layer"):
                raise ConfigError(
                    f"refresh_heads_every={every}: the model was converted with head={net.config['head']!r}, but "
                    f"every head fell back to the linear head (no block has a stage to copy before the next cut; "
                    f"lfnnify.plan shows each head), so there is nothing to refresh. Drop refresh_heads_every, or "
                    f"choose cuts with a stage between them"
                )
            raise ConfigError(
                f"refresh_heads_every={every}: only look-ahead heads copy the next block, and this model's heads "
                f"are {net.config.get('head')!r}; convert with head='lookahead' or head='lookahead-layer'"
            )


@dataclass(frozen=True)
class PipelineOptions:
    """The settings only :class:`~lfnnify.PipelineTrainer` takes (documented there), checked when it is made."""

    max_in_flight: int = 2
    send_dtype: torch.dtype | None = None
    timeout_s: float = 120.0
    threads: int | None = None
    backend: str | None = None
    device: str | None = None

    def __post_init__(self):
        if not is_count(self.max_in_flight, 1):
            raise ConfigError(f"max_in_flight={self.max_in_flight!r} must be an int >= 1")
        if not is_number(self.timeout_s) or not 0 < self.timeout_s <= MAX_TIMEOUT_S:
            raise ConfigError(f"timeout_s={self.timeout_s!r} must be a positive number of seconds, at most "
                              f"{MAX_TIMEOUT_S:g} (a day): how long a rank waits for a neighbour before it says which "
                              f"one stopped")
        if self.send_dtype is not None and self.send_dtype not in SEND_DTYPES:
            raise ConfigError(f"send_dtype={self.send_dtype!r} must be None (the block's own dtype) or one of "
                              f"torch.float32, torch.bfloat16, torch.float16: activations and gradients cross as "
                              f"floats (torch.bfloat16 halves the traffic)")
        if self.threads is not None and not is_count(self.threads, 1):
            raise ConfigError(f"threads={self.threads!r} must be an int >= 1 or None")
        if self.device not in (None, "cpu"):
            raise ConfigError(f"device={self.device!r}: the pipeline places each rank on its own GPU (LOCAL_RANK) "
                              f"by itself; pass device=None, or 'cpu' to keep every block on the CPU")

    def check_for(self, net) -> None:
        if isinstance(net, LFNNModel) and net.mode == "lfnn":
            raise ConfigError(
                f"mode={net.mode!r}: Eq. 1's global loss needs backward through every block in one pass, which is "
                f"backward locking. The pipeline trains mode='local' (LFNN-ℓ) and mode='replay' (delayed global "
                f"gradients); use lfnnify.Trainer for mode='lfnn'."
            )


def signature_with_options(init, *own: str) -> inspect.Signature:
    """``init``'s signature with ``**settings`` spelled out as :class:`TrainerOptions`' fields, for ``help()``
    and editors that read ``__signature__``; ``own`` names ``init``'s own keyword parameters, kept first."""
    params = [p for p in inspect.signature(init).parameters.values() if p.kind != p.VAR_KEYWORD]
    taken = {p.name for p in params}
    for f in dataclasses.fields(TrainerOptions):
        if f.name not in taken:
            default = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=f.type))
    return inspect.Signature(params)
