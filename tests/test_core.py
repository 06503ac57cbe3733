"""The worker's pure batch core and round trips, without Redis: how entries are sorted, packed
into calls and settled from replies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest
import redis

from streamsync.config import parse_settings
from streamsync.epochs import Epochs
from streamsync.events import Decoder
from streamsync.functions import FN_CHANGES, Command, RowStatus
from streamsync.keys import key_slot
from streamsync.mapping import Planner
from streamsync.positions import (
    RANK_REMOVE,
    RANK_WRITE,
    after_snapshot,
    snapshot_read,
    streamed,
)
from streamsync.worker.core import BatchCore, SnapshotMark
from streamsync.worker.entry import Entry
from streamsync.worker.roundtrip import RoundTrip
from tests.debezium import entry_fields, envelope

STREAM = "app.public.users"
#: The part of a reply describing the call's one rule table: one bucket, a few records.
TABLE_SEEN = [1, 3, b""]


def core(*, cluster: bool = False, max_rows: int = 1000, max_deliveries: int = 3) -> BatchCore:
    settings = parse_settings(
        {
            "source": {"streams": [STREAM]},
            "rules": [{"table": "public.users", "key": "user:{id}", "type": "hash"}],
        }
    )
    return BatchCore(
        Decoder(),
        Planner.from_settings(settings, cluster=cluster),
        Epochs(),
        tombstone_s=1,
        max_deliveries=max_deliveries,
        max_rows_per_call=max_rows,
    )


def entry(n: int, op: str = "c", deliveries: int = 1) -> Entry:
    row = {"id": n, "name": f"row {n}"}
    value = envelope(op, "public.users", 100 + n, after=row)
    fields = [p.encode() for kv in entry_fields({"id": n}, value).items() for p in kv]
    return Entry(STREAM, f"{n}-0".encode(), fields, deliveries=deliveries)


def planned(batch_core: BatchCore, entries: Sequence[Entry]) -> list[Entry]:
    prepared = batch_core.prepare(entries)
    assert not prepared.dead and not prepared.settled
    return prepared.apply


def test_prepare_sorts_entries_by_what_becomes_of_them() -> None:
    c = core()
    tombstone = Entry(STREAM, b"1-0", [b'{"id":1}', b"default"])
    vanished = Entry(STREAM, b"2-0", None)
    malformed = Entry(STREAM, b"3-0", [b"k", b"not json"])
    unmapped = entry(4)
    assert unmapped.fields is not None
    unmapped.fields[1] = unmapped.fields[1].replace(b'"users"', b'"orders"')
    truncate = Entry(
        STREAM,
        b"5-0",
        [b"default", orjson.dumps(envelope("t", "public.users", 500))],
    )
    change = entry(6)
    first_after_snapshot = Entry(
        STREAM,
        b"7-0",
        [
            b'{"id":7}',
            orjson.dumps(envelope("u", "public.users", 90, after={"id": 7}, sequence=(None, 90))),
        ],
    )
    prepared = c.prepare(
        [tombstone, vanished, malformed, unmapped, truncate, change, first_after_snapshot]
    )
    assert [(e.id, e.outcome) for e in prepared.settled] == [
        (b"1-0", "tombstone"),
        (b"2-0", "vanished"),
    ]
    assert [e.id for e in prepared.dead] == [b"3-0", b"4-0"]
    assert prepared.dead[0].error is not None and "not valid JSON" in prepared.dead[0].error
    assert prepared.dead[1].error == "no rule maps table 'public.orders'"
    # held for the barrier: the TRUNCATE, and the change whose position needs a snapshot mark
    assert [(h.entry.id, h.truncate) for h in prepared.held] == [(b"5-0", True), (b"7-0", False)]
    assert c.truncate_position(prepared.held[0]) == streamed(500, 500, RANK_REMOVE)
    assert [e.id for e in prepared.apply] == [b"6-0"] and len(change.rows) == 1


def _rows_in(command: Command) -> int:
    assert command[:2] == ("FCALL", FN_CHANGES)
    return sum(1 for item in command if item == "H")


def read(n: int, snapshot_lsn: int) -> Entry:
    """Entry ``n``-0: a read of row ``n`` by the snapshot taken at ``snapshot_lsn``."""
    value = envelope("r", "public.users", snapshot_lsn, after={"id": n}, snapshot="true")
    return Entry(STREAM, f"{n}-0".encode(), [b'{"id":%d}' % n, orjson.dumps(value)])


def first_change(n: int, lsn: int) -> Entry:
    """Entry ``n``-0: a change of the first transaction after a snapshot (no lastCommitLsn)."""
    value = envelope("u", "public.users", lsn, after={"id": n}, sequence=(None, lsn))
    return Entry(STREAM, f"{n}-0".encode(), [b'{"id":%d}' % n, orjson.dumps(value)])


def test_snapshot_reads_note_one_mark_per_snapshot_until_the_marks_know_it() -> None:
    c = core()
    prepared = c.prepare([read(5, 700), read(3, 700), read(4, 800), entry(6)])
    assert [e.id for e in prepared.apply] == [b"5-0", b"3-0", b"4-0", b"6-0"]
    # the oldest entry of each snapshot; taken once
    assert c.take_marks() == [
        SnapshotMark(STREAM, 700, b"3-0"),
        SnapshotMark(STREAM, 800, b"4-0"),
    ]
    assert c.take_marks() == []
    # once the marks hash says so, later reads of the same snapshot need no mark
    c.snapshots.update(STREAM, orjson.dumps([["700", "3-0"]]))
    c.prepare([read(8, 700), read(9, 900)])
    assert c.take_marks() == [SnapshotMark(STREAM, 900, b"9-0")]


def test_a_held_change_is_placed_after_the_snapshot_its_entry_follows() -> None:
    c = core()
    c.snapshots.update(STREAM, orjson.dumps([["700", "3-0"], ["900", "20-0"]]))
    early, late = first_change(10, 650), first_change(30, 950)
    prepared = c.prepare([early, late])
    assert not prepared.apply and [h.entry for h in prepared.held] == [early, late]
    rows = [c.plan_held(h) for h in prepared.held]
    # LSN 650 is below the snapshot's, yet the change is newer than its reads
    position = after_snapshot(700, 650, RANK_WRITE)
    assert position > snapshot_read(700) and position in rows[0][0].args
    assert after_snapshot(900, 950, RANK_WRITE) in rows[1][0].args


def test_a_held_change_no_mark_precedes_is_ordered_by_its_own_lsn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    c = core()
    [held] = c.prepare([first_change(2, 650)]).held
    c.plan_held(held)
    assert held.event.position == after_snapshot(None, 650, RANK_WRITE)
    assert "no snapshot mark precedes" in caplog.text


def test_an_unmapped_held_entry_is_dead_lettered_at_once() -> None:
    c = core()
    entry = first_change(2, 650)
    assert entry.fields is not None
    entry.fields[1] = entry.fields[1].replace(b'"users"', b'"orders"')
    prepared = c.prepare([entry])
    assert not prepared.held and prepared.dead == [entry]


def test_retry_all_sends_the_whole_batch_again() -> None:
    c = core()
    batch = planned(c, [entry(1), entry(2)])
    batch[0].error, batch[1].solo = "x", True
    settlement = c.retry_all(batch, "why")
    assert settlement.retry and settlement.reason == "why"
    assert all(e.error is None and not e.solo for e in batch)


def test_calls_are_bounded_and_solo_entries_go_one_row_each() -> None:
    c = core(max_rows=4)
    batch = planned(c, [entry(n) for n in range(1, 11)])
    batch[2].solo = True
    calls = c.calls(batch)
    assert [len(call.owners) for call in calls] == [1, 4, 4, 1]
    assert calls[0].owners == [batch[2]]
    assert [_rows_in(call.command) for call in calls] == [1, 4, 4, 1]
    # every entry's rows, each in exactly one call, in entry order within a call
    owners = [e.id for call in calls for e in call.owners]
    assert sorted(owners) == sorted(e.id for e in batch)


def test_calls_on_a_cluster_keep_to_one_hash_slot_each() -> None:
    c = core(cluster=True)
    batch = planned(c, [entry(n) for n in range(1, 51)])
    calls = c.calls(batch)
    for call in calls:
        numkeys = call.command[2]
        keys = call.command[3 : 3 + numkeys]
        assert len({key_slot(k) for k in keys}) == 1, keys
    assert sum(len(call.owners) for call in calls) == 50


def settle(c: BatchCore, batch: list[Entry], replies: list[Any]) -> Any:
    calls = c.calls(batch)
    assert len(calls) == len(replies)
    return c.settle(batch, calls, replies)


def test_settle_acknowledges_applied_and_stale_rows() -> None:
    c = core()
    batch = planned(c, [entry(1), entry(2)])
    s = settle(c, batch, [[RowStatus.APPLIED, RowStatus.STALE, TABLE_SEEN]])
    assert not s.retry and [e.outcome for e in s.done] == ["applied", "stale"]


def test_a_row_error_fails_only_its_entry_and_dead_letters_on_the_last_delivery() -> None:
    c = core(max_deliveries=3)
    batch = planned(c, [entry(1), entry(2, deliveries=2), entry(3, deliveries=3)])
    wrong = b"WRONGTYPE Operation against a key holding the wrong kind of value"
    s = settle(c, batch, [[RowStatus.APPLIED, wrong, wrong, TABLE_SEEN]])
    assert not s.retry
    assert [e.id for e in s.done] == [b"1-0"]
    assert [e.id for e in s.failed] == [b"2-0"]
    assert [e.id for e in s.dead] == [b"3-0"]
    assert s.dead[0].error == f"redis error: {wrong.decode()}"


@pytest.mark.parametrize(
    ("reply", "reload"),
    [
        (redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'."), False),
        (redis.ResponseError("ERR Function not found"), True),
        ([RowStatus.APPLIED, b"BUSY Redis is busy running a script", TABLE_SEEN], False),
    ],
)
def test_transient_refusals_retry_the_batch_without_spending_deliveries(
    reply: Any, reload: bool
) -> None:
    c = core(max_deliveries=1)
    batch = planned(c, [entry(1), entry(2)])
    s = settle(c, batch, [reply])
    assert s.retry and s.reload_library == reload
    assert not (s.done or s.failed or s.dead)
    assert all(e.outcome is None and e.error is None for e in batch)


def test_a_call_failing_as_a_whole_is_split_into_one_call_per_row() -> None:
    c = core()
    batch = planned(c, [entry(1), entry(2)])
    s = settle(c, batch, [redis.ResponseError("ERR something about the whole call")])
    assert s.retry and all(e.solo for e in batch)
    calls = c.calls(batch)
    assert [call.owners for call in calls] == [[batch[0]], [batch[1]]]
    s = settle(c, batch, [redis.ResponseError("ERR still"), [RowStatus.APPLIED, TABLE_SEEN]])
    assert [e.id for e in s.done] == [b"2-0"] and [e.id for e in s.failed] == [b"1-0"]


class FakeLink:
    """A link that replies what it is told (the round trip's grouping is the subject)."""

    def __init__(self, replies: list[Any]) -> None:
        self.sent: list[Command] = []
        self.replies = replies

    def send(self, commands: Sequence[Command]) -> None:
        self.sent = list(commands)

    def receive(self) -> list[Any]:
        return self.replies


def test_round_trip_replies_come_back_by_group_name() -> None:
    trip = RoundTrip()
    link = FakeLink(["A", "B", 1, {}])
    trip.add("apply", [("FCALL", "a"), ("FCALL", "b")], link)
    trip.add("dead", [], link)
    trip.add("ack", [("XACK", "s", "g", b"1-0")], link)
    trip.add("epochs", [("HGETALL", "e")], link)
    trip.send()
    assert [c[0] for c in link.sent] == ["FCALL", "FCALL", "XACK", "HGETALL"]
    replies = trip.receive()
    assert replies["apply"] == ["A", "B"]
    assert replies["dead"] == []
    assert replies["ack"] == [1]
    assert replies.one("epochs") == {}
    with pytest.raises(ValueError, match="twice"):
        trip.add("ack", [], link)


def test_round_trip_sends_each_link_its_groups_before_reading_any_reply() -> None:
    events: list[str] = []

    class Logged(FakeLink):
        def __init__(self, name: str, replies: list[Any]) -> None:
            super().__init__(replies)
            self.name = name

        def send(self, commands: Sequence[Command]) -> None:
            events.append("send " + self.name)
            super().send(commands)

        def receive(self) -> list[Any]:
            events.append("receive " + self.name)
            return super().receive()

    target, streams, idle = Logged("target", ["A"]), Logged("streams", [1, []]), Logged("x", [])
    trip = RoundTrip()
    trip.add("apply", [("FCALL", "a")], target)
    trip.add("ack", [("XACK", "s", "g", b"1-0")], streams)
    trip.add("nothing", [], idle)
    trip.add("read", [("XREADGROUP", "GROUP")], streams)
    trip.send()
    assert events == ["send target", "send streams"]
    assert [c[0] for c in streams.sent] == ["XACK", "XREADGROUP"]
    replies = trip.receive()
    assert events[2:] == ["receive target", "receive streams"]
    assert replies["apply"] == ["A"] and replies["ack"] == [1] and replies["read"] == [[]]
    assert replies["nothing"] == []


def test_round_trip_refuses_a_reply_count_that_does_not_match() -> None:
    trip = RoundTrip()
    link = FakeLink([])
    trip.add("apply", [("FCALL", "a")], link)
    trip.send()
    with pytest.raises(RuntimeError, match="0 replies to 1 commands"):
        trip.receive()
