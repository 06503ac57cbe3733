"""The worker end to end on a real redis-server, in-process: every op on hash and json targets,
replays, dead letters, discovery, formats."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from streamsync import __version__
from streamsync.config import load_settings
from streamsync.errors import ExitCode
from streamsync.events import ChangeEvent, Decoder
from streamsync.functions import library_source, library_version
from streamsync.keys import StateKeys
from streamsync.worker import Worker, heartbeat_ttl_ms
from tests.debezium import (
    PLACEHOLDER,
    add_change,
    add_fixture,
    entry_fields,
    envelope,
    fixture_records,
    write_config,
)
from tests.replies import raw_range, xadd, xrange
from tests.servers import wait_until
from tests.workers import drain, outcomes

STREAM = "spike.public.users"


def expected_rows(fixture: str) -> dict[int, dict[str, Any] | None]:
    """The newest state of every row of a fixture, by a reference model (newest LSN wins)."""
    decoder = Decoder()
    state: dict[int, tuple[str, dict[str, Any] | None]] = {}
    for rec in fixture_records(fixture):
        value = json.loads(rec["value"]) if rec["value"] else None
        if value is None or value.get("payload", value).get("op") == "t":
            continue
        event = decoder.decode([rec["key"].encode(), rec["value"].encode()])
        assert isinstance(event, ChangeEvent)
        row_id = event.row()["id"]
        if row_id not in state or state[row_id][0] < event.position:
            state[row_id] = (event.position, event.after)
    return {k: v for k, (_, v) in state.items()}


def as_hash(row: dict[str, Any]) -> dict[bytes, bytes]:
    return {
        k.encode(): (v if isinstance(v, str) else json.dumps(v)).encode()
        for k, v in row.items()
        if v is not None
    }


def pending(r: redis.Redis, stream: str = STREAM, group: str = "streamsync") -> int:
    return int(r.xpending(stream, group)["pending"])


@pytest.mark.parametrize("fixture", ["decimal-string.jsonl", "schemas-on.jsonl"])
def test_fixture_stream_lands_as_hashes(
    r: redis.Redis, redis_url: str, tmp_path: Path, fixture: str
) -> None:
    add_fixture(r, fixture, truncate=False)
    cfg = write_config(tmp_path / "c.yaml", redis_url, streams=[STREAM])
    worker = drain(cfg)
    expected = expected_rows(fixture)
    assert expected.keys() == {1, 2, 3, 4, 5, 100}
    for row_id, row in expected.items():
        if row is None:
            assert not r.exists(f"user:{row_id}")
        else:
            assert r.hgetall(f"user:{row_id}") == as_hash(row)
    assert r.hget("user:1", "balance") in (b"-0.05", b"10.51", b"10.50")
    counts = outcomes(worker)
    # the first change after the snapshot (insert of row 3) waits for the snapshot's mark: when
    # the delete of row 3 was applied first, it is stale
    assert counts["applied"] + counts.get("stale", 0) == 11 and counts["tombstone"] == 3
    assert pending(r) == 0 and not r.exists(STREAM + ":dlq")
    # the fixture's TRUNCATE, then a replay of the whole fixture: nothing comes back
    add_fixture(r, fixture)
    worker = drain(cfg)
    assert not r.keys("user:*")
    assert outcomes(worker)["applied"] == 1  # the truncate; every replayed change is stale
    assert pending(r) == 0 and not r.exists(STREAM + ":dlq")


def test_fixture_stream_lands_as_json(r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    add_fixture(r, "decimal-string.jsonl", truncate=False)
    rules = [
        {
            "table": "public.users",
            "key": "doc:{id}",
            "type": "json",
            "fields": ["id", "name", "balance"],
        }
    ]
    drain(write_config(tmp_path / "c.yaml", redis_url, streams=[STREAM], rules=rules))
    for row_id, row in expected_rows("decimal-string.jsonl").items():
        if row is None:
            assert not r.exists(f"doc:{row_id}")
        else:
            doc = orjson.loads(r.get(f"doc:{row_id}") or b"")
            assert doc == {"id": row["id"], "name": row["name"], "balance": row["balance"]}


def test_replaying_every_entry_changes_nothing(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    add_fixture(r, "decimal-string.jsonl", truncate=False)
    cfg = write_config(tmp_path / "c.yaml", redis_url, streams=[STREAM])
    drain(cfg)
    before = {k: r.hgetall(k) for k in r.scan_iter("user:*")}
    positions = {k: r.get(k) for k in r.scan_iter("streamsync:pos:*")}
    # Debezium re-sends everything after a crash
    add_fixture(r, "decimal-string.jsonl", truncate=False)
    worker = drain(cfg, consumer="w2")
    assert {k: r.hgetall(k) for k in r.scan_iter("user:*")} == before
    assert {k: r.get(k) for k in r.scan_iter("streamsync:pos:*")} == positions
    counts = outcomes(worker)
    assert counts["stale"] == 11 and "applied" not in counts


def test_older_change_after_newer_does_not_roll_back(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    stream = "app.public.users"
    add_change(r, stream, "c", {"id": 1, "name": "v3"}, lsn=300)
    add_change(r, stream, "u", {"id": 1, "name": "v1"}, lsn=100)
    add_change(r, stream, "u", {"id": 1, "name": "v2"}, lsn=200)
    add_change(r, stream, "d", {"id": 2}, lsn=500)
    add_change(r, stream, "c", {"id": 2, "name": "zombie"}, lsn=400)
    worker = drain(write_config(tmp_path / "c.yaml", redis_url))
    assert r.hgetall("user:1") == {b"id": b"1", b"name": b"v3"}
    assert not r.exists("user:2")
    assert outcomes(worker) == {"applied": 2, "stale": 3}


def test_malformed_and_unmapped_entries_are_dead_lettered_at_once(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    stream = "app.public.users"
    good = add_change(r, stream, "c", {"id": 1, "name": "a"}, lsn=10)
    bad = {
        xadd(r, stream, {'{"id":2}': "this is not json"}): "not valid JSON",
        xadd(r, stream, {"a": "1", "b": "2"}): "lacks its 'key' or 'value'",
        xadd(
            r,
            stream,
            entry_fields({"id": 3}, envelope("c", "public.other", 11, after={"id": 3})),
        ): "no rule maps",
        xadd(
            r,
            stream,
            entry_fields({"id": 4}, envelope("c", "public.users", 12, after={"name": "no id"})),
        ): "names column 'id', absent",
        xadd(
            r,
            stream,
            entry_fields({"id": 5}, envelope("x", "public.users", 13, after={"id": 5})),
        ): "unknown op",
    }
    worker = drain(write_config(tmp_path / "c.yaml", redis_url))
    assert r.hgetall("user:1") == {b"id": b"1", b"name": b"a"}
    dead = xrange(r, stream + ":dlq")
    assert len(dead) == len(bad)
    by_id = {}
    for _, fields in dead:
        by_id[fields[b"id"]] = fields
    for entry_id, reason in bad.items():
        fields = by_id[entry_id]
        assert reason in fields[b"reason"].decode(), fields
        assert fields[b"stream"] == stream.encode() and fields[b"deliveries"] == b"1"
    # the original entry is kept verbatim after the metadata
    _, raw = raw_range(r, stream + ":dlq")[0]
    n = int(raw[raw.index(b"fields") + 1])
    assert raw[-2 * n :] == [b'{"id":2}', b"this is not json"]
    assert outcomes(worker)["dead_lettered"] == len(bad)
    assert pending(r, stream) == 0
    assert good not in by_id


def test_several_rules_per_table_and_invalidation(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    rules: list[dict[str, Any]] = [
        {"table": "public.users", "key": "user:{id}", "type": "hash", "fields": ["id", "name"]},
        {"table": "public.users", "key": "user-doc:{id}", "type": "json"},
        {"table": "public.users", "key": "page:user:{id}", "mode": "invalidate"},
    ]
    stream = "app.public.users"
    r.set("page:user:1", "<html>")
    add_change(r, stream, "c", {"id": 1, "name": "a", "email": "a@x"}, lsn=10)
    add_change(r, stream, "c", {"id": 2, "name": "b", "email": "b@x"}, lsn=11)
    add_change(r, stream, "d", {"id": 2}, lsn=12)
    drain(write_config(tmp_path / "c.yaml", redis_url, rules=rules))
    assert r.hgetall("user:1") == {b"id": b"1", b"name": b"a"}
    assert orjson.loads(r.get("user-doc:1") or b"") == {"id": 1, "name": "a", "email": "a@x"}
    assert not r.exists("page:user:1")
    assert not r.exists("user:2") and not r.exists("user-doc:2")


def test_extended_format_and_composite_keys(r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    rules = [
        {"table": "public.order_items", "key": "order_item:{order_id}:{line_no}", "type": "hash"}
    ]
    stream = "app.public.order_items"
    row = {"order_id": 7, "line_no": 2, "sku": "X1"}
    add_change(
        r,
        stream,
        "c",
        row,
        lsn=5,
        table="public.order_items",
        key_columns=("order_id", "line_no"),
        extended=True,
    )
    drain(
        write_config(
            tmp_path / "c.yaml",
            redis_url,
            streams=[stream],
            rules=rules,
        )
    )
    assert r.hgetall("order_item:7:2") == {b"order_id": b"7", b"line_no": b"2", b"sku": b"X1"}


def test_stream_prefix_discovers_streams_but_not_dead_letters(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    add_change(r, "app.public.users", "c", {"id": 1, "name": "a"}, lsn=1)
    add_change(
        r, "app.public.orders", "c", {"id": 9, "total": "5.00"}, lsn=2, table="public.orders"
    )
    r.xadd("app.public.users:dlq", {"reason": "old"})
    cfg = tmp_path / "c.yaml"
    write_config(
        cfg,
        redis_url,
        rules=[
            {"table": "public.users", "key": "user:{id}", "type": "hash"},
            {"table": "public.orders", "key": "order:{id}", "type": "json"},
        ],
    )
    text = cfg.read_text().replace("  streams:\n  - app.public.users\n", "  stream_prefix: app.\n")
    cfg.write_text(text)
    drain(cfg)
    assert r.hgetall("user:1") == {b"id": b"1", b"name": b"a"}
    assert orjson.loads(r.get("order:9") or b"") == {"id": 9, "total": "5.00"}
    groups = r.xinfo_groups("app.public.users:dlq")
    assert groups == []


def test_start_dollar_skips_existing_entries(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    add_change(r, "app.public.users", "c", {"id": 1, "name": "old"}, lsn=1)
    cfg = write_config(tmp_path / "c.yaml", redis_url)
    cfg.write_text(
        cfg.read_text().replace("  group: streamsync\n", "  group: streamsync\n  start: $\n")
    )
    drain(cfg)
    assert not r.exists("user:1")


@pytest.mark.parametrize("trim", [True, False])  # the housekeeping path, the apply path
def test_library_is_reloaded_when_redis_loses_it(
    r: redis.Redis, redis_url: str, tmp_path: Path, trim: bool
) -> None:
    cfg = write_config(tmp_path / "c.yaml", redis_url, trim=trim)
    drain(cfg)
    r.function_flush()
    add_change(r, "app.public.users", "c", {"id": 1, "name": "a"}, lsn=1)
    worker = Worker(load_settings(cfg, environ={}), consumer="w", drain=True)
    # the library vanishes between the worker's start-up check and its first call
    worker._connect()
    r.function_flush()
    assert worker.run() == ExitCode.OK
    assert r.hgetall("user:1") == {b"id": b"1", b"name": b"a"}


def test_newer_incompatible_library_stops_the_worker(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    major, minor, patch = library_version()
    r.function_load(
        library_source().replace(f"'{major}.{minor}.{patch}'", f"'{major + 1}.0.0'"), replace=True
    )
    cfg = write_config(tmp_path / "c.yaml", redis_url)
    proc = subprocess.run(
        [sys.executable, "-m", "streamsync", "run", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == ExitCode.LIBRARY_INCOMPATIBLE, proc.stderr
    assert "upgrade streamsync" in proc.stderr


def test_installed_entry_point(tmp_path: Path) -> None:
    version = subprocess.run(
        ["streamsync", "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    assert __version__ in version.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: {streams: [a]}\nrules: []\n")
    proc = subprocess.run(
        ["streamsync", "check-config", "-c", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == ExitCode.CONFIG_INVALID
    assert f"{bad}: rules: at least one rule is needed" in proc.stderr
    run = subprocess.run(
        [sys.executable, "-m", "streamsync", "run", "-c", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == ExitCode.CONFIG_INVALID


@pytest.mark.parametrize("target_type", ["hash", "json"])
def test_unchanged_toast_column_keeps_its_cached_value(
    r: redis.Redis, redis_url: str, tmp_path: Path, target_type: str
) -> None:
    stream = "app.public.users"
    bio = "x" * 5000
    add_change(r, stream, "c", {"id": 1, "name": "a", "bio": bio}, lsn=10)
    add_change(r, stream, "u", {"id": 1, "name": "b", "bio": PLACEHOLDER}, lsn=20)
    add_change(r, stream, "u", {"id": 2, "name": "never cached", "bio": PLACEHOLDER}, lsn=30)
    rules = [{"table": "public.users", "key": "user:{id}", "type": target_type}]
    worker = drain(write_config(tmp_path / "c.yaml", redis_url, rules=rules))
    if target_type == "hash":
        assert r.hgetall("user:1") == {b"id": b"1", b"name": b"b", b"bio": bio.encode()}
    else:
        assert orjson.loads(r.get("user:1") or b"") == {"id": 1, "name": "b", "bio": bio}
    assert not r.exists("user:2")
    assert outcomes(worker) == {"applied": 2, "skipped": 1}
    cache_keys = [k for k in r.scan_iter("*") if r.type(k) != b"stream"]
    assert cache_keys
    assert not any(PLACEHOLDER.encode() in (r.dump(k) or b"") for k in cache_keys)


def test_a_refused_command_is_retried_not_fatal(
    r: redis.Redis, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the stream's name holds a string: XGROUP CREATE is refused (WRONGTYPE) until it is fixed
    r.set("app.public.users", "not a stream")
    worker = Worker(
        load_settings(write_config(tmp_path / "c.yaml", redis_url), environ={}),
        consumer="w",
        drain=True,
    )
    result: list[ExitCode] = []
    thread = threading.Thread(target=lambda: result.append(worker.run()))
    thread.start()
    try:
        wait_until(lambda: "WRONGTYPE" in caplog.text, message="the refusal to be logged")
        r.delete("app.public.users")
        add_change(r, "app.public.users", "c", {"id": 1, "name": "a"}, lsn=1)
        thread.join(timeout=30)
    finally:
        worker.request_stop()
        thread.join(timeout=30)
    assert result == [ExitCode.OK]
    assert r.hgetall("user:1") == {b"id": b"1", b"name": b"a"}


def test_a_running_worker_keeps_a_liveness_mark_and_leaves_cleanly(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """A quiet worker blocked on an idle stream keeps its liveness mark fresh (Redis 7.0 does
    not reset a blocked consumer's idle time); stopped cleanly with nothing pending, it drops
    the mark and leaves the group. One holding entries stays listed."""
    cfg = write_config(tmp_path / "c.yaml", redis_url, block_ms=200)
    settings = load_settings(cfg, environ={})
    mark = StateKeys.from_settings(settings.worker).alive("streamsync", "quiet")
    worker = Worker(settings, consumer="quiet")
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_until(lambda: r.exists(mark) == 1, timeout=10)
        full = heartbeat_ttl_ms(200)
        assert 0 < r.pttl(mark) <= full
        # refreshed while idle: its TTL runs down, then goes back up
        wait_until(lambda: r.pttl(mark) < full - 1000, timeout=10)
        low = r.pttl(mark)
        wait_until(lambda: r.pttl(mark) > low + 500, timeout=10, message="mark refreshed")
        assert [c["name"] for c in r.xinfo_consumers("app.public.users", "streamsync")] == [
            b"quiet"
        ]
    finally:
        worker.request_stop()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert not r.exists(mark)
    assert r.xinfo_consumers("app.public.users", "streamsync") == []


def test_a_worker_stopping_with_entries_pending_to_it_stays_in_the_group(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    rules = [{"table": "public.users", "key": "names", "type": "set", "member": "{name}"}]
    cfg = write_config(tmp_path / "c.yaml", redis_url, rules=rules, block_ms=100, max_deliveries=10)
    settings = load_settings(cfg, environ={})
    # the rule's set is a string: the row's write fails, and stays pending for a retry
    r.set("names", "not a set")
    add_change(r, "app.public.users", "c", {"id": 1, "name": "a"}, lsn=1)
    worker = Worker(settings, consumer="holder", drain=True)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_until(lambda: any(k[3] == "failed" for k in dict(worker.counts)), timeout=10)
    finally:
        worker.request_stop()
        thread.join(timeout=30)
    assert not thread.is_alive()
    (holder,) = r.xinfo_consumers("app.public.users", "streamsync")
    assert holder["name"] == b"holder" and holder["pending"] == 1
    mark = StateKeys.from_settings(settings.worker).alive("streamsync", "holder")
    assert not r.exists(mark)
