"""The application around the library: the command line, ``lfnnify train`` with its recipes, the model zoo, the
demo, and the hosts testbed (network namespaces on one machine).

Public here: :func:`main`, the command line (``python -m lfnnify``).
"""

from .cli import main

__all__ = ["main"]
