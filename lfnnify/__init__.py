"""lfnnify: convert any VGG/ResNet/timm model into a leader-follower network trained with local errors.

The public names below load on first use, so ``import lfnnify`` (and ``lfnnify --help``) stays fast and
``lfnnify.convert`` never imports the pipeline's distributed code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from . import errors as _errors
from ._version import __version__
from .errors import *  # noqa: F403 - every error type is public

_LAZY = {
    "convert": "surgery",
    "plan": "surgery",
    "Plan": "surgery",
    "BlockInfo": "surgery",
    "LFNNModel": "surgery",
    "LocalLosses": "surgery",
    "Trainer": "training",
    "PipelineTrainer": "pipeline",
    "save": "checkpoint",
    "load": "checkpoint",
    "export": "checkpoint",
    "load_pretrained": "checkpoint",
    "read_trainer_state": "checkpoint",
    "plot_leadership": "plots",
}

__all__ = ["__version__", *_LAZY, *_errors.__all__]

if TYPE_CHECKING:  # what type checkers and editors see; at run time each name loads on first use (below)
    from .checkpoint import export, load, load_pretrained, read_trainer_state, save  # noqa: F401
    from .pipeline import PipelineTrainer  # noqa: F401
    from .plots import plot_leadership  # noqa: F401
    from .surgery import BlockInfo, LFNNModel, LocalLosses, Plan, convert, plan  # noqa: F401
    from .training import Trainer  # noqa: F401

def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lfnnify' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
