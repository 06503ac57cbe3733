"""The streamsync Functions library (lua/streamsync.lua): load it, verify its version, and call
it. One typed wrapper per registered function the package calls; no FCALL is built elsewhere.

The worker sends its batch calls over a raw pipelined link (see ``streamsync.link``): for it,
``batch_command`` builds the call and ``batch_replies`` reads the reply. Everything else calls
through ``Library``, which reloads the library when Redis lost it (a restart without
persistence, a ``FUNCTION FLUSH``).
"""

from __future__ import annotations

import enum
import functools
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import redis

from streamsync.errors import LibraryIncompatibleError

log = logging.getLogger(__name__)

FN_VERSION = "streamsync_version"
FN_BATCH = "streamsync_batch"
FN_TRIM = "streamsync_trim"
FN_PRUNE_CONSUMER = "streamsync_prune_consumer"
FN_MARK_EPOCH = "streamsync_mark_epoch"
FN_RAISE_HWM = "streamsync_raise_hwm"
FN_MARK_SNAPSHOT = "streamsync_mark_snapshot"

_VERSION_RE = re.compile(r"^local VERSION = '(\d+)\.(\d+)\.(\d+)'$", re.MULTILINE)

Version = tuple[int, int, int]
Command = tuple[Any, ...]
Client = redis.Redis | redis.RedisCluster
ArgV = list[str | bytes]


class RowStatus(enum.IntEnum):
    """What the library did with one row of a batch call."""

    #: Not applied: the row's position is not newer than the one recorded.
    STALE = 0
    APPLIED = 1
    #: An update with unchanged TOAST columns for a row that is not cached: left absent, so no
    #: partial row is cached.
    SKIPPED = 2
    #: The cached row could not be completed, so it was deleted; the next full change fills it.
    DROPPED = 3

    @property
    def outcome(self) -> str:
        """The name counted for it: ``applied``, ``stale``, ``skipped``, ``dropped``."""
        return self.name.lower()


#: A row's reply: its status, or the text of the Redis error that failed it (the other rows of
#: the call still apply).
RowReply = RowStatus | str


@dataclass(slots=True)
class RowWrite:
    """One row of a batch call: its KEYS (its rule's index first, then the kind's keys) and its
    ARGV items (kind, index member, then the kind's items; layouts in lua/streamsync.lua,
    built by ``streamsync.mapping``)."""

    keys: list[str]
    args: ArgV


def _batch_arguments(rows: Iterable[RowWrite], tombstone_ms: int) -> tuple[list[str], ArgV]:
    keys: list[str] = []
    args: ArgV = [str(tombstone_ms)]
    for row in rows:
        keys += row.keys
        args += row.args
    return keys, args


def batch_command(rows: Iterable[RowWrite], tombstone_ms: int) -> Command:
    """The ``streamsync_batch`` call applying ``rows`` in order: KEYS are the rows' keys, ARGV
    the tombstone TTL in milliseconds then the rows' items."""
    keys, args = _batch_arguments(rows, tombstone_ms)
    return ("FCALL", FN_BATCH, len(keys), *keys, *args)


def batch_replies(reply: Sequence[Any]) -> list[RowReply]:
    """A ``streamsync_batch`` reply as one RowReply per row."""
    return [RowStatus(item) if isinstance(item, int) else _text(item) for item in reply]


def raise_hwm_command(hwm_key: str, marks: Iterable[tuple[str, str]]) -> Command:
    """The ``streamsync_raise_hwm`` call raising each (rule name, position) pair's mark in the
    hash ``hwm_key`` (``StateKeys.hwm``) to at least the position, atomically."""
    args = [item for pair in marks for item in pair]
    return ("FCALL", FN_RAISE_HWM, 1, hwm_key, *args)


def hwm_reply(marks: Iterable[tuple[str, str]], reply: Sequence[Any]) -> dict[str, str]:
    """A ``streamsync_raise_hwm`` reply as {rule name: its mark after the call}."""
    return {rule: _text(mark) for (rule, _), mark in zip(marks, reply, strict=True)}


def mark_snapshot_command(snapshots_key: str, stream: str, lsn: int, entry_id: bytes) -> Command:
    """The ``streamsync_mark_snapshot`` call recording that the reads of the snapshot at ``lsn``
    start at or before entry ``entry_id`` of ``stream``; it replies the stream's marks (see
    ``streamsync.snapshots``)."""
    return ("FCALL", FN_MARK_SNAPSHOT, 1, snapshots_key, stream, str(lsn), entry_id)


def is_missing_library(message: str) -> bool:
    """Whether an error reply says the library is not loaded."""
    return "function not found" in message.lower()


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@cache
def library_source() -> str:
    """The library's Lua source: from the wheel, or from the source tree in a checkout."""
    packaged = resources.files("streamsync").joinpath("lua/streamsync.lua")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    checkout = Path(__file__).resolve().parent.parent / "lua" / "streamsync.lua"
    return checkout.read_text(encoding="utf-8")


def parse_version(text: str) -> Version:
    """``"1.2.3"`` -> ``(1, 2, 3)``; ValueError otherwise."""
    parts = text.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a MAJOR.MINOR.PATCH version: {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def format_version(version: Version) -> str:
    """``(1, 2, 3)`` -> ``"1.2.3"``."""
    return ".".join(map(str, version))


@cache
def library_version() -> Version:
    """The version of the library this package ships."""
    match = _VERSION_RE.search(library_source())
    if not match:
        raise RuntimeError("lua/streamsync.lua has no `local VERSION = 'X.Y.Z'` line")
    return int(match[1]), int(match[2]), int(match[3])


Execute = Callable[..., Any]


def loaded_version(client: redis.Redis) -> Version | None:
    """The version of the library loaded in Redis (``streamsync_version``, read-only), or None
    when there is none."""
    return _loaded(client.execute_command)


def _loaded(execute: Execute) -> Version | None:
    try:
        reply = execute("FCALL_RO", FN_VERSION, 0)
    except redis.ResponseError as exc:
        if is_missing_library(str(exc)):
            return None
        raise
    return parse_version(_text(reply))


def ensure_library(client: Client) -> Version:
    """Load the shipped library unless Redis holds a newer compatible one; return the version
    in use. Raises LibraryIncompatibleError when Redis holds a newer major version: this worker
    is too old for it and must not downgrade it under newer workers. In a Redis Cluster, on
    every primary (a replica gets it from its primary)."""
    if isinstance(client, redis.RedisCluster):
        cluster = client
        versions = [
            _ensure(functools.partial(cluster.execute_command, target_nodes=node))
            for node in cluster.get_primaries()
        ]
        return min(versions)
    return _ensure(client.execute_command)


def _ensure(execute: Execute) -> Version:
    ours = library_version()
    current = _loaded(execute)
    if current is not None and current > ours:
        if current[0] != ours[0]:
            raise LibraryIncompatibleError(
                f"Redis holds streamsync library {format_version(current)}, incompatible with"
                f" this worker's {format_version(ours)}: upgrade streamsync"
            )
        log.info(
            "keeping newer compatible library %s (ours is %s)",
            format_version(current),
            format_version(ours),
        )
        return current
    if current == ours:
        # already there (loaded by another worker, or by an operator, so that the workers'
        # ACL can go without FUNCTION LOAD)
        return ours
    execute("FUNCTION", "LOAD", "REPLACE", library_source())
    log.info(
        "loaded streamsync library %s (was %s)",
        format_version(ours),
        format_version(current) if current else "absent",
    )
    return ours


class Library:
    """The library's functions, called on one client (a server or a cluster). A call that
    finds the library missing loads it and is sent once more."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def ensure(self) -> Version:
        """Load the library unless a newer compatible one is there (see ensure_library)."""
        return ensure_library(self.client)

    def _call(self, function: str, keys: Sequence[str], *args: Any) -> Any:
        try:
            return self.client.fcall(function, len(keys), *keys, *args)
        except redis.ResponseError as exc:
            if not is_missing_library(str(exc)):
                raise
        self.ensure()
        return self.client.fcall(function, len(keys), *keys, *args)

    def batch(self, rows: Sequence[RowWrite], tombstone_ms: int) -> list[RowReply]:
        """``streamsync_batch``: apply ``rows`` (of one hash slot in a cluster)."""
        keys, args = _batch_arguments(rows, tombstone_ms)
        return batch_replies(self._call(FN_BATCH, keys, *args))

    def trim(self, stream: str) -> int:
        """``streamsync_trim``: remove entries of ``stream`` every group acknowledged; returns
        how many (call again while it returns the library's per-call limit or more)."""
        return int(self._call(FN_TRIM, [stream]))

    def prune_consumer(self, stream: str, group: str, consumer: str, min_idle_ms: int) -> bool:
        """``streamsync_prune_consumer``: delete ``consumer`` from ``group`` if it holds nothing
        and has been idle ``min_idle_ms``, atomically; True when deleted."""
        return bool(self._call(FN_PRUNE_CONSUMER, [stream], group, consumer, min_idle_ms))

    def raise_hwm(self, hwm_key: str, marks: Iterable[tuple[str, str]]) -> dict[str, str]:
        """``streamsync_raise_hwm``: raise each (rule name, position) pair's high-water mark to
        at least the position, atomically; returns every named rule's mark after the call."""
        pairs = list(marks)
        if not pairs:
            return {}
        command = raise_hwm_command(hwm_key, pairs)
        return hwm_reply(pairs, self._call(FN_RAISE_HWM, [hwm_key], *command[4:]))

    def mark_epoch(self, epochs_key: str, stream: str) -> tuple[int, str]:
        """``streamsync_mark_epoch``: start a new resync epoch for ``stream``; returns the epoch
        and the id of the last entry before it."""
        epoch, after = self._call(FN_MARK_EPOCH, [epochs_key, stream])
        return int(epoch), _text(after)
