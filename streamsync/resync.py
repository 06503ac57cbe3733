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

import redis

from streamsync.config import Settings
from streamsync.discovery import find_streams
from streamsync.epochs import Epochs, epoch_floor, parse_id
from streamsync.errors import ResyncError
from streamsync.functions import Library
from streamsync.keys import StateKeys
from streamsync.mapping import Planner
from streamsync.sweep import Sweeper

log = logging.getLogger(__name__)

#: How often ``finish`` looks again whether the workers caught up.
POLL_INTERVAL_S = 0.2


@dataclass(frozen=True, slots=True)
class Mark:
    """A started epoch: entries of ``stream`` after ``after_id`` belong to ``epoch``."""

    table: str
    stream: str
    epoch: int
    after_id: str


def streams_for_table(client: redis.Redis, settings: Settings, table: str) -> list[str]:
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


def start(client: redis.Redis, settings: Settings, tables: list[str]) -> list[Mark]:
    """Start a new epoch for each table's streams; returns the marks set."""
    library = Library(client)
    library.ensure()
    epochs_key = StateKeys.from_settings(settings.worker).epochs
    marks = []
    for table in tables:
        for stream in streams_for_table(client, settings, table):
            epoch, after = library.mark_epoch(epochs_key, stream)
            mark = Mark(table, stream, epoch, after)
            log.info("%s: epoch %d starts after entry %s of %s", table, epoch, after, stream)
            marks.append(mark)
    return marks


def wait_caught_up(client: redis.Redis, settings: Settings, stream: str, timeout_s: float) -> None:
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


def finish(client: redis.Redis, settings: Settings, table: str, timeout_s: float) -> int:
    """Once the workers applied everything captured so far, remove the table's rows that the
    current epoch did not rewrite. Returns the number of rows removed."""
    Library(client).ensure()
    epochs = Epochs()
    epochs.load(client.hgetall(StateKeys.from_settings(settings.worker).epochs))
    epoch = 0
    for stream in streams_for_table(client, settings, table):
        if not epochs.latest(stream):
            raise ResyncError(f"{table}: no resync was started on {stream}")
        epoch = max(epoch, epochs.latest(stream))
        wait_caught_up(client, settings, stream, timeout_s)
    sweeper = Sweeper(
        client, Planner.from_settings(settings), settings.worker.tombstone_ttl_s * 1000
    )
    removed = sweeper.remove_older(table, epoch_floor(epoch))
    log.info("%s: resync epoch %d finished, %d stale row(s) removed", table, epoch, removed)
    return removed
