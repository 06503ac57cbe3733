"""Which ``maxmemory-policy`` is safe where (docs/bookkeeping.md, "When Redis evicts").

- The streams' Redis must not evict: an unread stream entry evicted is a change lost. With a
  ``target`` holding the cache, nothing there has a reason to be evicted: only ``noeviction``
  is safe.
- One Redis for both (no ``target``): ``volatile-*`` evicts only keys with a TTL, cached rows
  of rules with ``ttl_s`` (a miss); streams and bookkeeping have none. ``allkeys-*`` may evict
  the streams and the bookkeeping: unsafe.
- A separate ``target``: any policy. The library treats an evicted record as an unknown row,
  kept uncached until a change newer than anything applied arrives; with ``allkeys-*`` the
  worker must tell it how new that is (the per-rule high-water marks in the streams' Redis).

Pure functions over policy names; ``streamsync status`` and the worker share them.
"""

from __future__ import annotations

from streamsync.config import Settings

#: The policy that never evicts.
NO_EVICTION = "noeviction"


def evicts_any_key(policy: str) -> bool:
    """Whether ``policy`` may evict keys without a TTL (``allkeys-*``, or a policy this
    version does not know, taken at its worst)."""
    return policy != NO_EVICTION and not policy.startswith("volatile-")


def bookkeeping_evictable(target_policy: str, *, separate: bool) -> bool:
    """Whether the cache's bookkeeping may be evicted under the library's eviction contract:
    a target of its own whose policy evicts keys without a TTL. (On one Redis the same policy
    is an unsafe setup, not a contract: ``problems`` says so.)"""
    return separate and evicts_any_key(target_policy)


def collection_rules(settings: Settings) -> tuple[str, ...]:
    """The names of the rules whose keys gather many rows (sets, sorted sets, lists, streams,
    nested children)."""
    return tuple(rule.state_name for rule in settings.rules if rule.gathers_rows)


def collections_problem(target_policy: str, rules: tuple[str, ...]) -> str | None:
    """What is wrong with rules gathering many rows per key on a target running
    ``target_policy`` (None: nothing). A key holding many rows is not a cache entry one can lose:
    evicted, then written again by the next change of one of its rows, it holds that row alone,
    and so do a placement record's clues of where a row is. Only a target that evicts no key
    without a TTL keeps them whole."""
    if not rules or not evicts_any_key(target_policy):
        return None
    return (
        f"target redis: maxmemory-policy {target_policy} can evict the keys of rules that gather"
        f" many rows per key ({', '.join(rules)}): evicted, such a key comes back holding only"
        " the rows changed since; keep those rules in a Redis that evicts nothing but keys"
        " with a TTL (volatile-*, noeviction), or use rules keyed by primary key"
    )


def _limit_note(maxmemory: int) -> str:
    return " (no maxmemory set yet: it applies once one is)" if not maxmemory else ""


def problem(policy: str, maxmemory: int, *, separate: bool) -> str | None:
    """What is wrong with the streams' Redis running ``policy`` (None: nothing). ``separate``:
    the cache lives in a ``target`` of its own (whose policy is never a problem)."""
    if policy == NO_EVICTION:
        return None
    limit = _limit_note(maxmemory)
    if separate:
        return (
            f"streams' redis: maxmemory-policy {policy} can evict stream entries (changes lost)"
            f" and streamsync's records there{limit}; use noeviction (the cache has a Redis"
            " of its own, target:, which may evict)"
        )
    if not evicts_any_key(policy):
        return None
    return (
        f"maxmemory-policy {policy} can evict any key: unread stream entries (changes lost) and"
        f" the cache's bookkeeping (a replay then rolls rows back){limit}; use noeviction or a"
        " volatile-* policy, or move the cache to a Redis of its own (target:), where any"
        " policy is safe"
    )
