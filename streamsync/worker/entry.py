"""A stream entry in a worker's hands, from delivery to acknowledgement."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from streamsync.functions import RowWrite


@dataclass(slots=True)
class Entry:
    """A stream entry delivered to this consumer, with what it must become."""

    stream: str
    id: bytes
    #: The entry's flat field/value list; None when it was deleted from the stream while
    #: pending (XAUTOCLAIM and XREADGROUP of pending entries say so).
    fields: list[bytes] | None
    #: Times the group delivered it (1 for a first read).
    deliveries: int = 1
    table: str = ""
    op: str = ""
    rows: Sequence[RowWrite] = ()
    #: Source commit time, for the end-to-end lag.
    ts_ms: int | None = None
    #: Why the entry failed this time, if it did.
    error: str | None = None
    #: What applying its rows did: "applied" if any row applied, else the first row's outcome.
    outcome: str | None = None
    #: Apply each of its rows in a call of its own (a batch call failed as a whole).
    solo: bool = False

    @property
    def label(self) -> str:
        """``<stream> <id>``, for log lines."""
        return f"{self.stream} {self.id.decode()}"

    @property
    def added_ms(self) -> int:
        """When the entry was added to its stream (its id's time part)."""
        return int(self.id.partition(b"-")[0])


def from_items(stream: str, items: Any) -> list[Entry]:
    """Entries from a stream's ``[[id, fields], ...]`` (XREADGROUP, XAUTOCLAIM, XRANGE)."""
    return [
        Entry(stream, eid, list(fields) if fields is not None else None) for eid, fields in items
    ]


def from_read(reply: Any) -> list[Entry]:
    """Entries from an XREADGROUP reply over one or several streams (RESP2, unparsed)."""
    if not reply:
        return []
    entries: list[Entry] = []
    for stream_name, items in reply:
        entries += from_items(stream_name.decode(), items)
    return entries
