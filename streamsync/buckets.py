"""Where a row's record lives: a rule's records are fields of small hashes, its *buckets*, and
a rule table grows its buckets one split at a time (linear hashing; docs/bookkeeping.md).

A *table* is the records of one rule (in a Redis Cluster: of one rule in one hash slot, so that
a record shares its target's slot; a rule whose keys gather many rows or move pins its keys, and
its one table, to one slot). A single-value rule keyed by non-key columns keeps its records in a
table of its own (``StateKeys.moving_table``): ``r<identity>`` says which key the row holds,
``k<key without the literal prefix>`` which row wrote the key last. Bucket 0 holds the table's
meta fields: ``#n``, the bucket count N (absent: 1), and ``#c``, the records held. The worker
addresses a record from N as last seen and names N in every call; the library refuses rows
addressed with a stale N (another worker split meanwhile), and the worker addresses them again.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from streamsync.config import Mode, Rule, TargetType
from streamsync.keys import StateKeys, key_slot, rule_slot

#: A table is split when it holds more than this many records per bucket: buckets then hold 32
#: to 64 records, under every Redis's hash-max-listpack-entries (128 upstream), so they stay
#: small listpacks and no call scans a long one.
SPLIT_ABOVE_PER_BUCKET = 64

#: The meta fields of bucket 0 holding the table's bucket count and its record count.
META_BUCKETS = "#n"
META_COUNT = "#c"
#: Set in bucket 0 once records of the table were evicted (lua/streamsync.lua, guarded tables).
META_LOSSY = "#l"

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


#: The prefix of a moving table's record of a row (its field: ``r`` + the row identity) and of
#: its record of a key (``k`` + the key without the rule's literal prefix).
MOVING_ROW, MOVING_KEY = "r", "k"


@dataclass(slots=True, eq=False)
class Table:
    """The records of one rule (of one hash slot, in a Cluster)."""

    name: str
    slot: int | None
    keys: StateKeys
    #: The rule's TTL in milliseconds (0: none): records of its rows live that much longer.
    ttl_ms: int = 0
    #: What the library needs to name the keys a record says a row was placed in (see
    #: ``shape_of``); empty for a table of rows keyed for good.
    shape: tuple[str, ...] = ()
    #: The bucket count as last seen.
    buckets: int = 1
    #: The records held, as last seen.
    count: int = 0
    #: How the library treats a missing record on a target that may evict it (docs/bookkeeping.md
    #: "When Redis evicts"): '' not guarded, 'new', '?' or '<token>@<floor>'.
    guard: str = ""
    #: The token the rebuild of the table's bucket 0, found gone, waits for ('' when none).
    pending: str = ""
    _names: list[str] = field(default_factory=list)

    @property
    def ident(self) -> str:
        """The table's name among all tables (its high-water mark's field)."""
        return self.name if self.slot is None else f"{self.name}@{self.slot}"

    @property
    def meta(self) -> str:
        """Bucket 0, which holds the meta fields."""
        return self.bucket(0)

    @property
    def overflow(self) -> str:
        """The hash holding the placements too long for a bucket."""
        return self.keys.overflow(self.name, self.slot)

    def bucket(self, index: int) -> str:
        """The key of bucket ``index``."""
        names = self._names
        while len(names) <= index:
            names.append(self.keys.bucket(self.name, len(names), self.slot))
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


def _around(template_literals: tuple[str, ...]) -> tuple[str, str]:
    """What a rendered key holds before and after the part its columns fill."""
    if len(template_literals) == 1:
        return template_literals[0], ""
    return template_literals[0], template_literals[-1]


def shape_of(rule: Rule, keys: StateKeys, slot: int | None, moving: bool) -> tuple[str, ...]:
    """What the library needs to name the keys a placement record holds only the middle of
    (the key without the text its template fixes around the columns): set and sorted-set
    rules, the key's and the member's text before and after; list rules, the key's, its order
    record's and its reserve's; a moving table, the key's and its buckets' name before the
    index (the library finds a former key's record itself)."""
    before, after = _around(rule.template.literals)
    if rule.nest is not None:
        assert rule.nest_member_template is not None
        # and the token of the parent document's member holding the children
        return before, after, *_around(rule.nest_member_template.literals), f'"{rule.nest.path}"'
    if moving:
        return before, after, keys.bucket_prefix(StateKeys.moving_table(rule), slot)
    if rule.type in (TargetType.SET, TargetType.ZSET):
        assert rule.member_template is not None
        return before, after, *_around(rule.member_template.literals)
    if rule.type is TargetType.LIST:
        mark = "\0"
        shape = [before, after]
        for companion in (keys.order, keys.reserve):
            if rule.template.is_static:
                shape += (companion(before), "")
            else:
                named = companion(before + mark + after).split(mark)
                assert len(named) == 2, named
                shape += named
        return tuple(shape)
    return ()


class Tables:
    """Every rule table a worker has met, with what it last saw of each."""

    def __init__(self, keys: StateKeys) -> None:
        self.keys = keys
        self._tables: dict[tuple[str, int | None], Table] = {}

    def table(self, rule: Rule, target: str | None = None) -> Table:
        """The table holding ``rule``'s record for ``target``: in a Cluster, of the slot the rule
        pins, or else of ``target``'s slot."""
        return self.table_of_slot(rule, self._slot(rule, target))

    def moving(self, rule: Rule, target: str | None = None) -> Table:
        """The table of a single-value ``rule`` whose keys move (``StateKeys.moving_table``)."""
        return self._get(rule, self._slot(rule, target), moving=True)

    def table_of_slot(self, rule: Rule, slot: int | None) -> Table:
        """The table holding ``rule``'s records of hash ``slot`` (None off a Cluster)."""
        return self._get(rule, slot, moving=False)

    def moving_of_slot(self, rule: Rule, slot: int | None) -> Table:
        """The moving table of ``rule`` of hash ``slot`` (None off a Cluster)."""
        return self._get(rule, slot, moving=True)

    def _slot(self, rule: Rule, target: str | None) -> int | None:
        if not self.keys.cluster:
            return None
        slot = rule_slot(rule)
        if slot is None:
            if target is None:
                raise ValueError(f"rule {rule.state_name} pins no slot: name the target")
            slot = key_slot(target)
        return slot

    def _get(self, rule: Rule, slot: int | None, *, moving: bool) -> Table:
        name = StateKeys.moving_table(rule) if moving else rule.state_name
        found = self._tables.get((name, slot))
        if found is None:
            ttl_ms = (rule.ttl_s or 0) * 1000
            writes = rule.mode is Mode.WRITE_THROUGH
            shape = shape_of(rule, self.keys, slot, moving) if writes else ()
            found = Table(name, slot, self.keys, ttl_ms, shape)
            self._tables[(name, slot)] = found
        return found

    def __iter__(self) -> Iterator[Table]:
        return iter(list(self._tables.values()))
