"""Backpressure on a real redis-server near its maxmemory: the worker says so, trims what every
group acknowledged at every cycle, and never deletes an entry a group has not acknowledged."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from streamsync.config import load_settings
from streamsync.worker import Worker
from tests.debezium import add_change, write_config
from tests.replies import pending_entries, xrange
from tests.servers import wait_until
from tests.workers import WorkerThread

STREAM = "app.public.users"
GROUP = "streamsync"
#: A second group, of another application, that reads at its own pace.
AUDIT = "audit"
N_ENTRIES = 300
#: Far longer than the test: any trim after the worker's first one is memory pressure's doing.
TRIM_INTERVAL_MS = 3_600_000
BALLAST_BYTES = 50_000_000
#: maxmemory over what Redis uses with the ballast: the worker's writes fit, yet usage stays
#: above the pressure threshold (90% of maxmemory).
HEADROOM_BYTES = 3_000_000


def used_memory(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


@pytest.fixture
def near_maxmemory(r: redis.Redis) -> Iterator[None]:
    """The session server with its memory nearly full, restored afterwards."""
    before = used_memory(r)
    r.set("ballast", b"x" * BALLAST_BYTES)
    # right after the SET, Redis briefly holds the value twice (the request's copy): measured
    # then, maxmemory would leave half of it free once that copy goes
    wait_until(
        lambda: used_memory(r) < before + 1.5 * BALLAST_BYTES,
        message="the ballast's request buffer released",
    )
    used = used_memory(r)
    r.config_set("maxmemory", used + HEADROOM_BYTES)
    assert used >= 0.9 * (used + HEADROOM_BYTES), "not near maxmemory: no pressure to test"
    try:
        yield
    finally:
        r.config_set("maxmemory", 0)
        r.delete("ballast")


def stream_ids(r: redis.Redis) -> list[bytes]:
    return [entry_id for entry_id, _ in xrange(r, STREAM)]


def audit_pending(r: redis.Redis) -> list[bytes]:
    return [p.id for p in pending_entries(r, STREAM, AUDIT)]


@pytest.mark.usefixtures("near_maxmemory")
def test_near_maxmemory_the_worker_trims_every_cycle_and_keeps_unacked_entries(
    r: redis.Redis, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    r.xgroup_create(STREAM, AUDIT, id="0")
    ids = [
        add_change(r, STREAM, "c", {"id": i, "name": f"user{i}"}, 100 + i) for i in range(N_ENTRIES)
    ]
    # audit reads the first 200 entries and acknowledges some: its oldest pending is ids[100]
    r.xreadgroup(AUDIT, "auditor", {STREAM: ">"}, count=200)
    r.xack(STREAM, AUDIT, *ids[:100], *ids[150:160])
    assert audit_pending(r) == ids[100:150] + ids[160:200]

    cfg = write_config(
        tmp_path / "c.yaml", redis_url, streams=[STREAM], trim_interval_ms=TRIM_INTERVAL_MS
    )
    worker = Worker(load_settings(cfg, environ={}), consumer="w1")
    with caplog.at_level(logging.WARNING, logger="streamsync.worker"), WorkerThread(worker):
        wait_until(
            lambda: (
                r.xpending(STREAM, GROUP)["pending"] == 0 and len(r.keys("user:*")) == N_ENTRIES
            ),
            timeout=30,
            message="the worker applied every entry",
        )
        # streamsync acknowledged everything; audit holds ids[100] back
        wait_until(lambda: stream_ids(r) == ids[100:], message="trimmed up to audit's bound")
        # audit catches up on some: its bound moves to ids[160], and the trim follows
        r.xack(STREAM, AUDIT, *ids[100:150])
        wait_until(lambda: stream_ids(r) == ids[160:], message="trimmed up to audit's new bound")
        # audit acknowledges all it read: its bound is the last entry it read, ids[199]; what it
        # never read stays
        r.xack(STREAM, AUDIT, *ids[160:200])
        wait_until(lambda: stream_ids(r) == ids[199:], message="trimmed up to audit's last read")
    assert any("of maxmemory" in rec.getMessage() for rec in caplog.records)
    assert r.xpending(STREAM, GROUP)["pending"] == 0
    assert audit_pending(r) == []
    # the worker never ran out of memory for its own writes: every row is there
    assert all(r.hget(f"user:{i}", "name") == f"user{i}".encode() for i in range(N_ENTRIES))
    assert stream_ids(r) == ids[199:]
