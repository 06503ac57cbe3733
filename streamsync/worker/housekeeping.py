"""A worker's chores beside applying, each on its own clock: discover new streams, reclaim idle
entries (a crashed worker's, or our own failed ones awaiting a retry), trim acknowledged entries,
watch memory, prune consumers that went away, and keep this worker's liveness mark fresh."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

from streamsync.config import Settings
from streamsync.discovery import find_streams
from streamsync.keys import StateKeys
from streamsync.worker.counters import Counters
from streamsync.worker.entry import Entry, from_items
from streamsync.worker.session import Session

log = logging.getLogger(__name__)

#: Most entries one claim pass takes over, in batch_size pages.
MAX_CLAIM_PAGES = 10
#: Share of maxmemory above which the worker warns and trims at every cycle.
MEMORY_PRESSURE = 0.9
#: Seconds between memory warnings.
MEMORY_WARNING_INTERVAL_S = 60.0
#: Consumers idle this long with nothing pending are removed from the group.
CONSUMER_PRUNE_IDLE_MS = 3_600_000
#: Entries read per XPENDING page.
PENDING_PAGE = 1000
#: How often a worker refreshes its liveness mark.
HEARTBEAT_INTERVAL_S = 2.0
#: The mark outlives its last refresh by this much, beyond one blocking read.
HEARTBEAT_GRACE_MS = 10_000


def heartbeat_ttl_ms(block_ms: int) -> int:
    """How long a liveness mark lives after its refresh: a live worker refreshes it at least
    once per cycle, and a cycle may block on XREADGROUP for ``block_ms``."""
    return block_ms + HEARTBEAT_GRACE_MS


@dataclass(slots=True)
class _Clock:
    discover: float = 0.0
    claim: float = 0.0
    trim: float = 0.0
    prune: float = 0.0
    heartbeat: float = 0.0
    memory_warning: float = 0.0


class Housekeeper:
    """The chores of one worker over its list of streams (which discovery extends)."""

    def __init__(
        self,
        settings: Settings,
        consumer: str,
        streams: list[str],
        keys: StateKeys,
        counters: Counters,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.streams = streams
        self.keys = keys
        self.counters = counters
        self.group = settings.source.group
        self._next = _Clock()
        self._claim_cursor: dict[str, bytes] = {}

    # -- groups and streams ----------------------------------------------------------------

    def ensure_group(self, session: Session, stream: str) -> None:
        """Create the consumer group on ``stream`` (and the stream) unless it exists."""
        try:
            session.client.xgroup_create(
                stream, self.group, id=self.settings.source.start, mkstream=True
            )
            log.info("created group %s on %s at %s", self.group, stream, self.settings.source.start)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def ensure_groups(self, session: Session) -> None:
        """The group on every stream (discovering streams first when configured by prefix)."""
        if self.settings.source.stream_prefix is not None:
            self.discover(session, 0.0)
        for stream in self.streams:
            self.ensure_group(session, stream)

    def discover(self, session: Session, now: float) -> None:
        """Add the streams the prefix finds that are not consumed yet."""
        found = find_streams(session.client, self.settings.source.stream_prefix or "")
        for stream in found:
            if stream not in self.streams:
                self.ensure_group(session, stream)
                self.streams.append(stream)
                log.info("discovered stream %s", stream)
        self._next.discover = now + self.settings.source.discover_interval_s

    # -- the periodic chores ---------------------------------------------------------------

    def run_due(self, session: Session, now: float, backlog: list[Entry]) -> None:
        """Run the chores whose time has come; reclaimed entries are appended to ``backlog``.
        A refusal is logged, never raised: the chores must not stop the applying."""
        try:
            self._run_due(session, now, backlog)
        except redis.ResponseError as exc:
            log.error("housekeeping failed: %s", exc)

    def _run_due(self, session: Session, now: float, backlog: list[Entry]) -> None:
        worker = self.settings.worker
        nxt = self._next
        if now >= nxt.heartbeat:
            self.heartbeat(session)
            nxt.heartbeat = now + HEARTBEAT_INTERVAL_S
        if self.settings.source.stream_prefix is not None and now >= nxt.discover:
            self.discover(session, now)
        if now >= nxt.claim:
            self.claim(session, backlog)
            nxt.claim = now + worker.claim_interval_ms / 1000
        if worker.trim and now >= nxt.trim:
            self.trim(session)
            nxt.trim = now + worker.trim_interval_ms / 1000
            if self._memory_pressed(session, now):
                nxt.trim = now
        if now >= nxt.prune:
            self.prune_consumers(session)
            nxt.prune = now + CONSUMER_PRUNE_IDLE_MS / 1000 / 10

    def heartbeat(self, session: Session) -> None:
        """Refresh this worker's liveness mark."""
        ttl = heartbeat_ttl_ms(self.settings.worker.block_ms)
        session.call("SET", self.keys.alive(self.group, self.consumer), "1", "PX", ttl)

    def claim(self, session: Session, backlog: list[Entry]) -> None:
        """Take over entries idle longer than claim_idle_ms, a few pages per pass so that a
        backlog is not starved."""
        limit = MAX_CLAIM_PAGES * self.settings.worker.batch_size
        for stream in self.streams:
            for _ in range(MAX_CLAIM_PAGES):
                if len(backlog) >= limit or not self._claim_page(session, stream, backlog):
                    break

    def _claim_page(self, session: Session, stream: str, backlog: list[Entry]) -> bool:
        """One XAUTOCLAIM page; True when the scan of the pending list should go on."""
        worker = self.settings.worker
        cursor = self._claim_cursor.get(stream, b"0-0")
        try:
            reply = session.call(
                "XAUTOCLAIM",
                stream,
                self.group,
                self.consumer,
                worker.claim_idle_ms,
                cursor,
                "COUNT",
                worker.batch_size,
            )
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                self.ensure_group(session, stream)
                return False
            raise
        self._claim_cursor[stream] = reply[0]
        if len(reply) > 2 and reply[2]:
            log.warning(
                "%s: %d pending entries were deleted from the stream before being applied: %s",
                stream,
                len(reply[2]),
                ", ".join(i.decode() for i in reply[2][:10]),
            )
        entries = from_items(stream, reply[1])
        if entries:
            set_deliveries(session, self.group, self.consumer, stream, entries)
            log.info("%s: claimed %d idle entries", stream, len(entries))
            self.counters.count_stream(stream, "claimed", len(entries))
            backlog.extend(entries)
        return bool(reply[0] != b"0-0")

    def recover_own_pending(self, session: Session) -> list[Entry]:
        """The entries this consumer was delivered but had not settled (after a reconnect, or a
        restart under the same consumer name), to apply again."""
        recovered: list[Entry] = []
        for stream in self.streams:
            cursor = b"0"
            while True:
                reply = session.call(
                    "XREADGROUP",
                    "GROUP",
                    self.group,
                    self.consumer,
                    "COUNT",
                    self.settings.worker.batch_size,
                    "STREAMS",
                    stream,
                    cursor,
                )
                items = reply[0][1] if reply else []
                if not items:
                    break
                entries = from_items(stream, items)
                set_deliveries(session, self.group, self.consumer, stream, entries)
                recovered += entries
                cursor = items[-1][0]
        if recovered:
            log.info("re-applying %d entries this consumer held", len(recovered))
        return recovered

    def trim(self, session: Session) -> None:
        """Remove the entries every group has acknowledged."""
        for stream in self.streams:
            removed = session.library.trim(stream)
            if removed:
                log.debug("%s: trimmed %d acknowledged entries", stream, removed)

    def _memory_pressed(self, session: Session, now: float) -> bool:
        """Backpressure: near ``maxmemory``, say so (at most once a minute) and trim at every
        cycle until it eases. Unacknowledged entries are never deleted: a full Redis makes
        writes fail with OOM, which the worker retries with backoff until memory frees."""
        if not isinstance(session.client, redis.Redis):
            return False
        memory = session.client.info("memory")
        limit = int(memory.get("maxmemory") or 0)
        used = int(memory.get("used_memory") or 0)
        pressed = limit > 0 and used >= MEMORY_PRESSURE * limit
        if pressed and now >= self._next.memory_warning:
            log.warning(
                "redis memory at %.0f%% of maxmemory (%d of %d bytes): trimming acknowledged"
                " entries at every cycle; unacknowledged entries are kept",
                100 * used / limit,
                used,
                limit,
            )
            self._next.memory_warning = now + MEMORY_WARNING_INTERVAL_S
        return pressed

    def prune_consumers(self, session: Session) -> None:
        """Remove consumers idle for an hour with nothing pending (workers that crashed:
        those that stop cleanly leave the group themselves)."""
        for stream in self.streams:
            try:
                consumers = session.client.xinfo_consumers(stream, self.group)
            except redis.ResponseError:
                continue
            for c in consumers:
                name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                if (
                    name != self.consumer
                    and c["pending"] == 0
                    and c["idle"] >= CONSUMER_PRUNE_IDLE_MS
                    and session.library.prune_consumer(
                        stream, self.group, name, CONSUMER_PRUNE_IDLE_MS
                    )
                ):
                    log.info("%s: removed consumer %s, idle with nothing pending", stream, name)

    def leave(self, session: Session) -> None:
        """On a clean stop: drop the liveness mark, and leave the group of every stream where
        this consumer holds nothing (atomically checked: a pending entry is never lost)."""
        session.call("DEL", self.keys.alive(self.group, self.consumer))
        for stream in self.streams:
            if session.library.prune_consumer(stream, self.group, self.consumer, 0):
                log.info("%s: left group %s (nothing pending)", stream, self.group)
            else:
                log.info("%s: entries pending to this consumer: it stays in the group", stream)

    def drained(self, session: Session) -> bool:
        """Whether no entry of any stream awaits an acknowledgement in the group."""
        return all(
            not session.client.xpending(stream, self.group)["pending"] for stream in self.streams
        )


def set_deliveries(
    session: Session, group: str, consumer: str, stream: str, entries: list[Entry]
) -> None:
    """Read each entry's delivery count from the group's pending list (``entries`` in id
    order)."""
    wanted = {entry.id for entry in entries}
    counts: dict[bytes, int] = {}
    start, end = entries[0].id, entries[-1].id
    while len(counts) < len(wanted):
        page = session.call("XPENDING", stream, group, start, end, PENDING_PAGE, consumer)
        counts.update((eid, int(n)) for eid, _, _, n in page if eid in wanted)
        if len(page) < PENDING_PAGE:
            break
        start = b"(" + page[-1][0]
    for entry in entries:
        entry.deliveries = counts.get(entry.id, entry.deliveries)
