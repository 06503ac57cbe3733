"""The records a rule table holds, read back for tests: lua/streamsync.lua writes them, these
helpers read them as that file documents, so a test can check what the library kept, and that
it says exactly where each row is."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from streamsync.buckets import Table, Tables, is_meta
from streamsync.config import Rule
from streamsync.keys import StateKeys
from tests.replies import as_bytes

_RECORD = re.compile(rb"([^~A-Z]*)(?:~([0-9]+))?(?:([A-Z])(.*))?", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Record:
    """One record: the row's (or key's) position, when it may go, and where the row is."""

    position: str
    #: Unix seconds after which ``streamsync_expire`` removes it (None: it stays).
    expires: int | None
    #: The placement's kind (T S Z Y L M; O before the overflow is read), None: placed nowhere.
    kind: str | None
    data: bytes


def decode(value: bytes) -> Record:
    """A record value as the library writes it."""
    match = _RECORD.fullmatch(value)
    assert match is not None, value
    position, expires, kind, data = match.groups()
    return Record(
        position.decode(),
        None if expires is None else int(expires),
        None if kind is None else kind.decode(),
        data or b"",
    )


def records(r: redis.Redis, table: Table) -> dict[bytes, Record]:
    """Every record of ``table`` by field, overflowed placements read back."""
    buckets = int(r.hget(table.meta, "#n") or 1)
    out: dict[bytes, Record] = {}
    for index in range(buckets):
        for field, value in r.hgetall(table.bucket(index)).items():
            if is_meta(field):
                continue
            record = decode(as_bytes(value))
            if record.kind == "O":
                spilled = as_bytes(r.hget(table.overflow, field))
                record = Record(record.position, record.expires, spilled[:1].decode(), spilled[1:])
            out[as_bytes(field)] = record
    return out


def _sized(data: bytes) -> tuple[bytes, bytes]:
    n, _, rest = data.partition(b":")
    return rest[: int(n)], rest[int(n) :]


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a record says its row is."""

    kind: str
    #: The set, sorted set, list or single-value key.
    key: str
    #: A set or sorted-set member.
    member: str | None = None
    #: A list's order record, and the sort keys of the row's entries.
    order: str | None = None
    entries: tuple[str, ...] = ()


def placement(table: Table, field: bytes, record: Record) -> Placement | None:
    """Where ``record`` (of ``field`` in ``table``) says its row is (None: nowhere)."""
    kind, data, shape = record.kind, record.data, table.shape
    if kind is None:
        return None
    if kind == "M":
        return Placement("M", shape[0] + data.decode() + shape[1])
    if kind in ("T", "Z", "S", "Y"):
        key_mid, member_mid = (data, field) if kind in ("T", "Z") else _sized(data)
        return Placement(
            "T" if kind in ("T", "S") else "Z",
            shape[0] + key_mid.decode() + shape[1],
            shape[2] + member_mid.decode() + shape[3],
        )
    assert kind == "L", kind
    key_mid, listed = _sized(data)
    middle = key_mid.decode()
    token = field.decode()
    if token.isdigit():
        token = f"{len(token):02d}{token}"
    entries = [p or record.position for p in listed.decode().split(",")]
    return Placement(
        "L",
        shape[0] + middle + shape[1],
        order=shape[2] + middle + shape[3],
        entries=tuple(p + token for p in entries),
    )


def dangling(r: redis.Redis, table: Table) -> list[str]:
    """The records of ``table`` naming a member, key or list entry that Redis does not hold (a
    capped list's records may name entries it no longer keeps: do not ask for those)."""
    problems = []
    for field, record in records(r, table).items():
        where = placement(table, field, record)
        if where is None:
            continue
        if where.kind == "T" and not r.sismember(where.key, where.member or ""):
            problems.append(f"{field!r}: set member {where}")
        elif where.kind == "Z" and r.zscore(where.key, where.member or "") is None:
            problems.append(f"{field!r}: sorted-set member {where}")
        elif where.kind == "M" and not r.exists(where.key):
            problems.append(f"{field!r}: key {where}")
        elif where.kind == "L":
            assert where.order is not None
            order = set(r.lrange(where.order, 0, -1))
            if not {e.encode() for e in where.entries} <= order:
                problems.append(f"{field!r}: list entries {where}")
    return problems


def key_records(
    r: redis.Redis, rule: Rule, keys: Iterable[str], state_prefix: str = "streamsync:"
) -> dict[str, Record | None]:
    """The records of ``keys``, keys of ``rule`` (keyed by primary key) off a Cluster."""
    keys = list(keys)
    table = Tables(StateKeys(state_prefix)).table(rule)
    table.buckets = int(r.hget(table.meta, "#n") or 1)
    prefix = len(rule.template.literals[0])
    located = [table.locate(key[prefix:]) for key in keys]
    pipe = r.pipeline(transaction=False)
    for bucket, field in located:
        pipe.hget(bucket, field)
    return {
        key: None if value is None else decode(as_bytes(value))
        for key, value in zip(keys, pipe.execute(), strict=True)
    }
