"""The TRUNCATE barrier: a TRUNCATE waits until every older entry of its stream is settled, then
sweeps its table's rows (``streamsync.sweep``). Run before a change it follows, it would let that
change bring a row back; the worker goes on applying newer entries meanwhile, since a TRUNCATE
removes only what is older than it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import redis

from streamsync.sweep import Sweeper
from streamsync.worker.core import Truncate
from streamsync.worker.entry import Entry
from streamsync.worker.session import Session

log = logging.getLogger(__name__)

#: Pending entries read per XPENDING page while checking what is older than a TRUNCATE.
PENDING_PAGE = 1000


@dataclass(slots=True)
class BarrierResult:
    """The TRUNCATEs a pass applied, and those that failed (``error`` set)."""

    applied: list[Entry] = field(default_factory=list)
    failed: list[Entry] = field(default_factory=list)


class TruncateBarrier:
    """TRUNCATEs waiting for the older entries of their streams."""

    def __init__(self, group: str, consumer: str) -> None:
        self.group = group
        self.consumer = consumer
        self.waiting: list[Truncate] = []

    def __bool__(self) -> bool:
        return bool(self.waiting)

    def clear(self) -> None:
        """Forget the waiting TRUNCATEs (after a reconnect they are re-read from the pending
        list)."""
        self.waiting.clear()

    def run(
        self,
        session: Session,
        sweeper: Callable[[], Sweeper],
        settled: Mapping[str, Collection[bytes]],
    ) -> BarrierResult:
        """Apply the TRUNCATEs whose streams have settled every older entry (``settled``: ids
        acknowledged in this worker's next round trip, per stream); the others wait."""
        result = BarrierResult()
        waiting: list[Truncate] = []
        blocked: set[str] = set()
        for truncate in self.waiting:
            entry = truncate.entry
            if entry.stream in blocked or not self._older_settled(
                session, entry, settled.get(entry.stream, ())
            ):
                blocked.add(entry.stream)
                waiting.append(truncate)
                continue
            try:
                removed = sweeper().truncate(truncate.table, truncate.position)
            except (redis.ConnectionError, redis.TimeoutError):
                raise
            except Exception as exc:
                # a refusal or a bug: retried on later deliveries, then dead-lettered; the loop
                # goes on either way
                log.exception("%s: truncate failed", entry.label)
                entry.error = f"truncate failed: {type(exc).__name__}: {exc}"
                result.failed.append(entry)
                continue
            log.info("%s: truncated %s, %d row(s) removed", entry.label, truncate.table, removed)
            entry.outcome = "applied"
            result.applied.append(entry)
        self.waiting = waiting
        return result

    def _older_settled(self, session: Session, entry: Entry, settled: Collection[bytes]) -> bool:
        """True when no entry of the stream older than ``entry`` awaits an ack, but those in
        ``settled``. Keeps ``entry`` from looking idle meanwhile, so no other worker reclaims
        it."""
        session.call("XCLAIM", entry.stream, self.group, self.consumer, 0, entry.id, "JUSTID")
        start = b"-"
        end = b"(" + entry.id
        while True:
            page = session.call("XPENDING", entry.stream, self.group, start, end, PENDING_PAGE)
            if any(p[0] not in settled for p in page):
                return False
            if len(page) < PENDING_PAGE:
                return True
            start = b"(" + page[-1][0]
