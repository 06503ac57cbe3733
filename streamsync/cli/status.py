"""``streamsync status``: collect, judge and print the report (streamsync.status), once or
refreshed in place."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import redis
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from streamsync import connection
from streamsync.cli.options import config_option, load_or_exit
from streamsync.config import Settings
from streamsync.errors import ExitCode
from streamsync.functions import Client
from streamsync.status import Thresholds, dumps, render, run_once, to_document

#: Options given to the connection: fail fast on an unreachable host.
CONNECT_TIMEOUT_S = 5.0


def _scrub(text: str, settings: Settings) -> str:
    """``text`` with the passwords masked, should an error message ever echo one (the URL never
    holds it: RedisSettings moves it to ``password``)."""
    for section in (settings.redis, settings.target):
        password = None if section is None else section.password
        if password is not None and password.get_secret_value():
            text = text.replace(password.get_secret_value(), "***")
    return text


def _console() -> Console:
    console = Console()
    if not console.is_terminal:
        # piped or captured: wide enough that the tables do not wrap every cell
        console = Console(width=max(console.width, 160))
    return console


@click.command("status")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (keys sorted).")
@click.option("--watch", is_flag=True, help="Refresh in place every --interval-s until Ctrl-C.")
@click.option(
    "--interval-s",
    default=2.0,
    show_default=True,
    type=click.FloatRange(min=0.05),
    help="With --watch: seconds between refreshes.",
)
@click.option(
    "--max-lag-s",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Unhealthy when entries wait and the cache is behind by more than this many seconds.",
)
@click.option(
    "--max-pending-age-s",
    default=None,
    type=click.FloatRange(min=0),
    help="Unhealthy when the oldest pending entry is older (default: 2 x worker.claim_idle_ms).",
)
@click.option("--iterations", type=click.IntRange(min=1), hidden=True)
def status_command(
    *,
    config_path: Path,
    as_json: bool,
    watch: bool,
    interval_s: float,
    max_lag_s: float,
    max_pending_age_s: float | None,
    iterations: int | None,
) -> None:
    """Show the streams, the consumer group, the workers' counters and the health.

    Exit 0 when healthy, 2 when something is wrong (each problem listed), 1 when Redis cannot
    be reached, 3 when the configuration is invalid, 64 on a usage error.
    """
    settings = load_or_exit(config_path)
    thresholds = Thresholds(max_lag_s, max_pending_age_s)
    client = connection.server_or_cluster(
        settings.redis,
        socket_connect_timeout=min(CONNECT_TIMEOUT_S, settings.redis.socket_timeout_s),
    )
    target = None
    if settings.target is not None:
        target = connection.server_or_cluster(
            settings.target,
            socket_connect_timeout=min(CONNECT_TIMEOUT_S, settings.target.socket_timeout_s),
        )
    try:
        if watch:
            sys.exit(
                _watch(
                    client,
                    target,
                    settings,
                    thresholds=thresholds,
                    as_json=as_json,
                    interval_s=interval_s,
                    iterations=iterations,
                )
            )
        sys.exit(_once(client, target, settings, thresholds, as_json))
    finally:
        client.close()
        if target is not None:
            target.close()


def _unreachable(settings: Settings, exc: redis.RedisError) -> str:
    where = connection.describe(settings.redis)
    message = " ".join(str(exc).split()) or type(exc).__name__
    return _scrub(f"status: cannot read redis at {where}: {message}", settings)


def _once(
    client: Client,
    target: Client | None,
    settings: Settings,
    thresholds: Thresholds,
    as_json: bool,
) -> int:
    try:
        report, found = run_once(client, settings, thresholds, target)
    except redis.RedisError as exc:
        click.echo(_unreachable(settings, exc), err=True)
        return ExitCode.FAILURE
    if as_json:
        click.echo(dumps(to_document(report, thresholds, found)))
    else:
        _console().print(render(report, found))
    return ExitCode.UNHEALTHY if found else ExitCode.OK


def _watch(
    client: Client,
    target: Client | None,
    settings: Settings,
    *,
    thresholds: Thresholds,
    as_json: bool,
    interval_s: float,
    iterations: int | None,
) -> int:
    """Refresh every interval until Ctrl-C (exit 0) or ``iterations`` (the last run's code)."""
    code: int = ExitCode.OK
    done = 0
    console = _console()
    live = None if as_json else Live(console=console, auto_refresh=False, transient=False)
    try:
        with contextlib.ExitStack() as stack:
            if live is not None:
                stack.enter_context(live)
            while True:
                try:
                    report, found = run_once(client, settings, thresholds, target)
                except redis.RedisError as exc:
                    # keep watching through a Redis restart
                    code = ExitCode.FAILURE
                    message = _unreachable(settings, exc)
                    view: RenderableType = Text(message, style="bold red")
                    doc: Mapping[str, Any] = {"error": message}
                else:
                    code = ExitCode.UNHEALTHY if found else ExitCode.OK
                    if live is None:
                        doc = to_document(report, thresholds, found)
                    else:
                        view = render(report, found)
                if live is None:
                    click.echo(dumps(doc, indent=None))
                else:
                    stamp = time.strftime("%H:%M:%S")
                    live.update(
                        Group(Text(f"{stamp}, every {interval_s:g}s, Ctrl-C to stop"), view),
                        refresh=True,
                    )
                done += 1
                if iterations is not None and done >= iterations:
                    return code
                time.sleep(interval_s)
    except KeyboardInterrupt:
        return ExitCode.OK
