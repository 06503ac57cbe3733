"""Debezium Server stream entries -> typed change events.

Debezium Server's Redis sink writes an entry in the ``compact`` layout (one field/value pair: key
JSON -> value JSON) or the ``extended`` one (fields ``key``, ``value`` and one field per record
header); a null key or value is the configured null marker (``default``). A value is a bare change
event or a schema/payload envelope, whose schema guides the decoding of logical-typed columns
(``streamsync.logical_types``).

``Decoder.decode`` turns an entry into a ``ChangeEvent`` (create, update, snapshot read, delete or
TRUNCATE) or a ``Skip`` (a tombstone or a heartbeat: nothing to apply), or raises
PoisonEntryError saying why it can never be applied.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson

from streamsync import binlog
from streamsync.config import StreamFormat
from streamsync.errors import PoisonEntryError, excerpt
from streamsync.logical_types import UNAVAILABLE, ConverterCache, RowConverter, is_unavailable
from streamsync.positions import (
    MAX_LSN,
    NO_POSITION,
    RANK_REMOVE,
    RANK_WRITE,
    snapshot_read,
    streamed,
    unplaced,
)

#: Operations that carry a row: create, update, snapshot read, delete.
ROW_OPS = frozenset({"c", "u", "r", "d"})
#: TRUNCATE: no row, one event per table.
TRUNCATE = "t"
#: The ops of a change to apply.
_CHANGE_OPS = ROW_OPS | {TRUNCATE}
#: The ops that remove what is older, and carry no after-image.
_REMOVAL_OPS = frozenset({"d", TRUNCATE})

#: PostgreSQL's limit on a table's columns (MaxHeapAttributeNumber). A row with more is no
#: PostgreSQL row, and the library could not write it: Lua unpacks a row's fields onto a stack
#: of 8,000 slots.
MAX_COLUMNS = 1600

_OP_NAMES = {"m": "logical message"}

# The unavailable-TOAST placeholder of a bytes column (bytea): base64 of the text.
_PLACEHOLDER_B64 = base64.b64encode(UNAVAILABLE.encode()).decode()


class Skip(Enum):
    """An entry that carries nothing to apply; it is counted and acknowledged."""

    TOMBSTONE = "tombstone"
    HEARTBEAT = "heartbeat"


@dataclass(slots=True)
class ChangeEvent:
    """One row change, decoded from a Debezium envelope."""

    op: str
    #: ``schema.table`` from ``source``.
    table: str
    #: The source position (``streamsync.positions``), compared as a string, never across rows;
    #: for a change of the first transaction after a snapshot, an unplaced stand-in that the
    #: worker places once it knows the snapshot (``positions.place``).
    position: str
    #: Commit time in the database (``source.ts_ms``), for the end-to-end lag.
    ts_ms: int | None
    #: The row after the change (c, u, r); None for deletes and truncates.
    after: dict[str, Any] | None
    #: The row before the change; without REPLICA IDENTITY FULL only its key columns are real.
    before: dict[str, Any] | None
    #: The record key: the primary-key columns, None for a table without one and for TRUNCATE.
    key: dict[str, Any] | None
    #: Columns of ``after`` holding the unavailable-TOAST placeholder: unchanged, value not sent.
    unchanged: frozenset[str] = frozenset()
    #: The record key's JSON, decoded into ``key`` only when asked (primary_key()).
    raw_key: bytes | None = None
    #: The decoder's schema converters, for a ``raw_key`` in a schema/payload envelope.
    converters: ConverterCache | None = None

    def primary_key(self) -> dict[str, Any] | None:
        """The record key, decoded on first use (most changes never need it); PoisonEntryError
        when it is malformed or disagrees with the row (see check_key)."""
        if self.key is None and self.raw_key is not None:
            key = parse_key(self.raw_key, self.converters)
            self.raw_key = None
            if key is not None:
                check_key(key, self.op, self.after if self.after is not None else self.before)
            self.key = key
        return self.key

    def row(self) -> dict[str, Any]:
        """The columns that identify the row for key templates.

        For a delete, ``before`` (real values only with REPLICA IDENTITY FULL, except the key
        columns) completed with the record key.
        """
        if self.after is not None:
            return self.after
        row = dict(self.before or {})
        if self.key:
            # the before-image's key columns are real and decoded like every column: prefer them
            for column, value in self.key.items():
                if row.get(column) is None:
                    row[column] = value
        return row


class Decoder:
    """Turns raw stream entries into ChangeEvent or Skip; keeps the schema converter cache."""

    def __init__(self, fmt: StreamFormat = StreamFormat.AUTO, null_marker: str = "default") -> None:
        self.format = fmt
        self.null_marker = null_marker.encode()
        self._converters = ConverterCache()
        self._origins = binlog.Origins()

    def split(self, fields: Sequence[bytes]) -> tuple[bytes, bytes]:
        """The (key, value) of an entry's flat field/value list, per the configured layout."""
        n = len(fields)
        fmt = self.format
        if fmt is StreamFormat.AUTO:
            fmt = StreamFormat.COMPACT if n == 2 else StreamFormat.EXTENDED
        if fmt is StreamFormat.COMPACT:
            if n != 2:
                raise PoisonEntryError(
                    f"compact entry must have exactly one field/value pair, got {n // 2}"
                )
            return fields[0], fields[1]
        key = value = None
        for i in range(0, n - 1, 2):
            name = fields[i]
            if name == b"key":
                key = fields[i + 1]
            elif name == b"value":
                value = fields[i + 1]
        if key is None or value is None:
            raise PoisonEntryError("extended entry lacks its 'key' or 'value' field")
        return key, value

    def decode(self, fields: Sequence[bytes]) -> ChangeEvent | Skip:
        """Decode one entry; PoisonEntryError says why it can never be applied."""
        # runs per entry: the common path stays inline, the rare and refused ones are helpers
        if len(fields) == 2 and self.format is not StreamFormat.EXTENDED:
            raw_key, raw_value = fields
        else:
            raw_key, raw_value = self.split(fields)
        if raw_value == self.null_marker:
            return Skip.TOMBSTONE
        value = _load_object(raw_value, "value")
        schema = None
        if "payload" in value and "schema" in value:
            schema, value = value["schema"], value["payload"]
            if type(value) is not dict:
                if value is None:
                    return Skip.TOMBSTONE
                raise PoisonEntryError("value payload is not a JSON object")
        op = value.get("op")
        if type(op) is not str or op not in _CHANGE_OPS:
            return self._not_a_change(op, value, raw_key)
        source, table, position = _located(op, value.get("source"), self._origins)
        if op in _REMOVAL_OPS:
            return self._removal(
                op, value, schema, raw_key, table=table, position=position, source=source
            )
        before = value.get("before")
        # Any: _convert returns an optional image, but a dict converts to a dict
        after: Any = value.get("after")
        if (
            type(after) is not dict
            or len(after) > MAX_COLUMNS
            or (before is not None and (type(before) is not dict or len(before) > MAX_COLUMNS))
        ):
            raise PoisonEntryError(_bad_images(op, before, after))
        if schema is not None:
            after, before = self._convert(schema, after, before)
        unchanged: frozenset[str] = frozenset()
        # one pass in C over the values; the per-column check runs only on a hit
        values = after.values()
        if (
            UNAVAILABLE in values
            or _PLACEHOLDER_B64 in values
            or [UNAVAILABLE] in values
            or [_PLACEHOLDER_B64] in values
        ):
            unchanged = frozenset(c for c, v in after.items() if is_unavailable(v))
        # the record key is decoded only when asked (most changes never need it)
        lazy_key = None if raw_key == self.null_marker else bytes(raw_key)
        return ChangeEvent(
            op,
            table,
            position,
            _ts_ms(source),
            after,
            before,
            None,
            unchanged,
            lazy_key,
            None if lazy_key is None else self._converters,
        )

    def _removal(
        self,
        op: str,
        value: dict[str, Any],
        schema: Any,
        raw_key: bytes,
        *,
        table: str,
        position: str,
        source: dict[str, Any],
    ) -> ChangeEvent:
        """A delete or TRUNCATE: no after-image. A delete's record key names the row; in its
        before-image only the key's columns are sure to be real (without REPLICA IDENTITY
        FULL)."""
        if op == TRUNCATE:
            return ChangeEvent(op, table, position, _ts_ms(source), None, None, None)
        before = value.get("before")
        if before is not None and (type(before) is not dict or len(before) > MAX_COLUMNS):
            raise PoisonEntryError(_bad_row("before", before))
        key = self._key(raw_key)
        if before is None and key is None:
            raise PoisonEntryError("delete carries neither 'before' nor a key")
        if schema is not None:
            _, before = self._convert(schema, None, before)
        if key is not None:
            # decoded anyway: the before-image's key columns must agree with it
            check_key(key, op, before)
        return ChangeEvent(op, table, position, _ts_ms(source), None, before, key)

    def _not_a_change(self, op: Any, value: dict[str, Any], raw_key: bytes) -> Skip:
        """Skip.HEARTBEAT for a heartbeat; for any other entry whose ``op`` is no change,
        PoisonEntryError saying what it is."""
        if op is None:
            if "ts_ms" in value and self._heartbeat_key(raw_key):
                return Skip.HEARTBEAT
            raise PoisonEntryError("value has no 'op': not a Debezium change event")
        if type(op) is not str:
            raise PoisonEntryError(f"op {excerpt(op)} is not a string")
        name = _OP_NAMES.get(op)
        if name:
            raise PoisonEntryError(f"op {op!r} ({name}) is not a row change: nothing to apply")
        raise PoisonEntryError(f"unknown op {excerpt(op)}")

    def _heartbeat_key(self, raw_key: bytes) -> bool:
        try:
            key = self._key(raw_key)
        except PoisonEntryError:
            return False
        return key is not None and "serverName" in key

    def _key(self, raw_key: bytes) -> dict[str, Any] | None:
        if raw_key == self.null_marker:
            return None
        return parse_key(raw_key, self._converters)

    def _convert(
        self, schema: Any, after: dict[str, Any] | None, before: dict[str, Any] | None
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        if schema is None:
            return after, before
        if type(schema) is not dict:
            raise PoisonEntryError("value schema is not a JSON object")
        fields = schema.get("fields", ())
        if type(fields) is not list and fields != ():
            raise PoisonEntryError("value schema's 'fields' is not an array")
        structs = {f["field"]: f for f in fields if type(f) is dict and type(f.get("field")) is str}
        if after is not None and "after" in structs:
            convert = _converter(self._converters, structs["after"], "value schema")
            if convert is not None:
                after = _guarded(convert, after)
        if before is not None and "before" in structs:
            convert = _converter(self._converters, structs["before"], "value schema")
            if convert is not None:
                before = _guarded(convert, before)
        return after, before


def parse_key(raw_key: bytes, converters: ConverterCache | None = None) -> dict[str, Any] | None:
    """A record key's JSON (bare, or a schema/payload envelope whose logical-typed columns
    ``converters`` decode as the row's are) as a dict; None for a null payload."""
    key = _load_object(raw_key, "key")
    if "payload" in key and "schema" in key:
        payload = key["payload"]
        if payload is None:
            return None
        if type(payload) is not dict:
            raise PoisonEntryError("key payload is not a JSON object")
        schema = key["schema"]
        if converters is not None and schema is not None:
            if type(schema) is not dict:
                raise PoisonEntryError("key schema is not a JSON object")
            convert = _converter(converters, schema, "key schema")
            if convert is not None:
                payload = _guarded(convert, payload)
        key = payload
    if not key:
        raise PoisonEntryError("key is an empty object: it names no primary-key column")
    return key


def check_key(key: dict[str, Any], op: str, row: dict[str, Any] | None) -> None:
    """PoisonEntryError unless each column of the record ``key`` holds the same value in
    ``row``: the key names the row whose placement records a change updates, so a key naming
    another row would move that row's members. A delete's before-image may lack a key column
    (or hold null there): the key then supplies it."""
    for column, value in key.items():
        if row is None or column not in row:
            if op == "d":
                continue
            raise PoisonEntryError(
                f"key {excerpt(key)} disagrees with the row: column {column!r} is absent"
                " from 'after'"
            )
        actual = row[column]
        if actual is None and op == "d":
            continue
        if not same_value(actual, value):
            image = "before" if op == "d" else "after"
            raise PoisonEntryError(
                f"key {excerpt(key)} disagrees with the row: column {column!r} is"
                f" {excerpt(actual)} in '{image}'"
            )


def same_value(a: Any, b: Any) -> bool:
    """Whether two decoded JSON values are the same value: numbers by value (JSON does not tell
    ``7`` from ``7.0``), never a boolean for a number, arrays and objects member by member."""
    ta, tb = type(a), type(b)
    if ta is tb and (ta is int or ta is str):
        return bool(a == b)
    if ta is bool or tb is bool:
        return a is b
    if ta in (int, float) and tb in (int, float):
        return bool(a == b)
    if ta is tb and (ta is list or ta is dict):
        try:
            return orjson.dumps(a, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
                b, option=orjson.OPT_SORT_KEYS
            )
        except orjson.JSONEncodeError:
            raise PoisonEntryError(
                f"a key column holds a value too deeply nested to compare: {excerpt(a)}"
            ) from None
    return bool(ta is tb and a == b)


def _converter(cache: ConverterCache, schema: dict[str, Any], what: str) -> RowConverter | None:
    try:
        return cache.get(schema)
    except ValueError as exc:
        raise PoisonEntryError(f"{what}: {exc}") from None


def _guarded(convert: RowConverter, row: dict[str, Any]) -> dict[str, Any]:
    try:
        return convert(row)
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise PoisonEntryError(f"cannot decode a logical-typed column: {exc}") from None


def _bad_row(image: str, row: Any) -> str:
    if type(row) is not dict:
        return f"{image!r} is not an object"
    return f"{image!r} has {len(row)} columns: a PostgreSQL row has at most {MAX_COLUMNS}"


def _located(op: str, source: Any, origins: binlog.Origins) -> tuple[dict[str, Any], str, str]:
    """The change's ``source``, its table (``schema.table``; ``db.table`` for MySQL-family
    sources) and its position in commit order; PoisonEntryError when any is missing or
    malformed."""
    if type(source) is not dict:
        raise PoisonEntryError(_bad_source(source))
    connector = source.get("connector")
    if type(connector) is str and connector in binlog.CONNECTORS:
        table = binlog.table_name(source)
        if table is None:
            raise PoisonEntryError("source lacks 'db' or 'table'")
        position = binlog.position(op, source, _rank(op))
        origins.note(table, source)
        return source, table, position
    if type(source.get("schema")) is not str or type(source.get("table")) is not str:
        raise PoisonEntryError(_bad_source(source))
    return source, f"{source['schema']}.{source['table']}", _position(op, source, _rank(op))


def _bad_source(source: Any) -> str:
    if type(source) is not dict:
        return "value has no 'source' object"
    return "source lacks 'schema' or 'table'"


def _bad_images(op: str, before: Any, after: Any) -> str:
    if before is not None and (type(before) is not dict or len(before) > MAX_COLUMNS):
        return _bad_row("before", before)
    if type(after) is not dict:
        return f"op {op!r} carries no 'after' row"
    return _bad_row("after", after)


def _load_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PoisonEntryError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise PoisonEntryError(f"{what} is not a JSON object")
    return obj


def _ts_ms(source: dict[str, Any]) -> int | None:
    ts_ms = source.get("ts_ms")
    if (type(ts_ms) is int and ts_ms >= 0) or ts_ms is None:
        return ts_ms
    raise PoisonEntryError(f"source.ts_ms {excerpt(ts_ms)} is not a time in milliseconds")


def _rank(op: str) -> str:
    """Ranks a removal before a write at one place (a primary-key change)."""
    return RANK_REMOVE if op in _REMOVAL_OPS else RANK_WRITE


def _position(op: str, source: dict[str, Any], rank: str) -> str:
    lsn = source.get("lsn")
    if type(lsn) is int and 0 <= lsn <= MAX_LSN and source.get("connector") == "postgresql":
        if op == "r":
            return _read_position(source, lsn)
        sequence = source.get("sequence")
        match = _SEQUENCE.fullmatch(sequence) if type(sequence) is str else None
        if match is not None and (len(last := match[1]) < _LSN_DIGITS or int(last) <= MAX_LSN):
            return streamed(last, lsn, rank)
        return _sequence_position(sequence, lsn, rank)
    connector = source.get("connector")
    if connector != "postgresql":
        raise PoisonEntryError(
            f"source.connector {excerpt(connector)}: source positions are defined for"
            " postgresql, mysql and mariadb only"
        )
    lsn = source.get("lsn")
    if lsn is None:
        if op == "r":
            return NO_POSITION
        raise PoisonEntryError(f"op {op!r} has no source.lsn")
    if not isinstance(lsn, int) or isinstance(lsn, bool) or not 0 <= lsn <= MAX_LSN:
        raise PoisonEntryError(f"source.lsn {excerpt(lsn)} is not a 64-bit unsigned integer")
    if op == "r":
        return _read_position(source, lsn)
    return _sequence_position(source.get("sequence"), lsn, rank)


# ``source.sequence``'s usual text, ``["<lastCommitLsn>","<lsn>"]``: matched, it costs less than
# parsing the JSON. Anything else (a null element, other spacing) goes through the parser.
_SEQUENCE = re.compile(r'\["(0|[1-9][0-9]{0,19})","(?:0|[1-9][0-9]{0,19})"\]')
_LSN_DIGITS = len(str(MAX_LSN))


def _read_position(source: dict[str, Any], lsn: int) -> str:
    # an incremental snapshot's read is not a read of the snapshot at an LSN: it only fills
    # rows never seen
    if source.get("snapshot") == "incremental":
        return NO_POSITION
    return snapshot_read(lsn)


def _sequence_position(sequence: Any, lsn: int, rank: str) -> str:
    """The position of a streamed change from its ``source.sequence``, any valid spelling."""
    if sequence is None:
        raise PoisonEntryError(
            "source.sequence is missing: a streamed change's position needs its lastCommitLsn"
        )
    if type(sequence) is not str:
        raise PoisonEntryError(f"source.sequence {excerpt(sequence)} is not a string")
    try:
        parsed = orjson.loads(sequence)
    except orjson.JSONDecodeError:
        raise PoisonEntryError(f"source.sequence {excerpt(sequence)} is not JSON") from None
    if type(parsed) is not list or len(parsed) != 2:
        raise PoisonEntryError(
            f"source.sequence {excerpt(sequence)} is not a [lastCommitLsn, lsn] pair"
        )
    for element in parsed:
        if element is not None and not _is_lsn_text(element):
            raise PoisonEntryError(
                f"source.sequence {excerpt(sequence)}: {excerpt(element)} is not an LSN string"
            )
    last_commit = parsed[0]
    if last_commit is None:
        # the first transaction after a snapshot: which one, only the stream's order says
        return unplaced(lsn, rank)
    return streamed(int(last_commit), lsn, rank)


def _is_lsn_text(value: Any) -> bool:
    return (
        type(value) is str
        and 0 < len(value) <= _LSN_DIGITS
        and value.isascii()
        and value.isdigit()
        and int(value) <= MAX_LSN
    )
