"""Tests of the test helpers themselves: real servers start, die, and come back as promised."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.servers import RedisServer, RedisServerError, free_port, wait_until


def _port_accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_free_port_is_bindable_and_not_repeated() -> None:
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    port = ports.pop()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_start_ping_and_stop(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        assert server.port != 6379
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = server.client()
        assert client.ping() is True
        assert client.info("server")["process_id"] == server.pid
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert (tmp_path / "redis" / "redis.log").exists()
    finally:
        server.stop()
    assert not server.running
    assert not _pid_alive(server.pid)
    assert not _port_accepts(server.port)


def test_context_manager_and_session_fixtures(redis_server: RedisServer, r: redis.Redis) -> None:
    assert redis_server.running
    assert r.dbsize() == 0
    r.set(b"k", b"v")
    assert r.get(b"k") == b"v"
    with RedisServer(redis_server.data_dir.parent / "ctx") as server:
        assert server.port != redis_server.port
        assert server.client().get(b"k") is None
    assert not server.running


def test_session_server_is_flushed_between_tests(r: redis.Redis) -> None:
    # Runs after the test above wrote b"k": nothing may leak into this one.
    assert r.dbsize() == 0
    assert r.function_list() == []


def test_kill_then_restart_on_same_port_keeps_aof_data(fresh_redis: RedisServer) -> None:
    client = fresh_redis.client()
    assert client.config_get("appendfsync") == {"appendfsync": "always"}
    no_retry = fresh_redis.client(retry=Retry(NoBackoff(), 0))
    client.set(b"before-kill", b"survives")
    port, old_pid = fresh_redis.port, fresh_redis.pid

    fresh_redis.kill()
    assert not fresh_redis.running
    assert not _pid_alive(old_pid)
    assert not _port_accepts(port)
    with pytest.raises(redis.ConnectionError):
        no_retry.get(b"before-kill")

    fresh_redis.restart()
    assert fresh_redis.port == port
    assert fresh_redis.pid != old_pid
    # The same client reconnects by itself.
    assert client.get(b"before-kill") == b"survives"


def test_start_failure_reports_log_tail(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", extra_args=["--no-such-option", "1"])
    with pytest.raises(RedisServerError, match="no-such-option"):
        server.start(timeout=5)
    assert not server.running


def test_wait_until_returns_once_true() -> None:
    start = time.monotonic()
    wait_until(lambda: time.monotonic() - start > 0.05, timeout=5, message="50 ms to pass")


def test_wait_until_raises_with_message_on_timeout() -> None:
    with pytest.raises(AssertionError, match="the impossible to happen"):
        wait_until(lambda: False, timeout=0.1, message="the impossible to happen")
