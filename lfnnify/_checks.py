"""The small value rules every knob check uses: a count is an int and not a bool, a number is real and finite.

``True`` is an ``int`` in Python, so ``blocks=True`` would pass an ``isinstance(x, int)`` check as 1; each rule
here refuses bools where a count or a number is meant, and refuses anything but a bool where a flag is meant
(``weight_stashing="false"`` is a non-empty string, which ``if`` would read as true).
"""

from __future__ import annotations

import dataclasses
import math

from .errors import ConfigError

__all__ = ["is_int", "is_count", "is_number", "is_flag", "setting", "broken_rule", "check_rules", "refuse_unknown",
           "optional", "count", "one_of"]


def is_int(value) -> bool:
    """Whether ``value`` is an ``int`` and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_count(value, minimum: int = 0) -> bool:
    """Whether ``value`` is an ``int`` (not a bool) and at least ``minimum``."""
    return is_int(value) and value >= minimum


def is_number(value, *, finite: bool = True) -> bool:
    """Whether ``value`` is a real number (an ``int`` or ``float``, not a bool), finite unless ``finite=False``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return not finite or math.isfinite(value)


def is_flag(value) -> bool:
    """Whether ``value`` is ``True`` or ``False`` (not ``"false"``, ``0`` or ``None``)."""
    return isinstance(value, bool)


# ---------------------------------------------------------------- settings declared once
# Each setting of convert(), the trainers and the recipes is one dataclass field made by ``setting``: its default,
# the rule its value must satisfy, and the words of that rule. The API checks it as "name=value <words>"; a recipe
# checks the same field as "section.name: value <words>"; the recipe's sections are built from the same fields.


def setting(default, rule, text: str):
    """A dataclass field whose value must satisfy ``rule`` (a predicate), stated by ``text`` ("must be an int >= 1")."""
    return dataclasses.field(default=default, metadata={"rule": rule, "text": text})


def broken_rule(obj) -> tuple[str, object, str] | None:
    """The first field of the dataclass ``obj`` whose value breaks its rule: (name, value, text); None if none does."""
    for f in dataclasses.fields(obj):
        rule = f.metadata.get("rule")
        if rule is not None and not rule(getattr(obj, f.name)):
            return f.name, getattr(obj, f.name), f.metadata["text"]
    return None


def check_rules(obj) -> None:
    """Raise :class:`~lfnnify.ConfigError` for the first field of ``obj`` that breaks its rule, in the API's words."""
    broken = broken_rule(obj)
    if broken is not None:
        name, value, text = broken
        raise ConfigError(f"{name}={value!r} {text}")


def refuse_unknown(where: str, settings: dict, options) -> None:
    """Raise :class:`~lfnnify.ConfigError` naming every key of ``settings`` that is not a field of the dataclass
    ``options``, with the fields it takes."""
    names = [f.name for f in dataclasses.fields(options)]
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise ConfigError(f"{where} got unknown setting{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))}; it takes {', '.join(names)}")


def optional(rule):
    """``rule``, or None."""
    return lambda v: v is None or rule(v)


def count(minimum: int):
    return lambda v: is_count(v, minimum)


def one_of(*choices):
    return lambda v: v in choices
