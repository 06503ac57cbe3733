"""A worker's connection to Redis, built anew on every (re)connect: the client for single
commands, the raw pipelined link for round trips, and the Functions library on that client."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import redis

from streamsync import connection
from streamsync.config import RedisSettings
from streamsync.functions import Library
from streamsync.link import ClusterLink, SingleLink


@dataclass(slots=True)
class Session:
    """One connection's worth of Redis access."""

    client: redis.Redis | redis.RedisCluster
    link: SingleLink | ClusterLink
    pool: redis.ConnectionPool
    library: Library

    @property
    def cluster(self) -> bool:
        """Whether Redis is a Cluster (commands routed by hash slot, reads one stream each)."""
        return isinstance(self.link, ClusterLink)

    def call(self, *command: Any) -> Any:
        """One command on the link, its reply unparsed (field lists stay lists, so an entry
        keeps its exact fields, duplicates and order included); raises on an error reply."""
        return self.link.call(*command)

    def close(self) -> None:
        """Drop every connection (safe on a broken one)."""
        with contextlib.suppress(Exception):
            self.link.close()
        self.pool.disconnect()


def open_session(settings: RedisSettings, *, client_name: str, timeout_s: float) -> Session:
    """Connect to the Redis of ``settings`` (a server or a cluster) as ``client_name``."""
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "client_name": client_name,
        # RESP2: raw replies keep stream entries as flat field lists
        "protocol": 2,
    }
    pool = connection.pool(settings, **options)
    plain = redis.Redis(connection_pool=pool)
    client: redis.Redis | redis.RedisCluster
    link: SingleLink | ClusterLink
    try:
        if plain.info("cluster").get("cluster_enabled"):
            cluster = connection.cluster(settings, **options)
            client, link = cluster, ClusterLink(cluster)
        else:
            client, link = plain, SingleLink(pool.get_connection())
    except BaseException:
        pool.disconnect()
        raise
    return Session(client, link, pool, Library(client))
