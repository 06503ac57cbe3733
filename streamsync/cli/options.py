"""Command-line pieces every ``streamsync`` command shares: the ``-c/--config`` option and
loading the configuration it names (exit 3, with the file and field, when it is invalid).

The configuration is found the same way by every command: ``-c/--config FILE``, else the
environment variable ``STREAMSYNC_CONFIG``, else ``streamsync.yaml`` in the current directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from streamsync.config import Settings, load_settings
from streamsync.errors import ConfigError, ExitCode

#: Environment variable naming the configuration file when ``-c/--config`` is not given.
CONFIG_ENV = "STREAMSYNC_CONFIG"
#: The configuration file looked for in the current directory when neither is given.
DEFAULT_CONFIG = Path("streamsync.yaml")


class ConfigMissingError(click.ClickException):
    """Raised when no configuration file is named and none is in the current directory."""

    exit_code = ExitCode.CONFIG_INVALID


def _resolve_config(_ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path:
    if value is not None:
        return value
    if DEFAULT_CONFIG.is_file():
        return DEFAULT_CONFIG
    raise ConfigMissingError(
        f"no configuration file: name one with -c/--config FILE or the environment variable"
        f" {CONFIG_ENV}, or run in a directory holding {DEFAULT_CONFIG}"
        f" ({Path.cwd() / DEFAULT_CONFIG} does not exist)"
    )


config_option = click.option(
    "-c",
    "--config",
    "config_path",
    envvar=CONFIG_ENV,
    show_envvar=True,
    callback=_resolve_config,
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"The streamsync YAML configuration file (default: ./{DEFAULT_CONFIG}).",
)


def load_or_exit(config_path: Path) -> Settings:
    """The validated settings, or the problems on stderr and exit code 3."""
    try:
        return load_settings(config_path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(ExitCode.CONFIG_INVALID)
