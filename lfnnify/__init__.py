"""lfnnify: convert any VGG/ResNet/timm model into a leader-follower network trained with local errors."""

__version__ = "0.1.0"

from .checkpoint import export, load, load_pretrained, read_trainer_state, save  # noqa: E402
from .convert import convert  # noqa: E402
from .errors import CheckpointError, CutError, TraceError  # noqa: E402
from .model import LFNNModel, LocalLosses  # noqa: E402
from .pipeline import PipelineTrainer  # noqa: E402
from .plan import BlockInfo, Plan, plan  # noqa: E402
from .plots import plot_leadership  # noqa: E402
from .trainer import Trainer  # noqa: E402

__all__ = [
    "convert",
    "plan",
    "Plan",
    "BlockInfo",
    "LFNNModel",
    "LocalLosses",
    "Trainer",
    "PipelineTrainer",
    "save",
    "load",
    "export",
    "load_pretrained",
    "read_trainer_state",
    "plot_leadership",
    "CutError",
    "TraceError",
    "CheckpointError",
]
