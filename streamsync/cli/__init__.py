"""The ``streamsync`` command line: click commands and the options they share, nothing else.

Each command parses its options, calls a plain module that does the work, and prints the result;
``app`` gathers them into the ``streamsync`` group. ``main`` is the console script (and
``python -m streamsync``).
"""

from streamsync.cli.app import cli, main

__all__ = ["cli", "main"]
