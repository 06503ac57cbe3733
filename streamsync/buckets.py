"""Where a row's record lives: a rule's records are fields of small hashes, its *buckets*, and
a rule table grows its buckets one split at a time (linear hashing; docs/bookkeeping.md).

A *table* is the records of one rule (in a Redis Cluster: of one rule in one hash slot, so that
a record shares its target's slot). Bucket 0 holds the table's meta fields: ``#n``, the bucket
count N (absent: 1), and ``#c``, the records held. The worker addresses a record from N as last
seen and names N in every call; the library refuses rows addressed with a stale N (another worker
split meanwhile), and the worker addresses them again.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from streamsync.config import Rule
from streamsync.keys import StateKeys, key_slot

#: A table is split when it holds more than this many records per bucket: buckets then hold 32
#: to 64 records, under every Redis's hash-max-listpack-entries (128 upstream), so they stay
#: small listpacks and no call scans a long one.
SPLIT_ABOVE_PER_BUCKET = 64

#: The meta field of bucket 0 holding the table's bucket count.
META_BUCKETS = "#n"

#: Fields of bucket 0 that are not records (a record field starting with '#' is stored with a
#: second '#' in front, so it never is one of these).
META_PREFIX = "#"


def record_field(name: str) -> str:
    """The bucket field holding the record named ``name`` (a key suffix or a row identity)."""
    return "#" + name if name.startswith(META_PREFIX) else name


def record_name(stored: str) -> str:
    """The record name a bucket field holds (``record_field``'s inverse); a meta field's name is
    returned unchanged (callers skip those with ``is_meta``)."""
    return stored[1:] if stored.startswith("##") else stored


def as_text(value: str | bytes) -> str:
    """A field as read from Redis, as text."""
    return value.decode(errors="surrogateescape") if isinstance(value, bytes) else value


def as_bytes(value: str | bytes) -> bytes:
    """A field as read from Redis, as the bytes Redis holds."""
    return value if isinstance(value, bytes) else value.encode()


def is_meta(stored: str | bytes) -> bool:
    """Whether a bucket field is a meta field (``#n``, ``#c``, ``#``), not a record."""
    return as_text(stored).startswith(META_PREFIX) and not as_text(stored).startswith("##")


def bucket_index(crc: int, buckets: int) -> int:
    """The bucket of a record whose field has crc32 ``crc``, in a table of ``buckets`` buckets:
    ``crc mod 2^(L+1)``, or ``crc mod 2^L`` when that is ``buckets`` or more (L = floor(log2))."""
    level = buckets.bit_length() - 1
    index = crc & ((2 << level) - 1)
    if index >= buckets:
        index = crc & ((1 << level) - 1)
    return index


@dataclass(slots=True, eq=False)
class Table:
    """The records of one rule (of one hash slot, in a Cluster)."""

    rule: str
    slot: int | None
    keys: StateKeys
    #: The rule's TTL in milliseconds (0: none): records of its rows live that much longer.
    ttl_ms: int = 0
    #: The bucket count as last seen.
    buckets: int = 1
    #: The records held, as last seen.
    count: int = 0
    #: How the library treats a missing record on a target that may evict it (docs/bookkeeping.md
    #: "When Redis evicts"): '' not guarded, 'new', '?' or a floor position.
    guard: str = ""
    _names: list[str] = field(default_factory=list)

    @property
    def meta(self) -> str:
        """Bucket 0, which holds the meta fields."""
        return self.bucket(0)

    def bucket(self, index: int) -> str:
        """The key of bucket ``index``."""
        names = self._names
        while len(names) <= index:
            names.append(self.keys.bucket(self.rule, len(names), self.slot))
        return names[index]

    def locate(self, name: str) -> tuple[str, str]:
        """The bucket key and the field of the record named ``name``."""
        stored = record_field(name)
        return self.bucket(bucket_index(zlib.crc32(stored.encode()), self.buckets)), stored

    def bucket_of(self, stored: bytes) -> str:
        """The key of the bucket holding the record field ``stored``."""
        return self.bucket(bucket_index(zlib.crc32(stored), self.buckets))

    def seen(self, buckets: int, count: int) -> None:
        """What a reply said of the table."""
        self.buckets, self.count = buckets, count

    @property
    def splits_due(self) -> int:
        """How many splits would bring the table back under SPLIT_ABOVE_PER_BUCKET."""
        excess = self.count - SPLIT_ABOVE_PER_BUCKET * self.buckets
        return 0 if excess <= 0 else -(-excess // SPLIT_ABOVE_PER_BUCKET)

    def split_source(self) -> str:
        """The bucket the next split divides: bucket ``N - 2^L``."""
        return self.bucket(self.buckets - (1 << (self.buckets.bit_length() - 1)))

    def moving(self, fields: list[bytes]) -> list[bytes]:
        """Which of ``fields`` (the records the split bucket holds) move to the new bucket,
        bucket N: those whose crc32 has bit L set (L = floor(log2 N))."""
        bit = 1 << (self.buckets.bit_length() - 1)
        return [f for f in fields if zlib.crc32(f) & bit]


class Tables:
    """Every rule table a worker has met, with what it last saw of each."""

    def __init__(self, keys: StateKeys) -> None:
        self.keys = keys
        self._tables: dict[tuple[str, int | None], Table] = {}

    def table(self, rule: Rule, target: str | None = None) -> Table:
        """The table holding ``rule``'s record for ``target`` (its hash slot in a Cluster)."""
        slot = key_slot(target) if self.keys.cluster and target is not None else None
        return self.table_of_slot(rule, slot)

    def table_of_slot(self, rule: Rule, slot: int | None) -> Table:
        """The table holding ``rule``'s records of hash ``slot`` (None off a Cluster)."""
        found = self._tables.get((rule.state_name, slot))
        if found is None:
            ttl_ms = (rule.ttl_s or 0) * 1000
            found = Table(rule.state_name, slot, self.keys, ttl_ms)
            self._tables[(rule.state_name, slot)] = found
        return found

    def __iter__(self) -> Iterator[Table]:
        return iter(list(self._tables.values()))
