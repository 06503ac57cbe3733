"""Prometheus metrics: what a worker did (``WorkerMetrics``), what Redis holds (``RedisCollector``,
queried at scrape time), and the HTTP endpoint serving both (``serve``).

Every metric is defined in this module, in a registry of the caller's (never the global one), with
the ``streamsync_`` prefix, ``_total`` counters and durations in seconds. Labels are ``stream``,
``table``, ``op``, ``outcome`` and ``redis`` (which Redis a server-wide figure is of: ``streams``,
or ``target`` for the cache's own Redis) only: never an entry id, a key or a consumer name, so the
number of series stays bounded by the configuration.

Every worker replica serves the Redis gauges, so several replicas report the same values under
different ``instance`` labels: aggregate them with ``max``, not ``sum``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from wsgiref.simple_server import WSGIServer

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from redis.backoff import NoBackoff
from redis.retry import Retry

from streamsync import __version__, connection
from streamsync.config import RedisSettings, Settings
from streamsync.discovery import find_streams
from streamsync.functions import Client, library_version, loaded_version
from streamsync.keys import dead_letter_stream

log = logging.getLogger(__name__)

PREFIX = "streamsync_"
#: The endpoint binds the loopback interface unless told otherwise: metrics name streams and
#: tables, which are not for the whole network to read.
DEFAULT_HOST = "127.0.0.1"
#: The port the compose stack and monitoring/prometheus.yml use (``--metrics-port``).
DEFAULT_PORT = 9108
#: Socket timeout of the scrape-time Redis queries: a scrape must answer well within
#: Prometheus's scrape_timeout (10 s by default) even when Redis does not.
SCRAPE_TIMEOUT_S = 2.0
#: How long a thread serving the endpoint may take to stop.
STOP_TIMEOUT_S = 5.0

#: Entries (and rows) per round trip: up to batch_size entries, MAX_ROWS_PER_CALL rows per call.
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000)
#: One applying round trip, from sending it to its replies settled.
APPLY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
#: Source commit to applied in Redis: 1 ms to 60 s.
LAG_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

#: Outcomes with a counter of their own besides streamsync_events_total.
CLAIMED = "claimed"
DEAD_LETTERED = "dead_lettered"

#: The ``redis`` label's values: the Redis of ``redis.url`` (the streams, and the cache too
#: without a ``target`` section), and the cache's own Redis.
STREAMS = "streams"
TARGET = "target"


def _version(version: tuple[int, int, int]) -> str:
    return ".".join(map(str, version))


class WorkerMetrics:
    """The worker's own metrics, fed through the ``WorkerObserver`` calls of
    ``streamsync.worker.Worker(..., observer=WorkerMetrics(registry))``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.events = Counter(
            PREFIX + "events",
            "Stream entries by what became of them (applied, stale, skipped, dropped, failed,"
            " dead_lettered, tombstone, vanished...); reclaims are in streamsync_reclaimed_total",
            ["stream", "table", "op", "outcome"],
            registry=registry,
        )
        self.batch_entries = Histogram(
            PREFIX + "batch_entries",
            "Entries applied per round trip to Redis",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.batch_rows = Histogram(
            PREFIX + "batch_rows",
            "Rows (function call arguments) applied per round trip to Redis",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.apply_duration = Histogram(
            PREFIX + "apply_duration_seconds",
            "Time of one applying round trip, from sending it to its replies settled",
            buckets=APPLY_BUCKETS,
            registry=registry,
        )
        self.lag = Histogram(
            PREFIX + "sync_lag_seconds",
            "Source commit (source.ts_ms) to applied in Redis, per applied change",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.reclaimed = Counter(
            PREFIX + "reclaimed",
            "Entries taken over from a consumer that left them idle (XAUTOCLAIM)",
            ["stream"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            PREFIX + "dead_lettered",
            "Entries moved to the stream's dead-letter stream (<stream>:dlq)",
            ["stream"],
            registry=registry,
        )
        self.reconnects = Counter(
            PREFIX + "reconnects",
            "Times the worker lost its Redis connection and reconnected",
            registry=registry,
        )
        self.build_info = Info(
            PREFIX + "build",
            "The streamsync version, and the version of the Functions library it ships",
            registry=registry,
        )
        self.build_info.info(
            {"version": __version__, "library_version": _version(library_version())}
        )

    # -- WorkerObserver ------------------------------------------------------------------

    def counted(self, stream: str, table: str, op: str, outcome: str, n: int) -> None:
        """``n`` entries of ``stream`` reached ``outcome``."""
        if outcome == CLAIMED:
            # a re-delivery, not something that became of an event: it has no table nor op, and
            # the claimed entries are counted again once applied
            self.reclaimed.labels(stream).inc(n)
            return
        self.events.labels(stream, table, op, outcome).inc(n)
        if outcome == DEAD_LETTERED:
            self.dead_lettered.labels(stream).inc(n)

    def applied_batch(self, entries: int, rows: int, seconds: float) -> None:
        """A round trip applied ``entries`` entries (``rows`` rows) in ``seconds``."""
        self.batch_entries.observe(entries)
        self.batch_rows.observe(rows)
        self.apply_duration.observe(max(0.0, seconds))

    def sync_lag(self, seconds: float) -> None:
        """An applied change's source commit to applied in Redis."""
        self.lag.observe(max(0.0, seconds))

    def reconnected(self) -> None:
        """The worker lost its connection and reconnects."""
        self.reconnects.inc()


@dataclass
class _Families:
    """The metric families one scrape of Redis fills."""

    up: GaugeMetricFamily = field(
        default_factory=lambda: GaugeMetricFamily(
            PREFIX + "redis_up",
            "1 if the last scrape of this Redis answered, else 0",
            labels=["redis"],
        )
    )
    stream_length: GaugeMetricFamily = field(
        default_factory=lambda: GaugeMetricFamily(
            PREFIX + "stream_length", "Entries in the stream (XLEN)", labels=["stream"]
        )
    )
    pending: GaugeMetricFamily = field(
        default_factory=lambda: GaugeMetricFamily(
            PREFIX + "pending_entries",
            "Entries delivered to the group's consumers and not yet acknowledged",
            labels=["stream"],
        )
    )
    group_lag: GaugeMetricFamily = field(
        default_factory=lambda: GaugeMetricFamily(
            PREFIX + "group_lag_entries",
            "Entries not yet delivered to the group (XINFO GROUPS lag; absent when Redis"
            " cannot tell, after entries were deleted)",
            labels=["stream"],
        )
    )
    dlq_length: GaugeMetricFamily = field(
        default_factory=lambda: GaugeMetricFamily(
            PREFIX + "dlq_length",
            "Entries in the stream's dead-letter stream (<stream>:dlq)",
            labels=["stream"],
        )
    )
    oldest_pending_age: GaugeMetricFamily = field(
        default_factory=lambda: GaugeMetricFamily(
            PREFIX + "oldest_pending_age_seconds",
            "Age (by its id, on Redis's clock) of the oldest entry delivered and not yet"
            " acknowledged; 0 when none is pending",
            labels=["stream"],
        )
    )
    used_memory: GaugeMetricFamily = field(
        default_factory=lambda: GaugeMetricFamily(
            PREFIX + "redis_used_memory_bytes",
            "Memory Redis uses (INFO memory used_memory)",
            labels=["redis"],
        )
    )
    maxmemory: GaugeMetricFamily = field(
        default_factory=lambda: GaugeMetricFamily(
            PREFIX + "redis_maxmemory_bytes",
            "Redis's memory limit (INFO memory maxmemory; 0 means no limit)",
            labels=["redis"],
        )
    )
    keyspace_hits: CounterMetricFamily = field(
        default_factory=lambda: CounterMetricFamily(
            PREFIX + "redis_keyspace_hits",
            "Key lookups that found the key, server-wide (INFO stats keyspace_hits)",
            labels=["redis"],
        )
    )
    keyspace_misses: CounterMetricFamily = field(
        default_factory=lambda: CounterMetricFamily(
            PREFIX + "redis_keyspace_misses",
            "Key lookups that missed, server-wide (INFO stats keyspace_misses)",
            labels=["redis"],
        )
    )
    evicted_keys: CounterMetricFamily = field(
        default_factory=lambda: CounterMetricFamily(
            PREFIX + "redis_evicted_keys",
            "Keys Redis evicted under its maxmemory-policy, server-wide (INFO stats"
            " evicted_keys); on the streams' Redis beside a target, any is a problem",
            labels=["redis"],
        )
    )
    library: InfoMetricFamily = field(
        default_factory=lambda: InfoMetricFamily(
            PREFIX + "library_loaded",
            "The streamsync Functions library loaded in Redis (absent when none is)",
            labels=["redis"],
        )
    )

    def __iter__(self) -> Iterator[Metric]:
        return iter(vars(self).values())

    def add(self, other: _Families) -> None:
        """Take ``other``'s samples (but its ``up``) into these families."""
        for mine, theirs in zip(self, other, strict=True):
            if mine is not self.up:
                mine.samples.extend(theirs.samples)


def _scrape_client(settings: RedisSettings, timeout_s: float) -> Client:
    return connection.server_or_cluster(
        settings,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        client_name="streamsync:metrics",
        protocol=2,
    )


class RedisCollector(Collector):
    """Gauges of what Redis holds, queried when Prometheus scrapes, on clients of its own with
    a short timeout and no retries: the streams' Redis, and the cache's own (``target``) when
    the configuration names one. A scrape never raises: a Redis that does not answer is
    reported as ``streamsync_redis_up{redis=...} 0``, and nothing else of it."""

    def __init__(self, settings: Settings, *, timeout_s: float = SCRAPE_TIMEOUT_S) -> None:
        self.settings = settings
        self.client = _scrape_client(settings.redis, timeout_s)
        self.target = None
        if settings.target is not None:
            self.target = _scrape_client(settings.target, timeout_s)
        self._lock = threading.Lock()
        self._discovered: list[str] = []
        self._next_discover = 0.0
        self._was_up = {STREAMS: True, TARGET: True}

    def close(self) -> None:
        """Close the collector's connections."""
        self.client.close()
        if self.target is not None:
            self.target.close()

    def describe(self) -> Iterable[Metric]:
        """The families, without samples: registering the collector queries nothing."""
        return list(_Families())

    def collect(self) -> Iterable[Metric]:
        """Query each Redis and return the families; never raises."""
        families = _Families()
        sides: list[tuple[str, Callable[[_Families], None]]] = [(STREAMS, self._fill)]
        if self.target is not None:
            target = self.target
            sides.append((TARGET, lambda f: _fill_server(target, TARGET, f)))
        every = True
        for name, fill in sides:
            side = self._scrape(name, fill)
            families.up.add_metric([name], 0 if side is None else 1)
            if side is None:
                every = False
            else:
                families.add(side)
        # a Redis that did not answer leaves out the families only it fills
        return list(families) if every else [f for f in families if f.samples]

    def _scrape(self, name: str, fill: Callable[[_Families], None]) -> _Families | None:
        side = _Families()
        try:
            fill(side)
        except Exception as exc:
            # whatever went wrong (Redis down or slow, a refusal, an unexpected reply), the
            # scrape reports it as a value, never as an error of the endpoint
            if self._was_up[name]:
                log.warning(
                    "metrics: cannot query the %s redis: %s: %s", name, type(exc).__name__, exc
                )
            self._was_up[name] = False
            return None
        if not self._was_up[name]:
            log.info("metrics: the %s redis answers again", name)
        self._was_up[name] = True
        return side

    def streams(self) -> list[str]:
        """The configured streams, or those found under the prefix (cached for the worker's
        discovery interval, dead-letter streams left out)."""
        source = self.settings.source
        if source.streams is not None:
            return list(source.streams)
        with self._lock:
            now = time.monotonic()
            if now >= self._next_discover:
                self._discovered = find_streams(self.client, source.stream_prefix or "")
                self._next_discover = now + source.discover_interval_s
            return list(self._discovered)

    def _fill(self, f: _Families) -> None:
        streams = self.streams()
        group = self.settings.source.group
        now_ms = _now_ms(self.client)
        pipe = self.client.pipeline(transaction=False)
        for stream in streams:
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
            pipe.xpending(stream, group)
            pipe.xlen(dead_letter_stream(stream))
        # a refused command (ACL, a key of the wrong type, no group yet) leaves its metric out;
        # a connection error or timeout raises and fails the whole scrape
        replies: list[Any] = pipe.execute(raise_on_error=False)
        for i, stream in enumerate(streams):
            _add_stream(f, stream, group, now_ms, replies[4 * i : 4 * i + 4])
        _fill_server(self.client, STREAMS, f)


def _now_ms(client: Client) -> float:
    """Redis's clock (of one primary of a Cluster), this machine's when TIME is refused."""
    nodes = connection.primaries(client)
    one = nodes[0][1] if nodes else client
    try:
        seconds, micros = one.time()
    except redis.ResponseError:
        return time.time() * 1000
    return float(seconds) * 1000 + float(micros) / 1000


def _fill_server(client: Client, name: str, f: _Families) -> None:
    """The server-wide figures of one Redis; of a Cluster, of each primary, labelled
    ``<name>@<host:port>``."""
    nodes = connection.primaries(client)
    if not nodes:
        assert isinstance(client, redis.Redis)
        _fill_node(client, name, f)
    for node, node_client in nodes:
        _fill_node(node_client, f"{name}@{node}", f)


def _fill_node(client: redis.Redis, name: str, f: _Families) -> None:
    """The server-wide figures of one server: memory, lookups, evictions, library."""
    pipe = client.pipeline(transaction=False)
    pipe.info("memory")
    pipe.info("stats")
    memory, stats = pipe.execute(raise_on_error=False)
    if _ok(memory):
        f.used_memory.add_metric([name], float(memory["used_memory"]))
        f.maxmemory.add_metric([name], float(memory["maxmemory"]))
    if _ok(stats):
        f.keyspace_hits.add_metric([name], float(stats["keyspace_hits"]))
        f.keyspace_misses.add_metric([name], float(stats["keyspace_misses"]))
        f.evicted_keys.add_metric([name], float(stats["evicted_keys"]))
    try:
        loaded = loaded_version(client)
    except redis.ResponseError:
        loaded = None
    if loaded is not None:
        f.library.add_metric([name], {"version": _version(loaded)})


def _add_stream(
    f: _Families, stream: str, group: str, now_ms: float, replies: Sequence[Any]
) -> None:
    """One stream's samples, from its replies to XLEN, XINFO GROUPS, XPENDING and the XLEN of
    its dead-letter stream."""
    length, groups, summary, dlq = replies
    if _ok(length):
        f.stream_length.add_metric([stream], float(length))
    if _ok(dlq):
        f.dlq_length.add_metric([stream], float(dlq))
    ours = next(
        (g for g in groups if _text(g["name"]) == group) if _ok(groups) else iter(()),
        None,
    )
    if ours is not None:
        f.pending.add_metric([stream], float(ours["pending"]))
        if ours.get("lag") is not None:
            f.group_lag.add_metric([stream], float(ours["lag"]))
    if _ok(summary):
        oldest = summary["min"]
        age_ms = 0.0
        if summary["pending"] and oldest is not None:
            age_ms = max(0.0, now_ms - int(_text(oldest).partition("-")[0]))
        f.oldest_pending_age.add_metric([stream], age_ms / 1000)


def _ok(reply: Any) -> bool:
    return not isinstance(reply, Exception)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class MetricsServer:
    """The running HTTP endpoint; ``close()`` (or leaving a ``with`` block) stops it."""

    def __init__(
        self,
        httpd: WSGIServer,
        thread: threading.Thread,
        registry: CollectorRegistry,
        collector: RedisCollector,
    ) -> None:
        self.httpd = httpd
        self.thread = thread
        self.registry = registry
        self.collector = collector
        self._closed = False

    @property
    def host(self) -> str:
        """The address the endpoint is bound to."""
        return str(self.httpd.server_address[0])

    @property
    def port(self) -> int:
        """The port the endpoint listens on (the one picked by the system for port 0)."""
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        """The metrics URL."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving, close the socket, and drop the Redis collector from the registry."""
        if self._closed:
            return
        self._closed = True
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(STOP_TIMEOUT_S)
        self.registry.unregister(self.collector)
        self.collector.close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def serve(
    settings: Settings,
    registry: CollectorRegistry,
    *,
    host: str = DEFAULT_HOST,
    port: int,
    timeout_s: float = SCRAPE_TIMEOUT_S,
) -> MetricsServer:
    """Serve ``registry`` (a ``WorkerMetrics``'s), plus a ``RedisCollector`` for ``settings``
    added to it, at ``http://host:port/metrics`` from a daemon thread. Binds the loopback
    interface unless ``host`` says otherwise; port 0 picks a free port. Raises OSError when the
    address cannot be bound."""
    collector = RedisCollector(settings, timeout_s=timeout_s)
    registry.register(collector)
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except BaseException:
        registry.unregister(collector)
        collector.close()
        raise
    server = MetricsServer(httpd, thread, registry, collector)
    log.info("serving metrics at %s", server.url)
    return server
