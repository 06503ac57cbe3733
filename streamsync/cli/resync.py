"""``streamsync resync``: start a resync epoch, and finish it once the re-snapshot is applied."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import redis

from streamsync import connection, resync
from streamsync.cli.options import config_option, load_or_exit
from streamsync.errors import ExitCode, LegacyLayoutError, ResyncError


@click.command("resync")
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
    "--force",
    is_flag=True,
    help="With --finish: finish even when the new epoch rewrote nothing (removes every row).",
)
@click.option(
    "--wait-s",
    default=600.0,
    show_default=True,
    type=float,
    help="With --finish: how long to wait for the workers to catch up.",
)
def resync_command(  # noqa: PLR0917 (click passes every option)
    config_path: Path,
    tables: tuple[str, ...],
    all_tables: bool,
    finish: bool,
    force: bool,
    wait_s: float,
) -> None:
    """Let a re-snapshot overwrite cached rows (after a database restore or a new slot).

    Step 1, before capture starts over: `streamsync resync --table public.users` starts a new
    epoch: every change captured from now on overwrites what is cached, whatever its position.
    Step 2, once the workers applied the re-snapshot: `streamsync resync --table public.users
    --finish` removes the cached rows the re-snapshot did not rewrite. It refuses while no
    entry was captured since step 1, or when entries captured since are dead letters (their
    rows would be removed): --force finishes anyway.
    """
    settings = load_or_exit(config_path)
    if all_tables == bool(tables):
        raise click.UsageError("name tables with --table, or use --all")
    if force and not finish:
        raise click.UsageError("--force applies to --finish")
    chosen = list(settings.rules_by_table) if all_tables else list(tables)
    client = connection.server_or_cluster(settings.redis)
    # the rows to sweep live in the target, when the cache has a Redis of its own
    target = None if settings.target is None else connection.server_or_cluster(settings.target)
    try:
        if finish:
            for table in chosen:
                removed = resync.finish(client, settings, table, wait_s, force=force, target=target)
                click.echo(f"{table}: finished, {removed} row(s) not in the re-snapshot removed")
        else:
            for mark in resync.start(client, settings, chosen):
                click.echo(
                    f"{mark.table}: epoch {mark.epoch} on {mark.stream}, for entries after"
                    f" {mark.after_id}"
                )
            click.echo(
                "now start capture over (new slot, or the restored database): its snapshot"
                " overwrites the cache; then run this again with --finish"
            )
    except LegacyLayoutError as exc:
        click.echo(f"resync: {exc}", err=True)
        sys.exit(ExitCode.MIGRATION_NEEDED)
    except ResyncError as exc:
        click.echo(f"resync: {exc}", err=True)
        sys.exit(ExitCode.FAILURE)
    except redis.RedisError as exc:
        click.echo(f"resync: redis: {exc}", err=True)
        sys.exit(ExitCode.FAILURE)
    finally:
        client.close()
        if target is not None:
            target.close()
