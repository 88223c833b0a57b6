"""lfnnify: convert any VGG/ResNet/timm model into a leader-follower network trained with local errors."""

from .convert import convert
from .errors import CheckpointError, CutError, TraceError
from .model import LFNNModel, LocalLosses
from .plan import BlockInfo, Plan, plan

__version__ = "0.1.0"

__all__ = [
    "convert",
    "plan",
    "Plan",
    "BlockInfo",
    "LFNNModel",
    "LocalLosses",
    "CutError",
    "TraceError",
    "CheckpointError",
]
