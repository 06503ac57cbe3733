"""The stream barrier: entries that need every older entry of their stream settled first (``Held``:
a TRUNCATE, a change of the first transaction after a snapshot) wait here, while the worker goes
on applying newer entries, then are released to the loop, which applies them.

A TRUNCATE needs every older entry applied: run before a change it follows, it would let that
change bring a row back. A held change only needs the snapshot marks of the older reads, so an
older entry waiting here (a TRUNCATE or another held change, neither a read) does not hold it:
a large first transaction after a snapshot is released at once. Each pass costs a walk of the
pending entries older than the newest one held, per stream with something held, and now and then
an XCLAIM of what is held, so that it never looks idle to the other workers' claims.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping

import redis

from streamsync.epochs import parse_id
from streamsync.sweep import Sweeper
from streamsync.worker.core import Held
from streamsync.worker.session import Session

log = logging.getLogger(__name__)

#: Pending entries read per XPENDING page while checking what is older than a held entry.
PENDING_PAGE = 1000


class StreamBarrier:
    """Held entries waiting for the older entries of their streams; they are claimed again
    every ``claim_every_s`` (well within the workers' ``claim_idle_ms``)."""

    def __init__(self, group: str, consumer: str, claim_every_s: float) -> None:
        self.group = group
        self.consumer = consumer
        self.claim_every_s = claim_every_s
        self.waiting: list[Held] = []
        self._claimed_at: dict[str, float] = {}

    def __bool__(self) -> bool:
        return bool(self.waiting)

    def clear(self) -> None:
        """Forget what waits (after a reconnect it is re-read from the pending list)."""
        self.waiting.clear()
        self._claimed_at.clear()

    def release(
        self, session: Session, settled: Mapping[str, Collection[bytes]], now: float
    ) -> list[Held]:
        """Take out the held entries whose older entries are settled (``settled``: ids
        acknowledged in this worker's next round trip, per stream); the others wait. Keeps
        every waiting entry from looking idle meanwhile (``now``: a monotonic clock's seconds),
        so no other worker reclaims it."""
        by_stream: dict[str, list[Held]] = {}
        for held in self.waiting:
            by_stream.setdefault(held.entry.stream, []).append(held)
        released: list[Held] = []
        self.waiting = []
        for stream, group in by_stream.items():
            group.sort(key=lambda h: parse_id(h.entry.id))
            if now - self._claimed_at.get(stream, -self.claim_every_s) >= self.claim_every_s:
                ids = [h.entry.id for h in group]
                session.call("XCLAIM", stream, self.group, self.consumer, 0, *ids, "JUSTID")
                self._claimed_at[stream] = now
            ready = self._ready(session, stream, group, set(settled.get(stream, ())))
            released += group[:ready]
            self.waiting += group[ready:]
        return released

    def _ready(self, session: Session, stream: str, group: list[Held], settled: set[bytes]) -> int:
        """How many of ``group`` (held entries of ``stream``, oldest first) may go."""
        ids = [h.entry.id for h in group]
        # the oldest pending entry not settled (a TRUNCATE waits for it), and the oldest
        # that is neither settled nor held here (a held change waits for it)
        strict, loose = self._blockers(session, stream, ids[-1], settled, set(ids))
        for n, held in enumerate(group):
            blocker = strict if held.truncate else loose
            if blocker is not None and blocker < parse_id(held.entry.id):
                return n
        return len(group)

    def _blockers(
        self, session: Session, stream: str, newest: bytes, settled: set[bytes], held: set[bytes]
    ) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        strict: tuple[int, int] | None = None
        start = b"-"
        end = b"(" + newest
        while True:
            page = session.call("XPENDING", stream, self.group, start, end, PENDING_PAGE)
            for item in page:
                eid = item[0]
                if eid in settled:
                    continue
                if strict is None:
                    strict = parse_id(eid)
                if eid not in held:
                    return strict, parse_id(eid)
            if len(page) < PENDING_PAGE:
                return strict, None
            start = b"(" + page[-1][0]


def sweep_truncate(sweeper: Callable[[], Sweeper], held: Held, position: str) -> bool:
    """Sweep the table of a released TRUNCATE at ``position``; False (``error`` set on its
    entry) when it failed: a refusal or a bug, retried on later deliveries, then dead-lettered.
    A lost connection is raised."""
    entry, table = held.entry, held.event.table
    try:
        removed = sweeper().truncate(table, position)
    except (redis.ConnectionError, redis.TimeoutError):
        raise
    except Exception as exc:
        log.exception("%s: truncate failed", entry.label)
        entry.error = f"truncate failed: {type(exc).__name__}: {exc}"
        return False
    log.info("%s: truncated %s, %d row(s) removed", entry.label, table, removed)
    entry.outcome = "applied"
    return True
