"""Backpressure on a real redis-server near its maxmemory: the worker says so, keeps trimming
what every group acknowledged, and never deletes an unacknowledged entry."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import redis

from streamsync.config import load_settings
from streamsync.errors import ExitCode
from streamsync.worker import Worker
from tests.debezium import add_change, write_config

STREAM = "app.public.users"


def test_near_maxmemory_the_worker_warns_trims_and_keeps_unacked_entries(
    r: redis.Redis, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    r.set("ballast", b"x" * 30_000_000)
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory", used + 3_000_000)
    try:
        r.xgroup_create(STREAM, "streamsync", id="0", mkstream=True)
        # a second group that reads nothing: its entries must survive any trimming
        r.xgroup_create(STREAM, "audit", id="0")
        for i in range(300):
            add_change(r, STREAM, "c", {"id": i, "name": f"user{i}"}, 100 + i)
        cfg = write_config(tmp_path / "c.yaml", redis_url, streams=[STREAM])
        worker = Worker(load_settings(cfg, environ={}), consumer="w1", drain=True)
        with caplog.at_level(logging.WARNING, logger="streamsync.worker"):
            assert worker.run() == ExitCode.OK
        assert any("of maxmemory" in rec.getMessage() for rec in caplog.records)
        assert r.xpending(STREAM, "streamsync")["pending"] == 0
        assert len(r.keys("user:*")) == 300
        # the audit group has read nothing: every entry is still there for it
        assert r.xlen(STREAM) == 300
    finally:
        r.config_set("maxmemory", 0)
        r.delete("ballast")
