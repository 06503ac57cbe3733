"""The pure batch core: entries in, decisions out. No I/O, no clock, no sleeps.

A batch goes through three steps, each a method here:

1. ``prepare``: decode and plan each entry (``streamsync.events``, ``streamsync.mapping``) into
   the rows to apply, or settle it at once (nothing to apply, a malformed or unmappable entry
   for the dead letters), or hold it for the barrier (a TRUNCATE, a change of the first
   transaction after a snapshot: ``Held``); and note the snapshot marks its reads need;
2. ``calls``: pack the rows into ``streamsync_changes`` calls (bounded in size, one hash slot
   each on a Redis Cluster, one row each for an entry whose batch call failed as a whole);
3. ``settle``: read the calls' replies into acknowledgements, retries, dead letters and
   library reloads.

The loop (``streamsync.worker.loop``) sends what this decides and reads what Redis replies.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from streamsync.buckets import Table
from streamsync.epochs import Epochs, parse_id
from streamsync.errors import PoisonEntryError, excerpt
from streamsync.events import TRUNCATE, ChangeEvent, Decoder, Skip
from streamsync.functions import (
    Command,
    RowStatus,
    RowWrite,
    changes_command,
    changes_reply,
    is_missing_library,
)
from streamsync.keys import key_slot
from streamsync.mapping import Planner
from streamsync.positions import is_unplaced, place, snapshot_of
from streamsync.retry import is_transient
from streamsync.snapshots import Snapshots
from streamsync.worker.entry import Entry

log = logging.getLogger(__name__)

#: Most rows packed into one function call; bounds the Lua stack and one call's run time.
MAX_ROWS_PER_CALL = 1000

#: The outcome counted for an entry deleted from its stream while it was pending.
VANISHED = "vanished"


@dataclass(slots=True)
class Plan:
    """What one entry is to become."""

    event: ChangeEvent | Skip
    #: The rows to apply (a row change).
    rows: list[RowWrite] = field(default_factory=list)
    #: Held until every older entry of its stream is settled (see Held); planned then.
    held: bool = False


@dataclass(slots=True)
class Held:
    """An entry that needs every older entry of its stream settled first (the barrier,
    ``streamsync.worker.barrier``): a TRUNCATE, which run before a change it follows would let
    that change bring a row back; or a change of the first transaction after a snapshot, whose
    position needs the mark of that snapshot (``streamsync.snapshots``), made by whichever
    worker applies one of its reads, all older than the change."""

    entry: Entry
    event: ChangeEvent

    @property
    def truncate(self) -> bool:
        """Whether it is a TRUNCATE (applied by a sweep, not by a batch call)."""
        return self.event.op == TRUNCATE


@dataclass(frozen=True, slots=True)
class SnapshotMark:
    """A snapshot mark to record (``streamsync_mark_snapshot``): the reads of the snapshot at
    ``lsn`` start at or before entry ``entry_id`` of ``stream``."""

    stream: str
    lsn: int
    entry_id: bytes


@dataclass(slots=True)
class Prepared:
    """A batch of entries sorted by what happens to them next."""

    #: Entries with rows to apply.
    apply: list[Entry] = field(default_factory=list)
    #: Entries with nothing to apply (tombstones, heartbeats, vanished): acknowledged, counted
    #: under their ``outcome``.
    settled: list[Entry] = field(default_factory=list)
    #: Entries that can never be applied (``error`` says why): dead-lettered at once.
    dead: list[Entry] = field(default_factory=list)
    #: Entries for the barrier.
    held: list[Held] = field(default_factory=list)


@dataclass(slots=True)
class Call:
    """One batch call, the entry each of its rows belongs to, and the rule tables it names."""

    command: Command
    owners: list[Entry]
    tables: list[Table]
    #: The table of each row (None for a row without a record).
    row_tables: list[Table | None] = field(default_factory=list)


@dataclass(slots=True)
class Settlement:
    """What the replies of a batch's calls say to do."""

    #: Applied (``outcome`` says how): to acknowledge.
    done: list[Entry] = field(default_factory=list)
    #: Failed this delivery (``error`` says why), with deliveries left: left pending, retried
    #: after a claim.
    failed: list[Entry] = field(default_factory=list)
    #: Failed on their last allowed delivery: to dead-letter.
    dead: list[Entry] = field(default_factory=list)
    #: Send the whole batch again (Redis refused for now, calls were split, or a table was).
    retry: bool = False
    #: Only a rule table was split meanwhile: send again at once, the rows readdressed (no
    #: backoff: Redis is fine, and a worker backing off would let its entries be claimed).
    rebucketed: bool = False
    #: The library is missing: load it before the retry.
    reload_library: bool = False
    #: Tables some of whose rows replied UNKNOWN (their record was evicted; the batch goes again
    #: at once, once the worker has read the tables' floors).
    unknown: set[Table] = field(default_factory=set)
    #: Why the batch is sent again, for the log.
    reason: str = ""

    def again(self, reason: str) -> None:
        """Send the batch again, after a backoff, because of ``reason``."""
        self.retry, self.rebucketed, self.reason = True, False, reason


class BatchCore:
    """Decodes, plans, packs and settles batches of entries."""

    def __init__(
        self,
        decoder: Decoder,
        planner: Planner,
        epochs: Epochs,
        *,
        tombstone_s: int,
        max_deliveries: int,
        max_rows_per_call: int = MAX_ROWS_PER_CALL,
        snapshots: Snapshots | None = None,
    ) -> None:
        self.decoder = decoder
        self.planner = planner
        self.epochs = epochs
        self.snapshots = snapshots if snapshots is not None else Snapshots()
        self.tombstone_s = tombstone_s
        self.max_deliveries = max_deliveries
        self.max_rows_per_call = max_rows_per_call
        #: Whether the target may evict the cache's bookkeeping (a Redis of its own under an
        #: ``allkeys-*`` policy; the worker reads it, ``streamsync.worker.policy``). Then each
        #: batch's rules need their high-water marks raised before the batch is applied
        #: (``streamsync.functions.raise_hwm_command``); not wired into the batches yet.
        self.bookkeeping_evictable = False
        # (stream, snapshot LSN) -> the oldest entry id of a read planned since take_marks()
        self._marks: dict[tuple[str, int], bytes] = {}

    # -- 1. decode and plan ----------------------------------------------------------------

    def plan(self, stream: str, entry_id: bytes, fields: Sequence[bytes]) -> Plan:
        """Decode and plan one entry of ``stream``; PoisonEntryError says why it can never be
        applied. A snapshot read's mark is noted (``take_marks``) before its rows are planned."""
        event = self.decoder.decode(fields)
        if isinstance(event, Skip):
            return Plan(event)
        if event.op == TRUNCATE or is_unplaced(event.position):
            if event.table not in self.planner.rules_by_table:
                raise PoisonEntryError(f"no rule maps table {excerpt(event.table)}")
            return Plan(event, held=True)
        if event.op == "r":
            self._note_read(stream, entry_id, event.position)
        return Plan(event, rows=self.planner.plan(event, self.epochs.prefix(stream, entry_id)))

    def _note_read(self, stream: str, entry_id: bytes, position: str) -> None:
        lsn = snapshot_of(position)
        if lsn is not None and self.snapshots.at(stream, entry_id) != lsn:
            self.note_mark(SnapshotMark(stream, lsn, entry_id))

    def note_mark(self, mark: SnapshotMark) -> None:
        """Note ``mark`` for ``take_marks`` (the oldest entry of each snapshot is kept)."""
        noted = self._marks.get((mark.stream, mark.lsn))
        if noted is None or parse_id(mark.entry_id) < parse_id(noted):
            self._marks[(mark.stream, mark.lsn)] = mark.entry_id

    def take_marks(self) -> list[SnapshotMark]:
        """The snapshot marks the reads planned since the last call need: to record before
        the calls applying them (and before acknowledging them)."""
        marks = [SnapshotMark(stream, lsn, eid) for (stream, lsn), eid in self._marks.items()]
        self._marks.clear()
        return marks

    def truncate_position(self, held: Held) -> str:
        """The position a held TRUNCATE sweeps at, epoch prefix included (see ``_place``)."""
        self._place(held)
        return self.epochs.prefix(held.entry.stream, held.entry.id) + held.event.position

    def plan_held(self, held: Held) -> list[RowWrite]:
        """The rows of a held change (see ``_place``); PoisonEntryError as ``plan``."""
        self._place(held)
        entry = held.entry
        return self.planner.plan(held.event, self.epochs.prefix(entry.stream, entry.id))

    def _place(self, held: Held) -> None:
        # the snapshot marks must be loaded once every older entry of the stream is settled
        entry, event = held.entry, held.event
        if not is_unplaced(event.position):
            return
        snapshot = self.snapshots.at(entry.stream, entry.id)
        if snapshot is None:
            log.warning(
                "%s: no snapshot mark precedes this change of the first transaction after a"
                " snapshot: ordered by its own LSN",
                entry.label,
            )
        event.position = place(event.position, snapshot)

    def prepare(self, entries: Sequence[Entry]) -> Prepared:
        """Sort ``entries`` into what to apply, acknowledge, dead-letter or hold for the
        barrier."""
        prepared = Prepared()
        for entry in entries:
            if entry.fields is None:
                # deleted from the stream while pending: nothing left to apply
                entry.outcome = VANISHED
                prepared.settled.append(entry)
                continue
            try:
                plan = self.plan(entry.stream, entry.id, entry.fields)
            except PoisonEntryError as exc:
                entry.error = str(exc)
                prepared.dead.append(entry)
                continue
            except Exception as exc:
                # a bug, not the entry's fault; still never crash the loop nor lose the entry
                log.exception("%s: cannot decode or map", entry.label)
                entry.error = f"internal error: {type(exc).__name__}: {exc}"
                prepared.dead.append(entry)
                continue
            event = plan.event
            if isinstance(event, Skip):
                entry.outcome = event.value
                prepared.settled.append(entry)
                continue
            entry.table, entry.op, entry.ts_ms = event.table, event.op, event.ts_ms
            if plan.held:
                prepared.held.append(Held(entry, event))
                continue
            entry.rows = plan.rows
            prepared.apply.append(entry)
        return prepared

    # -- 2. pack into calls ------------------------------------------------------------------

    def calls(self, batch: Sequence[Entry]) -> list[Call]:
        """The batch calls applying ``batch``, rows in entry order: at most
        ``max_rows_per_call`` rows each, one hash slot each on a cluster, one row each for an
        entry marked ``solo``."""
        return list(self._calls(batch))

    def _calls(self, batch: Sequence[Entry]) -> Iterator[Call]:
        cluster = self.planner.cluster
        groups: dict[int, tuple[list[RowWrite], list[Entry]]] = {}
        for entry in batch:
            for row in entry.rows:
                if entry.solo:
                    yield self._call([row], [entry])
                    continue
                slot = key_slot(row.keys[0]) if cluster else 0
                rows, owners = groups.setdefault(slot, ([], []))
                rows.append(row)
                owners.append(entry)
                if len(rows) >= self.max_rows_per_call:
                    yield self._call(rows, owners)
                    del groups[slot]
        for rows, owners in groups.values():
            yield self._call(rows, owners)

    def _call(self, rows: list[RowWrite], owners: list[Entry]) -> Call:
        command, tables = changes_command(rows, self.tombstone_s)
        return Call(command, owners, tables, [row.table for row in rows])

    # -- 3. settle ---------------------------------------------------------------------------

    def settle(
        self, batch: Sequence[Entry], calls: Sequence[Call], replies: Sequence[Any]
    ) -> Settlement:
        """Read the replies of ``calls`` (one each, error replies as ResponseError values)."""
        settlement = Settlement()
        for call, reply in zip(calls, replies, strict=True):
            if isinstance(reply, redis.ResponseError):
                self._call_failed(call, str(reply), settlement)
            else:
                self._rows_replied(call, changes_reply(reply, call.tables).rows, settlement)
        if settlement.retry:
            for entry in batch:
                entry.outcome = entry.error = None
            return settlement
        for entry in batch:
            if entry.error is None:
                entry.outcome = entry.outcome or RowStatus.APPLIED.outcome
                settlement.done.append(entry)
            elif self.exhausted(entry):
                settlement.dead.append(entry)
            else:
                settlement.failed.append(entry)
        return settlement

    @staticmethod
    def retry_all(batch: Sequence[Entry], reason: str) -> Settlement:
        """Send ``batch`` again whatever its calls replied (``reason`` says why)."""
        for entry in batch:
            entry.outcome = entry.error = None
            entry.solo = False
        return Settlement(retry=True, reason=reason)

    def exhausted(self, entry: Entry) -> bool:
        """Whether a failed ``entry`` had its last allowed delivery (it is dead-lettered)."""
        return entry.deliveries >= self.max_deliveries

    def _call_failed(self, call: Call, message: str, settlement: Settlement) -> None:
        if is_missing_library(message):
            settlement.reload_library = True
            settlement.again("the library is missing")
        elif is_transient(message):
            settlement.again(f"redis refused a call ({message})")
        elif len(call.owners) > 1:
            # one bad row fails its whole call: retry its rows one call each, so only the bad
            # entry fails
            for entry in call.owners:
                entry.solo = True
            settlement.again(f"a call failed as a whole ({message}); its rows go one by one")
        else:
            call.owners[0].error = f"redis error: {message}"

    @staticmethod
    def _rows_replied(call: Call, replies: list[Any], settlement: Settlement) -> None:
        for entry, table, status in zip(call.owners, call.row_tables, replies, strict=True):
            if status is RowStatus.UNKNOWN and table is not None:
                # an evicted record, and no floor named yet: sent again at once, with one
                settlement.unknown.add(table)
                if not settlement.retry:
                    settlement.rebucketed = settlement.retry = True
                    settlement.reason = "records were evicted from the target"
            elif status is RowStatus.REBUCKETED:
                # another worker split a table: the rows are addressed again when sent again
                if not settlement.retry:
                    settlement.rebucketed = settlement.retry = True
                    settlement.reason = "a rule table was split meanwhile"
            elif isinstance(status, RowStatus):
                if entry.outcome is None or status is RowStatus.APPLIED:
                    entry.outcome = status.outcome
            elif is_transient(status):
                # Redis, not the row, is at fault (a cluster failing over, memory full): retry
                # the batch in hand, without spending deliveries
                settlement.again(f"redis refused a row ({status})")
            else:
                entry.error = f"redis error: {status}"
