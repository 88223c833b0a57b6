"""The application around the library: the command line, ``lfnnify train`` with its recipes, the model zoo, the
demo, and the hosts testbed (hosts on one machine that share nothing but their link).

Public here: :func:`main` (the command line, ``python -m lfnnify``); what scripts and benchmarks use of it:
:func:`create_model` (timm or ``torchvision/<name>`` models by name), :func:`load_recipe` and
:func:`builtin_recipes` (the recipes shipped in the package), the testbed
(:class:`Hosts`, :class:`TestbedError`, :func:`missing`, :func:`parse_rate`) and :func:`cpu_name`, :func:`status_bytes`
(what a result file says of the machine). Every name loads on first use, so the command line starts fast and the
testbed's scripts (``scripts/hosts.py``) never import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["main", "create_model", "load_recipe", "builtin_recipes", "Hosts", "TestbedError", "missing", "parse_rate",
           "cpu_name", "status_bytes"]
_HOMES = {"main": "cli", "create_model": "zoo", "load_recipe": "recipes", "builtin_recipes": "recipes",
          "Hosts": "testbed", "TestbedError": "testbed", "missing": "testbed", "parse_rate": "testbed",
          "cpu_name": "machine", "status_bytes": "machine"}

if TYPE_CHECKING:
    from .cli import main  # noqa: F401
    from .machine import cpu_name, status_bytes  # noqa: F401
    from .recipes import builtin_recipes, load_recipe  # noqa: F401
    from .testbed import Hosts, TestbedError, missing, parse_rate  # noqa: F401
    from .zoo import create_model  # noqa: F401


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'lfnnify.app' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value
