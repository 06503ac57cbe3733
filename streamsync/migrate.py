"""Library 1.x bookkeeping converted into 2.0 records: ``streamsync migrate``.

Run with every worker stopped (capture may go on writing to the streams). In the Redis holding
the cache, it

1. marks the layout ``migrating`` (``streamsync.layout``: a 2.0 worker refuses to start until it
   is done) and loads the 2.0 library;
2. reads which 1.x indexes exist (``SCAN``), to tell the single-value rules that keyed rows by
   primary key from those whose keys moved;
3. converts every placement record of the configured rules (sets, sorted sets, lists, streams,
   keys that move) into a record of its rule's table, through ``streamsync_import``;
4. converts each list's order sorted set and reserve hash into 2.0's order record and reserve,
   atomically (``streamsync_import_list``);
5. converts every position record of a key the configured single-value and invalidate rules
   render into a record of each such rule's table (1.x shared one between rules);
6. deletes the 1.x keys it accounts for (``UNLINK``), and marks the layout ``2``.

Positions go through ``streamsync.positions.from_v1``; a record's TTL becomes its expiry
(``~<unix seconds>``); the rule tables are built by the library, split as they grow, as a
worker's are. Every step can run again: a record is written unless one as new is there, a list
converted already is left alone, and 1.x keys are deleted only once everything was converted, so
a run cut short and run again ends where one run would have. In a Redis Cluster the keys are
found on every primary and each call keeps to one slot: rules whose rows move or gather are
pinned to a slot (as 1.x required).

1.x keys no configured rule accounts for (a rule removed since, or renamed) are left in place and
counted, with a few names.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from streamsync import layout, v1
from streamsync.buckets import MOVING_KEY, MOVING_ROW, Table, Tables, as_bytes
from streamsync.config import SINGLE_VALUE_TYPES, Mode, Rule, Settings, TargetType
from streamsync.errors import MigrationError
from streamsync.functions import ArgV, Client, Imported, Library, RowStatus
from streamsync.keys import StateKeys, glob_escape, key_slot, rule_slot

log = logging.getLogger(__name__)

#: Keys asked for per SCAN call, records per ``streamsync_import`` call.
SCAN_COUNT = 1000
IMPORT_CHUNK = 500
#: Names of 1.x keys left in place quoted in the report.
MAX_EXAMPLES = 5

#: Connections whose name starts with this are streamsync's (``streamsync:<consumer>``).
CLIENT_PREFIX = "streamsync:"
#: The connection name of ``streamsync migrate`` itself, and of a worker's metrics server.
MIGRATE_CLIENT = "streamsync:migrate"
_NOT_WORKERS = frozenset({MIGRATE_CLIENT, "streamsync:metrics"})


@dataclass
class Report:
    """What a migration converted, wrote, deleted and left."""

    #: Records converted, by what they keep: ``key`` (a single-value rule's key), ``set``,
    #: ``zset``, ``list``, ``stream``, ``moving row``, ``moving key``, ``tombstone`` (a row
    #: placed nowhere), ``invalidated``.
    converted: Counter[str] = field(default_factory=Counter)
    #: Of those, written, and kept (a record as new was there: a run before this one).
    written: int = 0
    kept: int = 0
    lists: int = 0
    list_entries: int = 0
    reserve_entries: int = 0
    #: Lists out of step with their 1.x order (edited outside streamsync): deleted.
    lists_reset: int = 0
    #: Records converted without where their row is (a key no longer of the rule's template).
    unplaced: int = 0
    #: Records that could not be read (not a 1.x position or placement): deleted.
    unreadable: int = 0
    deleted: int = 0
    #: 1.x keys no configured rule accounts for: left in place.
    left: int = 0
    examples: list[str] = field(default_factory=list)

    def note(self, what: str, name: bytes) -> None:
        """Quote ``name`` (a few, at most) as an example of ``what``."""
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{what}: {name.decode(errors='replace')}")

    def summary(self) -> str:
        """One line per figure, for the terminal."""
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.converted.items()))
        lines = [
            f"records converted: {sum(self.converted.values())}" + (f" ({kinds})" if kinds else ""),
            f"records written: {self.written}, kept (as new already there): {self.kept}",
            f"lists converted: {self.lists} ({self.list_entries} entries in lists,"
            f" {self.reserve_entries} in reserves; {self.lists_reset} out of step, deleted)",
            f"1.x keys deleted: {self.deleted}",
        ]
        if self.unplaced:
            lines.append(
                f"records converted without their placement: {self.unplaced} (a key or member"
                " the rule's template no longer renders: it stays where it is)"
            )
        if self.unreadable:
            lines.append(f"1.x records unreadable, deleted: {self.unreadable}")
        if self.left:
            lines.append(
                f"1.x keys of no configured rule, left in place: {self.left} (delete them once"
                " sure no rule needs them)"
            )
        lines += [f"  {example}" for example in self.examples]
        return "\n".join(lines)


#: Called after every chunk of work with the phase's name and the report so far (the CLI prints
#: progress; a test interrupts a run by raising).
Progress = Callable[[str, Report], None]


def _quiet(_phase: str, _report: Report) -> None:
    pass


def _template_pattern(rule: Rule) -> re.Pattern[bytes]:
    literals = [re.escape(literal.encode()) for literal in rule.template.literals]
    return re.compile(b"(?s)" + b"(.*)".join(literals))


def _middle(text: bytes, around: tuple[str, str]) -> bytes | None:
    before, after = around[0].encode(), around[1].encode()
    if len(text) < len(before) + len(after) or not (
        text.startswith(before) and text.endswith(after)
    ):
        return None
    return text[len(before) : len(text) - len(after)]


def stored_field(name: bytes) -> bytes:
    """The bucket field of the record named ``name`` (``buckets.record_field``, on bytes)."""
    return b"#" + name if name.startswith(b"#") else name


def sort_token(stored: bytes) -> bytes:
    """A list entry's row token in its sort key (the library's ``sort_token``)."""
    if stored.isdigit():
        return f"{len(stored):02d}".encode() + stored
    return stored


def _sized(middle: bytes) -> bytes:
    return str(len(middle)).encode() + b":" + middle


def scan(
    client: Client, pattern: str, kind: str | None = None, *, count: int = SCAN_COUNT
) -> Iterator[list[bytes]]:
    """The keys matching ``pattern`` (of type ``kind``), ``count`` at a time, sorted by hash
    slot; in a Cluster, one primary's after another's."""
    if isinstance(client, redis.RedisCluster):
        for node in client.get_primaries():
            found = client.scan_iter(match=pattern, count=count, _type=kind, target_nodes=node)
            yield from _chunks(found, count)
    else:
        yield from _chunks(client.scan_iter(match=pattern, count=count, _type=kind), count)


def _chunks(names: Iterator[Any], count: int) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    for name in names:
        chunk.append(as_bytes(name))
        if len(chunk) >= count:
            yield sorted(chunk, key=key_slot)
            chunk = []
    if chunk:
        yield sorted(chunk, key=key_slot)


def _values(client: Client, names: Sequence[bytes]) -> list[tuple[bytes | None, int]]:
    """Each key's value and remaining TTL in milliseconds (-1: none)."""
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.get(name)
        pipe.pttl(name)
    replies = pipe.execute()
    return [
        (None if value is None else as_bytes(value), int(ttl))
        for value, ttl in zip(replies[0::2], replies[1::2], strict=True)
    ]


@dataclass(frozen=True, slots=True)
class _Converted:
    table: Table
    record: Imported
    kind: str


class Migration:
    """One run of ``streamsync migrate`` over the Redis holding the cache (``client``);
    ``streams``: the streams' Redis, where the rules' high-water marks are raised to the newest
    position converted (None: the same Redis)."""

    def __init__(
        self,
        client: Client,
        settings: Settings,
        *,
        streams: Client | None = None,
        dry_run: bool = False,
        progress: Progress = _quiet,
        scan_count: int = SCAN_COUNT,
    ) -> None:
        self.client = client
        self.scan_count = scan_count
        self.streams = client if streams is None else streams
        self.settings = settings
        self.dry_run = dry_run
        self.progress = progress
        self.cluster = isinstance(client, redis.RedisCluster)
        self.keys = StateKeys.from_settings(settings.worker, cluster=self.cluster)
        self.tables = Tables(self.keys)
        self.library = Library(client)
        self.report = Report()
        self.tombstone_s = settings.worker.tombstone_ttl_s
        prefix = settings.worker.state_prefix
        self._placements = sorted(
            (
                (v1.placement_prefix(prefix, rule, self.cluster).encode(), rule)
                for rule in settings.rules
                if rule.mode is Mode.WRITE_THROUGH
            ),
            key=lambda pair: -len(pair[0]),
        )
        self._valued = [
            (rule, _template_pattern(rule))
            for rule in settings.rules
            if rule.mode is Mode.INVALIDATE or rule.type in SINGLE_VALUE_TYPES
        ]
        self._lists = [
            (rule, _template_pattern(rule))
            for rule in settings.rules
            if rule.type is TargetType.LIST
        ]
        #: Single-value rules that kept a 1.x key index (keyed by primary key), and those that
        #: kept a row index or placed rows (keys that move).
        self._fixed: set[str] = set()
        self._moving: set[str] = set()
        #: Per 1.x list order, the field of the row each member stands for.
        self._rows_of: dict[bytes, dict[bytes, bytes]] = {}
        self._newest: dict[str, str] = {}
        self._pending: dict[int, tuple[Table, list[Imported]]] = {}
        self._clock = (self._redis_now(), time.monotonic())

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> Report:
        """Convert, delete, mark (only count, with ``dry_run``); returns the report."""
        if not self.dry_run:
            layout.mark(self.client, self.settings, layout.MIGRATING)
            self.library.ensure()
        self._read_indexes()
        self._convert_placements()
        self._convert_lists()
        self._convert_values()
        if self.dry_run:
            return self.report
        self._raise_marks()
        self._delete()
        layout.mark(self.client, self.settings, layout.CURRENT)
        self.progress("done", self.report)
        return self.report

    def _redis_now(self) -> float:
        # records' expiry times are on Redis's clock, as the library's TIME
        if isinstance(self.client, redis.RedisCluster):
            seconds, micros = self.client.time(target_nodes=self.client.get_primaries()[0])
        else:
            seconds, micros = self.client.time()
        return int(seconds) + int(micros) / 1e6

    def _now(self) -> int:
        start, mono = self._clock
        return int(start + time.monotonic() - mono)

    def _expires(self, ttl_ms: int) -> int | None:
        return None if ttl_ms < 0 else self._now() + math.ceil(ttl_ms / 1000)

    def _scan(self, pattern: str, kind: str | None = None) -> Iterator[list[bytes]]:
        return scan(self.client, pattern, kind, count=self.scan_count)

    # -- 2. which rules keyed rows by primary key ------------------------------------------

    def _read_indexes(self) -> None:
        prefix = self.settings.worker.state_prefix
        for names in self._scan(glob_escape(prefix + "idx:") + "*"):
            for name in names:
                found = self._index_of(name)
                if found is None:
                    self._left([name])
                elif found[0] == "keys":
                    self._fixed.add(found[1].state_name)
                else:
                    self._moving.add(found[1].state_name)

    def _index_of(self, name: bytes) -> tuple[str, Rule] | None:
        """Which configured rule's 1.x index ``name`` is, and which: ``keys`` (what a rule keyed
        by primary key cached) or ``rows`` (what a rule placed)."""
        text = name.decode(errors="replace")
        prefix = self.settings.worker.state_prefix
        for rule in self.settings.rules:
            keys = v1.key_indexes(prefix, rule, cluster=False)[0]
            if text == keys or text.startswith(keys + ":{"):
                return "keys", rule
            if text == v1.row_index(prefix, rule, self.cluster):
                return "rows", rule
        return None

    # -- 3. placement records ----------------------------------------------------------------

    def _placement_rule(self, name: bytes) -> tuple[Rule, bytes] | None:
        for prefix, rule in self._placements:
            if name.startswith(prefix) and len(name) > len(prefix):
                return rule, name[len(prefix) :]
        return None

    def _convert_placements(self) -> None:
        prefix = self.settings.worker.state_prefix
        for names in self._scan(glob_escape(prefix + "pl:") + "*"):
            owned = [(name, self._placement_rule(name)) for name in names]
            mine = [(name, found) for name, found in owned if found is not None]
            self._left(name for name, found in owned if found is None)
            values = _values(self.client, [name for name, _ in mine])
            for (name, (rule, identity)), (value, ttl) in zip(mine, values, strict=True):
                if value is None:
                    continue
                try:
                    converted = self._placement(rule, identity, value, ttl)
                except ValueError as exc:
                    self._unreadable(name, exc)
                    continue
                self._add(rule, converted)
            self._flush_full()
            self.progress("placements", self.report)
        self._flush_all()

    def _placement(self, rule: Rule, identity: bytes, value: bytes, ttl: int) -> _Converted:
        raw, rest = v1.split_record(value)
        position, expires = v1.position(raw), self._expires(ttl)
        if rule.type is TargetType.STREAM or not rest:
            # placed nowhere: a tombstone, or a row published to a stream
            kind = "stream" if rule.type is TargetType.STREAM else "tombstone"
            if rule.type in SINGLE_VALUE_TYPES:
                table, stored = self._rows_table(rule), MOVING_ROW.encode() + identity
            else:
                table, stored = self._rows_table(rule), stored_field(identity)
            return self._record(table, stored, position, expires, placed=b"", kind=kind)
        where = v1.placement(rest)
        if where.kind == "M":
            return self._moving_row(rule, identity, position, expires, where)
        table = self.tables.table_of_slot(rule, self._pinned_slot(rule))
        stored = stored_field(identity)
        if where.kind == "L":
            placed = self._list_placement(table, stored, position, where)
            return self._record(table, stored, position, expires, placed=placed, kind="list")
        shape = table.shape
        key = _middle(where.key, (shape[0], shape[1]))
        member = _middle(where.member, (shape[2], shape[3]))
        expected = "T" if rule.type is TargetType.SET else "Z"
        if key is None or member is None or where.kind != expected:
            return self._record(table, stored, position, expires, placed=None, kind=str(rule.type))
        placed = where.kind.encode() + key
        if member != stored:
            named = "S" if where.kind == "T" else "Y"
            placed = named.encode() + _sized(key) + member
        return self._record(table, stored, position, expires, placed=placed, kind=str(rule.type))

    def _pinned_slot(self, rule: Rule) -> int | None:
        if not self.cluster:
            return None
        slot = rule_slot(rule)
        if slot is None:
            raise ValueError(f"rule {rule.state_name} pins no hash slot: its rows cannot move")
        return slot

    def _rows_table(self, rule: Rule) -> Table:
        slot = self._pinned_slot(rule)
        if rule.type in SINGLE_VALUE_TYPES:
            self._moving.add(rule.state_name)
            return self.tables.moving_of_slot(rule, slot)
        return self.tables.table_of_slot(rule, slot)

    def _moving_row(
        self, rule: Rule, identity: bytes, position: str, expires: int | None, where: v1.Placement
    ) -> _Converted:
        table = self._rows_table(rule)
        stored = MOVING_ROW.encode() + identity
        key = _middle(where.key, (table.shape[0], table.shape[1]))
        placed = None if key is None else b"M" + key
        return self._record(table, stored, position, expires, placed=placed, kind="moving row")

    def _list_placement(
        self, table: Table, stored: bytes, position: str, where: v1.Placement
    ) -> bytes | None:
        key = _middle(where.key, (table.shape[0], table.shape[1]))
        rows = self._rows_of.setdefault(where.order, {})
        placed = []
        for entry in where.entries:
            rows[entry] = stored
            at = v1.position(v1.entry_parts(entry)[0])
            placed.append(b"" if at == position else at.encode())
        return None if key is None else b"L" + _sized(key) + b",".join(placed)

    def _record(
        self,
        table: Table,
        stored: bytes,
        position: str,
        expires: int | None,
        *,
        placed: bytes | None,
        kind: str,
    ) -> _Converted:
        """The record to import; ``placed`` None: the row's placement could not be kept."""
        if placed is None:
            self.report.unplaced += 1
            placed = b""
        if not placed and expires is None:
            # placed nowhere: a 2.0 record of a placed row says when it may go
            expires = self._now() + self.tombstone_s
        return _Converted(table, Imported(stored, position, expires, placed), kind)

    # -- importing ----------------------------------------------------------------------------

    def _add(self, rule: Rule, converted: _Converted) -> None:
        self.report.converted[converted.kind] += 1
        position = converted.record.position
        if position > self._newest.get(rule.state_name, ""):
            self._newest[rule.state_name] = position
        table = converted.table
        self._pending.setdefault(id(table), (table, []))[1].append(converted.record)

    def _flush_full(self) -> None:
        for key, (table, records) in list(self._pending.items()):
            if len(records) >= IMPORT_CHUNK:
                del self._pending[key]
                self._import(table, records)

    def _flush_all(self) -> None:
        pending, self._pending = self._pending, {}
        for table, records in pending.values():
            self._import(table, records)

    def _import(self, table: Table, records: list[Imported]) -> None:
        if self.dry_run:
            return
        for start in range(0, len(records), IMPORT_CHUNK):
            chunk = records[start : start + IMPORT_CHUNK]
            while chunk:
                statuses = self.library.import_records(table, chunk)
                self.report.written += statuses.count(RowStatus.APPLIED)
                self.report.kept += statuses.count(RowStatus.STALE)
                chunk = [
                    r for r, s in zip(chunk, statuses, strict=True) if s is RowStatus.REBUCKETED
                ]
                while table.splits_due and self.library.split(table):
                    pass

    # -- 4. lists ----------------------------------------------------------------------------

    def _list_rule(self, key: bytes) -> Rule | None:
        for rule, pattern in self._lists:
            if pattern.fullmatch(key):
                return rule
        return None

    def _list_of(self, order: bytes) -> bytes | None:
        """The key of a configured list rule whose 1.x order ``order`` is."""
        prefix = v1.order_prefix(self.settings.worker.state_prefix).encode()
        for key in v1.targets_of(prefix, order):
            if self._list_rule(key) is not None:
                return key
        return None

    def _convert_lists(self) -> None:
        prefix = v1.order_prefix(self.settings.worker.state_prefix)
        for names in self._scan(glob_escape(prefix) + "*", "zset"):
            for order in names:
                found = self._list_of(order)
                if found is None:
                    self._left([order])
                    continue
                try:
                    self._convert_list(order, found)
                except (ValueError, UnicodeDecodeError) as exc:
                    # its entries cannot be ordered: the list starts over, as 1.x would have
                    self._unreadable(order, exc)
                    self._drop_list(order, found)
            self.progress("lists", self.report)

    def _drop_list(self, order: bytes, key: bytes) -> None:
        if not self.dry_run:
            reserve = v1.guarded_name(
                v1.reserve_prefix(self.settings.worker.state_prefix).encode(), key
            )
            self._unlink([key, order, reserve])

    def _convert_list(self, order: bytes, key: bytes) -> None:
        reserve = v1.guarded_name(
            v1.reserve_prefix(self.settings.worker.state_prefix).encode(), key
        )
        pipe = self.client.pipeline(transaction=False)
        pipe.zrevrangebyscore(order, 0, 0)
        pipe.zrevrangebyscore(order, -1, -1)
        pipe.lrange(key, 0, -1)
        pipe.hgetall(reserve)
        pipe.pttl(key)
        pipe.pttl(order)
        listed, reserved, values, held, list_ttl, order_ttl = pipe.execute()
        self.report.lists += 1
        if len(values) != len(listed):
            # edited or expired outside streamsync: both libraries start such a list over
            self.report.lists_reset += 1
            self._unlink([key, order, reserve])
            return
        rows = self._rows_of.get(order, {})
        entries: ArgV = []
        for member, value in zip(
            [*listed, *reserved], [*values, *(held.get(m) for m in reserved)], strict=True
        ):
            if value is not None:
                raw, token = v1.entry_parts(member)
                stored = rows.get(member) or stored_field(v1.identity_of_token(token))
                entries += (v1.position(raw).encode() + sort_token(stored), value)
        self.report.list_entries += len(listed)
        self.report.reserve_entries += len(entries) // 2 - len(listed)
        if not self.dry_run:
            text = key.decode()
            names: list[str | bytes] = [key, order, reserve]
            names += (self.keys.order(text), self.keys.reserve(text))
            self.library.import_list(names, len(listed), (list_ttl, order_ttl), entries)

    # -- 5. position records -----------------------------------------------------------------

    def _convert_values(self) -> None:
        prefix = self.settings.worker.position_prefix
        for names in self._scan(glob_escape(prefix) + "*"):
            owned = [(name, self._owners(name)) for name in names]
            mine = [(name, owners) for name, owners in owned if owners]
            self._left(name for name, owners in owned if not owners)
            values = _values(self.client, [name for name, _ in mine])
            for (name, owners), (value, ttl) in zip(mine, values, strict=True):
                if value is None:
                    continue
                try:
                    position = v1.position(v1.split_record(value)[0])
                except ValueError as exc:
                    self._unreadable(name, exc)
                    continue
                for rule, target in owners:
                    for converted in self._value_records(rule, target, position, ttl):
                        self._add(rule, converted)
            self._flush_full()
            self.progress("keys", self.report)
        self._flush_all()

    def _owners(self, name: bytes) -> list[tuple[Rule, bytes]]:
        """The rules whose keys ``name`` is the position record of, each with the key."""
        prefix = self.settings.worker.position_prefix.encode()
        return [
            (rule, target)
            for target in v1.targets_of(prefix, name)
            for rule, pattern in self._valued
            if pattern.fullmatch(target)
        ]

    def _value_records(
        self, rule: Rule, target: bytes, position: str, ttl: int
    ) -> Iterator[_Converted]:
        expires = self._expires(ttl)
        slot = key_slot(target) if self.cluster else None
        if rule.mode is Mode.INVALIDATE or rule.state_name not in self._moving:
            table = self.tables.table_of_slot(rule, slot)
            stored = stored_field(target[len(rule.template.literals[0].encode()) :])
            kind = "invalidated" if rule.mode is Mode.INVALIDATE else "key"
            if kind == "invalidated" and expires is None:
                expires = self._now() + self.tombstone_s
            yield _Converted(table, Imported(stored, position, expires), kind)
        moving = rule.state_name in self._moving or rule.state_name not in self._fixed
        if rule.mode is Mode.WRITE_THROUGH and moving:
            # a key that moves between rows: the position of the last change writing it, kept
            # in the table of where the rule's rows are
            pinned = rule_slot(rule) if self.cluster else None
            if self.cluster and pinned is None:
                return
            table = self.tables.moving_of_slot(rule, pinned)
            key = _middle(target, (table.shape[0], table.shape[1]))
            if key is not None:
                stored = MOVING_KEY.encode() + key
                yield _Converted(table, Imported(stored, position, expires), "moving key")

    # -- 6. cleanup --------------------------------------------------------------------------

    def _raise_marks(self) -> None:
        if self._newest:
            Library(self.streams).raise_hwm(self.keys.hwm, sorted(self._newest.items()))

    def _delete(self) -> None:
        prefix = self.settings.worker.state_prefix
        for names in self._scan(glob_escape(prefix + "pl:") + "*"):
            self._unlink([n for n in names if self._placement_rule(n) is not None])
        for names in self._scan(glob_escape(self.settings.worker.position_prefix) + "*"):
            self._unlink([n for n in names if self._owners(n)])
        for names in self._scan(glob_escape(prefix + "idx:") + "*"):
            self._unlink([n for n in names if self._index_of(n) is not None])
        reserves = v1.reserve_prefix(prefix).encode()
        for names in self._scan(glob_escape(reserves.decode()) + "*", "hash"):
            self._unlink(
                [n for n in names if any(self._list_rule(k) for k in v1.targets_of(reserves, n))]
            )

    def _unlink(self, names: list[bytes]) -> None:
        if not names or self.dry_run:
            return
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.unlink(name)
        self.report.deleted += sum(int(n) for n in pipe.execute())
        self.progress("delete", self.report)

    # -- the report ----------------------------------------------------------------------------

    def _left(self, names: Iterator[bytes] | list[bytes]) -> None:
        for name in names:
            self.report.left += 1
            self.report.note("no configured rule", name)

    def _unreadable(self, name: bytes, exc: ValueError) -> None:
        self.report.unreadable += 1
        self.report.note(f"unreadable ({exc})", name)
        log.warning("%s: not a 1.x record: %s", name.decode(errors="replace"), exc)


def _client_names(client: Client) -> list[str]:
    if isinstance(client, redis.RedisCluster):
        cluster = client
        listed: list[dict[str, str]] = []
        for node in cluster.get_primaries():
            listed += cluster.client_list(target_nodes=node)
        return [c.get("name", "") for c in listed]
    return [c.get("name", "") for c in client.client_list()]


def live_workers(streams: Client, target: Client | None, settings: Settings) -> list[str]:
    """What says a worker runs: the liveness marks 2.0 workers keep in the streams' Redis, and
    the connections 1.x and 2.0 workers name ``streamsync:<consumer>`` in either Redis.
    MigrationError when Redis refuses to list its connections (this user may not)."""
    found = [
        name.decode(errors="replace")
        for names in scan(streams, glob_escape(settings.worker.state_prefix + "alive:") + "*")
        for name in names
    ]
    for client in (streams,) if target is None or target is streams else (streams, target):
        try:
            names = _client_names(client)
        except redis.ResponseError as exc:
            raise MigrationError(
                f"cannot list Redis's connections to see whether workers run ({exc}): grant"
                " CLIENT LIST, or stop every worker and pass --force"
            ) from None
        found += [
            f"connection {n}"
            for n in names
            if n.startswith(CLIENT_PREFIX) and n not in _NOT_WORKERS
        ]
    return found


def migrate(
    client: Client,
    settings: Settings,
    *,
    streams: Client | None = None,
    dry_run: bool = False,
    progress: Progress = _quiet,
) -> Report:
    """Convert the 1.x bookkeeping of ``settings``'s rules in ``client`` (the Redis holding the
    cache) into 2.0 records (see the module's docstring); ``dry_run``: only count."""
    return Migration(client, settings, streams=streams, dry_run=dry_run, progress=progress).run()
