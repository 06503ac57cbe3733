"""The consumer-group loop: read, apply, ack, reclaim, dead-letter, trim, shut down.

One round trip to Redis carries the function calls applying batch N, the dead letters and acks
settled so far, and the XREADGROUP fetching batch N+1; batch N's acks ride with the next round
trip, once its per-row results are known. The read blocks only when nothing awaits an ack, so an
ack is never held behind an idle stream.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, Protocol

import redis

from streamsync import connection
from streamsync.config import DLQ_SUFFIX, Settings
from streamsync.discovery import find_streams
from streamsync.epochs import Epochs, epochs_key
from streamsync.errors import ExitCode, LibraryIncompatibleError, PoisonEntryError
from streamsync.events import TRUNCATE, ChangeEvent, Decoder, Skip
from streamsync.functions import ensure_library
from streamsync.link import ClusterLink, SingleLink
from streamsync.mapping import FN_BATCH, Planner, RowWrite
from streamsync.stats import LatencySamples
from streamsync.sweep import Sweeper

log = logging.getLogger(__name__)

#: Most rows packed into one function call; bounds the Lua stack and one call's run time.
MAX_ROWS_PER_CALL = 1000
#: Reconnect backoff: full jitter between 0 and min(cap, base * 2**attempt) seconds.
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 5.0
#: How long a graceful stop may spend applying what is in hand.
FINISH_BUDGET_S = 2.0
#: Most entries one claim pass takes over, in batch_size pages.
MAX_CLAIM_PAGES = 10
#: How long a worker on a Redis Cluster waits before reading idle streams again (its reads
#: cannot block on several streams at once).
CLUSTER_POLL_MS = 50
#: Share of maxmemory above which the worker warns and trims at every cycle.
MEMORY_PRESSURE = 0.9
#: Consumers idle this long with nothing pending are removed from the group.
CONSUMER_PRUNE_IDLE_MS = 3_600_000

#: Error replies after which the same calls are retried unchanged: Redis is busy or full,
#: not the entry at fault.
TRANSIENT_ERRORS = (
    "OOM",
    "BUSY",
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "NOREPLICAS",
)

# Row statuses replied by the library (lua/streamsync.lua).
APPLIED, STALE, SKIPPED, DROPPED = 1, 0, 2, 3
_ROW_OUTCOMES = {APPLIED: "applied", STALE: "stale", SKIPPED: "skipped", DROPPED: "dropped"}


class WorkerObserver(Protocol):
    """What a worker reports as it goes (streamsync.metrics implements it)."""

    def counted(self, stream: str, table: str, op: str, outcome: str, n: int) -> None:
        """``n`` entries of ``stream`` reached ``outcome`` (applied, stale, dead_lettered...)."""

    def applied_batch(self, entries: int, rows: int, seconds: float) -> None:
        """A round trip applied ``entries`` entries (``rows`` rows) in ``seconds``."""

    def sync_lag(self, seconds: float) -> None:
        """An applied change's source commit (``source.ts_ms``) to applied in Redis."""

    def reconnected(self) -> None:
        """The worker lost its connection and reconnects."""


def stats_key(state_prefix: str, group: str, stream: str) -> str:
    """The hash where the workers of ``group`` count what they did with ``stream``'s entries
    (read by ``streamsync status``). Fields: ``n:<table>:<op>:<outcome>`` counters, and
    ``last_applied_ms``, ``last_source_ts_ms``, ``last_id`` of the newest applied change."""
    return f"{state_prefix}stats:{group}:{stream}"


@dataclass(slots=True)
class Entry:
    """A stream entry delivered to this consumer, with what it must become."""

    stream: str
    id: bytes
    fields: list[bytes] | None
    #: Times the group delivered it (1 for a first read).
    deliveries: int = 1
    table: str = ""
    op: str = ""
    rows: Sequence[RowWrite] = ()
    #: Source commit time, for the end-to-end lag.
    ts_ms: int | None = None
    #: Why the entry failed this time, if it did.
    error: str | None = None
    #: What applying its rows did: "applied" if any row applied, else the first row's outcome.
    outcome: str | None = None
    #: Apply each of its rows in a call of its own (a batch call failed as a whole).
    solo: bool = False


@dataclass(slots=True)
class Control:
    """An entry applied on its own once every older entry of its stream is settled: a TRUNCATE
    must not run before a change it follows, or that change would bring a row back."""

    entry: Entry
    event: ChangeEvent
    position: str


def _transient(message: str) -> bool:
    """True for an error reply meaning "not now" rather than "never"."""
    return message.startswith(TRANSIENT_ERRORS) or "cluster is down" in message


def _backoff(attempt: int) -> float:
    return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))


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
        self.counts: Counter[tuple[str, str, str, str]] = Counter()
        #: Source commit (``source.ts_ms``) to applied in Redis, per applied entry.
        self.commit_lag = LatencySamples()
        #: Stream entry added (its id's time) to applied in Redis: the part streamsync adds.
        self.stream_lag = LatencySamples()
        self.reconnects = 0
        self._group = settings.source.group
        self._decoder = Decoder(settings.source.format, settings.source.null_marker)
        self._planner = Planner(
            settings.rules_by_table, settings.worker.position_prefix, settings.worker.state_prefix
        )
        self._epochs = Epochs()
        self._epochs_key = epochs_key(settings.worker.state_prefix)
        self._controls: list[Control] = []
        # counts as last published to the stats hashes (and the observer), and the newest
        # applied change per stream, published with the next round trip
        self._counted = False
        self._published: Counter[tuple[str, str, str, str]] = Counter()
        self._last_applied: dict[str, tuple[int, int | None, bytes]] = {}
        self._tombstone_ms = str(settings.worker.tombstone_ttl_s * 1000)
        self._streams: list[str] = list(settings.source.streams or ())
        self._stop = threading.Event()
        self._signals = 0
        self._pool: redis.ConnectionPool | None = None
        self._client: redis.Redis | redis.RedisCluster | None = None
        self._link: SingleLink | ClusterLink | None = None
        # Work in hand: entries to apply next, entries to re-read or reclaimed, settled entries
        # whose XADD (dead letters) or XACK is still to be sent.
        self._batch: list[Entry] = []
        self._backlog: list[Entry] = []
        self._dead: list[Entry] = []
        self._acks: dict[str, list[bytes]] = {}
        self._retry_attempt = 0
        self._sent_at = 0.0
        self._unread: list[Entry] = []
        self._claim_cursor: dict[str, bytes] = {}
        self._next_claim = self._next_trim = self._next_discover = self._next_prune = 0.0
        self._next_memory_warning = 0.0
        self._memory_pressed = False

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
        attempt = 0
        try:
            while True:
                try:
                    if self._link is None:
                        self._connect()
                        attempt = 0
                    if self._stop.is_set():
                        self._finish()
                        break
                    self._cycle()
                except (redis.ConnectionError, redis.TimeoutError, ConnectionError) as exc:
                    self._disconnect()
                    delay = _backoff(attempt)
                    attempt += 1
                    self.reconnects += 1
                    if self.observer is not None:
                        self.observer.reconnected()
                    log.warning("redis connection lost (%s); reconnecting in %.2fs", exc, delay)
                    if self._stop.wait(delay):
                        log.warning("stopping while disconnected: unsettled entries stay pending")
                        break
                except redis.ResponseError as exc:
                    # a refusal outside the per-entry paths (READONLY after a failover, LOADING,
                    # a key of the wrong type where a stream should be): start over, patiently
                    self._disconnect()
                    delay = _backoff(max(attempt, 4))
                    attempt += 1
                    log.error("redis refused a command (%s); starting over in %.2fs", exc, delay)
                    if self._stop.wait(delay):
                        log.warning("stopping while disconnected: unsettled entries stay pending")
                        break
        except LibraryIncompatibleError as exc:
            log.error("%s", exc)
            return ExitCode.LIBRARY_INCOMPATIBLE
        finally:
            self._disconnect()
            self._log_summary()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return ExitCode.OK

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: exiting at once", signal.Signals(signum).name)
            os._exit(ExitCode.INTERRUPTED)
        log.info("%s: finishing the batch in hand, then exiting", signal.Signals(signum).name)
        self._stop.set()

    def _log_summary(self) -> None:
        totals: Counter[str] = Counter()
        for (_, _, _, outcome), n in self.counts.items():
            totals[outcome] += n
        log.info(
            "worker %s stopped: %s",
            self.consumer,
            ", ".join(f"{k} {v}" for k, v in sorted(totals.items())) or "nothing processed",
        )

    # -- connection ----------------------------------------------------------------------

    def _connect(self) -> None:
        worker = self.settings.worker
        timeout = max(self.settings.redis.socket_timeout_s, worker.block_ms / 1000 + 5)
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "client_name": f"streamsync:{self.consumer}",
            "protocol": 2,
        }
        self._pool = connection.pool(self.settings.redis, **options)
        plain = redis.Redis(connection_pool=self._pool)
        if plain.info("cluster").get("cluster_enabled"):
            cluster = connection.cluster(self.settings.redis, **options)
            self._client = cluster
            self._link = ClusterLink(cluster)
            self._use_planner(cluster=True)
        else:
            self._client = plain
            self._link = SingleLink(self._pool.get_connection())
            self._use_planner(cluster=False)
        ensure_library(self._client)
        if self.settings.source.stream_prefix is not None:
            self._discover()
        for stream in self._streams:
            self._ensure_group(stream)
        # whatever was in hand is in this consumer's pending list: re-read it from there
        self._batch.clear()
        self._unread.clear()
        self._backlog.clear()
        self._controls.clear()
        self._retry_attempt = 0
        self._recover_own_pending()
        self._refresh_epochs()
        log.info("connected to redis; %d stream(s)", len(self._streams))

    def _disconnect(self) -> None:
        if self._link is not None:
            with contextlib.suppress(Exception):
                self._link.close()
        if self._pool is not None:
            self._pool.disconnect()
        self._pool = self._client = self._link = None

    def _use_planner(self, *, cluster: bool) -> None:
        if self._planner.cluster != cluster:
            self._planner = Planner(
                self.settings.rules_by_table,
                self.settings.worker.position_prefix,
                self.settings.worker.state_prefix,
                cluster=cluster,
            )

    def _ensure_group(self, stream: str) -> None:
        assert self._client is not None
        try:
            self._client.xgroup_create(
                stream, self._group, id=self.settings.source.start, mkstream=True
            )
            log.info(
                "created group %s on %s at %s", self._group, stream, self.settings.source.start
            )
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _discover(self) -> None:
        assert self._client is not None
        found = find_streams(self._client, self.settings.source.stream_prefix or "")
        new = [s for s in found if s not in self._streams]
        for stream in new:
            self._ensure_group(stream)
            self._streams.append(stream)
            log.info("discovered stream %s", stream)
        self._next_discover = time.monotonic() + self.settings.source.discover_interval_s

    def _recover_own_pending(self) -> None:
        """Queue the entries this consumer was delivered but had not settled (after a reconnect,
        or a restart under the same consumer name)."""
        for stream in self._streams:
            cursor = b"0"
            while True:
                reply = self._raw(
                    "XREADGROUP",
                    "GROUP",
                    self._group,
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
                entries = [Entry(stream, eid, _flat(fields)) for eid, fields in items]
                self._set_deliveries(stream, entries)
                self._backlog.extend(entries)
                cursor = items[-1][0]
        if self._backlog:
            log.info("re-applying %d entries this consumer held", len(self._backlog))

    # -- the loop ------------------------------------------------------------------------

    def _cycle(self) -> None:
        # housekeeping runs on its own clock even under a steady flow: reclaiming a crashed
        # worker's entries and trimming must not wait for the streams to go quiet
        self._periodic(time.monotonic())
        if self._controls:
            self._run_controls()
        if not self._batch and not self._unread and self._backlog:
            self._take_backlog()
        read = not self._backlog and self._retry_attempt == 0 and bool(self._streams)
        idle = not (self._batch or self._unread or self._dead or self._acks)
        block = None if not idle else self.settings.worker.block_ms
        entries = self._round_trip(read, block)
        if entries:
            self._unread = entries
        else:
            if read and self.drain and not self._in_hand():
                self._check_drained()
            if block is not None and self._link is not None and not self._link.multi_stream_reads:
                # reads in a cluster do not block: poll, briefly
                self._stop.wait(min(block, CLUSTER_POLL_MS) / 1000)
        if not self._streams:
            self._stop.wait(self.settings.worker.block_ms / 1000)

    def _in_hand(self) -> bool:
        return bool(
            self._batch
            or self._unread
            or self._dead
            or self._acks
            or self._backlog
            or self._controls
            or self._counted
            or self._last_applied
        )

    def _take_backlog(self) -> None:
        n = self.settings.worker.batch_size
        self._unread = self._backlog[:n]
        del self._backlog[:n]

    def _finish(self) -> None:
        """Apply and settle what is in hand without reading more; used when stopping. Reclaimed
        entries are applied too, within a short budget: left pending, they would wait another
        claim_idle_ms for a taker."""
        deadline = time.monotonic() + FINISH_BUDGET_S
        while time.monotonic() < deadline and self._in_hand():
            if not self._batch and not self._unread and self._backlog:
                self._take_backlog()
            try:
                self._round_trip(read=False, block=None)
            except (redis.ConnectionError, redis.TimeoutError):
                break
        left = len(self._batch) + len(self._unread) + len(self._backlog)
        if left:
            log.info("%d entries left pending for another worker", left)

    def _round_trip(self, read: bool, block: int | None) -> list[Entry]:
        """One round trip: send the batch's function calls, the dead letters and acks due, and
        optionally a read; decode the entries read last time while Redis works; then settle
        what the replies say. Returns the entries read."""
        link = self._link
        assert link is not None
        batch, acks = self._batch, self._acks
        dead = [e for e in self._dead if e.deliveries <= 1 or self._still_ours(e)]
        calls = list(self._calls(batch))
        commands = [c for c, _ in calls]
        commands += [self._dlq_command(e) for e in dead]
        commands += [("XACK", s, self._group, *ids) for s, ids in acks.items()]
        stats = self._stats_commands()
        commands += stats
        reads = self._read_commands(block) if read else []
        commands += reads
        # after the read: an entry it returns that belongs to a new resync epoch was added after
        # the epoch was marked, so this reply knows that epoch
        commands.append(("HGETALL", self._epochs_key))
        link.send(commands)
        self._sent_at = time.monotonic()
        # From here on, what the replies settle is gone from the lists; an entry lost with a
        # dropped connection is still pending in Redis and comes back to this consumer.
        self._batch, self._dead, self._acks = [], [], {}
        unread, self._unread = self._unread, []
        planned = self._prepare(unread)
        replies = link.receive()
        epochs = replies.pop()
        if not isinstance(epochs, redis.ResponseError):
            self._epochs.load(epochs)
        self._settle_dead(dead, replies[len(calls) : len(calls) + len(dead)])
        entries: list[Entry] = []
        for reply in replies[len(replies) - len(reads) :] if reads else ():
            if isinstance(reply, redis.ResponseError):
                self._on_read_error(reply)
            else:
                entries += _parse_read(reply)
        if self._settle_calls(batch, calls, replies[: len(calls)]):
            self._batch = batch + planned
        else:
            self._batch = planned
        return entries

    def _raw(self, *command: Any) -> Any:
        """One command on the loop's connection, its reply unparsed (field lists stay lists,
        so an entry keeps its exact fields, duplicates and order included)."""
        assert self._link is not None
        return self._link.call(*command)

    def _read_commands(self, block: int | None) -> list[tuple[Any, ...]]:
        worker = self.settings.worker
        cmd: tuple[Any, ...] = (
            "XREADGROUP",
            "GROUP",
            self._group,
            self.consumer,
            "COUNT",
            worker.batch_size,
        )
        assert self._link is not None
        if not self._link.multi_stream_reads:
            # a cluster keeps streams in different slots: one read each, none blocking
            return [(*cmd, "STREAMS", s, ">") for s in self._streams]
        if block is not None:
            cmd += ("BLOCK", block)
        return [(*cmd, "STREAMS", *self._streams, *([">"] * len(self._streams)))]

    def _on_read_error(self, exc: redis.ResponseError) -> None:
        if "NOGROUP" in str(exc):
            # the stream or the group vanished (Redis restarted without persistence, or an
            # operator deleted it): create it again and keep reading
            log.warning("group missing (%s); creating it again", exc)
            for stream in self._streams:
                self._ensure_group(stream)
            return
        raise redis.ConnectionError(f"XREADGROUP failed: {exc}")

    # -- applying ------------------------------------------------------------------------

    def _prepare(self, entries: Sequence[Entry]) -> list[Entry]:
        """Decode and plan entries; returns those with rows to apply. Entries with nothing to
        apply are acknowledged, unappliable ones dead-lettered, with the next round trip."""
        decode, plan = self._decoder.decode, self._planner.plan
        planned = []
        for entry in entries:
            if entry.fields is None:
                # deleted from the stream while pending: nothing left to apply
                self._count(entry, "vanished")
                self._ack(entry)
                continue
            try:
                event = decode(entry.fields)
                if isinstance(event, Skip):
                    self._count(entry, event.value)
                    self._ack(entry)
                    continue
                entry.table, entry.op, entry.ts_ms = event.table, event.op, event.ts_ms
                epoch = self._epochs.prefix(entry.stream, entry.id)
                if event.op == TRUNCATE:
                    if event.table not in self._planner.rules_by_table:
                        raise PoisonEntryError(f"no rule maps table {event.table!r}")
                    self._controls.append(Control(entry, event, epoch + event.position))
                    continue
                entry.rows = plan(event, epoch)
            except PoisonEntryError as exc:
                entry.error = str(exc)
                self._dead.append(entry)
                continue
            except Exception as exc:
                # a bug, not the entry's fault; still never crash the loop nor lose the entry
                log.exception("%s %s: cannot decode or map", entry.stream, entry.id.decode())
                entry.error = f"internal error: {type(exc).__name__}: {exc}"
                self._dead.append(entry)
                continue
            planned.append(entry)
        return planned

    def _calls(self, batch: list[Entry]) -> Iterator[tuple[tuple[Any, ...], list[Entry]]]:
        """The FCALLs applying the batch: one per MAX_ROWS_PER_CALL rows, and one per row of
        an entry marked solo. Yields (command, the entry of each row)."""
        keys: list[str] = []
        args: list[Any] = []
        owners: list[Entry] = []
        for entry in batch:
            for row in entry.rows:
                if entry.solo:
                    yield self._fcall(row.keys, row.args), [entry]
                    continue
                keys += row.keys
                args += row.args
                owners.append(entry)
                if len(owners) >= MAX_ROWS_PER_CALL:
                    yield self._fcall(keys, args), owners
                    keys, args, owners = [], [], []
        if owners:
            yield self._fcall(keys, args), owners

    def _fcall(self, keys: list[str], args: list[Any]) -> tuple[Any, ...]:
        return ("FCALL", FN_BATCH, len(keys), *keys, self._tombstone_ms, *args)

    def _settle_calls(
        self, batch: list[Entry], calls: list[tuple[Any, list[Entry]]], replies: list[Any]
    ) -> bool:
        """Settle the batch from its calls' replies; True when it must be sent again."""
        retry = False
        for (_, owners), reply in zip(calls, replies, strict=True):
            if isinstance(reply, redis.ResponseError):
                message = str(reply)
                if "function not found" in message.lower():
                    assert self._client is not None
                    ensure_library(self._client)
                    retry = True
                elif _transient(message):
                    log.warning("redis refused a call (%s); retrying the batch", message)
                    retry = True
                elif len(owners) > 1:
                    # one bad row fails its whole call: retry its rows one call each, so only
                    # the bad entry fails
                    for entry in owners:
                        entry.solo = True
                    retry = True
                else:
                    owners[0].error = f"redis error: {message}"
                continue
            for entry, status in zip(owners, reply, strict=True):
                if isinstance(status, bytes):
                    text = status.decode(errors="replace")
                    if _transient(text):
                        # Redis, not the row, is at fault (a cluster failing over, memory
                        # full): retry the batch in hand, without spending deliveries
                        log.warning("redis refused a row (%s); retrying the batch", text)
                        retry = True
                    else:
                        entry.error = f"redis error: {text}"
                else:
                    outcome = _ROW_OUTCOMES.get(status, "unknown")
                    if entry.outcome is None or outcome == "applied":
                        entry.outcome = outcome
        if retry:
            for entry in batch:
                entry.outcome = entry.error = None
            self._retry_attempt += 1
            self._stop.wait(_backoff(self._retry_attempt))
            return True
        self._retry_attempt = 0
        now_ms = time.time() * 1000
        observer = self.observer
        for entry in batch:
            if entry.error is None:
                self._count(entry, entry.outcome or "applied")
                self._ack(entry)
                self.stream_lag.add(now_ms - int(entry.id.partition(b"-")[0]))
                if entry.outcome not in (None, "applied"):
                    # a replay found stale says nothing of how far behind the cache is
                    continue
                if entry.ts_ms is not None:
                    self.commit_lag.add(now_ms - entry.ts_ms)
                    if observer is not None:
                        observer.sync_lag(max(0.0, now_ms - entry.ts_ms) / 1000)
                self._last_applied[entry.stream] = (int(now_ms), entry.ts_ms, entry.id)
            else:
                self._failed(entry)
        if observer is not None and batch:
            rows = sum(len(e.rows) for e in batch)
            observer.applied_batch(len(batch), rows, time.monotonic() - self._sent_at)
        return False

    def _failed(self, entry: Entry) -> None:
        if entry.deliveries >= self.settings.worker.max_deliveries:
            log.error(
                "%s %s: failed on delivery %d, dead-lettering: %s",
                entry.stream,
                entry.id.decode(),
                entry.deliveries,
                entry.error,
            )
            self._dead.append(entry)
        else:
            log.warning(
                "%s %s: failed on delivery %d of %d, left pending for a retry: %s",
                entry.stream,
                entry.id.decode(),
                entry.deliveries,
                self.settings.worker.max_deliveries,
                entry.error,
            )
            self._count(entry, "failed")
        entry.outcome = None

    def _ack(self, entry: Entry) -> None:
        self._acks.setdefault(entry.stream, []).append(entry.id)

    def _count(self, entry: Entry, outcome: str, n: int = 1) -> None:
        self.counts[(entry.stream, entry.table, entry.op, outcome)] += n
        self._counted = True

    def _stats_commands(self) -> list[tuple[Any, ...]]:
        """HINCRBY/HSET commands publishing what was counted since the last round trip (the
        growth of ``counts`` since then), which the observer hears of too."""
        prefix = self.settings.worker.state_prefix
        commands: list[tuple[Any, ...]] = []
        if self._counted:
            for (stream, table, op, outcome), total in self.counts.items():
                n = total - self._published[(stream, table, op, outcome)]
                if not n:
                    continue
                key = stats_key(prefix, self._group, stream)
                commands.append(("HINCRBY", key, f"n:{table}:{op}:{outcome}", n))
                if self.observer is not None:
                    self.observer.counted(stream, table, op, outcome, n)
            self._published = self.counts.copy()
            self._counted = False
        for stream, (applied_ms, ts_ms, entry_id) in self._last_applied.items():
            key = stats_key(prefix, self._group, stream)
            fields: list[Any] = ["last_applied_ms", applied_ms, "last_id", entry_id]
            if ts_ms is not None:
                fields += ["last_source_ts_ms", ts_ms]
            commands.append(("HSET", key, *fields))
        self._last_applied.clear()
        return commands

    # -- controls ------------------------------------------------------------------------

    def _run_controls(self) -> None:
        """Apply the TRUNCATEs whose streams have settled every older entry; the others wait
        (the worker goes on applying newer entries meanwhile: a TRUNCATE removes only what is
        older than it)."""
        waiting: list[Control] = []
        blocked: set[str] = set()
        for control in self._controls:
            entry = control.entry
            if entry.stream in blocked or not self._older_settled(entry):
                blocked.add(entry.stream)
                waiting.append(control)
                continue
            assert self._client is not None
            sweeper = Sweeper(self._client, self._planner, int(self._tombstone_ms))
            try:
                removed = sweeper.truncate(control.event.table, control.position)
            except (redis.ConnectionError, redis.TimeoutError):
                raise
            except Exception as exc:
                # a refusal or a bug: retried on later deliveries, then dead-lettered; the loop
                # goes on either way
                log.exception("%s %s: truncate failed", entry.stream, entry.id.decode())
                entry.error = f"truncate failed: {type(exc).__name__}: {exc}"
                self._failed(entry)
                continue
            log.info(
                "%s %s: truncated %s, %d row(s) removed",
                entry.stream,
                entry.id.decode(),
                control.event.table,
                removed,
            )
            self._count(entry, "applied")
            self._ack(entry)
        self._controls = waiting

    def _older_settled(self, entry: Entry) -> bool:
        """True when no entry of the stream older than ``entry`` awaits an ack. Keeps ``entry``
        from looking idle meanwhile, so no other worker reclaims it."""
        assert self._client is not None
        self._raw("XCLAIM", entry.stream, self._group, self.consumer, 0, entry.id, "JUSTID")
        settled = set(self._acks.get(entry.stream, ()))
        pending = self._raw("XPENDING", entry.stream, self._group, "-", b"(" + entry.id, 100)
        return all(p[0] in settled for p in pending)

    def _refresh_epochs(self) -> None:
        self._epochs.load(self._raw("HGETALL", self._epochs_key))

    # -- dead letters --------------------------------------------------------------------

    def _dlq_command(self, entry: Entry) -> tuple[Any, ...]:
        fields = entry.fields or []
        return (
            "XADD",
            entry.stream + DLQ_SUFFIX,
            "MAXLEN",
            "~",
            self.settings.worker.dlq_max_len,
            "*",
            "reason",
            entry.error or "unknown",
            "stream",
            entry.stream,
            "id",
            entry.id,
            "deliveries",
            entry.deliveries,
            "consumer",
            self.consumer,
            "failed_at_ms",
            int(time.time() * 1000),
            "fields",
            len(fields) // 2,
            *fields,
        )

    def _still_ours(self, entry: Entry) -> bool:
        """Whether a redelivered entry is still pending to this consumer. Another worker may
        have claimed it again, or settled it, while it waited here: then its dead letter is
        that worker's to write (or already written), not a second one."""
        pending = self._raw(
            "XPENDING", entry.stream, self._group, entry.id, entry.id, 1, self.consumer
        )
        if pending:
            return True
        log.info(
            "%s %s: no longer pending to %s, not dead-lettered again",
            entry.stream,
            entry.id.decode(),
            self.consumer,
        )
        return False

    def _settle_dead(self, dead: list[Entry], replies: list[Any]) -> None:
        for entry, reply in zip(dead, replies, strict=True):
            if isinstance(reply, redis.ResponseError):
                # not dead-lettered, so not acked: it stays pending and comes back via a claim
                log.error(
                    "%s %s: cannot write the dead letter: %s",
                    entry.stream,
                    entry.id.decode(),
                    reply,
                )
                continue
            log.warning(
                "%s %s: dead-lettered to %s%s: %s",
                entry.stream,
                entry.id.decode(),
                entry.stream,
                DLQ_SUFFIX,
                entry.error,
            )
            self._count(entry, "dead_lettered")
            self._ack(entry)

    # -- housekeeping --------------------------------------------------------------------

    def _periodic(self, now: float) -> None:
        try:
            self._housekeeping(now)
        except redis.ResponseError as exc:
            # housekeeping must never stop the applying; it runs again at its next interval
            log.error("housekeeping failed: %s", exc)

    def _library_call(self, function: str, *args: Any) -> Any:
        """FCALL from the housekeeping path, reloading the library if Redis lost it."""
        assert self._client is not None
        try:
            return self._client.fcall(function, *args)
        except redis.ResponseError as exc:
            if "function not found" not in str(exc).lower():
                raise
            ensure_library(self._client)
            return self._client.fcall(function, *args)

    def _housekeeping(self, now: float) -> None:
        worker = self.settings.worker
        if self.settings.source.stream_prefix is not None and now >= self._next_discover:
            self._discover()
        if now >= self._next_claim:
            self._claim()
            self._next_claim = now + worker.claim_interval_ms / 1000
        if worker.trim and now >= self._next_trim:
            self._trim()
            self._next_trim = now + worker.trim_interval_ms / 1000
            self._check_memory(now)
        if now >= self._next_prune:
            self._prune_consumers()
            self._next_prune = now + CONSUMER_PRUNE_IDLE_MS / 1000 / 10

    def _claim(self) -> None:
        """Take over entries idle longer than claim_idle_ms (a crashed worker's, or our own
        failed ones awaiting a retry), a few pages per pass so a backlog is not starved."""
        worker = self.settings.worker
        limit = MAX_CLAIM_PAGES * worker.batch_size
        for stream in self._streams:
            for _ in range(MAX_CLAIM_PAGES):
                if len(self._backlog) >= limit or not self._claim_page(stream):
                    break

    def _claim_page(self, stream: str) -> bool:
        """One XAUTOCLAIM page; True when the scan of the pending list should go on."""
        worker = self.settings.worker
        cursor = self._claim_cursor.get(stream, b"0-0")
        try:
            reply = self._raw(
                "XAUTOCLAIM",
                stream,
                self._group,
                self.consumer,
                worker.claim_idle_ms,
                cursor,
                "COUNT",
                worker.batch_size,
            )
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                self._ensure_group(stream)
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
        entries = [Entry(stream, eid, _flat(fields)) for eid, fields in reply[1]]
        if entries:
            self._set_deliveries(stream, entries)
            log.info("%s: claimed %d idle entries", stream, len(entries))
            self._refresh_epochs()
            self._count(Entry(stream, b"0-0", None), "claimed", len(entries))
            self._backlog.extend(entries)
        return bool(reply[0] != b"0-0")

    def _set_deliveries(self, stream: str, entries: list[Entry]) -> None:
        pending = self._raw(
            "XPENDING",
            stream,
            self._group,
            entries[0].id,
            entries[-1].id,
            len(entries) * 2,
            self.consumer,
        )
        counts = {eid: int(n) for eid, _, _, n in pending}
        for entry in entries:
            entry.deliveries = counts.get(entry.id, entry.deliveries)

    def _check_memory(self, now: float) -> None:
        """Backpressure: near ``maxmemory``, say so (at most once a minute) and trim at every
        cycle until it eases. Unacknowledged entries are never deleted: a full Redis makes
        writes fail with OOM, which the worker retries with backoff until memory frees."""
        if not isinstance(self._client, redis.Redis):
            return
        memory = self._client.info("memory")
        limit = int(memory.get("maxmemory") or 0)
        used = int(memory.get("used_memory") or 0)
        pressed = limit > 0 and used >= MEMORY_PRESSURE * limit
        if pressed and now >= self._next_memory_warning:
            log.warning(
                "redis memory at %.0f%% of maxmemory (%d of %d bytes): trimming acknowledged"
                " entries at every cycle; unacknowledged entries are kept",
                100 * used / limit,
                used,
                limit,
            )
            self._next_memory_warning = now + 60
        self._memory_pressed = pressed
        if pressed:
            self._next_trim = now

    def _trim(self) -> None:
        assert self._client is not None
        for stream in self._streams:
            removed = self._library_call("streamsync_trim", 1, stream)
            if removed:
                log.debug("%s: trimmed %d acknowledged entries", stream, removed)

    def _prune_consumers(self) -> None:
        assert self._client is not None
        for stream in self._streams:
            try:
                consumers = self._client.xinfo_consumers(stream, self._group)
            except redis.ResponseError:
                continue
            for c in consumers:
                name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                if (
                    name != self.consumer
                    and c["pending"] == 0
                    and c["idle"] >= CONSUMER_PRUNE_IDLE_MS
                    and self._library_call(
                        "streamsync_prune_consumer",
                        1,
                        stream,
                        self._group,
                        name,
                        CONSUMER_PRUNE_IDLE_MS,
                    )
                ):
                    log.info("%s: removed consumer %s, idle with nothing pending", stream, name)

    def _check_drained(self) -> None:
        assert self._client is not None
        if self._backlog:
            return
        for stream in self._streams:
            summary = self._client.xpending(stream, self._group)
            if summary["pending"]:
                return
        if self.settings.worker.trim:
            self._trim()
        log.info("drained: every entry read and acknowledged")
        self._stop.set()


def _flat(fields: Any) -> list[bytes] | None:
    return list(fields) if fields is not None else None


def _parse_read(reply: Any) -> list[Entry]:
    if not reply:
        return []
    entries: list[Entry] = []
    for stream_name, items in reply:
        stream = stream_name.decode()
        entries.extend(Entry(stream, eid, fields) for eid, fields in items)
    return entries


def run_worker(
    settings: Settings,
    consumer: str | None = None,
    drain: bool = False,
    observer: WorkerObserver | None = None,
) -> ExitCode:
    """Build a worker and run it until stopped; the CLI's entry point."""
    return Worker(settings, consumer, drain=drain, observer=observer).run()
