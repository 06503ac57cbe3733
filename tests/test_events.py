"""Decoding of real Debezium 3.6.3 entries (all four fixture files) and of malformed ones."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from streamsync import positions
from streamsync.config import StreamFormat
from streamsync.errors import PoisonEntryError
from streamsync.events import ChangeEvent, Decoder, Skip
from streamsync.positions import NO_POSITION, RANK_REMOVE, RANK_WRITE
from tests.debezium import PLACEHOLDER, entry_fields, envelope, fixture_records

FILES = ["schemas-off.jsonl", "schemas-on.jsonl", "decimal-string.jsonl", "decimal-numeric.jsonl"]
# The 15 events of every fixture file, in order (see fixtures/README.md).
OPS = ["r", "r", "c", "u", "d", None, "c", "d", None, "u", "d", None, "c", "c", "t"]


def raw_fields(rec: dict[str, object], extended: bool = False) -> list[bytes]:
    key = rec["key"] if rec["key"] is not None else "default"
    value = rec["value"] if rec["value"] is not None else "default"
    if extended:
        return [
            b"key",
            str(key).encode(),
            b"value",
            str(value).encode(),
            b"__DEBEZIUM.CONTEXT.TASKID",
            b"0",
        ]
    return [str(key).encode(), str(value).encode()]


def decode_file(name: str, extended: bool = False) -> list[ChangeEvent | Skip | str]:
    decoder = Decoder(StreamFormat.AUTO)
    out: list[ChangeEvent | Skip | str] = []
    for rec in fixture_records(name):
        try:
            out.append(decoder.decode(raw_fields(rec, extended)))
        except PoisonEntryError as exc:
            out.append(str(exc))
    return out


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("extended", [False, True])
def test_every_fixture_event_decodes(name: str, extended: bool) -> None:
    decoded = decode_file(name, extended)
    assert len(decoded) == 15
    for i, (event, op) in enumerate(zip(decoded, OPS, strict=True)):
        if op is None:
            assert event is Skip.TOMBSTONE, i
        elif op == "t":
            assert isinstance(event, ChangeEvent) and event.op == "t"
            assert event.table == "public.users" and event.key is None
            assert event.after is None and event.position.endswith(RANK_REMOVE)
        else:
            assert isinstance(event, ChangeEvent), (i, event)
            assert event.op == op
            assert event.table == "public.users"
            # the first change after the snapshot is placed by the worker
            assert event.position.isdigit() or (i == 2 and positions.is_unplaced(event.position))
            assert event.ts_ms is not None and event.ts_ms > 1_700_000_000_000


def test_fixture_positions_and_rows() -> None:
    events = [e for e in decode_file("decimal-string.jsonl") if isinstance(e, ChangeEvent)]
    snapshot = events[:2]
    # all snapshot reads share the snapshot's LSN; streamed changes come later, the first one
    # (its transaction's lastCommitLsn is null) once placed after the snapshot
    records = fixture_records("decimal-string.jsonl")
    snapshot_lsn, first_lsn = (json.loads(r["value"])["source"]["lsn"] for r in records[1:3])
    assert snapshot[0].position == snapshot[1].position == positions.snapshot_read(snapshot_lsn)
    first_change = positions.place(events[2].position, snapshot_lsn)
    assert first_change == positions.after_snapshot(snapshot_lsn, first_lsn, RANK_WRITE)
    later = [first_change] + [e.position for e in events[3:]]
    assert all(p > snapshot[0].position for p in later)
    assert later == sorted(later)
    first = snapshot[0].after
    assert first is not None
    assert first == {
        "id": 1,
        "name": "alice",
        "email": "alice@example.com",
        "plan": "free",
        "balance": "10.50",
        "updated_at": first["updated_at"],
    }
    # a primary-key change: delete of the old key and create of the new one share one LSN
    pk_delete, pk_create = events[4], events[5]
    assert (pk_delete.op, pk_create.op) == ("d", "c")
    # one LSN; the rank makes the create newer, so on a shared key it wins whatever the order
    assert pk_delete.position[:-1] == pk_create.position[:-1]
    assert pk_delete.position < pk_create.position
    assert pk_delete.row()["id"] == 2 and pk_create.row()["id"] == 100
    assert pk_delete.after is None


def test_schema_decimals_decode_to_the_string_mode_values() -> None:
    with_schema = decode_file("schemas-on.jsonl")
    as_strings = decode_file("decimal-string.jsonl")
    for a, b in zip(with_schema, as_strings, strict=True):
        if isinstance(a, ChangeEvent):
            assert isinstance(b, ChangeEvent)
            assert (a.after is not None and b.after is not None) or a.op in {"d", "t"}
            if a.after is not None and b.after is not None:
                assert a.after["balance"] == b.after["balance"]


def test_schemas_off_leaves_base64_decimals_as_sent() -> None:
    first = decode_file("schemas-off.jsonl")[0]
    assert isinstance(first, ChangeEvent) and first.after is not None
    assert first.after["balance"] == "BBo="


def fields_of(
    value: Mapping[str, Any], key: Mapping[str, Any] | None = None, extended: bool = False
) -> list[bytes]:
    flat = entry_fields(key if key is not None else {"id": 1}, value, extended=extended)
    return [x.encode() for pair in flat.items() for x in pair]


def test_heartbeat_is_skipped() -> None:
    raw = [json.dumps({"serverName": "app"}).encode(), json.dumps({"ts_ms": 1}).encode()]
    assert Decoder().decode(raw) is Skip.HEARTBEAT


def test_schema_tombstone_is_skipped() -> None:
    raw = [b'{"schema":null,"payload":{"id":1}}', b'{"schema":null,"payload":null}']
    assert Decoder().decode(raw) is Skip.TOMBSTONE


def test_custom_null_marker() -> None:
    decoder = Decoder(null_marker="NULL")
    assert decoder.decode([b'{"id":1}', b"NULL"]) is Skip.TOMBSTONE
    with pytest.raises(PoisonEntryError):
        decoder.decode([b'{"id":1}', b"default"])


def test_incremental_snapshot_read_without_lsn_gets_the_lowest_position() -> None:
    value = envelope("r", "public.users", None, after={"id": 1}, snapshot="incremental")
    event = Decoder().decode(fields_of(value))
    assert isinstance(event, ChangeEvent) and event.position == NO_POSITION


def test_toast_placeholder_columns_are_reported_unchanged() -> None:
    row = {"id": 1, "bio": PLACEHOLDER, "tags": [PLACEHOLDER], "name": "x", "blob": None}
    event = Decoder().decode(fields_of(envelope("u", "public.users", 10, after=row)))
    assert isinstance(event, ChangeEvent)
    assert event.unchanged == {"bio", "tags"}


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ([b'{"id":1}', b"not json"], "value is not valid JSON"),
        ([b'{"id":1}', b"[1,2]"], "not a JSON object"),
        ([b'{"id":1}', b'{"after":{"id":1}}'], "no 'op'"),
        ([b"a", b"b", b"c", b"d"], "lacks its 'key' or 'value'"),
        (
            [b"not json", json.dumps(envelope("d", "public.users", 5, before={"id": 1})).encode()],
            "key is not valid JSON",
        ),
    ],
)
def test_malformed_entries_say_why(fields: list[bytes], reason: str) -> None:
    with pytest.raises(PoisonEntryError, match=reason):
        Decoder().decode(fields)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda v: v.update(op="x"), "unknown op 'x'"),
        (lambda v: v.update(op="m"), "logical message"),
        (lambda v: v.update(after=None), "carries no 'after'"),
        (lambda v: v.pop("source"), "no 'source'"),
        (lambda v: v["source"].update(lsn=None), "no source.lsn"),
        (lambda v: v["source"].update(lsn=-5), "64-bit"),
        (lambda v: v["source"].update(lsn=2**64), "64-bit"),
        (lambda v: v["source"].update(lsn="12"), "64-bit"),
        (lambda v: v["source"].update(connector="sqlserver"), "mysql and mariadb only"),
        (lambda v: v["source"].update(connector="mysql"), "not a binlog file name"),
        (lambda v: v["source"].pop("table"), "lacks 'schema' or 'table'"),
    ],
)
def test_unappliable_events_say_why(
    mutate: Callable[[dict[str, Any]], object], reason: str
) -> None:
    value = envelope("u", "public.users", 42, after={"id": 1})
    mutate(value)
    with pytest.raises(PoisonEntryError, match=reason):
        Decoder().decode(fields_of(value))


def test_forced_compact_format_rejects_extended_entries() -> None:
    value = envelope("c", "public.users", 1, after={"id": 1})
    raw = fields_of(value, extended=True)
    assert isinstance(Decoder(StreamFormat.EXTENDED).decode(raw), ChangeEvent)
    with pytest.raises(PoisonEntryError, match="exactly one field/value pair"):
        Decoder(StreamFormat.COMPACT).decode(raw)


def test_positions_order_like_lsns() -> None:
    decoder = Decoder()
    lsns = [0, 9, 10, 99, 2**53 + 1, 2**53 + 2, 2**64 - 1]
    found = []
    for lsn in lsns:
        event = decoder.decode(fields_of(envelope("u", "public.users", lsn, after={"id": 1})))
        assert isinstance(event, ChangeEvent)
        found.append(event.position)
    assert found == sorted(found)
    assert len(set(found)) == len(lsns)


def decoded_position(value: Mapping[str, Any]) -> str:
    event = Decoder().decode(fields_of(value))
    assert isinstance(event, ChangeEvent)
    return event.position


def with_sequence(sequence: Any, op: str = "u", lsn: int = 500) -> dict[str, Any]:
    value = envelope(op, "public.users", lsn, after=None if op == "t" else {"id": 1})
    if op == "t":
        value["before"] = None
    if sequence is ...:
        del value["source"]["sequence"]
    else:
        value["source"]["sequence"] = sequence
    return value


@pytest.mark.parametrize(
    "sequence",
    ['["480","500"]', '[ "480" , "500" ]', '["0480","500"]', '["480",null]', '["480","0500"]'],
)
def test_a_streamed_change_is_positioned_by_its_last_commit(sequence: str) -> None:
    assert decoded_position(with_sequence(sequence)) == positions.streamed(480, 500, RANK_WRITE)


def test_a_truncate_is_positioned_like_a_removal() -> None:
    truncate = with_sequence('["480","500"]', op="t")
    assert decoded_position(truncate) == positions.streamed(480, 500, RANK_REMOVE)
    first = decoded_position(with_sequence('[null,"500"]', op="t"))
    assert positions.place(first, 490) == positions.after_snapshot(490, 500, RANK_REMOVE)
    # Debezium sets no 'snapshot' on a TRUNCATE (null, not "false")
    truncate["source"]["snapshot"] = None
    assert decoded_position(truncate) == positions.streamed(480, 500, RANK_REMOVE)


def test_the_first_transaction_after_a_snapshot_is_placed_later() -> None:
    position = decoded_position(with_sequence('[null,"500"]'))
    assert positions.is_unplaced(position)
    assert positions.place(position, 600) == positions.after_snapshot(600, 500, RANK_WRITE)


def test_snapshot_reads_ignore_the_sequence_and_incremental_reads_have_no_position() -> None:
    read = envelope("r", "public.users", 700, after={"id": 1}, snapshot="last")
    read["source"]["sequence"] = "garbage"
    assert decoded_position(read) == positions.snapshot_read(700)
    read["source"]["snapshot"] = "incremental"
    assert decoded_position(read) == NO_POSITION


@pytest.mark.parametrize(
    ("sequence", "reason"),
    [
        (..., "source.sequence is missing"),
        (None, "source.sequence is missing"),
        (["480", "500"], "is not a string"),
        (480, "is not a string"),
        ("[480", "is not JSON"),
        ('["480"]', r"is not a \[lastCommitLsn, lsn\] pair"),
        ('{"a":1}', "pair"),
        ('["480","500","1"]', "pair"),
        ("[480,500]", "480 is not an LSN string"),
        ('["x","500"]', "'x' is not an LSN string"),
        ('["-1","500"]', "is not an LSN string"),
        ('["","500"]', "is not an LSN string"),
        ('["\u0664\u0668\u0660","500"]', "is not an LSN string"),
        ('["18446744073709551616","500"]', "is not an LSN string"),
        ('["480",true]', "True is not an LSN string"),
    ],
)
def test_a_malformed_sequence_is_named(sequence: Any, reason: str) -> None:
    with pytest.raises(PoisonEntryError, match=reason):
        Decoder().decode(fields_of(with_sequence(sequence)))


def test_the_largest_lsn_fits() -> None:
    top = str(2**64 - 1)
    value = with_sequence(f'["{top}","{top}"]', lsn=2**64 - 1)
    assert decoded_position(value) == positions.streamed(top, top, RANK_WRITE)
