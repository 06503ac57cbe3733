"""Every key name streamsync owns, and the Redis Cluster hash-slot arithmetic behind them.

streamsync keeps records beside the cache: per rule, buckets of records and an overflow hash;
per list, its order and reserve records; resync epochs, snapshot marks, the per-table high-water
marks, status counters, worker liveness marks, and a dead-letter stream per source stream. Their
names are built here and only here. Every key a library call touches arrives in KEYS, but for the
keys of where a row *was* (known only once its record is read): the library puts those together
from the pieces of their names the worker sends (``Table.shape``), following the rules written
here.
"""

from __future__ import annotations

import binascii
import functools
import itertools
import string
from collections.abc import Sequence
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
    """The names of streamsync's own records, under the configured prefix.

    A rule's records are fields of its buckets (``streamsync.buckets``). In a Redis Cluster
    every function call keeps to one hash slot: a rule keyed by primary key has a table per
    slot, and a rule whose keys gather many rows or move (placements) keeps its table, and its
    lists' companions, in the slot its key template pins.
    """

    def __init__(self, state_prefix: str = "streamsync:", *, cluster: bool = False) -> None:
        self.state_prefix = state_prefix
        self.cluster = cluster

    @classmethod
    def from_settings(cls, worker: WorkerSettings, *, cluster: bool = False) -> StateKeys:
        """The keys under ``worker.state_prefix``."""
        return cls(worker.state_prefix, cluster=cluster)

    # -- per list key ----------------------------------------------------------------------

    def order(self, list_key: str) -> str:
        """The order record of a list rule's list: its entries' sort keys, then those of the
        entries its reserve holds, newest first (same hash slot as the list)."""
        return self._companion(f"{self.state_prefix}ord:", list_key)

    def reserve(self, list_key: str) -> str:
        """The entries a capped list trimmed, kept to refill it (same hash slot as the list)."""
        return self._companion(f"{self.state_prefix}rsv:", list_key)

    def _companion(self, prefix: str, list_key: str) -> str:
        # ``prefix + list_key``: the library names a former list's companions the same way
        # (a row that moved to another list). In a Cluster that keeps the list's slot when the
        # key has a hash tag, as the key of every list rule whose key can change has; a fixed
        # key without one (which never changes) is guarded.
        if not self.cluster or _tag_of(list_key) is not None:
            return prefix + list_key
        return guarded_key(prefix, list_key)

    # -- per rule ----------------------------------------------------------------------------

    def bucket(self, table: str, index: int, slot: int | None = None) -> str:
        """Bucket ``index`` of the records of table ``table`` (a rule's name, or
        ``moving_table``'s) of hash slot ``slot`` in a Cluster (the bucket then hashes to that
        slot). The name ends with the index: the library names the bucket of a moving row's
        former key this way (``bucket_prefix``)."""
        return f"{self.bucket_prefix(table, slot)}{index}"

    def bucket_prefix(self, table: str, slot: int | None = None) -> str:
        """What the names of a table's buckets start with, before the bucket index."""
        if slot is None:
            return f"{self.state_prefix}b:{table}:"
        return f"{self.state_prefix}b:{table}:{{{slot_tag(slot)}}}:"

    def overflow(self, table: str, slot: int | None = None) -> str:
        """The hash holding the placements of a table's records too long to keep in a bucket
        (which would turn the whole bucket into a hashtable)."""
        if slot is None:
            return f"{self.state_prefix}o:{table}"
        return f"{self.state_prefix}o:{table}:{{{slot_tag(slot)}}}"

    @staticmethod
    def moving_table(rule: Rule) -> str:
        """The table of a single-value rule keyed by non-key columns (its key moves when they
        change): per row where it is, per key who wrote it. A rule's name never holds ``=``."""
        return f"{rule.state_name}=m"

    # -- per group, stream and consumer ----------------------------------------------------------

    @property
    def epochs(self) -> str:
        """The hash holding every stream's resync epoch marks (field: the stream)."""
        return self.state_prefix + "epochs"

    def epochs_of(self, stream: str, cluster: bool) -> str:
        """The hash holding ``stream``'s epoch marks: ``epochs``, or in a Redis Cluster a hash
        of its own in the stream's slot, so that marking an epoch reads the stream's end and
        records the mark in one atomic call, and a worker reads the marks after its read of
        the stream on the same node."""
        if not cluster:
            return self.epochs
        return guarded_key(self.state_prefix + "epochs:", stream)

    def epochs_commands(self, streams: Sequence[str], cluster: bool) -> list[tuple[str, str]]:
        """The HGETALL commands reading the epoch marks of ``streams``."""
        if not cluster:
            return [("HGETALL", self.epochs)]
        return [("HGETALL", self.epochs_of(stream, True)) for stream in streams]

    @property
    def layout(self) -> str:
        """The marker of the bookkeeping layout the cache's Redis holds (``streamsync.layout``):
        ``2`` once a 2.0 worker found no 1.x bookkeeping there, or ``streamsync migrate``
        converted it."""
        return self.state_prefix + "layout"

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

    def json_probe(self, consumer: str) -> str:
        """A key a worker writes and deletes at connect to learn whether it may run the
        RedisJSON commands (``streamsync.redisjson``)."""
        return f"{self.state_prefix}jsonprobe:{consumer}"

    def alive(self, group: str, consumer: str) -> str:
        """A running worker's liveness mark: a key it refreshes with a TTL while it runs, and
        deletes when it stops, so ``status`` tells a quiet live worker from a dead one."""
        return f"{self.state_prefix}alive:{group}:{consumer}"


_cached_hash_tag = functools.cache(template_hash_tag)


def rule_pin(rule: Rule) -> str | None:
    """The hash tag every key of ``rule`` carries, if its key template fixes one."""
    return _cached_hash_tag(rule.template.literals)


def rule_slot(rule: Rule) -> int | None:
    """The hash slot every key of ``rule`` hashes to, if its key template pins one."""
    pin = rule_pin(rule)
    return None if pin is None else binascii.crc_hqx(pin.encode(), 0) % CLUSTER_SLOTS
