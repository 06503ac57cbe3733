"""The ``streamsync`` group: logging, the version, and every command."""

from __future__ import annotations

import logging
import sys

import click

from streamsync import __version__
from streamsync.cli.acl import acl_command
from streamsync.cli.check_config import check_config_command
from streamsync.cli.dlq import dlq_group
from streamsync.cli.embedded import capture_command, demo_command
from streamsync.cli.resync import resync_command
from streamsync.cli.run import run_command
from streamsync.cli.status import status_command

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="streamsync")
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Logging threshold (logs go to stderr).",
)
def cli(log_level: str) -> None:
    """Keep Redis caches in sync with a database through Debezium change data capture."""
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)


for _command in (
    check_config_command,
    run_command,
    capture_command,
    demo_command,
    resync_command,
    acl_command,
    dlq_group,
    status_command,
):
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="streamsync")
