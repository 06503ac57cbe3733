"""``streamsync status`` on a real redis-server: what it reads matches what Redis says, what it
judges unhealthy exits 2, and health rules unit-tested on hand-built reports."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result

from streamsync import acl
from streamsync.cli.status import status_command
from streamsync.config import REDIS_PASSWORD_ENV, REDIS_URL_ENV, load_settings
from streamsync.errors import ExitCode
from streamsync.functions import ensure_library
from streamsync.status import (
    ConsumerStatus,
    KeyspaceStatus,
    LibraryStatus,
    MemoryStatus,
    OldestPending,
    RedisStatus,
    StatusReport,
    StreamStatus,
    TargetStatus,
    Thresholds,
    collect,
    id_ms,
    problems,
)
from streamsync.worker import Worker
from tests.debezium import add_change, write_config
from tests.replies import as_str, newest_id, pending_entries, xrange
from tests.servers import free_port, wait_until
from tests.workers import drain

STREAM = "app.public.users"
GROUP = "streamsync"


# -- helpers -------------------------------------------------------------------------------


def invoke(cfg: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    """Run ``status -c cfg ...`` in-process; the environment's Redis URL and password are
    cleared unless ``env`` sets them."""
    environ: dict[str, str | None] = {REDIS_URL_ENV: None, REDIS_PASSWORD_ENV: None, **(env or {})}
    return CliRunner().invoke(
        status_command, ["-c", str(cfg), *args], env=environ, catch_exceptions=False
    )


def status_json(
    cfg: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    result = invoke(cfg, "--json", *args, env=env)
    return result.exit_code, json.loads(result.stdout)


def add_users(r: redis.Redis, n: int, lsn0: int = 100, op: str = "c") -> list[bytes]:
    return [add_change(r, STREAM, op, {"id": i, "name": f"u{i}"}, lsn0 + i) for i in range(n)]


def consumer_idle_ms(r: redis.Redis, stream: str, name: str) -> int | None:
    for c in r.xinfo_consumers(stream, GROUP):
        if c["name"] == name.encode():
            return int(c["idle"])
    return None


def stream_doc(doc: dict[str, Any], name: str = STREAM) -> dict[str, Any]:
    found: list[dict[str, Any]] = [s for s in doc["streams"] if s["name"] == name]
    (stream,) = found
    return stream


# -- end to end on a real redis-server ---------------------------------------------------------


def test_drained_stream_is_healthy_with_counts_and_lag(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    add_users(r, 5)
    add_change(r, STREAM, "u", {"id": 1, "name": "older"}, 50)  # stale: an older position
    add_change(r, STREAM, "d", {"id": 2, "name": "u2"}, 300)
    cfg = write_config(tmp_path / "c.yaml", redis_url, trim=False)
    drain(cfg)

    code, doc = status_json(cfg)
    assert code == ExitCode.OK, doc["problems"]
    assert doc["healthy"] is True and doc["problems"] == []
    s = stream_doc(doc)
    assert s["counts"] == {"c": {"applied": 5}, "d": {"applied": 1}, "u": {"stale": 1}}
    assert s["totals"] == {"applied": 6, "stale": 1}
    assert s["length"] == r.xlen(STREAM) == 7
    assert s["lag"] == 0 and s["unread"] is False and s["lag_note"] is None
    assert s["entries_read"] == 7
    assert s["pending"] == 0 and s["oldest_pending"] is None and s["waiting_lag_s"] is None
    assert s["dlq_length"] == 0
    stats = r.hgetall(f"streamsync:stats:{GROUP}:{STREAM}")
    assert s["last_applied_ms"] == int(stats[b"last_applied_ms"])
    assert s["last_source_ts_ms"] == int(stats[b"last_source_ts_ms"])
    assert s["last_applied_id"] == as_str(stats[b"last_id"])
    assert s["sync_lag_s"] is not None and 0 <= s["sync_lag_s"] < 60
    assert s["since_last_applied_s"] is not None and 0 <= s["since_last_applied_s"] < 60
    # the worker stopped cleanly with nothing pending: it left the group
    assert s["consumers"] == []
    assert doc["library"]["loaded"] == doc["library"]["shipped"]

    text = invoke(cfg)
    assert text.exit_code == ExitCode.OK
    assert "healthy" in text.stdout and "problem" not in text.stdout
    assert STREAM in text.stdout


def test_idle_system_with_an_old_last_change_is_healthy(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    add_users(r, 2)
    cfg = write_config(tmp_path / "c.yaml", redis_url)
    drain(cfg)
    settings = load_settings(cfg, environ={})
    # an hour later, nothing new arrived
    report = collect(r, settings, now_ms=int(r.time()[0]) * 1000 + 3_600_000)
    (s,) = report.streams
    assert s.sync_lag_s is not None and s.sync_lag_s > 3_000
    assert problems(report, Thresholds(max_lag_s=60)) == []


def test_consumer_that_stopped_with_pending_entries_is_dead(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.yaml", redis_url, claim_idle_ms=100)
    add_users(r, 2)
    drain(cfg)  # a worker ran (library loaded) and left
    add_users(r, 3, lsn0=200, op="u")
    # a worker reads two entries and crashes before acknowledging them
    r.xreadgroup(GROUP, "crashed", {STREAM: ">"}, count=2)
    wait_until(
        # past claim_idle_ms (dead) and past twice that (the pending-age limit)
        lambda: (consumer_idle_ms(r, STREAM, "crashed") or 0) > 250,
        message="the crashed consumer idle past 2 x claim_idle_ms",
    )

    code, doc = status_json(cfg)
    assert code == ExitCode.UNHEALTHY
    assert doc["healthy"] is False
    s = stream_doc(doc)
    (crashed,) = s["consumers"]  # w1 stopped cleanly and left the group
    assert crashed["name"] == "crashed" and crashed["alive"] is False
    assert crashed["dead"] is True and crashed["state"] == "dead" and crashed["pending"] == 2
    # the numbers are Redis's own
    summary = r.xpending(STREAM, GROUP)
    (oldest,) = pending_entries(r, STREAM, GROUP, count=1)
    assert s["pending"] == summary["pending"] == 2
    assert s["oldest_pending"]["id"] == oldest.id.decode()
    assert s["oldest_pending"]["consumer"] == "crashed"
    assert s["oldest_pending"]["deliveries"] == oldest.deliveries == 1
    assert s["oldest_pending"]["idle_s"] > 0.25
    assert s["lag"] == r.xinfo_groups(STREAM)[0]["lag"] == 1
    assert s["unread"] is True and s["oldest_unread_id"] == newest_id(r, STREAM).decode()
    assert any(
        p.startswith(f"{STREAM}: no live consumer while 2 entries pending and 1 unread")
        and "crashed: dead" in p
        for p in doc["problems"]
    ), doc["problems"]
    # the default pending-age limit is twice claim_idle_ms
    assert doc["thresholds"]["max_pending_age_s"] == 0.2
    assert any("oldest pending entry" in p and "held by crashed" in p for p in doc["problems"])

    text = invoke(cfg)
    assert text.exit_code == ExitCode.UNHEALTHY
    assert "dead" in text.stdout and "crashed" in text.stdout
    assert "no live consumer" in text.stdout


def test_a_live_consumer_keeps_waiting_entries_healthy(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.yaml", redis_url, claim_idle_ms=60_000)
    ensure_library(r)
    add_users(r, 3)
    r.xgroup_create(STREAM, GROUP, id="0")
    r.xreadgroup(GROUP, "busy", {STREAM: ">"}, count=1)  # in hand, being applied
    code, doc = status_json(cfg)
    assert code == ExitCode.OK, doc["problems"]
    s = stream_doc(doc)
    assert s["pending"] == 1 and s["lag"] == 2
    assert s["consumers"][0]["state"] == "active"
    assert s["waiting_lag_s"] is not None and s["waiting_lag_s"] < 60


def test_a_quiet_live_worker_is_alive_whatever_its_idle(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """A worker blocked on an idle stream is idle to Redis 7.0 (a blocked XREADGROUP does not
    reset it): its liveness mark tells it from a dead consumer."""
    cfg = write_config(
        tmp_path / "c.yaml", redis_url, claim_idle_ms=100, claim_interval_ms=60_000, block_ms=3000
    )
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    worker = Worker(load_settings(cfg, environ={}), consumer="quiet")
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        # idle past claim_idle_ms, and past the pending-age limit (twice that)
        wait_until(
            lambda: (consumer_idle_ms(r, STREAM, "quiet") or 0) > 500,
            message="the live worker idle past claim_idle_ms",
        )
        code, doc = status_json(cfg)
        assert code == ExitCode.OK, doc["problems"]
        (quiet,) = stream_doc(doc)["consumers"]
        assert quiet["name"] == "quiet" and quiet["idle_s"] > 0.5
        assert quiet["alive"] is True and quiet["state"] == "active" and quiet["dead"] is False
        # entries arriving while it blocks are waiting on a live consumer, not "no live consumer"
        report = collect(r, load_settings(cfg, environ={}))
        waiting = dataclasses.replace(report.streams[0], lag=1, unread=True, waiting_lag_s=0.1)
        assert problems(dataclasses.replace(report, streams=(waiting,)), Thresholds()) == []
        assert "yes" in invoke(cfg).stdout  # the consumers table's alive column
    finally:
        worker.request_stop()
        thread.join(timeout=30)
    assert not thread.is_alive()
    # a clean stop deletes the mark and leaves the group
    assert not r.exists(f"streamsync:alive:{GROUP}:quiet")
    assert r.xinfo_consumers(STREAM, GROUP) == []


def test_without_a_mark_a_consumer_idle_past_claim_idle_ms_is_not_active(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.yaml", redis_url, claim_idle_ms=100)
    ensure_library(r)
    add_users(r, 1)
    r.xgroup_create(STREAM, GROUP, id="0")
    r.xreadgroup(GROUP, "gone", {STREAM: ">"}, count=1)
    r.xack(STREAM, GROUP, xrange(r, STREAM)[0][0])
    # a mark of another group's consumer of the same name does not count
    r.set("streamsync:alive:other-group:gone", "1", px=60_000)
    wait_until(lambda: (consumer_idle_ms(r, STREAM, "gone") or 0) > 150, message="gone idle")
    code, doc = status_json(cfg)
    assert code == ExitCode.OK, doc["problems"]  # nothing waits: an idle consumer is fine
    (gone,) = stream_doc(doc)["consumers"]
    assert gone["alive"] is False and gone["state"] == "idle"


def test_dead_letters_make_it_unhealthy(r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    add_users(r, 1)
    r.xadd(STREAM, {"not": "a debezium entry"})
    cfg = write_config(tmp_path / "c.yaml", redis_url)
    drain(cfg)
    assert r.xlen(STREAM + ":dlq") == 1
    code, doc = status_json(cfg)
    assert code == ExitCode.UNHEALTHY
    s = stream_doc(doc)
    assert s["dlq_stream"] == STREAM + ":dlq" and s["dlq_length"] == 1
    assert s["totals"]["dead_lettered"] == 1
    assert doc["problems"] == [
        f"{STREAM}: 1 dead letter in {STREAM}:dlq (read them: XRANGE {STREAM}:dlq - +)"
    ]


def test_discovered_streams_match_what_redis_says(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """stream_prefix discovery (dead letters excluded) and every count against direct reads."""
    orders = "app.public.orders"
    add_users(r, 4)
    for i in range(3):
        add_change(r, orders, "c", {"id": i}, 10 + i, table="public.orders")
    r.xadd(STREAM + ":dlq", {"reason": "x"})
    r.xadd("other.public.users", {"k": "v"})  # outside the prefix
    r.set("app.not-a-stream", "x")
    for stream in (STREAM, orders):
        r.xgroup_create(stream, GROUP, id="0")
    r.xreadgroup(GROUP, "c1", {STREAM: ">"}, count=3)
    r.xreadgroup(GROUP, "c2", {orders: ">"}, count=1)
    ensure_library(r)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        json.dumps(
            {
                "redis": {"url": redis_url},
                "source": {"stream_prefix": "app.", "group": GROUP},
                "rules": [{"table": "public.users", "key": "user:{id}", "type": "hash"}],
            }
        )
    )
    settings = load_settings(cfg, environ={})
    now_ms = id_ms(newest_id(r, STREAM).decode()) + 5_000
    report = collect(r, settings, now_ms=now_ms)
    assert report.stream_prefix == "app."
    assert [s.name for s in report.streams] == [orders, STREAM]
    for s in report.streams:
        groups = {as_str(g["name"]): g for g in r.xinfo_groups(s.name)}
        assert s.length == r.xlen(s.name)
        assert s.last_entry_id == newest_id(r, s.name).decode()
        assert s.pending == r.xpending(s.name, GROUP)["pending"]
        assert s.lag == groups[GROUP]["lag"]
        assert s.entries_read == groups[GROUP]["entries-read"]
        assert s.last_delivered_id == groups[GROUP]["last-delivered-id"].decode()
        assert s.dlq_length == r.xlen(s.name + ":dlq")
        assert {c.name: c.pending for c in s.consumers} == {
            c["name"].decode(): c["pending"] for c in r.xinfo_consumers(s.name, GROUP)
        }
    users = report.streams[1]
    assert users.last_entry_age_s == 5.0
    assert users.oldest_pending is not None
    assert users.oldest_pending.age_s == (now_ms - id_ms(users.oldest_pending.id)) / 1000
    # the oldest waiting change's commit time (source.ts_ms) drives waiting_lag_s
    assert users.waiting_lag_s is not None and users.waiting_lag_s >= 5.0


def test_nil_lag_is_reported_as_null_with_an_explanation(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    ids = add_users(r, 4)
    r.xgroup_create(STREAM, GROUP, id="0")
    r.xreadgroup(GROUP, "c1", {STREAM: ">"}, count=1)
    r.xack(STREAM, GROUP, ids[0])
    r.xdel(STREAM, ids[2])  # a deletion inside the unread range: Redis cannot count the lag
    assert r.xinfo_groups(STREAM)[0]["lag"] is None
    cfg = write_config(tmp_path / "c.yaml", redis_url, claim_idle_ms=60_000)
    ensure_library(r)
    code, doc = status_json(cfg)
    s = stream_doc(doc)
    assert s["lag"] is None and "cannot count" in s["lag_note"]
    assert s["unread"] is True and s["oldest_unread_id"] == ids[1].decode()
    assert code == ExitCode.OK, doc["problems"]  # c1 is reading
    assert "lag ?:" in invoke(cfg).stdout
    # the same, once c1 has been idle longer than a short claim_idle_ms
    cfg = write_config(tmp_path / "c.yaml", redis_url, claim_idle_ms=100)
    wait_until(lambda: (consumer_idle_ms(r, STREAM, "c1") or 0) > 100, message="c1 idle")
    code, doc = status_json(cfg)
    assert code == ExitCode.UNHEALTHY  # unread entries, and c1 stopped reading
    (problem,) = doc["problems"]
    assert problem.startswith(f"{STREAM}: no live consumer while entries unread (c1: idle, idle ")
    assert problem.endswith(", 0 pending)")


def test_stream_without_group_is_reported(r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    add_users(r, 2)
    ensure_library(r)
    cfg = write_config(tmp_path / "c.yaml", redis_url)
    code, doc = status_json(cfg)
    assert code == ExitCode.UNHEALTHY
    s = stream_doc(doc)
    assert s["group_exists"] is False and s["unread"] is True and s["consumers"] == []
    assert doc["problems"] == [
        f"{STREAM}: 2 entries but no consumer group 'streamsync' (no worker ever started on"
        " this stream)"
    ]


def test_missing_library_and_evicting_policy_are_problems(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.yaml", redis_url)
    previous = r.config_get("maxmemory-policy")["maxmemory-policy"]
    assert previous is not None
    r.config_set("maxmemory-policy", "allkeys-lru")
    try:
        code, doc = status_json(cfg)
    finally:
        r.config_set("maxmemory-policy", previous)
    assert code == ExitCode.UNHEALTHY
    assert doc["memory"]["maxmemory_policy"] == "allkeys-lru"
    assert doc["library"]["loaded"] is None
    assert any(p.startswith("Functions library streamsync not loaded") for p in doc["problems"])
    assert any(
        p.startswith("maxmemory-policy allkeys-lru can evict") and "target:" in p
        for p in doc["problems"]
    )
    assert doc["memory"]["evicted_keys"] == r.info("stats")["evicted_keys"]
    (s,) = doc["streams"]
    assert s["exists"] is False and s["length"] == 0 and s["group_exists"] is False


EXPECTED_KEYS = {
    "": {
        "claim_idle_ms",
        "collection_rules",
        "json_encodings",
        "generated_at_ms",
        "group",
        "healthy",
        "keyspace",
        "library",
        "nodes",
        "memory",
        "notes",
        "problems",
        "redis",
        "schema_version",
        "stream_prefix",
        "streams",
        "target",
        "thresholds",
    },
    "keyspace": {"hit_rate", "hits", "misses"},
    "library": {"layout", "loaded", "shipped"},
    "memory": {
        "evicted_keys",
        "maxmemory_bytes",
        "maxmemory_policy",
        "used_memory_bytes",
        "used_ratio",
    },
    "redis": {"url", "version"},
    "thresholds": {"max_lag_s", "max_pending_age_s"},
    "stream": {
        "consumers",
        "counts",
        "dlq_length",
        "dlq_stream",
        "entries_read",
        "error",
        "exists",
        "group_exists",
        "lag",
        "lag_note",
        "last_applied_id",
        "last_applied_ms",
        "last_delivered_id",
        "last_entry_age_s",
        "last_entry_id",
        "last_source_ts_ms",
        "length",
        "name",
        "oldest_pending",
        "oldest_unread_age_s",
        "oldest_unread_id",
        "pending",
        "since_last_applied_s",
        "sync_lag_s",
        "totals",
        "unread",
        "waiting_lag_s",
    },
    "consumer": {"alive", "dead", "idle_s", "inactive_s", "name", "pending", "state"},
    "oldest_pending": {"age_s", "consumer", "consumer_idle_s", "deliveries", "id", "idle_s"},
}


def test_json_document_keys_are_stable_and_sorted(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.yaml", redis_url, claim_idle_ms=100)
    add_users(r, 2)
    drain(cfg)
    add_users(r, 2, lsn0=300, op="u")
    r.xreadgroup(GROUP, "crashed", {STREAM: ">"}, count=1)
    result = invoke(cfg, "--json")
    doc = json.loads(result.stdout)
    assert result.stdout.strip() == json.dumps(doc, sort_keys=True, indent=2)
    assert doc["schema_version"] == 1
    assert set(doc) == EXPECTED_KEYS[""]
    assert doc["target"] is None  # no target section: the cache is in this Redis
    for name in ("keyspace", "library", "memory", "redis", "thresholds"):
        assert set(doc[name]) == EXPECTED_KEYS[name], name
    s = stream_doc(doc)
    assert set(s) == EXPECTED_KEYS["stream"]
    assert set(s["oldest_pending"]) == EXPECTED_KEYS["oldest_pending"]
    for c in s["consumers"]:
        assert set(c) == EXPECTED_KEYS["consumer"]
    # durations are float seconds, instants integer milliseconds
    assert isinstance(s["last_entry_age_s"], float) and isinstance(s["last_applied_ms"], int)
    assert isinstance(doc["generated_at_ms"], int)
    # a stream with nothing in it has every key too, with nulls
    cfg2 = write_config(tmp_path / "c2.yaml", redis_url, streams=["app.public.empty"])
    empty = stream_doc(status_json(cfg2)[1], "app.public.empty")
    assert set(empty) == EXPECTED_KEYS["stream"]
    assert empty["last_entry_id"] is None and empty["sync_lag_s"] is None


@pytest.fixture
def acl_user(r: redis.Redis) -> Iterator[tuple[str, str]]:
    """A user with every permission and a password, on the session server (removed after)."""
    user, password = "status-user", "Sup3rS3cretPa55"
    r.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], keys="*", channels="*", commands=["+@all"]
    )
    yield user, password
    r.acl_deluser(user)


def port_of(redis_url: str) -> int:
    return int(redis_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])


def test_password_is_never_printed(
    r: redis.Redis, redis_url: str, tmp_path: Path, acl_user: tuple[str, str]
) -> None:
    user, password = acl_user
    port = port_of(redis_url)
    add_users(r, 1)
    drain(write_config(tmp_path / "worker.yaml", redis_url))
    cfg = write_config(tmp_path / "c.yaml", f"redis://{user}@127.0.0.1:{port}/0")
    full_url = f"redis://{user}:{password}@127.0.0.1:{port}/0"
    for env in ({REDIS_PASSWORD_ENV: password}, {REDIS_URL_ENV: full_url}):
        for args in ((), ("--json",), ("--watch", "--iterations", "1")):
            result = invoke(cfg, *args, env=env)
            assert result.exit_code == ExitCode.OK, result.output
            assert password not in result.output and password not in result.stderr
            assert f"redis://***@127.0.0.1:{port}/0" in result.output
    # Redis unreachable, and a wrong password: the refusal is reported, the password is not
    down = f"redis://{user}:{password}@127.0.0.1:{free_port()}/0"
    wrong = f"redis://{user}:Wr0ngPassw0rd@127.0.0.1:{port}/0"
    for url, secret in ((down, password), (wrong, "Wr0ngPassw0rd")):
        result = invoke(cfg, env={REDIS_URL_ENV: url})
        assert result.exit_code == ExitCode.FAILURE
        assert "cannot read redis" in result.stderr
        assert secret not in result.output and secret not in result.stderr


def test_a_read_only_monitoring_user_gets_a_report(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """The least-privilege status user (acl.acl_rules(read_only=True)) can run it."""
    add_users(r, 2)
    drain(write_config(tmp_path / "worker.yaml", redis_url))
    user, password = "status-ro", "R3adOnlyPa55"
    cfg = write_config(tmp_path / "c.yaml", f"redis://{user}@127.0.0.1:{port_of(redis_url)}/0")
    settings = load_settings(cfg, environ={})
    rules = acl.acl_rules(settings, read_only=True)
    env = {REDIS_PASSWORD_ENV: password}
    try:
        r.execute_command("ACL", "SETUSER", user, "reset", "on", ">" + password, *rules)
        r.acl_log_reset()
        code, doc = status_json(cfg, env=env)
        assert r.acl_log() == []  # not one command refused
        # without TIME and INFO: a report still, saying what it could not read
        r.execute_command("ACL", "SETUSER", user, "-time", "-info")
        code2, doc2 = status_json(cfg, env=env)
    finally:
        r.acl_deluser(user)
    assert code == ExitCode.OK, doc["problems"]
    s = stream_doc(doc)
    assert s["length"] == r.xlen(STREAM) and s["totals"] == {"applied": 2}
    assert doc["library"]["loaded"] == doc["library"]["shipped"]
    assert doc["memory"]["maxmemory_policy"] == "noeviction" and doc["notes"] == []
    assert code2 == ExitCode.OK, doc2["problems"]
    assert doc2["memory"] is None and doc2["keyspace"] is None and doc2["redis"]["version"] is None
    assert len(doc2["notes"]) == 2
    assert doc2["notes"][0].startswith("TIME not permitted")
    assert doc2["notes"][1].startswith("INFO not permitted")
    assert stream_doc(doc2)["totals"] == s["totals"]


def test_redis_down_exits_1_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "c.yaml", f"redis://127.0.0.1:{port}/0")
    result = invoke(cfg)
    assert result.exit_code == ExitCode.FAILURE
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"status: cannot read redis at redis://127.0.0.1:{port}/0: ")
    assert "Traceback" not in result.output


def test_invalid_configuration_exits_3(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("source: {streams: [a]}\nrules: []\nworker: {batch_sise: 1}\n")
    result = invoke(cfg)
    assert result.exit_code == ExitCode.CONFIG_INVALID
    assert "batch_sise" in result.stderr


def test_watch_renders_and_stops_after_the_iterations(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    add_users(r, 2)
    cfg = write_config(tmp_path / "c.yaml", redis_url)
    drain(cfg)
    result = invoke(cfg, "--watch", "--interval-s", "0.05", "--iterations", "2")
    assert result.exit_code == ExitCode.OK, result.output
    assert "healthy" in result.stdout and "Ctrl-C" in result.stdout
    result = invoke(cfg, "--watch", "--json", "--interval-s", "0.05", "--iterations", "3")
    assert result.exit_code == ExitCode.OK
    docs = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(docs) == 3 and all(d["healthy"] for d in docs)
    # unhealthy at the last iteration: that code
    r.xadd(STREAM + ":dlq", {"reason": "x"})
    result = invoke(cfg, "--watch", "--interval-s", "0.05", "--iterations", "1")
    assert result.exit_code == ExitCode.UNHEALTHY


def test_watch_survives_redis_being_unreachable(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", f"redis://127.0.0.1:{free_port()}/0")
    result = invoke(cfg, "--watch", "--interval-s", "0.05", "--iterations", "2")
    assert result.exit_code == ExitCode.FAILURE
    assert "cannot read redis" in result.stdout


# -- health rules, on hand-built reports ------------------------------------------------------

NOW = 1_800_000_000_000


def consumer(
    name: str = "w1", pending: int = 0, idle_s: float = 0.5, state: str = "active"
) -> ConsumerStatus:
    return ConsumerStatus(
        name=name,
        pending=pending,
        idle_s=idle_s,
        inactive_s=None,
        alive=False,
        dead=state == "dead",
        state=state,
    )


def stream(**overrides: Any) -> StreamStatus:
    """A healthy, caught-up stream; ``overrides`` change it."""
    base = StreamStatus(
        name=STREAM,
        exists=True,
        error=None,
        length=10,
        last_entry_id=f"{NOW - 1000}-0",
        last_entry_age_s=1.0,
        group_exists=True,
        last_delivered_id=f"{NOW - 1000}-0",
        entries_read=10,
        lag=0,
        lag_note=None,
        unread=False,
        oldest_unread_id=None,
        oldest_unread_age_s=None,
        pending=0,
        oldest_pending=None,
        consumers=(consumer(),),
        dlq_stream=STREAM + ":dlq",
        dlq_length=0,
        counts={"c": {"applied": 10}},
        totals={"applied": 10},
        last_applied_ms=NOW - 900,
        last_applied_id=f"{NOW - 1000}-0",
        last_source_ts_ms=NOW - 1100,
        sync_lag_s=1.1,
        since_last_applied_s=0.9,
        waiting_lag_s=None,
    )
    return dataclasses.replace(base, **overrides)


def report(*streams: StreamStatus, **overrides: Any) -> StatusReport:
    base = StatusReport(
        generated_at_ms=NOW,
        redis=RedisStatus(url="redis://127.0.0.1:6379/0", version="7.0.15"),
        group=GROUP,
        stream_prefix=None,
        claim_idle_ms=30_000,
        streams=streams or (stream(),),
        memory=MemoryStatus(
            used_memory_bytes=10_000_000,
            maxmemory_bytes=0,
            maxmemory_policy="noeviction",
            used_ratio=None,
        ),
        keyspace=KeyspaceStatus(hits=9, misses=1, hit_rate=0.9),
        library=LibraryStatus(loaded="1.1.0", shipped="1.1.0"),
    )
    return dataclasses.replace(base, **overrides)


def pending_entry(age_s: float = 1.0, consumer: str = "w1", idle_s: float = 1.0) -> OldestPending:
    return OldestPending(
        id=f"{NOW - int(age_s * 1000)}-0",
        age_s=age_s,
        consumer=consumer,
        idle_s=idle_s,
        deliveries=1,
        consumer_idle_s=idle_s,
    )


def test_problems_healthy_baseline() -> None:
    assert problems(report(), Thresholds()) == []


def test_problems_idle_system_with_old_last_change_is_healthy() -> None:
    old = stream(sync_lag_s=86_400.0, since_last_applied_s=86_400.0, consumers=())
    assert problems(report(old), Thresholds(max_lag_s=60)) == []


def test_problems_waiting_entries_without_live_consumer() -> None:
    dead = consumer("crashed", pending=3, idle_s=45.0, state="dead")
    s = stream(pending=3, oldest_pending=pending_entry(45, "crashed", 45), consumers=(dead,))
    (p,) = problems(report(s), Thresholds())
    assert p == (
        f"{STREAM}: no live consumer while 3 entries pending (crashed: dead, idle 45.0s, 3 pending)"
    )
    # an idle consumer (nothing pending, idle past claim_idle_ms) is not reading either
    idle = consumer("gone", idle_s=40.0, state="idle")
    s = stream(lag=2, unread=True, waiting_lag_s=1.0, consumers=(idle,))
    assert problems(report(s), Thresholds()) == [
        f"{STREAM}: no live consumer while 2 unread (gone: idle, idle 40.0s, 0 pending)"
    ]
    s = stream(lag=None, unread=True, waiting_lag_s=1.0, consumers=())
    assert problems(report(s), Thresholds()) == [
        f"{STREAM}: no live consumer while entries unread (the group has no consumers)"
    ]
    # one active consumer is enough
    s = stream(lag=2, unread=True, waiting_lag_s=1.0, consumers=(idle, consumer()))
    assert problems(report(s), Thresholds()) == []


def test_problems_sync_lag_while_entries_wait() -> None:
    behind = stream(lag=50, unread=True, sync_lag_s=120.0, waiting_lag_s=118.0)
    (p,) = problems(report(behind), Thresholds(max_lag_s=60))
    assert p == (
        f"{STREAM}: behind: sync lag 2m00s, oldest waiting change committed 1m58s ago"
        " (over --max-lag-s 60), 50 unread"
    )
    assert problems(report(behind), Thresholds(max_lag_s=200)) == []
    # an hour-old last change and an entry that arrived just now: not behind
    fresh = stream(lag=1, unread=True, sync_lag_s=3_600.0, waiting_lag_s=0.01)
    assert problems(report(fresh), Thresholds(max_lag_s=60)) == []
    # nothing applied yet: the oldest waiting change decides
    never = stream(lag=5, unread=True, sync_lag_s=None, last_source_ts_ms=None, waiting_lag_s=90.0)
    (p,) = problems(report(never), Thresholds(max_lag_s=60))
    assert p.startswith(f"{STREAM}: behind: nothing applied yet, oldest waiting change")


def test_problems_oldest_pending_age() -> None:
    s = stream(pending=1, oldest_pending=pending_entry(61.0, "w1", 2.0))
    (p,) = problems(report(s), Thresholds())  # default: 2 x claim_idle_ms = 60s
    assert p.startswith(f"{STREAM}: oldest pending entry {NOW - 61000}-0 is 1m01s old (over 60s)")
    assert "held by w1, delivered 1 time, idle 2.0s" in p
    assert problems(report(s), Thresholds(max_pending_age_s=120)) == []
    assert len(problems(report(s, claim_idle_ms=10_000), Thresholds())) == 1
    assert problems(report(s, claim_idle_ms=40_000), Thresholds()) == []


def test_problems_dead_letters() -> None:
    (p,) = problems(report(stream(dlq_length=3)), Thresholds())
    assert p == f"{STREAM}: 3 dead letters in {STREAM}:dlq (read them: XRANGE {STREAM}:dlq - +)"


def test_problems_library_versions() -> None:
    def lib(loaded: str | None) -> list[str]:
        return problems(report(library=LibraryStatus(loaded, "1.1.0")), Thresholds())

    assert lib("1.1.0") == [] and lib("1.0.2") == [] and lib("2.0.0") == []
    (p,) = lib(None)
    assert p.startswith("Functions library streamsync not loaded")
    (p,) = lib("0.9.0")
    assert p.startswith("Functions library 0.9.0 loaded, an older major version than 1.1.0")


def memory(policy: str, evicted_keys: int = 0) -> MemoryStatus:
    return MemoryStatus(
        used_memory_bytes=1,
        maxmemory_bytes=1 << 30,
        maxmemory_policy=policy,
        used_ratio=0.0,
        evicted_keys=evicted_keys,
    )


def target(policy: str = "noeviction", *, separate: bool = True, **overrides: Any) -> TargetStatus:
    base = TargetStatus(
        url="redis://10.0.0.2:6379/0",
        error=None,
        separate=separate,
        version="7.0.15",
        memory=memory(policy, evicted_keys=12),
        keyspace=KeyspaceStatus(hits=9, misses=1, hit_rate=0.9),
        library=LibraryStatus(loaded="1.1.0", shipped="1.1.0"),
    )
    return dataclasses.replace(base, **overrides)


@pytest.mark.parametrize("policy", ["allkeys-lru", "allkeys-lfu", "allkeys-random", "newpolicy"])
def test_problems_one_redis_evicting_any_key(policy: str) -> None:
    (p,) = problems(report(memory=memory(policy)), Thresholds())
    assert p.startswith(f"maxmemory-policy {policy} can evict any key: unread stream entries")
    assert "use noeviction or a volatile-* policy" in p
    assert "move the cache to a Redis of its own (target:)" in p
    unlimited = dataclasses.replace(memory(policy), maxmemory_bytes=0, used_ratio=None)
    (p,) = problems(report(memory=unlimited), Thresholds())
    assert "no maxmemory set yet" in p


@pytest.mark.parametrize("policy", ["volatile-lru", "volatile-lfu", "volatile-ttl", "noeviction"])
def test_problems_one_redis_evicting_keys_with_a_ttl_is_safe(policy: str) -> None:
    # buckets, streams and marks have no TTL: only cached rows with ttl_s go, as misses
    assert problems(report(memory=memory(policy, evicted_keys=7)), Thresholds()) == []


@pytest.mark.parametrize("policy", ["volatile-lru", "allkeys-lru", "volatile-ttl"])
def test_problems_streams_redis_beside_a_target_must_not_evict(policy: str) -> None:
    (p,) = problems(report(memory=memory(policy), target=target()), Thresholds())
    assert p.startswith(f"streams' redis: maxmemory-policy {policy} can evict stream entries")
    assert "use noeviction" in p
    assert problems(report(memory=memory("noeviction"), target=target()), Thresholds()) == []


@pytest.mark.parametrize("policy", ["noeviction", "volatile-lru", "allkeys-lru", "allkeys-random"])
def test_problems_a_target_of_its_own_may_evict(policy: str) -> None:
    assert problems(report(target=target(policy)), Thresholds()) == []


def test_problems_a_target_that_is_the_streams_redis_follows_the_one_redis_rules() -> None:
    same = target("allkeys-lru", separate=False)
    (p,) = problems(report(memory=memory("allkeys-lru"), target=same), Thresholds())
    assert p.startswith("maxmemory-policy allkeys-lru can evict any key")
    assert problems(report(memory=memory("volatile-lru"), target=same), Thresholds()) == []
    # its library is the streams' one: said once
    none = LibraryStatus(None, "1.1.0")
    found = problems(
        report(library=none, target=dataclasses.replace(same, library=none)), Thresholds()
    )
    assert [p[:40] for p in found] == ["Functions library streamsync not loaded "]


def test_problems_of_the_target_redis() -> None:
    missing = target(library=LibraryStatus(None, "1.1.0"))
    (p,) = problems(report(target=missing), Thresholds())
    assert p.startswith("target redis: Functions library streamsync not loaded")
    down = target(error="Connection refused", memory=None, keyspace=None, library=None)
    (p,) = problems(report(target=down), Thresholds())
    assert p == "target redis at redis://10.0.0.2:6379/0: cannot read it: Connection refused"
    (p,) = problems(report(library=LibraryStatus(None, "1.1.0"), target=target()), Thresholds())
    assert p.startswith("streams' redis: Functions library streamsync not loaded")


def test_problems_stream_errors_and_missing_group() -> None:
    broken = stream(error="the key is a string, not a stream", name="app.public.x")
    nogroup = stream(group_exists=False, length=4, unread=True, lag=None, consumers=())
    empty = stream(group_exists=False, length=0, exists=False, consumers=(), sync_lag_s=None)
    assert problems(report(broken, nogroup, empty), Thresholds()) == [
        "app.public.x: the key is a string, not a stream",
        f"{STREAM}: 4 entries but no consumer group 'streamsync' (no worker ever started on"
        " this stream)",
    ]


def test_problems_lists_every_problem_in_stream_order() -> None:
    a = stream(name="a", dlq_length=1)
    b = stream(name="b", pending=2, consumers=(), oldest_pending=pending_entry(1.0, "x", 1.0))
    found = problems(report(a, b, library=LibraryStatus(None, "1.1.0")), Thresholds())
    assert len(found) == 3
    assert found[0].startswith("a: 1 dead letter")
    assert found[1].startswith("b: no live consumer while 2 entries pending")
    assert found[2].startswith("Functions library streamsync not loaded")
