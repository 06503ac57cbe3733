"""The streamsync Functions library (lua/streamsync.lua): load it, verify its version, and call
it. One typed wrapper per registered function the package calls; no FCALL is built elsewhere.

The worker sends its batch calls over a raw pipelined link (see ``streamsync.link``): for it,
``changes_command`` builds the call and ``changes_reply`` reads the reply. Everything else calls
through ``Library``, which reloads the library when Redis lost it (a restart without
persistence, a ``FUNCTION FLUSH``).
"""

from __future__ import annotations

import enum
import functools
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import redis

from streamsync.buckets import Table, as_bytes, is_meta
from streamsync.errors import LibraryIncompatibleError

log = logging.getLogger(__name__)

FN_VERSION = "streamsync_version"
FN_CHANGES = "streamsync_changes"
FN_SPLIT = "streamsync_split"
FN_LEASE_GET = "streamsync_lease_get"
FN_LEASE_FILL = "streamsync_lease_fill"
FN_EXPIRE = "streamsync_expire"
FN_TRIM = "streamsync_trim"
FN_PRUNE_CONSUMER = "streamsync_prune_consumer"
FN_MARK_EPOCH = "streamsync_mark_epoch"
FN_RAISE_HWM = "streamsync_raise_hwm"
FN_MARK_SNAPSHOT = "streamsync_mark_snapshot"
FN_IMPORT = "streamsync_import"
FN_IMPORT_LIST = "streamsync_import_list"

_VERSION_RE = re.compile(r"^local VERSION = '(\d+)\.(\d+)\.(\d+)'$", re.MULTILINE)

Version = tuple[int, int, int]
Command = tuple[Any, ...]
Client = redis.Redis | redis.RedisCluster
ArgV = list[str | bytes]


class RowStatus(enum.IntEnum):
    """What the library did with one row of a batch call."""

    #: Not applied: the row's position is not newer than the one recorded.
    STALE = 0
    APPLIED = 1
    #: An update with unchanged TOAST columns for a row that is not cached: left absent, so no
    #: partial row is cached.
    SKIPPED = 2
    #: The cached row could not be completed, so it was deleted; the next full change fills it.
    DROPPED = 3
    #: Not applied: the row's table was split since the worker addressed it (sent again).
    REBUCKETED = 4
    #: Not applied: the row's record was evicted and the worker named no floor (sent again with
    #: one).
    UNKNOWN = 5

    @property
    def outcome(self) -> str:
        """The name counted for it: ``applied``, ``stale``, ``skipped``, ``dropped``."""
        return self.name.lower()


#: A row's reply: its status, or the text of the Redis error that failed it (the other rows of
#: the call still apply).
RowReply = RowStatus | str


@dataclass(slots=True)
class RowWrite:
    """One row of a ``streamsync_changes`` call: its KEYS and its ARGV items (layouts in
    lua/streamsync.lua, built by ``streamsync.mapping``).

    Every row keeps its record in a bucket of ``table`` (its key ``at``), and its items are the
    kind, the record field, the position and the kind's items. A row keeping a second record in
    the same table (a moving row: its key's) names where that one's bucket and field are in
    ``also``.
    """

    keys: list[str]
    args: ArgV
    table: Table
    #: The table's bucket count the row was addressed with.
    buckets: int = 1
    #: The index of the record's bucket in ``keys``.
    at: int = 1
    #: A second record: the index of its bucket in ``keys`` and of its field in ``args``.
    also: tuple[int, int] | None = None


@dataclass(slots=True)
class ChangesReply:
    """A ``streamsync_changes`` reply: one RowReply per row, and what each table holds now."""

    rows: list[RowReply]
    #: Per table of the call, in order: its bucket count, its record count and the token its
    #: bucket 0's rebuild waits for ('' when none; ``Table.pending``).
    tables: list[tuple[int, int, str]]


def _readdress(row: RowWrite, table: Table) -> None:
    # the table was split since the row was planned: its records may live in other buckets
    row.keys[row.at] = table.bucket_of(as_bytes(row.args[1]))
    if row.also is not None:
        key_at, field_at = row.also
        row.keys[key_at] = table.bucket_of(as_bytes(row.args[field_at]))
    row.buckets = table.buckets


def _changes_arguments(
    rows: Sequence[RowWrite], tombstone_s: int
) -> tuple[list[str], ArgV, list[Table]]:
    tables: dict[Table, str] = {}
    for row in rows:
        if row.table not in tables:
            tables[row.table] = str(len(tables) + 1)
    keys = [table.meta for table in tables] + [table.overflow for table in tables]
    args: ArgV = [str(tombstone_s), str(len(tables))]
    for table in tables:
        args += (str(table.buckets), str(table.ttl_ms), table.guard)
    for table in tables:
        args += (str(len(table.shape)), *table.shape)
    for row in rows:
        held = row.table
        if row.buckets != held.buckets:
            _readdress(row, held)
        args.append(tables[held])
        keys += row.keys
        args += row.args
    return keys, args, list(tables)


def changes_command(rows: Sequence[RowWrite], tombstone_s: int) -> tuple[Command, list[Table]]:
    """The ``streamsync_changes`` call applying ``rows`` in order, and the tables it names (in
    the order its reply describes them)."""
    keys, args, tables = _changes_arguments(rows, tombstone_s)
    return ("FCALL", FN_CHANGES, len(keys), *keys, *args), tables


def changes_reply(reply: Sequence[Any], tables: Sequence[Table]) -> ChangesReply:
    """A ``streamsync_changes`` reply, read; the tables learn what the library saw of them."""
    *statuses, info = reply
    seen = [
        (int(info[3 * t]), int(info[3 * t + 1]), _text(info[3 * t + 2])) for t in range(len(tables))
    ]
    for table, (buckets, count, pending) in zip(tables, seen, strict=True):
        table.seen(buckets, count)
        table.pending = pending
    return ChangesReply(
        [RowStatus(item) if isinstance(item, int) else _text(item) for item in statuses], seen
    )


def raise_hwm_command(hwm_key: str, marks: Iterable[tuple[str, str]]) -> Command:
    """The ``streamsync_raise_hwm`` call raising each (rule name, position) pair's mark in the
    hash ``hwm_key`` (``StateKeys.hwm``) to at least the position, atomically."""
    args = [item for pair in marks for item in pair]
    return ("FCALL", FN_RAISE_HWM, 1, hwm_key, *args)


@dataclass(frozen=True, slots=True)
class Marks:
    """A ``streamsync_raise_hwm`` reply: each named rule table's mark after the call, and which
    of them had none before it (no batch was ever sent for them)."""

    after: dict[str, str]
    first: frozenset[str]


def hwm_reply(marks: Iterable[tuple[str, str]], reply: Sequence[Any]) -> Marks:
    """A ``streamsync_raise_hwm`` reply, read."""
    pairs = list(marks)
    after = {rule: _text(reply[2 * i]) for i, (rule, _) in enumerate(pairs)}
    first = frozenset(rule for i, (rule, _) in enumerate(pairs) if not reply[2 * i + 1])
    return Marks(after, first)


@dataclass(frozen=True, slots=True)
class Imported:
    """One record for ``streamsync_import`` (``streamsync migrate``): its bucket field, position,
    when it may go (unix seconds; None: never) and where its row is (a placement's kind and
    data as ``streamsync_changes`` writes them; empty: nowhere)."""

    field: bytes
    position: str
    expires: int | None = None
    placed: bytes = b""


def mark_snapshot_command(snapshots_key: str, stream: str, lsn: int, entry_id: bytes) -> Command:
    """The ``streamsync_mark_snapshot`` call recording that the reads of the snapshot at ``lsn``
    start at or before entry ``entry_id`` of ``stream``; it replies the stream's marks (see
    ``streamsync.snapshots``)."""
    return ("FCALL", FN_MARK_SNAPSHOT, 1, snapshots_key, stream, str(lsn), entry_id)


def is_missing_library(message: str) -> bool:
    """Whether an error reply says the library is not loaded."""
    return "function not found" in message.lower()


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@cache
def library_source() -> str:
    """The library's Lua source: from the wheel, or from the source tree in a checkout."""
    packaged = resources.files("streamsync").joinpath("lua/streamsync.lua")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    checkout = Path(__file__).resolve().parent.parent / "lua" / "streamsync.lua"
    return checkout.read_text(encoding="utf-8")


def parse_version(text: str) -> Version:
    """``"1.2.3"`` -> ``(1, 2, 3)``; ValueError otherwise."""
    parts = text.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a MAJOR.MINOR.PATCH version: {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def format_version(version: Version) -> str:
    """``(1, 2, 3)`` -> ``"1.2.3"``."""
    return ".".join(map(str, version))


@cache
def library_version() -> Version:
    """The version of the library this package ships."""
    match = _VERSION_RE.search(library_source())
    if not match:
        raise RuntimeError("lua/streamsync.lua has no `local VERSION = 'X.Y.Z'` line")
    return int(match[1]), int(match[2]), int(match[3])


Execute = Callable[..., Any]


def loaded_version(client: redis.Redis) -> Version | None:
    """The version of the library loaded in Redis (``streamsync_version``, read-only), or None
    when there is none."""
    return _loaded(client.execute_command)


def _loaded(execute: Execute) -> Version | None:
    try:
        reply = execute("FCALL_RO", FN_VERSION, 0)
    except redis.ResponseError as exc:
        if is_missing_library(str(exc)):
            return None
        raise
    return parse_version(_text(reply))


def ensure_library(client: Client) -> Version:
    """Load the shipped library unless Redis holds a newer compatible one; return the version
    in use. Raises LibraryIncompatibleError when Redis holds a newer major version: this worker
    is too old for it and must not downgrade it under newer workers. In a Redis Cluster, on
    every primary (a replica gets it from its primary)."""
    if isinstance(client, redis.RedisCluster):
        cluster = client
        versions = [
            _ensure(functools.partial(cluster.execute_command, target_nodes=node))
            for node in cluster.get_primaries()
        ]
        return min(versions)
    return _ensure(client.execute_command)


def loaded_versions(client: Client) -> list[Version | None]:
    """The version of the library loaded in Redis, or in a Redis Cluster on each primary (None
    where there is none)."""
    if isinstance(client, redis.RedisCluster):
        cluster = client
        return [
            _loaded(functools.partial(cluster.execute_command, target_nodes=node))
            for node in cluster.get_primaries()
        ]
    return [_loaded(client.execute_command)]


def _ensure(execute: Execute) -> Version:
    ours = library_version()
    current = _loaded(execute)
    if current is not None and current > ours:
        if current[0] != ours[0]:
            raise LibraryIncompatibleError(
                f"Redis holds streamsync library {format_version(current)}, incompatible with"
                f" this worker's {format_version(ours)}: upgrade streamsync"
            )
        log.info(
            "keeping newer compatible library %s (ours is %s)",
            format_version(current),
            format_version(ours),
        )
        return current
    if current == ours:
        # already there (loaded by another worker, or by an operator, so that the workers'
        # ACL can go without FUNCTION LOAD)
        return ours
    execute("FUNCTION", "LOAD", "REPLACE", library_source())
    log.info(
        "loaded streamsync library %s (was %s)",
        format_version(ours),
        format_version(current) if current else "absent",
    )
    return ours


@dataclass(frozen=True, slots=True)
class Lease:
    """A ``streamsync_lease_get`` reply: the cached value, or a lease's token, or how long
    another caller's lease may still hold."""

    value: bytes | None = None
    token: str | None = None
    wait_ms: int = 0


class Library:
    """The library's functions, called on one client (a server or a cluster). A call that
    finds the library missing loads it and is sent once more."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def ensure(self) -> Version:
        """Load the library unless a newer compatible one is there (see ensure_library)."""
        return ensure_library(self.client)

    def _call(self, function: str, keys: Sequence[str], *args: Any) -> Any:
        try:
            return self.client.fcall(function, len(keys), *keys, *args)
        except redis.ResponseError as exc:
            if not is_missing_library(str(exc)):
                raise
        self.ensure()
        return self.client.fcall(function, len(keys), *keys, *args)

    def changes(self, rows: Sequence[RowWrite], tombstone_s: int) -> ChangesReply:
        """``streamsync_changes``: apply ``rows`` (of one hash slot in a cluster)."""
        keys, args, tables = _changes_arguments(rows, tombstone_s)
        return changes_reply(self._call(FN_CHANGES, keys, *args), tables)

    def split(self, table: Table) -> bool:
        """``streamsync_split``: divide the table's next bucket; False when the table changed
        meanwhile (another worker split it, or wrote into the bucket): the table knows its new
        bucket count when it was split elsewhere."""
        source = table.split_source()
        held = [as_bytes(f) for f in self.client.hkeys(source) if not is_meta(f)]
        moving = table.moving(held)
        target = table.bucket(table.buckets)
        buckets = int(
            self._call(
                FN_SPLIT, [table.meta, source, target], table.buckets, len(held), *held, *moving
            )
        )
        split = buckets == table.buckets + 1
        table.buckets = buckets
        return split

    def expire(self, table: Table, buckets: Sequence[int]) -> int:
        """``streamsync_expire``: remove the expired records of the table's ``buckets``."""
        named = [table.meta, table.overflow, *(table.bucket(b) for b in buckets)]
        return int(self._call(FN_EXPIRE, named))

    def trim(self, stream: str) -> int:
        """``streamsync_trim``: remove entries of ``stream`` every group acknowledged; returns
        how many (call again while it returns the library's per-call limit or more)."""
        return int(self._call(FN_TRIM, [stream]))

    def prune_consumer(self, stream: str, group: str, consumer: str, min_idle_ms: int) -> bool:
        """``streamsync_prune_consumer``: delete ``consumer`` from ``group`` if it holds nothing
        and has been idle ``min_idle_ms``, atomically; True when deleted."""
        return bool(self._call(FN_PRUNE_CONSUMER, [stream], group, consumer, min_idle_ms))

    def raise_hwm(self, hwm_key: str, marks: Iterable[tuple[str, str]]) -> Marks:
        """``streamsync_raise_hwm``: raise each (rule table, position) pair's high-water mark to
        at least the position, atomically; returns the marks after the call, and which tables
        had none before it."""
        pairs = list(marks)
        if not pairs:
            return Marks({}, frozenset())
        command = raise_hwm_command(hwm_key, pairs)
        return hwm_reply(pairs, self._call(FN_RAISE_HWM, [hwm_key], *command[4:]))

    def import_records(self, table: Table, records: Sequence[Imported]) -> list[RowStatus]:
        """``streamsync_import``: write ``records`` into ``table`` (addressed with the bucket
        count it knows) unless it holds them at a position as new or newer; one status per
        record (APPLIED, STALE: kept, REBUCKETED: address again). The table learns its bucket
        and record counts."""
        keys = [table.meta, table.overflow, *(table.bucket_of(r.field) for r in records)]
        args: ArgV = [str(table.buckets)]
        for record in records:
            expires = "" if record.expires is None else str(record.expires)
            args += (record.field, record.position, expires, record.placed)
        *statuses, info = self._call(FN_IMPORT, keys, *args)
        table.seen(int(info[0]), int(info[1]))
        return [RowStatus(int(status)) for status in statuses]

    def import_list(
        self, keys: Sequence[str | bytes], listed: int, ttls_ms: tuple[int, int], entries: ArgV
    ) -> tuple[int, int]:
        """``streamsync_import_list``: replace a list's 1.x order sorted set and reserve hash
        (``keys``: the list, those two, its order record and its reserve) by 2.0's, given how
        many entries the list holds, its TTL and its order's, and each entry's sort key and
        value (``entries``, flat: the list's then the reserve's); returns the entries then in
        the list and in the reserve, (-1, -1) when the 1.x order was converted already."""
        args: ArgV = [str(listed), str(ttls_ms[0]), str(ttls_ms[1]), *entries]
        listed, reserved = self.client.fcall(FN_IMPORT_LIST, len(keys), *keys, *args)
        return int(listed), int(reserved)

    def lease_get(self, key: str, state_prefix: str, lease_ms: int) -> Lease:
        """``streamsync_lease_get``: the key's value, or a lease to fill it (cache-aside)."""
        what, data = self._call(FN_LEASE_GET, [key], state_prefix, lease_ms)
        kind = _text(what)
        if kind == "hit":
            return Lease(value=as_bytes(data))
        if kind == "lease":
            return Lease(token=_text(data))
        return Lease(wait_ms=max(0, int(data)))

    def lease_fill(
        self,
        key: str,
        state_prefix: str,
        token: str,
        value: str | bytes | None,
        ttl_ms: int = 0,
    ) -> bool:
        """``streamsync_lease_fill``: write ``value`` if the lease ``token`` still holds (None:
        give the lease up); whether it did."""
        extra = () if value is None else (value, ttl_ms)
        return bool(self._call(FN_LEASE_FILL, [key], state_prefix, token, *extra))

    def mark_epoch(self, epochs_key: str, stream: str) -> tuple[int, str]:
        """``streamsync_mark_epoch``: start a new resync epoch for ``stream``; returns the epoch
        and the id of the last entry before it."""
        epoch, after = self._call(FN_MARK_EPOCH, [epochs_key, stream])
        return int(epoch), _text(after)
