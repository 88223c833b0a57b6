"""Checkpoints: save and load a converted model and its trainer, export it back, read pretrained weights.

Public here: :func:`save`, :func:`load`, :func:`export`, :func:`load_pretrained`, :func:`read_trainer_state`.
How the folder lies on disk (versions, the pointer, locks) is ``store``; what its files hold is ``files``.
"""

from .api import export, load, load_pretrained, read_trainer_state, save

__all__ = ["save", "load", "export", "load_pretrained", "read_trainer_state"]
