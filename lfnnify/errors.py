"""Exception types raised by lfnnify; each message names the value, the rule and the fix."""

from __future__ import annotations

__all__ = ["CutError", "TraceError", "CheckpointError"]


class CutError(ValueError):
    """A requested cut (``blocks=`` or ``cuts=``) is impossible for this model."""


class TraceError(TypeError):
    """torch.fx could not trace the model; the message names the module that failed."""


class CheckpointError(ValueError):
    """A file or folder is not an lfnnify checkpoint, or it is damaged."""
