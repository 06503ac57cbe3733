"""Remove everything rules derived from a table, up to a position: TRUNCATE, and the end of a
resync.

Every rule keeps a record of each row in its buckets (``streamsync.buckets``): of each key, for
rules keyed by primary key; of each row and where it is placed, for the others. A sweep walks the
buckets and removes each row through the library at the sweep's position, so a row written by a
newer change (after the TRUNCATE, or refreshed by the resync's re-snapshot) stays, and a late
replay of an older change finds a tombstone and cannot bring a row back. Nothing scans the
keyspace, except for invalidate rules, whose keys the application writes: those are found with a
non-blocking SCAN over the key template's pattern.

Stream rules keep what they appended: a TRUNCATE appends a truncate event to those whose key is
fixed instead.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from typing import TypeVar

import redis

from streamsync.buckets import (
    META_BUCKETS,
    META_LOSSY,
    MOVING_ROW,
    Table,
    as_bytes,
    as_text,
    is_meta,
    record_name,
)
from streamsync.config import Mode, Rule, TargetType
from streamsync.functions import Library, RowStatus, RowWrite
from streamsync.keys import CLUSTER_SLOTS, glob_escape, rule_slot
from streamsync.mapping import Planner

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Rows removed per function call.
SWEEP_CHUNK = 500


class Sweeper:
    """Removes what the rules of a table placed, up to a position."""

    def __init__(
        self, client: redis.Redis | redis.RedisCluster, planner: Planner, tombstone_s: int
    ) -> None:
        self.client = client
        self.library = Library(client)
        self.planner = planner
        self.tombstone_s = tombstone_s

    def truncate(self, table: str, position: str) -> int:
        """TRUNCATE ``table`` at ``position``: remove what its rules placed before it, and
        publish a truncate event to its stream rules with a fixed key. Returns the rows removed."""
        removed = self.remove_older(table, position)
        for rule in self.planner.rules_by_table.get(table, ()):
            # a stream per row group (a key over columns) has no one stream to tell
            if rule.type is TargetType.STREAM and rule.template.is_static:
                self._apply([self.planner.truncate_event(rule, table, position)])
        return removed

    def remove_older(self, table: str, position: str) -> int:
        """Remove every key, member and entry the rules of ``table`` placed with a position
        older than ``position``. Idempotent: safe to run again after a crash."""
        removed = 0
        for rule in self.planner.rules_by_table.get(table, ()):
            if rule.mode is Mode.INVALIDATE:
                removed += self._invalidate_all(rule, position)
            elif rule.keyed_per_row:
                lossy = False
                for records in self._tables(rule, moving=False):
                    removed += self._sweep_table(rule, records, position)
                    lossy = lossy or bool(self.client.hget(records.meta, META_LOSSY))
                if lossy:
                    # records of the rule were evicted: keys without one are found by their name
                    removed += self._invalidate_all(rule, position)
                # rows whose key is over non-key columns: removed through where they are
                for records in self._tables(rule, moving=True):
                    removed += self._sweep_rows(records, position, MOVING_ROW)
            elif rule.type is not TargetType.STREAM:
                for records in self._tables(rule, moving=False):
                    removed += self._sweep_rows(records, position)
        return removed

    def _tables(self, rule: Rule, *, moving: bool) -> list[Table]:
        """The rule's tables that hold records: one, or in a cluster one per hash slot in use
        (the one its keys are pinned to, if they are)."""
        tables = self.planner.tables
        pinned = rule_slot(rule)
        if moving and self.planner.cluster and pinned is None:
            # the planner refuses a moving row of a rule that pins no slot
            return []
        if not self.planner.cluster or pinned is not None:
            found = [tables.moving(rule) if moving else tables.table(rule)]
        else:
            of_slot = tables.moving_of_slot if moving else tables.table_of_slot
            found = [of_slot(rule, slot) for slot in range(CLUSTER_SLOTS)]
        pipe = self.client.pipeline(transaction=False)
        for table in found:
            pipe.exists(table.meta)
        found = [t for t, n in zip(found, pipe.execute(), strict=True) if n]
        for table in found:
            table.buckets = int(self.client.hget(table.meta, META_BUCKETS) or 1)
        return found

    def _sweep_table(self, rule: Rule, table: Table, position: str) -> int:
        prefix = rule.template.literals[0]
        removed = 0
        for fields in self._fields(table):
            names = [prefix + record_name(as_text(f)) for f in fields]
            for chunk in _chunks(names, SWEEP_CHUNK):
                removed += self._apply([self.planner.key_removal(rule, k, position) for k in chunk])
        if removed:
            log.info("%s: removed %d key(s) written before %s", rule.state_name, removed, position)
        return removed

    def _sweep_rows(self, table: Table, position: str, prefix: str = "") -> int:
        """Remove the placement of every row ``table`` holds a record of (those whose field
        starts with ``prefix``)."""
        removed = 0
        start = prefix.encode()
        for fields in self._fields(table):
            rows = [f for f in fields if f.startswith(start)]
            for chunk in _chunks(rows, SWEEP_CHUNK):
                removed += self._apply([self.planner.removal(table, f, position) for f in chunk])
        if removed:
            log.info("%s: removed %d row(s) placed before %s", table.name, removed, position)
        return removed

    def _invalidate_all(self, rule: Rule, position: str) -> int:
        """Remove every key matching ``rule``'s template (a non-blocking SCAN): the keys of an
        invalidate rule, which the application writes, or of a rule whose records were
        evicted."""
        pattern, matcher = _template_pattern(rule)
        removed = 0
        keys = (k.decode() for k in self.client.scan_iter(match=pattern, count=1000))
        for chunk in _chunks((k for k in keys if matcher.fullmatch(k)), SWEEP_CHUNK):
            removed += self._apply([self.planner.key_removal(rule, k, position) for k in chunk])
        return removed

    def _fields(self, table: Table) -> Iterator[list[bytes]]:
        """The record fields of each bucket of ``table``, the buckets that workers' splits add
        meanwhile included (a split moves records into the new last bucket only)."""
        swept = 0
        while True:
            count = int(self.client.hget(table.meta, META_BUCKETS) or 1)
            if swept >= count:
                return
            for index in range(swept, count):
                records = self.client.hgetall(table.bucket(index))
                yield [
                    as_bytes(f)
                    for f, v in records.items()
                    if not is_meta(f) and _holds_a_row(as_bytes(v), table.ttl_ms)
                ]
            swept = count

    def _apply(self, rows: list[RowWrite]) -> int:
        removed = 0
        while rows:
            replies = self.library.changes(rows, self.tombstone_s).rows
            errors = [r for r in replies if isinstance(r, str)]
            if errors:
                raise redis.ResponseError(f"sweep failed for {len(errors)} row(s): {errors[0]}")
            removed += sum(1 for r in replies if r is RowStatus.APPLIED)
            # a worker split the table meanwhile: those rows go again, readdressed
            rows = [row for row, r in zip(rows, replies, strict=True) if r is RowStatus.REBUCKETED]
        return removed


def _holds_a_row(value: bytes, ttl_ms: int) -> bool:
    """Whether a record may still stand for a cached row (a tombstone does not: its row is gone
    already, nothing is left to sweep). A record that expires is a tombstone unless it says where
    a row is placed, or its rule gives rows a TTL (their live records expire too)."""
    mark = value.find(b"~")
    if mark < 0:
        return True
    return ttl_ms > 0 or any(65 <= c <= 90 for c in value[mark:])


def _template_pattern(rule: Rule) -> tuple[str, re.Pattern[str]]:
    """The SCAN pattern and the exact matcher of an invalidate rule's keys. Column values are
    taken to hold no ':' so that ``user:{id}`` does not match ``user:42:sessions``."""
    template = rule.template
    glob = "".join(glob_escape(lit) + "*" for lit in template.literals[:-1])
    glob += glob_escape(template.literals[-1])
    regex = "".join(re.escape(lit) + "[^:]+" for lit in template.literals[:-1])
    regex += re.escape(template.literals[-1])
    return glob, re.compile(regex)


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
