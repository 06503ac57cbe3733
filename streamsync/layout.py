"""Which bookkeeping layout the cache's Redis holds, and the marker that says so.

A 2.0 worker reads records only in 2.0's layout (``docs/bookkeeping.md``). Against records a 1.x
worker left it would find no record for rows that have one, and write changes older than those
applied over them: so it never applies anything there. The Redis holding the cache keeps a
marker, ``<state_prefix>layout`` (``StateKeys.layout``): ``2`` once a 2.0 worker found no 1.x
bookkeeping there, or once ``streamsync migrate`` converted it; ``migrating`` while a migration
runs (or after one that did not finish). A worker reads the marker when it connects: one GET.
Without one, it looks for 1.x bookkeeping by names it knows, without scanning the keyspace:

- a library 1.x loaded (1.x workers load theirs; Redis keeps it with the data, on every primary
  of a Cluster);
- the configured rules' 1.x indexes (``streamsync.v1``): every row a 1.x rule cached or placed
  is in one.

What neither finds is a store of tombstones and invalidate records only, behind a library that
was flushed: ignoring those can let a replay older than a delete write its row back within the
tombstone window, never roll back a row cached since; ``streamsync migrate`` converts them all
the same.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import redis

from streamsync import v1
from streamsync.config import SINGLE_VALUE_TYPES, Mode, Rule, Settings, TargetType
from streamsync.errors import LegacyLayoutError, LibraryIncompatibleError
from streamsync.functions import Client, format_version, loaded_versions
from streamsync.keys import StateKeys

log = logging.getLogger(__name__)

#: The marker's values.
CURRENT = b"2"
MIGRATING = b"migrating"

#: EXISTS commands pipelined at a time while looking for 1.x indexes.
_EXISTS_CHUNK = 2048


class Layout(enum.Enum):
    """What the cache's Redis holds."""

    #: Marked 2: a 2.0 worker may apply.
    CURRENT = "2"
    #: Library 1.x bookkeeping, not migrated.
    LEGACY = "1.x"
    #: A migration started and did not finish.
    MIGRATING = "migrating"
    #: No marker and no 1.x bookkeeping: a worker marks it 2 and applies.
    NONE = "none"
    #: A marker this version does not know (a newer layout).
    NEWER = "newer"


@dataclass(frozen=True, slots=True)
class Finding:
    """A layout, and what told it."""

    layout: Layout
    #: The marker's value, the library or the key that told it (for messages).
    evidence: str = ""


def refusal(finding: Finding, config: str = "<file>") -> str:
    """What to tell an operator whose cache's Redis a 2.0 worker must not apply to."""
    if finding.layout is Layout.NEWER:
        return (
            f"Redis holds streamsync bookkeeping of layout {finding.evidence}, newer than this"
            f" worker's {CURRENT.decode()}: upgrade streamsync"
        )
    if finding.layout is Layout.MIGRATING:
        return (
            "Redis holds streamsync bookkeeping a migration from 1.x did not finish converting:"
            f" run 'streamsync migrate -c {config}' again (it resumes)"
        )
    return (
        "Redis holds streamsync 1.x bookkeeping"
        f"{f' ({finding.evidence})' if finding.evidence else ''}: stop every 1.x worker,"
        f" then run 'streamsync migrate -c {config}'"
    )


def detect(client: Client, settings: Settings, *, thorough: bool = True) -> Finding:
    """The layout the cache's Redis (``client``) holds. ``thorough``: in a Redis Cluster, also
    look for the 1.x key indexes of every hash slot (16,384 per single-value rule, pipelined;
    a worker does it once, before it marks the layout); ``status`` does without."""
    keys = StateKeys.from_settings(settings.worker)
    marker = client.get(keys.layout)
    if marker is not None:
        return _marked(bytes(marker) if not isinstance(marker, str) else marker.encode())
    for version in loaded_versions(client):
        if version is not None and version[0] == 1:
            return Finding(Layout.LEGACY, f"library {format_version(version)} loaded")
    cluster = isinstance(client, redis.RedisCluster)
    names = _index_names(settings, cluster=cluster, thorough=thorough)
    found = _first_existing(client, names)
    if found is not None:
        return Finding(Layout.LEGACY, f"{found} exists")
    return Finding(Layout.NONE)


def _marked(marker: bytes) -> Finding:
    if marker == CURRENT:
        return Finding(Layout.CURRENT)
    if marker == MIGRATING:
        return Finding(Layout.MIGRATING, MIGRATING.decode())
    return Finding(Layout.NEWER, marker.decode(errors="replace"))


def legacy_indexes(rule: Rule, state_prefix: str, *, cluster: bool) -> list[str]:
    """The 1.x indexes ``rule`` kept: the keys it cached (single-value rules, per slot in a
    Cluster) and the rows it placed (rules placing rows; single-value rules whose key moves)."""
    if rule.mode is Mode.INVALIDATE or rule.type is TargetType.STREAM:
        return []
    rows = v1.row_index(state_prefix, rule, cluster)
    if rule.type in SINGLE_VALUE_TYPES:
        return [rows, *v1.key_indexes(state_prefix, rule, cluster)]
    return [rows]


def _index_names(settings: Settings, *, cluster: bool, thorough: bool) -> Iterator[str]:
    prefix = settings.worker.state_prefix
    for rule in settings.rules:
        names = legacy_indexes(rule, prefix, cluster=cluster)
        yield from names if thorough or not cluster else names[:1]


def _first_existing(client: Client, names: Iterable[str]) -> str | None:
    chunk: list[str] = []
    for name in names:
        chunk.append(name)
        if len(chunk) == _EXISTS_CHUNK:
            found = _existing(client, chunk)
            if found is not None:
                return found
            chunk = []
    return _existing(client, chunk) if chunk else None


def _existing(client: Client, names: list[str]) -> str | None:
    # one key per EXISTS: in a Cluster, the names of one chunk hash to many slots
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.exists(name)
    for name, count in zip(names, pipe.execute(), strict=True):
        if count:
            return name
    return None


def claim(client: Client, settings: Settings) -> Finding:
    """What a 2.0 worker checks when it connects, before it loads its library or applies
    anything: the layout is 2, or is marked 2 now that no 1.x bookkeeping is there. Raises
    LegacyLayoutError (1.x bookkeeping, or a migration that did not finish) or
    LibraryIncompatibleError (a newer layout)."""
    finding = detect(client, settings)
    if finding.layout is Layout.NONE:
        keys = StateKeys.from_settings(settings.worker)
        # NX: a migration that started meanwhile keeps its own marker
        client.set(keys.layout, CURRENT, nx=True)
        finding = detect(client, settings)
        if finding.layout is Layout.CURRENT:
            log.info("no 1.x bookkeeping in the cache's Redis: marked it layout 2")
    if finding.layout is Layout.CURRENT:
        return finding
    if finding.layout is Layout.NEWER:
        raise LibraryIncompatibleError(refusal(finding))
    raise LegacyLayoutError(refusal(finding))


def mark(client: Client, settings: Settings, value: bytes) -> None:
    """Set the marker (``streamsync migrate``: MIGRATING when it starts, CURRENT when done)."""
    client.set(StateKeys.from_settings(settings.worker).layout, value)
