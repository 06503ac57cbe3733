"""MySQL-family sources: positions from the binlog, on real MariaDB events
(``fixtures/debezium-3.6-mariadb``: a snapshot, single and multi-row events, a transaction touching
a row twice, a primary-key change, FLUSH LOGS, a server restart, and offsets restored twice so
changes come again with identical ``source``), and on generated histories (rotations, restarts,
multi-row events, primary-key changes, replays, two workers)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamsync.config import parse_settings
from streamsync.errors import PoisonEntryError
from streamsync.events import ChangeEvent, Decoder
from streamsync.functions import Library, RowStatus
from streamsync.keys import StateKeys
from streamsync.mapping import Planner
from tests.debezium import envelope
from tests.replies import as_str

FIXTURE = Path(__file__).parent / "fixtures" / "debezium-3.6-mariadb" / "items.jsonl"
RULES = [
    {"table": "inv.items", "key": "item:{id}", "type": "hash"},
    {"table": "public.users", "key": "user:{id}", "type": "hash"},
]


def records() -> list[dict[str, Any]]:
    with FIXTURE.open() as f:
        return [json.loads(line) for line in f]


def decode(record: dict[str, Any]) -> ChangeEvent:
    key = json.dumps(record["key"], separators=(",", ":")).encode()
    value = json.dumps(record["value"], separators=(",", ":")).encode()
    event = Decoder().decode([key, value])
    assert isinstance(event, ChangeEvent)
    return event


def first_occurrences(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history without the replays: each record the first time its change came."""
    seen: set[str] = set()
    out = []
    for rec in recs:
        ident = json.dumps([rec["key"], rec["value"]["op"], rec["value"]["source"]])
        if ident not in seen:
            seen.add(ident)
            out.append(rec)
    return out


def model(history: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Every row's hash at the end of ``history`` (in the order the server wrote it)."""
    rows: dict[str, dict[str, str]] = {}
    for rec in history:
        value = rec["value"]
        key = f"item:{rec['key']['id']}"
        if value["op"] == "d":
            rows.pop(key, None)
        else:
            rows[key] = {k: str(v) for k, v in value["after"].items()}
    return rows


def planner() -> Planner:
    s = parse_settings({"source": {"streams": ["s"]}, "rules": RULES})
    return Planner(s.rules_by_table, StateKeys.from_settings(s.worker))


@pytest.fixture
def lib(r: redis.Redis) -> Iterator[Library]:
    library = Library(r)
    library.ensure()
    yield library


def cached(r: redis.Redis, pattern: str) -> dict[str, dict[str, str]]:
    return {
        as_str(k): {as_str(f): as_str(v) for f, v in r.hgetall(k).items()}
        for k in r.scan_iter(match=pattern)
    }


def test_the_captured_events_are_in_order_per_row() -> None:
    recs = records()
    assert len(recs) == 69
    events = [decode(rec) for rec in recs]
    assert {e.table for e in events} == {"inv.items"}
    # a replay gets exactly the position of the change it repeats
    first: dict[str, str] = {}
    for rec, event in zip(recs, events, strict=True):
        ident = json.dumps([rec["key"], rec["value"]["op"], rec["value"]["source"]])
        assert first.setdefault(ident, event.position) == event.position
    # in the server's order, every row's changes rise: over the snapshot, multi-row events,
    # a transaction touching a row twice, FLUSH LOGS and a restart (the file number rises)
    newest: dict[Any, str] = {}
    for rec in first_occurrences(recs):
        event = decode(rec)
        row = rec["key"]["id"]
        assert event.position > newest.get(row, ""), (rec["run"], rec["n"])
        newest[row] = event.position


def test_a_read_of_the_snapshot_is_older_than_any_later_change() -> None:
    snapshot, *_ = (decode(rec) for rec in records() if rec["value"]["op"] == "r")
    later = decode(next(rec for rec in records() if rec["value"]["op"] == "u"))
    assert snapshot.position < later.position


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**32 - 1))
def test_any_delivery_order_with_replays_across_two_workers(
    r: redis.Redis, lib: Library, seed: int
) -> None:
    r.flushall()
    recs = records()
    rng = random.Random(seed)
    deliveries = recs + rng.sample(recs, 20)
    rng.shuffle(deliveries)
    workers = (planner(), planner())
    for rec in deliveries:
        statuses = lib.changes(rng.choice(workers).plan(decode(rec)), 60).rows
        assert not [s for s in statuses if isinstance(s, str)], statuses
    assert cached(r, "item:*") == model(first_occurrences(recs))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 4), st.integers(1, 4), st.integers(0, 3)), min_size=1, max_size=40
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_generated_binlog_histories_end_as_written(
    r: redis.Redis, lib: Library, steps: list[tuple[int, int, int]], seed: int
) -> None:
    """Rotations (a new file, offsets from the start again), multi-row events (one offset,
    rows 0..n), primary-key changes (a delete and a create at one place), delivered in any
    order with replays across two workers."""
    r.flushall()
    history: list[dict[str, Any]] = []
    file_no, offset = 1, 400
    rows: dict[int, int] = {}
    for n, (what, row_id, width) in enumerate(steps):
        if what == 0:
            file_no, offset = file_no + 1, 256  # FLUSH LOGS, a restart
        offset += 200
        if what == 1 and row_id in rows:
            # a primary-key change: the row moves to another id, at one place
            moved = row_id + 10
            history.append(_binlog("d", row_id, None, file_no, offset, 0))
            rows.pop(row_id)
            rows[moved] = n
            history.append(_binlog("c", moved, n, file_no, offset, 0))
            continue
        # one event changing ``width`` + 1 rows
        for k in range(width + 1):
            target = (row_id + k) % 5 + 1
            op = "u" if target in rows else "c"
            rows[target] = n
            history.append(_binlog(op, target, n, file_no, offset, k))
    rng = random.Random(seed)
    deliveries = history + rng.sample(history, len(history) // 3)
    rng.shuffle(deliveries)
    workers = (planner(), planner())
    for rec in deliveries:
        lib.changes(rng.choice(workers).plan(decode(rec)), 60)
    assert cached(r, "item:*") == model(history)


def _binlog(op: str, row_id: int, qty: int | None, *at: int) -> dict[str, Any]:
    """A MariaDB record of ``op`` on ``row_id`` at ``at``: (file number, offset, row)."""
    file_no, pos, row = at
    source = {
        "connector": "mariadb",
        "db": "inv",
        "table": "items",
        "file": f"binlog.{file_no:06d}",
        "pos": pos,
        "row": row,
        "snapshot": "false",
    }
    after = None if op == "d" else {"id": row_id, "qty": qty}
    before = {"id": row_id} if op == "d" else None
    value = {"op": op, "before": before, "after": after, "source": source}
    return {"key": {"id": row_id}, "value": value}


def test_a_postgresql_and_a_mariadb_table_side_by_side(r: redis.Redis, lib: Library) -> None:
    p = planner()
    pg = envelope("c", "public.users", 1000, after={"id": 1, "name": "ann"})
    key, value = b'{"id":1}', json.dumps(pg, separators=(",", ":")).encode()
    user = Decoder().decode([key, value])
    assert isinstance(user, ChangeEvent)
    rows = p.plan(user) + [row for rec in records()[:5] for row in p.plan(decode(rec))]
    assert set(lib.changes(rows, 60).rows) == {RowStatus.APPLIED}
    assert r.hgetall("user:1") == {b"id": b"1", b"name": b"ann"}
    assert cached(r, "item:*") == model(records()[:5])


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"file": None}, "source.file None is not a binlog file name"),
        ({"file": "binlog"}, "is not a binlog file name"),
        ({"pos": -1}, "source.pos -1 is not a binlog offset"),
        ({"pos": "1317"}, "source.pos '1317'"),
        ({"row": 1.5}, "source.row 1.5"),
        ({"db": None}, "lacks 'db' or 'table'"),
        ({"connector": "sqlserver", "schema": "dbo"}, "postgresql, mysql and mariadb only"),
    ],
)
def test_a_change_that_cannot_be_placed_says_why(change: dict[str, Any], reason: str) -> None:
    rec = records()[4]
    rec["value"]["source"].update(change)
    with pytest.raises(PoisonEntryError, match=reason.replace(".", r"\.").replace("(", r"\(")):
        decode(rec)


def test_a_new_binlog_base_name_or_server_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    decoder = Decoder()

    def change(file: str, server_id: int) -> None:
        rec = records()[4]
        rec["value"]["source"].update(file=file, server_id=server_id)
        key = json.dumps(rec["key"]).encode()
        decoder.decode([key, json.dumps(rec["value"]).encode()])

    change("binlog.000001", 1)
    change("binlog.000007", 1)  # a rotation, a restart
    change("binlog.000002", 1)  # a replay of older offsets
    assert "resync" not in caplog.text
    change("mysql-bin.000001", 1)
    assert "inv.items: its changes now come from binlog mysql-bin of server 1" in caplog.text
    assert "streamsync resync --table inv.items" in caplog.text
    caplog.clear()
    change("mysql-bin.000002", 2)  # another server
    assert "of server 2, after mysql-bin of server 1" in caplog.text


def test_replays_from_older_offsets_are_stale(r: redis.Redis, lib: Library) -> None:
    recs = records()
    history = first_occurrences(recs)
    p = planner()
    for rec in history:
        lib.changes(p.plan(decode(rec)), 60)
    # runs 7 and 8 restored older offsets: the same changes again, every one stale
    again = [rec for rec in recs if rec["run"] in (7, 8)]
    assert len(again) == 12
    statuses = [s for rec in again for s in lib.changes(p.plan(decode(rec)), 60).rows]
    assert set(statuses) == {RowStatus.STALE}
    assert cached(r, "item:*") == model(history)
