"""The pipeline: one block per process or GPU over torch.distributed, started by torchrun.

Public here: :class:`PipelineTrainer`. This is the only folder that imports ``torch.distributed``: converting,
saving and one-device training never load it.
"""

from .trainer import PipelineTrainer, StageTiming

__all__ = ["PipelineTrainer", "StageTiming"]
