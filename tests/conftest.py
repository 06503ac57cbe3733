"""Shared fixtures: real redis-server and PostgreSQL processes on free ports, owned by the tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.e2e import MakePipeline, Pipeline
from tests.prerequisites import (
    engine_missing,
    module_missing,
    rejson_module,
    require,
    skip_unless_ci,
)
from tests.servers import PostgresServer, PostgresServerError, RedisServer, kill_all, postgres_dir


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Fixture teardown normally stops every server; this catches any a test started by hand.
    kill_all()


def _running(server: RedisServer) -> Iterator[RedisServer]:
    server.start()
    yield server
    server.stop()


def _client(url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(url, decode_responses=False)
    yield client
    client.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session (no persistence); flushed before each test."""
    yield from _running(RedisServer(tmp_path_factory.mktemp("redis-session")))


def _flushed(server: RedisServer) -> str:
    if not server.running:
        # A test killed the shared server; bring it back rather than fail every later test.
        server.restart()
    cleaner = redis.Redis.from_url(server.url)
    try:
        cleaner.flushall()
        cleaner.function_flush()
        cleaner.config_set("maxmemory-policy", "noeviction")
        cleaner.config_set("maxmemory", "0")
        cleaner.config_resetstat()
    finally:
        cleaner.close()
    return server.url


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session server, emptied of keys and Functions libraries for this test."""
    return _flushed(redis_server)


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A bytes-returning client to the freshly flushed session server."""
    yield from _client(redis_url)


@pytest.fixture(scope="session")
def target_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A second redis-server for the whole session: the cache's own Redis (``target:``)."""
    yield from _running(RedisServer(tmp_path_factory.mktemp("redis-target")))


@pytest.fixture
def target_url(target_server: RedisServer) -> str:
    """URL of the session's second server, emptied like ``redis_url``'s."""
    return _flushed(target_server)


@pytest.fixture
def t(target_url: str) -> Iterator[redis.Redis]:
    """A bytes-returning client to the freshly flushed target server."""
    yield from _client(target_url)


@pytest.fixture(scope="session")
def rejson_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server loading the RedisJSON module, for the whole session."""
    module = ("--loadmodule", rejson_module())
    yield from _running(RedisServer(tmp_path_factory.mktemp("redis-rejson"), extra_args=module))


@pytest.fixture
def rejson_url(rejson_server: RedisServer) -> str:
    """URL of the RedisJSON server, emptied like ``redis_url``'s."""
    return _flushed(rejson_server)


@pytest.fixture
def rj(rejson_url: str) -> Iterator[redis.Redis]:
    """A bytes-returning client to the freshly flushed RedisJSON server."""
    yield from _client(rejson_url)


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, AOF with fsync always, safe to kill -9 and restart."""
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def embedded_engine() -> None:
    """The embedded Debezium engine can run here (tests needing it skip, or fail under CI)."""
    require(engine_missing())


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL (wal_level=logical, fsync off) for the whole session.

    Skips the test if psycopg or the PostgreSQL server binaries are missing. Tests get a
    database of their own from ``pg_db``.
    """
    require(module_missing("psycopg", "pip install -e '.[test]'"))
    with postgres_dir() as data_dir:
        server = PostgresServer(data_dir / "session", fsync=False)
        try:
            server.start()
        except PostgresServerError as exc:
            if "not found" in str(exc):
                skip_unless_ci(str(exc))
            raise
        yield server
        server.stop()


@pytest.fixture
def pg_db(postgres_server: PostgresServer) -> Iterator[str]:
    """The name of a fresh, empty database on the session PostgreSQL, dropped after the test.

    Dropping it first terminates its backends and drops the replication slots created on it
    (a connector's slot outlives the connector).
    """
    if not postgres_server.running:
        # A test killed the shared server; bring it back rather than fail every later test.
        postgres_server.restart()
    name = f"t_{uuid.uuid4().hex[:12]}"
    postgres_server.create_database(name)
    yield name
    postgres_server.drop_database(name)


@pytest.fixture
def pipelines(
    tmp_path: Path, postgres_server: PostgresServer, pg_db: str, r: redis.Redis, redis_url: str
) -> Iterator[MakePipeline]:
    """Makes this test's end-to-end pipelines (``Pipeline.create`` arguments after the
    fixtures); kills their processes at teardown, before ``pg_db`` drops the database and its
    slots."""
    made: list[Pipeline] = []

    def make(**kwargs: Any) -> Pipeline:
        pipeline = Pipeline.create(
            tmp_path / f"p{len(made)}", postgres_server, pg_db, r, redis_url, **kwargs
        )
        made.append(pipeline)
        return pipeline

    yield make
    for pipeline in made:
        pipeline.close()
