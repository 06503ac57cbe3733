"""The consumer-group loop: connect, read, apply, acknowledge, and stop cleanly.

Every cycle is one round trip to Redis (``RoundTrip``), built from named groups of commands: the
snapshot marks of batch N's reads, the batch calls applying batch N, the dead letters and
acknowledgements settled so far, the status counters, the XREADGROUP fetching batch N+1, and the
resync epochs. The batch calls go to the Redis holding the cache (``target``), everything else to
the streams' Redis; with a target of its own, both get their commands before either reply is read.
While Redis works on it, the worker decodes and plans the entries the previous round trip read
(``BatchCore``); then it settles batch N from the replies. So batch N's acknowledgements ride with
the round trip after the one that applied it, once its per-row results are known. The read blocks
only when nothing awaits an acknowledgement, so an acknowledgement is never held behind an idle
stream; on a Redis Cluster it never blocks (one read per stream) and an idle worker polls instead.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections import Counter
from types import FrameType
from typing import Any

import redis

from streamsync import layout, redisjson
from streamsync.config import Settings
from streamsync.epochs import Epochs
from streamsync.errors import (
    ConfigError,
    ExitCode,
    LegacyLayoutError,
    LibraryIncompatibleError,
    PoisonEntryError,
)
from streamsync.events import Decoder
from streamsync.functions import Command, mark_snapshot_command
from streamsync.keys import StateKeys
from streamsync.latency import LatencySamples
from streamsync.mapping import Planner
from streamsync.retry import backoff
from streamsync.snapshots import Snapshots
from streamsync.sweep import Sweeper
from streamsync.worker import deadletters
from streamsync.worker.barrier import StreamBarrier, sweep_truncate
from streamsync.worker.core import BatchCore, Prepared, Settlement, SnapshotMark
from streamsync.worker.counters import Counters, CountKey, WorkerObserver
from streamsync.worker.entry import Entry, from_read
from streamsync.worker.guard import Guards
from streamsync.worker.housekeeping import Housekeeper
from streamsync.worker.policy import TargetPolicy
from streamsync.worker.roundtrip import Replies, RoundTrip
from streamsync.worker.session import Session, Sessions, open_sessions
from streamsync.worker.upkeep import Upkeep

log = logging.getLogger(__name__)

#: How long a graceful stop may spend applying what is in hand.
FINISH_BUDGET_S = 2.0
#: How long a worker on a Redis Cluster waits before reading idle streams again (its reads
#: cannot block on several streams at once).
CLUSTER_POLL_MS = 50
#: The socket timeout's margin over a blocking read.
READ_TIMEOUT_MARGIN_S = 5.0
#: How many times per ``claim_idle_ms`` the entries the barrier holds are claimed again.
BARRIER_CLAIMS_PER_IDLE = 4


def default_consumer_name() -> str:
    """``<hostname>-<pid>``: unique per live process, readable in XINFO CONSUMERS."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    """A consumer-group worker applying Debezium change events to Redis."""

    def __init__(
        self,
        settings: Settings,
        consumer: str | None = None,
        *,
        drain: bool = False,
        observer: WorkerObserver | None = None,
    ) -> None:
        self.settings = settings
        self.observer = observer
        self.consumer = consumer or default_consumer_name()
        self.drain = drain
        self.reconnects = 0
        self._group = settings.source.group
        self._keys = StateKeys.from_settings(settings.worker)
        self.counters = Counters(self._keys, self._group, observer)
        self._epochs = Epochs()
        self._snapshots = Snapshots()
        self._core = BatchCore(
            Decoder(settings.source.format, settings.source.null_marker),
            Planner.from_settings(settings),
            self._epochs,
            tombstone_s=settings.worker.tombstone_ttl_s,
            max_deliveries=settings.worker.max_deliveries,
            snapshots=self._snapshots,
        )
        self._streams: list[str] = list(settings.source.streams or ())
        self._housekeeper = Housekeeper(
            settings, self.consumer, self._streams, self._keys, self.counters
        )
        self._barrier = StreamBarrier(
            self._group,
            self.consumer,
            claim_every_s=settings.worker.claim_idle_ms / 1000 / BARRIER_CLAIMS_PER_IDLE,
        )
        self._policy = TargetPolicy()
        self._upkeep = Upkeep(settings, self.consumer, self._keys)
        self._guards = Guards(self._keys)
        self._stop = threading.Event()
        self._signals = 0
        self._sessions: Sessions | None = None
        # Work in hand: entries to apply next, entries read last time (decoded during the next
        # round trip), reclaimed entries, and settled entries whose dead letter or XACK is
        # still to be sent.
        self._batch: list[Entry] = []
        self._unread: list[Entry] = []
        self._backlog: list[Entry] = []
        self._dead: list[Entry] = []
        self._acks: dict[str, list[bytes]] = {}
        self._retry_attempt = 0

    @property
    def counts(self) -> Counter[CountKey]:
        """Entries counted per (stream, table, op, outcome) since the worker started."""
        return self.counters.counts

    @property
    def commit_lag(self) -> LatencySamples:
        """Source commit to applied in Redis, per applied entry (milliseconds)."""
        return self.counters.commit_lag

    @property
    def stream_lag(self) -> LatencySamples:
        """Stream entry added to applied in Redis, per entry (milliseconds)."""
        return self.counters.stream_lag

    @property
    def target_policy(self) -> TargetPolicy:
        """The target's eviction policy as last read (``bookkeeping_evictable`` is what the
        batch core is told)."""
        return self._policy

    # -- lifecycle -----------------------------------------------------------------------

    def request_stop(self) -> None:
        """Finish and acknowledge the batch in hand, then return from run()."""
        self._stop.set()

    def run(self) -> ExitCode:
        """Consume until stopped (signal, request_stop, or drained in drain mode)."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, self._on_signal)
        log.info(
            "worker %s starting: group %s, streams %s",
            self.consumer,
            self._group,
            self._streams or f"prefix {self.settings.source.stream_prefix!r}",
        )
        try:
            self._loop()
        except LibraryIncompatibleError as exc:
            log.error("%s", exc)
            return ExitCode.LIBRARY_INCOMPATIBLE
        except LegacyLayoutError as exc:
            log.error("%s", exc)
            return ExitCode.MIGRATION_NEEDED
        except ConfigError as exc:
            log.error("%s", exc)
            return ExitCode.CONFIG_INVALID
        finally:
            self._disconnect()
            log.info("worker %s stopped: %s", self.consumer, self.counters.summary())
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return ExitCode.OK

    def _loop(self) -> None:
        attempt = 0
        while True:
            try:
                if self._sessions is None:
                    self._connect()
                    attempt = 0
                if self._stop.is_set():
                    self._finish()
                    return
                self._cycle()
                continue
            except (redis.ConnectionError, redis.TimeoutError, ConnectionError) as exc:
                delay = backoff(attempt)
                self.reconnects += 1
                if self.observer is not None:
                    self.observer.reconnected()
                log.warning("redis connection lost (%s); reconnecting in %.2fs", exc, delay)
            except redis.ResponseError as exc:
                # a refusal outside the per-entry paths (READONLY after a failover, LOADING, a
                # key of the wrong type where a stream should be): start over, patiently
                delay = backoff(max(attempt, 4))
                log.error("redis refused a command (%s); starting over in %.2fs", exc, delay)
            self._disconnect()
            attempt += 1
            if self._stop.wait(delay):
                log.warning("stopping while disconnected: unsettled entries stay pending")
                return

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: exiting at once", signal.Signals(signum).name)
            os._exit(ExitCode.INTERRUPTED)
        log.info("%s: finishing the batch in hand, then exiting", signal.Signals(signum).name)
        self._stop.set()

    # -- connection ----------------------------------------------------------------------

    def _connect(self) -> None:
        timeout = max(
            self.settings.redis.socket_timeout_s,
            self.settings.worker.block_ms / 1000 + READ_TIMEOUT_MARGIN_S,
        )
        sessions = open_sessions(
            self.settings, client_name=f"streamsync:{self.consumer}", streams_timeout_s=timeout
        )
        self._sessions = sessions
        session, target = sessions.streams, sessions.target
        # the rules' keys and records live in the target: its kind decides how calls are packed,
        # and its modules how json rules write
        native = self._json_encodings(target)
        planner = self._core.planner
        if planner.cluster != target.cluster or planner.redisjson != native:
            self._core.planner = Planner.from_settings(
                self.settings, cluster=target.cluster, redisjson=native
            )
        # before the library is loaded (a 1.x one tells 1.x bookkeeping) and anything applied
        layout.claim(target.client, self.settings)
        target.library.ensure()
        if target is not session:
            # the streams' Redis runs the library's stream functions (trim, epochs)
            session.library.ensure()
        self._read_policy(sessions, time.monotonic(), force=True)
        self._housekeeper.ensure_groups(session)
        # whatever was in hand is in this consumer's pending list: re-read it from there
        self._batch.clear()
        self._unread.clear()
        self._barrier.clear()
        self._snapshots.clear()
        self._retry_attempt = 0
        self._backlog = self._housekeeper.recover_own_pending(session)
        self._refresh_epochs(session)
        self._housekeeper.heartbeat(session)
        where = " and to the target" if target is not session else ""
        log.info("connected to redis%s; %d stream(s)", where, len(self._streams))

    def _json_encodings(self, target: Session) -> bool:
        """Whether the target loads the RedisJSON module; refuses rules that need it on a
        target without it, and logs what each json rule writes."""
        loaded = redisjson.target_loads_it(
            self.settings, target.client, self._keys.json_probe(self.consumer)
        )
        for name, encoding in redisjson.encodings(self.settings, loaded).items():
            log.info("rule %s writes %s documents", name, encoding)
        return loaded

    def _disconnect(self) -> None:
        if self._sessions is not None:
            self._sessions.close()
        self._sessions = None

    def _read_policy(self, sessions: Sessions, now: float, *, force: bool = False) -> None:
        if force:
            self._policy.read(sessions, now)
        else:
            self._policy.run_due(sessions, now)
        self._core.bookkeeping_evictable = self._policy.bookkeeping_evictable

    @property
    def _streams_session(self) -> Session:
        assert self._sessions is not None
        return self._sessions.streams

    def _epochs_commands(self, session: Session) -> list[tuple[str, str]]:
        return self._keys.epochs_commands(self._streams, session.cluster)

    def _refresh_epochs(self, session: Session) -> None:
        self._epochs.load_all([session.call(*c) for c in self._epochs_commands(session)])

    # -- the loop ------------------------------------------------------------------------

    def _cycle(self) -> None:
        sessions = self._sessions
        assert sessions is not None
        session = sessions.streams
        # housekeeping runs on its own clock even under a steady flow: reclaiming a crashed
        # worker's entries and trimming must not wait for the streams to go quiet
        backlog = len(self._backlog)
        now = time.monotonic()
        self._housekeeper.run_due(session, now, self._backlog)
        self._read_policy(sessions, now)
        self._keep_tables(sessions.target, now)
        if len(self._backlog) > backlog:
            self._refresh_epochs(session)
        if self._barrier:
            self._run_barrier(sessions)
        if not self._batch and not self._unread and self._backlog:
            self._take_backlog()
        read = not self._backlog and self._retry_attempt == 0 and bool(self._streams)
        idle = not (self._batch or self._unread or self._dead or self._acks)
        block = self.settings.worker.block_ms if idle else None
        entries = self._round_trip(read, block)
        if entries:
            self._unread = entries
        else:
            if read and self.drain and not self._in_hand():
                self._check_drained(session)
            if block is not None and session.cluster:
                # reads in a cluster do not block: poll, briefly
                self._stop.wait(min(block, CLUSTER_POLL_MS) / 1000)
        if not self._streams:
            self._stop.wait(self.settings.worker.block_ms / 1000)

    def _keep_tables(self, session: Session, now: float) -> None:
        try:
            self._upkeep.run(session, self._core.planner.tables, now)
        except redis.ResponseError as exc:
            # like every chore: never stops the applying, runs again next cycle
            log.error("keeping the rule tables failed: %s", exc)

    def _in_hand(self) -> bool:
        return bool(
            self._batch
            or self._unread
            or self._dead
            or self._acks
            or self._backlog
            or self._barrier
            or self.counters.unpublished
        )

    def _take_backlog(self) -> None:
        n = self.settings.worker.batch_size
        self._unread = self._backlog[:n]
        del self._backlog[:n]

    def _finish(self) -> None:
        """Apply and settle what is in hand without reading more; used when stopping. Reclaimed
        entries are applied too, within a short budget: left pending, they would wait another
        claim_idle_ms for a taker. Then leave the group where nothing is pending to us."""
        session = self._streams_session
        deadline = time.monotonic() + FINISH_BUDGET_S
        while time.monotonic() < deadline and self._in_hand():
            if not self._batch and not self._unread and self._backlog:
                self._take_backlog()
            try:
                self._round_trip(read=False, block=None)
            except (redis.ConnectionError, redis.TimeoutError):
                return
        left = len(self._batch) + len(self._unread) + len(self._backlog)
        if left:
            log.info("%d entries left pending for another worker", left)
        try:
            self._housekeeper.leave(session)
        except redis.RedisError as exc:
            log.warning("could not leave the group cleanly: %s", exc)

    def _check_drained(self, session: Session) -> None:
        if self._backlog or not self._housekeeper.drained(session):
            return
        if self.settings.worker.trim:
            self._housekeeper.trim(session)
        log.info("drained: every entry read and acknowledged")
        self._stop.set()

    # -- one round trip ------------------------------------------------------------------

    def _round_trip(self, read: bool, block: int | None) -> list[Entry]:
        """Send the batch's calls, the dead letters and acks due, the counters and optionally
        a read; prepare the entries read last time while Redis works; then settle what the
        replies say. Returns the entries read."""
        sessions = self._sessions
        assert sessions is not None
        session, target = sessions.streams, sessions.target
        batch, acks = self._batch, self._acks
        dead = [
            e
            for e in self._dead
            if e.deliveries <= 1 or deadletters.still_ours(session, self._group, self.consumer, e)
        ]
        # on a target that may evict the bookkeeping, the tables' high-water marks are raised
        # before the batch can apply anything (the guards go in the calls)
        self._guards.before(session, batch, self._core.bookkeeping_evictable)
        calls = self._core.calls(batch)
        # the marks of the reads about to be applied or dead-lettered: durable before any of
        # them is acknowledged
        marks = self._core.take_marks()
        trip = RoundTrip()
        trip.add(
            "marks",
            [
                mark_snapshot_command(self._keys.snapshots, m.stream, m.lsn, m.entry_id)
                for m in marks
            ],
            session.link,
        )
        trip.add("apply", [call.command for call in calls], target.link)
        trip.add(
            "dead",
            deadletters.commands(
                dead, self.consumer, self.settings.worker.dlq_max_len, int(time.time() * 1000)
            ),
            session.link,
        )
        acks_sent = [("XACK", stream, self._group, *ids) for stream, ids in acks.items()]
        trip.add("ack", acks_sent, session.link)
        trip.add("stats", self.counters.publish(), session.link)
        trip.add("read", self._read_commands(block) if read else [], session.link)
        # after the read: an entry it returns that belongs to a new resync epoch was added
        # after the epoch was marked, so this reply knows that epoch
        trip.add("epochs", self._epochs_commands(session), session.link)
        trip.send()
        sent_at = time.monotonic()
        # From here on, what the replies settle is gone from the lists; an entry lost with a
        # dropped connection is still pending in Redis and comes back to this consumer.
        self._batch, self._dead, self._acks = [], [], {}
        unread, self._unread = self._unread, []
        prepared = self._take_prepared(self._core.prepare(unread))
        replies = trip.receive()
        epochs = replies["epochs"]
        if not any(isinstance(reply, redis.ResponseError) for reply in epochs):
            self._epochs.load_all(epochs)
        for entry in deadletters.written(dead, replies["dead"]):
            self.counters.count(entry, "dead_lettered")
            self._ack(entry)
        entries = self._read_entries(session, replies)
        refused = self._marked(marks, replies["marks"])
        if refused is None:
            settlement = self._core.settle(batch, calls, replies["apply"])
        else:
            settlement = self._core.retry_all(batch, refused)
        if settlement.unknown:
            self._guards.floors(session, settlement.unknown)
        if settlement.retry:
            self._retry(target, settlement)
            self._batch = batch + prepared.apply
        else:
            self._guards.settled()
            self._retry_attempt = 0
            self._settled(settlement, time.monotonic() - sent_at)
            self._batch = prepared.apply
        return entries

    def _take_prepared(self, prepared: Prepared) -> Prepared:
        """Settle at once what needs no apply: acknowledge what carries nothing, queue the
        dead letters, hand TRUNCATEs to the barrier."""
        for entry in prepared.settled:
            self.counters.count(entry, entry.outcome or "")
            self._ack(entry)
        self._dead += prepared.dead
        self._barrier.waiting += prepared.held
        return prepared

    def _marked(self, marks: list[SnapshotMark], replies: list[Any]) -> str | None:
        """Read the snapshot marks' replies into the marks cache. On a refusal the marks are
        noted again and the reason returned: the batch goes again, with them."""
        refused = None
        for mark, reply in zip(marks, replies, strict=True):
            if isinstance(reply, redis.ResponseError):
                refused = f"redis refused a snapshot mark ({reply})"
                self._core.note_mark(mark)
            else:
                self._snapshots.update(mark.stream, reply)
        return refused

    def _retry(self, target: Session, settlement: Settlement) -> None:
        if settlement.reload_library:
            target.library.ensure()
        if settlement.rebucketed:
            log.info("%s; sending the batch again", settlement.reason)
            return
        log.warning("%s; sending the batch again", settlement.reason)
        self._retry_attempt += 1
        self._stop.wait(backoff(self._retry_attempt))

    def _settled(self, settlement: Settlement, seconds: float) -> None:
        now_ms = time.time() * 1000
        for entry in settlement.done:
            self.counters.settled(entry, now_ms)
            self._ack(entry)
        max_deliveries = self.settings.worker.max_deliveries
        for entry in settlement.failed:
            log.warning(
                "%s: failed on delivery %d of %d, left pending for a retry: %s",
                entry.label,
                entry.deliveries,
                max_deliveries,
                entry.error,
            )
            self.counters.count(entry, "failed")
        for entry in settlement.dead:
            log.error(
                "%s: failed on delivery %d, dead-lettering: %s",
                entry.label,
                entry.deliveries,
                entry.error,
            )
            self._dead.append(entry)
        if self.observer is not None and settlement.done:
            rows = sum(len(e.rows) for e in settlement.done)
            self.observer.applied_batch(len(settlement.done), rows, seconds)

    def _ack(self, entry: Entry) -> None:
        self._acks.setdefault(entry.stream, []).append(entry.id)

    # -- reading -------------------------------------------------------------------------

    def _read_commands(self, block: int | None) -> list[Command]:
        worker = self.settings.worker
        head: Command = ("XREADGROUP", "GROUP", self._group, self.consumer)
        head += ("COUNT", worker.batch_size)
        if self._streams_session.cluster:
            # a cluster keeps streams in different slots: one read each, none blocking
            return [(*head, "STREAMS", s, ">") for s in self._streams]
        if block is not None:
            head += ("BLOCK", block)
        return [(*head, "STREAMS", *self._streams, *([">"] * len(self._streams)))]

    def _read_entries(self, session: Session, replies: Replies) -> list[Entry]:
        entries: list[Entry] = []
        for reply in replies["read"]:
            if not isinstance(reply, redis.ResponseError):
                entries += from_read(reply)
            elif "NOGROUP" in str(reply):
                # the stream or the group vanished (Redis restarted without persistence, or an
                # operator deleted it): create it again and keep reading
                log.warning("group missing (%s); creating it again", reply)
                for stream in self._streams:
                    self._housekeeper.ensure_group(session, stream)
            else:
                raise redis.ConnectionError(f"XREADGROUP failed: {reply}")
        return entries

    # -- the stream barrier --------------------------------------------------------------

    def _run_barrier(self, sessions: Sessions) -> None:
        released = self._barrier.release(sessions.streams, self._acks, time.monotonic())
        if not released:
            return
        # every read older than what was released is settled, so its snapshot's mark is there
        self._snapshots.load(sessions.streams.call("HGETALL", self._keys.snapshots))

        def sweeper() -> Sweeper:
            # the rows to sweep live in the target; the stream's pending list in the streams'
            return Sweeper(sessions.target.client, self._core.planner, self._core.tombstone_s)

        for held in released:
            entry = held.entry
            if held.truncate:
                if sweep_truncate(sweeper, held, self._core.truncate_position(held)):
                    self.counters.count(entry, "applied")
                    self._ack(entry)
                elif self._core.exhausted(entry):
                    self._dead.append(entry)
                else:
                    self.counters.count(entry, "failed")
                continue
            try:
                entry.rows = self._core.plan_held(held)
            except PoisonEntryError as exc:
                entry.error = str(exc)
                self._dead.append(entry)
                continue
            except Exception as exc:
                log.exception("%s: cannot map", entry.label)
                entry.error = f"internal error: {type(exc).__name__}: {exc}"
                self._dead.append(entry)
                continue
            self._batch.append(entry)


def run_worker(
    settings: Settings,
    consumer: str | None = None,
    drain: bool = False,
    observer: WorkerObserver | None = None,
) -> ExitCode:
    """Build a worker and run it until stopped; the CLI's entry point."""
    return Worker(settings, consumer, drain=drain, observer=observer).run()
