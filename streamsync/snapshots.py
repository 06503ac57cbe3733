"""Snapshot marks: which snapshot each stream entry follows.

A change of the first transaction streamed after a snapshot carries no ``lastCommitLsn``, so
its position (``streamsync.positions.after_snapshot``) needs the LSN of the snapshot it follows,
and only the stream's order tells which one that is. So when a worker meets a snapshot read, it
marks the stream, through the library (``streamsync_mark_snapshot``), in the same round trip as
and before the call that applies the read: "a snapshot at LSN S whose reads start at or before
entry E". A mark is thus durable before any read of its snapshot is acknowledged, and a change
held until every older entry of its stream is settled finds the mark of the snapshot it follows.

The marks hash (``StateKeys.snapshots``) has one field per stream; its value is the JSON array
of ``["<snapshot LSN>", "<first entry id of its reads>"]`` (LSNs as text: Lua numbers are
doubles), ordered by entry id.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from streamsync.epochs import parse_id

StreamId = tuple[int, int]


class Snapshots:
    """The snapshot marks of every stream, as last read from the marks hash."""

    def __init__(self) -> None:
        self._marks: dict[str, list[tuple[StreamId, int]]] = {}

    def load(self, hash_fields: Mapping[Any, Any] | list[Any] | None) -> None:
        """Replace every stream's marks with an HGETALL reply (a flat list or a mapping)."""
        pairs: Iterable[tuple[Any, Any]]
        if isinstance(hash_fields, list):
            pairs = zip(hash_fields[0::2], hash_fields[1::2], strict=True)
        else:
            pairs = (hash_fields or {}).items()
        self._marks = {}
        for stream, value in pairs:
            self.update(stream.decode() if isinstance(stream, bytes) else str(stream), value)

    def update(self, stream: str, value: bytes | str | None) -> None:
        """Replace ``stream``'s marks with a field of the marks hash (as HGET or
        ``streamsync_mark_snapshot`` reply it); an unreadable value counts as no mark."""
        try:
            parsed = orjson.loads(value) if value is not None else []
            marks = [(parse_id(str(first)), int(lsn)) for lsn, first in parsed]
        except (ValueError, TypeError):
            marks = []
        marks.sort()
        self._marks[stream] = marks

    def clear(self) -> None:
        """Forget every mark (they are read again when needed)."""
        self._marks.clear()

    def at(self, stream: str, entry_id: bytes | str) -> int | None:
        """The LSN of the snapshot entry ``entry_id`` of ``stream`` follows (or is a read of):
        the newest mark whose first read is at or before it; None when no mark is."""
        eid = parse_id(entry_id)
        lsn = None
        for first, mark in self._marks.get(stream, ()):
            if first > eid:
                break
            lsn = mark
        return lsn
