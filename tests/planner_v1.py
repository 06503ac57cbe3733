"""Library 1.1's planner (``streamsync/mapping.py`` of release 1.1.0, commit c20a4eb), kept so
that tests can write the bookkeeping 1.x workers left, through the 1.1 library
(``tests/fixtures/library-1.1.lua``), and migrate it. Change event + mapping rules -> the rows of
a ``streamsync_batch`` call; positions are 1.x's (``v1_position``).

Kept as 1.1 had it but for its imports (the 2.0 package's, which kept these names) and
``v1_position``, ``batch_command`` and ``apply`` at the end.
"""

from __future__ import annotations

import binascii
import functools
import itertools
import math
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from streamsync.config import (
    JSON_VALUE,
    SINGLE_VALUE_TYPES,
    ListDelete,
    ListUpdate,
    Mode,
    Rule,
    TargetType,
)
from streamsync.errors import (
    ConfigError,
    FilterError,
    NullColumnError,
    PoisonEntryError,
    TemplateError,
)
from streamsync.events import ChangeEvent
from streamsync.templates import render_value

#: The library's batch entry point (library 1.1): rows of every kind, each with its rule's index.
FN_BATCH = "streamsync_batch"

# Row kinds (lua/streamsync.lua): full and partial hash and JSON writes (J also writes a string
# rule's value), delete, invalidate, set and sorted-set members, list entries, stream events,
# removal of a row's placement, and a single-value write whose key may move.
ROW_HASH, ROW_HASH_PARTIAL, ROW_JSON, ROW_JSON_PARTIAL = "H", "h", "J", "j"
ROW_DELETE, ROW_INVALIDATE = "D", "I"
ROW_SET, ROW_ZSET, ROW_LIST, ROW_STREAM, ROW_REMOVE, ROW_MOVING = "T", "Z", "L", "X", "R", "M"

CLUSTER_SLOTS = 16384
#: Field-name sets remembered by a planner before it starts over.
MAX_SHAPES = 4096

#: The index member of a single-value row that stands for its target key (not sent twice).
INDEX_TARGET = "."

ArgV = list[str | bytes]


@dataclass(slots=True)
class RowWrite:
    """One row of a batch call: its KEYS (its rule's index first, then the kind's keys) and its
    ARGV items (kind, index member, then the kind's items)."""

    keys: list[str]
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


def glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def template_hash_tag(literals: tuple[str, ...], source: str) -> str | None:
    """The hash tag every key rendered from a template carries, or None when the slot
    depends on column values. A template naming no column is its own key."""
    if len(literals) == 1:
        key = literals[0]
        start = key.find("{")
        if start >= 0:
            end = key.find("}", start + 1)
            if end > start + 1:
                return key[start + 1 : end]
        return key
    head = literals[0]
    start = head.find("{")
    if start >= 0:
        end = head.find("}", start + 1)
        if end > start + 1:
            return head[start + 1 : end]
    return None


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


def row_identity(key: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    """The source row's identity within its table: its primary-key value, or for a composite
    key the JSON array of its values (in key order)."""
    if len(key) == 1:
        (column,) = key
        value = row.get(column, key[column])
        return value if type(value) is str else render_value(value)
    return orjson.dumps([row.get(c, v) for c, v in key.items()]).decode()


def _sort_token(key: Mapping[str, Any], row: Mapping[str, Any], identity: str) -> str:
    # entries sharing a position (one snapshot) sort by row: integers by value, not as text
    if len(key) == 1:
        (column,) = key
        value = row.get(column)
        if type(value) is int and value >= 0:
            return f"{value:020d}"
    return identity


def _score(rule: Rule, row: Mapping[str, Any]) -> str | None:
    assert rule.score is not None
    if rule.score not in row:
        raise PoisonEntryError(f"zset score column {rule.score!r} is absent from the row")
    value = row[rule.score]
    if value is None:
        return None
    if type(value) is int:
        return str(value)
    if type(value) is float:
        number = value
    elif type(value) is str:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
    else:
        number = math.nan
    if math.isnan(number):
        raise PoisonEntryError(
            f"zset score column {rule.score!r} is not numeric: {_excerpt(value)}"
        )
    return repr(number) if type(value) is float else value


def _excerpt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _ttl_ms(rule: Rule) -> str:
    return str(rule.ttl_s * 1000) if rule.ttl_s else "0"


class Planner:
    """Turns a change event into the rows to apply, following the rules for its table."""

    def __init__(
        self,
        rules_by_table: Mapping[str, tuple[Rule, ...]],
        position_prefix: str,
        state_prefix: str = "streamsync:",
        *,
        cluster: bool = False,
    ) -> None:
        self.rules_by_table = rules_by_table
        self.position_prefix = position_prefix
        self.state_prefix = state_prefix
        #: In a Redis Cluster every function call must keep to one hash slot: indexes are kept
        #: per slot, and a rule with placement records pins its keys to one slot.
        self.cluster = cluster
        self._pins: dict[str, str | None] = {}
        if cluster:
            for rules in rules_by_table.values():
                for rule in rules:
                    self._check_pinned(rule)
        self._shapes: dict[tuple[str, ...], str] = {}
        self._plans_by_table: dict[str, list[tuple[Rule, str | None]]] = {}
        # per table: its primary-key columns, and whether every rule is keyed by them
        self._all_fixed_by_table: dict[str, tuple[set[str], bool]] = {}

    # -- the keys of streamsync's own records --------------------------------------------

    def key_index(self, rule: Rule, target: str | None = None) -> str:
        """The set of keys a rule keyed by primary key has written (for TRUNCATE and resync);
        in a cluster, one set per hash slot: the one of ``target``'s slot."""
        if self.cluster:
            if target is None:
                raise ValueError("a cluster's key index is per slot: name the target")
            return self.key_index_shard(rule, key_slot(target.encode()))
        return f"{self.state_prefix}idx:{rule.state_name}:keys"

    def key_index_shard(self, rule: Rule, slot: int) -> str:
        """A cluster's key index for the keys of one hash slot."""
        return f"{self.state_prefix}idx:{rule.state_name}:keys:{{{_slot_tags()[slot]}}}"

    def index_keys(self, rule: Rule) -> list[str]:
        """Every index key of ``rule`` (what a sweep walks)."""
        if not self.cluster:
            return [self.key_index(rule), self.row_index(rule)]
        shards = [self.key_index_shard(rule, slot) for slot in range(CLUSTER_SLOTS)]
        pin = self._pin(rule)
        return shards + ([self.row_index(rule)] if pin is not None else [])

    def row_index(self, rule: Rule) -> str:
        """The set of rows a rule with placement records has placed."""
        return f"{self.state_prefix}idx:{self._tag(rule)}{rule.state_name}:rows"

    def placement_key(self, rule: Rule, identity: str) -> str:
        """The record of where ``rule`` placed the source row ``identity``."""
        return f"{self.state_prefix}pl:{self._tag(rule)}{rule.state_name}:{identity}"

    def _tag(self, rule: Rule) -> str:
        # in a cluster, the rule's records share the hash slot its keys are pinned to
        if not self.cluster:
            return ""
        return f"{{{self._pin(rule)}}}:"

    def _pin(self, rule: Rule) -> str | None:
        """The hash tag every key of ``rule`` carries, if its template fixes one."""
        if rule.state_name not in self._pins:
            self._pins[rule.state_name] = template_hash_tag(rule.template.literals, rule.key)
        return self._pins[rule.state_name]

    def _check_pinned(self, rule: Rule) -> None:
        collection = rule.mode is Mode.WRITE_THROUGH and rule.type not in SINGLE_VALUE_TYPES
        if collection and self._pin(rule) is None:
            raise ConfigError(
                f"rule {rule.state_name} ({rule.key!r}): in a Redis Cluster a {rule.type} rule's"
                " keys and its placement records must share one hash slot: give the key a"
                " fixed hash tag, e.g. '{{plans}}:plan:{plan}:users', or a fixed name"
            )

    def order_key(self, list_key: str) -> str:
        """The order record of a list rule's list (same hash slot as the list)."""
        return position_key(f"{self.state_prefix}ord:", list_key)

    def reserve_key(self, list_key: str) -> str:
        """The entries a capped list trimmed, kept to refill it (same hash slot as the list)."""
        return position_key(f"{self.state_prefix}rsv:", list_key)

    # -- planning ------------------------------------------------------------------------

    def plan(self, event: ChangeEvent, epoch: str = "") -> list[RowWrite]:
        """The rows for ``event`` (a row change, not a TRUNCATE); PoisonEntryError when it
        cannot be applied. ``epoch`` prefixes the position (see streamsync.resync)."""
        rules = self.rules_by_table.get(event.table)
        if not rules:
            raise PoisonEntryError(f"no rule maps table {event.table!r}")
        position = epoch + event.position
        row = event.row()
        identity = None
        known = self._all_fixed_by_table.get(event.table)
        if known is not None and known[1] and event.op != "d":
            # every rule keyed by primary key (checked on this table's first change and on its
            # deletes, which carry the key anyway): the key is not even decoded
            key = event.key
        else:
            key = event.primary_key()
            if key is not None:
                if known is None or known[0] != key.keys():
                    known = (set(key), self._all_fixed(rules, key))
                    self._all_fixed_by_table[event.table] = known
                if not known[1]:
                    identity = row_identity(key, row)
        out = []
        for rule, fast_index in self._rule_plans(event.table, rules):
            try:
                if fast_index is not None and event.op != "d" and (key is None or identity is None):
                    # the common case, kept lean: a hash keyed by primary key, no filter
                    target = rule.template.render(row)
                    args = self._hash_args(rule, event, row, position)
                    args.insert(1, INDEX_TARGET)
                    index = self.key_index(rule, target) if self.cluster else fast_index
                    keys = [index, target, position_key(self.position_prefix, target)]
                    out.append(RowWrite(keys, args))
                    continue
                out.append(
                    self._plan_rule(
                        rule, event=event, row=row, position=position, key=key, identity=identity
                    )
                )
            except (TemplateError, FilterError) as exc:
                raise PoisonEntryError(f"rule {rule.state_name}: {exc}") from None
        return out

    def _rule_plans(self, table: str, rules: tuple[Rule, ...]) -> list[tuple[Rule, str | None]]:
        """The table's rules, each with its key index when it takes the lean path (a
        write-through hash without filter: keyed by primary key whenever every rule is)."""
        plans = self._plans_by_table.get(table)
        if plans is None:
            plans = [
                (
                    rule,
                    f"{self.state_prefix}idx:{rule.state_name}:keys"
                    if rule.mode is Mode.WRITE_THROUGH
                    and rule.type is TargetType.HASH
                    and rule.filter is None
                    else None,
                )
                for rule in rules
            ]
            self._plans_by_table[table] = plans
        return plans

    def _plan_rule(
        self,
        rule: Rule,
        *,
        event: ChangeEvent,
        row: dict[str, Any],
        position: str,
        key: dict[str, Any] | None,
        identity: str | None,
    ) -> RowWrite:
        kind = rule.type
        if rule.mode is Mode.INVALIDATE:
            target = rule.template.render(row)
            return RowWrite(
                [target, target, position_key(self.position_prefix, target)],
                [ROW_INVALIDATE, "", position],
            )
        assert kind is not None
        present = event.op != "d" and self._matches(rule, event, row)
        if kind in SINGLE_VALUE_TYPES and (key is None or self._fixed(rule, key)):
            # the key names the row for good: the target's own position record is the row's
            target = rule.template.render(row)
            keys = [
                self.key_index(rule, target),
                target,
                position_key(self.position_prefix, target),
            ]
            if not present:
                return RowWrite(keys, [ROW_DELETE, INDEX_TARGET, position])
            args = self._single_args(rule, event, row, position)
            args.insert(1, INDEX_TARGET)
            return RowWrite(keys, args)
        if identity is None:
            raise PoisonEntryError(
                f"rule {rule.state_name}: a {kind.value} rule needs the row's primary key, and"
                f" {event.table} has none (set REPLICA IDENTITY and Debezium's"
                " message.key.columns)"
            )
        p_key = self.placement_key(rule, identity)
        if kind is TargetType.STREAM:
            return self._stream_row(
                rule, event=event, row=row, position=position, p_key=p_key, present=present
            )
        index = self.row_index(rule)
        if not present:
            keep = rule.on_delete is ListDelete.IGNORE
            return RowWrite([index, p_key], [ROW_REMOVE, identity, position, "0" if keep else "1"])
        self._check_available(rule, event)
        try:
            return self._place(
                rule,
                event=event,
                row=row,
                position=position,
                key=key,
                identity=identity,
                index=index,
                p_key=p_key,
            )
        except NullColumnError:
            # a null key, member or value column: the row is in no structure of this rule
            keep = rule.on_delete is ListDelete.IGNORE
            return RowWrite([index, p_key], [ROW_REMOVE, identity, position, "0" if keep else "1"])

    def _place(
        self,
        rule: Rule,
        *,
        event: ChangeEvent,
        row: dict[str, Any],
        position: str,
        key: dict[str, Any] | None,
        identity: str,
        index: str,
        p_key: str,
    ) -> RowWrite:
        kind = rule.type
        target = rule.template.render(row)
        ttl = _ttl_ms(rule)
        if kind in SINGLE_VALUE_TYPES:
            inner = self._single_args(rule, event, row, position)
            if inner[0] == ROW_DELETE:
                return RowWrite([index, p_key], [ROW_REMOVE, identity, position, "1"])
            return RowWrite(
                [index, p_key, target, position_key(self.position_prefix, target)],
                [ROW_MOVING, identity, position, *inner],
            )
        if kind is TargetType.SET:
            assert rule.member_template is not None
            member = rule.member_template.render(row)
            return RowWrite([index, p_key, target], [ROW_SET, identity, position, ttl, member])
        if kind is TargetType.ZSET:
            assert rule.member_template is not None
            score = _score(rule, row)
            if score is None:
                # a null score ranks nowhere: the row leaves the sorted set
                return RowWrite([index, p_key], [ROW_REMOVE, identity, position, "1"])
            member = rule.member_template.render(row)
            return RowWrite(
                [index, p_key, target], [ROW_ZSET, identity, position, ttl, member, score]
            )
        assert kind is TargetType.LIST and key is not None
        mode = "r" if rule.on_update is ListUpdate.REPLACE else "p"
        entry = f"{position}|{_sort_token(key, row, identity)}"
        return RowWrite(
            [index, p_key, target, self.order_key(target), self.reserve_key(target)],
            [
                ROW_LIST,
                identity,
                position,
                ttl,
                str(rule.max_len or 0),
                mode,
                entry,
                self._value(rule, row),
            ],
        )

    def _fixed(self, rule: Rule, key: dict[str, Any]) -> bool:
        """True when the rule's key names the row for good: it uses primary-key columns only."""
        columns = rule.template.columns
        if len(columns) == 1:
            return columns[0] in key
        return all(c in key for c in columns)

    def _all_fixed(self, rules: tuple[Rule, ...], key: dict[str, Any]) -> bool:
        return all(
            r.mode is Mode.INVALIDATE or (r.type in SINGLE_VALUE_TYPES and self._fixed(r, key))
            for r in rules
        )

    def _matches(self, rule: Rule, event: ChangeEvent, row: dict[str, Any]) -> bool:
        flt = rule.filter
        if flt is None:
            return True
        if event.unchanged and not event.unchanged.isdisjoint(flt.columns):
            raise PoisonEntryError(
                f"rule {rule.state_name}: filter column(s)"
                f" {sorted(event.unchanged & flt.columns)} hold unchanged TOAST values, not sent"
                " by PostgreSQL: set REPLICA IDENTITY FULL on the table"
            )
        return flt.matches(row)

    def _check_available(self, rule: Rule, event: ChangeEvent) -> None:
        if not event.unchanged:
            return
        used = set(rule.template.columns)
        for template in (rule.member_template, rule.value_template):
            if template is not None:
                used.update(template.columns)
        if rule.score is not None:
            used.add(rule.score)
        if rule.value == JSON_VALUE and rule.type is TargetType.LIST:
            used.update(rule.fields or event.unchanged)
        missing = sorted(used & event.unchanged)
        if missing:
            raise PoisonEntryError(
                f"rule {rule.state_name}: column(s) {missing} hold unchanged TOAST values, not"
                " sent by PostgreSQL: set REPLICA IDENTITY FULL on the table"
            )

    def _value(self, rule: Rule, row: dict[str, Any]) -> str | bytes:
        template = rule.value_template
        if template is not None:
            return template.render(row)
        return orjson.dumps(self._shaped(rule, row))

    @staticmethod
    def _shaped(rule: Rule, row: dict[str, Any]) -> dict[str, Any]:
        """The row's selected columns under their Redis names."""
        if rule.fields is not None:
            row = {c: row.get(c) for c in rule.fields}
        if rule.rename:
            rename = rule.rename
            row = {rename.get(c, c): v for c, v in row.items()}
        return row

    def _single_args(
        self, rule: Rule, event: ChangeEvent, row: dict[str, Any], position: str
    ) -> ArgV:
        """The kind and items of a hash, JSON or string write (without index member)."""
        if rule.type is TargetType.HASH:
            return self._hash_args(rule, event, row, position)
        if rule.type is TargetType.STRING and rule.value_template is not None:
            template = rule.value_template
            if event.unchanged and not event.unchanged.isdisjoint(template.columns):
                # the value cannot be rendered: drop the cached one, the next change fills it
                return [ROW_DELETE, position]
            try:
                value = template.render(row)
            except NullColumnError:
                # a null value: no key, as for a null hash row's missing fields
                return [ROW_DELETE, position]
            return [ROW_JSON, position, _ttl_ms(rule), value]
        return self._json_args(rule, event, row, position)

    def _stream_row(
        self,
        rule: Rule,
        *,
        event: ChangeEvent,
        row: dict[str, Any],
        position: str,
        p_key: str,
        present: bool,
    ) -> RowWrite:
        target = rule.template.render(row)
        pairs: ArgV = ["op", event.op, "table", event.table, "position", position]
        if event.op == "d":
            shaped = {rule.rename.get(c, c): v for c, v in (event.primary_key() or {}).items()}
        elif present:
            self._check_available(rule, event)
            shaped = self._shaped(rule, row)
        else:
            # a row that does not match the filter is not published
            return RowWrite([p_key, p_key], [ROW_REMOVE, "", position, "0"])
        for name, value in shaped.items():
            if value is not None and name not in event.unchanged:
                pairs += (name, hash_value(value))
        return RowWrite(
            [p_key, p_key, target],
            [ROW_STREAM, "", position, str(rule.max_len or 0), str(len(pairs) // 2), *pairs],
        )

    def truncate_event(self, rule: Rule, table: str, position: str) -> RowWrite:
        """The event a stream rule publishes for a TRUNCATE of its table."""
        p_key = self.placement_key(rule, "#truncate")
        target = rule.template.render({})
        pairs: ArgV = ["op", "t", "table", table, "position", position]
        return RowWrite(
            [p_key, p_key, target],
            [ROW_STREAM, "", position, str(rule.max_len or 0), str(len(pairs) // 2), *pairs],
        )

    def removal(self, rule: Rule, index: str, member: str, position: str) -> RowWrite:
        """The row removing what an index member stands for, unless a change newer than
        ``position`` wrote it (TRUNCATE, resync)."""
        if ":keys" in index[len(self.state_prefix) :]:
            return RowWrite(
                [index, member, position_key(self.position_prefix, member)],
                [ROW_DELETE, member, position],
            )
        return RowWrite(
            [index, self.placement_key(rule, member)], [ROW_REMOVE, member, position, "1"]
        )

    def _shape(self, names: tuple[str, ...]) -> str:
        """A short token naming a set of hash fields (see the library's position records)."""
        shape = self._shapes.get(names)
        if shape is None:
            if len(self._shapes) >= MAX_SHAPES:
                self._shapes.clear()
            joined = "\0".join(names).encode()
            shape = self._shapes[names] = f"{binascii.crc32(joined):08x}"
        return shape

    def _hash_args(
        self, rule: Rule, event: ChangeEvent, row: dict[str, Any], position: str
    ) -> ArgV:
        ttl = _ttl_ms(rule)
        rename = rule.rename
        if not event.unchanged:
            if rule.fields is None and not rename and None not in row.values():
                names: tuple[str, ...] = tuple(row)
                values = [v if type(v) is str else hash_value(v) for v in row.values()]
            else:
                selected = row if rule.fields is None else rule.fields
                present = [(c, v) for c in selected if (v := row.get(c)) is not None]
                names = tuple([rename.get(c, c) for c, _ in present])
                values = [v if type(v) is str else hash_value(v) for _, v in present]
            head: ArgV = [ROW_HASH, position, ttl, self._shape(names), str(len(names))]
            interleaved: ArgV = [""] * (2 * len(names))
            interleaved[0::2] = names
            interleaved[1::2] = values
            return head + interleaved
        columns: Iterable[str] = rule.fields if rule.fields is not None else row.keys()
        pairs: ArgV = []
        nulls: ArgV = []
        keep: ArgV = []
        for column in columns:
            value = row.get(column)
            name = rename.get(column, column)
            if value is None:
                nulls.append(name)
            elif column in event.unchanged:
                keep.append(name)
            else:
                pairs.append(name)
                pairs.append(hash_value(value))
        return [
            ROW_HASH_PARTIAL,
            position,
            ttl,
            str(len(pairs) // 2),
            str(len(nulls)),
            str(len(keep)),
            *pairs,
            *nulls,
            *keep,
        ]

    def _json_args(
        self, rule: Rule, event: ChangeEvent, row: dict[str, Any], position: str
    ) -> ArgV:
        ttl = _ttl_ms(rule)
        unchanged = event.unchanged.intersection(rule.fields or row)
        doc = self._shaped(rule, row)
        if not unchanged:
            return [ROW_JSON, position, ttl, orjson.dumps(doc)]
        renamed = {rule.rename.get(c, c) for c in unchanged}
        members: ArgV = []
        for name, value in doc.items():
            members.append(orjson.dumps(name))
            if name in renamed:
                members += ["k", ""]
            else:
                members += ["v", orjson.dumps(value)]
        return [ROW_JSON_PARTIAL, position, ttl, str(len(doc)), *members]


def v1_position(lsn: int, op: str, epoch: int = 0) -> str:
    """A 1.x position: the epoch's prefix, the LSN as 20 digits, the rank (removals first)."""
    prefix = f"e{epoch:06d}" if epoch else ""
    return f"{prefix}{lsn:020d}{'0' if op in ('d', 't') else '1'}"


def batch_command(rows: list[RowWrite], tombstone_ms: int) -> tuple[Any, ...]:
    """The ``streamsync_batch`` call applying ``rows``, as the 1.1 worker built it."""
    keys = [k for row in rows for k in row.keys]
    args = [a for row in rows for a in row.args]
    return ("FCALL", FN_BATCH, len(keys), *keys, str(tombstone_ms), *args)
