"""Every target type on a real redis-server, driven through the Planner: replays, out-of-order and
duplicate delivery, deletes, moves without before-images, primary-key changes, lists and streams,
TRUNCATE, resync epochs and validation, checked against an independent reference model of what
the final table would build."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamsync.buckets import MOVING_ROW, Table, is_meta, record_name
from streamsync.config import SINGLE_VALUE_TYPES, Mode, Rule, TargetType
from streamsync.epochs import epoch_floor, epoch_prefix
from streamsync.errors import PoisonEntryError
from streamsync.events import ChangeEvent
from streamsync.functions import Library, ensure_library
from streamsync.keys import StateKeys
from streamsync.mapping import Planner
from streamsync.positions import (
    MAX_LSN,
    NO_POSITION,
    RANK_REMOVE,
    RANK_WRITE,
    snapshot_read,
    streamed,
)
from streamsync.sweep import Sweeper
from tests.records import Placement, dangling, placement, records
from tests.replies import as_int, as_str, xrange, zscores

TABLE = "public.users"
TOMBSTONE_MS = 60_000
TOMBSTONE_S = TOMBSTONE_MS // 1000
APPLIED, STALE = 1, 0


def _rule(**kwargs: Any) -> Rule:
    return Rule(table=TABLE, **kwargs)


# One rule per kind. Their keys never collide, so any subset can share one planner.
RULES: dict[str, Rule] = {
    "hash": _rule(key="user:{id}", type="hash"),
    "json": _rule(key="doc:{id}", type="json"),
    "string": _rule(key="name:{id}", type="string", value="{name}"),
    # keyed by a non-key column: the key moves when the column changes
    "hash_by_email": _rule(key="he:{email|lower}", type="hash"),
    "json_by_email": _rule(key="je:{email|lower}", type="json"),
    "string_by_email": _rule(key="email:{email|lower}", type="string", value="{id}"),
    "set": _rule(key="plan:{plan}:users", type="set", member="{id}"),
    "zset": _rule(key="prices", type="zset", member="{id}", score="price", where="active = true"),
    "list": _rule(key="feed", type="list", value="{id}:{name}"),
    "list_replace": _rule(key="feedr", type="list", value="{id}:{name}", on_update="replace"),
    "stream": _rule(key="events", type="stream"),
}
KINDS = list(RULES)
#: Kinds whose contents are a pure function of the final table (no history, no entry order).
SNAPSHOT_KINDS = [k for k in KINDS if k not in ("list", "list_replace", "stream")]
#: Kinds keyed by the primary key: their records are of keys, not of rows.
PK_KEYED = {"hash", "json", "string"}
MOVING = ["hash_by_email", "json_by_email", "string_by_email"]

V1 = {"id": 1, "name": "ann", "plan": "free", "price": 10, "active": True, "email": "Ann@X.io"}
V2 = {"id": 1, "name": "bob", "plan": "pro", "price": 12, "active": True, "email": "Bob@X.io"}


# -- events and application ----------------------------------------------------------------


def pos(lsn: int, op: str) -> str:
    """The position of a change of ``lsn`` (a snapshot read at ``lsn``, or a transaction of its
    own), ranked as the decoder ranks it (deletes and truncates before writes)."""
    if op == "r":
        return snapshot_read(lsn)
    return streamed(lsn, lsn, RANK_REMOVE if op in ("d", "t") else RANK_WRITE)


def change(op: str, lsn: int, row: dict[str, Any]) -> ChangeEvent:
    """A change of ``public.users`` (primary key ``id``) as the decoder builds it: a delete
    carries only the key columns (PostgreSQL's default REPLICA IDENTITY)."""
    key = {"id": row["id"]}
    return ChangeEvent(
        op=op,
        table=TABLE,
        position=pos(lsn, op),
        ts_ms=None,
        after=None if op == "d" else dict(row),
        before=dict(key) if op == "d" else None,
        key=key,
    )


class Cache:
    """Applies events through a Planner the way the worker does (one batch call per event, or
    several events in one call)."""

    def __init__(self, r: redis.Redis, *kinds: str, rules: Sequence[Rule] = ()) -> None:
        self.r = r
        self.rules = tuple(rules) or tuple(RULES[k] for k in kinds)
        self.planner = Planner({TABLE: self.rules}, StateKeys())

    def apply(self, *events: ChangeEvent, epoch: str = "") -> list[Any]:
        statuses: list[Any] = []
        for event in events:
            statuses += self.apply_batch([event], epoch=epoch)
        return statuses

    def apply_batch(self, events: Iterable[ChangeEvent], epoch: str = "") -> list[Any]:
        rows = [row for event in events for row in self.planner.plan(event, epoch)]
        reply = Library(self.r).changes(rows, TOMBSTONE_S).rows
        assert not [s for s in reply if isinstance(s, str)], reply
        return [int(s) for s in reply]

    def sweeper(self) -> Sweeper:
        return Sweeper(self.r, self.planner, TOMBSTONE_S)

    def key_index(self, kind: str) -> set[str]:
        """The keys of the rule's records whose row is cached."""
        rule = RULES[kind]
        table = self.planner.tables.table(rule)
        buckets = int(self.r.hget(table.meta, "#n") or 1)
        prefix = rule.template.literals[0]
        keys = {
            prefix + record_name(as_str(f))
            for b in range(buckets)
            for f in self.r.hkeys(table.bucket(b))
            if not is_meta(f)
        }
        return {k for k in keys if self.r.exists(k)}

    def records_table(self, rule: Rule) -> Table:
        """The table holding ``rule``'s records of rows (not of keys)."""
        if rule.type in SINGLE_VALUE_TYPES:
            return self.planner.tables.moving(rule)
        return self.planner.tables.table(rule)

    def placed(self, rule: Rule) -> dict[str, Placement]:
        """Where the rule's records say its rows are, by row identity."""
        table = self.records_table(rule)
        out = {}
        for field, record in records(self.r, table).items():
            name = field.decode()
            if rule.type in SINGLE_VALUE_TYPES:
                if not name.startswith(MOVING_ROW):
                    continue
                name = name[len(MOVING_ROW) :]
            where = placement(table, field, record)
            if where is not None:
                out[record_name(name)] = where
        return out

    def placed_rows(self, kind: str) -> set[str]:
        """The rows the rule's records say are placed somewhere."""
        return set(self.placed(RULES[kind]))

    def dangling(self) -> list[str]:
        """Records of the cache's rules naming what Redis does not hold."""
        problems = []
        for rule in self.rules:
            if rule.type is not TargetType.STREAM and rule.mode is Mode.WRITE_THROUGH:
                problems += dangling(self.r, self.records_table(rule))
        return problems


@pytest.fixture
def lib(r: redis.Redis) -> redis.Redis:
    ensure_library(r)
    return r


# -- what Redis holds ----------------------------------------------------------------------


def visible(r: redis.Redis) -> dict[str, Any]:
    """Every user-visible key (not streamsync's own records) with its decoded contents."""
    out: dict[str, Any] = {}
    for raw in r.keys("*"):
        key = as_str(raw)
        if key.startswith("streamsync:"):
            continue
        kind = as_str(r.type(raw))
        if kind == "string":
            out[key] = as_str(r.get(raw))
        elif kind == "hash":
            out[key] = {as_str(f): as_str(v) for f, v in r.hgetall(raw).items()}
        elif kind == "set":
            out[key] = {as_str(m) for m in r.smembers(raw)}
        elif kind == "zset":
            out[key] = {m.decode(): s for m, s in zscores(r, raw).items()}
        elif kind == "list":
            out[key] = [as_str(v) for v in r.lrange(raw, 0, -1)]
        elif kind == "stream":
            out[key] = [
                {f.decode(): v.decode() for f, v in fields.items()} for _, fields in xrange(r, key)
            ]
        else:
            raise AssertionError(f"unexpected type {kind} of {key}")
    return out


def listed(r: redis.Redis, list_key: str) -> int:
    """The entries a list rule's order record says its list holds (it holds the reserve's
    after them)."""
    order = StateKeys().order(list_key)
    reserve = StateKeys().reserve(list_key)
    return int(r.llen(order)) - int(r.llen(reserve))


# -- the reference model -------------------------------------------------------------------


def final_rows(events: Iterable[ChangeEvent]) -> dict[int, dict[str, Any]]:
    """The table after ``events``: each row as its newest change (by position) left it."""
    newest: dict[int, ChangeEvent] = {}
    for event in events:
        ident = event.key["id"] if event.key else None
        assert isinstance(ident, int)
        if ident not in newest or event.position > newest[ident].position:
            newest[ident] = event
    return {i: dict(e.after) for i, e in newest.items() if e.op != "d" and e.after is not None}


def text(value: Any) -> str:
    """A column value as a hash field or stream field holds it."""
    if value is True or value is False:
        return "true" if value else "false"
    return str(value)


def fields(row: dict[str, Any]) -> dict[str, str]:
    return {c: text(v) for c, v in row.items() if v is not None}


def snapshot(kind: str, rows: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """What a snapshot rule builds from the rows of a table (as a fresh SQL query would)."""
    out: dict[str, Any] = {}
    for ident, row in sorted(rows.items()):
        email = str(row.get("email", "")).lower()
        if kind == "hash":
            out[f"user:{ident}"] = fields(row)
        elif kind == "json":
            out[f"doc:{ident}"] = orjson.dumps(row).decode()
        elif kind == "string":
            out[f"name:{ident}"] = row["name"]
        elif kind == "hash_by_email":
            out[f"he:{email}"] = fields(row)
        elif kind == "json_by_email":
            out[f"je:{email}"] = orjson.dumps(row).decode()
        elif kind == "string_by_email":
            out[f"email:{email}"] = str(ident)
        elif kind == "set":
            out.setdefault(f"plan:{row['plan']}:users", set()).add(str(ident))
        elif kind == "zset":
            if row["active"] is True and row["price"] is not None:
                out.setdefault("prices", {})[str(ident)] = float(row["price"])
        else:
            raise AssertionError(kind)
    return out


def list_model(kind: str, applied: Iterable[ChangeEvent]) -> dict[str, Any]:
    """A list rule (value ``{id}:{name}``, deletes remove the row's entries), entries newest
    first by the position that placed them."""
    entries: list[tuple[str, int, str]] = []  # (position, row, value)
    for event in applied:
        ident = event.key["id"] if event.key else None
        assert isinstance(ident, int)
        if event.op == "d":
            entries = [e for e in entries if e[1] != ident]
            continue
        assert event.after is not None
        value = f"{ident}:{event.after['name']}"
        mine = [e for e in entries if e[1] == ident]
        if kind == "list_replace" and mine:
            entries = [(p, i, value if i == ident else v) for p, i, v in entries]
        else:
            entries.append((event.position, ident, value))
    key = "feed" if kind == "list" else "feedr"
    values = [v for _, _, v in sorted(entries, reverse=True)]
    return {key: values} if values else {}


def stream_entry(event: ChangeEvent, row: dict[str, Any] | None = None) -> dict[str, str]:
    entry = {"op": event.op, "table": event.table, "position": event.position}
    if row is None:
        row = event.key if event.op == "d" else event.after
    entry.update(fields(row or {}))
    return entry


def expected(kind: str, applied: Sequence[ChangeEvent]) -> dict[str, Any]:
    """What rule ``kind`` holds after the ``applied`` events, in the order they applied."""
    if kind in ("list", "list_replace"):
        return list_model(kind, applied)
    if kind == "stream":
        return {"events": [stream_entry(e) for e in applied]} if applied else {}
    return snapshot(kind, final_rows(applied))


# -- replays, out-of-order, deletes, duplicates: every kind ---------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_replay_is_stale_and_changes_nothing(lib: redis.Redis, kind: str) -> None:
    cache = Cache(lib, kind)
    events = [change("c", 10, V1), change("u", 20, V2)]
    assert cache.apply(*events) == [APPLIED, APPLIED]
    state = visible(lib)
    assert state == expected(kind, events)
    assert cache.apply(*events) == [STALE, STALE]
    assert cache.apply(*reversed(events)) == [STALE, STALE]
    assert visible(lib) == state
    assert not cache.dangling()


@pytest.mark.parametrize("kind", KINDS)
def test_older_change_after_newer_is_stale(lib: redis.Redis, kind: str) -> None:
    cache = Cache(lib, kind)
    newer, older = change("u", 20, V2), change("c", 10, V1)
    assert cache.apply(newer) == [APPLIED]
    assert cache.apply(older) == [STALE]
    assert visible(lib) == expected(kind, [newer])
    assert not cache.dangling()


@pytest.mark.parametrize("kind", KINDS)
def test_delete_removes_and_older_replays_stay_deleted(lib: redis.Redis, kind: str) -> None:
    cache = Cache(lib, kind)
    create, delete = change("c", 10, V1), change("d", 30, V1)
    assert cache.apply(create, delete) == [APPLIED, APPLIED]
    gone = expected(kind, [create, delete])
    assert visible(lib) == gone
    if kind != "stream":
        assert gone == {}
    # a late update from before the delete, and the delete again: nothing comes back
    assert cache.apply(change("u", 20, V2), delete, create) == [STALE, STALE, STALE]
    assert visible(lib) == gone
    # a re-insert after the delete is newer and applies
    again = change("c", 40, V2)
    assert cache.apply(again) == [APPLIED]
    assert visible(lib) == expected(kind, [create, delete, again])
    assert not cache.dangling()


@pytest.mark.parametrize("kind", KINDS)
def test_duplicate_delivery_in_one_batch_applies_once(lib: redis.Redis, kind: str) -> None:
    cache = Cache(lib, kind)
    e1, e2 = change("c", 10, V1), change("u", 20, V2)
    statuses = cache.apply_batch([e1, e1, e2, e2, e1])
    assert statuses == [APPLIED, STALE, APPLIED, STALE, STALE]
    assert visible(lib) == expected(kind, [e1, e2])
    assert not cache.dangling()


@pytest.mark.parametrize("kind", KINDS)
def test_rows_are_independent(lib: redis.Redis, kind: str) -> None:
    # an old position of one row never makes another row's change stale
    cache = Cache(lib, kind)
    v3 = {**V1, "id": 3, "email": "Cy@X.io", "name": "cy"}
    events = [change("c", 50, V1), change("c", 5, v3)]
    assert cache.apply(*events) == [APPLIED, APPLIED]
    assert visible(lib) == expected(kind, events)


# -- moves without before-images ----------------------------------------------------------


@pytest.mark.parametrize("order", ["in_order", "reversed"])
def test_set_member_moves_when_plan_changes(lib: redis.Redis, order: str) -> None:
    cache = Cache(lib, "set")
    events = [change("c", 10, V1), change("u", 20, V2)]
    if order == "reversed":
        events.reverse()
    cache.apply(*events)
    assert visible(lib) == {"plan:pro:users": {"1"}}
    (record,) = records(lib, cache.planner.tables.table(RULES["set"])).values()
    # the key's middle only: the member is the row
    assert (record.position, record.kind, record.data) == (pos(20, "u"), "T", b"pro")
    assert cache.placed(RULES["set"]) == {"1": Placement("T", "plan:pro:users", "1")}


def test_set_member_moves_when_member_changes_within_one_key(lib: redis.Redis) -> None:
    rule = _rule(key="plan:{plan}", type="set", member="{email|lower}")
    cache = Cache(lib, rules=[rule])
    cache.apply(change("c", 10, V1), change("u", 20, {**V1, "email": "New@X.io"}))
    assert visible(lib) == {"plan:free": {"new@x.io"}}
    cache.apply(change("d", 30, V1))
    assert visible(lib) == {}


def test_set_delete_of_a_moved_row_removes_its_current_member(lib: redis.Redis) -> None:
    cache = Cache(lib, "set")
    cache.apply(change("c", 10, V1), change("u", 20, V2), change("d", 30, V1))
    assert visible(lib) == {}
    assert cache.placed_rows("set") == set()


def test_zset_score_change_updates_the_member(lib: redis.Redis) -> None:
    cache = Cache(lib, "zset")
    cache.apply(change("c", 10, V1))
    assert visible(lib) == {"prices": {"1": 10.0}}
    cache.apply(change("u", 20, {**V1, "price": "12.5"}))
    assert visible(lib) == {"prices": {"1": 12.5}}
    assert cache.apply(change("u", 15, {**V1, "price": 99})) == [STALE]
    assert visible(lib) == {"prices": {"1": 12.5}}


def test_zset_member_leaves_when_where_stops_matching_and_returns(lib: redis.Redis) -> None:
    cache = Cache(lib, "zset")
    cache.apply(change("c", 10, V1))
    assert cache.apply(change("u", 20, {**V1, "active": False})) == [APPLIED]
    assert visible(lib) == {}
    assert cache.placed_rows("zset") == set()
    # the older, matching change cannot bring it back
    assert cache.apply(change("c", 10, V1)) == [STALE]
    assert visible(lib) == {}
    cache.apply(change("u", 30, {**V1, "price": 7}))
    assert visible(lib) == {"prices": {"1": 7.0}}
    assert cache.placed_rows("zset") == {"1"}


def test_zset_exit_applied_before_the_older_entry_never_shows_it(lib: redis.Redis) -> None:
    cache = Cache(lib, "zset")
    assert cache.apply(change("u", 20, {**V1, "active": None})) == [APPLIED]
    assert cache.apply(change("c", 10, V1)) == [STALE]
    assert visible(lib) == {}


@pytest.mark.parametrize("order", ["in_order", "reversed"])
def test_zset_member_leaves_on_null_score(lib: redis.Redis, order: str) -> None:
    cache = Cache(lib, "zset")
    v2 = {**V1, "id": 2}
    cache.apply(change("c", 5, v2))
    events = [change("c", 10, V1), change("u", 20, {**V1, "price": None})]
    if order == "reversed":
        events.reverse()
    cache.apply(*events)
    assert visible(lib) == {"prices": {"2": 10.0}}
    assert cache.placed_rows("zset") == {"2"}


def test_zset_member_moves_between_keys(lib: redis.Redis) -> None:
    rule = _rule(key="rank:{plan}", type="zset", member="{id}", score="price")
    cache = Cache(lib, rules=[rule])
    cache.apply(change("c", 10, V1), change("u", 20, V2))
    assert visible(lib) == {"rank:pro": {"1": 12.0}}


@pytest.mark.parametrize("kind", MOVING)
@pytest.mark.parametrize("order", ["in_order", "reversed"])
def test_key_on_a_non_key_column_moves_when_it_changes(
    lib: redis.Redis, kind: str, order: str
) -> None:
    cache = Cache(lib, kind)
    events = [change("c", 10, V1), change("u", 20, V2)]
    if order == "reversed":
        events.reverse()
    cache.apply(*events)
    assert visible(lib) == snapshot(kind, {1: V2})
    assert len(visible(lib)) == 1  # the old key is gone
    assert cache.placed_rows(kind) == {"1"}
    assert cache.key_index(kind) == set()
    assert cache.apply(change("d", 30, V1)) == [APPLIED]
    assert visible(lib) == {}
    assert cache.placed_rows(kind) == set()


@pytest.mark.parametrize("kind", MOVING)
def test_key_on_a_non_key_column_stays_when_the_rendered_key_is_the_same(
    lib: redis.Redis, kind: str
) -> None:
    # only the case changes: {email|lower} renders the same key, which must not be removed
    cache = Cache(lib, kind)
    v2 = {**V1, "email": "ANN@x.IO", "name": "annie"}
    cache.apply(change("c", 10, V1), change("u", 20, v2))
    assert visible(lib) == snapshot(kind, {1: v2})


@pytest.mark.parametrize("kind", MOVING)
@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_unique_value_changing_hands(lib: redis.Redis, kind: str, order: Sequence[int]) -> None:
    """Row A's email x -> y at LSN 20, row B (email z) takes x at LSN 30: whatever the order of
    applying, x is B's and y is A's."""
    cache = Cache(lib, kind)
    a_x = {**V1, "id": 1, "email": "x@a.io", "name": "ann"}
    b_z = {**V1, "id": 2, "email": "z@a.io", "name": "bob"}
    a_y, b_x = {**a_x, "email": "y@a.io"}, {**b_z, "email": "x@a.io"}
    events = [
        change("c", 10, a_x),
        change("c", 11, b_z),
        change("u", 20, a_y),
        change("u", 30, b_x),
    ]
    cache.apply(*(events[i] for i in order))
    assert visible(lib) == snapshot(kind, {1: a_y, 2: b_x})
    assert not cache.dangling()
    assert cache.placed_rows(kind) == {"1", "2"}


UNIQUE_MEMBER_RULES = {
    "set_by_email": _rule(key="members", type="set", member="{email|lower}"),
    "zset_by_email": _rule(key="ranked", type="zset", member="{email|lower}", score="price"),
}


def unique_snapshot(kind: str, rows: dict[int, dict[str, Any]]) -> dict[str, Any]:
    if kind == "set_by_email":
        members = {row["email"].lower() for row in rows.values()}
        return {"members": members} if members else {}
    if kind == "zset_by_email":
        scores = {row["email"].lower(): float(row["price"]) for row in rows.values()}
        return {"ranked": scores} if scores else {}
    return snapshot(kind, rows)


def _orders_ending_wrong(r: redis.Redis, kind: str, last: str) -> dict[Any, Any]:
    """Row A's email x -> y at LSN 20, row B takes x at LSN 30, then A changes again at LSN 40
    (another email, or a delete): a UNIQUE constraint holds at every step. Applies the five
    changes in every order; returns the orders whose final state is not the final table's."""
    a_x = {**V1, "id": 1, "email": "x@a.io", "name": "ann"}
    b_z = {**V1, "id": 2, "email": "z@a.io", "name": "bob"}
    a_y, b_x = {**a_x, "email": "y@a.io"}, {**b_z, "email": "x@a.io"}
    a_w = {**a_x, "email": "w@a.io"}
    events = [
        change("c", 10, a_x),
        change("c", 11, b_z),
        change("u", 20, a_y),
        change("u", 30, b_x),
        change(last, 40, a_w),
    ]
    want = unique_snapshot(kind, {1: a_w, 2: b_x} if last == "u" else {2: b_x})
    rule = UNIQUE_MEMBER_RULES.get(kind) or RULES[kind]
    wrong = {}
    for order in itertools.permutations(range(5)):
        r.flushdb()
        Cache(r, rules=[rule]).apply(*(events[i] for i in order))
        got = visible(r)
        if got != want:
            wrong[order] = got
    return wrong


@pytest.mark.parametrize("kind", MOVING)
@pytest.mark.parametrize("last", ["u", "d"])
def test_key_that_changed_hands_survives_the_old_owners_next_change(
    lib: redis.Redis, kind: str, last: str
) -> None:
    """x must end as B's in every order: A's change at 40 may remove the key A placed only if
    no newer change (B's, at 30) wrote it since."""
    wrong = _orders_ending_wrong(lib, kind, last)
    assert not wrong, f"{len(wrong)} of 120 orders end wrong, e.g. {next(iter(wrong.items()))}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("order", ["delete_first", "create_first"])
def test_primary_key_change_in_either_order(lib: redis.Redis, kind: str, order: str) -> None:
    """UPDATE users SET id = 100 WHERE id = 2: a delete of 2 (rank 0) and a create of 100
    (rank 1) at one LSN. The rows share every other column, so a rule keyed by a non-key
    column maps both to one key: the create must win in both orders."""
    cache = Cache(lib, kind)
    old = {**V1, "id": 2, "email": "Shared@X.io"}
    new = {**old, "id": 100}
    first = change("c", 5, old)
    delete, create = change("d", 50, old), change("c", 50, new)
    assert delete.position < create.position
    pair = [delete, create] if order == "delete_first" else [create, delete]
    assert cache.apply(first, *pair) == [APPLIED] * 3
    assert visible(lib) == expected(kind, [first, *pair])
    if kind in SNAPSHOT_KINDS:
        assert visible(lib) == snapshot(kind, {100: new})
    assert not cache.dangling()
    # a replay of the pair changes nothing
    assert cache.apply(*pair) == [STALE, STALE]
    assert visible(lib) == expected(kind, [first, *pair])


@pytest.mark.parametrize("order", ["delete_first", "create_first"])
def test_primary_key_change_keeps_a_shared_string_key(lib: redis.Redis, order: str) -> None:
    cache = Cache(lib, "string_by_email")
    old = {**V1, "id": 2, "email": "Shared@X.io"}
    new = {**old, "id": 100}
    pair = [change("d", 50, old), change("c", 50, new)]
    if order == "create_first":
        pair.reverse()
    cache.apply(change("c", 5, old), *pair)
    assert visible(lib) == {"email:shared@x.io": "100"}
    assert cache.placed_rows("string_by_email") == {"100"}
    table = cache.planner.tables.moving(RULES["string_by_email"])
    # the key's own record: the create wrote it last
    assert records(lib, table)[b"kshared@x.io"].position == pos(50, "c")


# -- lists ---------------------------------------------------------------------------------


def test_list_push_mode_pushes_one_entry_per_newer_change(lib: redis.Redis) -> None:
    cache = Cache(lib, "list")
    events = [
        change("c", 10, V1),
        change("u", 20, {**V1, "name": "bob"}),
        change("u", 30, {**V1, "name": "cy"}),
    ]
    assert cache.apply(*events) == [APPLIED] * 3
    assert visible(lib) == {"feed": ["1:cy", "1:bob", "1:ann"]}
    # replays, in any order and in one batch, never duplicate an entry
    assert cache.apply(*reversed(events)) == [STALE] * 3
    assert cache.apply_batch(events * 2) == [STALE] * 6
    assert visible(lib) == {"feed": ["1:cy", "1:bob", "1:ann"]}
    assert not cache.dangling()


def test_list_replace_mode_rewrites_the_rows_entry_in_place(lib: redis.Redis) -> None:
    cache = Cache(lib, "list_replace")
    v2 = {**V1, "id": 2, "name": "bob"}
    cache.apply(change("c", 10, V1), change("c", 15, v2))
    assert visible(lib) == {"feedr": ["2:bob", "1:ann"]}
    assert cache.apply(change("u", 20, {**V1, "name": "annie"})) == [APPLIED]
    assert visible(lib) == {"feedr": ["2:bob", "1:annie"]}
    assert cache.apply(change("u", 12, {**V1, "name": "old"})) == [STALE]
    assert visible(lib) == {"feedr": ["2:bob", "1:annie"]}
    assert listed(lib, "feedr") == 2
    assert not cache.dangling()


def test_list_max_len_keeps_the_newest(lib: redis.Redis) -> None:
    rule = _rule(key="feed", type="list", value="{id}:{name}", max_len=3)
    cache = Cache(lib, rules=[rule])
    rows = [{**V1, "id": i, "name": f"n{i}"} for i in range(1, 6)]
    cache.apply(*(change("c", 10 * i, row) for i, row in enumerate(rows, 1)))
    assert visible(lib) == {"feed": ["5:n5", "4:n4", "3:n3"]}
    # a late change older than every kept entry does not get in
    assert cache.apply(change("c", 5, {**V1, "id": 9, "name": "late"})) == [APPLIED]
    assert visible(lib) == {"feed": ["5:n5", "4:n4", "3:n3"]}
    # a late one newer than the oldest kept entry pushes that one out
    cache.apply(change("u", 35, {**V1, "id": 2, "name": "n2b"}))
    assert visible(lib) == {"feed": ["5:n5", "4:n4", "2:n2b"]}
    assert listed(lib, "feed") == 3
    # one row's own entries are capped too
    for lsn in range(60, 100, 10):
        cache.apply(change("u", lsn, {**V1, "id": 7, "name": f"v{lsn}"}))
    assert visible(lib) == {"feed": ["7:v90", "7:v80", "7:v70"]}
    assert listed(lib, "feed") == 3


@pytest.mark.parametrize("order", list(itertools.permutations(range(5))))
def test_capped_list_holds_the_newest_rows_in_any_order(
    lib: redis.Redis, order: Sequence[int]
) -> None:
    """lua/streamsync.lua: a capped list holds the newest max_len rows in any delivery order,
    as long as no more than max_len of them are deleted."""
    rule = _rule(key="feed", type="list", value="{id}:{name}", max_len=3)
    cache = Cache(lib, rules=[rule])
    rows = [{**V1, "id": i, "name": f"n{i}"} for i in range(1, 6)]
    cache.apply(*(change("c", 10 * (i + 1), rows[i]) for i in order))
    assert visible(lib) == {"feed": ["5:n5", "4:n4", "3:n3"]}
    cache.apply(change("d", 60, rows[4]))
    assert visible(lib) == {"feed": ["4:n4", "3:n3", "2:n2"]}


@pytest.mark.parametrize("order", list(itertools.permutations([30, 10, 20])))
def test_list_entries_are_ordered_by_position_whatever_the_delivery_order(
    lib: redis.Redis, order: Sequence[int]
) -> None:
    cache = Cache(lib, "list")
    cache.apply(*(change("c", lsn, {**V1, "id": lsn, "name": f"at{lsn}"}) for lsn in order))
    assert visible(lib) == {"feed": ["30:at30", "20:at20", "10:at10"]}


def test_list_entries_sharing_a_position_sort_by_row_number(lib: redis.Redis) -> None:
    # one snapshot position, ids 9 and 10: integers by value, not as text
    cache = Cache(lib, "list")
    cache.apply(change("c", 10, {**V1, "id": 10}), change("c", 10, {**V1, "id": 9}))
    assert visible(lib) == {"feed": ["10:ann", "9:ann"]}


@pytest.mark.parametrize("on_delete", ["remove", "ignore"])
def test_list_on_delete(lib: redis.Redis, on_delete: str) -> None:
    rule = _rule(key="feed", type="list", value="{id}:{name}", on_delete=on_delete)
    cache = Cache(lib, rules=[rule])
    v2 = {**V1, "id": 2, "name": "bob"}
    cache.apply(change("c", 10, V1), change("u", 20, {**V1, "name": "annie"}), change("c", 15, v2))
    assert visible(lib) == {"feed": ["1:annie", "2:bob", "1:ann"]}
    assert cache.apply(change("d", 30, V1)) == [APPLIED]
    if on_delete == "remove":
        assert visible(lib) == {"feed": ["2:bob"]}
    else:
        assert visible(lib) == {"feed": ["1:annie", "2:bob", "1:ann"]}
    # kept entries stay recorded, so a TRUNCATE or a resync still finds them
    expected = {"2"} if on_delete == "remove" else {"1", "2"}
    assert set(cache.placed(rule)) == expected
    cache.apply(change("c", 40, {**V1, "name": "new"}))
    assert visible(lib)["feed"][0] == "1:new"


def test_list_row_leaving_the_where_loses_its_entries(lib: redis.Redis) -> None:
    rule = _rule(key="feed", type="list", value="{id}:{name}", where="active = true")
    cache = Cache(lib, rules=[rule])
    cache.apply(change("c", 10, V1), change("u", 20, {**V1, "active": False}))
    assert visible(lib) == {}


def test_list_deleted_outside_streamsync_is_restarted_consistently(lib: redis.Redis) -> None:
    cache = Cache(lib, "list")
    rows = {i: {**V1, "id": i, "name": f"n{i}"} for i in (1, 2, 3)}
    cache.apply(*(change("c", 10 * i, row) for i, row in rows.items()))
    lib.delete("feed")  # the application dropped the list, not its order record
    assert cache.apply(change("u", 40, {**rows[2], "name": "n2b"})) == [APPLIED]
    assert visible(lib) == {"feed": ["2:n2b"]}
    assert listed(lib, "feed") == 1
    # the other rows' records point at entries no longer there: removing them is harmless
    assert cache.apply(change("d", 50, rows[1])) == [APPLIED]
    assert visible(lib) == {"feed": ["2:n2b"]}
    cache.apply(change("c", 60, {**V1, "id": 4, "name": "n4"}), change("u", 70, rows[3]))
    assert visible(lib) == {"feed": ["3:n3", "4:n4", "2:n2b"]}
    assert listed(lib, "feed") == 3


def test_list_pushed_to_outside_streamsync_is_restarted_consistently(lib: redis.Redis) -> None:
    cache = Cache(lib, "list")
    cache.apply(change("c", 10, V1), change("c", 20, {**V1, "id": 2, "name": "bob"}))
    lib.lpush("feed", "not ours")
    cache.apply(change("c", 30, {**V1, "id": 3, "name": "cy"}))
    assert visible(lib) == {"feed": ["3:cy"]}
    assert listed(lib, "feed") == 1
    cache.apply(change("u", 40, {**V1, "name": "annie"}), change("d", 50, {"id": 3}))
    assert visible(lib) == {"feed": ["1:annie"]}


def test_list_rule_with_json_values_selects_and_renames(lib: redis.Redis) -> None:
    rule = _rule(key="feed", type="list", value="json", fields=("id", "name"), rename={"name": "n"})
    cache = Cache(lib, rules=[rule])
    cache.apply(change("c", 10, V1))
    (entry,) = lib.lrange("feed", 0, -1)
    assert orjson.loads(entry) == {"id": 1, "n": "ann"}


# -- streams -------------------------------------------------------------------------------


def test_stream_publishes_one_entry_per_strictly_newer_change(lib: redis.Redis) -> None:
    rule = _rule(
        key="events", type="stream", fields=("id", "name", "plan"), rename={"name": "full_name"}
    )
    cache = Cache(lib, rules=[rule])
    c, u, d = change("c", 10, V1), change("u", 20, V2), change("d", 30, V1)
    assert cache.apply(c, u) == [APPLIED, APPLIED]
    assert cache.apply(c, u, change("u", 15, V2)) == [STALE] * 3
    assert cache.apply(d, d) == [APPLIED, STALE]
    assert visible(lib) == {
        "events": [
            {"op": "c", "table": TABLE, "position": c.position}
            | {"id": "1", "full_name": "ann", "plan": "free"},
            {"op": "u", "table": TABLE, "position": u.position}
            | {"id": "1", "full_name": "bob", "plan": "pro"},
            {"op": "d", "table": TABLE, "position": d.position, "id": "1"},
        ]
    }


def test_stream_out_of_order_older_change_is_not_published(lib: redis.Redis) -> None:
    cache = Cache(lib, "stream")
    newer = change("u", 20, V2)
    cache.apply(newer, change("c", 10, V1))
    assert visible(lib) == {"events": [stream_entry(newer)]}


def test_stream_row_outside_the_where_is_not_published(lib: redis.Redis) -> None:
    rule = _rule(key="events", type="stream", where="active = true")
    cache = Cache(lib, rules=[rule])
    hidden = change("c", 10, {**V1, "active": False})
    shown = change("u", 20, V1)
    assert cache.apply(hidden, shown, hidden) == [APPLIED, APPLIED, STALE]
    assert visible(lib) == {"events": [stream_entry(shown)]}


def test_stream_max_len_keeps_at_most_the_newest_entries(lib: redis.Redis) -> None:
    """README: max_len (list, stream) keeps *at most* this many entries, the newest."""
    rule = _rule(key="events", type="stream", max_len=5)
    cache = Cache(lib, rules=[rule])
    events = [change("u", lsn, {**V1, "name": f"v{lsn}"}) for lsn in range(1, 301)]
    for start in range(0, len(events), 50):
        cache.apply_batch(events[start : start + 50])
    assert visible(lib)["events"][-5:] == [stream_entry(e) for e in events[-5:]]
    assert lib.xlen("events") <= 5


# -- rename, fields, TTL ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hash", "json"])
def test_fields_and_rename_shape_hash_and_json_rows(lib: redis.Redis, kind: str) -> None:
    rule = _rule(
        key="u:{id}", type=kind, fields=("id", "name", "price"), rename={"name": "full_name"}
    )
    cache = Cache(lib, rules=[rule])
    cache.apply(change("c", 10, V1))
    want = {"id": 1, "full_name": "ann", "price": 10}
    if kind == "hash":
        assert visible(lib) == {"u:1": fields(want)}
    else:
        assert orjson.loads(lib.get("u:1") or b"") == want
    # a null selected column: no hash field, a JSON null
    cache.apply(change("u", 20, {**V1, "price": None}))
    if kind == "hash":
        assert visible(lib) == {"u:1": {"id": "1", "full_name": "ann"}}
    else:
        assert orjson.loads(lib.get("u:1") or b"") == {"id": 1, "full_name": "ann", "price": None}


@pytest.mark.parametrize("kind", ["set", "zset", "list", "hash_by_email"])
def test_ttl_on_collections_and_their_records(lib: redis.Redis, kind: str) -> None:
    base = RULES[kind]
    rule = base.model_copy(update={"ttl_s": 100})
    cache = Cache(lib, rules=[rule])
    cache.apply(change("c", 10, V1))
    (key,) = visible(lib)
    assert 99_000 < lib.pttl(key) <= 100_000
    # the row's record (a moving row's key has one too, which lives as long)
    (record,) = (r for r in records(lib, cache.records_table(rule)).values() if r.kind)
    assert record.expires is not None
    now = as_int(lib.time()[0])
    # the record outlives the row by the tombstone window
    assert now + 100 + TOMBSTONE_S - 1 <= record.expires <= now + 100 + TOMBSTONE_S
    if kind == "list":
        assert 99_000 < lib.pttl(cache.planner.keys.order("feed")) <= 100_000
    # a later change refreshes the TTL
    lib.pexpire(key, 5_000)
    cache.apply(change("u", 20, {**V1, "name": "b"}))
    assert 99_000 < lib.pttl(next(iter(visible(lib)))) <= 100_000


# -- TRUNCATE ------------------------------------------------------------------------------

ROW = {i: {**V1, "id": i, "name": f"n{i}", "email": f"U{i}@X.io"} for i in range(1, 6)}


def test_truncate_removes_everything_every_rule_derived(lib: redis.Redis) -> None:
    cache = Cache(lib, *KINDS)
    before = [
        change("c", 10, ROW[1]),
        change("c", 11, ROW[2]),
        change("c", 12, ROW[3]),
        change("u", 20, {**ROW[1], "plan": "pro", "email": "Moved@X.io", "price": 3}),
        change("d", 30, ROW[2]),
    ]
    later = change("c", 60, ROW[4])  # after the truncate, but applied before it
    cache.apply(*before, later)
    assert cache.sweeper().truncate(TABLE, pos(50, "t")) > 0
    applied = [*before, later]
    streams = [stream_entry(e) for e in applied]
    truncate_entry = {"op": "t", "table": TABLE, "position": pos(50, "t")}
    want: dict[str, Any] = {"events": [*streams, truncate_entry]}
    for kind in SNAPSHOT_KINDS:
        want |= snapshot(kind, {4: ROW[4]})
    want |= {"feed": ["4:n4"], "feedr": ["4:n4"]}
    assert visible(lib) == want
    # the records say only the surviving row is cached
    for kind in KINDS:
        if kind == "stream":
            continue
        if kind in PK_KEYED:
            (key,) = snapshot(kind, {4: ROW[4]})
            assert (cache.key_index(kind), cache.placed_rows(kind)) == ({key}, set()), kind
        else:
            assert (cache.key_index(kind), cache.placed_rows(kind)) == (set(), {"4"}), kind
    assert not cache.dangling()
    # a replay of everything from before the truncate brings nothing back
    n_rules = len(KINDS)
    assert cache.apply(*before) == [STALE] * (len(before) * n_rules)
    assert visible(lib) == want
    # a newer row goes in as usual
    newer = change("c", 70, ROW[5])
    cache.apply(newer)
    assert visible(lib)["user:5"] == fields(ROW[5])


def test_truncate_twice_and_a_second_sweeper_run_are_harmless(lib: redis.Redis) -> None:
    cache = Cache(lib, *KINDS)
    cache.apply(change("c", 10, ROW[1]))
    sweeper = cache.sweeper()
    sweeper.truncate(TABLE, pos(50, "t"))
    state = visible(lib)
    assert sweeper.remove_older(TABLE, pos(50, "t")) == 0
    # the same TRUNCATE delivered again publishes nothing more
    sweeper.truncate(TABLE, pos(50, "t"))
    assert visible(lib) == state
    assert len(state["events"]) == 2


def test_truncate_removes_list_entries_of_rows_deleted_under_on_delete_ignore(
    lib: redis.Redis,
) -> None:
    """An on_delete=ignore list keeps a deleted row's entry; a TRUNCATE must still remove it:
    every entry the rule placed before the TRUNCATE goes (the sweep removes the entries of the
    live rows whatever on_delete says)."""
    rule = _rule(key="feed", type="list", value="{id}:{name}", on_delete="ignore")
    cache = Cache(lib, rules=[rule])
    cache.apply(change("c", 10, ROW[1]), change("c", 20, ROW[2]), change("d", 30, ROW[1]))
    assert visible(lib) == {"feed": ["2:n2", "1:n1"]}
    cache.sweeper().truncate(TABLE, pos(50, "t"))
    assert visible(lib) == {}


@pytest.mark.parametrize("kind", ["hash", "set", "list", "string_by_email"])
def test_truncate_finds_every_row_while_another_worker_splits_the_table(
    lib: redis.Redis, kind: str
) -> None:
    """A split moves records into a new last bucket, and refuses rows addressed before it:
    the sweep walks the buckets added meanwhile, and sends refused rows again."""
    rows = {i: {**V1, "id": i, "email": f"u{i}@x.io"} for i in range(300)}
    cache = Cache(lib, kind)
    cache.apply_batch(change("c", 10 + i, row) for i, row in rows.items())
    rule = RULES[kind]
    # another worker, with its own view of the tables, has split the table once already
    other = Cache(lib, kind)
    table = other.records_table(rule) if kind in MOVING else other.planner.tables.table(rule)
    assert Library(lib).split(table)

    class Meanwhile(Sweeper):
        def _fields(self, swept: Table) -> Iterator[list[bytes]]:
            for n, fields in enumerate(Sweeper._fields(self, swept)):
                if n == 0 and swept.name == table.name:
                    # after bucket 0 is read: bucket 0 goes into bucket 2, bucket 1 into 3
                    assert Library(lib).split(table) and Library(lib).split(table)
                yield fields

    Meanwhile(lib, cache.planner, TOMBSTONE_S).truncate(TABLE, pos(5000, "t"))
    assert visible(lib) == {}
    assert cache.apply(change("u", 20, rows[1])) == [STALE]


def test_truncate_with_a_stream_rule_keyed_by_a_column(lib: redis.Redis) -> None:
    """A stream rule may name a column in its key (the configuration accepts it): a TRUNCATE of
    its table must still apply, not fail on rendering that key without a row."""
    stream = _rule(key="events:{plan}", type="stream")
    cache = Cache(lib, rules=[RULES["hash"], stream])
    cache.apply(change("c", 10, ROW[1]))
    cache.sweeper().truncate(TABLE, pos(50, "t"))
    assert "user:1" not in visible(lib)


# -- resync epochs -------------------------------------------------------------------------

EPOCH_KINDS = [*SNAPSHOT_KINDS, "list_replace"]


def test_epoch_positions_overwrite_newer_epoch0_positions(lib: redis.Redis) -> None:
    cache = Cache(lib, *EPOCH_KINDS)
    cache.apply(change("c", 1000, ROW[1]), change("c", 1001, ROW[2]))
    # the restored database restarts at a lower LSN: plain positions would be stale
    rewritten = {**ROW[1], "name": "re", "email": "Re@X.io", "plan": "team", "price": 4}
    assert set(cache.apply(change("r", 5, rewritten))) == {STALE}
    prefix = epoch_prefix(1)
    assert cache.apply(change("r", 5, rewritten), epoch=prefix) == [APPLIED] * len(EPOCH_KINDS)
    want: dict[str, Any] = {"feedr": ["2:n2", "1:re"]}
    for kind in SNAPSHOT_KINDS:
        want |= snapshot(kind, {1: rewritten, 2: ROW[2]})
    assert visible(lib) == want
    # an epoch-0 change, however new, is older than any epoch-1 one
    assert set(cache.apply(change("u", 9999, ROW[1]))) == {STALE}


def test_remove_older_than_the_epoch_floor_sweeps_rows_not_rewritten(lib: redis.Redis) -> None:
    cache = Cache(lib, *EPOCH_KINDS)
    cache.apply(change("c", 1000, ROW[1]), change("c", 1001, ROW[2]), change("c", 1002, ROW[3]))
    prefix = epoch_prefix(1)
    rewritten = {**ROW[1], "name": "re", "email": "Re@X.io"}
    cache.apply(change("r", 5, rewritten), change("r", 6, ROW[3]), epoch=prefix)
    assert cache.sweeper().remove_older(TABLE, epoch_floor(1)) > 0
    want: dict[str, Any] = {"feedr": ["3:n3", "1:re"]}
    for kind in SNAPSHOT_KINDS:
        want |= snapshot(kind, {1: rewritten, 3: ROW[3]})
    assert visible(lib) == want
    for kind in EPOCH_KINDS:
        if kind in PK_KEYED:
            assert cache.key_index(kind) == set(snapshot(kind, {1: ROW[1], 3: ROW[3]})), kind
        else:
            assert cache.placed_rows(kind) == {"1", "3"}, kind
    assert not cache.dangling()
    # a late epoch-0 change of the removed row stays out; an epoch-1 one gets in
    assert set(cache.apply(change("u", 2000, ROW[2]))) == {STALE}
    assert visible(lib) == want
    assert set(cache.apply(change("u", 7, ROW[2]), epoch=prefix)) == {APPLIED}
    assert visible(lib)["user:2"] == fields(ROW[2])


def test_epoch_floor_orders_between_epochs() -> None:
    highest = streamed(MAX_LSN, MAX_LSN, RANK_WRITE)
    assert highest < epoch_floor(1) < epoch_prefix(1) + NO_POSITION
    assert epoch_prefix(1) + highest < epoch_floor(2) < epoch_prefix(2) + NO_POSITION


# -- validation ----------------------------------------------------------------------------


def test_non_numeric_zset_score_is_poison() -> None:
    planner = Planner({TABLE: (RULES["zset"],)}, StateKeys())
    with pytest.raises(PoisonEntryError, match="not numeric"):
        planner.plan(change("c", 10, {**V1, "price": "abc"}))


def test_where_naming_an_absent_column_is_poison() -> None:
    rule = _rule(key="s", type="set", member="{id}", where="missing = 1")
    planner = Planner({TABLE: (rule,)}, StateKeys())
    with pytest.raises(PoisonEntryError, match="missing"):
        planner.plan(change("c", 10, V1))


@pytest.mark.parametrize("kind", ["set", "zset", "list", "list_replace", "stream"])
def test_rule_needing_a_primary_key_refuses_a_table_without_one(kind: str) -> None:
    planner = Planner({TABLE: (RULES[kind],)}, StateKeys())
    event = change("c", 10, V1)
    event.key = None
    with pytest.raises(PoisonEntryError, match="primary key"):
        planner.plan(event)


def test_hash_rule_accepts_a_table_without_primary_key(
    lib: redis.Redis,
) -> None:
    cache = Cache(lib, "hash")
    event = change("c", 10, V1)
    event.key = None
    assert cache.apply(event) == [APPLIED]
    assert visible(lib) == snapshot("hash", {1: V1})


# -- property: any delivery order builds what the final table builds -----------------------

PROPERTY_RULES = [
    RULES["set"],
    RULES["zset"],
    RULES["hash"],
    RULES["string_by_email"],
    RULES["hash_by_email"],
    # keyed by another unique non-key column, with selected and renamed members
    _rule(key="uid:{uid}", type="json", fields=("id", "uid", "name"), rename={"name": "n"}),
    RULES["list_replace"],
]
#: Unique columns' values (distinct once lowered); more than rows can be live at once.
EMAILS = ["ann@x.io", "Bob@X.io", "CY@x.io", "dee@X.IO", "eve@x.io", "Fay@x.io", "gus@x.io"]
UIDS = [101, 102, 103, 104, 105, 106, 107]
IDS = range(1, 7)


def property_snapshot(rows: dict[int, dict[str, Any]]) -> dict[str, Any]:
    want: dict[str, Any] = {}
    for kind in ("set", "zset", "hash", "string_by_email", "hash_by_email"):
        want |= snapshot(kind, rows)
    for ident, row in rows.items():
        want[f"uid:{row['uid']}"] = orjson.dumps(
            {"id": ident, "uid": row["uid"], "n": row["name"]}
        ).decode()
    values = sorted(f"{ident}:{row['name']}" for ident, row in rows.items())
    if values:
        want["feedr"] = values
    return want


@st.composite
def histories(draw: st.DrawFn) -> list[ChangeEvent]:
    """Valid change histories of rows 1-6, one LSN per transaction step: a row is created
    before it is updated or deleted, may come back after a delete, and may change its primary
    key (a delete and a create at one LSN). Email and uid are unique among live rows at every
    step (a row may take a value another row gave up), as a UNIQUE constraint keeps them."""
    live: dict[int, dict[str, Any]] = {}
    events = []
    for step in range(draw(st.integers(1, 16))):
        lsn = 10 * (step + 1)
        ident = draw(st.sampled_from(IDS))
        if ident not in live:
            op = "c"
        else:
            op = draw(st.sampled_from(["u", "u", "d", "k"] if len(live) < len(IDS) else ["u"]))
        if op == "d":
            events.append(change("d", lsn, live.pop(ident)))
            continue
        others = [row for i, row in live.items() if i != ident]
        row = {
            "id": ident,
            "name": draw(st.sampled_from(["ann", "bob", "cy", "dé"])),
            "plan": draw(st.sampled_from(["free", "pro", "team"])),
            "price": draw(st.one_of(st.none(), st.integers(0, 100))),
            "active": draw(st.sampled_from([True, False, None])),
            "email": draw(
                st.sampled_from([e for e in EMAILS if e not in {o["email"] for o in others}])
            ),
            "uid": draw(st.sampled_from([u for u in UIDS if u not in {o["uid"] for o in others}])),
        }
        if op == "k":
            new_id = draw(st.sampled_from([i for i in IDS if i not in live]))
            events.append(change("d", lsn, live.pop(ident)))
            row["id"] = new_id
            events.append(change("c", lsn, row))
            live[new_id] = row
        else:
            events.append(change(op, lsn, row))
            live[ident] = row
    return events


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(history=histories(), data=st.data())
def test_any_delivery_order_builds_what_the_final_table_builds(
    r: redis.Redis, history: list[ChangeEvent], data: st.DataObject
) -> None:
    r.flushdb()
    ensure_library(r)
    cache = Cache(r, rules=PROPERTY_RULES)
    duplicates = data.draw(st.lists(st.sampled_from(history), max_size=6))
    delivery = data.draw(st.permutations(history + duplicates))
    batched = data.draw(st.booleans())
    if batched:
        cache.apply_batch(delivery)
    else:
        cache.apply(*delivery)
    got = visible(r)
    if "feedr" in got:
        got["feedr"] = sorted(got["feedr"])
    rows = final_rows(history)
    assert got == property_snapshot(rows)
    assert not cache.dangling()
    assert cache.key_index("hash") == {f"user:{i}" for i in rows}
    for kind in ("set", "string_by_email", "hash_by_email"):
        assert cache.placed_rows(kind) == {str(i) for i in rows}, kind
    placed = {
        str(i) for i, row in rows.items() if row["active"] is True and row["price"] is not None
    }
    assert cache.placed_rows("zset") == placed
    # replaying the whole history again changes nothing
    assert set(cache.apply(*history)) == {STALE}
    got_again = visible(r)
    if "feedr" in got_again:
        got_again["feedr"] = sorted(got_again["feedr"])
    assert got_again == got
