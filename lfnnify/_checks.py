"""The small value rules every knob check uses: a count is an int and not a bool, a number is real and finite.

``True`` is an ``int`` in Python, so ``blocks=True`` would pass an ``isinstance(x, int)`` check as 1; each rule
here refuses bools where a count or a number is meant, and refuses anything but a bool where a flag is meant
(``weight_stashing="false"`` is a non-empty string, which ``if`` would read as true).
"""

from __future__ import annotations

import math

__all__ = ["is_int", "is_count", "is_number", "is_flag"]


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
