"""Unit and property tests for streamsync.logical_types."""

from __future__ import annotations

import base64
import copy
import datetime
import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamsync.logical_types import (
    UNAVAILABLE,
    ConverterCache,
    RowConverter,
    is_unavailable,
    row_converter,
)
from tests.debezium import fixture_records

UNAVAILABLE_B64 = base64.b64encode(UNAVAILABLE.encode()).decode()
DATETIME_MIN_US = -62_135_596_800_000_000  # 0001-01-01T00:00:00
DATETIME_MAX_US = 253_402_300_799_999_999  # 9999-12-31T23:59:59.999999


def encode_unscaled(unscaled: int) -> str:
    """Base64 of the minimal big-endian two's complement, as Java's BigInteger.toByteArray()."""
    length = (unscaled + (unscaled < 0)).bit_length() // 8 + 1
    return base64.b64encode(unscaled.to_bytes(length, "big", signed=True)).decode()


def column(name: str, kind: str, logical: str | None = None, **extra: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": kind, "optional": True, "field": name, **extra}
    if logical is not None:
        schema["name"] = logical
    return schema


def decimal_column(name: str, scale: int) -> dict[str, Any]:
    return column(
        name,
        "bytes",
        "org.apache.kafka.connect.data.Decimal",
        version=1,
        parameters={"scale": str(scale), "connect.decimal.precision": "38"},
    )


def struct(*fields: dict[str, Any]) -> dict[str, Any]:
    return {"type": "struct", "fields": list(fields), "optional": True, "field": "after"}


def convert_one(schema: dict[str, Any], value: Any) -> Any:
    converter = row_converter(struct(schema))
    assert converter is not None
    return converter({schema["field"]: value})[schema["field"]]


def fixture_events(name: str) -> list[dict[str, Any] | None]:
    """The change-event values of a captured fixture file (None for a tombstone)."""
    return [None if r["value"] is None else json.loads(r["value"]) for r in fixture_records(name)]


# --- is_unavailable ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [UNAVAILABLE, UNAVAILABLE_B64, [UNAVAILABLE], [UNAVAILABLE_B64]],
)
def test_is_unavailable_forms(value: object) -> None:
    assert is_unavailable(value)


@pytest.mark.parametrize(
    "value",
    [None, "", "x", 0, [], [UNAVAILABLE, UNAVAILABLE], [[UNAVAILABLE]], {"v": UNAVAILABLE}],
)
def test_is_unavailable_rejects_other_values(value: object) -> None:
    assert not is_unavailable(value)


# --- Decimal -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoded", "scale", "expected"),
    [
        ("BBo=", 2, "10.50"),
        ("+w==", 2, "-0.05"),
        ("AA==", 2, "0.00"),
        ("Kg==", 0, "42"),
        ("1g==", 0, "-42"),
        ("/w==", 3, "-0.001"),
        ("AIA=", 1, "12.8"),
        ("/4A=", 1, "-12.8"),
        ("Kg==", -2, "4200"),
    ],
)
def test_decimal(encoded: str, scale: int, expected: str) -> None:
    assert convert_one(decimal_column("d", scale), encoded) == expected


@pytest.mark.parametrize("value", [10.5, 42, "10.50", "-0.05", "not base64!"])
def test_decimal_other_handling_modes_pass_through(value: object) -> None:
    assert convert_one(decimal_column("d", 2), value) == value


def test_decimal_without_scale_parameter_is_left_alone() -> None:
    schema = column("d", "bytes", "org.apache.kafka.connect.data.Decimal")
    assert row_converter(struct(schema)) is None


@given(unscaled=st.integers(min_value=-(10**60), max_value=10**60), scale=st.integers(0, 30))
def test_decimal_round_trip(unscaled: int, scale: int) -> None:
    # Built from text: Decimal arithmetic such as scaleb() would round to 28 digits.
    original = Decimal(f"{unscaled}E-{scale}")
    decoded = convert_one(decimal_column("d", scale), encode_unscaled(unscaled))
    assert decoded == f"{original:f}"
    assert Decimal(decoded) == original
    fraction = decoded.partition(".")[2]
    assert len(fraction) == scale


# --- VariableScaleDecimal ------------------------------------------------------------------------

VSD = column(
    "n",
    "struct",
    "io.debezium.data.VariableScaleDecimal",
    fields=[
        {"type": "int32", "optional": False, "field": "scale"},
        {"type": "bytes", "optional": False, "field": "value"},
    ],
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"scale": 3, "value": "Bdw="}, "1.500"),
        ({"scale": 0, "value": "Dw=="}, "15"),
        ({"scale": 2, "value": "+w=="}, "-0.05"),
    ],
)
def test_variable_scale_decimal(value: dict[str, Any], expected: str) -> None:
    assert convert_one(VSD, value) == expected


@pytest.mark.parametrize(
    "value",
    ["NaN", 1.5, {"value": "Dw=="}, {"scale": "2", "value": "Dw=="}, {"scale": 1, "value": "?"}],
)
def test_variable_scale_decimal_other_shapes_pass_through(value: object) -> None:
    assert convert_one(VSD, value) == value


@given(unscaled=st.integers(min_value=-(10**40), max_value=10**40), scale=st.integers(0, 20))
def test_variable_scale_decimal_round_trip(unscaled: int, scale: int) -> None:
    decoded = convert_one(VSD, {"scale": scale, "value": encode_unscaled(unscaled)})
    assert decoded == f"{Decimal(f'{unscaled}E-{scale}'):f}"


# --- Date ----------------------------------------------------------------------------------------

DATE = column("d", "int32", "io.debezium.time.Date")


@pytest.mark.parametrize(
    ("days", "expected"),
    [
        (0, "1970-01-01"),
        (19_844, "2024-05-01"),
        (-1, "1969-12-31"),
        (-719_162, "0001-01-01"),
        (-689_541, "0082-02-06"),
        (2_932_896, "9999-12-31"),
    ],
)
def test_date(days: int, expected: str) -> None:
    assert convert_one(DATE, days) == expected


@pytest.mark.parametrize("days", [2_932_897, -719_163, 2_147_483_647, -2_147_483_648, True, "x"])
def test_date_out_of_range_or_odd_is_left_raw(days: object) -> None:
    assert convert_one(DATE, days) == days


@given(days=st.integers(min_value=-719_162, max_value=2_932_896))
def test_date_matches_datetime(days: int) -> None:
    expected = (datetime.date(1970, 1, 1) + datetime.timedelta(days=days)).isoformat()
    assert convert_one(DATE, days) == expected


# --- Time ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("logical", "value", "expected"),
    [
        ("io.debezium.time.Time", 0, "00:00:00.000"),
        ("io.debezium.time.Time", 45_296_789, "12:34:56.789"),
        ("io.debezium.time.Time", 86_400_000, "24:00:00.000"),
        ("io.debezium.time.MicroTime", 45_296_000_001, "12:34:56.000001"),
        ("io.debezium.time.MicroTime", 86_399_999_999, "23:59:59.999999"),
        ("io.debezium.time.MicroTime", 86_400_000_000, "24:00:00.000000"),
        ("io.debezium.time.NanoTime", 45_296_123_456_789, "12:34:56.123456789"),
        ("io.debezium.time.NanoTime", 86_400_000_000_000, "24:00:00.000000000"),
    ],
)
def test_time(logical: str, value: int, expected: str) -> None:
    assert convert_one(column("t", "int64", logical), value) == expected


@pytest.mark.parametrize("value", [-1, 86_400_000_001, 3_000_000_000_000])
def test_time_outside_a_day_is_left_raw(value: int) -> None:
    assert convert_one(column("t", "int64", "io.debezium.time.MicroTime"), value) == value


@given(micros=st.integers(min_value=0, max_value=86_399_999_999))
def test_micro_time_matches_datetime(micros: int) -> None:
    moment = datetime.datetime(2000, 1, 1) + datetime.timedelta(microseconds=micros)
    expected = moment.time().isoformat(timespec="microseconds")
    assert convert_one(column("t", "int64", "io.debezium.time.MicroTime"), micros) == expected


# --- Timestamp -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("logical", "value", "expected"),
    [
        ("io.debezium.time.Timestamp", 0, "1970-01-01T00:00:00.000"),
        ("io.debezium.time.Timestamp", 1_714_557_600_123, "2024-05-01T10:00:00.123"),
        ("io.debezium.time.Timestamp", -1, "1969-12-31T23:59:59.999"),
        ("io.debezium.time.MicroTimestamp", 1_714_557_600_123_456, "2024-05-01T10:00:00.123456"),
        ("io.debezium.time.MicroTimestamp", -1, "1969-12-31T23:59:59.999999"),
        ("io.debezium.time.MicroTimestamp", DATETIME_MIN_US, "0001-01-01T00:00:00.000000"),
        ("io.debezium.time.MicroTimestamp", DATETIME_MAX_US, "9999-12-31T23:59:59.999999"),
        (
            "io.debezium.time.NanoTimestamp",
            1_714_557_600_123_456_789,
            "2024-05-01T10:00:00.123456789",
        ),
        ("io.debezium.time.NanoTimestamp", -1, "1969-12-31T23:59:59.999999999"),
    ],
)
def test_timestamp(logical: str, value: int, expected: str) -> None:
    assert convert_one(column("ts", "int64", logical), value) == expected


@pytest.mark.parametrize(
    "value", [DATETIME_MAX_US + 1, DATETIME_MIN_US - 1, 2**63 - 1, -(2**63), "x"]
)
def test_timestamp_out_of_range_is_left_raw(value: object) -> None:
    assert convert_one(column("ts", "int64", "io.debezium.time.MicroTimestamp"), value) == value


@given(micros=st.integers(min_value=DATETIME_MIN_US, max_value=DATETIME_MAX_US))
def test_micro_timestamp_matches_datetime(micros: int) -> None:
    moment = datetime.datetime(1970, 1, 1) + datetime.timedelta(microseconds=micros)
    logical = "io.debezium.time.MicroTimestamp"
    expected = moment.isoformat(timespec="microseconds")
    assert convert_one(column("ts", "int64", logical), micros) == expected


@given(
    micros=st.integers(min_value=DATETIME_MIN_US, max_value=DATETIME_MAX_US),
    nanos=st.integers(0, 999),
)
def test_nano_timestamp_extends_micro_timestamp(micros: int, nanos: int) -> None:
    micro = convert_one(column("ts", "int64", "io.debezium.time.MicroTimestamp"), micros)
    nano = convert_one(
        column("ts", "int64", "io.debezium.time.NanoTimestamp"), micros * 1000 + nanos
    )
    assert nano == f"{micro}{nanos:03d}"


# --- pass-through types, arrays, placeholders ----------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "value"),
    [
        (column("z", "string", "io.debezium.time.ZonedTimestamp"), "2024-05-01T10:00:00.123456Z"),
        (column("z", "string", "io.debezium.time.ZonedTime"), "10:00:00.123456Z"),
        # time.precision.mode=isostring: already ISO 8601 strings
        (column("t", "string", "io.debezium.time.IsoTimestamp"), "2024-05-01T10:00:00.123456Z"),
        (column("d", "string", "io.debezium.time.IsoDate"), "2024-05-01Z"),
        (column("c", "string", "io.debezium.time.IsoTime"), "10:00:00.5Z"),
        (
            column("a", "array", items={"type": "string", "name": "io.debezium.time.IsoDate"}),
            ["2024-05-01Z", None],
        ),
        (column("j", "string", "io.debezium.data.Json"), '{"a": 1}'),
        (column("u", "string", "io.debezium.data.Uuid"), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        (column("e", "string", "io.debezium.data.Enum", parameters={"allowed": "a,b"}), "a"),
        (column("b", "bytes"), "BBo="),
        (column("i", "int32"), 19_844),
        (column("x", "int32", "io.debezium.time.SomethingNew"), 19_844),
        (column("p", "struct", None, fields=[{"type": "int32", "field": "a"}]), {"a": 1}),
        (column("g", "struct", "io.debezium.data.geometry.Point"), {"x": 1.0, "y": 2.0}),
    ],
)
def test_other_types_need_no_converter(schema: dict[str, Any], value: object) -> None:
    assert row_converter(struct(schema)) is None


def test_array_of_decimals_decodes_each_element() -> None:
    schema = column("a", "array", items=decimal_column("", 2) | {"optional": True})
    assert convert_one(schema, ["BBo=", None, "+w=="]) == ["10.50", None, "-0.05"]
    assert convert_one(schema, []) == []


def test_array_of_dates_and_nested_arrays() -> None:
    dates = column("a", "array", items={"type": "int32", "name": "io.debezium.time.Date"})
    assert convert_one(dates, [0, -1]) == ["1970-01-01", "1969-12-31"]
    nested = column("n", "array", items={"type": "array", "items": dates["items"]})
    assert convert_one(nested, [[0], None, [1]]) == [["1970-01-01"], None, ["1970-01-02"]]


def test_array_of_plain_values_needs_no_converter() -> None:
    assert row_converter(struct(column("a", "array", items={"type": "string"}))) is None


@pytest.mark.parametrize(
    ("schema", "placeholder"),
    [
        (decimal_column("d", 2), UNAVAILABLE_B64),
        (decimal_column("d", 2), UNAVAILABLE),
        (column("ts", "int64", "io.debezium.time.MicroTimestamp"), UNAVAILABLE),
        (VSD, UNAVAILABLE),
        (column("a", "array", items=decimal_column("", 2)), [UNAVAILABLE]),
        (column("a", "array", items=decimal_column("", 2)), [UNAVAILABLE_B64]),
    ],
)
def test_placeholder_is_left_exactly_as_is(schema: dict[str, Any], placeholder: object) -> None:
    assert convert_one(schema, placeholder) == placeholder


def test_none_stays_none() -> None:
    assert convert_one(decimal_column("d", 2), None) is None
    assert convert_one(DATE, None) is None


# --- row_converter -------------------------------------------------------------------------------


def test_row_converter_returns_new_dict_and_touches_only_logical_columns() -> None:
    schema = struct(
        column("id", "int32"),
        column("name", "string"),
        decimal_column("balance", 2),
        DATE | {"field": "born"},
    )
    converter = row_converter(schema)
    assert converter is not None
    row = {"id": 1, "name": "alice", "balance": "BBo=", "born": -1}
    original = copy.deepcopy(row)
    assert converter(row) == {"id": 1, "name": "alice", "balance": "10.50", "born": "1969-12-31"}
    assert row == original


def test_row_converter_tolerates_missing_columns() -> None:
    converter = row_converter(struct(decimal_column("balance", 2)))
    assert converter is not None
    assert converter({"id": 1}) == {"id": 1}


@pytest.mark.parametrize("schema", [{}, {"type": "struct"}, {"type": "struct", "fields": []}])
def test_row_converter_without_fields_is_none(schema: dict[str, Any]) -> None:
    assert row_converter(schema) is None


# --- ConverterCache ------------------------------------------------------------------------------


def test_cache_returns_the_same_converter_for_an_equal_schema() -> None:
    cache = ConverterCache()
    first = cache.get(struct(decimal_column("balance", 2)))
    again = cache.get(copy.deepcopy(struct(decimal_column("balance", 2))))
    assert first is not None
    assert first is again
    assert len(cache) == 1


def test_cache_separates_schemas_that_decode_differently() -> None:
    cache = ConverterCache()
    scale2 = cache.get(struct(decimal_column("balance", 2)))
    scale3 = cache.get(struct(decimal_column("balance", 3)))
    renamed = cache.get(struct(decimal_column("amount", 2)))
    array_of_dates = cache.get(struct(column("a", "array", items=DATE)))
    array_of_ints = cache.get(struct(column("a", "array", items={"type": "int32"})))
    assert scale2 is not None and scale3 is not None and renamed is not None
    assert scale2({"balance": "BBo="}) == {"balance": "10.50"}
    assert scale3({"balance": "BBo="}) == {"balance": "1.050"}
    assert renamed({"amount": "BBo="}) == {"amount": "10.50"}
    assert array_of_dates is not None
    assert array_of_ints is None
    assert len(cache) == 5


def test_cache_remembers_none() -> None:
    cache = ConverterCache()
    assert cache.get(struct(column("id", "int32"))) is None
    assert cache.get(struct(column("id", "int32"))) is None
    assert len(cache) == 1


def test_cache_is_bounded_and_evicts_least_recently_used() -> None:
    cache = ConverterCache(max_entries=2)
    a = cache.get(struct(decimal_column("a", 2)))
    cache.get(struct(decimal_column("b", 2)))
    assert cache.get(struct(decimal_column("a", 2))) is a
    cache.get(struct(decimal_column("c", 2)))
    assert len(cache) == 2
    assert cache.get(struct(decimal_column("a", 2))) is a
    assert len(cache) == 2


def test_cache_rejects_non_positive_size() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        ConverterCache(max_entries=0)


# --- real Debezium 3.6.3 events ------------------------------------------------------------------


def row_schema(envelope_schema: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in envelope_schema["fields"] if f["field"] == name)


def test_fixture_balance_matches_decimal_string_mode() -> None:
    with_schema = fixture_events("schemas-on.jsonl")
    as_string = fixture_events("decimal-string.jsonl")
    assert len(with_schema) == len(as_string) == 15
    cache = ConverterCache()
    checked = 0
    for index, (event, reference) in enumerate(zip(with_schema, as_string, strict=True)):
        if event is None or reference is None:
            assert event is None and reference is None, index
            continue
        payload = event["payload"]
        for side in ("before", "after"):
            row = payload[side]
            if row is None:
                assert reference[side] is None, (index, side)
                continue
            converter: RowConverter | None = cache.get(row_schema(event["schema"], side))
            assert converter is not None
            decoded = converter(row)
            assert decoded["balance"] == reference[side]["balance"], (index, side)
            # Everything but balance passes through untouched (updated_at is a ZonedTimestamp).
            assert {k: v for k, v in decoded.items() if k != "balance"} == {
                k: v for k, v in row.items() if k != "balance"
            }
            checked += 1
    assert checked == 12
    # One entry per side: the "field" name is part of the fingerprint.
    assert len(cache) == 2
