"""``streamsync status``: what the streams, the consumer group and the workers are doing, and
whether that is healthy.

Three separate steps, so that each can be tested on its own (the command, streamsync.cli.status,
only connects, calls them and prints):

- ``collect(client, settings, now_ms)`` reads Redis into a ``StatusReport`` (a tree of frozen
  dataclasses whose field names, units and nulls are the JSON document's, see docs/status.md);
- ``problems(report, thresholds)`` turns a report into the list of what is wrong (empty: healthy),
  without touching Redis;
- ``render(...)`` / ``to_document(...)`` present it, as rich tables or as one JSON document.

Durations are float seconds named ``*_s``; instants are integer Unix milliseconds named ``*_ms``.
Ages are measured against Redis's clock (``TIME``), the clock that stamps stream entry ids.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from rich.console import Group, JustifyMethod, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from streamsync import connection, eviction, layout, redisjson
from streamsync.config import Settings, redact_url
from streamsync.discovery import source_streams
from streamsync.errors import PoisonEntryError
from streamsync.events import ChangeEvent, Decoder
from streamsync.functions import Client, Version, library_version, loaded_version
from streamsync.keys import StateKeys, dead_letter_stream
from streamsync.worker import CONSUMER_PRUNE_IDLE_MS

#: Version of the JSON document's layout; bumped when a field changes meaning or goes away.
SCHEMA_VERSION = 1
#: A consumer idle this long is dead even with nothing pending (the workers prune it then).
DEAD_IDLE_MS = CONSUMER_PRUNE_IDLE_MS
#: Outcomes a worker counts, in the order they are shown (others found in the hash follow).
OUTCOMES = (
    "applied",
    "stale",
    "skipped",
    "dropped",
    "dead_lettered",
    "failed",
    "tombstone",
    "heartbeat",
    "claimed",
    "vanished",
)
#: Debezium ops, in the order they are shown; ``none`` gathers the counts of entries carrying no
#: op (tombstones, heartbeats, claims, vanished or undecodable entries).
OPS = ("c", "u", "d", "r", "t", "none")
NO_OP = "none"
#: The memory policy that never evicts a key.
SAFE_POLICY = eviction.NO_EVICTION

LAG_NULL_NOTE = (
    "Redis cannot count the unread entries of this group (entries deleted inside the unread"
    " range, or a group position set by id); 'unread' says whether any entry awaits a first read"
)


# -- the report ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OldestPending:
    """The oldest entry delivered to a consumer and not acknowledged (XPENDING - + 1)."""

    id: str
    #: Now minus the entry id's milliseconds: how long ago the entry was added.
    age_s: float
    consumer: str
    #: Since the entry was last delivered (XPENDING's idle time).
    idle_s: float
    deliveries: int
    #: The owning consumer's own idle time (XINFO CONSUMERS); null if it is not listed.
    consumer_idle_s: float | None


@dataclass(frozen=True, slots=True)
class ConsumerStatus:
    """One consumer of the group on one stream (XINFO CONSUMERS)."""

    name: str
    pending: int
    #: Since the consumer's last attempted read or claim.
    idle_s: float
    #: Since its last successful read or claim; Redis 7.2 and newer, else null.
    inactive_s: float | None
    #: Its worker's liveness mark is present: the worker runs (it refreshes the mark every few
    #: seconds and deletes it when it stops), however long it has been idle.
    alive: bool
    #: Without a liveness mark: idle longer than claim_idle_ms while holding pending entries, or
    #: idle longer than an hour.
    dead: bool
    #: ``active`` (alive, or idle at most claim_idle_ms), ``idle`` (no mark, idle longer, nothing
    #: pending) or ``dead``.
    state: str


@dataclass(frozen=True, slots=True)
class StreamStatus:
    """One source stream, its consumer group, its dead letters and the workers' counters."""

    name: str
    #: False when the key does not exist (length 0 then).
    exists: bool
    #: Why the stream could not be read (e.g. the key is not a stream); null when fine.
    error: str | None
    length: int
    last_entry_id: str | None
    last_entry_age_s: float | None
    group_exists: bool
    last_delivered_id: str | None
    #: XINFO GROUPS ``entries-read``; null when Redis does not know it.
    entries_read: int | None
    #: XINFO GROUPS ``lag``: entries not yet delivered to the group; null when Redis cannot tell.
    lag: int | None
    #: Why ``lag`` is null; null otherwise.
    lag_note: str | None
    #: True when some entry was never delivered to the group.
    unread: bool
    oldest_unread_id: str | None
    oldest_unread_age_s: float | None
    #: Entries delivered and not acknowledged, group-wide.
    pending: int
    oldest_pending: OldestPending | None
    consumers: tuple[ConsumerStatus, ...]
    dlq_stream: str
    dlq_length: int
    #: ``{op: {outcome: n}}`` summed over tables, from the workers' stats hash.
    counts: dict[str, dict[str, int]]
    #: ``{outcome: n}`` summed over ops.
    totals: dict[str, int]
    #: When a worker last applied a change of this stream (the worker's clock).
    last_applied_ms: int | None
    last_applied_id: str | None
    #: Commit time in the database of that change (``source.ts_ms``).
    last_source_ts_ms: int | None
    #: Now minus last_source_ts_ms: the end-to-end lag of the last applied change.
    sync_lag_s: float | None
    #: Now minus last_applied_ms.
    since_last_applied_s: float | None
    #: Now minus the commit time of the oldest change still pending or unread (its entry's age
    #: when it carries no commit time); null when nothing waits.
    waiting_lag_s: float | None

    @property
    def waiting(self) -> bool:
        """Entries are pending or unread."""
        return self.pending > 0 or self.unread


@dataclass(frozen=True, slots=True)
class MemoryStatus:
    """INFO memory, and the keys evicted (INFO stats)."""

    used_memory_bytes: int
    #: 0 means no limit.
    maxmemory_bytes: int
    maxmemory_policy: str
    #: used / max; null without a limit.
    used_ratio: float | None
    #: Keys evicted since the server started (or CONFIG RESETSTAT).
    evicted_keys: int = 0


@dataclass(frozen=True, slots=True)
class KeyspaceStatus:
    """INFO stats: lookups of existing and missing keys since the server started (or CONFIG
    RESETSTAT), the workers' own lookups included."""

    hits: int
    misses: int
    #: hits / (hits + misses); null before any lookup.
    hit_rate: float | None


@dataclass(frozen=True, slots=True)
class LibraryStatus:
    """The streamsync Functions library loaded in Redis and the one this package ships."""

    #: ``MAJOR.MINOR.PATCH``; null when no library is loaded.
    loaded: str | None
    shipped: str
    #: In the Redis holding the cache, the bookkeeping layout (``streamsync.layout``): ``2``,
    #: ``1.x`` (1.x bookkeeping: ``streamsync migrate`` converts it), ``migrating`` (a
    #: migration did not finish), ``none`` (nothing yet), ``newer``; null elsewhere, or when
    #: it could not be read.
    layout: str | None = None


@dataclass(frozen=True, slots=True)
class RedisStatus:
    """Where the report comes from."""

    #: redis.url without credentials.
    url: str
    #: null when INFO is not permitted.
    version: str | None


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """One primary of a Redis Cluster, read directly: what differs from node to node."""

    #: ``host:port``.
    node: str
    #: null when INFO is not permitted.
    version: str | None
    memory: MemoryStatus | None
    keyspace: KeyspaceStatus | None
    library: LibraryStatus


@dataclass(frozen=True, slots=True)
class TargetStatus:
    """The cache's own Redis (the ``target`` section)."""

    #: target.url without credentials.
    url: str
    #: Why it could not be read (then every figure below is null); null when fine.
    error: str | None
    #: False when target.url reaches the streams' Redis itself (the same ``run_id``): the
    #: eviction rules of one Redis apply then.
    separate: bool
    #: null when INFO is not permitted.
    version: str | None
    memory: MemoryStatus | None
    keyspace: KeyspaceStatus | None
    #: null when it could not be read.
    library: LibraryStatus | None
    #: Per primary when the target is a Redis Cluster (the figures above add them up).
    nodes: tuple[NodeStatus, ...] = ()


@dataclass(frozen=True, slots=True)
class StatusReport:
    """Everything ``streamsync status`` shows, read from Redis at ``generated_at_ms``."""

    #: Redis's clock when the report was taken: the "now" of every age.
    generated_at_ms: int
    redis: RedisStatus
    group: str
    #: source.stream_prefix when the streams were discovered, else null.
    stream_prefix: str | None
    claim_idle_ms: int
    streams: tuple[StreamStatus, ...]
    #: null when INFO is not permitted (see notes).
    memory: MemoryStatus | None
    #: null when INFO is not permitted (see notes).
    keyspace: KeyspaceStatus | None
    library: LibraryStatus
    #: What could not be read, and why.
    notes: tuple[str, ...] = ()
    #: The cache's own Redis; null without a ``target`` section (the cache is in ``redis``).
    target: TargetStatus | None = None
    #: The rules whose keys gather many rows (sets, sorted sets, lists, streams): a policy
    #: that may evict them breaks them (see ``eviction.collections_problem``).
    collection_rules: tuple[str, ...] = ()
    #: Per json rule, what it writes in the cache's Redis: ``redisjson`` or ``text`` (empty
    #: without json rules, or when ``MODULE LIST`` could not be read: see notes).
    json_encodings: dict[str, str] = field(default_factory=dict)
    #: Per primary when the streams' Redis is a Redis Cluster (memory, keyspace and library
    #: above add them up: sums, the policy evicting the most, the oldest library).
    nodes: tuple[NodeStatus, ...] = ()

    @property
    def separate_target(self) -> bool:
        """Whether the cache lives in a Redis of its own."""
        return self.target is not None and self.target.separate


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The limits ``problems`` applies."""

    max_lag_s: float = 60.0
    #: None: twice claim_idle_ms.
    max_pending_age_s: float | None = None

    def pending_age_limit_s(self, report: StatusReport) -> float:
        """max_pending_age_s, or its default from the report's claim_idle_ms."""
        if self.max_pending_age_s is not None:
            return self.max_pending_age_s
        return 2 * report.claim_idle_ms / 1000


# -- collecting ----------------------------------------------------------------------------


def _str(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _opt_str(value: Any) -> str | None:
    return None if value is None else _str(value)


def _opt_int(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(float(_str(value)))
    except ValueError:
        return None


def id_ms(entry_id: str) -> int:
    """The milliseconds part of a stream entry id."""
    return int(entry_id.partition("-")[0])


def _age_s(now_ms: int, then_ms: float | None) -> float | None:
    if then_ms is None:
        return None
    return round(max(0.0, now_ms - then_ms) / 1000, 3)


def _secs(ms: float) -> float:
    return round(ms / 1000, 3)


def fmt_version(version: Version | None) -> str | None:
    """``(1, 2, 3)`` -> ``"1.2.3"``."""
    return None if version is None else ".".join(map(str, version))


def discover_streams(client: Client, settings: Settings) -> list[str]:
    """The configured streams, or those ``source.stream_prefix`` finds (dead letters excluded),
    sorted."""
    return source_streams(client, settings.source)


def _parse_counts(
    stats: Mapping[bytes, bytes],
) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    counts: dict[str, Counter[str]] = {}
    totals: Counter[str] = Counter()
    for raw_name, raw_value in stats.items():
        name = _str(raw_name)
        if not name.startswith("n:"):
            continue
        parts = name[2:].rsplit(":", 2)
        n = _opt_int(raw_value)
        if len(parts) != 3 or n is None:
            continue
        _, op, outcome = parts
        counts.setdefault(op or NO_OP, Counter())[outcome] += n
        totals[outcome] += n
    return (
        {op: dict(sorted(c.items())) for op, c in sorted(counts.items())},
        dict(sorted(totals.items())),
    )


def _consumer_state(
    pending: int, idle_ms: int, claim_idle_ms: int, alive: bool
) -> tuple[bool, str]:
    # a worker blocked on an idle stream looks idle to Redis 7.0 (a blocked XREADGROUP does not
    # reset the consumer's idle time): its liveness mark is the proof it runs
    if alive:
        return False, "active"
    dead = (idle_ms > claim_idle_ms and pending > 0) or idle_ms > DEAD_IDLE_MS
    if dead:
        return True, "dead"
    return False, "active" if idle_ms <= claim_idle_ms else "idle"


def _change_ts_ms(decoder: Decoder, fields: Mapping[bytes, bytes] | None) -> int | None:
    """The commit time carried by an entry, or None (not a change, or not decodable)."""
    if not fields:
        return None
    flat = [part for pair in fields.items() for part in pair]
    try:
        event = decoder.decode(flat)
    except (PoisonEntryError, ValueError):
        return None
    return event.ts_ms if isinstance(event, ChangeEvent) else None


def _first_entry(reply: Any) -> tuple[str, Mapping[bytes, bytes] | None] | None:
    if not reply:
        return None
    entry_id, fields = reply[0]
    return _str(entry_id), fields


def _liveness_marks(
    client: Client, settings: Settings, consumers: Sequence[str]
) -> dict[str, bool]:
    """Which of the group's ``consumers`` have a liveness mark (one round trip)."""
    if not consumers:
        return {}
    keys = StateKeys.from_settings(settings.worker)
    group = settings.source.group
    pipe = client.pipeline(transaction=False)
    for name in consumers:
        pipe.exists(keys.alive(group, name))
    return {name: bool(n) for name, n in zip(consumers, pipe.execute(), strict=True)}


def collect_stream(
    client: Client, settings: Settings, stream: str, now_ms: int, decoder: Decoder
) -> StreamStatus:
    """Read one stream's status. The reads of the stream, its group, its consumers and its
    counters go in one round trip (a pipeline, not a MULTI: a monitoring user needs read
    commands only)."""
    group = settings.source.group
    dlq = dead_letter_stream(stream)
    (kind, length, last, groups, consumers, summary, oldest, dlq_len, stats) = _read_stream(
        client, settings, stream, dlq
    )
    kind = _str(kind)
    stats = stats if isinstance(stats, dict) else {}
    counts, totals = _parse_counts(stats)
    if isinstance(dlq_len, Exception):
        dlq_len = 0
    error = None
    if kind not in ("stream", "none"):
        error = f"the key is a {kind}, not a stream"
    elif isinstance(length, Exception):
        error = f"cannot read the stream: {length}"
    if error is not None or kind == "none":
        length, last, groups = 0, [], []
    last_entry = _first_entry(last)
    last_id = last_entry[0] if last_entry else None
    info = next(
        (g for g in (groups if isinstance(groups, list) else []) if _str(g["name"]) == group),
        None,
    )

    stats_last_applied = _opt_int(stats.get(b"last_applied_ms"))
    stats_source = _opt_int(stats.get(b"last_source_ts_ms"))
    stats_last_id = _opt_str(stats.get(b"last_id"))
    common: dict[str, Any] = {
        "name": stream,
        "exists": kind != "none",
        "error": error,
        "length": int(length),
        "last_entry_id": last_id,
        "last_entry_age_s": _age_s(now_ms, id_ms(last_id)) if last_id else None,
        "dlq_stream": dlq,
        "dlq_length": int(dlq_len),
        "counts": counts,
        "totals": totals,
        "last_applied_ms": stats_last_applied,
        "last_applied_id": stats_last_id,
        "last_source_ts_ms": stats_source,
        "sync_lag_s": _age_s(now_ms, stats_source),
        "since_last_applied_s": _age_s(now_ms, stats_last_applied),
    }
    if info is None:
        return StreamStatus(
            **common,
            group_exists=False,
            last_delivered_id=None,
            entries_read=None,
            lag=None,
            lag_note=None,
            unread=int(length) > 0,
            oldest_unread_id=None,
            oldest_unread_age_s=None,
            pending=0,
            oldest_pending=None,
            consumers=(),
            waiting_lag_s=None,
        )

    listed = consumers if isinstance(consumers, list) else []
    consumer_list = _consumers(client, settings, listed)
    oldest_pending = _oldest_pending(oldest, consumer_list, now_ms)
    pending = int(summary["pending"]) if isinstance(summary, dict) else 0

    last_delivered = _str(info["last-delivered-id"])
    lag = _opt_int(info.get("lag"))
    # the first entry never delivered to the group: it tells whether anything is unread even
    # when Redis cannot count it
    first_unread = _first_entry(client.xrange(stream, min="(" + last_delivered, count=1))
    unread = lag > 0 if lag is not None else first_unread is not None
    if not unread:
        first_unread = None

    return StreamStatus(
        **common,
        group_exists=True,
        last_delivered_id=last_delivered,
        entries_read=_opt_int(info.get("entries-read")),
        lag=lag,
        lag_note=LAG_NULL_NOTE if lag is None else None,
        unread=unread,
        oldest_unread_id=first_unread[0] if first_unread else None,
        oldest_unread_age_s=_age_s(now_ms, id_ms(first_unread[0])) if first_unread else None,
        pending=pending,
        oldest_pending=oldest_pending,
        consumers=consumer_list,
        waiting_lag_s=_waiting_lag_s(
            client,
            stream,
            now_ms,
            decoder,
            oldest_pending=oldest_pending,
            first_unread=first_unread,
        ),
    )


def _read_stream(client: Client, settings: Settings, stream: str, dlq: str) -> list[Any]:
    """The replies to TYPE, XLEN, XREVRANGE + - COUNT 1, XINFO GROUPS, XINFO CONSUMERS,
    XPENDING, XPENDING - + 1, the dead letters' XLEN and the workers' stats HGETALL; a refused
    command raises, other errors are replies."""
    group = settings.source.group
    pipe = client.pipeline(transaction=False)
    pipe.type(stream)
    pipe.xlen(stream)
    pipe.xrevrange(stream, count=1)
    pipe.xinfo_groups(stream)
    pipe.xinfo_consumers(stream, group)
    pipe.xpending(stream, group)
    pipe.xpending_range(stream, group, "-", "+", 1)
    pipe.xlen(dlq)
    pipe.hgetall(StateKeys.from_settings(settings.worker).stats(group, stream))
    replies: list[Any] = pipe.execute(raise_on_error=False)
    for reply in replies:
        # a missing key or group reads as such; a refused command must not
        if isinstance(reply, redis.exceptions.NoPermissionError):
            raise reply
    return replies


def _consumers(
    client: Client, settings: Settings, listed: Sequence[Any]
) -> tuple[ConsumerStatus, ...]:
    """The group's consumers as XINFO CONSUMERS ``listed`` them, with their liveness marks,
    sorted by name."""
    claim_idle_ms = settings.worker.claim_idle_ms
    marks = _liveness_marks(client, settings, [_str(c["name"]) for c in listed])
    consumer_list: list[ConsumerStatus] = []
    for c in listed:
        name = _str(c["name"])
        pending_n, idle_ms = int(c["pending"]), int(c["idle"])
        inactive = c.get("inactive")
        dead, state = _consumer_state(pending_n, idle_ms, claim_idle_ms, marks[name])
        consumer_list.append(
            ConsumerStatus(
                name=name,
                pending=pending_n,
                idle_s=_secs(idle_ms),
                inactive_s=None if inactive is None or int(inactive) < 0 else _secs(inactive),
                alive=marks[name],
                dead=dead,
                state=state,
            )
        )
    consumer_list.sort(key=lambda c: c.name)
    return tuple(consumer_list)


def _oldest_pending(
    reply: Any, consumers: Sequence[ConsumerStatus], now_ms: int
) -> OldestPending | None:
    """The oldest pending entry from the reply to XPENDING - + 1; None when nothing is
    pending."""
    if not isinstance(reply, list) or not reply:
        return None
    o = reply[0]
    pid, owner = _str(o["message_id"]), _str(o["consumer"])
    owner_idle_s = next((c.idle_s for c in consumers if c.name == owner), None)
    return OldestPending(
        id=pid,
        age_s=_age_s(now_ms, id_ms(pid)) or 0.0,
        consumer=owner,
        idle_s=_secs(int(o["time_since_delivered"])),
        deliveries=int(o["times_delivered"]),
        consumer_idle_s=owner_idle_s,
    )


def _waiting_lag_s(
    client: Client,
    stream: str,
    now_ms: int,
    decoder: Decoder,
    *,
    oldest_pending: OldestPending | None,
    first_unread: tuple[str, Mapping[bytes, bytes] | None] | None,
) -> float | None:
    """How far behind the cache is: the age of the commit time of the oldest change still
    waiting (pending, else unread), or of its entry when it carries none; None when nothing
    waits."""
    oldest_waiting: tuple[str, Mapping[bytes, bytes] | None] | None = first_unread
    if oldest_pending is not None:
        oldest_waiting = _first_entry(
            client.xrange(stream, min=oldest_pending.id, max=oldest_pending.id, count=1)
        ) or (oldest_pending.id, None)
    if oldest_waiting is None:
        return None
    ts_ms = _change_ts_ms(decoder, oldest_waiting[1])
    return _age_s(now_ms, ts_ms if ts_ms is not None else id_ms(oldest_waiting[0]))


def redis_now_ms(client: Client) -> int | None:
    """Redis's clock (TIME) in milliseconds; None when this user may not run TIME."""
    nodes = connection.primaries(client)
    one = nodes[0][1] if nodes else client
    try:
        seconds, micros = one.time()
    except redis.exceptions.NoPermissionError:
        return None
    return int(seconds) * 1000 + int(micros) // 1000


def _info(client: redis.Redis) -> dict[str, Any] | None:
    """INFO (server, memory, stats...); None when this user may not run it."""
    try:
        return dict(client.info())
    except redis.exceptions.NoPermissionError:
        return None


#: INFO fields a Cluster's report adds up over its primaries.
_SUMMED = ("used_memory", "maxmemory", "evicted_keys", "keyspace_hits", "keyspace_misses")


def _summed_info(infos: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One INFO for a whole Cluster: sums where figures add up, the policy evicting the most
    (the one whose rules matter), the oldest version; no run id (it is no one server)."""
    total: dict[str, Any] = {name: sum(int(i.get(name, 0)) for i in infos) for name in _SUMMED}
    policies = [str(i.get("maxmemory_policy", "?")) for i in infos]
    total["maxmemory_policy"] = max(
        policies, key=lambda p: (eviction.evicts_any_key(p), p != eviction.NO_EVICTION)
    )
    total["redis_version"] = min(str(i.get("redis_version", "?")) for i in infos)
    return total


def _server(
    client: Client, settings: Settings | None
) -> tuple[dict[str, Any] | None, LibraryStatus, tuple[NodeStatus, ...]]:
    """INFO, the library and, for a Cluster, each primary's own figures (read on the node):
    INFO and library of the whole added up (the oldest library, none if a node lacks it)."""
    nodes = connection.primaries(client)
    if not nodes:
        assert isinstance(client, redis.Redis)
        return _info(client), _library(client, settings), ()
    found = []
    infos = []
    for name, node in nodes:
        info = _info(node)
        memory = keyspace = version = None
        if info is not None:
            infos.append(info)
            memory, keyspace = _memory(info)
            version = str(info.get("redis_version", "?"))
        found.append(NodeStatus(name, version, memory, keyspace, _library(node)))
    loaded = [n.library.loaded for n in found]
    oldest = None
    if all(loaded):
        oldest = min((v for v in loaded if v), key=lambda v: tuple(map(int, v.split("."))))
    shipped = found[0].library.shipped
    library = LibraryStatus(loaded=oldest, shipped=shipped, layout=_layout(client, settings))
    return (_summed_info(infos) if infos else None), library, tuple(found)


def _memory(info: Mapping[str, Any]) -> tuple[MemoryStatus, KeyspaceStatus]:
    used, maxmemory = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
    hits, misses = int(info.get("keyspace_hits", 0)), int(info.get("keyspace_misses", 0))
    memory = MemoryStatus(
        used_memory_bytes=used,
        maxmemory_bytes=maxmemory,
        maxmemory_policy=str(info.get("maxmemory_policy", "?")),
        used_ratio=round(used / maxmemory, 4) if maxmemory else None,
        evicted_keys=int(info.get("evicted_keys", 0)),
    )
    keyspace = KeyspaceStatus(
        hits=hits,
        misses=misses,
        hit_rate=round(hits / (hits + misses), 4) if hits + misses else None,
    )
    return memory, keyspace


def _layout(client: Client, settings: Settings | None) -> str | None:
    """With ``settings``, ``client`` holds the cache: its bookkeeping layout (read-only,
    without the per-slot search of a Cluster)."""
    if settings is None:
        return None
    try:
        return layout.detect(client, settings, thorough=False).layout.value
    except redis.ResponseError:
        return None  # a monitoring user without GET or EXISTS on streamsync's records


def _library(client: redis.Redis, settings: Settings | None = None) -> LibraryStatus:
    """The library loaded in ``client`` (a server, or one node); with ``settings``, the
    layout of the cache it holds."""
    return LibraryStatus(
        loaded=fmt_version(loaded_version(client)),
        shipped=fmt_version(library_version()) or "",
        layout=_layout(client, settings),
    )


def collect_target(
    target: Client, settings: Settings, streams_info: Mapping[str, Any] | None
) -> TargetStatus:
    """Read the cache's own Redis: its memory, eviction policy, evictions, hit rate and
    library (INFO and FCALL_RO only: it holds no stream). A Redis that cannot be read is
    reported, not raised: the streams' report stands without it."""
    assert settings.target is not None
    url = redact_url(settings.target.url)
    try:
        info, library, nodes = _server(target, settings)
    except redis.RedisError as exc:
        error = " ".join(str(exc).split()) or type(exc).__name__
        return TargetStatus(url, error, True, None, None, None, None)
    memory = keyspace = None
    if info is not None:
        memory, keyspace = _memory(info)
    same = (
        info is not None
        and streams_info is not None
        and info.get("run_id") is not None
        and info.get("run_id") == streams_info.get("run_id")
    )
    version = None if info is None else str(info.get("redis_version", "?"))
    return TargetStatus(url, None, not same, version, memory, keyspace, library, nodes)


def collect(
    client: Client,
    settings: Settings,
    now_ms: int | None = None,
    target: Client | None = None,
) -> StatusReport:
    """Read everything the status shows. ``now_ms`` is the instant ages are measured from
    (default: Redis's clock, which stamps the entry ids); ``target`` is a client of the
    cache's Redis when the configuration has a ``target`` section. Raises redis.RedisError
    when the streams' Redis cannot be read.

    It runs read-only commands only; a monitoring user lacking TIME or INFO still gets a report
    (this machine's clock; no memory and keyspace figures), with a note saying so."""
    notes: list[str] = []
    if now_ms is None:
        now_ms = redis_now_ms(client)
        if now_ms is None:
            now_ms = int(time.time() * 1000)
            notes.append("TIME not permitted for this user: ages use this machine's clock")
    decoder = Decoder(settings.source.format, settings.source.null_marker)
    streams = tuple(
        collect_stream(client, settings, s, now_ms, decoder)
        for s in discover_streams(client, settings)
    )
    info, library, nodes = _server(client, settings if settings.target is None else None)
    memory = keyspace = None
    if info is None:
        notes.append(
            "INFO not permitted for this user: memory, eviction policy and hit rate not checked"
        )
    else:
        memory, keyspace = _memory(info)
    target_status = None
    if settings.target is not None:
        if target is None:
            notes.append("the target (the cache's Redis) was not read")
        else:
            target_status = collect_target(target, settings, info)
            if target_status.error is None and not target_status.separate:
                notes.append(
                    "target.url reaches the streams' Redis itself: the cache is not in a Redis"
                    " of its own"
                )
            if target_status.error is None and target_status.memory is None:
                notes.append(
                    "INFO not permitted on the target: its memory, eviction policy and hit rate"
                    " not checked"
                )
    encodings = _json_encodings(settings, client if target is None else target, notes)
    return StatusReport(
        generated_at_ms=now_ms,
        redis=RedisStatus(
            url=redact_url(settings.redis.url),
            version=None if info is None else str(info.get("redis_version", "?")),
        ),
        group=settings.source.group,
        stream_prefix=settings.source.stream_prefix,
        claim_idle_ms=settings.worker.claim_idle_ms,
        streams=streams,
        memory=memory,
        keyspace=keyspace,
        library=library,
        notes=tuple(notes),
        target=target_status,
        collection_rules=eviction.collection_rules(settings),
        json_encodings=encodings,
        nodes=nodes,
    )


def _json_encodings(settings: Settings, cache: Client, notes: list[str]) -> dict[str, str]:
    """What the json rules write in the cache's Redis (``streamsync.redisjson``)."""
    if not redisjson.json_rules(settings):
        return {}
    try:
        loaded = redisjson.module_loaded(cache)
    except redis.RedisError as exc:
        notes.append(f"json encodings not read: MODULE LIST refused in the cache's Redis ({exc})")
        return {}
    return redisjson.encodings(settings, loaded)


# -- health --------------------------------------------------------------------------------


def _n(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def _what_waits(s: StreamStatus) -> str:
    """``3 entries pending and 5 unread``, ``1 entry pending``, ``entries unread``."""
    parts = []
    if s.pending:
        parts.append(f"{_n(s.pending, 'entry', 'entries')} pending")
    if s.unread:
        parts.append(f"{s.lag} unread" if s.lag is not None else "entries unread")
    if len(parts) == 2 and parts[1] == "entries unread":
        parts[1] = "more unread"
    return " and ".join(parts)


def _library_problem(lib: LibraryStatus, where: str = "") -> str | None:
    if lib.loaded is None:
        return (
            f"{where}Functions library streamsync not loaded in Redis (a worker loads"
            f" {lib.shipped} when it starts)"
        )
    if int(lib.loaded.split(".")[0]) < int(lib.shipped.split(".")[0]):
        return (
            f"{where}Functions library {lib.loaded} loaded, an older major version than"
            f" {lib.shipped} (start a worker of this version to upgrade it)"
        )
    return None


def _layout_problem(lib: LibraryStatus, where: str = "") -> str | None:
    if lib.layout in (layout.Layout.LEGACY.value, layout.Layout.MIGRATING.value):
        return where + layout.refusal(layout.Finding(layout.Layout(lib.layout)))
    if lib.layout == layout.Layout.NEWER.value:
        return (
            f"{where}Redis holds streamsync bookkeeping of a layout newer than this version's"
            f" ({layout.CURRENT.decode()}): upgrade streamsync"
        )
    return None


def _redis_problems(lib: LibraryStatus, where: str = "") -> list[str]:
    """Its library's, or the bookkeeping's when a migration is due (a worker would not start:
    it would not load its library either)."""
    problem = _layout_problem(lib, where) or _library_problem(lib, where)
    return [] if problem is None else [problem]


def _nodes_problems(nodes: Sequence[NodeStatus], where: str) -> list[str]:
    """A Cluster's library problems, node by node."""
    found = []
    for node in nodes:
        found += _redis_problems(node.library, f"{where}node {node.node}: ")
    return found


def _server_problems(report: StatusReport) -> list[str]:
    """The problems of the Redis servers themselves: libraries, bookkeeping to migrate,
    eviction policies, a target that cannot be read."""
    target = report.target
    where = "streams' redis: " if report.separate_target else ""
    found = _nodes_problems(report.nodes, where) or _redis_problems(report.library, where)
    if target is not None:
        if target.error is not None:
            found.append(f"target redis at {target.url}: cannot read it: {target.error}")
        elif target.library is not None and target.separate:
            found += _nodes_problems(target.nodes, "target redis: ") or _redis_problems(
                target.library, "target redis: "
            )
        elif target.library is not None:
            layout_problem = _layout_problem(target.library)
            if layout_problem is not None:
                found.append(layout_problem)
    mem = report.memory
    if mem is not None:
        policy = eviction.problem(
            mem.maxmemory_policy, mem.maxmemory_bytes, separate=report.separate_target
        )
        if policy is not None:
            found.append(policy)
    if target is not None and target.separate and target.memory is not None:
        collections = eviction.collections_problem(
            target.memory.maxmemory_policy, report.collection_rules
        )
        if collections is not None:
            found.append(collections)
    return found


def problems(report: StatusReport, thresholds: Thresholds) -> list[str]:
    """What is wrong, one sentence each; empty when healthy."""
    found: list[str] = []
    max_pending_age = thresholds.pending_age_limit_s(report)
    for s in report.streams:
        found.extend(_stream_problems(s, report.group, thresholds, max_pending_age))
    return found + _server_problems(report)


def _stream_problems(
    s: StreamStatus, group: str, thresholds: Thresholds, max_pending_age: float
) -> list[str]:
    """What is wrong with one stream, its group and its dead letters."""
    if s.error is not None:
        return [f"{s.name}: {s.error}"]
    found: list[str] = []
    if not s.group_exists:
        if s.length:
            found.append(
                f"{s.name}: {_n(s.length, 'entry', 'entries')} but no consumer group"
                f" {group!r} (no worker ever started on this stream)"
            )
    elif s.waiting:
        found.extend(_waiting_problems(s, thresholds))
    op = s.oldest_pending
    if op is not None and op.age_s > max_pending_age:
        found.append(
            f"{s.name}: oldest pending entry {op.id} is {_fmt_s(op.age_s)} old (over"
            f" {max_pending_age:g}s), held by {op.consumer}, delivered"
            f" {_n(op.deliveries, 'time')}, idle {_fmt_s(op.idle_s)}"
        )
    if s.dlq_length:
        found.append(
            f"{s.name}: {_n(s.dlq_length, 'dead letter')} in {s.dlq_stream}"
            f" (read them: XRANGE {s.dlq_stream} - +)"
        )
    return found


def _waiting_problems(s: StreamStatus, thresholds: Thresholds) -> list[str]:
    """For a stream with entries waiting: no live consumer to take them, or behind."""
    found: list[str] = []
    live = [c for c in s.consumers if c.state == "active"]
    if not live:
        others = "; ".join(
            f"{c.name}: {c.state}, idle {_fmt_s(c.idle_s)}, {c.pending} pending"
            for c in s.consumers
        )
        found.append(
            f"{s.name}: no live consumer while {_what_waits(s)}"
            f" ({others or 'the group has no consumers'})"
        )
    # behind for longer than the limit: both the last applied change and the oldest change
    # still waiting were committed more than max_lag_s ago (so a system that was idle for an
    # hour is not "behind" the instant a new entry arrives)
    sync, wait = s.sync_lag_s, s.waiting_lag_s
    lags = [x for x in (sync, wait) if x is not None]
    if lags and min(lags) > thresholds.max_lag_s:
        parts = ["nothing applied yet" if sync is None else f"sync lag {_fmt_s(sync)}"]
        if wait is not None:
            parts.append(f"oldest waiting change committed {_fmt_s(wait)} ago")
        found.append(
            f"{s.name}: behind: {', '.join(parts)} (over --max-lag-s"
            f" {thresholds.max_lag_s:g}), {_what_waits(s)}"
        )
    return found


def run_once(
    client: Client,
    settings: Settings,
    thresholds: Thresholds,
    target: Client | None = None,
) -> tuple[StatusReport, list[str]]:
    """Collect and judge one report (``target``: a client of the cache's own Redis)."""
    report = collect(client, settings, target=target)
    return report, problems(report, thresholds)


# -- presenting ----------------------------------------------------------------------------


def to_document(
    report: StatusReport, thresholds: Thresholds, found: Sequence[str]
) -> dict[str, Any]:
    """The JSON document (docs/status.md describes it)."""
    doc = asdict(report)
    doc["schema_version"] = SCHEMA_VERSION
    doc["thresholds"] = {
        "max_lag_s": thresholds.max_lag_s,
        "max_pending_age_s": thresholds.pending_age_limit_s(report),
    }
    doc["healthy"] = not found
    doc["problems"] = list(found)
    return doc


def dumps(doc: Mapping[str, Any], indent: int | None = 2) -> str:
    """Stable JSON text: keys sorted."""
    return json.dumps(doc, sort_keys=True, indent=indent, ensure_ascii=False)


def _fmt_s(seconds: float | None) -> str:
    """``0.85`` -> ``850ms``, ``75`` -> ``1m15s``: a duration read at a glance."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    total = int(seconds)
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    if total < 86400:
        return f"{total // 3600}h{total % 3600 // 60:02d}m"
    return f"{total // 86400}d{total % 86400 // 3600:02d}h"


def _fmt_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}TB"


def _ordered(keys: Iterable[str], order: Sequence[str]) -> list[str]:
    known = [k for k in order if k in keys]
    return known + sorted(k for k in keys if k not in order)


def _streams_table(report: StatusReport) -> Table:
    table = Table(title=f"Streams (group {escape(report.group)})", title_justify="left")
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("stream", "left"),
        ("entries", "right"),
        ("last entry", "right"),
        ("lag", "right"),
        ("pending", "right"),
        ("oldest pending", "left"),
        ("dlq", "right"),
        ("applied", "right"),
        ("sync lag", "right"),
        ("last applied", "right"),
    )
    for name, justify in columns:
        table.add_column(name, justify=justify)
    for s in report.streams:
        if s.error is not None:
            table.add_row(escape(s.name), Text(s.error, style="red"))
            continue
        if not s.group_exists:
            lag: str | Text = Text("no group", style="yellow" if s.length else "dim")
        elif s.lag is None:
            lag = Text("unread?" if s.unread else "0?", style="yellow" if s.unread else "")
        else:
            lag = Text(str(s.lag), style="yellow" if s.lag else "")
        op = s.oldest_pending
        oldest = (
            f"{_fmt_s(op.age_s)} old, {escape(op.consumer)} (idle {_fmt_s(op.idle_s)},"
            f" x{op.deliveries})"
            if op
            else "-"
        )
        table.add_row(
            escape(s.name) + ("" if s.exists else " [dim](missing)[/]"),
            str(s.length),
            _fmt_s(s.last_entry_age_s) + " ago" if s.last_entry_age_s is not None else "-",
            lag,
            Text(str(s.pending), style="yellow" if s.pending else ""),
            oldest,
            Text(str(s.dlq_length), style="bold red" if s.dlq_length else ""),
            str(s.totals.get("applied", 0)),
            _fmt_s(s.sync_lag_s),
            _fmt_s(s.since_last_applied_s) + " ago" if s.since_last_applied_s is not None else "-",
        )
    return table


def _counts_table(report: StatusReport) -> Table | None:
    outcomes = _ordered({o for s in report.streams for o in s.totals}, OUTCOMES)
    if not outcomes:
        return None
    table = Table(title="Changes by op (workers' counters)", title_justify="left")
    table.add_column("stream")
    table.add_column("op")
    for outcome in outcomes:
        table.add_column(outcome.replace("_", " "), justify="right")
    for s in report.streams:
        for op in _ordered(s.counts.keys(), OPS):
            row = s.counts[op]
            table.add_row(
                escape(s.name), op, *(str(row[o]) if row.get(o) else "" for o in outcomes)
            )
        if len(s.counts) > 1:
            table.add_row(
                escape(s.name),
                "[bold]all[/]",
                *(f"[bold]{s.totals[o]}[/]" if s.totals.get(o) else "" for o in outcomes),
            )
    return table


def _consumers_table(report: StatusReport) -> Table | None:
    rows = [(s, c) for s in report.streams for c in s.consumers]
    if not rows:
        return None
    table = Table(title="Consumers", title_justify="left")
    table.add_column("stream")
    table.add_column("consumer")
    table.add_column("pending", justify="right")
    table.add_column("idle", justify="right")
    table.add_column("alive")
    table.add_column("state")
    styles = {"active": "green", "idle": "yellow", "dead": "bold red"}
    for s, c in rows:
        table.add_row(
            escape(s.name),
            escape(c.name),
            str(c.pending),
            _fmt_s(c.idle_s),
            "yes" if c.alive else "-",
            Text(c.state, style=styles.get(c.state, "")),
        )
    return table


def _server_line(
    name: str,
    url: str,
    *,
    version: str | None,
    memory: MemoryStatus | None,
    keyspace: KeyspaceStatus | None,
    library: LibraryStatus | None,
    policy_safe: bool,
) -> Text:
    line = Text()
    line.append(f"{name}{f' {version}' if version else ''} at {url}")
    if memory is not None:
        mem = memory
        limit = _fmt_bytes(mem.maxmemory_bytes) if mem.maxmemory_bytes else "no limit"
        ratio = f" ({mem.used_ratio:.0%})" if mem.used_ratio is not None else ""
        line.append(f" · memory {_fmt_bytes(mem.used_memory_bytes)} of {limit}{ratio}, policy ")
        line.append(mem.maxmemory_policy, style="" if policy_safe else "red")
        line.append(", ")
        evicted = f"{mem.evicted_keys} evicted"
        line.append(evicted, style="yellow" if mem.evicted_keys else "")
    if keyspace is not None:
        rate = keyspace.hit_rate
        line.append(f" · keyspace hit rate {'-' if rate is None else format(rate, '.1%')}")
    if library is not None:
        line.append(" · library ")
        loaded = library.loaded
        line.append(loaded or "not loaded", style="" if loaded == library.shipped else "yellow")
        line.append(f" (shipped {library.shipped})")
    return line


def _node_lines(nodes: Sequence[NodeStatus], policy_safe: bool) -> list[Text]:
    return [
        _server_line(
            "  node",
            node.node,
            version=node.version,
            memory=node.memory,
            keyspace=node.keyspace,
            library=node.library,
            policy_safe=policy_safe,
        )
        for node in nodes
    ]


def _global_lines(report: StatusReport) -> list[Text]:
    separate = report.separate_target
    mem = report.memory
    safe = mem is None or eviction.problem(mem.maxmemory_policy, 1, separate=separate) is None
    r = report.redis
    lines = [
        _server_line(
            "redis" if report.target is None else "streams' redis",
            r.url,
            version=r.version,
            memory=report.memory,
            keyspace=report.keyspace,
            library=report.library,
            policy_safe=safe,
        )
    ]
    lines += _node_lines(report.nodes, safe)
    t = report.target
    if t is not None and t.error is not None:
        lines.append(Text(f"target redis at {t.url}: {t.error}", style="red"))
    elif t is not None:
        line = _server_line(
            "target redis",
            t.url,
            version=t.version,
            memory=t.memory,
            keyspace=t.keyspace,
            library=t.library,
            # a target of its own may evict (docs/bookkeeping.md); the same server may not
            policy_safe=separate or safe,
        )
        lines.append(line)
        lines += _node_lines(t.nodes, separate or safe)
    if report.json_encodings:
        written = ", ".join(f"{name} {enc}" for name, enc in report.json_encodings.items())
        lines.append(Text(f"json rules write: {written}"))
    return lines


def render(report: StatusReport, found: Sequence[str]) -> RenderableType:
    """The report as rich tables, a global line, and the problems (or "healthy")."""
    parts: list[RenderableType] = [_streams_table(report)]
    counts = _counts_table(report)
    if counts is not None:
        parts.append(counts)
    consumers = _consumers_table(report)
    if consumers is not None:
        parts.append(consumers)
    parts.extend(_global_lines(report))
    notes = {s.lag_note for s in report.streams if s.lag_note and s.group_exists}
    for note in sorted(notes):
        parts.append(Text(f"lag ?: {note}", style="dim"))
    parts.extend(Text(note, style="yellow") for note in report.notes)
    if found:
        parts.append(Text(f"{_n(len(found), 'problem')}:", style="bold red"))
        parts.extend(Text(f"  - {p}", style="red") for p in found)
    else:
        parts.append(Text("healthy", style="bold green"))
    return Group(*parts)


__all__ = [
    "ConsumerStatus",
    "KeyspaceStatus",
    "LibraryStatus",
    "MemoryStatus",
    "OldestPending",
    "RedisStatus",
    "StatusReport",
    "StreamStatus",
    "TargetStatus",
    "Thresholds",
    "collect",
    "problems",
    "render",
    "run_once",
    "to_document",
]
