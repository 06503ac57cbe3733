"""The cache in a Redis of its own (``target:``): the configuration section, and a worker, its
TRUNCATE and resync paths and the operator commands on two real redis-servers (streams on the
session server, the cache on a second one), the target restarted under a running worker."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from streamsync import acl, status
from streamsync.buckets import Tables
from streamsync.cli import cli
from streamsync.config import (
    REDIS_PASSWORD_ENV,
    TARGET_PASSWORD_ENV,
    TARGET_URL_ENV,
    load_settings,
)
from streamsync.connection import NO_SETINFO
from streamsync.errors import ConfigError, ExitCode
from streamsync.functions import ensure_library, library_version
from streamsync.keys import StateKeys
from streamsync.metrics import RedisCollector
from streamsync.worker import Worker
from tests.debezium import add_change, entry_fields, envelope, write_config
from tests.replies import as_int, as_str, xadd, xrange, zscores
from tests.servers import RedisServer, free_port, wait_until
from tests.workers import WorkerProcess, WorkerThread, drain, outcomes

SECRET = "target-Secret-5e1"

BASE: dict[str, Any] = {
    "redis": {"url": "redis://10.0.0.1:6379/0"},
    "source": {"streams": ["app.public.users"]},
    "rules": [{"table": "public.users", "key": "user:{id}", "type": "hash"}],
}


def write(tmp_path: Path, data: dict[str, Any], name: str = "streamsync.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def with_target(**target: Any) -> dict[str, Any]:
    return {**BASE, "target": target}


# -- the configuration ---------------------------------------------------------------------------


def test_without_a_target_the_cache_is_in_the_streams_redis(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, BASE), environ={})
    assert settings.target is None
    assert settings.cache_redis is settings.redis


def test_a_target_takes_the_keys_of_redis(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "cache.pw").write_text(SECRET + "\n")
    cfg = write(
        tmp_path,
        with_target(
            url="rediss://cache.example:6380/1",
            username="cache",
            password_file="secrets/cache.pw",
            tls_ca_file="ca.pem",
            socket_timeout_s=3,
        ),
    )
    settings = load_settings(cfg, environ={REDIS_PASSWORD_ENV: "streams-pw"})
    target = settings.target
    assert target is not None and settings.cache_redis is target
    assert target.url == "rediss://cache.example:6380/1" and target.username == "cache"
    assert target.password is not None and target.password.get_secret_value() == SECRET
    assert target.tls_ca_file == tmp_path / "ca.pem" and target.socket_timeout_s == 3
    # each section keeps its own password
    assert settings.redis.password is not None
    assert settings.redis.password.get_secret_value() == "streams-pw"
    assert SECRET not in repr(settings) and SECRET not in settings.model_dump_json()


def test_the_target_environment_variables(tmp_path: Path) -> None:
    cfg = write(tmp_path, with_target(url="redis://10.0.0.2:6379/0", password_file="absent.pw"))
    settings = load_settings(cfg, environ={TARGET_PASSWORD_ENV: SECRET})
    assert settings.target is not None and settings.target.password is not None
    assert settings.target.password.get_secret_value() == SECRET
    assert settings.redis.password is None
    # the URL variable overrides the file's, and may carry the password
    env = {TARGET_URL_ENV: f"redis://app:{SECRET}@10.0.0.3:6381/2"}
    settings = load_settings(cfg, environ={**env, TARGET_PASSWORD_ENV: "wins"})
    assert settings.target is not None and settings.target.url == "redis://app@10.0.0.3:6381/2"
    assert settings.target.password is not None
    assert settings.target.password.get_secret_value() == "wins"
    # and names a target where the file has none
    settings = load_settings(write(tmp_path, BASE, "plain.yaml"), environ=env)
    assert settings.target is not None and settings.target.url == "redis://app@10.0.0.3:6381/2"
    assert settings.redis.url == "redis://10.0.0.1:6379/0"


def test_a_target_password_without_a_target_is_an_error(tmp_path: Path) -> None:
    cfg = write(tmp_path, BASE)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={TARGET_PASSWORD_ENV: SECRET})
    text = str(info.value)
    assert text.startswith(f"{cfg}: target: {TARGET_PASSWORD_ENV} is set, but")
    assert SECRET not in text


@pytest.mark.parametrize(
    ("section", "field", "message"),
    [
        ({"url": "redis://10.0.0.2/0", "password": SECRET}, "target.password", "does not belong"),
        ({"url": f"redis://u:{SECRET}@10.0.0.2/0"}, "target.url", "holds a password"),
    ],
)
def test_a_target_password_in_the_file_is_refused(
    tmp_path: Path, section: dict[str, Any], field: str, message: str
) -> None:
    cfg = write(tmp_path, {**BASE, "target": section})
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    text = str(info.value)
    assert f"{cfg}: {field}: " in text and message in text
    assert "target.password_file" in text and TARGET_PASSWORD_ENV in text
    assert SECRET not in text


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"username": "cache"}, "target: needs a 'url'"),
        ({"url": "http://10.0.0.2/0"}, "target.url: must start with redis://"),
        ({"url": "redis://10.0.0.2/0", "tls_verify": False}, "target.tls_verify: false turns"),
        ({"url": "redis://10.0.0.2/0", "socket_timeout_s": SECRET}, "target.socket_timeout_s:"),
        ({"url": "redis://10.0.0.2/0", "db": 1}, "target.db: unknown field"),
    ],
)
def test_target_errors_name_the_file_and_the_field(
    tmp_path: Path, section: dict[str, Any], expected: str
) -> None:
    cfg = write(tmp_path, {**BASE, "target": section})
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert f"{cfg}: {expected}" in str(info.value)
    assert SECRET not in str(info.value)  # values of the section are never echoed


def test_an_unreadable_target_password_file_names_the_field(tmp_path: Path) -> None:
    cfg = write(tmp_path, with_target(url="redis://10.0.0.2/0", password_file="missing.pw"))
    with pytest.raises(ConfigError, match=r"target\.password_file: cannot read .*missing\.pw"):
        load_settings(cfg, environ={})


# -- a worker on two Redis -----------------------------------------------------------------------

STREAM = "app.public.users"
GROUP = "streamsync"
STATS = f"streamsync:stats:{GROUP}:{STREAM}"

RULES: list[dict[str, Any]] = [
    {"table": "public.users", "key": "user:{id}", "type": "hash", "fields": ["id", "name", "plan"]},
    {"table": "public.users", "key": "plan:{plan}:users", "type": "set", "member": "{id}"},
    {
        "table": "public.users",
        "key": "balances",
        "type": "zset",
        "member": "user:{id}",
        "score": "balance",
    },
    {
        "table": "public.users",
        "key": "feed:{plan}",
        "type": "list",
        "value": "json",
        "fields": ["id", "name"],
        "max_len": 10,
    },
    {"table": "public.users", "key": "changes:users", "type": "stream", "fields": ["id", "plan"]},
    {"table": "public.users", "key": "email:{email|lower}", "type": "string", "value": "{id}"},
    {"table": "public.users", "key": "page:user:{id}", "mode": "invalidate"},
]


def target_config(
    path: Path,
    streams_url: str,
    cache_url: str,
    *,
    rules: list[dict[str, Any]] | None = None,
    **worker: Any,
) -> Path:
    """``write_config``'s configuration with the cache in ``cache_url`` (``target:``)."""
    write_config(path, streams_url, rules=rules or RULES, **worker)
    data = yaml.safe_load(path.read_text())
    data["target"] = {"url": cache_url}
    path.write_text(yaml.safe_dump(data))
    return path


def user(id_: int, name: str, plan: str, balance: float, email: str) -> dict[str, Any]:
    return {"id": id_, "name": name, "plan": plan, "balance": balance, "email": email}


def keys(client: redis.Redis) -> set[str]:
    return {as_str(k) for k in client.keys("*")}


def library_loaded(client: redis.Redis) -> bool:
    return bool(client.function_list(library="streamsync"))


def test_a_drain_applies_everything_to_the_target_and_nothing_cache_like_to_the_streams(
    r: redis.Redis, t: redis.Redis, redis_url: str, target_url: str, tmp_path: Path
) -> None:
    t.set("page:user:1", "<html>")  # what the application cached in its Redis
    r.set("page:user:1", "<html in the wrong redis>")
    add_change(r, STREAM, "c", user(1, "a", "free", 10, "A@x.io"), 10)
    add_change(r, STREAM, "c", user(2, "b", "free", 20, "b@x.io"), 11)
    add_change(r, STREAM, "c", user(3, "c", "pro", 30, "c@x.io"), 12)
    add_change(r, STREAM, "u", user(2, "b", "pro", 25, "B2@x.io"), 13)
    add_change(r, STREAM, "d", user(3, "c", "pro", 30, "c@x.io"), 14)
    r.xadd(STREAM, {"not": "a debezium entry"})
    worker = drain(target_config(tmp_path / "c.yaml", redis_url, target_url))
    assert outcomes(worker) == {"applied": 5, "dead_lettered": 1}
    # the cache, and every record it needs, in the target
    assert t.hgetall("user:1") == {b"id": b"1", b"name": b"a", b"plan": b"free"}
    assert t.hgetall("user:2") == {b"id": b"2", b"name": b"b", b"plan": b"pro"}
    assert not t.exists("user:3")
    assert t.smembers("plan:free:users") == {b"1"} and t.smembers("plan:pro:users") == {b"2"}
    assert zscores(t, "balances") == {b"user:1": 10.0, b"user:2": 25.0}
    assert t.exists("feed:free") and t.exists("feed:pro")
    assert t.get("email:a@x.io") == b"1" and t.get("email:b2@x.io") == b"2"
    assert not t.exists("email:b@x.io") and not t.exists("email:c@x.io")
    assert [f[b"op"] for _, f in xrange(t, "changes:users")] == [b"c", b"c", b"c", b"u", b"d"]
    assert not t.exists("page:user:1")
    assert any(k.startswith("streamsync:b:") for k in keys(t))
    assert not any(
        k.startswith(("app.", "streamsync:stats:", "streamsync:alive:")) for k in keys(t)
    )
    # the streams' Redis keeps the stream, its dead letters and the counters: nothing else
    assert keys(r) == {STREAM, STREAM + ":dlq", STATS, "page:user:1"}
    assert r.get("page:user:1") == b"<html in the wrong redis>"
    assert r.xpending(STREAM, GROUP)["pending"] == 0
    assert as_int(r.hget(STATS, "n:public.users:c:applied")) == 3
    # the library runs in both: the batch calls in the target, trimming in the streams'
    assert library_loaded(t) and library_loaded(r)


def add_truncate(r: redis.Redis, lsn: int) -> None:
    xadd(r, STREAM, entry_fields(None, envelope("t", "public.users", lsn)))


def test_truncate_sweeps_the_target(
    r: redis.Redis, t: redis.Redis, redis_url: str, target_url: str, tmp_path: Path
) -> None:
    rules = [RULES[0], RULES[1], RULES[4]]
    cfg = target_config(tmp_path / "c.yaml", redis_url, target_url, rules=rules)
    for i in range(1, 4):
        add_change(r, STREAM, "c", user(i, "x", "free", i, "x@x.io"), 100 + i)
    add_truncate(r, 200)
    add_change(r, STREAM, "c", user(9, "y", "pro", 9, "y@x.io"), 300)
    worker = drain(cfg)
    assert {o: n for (_, _, op, o), n in worker.counts.items() if op == "t"} == {"applied": 1}
    assert sorted(t.keys("user:*")) == [b"user:9"]
    assert t.smembers("plan:pro:users") == {b"9"} and not t.exists("plan:free:users")
    assert sorted(f[b"op"] for _, f in xrange(t, "changes:users")) == [b"c"] * 4 + [b"t"]
    # capture replays the changes from before the truncate: their tombstones are in the target
    for i in range(1, 4):
        add_change(r, STREAM, "c", user(i, "x", "free", i, "x@x.io"), 100 + i)
    drain(cfg)
    assert sorted(t.keys("user:*")) == [b"user:9"] and not t.exists("plan:free:users")
    assert keys(r) == {STREAM, STATS}


def test_resync_marks_epochs_in_the_streams_redis_and_sweeps_the_target(
    r: redis.Redis, t: redis.Redis, redis_url: str, target_url: str, tmp_path: Path
) -> None:
    cfg = target_config(tmp_path / "c.yaml", redis_url, target_url, rules=[RULES[0]])
    add_change(r, STREAM, "u", user(1, "newer, lost by the restore", "free", 1, "a"), 9_000_000)
    add_change(
        r, STREAM, "c", user(2, "created after the restore point", "free", 2, "b"), 9_000_100
    )
    drain(cfg)
    runner = CliRunner()
    started = runner.invoke(cli, ["resync", "-c", str(cfg), "--table", "public.users"])
    assert started.exit_code == 0, started.output
    assert r.exists("streamsync:epochs") and not t.exists("streamsync:epochs")
    add_change(r, STREAM, "r", user(1, "as restored", "free", 1, "a"), 5_000)
    add_change(r, STREAM, "r", user(3, "only in the restored database", "free", 3, "c"), 5_000)
    drain(cfg)
    assert t.hget("user:1", "name") == b"as restored" and t.exists("user:2")
    finished = runner.invoke(
        cli, ["resync", "-c", str(cfg), "--table", "public.users", "--finish", "--wait-s", "10"]
    )
    assert finished.exit_code == 0, finished.output
    assert "1 row(s) not in the re-snapshot removed" in finished.output
    assert sorted(t.keys("user:*")) == [b"user:1", b"user:3"]
    assert not any(k.startswith("user:") for k in keys(r))


def test_dlq_replay_direct_applies_to_the_target(
    r: redis.Redis, t: redis.Redis, redis_url: str, target_url: str, tmp_path: Path
) -> None:
    cfg = target_config(
        tmp_path / "c.yaml", redis_url, target_url, rules=[RULES[0]], max_deliveries=1
    )
    settings = load_settings(cfg, environ={})
    # the rule's (only) bucket is not a hash: the record cannot be read, the write fails
    record = Tables(StateKeys.from_settings(settings.worker)).table(settings.rules[0]).meta
    t.set(record, "not a bucket")
    add_change(r, STREAM, "c", user(5, "e", "free", 5, "e"), 10)
    drain(cfg)
    assert r.xlen(STREAM + ":dlq") == 1 and not t.exists(STREAM + ":dlq")
    t.delete(record)  # the cause, fixed
    result = CliRunner().invoke(
        cli, ["dlq", "replay", "-c", str(cfg), "--stream", STREAM, "--all", "--direct"]
    )
    assert result.exit_code == 0, result.output
    assert t.hgetall("user:5") == {b"id": b"5", b"name": b"e", b"plan": b"free"}
    assert r.xlen(STREAM + ":dlq") == 0 and not r.exists("user:5")


def test_the_target_restarting_without_its_data_under_a_running_worker(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    cache = RedisServer(tmp_path / "cache")  # no persistence: a restart loses the library
    cache.start()
    cfg = target_config(tmp_path / "c.yaml", redis_url, cache.url, rules=[RULES[0]])
    t = cache.client()
    try:
        with WorkerProcess(cfg, "w1", tmp_path) as worker:
            add_change(r, STREAM, "c", user(1, "before", "free", 1, "a"), 10)
            wait_until(lambda: t.exists("user:1") == 1, timeout=30, message="user:1 applied")
            cache.stop()
            # captured while the cache is down: read, never acknowledged before applied
            for i in range(2, 6):
                add_change(r, STREAM, "c", user(i, "during", "free", i, "a"), 10 + i)
            wait_until(
                lambda: r.xpending(STREAM, GROUP)["pending"] > 0 and "lost" in worker.log(),
                timeout=30,
                message="entries read, their apply failing, none acknowledged",
            )
            cache.restart()
            t = cache.client()
            add_change(r, STREAM, "c", user(6, "after", "free", 6, "a"), 20)
            wait_until(
                lambda: all(t.exists(f"user:{i}") for i in range(2, 7)),
                timeout=60,
                message="every change from the outage on applied to the restarted target",
            )
            wait_until(
                lambda: r.xpending(STREAM, GROUP)["pending"] == 0,
                timeout=30,
                message="everything acknowledged",
            )
            assert library_loaded(t)
            assert not t.exists("user:1")  # lost with the restart, as the cache was
            worker.terminate()
            assert worker.wait(30) == ExitCode.OK, worker.log_tail()
        assert worker.summary()["applied"] >= 6
        assert "reconnecting" in worker.log()
    finally:
        t.close()
        cache.stop()


def test_the_worker_knows_whether_the_target_may_evict_its_bookkeeping(
    r: redis.Redis, t: redis.Redis, redis_url: str, target_url: str, tmp_path: Path
) -> None:
    t.config_set("maxmemory-policy", "allkeys-lru")
    settings = load_settings(target_config(tmp_path / "c.yaml", redis_url, target_url), environ={})
    worker = Worker(settings, consumer="w1")
    worker.target_policy.interval_s = 0.05
    with WorkerThread(worker):
        wait_until(lambda: worker.target_policy.policy == "allkeys-lru", message="read at connect")
        assert worker.target_policy.separate and worker.target_policy.bookkeeping_evictable
        assert worker._core.bookkeeping_evictable
        t.config_set("maxmemory-policy", "volatile-lru")
        wait_until(lambda: not worker._core.bookkeeping_evictable, message="the change seen")
        assert worker.target_policy.policy == "volatile-lru"
    # one Redis under allkeys-*: not the library's contract, an unsafe setup (status says so)
    r.config_set("maxmemory-policy", "allkeys-lru")
    one = Worker(load_settings(write_config(tmp_path / "one.yaml", redis_url), environ={}), "w2")
    with WorkerThread(one):
        wait_until(lambda: one.target_policy.policy == "allkeys-lru", message="read at connect")
        assert not one.target_policy.separate and not one._core.bookkeeping_evictable
    # a target URL reaching the streams' Redis itself is no target of its own
    same = load_settings(target_config(tmp_path / "same.yaml", redis_url, redis_url), environ={})
    twin = Worker(same, "w3")
    with WorkerThread(twin):
        wait_until(lambda: twin.target_policy.policy is not None, message="read at connect")
        assert not twin.target_policy.separate and not twin._core.bookkeeping_evictable


# -- status and metrics of two Redis ---------------------------------------------------------------


def status_json(cfg: Path) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(cli, ["status", "-c", str(cfg), "--json"])
    assert result.exit_code in (ExitCode.OK, ExitCode.UNHEALTHY), result.output
    return result.exit_code, json.loads(result.stdout)


def evict_some(client: redis.Redis, policy: str = "allkeys-random") -> int:
    """Make ``client``'s server evict keys under ``policy``; how many it evicted."""
    used = as_int(client.info("memory")["used_memory"])
    client.config_set("maxmemory-policy", policy)
    client.config_set("maxmemory", str(used + 256 * 1024))
    pipe = client.pipeline(transaction=False)
    for i in range(2_000):
        pipe.set(f"filler:{i}", "x" * 1024)
    pipe.execute(raise_on_error=False)
    # no limit any more: the count stays where it is (a server at its limit evicts on reads too)
    client.config_set("maxmemory", "0")
    return as_int(client.info("stats")["evicted_keys"])


def test_status_reads_both_redis_and_judges_their_policies(
    r: redis.Redis, t: redis.Redis, redis_url: str, target_url: str, tmp_path: Path
) -> None:
    cfg = target_config(tmp_path / "c.yaml", redis_url, target_url, rules=[RULES[0]])
    add_change(r, STREAM, "c", user(1, "a", "free", 1, "a"), 10)
    drain(cfg)
    # a target of its own may evict, whatever its policy
    evicted = evict_some(t)
    assert evicted > 0
    code, doc = status_json(cfg)
    assert code == ExitCode.OK, doc["problems"]
    target = doc["target"]
    assert set(target) == {
        "url",
        "error",
        "separate",
        "version",
        "memory",
        "keyspace",
        "library",
        "nodes",
    }
    assert target["nodes"] == []  # a single server
    assert target["url"] == target_url and target["separate"] is True and target["error"] is None
    assert target["memory"]["maxmemory_policy"] == "allkeys-random"
    assert target["memory"]["evicted_keys"] == evicted
    assert target["library"]["loaded"] == target["library"]["shipped"]
    assert doc["memory"]["evicted_keys"] == 0 and doc["library"]["loaded"] is not None
    table = CliRunner().invoke(cli, ["status", "-c", str(cfg)])
    assert "streams' redis" in table.output and "target redis 7" in table.output
    assert f"policy allkeys-random, {evicted} evicted" in " ".join(table.output.split())
    # the streams' Redis beside it must not evict at all
    r.config_set("maxmemory-policy", "volatile-lru")
    code, doc = status_json(cfg)
    assert code == ExitCode.UNHEALTHY
    (problem,) = doc["problems"]
    assert problem.startswith("streams' redis: maxmemory-policy volatile-lru can evict stream")


def test_status_of_a_target_that_cannot_be_read_or_is_the_streams_redis(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    cfg = target_config(tmp_path / "c.yaml", redis_url, down, rules=[RULES[0]])
    ensure_library(r)
    code, doc = status_json(cfg)
    assert code == ExitCode.UNHEALTHY
    assert doc["streams"][0]["name"] == STREAM  # the streams' report stands
    (problem,) = doc["problems"]
    assert problem.startswith(f"target redis at {down}: cannot read it: ")
    assert doc["target"]["error"] and doc["target"]["memory"] is None
    # a target URL naming the streams' Redis: the rules of one Redis apply
    same = target_config(tmp_path / "same.yaml", redis_url, redis_url, rules=[RULES[0]])
    r.config_set("maxmemory-policy", "volatile-lru")
    code, doc = status_json(same)
    assert code == ExitCode.OK, doc["problems"]
    assert doc["target"]["separate"] is False
    assert any("reaches the streams' Redis itself" in n for n in doc["notes"])
    r.config_set("maxmemory-policy", "allkeys-lru")
    code, doc = status_json(same)
    (problem,) = doc["problems"]
    assert problem.startswith("maxmemory-policy allkeys-lru can evict any key")


def test_metrics_report_both_redis_and_their_evictions(
    r: redis.Redis, t: redis.Redis, redis_url: str, target_url: str, tmp_path: Path
) -> None:
    cfg = target_config(tmp_path / "c.yaml", redis_url, target_url, rules=[RULES[0]])
    add_change(r, STREAM, "c", user(1, "a", "free", 1, "a"), 10)
    drain(cfg)
    evict_some(t)
    collector = RedisCollector(load_settings(cfg, environ={}))
    registry = CollectorRegistry()
    registry.register(collector)
    try:
        stats = {"streams": r.info("stats"), "target": t.info("stats")}
        for side in ("streams", "target"):
            labels = {"redis": side}
            assert registry.get_sample_value("streamsync_redis_up", labels) == 1
            evicted = registry.get_sample_value("streamsync_redis_evicted_keys_total", labels)
            assert evicted == stats[side]["evicted_keys"]
            assert registry.get_sample_value("streamsync_redis_used_memory_bytes", labels)
            version = ".".join(map(str, library_version()))
            info = {"version": version, **labels}
            assert registry.get_sample_value("streamsync_library_loaded_info", info) == 1
        assert as_int(stats["target"]["evicted_keys"]) > 0
        assert registry.get_sample_value("streamsync_stream_length", {"stream": STREAM}) == 1
    finally:
        collector.close()
    # a target that does not answer: its up is 0, and the streams' figures stay
    cfg_down = target_config(
        tmp_path / "down.yaml", redis_url, f"redis://127.0.0.1:{free_port()}/0", rules=[RULES[0]]
    )
    collector = RedisCollector(load_settings(cfg_down, environ={}))
    try:
        families = {f.name: f for f in collector.collect()}
    finally:
        collector.close()
    ups = {s.labels["redis"]: s.value for s in families["streamsync_redis_up"].samples}
    assert ups == {"streams": 1, "target": 0}
    memory = families["streamsync_redis_used_memory_bytes"].samples
    assert [s.labels for s in memory] == [{"redis": "streams"}]
    assert families["streamsync_stream_length"].samples


# -- a least-privileged user per Redis -------------------------------------------------------------

ADMIN_PASSWORD = "admin-pw-2b8e"
STREAMS_PASSWORD = "streams-pw-61d0"
CACHE_PASSWORD = "cache-pw-93aa"


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    """Two redis-servers of this test's own whose default user needs a password."""
    servers = (RedisServer(tmp_path / "streams"), RedisServer(tmp_path / "cache"))
    try:
        for server in servers:
            server.start()
            boot = server.client()
            boot.execute_command(
                "ACL", "SETUSER", "default", "on", "resetpass", ">" + ADMIN_PASSWORD
            )
            boot.close()
        yield servers
    finally:
        for server in servers:
            server.stop()


def admin(server: RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, password=ADMIN_PASSWORD)


def test_each_redis_gets_a_user_of_its_own(
    locked: tuple[RedisServer, RedisServer], tmp_path: Path
) -> None:
    streams, cache = locked
    (tmp_path / "streams.pw").write_text(STREAMS_PASSWORD + "\n")
    (tmp_path / "cache.pw").write_text(CACHE_PASSWORD + "\n")
    cfg = target_config(tmp_path / "c.yaml", streams.url, cache.url, max_deliveries=1)
    data = yaml.safe_load(cfg.read_text())
    data["redis"].update(username="streamsync", password_file="streams.pw")
    data["target"].update(username="streamsync-cache", password_file="cache.pw")
    cfg.write_text(yaml.safe_dump(data))
    settings = load_settings(cfg, environ={})
    r, t = admin(streams), admin(cache)
    try:
        for client, user_name, password, target in (
            (r, "streamsync", STREAMS_PASSWORD, False),
            (r, "streamsync-status", "s1", False),
            (t, "streamsync-cache", CACHE_PASSWORD, True),
            (t, "streamsync-status", "s2", True),
        ):
            rules = acl.acl_rules(settings, read_only="status" in user_name, target=target)
            client.execute_command(
                "ACL", "SETUSER", user_name, "reset", "on", ">" + password, *rules
            )
        t.set("page:user:1", "<html>")
        add_change(r, STREAM, "c", user(1, "a", "free", 10, "A@x.io"), 10)
        add_change(r, STREAM, "c", user(2, "b", "pro", 20, "b@x.io"), 11)
        add_truncate(r, 12)
        add_change(r, STREAM, "c", user(3, "c", "pro", 30, "c@x.io"), 13)
        add_change(r, STREAM, "u", user(3, "c2", "free", 35, "c@x.io"), 14)
        r.xadd(STREAM, {"not": "a debezium entry"})
        r.acl_log_reset()
        t.acl_log_reset()
        worker = drain(cfg)
        assert r.acl_log() == [] and t.acl_log() == []  # not one NOPERM on either
        assert outcomes(worker)["dead_lettered"] == 1
        assert t.hgetall("user:3") == {b"id": b"3", b"name": b"c2", b"plan": b"free"}
        assert not t.exists("user:1") and not t.exists("page:user:1")
        assert keys(r) == {STREAM, STREAM + ":dlq", STATS}
        # status as the read-only users of both
        s = redis.Redis(
            host="127.0.0.1",
            port=streams.port,
            username="streamsync-status",
            password="s1",
            **NO_SETINFO,
        )
        c = redis.Redis(
            host="127.0.0.1",
            port=cache.port,
            username="streamsync-status",
            password="s2",
            **NO_SETINFO,
        )
        try:
            report = status.collect(s, settings, target=c)
        finally:
            s.close()
            c.close()
        assert report.notes == () and report.target is not None and report.target.error is None
        assert report.target.memory is not None and report.target.library is not None
        assert status.problems(report, status.Thresholds()) == [
            f"{STREAM}: 1 dead letter in {STREAM}:dlq (read them: XRANGE {STREAM}:dlq - +)"
        ]
        assert r.acl_log() == [] and t.acl_log() == []
        assert_each_user_kept_to_its_redis(streams, cache)
    finally:
        r.close()
        t.close()


def assert_each_user_kept_to_its_redis(streams: RedisServer, cache: RedisServer) -> None:
    """Neither worker user reaches what belongs to the other Redis."""
    refused = {
        (cache.port, "streamsync-cache", CACHE_PASSWORD): [
            ("XADD", STREAM, "*", "k", "v"),
            ("XREADGROUP", "GROUP", GROUP, "x", "STREAMS", "streamsync:x", ">"),
        ],
        (streams.port, "streamsync", STREAMS_PASSWORD): [
            ("HSET", "user:1", "k", "v"),
            ("SSCAN", "streamsync:idx:x", "0"),
        ],
    }
    for (port, name, password), commands in refused.items():
        w = redis.Redis(host="127.0.0.1", port=port, username=name, password=password)
        try:
            for command in commands:
                with pytest.raises(redis.exceptions.NoPermissionError):
                    w.execute_command(*command)
        finally:
            w.close()


def test_the_acl_command_prints_the_target_user(tmp_path: Path) -> None:
    cfg = write(tmp_path, with_target(url="redis://10.0.0.2:6379/2"))
    runner = CliRunner()
    result = runner.invoke(cli, ["acl", "-c", str(cfg), "--target"])
    assert result.exit_code == 0, result.output
    line = result.output.strip()
    assert line.startswith("ACL SETUSER streamsync reset on ><password> resetkeys ~streamsync:*")
    assert "~user:*" in line and "~app.public.users" not in line
    assert "+xreadgroup" not in line and "+fcall" in line and "+select" in line
    streams = runner.invoke(cli, ["acl", "-c", str(cfg)]).output
    assert "~app.public.users" in streams and "~user:*" not in streams and "+select" not in streams
    status_line = runner.invoke(cli, ["acl", "-c", str(cfg), "--target", "--read-only"]).output
    assert status_line.split()[2] == "streamsync-status" and "~user:*" not in status_line
    # streamsync's records only, read-only: the bookkeeping layout marker
    assert " %R~streamsync:* " in status_line and "+get" in status_line
    plain = write(tmp_path, BASE, "plain.yaml")
    refused = runner.invoke(cli, ["acl", "-c", str(plain), "--target"])
    assert refused.exit_code == ExitCode.USAGE and "has no target section" in refused.output


def test_check_config_names_the_target(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {TARGET_URL_ENV: f"redis://app:{SECRET}@10.0.0.3:6381/2"}
    result = runner.invoke(cli, ["check-config", "-c", str(write(tmp_path, BASE))], env=env)
    assert result.exit_code == 0, result.output
    assert "  target: redis://***@10.0.0.3:6381/2 (the cache)" in result.output
    assert SECRET not in result.output
    plain = runner.invoke(cli, ["check-config", "-c", str(write(tmp_path, BASE, "p.yaml"))])
    assert "  target: none (the cache is in redis)" in plain.output
