"""Change event + mapping rules -> the rows handed to the Functions library.

Pure: no I/O. Each `RowWrite` is one row of one registered function's batch call: a target key,
its position record and the row's ARGV segment (layouts in lua/streamsync.lua).
"""

from __future__ import annotations

import binascii
import functools
import itertools
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from streamsync.config import Mode, Rule, TargetType
from streamsync.errors import PoisonEntryError
from streamsync.events import ChangeEvent

FN_WRITE_HASH = "streamsync_write_hash"
FN_WRITE_JSON = "streamsync_write_json"
FN_DELETE = "streamsync_delete"
FN_INVALIDATE = "streamsync_invalidate"

CLUSTER_SLOTS = 16384

ArgV = list[str | bytes]


@dataclass(slots=True)
class RowWrite:
    """One row of a batch call to a registered function."""

    function: str
    target: str
    position_key: str
    args: ArgV


def key_slot(key: bytes) -> int:
    """The Redis Cluster hash slot of ``key`` (honouring ``{hash tags}``)."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) % CLUSTER_SLOTS


@functools.cache
def _slot_tags() -> tuple[str, ...]:
    tags: list[str | None] = [None] * CLUSTER_SLOTS
    missing = CLUSTER_SLOTS
    alphabet = string.ascii_letters + string.digits
    for length in itertools.count(1):
        for chars in itertools.product(alphabet, repeat=length):
            tag = "".join(chars)
            slot = binascii.crc_hqx(tag.encode(), 0) % CLUSTER_SLOTS
            if tags[slot] is None:
                tags[slot] = tag
                missing -= 1
                if not missing:
                    return tuple(t for t in tags if t is not None)
    raise AssertionError("unreachable")


def position_key(prefix: str, target: str) -> str:
    """The key of ``target``'s position record: always in the same hash slot as ``target``.

    ``user:42`` -> ``<prefix>{user:42}``; a target with its own hash tag keeps it
    (``<prefix>{t1}:user:42``); a target whose braces would confuse the tag rules gets a short
    tag chosen to hash to the same slot.
    """
    start = target.find("{")
    if start >= 0 and target.find("}", start + 1) > start + 1:
        return prefix + target
    if start < 0 and "}" not in target:
        return f"{prefix}{{{target}}}"
    slot = key_slot(target.encode())
    return f"{prefix}{{{_slot_tags()[slot]}}}:{target}"


def hash_value(value: Any) -> str | bytes:
    """A column value as a hash field value: text as is, numbers and booleans as JSON would
    spell them, arrays and objects as JSON text."""
    if isinstance(value, str):
        return value
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    return orjson.dumps(value)


def _ttl_ms(rule: Rule) -> str:
    return str(rule.ttl_s * 1000) if rule.ttl_s else "0"


class Planner:
    """Turns a change event into the rows to apply, following the rules for its table."""

    def __init__(
        self, rules_by_table: Mapping[str, tuple[Rule, ...]], position_prefix: str
    ) -> None:
        self.rules_by_table = rules_by_table
        self.position_prefix = position_prefix

    def plan(self, event: ChangeEvent) -> list[RowWrite]:
        """The rows for ``event``; PoisonEntryError when it cannot be applied."""
        rules = self.rules_by_table.get(event.table)
        if not rules:
            raise PoisonEntryError(f"no rule maps table {event.table!r}")
        row = event.row()
        out = []
        for rule in rules:
            target = rule.template.render(row)
            pos_key = position_key(self.position_prefix, target)
            if rule.mode is Mode.INVALIDATE:
                out.append(RowWrite(FN_INVALIDATE, target, pos_key, [event.position]))
            elif event.op == "d":
                out.append(RowWrite(FN_DELETE, target, pos_key, [event.position]))
            elif rule.type is TargetType.HASH:
                out.append(
                    RowWrite(FN_WRITE_HASH, target, pos_key, self._hash_args(rule, event, row))
                )
            else:
                out.append(
                    RowWrite(FN_WRITE_JSON, target, pos_key, self._json_args(rule, event, row))
                )
        return out

    def _hash_args(self, rule: Rule, event: ChangeEvent, row: dict[str, Any]) -> ArgV:
        columns: Iterable[str] = rule.fields if rule.fields is not None else row.keys()
        unchanged = event.unchanged
        pairs: ArgV = []
        nulls: ArgV = []
        keep: ArgV = []
        for column in columns:
            value = row.get(column)
            if value is None:
                nulls.append(column)
            elif column in unchanged:
                keep.append(column)
            else:
                pairs.append(column)
                pairs.append(hash_value(value))
        ttl = _ttl_ms(rule)
        if keep:
            return [
                event.position,
                ttl,
                "P",
                str(len(pairs) // 2),
                str(len(nulls)),
                str(len(keep)),
                *pairs,
                *nulls,
                *keep,
            ]
        return [event.position, ttl, "F", str(len(pairs) // 2), "0", "0", *pairs]

    def _json_args(self, rule: Rule, event: ChangeEvent, row: dict[str, Any]) -> ArgV:
        if rule.fields is not None:
            row = {c: row.get(c) for c in rule.fields}
        ttl = _ttl_ms(rule)
        unchanged = event.unchanged.intersection(row)
        if not unchanged:
            return [event.position, ttl, "F", "1", orjson.dumps(row)]
        members: ArgV = []
        for column, value in row.items():
            members.append(orjson.dumps(column))
            if column in unchanged:
                members += ["k", ""]
            else:
                members += ["v", orjson.dumps(value)]
        return [event.position, ttl, "P", str(len(row)), *members]
