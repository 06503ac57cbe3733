"""The ``streamsync`` group: logging, the version, the exit codes, and every command."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import click

from streamsync import __version__
from streamsync.cli.acl import acl_command
from streamsync.cli.check_config import check_config_command
from streamsync.cli.dlq import dlq_group
from streamsync.cli.embedded import capture_command, demo_command
from streamsync.cli.migrate import migrate_command
from streamsync.cli.options import CONFIG_ENV, DEFAULT_CONFIG
from streamsync.cli.resync import resync_command
from streamsync.cli.run import run_command
from streamsync.cli.status import status_command
from streamsync.errors import ExitCode

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: What each exit code means, for ``--help`` (README.md has the same table).
EXIT_CODE_HELP: dict[ExitCode, str] = {
    ExitCode.OK: "done (status: healthy)",
    ExitCode.FAILURE: "unexpected error, or Redis (or PostgreSQL) could not be reached",
    ExitCode.UNHEALTHY: "status found a problem; dlq replay left dead letters in place",
    ExitCode.CONFIG_INVALID: "the configuration file is missing, unreadable or invalid",
    ExitCode.LIBRARY_INCOMPATIBLE: "Redis holds a newer, incompatible Functions library",
    ExitCode.MIGRATION_NEEDED: "Redis holds 1.x bookkeeping: stop 1.x workers, run migrate",
    ExitCode.WORKERS_RUNNING: "migrate: workers seem to run (stop them, or --force)",
    ExitCode.USAGE: "usage error: unknown command or option, missing or bad argument",
    ExitCode.INTERRUPTED: "a second SIGTERM/SIGINT cut the graceful stop short",
}

EPILOG = "\n".join(
    [
        "\b",
        f"The configuration: -c/--config FILE, else ${CONFIG_ENV}, else ./{DEFAULT_CONFIG}.",
        "",
        "\b",
        "Exit codes:",
        *(f"  {int(code):<4} {meaning}" for code, meaning in EXIT_CODE_HELP.items()),
    ]
)


@contextlib.contextmanager
def _usage_exit_code() -> Iterator[None]:
    try:
        yield
    except click.UsageError as exc:
        # click's 2 would be mistaken for status's "unhealthy" by a script or a probe
        exc.exit_code = ExitCode.USAGE
        raise


class StreamsyncGroup(click.Group):
    """The ``streamsync`` group: a usage error anywhere below it (an unknown command or option,
    a missing or bad argument) exits with ExitCode.USAGE."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with _usage_exit_code():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _usage_exit_code():
            return super().invoke(ctx)


@click.group(
    cls=StreamsyncGroup,
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"]},
)
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
    migrate_command,
    acl_command,
    dlq_group,
    status_command,
):
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="streamsync")
