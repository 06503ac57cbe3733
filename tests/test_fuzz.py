"""Fuzz: thousands of valid changes interleaved with over a thousand malformed entries of many
kinds, consumed by two ``streamsync run`` workers on a real redis-server.

Every malformed entry must be dead-lettered exactly once, with a reason naming what is wrong (never
an internal error); every valid change must reach all of its rules, odd template values included
(braces, colons, globs, newlines, NULs), whatever worker took it: Redis is compared with a model
computed here from the valid changes alone (the newest change of each row wins). Seeded: every run
writes the same entries.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from tests.debezium import envelope, write_config
from tests.replies import as_bytes, as_str, xrange, zscores
from tests.servers import wait_until
from tests.workers import WorkerProcess

SEED = 20_240_909
USERS, ORDERS = "app.public.users", "app.public.orders"
GROUP = "streamsync"

RULES: list[dict[str, Any]] = [
    {"table": "public.users", "key": "user:{id}", "type": "hash"},
    {"table": "public.users", "key": "doc:{id}", "type": "json"},
    {"table": "public.users", "key": "plan:{plan}:users", "type": "set", "member": "{id}"},
    {"table": "public.users", "key": "prices", "type": "zset", "member": "{id}:{plan}"}
    | {"score": "price"},
    {"table": "public.users", "key": "feed", "type": "list", "value": "{id}:{name}"}
    | {"on_update": "replace"},
    # every rule keyed by the primary key: the worker's lean path, which never reads the key
    {"table": "public.orders", "key": "order:{order_id}:{line}", "type": "hash"},
]

#: Valid values for the template columns, odd ones included: all must land as they are.
PLANS = ["free", "pro", "{team}", "}{", "a:b", "*", "?[x]", "new\nline", "nul\0byte", "é", "", " "]
NAMES = ["ann", "{name}", "}", "{{", ":", "*", "\n", "\0", "tab\tbed", "𝄞", "x" * 300, None]
#: Valid scores, as Redis reads them.
SCORES: dict[Any, float] = {
    0: 0.0,
    7: 7.0,
    -3: -3.0,
    2**53 + 1: float(2**53 + 1),
    10.5: 10.5,
    1e-7: 1e-7,
    1e20: 1e20,
    "10.50": 10.5,
    "-0.5": -0.5,
    "1e3": 1000.0,
    "inf": float("inf"),
    "-Infinity": float("-inf"),
    "0x1p4": 16.0,
    "+.5": 0.5,
}
PRICES = [*SCORES, None]

N_USERS, N_ORDERS = 80, 40
N_VALID = 5_000
N_MALFORMED = 1_500
N_REPLAYS = 300
#: Entries added per pipeline, while the workers run.
CHUNK = 250

DEEP = "[" * 300 + "]" * 300
DEEPER = '[{"a":' * 500 + "1" + "}]" * 500


# -- what the test wrote -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """A valid change: op, table ("users" or "orders"), primary key, row (None for a delete),
    LSN."""

    op: str
    table: str
    ident: tuple[int, ...]
    row: dict[str, Any] | None
    lsn: int


@dataclass(slots=True)
class Feed:
    """Builds the entries, in stream order, and keeps what the test expects of each."""

    rng: random.Random
    #: (stream, fields, what it is: a Change, or the reason expected for a malformed entry)
    entries: list[tuple[str, Any, Change | str]] = field(default_factory=list)
    live: dict[str, dict[tuple[int, ...], dict[str, Any]]] = field(
        default_factory=lambda: {"users": {}, "orders": {}}
    )
    changes: list[Change] = field(default_factory=list)
    lsn: dict[str, int] = field(default_factory=lambda: {"users": 1 << 32, "orders": 1 << 32})

    def next_lsn(self, table: str) -> int:
        self.lsn[table] += self.rng.randint(1, 90)
        return self.lsn[table]

    # -- valid changes

    def user_row(self, ident: int) -> dict[str, Any]:
        rng = self.rng
        row: dict[str, Any] = {
            "id": ident,
            "name": rng.choice(NAMES),
            "plan": rng.choice(PLANS),
            "price": rng.choice(PRICES),
            "active": rng.choice([True, False, None]),
            "tags": rng.choice([None, [], ["a", 1, 2.5], {"k": [None, True]}]),
            "odd {col}:*\n": rng.choice(["v", None, "{", "\0"]),
        }
        if rng.random() < 0.003:
            row["bio"] = "b" * 200_000
        return row

    def order_row(self, ident: tuple[int, ...]) -> dict[str, Any]:
        rng = self.rng
        return {
            "order_id": ident[0],
            "line": ident[1],
            "sku": rng.choice(["X1", "{sku}", "a:b:c", "*?", "\n\0"]),
            "qty": rng.randint(-5, 10**12),
            "amount": rng.choice([0.1, 1e-7, 1e16, -2.5, 3.0]),
            "paid": rng.choice([True, False]),
            "note": rng.choice([None, "note", ""]),
        }

    def valid(self) -> None:
        rng = self.rng
        table = "users" if rng.random() < 0.7 else "orders"
        if table == "users":
            ident: tuple[int, ...] = (rng.randrange(N_USERS),)
        else:
            ident = (rng.randrange(N_ORDERS // 4), rng.randrange(4))
        live = self.live[table]
        op = rng.choice(["u"] * 6 + ["d"]) if ident in live else rng.choice(["c", "c", "r"])
        if op == "d":
            row = None
            live.pop(ident)
        else:
            row = self.user_row(ident[0]) if table == "users" else self.order_row(ident)
            live[ident] = row
        change = Change(op, table, ident, row, self.next_lsn(table))
        self.changes.append(change)
        self.entries.append((stream_of(table), change_fields(change), change))

    def replay(self) -> None:
        """An older valid change again, exactly as it was: stale, it changes nothing."""
        change = self.rng.choice(self.changes)
        self.entries.append((stream_of(change.table), change_fields(change), change))

    # -- malformed entries

    def malformed(self) -> None:
        kind = self.rng.choice(list(MALFORMED))
        stream, fields, reason = MALFORMED[kind](self)
        self.entries.append((stream, fields, reason))

    def some_user(self) -> dict[str, Any]:
        """A live user's row (or a made-up one), to build a malformed change of."""
        live = self.live["users"]
        if live:
            return dict(self.rng.choice(list(live.values())))
        return self.user_row(self.rng.randrange(N_USERS))

    def user_value(self, op: str = "u", **changes: Any) -> dict[str, Any]:
        row = self.some_user() | changes
        lsn = self.next_lsn("users")
        if op == "d":
            return envelope(op, "public.users", lsn, before=row)
        return envelope(op, "public.users", lsn, after=row)


def stream_of(table: str) -> str:
    return USERS if table == "users" else ORDERS


def key_of(change: Change) -> dict[str, Any]:
    if change.table == "users":
        return {"id": change.ident[0]}
    return {"order_id": change.ident[0], "line": change.ident[1]}


def compact(key: Any, value: Any) -> dict[bytes, bytes]:
    """Debezium Server's compact layout: one field, key JSON -> value JSON."""
    k = key if isinstance(key, bytes) else orjson.dumps(key)
    v = value if isinstance(value, bytes) else orjson.dumps(value)
    return {k: v}


def change_fields(change: Change) -> dict[bytes, bytes]:
    table = f"public.{change.table}"
    key = key_of(change)
    if change.op == "d":
        value = envelope("d", table, change.lsn, before=key)
    else:
        value = envelope(change.op, table, change.lsn, after=change.row)
    return compact(key, value)


def _marked(value: dict[str, Any], **marks: str) -> bytes:
    text = orjson.dumps(value)
    for mark, replacement in marks.items():
        text = text.replace(f'"{mark}"'.encode(), replacement.encode())
    return text


# -- the malformed kinds: each builds (stream, fields, a fragment of the reason) -------------

Malformed = Callable[[Feed], tuple[str, Any, str]]


def _key(feed: Feed, value: dict[str, Any]) -> dict[str, Any]:
    return {"id": (value["after"] or value["before"])["id"]}


def _with(feed: Feed, reason: str, op: Any = "u", **top: Any) -> tuple[str, Any, str]:
    value = feed.user_value(op)
    return USERS, compact(_key(feed, value), value | top), reason


def _source(feed: Feed, reason: str, **source: Any) -> tuple[str, Any, str]:
    value = feed.user_value()
    value["source"] |= source
    return USERS, compact(_key(feed, value), value), reason


def _row(feed: Feed, reason: str, **columns: Any) -> tuple[str, Any, str]:
    value = feed.user_value(**columns)
    return USERS, compact(_key(feed, value), value), reason


def _deep_column(feed: Feed) -> tuple[str, Any, str]:
    value = feed.user_value(tags="__deep__")
    key = orjson.dumps(_key(feed, value))
    return USERS, {key: _marked(value, __deep__=DEEP)}, "column 'tags' cannot be written as JSON"


def _deeper_template_column(feed: Feed) -> tuple[str, Any, str]:
    value = feed.user_value(plan="__deeper__")
    key = orjson.dumps(_key(feed, value))
    return USERS, {key: _marked(value, __deeper__=DEEPER)}, "column 'plan' cannot be written"


def _huge_lsn(feed: Feed) -> tuple[str, Any, str]:
    value = feed.user_value()
    value["source"]["lsn"] = "__lsn__"
    key = orjson.dumps(_key(feed, value))
    return USERS, {key: _marked(value, __lsn__=str(2**64 + 7))}, "64-bit unsigned integer"


def _mismatched_key(feed: Feed) -> tuple[str, Any, str]:
    value = feed.user_value()
    other = (value["after"]["id"] + 1 + feed.rng.randrange(N_USERS - 1)) % N_USERS
    return USERS, compact({"id": other}, value), "disagrees with the row: column 'id' is"


def _absent_key_column(feed: Feed) -> tuple[str, Any, str]:
    value = feed.user_value()
    key = {"uid": value["after"]["id"]}
    return USERS, compact(key, value), "column 'uid' is absent from 'after'"


def _mismatched_delete(feed: Feed) -> tuple[str, Any, str]:
    order_id, line = feed.rng.randrange(N_ORDERS // 4), feed.rng.randrange(4)
    lsn = feed.next_lsn("orders")
    before = {"order_id": order_id, "line": line}
    value = envelope("d", "public.orders", lsn, before=before)
    key = {"order_id": order_id, "line": line + 1}
    return ORDERS, compact(key, value), "disagrees with the row: column 'line' is"


def _wide_row(feed: Feed) -> tuple[str, Any, str]:
    columns = {f"c{i}": i for i in range(1600)}
    return _row(feed, "columns: a PostgreSQL row has at most 1600", **columns)


def _bad_schema_scale(feed: Feed) -> tuple[str, Any, str]:
    decimal = {
        "field": "price",
        "type": "bytes",
        "name": "org.apache.kafka.connect.data.Decimal",
        "parameters": {"scale": "99999999"},
    }
    schema = {
        "type": "struct",
        "fields": [{"field": "after", "type": "struct", "fields": [decimal]}],
    }
    value = feed.user_value(price="BBo=")
    return (
        USERS,
        compact(_key(feed, value), {"schema": schema, "payload": value}),
        "column 'price': decimal scale 99999999 is out of range",
    )


def _unknown_table(feed: Feed) -> tuple[str, Any, str]:
    value = envelope("c", "public.ghosts", feed.next_lsn("users"), after={"id": 1})
    return USERS, compact({"id": 1}, value), "no rule maps table 'public.ghosts'"


def _bad_order(feed: Feed) -> tuple[str, Any, str]:
    lsn = feed.next_lsn("orders")
    value = envelope("c", "public.orders", lsn, after={"order_id": 1, "sku": "no line"})
    return ORDERS, compact({"order_id": 1}, value), "names column 'line', absent from the row"


MALFORMED: dict[str, Malformed] = {
    "not json": lambda f: (USERS, {b'{"id":1}': b'{"op":"c",'}, "value is not valid JSON"),
    "not utf-8": lambda f: (USERS, {b'{"id":1}': b'{"op":"\xff"}'}, "value is not valid JSON"),
    "key not utf-8": lambda f: (
        ORDERS,
        {b'{"order_id":\xfe}': orjson.dumps(envelope("d", "public.orders", 5, before={}))},
        "key is not valid JSON",
    ),
    "value is an array": lambda f: (USERS, compact({"id": 1}, [1, 2]), "not a JSON object"),
    "extended without value": lambda f: (
        USERS,
        {b"key": b'{"id":1}', b"__DEBEZIUM.CONTEXT.TASKID": b"0"},
        "lacks its 'key' or 'value'",
    ),
    "op is a list": lambda f: _with(f, "op ['u'] is not a string", op=["u"]),
    "op is unknown": lambda f: _with(f, "unknown op 'z'", op="z"),
    "logical message": lambda f: _with(f, "(logical message) is not a row change", op="m"),
    "no source": lambda f: _with(f, "no 'source' object", source=None),
    "after is text": lambda f: _with(f, "carries no 'after' row", after="row"),
    "before is a number": lambda f: _with(f, "'before' is not an object", op="d", before=5),
    "lsn is text": lambda f: _source(f, "source.lsn '12' is not", lsn="12"),
    "lsn is a boolean": lambda f: _source(f, "source.lsn True is not", lsn=True),
    "lsn is negative": lambda f: _source(f, "source.lsn -1 is not", lsn=-1),
    "lsn is huge": _huge_lsn,
    "ts_ms is text": lambda f: _source(f, "source.ts_ms 'yesterday'", ts_ms="yesterday"),
    "connector is sqlserver": lambda f: _source(f, "mariadb only", connector="sqlserver"),
    "connector is mysql": lambda f: _source(f, "not a binlog file name", connector="mysql"),
    "table is huge": lambda f: _source(f, "no rule maps table 'public.ttttt", table="t" * 100_000),
    "unknown table": _unknown_table,
    "column nested 300 levels": _deep_column,
    "template column nested 1000 levels": _deeper_template_column,
    "template column is an object": lambda f: _row(f, "cannot be used in a key", plan={"a": 1}),
    "template column absent": _bad_order,
    "1601 columns": _wide_row,
    "score with spaces": lambda f: _row(f, "column 'price' is padded with whitespace", price=" 5"),
    "score with underscores": lambda f: _row(
        f, "column 'price' is not numeric: '1_000'", price="1_000"
    ),
    "score overflows": lambda f: _row(f, "is beyond the range of a double: '1e400'", price="1e400"),
    "score of 401 digits": lambda f: _row(
        f, "is beyond the range of a double: '999", price="9" * 401
    ),
    "score underflows": lambda f: _row(f, "(it would read as zero): '1e-400'", price="1e-400"),
    "score is nan": lambda f: _row(f, "column 'price' is NaN", price="nan"),
    "score is a boolean": lambda f: _row(f, "column 'price' is not numeric: True", price=True),
    "key disagrees with the row": _mismatched_key,
    "key column absent from the row": _absent_key_column,
    "delete key disagrees with before": _mismatched_delete,
    "key is empty": lambda f: (
        ORDERS,
        compact({}, envelope("d", "public.orders", 5, before=None)),
        "names no primary-key column",
    ),
    "key payload is a number": lambda f: (
        USERS,
        compact({"schema": None, "payload": 7}, f.user_value("d")),
        "key payload is not a JSON object",
    ),
    "schema is a number": lambda f: (
        USERS,
        compact({"id": 1}, {"schema": 5, "payload": f.user_value()}),
        "value schema is not a JSON object",
    ),
    "decimal scale out of range": _bad_schema_scale,
}


# -- the feed, and what Redis must hold ------------------------------------------------------


def build_feed(seed: int = SEED) -> Feed:
    feed = Feed(random.Random(seed))
    kinds = ["valid"] * N_VALID + ["malformed"] * N_MALFORMED + ["replay"] * N_REPLAYS
    feed.rng.shuffle(kinds)
    for kind in kinds:
        if kind == "valid" or (kind == "replay" and not feed.changes):
            feed.valid()
        elif kind == "replay":
            feed.replay()
        else:
            feed.malformed()
    return feed


def text(value: Any) -> str:
    """A column value as a hash field holds it."""
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int | float | list | dict):
        return orjson.dumps(value).decode()
    return str(value)


def model(changes: list[Change]) -> dict[str, Any]:
    """What the rules hold after ``changes``: each row as its newest change left it."""
    newest: dict[tuple[str, tuple[int, ...]], Change] = {}
    for change in changes:
        current = newest.get((change.table, change.ident))
        if current is None or change.lsn > current.lsn:
            newest[(change.table, change.ident)] = change
    want: dict[str, Any] = {"prices": {}, "feed": []}
    for change in newest.values():
        row = change.row
        if row is None:
            continue
        fields = {k: text(v) for k, v in row.items() if v is not None}
        if change.table == "orders":
            want[f"order:{row['order_id']}:{row['line']}"] = fields
            continue
        ident = row["id"]
        want[f"user:{ident}"] = fields
        want[f"doc:{ident}"] = row
        want.setdefault(f"plan:{row['plan']}:users", set()).add(str(ident))
        if row["price"] is not None:
            want["prices"][f"{ident}:{row['plan']}"] = SCORES[row["price"]]
        if row["name"] is not None:
            want["feed"].append(f"{ident}:{row['name']}")
    want["feed"].sort()
    return {k: v for k, v in want.items() if v}


def held(r: redis.Redis) -> dict[str, Any]:
    """Everything the rules wrote (streamsync's own records left out)."""
    out: dict[str, Any] = {}
    for raw in r.scan_iter(count=1000):
        key = as_str(raw)
        if key.startswith("streamsync:") or key.startswith("app."):
            continue
        kind = r.type(raw)
        if kind == b"hash":
            out[key] = {as_str(f): as_str(v) for f, v in r.hgetall(raw).items()}
        elif kind == b"string":
            out[key] = orjson.loads(as_bytes(r.get(raw) or b""))
        elif kind == b"set":
            out[key] = {as_str(m) for m in r.smembers(raw)}
        elif kind == b"zset":
            out[key] = {as_str(m): s for m, s in zscores(r, raw).items()}
        elif kind == b"list":
            out[key] = sorted(as_str(v) for v in r.lrange(raw, 0, -1))
        else:
            raise AssertionError(f"{key} is a {kind!r}")
    return out


def settled(r: redis.Redis, last: dict[str, bytes]) -> bool:
    """The group has read every entry of both streams and holds none pending."""
    for stream, last_id in last.items():
        try:
            (info,) = [g for g in r.xinfo_groups(stream) if g["name"] == GROUP.encode()]
        except (ValueError, redis.ResponseError):
            return False
        if info["pending"] or info["last-delivered-id"] != last_id:
            return False
    return True


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.close()


def test_valid_and_malformed_entries_through_two_workers(
    r: redis.Redis, redis_url: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    feed = build_feed()
    kinds_used = Counter(e[2] for e in feed.entries if isinstance(e[2], str))
    assert sum(kinds_used.values()) == N_MALFORMED and len(kinds_used) >= 30
    # no claims: each entry has one delivery, so a second letter would be a bug, not a race
    config = write_config(
        tmp_path / "c.yaml", redis_url, streams=[USERS, ORDERS], rules=RULES, claim_idle_ms=600_000
    )
    for consumer in ("w1", "w2"):
        workers.append(WorkerProcess(config, consumer, tmp_path / "logs").start())

    expected: dict[str, dict[bytes, str]] = {USERS: {}, ORDERS: {}}
    last: dict[str, bytes] = {}
    for start in range(0, len(feed.entries), CHUNK):
        chunk = feed.entries[start : start + CHUNK]
        pipe = r.pipeline(transaction=False)
        for stream, fields, _ in chunk:
            pipe.xadd(stream, fields)
        for (stream, _, what), entry_id in zip(chunk, pipe.execute(), strict=True):
            last[stream] = entry_id
            if isinstance(what, str):
                expected[stream][entry_id] = what
    wait_until(lambda: settled(r, last), timeout=60, message="every entry read and acknowledged")
    assert all(w.running for w in workers), [w.log_tail() for w in workers]

    for stream, malformed in expected.items():
        letters = xrange(r, f"{stream}:dlq")
        per_entry = Counter(fields[b"id"] for _, fields in letters)
        twice = [i for i, n in per_entry.items() if n > 1]
        assert not twice, f"{stream}: dead-lettered more than once: {twice[:5]}"
        assert set(per_entry) == set(malformed), (
            f"{stream}: {len(set(malformed) - set(per_entry))} malformed entries not"
            f" dead-lettered, {len(set(per_entry) - set(malformed))} valid ones dead-lettered"
        )
        wrong = []
        for _, fields in letters:
            reason = fields[b"reason"].decode()
            if malformed[fields[b"id"]] not in reason or "internal error" in reason:
                wrong.append(f"want {malformed[fields[b'id']]!r}, got {reason!r}")
            assert fields[b"deliveries"] == b"1"
        assert not wrong, f"{len(wrong)} reasons wrong, e.g.\n" + "\n".join(wrong[:5])

    want, got = model(feed.changes), held(r)
    wrong_keys = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    assert not wrong_keys, f"{len(wrong_keys)} keys differ from the model, e.g. " + "; ".join(
        f"{k!r}: want {want.get(k)!r}, got {got.get(k)!r}" for k in wrong_keys[:3]
    )

    for worker in workers:
        worker.terminate()
    assert [w.wait() for w in workers] == [0, 0]
    summaries = [w.summary() for w in workers]
    assert sum(s.get("dead_lettered", 0) for s in summaries) == N_MALFORMED, summaries
    assert all(s.get("applied", 0) > 0 for s in summaries), summaries
