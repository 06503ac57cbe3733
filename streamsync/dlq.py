"""The dead-letter streams behind ``streamsync dlq`` (streamsync.cli.dlq): read, replay and
delete them.

A worker writes an entry it cannot apply to ``<stream>:dlq`` in the layout
``streamsync.deadletter`` owns; this module reads it back.

``replay`` puts dead letters back to work, oldest first, in one of two ways:

- by default it re-adds the original fields verbatim to the source stream (XADD, same field
  order) and deletes the dead letter in the same MULTI/EXEC, so the workers apply the entry
  again. Positions make that idempotent: a change already applied is stale.
- ``--direct`` decodes and plans the entry with the worker's Decoder and Planner (under the
  resync epoch of its original id) and applies it with the worker's FCALL, without any worker;
  the dead letter is removed once applied (or stale) and left, with the reason, otherwise.

Both modes first check that the current configuration can decode and map the entry, and leave
it in place (reporting why) when it cannot: re-adding it would only dead-letter it again
(``--force`` re-adds it anyway). A re-added entry gets a new id, so one older than the stream's
latest resync epoch, or a snapshot read or first transaction's change of an older snapshot than
the stream's latest (``streamsync.snapshots``), is left for ``--direct``; and a TRUNCATE is only
ever re-added: applied here it could overtake older entries of its stream that the workers have
not applied yet.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from streamsync import connection, redisjson
from streamsync.config import Settings
from streamsync.deadletter import DeadLetter, as_text, as_utf8
from streamsync.discovery import find_streams
from streamsync.epochs import Epochs, read_epochs
from streamsync.errors import DlqError, PoisonEntryError
from streamsync.events import TRUNCATE, Decoder, Skip
from streamsync.functions import Client, Library, RowStatus, RowWrite
from streamsync.keys import (
    StateKeys,
    dead_letter_stream,
    is_dead_letter_stream,
    source_of_dead_letters,
)
from streamsync.mapping import Planner
from streamsync.snapshots import Snapshots
from streamsync.worker.core import BatchCore, Held
from streamsync.worker.entry import Entry

#: Dead letters read per XRANGE while walking a dead-letter stream.
PAGE_SIZE = 500
#: WATCH conflicts (the dead-letter stream written meanwhile) retried per replayed entry.
MAX_WATCH_RETRIES = 20

#: A stream id above every real one: its epoch prefix is the stream's current epoch.
_NEWEST_ID = b"18446744073709551615-18446744073709551615"


def pretty_json(value: bytes) -> str | None:
    """``value`` indented when it is a JSON object or array; None otherwise."""
    text = as_utf8(value)
    if text is None or not text.lstrip().startswith(("{", "[")):
        return None
    try:
        parsed = json.loads(text)
    except ValueError:
        return None
    return json.dumps(parsed, indent=2, ensure_ascii=False)


def field_json(name: bytes, value: bytes) -> dict[str, Any]:
    """One field/value pair as JSON: as text, base64 when not UTF-8, and parsed when JSON."""
    item: dict[str, Any] = {"field": as_text(name), "value": as_text(value)}
    for key, raw in (("field", name), ("value", value)):
        if as_utf8(raw) is None:
            item[key + "_base64"] = base64.b64encode(raw).decode()
    text = as_utf8(value)
    if text is not None:
        with contextlib.suppress(ValueError):
            item["value_json"] = json.loads(text)
    return item


# -- Redis access --------------------------------------------------------------------------


class DeadLetters:
    """The dead-letter streams of one configuration, in the streams' Redis (``client``);
    ``target`` is the cache's Redis, where ``--direct`` applies (default: ``client``)."""

    def __init__(self, client: Client, settings: Settings, target: Client | None = None) -> None:
        self.client = client
        self.target = client if target is None else target
        self.settings = settings
        # stream entries are read unparsed: field lists keep their order and duplicates (in a
        # Cluster each node's client parses its replies)
        servers: list[Client] = [node for _, node in connection.primaries(client)] or [client]
        for server in servers:
            for command in ("XRANGE", "XREVRANGE"):
                server.set_response_callback(command, lambda reply, **_: reply)

    # -- streams

    def source_streams(self) -> list[str]:
        """The configured streams, or with ``stream_prefix`` those found in Redis (a stream
        whose dead letters outlived it included)."""
        source = self.settings.source
        if source.streams is not None:
            return list(source.streams)
        prefix = source.stream_prefix or ""
        found: set[str] = set()
        for name in find_streams(self.client, prefix, dead_letters=True):
            stream = source_of_dead_letters(name)
            if stream.startswith(prefix) and not is_dead_letter_stream(stream):
                found.add(stream)
        return sorted(found)

    def check_stream(self, stream: str) -> str:
        """``stream``'s dead-letter stream; DlqError unless it is a source stream."""
        if is_dead_letter_stream(stream):
            raise DlqError(
                f"{stream!r} is a dead-letter stream: name its source stream,"
                f" {source_of_dead_letters(stream)!r}"
            )
        source = self.settings.source
        if source.streams is not None:
            if stream not in source.streams:
                raise DlqError(
                    f"{stream!r} is not a configured stream (source.streams:"
                    f" {', '.join(source.streams)})"
                )
        else:
            prefix = source.stream_prefix or ""
            if not stream.startswith(prefix):
                raise DlqError(f"{stream!r} does not start with source.stream_prefix {prefix!r}")
            types = {self._type(stream), self._type(dead_letter_stream(stream))}
            if "stream" not in types:
                raise DlqError(f"{stream!r}: no such stream in Redis (nor dead letters of it)")
        return dead_letter_stream(stream)

    def _type(self, key: str) -> str:
        kind = self.client.type(key)
        return kind.decode() if isinstance(kind, bytes) else str(kind)

    # -- reading

    def length(self, dlq: str) -> int:
        return int(self.client.xlen(dlq))

    def newest(self, dlq: str, count: int) -> list[DeadLetter]:
        reply = _command(self.client, "XREVRANGE", dlq, "+", "-", "COUNT", count)
        return [DeadLetter.parse(eid, list(raw)) for eid, raw in reply]

    def get(self, dlq: str, dlq_id: str) -> DeadLetter | None:
        reply = _command(self.client, "XRANGE", dlq, dlq_id, dlq_id)
        return DeadLetter.parse(reply[0][0], list(reply[0][1])) if reply else None

    def walk(self, dlq: str, upto: bytes | None = None) -> Iterator[DeadLetter]:
        """Every dead letter, oldest first, up to ``upto`` (default: the newest one now), so
        what is dead-lettered meanwhile is not walked."""
        if upto is None:
            last = self.newest(dlq, 1)
            if not last:
                return
            upto = last[0].dlq_id
        start: bytes = b"-"
        while True:
            reply = _command(self.client, "XRANGE", dlq, start, upto, "COUNT", PAGE_SIZE)
            for eid, raw in reply:
                yield DeadLetter.parse(eid, list(raw))
            if len(reply) < PAGE_SIZE:
                return
            start = b"(" + reply[-1][0]

    def count_older(self, dlq: str, cutoff_ms: int) -> int:
        """Dead letters whose id (the time they were dead-lettered) is before ``cutoff_ms``."""
        if cutoff_ms <= 0:
            return 0
        return sum(1 for _ in self.walk(dlq, f"{cutoff_ms - 1}-18446744073709551615".encode()))

    def epochs(self) -> Epochs:
        keys = StateKeys.from_settings(self.settings.worker)
        cluster = isinstance(self.client, redis.RedisCluster)
        return read_epochs(self.client, keys.epochs_commands(self.source_streams(), cluster))

    def snapshots(self) -> Snapshots:
        snapshots = Snapshots()
        snapshots.load(self.client.hgetall(StateKeys.from_settings(self.settings.worker).snapshots))
        return snapshots

    def selected(
        self, dlq: str, ids: tuple[str, ...], all_entries: bool
    ) -> Iterator[DeadLetter | str]:
        """The dead letters named, oldest first (an id not found is yielded as is), or all of
        them."""
        if all_entries:
            yield from self.walk(dlq)
            return
        for dlq_id in sorted(set(ids), key=lambda i: tuple(map(int, i.split("-")))):
            letter = self.get(dlq, dlq_id)
            yield letter if letter is not None else dlq_id

    # -- deleting

    def delete(self, dlq: str, ids: list[str]) -> int:
        """Delete the dead letters ``ids``; returns how many were there."""
        return int(self.client.xdel(dlq, *ids)) if ids else 0

    def delete_upto(self, dlq: str, newest: bytes) -> int:
        """Delete every dead letter up to ``newest`` included: what was dead-lettered since
        stays."""
        ms, _, seq = newest.decode().partition("-")
        return int(self.client.xtrim(dlq, minid=f"{ms}-{int(seq) + 1}", approximate=False))

    def delete_older(self, dlq: str, cutoff_ms: int) -> int:
        """Delete the dead letters written before ``cutoff_ms``."""
        return int(self.client.xtrim(dlq, minid=max(cutoff_ms, 0), approximate=False))


# -- replay --------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """What a replay did (or, in a dry run, would do) with one dead letter."""

    letter: DeadLetter
    #: re-added, applied, stale, skipped, dropped, nothing, removed... or "left".
    action: str
    detail: str = ""

    @property
    def left(self) -> bool:
        return self.action == "left"


@dataclass(slots=True)
class Planned:
    """What the worker would make of a dead letter's original entry, under this configuration."""

    rows: list[RowWrite] = field(default_factory=list)
    #: A tombstone or heartbeat: nothing to apply.
    skip: Skip | None = None
    #: A TRUNCATE (the worker sweeps for it, after the older entries of its stream).
    truncate: bool = False
    #: A snapshot read, or a change of the first transaction after a snapshot: its place in
    #: the stream says which snapshot it belongs to.
    snapshot_bound: bool = False
    #: Why it cannot be applied.
    error: str | None = None


class Replayer:
    """Replays dead letters of one stream: through the stream, or applied directly."""

    def __init__(self, store: DeadLetters, stream: str, *, force: bool = False) -> None:
        settings = store.settings
        self.store = store
        self.client = store.client
        self.stream = stream
        self.dlq = dead_letter_stream(stream)
        self.force = force
        self.epochs = store.epochs()
        self.snapshots = store.snapshots()
        # the worker's own decoding and planning, so a replay sees the entry as a worker would
        self.core = BatchCore(
            Decoder(settings.source.format, settings.source.null_marker),
            Planner.from_settings(
                settings,
                cluster=isinstance(store.target, redis.RedisCluster),
                redisjson=redisjson.target_loads_it(
                    settings,
                    store.target,
                    StateKeys.from_settings(settings.worker).json_probe("dlq"),
                ),
            ),
            self.epochs,
            tombstone_s=settings.worker.tombstone_ttl_s,
            max_deliveries=settings.worker.max_deliveries,
            snapshots=self.snapshots,
        )
        # applied where the workers apply: in the cache's Redis
        self.library = Library(store.target)

    def plan(self, letter: DeadLetter) -> Planned:
        """Decode and plan ``letter`` as the worker would, under its original id's epoch and
        snapshot."""
        original = letter.original_id
        if letter.fields is None or original is None:
            return Planned(error=letter.problem or "the dead letter has no valid original 'id'")
        try:
            plan = self.core.plan(self.stream, original, letter.fields)
            event = plan.event
            if isinstance(event, Skip):
                return Planned(skip=event)
            if event.op == TRUNCATE:
                return Planned(truncate=True)
            if plan.held:
                held = Held(Entry(self.stream, original, letter.fields), event)
                return Planned(rows=self.core.plan_held(held), snapshot_bound=True)
        except PoisonEntryError as exc:
            return Planned(error=str(exc))
        except Exception as exc:  # a bug, as the worker reports it
            return Planned(error=f"internal error: {type(exc).__name__}: {exc}")
        return Planned(rows=plan.rows, snapshot_bound=event.op == "r")

    # -- through the stream

    def requeue(self, letter: DeadLetter, dry_run: bool) -> Outcome:
        """Re-add ``letter``'s original fields to the source stream and delete it from the
        dead-letter stream, atomically; its original fields are XADDed verbatim."""
        original = letter.original_id
        if letter.fields is None or original is None:
            return Outcome(letter, "left", self.plan(letter).error or "")
        planned = self.plan(letter)
        if planned.error is not None and not self.force:
            return Outcome(letter, "left", planned.error)
        old, new = (
            self.epochs.prefix(self.stream, original),
            self.epochs.prefix(self.stream, _NEWEST_ID),
        )
        if old != new:
            return Outcome(
                letter,
                "left",
                "the entry predates the stream's latest resync epoch: re-adding it would"
                " overwrite newer rows; replay it with --direct, which keeps its epoch",
            )
        if planned.snapshot_bound and self.snapshots.at(self.stream, original) != self.snapshots.at(
            self.stream, _NEWEST_ID
        ):
            return Outcome(
                letter,
                "left",
                "the entry belongs to an older snapshot than the stream's latest: re-added, it"
                " would be taken for the latest one's; replay it with --direct, which keeps it",
            )
        if dry_run:
            return Outcome(letter, "re-added", "would re-add to " + self.stream)
        if isinstance(self.client, redis.RedisCluster):
            return self._requeue_apart(letter)
        for _ in range(MAX_WATCH_RETRIES):
            try:
                return self._requeue_once(letter)
            except redis.WatchError:
                time.sleep(0.01)
        return Outcome(letter, "left", "the dead-letter stream kept changing; try again")

    def _requeue_once(self, letter: DeadLetter) -> Outcome:
        assert letter.fields is not None
        dlq_id = letter.dlq_id
        with self.client.pipeline(transaction=True) as pipe:
            # WATCH: a concurrent replay or purge of the same dead letter aborts this one
            pipe.watch(self.dlq)
            if not pipe.execute_command("XRANGE", self.dlq, dlq_id, dlq_id):
                return Outcome(letter, "gone", "no longer in the dead-letter stream")
            kind = pipe.type(self.stream)
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            if kind not in ("stream", "none"):
                return Outcome(letter, "left", f"{self.stream} holds a {kind}, not a stream")
            pipe.multi()
            pipe.execute_command("XADD", self.stream, "*", *letter.fields)
            pipe.xdel(self.dlq, dlq_id)
            added, deleted = pipe.execute(raise_on_error=False)
        if isinstance(added, Exception):
            # cannot happen short of a race on the stream's type: keep the dead letter anyway
            if not isinstance(deleted, Exception) and deleted:
                _command(self.client, "XADD", self.dlq, "*", *letter.raw)
            return Outcome(letter, "left", f"XADD to {self.stream} failed: {added}")
        new_id = added.decode() if isinstance(added, bytes) else str(added)
        return Outcome(letter, "re-added", f"as {self.stream} {new_id}")

    def _requeue_apart(self, letter: DeadLetter) -> Outcome:
        """In a Redis Cluster the stream and its dead letters sit in different slots, where no
        MULTI reaches both: the entry is re-added, then the dead letter deleted. A crash (or a
        second replay) in between re-adds it twice: the workers find the second one stale."""
        assert letter.fields is not None
        if not _command(self.client, "XRANGE", self.dlq, letter.dlq_id, letter.dlq_id):
            return Outcome(letter, "gone", "no longer in the dead-letter stream")
        kind = self.client.type(self.stream)
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        if kind not in ("stream", "none"):
            return Outcome(letter, "left", f"{self.stream} holds a {kind}, not a stream")
        added = _command(self.client, "XADD", self.stream, "*", *letter.fields)
        self.client.xdel(self.dlq, letter.dlq_id)
        new_id = added.decode() if isinstance(added, bytes) else str(added)
        return Outcome(letter, "re-added", f"as {self.stream} {new_id}")

    # -- applied directly

    def apply(self, letter: DeadLetter, dry_run: bool) -> Outcome:
        """Apply ``letter`` with the worker's batch call; delete it once applied or stale."""
        planned = self.plan(letter)
        if planned.error is not None:
            return Outcome(letter, "left", planned.error)
        if planned.truncate:
            return Outcome(
                letter,
                "left",
                "a TRUNCATE must wait for the older entries of its stream: replay it without"
                " --direct",
            )
        if planned.skip is not None:
            action, detail = "nothing", f"a {planned.skip.value}: nothing to apply"
        elif not planned.rows:
            action, detail = "nothing", "no row to apply"
        elif dry_run:
            return Outcome(letter, "applied", f"would apply {len(planned.rows)} row(s)")
        else:
            try:
                replies = [
                    reply
                    for rows in _by_slot(planned.rows)
                    for reply in self.library.changes(rows, self.core.tombstone_s).rows
                ]
            except redis.ResponseError as exc:
                return Outcome(letter, "left", f"redis error: {exc}")
            errors = [s for s in replies if isinstance(s, str)]
            if errors:
                return Outcome(letter, "left", f"redis error: {errors[0]}")
            statuses = Counter(s.outcome for s in replies if isinstance(s, RowStatus))
            action = "applied" if "applied" in statuses else next(iter(statuses))
            detail = "rows: " + ", ".join(f"{n} {o}" for o, n in statuses.items())
        if dry_run:
            return Outcome(letter, action, "would remove: " + detail)
        self.client.xdel(self.dlq, letter.dlq_id)
        return Outcome(letter, action, detail)


def _by_slot(rows: Sequence[RowWrite]) -> list[list[RowWrite]]:
    """``rows`` in one call per hash slot (of a Cluster; one call off a Cluster), in order."""
    calls: dict[int | None, list[RowWrite]] = {}
    for row in rows:
        calls.setdefault(row.table.slot, []).append(row)
    return list(calls.values())


def _command(client: Client, *args: Any) -> Any:
    """A raw command on a server or a Cluster (routed by its key): its reply, unparsed."""
    send: Any = client
    return send.execute_command(*args)
