"""Builders of Debezium Server stream entries, shaped like the real captured fixtures."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis
import yaml

from tests.replies import xadd

FIXTURES = Path(__file__).parent / "fixtures" / "debezium-3.6.3-postgres"
PLACEHOLDER = "__debezium_unavailable_value"


def envelope(
    op: str,
    table: str,
    lsn: int | None,
    after: Mapping[str, Any] | None = None,
    before: Mapping[str, Any] | None = None,
    *,
    snapshot: str = "false",
    ts_ms: int | None = None,
    connector: str = "postgresql",
    sequence: tuple[int | None, int | None] | None = None,
) -> dict[str, Any]:
    """A Debezium change-event value (schemas disabled) for ``schema.table``.

    ``source.sequence`` is ``[lastCommitLsn, lsn]``: by default ``[null, lsn]`` for a snapshot
    read, and ``[lsn, lsn]`` for a streamed change, as if each change were a transaction of its
    own whose record directly follows the previous commit (so changes order by ``lsn``). Pass
    ``(None, lsn)`` for a change of the first transaction after a snapshot.
    """
    schema, name = table.split(".", 1)
    now = ts_ms if ts_ms is not None else int(time.time() * 1000)
    if sequence is None:
        sequence = (None, lsn) if op == "r" else (lsn, lsn)
    return {
        "before": dict(before) if before is not None else None,
        "after": dict(after) if after is not None else None,
        "source": {
            "version": "3.6.3.Final",
            "connector": connector,
            "name": "app",
            "ts_ms": now,
            "snapshot": snapshot,
            "db": "app",
            "sequence": json.dumps(
                [None if n is None else str(n) for n in sequence], separators=(",", ":")
            ),
            "ts_us": now * 1000,
            "ts_ns": now * 1_000_000,
            "schema": schema,
            "table": name,
            "txId": 700,
            "lsn": lsn,
            "xmin": None,
            "origin": None,
            "origin_lsn": None,
        },
        "transaction": None,
        "op": op,
        "ts_ms": now,
        "ts_us": now * 1000,
        "ts_ns": now * 1_000_000,
    }


def entry_fields(
    key: Mapping[str, Any] | None,
    value: Mapping[str, Any] | None,
    *,
    extended: bool = False,
    null: str = "default",
) -> dict[str, str]:
    """The XADD field/value pairs Debezium Server's Redis sink writes for a record."""
    k = json.dumps(key, separators=(",", ":")) if key is not None else null
    v = json.dumps(value, separators=(",", ":")) if value is not None else null
    if extended:
        return {"key": k, "value": v, "__DEBEZIUM.CONTEXT.TASKID": "0"}
    return {k: v}


def change_fields(
    op: str,
    row: Mapping[str, Any],
    lsn: int | None,
    *,
    table: str = "public.users",
    key_columns: tuple[str, ...] = ("id",),
    extended: bool = False,
) -> dict[str, str]:
    """The entry fields of one change of ``row``: c/u/r carry it as ``after``; d carries it as
    ``before``."""
    key = {c: row[c] for c in key_columns}
    if op == "d":
        value = envelope(op, table, lsn, before=row)
    else:
        value = envelope(op, table, lsn, after=row)
    return entry_fields(key, value, extended=extended)


def add_change(
    r: redis.Redis,
    stream: str,
    op: str,
    row: Mapping[str, Any],
    lsn: int | None,
    *,
    table: str = "public.users",
    key_columns: tuple[str, ...] = ("id",),
    extended: bool = False,
) -> bytes:
    """XADD one change of ``row`` (see ``change_fields``); its entry id."""
    fields = change_fields(op, row, lsn, table=table, key_columns=key_columns, extended=extended)
    return xadd(r, stream, fields)


def write_config(
    path: Path,
    url: str,
    *,
    streams: list[str] | None = None,
    rules: list[dict[str, Any]] | None = None,
    **worker: Any,
) -> Path:
    """A streamsync YAML config for tests: users hash rule by default, fast timings."""
    data: dict[str, Any] = {
        "redis": {"url": url},
        "source": {"streams": streams or ["app.public.users"], "group": "streamsync"},
        "worker": {
            "block_ms": 100,
            "claim_idle_ms": 500,
            "claim_interval_ms": 200,
            "trim_interval_ms": 200,
            **worker,
        },
        "rules": rules or [{"table": "public.users", "key": "user:{id}", "type": "hash"}],
    }
    path.write_text(yaml.safe_dump(data))
    return path


def fixture_records(name: str) -> list[dict[str, Any]]:
    """The records of one fixture file (destination, key, value, headers, partition)."""
    with (FIXTURES / name).open() as f:
        return [json.loads(line) for line in f]


def add_fixture(
    r: redis.Redis, name: str, *, stream: str | None = None, truncate: bool = True
) -> list[bytes]:
    """XADD every record of a fixture file as Debezium Server's compact format would (without
    its final TRUNCATE unless ``truncate``)."""
    ids: list[bytes] = []
    for rec in fixture_records(name):
        if not truncate and rec["key"] is None and '"op":"t"' in (rec["value"] or ""):
            continue
        key = rec["key"] if rec["key"] is not None else "default"
        value = rec["value"] if rec["value"] is not None else "default"
        ids.append(xadd(r, stream or rec["destination"], {key: value}))
    return ids
