"""The worker's raw, pipelined connections to Redis: one to a single server, or one per primary
of a Redis Cluster with every command routed by its key's hash slot.

Commands are packed with hiredis and replies read unparsed, so a stream entry keeps its exact
fields (duplicates and order included) and a round trip costs one write and one read per server.
A cluster whose slots moved (MOVED, ASK), or that is failing over, raises ConnectionError: the
worker reconnects, learns the new topology and re-applies what it held, which the position
checks make harmless.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hiredis
import redis
from redis.connection import Connection

from streamsync.keys import key_slot

Command = tuple[Any, ...]

#: Replies meaning the cluster's topology is not what this link knows.
TOPOLOGY_ERRORS = ("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN")


def command_key(command: Command) -> Any:
    """The key that routes ``command`` (its first key)."""
    name = str(command[0]).upper()
    if name in ("FCALL", "FCALL_RO"):
        return command[3]
    if name in ("XREADGROUP", "XREAD"):
        upper = [str(c).upper() if isinstance(c, str) else c for c in command]
        return command[upper.index("STREAMS") + 1]
    return command[1]


def _read(conn: Connection) -> Any:
    try:
        return conn.read_response(disable_decoding=True)
    except redis.ResponseError as exc:
        return exc


class SingleLink:
    """A pipelined connection to one Redis server."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._sent = 0

    def send(self, commands: Sequence[Command]) -> None:
        self._conn.send_packed_command(
            [b"".join(hiredis.pack_command(c) for c in commands)], check_health=False
        )
        self._sent = len(commands)

    def receive(self) -> list[Any]:
        """The replies of the last send, in order; error replies as ResponseError values."""
        return [_read(self._conn) for _ in range(self._sent)]

    def call(self, *command: Any) -> Any:
        """One command, its reply unparsed; raises on an error reply."""
        self._conn.send_packed_command([hiredis.pack_command(command)], check_health=False)
        return self._conn.read_response(disable_decoding=True)

    def close(self) -> None:
        self._conn.disconnect()


class ClusterLink:
    """Pipelined connections to every primary of a Redis Cluster, routed by hash slot."""

    def __init__(self, cluster: redis.RedisCluster, **connection_kwargs: Any) -> None:
        self._cluster = cluster
        self._kwargs = connection_kwargs
        self._conns: dict[str, Connection] = {}
        self._routes: list[tuple[Connection, list[int]]] = []
        self._n = 0

    def _conn_for(self, key: Any) -> Connection:
        raw = key if isinstance(key, bytes) else str(key).encode()
        node = self._cluster.nodes_manager.get_node_from_slot(key_slot(raw))
        conn = self._conns.get(node.name)
        if conn is None:
            pool = node.redis_connection.connection_pool
            # RESP2: raw replies keep stream entries as flat field lists
            kwargs = {**pool.connection_kwargs, **self._kwargs, "protocol": 2}
            conn = self._conns[node.name] = pool.connection_class(**kwargs)
        return conn

    def send(self, commands: Sequence[Command]) -> None:
        by_conn: dict[int, tuple[Connection, list[int]]] = {}
        for i, command in enumerate(commands):
            conn = self._conn_for(command_key(command))
            by_conn.setdefault(id(conn), (conn, []))[1].append(i)
        for conn, indexes in by_conn.values():
            conn.send_packed_command(
                [b"".join(hiredis.pack_command(commands[i]) for i in indexes)],
                check_health=False,
            )
        self._routes = list(by_conn.values())
        self._n = len(commands)

    def receive(self) -> list[Any]:
        replies: list[Any] = [None] * self._n
        for conn, indexes in self._routes:
            for i in indexes:
                replies[i] = _read(conn)
        for reply in replies:
            if isinstance(reply, redis.ResponseError) and str(reply).startswith(TOPOLOGY_ERRORS):
                raise redis.ConnectionError(f"cluster topology changed: {reply}")
        return replies

    def call(self, *command: Any) -> Any:
        conn = self._conn_for(command_key(command))
        conn.send_packed_command([hiredis.pack_command(command)], check_health=False)
        try:
            return conn.read_response(disable_decoding=True)
        except redis.ResponseError as exc:
            if str(exc).startswith(TOPOLOGY_ERRORS):
                raise redis.ConnectionError(f"cluster topology changed: {exc}") from exc
            raise

    def close(self) -> None:
        for conn in self._conns.values():
            conn.disconnect()
        self._conns.clear()
        self._cluster.close()
