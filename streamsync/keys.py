"""Every key name streamsync owns, and the Redis Cluster hash-slot arithmetic behind them.

streamsync keeps records beside the cache: a position record per target key, placement records
and indexes per rule, list order and reserve records, resync epochs, snapshot marks, status
counters, worker liveness marks, and a dead-letter stream per source stream. Their names are
built here and only here; the Functions library never builds a key name (every key arrives in
KEYS).
"""

from __future__ import annotations

import binascii
import functools
import itertools
import string
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streamsync.config import Rule, WorkerSettings

CLUSTER_SLOTS = 16384

#: Suffix of a stream's dead-letter stream: ``<stream>:dlq``.
DLQ_SUFFIX = ":dlq"


def key_slot(key: bytes | str) -> int:
    """The Redis Cluster hash slot of ``key`` (honouring ``{hash tags}``)."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return binascii.crc_hqx(raw, 0) % CLUSTER_SLOTS


@functools.cache
def _slot_tags() -> tuple[str, ...]:
    tags: list[str | None] = [None] * CLUSTER_SLOTS
    missing = CLUSTER_SLOTS
    alphabet = string.ascii_letters + string.digits
    for length in itertools.count(1):
        for chars in itertools.product(alphabet, repeat=length):
            tag = "".join(chars)
            slot = binascii.crc_hqx(tag.encode(), 0) % CLUSTER_SLOTS
            if tags[slot] is None:
                tags[slot] = tag
                missing -= 1
                if not missing:
                    return tuple(t for t in tags if t is not None)
    raise AssertionError("unreachable")


def slot_tag(slot: int) -> str:
    """A short hash tag (letters and digits) whose key hashes to ``slot``."""
    return _slot_tags()[slot]


def _tag_of(text: str) -> str | None:
    start = text.find("{")
    if start >= 0:
        end = text.find("}", start + 1)
        if end > start + 1:
            return text[start + 1 : end]
    return None


def template_hash_tag(literals: tuple[str, ...]) -> str | None:
    """The hash tag every key rendered from a template (given its literal parts) carries, or
    None when the slot depends on column values. A template naming no column is its own key."""
    if len(literals) == 1:
        key = literals[0]
        tag = _tag_of(key)
        return key if tag is None else tag
    return _tag_of(literals[0])


def glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH or ACL key pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def dead_letter_stream(stream: str) -> str:
    """The dead-letter stream of source ``stream``."""
    return stream + DLQ_SUFFIX


def is_dead_letter_stream(name: str) -> bool:
    """Whether ``name`` is a dead-letter stream (not a source stream)."""
    return name.endswith(DLQ_SUFFIX)


def source_of_dead_letters(name: str) -> str:
    """The source stream whose dead letters ``name`` holds."""
    return name.removesuffix(DLQ_SUFFIX)


def guarded_key(prefix: str, target: str) -> str:
    """``prefix`` + a name for ``target`` that stays in ``target``'s hash slot.

    ``user:42`` -> ``<prefix>{user:42}``; a target with its own hash tag keeps it
    (``<prefix>{t1}:user:42``); a target whose braces would confuse the tag rules, or the empty
    key (``{}`` is no tag), gets a short tag chosen to hash to the same slot.
    """
    start = target.find("{")
    if start >= 0 and target.find("}", start + 1) > start + 1:
        return prefix + target
    if start < 0 and "}" not in target and target:
        return f"{prefix}{{{target}}}"
    return f"{prefix}{{{slot_tag(key_slot(target))}}}:{target}"


class StateKeys:
    """The names of streamsync's own records, under the configured prefixes.

    In a Redis Cluster every function call keeps to one hash slot, so a rule's key index is
    kept per slot and the records of a rule whose keys gather many rows (placements, row index)
    share the slot its key template pins.
    """

    def __init__(
        self, position_prefix: str, state_prefix: str = "streamsync:", *, cluster: bool = False
    ) -> None:
        self.position_prefix = position_prefix
        self.state_prefix = state_prefix
        self.cluster = cluster

    @classmethod
    def from_settings(cls, worker: WorkerSettings, *, cluster: bool = False) -> StateKeys:
        """The keys under ``worker.position_prefix`` and ``worker.state_prefix``."""
        return cls(worker.position_prefix, worker.state_prefix, cluster=cluster)

    # -- per target key --------------------------------------------------------------------

    def position(self, target: str) -> str:
        """The position record of ``target`` (same hash slot)."""
        return guarded_key(self.position_prefix, target)

    def order(self, list_key: str) -> str:
        """The order record of a list rule's list (same hash slot as the list)."""
        return guarded_key(f"{self.state_prefix}ord:", list_key)

    def reserve(self, list_key: str) -> str:
        """The entries a capped list trimmed, kept to refill it (same hash slot as the list)."""
        return guarded_key(f"{self.state_prefix}rsv:", list_key)

    # -- per rule ----------------------------------------------------------------------------

    def key_index(self, rule: Rule, target: str | None = None) -> str:
        """The set of keys a rule keyed by primary key has written (for TRUNCATE and resync);
        in a cluster, one set per hash slot: the one of ``target``'s slot."""
        if self.cluster:
            if target is None:
                raise ValueError("a cluster's key index is per slot: name the target")
            return self.key_index_shard(rule, key_slot(target))
        return self._key_index(rule)

    def _key_index(self, rule: Rule) -> str:
        return f"{self.state_prefix}idx:{rule.state_name}:keys"

    def key_index_shard(self, rule: Rule, slot: int) -> str:
        """A cluster's key index for the keys of one hash slot."""
        return f"{self._key_index(rule)}:{{{slot_tag(slot)}}}"

    def is_key_index(self, index: str) -> bool:
        """Whether ``index`` lists target keys (else it lists source rows)."""
        return ":keys" in index[len(self.state_prefix) :]

    def row_index(self, rule: Rule) -> str:
        """The set of rows a rule with placement records has placed."""
        return f"{self.state_prefix}idx:{self._tag(rule)}{rule.state_name}:rows"

    def index_keys(self, rule: Rule) -> list[str]:
        """Every index key of ``rule`` (what a sweep walks)."""
        if not self.cluster:
            return [self._key_index(rule), self.row_index(rule)]
        shards = [self.key_index_shard(rule, slot) for slot in range(CLUSTER_SLOTS)]
        pinned = rule_pin(rule) is not None
        return shards + ([self.row_index(rule)] if pinned else [])

    def placement(self, rule: Rule, identity: str) -> str:
        """The record of where ``rule`` placed the source row ``identity``."""
        return f"{self.state_prefix}pl:{self._tag(rule)}{rule.state_name}:{identity}"

    def _tag(self, rule: Rule) -> str:
        # in a cluster, the rule's records share the hash slot its keys are pinned to
        if not self.cluster:
            return ""
        return f"{{{rule_pin(rule)}}}:"

    def bucket(self, rule_name: str, index: int, slot: int | None = None) -> str:
        """Bucket ``index`` of the records of rule ``rule_name`` (of hash slot ``slot`` in a
        Cluster: the bucket then hashes to that slot)."""
        if slot is None:
            return f"{self.state_prefix}b:{rule_name}:{index}"
        return f"{self.state_prefix}b:{rule_name}:{{{slot_tag(slot)}}}:{index}"

    # -- per group, stream and consumer ----------------------------------------------------------

    @property
    def epochs(self) -> str:
        """The hash holding every stream's resync epoch marks."""
        return self.state_prefix + "epochs"

    @property
    def hwm(self) -> str:
        """The hash of the per-rule high-water marks (field: the rule's ``state_name``; value:
        the newest position a batch of that rule was sent with), kept in the streams' Redis:
        the floor of a record a target under ``allkeys-*`` evicted."""
        return self.state_prefix + "hwm"

    @property
    def snapshots(self) -> str:
        """The hash holding every stream's snapshot marks (``streamsync.snapshots``)."""
        return self.state_prefix + "snaps"

    def stats(self, group: str, stream: str) -> str:
        """The hash where the workers of ``group`` count what they did with ``stream``'s
        entries (read by ``streamsync status``): ``n:<table>:<op>:<outcome>`` counters, and
        ``last_applied_ms``, ``last_source_ts_ms``, ``last_id`` of the newest applied change."""
        return f"{self.state_prefix}stats:{group}:{stream}"

    def lease(self, chore: str) -> str:
        """The lease a worker holds while it does ``chore`` for every worker (expiring
        records): one worker at a time."""
        return f"{self.state_prefix}lease:{chore}"

    def alive(self, group: str, consumer: str) -> str:
        """A running worker's liveness mark: a key it refreshes with a TTL while it runs, and
        deletes when it stops, so ``status`` tells a quiet live worker from a dead one."""
        return f"{self.state_prefix}alive:{group}:{consumer}"


_cached_hash_tag = functools.cache(template_hash_tag)


def rule_pin(rule: Rule) -> str | None:
    """The hash tag every key of ``rule`` carries, if its key template fixes one."""
    return _cached_hash_tag(rule.template.literals)
