"""Shared fixtures: real redis-server processes on free ports, started and owned by the tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.servers import RedisServer, kill_all


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Fixture teardown normally stops every server; this catches any a test started by hand.
    kill_all()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session (no persistence); flushed before each test."""
    server = RedisServer(tmp_path_factory.mktemp("redis-session"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session server, emptied of keys and Functions libraries for this test."""
    if not redis_server.running:
        # A test killed the shared server; bring it back rather than fail every later test.
        redis_server.restart()
    cleaner = redis.Redis.from_url(redis_server.url)
    try:
        cleaner.flushall()
        cleaner.function_flush()
    finally:
        cleaner.close()
    return redis_server.url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A bytes-returning client to the freshly flushed session server."""
    client = redis.Redis.from_url(redis_url, decode_responses=False)
    yield client
    client.close()


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, AOF with fsync always, safe to kill -9 and restart."""
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    yield server
    server.stop()
