"""Keeping the rule tables in shape (docs/bookkeeping.md): split a table's buckets as it grows,
and remove expired records (tombstones past ``tombstone_ttl_s``, rows of a rule with ``ttl_s``
left unwritten) at a slow pace, one worker of the group at a time."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from streamsync.buckets import META_BUCKETS, META_COUNT, Table, Tables
from streamsync.config import SINGLE_VALUE_TYPES, Mode, Settings
from streamsync.keys import StateKeys
from streamsync.worker.session import Session

log = logging.getLogger(__name__)

#: How long one cycle may spend splitting buckets (the rest waits for the next cycle).
SPLIT_BUDGET_S = 0.05
#: How often the expiry pass runs, and how many buckets it reads each time.
EXPIRE_INTERVAL_S = 5.0
EXPIRE_BUCKETS_PER_PASS = 200
#: Buckets read per ``streamsync_expire`` call.
EXPIRE_BUCKETS_PER_CALL = 20
#: The expiry pass is one worker's at a time: it holds this lease, refreshed at every pass.
EXPIRE_LEASE_MS = 60_000


class Upkeep:
    """Splits and expiry over the rule tables a worker writes."""

    def __init__(self, settings: Settings, consumer: str, keys: StateKeys) -> None:
        self.settings = settings
        self.consumer = consumer
        self.keys = keys
        self._next_expire = 0.0
        self._walk: Iterator[tuple[Table, list[int]]] | None = None

    def run(self, session: Session, tables: Tables, now: float) -> None:
        """Split the tables that outgrew their buckets (within a short budget), and every few
        seconds expire the next few buckets' records."""
        deadline = time.monotonic() + SPLIT_BUDGET_S
        for table in tables:
            while table.splits_due and time.monotonic() < deadline:
                if not session.library.split(table):
                    break
        if now >= self._next_expire:
            self._next_expire = now + EXPIRE_INTERVAL_S
            if self._hold_lease(session):
                self._expire(session, tables)

    def _hold_lease(self, session: Session) -> bool:
        lease = self.keys.lease("expire")
        if session.call("SET", lease, self.consumer, "NX", "PX", EXPIRE_LEASE_MS) is not None:
            return True
        if session.call("GET", lease) == self.consumer.encode():
            session.call("PEXPIRE", lease, EXPIRE_LEASE_MS)
            return True
        return False

    def _expire(self, session: Session, tables: Tables) -> None:
        budget = EXPIRE_BUCKETS_PER_PASS
        removed = 0
        while budget > 0:
            if self._walk is None:
                self._walk = self._chunks(session, tables)
            step = next(self._walk, None)
            if step is None:
                self._walk = None
                break
            table, buckets = step
            removed += session.library.expire(table, buckets)
            budget -= len(buckets)
        if removed:
            log.info("removed %d expired record(s)", removed)

    def _chunks(self, session: Session, tables: Tables) -> Iterator[tuple[Table, list[int]]]:
        """Every bucket of every table holding records, in calls' worth."""
        for table in self._tables(tables):
            buckets, held = session.client.hmget(table.meta, [META_BUCKETS, META_COUNT])
            if buckets is None and held is None:
                continue
            count = int(buckets or 1)
            for start in range(0, count, EXPIRE_BUCKETS_PER_CALL):
                yield table, list(range(start, min(count, start + EXPIRE_BUCKETS_PER_CALL)))

    def _tables(self, tables: Tables) -> list[Table]:
        # off a cluster every rule has one table, and a single-value rule a second one if its
        # key is over non-key columns; in a cluster, those this worker has met
        if not tables.keys.cluster:
            for rule in self.settings.rules:
                tables.table(rule)
                if rule.mode is Mode.WRITE_THROUGH and rule.type in SINGLE_VALUE_TYPES:
                    tables.moving(rule)
        return list(tables)
