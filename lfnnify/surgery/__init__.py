"""Model surgery: trace a model, choose where to cut it, build the blocks and their heads.

Public here: :func:`convert`, :func:`plan` (with :class:`Plan` and :class:`BlockInfo`) and the converted model,
:class:`LFNNModel` (with :class:`LocalLosses`). The other modules are this folder's machinery.
"""

from .conversion import convert
from .model import LFNNModel, LocalLosses
from .planning import BlockInfo, Plan, plan

__all__ = ["convert", "plan", "Plan", "BlockInfo", "LFNNModel", "LocalLosses"]
