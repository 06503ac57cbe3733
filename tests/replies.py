"""Typed views of redis-py replies, for tests.

redis-py types most replies as ``bytes | str`` (or wider): whether a client decodes is chosen at
run time (``decode_responses``). The tests' clients return bytes. These helpers check that at run
time and hand the test precise types, so tests need no ``type: ignore``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import redis
from redis.typing import EncodableT, FieldT

#: A client of a server or of a cluster, returning bytes.
Client = redis.Redis | redis.RedisCluster

__all__ = [
    "Client",
    "Pending",
    "as_bytes",
    "as_int",
    "as_str",
    "entry_fields_dict",
    "newest_id",
    "pending_entries",
    "raw",
    "raw_range",
    "xadd",
    "xrange",
    "xreadgroup",
    "zscores",
]


def as_bytes(value: object) -> bytes:
    """``value``, which a bytes-returning client replied, as bytes."""
    assert isinstance(value, bytes), f"expected bytes from redis, got {value!r}"
    return value


def as_str(value: object) -> str:
    """``value``, which a bytes-returning client replied, as text (UTF-8)."""
    return as_bytes(value).decode()


def as_int(value: object) -> int:
    """An integer reply (redis-py parses some as int, some leave as bytes)."""
    if isinstance(value, bytes):
        return int(value)
    assert isinstance(value, int), f"expected an integer from redis, got {value!r}"
    return value


def entry_fields_dict(
    fields: Mapping[str, str] | Mapping[bytes, bytes],
) -> dict[FieldT, EncodableT]:
    """``fields`` as the dict redis-py's ``xadd`` takes (it is invariant in its types)."""
    return {key: value for key, value in fields.items()}


def xadd(
    r: Client,
    stream: str,
    fields: Mapping[str, str] | Mapping[bytes, bytes],
    *,
    entry_id: str = "*",
) -> bytes:
    """XADD ``fields`` to ``stream``; the new entry's id."""
    return as_bytes(r.xadd(stream, entry_fields_dict(fields), id=entry_id))


def xrange(
    r: redis.Redis, stream: str, start: bytes | str = "-", end: bytes | str = "+"
) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XRANGE as (id, fields) pairs; fields as a dict (a repeated field keeps its last value:
    use ``raw_range`` for the exact list)."""
    entries: list[tuple[bytes, dict[bytes, bytes]]] = []
    for entry_id, fields in r.xrange(stream, start, end) or []:
        assert fields is not None, f"entry {entry_id!r} of {stream} has no fields"
        entries.append((as_bytes(entry_id), {as_bytes(k): as_bytes(v) for k, v in fields.items()}))
    return entries


def xreadgroup(
    r: redis.Redis, group: str, consumer: str, stream: str, *, count: int, entry_id: str = ">"
) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XREADGROUP of one stream as (id, fields) pairs (``entry_id`` ``>``: new entries; ``0``:
    this consumer's pending ones)."""
    reply = r.xreadgroup(group, consumer, {stream: entry_id}, count=count)
    if not reply:
        return []
    assert isinstance(reply, list), reply
    ((_, items),) = reply
    return [
        (as_bytes(eid), {as_bytes(k): as_bytes(v) for k, v in fields.items()})
        for eid, fields in items
    ]


def zscores(r: Client, key: str | bytes) -> dict[bytes, float]:
    """Every member of sorted set ``key`` with its score, lowest first."""
    scored: dict[bytes, float] = {}
    for item in r.zrange(key, 0, -1, withscores=True):
        assert isinstance(item, tuple | list) and len(item) == 2, item
        member, score = item
        assert isinstance(score, float), item
        scored[as_bytes(member)] = score
    return scored


def raw(r: redis.Redis, *command: EncodableT) -> object:
    """The reply of ``command`` as Redis sent it, without redis-py's parsing (an error reply is
    raised)."""
    conn = r.connection_pool.get_connection()
    try:
        conn.send_command(*command)
        return conn.read_response()
    finally:
        r.connection_pool.release(conn)


def newest_id(r: redis.Redis, stream: str) -> bytes:
    """The id of the newest entry of ``stream`` (which must hold one)."""
    newest = r.xrevrange(stream, count=1)
    assert newest, f"{stream} has no entry"
    return as_bytes(newest[0][0])


def raw_range(r: redis.Redis, key: str) -> list[tuple[bytes, list[bytes]]]:
    """XRANGE with each entry's fields as the flat list Redis holds (order, duplicates)."""
    reply = raw(r, "XRANGE", key, "-", "+")
    assert isinstance(reply, list), reply
    return [(as_bytes(eid), [as_bytes(f) for f in fields]) for eid, fields in reply]


@dataclass(frozen=True, slots=True)
class Pending:
    """One entry of a group's pending list."""

    id: bytes
    consumer: bytes
    idle_ms: int
    deliveries: int


def pending_entries(
    r: redis.Redis, stream: str, group: str, consumer: str | None = None, count: int = 10_000
) -> list[Pending]:
    """The pending entries of ``group`` (of one ``consumer``), oldest first."""
    return [
        Pending(
            id=as_bytes(p["message_id"]),
            consumer=as_bytes(p["consumer"]),
            idle_ms=as_int(p["time_since_delivered"]),
            deliveries=as_int(p["times_delivered"]),
        )
        for p in r.xpending_range(stream, group, "-", "+", count, consumername=consumer)
    ]
