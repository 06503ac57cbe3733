"""``streamsync resync``: let a re-snapshot overwrite a table's cached rows, then sweep what the
database no longer has.

After a point-in-time restore, or when capture starts over on a new replication slot, the
database's positions may be lower than those cached, and every change would be refused as stale.
A resync starts a new epoch for the table's stream at its current end (see streamsync.epochs):
everything captured afterwards, the re-snapshot first, compares newer than what is cached. Once
the workers have applied the re-snapshot, ``finish`` removes the rows it did not rewrite: rows
the restored database does not hold, which no event would ever delete.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import cast

import redis

from streamsync import layout
from streamsync.config import Settings
from streamsync.deadletter import ID_RE
from streamsync.discovery import find_streams
from streamsync.epochs import epoch_floor, parse_id, read_epochs
from streamsync.errors import ResyncError
from streamsync.functions import Client, Library
from streamsync.keys import StateKeys, dead_letter_stream
from streamsync.mapping import Planner
from streamsync.sweep import Sweeper

log = logging.getLogger(__name__)

#: How often ``finish`` looks again whether the workers caught up.
POLL_INTERVAL_S = 0.2
#: Dead letters read per XRANGE while ``finish`` looks for those of the new epoch.
DEAD_LETTER_PAGE = 500

#: An XRANGE reply on a client returning bytes.
StreamPage = list[tuple[bytes, dict[bytes, bytes]]]


@dataclass(frozen=True, slots=True)
class Mark:
    """A started epoch: entries of ``stream`` after ``after_id`` belong to ``epoch``."""

    table: str
    stream: str
    epoch: int
    after_id: str


def streams_for_table(client: Client, settings: Settings, table: str) -> list[str]:
    """The streams carrying ``table``'s changes (Debezium: ``<prefix>.<schema>.<table>``)."""
    if table not in settings.rules_by_table:
        raise ResyncError(f"no rule maps table {table!r}")
    source = settings.source
    suffix = "." + table
    if source.streams is not None:
        found = [s for s in source.streams if s.endswith(suffix) or s == table]
    else:
        prefix = source.stream_prefix or ""
        found = [s for s in find_streams(client, prefix) if s.endswith(suffix)]
        if not found:
            # not created yet (capture has not started): Debezium will name it this way
            found = [prefix.rstrip(".") + suffix if prefix else table]
    if not found:
        raise ResyncError(f"no configured stream carries {table!r} (source.streams)")
    return found


def start(client: Client, settings: Settings, tables: list[str]) -> list[Mark]:
    """Start a new epoch for each table's streams; returns the marks set."""
    library = Library(client)
    library.ensure()
    keys = StateKeys.from_settings(settings.worker)
    cluster = isinstance(client, redis.RedisCluster)
    marks = []
    for table in tables:
        for stream in streams_for_table(client, settings, table):
            epoch, after = library.mark_epoch(keys.epochs_of(stream, cluster), stream)
            mark = Mark(table, stream, epoch, after)
            log.info("%s: epoch %d starts after entry %s of %s", table, epoch, after, stream)
            marks.append(mark)
    return marks


def wait_caught_up(client: Client, settings: Settings, stream: str, timeout_s: float) -> None:
    """Wait until the group has read and acknowledged every entry of ``stream`` added so far."""
    group = settings.source.group
    info = client.xinfo_stream(stream) if client.exists(stream) else None
    if info is None:
        return
    target = parse_id(info["last-generated-id"])
    deadline = time.monotonic() + timeout_s
    while True:
        groups = {g["name"].decode(): g for g in client.xinfo_groups(stream)}
        g = groups.get(group)
        if g is not None and parse_id(g["last-delivered-id"]) >= target:
            pending = client.xpending_range(stream, group, "-", info["last-generated-id"], 1)
            if not pending:
                return
        if time.monotonic() >= deadline:
            raise ResyncError(
                f"{stream}: group {group} has not applied everything up to"
                f" {info['last-generated-id'].decode()} after {timeout_s:.0f}s"
                " (are workers running? see streamsync status)"
            )
        time.sleep(POLL_INTERVAL_S)


def _format_id(entry_id: tuple[int, int]) -> str:
    return f"{entry_id[0]}-{entry_id[1]}"


def last_generated_id(client: Client, stream: str) -> tuple[int, int] | None:
    """The id of the last entry ever added to ``stream`` (even if since trimmed or deleted);
    None when the stream does not exist."""
    if not client.exists(stream):
        return None
    return parse_id(client.xinfo_stream(stream)["last-generated-id"])


def check_captured(
    client: Client, table: str, stream: str, epoch: int, start: tuple[int, int]
) -> None:
    """ResyncError unless entries were added to ``stream`` since ``epoch`` started after entry
    ``start``: with none, no re-snapshot was captured, and a finish would remove every cached
    row."""
    last = last_generated_id(client, stream)
    if last is None or last <= start:
        raise ResyncError(
            f"{table}: nothing was added to {stream} since resync started epoch {epoch} after"
            f" entry {_format_id(start)}: no re-snapshot was"
            " captured, and finishing now would remove every cached row of the table. Start"
            " capture over so that it snapshots the table (a new replication slot, or cleared"
            " offsets), wait until the workers applied it (streamsync status shows no lag),"
            " then run --finish again (--force finishes anyway)"
        )


def dead_letters_since(client: Client, stream: str, start: tuple[int, int]) -> int:
    """How many dead letters of ``stream`` hold an entry added after ``start``."""
    dlq = dead_letter_stream(stream)
    found = 0
    cursor = "-"
    while True:
        page = cast(StreamPage, client.xrange(dlq, min=cursor, count=DEAD_LETTER_PAGE))
        for _, fields in page:
            # the original entry's id: a metadata field of every dead letter (deadletter.py)
            original = fields.get(b"id", b"").decode(errors="replace")
            if ID_RE.match(original) and parse_id(original) > start:
                found += 1
        if len(page) < DEAD_LETTER_PAGE:
            return found
        cursor = "(" + page[-1][0].decode()


def check_dead_letters(
    client: Client, table: str, stream: str, epoch: int, start: tuple[int, int]
) -> None:
    """ResyncError when entries of ``epoch`` (added after ``start``) were dead-lettered: their
    rows were not rewritten, and a finish would remove them although the database has them."""
    count = dead_letters_since(client, stream, start)
    if count:
        raise ResyncError(
            f"{table}: {count} entr{'y' if count == 1 else 'ies'} of {stream} added since epoch"
            f" {epoch} started went to {dead_letter_stream(stream)}: their rows"
            " were not rewritten, and finishing now would remove them from the cache. Fix the"
            f" cause and replay them (streamsync dlq replay --stream {stream} --all), then run"
            " --finish again (--force finishes anyway)"
        )


def finish(
    client: Client,
    settings: Settings,
    table: str,
    timeout_s: float,
    *,
    force: bool = False,
    target: Client | None = None,
) -> int:
    """Once the workers applied everything captured so far, remove the table's rows that the
    current epoch did not rewrite. Returns the number of rows removed. ``client`` is the
    streams' Redis (epochs, streams, dead letters); ``target`` the cache's, where the rows are
    swept (default: ``client``, when the configuration has no ``target`` section).

    Unless ``force``, it refuses (ResyncError) when the new epoch rewrote nothing: when no entry
    was added to a stream of the table since its epoch started (capture did not start over), or
    when entries added since are dead letters. Entries added since the mark and acknowledged by
    the group (every worker's pending entries counted, up to the stream's end, by
    ``wait_caught_up``) are what the workers applied in the new epoch; entries trimmed since
    were acknowledged too, so the stream's last generated id, not its current content, tells
    whether anything was added.
    """
    cache = client if target is None else target
    # its sweep walks 2.0's records: beside 1.x bookkeeping it would remove nothing
    layout.claim(cache, settings)
    Library(cache).ensure()
    streams = streams_for_table(client, settings, table)
    keys = StateKeys.from_settings(settings.worker)
    epochs = read_epochs(
        client, keys.epochs_commands(streams, isinstance(client, redis.RedisCluster))
    )
    marks: dict[str, tuple[int, tuple[int, int]]] = {}
    for stream in streams:
        start = epochs.latest_start(stream)
        if start is None:
            raise ResyncError(f"{table}: no resync was started on {stream}")
        marks[stream] = (epochs.latest(stream), start)
        if not force:
            check_captured(client, table, stream, *marks[stream])
    for stream, mark in marks.items():
        wait_caught_up(client, settings, stream, timeout_s)
        if not force:
            check_dead_letters(client, table, stream, *mark)
    epoch = max(epoch for epoch, _ in marks.values())
    planner = Planner.from_settings(settings, cluster=isinstance(cache, redis.RedisCluster))
    sweeper = Sweeper(cache, planner, settings.worker.tombstone_ttl_s)
    removed = sweeper.remove_older(table, epoch_floor(epoch))
    log.info("%s: resync epoch %d finished, %d stale row(s) removed", table, epoch, removed)
    return removed
