"""Source positions: where a change sits in the database's commit order, as text that compares in
that order.

The Functions library keeps one position per row and applies a change only when its position is
strictly greater. Lua compares strings with the server's collation (``strcoll``), so a position is
made of digits only: every locale orders digits alike. Each number is written with its length
first (two digits), so numbers of any size compare by value without padding to 20 digits.

A PostgreSQL position is ``major kind minor rank``:

- a snapshot read (``op`` ``r``): major = the snapshot's LSN, kind 0, no minor;
- a streamed change of the first transaction after a snapshot (``source.sequence`` has no
  ``lastCommitLsn``): major = that snapshot's LSN, kind 1, minor = the change's LSN. That
  transaction committed after the snapshot, so it beats every read of it whatever its change LSN;
- any other streamed change: major = ``lastCommitLsn`` (the end of the previous transaction's
  commit, above every snapshot before it and rising with each commit), kind 2, minor = the
  change's LSN (changes of one transaction, in order);
- rank: a primary-key change is a delete and a create at one LSN; the create ranks after it.

Resync epochs (``streamsync.epochs``) put a prefix in front: ``e`` sorts after every digit.
"""

from __future__ import annotations

from typing import Final

#: The kinds of position, in the order they rank at one major.
KIND_SNAPSHOT: Final = "0"
KIND_AFTER_SNAPSHOT: Final = "1"
KIND_STREAMED: Final = "2"

#: The last character ranks changes sharing everything else: a removal before a write.
RANK_REMOVE: Final = "0"
RANK_WRITE: Final = "1"


def number(value: int) -> str:
    """``value`` (>= 0) with its length in front: ``26521840`` -> ``0826521840``."""
    digits = str(value)
    return f"{len(digits):02d}{digits}"


def encode(major: int, kind: str, minor: int | None, rank: str) -> str:
    """The position text of (major, kind, minor, rank); ``minor`` None for a snapshot read."""
    return number(major) + kind + ("00" if minor is None else number(minor)) + rank


def snapshot_read(lsn: int) -> str:
    """The position of a read of the snapshot taken at ``lsn``."""
    return encode(lsn, KIND_SNAPSHOT, None, RANK_WRITE)


def streamed(last_commit_lsn: int, lsn: int, rank: str) -> str:
    """The position of a streamed change of LSN ``lsn`` after the commit ending at
    ``last_commit_lsn``."""
    return encode(last_commit_lsn, KIND_STREAMED, lsn, rank)


def after_snapshot(snapshot_lsn: int, lsn: int, rank: str) -> str:
    """The position of a change of the first transaction streamed after the snapshot taken at
    ``snapshot_lsn``."""
    return encode(snapshot_lsn, KIND_AFTER_SNAPSHOT, lsn, rank)


#: The position of a change that carries none (incremental-snapshot reads have no LSN): older
#: than every real position, so such a read only fills a row never seen before.
NO_POSITION: Final = "00" + KIND_SNAPSHOT + "00" + RANK_WRITE
