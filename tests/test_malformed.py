"""Malformed, mismatched and odd entries (issue 9, section 2).

Every entry either plans into rows that Redis applies whole, or is refused as a whole, before
anything is written, with a reason naming what is wrong: never an ``internal error``, never a
change applied to some of its table's rules and not others. Pure decode and plan checks, property
tests over them (hypothesis), and the same entries through a worker on a real redis-server.
"""

from __future__ import annotations

import base64
import json
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
from streamsync.events import MAX_COLUMNS, ChangeEvent, Decoder
from streamsync.functions import Library, ensure_library
from streamsync.keys import StateKeys
from streamsync.mapping import Planner, score_problem
from streamsync.worker.core import BatchCore
from tests.debezium import add_change, entry_fields, envelope, write_config
from tests.replies import as_str, xadd, xrange
from tests.workers import drain, outcomes

TABLE = "public.users"
STREAM = "app.public.users"
TOMBSTONE_S = 60

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
    return Planner({TABLE: tuple(Rule(**r) for r in rules)}, StateKeys())


def batch_core(rules: list[dict[str, Any]]) -> BatchCore:
    return BatchCore(Decoder(), planner(rules), Epochs(), tombstone_s=TOMBSTONE_S, max_deliveries=5)


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
    for _, fields in xrange(r, stream + ":dlq"):
        assert fields[b"id"] not in letters, f"{fields[b'id']!r} dead-lettered twice"
        letters[fields[b"id"]] = fields
    return letters


def apply(r: redis.Redis, rows: list[Any]) -> list[Any]:
    return [
        int(s) if not isinstance(s, str) else s for s in Library(r).changes(rows, TOMBSTONE_S).rows
    ]


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
        # a text spelled like one of ZADD's flags (GT, NX...) is read as the flag
        assert "not a valid float" in str(exc) or "syntax error" in str(exc)
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
    assert apply(lib, rows) == [1, 1, 1, 1]


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
        xadd(r, STREAM, entry_fields({"uid": 7}, envelope("u", TABLE, 11, after=row8))),
        xadd(r, STREAM, entry_fields({"id": 7}, envelope("u", TABLE, 12, after=row8))),
        xadd(r, STREAM, entry_fields({"id": 7}, envelope("d", TABLE, 13, before={"id": 8}))),
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
    xadd(r, stream, entry_fields(key, value))
    cfg = write_config(tmp_path / "c.yaml", redis_url, streams=[stream], rules=rules)
    drain(cfg)
    assert r.smembers("plan:free") == {b"10.50"}
    # a delete whose before-image is null names the row by its key alone: "10.50" too
    key, value = _with_schemas("d", 11, None, None)
    xadd(r, stream, entry_fields(key, value))
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
    assert [w.keys[0] for w in plan.rows] == ["user:1"]


# -- 3. malformed entries: a reason naming what is wrong, never an "internal error" ----------


def _with(value: dict[str, Any], **top: Any) -> dict[str, Any]:
    return value | top


def _source(**fields: Any) -> dict[str, Any]:
    value = envelope("u", TABLE, 10, after=row())
    value["source"] = value["source"] | fields
    return value


def _schema_value(schema: Any, after: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"schema": schema, "payload": envelope("u", TABLE, 10, after=after or row())}


def _column_schema(column: str, **schema: Any) -> dict[str, Any]:
    struct = {"type": "struct", "fields": [{"field": column, **schema}], "field": "after"}
    return {"type": "struct", "fields": [struct]}


#: Marks replaced in the serialized entry by what orjson cannot write: 300 and 1,000 nested
#: arrays (orjson reads up to 1,024 levels, writes 254), a schema 900 levels deep, 2**64.
_DEEP_MARK, _DEEPER_MARK = "__deep__", "__deeper__"
_DEEP_SCHEMA_MARK, _HUGE_MARK = "__deep_schema__", "__huge__"
_MARKS = {
    _DEEP_MARK: "[" * 300 + "]" * 300,
    _DEEPER_MARK: '[{"a":' * 500 + "1" + "}]" * 500,
    _DEEP_SCHEMA_MARK: '{"type":"array","items":' * 900 + "{}" + "}" * 900,
    _HUGE_MARK: str(2**64),
}

#: (what, key, value, wanted reason): values holding _DEEP_MARK get a 300-level array there.
MALFORMED: list[tuple[str, Any, Any, str]] = [
    ("op is a list", {"id": 1}, _with(envelope("c", TABLE, 10, row()), op=["c"]), "not a string"),
    ("op is a number", {"id": 1}, _with(envelope("c", TABLE, 10, row()), op=5), "not a string"),
    ("op is huge", {"id": 1}, _with(envelope("c", TABLE, 10, row()), op="x" * 10**6), "unknown op"),
    ("table is huge", {"id": 1}, _source(table="x" * 10**6), "no rule maps table 'public.xxx"),
    (
        "filtered column nested 1,000 levels",
        {"id": 1},
        envelope("c", TABLE, 10, row(active=_DEEPER_MARK)),
        "cannot compare column 'active', list [{'a': [{...}]}]",
    ),
    (
        "column nested 300 levels",
        {"id": 1},
        envelope("c", TABLE, 10, row(meta=_DEEP_MARK)),
        "column 'meta' cannot be written as JSON",
    ),
    ("ts_ms is text", {"id": 1}, _source(ts_ms="now"), "source.ts_ms 'now'"),
    ("ts_ms is negative", {"id": 1}, _source(ts_ms=-1), "source.ts_ms -1"),
    ("ts_ms is a float", {"id": 1}, _source(ts_ms=1.5), "source.ts_ms 1.5"),
    ("lsn is a boolean", {"id": 1}, _source(lsn=True), "source.lsn True"),
    ("lsn is a float", {"id": 1}, _source(lsn=10.0), "source.lsn 10.0"),
    ("lsn is huge", {"id": 1}, _source(lsn=_HUGE_MARK), "64-bit"),
    ("lsn is negative", {"id": 1}, _source(lsn=-(2**63)), "64-bit"),
    ("connector is an object", {"id": 1}, _source(connector={"a": 1}), "mariadb only"),
    ("table is a number", {"id": 1}, _source(table=5), "lacks 'schema' or 'table'"),
    ("source is a list", {"id": 1}, _with(envelope("u", TABLE, 10, row()), source=[]), "'source'"),
    (
        "before is a list",
        {"id": 1},
        _with(envelope("u", TABLE, 10, row()), before=[1]),
        "'before' is not",
    ),
    ("after is text", {"id": 1}, _with(envelope("u", TABLE, 10, row()), after="x"), "no 'after'"),
    (
        "after has too many columns",
        {"id": 1},
        envelope("u", TABLE, 10, {"id": 1} | {f"c{i}": i for i in range(MAX_COLUMNS)}),
        f"has {MAX_COLUMNS + 1} columns",
    ),
    ("key payload is a number", {"schema": {}, "payload": 5}, envelope("d", TABLE, 10), "payload"),
    ("key is empty", {}, envelope("d", TABLE, 10), "names no primary-key column"),
    ("key is an array", [1], envelope("d", TABLE, 10, before={"id": 1}), "key is not a JSON obj"),
    ("schema is a number", {"id": 1}, _schema_value(5), "value schema is not a JSON object"),
    ("schema fields is a number", {"id": 1}, _schema_value({"fields": 5}), "is not an array"),
    (
        "schema nested 900 levels",
        {"id": 1},
        _schema_value(_column_schema("tags", type="array", items=_DEEP_SCHEMA_MARK)),
        "nested more than 32 levels",
    ),
    (
        "decimal scale out of range",
        {"id": 1},
        _schema_value(
            _column_schema(
                "price",
                type="bytes",
                name="org.apache.kafka.connect.data.Decimal",
                parameters={"scale": "9" * 30},
            ),
            row(price="BBo="),
        ),
        "column 'price': decimal scale",
    ),
    (
        "variable-scale decimal with a scale out of range",
        {"id": 1},
        _schema_value(
            _column_schema("price", type="struct", name="io.debezium.data.VariableScaleDecimal"),
            row(price={"scale": 10**15, "value": "BBo="}),
        ),
        "column 'price': decimal scale 1000000000000000 is out of range",
    ),
    ("score is an object", {"id": 1}, envelope("c", TABLE, 10, row(price={"a": 1})), "not numeric"),
    (
        "key template column is an array",
        {"id": 1},
        envelope("c", TABLE, 10, row(plan=["free"])),
        "cannot be used in a key",
    ),
    (
        "primary key is an object",
        {"id": {"a": 1}},
        envelope("c", TABLE, 10, row(id={"a": 1})),
        "primary-key column 'id' holds {'a': 1}",
    ),
    (
        "composite key nested 300 levels",
        {"id": 1, "meta": _DEEP_MARK},
        envelope("c", TABLE, 10, row(meta=_DEEP_MARK)),
        "too deeply nested",
    ),
]


def _serialized(value: Any) -> bytes:
    text = orjson.dumps(value)
    for mark, replacement in _MARKS.items():
        text = text.replace(f'"{mark}"'.encode(), replacement.encode())
    return text


@pytest.mark.parametrize(
    ("key", "value", "wanted"),
    [(k, v, w) for _, k, v, w in MALFORMED],
    ids=[what for what, *_ in MALFORMED],
)
def test_a_malformed_entry_says_what_is_wrong(key: Any, value: Any, wanted: str) -> None:
    rules = [{**FOUR_RULES[2], "key": "active", "where": "active = true"}, *FOUR_RULES]
    reason = plan_reason(rules, [_serialized(key), _serialized(value)])
    assert wanted in reason, reason
    assert len(reason) < 500, "a reason quotes an excerpt, not the entry"


@pytest.mark.parametrize(
    "fields",
    [
        [b'{"id":1}', b'{"op":"c","after":\xff}'],
        [b'{"id":\xfe}', json.dumps(envelope("d", TABLE, 10, before={"id": 1})).encode()],
        [b'{"id":1}', b'"\xed\xa0\x80"'],  # an encoded lone surrogate
        [b'{"id":1}', b'{"op":"c","after":{"id":"\\ud800"}}'],
    ],
)
def test_bytes_that_are_not_utf8_json_are_refused(fields: list[bytes]) -> None:
    assert "not valid JSON" in plan_reason(FOUR_RULES, fields)


def test_a_nested_column_is_refused_by_every_rule_kind_that_writes_it_as_json() -> None:
    fields = [b'{"id":1}', _serialized(envelope("c", TABLE, 10, row(meta=_DEEP_MARK)))]
    for rule in (
        {"table": TABLE, "key": "doc:{id}", "type": "json"},
        {"table": TABLE, "key": "feed", "type": "list", "value": "json"},
        {"table": TABLE, "key": "events", "type": "stream"},
    ):
        assert "column 'meta' cannot be written as JSON" in plan_reason([rule], fields)


# -- property: anything decodes and plans, or is refused with a reason -----------------------

_ODD_TEXTS = [
    " 5", "5 ", "1_000", "1e400", "9" * 401, "nan", "inf", "-Infinity", "0x1p3", "1e-400", "",
    "{", "}", "{}", "{id}", ":", "*", "?", "[", "\n", "\r\n", "\0", "a\0b", "é", "𝄞", "\u2028",
    "__debezium_unavailable_value", "X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ==", "BBo=",
    "__deep__", "__deeper__", "__huge__",
    "2024-05-01T10:00:00Z", "x" * 3000,
]  # fmt: skip
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(_ODD_TEXTS),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
_COLUMNS = ["id", "name", "plan", "price", "email", "active", "tags", "extra"]
_DECIMAL = {"type": "bytes", "name": "org.apache.kafka.connect.data.Decimal"}
_LOGICAL: st.SearchStrategy[dict[str, Any]] = st.sampled_from(
    [
        _DECIMAL | {"parameters": {"scale": "2"}},
        _DECIMAL | {"parameters": {"scale": "-3"}},
        _DECIMAL | {"parameters": {"scale": 10**9}},
        _DECIMAL | {"parameters": {"scale": "x"}},
        _DECIMAL | {"parameters": 5},
        {"type": "struct", "name": "io.debezium.data.VariableScaleDecimal"},
        {"type": "int32", "name": "io.debezium.time.Date"},
        {"type": "int64", "name": "io.debezium.time.MicroTimestamp"},
        {"type": "int64", "name": "io.debezium.time.NanoTime"},
        {"type": "array", "items": {"type": "int32", "name": "io.debezium.time.Date"}},
        {"type": "array", "items": 5},
        {"type": ["x"], "name": {"y": 1}},
    ]
)  # fmt: skip
_LOGICAL_VALUES = st.one_of(
    _VALUES,
    st.integers(-(2**63), 2**63 - 1),
    st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
    st.fixed_dictionaries(
        {"scale": st.integers(-(10**6), 10**6) | _SCALARS,
         "value": st.binary(max_size=20).map(lambda b: base64.b64encode(b).decode()) | _SCALARS}
    ),
)  # fmt: skip


@st.composite
def entries(draw: st.DrawFn) -> list[bytes]:
    """Entries near valid ones: a change of public.users, some of its parts replaced by
    arbitrary JSON, maybe wrapped with a (possibly wrong) schema, maybe cut or corrupted."""
    op = draw(st.sampled_from(["c", "u", "r", "d", "c", "u", "r", "d", "t", "m", "x"]))
    columns = {"id": draw(st.integers(0, 5))} | {
        c: draw(st.one_of(_SCALARS, st.sampled_from(_ODD_TEXTS), _VALUES)) for c in _COLUMNS[1:]
    }
    if op == "d":
        value = envelope(op, TABLE, draw(st.integers(0, 2**64 - 1)), before=columns)
    else:
        value = envelope(op, TABLE, draw(st.integers(0, 2**64 - 1)), after=columns)
    key: Any = {"id": columns["id"]}
    _replace_parts(draw, op, value, key)
    if draw(st.integers(0, 3)) == 0:
        value, key = _in_envelopes(draw, op, value, key)
    fields = [_serialized(key) if key is not None else b"default", _serialized(value)]
    return _corrupted(draw, fields)


def _replace_parts(draw: st.DrawFn, op: str, value: dict[str, Any], key: dict[str, Any]) -> None:
    """Up to three members of the value, its source, its row or the key dropped or replaced
    by arbitrary JSON."""
    for _ in range(draw(st.integers(0, 3))):
        target = draw(st.sampled_from(["value", "source", "row", "key"]))
        where: Any = {
            "value": value,
            "source": value.get("source"),
            "row": value.get("before" if op == "d" else "after"),
            "key": key,
        }[target]
        if not isinstance(where, dict):
            continue
        name = draw(st.sampled_from([*where, "op", "id", "lsn", "ts_ms", "payload", "schema"]))
        if draw(st.booleans()):
            where.pop(name, None)
        else:
            where[name] = draw(_VALUES)


def _in_envelopes(
    draw: st.DrawFn, op: str, value: dict[str, Any], key: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The value, and maybe the key, in a schema/payload envelope (the schema possibly wrong)
    giving some columns logical types, their values drawn for those types."""
    logical = {c: draw(_LOGICAL) for c in draw(st.lists(st.sampled_from(_COLUMNS), max_size=3))}
    row_schema = {
        "type": "struct",
        "fields": [{"field": c, **s} for c, s in logical.items()],
    }
    image = value.get("before" if op == "d" else "after")
    if isinstance(image, dict):
        for column in logical:
            image[column] = draw(_LOGICAL_VALUES)
    schema = draw(
        st.sampled_from(
            [
                {"type": "struct", "fields": [row_schema | {"field": "after"},
                                              row_schema | {"field": "before"}]},
                None, 5, {"fields": "x"}, {"fields": [5, {"field": []}]},
            ]
        )
    )  # fmt: skip
    value = {"schema": schema, "payload": value}
    if draw(st.booleans()):
        key = {"schema": {"type": "struct", "fields": row_schema["fields"]}, "payload": key}
    return value, key


def _corrupted(draw: st.DrawFn, fields: list[bytes]) -> list[bytes]:
    """Mostly ``fields`` as they are; else the value cut short, one byte of it changed, or
    the whole entry random bytes."""
    corruption = draw(st.sampled_from(["none"] * 17 + ["cut", "byte", "random"]))
    if corruption == "cut":
        cut = draw(st.integers(0, len(fields[1])))
        fields[1] = fields[1][:cut]
    elif corruption == "byte":
        at = draw(st.integers(0, len(fields[1]) - 1))
        fields[1] = fields[1][:at] + bytes([draw(st.integers(0, 255))]) + fields[1][at + 1 :]
    elif corruption == "random":
        fields = draw(st.lists(st.binary(max_size=12), max_size=5))
    return fields


def _plan_or_reason(core: BatchCore, fields: list[bytes]) -> list[Any] | str:
    try:
        plan = core.plan(STREAM, b"1-1", fields)
    except PoisonEntryError as exc:
        reason = str(exc)
        assert reason and len(reason) < 1000, reason
        return reason
    return plan.rows


@settings(max_examples=1000, deadline=None)
@given(fields=entries())
def test_any_entry_plans_or_is_refused_with_a_reason(fields: list[bytes]) -> None:
    rows = _plan_or_reason(batch_core(ALL_RULES), fields)
    if isinstance(rows, list):
        for row_write in rows:
            assert all(type(k) is str for k in row_write.keys)
            assert all(type(a) in (str, bytes) for a in row_write.args)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(fields=entries())
def test_whatever_plans_applies_without_a_redis_error(
    lib: redis.Redis, fields: list[bytes]
) -> None:
    rows = _plan_or_reason(batch_core(ALL_RULES), fields)
    if isinstance(rows, list) and rows:
        reply = apply(lib, rows)
        assert not [s for s in reply if isinstance(s, bytes)], (fields, reply)


# -- 4. one spelling of a column value, wherever it goes -------------------------------------

FLOAT_RULES: list[dict[str, Any]] = [
    {"table": TABLE, "key": "user:{id}", "type": "hash"},
    {"table": TABLE, "key": "doc:{id}", "type": "json"},
    {"table": TABLE, "key": "by-x:{x}", "type": "string", "value": "{x}"},
    {"table": TABLE, "key": "xs", "type": "set", "member": "{x}"},
    {"table": TABLE, "key": "ranked", "type": "zset", "member": "{x}", "score": "x"},
    {"table": TABLE, "key": "feed", "type": "list", "value": "{x}"},
    {"table": TABLE, "key": "events", "type": "stream"},
]


@pytest.mark.parametrize("x", [1e20, 1e-7, 1e16, 0.1, -0.0, 123.0, 5e-324, 1.7976931348623157e308])
def test_a_float_is_spelled_the_same_in_every_structure(lib: redis.Redis, x: float) -> None:
    spelled = orjson.dumps(x).decode()
    event = Decoder().decode(raw({"id": 1}, envelope("c", TABLE, 10, {"id": 1, "x": x})))
    assert isinstance(event, ChangeEvent)
    assert set(apply(lib, planner(FLOAT_RULES).plan(event))) == {1}
    assert lib.hget("user:1", "x") == spelled.encode()
    assert orjson.loads(lib.get("doc:1") or b"") == {"id": 1, "x": x}
    assert as_str(lib.get("doc:1") or b"") == f'{{"id":1,"x":{spelled}}}'
    assert lib.get(f"by-x:{spelled}") == spelled.encode()
    assert lib.smembers("xs") == {spelled.encode()}
    assert lib.zrange("ranked", 0, -1, withscores=True) == [(spelled.encode(), x)]
    assert lib.lrange("feed", 0, -1) == [spelled.encode()]
    ((_, fields),) = xrange(lib, "events")
    assert fields[b"x"] == spelled.encode()
