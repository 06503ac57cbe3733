"""Guarding the rule tables on a target that may evict them (docs/bookkeeping.md, "When Redis
evicts"): a cache Redis of its own under an ``allkeys-*`` policy can evict the buckets holding
the records, and a row without a record may then be new, or a row last written at an unknown
position.

The library keeps each table's high mark in its bucket 0 and rebuilds a bucket found gone with
it as the floor. Bucket 0 itself found gone is where the worker helps: before a batch is sent to
such a target, the high-water mark of each rule table it touches is raised, in the streams' Redis
(which must not evict), to the newest position the batch holds for it, so a mark is never older
than a change ever sent to its table. A table whose mark was absent is one no batch was ever sent
for: the batch is its first writer (guard ``new``). Every other table is guarded with ``?``: when
its bucket 0 is gone its rows reply UNKNOWN with a token, and the worker reads the table's mark
*then* and sends the rows again with ``<token>@<mark>`` (``Guards.floors``), for the library to
rebuild bucket 0 with the mark as the table's floor if the token is still there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from streamsync.buckets import Table
from streamsync.keys import StateKeys
from streamsync.worker.entry import Entry
from streamsync.worker.session import Session

#: The guard of a table on a target that does not evict its records.
UNGUARDED = ""
#: The table's first batch: a missing bucket 0 is a new table.
FIRST = "new"
#: Any other batch: a bucket found gone is rebuilt with the table's high mark.
ASK = "?"
#: Between the token of a bucket 0's rebuild and the floor it is rebuilt with.
REBUILD = "@"
#: The floor of a table nothing was ever applied to: older than any position.
NOTHING = "0"


def _marks(batch: Sequence[Entry]) -> dict[Table, str]:
    """The newest position of each rule table's rows in ``batch``."""
    newest: dict[Table, str] = {}
    for entry in batch:
        for row in entry.rows:
            table = row.table
            if table is None:
                continue
            position = row.args[2]
            position = position.decode() if isinstance(position, bytes) else position
            if table not in newest or newest[table] < position:
                newest[table] = position
    return newest


class Guards:
    """The high-water marks and guards of the rule tables a worker writes."""

    def __init__(self, keys: StateKeys) -> None:
        self.keys = keys
        self._floored: set[Table] = set()

    def before(self, streams: Session, batch: Sequence[Entry], evictable: bool) -> None:
        """Raise the marks of the tables ``batch`` writes (when the target may evict the
        bookkeeping), and set each table's guard for the batch's calls."""
        marks = _marks(batch)
        if not evictable:
            for table in marks:
                table.guard = UNGUARDED
            return
        raised = streams.library.raise_hwm(
            self.keys.hwm, [(table.ident, position) for table, position in marks.items()]
        )
        for table in marks:
            if table in self._floored:
                continue
            table.guard = FIRST if table.ident in raised.first else ASK

    def floors(self, streams: Session, tables: Iterable[Table]) -> None:
        """Tables whose rows replied UNKNOWN (their bucket 0 is gone): guarded by their mark as
        it is now, read after the library set the rebuild's token, for the batch sent again."""
        wanted = list(tables)
        found = streams.call("HMGET", self.keys.hwm, *(table.ident for table in wanted))
        for table, mark in zip(wanted, found, strict=True):
            # no mark: nothing was ever sent for the table, so nothing of it was applied
            floor = mark.decode() if mark else NOTHING
            table.guard = f"{table.pending}{REBUILD}{floor}"
            self._floored.add(table)

    def settled(self) -> None:
        """A batch went through: the floors it used are spent."""
        for table in self._floored:
            table.guard = ASK
        self._floored.clear()
