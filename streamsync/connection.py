"""Connections to Redis built from the validated settings: one place that knows the URL and its
options, so every command (worker, status, dlq, resync) connects the same way."""

from __future__ import annotations

from typing import Any

import redis

from streamsync.config import RedisSettings


def connection_kwargs(settings: RedisSettings) -> dict[str, Any]:
    """Options for ``redis.ConnectionPool.from_url(settings.url, ...)`` beyond the URL."""
    return {"socket_timeout": settings.socket_timeout_s}


def pool(settings: RedisSettings, **overrides: Any) -> redis.ConnectionPool:
    """A connection pool for ``settings``; ``overrides`` replace individual options."""
    return redis.ConnectionPool.from_url(
        settings.url, **{**connection_kwargs(settings), **overrides}
    )


def client(settings: RedisSettings, **overrides: Any) -> redis.Redis:
    """A client for ``settings`` (close it when done)."""
    return redis.Redis(connection_pool=pool(settings, **overrides))
