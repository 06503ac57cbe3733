"""What the worker knows of the target's eviction policy: read at connect and about once a
minute (``INFO memory``, cheap), so the batch core can tell whether the cache's bookkeeping may be
evicted (a separate target under ``allkeys-*``, see ``streamsync.eviction``)."""

from __future__ import annotations

import logging

import redis

from streamsync.eviction import NO_EVICTION, bookkeeping_evictable, evicts_any_key
from streamsync.worker.session import Session, Sessions

log = logging.getLogger(__name__)

#: How often the worker reads the target's maxmemory-policy again: an operator may change it
#: with CONFIG SET at any time, and a slow reaction only delays the floor logic's switch.
POLICY_INTERVAL_S = 60.0


def read_policy(session: Session) -> str:
    """The ``maxmemory_policy`` of a Redis; of a Cluster, the one of its primaries that evicts
    the most (a policy evicting any key over one evicting keys with a TTL over none)."""
    client = session.client
    if isinstance(client, redis.RedisCluster):
        policies = [
            str(client.info("memory", target_nodes=node).get("maxmemory_policy", ""))
            for node in client.get_primaries()
        ]
    else:
        policies = [str(client.info("memory").get("maxmemory_policy", ""))]
    return max(policies, key=lambda p: (evicts_any_key(p), p != NO_EVICTION))


class TargetPolicy:
    """The target's policy as last read, and whether it lets Redis evict the bookkeeping."""

    def __init__(self, interval_s: float = POLICY_INTERVAL_S) -> None:
        self.interval_s = interval_s
        #: None until read (or when INFO was refused: then taken at its worst).
        self.policy: str | None = None
        self.separate = False
        self._next = 0.0

    @property
    def bookkeeping_evictable(self) -> bool:
        """A separate target whose policy (or an unknown one) may evict keys without a TTL."""
        if self.policy is None:
            return self.separate
        return bookkeeping_evictable(self.policy, separate=self.separate)

    def read(self, sessions: Sessions, now: float) -> None:
        """Read the target's policy now; log when it changes."""
        self._next = now + self.interval_s
        separate = sessions.separate
        try:
            policy: str | None = read_policy(sessions.target)
        except redis.ResponseError as exc:
            if self.policy is not None or self.separate != separate:
                log.warning("cannot read the target's maxmemory-policy (%s)", exc)
            policy = None
        changed = (policy, separate) != (self.policy, self.separate)
        self.policy, self.separate = policy, separate
        if changed and policy is not None:
            self._log_change(policy)

    def run_due(self, sessions: Sessions, now: float) -> None:
        """Read the policy again when its time has come."""
        if now >= self._next:
            self.read(sessions, now)

    def _log_change(self, policy: str) -> None:
        if self.separate:
            log.info(
                "target redis maxmemory-policy %s: its bookkeeping %s",
                policy,
                "may be evicted" if self.bookkeeping_evictable else "is never evicted",
            )
        elif evicts_any_key(policy):
            log.warning(
                "redis maxmemory-policy %s can evict stream entries and the cache's bookkeeping:"
                " use noeviction or volatile-*, or move the cache to a target: redis",
                policy,
            )
