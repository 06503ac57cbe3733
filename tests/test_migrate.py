"""Upgrading from 1.x on a real redis-server: the real 1.1 library (``tests/fixtures``) and 1.1's
planner (``tests/planner_v1.py``) write a 1.x cache and its bookkeeping (every rule type,
tombstones, rows with a TTL, keys that change hands, an epoch-prefixed position), ``streamsync
migrate`` converts it, and a 2.0 worker carries on: the cache is what a 2.0 system that saw every
change holds, replays of changes older than the migrated positions stay stale, newer ones apply,
and nothing of 1.x is left. A 2.0 worker meeting 1.x bookkeeping refuses and changes nothing; a
migration cut short and run again ends where one run would have."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamsync import layout, v1
from streamsync.buckets import Tables
from streamsync.cli import cli
from streamsync.config import Rule, Settings, load_settings
from streamsync.errors import ExitCode
from streamsync.events import ChangeEvent
from streamsync.functions import Imported, Library, RowStatus, loaded_version
from streamsync.keys import StateKeys
from streamsync.mapping import Planner
from streamsync.migrate import Migration, Report, live_workers, migrate
from streamsync.positions import epoch_floor, snapshot_read, streamed
from streamsync.worker import Worker
from tests import planner_v1
from tests.debezium import change_fields, envelope, write_config
from tests.records import dangling, key_records, records
from tests.replies import Client, as_bytes, xadd
from tests.test_cluster import Cluster
from tests.workers import WorkerProcess, outcomes

FIXTURE = Path(__file__).parent / "fixtures" / "library-1.1.lua"
TABLE = "public.users"
STREAM = "app.public.users"
TOMBSTONE_S = 86_400
PLANS = ("free", "pro", "team")
USERS = 150

RULES: list[dict[str, Any]] = [
    {"table": TABLE, "key": "user:{id}", "type": "hash"},
    {"table": TABLE, "key": "doc:{id}", "type": "json", "ttl_s": 3600},
    {"table": TABLE, "key": "name:{id}", "type": "string", "value": "{name}"},
    # keyed by a non-key column: the key moves, and changes hands
    {"table": TABLE, "key": "email:{email|lower}", "type": "string", "value": "{id}"},
    {"table": TABLE, "key": "plan:{plan}:users", "type": "set", "member": "{id}"},
    {
        "table": TABLE,
        "key": "prices",
        "type": "zset",
        "member": "product:{id}",
        "score": "price",
        "where": "active = true",
    },
    {"table": TABLE, "key": "feed:{plan}", "type": "list", "value": "{id}:{name}", "max_len": 20},
    # its order and reserve keep their names (a hash tag): 1.x's sorted set and hash, 2.0's lists
    {
        "table": TABLE,
        "key": "{{feeds}}:feed:{plan}",
        "type": "list",
        "value": "{name}",
        "on_update": "replace",
    },
    # a member naming more than the row: placements too long for a bucket (overflow)
    {
        "table": TABLE,
        "key": "names:{plan}",
        "type": "set",
        "member": "{id}:and-a-text-long-enough-to-overflow-a-bucket-value:{name}",
    },
    {"table": TABLE, "key": "events", "type": "stream"},
    {"table": TABLE, "mode": "invalidate", "key": "inv:{id}"},
]


def user(i: int, **changed: Any) -> dict[str, Any]:
    row = {
        "id": i,
        "name": f"u{i}",
        "email": f"U{i}@X.io",
        "plan": PLANS[i % 3],
        "price": i * 10,
        "active": i % 4 != 0,
    }
    return {**row, **changed}


#: The changes the 1.x workers applied: (op, LSN, row, resync epoch). Streamed changes follow
#: a commit ending 10 below their LSN (``lastCommitLsn``).
HISTORY: list[tuple[str, int, dict[str, Any], int]] = [
    *(("r", 100, user(i), 0) for i in range(1, USERS + 1)),
    ("u", 200, user(2, plan="team", name="two"), 0),  # a set member and list entry move
    ("u", 210, user(3, email="Three@X.io"), 0),  # its key moves
    ("d", 300, user(4), 0),  # tombstones everywhere
    ("u", 220, user(6, price=None), 0),  # leaves the sorted set: a null score
    ("u", 230, user(7, active=False), 0),  # leaves the sorted set's filter
    ("u", 240, user(8, email="Z@X.io"), 0),  # gives its email up...
    ("u", 241, user(9, email="U8@X.io"), 0),  # ...which another row takes
    ("u", 250, user(5, name="epoch"), 1),  # after `streamsync resync`
]

#: What capture goes on writing while the migration runs, then a 2.0 worker reads: replays of
#: what was applied (stale, whatever they hold) and newer changes.
REPLAYS: list[tuple[str, int, dict[str, Any]]] = [
    ("r", 100, user(1, name="stale")),
    ("r", 100, user(10, plan="free", name="stale")),
    ("u", 200, user(2, plan="pro", name="stale")),
    ("u", 210, user(3, email="Stale@X.io")),
    ("c", 50, user(4, name="stale")),  # older than its delete
    ("u", 241, user(9, email="Stale@X.io")),
]
NEWER: list[tuple[str, int, dict[str, Any]]] = [
    ("u", 1000, user(1, name="new", plan="team", price=7)),
    ("u", 1001, user(3, email="Again@X.io")),
    ("c", 1002, user(USERS + 1)),
    ("d", 1003, user(6)),
    ("u", 1004, user(5, name="not the epoch's")),  # epoch 0: older than epoch 1's
    ("u", 1005, user(9, email="U9@X.io")),
]


def event(op: str, position: str, row: dict[str, Any]) -> ChangeEvent:
    key = {"id": row["id"]}
    return ChangeEvent(
        op=op,
        table=TABLE,
        position=position,
        ts_ms=None,
        after=None if op == "d" else dict(row),
        before=dict(key) if op == "d" else None,
        key=key,
    )


def position_v2(op: str, lsn: int) -> str:
    if op == "r":
        return snapshot_read(lsn)
    return streamed(lsn - 10, lsn, "0" if op == "d" else "1")


def settings_for(tmp_path: Path, url: str, name: str = "c.yaml") -> tuple[Path, Settings]:
    cfg = write_config(
        tmp_path / name, url, rules=RULES, streams=[STREAM], tombstone_ttl_s=TOMBSTONE_S
    )
    return cfg, load_settings(cfg, environ={})


def write_v1(r: redis.Redis, settings: Settings) -> None:
    """The cache and bookkeeping 1.x workers left after HISTORY."""
    r.function_load(FIXTURE.read_text(), replace=True)
    planner = planner_v1.Planner(
        settings.rules_by_table, settings.worker.position_prefix, settings.worker.state_prefix
    )
    for op, lsn, row, epoch in HISTORY:
        position = planner_v1.v1_position(lsn, op)
        rows = planner.plan(event(op, position, row), f"e{epoch:06d}" if epoch else "")
        reply = r.execute_command(*planner_v1.batch_command(rows, TOMBSTONE_S * 1000))
        assert all(isinstance(status, int) for status in reply), reply


def write_v2(r: redis.Redis, settings: Settings) -> None:
    """What a 2.0 system holds after HISTORY."""
    planner = Planner.from_settings(settings)
    library = Library(r)
    library.ensure()
    for op, lsn, row, epoch in HISTORY:
        rows = planner.plan(event(op, position_v2(op, lsn), row), f"e{epoch:06d}" if epoch else "")
        reply = library.changes(rows, TOMBSTONE_S)
        assert not [s for s in reply.rows if isinstance(s, str)], reply
    r.set(StateKeys().layout, layout.CURRENT)


def add_entries(r: Client, changes: list[tuple[str, int, dict[str, Any]]]) -> None:
    for op, lsn, row in changes:
        if op == "r":
            xadd(r, STREAM, change_fields(op, row, lsn))
            continue
        value = envelope(
            op,
            TABLE,
            lsn,
            after=None if op == "d" else row,
            before=row if op == "d" else None,
            sequence=(lsn - 10, lsn),
        )
        xadd(r, STREAM, {f'{{"id":{row["id"]}}}': json.dumps(value, separators=(",", ":"))})


def cache(r: Client) -> dict[bytes, Any]:
    """Every key the rules wrote, with its value (streams and streamsync's records aside)."""
    out: dict[bytes, Any] = {}
    for name in r.scan_iter(count=1000):
        key = as_bytes(name)
        kind = as_bytes(r.type(key))
        if key.startswith(b"streamsync:") or kind == b"stream":
            continue
        if kind == b"hash":
            out[key] = r.hgetall(key)
        elif kind == b"string":
            out[key] = r.get(key)
        elif kind == b"set":
            out[key] = r.smembers(key)
        elif kind == b"zset":
            out[key] = r.zrange(key, 0, -1, withscores=True)
        else:
            assert kind == b"list", (key, kind)
            out[key] = r.lrange(key, 0, -1)
    return out


_EXPIRES = re.compile(rb"~[0-9]+")


def bookkeeping(r: redis.Redis) -> dict[bytes, Any]:
    """streamsync's 2.0 records: buckets and overflow hashes, lists' order and reserve records
    (expiry times left out: two runs compute them a few seconds apart)."""
    out: dict[bytes, Any] = {}
    for name in r.scan_iter(match="streamsync:*", count=1000):
        key = as_bytes(name)
        kind = as_bytes(r.type(key))
        if key.startswith((b"streamsync:b:", b"streamsync:o:")):
            held = r.hgetall(key)
            out[key] = {f: _EXPIRES.sub(b"~", as_bytes(v)) for f, v in held.items()}
        elif key.startswith((b"streamsync:ord:", b"streamsync:rsv:")):
            out[key] = (kind, r.lrange(key, 0, -1) if kind == b"list" else None)
    return out


def v1_keys(r: Client) -> list[bytes]:
    """Whatever 1.x kept that is still there."""
    left = [
        as_bytes(k)
        for pattern in ("streamsync:pos:*", "streamsync:pl:*", "streamsync:idx:*")
        for k in r.scan_iter(match=pattern, count=1000)
    ]
    left += [as_bytes(k) for k in r.scan_iter(match="streamsync:ord:*", _type="zset")]
    left += [as_bytes(k) for k in r.scan_iter(match="streamsync:rsv:*", _type="hash")]
    return left


def dump_all(r: redis.Redis) -> dict[bytes, Any]:
    """Every key's serialized value and TTL state, and the libraries loaded."""
    keys = sorted(as_bytes(k) for k in r.scan_iter(count=1000))
    state: dict[bytes, Any] = {k: (r.dump(k), r.pttl(k) > 0) for k in keys}
    state[b"<functions>"] = r.function_list(withcode=True)
    return state


#: A Redis and the settings of a configuration writing to it.
Redis2 = tuple[redis.Redis, Settings]


@pytest.fixture
def two(
    r: redis.Redis, t: redis.Redis, tmp_path: Path, redis_url: str, target_url: str
) -> tuple[Redis2, Redis2]:
    """The session's two Redis, each with a configuration of its own (neither a target)."""
    return (r, settings_for(tmp_path, redis_url)[1]), (
        t,
        settings_for(tmp_path, target_url, "reference.yaml")[1],
    )


@pytest.fixture
def cfg_and_settings(tmp_path: Path, redis_url: str) -> tuple[Path, Settings]:
    return settings_for(tmp_path, redis_url)


def drain_worker(settings: Settings, consumer: str = "w2") -> Worker:
    worker = Worker(settings, consumer=consumer, drain=True)
    assert worker.run() == ExitCode.OK
    return worker


# -- migrating, then a 2.0 worker ----------------------------------------------------------------


def test_a_migrated_cache_carries_on_as_a_2_0_system_that_saw_every_change(
    two: tuple[Redis2, Redis2],
) -> None:
    (r, settings), (t, reference_settings) = two
    write_v1(r, settings)
    write_v2(t, reference_settings)
    before = cache(r)
    assert before == cache(t)  # 1.x and 2.0 cached alike

    report = migrate(r, settings)
    assert report.unreadable == report.unplaced == report.left == 0, report.summary()
    assert v1_keys(r) == []
    assert r.get(StateKeys().layout) == layout.CURRENT
    version = loaded_version(r)
    assert version is not None and version >= (2, 0, 0)
    assert cache(r) == before
    # every record names a member, key or list entry Redis holds
    planner = Planner.from_settings(settings)
    for rule in settings.rules:
        for table in (planner.tables.table(rule), planner.tables.moving(rule)):
            table.buckets = int(r.hget(table.meta, "#n") or 1)
            if rule.type is not None and rule.type.value != "list":
                assert dangling(r, table) == [], rule.state_name
    hashes = planner.tables.table(settings.rules[0])
    assert int(r.hget(hashes.meta, "#n") or 1) > 1  # split as it was filled

    add_entries(r, REPLAYS + NEWER)
    add_entries(t, REPLAYS + NEWER)
    events_before = r.xlen("events")
    migrated, reference = drain_worker(settings), drain_worker(reference_settings)
    assert outcomes(migrated) == outcomes(reference)
    assert outcomes(migrated)["stale"] == len(REPLAYS) + 1  # and the epoch's row
    assert cache(r) == cache(t)
    # the stream rule published the newer changes only (not the epoch's row's), once each
    assert r.xlen("events") - events_before == len(NEWER) - 1


def converted(lsn: int, op: str) -> str:
    return v1.position(planner_v1.v1_position(lsn, op).encode())


def test_migrated_positions_tombstones_and_expiry_times(
    r: redis.Redis, cfg_and_settings: tuple[Path, Settings]
) -> None:
    _, settings = cfg_and_settings
    write_v1(r, settings)
    migrate(r, settings)
    now = int(time.time())
    hash_rule, doc_rule = settings.rules[0], settings.rules[1]
    held = key_records(r, hash_rule, ["user:1", "user:2", "user:4", "user:5"])
    assert held["user:1"] is not None and held["user:1"].position == snapshot_read(100)
    assert held["user:1"].expires is None
    assert held["user:2"] is not None and held["user:2"].position == converted(200, "u")
    tombstone = held["user:4"]
    assert tombstone is not None and tombstone.position == converted(300, "d")
    assert tombstone.expires is not None and abs(tombstone.expires - now - TOMBSTONE_S) <= 5
    epoch = held["user:5"]
    assert epoch is not None and epoch.position.startswith("e000001")
    (doc,) = key_records(r, doc_rule, ["doc:1"]).values()
    assert doc is not None and doc.expires is not None
    assert abs(doc.expires - now - 3600 - TOMBSTONE_S) <= 5
    # the key email:u8@x.io changed hands: its record is the newer holder's
    tables = Tables(StateKeys())
    moving = tables.moving(settings.rules[3])
    kept = records(r, moving)
    assert kept[b"ku8@x.io"].position == converted(241, "u")
    assert kept[b"r9"].kind == "M" and kept[b"r9"].data == b"u8@x.io"
    assert kept[b"r8"].data == b"z@x.io"


def test_a_second_run_changes_nothing(
    r: redis.Redis, cfg_and_settings: tuple[Path, Settings]
) -> None:
    _, settings = cfg_and_settings
    write_v1(r, settings)
    migrate(r, settings)
    state = dump_all(r)
    again = migrate(r, settings)
    assert (again.written, again.deleted, sum(again.converted.values())) == (0, 0, 0)
    assert dump_all(r) == state


# -- cut short, run again -------------------------------------------------------------------------


class CutShortError(Exception):
    """A migration cut short by the test."""


def interrupt_after(calls: int) -> Any:
    seen: list[str] = []

    def progress(phase: str, _report: Report) -> None:
        seen.append(phase)
        if len(seen) == calls:
            raise CutShortError(phase)

    return progress


@pytest.mark.parametrize("calls", [1, 4, 12, 40])
def test_a_migration_cut_short_and_run_again_ends_as_one_run(
    two: tuple[Redis2, Redis2], calls: int
) -> None:
    (r, settings), (t, reference_settings) = two
    write_v1(r, settings)
    write_v1(t, reference_settings)
    migrate(t, reference_settings)

    with pytest.raises(CutShortError) as cut:
        Migration(r, settings, scan_count=25, progress=interrupt_after(calls)).run()
    # cut short: workers still refuse
    finding = layout.detect(r, settings)
    assert finding.layout is layout.Layout.MIGRATING, cut.value
    with pytest.raises(CutShortError):
        Migration(r, settings, scan_count=25, progress=interrupt_after(calls + 3)).run()
    Migration(r, settings, scan_count=25).run()

    assert v1_keys(r) == []
    assert r.get(StateKeys().layout) == layout.CURRENT
    assert cache(r) == cache(t)
    assert bookkeeping(r) == bookkeeping(t)


# -- a 2.0 worker meeting 1.x bookkeeping -------------------------------------------------------


def test_a_2_0_worker_meeting_1_x_bookkeeping_exits_5_and_changes_nothing(
    r: redis.Redis, cfg_and_settings: tuple[Path, Settings], tmp_path: Path
) -> None:
    cfg, settings = cfg_and_settings
    write_v1(r, settings)
    add_entries(r, NEWER)
    state = dump_all(r)

    assert Worker(settings, consumer="w2", drain=True).run() == ExitCode.MIGRATION_NEEDED
    assert dump_all(r) == state

    with WorkerProcess(cfg, "w3", tmp_path, drain=True) as worker:
        assert worker.wait() == ExitCode.MIGRATION_NEEDED
    assert (
        "Redis holds streamsync 1.x bookkeeping (library 1.1.0 loaded): stop every 1.x worker,"
        " then run 'streamsync migrate -c <file>'" in worker.log()
    )
    assert dump_all(r) == state


def _flush_library(r: redis.Redis) -> None:
    r.function_flush()


def _mark_migrating(r: redis.Redis) -> None:
    r.set(StateKeys().layout, layout.MIGRATING)


@pytest.mark.parametrize(
    ("change", "evidence"),
    [
        (_flush_library, "streamsync:idx:"),  # no library: its indexes tell
        (_mark_migrating, "did not finish"),
    ],
)
def test_1_x_bookkeeping_is_found_without_its_library_and_after_a_cut_migration(
    r: redis.Redis, cfg_and_settings: tuple[Path, Settings], change: Any, evidence: str
) -> None:
    _, settings = cfg_and_settings
    write_v1(r, settings)
    change(r)
    finding = layout.detect(r, settings)
    assert finding.layout in (layout.Layout.LEGACY, layout.Layout.MIGRATING)
    assert evidence in finding.evidence or evidence in layout.refusal(finding)
    state = dump_all(r)
    assert Worker(settings, consumer="w2", drain=True).run() == ExitCode.MIGRATION_NEEDED
    assert dump_all(r) == state


def test_a_fresh_redis_is_marked_2_by_the_first_worker(
    r: redis.Redis, cfg_and_settings: tuple[Path, Settings]
) -> None:
    _, settings = cfg_and_settings
    assert layout.detect(r, settings).layout is layout.Layout.NONE
    add_entries(r, NEWER)
    drain_worker(settings)
    assert r.get(StateKeys().layout) == layout.CURRENT
    assert r.hgetall("user:1")


def test_a_newer_layout_is_refused_as_a_newer_library(
    r: redis.Redis, cfg_and_settings: tuple[Path, Settings]
) -> None:
    _, settings = cfg_and_settings
    r.set(StateKeys().layout, "3")
    assert Worker(settings, consumer="w2", drain=True).run() == ExitCode.LIBRARY_INCOMPATIBLE


# -- the command -----------------------------------------------------------------------------------


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def test_migrate_dry_run_counts_and_changes_nothing(
    r: redis.Redis, cfg_and_settings: tuple[Path, Settings]
) -> None:
    cfg, settings = cfg_and_settings
    write_v1(r, settings)
    state = dump_all(r)
    result = invoke("migrate", "-c", str(cfg), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "dry run: nothing changed" in result.stdout
    assert re.search(r"records converted: [1-9][0-9]* \(", result.stdout), result.stdout
    assert dump_all(r) == state


def test_migrate_reports_counts_and_a_worker_then_starts(
    r: redis.Redis, cfg_and_settings: tuple[Path, Settings]
) -> None:
    cfg, settings = cfg_and_settings
    write_v1(r, settings)
    result = invoke("migrate", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    assert "1.x keys deleted: " in result.stdout and "marked layout 2" in result.stdout
    assert "records converted" in result.stderr  # progress
    add_entries(r, NEWER)
    drain_worker(settings)


@pytest.fixture
def named_connection(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, client_name="streamsync:old-worker")
    client.ping()
    yield client
    client.close()


def test_migrate_refuses_while_workers_run_unless_forced(
    r: redis.Redis, cfg_and_settings: tuple[Path, Settings], named_connection: redis.Redis
) -> None:
    cfg, settings = cfg_and_settings
    write_v1(r, settings)
    r.set("streamsync:alive:streamsync:w9", 1, px=60_000)
    state = dump_all(r)
    result = invoke("migrate", "-c", str(cfg))
    assert result.exit_code == int(ExitCode.WORKERS_RUNNING) == 6, result.output
    assert "streamsync:alive:streamsync:w9" in result.stderr
    assert "connection streamsync:old-worker" in result.stderr
    assert "--force" in result.stderr
    assert dump_all(r) == state
    assert live_workers(r, None, settings)
    result = invoke("migrate", "-c", str(cfg), "--force")
    assert result.exit_code == 0, result.output
    assert v1_keys(r) == []


def test_status_reports_a_cache_to_migrate(
    r: redis.Redis, cfg_and_settings: tuple[Path, Settings]
) -> None:
    cfg, settings = cfg_and_settings
    write_v1(r, settings)
    result = invoke("status", "-c", str(cfg), "--json")
    assert result.exit_code == ExitCode.UNHEALTHY, result.output
    assert "streamsync migrate -c" in result.stdout
    assert '"layout": "1.x"' in result.stdout
    migrate(r, settings)
    result = invoke("status", "-c", str(cfg), "--json")
    assert '"layout": "2"' in result.stdout and "migrate" not in result.stdout


def test_1_x_keys_of_no_configured_rule_are_left_and_named(
    r: redis.Redis, cfg_and_settings: tuple[Path, Settings], tmp_path: Path, redis_url: str
) -> None:
    _, settings = cfg_and_settings
    write_v1(r, settings)
    fewer = [rule for rule in RULES if rule.get("type") not in ("zset", "json")]
    cfg = write_config(tmp_path / "fewer.yaml", redis_url, rules=fewer, streams=[STREAM])
    report = migrate(r, load_settings(cfg, environ={}))
    left = v1_keys(r)
    assert report.left == len(left) > 0
    assert all(b":zset:" in k or b"{doc:" in k or b":json:" in k for k in left), left
    assert any("no configured rule: streamsync:" in e for e in report.examples)
    assert r.get(StateKeys().layout) == layout.CURRENT


def test_resync_finish_refuses_beside_1_x_bookkeeping(
    r: redis.Redis, cfg_and_settings: tuple[Path, Settings]
) -> None:
    cfg, settings = cfg_and_settings
    write_v1(r, settings)
    state = dump_all(r)
    result = invoke("resync", "-c", str(cfg), "--table", TABLE, "--finish", "--wait-s", "1")
    assert result.exit_code == ExitCode.MIGRATION_NEEDED, result.output
    assert "streamsync migrate" in result.stderr
    assert dump_all(r) == state


# -- 1.x names and records -------------------------------------------------------------------------


def test_rules_named_like_1_x(cfg_and_settings: tuple[Path, Settings]) -> None:
    _, settings = cfg_and_settings
    rule: Rule = settings.rules[4]
    planner = planner_v1.Planner(settings.rules_by_table, "streamsync:pos:", "streamsync:")
    assert v1.row_index("streamsync:", rule, cluster=False) == planner.row_index(rule)
    assert v1.placement_prefix("streamsync:", rule, cluster=False) + "7" == planner.placement_key(
        rule, "7"
    )
    pinned = Rule.model_validate(
        {"table": TABLE, "key": "{{plans}}:plan:{plan}:users", "type": "set", "member": "{id}"}
    )
    clustered = planner_v1.Planner(
        {TABLE: (pinned,)}, "streamsync:pos:", "streamsync:", cluster=True
    )
    assert v1.row_index("streamsync:", pinned, cluster=True) == clustered.row_index(pinned)
    assert v1.placement_prefix("streamsync:", pinned, cluster=True) + "7" == (
        clustered.placement_key(pinned, "7")
    )
    hashes = settings.rules[0]
    assert v1.key_index("streamsync:", hashes, b"user:7", cluster=True) == clustered.key_index(
        hashes, "user:7"
    )
    assert v1.order_prefix("streamsync:").encode() + b"{feed:free}" == (
        planner.order_key("feed:free").encode()
    )


KEYS = st.text(alphabet=st.sampled_from("ab:{}é1"), max_size=12)


@given(target=KEYS)
def test_a_position_record_names_its_key(target: str) -> None:
    prefix = "streamsync:pos:"
    name = planner_v1.position_key(prefix, target).encode()
    assert v1.guarded_name(prefix.encode(), target.encode()) == name
    assert target.encode() in v1.targets_of(prefix.encode(), name)
    for other in v1.targets_of(prefix.encode(), name):
        assert planner_v1.position_key(prefix, other.decode()).encode() == name


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    strings=st.lists(st.binary(max_size=300), max_size=5),
    entries=st.lists(st.binary(max_size=40), max_size=40),
)
def test_placements_unpack_as_cmsgpack_packed_them(
    r: redis.Redis, strings: list[bytes], entries: list[bytes]
) -> None:
    script = "return cmsgpack.pack({ARGV[1], ARGV[2], ARGV[3], {unpack(ARGV, 4)}})"
    strings = [*strings, b"", b"", b""][:3]
    packed = as_bytes(r.eval(script, 0, *strings, *entries))
    assert v1.unpack(packed) == [*strings, entries]
    where = v1.placement(b"L" + packed)
    assert (where.key, where.order, where.reserve, where.entries) == (*strings, tuple(entries))


def test_long_strings_unpack(r: redis.Redis) -> None:
    for size in (31, 32, 255, 256, 65_535, 65_536, 70_000):
        text = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        packed = as_bytes(r.eval("return cmsgpack.pack({ARGV[1], ARGV[2]})", 0, text, "m"))
        assert v1.unpack(packed) == [text, b"m"]
    with pytest.raises(ValueError, match="truncated"):
        v1.unpack(b"\x92\xa1a")


def test_1_x_positions_and_floors() -> None:
    assert v1.position(b"00000000000000000100" + b"1") == snapshot_read(100)
    assert v1.position(b"e000002" + b"00000000000000000100" + b"0").startswith("e000002")
    assert v1.position(b"e0000010") == epoch_floor(1)
    assert v1.position(b"0") == epoch_floor(0)
    with pytest.raises(ValueError):
        v1.position(b"12")


# -- the library's import functions ----------------------------------------------------------------


def test_import_writes_unless_as_new_is_there_and_keeps_the_table(r: redis.Redis) -> None:
    library = Library(r)
    library.ensure()
    rule = Rule.model_validate({"table": TABLE, "key": "s:{plan}", "type": "set", "member": "{id}"})
    table = Tables(StateKeys()).table(rule)
    old, new = snapshot_read(100), snapshot_read(200)
    long = b"S3:abc" + b"m" * 80
    statuses = library.import_records(
        table,
        [
            Imported(b"1", old, None, b"Tabc"),
            Imported(b"2", new, 1_900_000_000, long),
            Imported(b"##3", old, 1_900_000_000),
        ],
    )
    assert statuses == [RowStatus.APPLIED] * 3 and table.count == 3
    held = records(r, table)
    assert held[b"2"].data == long[1:] and held[b"2"].expires == 1_900_000_000
    assert r.hget(table.meta, b"2") == new.encode() + b"~1900000000O"
    # as new, or newer, is kept; older is replaced, its overflowed placement with it
    statuses = library.import_records(
        table, [Imported(b"1", old, None, b"Tzzz"), Imported(b"2", old), Imported(b"1", new)]
    )
    assert statuses == [RowStatus.STALE, RowStatus.STALE, RowStatus.APPLIED]
    statuses = library.import_records(table, [Imported(b"2", snapshot_read(300), None, b"Tx")])
    assert statuses == [RowStatus.APPLIED] and not r.exists(table.overflow)
    assert table.count == 3
    # addressed with a stale bucket count: nothing written
    table.buckets = 2
    assert library.import_records(table, [Imported(b"9", new)]) == [RowStatus.REBUCKETED]
    assert table.buckets == 1 and b"9" not in records(r, table)


def test_import_list_orders_entries_as_the_library_compares_them(r: redis.Redis) -> None:
    library = Library(r)
    library.ensure()
    r.rpush("feed", "b", "a")
    r.zadd("old:ord", {"x": 0, "y": 0, "z": -1})
    r.pexpire("feed", 50_000)
    r.pexpire("old:ord", 60_000)
    names: list[str | bytes] = ["feed", "old:ord", "old:rsv", "ord", "rsv"]
    # the list holds b then a; their sort keys say a is newer: the list is rewritten
    entries: list[str | bytes] = ["1b", "b", "2a", "a", "0c", "c"]
    assert library.import_list(names, 2, (50_000, 60_000), entries) == (2, 1)
    assert r.lrange("feed", 0, -1) == [b"a", b"b"]
    assert r.lrange("ord", 0, -1) == [b"2a", b"1b", b"0c"]
    assert r.lrange("rsv", 0, -1) == [b"c"]
    assert 0 < r.pttl("feed") <= 50_000 and 50_000 < r.pttl("rsv") <= 60_000
    assert not r.exists("old:ord")
    # converted already: nothing to do
    assert library.import_list(names, 2, (50_000, 60_000), entries) == (-1, -1)


# -- on a Redis Cluster ----------------------------------------------------------------------------

#: RULES as a Cluster takes them: rules whose rows gather or move pin a slot.
CLUSTER_RULES: list[dict[str, Any]] = [
    *(r for r in RULES if r["key"] in ("user:{id}", "doc:{id}", "prices", "events", "inv:{id}")),
    {"table": TABLE, "key": "{{emails}}:email:{email|lower}", "type": "string", "value": "{id}"},
    {"table": TABLE, "key": "{{plans}}:plan:{plan}:users", "type": "set", "member": "{id}"},
    {
        "table": TABLE,
        "key": "{{feeds}}:feed:{plan}",
        "type": "list",
        "value": "{id}:{name}",
        "max_len": 20,
    },
]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster")
    try:
        c.start()
        yield c
    finally:
        c.stop()


def write_v1_cluster(rc: redis.RedisCluster, settings: Settings) -> None:
    for node in rc.get_primaries():
        rc.execute_command("FUNCTION", "LOAD", "REPLACE", FIXTURE.read_text(), target_nodes=node)
    planner = planner_v1.Planner(
        settings.rules_by_table,
        settings.worker.position_prefix,
        settings.worker.state_prefix,
        cluster=True,
    )
    for op, lsn, row, epoch in HISTORY:
        position = planner_v1.v1_position(lsn, op)
        # as the 1.1 worker packed them: one slot per call
        for planned in planner.plan(event(op, position, row), f"e{epoch:06d}" if epoch else ""):
            reply = rc.execute_command(*planner_v1.batch_command([planned], TOMBSTONE_S * 1000))
            assert all(isinstance(status, int) for status in reply), reply


def test_a_cluster_is_migrated_on_every_primary(
    cluster: Cluster, r: redis.Redis, tmp_path: Path, redis_url: str
) -> None:
    rc = cluster.client()
    cfg = write_config(
        tmp_path / "c.yaml",
        cluster.url,
        rules=CLUSTER_RULES,
        streams=[STREAM],
        tombstone_ttl_s=TOMBSTONE_S,
    )
    settings = load_settings(cfg, environ={})
    reference_cfg = write_config(
        tmp_path / "r.yaml",
        redis_url,
        rules=CLUSTER_RULES,
        streams=[STREAM],
        tombstone_ttl_s=TOMBSTONE_S,
    )
    reference = load_settings(reference_cfg, environ={})
    write_v1_cluster(rc, settings)
    write_v2(r, reference)
    before = cache(rc)
    assert before == cache(r)
    assert layout.detect(rc, settings).layout is layout.Layout.LEGACY
    assert Worker(settings, consumer="early", drain=True).run() == ExitCode.MIGRATION_NEEDED

    result = CliRunner().invoke(cli, ["migrate", "-c", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "left in place" not in result.stdout and "unreadable" not in result.stdout
    assert "lists converted: 3 (60 entries in lists, 60 in reserves" in result.stdout
    assert v1_keys(rc) == []
    assert cache(rc) == before

    add_entries(rc, REPLAYS + NEWER)
    add_entries(r, REPLAYS + NEWER)
    assert outcomes(drain_worker(settings)) == outcomes(drain_worker(reference))
    assert cache(rc) == cache(r)
