"""Model surgery: trace a model, choose where to cut it, build the blocks and their heads.

Public here: :func:`convert`, :func:`plan` (with :class:`Plan` and :class:`BlockInfo`) and the converted model,
:class:`LFNNModel` (with :class:`LocalLosses`); for tools that survey models, :func:`trace_model` (what torch.fx makes
of a model, with timm's leaf modules), :func:`resolve_num_classes` (the classes its classifier predicts) and
:func:`powersgd_elements` (what torch's PowerSGD hook all-reduces for gradients of given shapes). The other
modules are this folder's machinery. The names load on first use, so that reading convert's settings (``options``)
never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["convert", "plan", "Plan", "BlockInfo", "LFNNModel", "LocalLosses", "trace_model", "resolve_num_classes",
           "powersgd_elements"]
_HOMES = {"convert": "conversion", "plan": "planning", "Plan": "planning", "BlockInfo": "planning",
          "LFNNModel": "model", "LocalLosses": "model", "trace_model": ("trace", "trace"),
          "resolve_num_classes": "facts", "powersgd_elements": "traffic"}

if TYPE_CHECKING:
    from .conversion import convert  # noqa: F401
    from .facts import resolve_num_classes  # noqa: F401
    from .model import LFNNModel, LocalLosses  # noqa: F401
    from .planning import BlockInfo, Plan, plan  # noqa: F401
    from .trace import trace as trace_model  # noqa: F401
    from .traffic import powersgd_elements  # noqa: F401


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'lfnnify.surgery' has no attribute {name!r}")
    module, attr = home if isinstance(home, tuple) else (home, name)
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value
