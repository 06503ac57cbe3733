"""Cache-aside reads that cannot go stale: the lease protocol of the Functions library
(``streamsync_lease_get``, ``streamsync_lease_fill``), for applications filling keys that
``invalidate`` rules delete.

The race it closes: a reader misses, reads the row from the database, a writer commits a change
and streamsync deletes the key, then the reader writes the value it read before the change. With
a lease, the reader's fill is written only if no invalidation of the key happened since it took
the lease, so the value it read is at least as new as the last change streamsync applied.

    cache = CacheAside(redis.Redis(...))
    profile = cache.get("user:7", lambda: load_user_json(7), ttl_s=300)

Any language can follow the protocol with two FCALLs (README, "Cache-aside fills that cannot go
stale").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from streamsync.functions import Lease, Library

#: What ``load`` returns: the value to cache, or None when the row does not exist.
Loaded = str | bytes | None


@dataclass
class CacheAside:
    """Reads through the cache with leases. ``state_prefix`` must be the workers'
    (``worker.state_prefix``): the lease lives next to the key under it."""

    client: redis.Redis | redis.RedisCluster
    state_prefix: str = "streamsync:"
    #: How long a lease holds: longer than a database read takes.
    lease_ms: int = 5_000
    #: How long a reader waits for another reader's fill before reading the database itself.
    wait_s: float = 0.5
    #: How often a waiting reader looks again.
    poll_s: float = 0.005

    def __post_init__(self) -> None:
        self._library = Library(self.client)

    def get(self, key: str, load: Callable[[], Loaded], ttl_s: int | None = None) -> Loaded:
        """The key's value: cached, or loaded by ``load`` and cached unless an invalidation
        of the key happened meanwhile (then returned without caching). While another reader
        holds the key's lease, waits up to ``wait_s`` for its fill, then loads without one."""
        deadline = time.monotonic() + self.wait_s
        while True:
            lease = self._library.lease_get(key, self.state_prefix, self.lease_ms)
            if lease.value is not None:
                return lease.value
            if lease.token is not None:
                return self._fill(key, lease, load, ttl_s)
            if time.monotonic() >= deadline:
                return load()
            time.sleep(min(self.poll_s, max(0.0, lease.wait_ms / 1000)))

    def _fill(
        self, key: str, lease: Lease, load: Callable[[], Loaded], ttl_s: int | None
    ) -> Loaded:
        assert lease.token is not None
        try:
            value = load()
        except BaseException:
            self._library.lease_fill(key, self.state_prefix, lease.token, None)
            raise
        ttl_ms = 0 if ttl_s is None else ttl_s * 1000
        self._library.lease_fill(key, self.state_prefix, lease.token, value, ttl_ms)
        return value
