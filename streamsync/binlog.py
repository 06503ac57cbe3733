"""MySQL and MariaDB changes (Debezium's ``mysql`` and ``mariadb`` connectors): their tables'
names and their positions in the binlog.

A change's ``source`` names the binlog ``file`` (``binlog.000003``), the byte offset ``pos`` of its
row event in that file and the ``row`` index within the event; a snapshot read carries the
position where the snapshot was taken (``row`` 0), and every change after it lies further on.
Ordered by (file number, offset, read before change, row) with deletes before creates at one
place (a primary-key change), the changes of a row come in the order the server wrote them, over
file rotations (``FLUSH LOGS``, restarts: the number rises) and replays from older offsets (which
repeat ``source`` exactly). ``gtid`` does not order (null on snapshot reads, one per transaction,
unordered across domains), nor ``ts_ms`` (whole seconds). The order restarts after ``RESET
MASTER``, a new binlog base name or a move to another server: run ``streamsync resync`` then.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from streamsync.errors import PoisonEntryError, excerpt
from streamsync.positions import KIND_AFTER_SNAPSHOT, KIND_SNAPSHOT, binlog

log = logging.getLogger(__name__)

#: The connectors whose positions are binlog coordinates.
CONNECTORS = frozenset({"mysql", "mariadb"})

#: ``<base name>.<number>``, as the server names its binlog files.
_FILE = re.compile(r"[^\s]+\.([0-9]{1,18})")
#: The bound of an offset (32-bit in today's servers) and of an event's row index.
_MAX_OFFSET = 2**64 - 1


def table_name(source: dict[str, Any]) -> str | None:
    """``<database>.<table>``, the name rules give MySQL-family tables; None when ``source``
    lacks either."""
    db, table = source.get("db"), source.get("table")
    if type(db) is not str or type(table) is not str or not db or not table:
        return None
    return f"{db}.{table}"


def position(op: str, source: dict[str, Any], rank: str) -> str:
    """The position of a change from its ``source`` block; PoisonEntryError naming the field
    when it cannot be placed."""
    file = source.get("file")
    match = _FILE.fullmatch(file) if type(file) is str else None
    if match is None:
        raise PoisonEntryError(f"source.file {excerpt(file)} is not a binlog file name")
    offset = _count(source, "pos")
    row = _count(source, "row") if source.get("row") is not None or op != "r" else 0
    kind = KIND_SNAPSHOT if op == "r" else KIND_AFTER_SNAPSHOT
    return binlog(int(match[1]), offset, kind, row, rank)


def _count(source: dict[str, Any], name: str) -> int:
    value = source.get(name)
    if type(value) is not int or not 0 <= value <= _MAX_OFFSET:
        raise PoisonEntryError(f"source.{name} {excerpt(value)} is not a binlog offset or index")
    return value


class Origins:
    """The binlog each MySQL-family table's changes come from: its base name and the server
    that wrote it. A change of either (a new base name, another server) restarts the positions,
    which only ``streamsync resync`` mends: the worker says so. (``RESET MASTER`` keeps both, and
    cannot be told from a replay of older offsets.)"""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, int]] = {}

    def note(self, table: str, source: dict[str, Any]) -> None:
        """Record where a change of ``table`` (whose ``source`` was placed) comes from."""
        base = str(source["file"]).rpartition(".")[0]
        server = source.get("server_id")
        # snapshot reads carry server 0: they name no server
        server = server if type(server) is int and server > 0 else 0
        before = self._seen.get(table)
        if before is not None:
            old_base, old_server = before
            server = server or old_server
            if base != old_base or (old_server and server != old_server):
                log.warning(
                    "%s: its changes now come from binlog %s of server %s, after %s of server %s:"
                    " binlog positions restart there, and changes older than what is cached"
                    " would be refused as stale; run `streamsync resync --table %s`",
                    table,
                    base,
                    server,
                    old_base,
                    old_server,
                    table,
                )
        self._seen[table] = (base, server)
