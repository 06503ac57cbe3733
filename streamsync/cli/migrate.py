"""``streamsync migrate``: convert library 1.x bookkeeping into 2.0 records, with every worker
stopped."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import NoReturn

import click
import redis

from streamsync import migrate
from streamsync.cli.options import config_option, load_or_exit
from streamsync.config import Settings
from streamsync.errors import ExitCode, LibraryIncompatibleError, MigrationError
from streamsync.worker.session import Sessions, open_sessions

#: How often progress is printed.
PROGRESS_EVERY_S = 2.0


class _Progress:
    """Prints where a migration is to stderr, every few seconds and when a phase ends."""

    def __init__(self) -> None:
        self.phase = ""
        self.printed = 0.0

    def __call__(self, phase: str, report: migrate.Report) -> None:
        now = time.monotonic()
        if phase == self.phase and now - self.printed < PROGRESS_EVERY_S:
            return
        self.phase, self.printed = phase, now
        click.echo(
            f"{phase}: {sum(report.converted.values())} records converted,"
            f" {report.lists} lists, {report.deleted} 1.x keys deleted",
            err=True,
        )


def _fail(message: str, code: ExitCode) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(code)


def _run(sessions: Sessions, settings: Settings, *, dry_run: bool, force: bool) -> migrate.Report:
    target = sessions.target.client
    if not force and not dry_run:
        live = migrate.live_workers(sessions.streams.client, target, settings)
        if live:
            _fail(
                "workers seem to run; stop every worker (1.x and 2.0) first, or pass --force once"
                " sure none does:\n  " + "\n  ".join(live),
                ExitCode.WORKERS_RUNNING,
            )
    return migrate.migrate(
        target, settings, streams=sessions.streams.client, dry_run=dry_run, progress=_Progress()
    )


@click.command("migrate")
@config_option
@click.option(
    "--dry-run",
    is_flag=True,
    help="Count what would be converted; change nothing (workers may run meanwhile).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Run although workers seem to run (liveness marks, connections named streamsync:...).",
)
def migrate_command(config_path: Path, dry_run: bool, force: bool) -> None:
    """Convert library 1.x bookkeeping (position records, placement records, indexes, list
    order sets) into 2.0 records, then delete it.

    Stop every worker first (1.x and 2.0); capture may go on. A 2.0 worker meeting 1.x
    bookkeeping exits 5 until this has run. It resumes where a run cut short stopped, and a
    second run changes nothing.
    """
    settings = load_or_exit(config_path)
    try:
        sessions = open_sessions(
            settings,
            client_name=migrate.MIGRATE_CLIENT,
            streams_timeout_s=settings.redis.socket_timeout_s,
        )
    except redis.RedisError as exc:
        _fail(f"migrate: redis: {exc}", ExitCode.FAILURE)
    try:
        report = _run(sessions, settings, dry_run=dry_run, force=force)
    except MigrationError as exc:
        _fail(f"migrate: {exc}", ExitCode.FAILURE)
    except LibraryIncompatibleError as exc:
        _fail(f"migrate: {exc}", ExitCode.LIBRARY_INCOMPATIBLE)
    except redis.RedisError as exc:
        _fail(f"migrate: redis: {exc} (run it again: it resumes)", ExitCode.FAILURE)
    except KeyboardInterrupt:
        _fail("migrate: interrupted (run it again: it resumes)", ExitCode.INTERRUPTED)
    finally:
        sessions.close()
    if dry_run:
        click.echo("dry run: nothing changed; a run would convert:")
    click.echo(report.summary())
    if not dry_run:
        click.echo("done: the cache's Redis is marked layout 2; start the 2.0 workers")
