"""The ``lesskv`` command: :func:`main` builds the parser from one module per command."""

from lesskv.cli.main import main

__all__ = ["main"]
