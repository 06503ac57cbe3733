"""Command-line pieces every ``streamsync`` command shares: the ``-c/--config`` option and
loading the configuration it names (exit 3, with the file and field, when it is invalid)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from streamsync.config import Settings, load_settings
from streamsync.errors import ConfigError, ExitCode

config_option = click.option(
    "-c",
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The streamsync YAML configuration file.",
)


def load_or_exit(config_path: Path) -> Settings:
    """The validated settings, or the problems on stderr and exit code 3."""
    try:
        return load_settings(config_path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(ExitCode.CONFIG_INVALID)
