"""The settings both trainers take, declared once: :class:`TrainerOptions`, checked in one place.

``Trainer(net, **settings)`` and ``PipelineTrainer(net, <its own settings>, **settings)`` build one
:class:`TrainerOptions` from the settings; :class:`~lfnnify.training.base.TrainerBase` takes it. What each setting
does is documented on :class:`lfnnify.Trainer`. The checks that need the model (which modes it can switch
between, whether it has look-ahead heads to refresh) are :meth:`TrainerOptions.check_for`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch

from .._checks import check_rules, count, is_number, one_of, optional, refuse_unknown, setting
from ..errors import ConfigError
from ..surgery.lookahead import LookaheadHead
from ..surgery.model import LFNNModel
from ..surgery.options import signature_with
from ..surgery.traffic import SEND_DTYPES, SEND_DTYPES_BY_NAME
from .update import OptimizerFactory, SchedulerFactory

__all__ = ["TrainerOptions", "PipelineOptions", "AMP_DTYPES", "SWITCHABLE", "SEND_DTYPES",
           "SEND_DTYPES_BY_NAME", "MAX_TIMEOUT_S",
           "signature_with_options"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SWITCHABLE = ("local", "replay")

MAX_TIMEOUT_S = 86400.0  # a day: a wait longer than that is a hang, and larger values overflow the backends' clocks


@dataclass(frozen=True)
class TrainerOptions:
    """What a trainer is asked to do, checked when it is made (every error names the value, the rule, the fix).

    Each field is declared once, with its rule (``setting``); a recipe's ``train:`` section is made of the same
    fields (``lfnnify/app/recipes.py``)."""

    optimizer: OptimizerFactory
    scheduler: SchedulerFactory | None = None
    amp: str | None = setting(None, one_of(None, *AMP_DTYPES), "must be None, 'bf16' or 'fp16'")
    grad_clip: float | None = setting(None, optional(lambda v: is_number(v) and v > 0),
                                      "must be a positive number or None")
    head_warmup_steps: int = setting(0, count(0), "must be an int >= 0")
    reselect: str = setting("batch", one_of("batch", "epoch"), "must be 'batch' or 'epoch'")
    switch_mode_at: int | None = setting(None, optional(count(0)), "must be a step count >= 0")
    switch_to: str | None = setting(None, one_of(None, *SWITCHABLE),
                                    "must be 'local' or 'replay': the mode to switch to")
    refresh_heads_every: int | None = setting(None, optional(count(1)), "must be a step count >= 1 or None")
    refresh_momentum: float = setting(0.0, lambda v: is_number(v) and 0 <= v < 1,
                                      "must be a number in [0, 1) (0 copies the weights)")
    delay_lr_warmup: int | None = setting(None, optional(count(1)), "must be a step count >= 1 or None")
    log_path: str | Path | None = None
    log_every: int = setting(20, count(1), "must be an int >= 1")
    progress: bool = True

    @classmethod
    def from_settings(cls, where: str, settings: dict) -> TrainerOptions:
        """The options from a trainer's keyword arguments; an unknown or missing one is named."""
        refuse_unknown(where, settings, cls)
        if settings.get("optimizer") is None:
            raise ConfigError(f"{where} needs optimizer=, a factory: optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1)")
        return cls(**settings)

    def __post_init__(self):
        if (self.switch_mode_at is None) != (self.switch_to is None):
            raise ConfigError(
                f"switch_mode_at={self.switch_mode_at!r}, switch_to={self.switch_to!r}: give both (e.g. "
                f"switch_mode_at=1000, switch_to='replay') or neither"
            )
        check_rules(self)
        if self.refresh_heads_every is None and self.refresh_momentum != 0:
            raise ConfigError(f"refresh_momentum={self.refresh_momentum!r} is used only with refresh_heads_every=N "
                              f"(the steps between refreshes); set it, or drop refresh_momentum")

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
        unused = [k for k in REPLAY_ONLY if net.config.get(k)]
        if unused and "replay" not in (net.mode, self.switch_to):
            named = ", ".join(f"{k}=True" for k in unused)
            raise ConfigError(
                f"{named}: {'these change' if len(unused) > 1 else 'it changes'} how replay's delayed gradients are "
                f"applied, and this model trains in mode={net.mode!r} throughout, so nothing would use "
                f"{'them' if len(unused) > 1 else 'it'}; convert with mode='replay' (or train with "
                f"switch_mode_at=N, switch_to='replay'), or convert without {named}"
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


# what a conversion sets for replay's delayed gradients alone (ConvertOptions' fields)
REPLAY_ONLY = ("weight_stashing", "weight_prediction", "spike_compensation")


@dataclass(frozen=True)
class PipelineOptions:
    """The settings only :class:`~lfnnify.PipelineTrainer` takes (documented there), checked when it is made."""

    max_in_flight: int = setting(2, count(1), "must be an int >= 1")
    send_dtype: torch.dtype | None = setting(None, one_of(None, *SEND_DTYPES),
                                             "must be None (the block's own dtype) or one of torch.float32, "
                                             "torch.bfloat16, torch.float16, torch.int8: activations and gradients "
                                             "cross as floats (torch.bfloat16 halves the traffic) or as int8 with a "
                                             "scale per channel (a quarter)")
    send_deltas: bool = setting(False, lambda v: isinstance(v, bool),
                                "must be True or False: with send_dtype=torch.int8, send each training sample's "
                                "change since its last visit (AQ-SGD) instead of its activation")
    overlap_sends: bool = setting(True, lambda v: isinstance(v, bool),
                                  "must be True or False: with False every step waits until its sends have been "
                                  "received before the next step's compute starts (to measure what overlap buys)")
    receive_ahead: bool = setting(False, lambda v: isinstance(v, bool),
                                  "must be True or False: with True each block posts the receive of its next batch "
                                  "before it computes this one, so that the batch crosses the link meanwhile")
    replicas_powersgd_rank: int | None = setting(None, optional(count(1)),
                                                 "must be None (replicas average with one all-reduce) or a rank >= 1: "
                                                 "average a block's replicas through torch's PowerSGD at that rank")
    replicas_powersgd_start: int = setting(10, count(2),
                                           "must be an int >= 2: the steps of plain all-reduce before PowerSGD "
                                           "compresses (torch's start_powerSGD_iter; error feedback needs 2)")
    # chosen once, for the API and the recipes: long enough for a neighbour's evaluation or for rank 0 writing a
    # large checkpoint (a 1 GB one over 100 Mbit/s takes about 80 s), and a dead neighbour is seen at once anyway:
    # the timeout only bounds how long a hung one goes unnoticed
    timeout_s: float = setting(300.0, lambda v: is_number(v) and 0 < v <= MAX_TIMEOUT_S,
                               f"must be a positive number of seconds, at most {MAX_TIMEOUT_S:g} (a day): how long a "
                               f"rank waits for a neighbour before it says which one stopped")
    threads: int | None = setting(None, optional(count(1)), "must be an int >= 1 or None")
    backend: str | None = setting(None, one_of(None, "nccl", "gloo"), "must be 'nccl' or 'gloo' (or None to choose)")
    device: str | None = setting(None, one_of(None, "cpu"),
                                 "must be None or 'cpu': the pipeline places each rank on its own GPU (LOCAL_RANK) by "
                                 "itself; pass device=None, or 'cpu' to keep every block on the CPU")

    def __post_init__(self):
        check_rules(self)
        if self.send_deltas and self.send_dtype != torch.int8:
            raise ConfigError(
                f"send_deltas=True with send_dtype={self.send_dtype!r}: deltas are each sample's change rounded to "
                f"int8 against what was sent for it last (AQ-SGD), so they need send_dtype=torch.int8 (recipes: "
                f"pipeline.send_dtype: int8); or drop send_deltas"
            )

    def check_for(self, net) -> None:
        if isinstance(net, LFNNModel) and net.mode == "lfnn":
            raise ConfigError(
                f"mode={net.mode!r}: Eq. 1's global loss needs backward through every block in one pass, which is "
                f"backward locking. The pipeline trains mode='local' (LFNN-ℓ) and mode='replay' (delayed global "
                f"gradients); use lfnnify.Trainer for mode='lfnn'."
            )


def signature_with_options(init, *own) -> inspect.Signature:
    """``init``'s signature with ``**settings`` spelled out as the fields of ``own`` (a trainer's own options) and
    then :class:`TrainerOptions`', for ``help()`` and editors that read ``__signature__``."""
    return signature_with(init, *own, TrainerOptions)
