"""The Lua Functions library on a real redis-server: position checks, tombstones, TOAST merges,
TTLs, trimming and version handling."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot as redis_py_key_slot

from streamsync import positions
from streamsync.config import Rule
from streamsync.epochs import epoch_prefix
from streamsync.errors import LibraryIncompatibleError
from streamsync.events import ChangeEvent
from streamsync.functions import (
    FN_BATCH,
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
from streamsync.positions import RANK_REMOVE, RANK_WRITE, streamed
from tests.debezium import PLACEHOLDER
from tests.replies import as_bytes, as_int, as_str, xadd, xrange

TOMBSTONE_MS = 60_000
APPLIED, STALE, SKIPPED, DROPPED = 1, 0, 2, 3

HASH_RULE = Rule.model_validate({"table": "public.users", "key": "user:{id}", "type": "hash"})
JSON_RULE = Rule.model_validate({"table": "public.users", "key": "user:{id}", "type": "json"})


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
        table="public.users",
        position=pos(lsn, op),
        ts_ms=None,
        after=None if op == "d" else row,
        before=row if op == "d" else None,
        key={"id": row["id"]},
        unchanged=unchanged,
    )


def apply(r: redis.Redis, rule: Rule, *events: ChangeEvent) -> list[Any]:
    """Apply events the way the worker does: one batch call per function, rows in order."""
    planner = Planner({"public.users": (rule,)}, StateKeys("streamsync:pos:"))
    statuses: list[Any] = []
    for event in events:
        for row in planner.plan(event):
            reply = r.fcall(FN_BATCH, len(row.keys), *row.keys, TOMBSTONE_MS, *row.args)
            statuses.extend(reply)
    return statuses


def hash_of(r: redis.Redis, key: str) -> dict[str, str]:
    return {as_str(k): as_str(v) for k, v in r.hgetall(key).items()}


def test_hash_write_applies_only_newer_positions(lib: redis.Redis) -> None:
    v1 = {"id": 1, "name": "a", "plan": "free"}
    v2 = {"id": 1, "name": "b", "plan": None}
    assert apply(lib, HASH_RULE, change("c", 100, v1)) == [APPLIED]
    assert apply(lib, HASH_RULE, change("u", 200, v2)) == [APPLIED]
    # replay of both, and an older one: nothing changes
    assert apply(lib, HASH_RULE, change("c", 100, v1), change("u", 200, v2)) == [STALE, STALE]
    assert apply(lib, HASH_RULE, change("u", 150, {"id": 1, "name": "old"})) == [STALE]
    assert hash_of(lib, "user:1") == {"id": "1", "name": "b"}  # null column: no field
    # the position, then the shape of the field set written
    assert as_bytes(lib.get("streamsync:pos:{user:1}")).split(b"|")[0] == pos(200).encode()
    assert lib.pttl("streamsync:pos:{user:1}") == -1  # a live row's position never expires


def test_full_row_write_replaces_stale_fields(lib: redis.Redis) -> None:
    apply(lib, HASH_RULE, change("c", 1, {"id": 1, "gone": "x", "name": "a"}))
    apply(lib, HASH_RULE, change("u", 2, {"id": 1, "name": "b"}))
    assert hash_of(lib, "user:1") == {"id": "1", "name": "b"}


def test_delete_then_late_older_upsert_stays_deleted(lib: redis.Redis) -> None:
    apply(lib, HASH_RULE, change("c", 10, {"id": 7, "name": "a"}))
    assert apply(lib, HASH_RULE, change("d", 30, {"id": 7})) == [APPLIED]
    assert apply(lib, HASH_RULE, change("u", 20, {"id": 7, "name": "zombie"})) == [STALE]
    assert apply(lib, HASH_RULE, change("d", 30, {"id": 7})) == [STALE]
    assert not lib.exists("user:7")
    ttl = lib.pttl("streamsync:pos:{user:7}")
    assert 0 < ttl <= TOMBSTONE_MS
    # a re-insert after the delete is newer and applies
    assert apply(lib, HASH_RULE, change("c", 40, {"id": 7, "name": "new"})) == [APPLIED]
    assert hash_of(lib, "user:7") == {"id": "7", "name": "new"}
    assert lib.pttl("streamsync:pos:{user:7}") == -1


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
    status = apply(lib, HASH_RULE, change("u", 2, {"id": 1, "bio": PLACEHOLDER, "name": "b"}))
    assert status == [SKIPPED]
    assert not lib.exists("user:1")
    # its position is remembered (like a tombstone): an older full row cannot fill it back
    assert apply(lib, HASH_RULE, change("u", 1, {"id": 1, "bio": "old", "name": "a"})) == [STALE]
    assert 0 < lib.pttl("streamsync:pos:{user:1}") <= TOMBSTONE_MS


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
    rule = Rule.model_validate(
        {"table": "public.users", "key": "user:{id}", "type": "hash", "ttl_s": 100}
    )
    apply(lib, rule, change("c", 1, {"id": 1, "name": "a"}))
    assert 99_000 < lib.pttl("user:1") <= 100_000
    # the position outlives the key by the tombstone window
    assert lib.pttl("streamsync:pos:{user:1}") > 100_000 + TOMBSTONE_MS - 1_000
    json_rule = Rule.model_validate(
        {"table": "public.users", "key": "doc:{id}", "type": "json", "ttl_s": 50}
    )
    apply(lib, json_rule, change("c", 1, {"id": 1}))
    assert 49_000 < lib.pttl("doc:1") <= 50_000


def test_invalidate_deletes_and_remembers(lib: redis.Redis) -> None:
    rule = Rule.model_validate({"table": "public.users", "key": "user:{id}", "mode": "invalidate"})
    lib.set("user:1", "cached by the application")
    assert apply(lib, rule, change("u", 5, {"id": 1})) == [APPLIED]
    assert not lib.exists("user:1")
    lib.set("user:1", "repopulated after the change")
    assert apply(lib, rule, change("u", 4, {"id": 1})) == [STALE]
    assert lib.get("user:1") == b"repopulated after the change"


def test_one_call_applies_many_rows_independently(lib: redis.Redis) -> None:
    prefix = "streamsync:pos:"
    lib.hset("streamsync:pos:{user:2}", "x", "y")  # a broken position record: WRONGTYPE
    reply = lib.fcall(
        "streamsync_delete",
        6,
        "user:1",
        prefix + "{user:1}",
        "user:2",
        prefix + "{user:2}",
        "user:3",
        prefix + "{user:3}",
        TOMBSTONE_MS,
        *["D", pos(1, "d")] * 3,
    )
    assert reply[0] == APPLIED and reply[2] == APPLIED
    assert isinstance(reply[1], bytes) and b"WRONGTYPE" in reply[1]


@given(st.text(max_size=30))
def test_position_key_shares_the_target_slot(target: str) -> None:
    key = guarded_key("streamsync:pos:", target)
    assert key != target
    assert key_slot(key.encode()) == key_slot(target.encode())
    assert redis_py_key_slot(key.encode()) == redis_py_key_slot(target.encode())


@pytest.mark.parametrize("target", ["user:1", "{t1}:user:1", "a}b", "{}x", "x{y", "}{a}", ""])
def test_position_key_examples(target: str) -> None:
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


def test_per_operation_functions_accept_only_their_rows(lib: redis.Redis) -> None:
    first = pos(1)
    args = ("user:1", "streamsync:pos:{user:1}", TOMBSTONE_MS)
    assert lib.fcall("streamsync_invalidate", 2, *args, "I", first) == [APPLIED]
    for function, row in [
        ("streamsync_write_hash", ["J", first, "0", "{}"]),
        ("streamsync_write_json", ["D", first]),
        ("streamsync_delete", ["I", first]),
        ("streamsync_invalidate", ["H", first, "0", "s", "0"]),
    ]:
        with pytest.raises(redis.ResponseError, match="unexpected row kind"):
            lib.fcall(function, 2, *args, *row)
    assert lib.fcall("streamsync_write_json", 2, *args, "J", pos(2), "0", "{}") == [APPLIED]
    assert lib.fcall("streamsync_delete", 2, *args, "D", pos(3, "d")) == [APPLIED]


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
        [positions.KIND_SNAPSHOT, positions.KIND_AFTER_SNAPSHOT, positions.KIND_STREAMED]
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
