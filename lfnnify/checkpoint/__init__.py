"""Checkpoints: save and load a converted model and its trainer, export it back, read pretrained weights.

Public here: :func:`save`, :func:`load`, :func:`export`, :func:`load_pretrained`, :func:`read_trainer_state`.
The folder's layout on disk (versions, the pointer, locks) is ``store``; what its files hold is ``files``; the
description every checkpoint carries, checked before use, is ``description``.
"""

from .exporting import export, load_pretrained
from .loading import load
from .saving import save
from .trainer_state import read_trainer_state

__all__ = ["save", "load", "export", "load_pretrained", "read_trainer_state"]
