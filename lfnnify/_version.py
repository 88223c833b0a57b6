"""The version of lfnnify; a module of its own so that nothing has to import the package for it."""

__version__ = "0.2.0.dev0"
