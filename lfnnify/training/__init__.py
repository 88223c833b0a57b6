"""Training a converted model on one device: the settings, a block's update and step, evaluation, the trainer.

Public here: :class:`Trainer`. The other modules are shared with the pipeline (``lfnnify.pipeline``), which
trains the same blocks with the same step, one block per process.
"""

from .trainer import Trainer

__all__ = ["Trainer"]
