"""The ``lesskv`` command."""

from lesskv.cli.main import main

__all__ = ["main"]
