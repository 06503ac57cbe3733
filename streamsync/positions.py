"""Source positions: where a change sits in the database's commit order, as text that compares in
that order.

The Functions library keeps one position per row and applies a change only when its position is
strictly greater. Lua compares strings with the server's collation (``strcoll``), so a position is
made of digits only: every locale orders digits alike. Each number is written with its length
first (two digits), so numbers of any size compare by value without padding to 20 digits, and no
position is the beginning of another (text that follows one, as in a list's order members
``<position>|<row>``, never takes part in a comparison).

A PostgreSQL position is ``major kind minor rank``:

- a snapshot read (``op`` ``r``): major = the snapshot's LSN, kind 0, no minor;
- a streamed change of the first transaction after a snapshot (``source.sequence`` has no
  ``lastCommitLsn``): major = that snapshot's LSN, or the change's LSN when that is higher,
  kind 1, minor = the change's LSN. That transaction committed after the snapshot, so it beats
  every read of it whatever its change LSN; and it committed after the change's LSN too, so
  the higher of the two is still below the ``lastCommitLsn`` of every later transaction, and a
  change whose snapshot is unknown (no mark, see ``streamsync.snapshots``) is still ordered
  after the snapshots before it;
- any other streamed change: major = ``lastCommitLsn`` (the end of the previous transaction's
  commit, above every snapshot before it and rising with each commit), then the change's LSN
  (changes of one transaction, in order): kind 3 and the LSN's distance above ``lastCommitLsn``
  (nearly every change: a short number), or kind 2 and the whole LSN for a change below it (a
  transaction interleaved with the one that committed before it);
- rank: a primary-key change is a delete and a create at one LSN; the create ranks after it.
  TRUNCATE ranks with deletes: it removes what is older.

A change of the first transaction after a snapshot is decoded *unplaced* (``unplaced``): its
snapshot is known only from the stream's order, and the worker ``place``s it once it knows.

A MySQL or MariaDB position (``streamsync.binlog``) is ``file pos kind row rank``: the binlog
file's number, the byte offset of the row event in it, kind 0 for a read of the snapshot taken at
that offset (every later change lies after it) or 1 for a change, the row's index within its
event, and the rank as above.

Resync epochs (``streamsync.epochs``) put a prefix in front: ``e`` sorts after every digit.
"""

from __future__ import annotations

import re
from typing import Final

#: The kinds of position, in the order they rank at one major.
KIND_SNAPSHOT: Final = "0"
KIND_AFTER_SNAPSHOT: Final = "1"
KIND_STREAMED: Final = "2"
#: A streamed change at or after its ``lastCommitLsn``: the minor is the distance from it.
KIND_STREAMED_ON: Final = "3"

#: The last character ranks changes sharing everything else: a removal before a write.
RANK_REMOVE: Final = "0"
RANK_WRITE: Final = "1"

#: The most digits a number of a position holds (its length prefix is two digits).
MAX_DIGITS: Final = 99

#: The largest LSN (64 bits).
MAX_LSN: Final = 2**64 - 1

#: The first character of an unplaced position; no position starts with it.
_UNPLACED: Final = "-"

# The two-digit length prefixes, looked up rather than formatted: positions are built for every
# change decoded.
_LENGTHS: Final = tuple(f"{n:02d}" for n in range(MAX_DIGITS + 1))


def number(value: int | str) -> str:
    """``value`` (>= 0; an int, or its decimal digits without leading zeros) with its length in
    front: ``26521840`` -> ``0826521840``."""
    digits = str(value)
    return _LENGTHS[len(digits)] + digits


def encode(major: int | str, kind: str, minor: int | str | None, rank: str) -> str:
    """The position text of (major, kind, minor, rank); ``minor`` None for a snapshot read."""
    return number(major) + kind + ("00" if minor is None else number(minor)) + rank


def snapshot_read(lsn: int) -> str:
    """The position of a read of the snapshot taken at ``lsn``."""
    return encode(lsn, KIND_SNAPSHOT, None, RANK_WRITE)


def streamed(last_commit_lsn: int | str, lsn: int | str, rank: str) -> str:
    """The position of a streamed change of LSN ``lsn`` after the commit ending at
    ``last_commit_lsn`` (ints, or decimal digits without leading zeros).

    A change at or after that commit end (nearly all) keeps only its distance from it, a few
    digits where the LSN takes 15 or more: every record is that much shorter. One below it (a
    transaction interleaved with the one that committed first) keeps its whole LSN, under a kind
    that ranks below: it is older than every change at or after the commit end."""
    # number() inlined: this runs for nearly every change decoded
    major, minor = str(last_commit_lsn), str(lsn)
    head = _LENGTHS[len(major)] + major
    if minor == major:
        return head + KIND_STREAMED_ON + "010" + rank
    distance = int(minor) - int(major)
    if distance > 0:
        text = str(distance)
        return head + KIND_STREAMED_ON + _LENGTHS[len(text)] + text + rank
    return head + KIND_STREAMED + _LENGTHS[len(minor)] + minor + rank


def binlog(file_number: int, offset: int, kind: str, row: int, rank: str) -> str:
    """The position of a MySQL or MariaDB change: ``kind`` KIND_SNAPSHOT for a snapshot read
    (taken at ``file_number``/``offset``), KIND_AFTER_SNAPSHOT for a change of the row event at
    that offset, ``row`` its index within the event."""
    return number(file_number) + number(offset) + kind + number(row) + rank


def after_snapshot(snapshot_lsn: int | None, lsn: int, rank: str) -> str:
    """The position of a change of LSN ``lsn`` of the first transaction streamed after the
    snapshot taken at ``snapshot_lsn`` (None: no snapshot known; the change's LSN places it)."""
    major = lsn if snapshot_lsn is None or snapshot_lsn < lsn else snapshot_lsn
    return encode(major, KIND_AFTER_SNAPSHOT, lsn, rank)


#: The position of a change that carries none (incremental-snapshot reads have no LSN): older
#: than every real position, so such a read only fills a row never seen before.
NO_POSITION: Final = "00" + KIND_SNAPSHOT + "00" + RANK_WRITE

#: Width of the epoch number in a position's resync-epoch prefix (streamsync.epochs).
EPOCH_WIDTH: Final = 6

#: Older than every position, NO_POSITION included; a whole position (never the start of another
#: one), so a record holding it with a suffix still compares as itself.
FLOOR: Final = "00" + KIND_SNAPSHOT + "00" + RANK_REMOVE


def unplaced(lsn: int, rank: str) -> str:
    """A change of LSN ``lsn`` of the first transaction after a snapshot, before its snapshot is
    known: a stand-in that ``place`` completes. Never stored: it is no position."""
    return _UNPLACED + number(lsn) + rank


def is_unplaced(position: str) -> bool:
    """Whether ``position`` is an ``unplaced`` stand-in."""
    return position[:1] == _UNPLACED


def place(position: str, snapshot_lsn: int | None) -> str:
    """The position of the ``unplaced`` change ``position``, once the snapshot it follows is
    known (``after_snapshot``); any other position as it is."""
    if not is_unplaced(position):
        return position
    return after_snapshot(snapshot_lsn, int(position[3:-1]), position[-1])


def snapshot_of(position: str) -> int | None:
    """The snapshot LSN of a snapshot read's ``position``; None for any other position."""
    length = int(position[:2])
    if length and position[2 + length : 3 + length] == KIND_SNAPSHOT:
        return int(position[2 : 2 + length])
    return None


# -- library 1.x ---------------------------------------------------------------------------

_V1 = re.compile(rf"(e[0-9]{{{EPOCH_WIDTH}}})?([0-9]{{20}})([{RANK_REMOVE}{RANK_WRITE}])")


def from_v1(old: str) -> str:
    """A position recorded by library 1.x (an optional epoch prefix, the LSN as 20 digits, a
    rank), in this format. ValueError when ``old`` is not one.

    1.x recorded the LSN X of the last change applied, not its ``lastCommitLsn``: X becomes a
    snapshot read's position at X (same epoch, same rank). That is older than every change of a
    transaction that committed after X's (their ``lastCommitLsn`` is at least that commit's end,
    beyond X) and than the first transaction after any snapshot at X or later; and no older than
    every change of the same row committed before X was written (their ``lastCommitLsn`` is
    below X) nor than a replay of a snapshot read at X. Caveats: a later change of X's own
    transaction to the same row is refused as older unless its ``lastCommitLsn`` equals X, so
    convert between transactions (capture stopped, the streams drained); and a replay of X
    itself whose ``lastCommitLsn`` equals X (its record directly follows the previous commit)
    is applied once more, with the same values.
    """
    match = _V1.fullmatch(old)
    if match is None:
        raise ValueError(f"not a library 1.x position: {old!r}")
    prefix, digits, rank = match.groups()
    lsn = int(digits)
    if lsn > MAX_LSN:
        raise ValueError(f"not a library 1.x position: {old!r} (LSN beyond 64 bits)")
    # LSN 0 is 1.x's position of a change that carries none
    converted = NO_POSITION[:-1] + rank if lsn == 0 else encode(lsn, KIND_SNAPSHOT, None, rank)
    return (prefix or "") + converted


def epoch_prefix(epoch: int) -> str:
    """The text a position of resync ``epoch`` starts with: none for epoch 0, ``e000001`` for 1.

    ``e`` sorts after every digit, so any position of epoch 1 or later is newer than every
    position of epoch 0; among later epochs the fixed width keeps the order.
    """
    return f"e{epoch:0{EPOCH_WIDTH}d}" if epoch else ""


def epoch_floor(epoch: int) -> str:
    """A position older than every position of ``epoch`` and newer than all earlier ones."""
    return epoch_prefix(epoch) + FLOOR
