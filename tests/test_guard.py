"""Guarded rule tables (docs/bookkeeping.md, "When Redis evicts"): on a cache that may evict the
bookkeeping itself, a row whose record was evicted is never written with a change that could be
older than one already applied. Evictions are simulated by deleting buckets, as Redis would."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from streamsync.buckets import Table, as_bytes, is_meta
from streamsync.config import parse_settings
from streamsync.events import ChangeEvent
from streamsync.functions import Library, RowStatus
from streamsync.keys import StateKeys
from streamsync.mapping import Planner
from streamsync.positions import streamed
from streamsync.sweep import Sweeper
from streamsync.worker.guard import ASK, REBUILD

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


def apply(
    lib: Library, p: Planner, *events: ChangeEvent, guard: str | None = None
) -> list[RowStatus | str]:
    rows = [row for event in events for row in p.plan(event)]
    if guard is not None:
        for table in p.tables:
            table.guard = guard
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


def rebuild(table: Table, floor: str) -> str:
    """The guard of a retry after bucket 0 was found gone (what ``Guards.floors`` sends)."""
    return f"{table.pending}{REBUILD}{floor}"


def filled(lib: Library, p: Planner, rows: int = 400) -> Table:
    """``rows`` rows at positions 1000 + id, the table split to its size."""
    for n in range(0, rows, 100):
        assert set(apply(lib, p, *(change(i, "v1", 1000 + i) for i in range(n, n + 100)))) == {
            RowStatus.APPLIED
        }
    (table,) = p.tables
    while table.splits_due:
        assert lib.split(table)
    assert table.buckets > 1
    return table


def held_by(r: redis.Redis, bucket: str) -> list[int]:
    return sorted(int(f) for f in r.hkeys(bucket) if not is_meta(f))


def test_a_guarded_table_whose_bucket_0_is_gone_waits_for_a_floor_read_after(
    r: redis.Redis, lib: Library
) -> None:
    p = planner()
    assert apply(lib, p, change(1, "b", 200), change(2, "x", 201)) == [RowStatus.APPLIED] * 2
    (table,) = p.tables
    r.delete(table.meta)
    # the floor is unknown: nothing is done, and the rebuild waits for a token
    table.guard = ASK
    assert apply(lib, p, change(1, "a", 100)) == [RowStatus.UNKNOWN]
    assert table.pending and r.hget(table.meta, "#p") == table.pending.encode()
    assert r.hget("user:1", "name") == b"b"
    # a floor that comes without the token rebuilds nothing
    table.guard = f"other{REBUILD}{streamed(201, 201, '1')}"
    assert apply(lib, p, change(1, "a", 100)) == [RowStatus.UNKNOWN]
    # the floor (no older than anything applied): an older change, or an equal one, leaves
    # the row uncached: it might be older than what the evicted record held
    table.guard = rebuild(table, streamed(201, 201, "1"))
    assert apply(lib, p, change(1, "a", 100)) == [RowStatus.DROPPED]
    assert not r.exists("user:1") and not r.hexists(table.meta, "#p")
    table.guard = ASK
    assert apply(lib, p, change(2, "y", 150)) == [RowStatus.DROPPED]
    assert not r.exists("user:2")
    # a change newer than the floor is applied, and recorded: an older one is then stale
    assert apply(lib, p, change(1, "c", 300)) == [RowStatus.APPLIED]
    assert apply(lib, p, change(1, "a", 250)) == [RowStatus.STALE]
    assert r.hget("user:1", "name") == b"c"
    assert r.hget(table.meta, "#l") == b"1"


def test_a_floor_read_before_bucket_0_went_again_rebuilds_nothing(
    r: redis.Redis, lib: Library
) -> None:
    first, second = planner(), planner()
    assert apply(lib, first, change(1, "a", 100)) == [RowStatus.APPLIED]
    (one,) = first.tables
    r.delete(one.meta)
    one.guard = ASK
    assert apply(lib, first, change(1, "b", 200)) == [RowStatus.UNKNOWN]
    # the second worker finds bucket 0 gone too, and reads its floor (200) now
    assert apply(lib, second, change(1, "b", 200), guard=ASK) == [RowStatus.UNKNOWN]
    (two,) = second.tables
    late = rebuild(two, streamed(200, 200, "1"))
    # the first worker rebuilds with its floor, applies a newer change, and bucket 0 goes again
    one.guard = rebuild(one, streamed(200, 200, "1"))
    assert apply(lib, first, change(1, "c", 300)) == [RowStatus.APPLIED]
    r.delete(one.meta)
    # the second worker's floor is older than that change: it must not rebuild bucket 0
    two.guard = late
    assert apply(lib, second, change(1, "b2", 250)) == [RowStatus.UNKNOWN]
    assert r.hget("user:1", "name") == b"c"
    two.guard = rebuild(two, streamed(300, 300, "1"))
    assert apply(lib, second, change(1, "b2", 250)) == [RowStatus.DROPPED]
    assert not r.exists("user:1")


def test_a_guarded_table_rebuilds_an_evicted_bucket_with_its_high_mark(
    r: redis.Redis, lib: Library
) -> None:
    p = planner()
    table = filled(lib, p)
    evicted = table.bucket(1)
    names = held_by(r, evicted)
    assert names
    r.delete(evicted)
    # no floor from the worker is needed, and one it read before the eviction is not used
    table.guard = f"stale{REBUILD}{streamed(10, 10, '1')}"
    victim = names[0]
    other = next(i for i in range(400) if i not in names)
    # a replay of an older change: of a row of the evicted bucket, uncached; of another row,
    # stale as usual
    assert apply(lib, p, change(victim, "old", 1200), change(other, "old", 10)) == [
        RowStatus.DROPPED,
        RowStatus.STALE,
    ]
    assert not r.exists(f"user:{victim}")
    assert r.hget(f"user:{other}", "name") == b"v1"
    high = streamed(1399, 1399, "1")
    assert r.hget(evicted, "#f") == high.encode() == r.hget(table.meta, "#h")
    assert apply(lib, p, change(victim, "new", 1400)) == [RowStatus.APPLIED]


def test_a_change_applied_after_a_floor_was_read_is_never_rolled_back(
    r: redis.Redis, lib: Library
) -> None:
    # the race a floor named by the worker had: read, then a newer change applied by another
    # worker, then the bucket evicted, then rebuilt with the older floor
    p = planner()
    table = filled(lib, p)
    victim = held_by(r, table.bucket(1))[0]
    table.guard = ASK
    assert apply(lib, p, change(victim, "v3", 3000)) == [RowStatus.APPLIED]
    r.delete(table.bucket(1))
    table.guard = f"stale{REBUILD}{streamed(2000, 2000, '1')}"
    assert apply(lib, p, change(victim, "v2", 2500)) == [RowStatus.DROPPED]
    assert not r.exists(f"user:{victim}")


def test_rows_a_lost_bucket_count_no_longer_reaches_are_at_the_table_floor(
    r: redis.Redis, lib: Library
) -> None:
    p = planner()
    table = filled(lib, p)
    names = held_by(r, table.bucket(table.buckets - 1))
    r.delete(table.meta)
    # a worker that knew fewer buckets rebuilds bucket 0: rows of the last bucket are looked
    # for where they are not, and are taken to be at the table's floor, not new
    stale = planner()
    assert apply(lib, stale, change(names[0], "old", 900), guard=ASK) == [RowStatus.UNKNOWN]
    (behind,) = stale.tables
    assert behind.buckets == 1 < table.buckets
    behind.guard = rebuild(behind, streamed(1399, 1399, "1"))
    olds = [change(i, "old", 900) for i in names]
    assert apply(lib, stale, *olds) == [RowStatus.DROPPED] * len(names)
    assert not any(r.exists(f"user:{i}") for i in names)
    assert r.hget(table.meta, "#n") == b"1"


def test_a_split_of_an_evicted_bucket_leaves_both_halves_evicted(
    r: redis.Redis, lib: Library
) -> None:
    p = planner()
    for n in range(0, 400, 100):
        assert set(apply(lib, p, *(change(i, "v1", 1000 + i) for i in range(n, n + 100)))) == {
            RowStatus.APPLIED
        }
    (table,) = p.tables
    while table.split_source() == table.meta:
        assert lib.split(table)
    source = table.split_source()
    names = held_by(r, source)
    assert names
    r.delete(source)
    # the next split divides a bucket that is gone: the new half must not look like a bucket
    # that exists and lacks the rows' records (new rows), or old replays would be written
    assert lib.split(table)
    assert not r.exists(table.bucket(table.buckets - 1))
    table.guard = ASK
    assert set(apply(lib, p, *(change(i, "old", 10) for i in names))) == {RowStatus.DROPPED}
    assert not any(r.exists(f"user:{i}") for i in names)


def test_a_split_of_a_table_whose_bucket_0_was_evicted_waits_for_its_floor(
    r: redis.Redis, lib: Library
) -> None:
    p = planner()
    assert set(apply(lib, p, *(change(i, "v1", 1000 + i) for i in range(200)))) == {
        RowStatus.APPLIED
    }
    (table,) = p.tables
    assert table.split_source() == table.meta
    r.delete(table.meta)
    # a bucket 0 made again by the split would lack the floor: the table is left unsplit
    assert not lib.split(table)
    assert not r.exists(table.meta)
    table.guard = ASK
    olds = [change(i, "old", 10) for i in range(200)]
    assert set(apply(lib, p, *olds)) == {RowStatus.UNKNOWN}
    # nor while its rebuild waits for the token
    assert not lib.split(table)
    table.guard = rebuild(table, streamed(5000, 5000, "1"))
    assert set(apply(lib, p, *olds)) == {RowStatus.DROPPED}


def test_expiring_records_never_makes_a_gone_bucket_0_again(r: redis.Redis, lib: Library) -> None:
    p = planner()
    table = filled(lib, p)
    bucket = table.bucket(1)
    (first,) = held_by(r, bucket)[:1]
    r.hset(bucket, str(first), "100~1")  # a tombstone long past
    r.delete(table.meta)
    assert lib.expire(table, [1]) == 1
    assert not r.exists(table.meta)


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
    table.guard = ASK
    # a change of one of them finds its bucket gone: rebuilt, and the table marked lossy
    assert apply(lib, p, change(victim, "v2", 6000)) == [RowStatus.APPLIED]
    assert r.hget(table.meta, "#l") == b"1"
    Sweeper(r, p, TOMBSTONE_S).truncate(TABLE, streamed(7000, 7000, "0"))
    assert not list(r.scan_iter(match="user:*"))
