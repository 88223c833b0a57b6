"""Module-boundary fallback: when a model's own forward() can't be traced, cut between its children.

Many models run their top-level children one after another, yet torch.fx fails on their
forward() because of a shape check or a data-dependent branch written there. Such a model
can still be cut between (and inside) its children. The fallback is taken only when running
the children in sequence gives back, bit for bit, what forward() gives, in eval and in train
mode, on the example input; otherwise the original TraceError is raised with the reason.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import TraceError

__all__ = ["ChildSequence", "sequential_children"]


class ChildSequence(nn.Module):
    """Runs ``model``'s direct children in registration order, sharing them (no copy).

    Children keep their names, so every module path, parameter name and cut name is the
    original model's, and weights go back into the original architecture unchanged.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in model.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        self.train(model.training)

    def forward(self, x):
        for child in self.children():
            x = child(x)
        return x


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return False


def _mismatch(model: nn.Module, x: torch.Tensor, *, training: bool) -> str | None:
    """Why running the children in sequence differs from ``model(x)``, or None when it doesn't."""
    # copies: train mode updates BatchNorm statistics, which must not touch the user's model
    original = copy.deepcopy(model).train(training)
    sequence = ChildSequence(copy.deepcopy(model)).train(training)
    if training and x.shape[0] < 2:  # BatchNorm needs two samples in train mode
        x = torch.cat([x, x.flip(0) + 0.5])
    outputs = []
    devices = [x.device] if x.device.type == "cuda" else []  # leave the user's random state as it was
    for net in (original, sequence):
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(0)  # dropout draws the same masks in both runs
            try:
                outputs.append(net(x))
            except Exception as exc:  # noqa: BLE001 - the reason is reported, not swallowed
                who = "forward()" if net is original else "the children in sequence"
                return f"{who} failed in {'train' if training else 'eval'} mode: {type(exc).__name__}: {exc}"
    if not _same(*outputs):
        mode = "train" if training else "eval"
        return f"the children in sequence compute something else than forward() in {mode} mode"
    return None


def sequential_children(model: nn.Module, x: torch.Tensor, error: TraceError) -> ChildSequence:
    """A :class:`ChildSequence` of ``model`` when it reproduces ``model(x)``; else raise ``error``, explained."""
    names = [name for name, _ in model.named_children()]
    reason = "it has fewer than two children" if len(names) < 2 else None
    reason = reason or _mismatch(model, x, training=False) or _mismatch(model, x, training=True)
    if reason is not None:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise TraceError(
            f"{error} lfnnify also tried cutting at module boundaries, running the top-level children "
            f"({shown}) one after another, but {reason.rstrip('.')}."
        ) from error.__cause__
    return ChildSequence(model)
