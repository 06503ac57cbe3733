"""Decode Debezium's logical-typed column values, guided by the Kafka Connect schema.

With `schemas.enable=true` every change event carries the Connect schema of its row struct. This
module turns that schema into a row converter that rewrites the columns whose wire encoding is not
the value itself (base64 decimals, epoch-based dates and times) into exact, canonical strings.
Everything else passes through untouched. Pure: no I/O, no global state.
"""

from __future__ import annotations

import base64
import binascii
import datetime
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "UNAVAILABLE",
    "ConverterCache",
    "RowConverter",
    "is_unavailable",
    "row_converter",
]

UNAVAILABLE = "__debezium_unavailable_value"
_UNAVAILABLE_B64 = base64.b64encode(UNAVAILABLE.encode()).decode("ascii")
_UNAVAILABLE_FORMS = frozenset({UNAVAILABLE, _UNAVAILABLE_B64})

RowConverter = Callable[[dict[str, Any]], dict[str, Any]]
_ValueConverter = Callable[[Any], Any]

_DECIMAL = "org.apache.kafka.connect.data.Decimal"
_VARIABLE_SCALE_DECIMAL = "io.debezium.data.VariableScaleDecimal"
_DATE = "io.debezium.time.Date"
# logical name -> (units per second, fractional digits rendered)
_TIMES: dict[str, tuple[int, int]] = {
    "io.debezium.time.Time": (1_000, 3),
    "io.debezium.time.MicroTime": (1_000_000, 6),
    "io.debezium.time.NanoTime": (1_000_000_000, 9),
}
_TIMESTAMPS: dict[str, tuple[int, int]] = {
    "io.debezium.time.Timestamp": (1_000, 3),
    "io.debezium.time.MicroTimestamp": (1_000_000, 6),
    "io.debezium.time.NanoTimestamp": (1_000_000_000, 9),
}

_EPOCH = datetime.date(1970, 1, 1)
_SECONDS_PER_DAY = 86_400
_DEFAULT_CACHE_SIZE = 256

#: PostgreSQL's largest numeric scale (NUMERIC_DSCALE_MAX); a larger one would have a decimal
#: rendered with millions of digits.
MAX_SCALE = 16383
#: Deeper schemas (arrays of arrays...) are refused: no column type nests like that, and the
#: walk over them must not exhaust the stack.
MAX_SCHEMA_DEPTH = 32


def is_unavailable(value: object) -> bool:
    """True if value is Debezium's unavailable-TOAST placeholder in any of its forms:
    the plain string, the base64 of its UTF-8 bytes (bytea / bytes-typed columns), or a
    one-element list holding either (array columns)."""
    if isinstance(value, str):
        return value in _UNAVAILABLE_FORMS
    if isinstance(value, list) and len(value) == 1:
        element = value[0]
        return isinstance(element, str) and element in _UNAVAILABLE_FORMS
    return False


def _is_int(value: object) -> bool:
    # bool is an int subclass; a JSON true is never an epoch count.
    return isinstance(value, int) and not isinstance(value, bool)


def _b64_int(text: str) -> int | None:
    """The big-endian two's-complement integer in base64 text, or None if text is not base64."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return int.from_bytes(raw, "big", signed=True)


def _check_scale(scale: int) -> int:
    if not -MAX_SCALE <= scale <= MAX_SCALE:
        raise ValueError(f"decimal scale {scale} is out of range (at most {MAX_SCALE} digits)")
    return scale


def _format_decimal(unscaled: int, scale: int) -> str:
    """Render unscaled * 10**-scale exactly, with exactly max(scale, 0) digits after the point."""
    if scale <= 0:
        return str(unscaled * 10**-scale)
    digits = str(abs(unscaled)).rjust(scale + 1, "0")
    sign = "-" if unscaled < 0 else ""
    return f"{sign}{digits[:-scale]}.{digits[-scale:]}"


def _decimal_converter(scale: int) -> _ValueConverter:
    def convert(value: Any) -> Any:
        # Numbers (decimal.format=NUMERIC) and anything not base64 are already final.
        if not isinstance(value, str):
            return value
        unscaled = _b64_int(value)
        return value if unscaled is None else _format_decimal(unscaled, scale)

    return convert


def _variable_scale_decimal(value: Any) -> Any:
    if not isinstance(value, Mapping):
        return value
    scale = value.get("scale")
    encoded = value.get("value")
    if not isinstance(scale, int) or isinstance(scale, bool) or not isinstance(encoded, str):
        return value
    unscaled = _b64_int(encoded)
    return value if unscaled is None else _format_decimal(unscaled, _check_scale(scale))


def _date(value: Any) -> Any:
    if not _is_int(value):
        return value
    try:
        return (_EPOCH + datetime.timedelta(days=value)).isoformat()
    except OverflowError:
        # PostgreSQL 'infinity' and dates outside 0001..9999 have no ISO rendering here.
        return value


def _clock(seconds_of_day: int, fraction: int, digits: int) -> str:
    hours, rest = divmod(seconds_of_day, 3_600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}.{fraction:0{digits}d}"


def _time_converter(per_second: int, digits: int) -> _ValueConverter:
    end_of_day = _SECONDS_PER_DAY * per_second

    def convert(value: Any) -> Any:
        # PostgreSQL allows 24:00:00 inclusive; anything else outside a day is not a clock time.
        if not _is_int(value) or not 0 <= value <= end_of_day:
            return value
        seconds, fraction = divmod(value, per_second)
        return _clock(seconds, fraction, digits)

    return convert


def _timestamp_converter(per_second: int, digits: int) -> _ValueConverter:
    def convert(value: Any) -> Any:
        if not _is_int(value):
            return value
        # Floor division keeps pre-1970 values right: -1 ms is 1969-12-31T23:59:59.999.
        seconds, fraction = divmod(value, per_second)
        days, seconds_of_day = divmod(seconds, _SECONDS_PER_DAY)
        try:
            day = _EPOCH + datetime.timedelta(days=days)
        except OverflowError:
            return value
        return f"{day.isoformat()}T{_clock(seconds_of_day, fraction, digits)}"

    return convert


def _array_converter(element: _ValueConverter) -> _ValueConverter:
    def convert(value: Any) -> Any:
        if not isinstance(value, list):
            return value
        return [element(item) for item in value]

    return convert


def _guarded(convert: _ValueConverter) -> _ValueConverter:
    def guarded(value: Any) -> Any:
        if value is None or is_unavailable(value):
            return value
        return convert(value)

    return guarded


def _raw_scale(schema: Mapping[str, Any]) -> int | float | str | None:
    parameters = schema.get("parameters")
    scale = parameters.get("scale") if isinstance(parameters, Mapping) else None
    return scale if type(scale) in (int, float, str) else None


def _scale_parameter(schema: Mapping[str, Any]) -> int | None:
    """The decimal scale of a column schema (Connect writes it as a string), None when there is
    none; ValueError when it is out of PostgreSQL's range."""
    scale = _raw_scale(schema)
    if type(scale) is str:
        if len(scale) > 20:
            # int() of thousands of digits is slow, and no such scale is in range anyway
            raise ValueError(f"decimal scale {scale[:20]}... is out of range")
        try:
            scale = int(scale)
        except ValueError:
            return None
    elif type(scale) is float:
        if not scale.is_integer():
            return None
        scale = int(scale)
    return None if scale is None else _check_scale(int(scale))


def _value_converter(schema: Mapping[str, Any], depth: int = 0) -> _ValueConverter | None:
    """The converter for one column schema, or None when its values pass through unchanged;
    ValueError for a schema no column has (nested too deep, a decimal scale out of range)."""
    if depth > MAX_SCHEMA_DEPTH:
        raise ValueError(f"schema nested more than {MAX_SCHEMA_DEPTH} levels deep")
    kind = schema.get("type")
    name = schema.get("name")
    convert: _ValueConverter | None = None
    if kind == "array":
        items = schema.get("items")
        element = _value_converter(items, depth + 1) if isinstance(items, Mapping) else None
        convert = None if element is None else _array_converter(element)
    elif name == _DECIMAL and kind == "bytes":
        scale = _scale_parameter(schema)
        convert = None if scale is None else _decimal_converter(scale)
    elif name == _VARIABLE_SCALE_DECIMAL and kind == "struct":
        convert = _variable_scale_decimal
    elif name == _DATE:
        convert = _date
    elif isinstance(name, str) and name in _TIMES:
        convert = _time_converter(*_TIMES[name])
    elif isinstance(name, str) and name in _TIMESTAMPS:
        convert = _timestamp_converter(*_TIMESTAMPS[name])
    return None if convert is None else _guarded(convert)


def row_converter(struct_schema: Mapping[str, Any]) -> RowConverter | None:
    """Given the Connect schema of a row struct (the schema field named "after" or "before" of an
    envelope, i.e. {"type":"struct","fields":[...]}), return a function that returns a NEW dict
    with every logical-typed column decoded, or None when no column needs decoding.

    ValueError, naming the column, for a column schema no column has; the returned function
    raises ValueError, naming the column, for a value its type cannot have."""
    fields = struct_schema.get("fields")
    if not isinstance(fields, list):
        return None
    columns: list[tuple[str, _ValueConverter]] = []
    for field in fields:
        if not isinstance(field, Mapping):
            continue
        column = field.get("field")
        if not isinstance(column, str):
            continue
        try:
            convert = _value_converter(field)
        except ValueError as exc:
            raise ValueError(f"column {column!r}: {exc}") from None
        if convert is not None:
            columns.append((column, convert))
    if not columns:
        return None
    plan = tuple(columns)

    def convert_row(row: dict[str, Any]) -> dict[str, Any]:
        decoded = dict(row)
        for column, convert in plan:
            if column in decoded:
                try:
                    decoded[column] = convert(decoded[column])
                except (ValueError, OverflowError) as exc:
                    raise ValueError(f"column {column!r}: {exc}") from None
        return decoded

    return convert_row


def _text(value: Any) -> str | None:
    return value if type(value) is str else None


def _fingerprint(schema: Mapping[str, Any], depth: int = 0) -> tuple[Any, ...]:
    """Everything _value_converter reads from a schema, as a hashable tuple (only the text of
    names and types: any other value there means no logical type)."""
    if depth > MAX_SCHEMA_DEPTH:
        raise ValueError(f"schema nested more than {MAX_SCHEMA_DEPTH} levels deep")
    items = schema.get("items")
    fields = schema.get("fields")
    return (
        _text(schema.get("field")),
        _text(schema.get("type")),
        _text(schema.get("name")),
        _raw_scale(schema),
        _fingerprint(items, depth + 1) if isinstance(items, Mapping) else None,
        tuple(_fingerprint(f, depth + 1) for f in fields if isinstance(f, Mapping))
        if isinstance(fields, list)
        else None,
    )


class ConverterCache:
    """Caches row_converter results keyed by a cheap fingerprint of the struct schema (field names,
    types, logical names, parameters), bounded in size (e.g. 256 entries, evict oldest)."""

    def __init__(self, max_entries: int = _DEFAULT_CACHE_SIZE) -> None:
        """Create an empty cache holding at most max_entries converters (least recently used
        are evicted first)."""
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self._max_entries = max_entries
        self._entries: OrderedDict[tuple[Any, ...], RowConverter | None] = OrderedDict()

    def __len__(self) -> int:
        """Number of cached schemas."""
        return len(self._entries)

    def get(self, struct_schema: Mapping[str, Any]) -> RowConverter | None:
        """row_converter(struct_schema), built once per distinct schema shape; ValueError as
        row_converter raises it."""
        key = _fingerprint(struct_schema)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        converter = row_converter(struct_schema)
        self._entries[key] = converter
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return converter
