"""The settings convert() and plan() take, declared once: :class:`ConvertOptions`, each field with its rule.

``lfnnify.convert(model, **settings)`` and ``lfnnify.plan(model, **settings)`` build one :class:`ConvertOptions`;
a recipe's ``convert:`` section is made of the same fields (``lfnnify/app/recipes.py``), so a new setting is one
line here. What each setting does is documented on :func:`lfnnify.convert`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

from .._checks import check_rules, count, is_flag, is_number, one_of, optional, refuse_unknown, setting
from ..errors import ConfigError

__all__ = ["ConvertOptions", "MODES", "BALANCES", "HEADS", "LOOKAHEAD_HEADS", "signature_with"]

HEADS = ("linear", "lookahead", "lookahead-layer")  # built-in heads; look-ahead heads live in lookahead.py
MODES = ("local", "lfnn", "replay")
BALANCES = ("flops", "time", "params", "memory")
LOOKAHEAD_HEADS = ("lookahead", "lookahead-layer")


def _weight(v) -> bool:
    return is_number(v) and v >= 0


def _cut_names(v) -> bool:
    return v is None or (isinstance(v, Sequence) and not isinstance(v, str) and all(isinstance(c, str) for c in v))


@dataclass(frozen=True)
class ConvertOptions:
    """What a model is converted into, checked when made (every error names the value, the rule and the fix)."""

    blocks: int | None = setting(None, optional(count(1)), "must be an int >= 1 (the paper uses 4)")
    cuts: Sequence[str] | None = setting(None, _cut_names,
                                         "must be a list of cut names, e.g. cuts=['layer1', 'layer2']")
    workers: int = setting(1, count(1), "must be an int >= 1 (1 = block-wise workers)")
    leaders: float = setting(1.0, lambda v: is_number(v) and 0 < v <= 1,
                             "must be a fraction in (0, 1]: the share of workers that lead (the paper's default is "
                             "0.7; 1.0 makes every worker a leader)")
    mode: str = setting("local", one_of(*MODES), "must be 'local' (LFNN-ℓ, BP-free, Eq. 2), 'lfnn' (Eq. 1, with BP) "
                                                  "or 'replay' (delayed end-to-end gradients)")
    head: str = setting("linear", lambda v: v in HEADS or callable(v),
                        f"must be one of {HEADS} or a callable head(channels, num_classes, workers) -> nn.Module")
    follower_weight: float = setting(1.0, _weight, "must be a finite number >= 0 (λ; the paper uses 1)")
    local_weight: float = setting(0.0, _weight, "must be a finite number >= 0 (the head loss's weight in replay mode)")
    weight_stashing: bool = setting(False, is_flag, "must be True or False")
    weight_prediction: bool = setting(False, is_flag, "must be True or False")
    spike_compensation: bool = setting(False, is_flag, "must be True or False")
    balance: str = setting("flops", one_of(*BALANCES), f"must be one of {BALANCES}")
    num_classes: int | None = setting(None, optional(count(1)), "must be an int >= 1, or None for the model's own")

    def __post_init__(self):
        if self.blocks is not None and self.cuts is not None:
            raise ConfigError(f"give blocks= or cuts=, not both (got blocks={self.blocks!r}, "
                              f"cuts={list(self.cuts) if _cut_names(self.cuts) else self.cuts!r})")
        check_rules(self)
        if self.head in LOOKAHEAD_HEADS and self.workers != 1:
            raise ConfigError(
                f"head={self.head!r} with workers={self.workers}: a look-ahead head copies the next block's first "
                f"stage, which mixes all channels, so it is block-wise only. Use workers=1, or head='linear' for "
                f"filter-wise workers."
            )

    @classmethod
    def from_settings(cls, where: str, settings: dict) -> ConvertOptions:
        """The options from keyword arguments; an unknown one is named with the list of settings."""
        refuse_unknown(where, settings, cls)
        return cls(**settings)


def signature_with(function, *options) -> inspect.Signature:
    """``function``'s signature with ``**settings`` spelled out as the fields of ``options`` (default
    :class:`ConvertOptions`), after its own parameters, for ``help()`` and editors that read ``__signature__``."""
    params = [p for p in inspect.signature(function).parameters.values() if p.kind != p.VAR_KEYWORD]
    taken = {p.name for p in params}
    for cls in options or (ConvertOptions,):
        for f in dataclasses.fields(cls):
            if f.name not in taken:
                taken.add(f.name)
                default = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
                params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                                annotation=f.type))
    return inspect.Signature(params)
