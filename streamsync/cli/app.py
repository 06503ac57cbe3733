"""The ``streamsync`` group and its commands: parse, call, print."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
import redis
from prometheus_client import CollectorRegistry

from streamsync import __version__, connection
from streamsync import resync as resync_mod
from streamsync.acl import acl_setuser
from streamsync.config import redact_url
from streamsync.dlq import dlq_group
from streamsync.embedded.capture import exit_now, run_capture
from streamsync.embedded.demo import DemoOptions, run_demo
from streamsync.errors import ConfigError, ExitCode, ResyncError
from streamsync.metrics import DEFAULT_HOST, WorkerMetrics, serve
from streamsync.options import config_option, load_or_exit
from streamsync.status import status_command
from streamsync.worker import run_worker

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_load = load_or_exit


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


@cli.command("check-config")
@config_option
def check_config(config_path: Path) -> None:
    """Validate a configuration file and summarise it; exit non-zero if it is invalid."""
    settings = _load(config_path)
    source = settings.source
    streams = ", ".join(source.streams) if source.streams else f"prefix {source.stream_prefix!r}"
    click.echo(f"{config_path}: ok")
    click.echo(f"  redis: {redact_url(settings.redis.url)}")
    click.echo(f"  streams: {streams} (group {source.group}, format {source.format.value})")
    for rule in settings.rules:
        detail = f"{rule.type.value} " if rule.type else ""
        extras = [
            f"{name} {value}"
            for name in ("member", "score", "value", "max_len", "where")
            if (value := getattr(rule, name)) is not None
        ]
        if rule.ttl_s:
            extras.append(f"ttl {rule.ttl_s}s")
        more = f" ({', '.join(extras)})" if extras else ""
        click.echo(f"  {rule.table} -> {rule.mode.value} {detail}{rule.key}{more}")


@cli.command()
@config_option
@click.option("--consumer", help="Consumer name in the group (default: <hostname>-<pid>).")
@click.option(
    "--drain",
    is_flag=True,
    help="Exit once every entry is read and acknowledged (catch-up jobs, tests).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    envvar="STREAMSYNC_METRICS_PORT",
    show_envvar=True,
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (default: not served).",
)
@click.option(
    "--metrics-host",
    default=DEFAULT_HOST,
    show_default=True,
    envvar="STREAMSYNC_METRICS_HOST",
    show_envvar=True,
    help="Address the metrics endpoint binds; 0.0.0.0 serves every interface (containers).",
)
def run(
    config_path: Path,
    consumer: str | None,
    drain: bool,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Consume the configured streams and apply every change to Redis."""
    settings = _load(config_path)
    if metrics_port is None:
        sys.exit(run_worker(settings, consumer, drain=drain))
    registry = CollectorRegistry()
    observer = WorkerMetrics(registry)
    try:
        server = serve(settings, registry, host=metrics_host, port=metrics_port)
    except OSError as exc:
        click.echo(f"cannot serve metrics on {metrics_host}:{metrics_port}: {exc}", err=True)
        sys.exit(ExitCode.FAILURE)
    try:
        code = run_worker(settings, consumer, drain=drain, observer=observer)
    finally:
        server.close()
    sys.exit(code)


@cli.command()
@config_option
def capture(config_path: Path) -> None:
    """Capture PostgreSQL changes into Redis Streams with the embedded Debezium engine.

    Reads Debezium Server's application.properties (capture.properties) and writes every change
    as Debezium Server's Redis sink does, into redis.url, until SIGTERM / Ctrl-C. Needs the
    embedded extra (pip install 'streamsync[embedded]') and Java 17 or newer.
    """
    settings = _load(config_path)
    try:
        code = run_capture(settings)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(ExitCode.CONFIG_INVALID)
    exit_now(code)


@cli.command()
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
def demo(
    postgres_url: str | None, redis_url: str | None, pace_s: float, once: bool, keep: bool
) -> None:
    """A first look: PostgreSQL -> Debezium -> Redis Streams -> streamsync -> Redis, live.

    Starts throw-away PostgreSQL and Redis servers from the local binaries (or uses the given
    URLs), creates a demo users table, runs capture and a worker, makes a few changes and shows
    each row next to its Redis key. Ctrl-C stops and removes everything it started. Needs the
    embedded extra and Java 17 or newer.
    """
    options = DemoOptions(postgres_url, redis_url, pace_s, once, keep)
    sys.exit(run_demo(options))


@cli.command()
@config_option
@click.option(
    "--table",
    "tables",
    multiple=True,
    metavar="SCHEMA.TABLE",
    help="A table to resync (repeatable).",
)
@click.option("--all", "all_tables", is_flag=True, help="Every table the rules map.")
@click.option(
    "--finish",
    is_flag=True,
    help="Once workers applied the re-snapshot: remove the rows it did not rewrite.",
)
@click.option(
    "--wait-s",
    default=600.0,
    show_default=True,
    type=float,
    help="With --finish: how long to wait for the workers to catch up.",
)
def resync(
    config_path: Path, tables: tuple[str, ...], all_tables: bool, finish: bool, wait_s: float
) -> None:
    """Let a re-snapshot overwrite cached rows (after a database restore or a new slot).

    Step 1, before capture starts over: `streamsync resync --table public.users` starts a new
    epoch: every change captured from now on overwrites what is cached, whatever its position.
    Step 2, once the workers applied the re-snapshot: `streamsync resync --table public.users
    --finish` removes the cached rows the re-snapshot did not rewrite.
    """
    settings = _load(config_path)
    if all_tables == bool(tables):
        raise click.UsageError("name tables with --table, or use --all")
    chosen = list(settings.rules_by_table) if all_tables else list(tables)
    client = connection.client(settings.redis)
    try:
        if finish:
            for table in chosen:
                removed = resync_mod.finish(client, settings, table, wait_s)
                click.echo(f"{table}: finished, {removed} row(s) not in the re-snapshot removed")
        else:
            for mark in resync_mod.start(client, settings, chosen):
                click.echo(
                    f"{mark.table}: epoch {mark.epoch} on {mark.stream}, for entries after"
                    f" {mark.after_id}"
                )
            click.echo(
                "now start capture over (new slot, or the restored database): its snapshot"
                " overwrites the cache; then run this again with --finish"
            )
    except ResyncError as exc:
        click.echo(f"resync: {exc}", err=True)
        sys.exit(ExitCode.FAILURE)
    except redis.RedisError as exc:
        click.echo(f"resync: redis: {exc}", err=True)
        sys.exit(ExitCode.FAILURE)
    finally:
        client.close()


@cli.command()
@config_option
@click.option("--user", default=None, help="The ACL user name (default: streamsync).")
@click.option(
    "--read-only",
    is_flag=True,
    help="The monitoring user `streamsync status` needs instead of the worker's.",
)
def acl(config_path: Path, user: str | None, read_only: bool) -> None:
    """Print the least-privilege Redis ACL for this configuration (ACL SETUSER ...).

    The worker's user may read and write only the configured streams, their dead letters,
    streamsync's own records and the rules' keys, with only the commands the worker and its
    Functions library send. Replace <password> before running it in redis-cli.
    """
    settings = _load(config_path)
    default = "streamsync-status" if read_only else "streamsync"
    click.echo(acl_setuser(settings, user or default, read_only=read_only))


cli.add_command(dlq_group)
cli.add_command(status_command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="streamsync")
