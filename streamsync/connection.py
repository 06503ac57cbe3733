"""Connections to Redis built from the validated settings: one place that knows the URL and its
options, so every command (worker, status, dlq, resync) connects the same way."""

from __future__ import annotations

import inspect
from typing import Any

import redis

from streamsync.config import RedisSettings, redact_url

# No CLIENT SETINFO at connect (Redis 7.2+, Valkey): the least-privilege ACL users need not grant
# it, and ACL LOG stays clean (CLIENT SETNAME names the worker's connections). redis-py 7.1+
# takes driver_info=None for it, and deprecates the older lib_name/lib_version=None.
NO_SETINFO: dict[str, Any] = (
    {"driver_info": None}
    if "driver_info" in inspect.signature(redis.connection.AbstractConnection.__init__).parameters
    else {"lib_name": None, "lib_version": None}
)


def connection_kwargs(settings: RedisSettings) -> dict[str, Any]:
    """Options for ``redis.ConnectionPool.from_url(settings.url, ...)`` beyond the URL: the
    timeout, the credentials (the URL never holds the password, see RedisSettings) and, for a
    ``rediss://`` URL, the TLS files and verification."""
    kwargs: dict[str, Any] = {"socket_timeout": settings.socket_timeout_s, **NO_SETINFO}
    if settings.username is not None:
        kwargs["username"] = settings.username
    if settings.password is not None:
        kwargs["password"] = settings.password.get_secret_value()
    kwargs.update(tls_kwargs(settings))
    return kwargs


def tls_kwargs(settings: RedisSettings) -> dict[str, Any]:
    """redis-py's ``ssl_*`` options for a ``rediss://`` URL (none for other URLs)."""
    if not settings.tls:
        return {}
    kwargs: dict[str, Any] = {
        "ssl_cert_reqs": "required" if settings.tls_verify else "none",
        "ssl_check_hostname": settings.tls_verify,
    }
    if settings.tls_ca_file is not None:
        kwargs["ssl_ca_certs"] = str(settings.tls_ca_file)
    if settings.tls_cert_file is not None:
        kwargs["ssl_certfile"] = str(settings.tls_cert_file)
    if settings.tls_key_file is not None:
        kwargs["ssl_keyfile"] = str(settings.tls_key_file)
    return kwargs


def describe(settings: RedisSettings) -> str:
    """Where and how streamsync connects, fit for logs and terminals (never the password)."""
    details = []
    user = settings.effective_username
    if user is not None:
        details.append(f"user {user}")
    if settings.password is not None:
        details.append("password set")
    if settings.tls:
        details.append("TLS" if settings.tls_verify else "TLS without verification")
    more = f" ({', '.join(details)})" if details else ""
    return redact_url(settings.url) + more


def pool(settings: RedisSettings, **overrides: Any) -> redis.ConnectionPool:
    """A connection pool for ``settings``; ``overrides`` replace individual options."""
    return redis.ConnectionPool.from_url(
        settings.url, **{**connection_kwargs(settings), **overrides}
    )


def client(settings: RedisSettings, **overrides: Any) -> redis.Redis:
    """A client for ``settings`` (close it when done)."""
    return redis.Redis(connection_pool=pool(settings, **overrides))


def cluster(settings: RedisSettings, **overrides: Any) -> redis.RedisCluster:
    """A Redis Cluster client for ``settings`` (its URL names any node of the cluster)."""
    options = {**connection_kwargs(settings), **overrides}
    options.pop("protocol", None)
    return redis.RedisCluster.from_url(settings.url, **options)


def server_or_cluster(
    settings: RedisSettings, **overrides: Any
) -> redis.Redis | redis.RedisCluster:
    """A client for ``settings``: of the whole Cluster when the server the URL names runs in
    cluster mode (INFO cluster), else of that server (also when INFO is refused or the server
    cannot be reached now)."""
    plain = client(settings, **overrides)
    try:
        clustered = plain.info("cluster").get("cluster_enabled")
    except redis.RedisError:
        # refused, or unreachable for now: the caller's first command says so
        clustered = False
    if not clustered:
        return plain
    plain.close()
    return cluster(settings, **overrides)


def primaries(client: redis.Redis | redis.RedisCluster) -> list[tuple[str, redis.Redis]]:
    """Each primary of a Redis Cluster with a client of its own, by ``host:port`` (sorted);
    none for a single server."""
    if not isinstance(client, redis.RedisCluster):
        return []
    return sorted(
        (str(node.name), client.get_redis_connection(node)) for node in client.get_primaries()
    )
