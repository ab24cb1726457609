"""The package version, in a module of its own so that ``--version`` and checkpoint metadata read it
without importing the package face (and torch with it)."""

__version__ = "0.1.0"
