"""Malformed, mismatched and odd entries (issue 9, section 2).

Every entry either plans into rows that Redis applies whole, or is refused as a whole, before
anything is written, with a reason naming what is wrong: never an ``internal error``, never a
change applied to some of its table's rules and not others. Pure decode and plan checks, property
tests over them (hypothesis), and the same entries through a worker on a real redis-server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamsync.config import MAX_ENTRIES, MAX_TTL_S, Rule
from streamsync.epochs import Epochs
from streamsync.errors import PoisonEntryError
from streamsync.events import ChangeEvent, Decoder
from streamsync.functions import FN_BATCH, ensure_library
from streamsync.keys import StateKeys
from streamsync.mapping import Planner, score_problem
from streamsync.worker.core import BatchCore
from tests.debezium import add_change, entry_fields, envelope, write_config
from tests.workers import drain, outcomes

TABLE = "public.users"
STREAM = "app.public.users"
TOMBSTONE_MS = 60_000

#: A hash, a JSON document, a set and a sorted set for each row of the table.
FOUR_RULES: list[dict[str, Any]] = [
    {"table": TABLE, "key": "user:{id}", "type": "hash"},
    {"table": TABLE, "key": "doc:{id}", "type": "json"},
    {"table": TABLE, "key": "plan:{plan}:users", "type": "set", "member": "{id}"},
    {"table": TABLE, "key": "prices", "type": "zset", "member": "{id}", "score": "price"},
]

#: Every kind of rule, on keys that never collide (so any entry's rows can share one Redis).
ALL_RULES: list[dict[str, Any]] = [
    *FOUR_RULES,
    {"table": TABLE, "key": "name:{id}", "type": "string", "value": "{name}"},
    {"table": TABLE, "key": "he:{email|lower}", "type": "hash", "fields": ["id", "email"]},
    {"table": TABLE, "key": "feed", "type": "list", "value": "{id}:{name}", "max_len": 5},
    {"table": TABLE, "key": "events", "type": "stream", "max_len": 10},
    {"table": TABLE, "key": "active", "type": "set", "member": "{id}", "where": "active = true"},
]


def planner(rules: list[dict[str, Any]]) -> Planner:
    return Planner({TABLE: tuple(Rule(**r) for r in rules)}, StateKeys("streamsync:pos:"))


def batch_core(rules: list[dict[str, Any]]) -> BatchCore:
    return BatchCore(
        Decoder(), planner(rules), Epochs(), tombstone_ms=TOMBSTONE_MS, max_deliveries=5
    )


def raw(key: Any, value: Any) -> list[bytes]:
    """An entry's fields as Debezium Server's compact layout writes them."""
    ((k, v),) = entry_fields(key, value).items()
    return [k.encode(), v.encode()]


def row(ident: int = 1, **columns: Any) -> dict[str, Any]:
    base = {"id": ident, "name": "ann", "plan": "free", "price": 10, "email": "A@x.io"}
    return base | {"active": True} | columns


def plan_reason(rules: list[dict[str, Any]], fields: list[bytes]) -> str:
    """The reason the entry is refused (the test fails if it plans, or raises anything else)."""
    with pytest.raises(PoisonEntryError) as caught:
        batch_core(rules).plan(STREAM, b"1-1", fields)
    return str(caught.value)


def dead_letters(r: redis.Redis, stream: str = STREAM) -> dict[bytes, dict[bytes, bytes]]:
    """The dead letters of ``stream`` by original entry id (a second letter fails the test)."""
    letters: dict[bytes, dict[bytes, bytes]] = {}
    for _, fields in r.xrange(stream + ":dlq"):
        assert fields[b"id"] not in letters, f"{fields[b'id']!r} dead-lettered twice"
        letters[fields[b"id"]] = fields
    return letters


def apply(r: redis.Redis, rows: list[Any]) -> list[Any]:
    keys: list[str] = []
    args: list[str | bytes] = []
    for row_write in rows:
        keys += row_write.keys
        args += row_write.args
    reply: list[Any] = r.fcall(FN_BATCH, len(keys), *keys, TOMBSTONE_MS, *args)
    return reply


@pytest.fixture
def lib(r: redis.Redis) -> redis.Redis:
    ensure_library(r)
    return r


# -- 1. a score Redis refuses: the whole change is refused, before any write -----------------

#: Scores Python's float() reads and Redis's ZADD refuses, and their kind of problem.
UNUSABLE_SCORES = {
    " 5": "is padded with whitespace",
    "5 ": "is padded with whitespace",
    "\t5": "is padded with whitespace",
    "1_000": "is not numeric",
    "1e400": "is beyond the range of a double",
    "-1e400": "is beyond the range of a double",
    "9" * 401: "is beyond the range of a double",
    "1e-400": "is too small for a double (it would read as zero)",
    "nan": "is NaN",
    "-NaN": "is NaN",
    "infinity ": "is padded with whitespace",
    " inf": "is padded with whitespace",
    "١٢": "is not numeric",  # Arabic-Indic digits
    "": "is empty",
}


@pytest.mark.parametrize(("score", "problem"), UNUSABLE_SCORES.items())
def test_a_score_redis_refuses_refuses_the_change_naming_rule_and_column(
    score: str, problem: str
) -> None:
    reason = plan_reason(FOUR_RULES, raw({"id": 1}, envelope("c", TABLE, 10, row(price=score))))
    assert reason.startswith("rule public.users:zset:"), reason
    assert f"zset score column 'price' {problem}" in reason, reason
    assert "Redis refuses it as a sorted-set score" in reason, reason


@pytest.mark.parametrize(
    "score", ["inf", "+inf", "-inf", "Infinity", "-INF", "0x10", "0x1p-3", "+.5", "5.", "3e-324"]
)
def test_a_score_redis_accepts_is_passed_as_written(score: str) -> None:
    rows = batch_core(FOUR_RULES).plan(
        STREAM, b"1-1", raw({"id": 1}, envelope("c", TABLE, 10, row(price=score)))
    )
    assert rows.rows[-1].args[-1] == score


#: Texts around the edges of strtod's grammar and of a double's range.
_FLOATISH = st.one_of(
    st.text(alphabet="0123456789.eE+-xXpPaAfF_ \t\n\0infINFtyTYnN", max_size=12),
    st.from_regex(
        r"[+-]?(0[xX])?[0-9a-fA-F]{0,4}\.?[0-9a-fA-F]{0,3}([eEpP][+-]?[0-9]{1,4})?", fullmatch=True
    ),
    st.floats(allow_nan=False).map(repr),
    st.integers(-(2**1100), 2**1100).map(str),
    st.sampled_from(["inf", "infinity", "INFINITY", "infinit", "nan(1)", "0x", "0x.p1", "1e", "."]),
    st.text(max_size=6),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_FLOATISH)
def test_score_validation_agrees_with_zadd(r: redis.Redis, text: str) -> None:
    try:
        r.zadd("scores", {"m": text})
    except redis.ResponseError as exc:
        assert "not a valid float" in str(exc)
        assert score_problem(text) is not None, f"{text!r}: Redis refuses it"
    else:
        assert score_problem(text) is None, f"{text!r}: Redis accepts it"


def test_an_unusable_score_writes_nothing_and_is_dead_lettered_at_once(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    add_change(r, STREAM, "c", row(1, price=10), lsn=10)
    bad = {}
    for i, score in enumerate(UNUSABLE_SCORES, start=2):
        bad[add_change(r, STREAM, "c", row(i, plan="pro", price=score), lsn=10 + i)] = i
    # an update of row 1 with such a score leaves every rule at the row's previous change
    bad[add_change(r, STREAM, "u", row(1, name="bob", plan="pro", price="1e400"), lsn=99)] = 1
    worker = drain(write_config(tmp_path / "c.yaml", redis_url, rules=FOUR_RULES))
    assert r.hget("user:1", "name") == b"ann"
    assert orjson.loads(r.get("doc:1") or b"")["name"] == "ann"
    assert r.smembers("plan:free:users") == {b"1"} and not r.exists("plan:pro:users")
    assert r.zrange("prices", 0, -1, withscores=True) == [(b"1", 10.0)]
    assert set(r.keys("user:*")) == {b"user:1"} and set(r.keys("doc:*")) == {b"doc:1"}
    letters = dead_letters(r)
    assert letters.keys() == bad.keys()
    for letter in letters.values():
        reason = letter[b"reason"].decode()
        assert reason.startswith("rule public.users:zset:"), reason
        assert "zset score column 'price' is" in reason, reason
        assert letter[b"deliveries"] == b"1"
    assert outcomes(worker) == {"applied": 1, "dead_lettered": len(bad)}


def test_the_largest_ttl_and_max_len_a_configuration_allows_apply(lib: redis.Redis) -> None:
    rules = [
        {"table": TABLE, "key": "user:{id}", "type": "hash", "ttl_s": MAX_TTL_S},
        {"table": TABLE, "key": "feed", "type": "list", "value": "{id}", "max_len": MAX_ENTRIES},
        {"table": TABLE, "key": "events", "type": "stream", "max_len": MAX_ENTRIES},
        {"table": TABLE, "key": "s", "type": "set", "member": "{id}", "ttl_s": MAX_TTL_S},
    ]
    event = Decoder().decode(raw({"id": 1}, envelope("c", TABLE, 10, row())))
    assert isinstance(event, ChangeEvent)
    rows = planner(rules).plan(event)
    keys = [k for w in rows for k in w.keys]
    args = [a for w in rows for a in w.args]
    reply = lib.fcall(FN_BATCH, len(keys), *keys, MAX_TTL_S * 1000, *args)
    assert reply == [1, 1, 1, 1]


# -- 2. a record key that disagrees with the row ---------------------------------------------


@pytest.mark.parametrize(
    ("key", "op", "image", "wanted"),
    [
        ({"uid": 7}, "u", {"id": 8}, "column 'uid' is absent from 'after'"),
        ({"id": 7}, "u", {"id": 8}, "column 'id' is 8 in 'after'"),
        ({"id": 7}, "c", {"id": None}, "column 'id' is None in 'after'"),
        ({"id": "7"}, "u", {"id": 7}, "column 'id' is 7 in 'after'"),
        ({"id": True}, "u", {"id": 1}, "column 'id' is 1 in 'after'"),
        ({"id": 7}, "d", {"id": 8}, "column 'id' is 8 in 'before'"),
        ({"a": 1, "b": 2}, "u", {"a": 1, "b": 3}, "column 'b' is 3 in 'after'"),
        ({"a": 1, "b": 2}, "u", {"a": 1}, "column 'b' is absent from 'after'"),
        ({"schema": None, "payload": {"id": 7}}, "u", {"id": 8}, "column 'id' is 8"),
    ],
)
def test_a_key_that_disagrees_with_the_row_is_refused(
    key: dict[str, Any], op: str, image: dict[str, Any], wanted: str
) -> None:
    columns = image | {"plan": "free", "price": 1, "name": "x"}
    value = (
        envelope(op, TABLE, 10, before=columns)
        if op == "d"
        else envelope(op, TABLE, 10, after=columns)
    )
    reason = plan_reason(FOUR_RULES, raw(key, value))
    assert "disagrees with the row" in reason and wanted in reason, reason


@pytest.mark.parametrize(
    ("key", "op", "image"),
    [
        ({"id": 7.0}, "u", {"id": 7}),  # one JSON number, two spellings
        ({"id": 7}, "d", {"name": "x"}),  # a before-image without the key column
        ({"id": 7}, "d", {"id": None}),  # ... or with a null fallback in it
        ({"id": 1, "b": [1, {"x": 2}]}, "u", {"id": 1, "b": [1, {"x": 2}]}),
        ({"schema": {"type": "struct"}, "payload": {"id": 7}}, "u", {"id": 7}),
    ],
)
def test_a_key_that_agrees_with_the_row_plans(
    key: dict[str, Any], op: str, image: dict[str, Any]
) -> None:
    columns = image | {"plan": "free", "price": 1}
    value = (
        envelope(op, TABLE, 10, before=columns)
        if op == "d"
        else envelope(op, TABLE, 10, after=columns)
    )
    rows = batch_core(FOUR_RULES).plan(STREAM, b"1-1", raw(key, value)).rows
    assert len(rows) == 4


def test_a_mismatched_key_never_moves_another_rows_placements(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    add_change(r, STREAM, "c", row(7, price=70), lsn=10)
    row8 = row(8, plan="pro", price=80)
    bad = [
        r.xadd(STREAM, entry_fields({"uid": 7}, envelope("u", TABLE, 11, after=row8))),
        r.xadd(STREAM, entry_fields({"id": 7}, envelope("u", TABLE, 12, after=row8))),
        r.xadd(STREAM, entry_fields({"id": 7}, envelope("d", TABLE, 13, before={"id": 8}))),
    ]
    drain(write_config(tmp_path / "c.yaml", redis_url, rules=FOUR_RULES))
    assert r.hget("user:7", "price") == b"70"
    assert r.smembers("plan:free:users") == {b"7"} and not r.exists("plan:pro:users")
    assert r.zrange("prices", 0, -1, withscores=True) == [(b"7", 70.0)]
    assert not r.exists("user:8") and not r.exists("doc:8")
    letters = dead_letters(r)
    assert sorted(letters) == sorted(bad)
    assert all(b"disagrees with the row" in letter[b"reason"] for letter in letters.values())


#: A NUMERIC(10,2) primary key with schemas enabled: Debezium writes it as base64 in the key
#: and in the row alike, and both are decoded to "10.50".
_CODE_SCHEMA = {
    "type": "bytes",
    "optional": False,
    "name": "org.apache.kafka.connect.data.Decimal",
    "version": 1,
    "parameters": {"scale": "2", "connect.decimal.precision": "10"},
    "field": "code",
}


def _with_schemas(op: str, lsn: int, after: Any, before: Any) -> tuple[Any, Any]:
    struct = {
        "type": "struct",
        "optional": True,
        "fields": [_CODE_SCHEMA, {"type": "string", "optional": True, "field": "plan"}],
    }
    value_schema = {
        "type": "struct",
        "fields": [struct | {"field": "before"}, struct | {"field": "after"}],
    }
    key = {
        "schema": {"type": "struct", "fields": [_CODE_SCHEMA], "optional": False},
        "payload": {"code": "BBo="},
    }
    return key, {
        "schema": value_schema,
        "payload": envelope(op, "public.codes", lsn, after=after, before=before),
    }


def test_a_schema_key_is_decoded_like_the_row(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    stream = "app.public.codes"
    rules = [{"table": "public.codes", "key": "plan:{plan}", "type": "set", "member": "{code}"}]
    key, value = _with_schemas("c", 10, {"code": "BBo=", "plan": "free"}, None)
    r.xadd(stream, entry_fields(key, value))
    cfg = write_config(tmp_path / "c.yaml", redis_url, streams=[stream], rules=rules)
    drain(cfg)
    assert r.smembers("plan:free") == {b"10.50"}
    # a delete whose before-image is null names the row by its key alone: "10.50" too
    key, value = _with_schemas("d", 11, None, None)
    r.xadd(stream, entry_fields(key, value))
    drain(cfg)
    assert not r.exists("plan:free")
    assert not r.exists(stream + ":dlq")


def test_a_table_whose_rules_are_keyed_by_primary_key_does_not_read_the_key() -> None:
    # the throughput path: the key names no placement there, so it is not even decoded
    rules = [{"table": TABLE, "key": "user:{id}", "type": "hash"}]
    core = batch_core(rules)
    core.plan(STREAM, b"1-1", raw({"id": 1}, envelope("c", TABLE, 10, row(1))))
    plan = core.plan(STREAM, b"1-2", raw({"uid": 7}, envelope("u", TABLE, 11, row(1))))
    assert isinstance(plan.event, ChangeEvent) and plan.event.raw_key is not None
    assert [w.keys[1] for w in plan.rows] == ["user:1"]
