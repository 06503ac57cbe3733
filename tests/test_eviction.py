"""A cache that may evict, under memory pressure, while older changes are replayed across two
workers: every cached row equals its newest change or is absent, never older than a change
already applied (docs/bookkeeping.md, "When Redis evicts").

- One Redis with ``volatile-lru``: cached rows (with ``ttl_s``) are evicted, the bookkeeping (no
  TTL) never is.
- A cache Redis of its own (``target:``) with ``allkeys-lru``: anything may be evicted there,
  the buckets holding the records included; the workers guard the rule tables with high-water
  marks kept in the streams' Redis (``noeviction``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from streamsync import eviction
from streamsync.buckets import Tables, is_meta
from streamsync.config import load_settings
from streamsync.keys import StateKeys
from tests.debezium import entry_fields, envelope, write_config
from tests.replies import as_str, xadd
from tests.servers import RedisServer, wait_until
from tests.workers import WorkerProcess

STREAM = "app.public.users"
GROUP = "streamsync"
ROWS = 6_000
#: Each row's text: enough for the cached rows to outgrow maxmemory.
PADDING = "x" * 1_500


@dataclass
class Change:
    op: str
    row_id: int
    version: int
    lsn: int

    def fields(self) -> dict[str, str]:
        row = {"id": self.row_id, "v": self.version, "bio": PADDING}
        value = envelope(
            self.op,
            "public.users",
            self.lsn,
            after=None if self.op == "d" else row,
            before={"id": self.row_id} if self.op == "d" else None,
        )
        return entry_fields({"id": self.row_id}, value)


class Producer:
    """Changes in commit order, and replays of older ones, written in waves so that the
    stream (which is never evicted) stays small while the cache grows."""

    def __init__(self, r: redis.Redis, seed: int) -> None:
        self.r = r
        self.rng = random.Random(seed)
        self.lsn = 1_000
        self.version: dict[int, int] = {}
        self.sent: list[Change] = []

    def wave(self, changes: int, replays: int) -> None:
        for _ in range(changes):
            row_id = self.rng.randrange(ROWS)
            op = "d" if row_id in self.version and self.rng.random() < 0.1 else "u"
            if row_id not in self.version or self.version[row_id] < 0:
                op = "c"
            self.lsn += 10
            version = self.version.get(row_id, 0)
            version = abs(version) + 1
            self.version[row_id] = -version if op == "d" else version
            change = Change(op, row_id, version, self.lsn)
            self.sent.append(change)
            xadd(self.r, STREAM, change.fields())
        # replays of older changes, in any order: they must all come back stale
        for change in self.rng.sample(self.sent, min(replays, len(self.sent))):
            xadd(self.r, STREAM, change.fields())

    def newest(self) -> dict[int, Change]:
        newest: dict[int, Change] = {}
        for change in self.sent:
            newest[change.row_id] = change
        return newest


def settled(r: redis.Redis) -> bool:
    groups = {as_str(g["name"]): g for g in r.xinfo_groups(STREAM)}
    group = groups.get(GROUP)
    last = r.xinfo_stream(STREAM)["last-generated-id"]
    return bool(group is not None and group["pending"] == 0 and group["last-delivered-id"] == last)


def assert_never_stale(cache: redis.Redis, producer: Producer) -> int:
    """Every cached row equals its newest change, or is absent. Returns how many are cached."""
    cached = 0
    wrong = []
    for row_id, change in producer.newest().items():
        have = cache.hgetall(f"user:{row_id}")
        if not have:
            continue
        cached += 1
        if change.op == "d" or have.get(b"v") != str(change.version).encode():
            wrong.append(f"user:{row_id}: cached v{have.get(b'v')!r}, newest {change}")
    assert not wrong, f"{len(wrong)} stale rows, e.g. {wrong[:5]}"
    return cached


@pytest.fixture
def cache_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "cache")
    server.start()
    yield server
    server.stop()


def run(
    r: redis.Redis,
    cache: redis.Redis,
    config: Path,
    tmp_path: Path,
    *,
    waves: int,
    evict_buckets: bool = False,
) -> Producer:
    """Two workers apply waves of changes and replays; between waves, optionally, some of the
    rule table's buckets are deleted as an eviction under allkeys would."""
    producer = Producer(r, seed=7)
    settings = load_settings(config, environ={})
    table = Tables(StateKeys.from_settings(settings.worker)).table(settings.rules[0])
    rng = random.Random(11)
    with WorkerProcess(config, "w1", tmp_path) as w1, WorkerProcess(config, "w2", tmp_path) as w2:
        for _ in range(waves):
            producer.wave(changes=1_200, replays=400)
            wait_until(lambda: settled(r), timeout=60, message="the wave applied")
            assert w1.running and w2.running, (w1.log_tail(), w2.log_tail())
            if evict_buckets:
                buckets = int(cache.hget(table.meta, "#n") or 1)
                for index in rng.sample(range(buckets), max(1, buckets // 3)):
                    cache.delete(table.bucket(index))
            assert_never_stale(cache, producer)
        w1.terminate()
        w2.terminate()
        assert w1.wait() == 0 and w2.wait() == 0
    assert not r.exists(STREAM + ":dlq")
    return producer


def test_one_redis_under_volatile_lru(
    r: redis.Redis, tmp_path: Path, fresh_redis: RedisServer
) -> None:
    streams = fresh_redis.client()
    streams.config_set("maxmemory", 8 * 1024 * 1024)
    streams.config_set("maxmemory-policy", "volatile-lru")
    rules = [{"table": "public.users", "key": "user:{id}", "type": "hash", "ttl_s": 3_600}]
    config = write_config(tmp_path / "c.yaml", fresh_redis.url, rules=rules, trim_interval_ms=100)
    producer = run(streams, streams, config, tmp_path, waves=8)
    evicted = int(streams.info("stats")["evicted_keys"])
    assert evicted > 0, "no eviction: the test did not put the cache under pressure"
    cached = assert_never_stale(streams, producer)
    assert cached > 0
    # the bookkeeping has no TTL: none of it was evicted
    settings = load_settings(config, environ={})
    table = Tables(StateKeys.from_settings(settings.worker)).table(settings.rules[0])
    buckets = int(streams.hget(table.meta, "#n") or 1)
    assert all(streams.exists(table.bucket(i)) for i in range(buckets))


def test_a_separate_target_under_allkeys_lru(
    r: redis.Redis, redis_url: str, tmp_path: Path, cache_server: RedisServer
) -> None:
    cache = cache_server.client()
    cache.config_set("maxmemory", 4 * 1024 * 1024)
    cache.config_set("maxmemory-policy", "allkeys-lru")
    rules = [{"table": "public.users", "key": "user:{id}", "type": "hash"}]
    config = write_config(tmp_path / "c.yaml", redis_url, rules=rules)
    data: dict[str, Any] = yaml.safe_load(config.read_text())
    data["target"] = {"url": cache_server.url}
    config.write_text(yaml.safe_dump(data))
    producer = run(r, cache, config, tmp_path, waves=6, evict_buckets=True)
    assert int(cache.info("stats")["evicted_keys"]) > 0
    assert_never_stale(cache, producer)
    # the guard rebuilt the buckets it found gone with a floor, and said the table lost records
    settings = load_settings(config, environ={})
    table = Tables(StateKeys.from_settings(settings.worker)).table(settings.rules[0])
    assert cache.hget(table.meta, "#l") == b"1" or not cache.exists(table.meta)
    assert r.hlen(StateKeys.from_settings(settings.worker).hwm) == 1
    fields = [f for f in cache.hkeys(table.meta) if not is_meta(f)]
    assert fields or not cache.exists(table.meta)


def test_rules_gathering_rows_on_a_target_that_evicts_anything_are_a_problem(
    tmp_path: Path,
) -> None:
    rules = [
        {"table": "public.users", "key": "user:{id}", "type": "hash"},
        {"table": "public.users", "key": "plan:{plan}", "type": "set", "member": "{id}"},
    ]
    settings = load_settings(write_config(tmp_path / "c.yaml", "redis://x", rules=rules), {})
    names = eviction.collection_rules(settings)
    assert names == (settings.rules[1].state_name,)
    problem = eviction.collections_problem("allkeys-lru", names)
    assert problem is not None and names[0] in problem
    for safe in ("noeviction", "volatile-lru", "volatile-ttl"):
        assert eviction.collections_problem(safe, names) is None
    assert eviction.collections_problem("allkeys-lfu", ()) is None
