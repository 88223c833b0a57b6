"""Exception types raised by lfnnify on purpose; each message names the value, the rule and the fix.

Every one derives from :class:`LfnnifyError`, so ``except lfnnify.LfnnifyError`` catches exactly the
errors lfnnify means to raise (the command line prints those as one line; anything else is a bug and
keeps its traceback). Each also derives from the built-in type a user would expect
(``ValueError``, ``TypeError``, ``FileNotFoundError``, ...).
"""

from __future__ import annotations

__all__ = [
    "LfnnifyError",
    "ConfigError",
    "CutError",
    "TraceError",
    "CheckpointError",
    "RecipeError",
    "DataError",
    "DataNotFoundError",
    "LabelError",
    "NonFiniteLossError",
    "PipelineError",
]


class LfnnifyError(Exception):
    """Base of every error lfnnify raises on purpose."""


class ConfigError(LfnnifyError, ValueError, TypeError):
    """An argument or knob is wrong, in value or in type (``blocks=0``, ``optimizer=SGD(...)``)."""


class CutError(ConfigError):
    """A requested cut (``blocks=`` or ``cuts=``) is impossible for this model."""


class RecipeError(ConfigError):
    """A recipe is invalid; the message names the key path, the value and the rule."""


class LabelError(ConfigError):
    """Training labels do not fit the model: wrong dtype, shape, or a class outside ``[0, num_classes)``."""


class TraceError(LfnnifyError, ValueError):
    """torch.fx could not trace the model; the message names the module that failed and the fix.

    A ``ValueError``, like ``torch.fx.proxy.TraceError``: the model given cannot be traced as it is.
    """


class CheckpointError(LfnnifyError, ValueError):
    """A file or folder is not an lfnnify checkpoint, or it is damaged."""


class DataError(LfnnifyError, ValueError):
    """A dataset's files are damaged or do not fit together."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset, weights file, recipe or run folder is not where the user said it is."""


class NonFiniteLossError(LfnnifyError, FloatingPointError):
    """A block's loss became NaN or infinite; training stopped."""


class PipelineError(LfnnifyError, RuntimeError):
    """A pipeline rank failed or stopped answering; the message names the rank and block."""
