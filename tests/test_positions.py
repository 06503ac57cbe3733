"""Position texts (``streamsync.positions``): they compare as strings in the order of what they
encode, epochs and unknown positions included; snapshot marks (``streamsync.snapshots``); and
the conversion of library 1.x positions."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from streamsync.epochs import epoch_floor, epoch_prefix
from streamsync.positions import (
    KIND_AFTER_SNAPSHOT,
    KIND_SNAPSHOT,
    KIND_STREAMED,
    MAX_LSN,
    NO_POSITION,
    RANK_REMOVE,
    RANK_WRITE,
    after_snapshot,
    encode,
    from_v1,
    is_unplaced,
    number,
    place,
    snapshot_of,
    snapshot_read,
    streamed,
    unplaced,
)
from streamsync.snapshots import Snapshots

lsns = st.one_of(st.integers(0, 300), st.integers(0, MAX_LSN), st.just(MAX_LSN))
ranks = st.sampled_from([RANK_REMOVE, RANK_WRITE])
epochs = st.integers(0, 3)

#: A position as what it encodes: (epoch, major, kind, minor, rank); major None for
#: NO_POSITION, minor None for a snapshot read.
Tuple = tuple[int, int | None, str, int | None, str]


@st.composite
def tuples(draw: st.DrawFn) -> Tuple:
    epoch = draw(epochs)
    if draw(st.integers(0, 9)) == 0:
        return (epoch, None, KIND_SNAPSHOT, None, RANK_WRITE)
    kind = draw(st.sampled_from([KIND_SNAPSHOT, KIND_AFTER_SNAPSHOT, KIND_STREAMED]))
    minor = None if kind == KIND_SNAPSHOT else draw(lsns)
    return (epoch, draw(lsns), kind, minor, draw(ranks))


def text(t: Tuple) -> str:
    epoch, major, kind, minor, rank = t
    if major is None:
        return epoch_prefix(epoch) + NO_POSITION
    return epoch_prefix(epoch) + encode(major, kind, minor, rank)


def order_key(t: Tuple) -> tuple[int, int, str, int, str]:
    epoch, major, kind, minor, rank = t
    return (epoch, -1 if major is None else major, kind, -1 if minor is None else minor, rank)


def sign(a: Any, b: Any) -> int:
    return int(a > b) - int(a < b)


@given(tuples(), tuples())
@example((0, None, "0", None, "1"), (0, 0, "0", None, "1"))
@example((1, None, "0", None, "1"), (0, MAX_LSN, "2", MAX_LSN, "1"))
@example((0, 9, "2", 10, "1"), (0, 10, "0", None, "1"))
def test_encoded_positions_order_like_what_they_encode(a: Tuple, b: Tuple) -> None:
    assert sign(text(a), text(b)) == sign(order_key(a), order_key(b))


@given(tuples(), tuples(), st.text(max_size=5), st.text(max_size=5))
def test_what_follows_a_position_never_takes_part_in_its_order(
    a: Tuple, b: Tuple, tail_a: str, tail_b: str
) -> None:
    # a list's order members are "<position>|<row>"
    if order_key(a) != order_key(b):
        assert sign(text(a) + "|" + tail_a, text(b) + "|" + tail_b) == sign(text(a), text(b))


@given(tuples(), epochs)
def test_the_epoch_floor_sits_between_epochs(t: Tuple, epoch: int) -> None:
    floor = epoch_floor(epoch)
    if t[0] < epoch:
        assert text(t) < floor
    else:
        assert text(t) > floor


def test_positions_are_digits() -> None:
    assert number(26521840) == "0826521840" and number("7") == "017"
    assert snapshot_read(26521840) == "0826521840" + "0" + "00" + "1"
    # at or after lastCommitLsn: the distance from it; below it (interleaved): the whole LSN
    assert streamed(26521880, 26521960, RANK_REMOVE) == "0826521880" + "3" + "0280" + "0"
    assert streamed(26521880, 26521880, RANK_WRITE) == "0826521880" + "3" + "010" + "1"
    assert streamed(26521880, 26521800, RANK_WRITE) == "0826521880" + "2" + "0826521800" + "1"
    assert streamed("26521880", "26521960", RANK_REMOVE) == streamed(26521880, 26521960, "0")
    for position in (snapshot_read(MAX_LSN), streamed(0, MAX_LSN, RANK_WRITE), NO_POSITION):
        assert position.isdigit()


@given(lsns, lsns, ranks)
def test_a_change_after_a_snapshot_is_newer_than_its_reads_and_older_than_what_follows(
    snapshot: int, lsn: int, rank: str
) -> None:
    position = after_snapshot(snapshot, lsn, rank)
    assert position > snapshot_read(snapshot)
    # every later transaction's lastCommitLsn is beyond the snapshot and this change's commit
    later = max(snapshot, lsn) + 1
    if later <= MAX_LSN:
        assert position < streamed(later, 0, RANK_REMOVE)
    # transactions streamed before the snapshot committed before it
    if snapshot > 0:
        assert position > streamed(snapshot - 1, MAX_LSN, RANK_WRITE)


@given(lsns, lsns, ranks)
def test_changes_of_the_first_transaction_keep_their_order(a: int, b: int, rank: str) -> None:
    for snapshot in (None, 0, a, b, MAX_LSN):
        assert sign(after_snapshot(snapshot, a, rank), after_snapshot(snapshot, b, rank)) == sign(
            a, b
        )


@given(lsns, ranks, st.one_of(st.none(), lsns))
def test_an_unplaced_change_is_placed_after_its_snapshot(
    lsn: int, rank: str, snapshot: int | None
) -> None:
    stand_in = unplaced(lsn, rank)
    assert is_unplaced(stand_in) and not stand_in.isdigit()
    assert place(stand_in, snapshot) == after_snapshot(snapshot, lsn, rank)
    assert not is_unplaced(snapshot_read(lsn)) and not is_unplaced(NO_POSITION)
    assert place(snapshot_read(lsn), snapshot) == snapshot_read(lsn)


@given(lsns, lsns, ranks)
def test_snapshot_of_tells_reads_from_changes(snapshot: int, lsn: int, rank: str) -> None:
    assert snapshot_of(snapshot_read(snapshot)) == snapshot
    assert snapshot_of(streamed(snapshot, lsn, rank)) is None
    assert snapshot_of(after_snapshot(snapshot, lsn, rank)) is None
    assert snapshot_of(NO_POSITION) is None


# -- library 1.x ---------------------------------------------------------------------------


def v1(lsn: int, rank: str = RANK_WRITE, epoch: int = 0) -> str:
    """A position as library 1.x recorded it."""
    return f"{epoch_prefix(epoch)}{lsn:020d}{rank}"


@given(st.integers(1, MAX_LSN), ranks, st.integers(0, MAX_LSN), st.integers(0, MAX_LSN), ranks)
def test_a_v1_position_sits_between_the_commits_around_it(
    x: int, rank: str, last_commit: int, lsn: int, other_rank: str
) -> None:
    converted = from_v1(v1(x, rank))
    change = streamed(last_commit, lsn, other_rank)
    if last_commit > x:
        # committed after the transaction of the change at x: newer
        assert change > converted
    elif last_commit < x:
        # every change of the row committed before x was written, and a replay of x itself
        # (its lastCommitLsn below x): not newer
        assert change < converted
    # the first transaction after a snapshot at x or later is newer; its reads are not
    for snapshot in (x, min(x + 1, MAX_LSN)):
        assert after_snapshot(snapshot, lsn, other_rank) > converted
    if rank == RANK_WRITE:
        # a replay of a read of the snapshot at x: not newer
        assert snapshot_read(x) == converted


def test_v1_positions_convert_exactly() -> None:
    assert from_v1(v1(26521840)) == snapshot_read(26521840)
    assert from_v1(v1(26521840, RANK_REMOVE)) == encode(26521840, KIND_SNAPSHOT, None, "0")
    assert from_v1(v1(MAX_LSN, epoch=2)) == epoch_prefix(2) + snapshot_read(MAX_LSN)
    # 1.x's position of an incremental read, LSN 0
    assert from_v1("0" * 20 + "1") == NO_POSITION
    assert from_v1(v1(0, epoch=1)) == epoch_prefix(1) + NO_POSITION


v1_positions = st.builds(v1, st.integers(0, MAX_LSN), ranks, epochs)


@given(v1_positions, v1_positions)
def test_v1_positions_keep_their_order(old_a: str, old_b: str) -> None:
    assert sign(from_v1(old_a), from_v1(old_b)) == sign(old_a, old_b)


@pytest.mark.parametrize(
    "old",
    [
        "",
        "0" * 19 + "1",
        "0" * 20 + "2",
        "e1" + "0" * 21,
        v1(5) + "|shape",
        "99999999999999999999" + "1",
        snapshot_read(5),
    ],
)
def test_what_is_no_v1_position_is_refused(old: str) -> None:
    with pytest.raises(ValueError, match=r"library 1\.x position"):
        from_v1(old)


# -- snapshot marks --------------------------------------------------------------------------


def test_snapshot_marks_say_which_snapshot_an_entry_follows() -> None:
    marks = Snapshots()
    marks.load([b"s", b'[["700","5-0"],["900","20-3"]]', b"t", b"not json"])
    assert marks.at("s", b"4-9") is None
    assert marks.at("s", b"5-0") == 700 and marks.at("s", "20-2") == 700
    assert marks.at("s", b"20-3") == 900 and marks.at("s", b"1000-0") == 900
    assert marks.at("t", b"5-0") is None and marks.at("u", b"5-0") is None
    marks.update("t", '[["1","3-0"]]')
    assert marks.at("t", b"5-0") == 1
    marks.clear()
    assert marks.at("s", b"1000-0") is None


changes = st.tuples(lsns, lsns, ranks)


@given(changes, changes)
def test_streamed_changes_compare_as_their_commit_order(
    first: tuple[int, int, str], second: tuple[int, int, str]
) -> None:
    """By lastCommitLsn, then by the change's own LSN, then by rank, however the minor is
    written (its distance above lastCommitLsn, or its whole LSN below it)."""
    a, b = streamed(*first), streamed(*second)
    order = first, second
    assert (a < b) == (order[0] < order[1]) and (a == b) == (order[0] == order[1])
