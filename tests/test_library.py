"""The Lua Functions library on a real redis-server: the contract of every row kind (position
checks, records in the rule's buckets and what they say, tombstones and TTLs, TOAST merges,
placements that move, lists, streams, moving keys), expiry and splits, trimming and versions."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot as redis_py_key_slot

from streamsync import positions
from streamsync.buckets import MOVING_KEY, MOVING_ROW, Table
from streamsync.config import Rule
from streamsync.epochs import epoch_prefix
from streamsync.errors import LibraryIncompatibleError
from streamsync.events import ChangeEvent
from streamsync.functions import (
    FN_RAISE_HWM,
    Library,
    ensure_library,
    hwm_reply,
    library_source,
    library_version,
    loaded_version,
    raise_hwm_command,
)
from streamsync.keys import StateKeys, guarded_key, key_slot
from streamsync.mapping import Planner
from streamsync.positions import RANK_REMOVE, RANK_WRITE, snapshot_read, streamed
from tests.debezium import PLACEHOLDER
from tests.records import Placement, Record, dangling, placement, records
from tests.replies import as_bytes, as_int, as_str, xadd, xrange

TABLE = "public.users"
TOMBSTONE_S = 60
APPLIED, STALE, SKIPPED, DROPPED = 1, 0, 2, 3
#: hash-max-listpack-value: a longer record would turn its bucket into a hashtable.
LISTPACK_VALUE = 64


def _rule(**kwargs: Any) -> Rule:
    return Rule.model_validate({"table": TABLE, **kwargs})


HASH_RULE = _rule(key="user:{id}", type="hash")
JSON_RULE = _rule(key="user:{id}", type="json")
SET_RULE = _rule(key="plan:{plan}:users", type="set", member="{id}")


@pytest.fixture
def lib(r: redis.Redis) -> redis.Redis:
    ensure_library(r)
    return r


def pos(lsn: int, op: str = "u") -> str:
    """The position of a change of ``lsn``, a transaction of its own."""
    return streamed(lsn, lsn, RANK_REMOVE if op == "d" else RANK_WRITE)


def change(op: str, lsn: int, row: dict[str, Any]) -> ChangeEvent:
    unchanged = frozenset(c for c, v in row.items() if v == PLACEHOLDER)
    return ChangeEvent(
        op=op,
        table=TABLE,
        position=pos(lsn, op),
        ts_ms=None,
        after=None if op == "d" else row,
        before=row if op == "d" else None,
        key={"id": row["id"]},
        unchanged=unchanged,
    )


class Cache:
    """Applies events through a Planner and the library, the way the worker does."""

    def __init__(self, r: redis.Redis, *rules: Rule, tombstone_s: int = TOMBSTONE_S) -> None:
        self.r = r
        self.planner = Planner({TABLE: rules}, StateKeys())
        self.library = Library(r)
        self.tombstone_s = tombstone_s

    def apply(self, *events: ChangeEvent) -> list[Any]:
        """One call per event; the statuses of every row."""
        statuses: list[Any] = []
        for event in events:
            statuses += self.library.changes(self.planner.plan(event), self.tombstone_s).rows
        return statuses

    def split(self, rule: Rule, buckets: int, *, moving: bool = False) -> Table:
        """Split the rule's table until it has ``buckets`` buckets."""
        table = self.planner.tables.moving(rule) if moving else self.planner.tables.table(rule)
        while table.buckets < buckets:
            assert self.library.split(table)
        return table

    def records(self, rule: Rule, *, moving: bool = False) -> dict[bytes, Record]:
        tables = self.planner.tables
        return records(self.r, tables.moving(rule) if moving else tables.table(rule))

    def record(self, rule: Rule, field: str, *, moving: bool = False) -> Record:
        return self.records(rule, moving=moving)[field.encode()]


def apply(r: redis.Redis, rule: Rule, *events: ChangeEvent) -> list[Any]:
    return Cache(r, rule).apply(*events)


def hash_of(r: redis.Redis, key: str) -> dict[str, str]:
    return {as_str(k): as_str(v) for k, v in r.hgetall(key).items()}


def now(r: redis.Redis) -> int:
    return as_int(r.time()[0])


def encodings(r: redis.Redis, table: Table) -> set[str]:
    buckets = int(r.hget(table.meta, "#n") or 1)
    return {as_str(r.object("encoding", table.bucket(b))) for b in range(buckets)}


# -- rows keyed by primary key: the record is the key's --------------------------------------


def test_hash_write_applies_only_newer_positions(lib: redis.Redis) -> None:
    v1 = {"id": 1, "name": "a", "plan": "free"}
    v2 = {"id": 1, "name": "b", "plan": None}
    cache = Cache(lib, HASH_RULE)
    assert cache.apply(change("c", 100, v1)) == [APPLIED]
    assert cache.apply(change("u", 200, v2)) == [APPLIED]
    # replay of both, and an older one: nothing changes
    assert cache.apply(change("c", 100, v1), change("u", 200, v2)) == [STALE, STALE]
    assert cache.apply(change("u", 150, {"id": 1, "name": "old"})) == [STALE]
    assert hash_of(lib, "user:1") == {"id": "1", "name": "b"}  # null column: no field
    # the record: field = the key without the rule's literal prefix, value = the position;
    # a live row's record never expires
    assert cache.record(HASH_RULE, "1") == Record(pos(200), None, None, b"")


def test_full_row_write_replaces_stale_fields(lib: redis.Redis) -> None:
    apply(lib, HASH_RULE, change("c", 1, {"id": 1, "gone": "x", "name": "a"}))
    apply(lib, HASH_RULE, change("u", 2, {"id": 1, "name": "b"}))
    assert hash_of(lib, "user:1") == {"id": "1", "name": "b"}


def test_delete_then_late_older_upsert_stays_deleted(lib: redis.Redis) -> None:
    cache = Cache(lib, HASH_RULE)
    cache.apply(change("c", 10, {"id": 7, "name": "a"}))
    assert cache.apply(change("d", 30, {"id": 7})) == [APPLIED]
    assert cache.apply(change("u", 20, {"id": 7, "name": "zombie"})) == [STALE]
    assert cache.apply(change("d", 30, {"id": 7})) == [STALE]
    assert not lib.exists("user:7")
    # a tombstone: it goes after the tombstone window
    tombstone = cache.record(HASH_RULE, "7")
    assert tombstone.position == pos(30, "d") and tombstone.expires is not None
    assert 0 < tombstone.expires - now(lib) <= TOMBSTONE_S
    # a re-insert after the delete is newer and applies
    assert cache.apply(change("c", 40, {"id": 7, "name": "new"})) == [APPLIED]
    assert hash_of(lib, "user:7") == {"id": "7", "name": "new"}
    assert cache.record(HASH_RULE, "7").expires is None


def test_positions_compare_beyond_double_precision(lib: redis.Redis) -> None:
    big = 2**53
    apply(lib, HASH_RULE, change("u", big + 2, {"id": 1, "v": "newer"}))
    # big + 1 and big + 2 are the same double: compared as numbers they would tie
    assert apply(lib, HASH_RULE, change("u", big + 1, {"id": 1, "v": "older"})) == [STALE]
    assert apply(lib, HASH_RULE, change("u", 2**64 - 1, {"id": 1, "v": "max"})) == [APPLIED]
    assert hash_of(lib, "user:1")["v"] == "max"


def test_json_write_and_replay(lib: redis.Redis) -> None:
    row = {"id": 1, "big": 2**63 - 1, "price": "10.50", "tags": ["a", "b"], "meta": None}
    assert apply(lib, JSON_RULE, change("c", 5, row)) == [APPLIED]
    assert apply(lib, JSON_RULE, change("c", 5, {"id": 1, "big": 0})) == [STALE]
    assert orjson.loads(lib.get("user:1") or b"") == row


def test_hash_toast_placeholder_keeps_the_cached_field(lib: redis.Redis) -> None:
    apply(lib, HASH_RULE, change("c", 1, {"id": 1, "bio": "long text", "name": "a", "x": "1"}))
    status = apply(
        lib, HASH_RULE, change("u", 2, {"id": 1, "bio": PLACEHOLDER, "name": "b", "x": None})
    )
    assert status == [APPLIED]
    assert hash_of(lib, "user:1") == {"id": "1", "bio": "long text", "name": "b"}
    assert PLACEHOLDER.encode() not in b"".join(map(as_bytes, lib.hvals("user:1")))


def test_hash_toast_update_of_an_uncached_row_caches_nothing(lib: redis.Redis) -> None:
    cache = Cache(lib, HASH_RULE)
    status = cache.apply(change("u", 2, {"id": 1, "bio": PLACEHOLDER, "name": "b"}))
    assert status == [SKIPPED]
    assert not lib.exists("user:1")
    # its position is remembered (like a tombstone): an older full row cannot fill it back
    assert cache.apply(change("u", 1, {"id": 1, "bio": "old", "name": "a"})) == [STALE]
    assert cache.record(HASH_RULE, "1").expires is not None


def test_hash_toast_update_of_an_incomplete_cached_row_drops_it(lib: redis.Redis) -> None:
    lib.hset("user:1", mapping={"id": "1", "name": "a"})  # cached without the TOAST column
    status = apply(lib, HASH_RULE, change("u", 2, {"id": 1, "bio": PLACEHOLDER, "name": "b"}))
    assert status == [DROPPED]
    assert not lib.exists("user:1")


def test_json_toast_placeholder_merges_the_cached_value(lib: redis.Redis) -> None:
    doc = {
        "id": 1,
        "bio": 'a "quoted" {text}, with [brackets]',
        "n": 2**62 + 1,
        "nested": {"a": [1, {"b": "}"}]},
        "name": "a",
    }
    apply(lib, JSON_RULE, change("c", 1, doc))
    update = {"id": 1, "bio": PLACEHOLDER, "n": 3, "nested": PLACEHOLDER, "name": "b"}
    assert apply(lib, JSON_RULE, change("u", 2, update)) == [APPLIED]
    assert orjson.loads(lib.get("user:1") or b"") == {**doc, "n": 3, "name": "b"}


def test_json_toast_update_of_an_uncached_row_caches_nothing(lib: redis.Redis) -> None:
    update = {"id": 1, "bio": PLACEHOLDER, "name": "b"}
    assert apply(lib, JSON_RULE, change("u", 2, update)) == [SKIPPED]
    assert not lib.exists("user:1")


def test_json_toast_update_of_a_document_lacking_the_column_drops_it(lib: redis.Redis) -> None:
    apply(lib, JSON_RULE, change("c", 1, {"id": 1, "name": "a"}))
    update = {"id": 1, "bio": PLACEHOLDER, "name": "b"}
    assert apply(lib, JSON_RULE, change("u", 2, update)) == [DROPPED]
    assert not lib.exists("user:1")


def test_ttl_safety_net(lib: redis.Redis) -> None:
    rule = _rule(key="user:{id}", type="hash", ttl_s=100)
    cache = Cache(lib, rule)
    cache.apply(change("c", 1, {"id": 1, "name": "a"}))
    assert 99_000 < lib.pttl("user:1") <= 100_000
    # the record outlives the key by the tombstone window
    expires = cache.record(rule, "1").expires
    assert expires is not None and 100 + TOMBSTONE_S - 1 <= expires - now(lib) <= 100 + TOMBSTONE_S
    json_rule = _rule(key="doc:{id}", type="json", ttl_s=50)
    apply(lib, json_rule, change("c", 1, {"id": 1}))
    assert 49_000 < lib.pttl("doc:1") <= 50_000


def test_invalidate_deletes_and_remembers(lib: redis.Redis) -> None:
    rule = _rule(key="user:{id}", mode="invalidate")
    lib.set("user:1", "cached by the application")
    assert apply(lib, rule, change("u", 5, {"id": 1})) == [APPLIED]
    assert not lib.exists("user:1")
    lib.set("user:1", "repopulated after the change")
    assert apply(lib, rule, change("u", 4, {"id": 1})) == [STALE]
    assert lib.get("user:1") == b"repopulated after the change"


def test_one_call_applies_many_rows_independently(lib: redis.Redis) -> None:
    cache = Cache(lib, SET_RULE)
    lib.set("plan:pro:users", "not a set")  # the row placed there fails: WRONGTYPE
    rows = [
        row
        for i, plan in enumerate(["free", "pro", "team"], 1)
        for row in cache.planner.plan(change("c", 10, {"id": i, "plan": plan}))
    ]
    reply = cache.library.changes(rows, TOMBSTONE_S).rows
    assert reply[0] == APPLIED and reply[2] == APPLIED
    assert isinstance(reply[1], str) and "WRONGTYPE" in reply[1]
    # the failed row left no record: sent again once the key is fixed, it applies
    assert set(cache.records(SET_RULE)) == {b"1", b"3"}
    lib.delete("plan:pro:users")
    assert cache.library.changes(rows[1:2], TOMBSTONE_S).rows == [APPLIED]


def test_an_unknown_row_kind_is_refused(lib: redis.Redis) -> None:
    cache = Cache(lib, SET_RULE)
    (row,) = cache.planner.plan(change("c", 10, {"id": 1, "plan": "free"}))
    row.args[0] = "?"
    with pytest.raises(redis.ResponseError, match="unexpected row kind"):
        cache.library.changes([row], TOMBSTONE_S)


# -- placements: sets and sorted sets ----------------------------------------------------------


def test_set_record_keeps_the_middles_of_its_key_and_member(lib: redis.Redis) -> None:
    cache = Cache(lib, SET_RULE)
    assert cache.apply(change("c", 10, {"id": 1, "plan": "free"})) == [APPLIED]
    # 'plan:{plan}:users' keeps 'free'; the member is the row identity: kept as the kind
    assert cache.record(SET_RULE, "1") == Record(pos(10), None, "T", b"free")
    assert cache.apply(change("u", 20, {"id": 1, "plan": "pro"})) == [APPLIED]
    assert lib.smembers("plan:pro:users") == {b"1"} and not lib.exists("plan:free:users")
    assert cache.record(SET_RULE, "1") == Record(pos(20), None, "T", b"pro")
    assert cache.apply(change("d", 30, {"id": 1})) == [APPLIED]
    assert not lib.exists("plan:pro:users")
    tombstone = cache.record(SET_RULE, "1")
    assert (tombstone.kind, tombstone.position) == (None, pos(30, "d"))
    assert tombstone.expires is not None


def test_a_member_other_than_the_row_is_kept_with_its_length(lib: redis.Redis) -> None:
    rule = _rule(key="by:{plan}", type="zset", member="m:{email}", score="price")
    cache = Cache(lib, rule)
    row = {"id": 1, "plan": "pro", "email": "a@b.io", "price": 3}
    assert cache.apply(change("c", 10, row)) == [APPLIED]
    record = cache.record(rule, "1")
    # 'Y': a sorted-set member named in the record, after the key's middle and its length
    assert (record.kind, record.data) == ("Y", b"3:proa@b.io")
    table = cache.planner.tables.table(rule)
    assert placement(table, b"1", record) == Placement("Z", "by:pro", "m:a@b.io")
    # the score changes in place; the member changes: the old one goes
    assert cache.apply(change("u", 20, {**row, "price": 4})) == [APPLIED]
    assert lib.zrange("by:pro", 0, -1, withscores=True) == [(b"m:a@b.io", 4.0)]
    assert cache.apply(change("u", 30, {**row, "email": "c@d.io"})) == [APPLIED]
    assert lib.zrange("by:pro", 0, -1, withscores=True) == [(b"m:c@d.io", 3.0)]


def test_a_row_identity_starting_with_hash_is_not_a_meta_field(lib: redis.Redis) -> None:
    rule = _rule(key="tags", type="set", member="{id}")
    cache = Cache(lib, rule)
    assert cache.apply(change("c", 10, {"id": "#n"})) == [APPLIED]
    assert lib.smembers("tags") == {b"#n"}
    # stored as '##n', the member named in full: '#n' is bucket 0's bucket count
    assert cache.record(rule, "##n").kind == "S"
    assert lib.hget(cache.planner.tables.table(rule).meta, "#n") is None
    assert cache.apply(change("d", 20, {"id": "#n"})) == [APPLIED]
    assert not lib.exists("tags")


def test_a_placement_too_long_for_a_bucket_overflows(lib: redis.Redis) -> None:
    rule = _rule(key="by:{plan}", type="set", member="{email}")
    cache = Cache(lib, rule)
    table = cache.planner.tables.table(rule)
    long_email = "x" * 60 + "@example.com"
    cache.apply(change("c", 10, {"id": 1, "plan": "pro", "email": "a@b.io"}))
    cache.apply(change("c", 11, {"id": 2, "plan": "pro", "email": long_email}))
    assert as_bytes(lib.hget(table.bucket(0), "2")).endswith(b"O")
    assert lib.hexists(table.overflow, "2") and not lib.hexists(table.overflow, "1")
    # every record stays short: the bucket stays a listpack
    assert encodings(lib, table) == {"listpack"}
    assert cache.record(rule, "2").data == b"3:pro" + long_email.encode()
    # the long member moves away: the overflow goes with it
    cache.apply(change("u", 20, {"id": 2, "plan": "pro", "email": "short@b.io"}))
    assert lib.smembers("by:pro") == {b"a@b.io", b"short@b.io"}
    assert not lib.exists(table.overflow)
    cache.apply(change("u", 30, {"id": 2, "plan": "team", "email": long_email}))
    cache.apply(change("d", 40, {"id": 2}))
    assert lib.smembers("by:pro") == {b"a@b.io"} and not lib.exists("by:team")
    assert not lib.exists(table.overflow)


# -- placements: lists -------------------------------------------------------------------------


LIST_RULE = _rule(key="feed:{plan}", type="list", value="{id}:{name}")


def test_list_order_record_parallels_the_list(lib: redis.Redis) -> None:
    cache = Cache(lib, LIST_RULE)
    for lsn, i in [(30, 3), (10, 1), (20, 2), (20, 10)]:
        cache.apply(change("c", lsn, {"id": i, "plan": "a", "name": f"n{i}"}))
    assert lib.lrange("feed:a", 0, -1) == [b"3:n3", b"10:n10", b"2:n2", b"1:n1"]
    # sort keys: the position, then the row (integers by value: length first)
    order = cache.planner.keys.order("feed:a")
    assert lib.lrange(order, 0, -1) == [
        f"{pos(30)}013".encode(),
        f"{pos(20)}0210".encode(),
        f"{pos(20)}012".encode(),
        f"{pos(10)}011".encode(),
    ]
    # the record: the list key's middle with its length; its entry is at the record's position
    assert cache.record(LIST_RULE, "3") == Record(pos(30), None, "L", b"1:a")
    assert not dangling(lib, cache.planner.tables.table(LIST_RULE))


def test_list_record_names_entries_of_older_positions(lib: redis.Redis) -> None:
    replace = _rule(key="feed", type="list", value="{id}:{name}", on_update="replace")
    cache = Cache(lib, replace)
    cache.apply(change("c", 10, {"id": 1, "name": "a"}), change("u", 20, {"id": 1, "name": "b"}))
    assert lib.lrange("feed", 0, -1) == [b"1:b"]
    # the entry keeps the place (and the sort key) of the position that first placed it
    assert cache.record(replace, "1") == Record(pos(20), None, "L", f"0:{pos(10)}".encode())
    cache.apply(change("d", 30, {"id": 1}))
    assert not lib.exists("feed")
    assert not lib.exists(cache.planner.keys.order("feed"))


def test_list_row_moving_to_another_list_leaves_the_first(lib: redis.Redis) -> None:
    cache = Cache(lib, LIST_RULE)
    cache.apply(change("c", 10, {"id": 1, "plan": "a", "name": "x"}))
    cache.apply(change("c", 11, {"id": 2, "plan": "a", "name": "y"}))
    cache.apply(change("u", 20, {"id": 1, "plan": "b", "name": "x"}))
    assert lib.lrange("feed:a", 0, -1) == [b"2:y"]
    assert lib.lrange("feed:b", 0, -1) == [b"1:x"]
    assert lib.llen(cache.planner.keys.order("feed:a")) == 1
    assert cache.record(LIST_RULE, "1").data == b"1:b"


def test_capped_list_reserve_refills_the_list(lib: redis.Redis) -> None:
    rule = _rule(key="feed", type="list", value="{id}", max_len=2)
    cache = Cache(lib, rule)
    for i in (4, 2, 3, 1, 5):
        cache.apply(change("c", 10 * i, {"id": i}))
    assert lib.lrange("feed", 0, -1) == [b"5", b"4"]
    reserve = cache.planner.keys.reserve("feed")
    # the reserve keeps max_len trimmed entries, newest first; row 1's entry was dropped
    assert lib.lrange(reserve, 0, -1) == [b"3", b"2"]
    assert lib.llen(cache.planner.keys.order("feed")) == 4
    cache.apply(change("d", 60, {"id": 5}), change("d", 61, {"id": 2}))
    assert lib.lrange("feed", 0, -1) == [b"4", b"3"]
    assert not lib.exists(reserve)
    # a deleted row whose entry was dropped from the reserve: nothing to remove
    assert cache.apply(change("d", 62, {"id": 1})) == [APPLIED]
    assert lib.lrange("feed", 0, -1) == [b"4", b"3"]


@pytest.mark.parametrize("later", [1, 3, 6, None])
def test_a_changed_max_len_keeps_list_and_reserve_in_order(
    lib: redis.Redis, later: int | None
) -> None:
    rule = _rule(key="feed", type="list", value="{id}", max_len=3)
    Cache(lib, rule).apply(*(change("c", 10 * i, {"id": i}) for i in range(1, 8)))
    assert lib.lrange("feed", 0, -1) == [b"7", b"6", b"5"]
    cache = Cache(lib, rule.model_copy(update={"max_len": later}))
    cache.apply(change("c", 35, {"id": 35}), change("c", 75, {"id": 75}))
    kept = [75, 7, 6, 5, 4, 35, 3, 2]  # row 1 was dropped from the reserve for good
    listed = len(kept) if later is None else later
    assert [int(v) for v in lib.lrange("feed", 0, -1)] == kept[:listed]
    reserve = cache.planner.keys.reserve("feed")
    assert [int(v) for v in lib.lrange(reserve, 0, -1)] == kept[listed : 2 * listed]
    order = cache.planner.keys.order("feed")
    assert lib.llen(order) == lib.llen("feed") + lib.llen(reserve)


#: Positions as streamsync.positions writes them: numbers of any length, their length first.
POSITIONS = st.one_of(
    st.builds(snapshot_read, st.integers(0, 2**64 - 1)),
    st.builds(
        streamed, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.sampled_from("01")
    ),
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 10**12), POSITIONS),
        min_size=1,
        max_size=12,
        unique_by=lambda r: r[0],
    )
)
def test_list_entries_sort_by_positions_of_any_length_then_rows(
    r: redis.Redis, rows: list[tuple[int, str]]
) -> None:
    """A sort key is the position, then the row: positions never are a prefix of one another,
    so positions of different lengths, and rows of different lengths at one position, sort as
    their numbers do."""
    r.flushdb()
    ensure_library(r)
    rule = _rule(key="feed", type="list", value="{id}")
    cache = Cache(r, rule)
    for ident, position in rows:
        event = change("c", 0, {"id": ident})
        event.position = position
        assert cache.apply(event) == [APPLIED]

    def parsed(position: str) -> tuple[int, ...]:
        # major, kind, minor, rank (streamsync.positions.encode)
        def number(at: int) -> tuple[int, int]:
            n = int(position[at : at + 2])
            return int(position[at + 2 : at + 2 + n] or 0), at + 2 + n

        major, at = number(0)
        minor, end = number(at + 1)
        return major, int(position[at]), minor, int(position[end])

    want = [ident for ident, _ in sorted(rows, key=lambda r: (parsed(r[1]), r[0]), reverse=True)]
    assert [int(v) for v in r.lrange("feed", 0, -1)] == want


def test_list_entry_far_below_the_head_finds_its_place(lib: redis.Redis) -> None:
    rule = _rule(key="feed", type="list", value="{id}")
    cache = Cache(lib, rule)
    rows = list(range(2, 400, 2))
    for i in rows:
        cache.apply(change("c", i, {"id": i}))
    for late in (1, 3, 199, 397, 399):
        cache.apply(change("c", late, {"id": late}))
    want = sorted([*rows, 1, 3, 199, 397, 399], reverse=True)
    assert [int(v) for v in lib.lrange("feed", 0, -1)] == want


# -- placements: streams and removals ---------------------------------------------------------


def test_stream_record_is_a_tombstone_that_refuses_replays(lib: redis.Redis) -> None:
    rule = _rule(key="events", type="stream")
    cache = Cache(lib, rule)
    assert cache.apply(change("c", 10, {"id": 1}), change("c", 10, {"id": 1})) == [APPLIED, STALE]
    assert lib.xlen("events") == 1
    record = cache.record(rule, "1")
    assert (record.position, record.kind) == (pos(10), None)
    assert record.expires is not None and record.expires - now(lib) <= TOMBSTONE_S


# -- moving keys ---------------------------------------------------------------------------------

EMAIL_RULE = _rule(key="email:{email}", type="string", value="{id}")


def test_moving_row_keeps_its_record_and_its_keys(lib: redis.Redis) -> None:
    cache = Cache(lib, EMAIL_RULE)
    cache.apply(change("c", 10, {"id": 1, "email": "a@x.io"}))
    held = cache.records(EMAIL_RULE, moving=True)
    assert held == {
        MOVING_ROW.encode() + b"1": Record(pos(10), None, "M", b"a@x.io"),
        MOVING_KEY.encode() + b"a@x.io": Record(pos(10), None, None, b""),
    }
    # the rule's own table (keyed by primary key) holds nothing
    assert cache.records(EMAIL_RULE) == {}
    cache.apply(change("u", 20, {"id": 1, "email": "b@x.io"}))
    assert lib.get("email:b@x.io") == b"1" and not lib.exists("email:a@x.io")
    left = cache.record(EMAIL_RULE, MOVING_KEY + "a@x.io", moving=True)
    # the key left keeps the position of the row that held it
    assert (left.position, left.expires is not None) == (pos(10), True)


def test_moving_rows_find_the_keys_they_left_in_a_split_table(lib: redis.Redis) -> None:
    """The worker cannot address the record of a key a row held before: the library finds its
    bucket itself (crc32 and linear hashing, as streamsync.buckets), in any bucket count."""
    cache = Cache(lib, EMAIL_RULE)
    n = 150
    cache.apply(*(change("c", 10 + i, {"id": i, "email": f"e{i}@x.io"}) for i in range(n)))
    for buckets in (3, 5, 8):
        table = cache.split(EMAIL_RULE, buckets, moving=True)
        lsn = 1000 * buckets
        # each row takes the email the row before it gave up (a unique value changing hands),
        # then its own back, before the row holding it leaves it
        cache.apply(change("u", lsn, {"id": 0, "email": f"gone{buckets}@x.io"}))
        for i in range(1, n):
            cache.apply(change("u", lsn + i, {"id": i, "email": f"e{i - 1}@x.io"}))
        for i in range(n):
            cache.apply(change("u", lsn + n + i, {"id": i, "email": f"e{i}@x.io"}))
        assert {as_str(k): as_str(lib.get(k)) for k in lib.keys("email:*")} == {
            f"email:e{i}@x.io": str(i) for i in range(n)
        }
        fields = [f for b in range(buckets) for f in lib.hkeys(table.bucket(b)) if f != b"#"]
        # one record per key: none was written to a bucket that does not hold it
        assert len(fields) == len(set(fields))
        assert not dangling(lib, table)


# -- expiry and splits -------------------------------------------------------------------------


def test_expire_removes_past_records_and_their_overflow_never_meta_fields(lib: redis.Redis) -> None:
    rule = _rule(key="by:{plan}", type="set", member="{email}", ttl_s=1)
    table = Cache(lib, rule).planner.tables.table(rule)
    # a negative tombstone window: every record written is already past
    past = Cache(lib, rule, tombstone_s=-10)
    long_email = "y" * 70
    past.apply(change("c", 10, {"id": 1, "plan": "a", "email": long_email}))
    past.apply(change("c", 11, {"id": 2, "plan": "a", "email": "b@x"}), change("d", 12, {"id": 2}))
    live = Cache(lib, _rule(key="by:{plan}", type="set", member="{email}"))
    live.apply(change("c", 13, {"id": 3, "plan": "a", "email": "c@x"}))
    assert lib.hexists(table.overflow, "1")
    assert lib.hget(table.meta, "#c") == b"3"
    assert past.library.expire(table, [0]) == 2
    assert set(records(lib, table)) == {b"3"}
    assert not lib.exists(table.overflow)
    assert lib.hget(table.meta, "#c") == b"1"


def test_split_keeps_every_placement_where_it_can_be_found(lib: redis.Redis) -> None:
    cache = Cache(lib, SET_RULE)
    cache.apply(*(change("c", 10 + i, {"id": i, "plan": f"p{i % 7}"}) for i in range(300)))
    table = cache.split(SET_RULE, 6)
    assert encodings(lib, table) == {"listpack"}
    cache.apply(*(change("u", 1000 + i, {"id": i, "plan": "moved"}) for i in range(300)))
    assert lib.scard("plan:moved:users") == 300
    assert lib.keys("plan:p*") == []
    assert len(records(lib, table)) == 300


def test_record_values_fit_a_listpack(lib: redis.Redis) -> None:
    rules = [
        SET_RULE,
        _rule(key="prices", type="zset", member="product:{id}", score="price"),
        _rule(key="feed:{plan}", type="list", value="{id}", on_update="replace", ttl_s=5),
        EMAIL_RULE,
    ]
    cache = Cache(lib, *rules)
    row = {"id": 123456, "plan": "enterprise", "price": 3, "email": "someone@example.com"}
    cache.apply(change("c", 2**63, row), change("u", 2**64 - 1, {**row, "price": 4}))
    for table in cache.planner.tables:
        for value in lib.hvals(table.bucket(0)):
            assert len(as_bytes(value)) <= LISTPACK_VALUE, (table.name, value)
        assert encodings(lib, table) <= {"listpack"}


@given(st.text(max_size=30))
def test_guarded_key_shares_the_target_slot(target: str) -> None:
    key = guarded_key("streamsync:pos:", target)
    assert key != target
    assert key_slot(key.encode()) == key_slot(target.encode())
    assert redis_py_key_slot(key.encode()) == redis_py_key_slot(target.encode())


@pytest.mark.parametrize("target", ["user:1", "{t1}:user:1", "a}b", "{}x", "x{y", "}{a}", ""])
def test_guarded_key_examples(target: str) -> None:
    key = guarded_key("p:", target)
    assert redis_py_key_slot(key.encode()) == redis_py_key_slot(target.encode())


def test_version_is_read_only_and_matches_the_package(lib: redis.Redis) -> None:
    assert loaded_version(lib) == library_version()
    assert lib.fcall_ro("streamsync_version", 0).decode() == ".".join(map(str, library_version()))


def _load_as(r: redis.Redis, version: str) -> None:
    major, minor, patch = library_version()
    source = library_source().replace(
        f"local VERSION = '{major}.{minor}.{patch}'", f"local VERSION = '{version}'"
    )
    r.function_load(source, replace=True)


def test_newer_compatible_library_is_kept(r: redis.Redis) -> None:
    major, minor, _ = library_version()
    _load_as(r, f"{major}.{minor + 1}.0")
    assert ensure_library(r) == (major, minor + 1, 0)
    assert loaded_version(r) == (major, minor + 1, 0)


def test_newer_incompatible_library_is_refused(r: redis.Redis) -> None:
    major, _, _ = library_version()
    _load_as(r, f"{major + 1}.0.0")
    with pytest.raises(LibraryIncompatibleError, match="upgrade streamsync"):
        ensure_library(r)
    assert loaded_version(r) == (major + 1, 0, 0)


def test_older_library_is_replaced(r: redis.Redis) -> None:
    _load_as(r, "0.0.1")
    assert ensure_library(r) == library_version()
    assert loaded_version(r) == library_version()


def test_trim_removes_only_entries_every_group_acked(lib: redis.Redis) -> None:
    ids = [lib.xadd("s", {"n": str(i)}) for i in range(10)]
    assert lib.fcall("streamsync_trim", 1, "s") == 0  # no group: never trim
    lib.xgroup_create("s", "g1", id="0")
    lib.xgroup_create("s", "g2", id="0")
    lib.xreadgroup("g1", "c", {"s": ">"}, count=10)
    lib.xack("s", "g1", *ids)
    lib.xreadgroup("g2", "c", {"s": ">"}, count=6)
    lib.xack("s", "g2", *ids[:3], ids[4])  # ids[3] and ids[5] pending in g2
    lib.fcall("streamsync_trim", 1, "s")
    remaining = [i for i, _ in xrange(lib, "s")]
    assert remaining[0] == ids[3]
    assert remaining == ids[3:]
    lib.xack("s", "g2", ids[3], ids[5])
    lib.fcall("streamsync_trim", 1, "s")
    # g2 last read ids[5]; ids[6:] were never delivered to it
    assert [i for i, _ in xrange(lib, "s")] == ids[5:]


#: Entry ids whose order differs from their order as strings: in the sequence part (1-9 < 1-12),
#: and in the milliseconds part (9-0 < 10-0).
SEQ_IDS = [f"1-{n}" for n in range(1, 16)]
MS_IDS = [f"{n}-0" for n in range(1, 16)]


def _hold(r: redis.Redis, group: str, ids: list[str], bound: str, how: str) -> None:
    """Make ``bound`` the trim bound of ``group``: its oldest pending entry (``pending``), or
    the last entry it read, every read entry acknowledged (``last-delivered``)."""
    r.xgroup_create("s", group, id="0")
    upto = ids.index(bound)
    if how == "pending":
        r.xreadgroup(group, "c", {"s": ">"}, count=len(ids))
        if upto:
            r.xack("s", group, *ids[:upto])
    else:
        r.xreadgroup(group, "c", {"s": ">"}, count=upto + 1)
        r.xack("s", group, *ids[: upto + 1])


#: (ids, low, high): ``high`` is the newer id, but sorts before ``low`` as a string.
ID_ORDER_CASES = [(SEQ_IDS, "1-9", "1-12"), (MS_IDS, "9-0", "10-0")]


@pytest.mark.parametrize("case", ID_ORDER_CASES, ids=["seq", "ms"])
@pytest.mark.parametrize("lagging", ["a", "b"])
@pytest.mark.parametrize("how", ["pending", "last-delivered"])
def test_trim_compares_entry_ids_as_numbers_not_strings(
    lib: redis.Redis, case: tuple[list[str], str, str], lagging: str, how: str
) -> None:
    """Group ``lagging`` (first or second in XINFO GROUPS) holds the lower bound ``low``; the
    other group is ahead, at ``high``, which sorts before ``low`` as a string."""
    ids, low, high = case
    for entry_id in ids:
        xadd(lib, "s", {"n": entry_id}, entry_id=entry_id)
    for group in ("a", "b"):
        _hold(lib, group, ids, low if group == lagging else high, how)
    removed = as_int(lib.fcall("streamsync_trim", 1, "s"))
    remaining = [entry_id.decode() for entry_id, _ in xrange(lib, "s")]
    # nothing from the lagging group's bound on is removed; everything before it is
    assert remaining == ids[ids.index(low) :]
    assert removed == ids.index(low)


def test_prune_consumer_keeps_one_with_pending_entries(lib: redis.Redis) -> None:
    lib.xadd("s", {"n": "1"})
    lib.xgroup_create("s", "g", id="0")
    lib.xreadgroup("g", "busy", {"s": ">"}, count=1)
    lib.xgroup_createconsumer("s", "g", "idle")
    assert lib.fcall("streamsync_prune_consumer", 1, "s", "g", "busy", 0) == 0
    assert lib.fcall("streamsync_prune_consumer", 1, "s", "g", "idle", 10**9) == 0
    assert lib.fcall("streamsync_prune_consumer", 1, "s", "g", "idle", 0) == 1
    assert [c["name"] for c in lib.xinfo_consumers("s", "g")] == [b"busy"]


def test_full_hash_write_keeps_shape_and_drops_vanished_fields(lib: redis.Redis) -> None:
    apply(lib, HASH_RULE, change("c", 1, {"id": 1, "a": "x", "b": "y"}))
    # same fields: a plain HSET; the key was lost meanwhile (evicted): the row comes back whole
    lib.delete("user:1")
    apply(lib, HASH_RULE, change("u", 2, {"id": 1, "a": "x2", "b": "y2"}))
    assert hash_of(lib, "user:1") == {"id": "1", "a": "x2", "b": "y2"}
    # a column became null, another was dropped from the table: neither lingers
    apply(lib, HASH_RULE, change("u", 3, {"id": 1, "a": None}))
    assert hash_of(lib, "user:1") == {"id": "1"}


# -- the per-rule high-water marks (streamsync_raise_hwm) ----------------------------------------

HWM = StateKeys("streamsync:pos:").hwm


def test_raise_hwm_raises_only_upwards_and_replies_the_marks(lib: redis.Redis) -> None:
    library = Library(lib)
    low, mid, high = (positions.streamed(100, n, positions.RANK_WRITE) for n in (101, 150, 199))
    first = library.raise_hwm(HWM, [("users", mid), ("plans", low)])
    assert first.after == {"users": mid, "plans": low}
    assert first.first == {"users", "plans"}  # no batch was sent for them before
    # a lower position leaves a mark where it is; a higher one raises it
    again = library.raise_hwm(HWM, [("users", low), ("plans", high)])
    assert again.after == {"users": mid, "plans": high} and not again.first
    assert lib.hgetall(HWM) == {b"users": mid.encode(), b"plans": high.encode()}
    # a rule named twice in one call ends at the higher of the two, whatever their order
    twice = library.raise_hwm(HWM, [("orders", high), ("orders", low)])
    assert twice.after == {"orders": high} and twice.first == {"orders"}
    # a resync epoch compares newer than any position before it
    later = epoch_prefix(1) + positions.snapshot_read(5)
    assert library.raise_hwm(HWM, [("users", later)]).after == {"users": later}
    assert library.raise_hwm(HWM, []).after == {}


def test_raise_hwm_refuses_what_is_not_pairs_of_positions(lib: redis.Redis) -> None:
    with pytest.raises(redis.ResponseError, match="rule, position pairs"):
        lib.fcall(FN_RAISE_HWM, 1, HWM, "users")
    with pytest.raises(redis.ResponseError, match="empty position for users"):
        lib.fcall(FN_RAISE_HWM, 1, HWM, "users", "")
    assert not lib.exists(HWM)


def test_raise_hwm_command_is_the_round_trip_form(lib: redis.Redis) -> None:
    marks = [("users", positions.snapshot_read(7))]
    command = raise_hwm_command(HWM, marks)
    assert hwm_reply(marks, lib.execute_command(*command)).after == dict(marks)


_POSITION = st.builds(
    lambda epoch, major, kind, minor, rank: (
        epoch_prefix(epoch) + positions.encode(major, kind, minor, rank)
    ),
    st.integers(0, 2),
    st.integers(0, 2**64 - 1),
    st.sampled_from(
        [
            positions.KIND_SNAPSHOT,
            positions.KIND_AFTER_SNAPSHOT,
            positions.KIND_STREAMED,
            positions.KIND_STREAMED_ON,
        ]
    ),
    st.none() | st.integers(0, 2**64 - 1),
    st.sampled_from([positions.RANK_REMOVE, positions.RANK_WRITE]),
)


# the fixture's server is shared by the examples: each starts by deleting the marks
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
@given(
    calls=st.lists(
        st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), _POSITION), max_size=6), max_size=5
    )
)
def test_a_mark_is_the_newest_position_ever_raised_to(
    lib: redis.Redis, calls: list[list[tuple[str, str]]]
) -> None:
    lib.delete(HWM)
    library = Library(lib)
    newest: dict[str, str] = {}
    for marks in calls:
        replied = library.raise_hwm(HWM, marks)
        for rule, position in marks:
            newest[rule] = max(newest.get(rule, position), position)
        # every reply holds the mark after the call: the newest position so far
        assert replied.after == {rule: newest[rule] for rule, _ in marks}
    stored = {as_str(k): as_str(v) for k, v in lib.hgetall(HWM).items()}
    assert stored == newest


def test_snapshot_marks_keep_the_first_read_of_each_snapshot_in_stream_order(
    lib: redis.Redis,
) -> None:
    def mark(lsn: int, entry_id: str) -> list[list[str]]:
        reply = lib.fcall("streamsync_mark_snapshot", 1, "snaps", "s", str(lsn), entry_id)
        value = as_bytes(lib.hget("snaps", "s"))
        assert as_bytes(reply) == value
        marks: list[list[str]] = orjson.loads(value)
        return marks

    assert mark(700, "10-5") == [["700", "10-5"]]
    # a later read of the same snapshot: nothing to change; an earlier one moves the mark back
    assert mark(700, "11-0") == [["700", "10-5"]]
    assert mark(700, "9-0") == [["700", "9-0"]]
    # a newer snapshot; ids compare as numbers ("100-0" after "9-0")
    assert mark(900, "100-0") == [["700", "9-0"], ["900", "100-0"]]
    assert mark(900, "20-0") == [["700", "9-0"], ["900", "20-0"]]
    # LSNs beyond a double's precision stay exact; a lower LSN after a resync is a new mark
    big = str(2**64 - 1)
    assert mark(2**64 - 1, "200-0")[-1] == [big, "200-0"]
    assert mark(5, "300-0")[-2:] == [[big, "200-0"], ["5", "300-0"]]
    # the marks of other streams are apart
    lib.fcall("streamsync_mark_snapshot", 1, "snaps", "other", "1", "1-0")
    assert len(orjson.loads(as_bytes(lib.hget("snaps", "s")))) == 4
