"""Children inside their parent's document (``nest``): ``order:<id>`` is the order row plus
``items``, a map from item id to the item. With the foreign key in place (ON DELETE CASCADE),
any delivery order, replays and two workers end with every document a fresh query builds, and
no document for a deleted order. JSON text and RedisJSON documents, on a real redis-server
loading RedisJSON."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamsync.config import parse_settings
from streamsync.errors import ConfigError
from streamsync.events import ChangeEvent
from streamsync.functions import Library, RowStatus
from streamsync.keys import StateKeys
from streamsync.mapping import Planner
from streamsync.positions import epoch_floor, epoch_prefix, streamed
from streamsync.sweep import Sweeper

ORDERS, ITEMS = "public.orders", "public.order_items"
TOMBSTONE_S = 3600
ENCODINGS = ["text", "redisjson"]


def rules(encoding: str) -> list[dict[str, Any]]:
    return [
        {"table": ORDERS, "key": "order:{id}", "type": "json", "encoding": encoding},
        {
            "table": ITEMS,
            "type": "json",
            "nest": {"parent_key": "order:{order_id}", "path": "items", "member": "{id}"},
            "fields": ["id", "sku", "qty"],
        },
    ]


def planner(encoding: str) -> Planner:
    s = parse_settings({"source": {"streams": ["s"]}, "rules": rules(encoding)})
    return Planner(s.rules_by_table, StateKeys.from_settings(s.worker), redisjson=True)


@pytest.fixture
def lib(rj: redis.Redis) -> Iterator[Library]:
    library = Library(rj)
    library.ensure()
    yield library


def order(op: str, oid: int, lsn: int, status: str = "new") -> ChangeEvent:
    return _event(op, ORDERS, {"id": oid}, {"id": oid, "status": status}, lsn)


def item(op: str, iid: int, oid: int, lsn: int, qty: int = 1) -> ChangeEvent:
    row = {"id": iid, "order_id": oid, "sku": f"s{iid}", "qty": qty, "note": "not nested"}
    return _event(op, ITEMS, {"id": iid}, row, lsn)


def _event(op: str, table: str, key: dict[str, Any], row: dict[str, Any], lsn: int) -> ChangeEvent:
    position = streamed(lsn, lsn, "0" if op == "d" else "1")
    after = None if op == "d" else row
    before = key if op == "d" else None
    return ChangeEvent(op, table, position, None, after, before, key)


def apply(lib: Library, p: Planner, *events: ChangeEvent) -> list[RowStatus | str]:
    rows = [row for event in events for row in p.plan(event)]
    return lib.changes(rows, TOMBSTONE_S).rows


def read(r: redis.Redis, key: str) -> Any:
    found = r.type(key)
    if found == b"none":
        return None
    text = r.execute_command("JSON.GET", key) if found == b"ReJSON-RL" else r.get(key)
    assert isinstance(text, bytes)
    return orjson.loads(text)


def expected(row: dict[str, Any] | None, items: dict[int, dict[str, Any]]) -> Any:
    """What a fresh query builds: the order row and, when it has items, ``items``: item id ->
    the item's selected columns; no document for an order that does not exist."""
    if row is None:
        return None
    doc = dict(row)
    if items:
        doc["items"] = {
            str(iid): {"id": iid, "sku": it["sku"], "qty": it["qty"]} for iid, it in items.items()
        }
    return doc


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_children_live_in_their_parents_document(
    rj: redis.Redis, lib: Library, encoding: str
) -> None:
    p = planner(encoding)
    assert (
        apply(lib, p, order("c", 7, 100), item("c", 1, 7, 110), item("c", 2, 7, 120))
        == [RowStatus.APPLIED] * 3
    )
    one, two = {"sku": "s1", "qty": 1}, {"sku": "s2", "qty": 1}
    assert read(rj, "order:7") == expected({"id": 7, "status": "new"}, {1: one, 2: two})
    # the order's write keeps items; an item's update changes only its entry
    assert (
        apply(lib, p, order("u", 7, 130, "paid"), item("u", 2, 7, 140, qty=5))
        == [RowStatus.APPLIED] * 2
    )
    two = {"sku": "s2", "qty": 5}
    assert read(rj, "order:7") == expected({"id": 7, "status": "paid"}, {1: one, 2: two})
    # an item moving to another order leaves this one (no before-image: its record says where)
    assert apply(lib, p, order("c", 8, 150), item("u", 1, 8, 160)) == [RowStatus.APPLIED] * 2
    assert read(rj, "order:7") == expected({"id": 7, "status": "paid"}, {2: two})
    assert read(rj, "order:8") == expected({"id": 8, "status": "new"}, {1: one})
    # replays at older positions change nothing
    assert apply(lib, p, item("c", 1, 7, 110), order("u", 7, 100)) == [RowStatus.STALE] * 2
    # the order's delete, then its items' (ON DELETE CASCADE): no document is left
    assert apply(lib, p, order("d", 7, 200), item("d", 2, 7, 201)) == [RowStatus.APPLIED] * 2
    assert read(rj, "order:7") is None
    # an item's change older than the delete never brings the document back
    assert apply(lib, p, item("u", 2, 7, 190, qty=9)) == [RowStatus.STALE]
    assert read(rj, "order:7") is None


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_child_before_its_parent_and_a_late_change_after_the_delete(
    rj: redis.Redis, lib: Library, encoding: str
) -> None:
    p = planner(encoding)
    assert apply(lib, p, item("c", 3, 9, 120)) == [RowStatus.APPLIED]
    # the document holds the child alone until the parent's row comes
    assert read(rj, "order:9") == {"items": {"3": {"id": 3, "sku": "s3", "qty": 1}}}
    assert apply(lib, p, order("c", 9, 100)) == [RowStatus.APPLIED]
    assert read(rj, "order:9") == expected({"id": 9, "status": "new"}, {3: {"sku": "s3", "qty": 1}})
    # the delete, a change of the item older than it, then the cascade's delete of the item
    assert apply(lib, p, order("d", 9, 300)) == [RowStatus.APPLIED]
    assert apply(lib, p, item("u", 3, 9, 200, qty=4)) == [RowStatus.APPLIED]
    assert apply(lib, p, item("d", 3, 9, 301)) == [RowStatus.APPLIED]
    assert read(rj, "order:9") is None


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_truncate_of_either_table(rj: redis.Redis, lib: Library, encoding: str) -> None:
    p = planner(encoding)
    for oid in range(5):
        apply(
            lib,
            p,
            order("c", oid, 100 + oid),
            *(item("c", 10 * oid + k, oid, 200) for k in range(3)),
        )
    Sweeper(rj, p, TOMBSTONE_S).truncate(ITEMS, streamed(1000, 1000, "0"))
    for oid in range(5):
        assert read(rj, f"order:{oid}") == {"id": oid, "status": "new"}
    Sweeper(rj, p, TOMBSTONE_S).truncate(ORDERS, streamed(1001, 1001, "0"))
    assert not list(rj.scan_iter(match="order:*"))


def test_unchanged_toast_columns_keep_the_cached_childs(rj: redis.Redis, lib: Library) -> None:
    p = planner("text")
    apply(lib, p, order("c", 1, 100), item("c", 5, 1, 110, qty=3))
    toast = item("u", 5, 1, 120)
    toast.unchanged = frozenset({"qty"})
    assert apply(lib, p, toast) == [RowStatus.APPLIED]
    assert read(rj, "order:1") == expected({"id": 1, "status": "new"}, {5: {"sku": "s5", "qty": 3}})


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        ({"type": "hash"}, r"rules\[1\]\.nest: has no meaning for type hash"),
        ({"ttl_s": 5}, r"rules\[1\]\.ttl_s: has no meaning with nest"),
        ({"key": "order:{id}"}, r"rules\[1\]\.key: must be nest\.parent_key"),
    ],
)
def test_a_nest_that_cannot_work_is_refused_at_load(changed: dict[str, Any], message: str) -> None:
    parent, child = rules("text")
    with pytest.raises(ConfigError, match=message):
        parse_settings({"source": {"streams": ["s"]}, "rules": [parent, {**child, **changed}]})


def test_a_hash_parent_is_refused_at_load() -> None:
    parent, child = rules("text")
    parent = {k: v for k, v in parent.items() if k != "encoding"} | {"type": "hash"}
    with pytest.raises(ConfigError, match=r"rules\[1\]\.nest: rules\[0\] owns keys .* not a json"):
        parse_settings({"source": {"streams": ["s"]}, "rules": [parent, child]})


# -- any delivery order ------------------------------------------------------------------------


@dataclass
class History:
    """Changes in commit order with the foreign key held: an item belongs to an order that
    exists; an order's delete cascades to its items, later in the transaction."""

    events: list[ChangeEvent] = field(default_factory=list)
    orders: dict[int, dict[str, Any] | None] = field(default_factory=dict)
    items: dict[int, dict[str, Any]] = field(default_factory=dict)


def history(steps: list[tuple[int, int, int]]) -> History:
    h = History()
    lsn = 100
    for n, (what, a, b) in enumerate(steps):
        lsn += 10
        alive = [oid for oid, row in h.orders.items() if row is not None]
        if what == 0 or not alive:
            oid = a % 4
            op = "c" if h.orders.get(oid) is None else "u"
            h.orders[oid] = {"id": oid, "status": f"s{n}"}
            h.events.append(order(op, oid, lsn, f"s{n}"))
        elif what == 1:
            oid = alive[a % len(alive)]
            h.orders[oid] = None
            h.events.append(order("d", oid, lsn))
            for k, (iid, it) in enumerate(sorted(h.items.items())):
                if it["order_id"] == oid:
                    del h.items[iid]
                    h.events.append(item("d", iid, oid, lsn + 1 + k))
        elif what == 2:
            # a new item, or an item updated (moved to another order, when b says so)
            iid = b % 6
            oid = alive[a % len(alive)]
            op = "u" if iid in h.items else "c"
            h.items[iid] = {"order_id": oid, "sku": f"s{iid}", "qty": n}
            h.events.append(item(op, iid, oid, lsn, qty=n))
        elif h.items:
            iid = sorted(h.items)[b % len(h.items)]
            oid = h.items.pop(iid)["order_id"]
            h.events.append(item("d", iid, oid, lsn))
    return h


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 7), st.integers(0, 7)), min_size=1, max_size=40
    ),
    seed=st.integers(0, 2**32 - 1),
    encoding=st.sampled_from(ENCODINGS),
)
def test_any_delivery_order_ends_as_a_fresh_query(
    rj: redis.Redis, lib: Library, steps: list[tuple[int, int, int]], seed: int, encoding: str
) -> None:
    rj.flushall()
    h = history(steps)
    rng = random.Random(seed)
    deliveries = h.events + rng.sample(h.events, len(h.events) // 3)
    rng.shuffle(deliveries)
    workers = (planner(encoding), planner(encoding))
    for event in deliveries:
        statuses = apply(lib, rng.choice(workers), event)
        assert not [s for s in statuses if isinstance(s, str)], statuses
    for oid in range(4):
        children = {
            iid: {"sku": it["sku"], "qty": it["qty"]}
            for iid, it in h.items.items()
            if it["order_id"] == oid
        }
        assert read(rj, f"order:{oid}") == expected(h.orders.get(oid), children)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_an_order_deleted_and_created_again_keeps_its_new_items(
    rj: redis.Redis, lib: Library, encoding: str
) -> None:
    p = planner(encoding)
    old = [order("c", 4, 100), item("c", 1, 4, 110), order("d", 4, 200), item("d", 1, 4, 201)]
    new = [order("c", 4, 300, "again"), item("c", 2, 4, 310)]
    # the new item first, then the old delete: it must not take the new item with it
    for event in (new[1], old[2], old[0], new[0], old[1], old[3]):
        apply(lib, p, event)
    assert read(rj, "order:4") == expected(
        {"id": 4, "status": "again"}, {2: {"sku": "s2", "qty": 1}}
    )


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_resync_finish_removes_the_items_the_new_snapshot_did_not_write(
    rj: redis.Redis, lib: Library, encoding: str
) -> None:
    p = planner(encoding)
    apply(lib, p, order("c", 1, 100), *(item("c", i, 1, 110 + i) for i in range(4)))
    # a re-snapshot in epoch 1 reads the order and items 0 and 2 (1 and 3 were deleted)
    events = [order("r", 1, 900), item("r", 0, 1, 900), item("r", 2, 1, 900)]
    lib.changes([row for e in events for row in p.plan(e, epoch_prefix(1))], TOMBSTONE_S)
    for table in (ORDERS, ITEMS):
        Sweeper(rj, p, TOMBSTONE_S).remove_older(table, epoch_floor(1))
    children = {i: {"sku": f"s{i}", "qty": 1} for i in (0, 2)}
    assert read(rj, "order:1") == expected({"id": 1, "status": "new"}, children)
