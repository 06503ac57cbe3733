"""When to try again: the Redis error replies that mean "not now", and one backoff for every
retry loop (redis-py's full-jitter backoff)."""

from __future__ import annotations

from redis.backoff import FullJitterBackoff

#: Error replies after which the same commands are retried unchanged: Redis is busy, full,
#: loading or failing over, not the entry at fault.
TRANSIENT_ERRORS = (
    "OOM",
    "BUSY",
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "NOREPLICAS",
)

#: Full jitter between 0 and min(cap, base * 2**attempt) seconds.
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 5.0

_BACKOFF = FullJitterBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S)


def is_transient(message: str) -> bool:
    """True for an error reply meaning "not now" rather than "never"."""
    return message.startswith(TRANSIENT_ERRORS) or "cluster is down" in message


def backoff(attempt: int) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first)."""
    return _BACKOFF.compute(attempt)
