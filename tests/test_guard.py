"""Guarded rule tables (docs/bookkeeping.md, "When Redis evicts"): on a cache that may evict the
bookkeeping itself, a row whose record was evicted is never written with a change that could be
older than one already applied. Evictions are simulated by deleting buckets, as Redis would."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from streamsync.buckets import as_bytes, is_meta
from streamsync.config import parse_settings
from streamsync.events import ChangeEvent
from streamsync.functions import Library, RowStatus
from streamsync.keys import StateKeys
from streamsync.mapping import Planner
from streamsync.positions import streamed
from streamsync.sweep import Sweeper

TABLE = "public.users"
TOMBSTONE_S = 60


@pytest.fixture
def lib(r: redis.Redis) -> Iterator[Library]:
    library = Library(r)
    library.ensure()
    yield library


def planner() -> Planner:
    settings = parse_settings(
        {
            "source": {"streams": ["app.public.users"]},
            "rules": [{"table": TABLE, "key": "user:{id}", "type": "hash"}],
        }
    )
    return Planner(settings.rules_by_table, StateKeys.from_settings(settings.worker))


def change(row_id: int, name: str, lsn: int) -> ChangeEvent:
    row = {"id": row_id, "name": name}
    return ChangeEvent("u", TABLE, streamed(lsn, lsn, "1"), None, row, None, {"id": row_id})


def apply(lib: Library, p: Planner, *events: ChangeEvent) -> list[RowStatus | str]:
    rows = [row for event in events for row in p.plan(event)]
    return lib.changes(rows, TOMBSTONE_S).rows


def test_an_unguarded_table_takes_a_missing_record_for_a_new_row(
    r: redis.Redis, lib: Library
) -> None:
    p = planner()
    assert apply(lib, p, change(1, "b", 200)) == [RowStatus.APPLIED]
    (table,) = p.tables
    r.delete(table.meta)  # what an eviction would do
    # not guarded: a missing record is a new row, and an older change is written
    assert apply(lib, p, change(1, "a", 100)) == [RowStatus.APPLIED]
    assert r.hget("user:1", "name") == b"a"


def test_a_guarded_table_leaves_a_row_with_an_evicted_record_uncached(
    r: redis.Redis, lib: Library
) -> None:
    p = planner()
    assert apply(lib, p, change(1, "b", 200), change(2, "x", 201)) == [RowStatus.APPLIED] * 2
    (table,) = p.tables
    r.delete(table.meta)
    # the floor is unknown: nothing is done, the worker must name one
    table.guard = "?"
    assert apply(lib, p, change(1, "a", 100)) == [RowStatus.UNKNOWN]
    assert r.hget("user:1", "name") == b"b"
    # the floor (no older than anything applied): an older change, or an equal one, leaves
    # the row uncached: it might be older than what the evicted record held
    table.guard = streamed(201, 201, "1")
    assert apply(lib, p, change(1, "a", 100)) == [RowStatus.DROPPED]
    assert not r.exists("user:1")
    assert apply(lib, p, change(2, "y", 150)) == [RowStatus.DROPPED]
    assert not r.exists("user:2")
    # a change newer than the floor is applied, and recorded: an older one is then stale
    assert apply(lib, p, change(1, "c", 300)) == [RowStatus.APPLIED]
    assert apply(lib, p, change(1, "a", 250)) == [RowStatus.STALE]
    assert r.hget("user:1", "name") == b"c"
    assert r.hget(table.meta, "#l") == b"1"


def test_a_guarded_table_rebuilds_an_evicted_bucket_with_the_floor(
    r: redis.Redis, lib: Library
) -> None:
    p = planner()
    for n in range(0, 400, 100):
        assert set(apply(lib, p, *(change(i, "v1", 1000 + i) for i in range(n, n + 100)))) == {
            RowStatus.APPLIED
        }
    (table,) = p.tables
    while table.splits_due:
        assert lib.split(table)
    assert table.buckets > 1
    evicted = table.bucket(1)
    names = {as_bytes(f) for f in r.hkeys(evicted) if not is_meta(f)}
    assert names
    r.delete(evicted)
    table.guard = streamed(5000, 5000, "1")
    victim = int(sorted(names)[0])
    other = next(i for i in range(400) if str(i).encode() not in names)
    # a replay of an older change: of a row of the evicted bucket, uncached; of another row,
    # stale as usual
    assert apply(lib, p, change(victim, "old", 10), change(other, "old", 10)) == [
        RowStatus.DROPPED,
        RowStatus.STALE,
    ]
    assert not r.exists(f"user:{victim}")
    assert r.hget(f"user:{other}", "name") == b"v1"
    assert r.hget(evicted, "#f") == table.guard.encode()


def test_a_truncate_of_a_table_that_lost_records_finds_its_keys_by_name(
    r: redis.Redis, lib: Library
) -> None:
    p = planner()
    for n in range(0, 300, 100):
        apply(lib, p, *(change(i, "v1", 1000 + i) for i in range(n, n + 100)))
    (table,) = p.tables
    while table.splits_due:
        assert lib.split(table)
    lost = [f for f in r.hkeys(table.bucket(1)) if not is_meta(f)]
    r.delete(table.bucket(1))  # its rows keep their keys, and lose their records
    victim = int(as_bytes(lost[0]))
    table.guard = streamed(5000, 5000, "1")
    # a change of one of them finds its bucket gone: rebuilt, and the table marked lossy
    assert apply(lib, p, change(victim, "v2", 6000)) == [RowStatus.APPLIED]
    assert r.hget(table.meta, "#l") == b"1"
    Sweeper(r, p, TOMBSTONE_S).truncate(TABLE, streamed(7000, 7000, "0"))
    assert not list(r.scan_iter(match="user:*"))
