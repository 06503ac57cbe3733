"""``streamsync run``: the worker, with its metrics endpoint when asked."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from prometheus_client import CollectorRegistry

from streamsync.cli.options import config_option, load_or_exit
from streamsync.errors import ExitCode
from streamsync.metrics import DEFAULT_HOST, WorkerMetrics, serve
from streamsync.worker import run_worker


@click.command("run")
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
def run_command(
    config_path: Path,
    consumer: str | None,
    drain: bool,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Consume the configured streams and apply every change to Redis."""
    settings = load_or_exit(config_path)
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
