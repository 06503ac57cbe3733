"""``streamsync dlq list|show|replay|purge``: the dead letters, read, replayed and deleted
(the work is streamsync.dlq's)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click
import redis

from streamsync import connection, deadletter, layout
from streamsync.cli.options import config_option, load_or_exit
from streamsync.deadletter import ID_RE, DeadLetter, as_text, iso_utc
from streamsync.dlq import DeadLetters, Outcome, Replayer, field_json, pretty_json
from streamsync.errors import DlqError, ExitCode, LegacyLayoutError, LibraryIncompatibleError

#: Dead letters shown per stream by ``dlq list`` unless ``--count`` says otherwise.
DEFAULT_COUNT = 10
#: Width of the reason column of ``dlq list``.
REASON_WIDTH = 60


def _fail(message: str, code: int = ExitCode.FAILURE) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(code)


@contextlib.contextmanager
def _session(config_path: Path, command: str) -> Iterator[DeadLetters]:
    """The dead letters of the configuration's Redis; Redis errors end the command with one
    line and exit code 1."""
    settings = load_or_exit(config_path)
    client = connection.server_or_cluster(settings.redis, decode_responses=False, protocol=2)
    target = None
    if settings.target is not None:
        target = connection.server_or_cluster(settings.target, decode_responses=False, protocol=2)
    try:
        yield DeadLetters(client, settings, target)
    except DlqError as exc:
        _fail(f"dlq {command}: {exc}")
    except LibraryIncompatibleError as exc:
        _fail(f"dlq {command}: {exc}", ExitCode.LIBRARY_INCOMPATIBLE)
    except LegacyLayoutError as exc:
        _fail(f"dlq {command}: {exc}", ExitCode.MIGRATION_NEEDED)
    except redis.RedisError as exc:
        _fail(f"dlq {command}: redis: {' '.join(str(exc).split())}")
    finally:
        client.close()
        if target is not None:
            target.close()


def _check_ids(
    _ctx: click.Context, _param: click.Parameter, ids: tuple[str, ...]
) -> tuple[str, ...]:
    return tuple(_check_one(dlq_id) for dlq_id in ids)


def _check_one(dlq_id: str) -> str:
    if not ID_RE.match(dlq_id):
        raise click.BadParameter(f"{dlq_id!r} is not a stream id (<ms>-<seq>)")
    return dlq_id


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


@click.group("dlq", context_settings={"help_option_names": ["-h", "--help"]})
def dlq_group() -> None:
    """Inspect, replay and purge dead letters (<stream>:dlq).

    An entry a worker cannot apply is written to its stream's dead-letter stream with the
    reason, and acknowledged. Fix the cause (often the configuration), then replay it.
    """


@dlq_group.command("list")
@config_option
@click.option(
    "--stream", metavar="STREAM", help="Only this source stream (default: every source stream)."
)
@click.option(
    "--count",
    default=DEFAULT_COUNT,
    show_default=True,
    type=click.IntRange(min=0),
    help="Newest dead letters shown per stream.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_command(config_path: Path, stream: str | None, count: int, as_json: bool) -> None:
    """Per stream: how many dead letters it has, and the newest ones."""
    with _session(config_path, "list") as store:
        streams = [stream] if stream is not None else store.source_streams()
        report = []
        for name in streams:
            dlq = store.check_stream(name)
            letters = store.newest(dlq, count) if count else []
            report.append((name, dlq, store.length(dlq), letters))
    if as_json:
        _echo_json(
            {
                "streams": [
                    {
                        "stream": name,
                        "dlq": dlq,
                        "length": length,
                        "entries": [letter.summary() for letter in letters],
                    }
                    for name, dlq, length, letters in report
                ]
            }
        )
        return
    if not report:
        click.echo("no source streams found")
    for _, dlq, length, letters in report:
        if not length:
            click.echo(f"{dlq}: empty")
            continue
        shown = f", newest {len(letters)}" if letters and len(letters) < length else ""
        click.echo(f"{dlq}: {length} dead letter(s){shown}")
        if not letters:
            continue
        rows = [("DLQ ID", "ORIGINAL ID", "FAILED AT (UTC)", "DELIVERIES", "CONSUMER", "REASON")]
        for letter in letters:
            failed = letter.failed_at_ms
            original = letter.meta.get("id")
            rows.append(
                (
                    as_text(letter.dlq_id),
                    as_text(original) if original is not None else "?",
                    iso_utc(failed) if failed is not None else "?",
                    str(letter.deliveries) if letter.deliveries is not None else "?",
                    letter.consumer,
                    _shorten(letter.problem or letter.reason, REASON_WIDTH),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
            click.echo("  " + "  ".join([*cells, row[-1]]))


@dlq_group.command("show")
@config_option
@click.option(
    "--stream", required=True, metavar="STREAM", help="The source stream (its DLQ is <stream>:dlq)."
)
@click.argument("dlq_id", metavar="ID", callback=lambda ctx, param, value: _check_one(value))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--raw", is_flag=True, help="Print values verbatim, JSON not re-indented.")
def show_command(config_path: Path, stream: str, dlq_id: str, as_json: bool, raw: bool) -> None:
    """One dead letter: its metadata and the original entry's fields."""
    with _session(config_path, "show") as store:
        dlq = store.check_stream(stream)
        letter = store.get(dlq, dlq_id)
        if letter is None:
            raise DlqError(f"no dead letter {dlq_id} in {dlq}")
    pairs = letter.fields if letter.fields is not None else []
    pairs_list = list(zip(pairs[0::2], pairs[1::2], strict=True))
    if as_json:
        data = {"dlq": dlq, **letter.summary()}
        data["entry"] = [field_json(name, value) for name, value in pairs_list]
        if letter.problem is not None:
            raw_pairs = zip(letter.raw[0::2], letter.raw[1::2], strict=False)
            data["raw"] = [field_json(n, v) for n, v in raw_pairs]
        _echo_json(data)
        return
    click.echo(f"dead letter {as_text(letter.dlq_id)} in {dlq}")
    if letter.problem is not None:
        click.echo(f"  ({letter.problem}; its fields as stored:)")
        for raw_name, raw_value in zip(letter.raw[0::2], letter.raw[1::2], strict=False):
            click.echo(f"  {as_text(raw_name)}: {as_text(raw_value)}")
        return
    width = max(len(meta) for meta in deadletter.META_FIELDS) + 1
    for meta in deadletter.META_FIELDS:
        text = as_text(letter.meta[meta])
        if meta == "failed_at_ms" and letter.failed_at_ms is not None:
            text += f" ({iso_utc(letter.failed_at_ms)})"
        click.echo(f"  {(meta + ':').ljust(width)} {text}")
    click.echo(f"original entry, {len(pairs_list)} field/value pair(s):")
    for name, value in pairs_list:
        click.echo(f"  field: {as_text(name)}")
        pretty = None if raw else pretty_json(value)
        if pretty is None:
            click.echo(f"  value: {as_text(value)}")
        else:
            click.echo("  value (JSON, indented):")
            for line in pretty.splitlines():
                click.echo("    " + line)


@dlq_group.command("replay")
@config_option
@click.option(
    "--stream", required=True, metavar="STREAM", help="The source stream (its DLQ is <stream>:dlq)."
)
@click.argument("ids", nargs=-1, metavar="[ID ...]", callback=_check_ids)
@click.option("--all", "all_entries", is_flag=True, help="Every dead letter of the stream.")
@click.option(
    "--direct",
    is_flag=True,
    help="Apply the entries here, as the worker would, instead of re-adding them to the stream.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Re-add entries even when this configuration cannot apply them (not with --direct).",
)
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
def replay_command(  # noqa: PLR0917 (click passes every option)
    config_path: Path,
    stream: str,
    ids: tuple[str, ...],
    all_entries: bool,
    direct: bool,
    force: bool,
    dry_run: bool,
) -> None:
    """Put dead letters back to work, oldest first.

    By default each entry's original fields are re-added verbatim to the source stream (and the
    dead letter deleted, in one transaction) for the workers to apply again; positions make a
    change already applied a no-op. With --direct the entry is decoded, mapped and applied here,
    with the workers' function call, and deleted once applied (or found stale). Entries this
    configuration still cannot apply are left in place with the reason (exit code 2).
    """
    if all_entries == bool(ids):
        raise click.UsageError("name dead-letter ids, or use --all")
    if force and direct:
        raise click.UsageError("--force applies to a replay through the stream, not --direct")
    done = left = 0
    with _session(config_path, "replay") as store:
        dlq = store.check_stream(stream)
        replayer = Replayer(store, stream, force=force)
        if direct and not dry_run:
            # applied where the workers apply, and as they would: never beside 1.x bookkeeping
            layout.claim(store.target, store.settings)
            replayer.library.ensure()
        step: Callable[[DeadLetter, bool], Outcome] = replayer.apply if direct else replayer.requeue
        for letter in store.selected(dlq, ids, all_entries):
            if isinstance(letter, str):
                click.echo(f"{letter}: not in {dlq} (already replayed or purged?)")
                continue
            outcome = step(letter, dry_run)
            original = as_text(letter.meta.get("id", b"?"))
            prefix = f"{as_text(letter.dlq_id)} (entry {original})"
            if outcome.left:
                left += 1
                click.echo(f"{prefix}: left: {outcome.detail}")
            else:
                done += outcome.action != "gone"
                detail = f" ({outcome.detail})" if outcome.detail else ""
                click.echo(f"{prefix}: {outcome.action}{detail}")
    verb = "would replay" if dry_run else "replayed"
    click.echo(f"{stream}: {verb} {done}, left {left} in {dlq}" + (" (dry run)" if dry_run else ""))
    if left:
        sys.exit(ExitCode.UNHEALTHY)


@dlq_group.command("purge")
@config_option
@click.option(
    "--stream", required=True, metavar="STREAM", help="The source stream (its DLQ is <stream>:dlq)."
)
@click.argument("ids", nargs=-1, metavar="[ID ...]", callback=_check_ids)
@click.option("--all", "all_entries", is_flag=True, help="Every dead letter of the stream.")
@click.option(
    "--older-than-s",
    type=click.IntRange(min=0),
    help="Dead letters written more than this many seconds ago.",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
def purge_command(  # noqa: PLR0917 (click passes every option)
    config_path: Path,
    stream: str,
    ids: tuple[str, ...],
    all_entries: bool,
    older_than_s: int | None,
    yes: bool,
    dry_run: bool,
) -> None:
    """Delete dead letters for good: by id, --all, or --older-than-s N."""
    if sum((bool(ids), all_entries, older_than_s is not None)) != 1:
        raise click.UsageError("name dead-letter ids, or use --all, or --older-than-s N")
    with _session(config_path, "purge") as store:
        dlq = store.check_stream(stream)
        if ids:
            found = [i for i in sorted(set(ids)) if store.get(dlq, i) is not None]
            for missing in sorted(set(ids) - set(found)):
                click.echo(f"{missing}: not in {dlq}")
            count, what = len(found), f"{len(found)} dead letter(s) from {dlq}"
        elif all_entries:
            newest = store.newest(dlq, 1)
            count = store.length(dlq)
            what = f"all {count} dead letter(s) of {dlq}"
        else:
            assert older_than_s is not None
            cutoff = int(time.time() * 1000) - older_than_s * 1000
            count = store.count_older(dlq, cutoff)
            what = f"{count} dead letter(s) older than {iso_utc(max(cutoff, 0))} from {dlq}"
        if not count:
            click.echo(f"{dlq}: nothing to purge")
            return
        if dry_run:
            click.echo(f"would delete {what} (dry run)")
            return
        if not yes:
            click.confirm(f"delete {what}?", abort=True)
        if ids:
            deleted = store.delete(dlq, found)
        elif all_entries:
            # up to the newest one seen: what was dead-lettered since the question stays
            deleted = store.delete_upto(dlq, newest[0].dlq_id)
        else:
            deleted = store.delete_older(dlq, cutoff)
    click.echo(f"{dlq}: deleted {deleted} dead letter(s)")
