"""Cache-aside fills that cannot go stale: the lease protocol (``streamsync_lease_get``,
``streamsync_lease_fill``) and ``streamsync.cache_aside.CacheAside``, against a real Redis, and
the race it closes reproduced with a real PostgreSQL change, the real Debezium engine and a
worker between a reader's database read and its fill."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from streamsync.cache_aside import CacheAside
from streamsync.config import parse_settings
from streamsync.events import ChangeEvent
from streamsync.functions import Library, RowStatus
from streamsync.keys import StateKeys
from streamsync.mapping import Planner
from streamsync.positions import streamed
from tests.e2e import MakePipeline, Pipeline, entries_added, needs_engine
from tests.servers import wait_until

PREFIX = "streamsync:"


@pytest.fixture
def lib(r: redis.Redis) -> Iterator[Library]:
    library = Library(r)
    library.ensure()
    yield library


def invalidate(lib: Library, key_id: int, lsn: int) -> list[RowStatus | str]:
    """What a worker does for a change of row ``key_id`` under an invalidate rule."""
    settings = parse_settings(
        {
            "source": {"streams": ["s"]},
            "rules": [{"table": "public.items", "key": "item:{id}", "mode": "invalidate"}],
        }
    )
    planner = Planner(settings.rules_by_table, StateKeys.from_settings(settings.worker))
    row = {"id": key_id, "name": "x"}
    event = ChangeEvent("u", "public.items", streamed(lsn, lsn, "1"), None, row, None, {"id": 1})
    return lib.changes(planner.plan(event), 60).rows


def test_a_miss_takes_a_lease_others_wait_and_the_fill_is_read(
    r: redis.Redis, lib: Library
) -> None:
    lease = lib.lease_get("item:1", PREFIX, 5_000)
    assert lease.token is not None and lease.value is None
    # a second reader finds the lease held
    waiting = lib.lease_get("item:1", PREFIX, 5_000)
    assert waiting.token is None and 0 < waiting.wait_ms <= 5_000
    assert lib.lease_fill("item:1", PREFIX, lease.token, b"v1", 60_000)
    assert lib.lease_get("item:1", PREFIX, 5_000).value == b"v1"
    assert 0 < r.pttl("item:1") <= 60_000
    # a token is good once
    assert not lib.lease_fill("item:1", PREFIX, lease.token, b"v0")
    assert r.get("item:1") == b"v1"


def test_an_invalidation_voids_the_lease(r: redis.Redis, lib: Library) -> None:
    lease = lib.lease_get("item:2", PREFIX, 5_000)
    assert lease.token is not None
    # the row changes, and streamsync deletes the key: the value read before is refused
    assert invalidate(lib, 2, 100) == [RowStatus.APPLIED]
    assert not lib.lease_fill("item:2", PREFIX, lease.token, b"read before the change")
    assert not r.exists("item:2")
    # the next reader takes a new lease, and its fill (read after the change) is written
    fresh = lib.lease_get("item:2", PREFIX, 5_000)
    assert fresh.token is not None and fresh.token != lease.token
    assert lib.lease_fill("item:2", PREFIX, fresh.token, b"read after")
    assert r.get("item:2") == b"read after"


def test_an_expired_lease_fills_nothing(r: redis.Redis, lib: Library) -> None:
    lease = lib.lease_get("item:3", PREFIX, 50)
    assert lease.token is not None
    wait_until(lambda: lib.lease_get("item:3", PREFIX, 5_000).token is not None, timeout=5)
    assert not lib.lease_fill("item:3", PREFIX, lease.token, b"late")
    assert not r.exists("item:3")


def test_a_lease_given_up_lets_the_next_reader_take_one(lib: Library) -> None:
    lease = lib.lease_get("item:4", PREFIX, 5_000)
    assert lease.token is not None
    assert lib.lease_fill("item:4", PREFIX, lease.token, None)
    assert lib.lease_get("item:4", PREFIX, 5_000).token is not None


def test_leases_live_in_their_keys_hash_slot(r: redis.Redis, lib: Library) -> None:
    assert lib.lease_get("{t1}:item:5", PREFIX, 5_000).token is not None
    assert r.exists(PREFIX + "{t1}:item:5")
    assert lib.lease_get("item:6", PREFIX, 5_000).token is not None
    assert r.exists(PREFIX + "{item:6}")
    with pytest.raises(redis.ResponseError, match="no hash tag"):
        lib.lease_get("odd{}key", PREFIX, 5_000)


def test_the_helper_loads_once_for_concurrent_readers(r: redis.Redis, lib: Library) -> None:
    cache = CacheAside(r, lease_ms=5_000, wait_s=5.0)
    loads: list[int] = []
    release = threading.Event()

    def load() -> bytes:
        loads.append(1)
        release.wait(5)
        return b"loaded"

    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get("item:7", load))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    wait_until(lambda: len(loads) == 1, timeout=5, message="the first reader to load")
    release.set()
    for t in threads:
        t.join(10)
    # the first reader loaded and filled; the others waited for its fill
    assert loads == [1] and results == [b"loaded"] * 8
    # a row that does not exist is not cached, and the lease is given up
    assert cache.get("item:8", lambda: None) is None
    assert not r.exists("item:8")
    assert cache.get("item:8", lambda: b"now") == b"now"


# -- the race, with a real database change between the read and the fill ----------------------

DDL = "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)"
RULES = [{"table": "public.items", "key": "item:{id}", "mode": "invalidate"}]


def read_row(p: Pipeline, item_id: int) -> bytes | None:
    rows = p.sql("SELECT name FROM items WHERE id = %s", (item_id,))
    return rows[0][0].encode() if rows else None


def change_and_wait(p: Pipeline, item_id: int, name: str, workers: Any) -> None:
    """Commit a change of the row, and wait until the worker applied its invalidation."""
    before = entries_added(p.r, p.setup.stream)
    p.sql("UPDATE items SET name = %s WHERE id = %s", (name, item_id))
    wait_until(
        lambda: entries_added(p.r, p.setup.stream) > before, timeout=60, message="the change"
    )
    p.settle(*workers)


@needs_engine
@pytest.mark.timeout(180)
def test_the_race_is_stale_without_leases_and_closed_with_them(pipelines: MakePipeline) -> None:
    p = pipelines(tables=["items"], rules=RULES)
    p.sql(DDL)
    p.sql("INSERT INTO items VALUES (1, 'v1'), (2, 'v1')")
    worker = p.start_worker("w1")
    capture = p.start_capture()
    p.wait_for_added(capture, 2)
    p.settle(worker)

    # without the protocol: miss, read v1, the row changes to v2 and the key is invalidated,
    # then the value read before is written: the cache holds v1 for good
    assert p.r.get("item:1") is None
    stale = read_row(p, 1)
    change_and_wait(p, 1, "v2", [worker])
    assert stale is not None
    p.r.set("item:1", stale)
    assert p.r.get("item:1") == b"v1" and read_row(p, 1) == b"v2"

    # with it: the same interleaving, through the helper's load
    cache = CacheAside(p.r)

    def load_then_the_row_changes() -> bytes | None:
        value = read_row(p, 2)
        change_and_wait(p, 2, "v2", [worker])
        return value

    assert cache.get("item:2", load_then_the_row_changes) == b"v1"  # what it read
    assert p.r.get("item:2") is None  # but not cached
    assert cache.get("item:2", lambda: read_row(p, 2)) == b"v2"
    assert p.r.get("item:2") == b"v2"
    assert capture.stop() == 0, capture.log()


@needs_engine
@pytest.mark.timeout(240)
def test_many_readers_and_writers_never_leave_a_stale_value(pipelines: MakePipeline) -> None:
    p = pipelines(tables=["items"], rules=RULES)
    p.sql(DDL)
    p.sql("INSERT INTO items SELECT g, 'v0' FROM generate_series(1, 5) g")
    workers = (p.start_worker("w1"), p.start_worker("w2"))
    capture = p.start_capture()
    p.wait_for_added(capture, 5)
    cache = CacheAside(p.r, wait_s=0.2)
    stop = threading.Event()
    failures: list[BaseException] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with p.pg.connect(p.dbname) as conn:
                while not stop.is_set():
                    item_id = rng.randint(1, 5)

                    def load(item_id: int = item_id) -> bytes:
                        found = conn.execute("SELECT name FROM items WHERE id = %s", (item_id,))
                        (name,) = found.fetchone() or ("",)
                        # a slow reader: changes commit, and are invalidated, meanwhile
                        time.sleep(rng.random() * 0.3)
                        return str(name).encode()

                    cache.get(f"item:{item_id}", load)
        except BaseException as exc:  # reported by the test
            failures.append(exc)

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with p.pg.connect(p.dbname) as conn:
                for n in range(150):
                    conn.execute(
                        "UPDATE items SET name = %s WHERE id = %s",
                        (f"v{seed}-{n}", rng.randint(1, 5)),
                    )
                    conn.commit()
                    time.sleep(rng.random() * 0.02)
        except BaseException as exc:
            failures.append(exc)

    readers = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
    writers = [threading.Thread(target=writer, args=(100 + i,)) for i in range(2)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join(120)
    p.sql("INSERT INTO items VALUES (1000, 'marker')")
    wait_until(
        lambda: entries_added(p.r, p.setup.stream) >= 5 + 300 + 1, timeout=90, message="changes"
    )
    p.settle(*workers)
    stop.set()
    for t in readers:
        t.join(30)
    assert not failures, failures
    # every value still cached is the row's current one
    for item_id in range(1, 6):
        cached = p.r.get(f"item:{item_id}")
        assert cached is None or cached == read_row(p, item_id), item_id
    assert capture.stop() == 0, capture.log()
