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

#: The library's batch entry point: rows of every kind in one call.
FN_APPLY = "streamsync_apply"

# Row kinds (lua/streamsync.lua): full and partial hash and JSON writes, delete, invalidate.
ROW_HASH, ROW_HASH_PARTIAL, ROW_JSON, ROW_JSON_PARTIAL = "H", "h", "J", "j"
ROW_DELETE, ROW_INVALIDATE = "D", "I"

CLUSTER_SLOTS = 16384
#: Field-name sets remembered by a planner before it starts over.
MAX_SHAPES = 4096

ArgV = list[str | bytes]


@dataclass(slots=True)
class RowWrite:
    """One row of a batch call: its target key, the target's position record, and its ARGV
    items, starting with the row kind."""

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
        self._shapes: dict[tuple[str, ...], str] = {}

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
                args: ArgV = [ROW_INVALIDATE, event.position]
            elif event.op == "d":
                args = [ROW_DELETE, event.position]
            elif rule.type is TargetType.HASH:
                args = self._hash_args(rule, event, row)
            else:
                args = self._json_args(rule, event, row)
            out.append(RowWrite(target, pos_key, args))
        return out

    def _shape(self, names: tuple[str, ...]) -> str:
        """A short token naming a set of hash fields (see the library's position records)."""
        shape = self._shapes.get(names)
        if shape is None:
            if len(self._shapes) >= MAX_SHAPES:
                self._shapes.clear()
            joined = "\0".join(names).encode()
            shape = self._shapes[names] = f"{binascii.crc32(joined):08x}"
        return shape

    def _hash_args(self, rule: Rule, event: ChangeEvent, row: dict[str, Any]) -> ArgV:
        pairs: ArgV = []
        ttl = _ttl_ms(rule)
        if not event.unchanged:
            if rule.fields is None and None not in row.values():
                names: tuple[str, ...] = tuple(row)
                values = [v if type(v) is str else hash_value(v) for v in row.values()]
            else:
                selected = row if rule.fields is None else rule.fields
                present = [(c, v) for c in selected if (v := row.get(c)) is not None]
                names = tuple([c for c, _ in present])
                values = [v if type(v) is str else hash_value(v) for _, v in present]
            head: ArgV = [ROW_HASH, event.position, ttl, self._shape(names), str(len(names))]
            interleaved: ArgV = [""] * (2 * len(names))
            interleaved[0::2] = names
            interleaved[1::2] = values
            return head + interleaved
        columns: Iterable[str] = rule.fields if rule.fields is not None else row.keys()
        nulls: ArgV = []
        keep: ArgV = []
        for column in columns:
            value = row.get(column)
            if value is None:
                nulls.append(column)
            elif column in event.unchanged:
                keep.append(column)
            else:
                pairs.append(column)
                pairs.append(hash_value(value))
        return [
            ROW_HASH_PARTIAL,
            event.position,
            ttl,
            str(len(pairs) // 2),
            str(len(nulls)),
            str(len(keep)),
            *pairs,
            *nulls,
            *keep,
        ]

    def _json_args(self, rule: Rule, event: ChangeEvent, row: dict[str, Any]) -> ArgV:
        if rule.fields is not None:
            row = {c: row.get(c) for c in rule.fields}
        ttl = _ttl_ms(rule)
        unchanged = event.unchanged.intersection(row)
        if not unchanged:
            return [ROW_JSON, event.position, ttl, orjson.dumps(row)]
        members: ArgV = []
        for column, value in row.items():
            members.append(orjson.dumps(column))
            if column in unchanged:
                members += ["k", ""]
            else:
                members += ["v", orjson.dumps(value)]
        return [ROW_JSON_PARTIAL, event.position, ttl, str(len(row)), *members]
