"""A worker's connections to Redis, built anew on every (re)connect: per Redis, the client for
single commands, the raw pipelined link for round trips, and the Functions library on that
client; and the pair a worker holds, the streams' Redis and the cache's (``target``), which are
one and the same session when the configuration has no ``target`` section."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import redis

from streamsync import connection
from streamsync.config import RedisSettings, Settings
from streamsync.functions import Library
from streamsync.link import ClusterLink, SingleLink


@dataclass(slots=True)
class Session:
    """One connection's worth of Redis access."""

    client: redis.Redis | redis.RedisCluster
    link: SingleLink | ClusterLink
    pool: redis.ConnectionPool
    library: Library
    #: ``run_id`` of the server the URL names: tells whether two URLs reach the same Redis.
    run_id: str = ""

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
        info = plain.info("server", "cluster")
        if info.get("cluster_enabled"):
            cluster = connection.cluster(settings, **options)
            client, link = cluster, ClusterLink(cluster)
        else:
            client, link = plain, SingleLink(pool.get_connection())
    except BaseException:
        pool.disconnect()
        raise
    return Session(client, link, pool, Library(client), str(info.get("run_id", "")))


@dataclass(slots=True)
class Sessions:
    """The worker's two Redis: ``streams`` (reads, acknowledgements, dead letters, counters,
    epochs, liveness marks, trimming) and ``target`` (the batch calls, sweeps, the library the
    batch calls run). Without a ``target`` section both name one session."""

    streams: Session
    target: Session

    @property
    def separate(self) -> bool:
        """Whether the cache lives in a Redis of its own (another server than the streams')."""
        return self.target is not self.streams and self.target.run_id != self.streams.run_id

    def close(self) -> None:
        """Drop every connection of both (safe on broken ones)."""
        self.streams.close()
        if self.target is not self.streams:
            self.target.close()


def open_sessions(settings: Settings, *, client_name: str, streams_timeout_s: float) -> Sessions:
    """Connect to the streams' Redis (with ``streams_timeout_s``, above a blocking read) and,
    when the configuration names one, the target (with its own ``socket_timeout_s``: nothing
    blocks there)."""
    streams = open_session(settings.redis, client_name=client_name, timeout_s=streams_timeout_s)
    if settings.target is None:
        return Sessions(streams, streams)
    try:
        target = open_session(
            settings.target,
            client_name=client_name + ":target",
            timeout_s=settings.target.socket_timeout_s,
        )
    except BaseException:
        streams.close()
        raise
    return Sessions(streams, target)
