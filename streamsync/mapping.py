"""Change event + mapping rules -> the rows handed to the Functions library.

Pure: no I/O. Each `RowWrite` is one row of a ``streamsync_changes`` call: its keys (the target,
the bucket holding the row's record, ...) and its ARGV segment (layouts in lua/streamsync.lua).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from streamsync.buckets import MOVING_KEY, MOVING_ROW, Table, Tables, as_bytes, record_field
from streamsync.config import (
    JSON_VALUE,
    SINGLE_VALUE_TYPES,
    ListDelete,
    ListUpdate,
    Mode,
    Rule,
    Settings,
    TargetType,
    merge_owner,
    merged_names,
)
from streamsync.errors import (
    ColumnValueError,
    ConfigError,
    FilterError,
    NullColumnError,
    PoisonEntryError,
    TemplateError,
    excerpt,
)
from streamsync.events import ChangeEvent
from streamsync.functions import ArgV, RowWrite
from streamsync.keys import StateKeys, rule_pin
from streamsync.templates import render_value

# Row kinds (lua/streamsync.lua): full and partial hash and JSON writes (J also writes a string
# rule's value), delete, invalidate, set and sorted-set members, list entries, stream events,
# removal of a row's placement, and a single-value write whose key may move.
ROW_HASH, ROW_HASH_PARTIAL, ROW_JSON, ROW_JSON_PARTIAL = "H", "h", "J", "j"
ROW_REDISJSON, ROW_REDISJSON_PARTIAL = "N", "n"
# parts of a key several rules write (merge): written and removed, in a hash or a JSON document
ROW_HASH_PART, ROW_HASH_PART_REMOVED, ROW_JSON_PART, ROW_JSON_PART_REMOVED = "p", "q", "P", "Q"
# the owning rule's part removed: every field or member but the merged ones
ROW_HASH_OWNER_REMOVED, ROW_JSON_OWNER_REMOVED = "k", "K"
# a child placed in its parent's JSON document (nest)
ROW_NEST = "E"
# a JSON part's document: text, or RedisJSON
JSON_PART_TEXT, JSON_PART_REDISJSON = "t", "r"
ROW_DELETE, ROW_INVALIDATE = "D", "I"
ROW_SET, ROW_ZSET, ROW_LIST, ROW_STREAM, ROW_REMOVE, ROW_MOVING = "T", "Z", "L", "X", "R", "M"


def hash_value(value: Any) -> str | bytes:
    """A column value as a hash or stream field value: a scalar as ``render_value`` spells it
    everywhere, an array or object as JSON text."""
    kind = type(value)
    if kind is list or kind is dict:
        return orjson.dumps(value)
    return render_value(value)


def row_identity(key: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    """The source row's identity within its table: its primary-key value, or for a composite
    key the JSON array of its values (in key order)."""
    if len(key) == 1:
        (column,) = key
        value = row.get(column, key[column])
        if type(value) is str:
            return value
        try:
            return render_value(value)
        except TemplateError:
            raise PoisonEntryError(
                f"primary-key column {column!r} holds {excerpt(value)}: not a row identity"
            ) from None
    return orjson.dumps([row.get(c, v) for c, v in key.items()]).decode()


#: How strtod(3) reads a number in the C locale: what Redis accepts as a sorted-set score
#: (util.c string2d) when it also spans the whole text and does not start with a space. A
#: ``nan`` also parses, but Redis refuses it, so it is left out.
_STRTOD = re.compile(
    r"""[+-]?(?:
        (?P<inf>inf(?:inity)?)
      | 0x(?P<hex>[0-9a-f]+\.?[0-9a-f]*|\.[0-9a-f]+)(?:p[+-]?[0-9]+)?
      | (?P<dec>[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?
    )""",
    re.ASCII | re.IGNORECASE | re.VERBOSE,
)
#: Integers this large round to an infinity as a double: Redis refuses them as scores.
_DOUBLE_OVERFLOW = 2**1024 - 2**970


def score_problem(text: str) -> str | None:
    """Why Redis would refuse ``text`` as a sorted-set score (ZADD's ``value is not a valid
    float``), read after "is" (``"not numeric"``), or None when Redis accepts it: strtod(3) must
    read the whole text, which must not start with a space, and the number must be neither NaN
    nor overflow to an infinity nor underflow to zero (an infinity spelled ``inf`` is fine)."""
    match = _STRTOD.fullmatch(text)
    if match is None:
        if not text:
            return "empty"
        if text[0].isspace() or text[-1].isspace():
            return "padded with whitespace"
        if "nan" in text.lower():
            return "NaN"
        return "not numeric"
    if match["inf"]:
        return None
    digits = match["hex"] or match["dec"]
    nonzero = digits.strip("0.") != ""
    try:
        number = float.fromhex(text) if match["hex"] else float(text)
    except OverflowError:
        number = math.inf
    if math.isinf(number):
        return "beyond the range of a double"
    if number == 0.0 and nonzero:
        return "too small for a double (it would read as zero)"
    return None


def _score(rule: Rule, row: Mapping[str, Any]) -> str | None:
    column = rule.score
    assert column is not None
    if column not in row:
        raise ColumnValueError(f"zset score column {column!r} is absent from the row")
    value = row[column]
    if value is None:
        return None
    kind = type(value)
    if kind is int:
        if -_DOUBLE_OVERFLOW < value < _DOUBLE_OVERFLOW:
            return str(value)
        problem: str | None = "beyond the range of a double"
    elif kind is float:
        if math.isfinite(value):
            return render_value(value)
        problem = "not finite"
    elif kind is str:
        problem = score_problem(value)
        if problem is None:
            return value  # type: ignore[no-any-return]
    else:
        problem = "not numeric"
    raise ColumnValueError(
        f"zset score column {column!r} is {problem}: {excerpt(value)} (Redis refuses it as a"
        " sorted-set score)"
    )


def _unwritable(row: Mapping[str, Any], exc: orjson.JSONEncodeError) -> str:
    """What a JSON encoding failure of a value of ``row`` means: which column, and why (orjson
    writes at most 254 levels of nesting, though it reads 1,024)."""
    for column, value in row.items():
        try:
            orjson.dumps(value)
        except orjson.JSONEncodeError as column_exc:
            return f"column {column!r} cannot be written as JSON: {column_exc}"
    return f"a value cannot be written as JSON: {exc}"


def _check_pinned(rule: Rule) -> None:
    if rule.gathers_rows and rule_pin(rule) is None:
        raise ConfigError(
            f"rule {rule.state_name} ({rule.key!r}): in a Redis Cluster a {rule.type} rule's"
            " keys and its placement records must share one hash slot: give the key a"
            " fixed hash tag, e.g. '{{plans}}:plan:{plan}:users', or a fixed name"
        )


#: A rule, whether it takes the lean path, and the length of its keys' literal prefix (a record
#: is named by its key without it: ``user:{id}`` -> ``42``).
_RulePlan = tuple[Rule, bool, int]


def _prefix_length(rule: Rule) -> int:
    return len(rule.template.literals[0])


class Planner:
    """Turns a change event into the rows to apply, following the rules for its table."""

    def __init__(
        self,
        rules_by_table: Mapping[str, tuple[Rule, ...]],
        keys: StateKeys,
        *,
        redisjson: bool = False,
    ) -> None:
        self.rules_by_table = rules_by_table
        self.keys = keys
        #: Whether the target loads the ReJSON module (``json`` rules with ``encoding: auto``
        #: then write RedisJSON documents).
        self.redisjson = redisjson
        every = [rule for group in rules_by_table.values() for rule in group]
        #: Per rule others merge into (its state name), the names they own.
        self._merged = merged_names(every)
        #: Per merging rule (its state name), the rule owning its keys.
        self._owners = {
            rule.state_name: merge_owner(every, rule) for rule in every if rule.writes_a_part
        }
        if keys.cluster:
            for rules in rules_by_table.values():
                for rule in rules:
                    _check_pinned(rule)
        #: Where each record lives, as last seen.
        self.tables = Tables(keys)
        self._plans_by_table: dict[str, list[_RulePlan]] = {}
        # per table: its primary-key columns, and whether every rule is keyed by them
        self._all_fixed_by_table: dict[str, tuple[set[str], bool]] = {}

    @classmethod
    def from_settings(
        cls, settings: Settings, *, cluster: bool = False, redisjson: bool = False
    ) -> Planner:
        """A planner for the rules of ``settings``, its records under the configured prefixes;
        ``cluster``: for a Redis Cluster (one hash slot per function call); ``redisjson``:
        the target loads the ReJSON module."""
        return cls(
            settings.rules_by_table,
            StateKeys.from_settings(settings.worker, cluster=cluster),
            redisjson=redisjson,
        )

    @property
    def cluster(self) -> bool:
        """Whether the rows are planned for a Redis Cluster."""
        return self.keys.cluster

    # -- planning ------------------------------------------------------------------------

    def plan(self, event: ChangeEvent, epoch: str = "") -> list[RowWrite]:
        """The rows for ``event`` (a row change, not a TRUNCATE); PoisonEntryError when it
        cannot be applied. ``epoch`` prefixes the position (see streamsync.resync)."""
        rules = self.rules_by_table.get(event.table)
        if not rules:
            raise PoisonEntryError(f"no rule maps table {excerpt(event.table)}")
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
                    try:
                        identity = row_identity(key, row)
                    except orjson.JSONEncodeError as exc:
                        raise PoisonEntryError(f"primary key: {_unwritable(key, exc)}") from None
        out = []
        for rule, lean, prefix in self._rule_plans(event.table, rules):
            try:
                if lean and event.op != "d" and (key is None or identity is None):
                    # the common case, kept lean: a hash keyed by primary key, no filter
                    target = rule.template.render(row)
                    table = self.tables.table(rule, target)
                    bucket, field = table.locate(target[prefix:])
                    body = self._hash_body(rule, event, row)
                    body[1:1] = (field, position)
                    out.append(RowWrite([target, bucket], body, table, table.buckets))
                    continue
                out.append(
                    self._plan_rule(
                        rule, event=event, row=row, position=position, key=key, identity=identity
                    )
                )
            except (TemplateError, FilterError, ColumnValueError) as exc:
                raise PoisonEntryError(f"rule {rule.state_name}: {exc}") from None
            except orjson.JSONEncodeError as exc:
                raise PoisonEntryError(f"rule {rule.state_name}: {_unwritable(row, exc)}") from None
        return out

    def _rule_plans(self, table: str, rules: tuple[Rule, ...]) -> list[_RulePlan]:
        """The table's rules, each with whether it takes the lean path (a write-through hash
        without filter: keyed by primary key whenever every rule is) and its keys' literal
        prefix length."""
        plans = self._plans_by_table.get(table)
        if plans is None:
            plans = []
            for rule in rules:
                lean = (
                    rule.mode is Mode.WRITE_THROUGH
                    and rule.type is TargetType.HASH
                    and rule.filter is None
                    and not self._in_parts(rule)
                )
                plans.append((rule, lean, _prefix_length(rule)))
            self._plans_by_table[table] = plans
        return plans

    def single(self, rule: Rule, target: str, position: str, body: ArgV) -> RowWrite:
        """The row writing (or removing) ``target``, a key naming one row of ``rule`` for good,
        with ``body`` (a kind and its items); its record lives in the rule's buckets."""
        table = self.tables.table(rule, target)
        bucket, field = table.locate(target[_prefix_length(rule) :])
        return RowWrite(
            [target, bucket], [body[0], field, position, *body[1:]], table, table.buckets
        )

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
            return self.single(rule, rule.template.render(row), position, self._invalidation())
        assert kind is not None
        present = event.op != "d" and self._matches(rule, event, row)
        if rule.keyed_per_row and (key is None or self._fixed(rule, key)):
            # the key names the row for good: its record is the row's
            target = rule.template.render(row)
            if not present:
                return self.single(rule, target, position, self._delete_body(rule))
            return self.single(rule, target, position, self._single_body(rule, event, row))
        if rule.keyed_per_row and self._in_parts(rule):
            raise PoisonEntryError(
                f"rule {rule.state_name} ({rule.key!r}): a key several rules write (merge) must"
                f" be over {event.table}'s primary key, so it never moves"
            )
        if identity is None:
            raise PoisonEntryError(
                f"rule {rule.state_name}: a {kind.value} rule needs the row's primary key, and"
                f" {event.table} has none (set REPLICA IDENTITY and Debezium's"
                " message.key.columns)"
            )
        if kind is TargetType.STREAM:
            return self._stream_row(
                rule, event=event, row=row, position=position, identity=identity, present=present
            )
        moving = rule.keyed_per_row
        if moving and self.keys.cluster and rule_pin(rule) is None:
            raise PoisonEntryError(
                f"rule {rule.state_name} ({rule.key!r}): its key is over non-key columns of"
                f" {event.table}, so it moves when they change; in a Redis Cluster the keys it"
                " leaves and takes must share one hash slot: give the key a fixed hash tag"
            )
        table = self.tables.moving(rule) if moving else self.tables.table(rule)
        field = MOVING_ROW + identity if moving else identity
        keep = rule.on_delete is ListDelete.IGNORE
        if not present:
            return self.removal(table, record_field(field), position, keep=keep)
        self._check_available(rule, event)
        try:
            return self._place(rule, table, field, event=event, row=row, position=position)
        except NullColumnError:
            # a null key, member or value column: the row is in no structure of this rule
            return self.removal(table, record_field(field), position, keep=keep)

    def _place(
        self,
        rule: Rule,
        table: Table,
        name: str,
        *,
        event: ChangeEvent,
        row: dict[str, Any],
        position: str,
    ) -> RowWrite:
        kind = rule.type
        target = rule.template.render(row)
        bucket, field = table.locate(name)
        if rule.nest is not None:
            assert rule.nest_member_template is not None
            member = rule.nest_member_template.render(row)
            return RowWrite(
                [target, bucket],
                [ROW_NEST, field, position, member, *self._child_body(rule, event, row)],
                table,
                table.buckets,
            )
        if kind in SINGLE_VALUE_TYPES:
            body = self._single_body(rule, event, row)
            if body[0] == ROW_DELETE:
                return self.removal(table, field, position)
            before, after = table.shape[0], table.shape[1]
            key_bucket, key_field = table.locate(
                MOVING_KEY + target[len(before) : len(target) - len(after)]
            )
            return RowWrite(
                [target, bucket, key_bucket],
                [ROW_MOVING, field, position, key_field, *body],
                table,
                table.buckets,
                also=(2, 3),
            )
        if kind is TargetType.SET:
            assert rule.member_template is not None
            member = rule.member_template.render(row)
            return RowWrite(
                [target, bucket],
                [ROW_SET, field, position, member],
                table,
                table.buckets,
            )
        if kind is TargetType.ZSET:
            assert rule.member_template is not None
            score = _score(rule, row)
            if score is None:
                # a null score ranks nowhere: the row leaves the sorted set
                return self.removal(table, field, position)
            member = rule.member_template.render(row)
            return RowWrite(
                [target, bucket],
                [ROW_ZSET, field, position, member, score],
                table,
                table.buckets,
            )
        assert kind is TargetType.LIST
        mode = "r" if rule.on_update is ListUpdate.REPLACE else "p"
        return RowWrite(
            [target, bucket, self.keys.order(target), self.keys.reserve(target)],
            [ROW_LIST, field, position, str(rule.max_len or 0), mode, self._value(rule, row)],
            table,
            table.buckets,
        )

    def _fixed(self, rule: Rule, key: dict[str, Any]) -> bool:
        """True when the rule's key names the row for good: it uses primary-key columns only."""
        columns = rule.template.columns
        if len(columns) == 1:
            return columns[0] in key
        return all(c in key for c in columns)

    def _all_fixed(self, rules: tuple[Rule, ...], key: dict[str, Any]) -> bool:
        return all(
            r.mode is Mode.INVALIDATE or (r.keyed_per_row and self._fixed(r, key)) for r in rules
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
        for template in (rule.member_template, rule.value_template, rule.nest_member_template):
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

    def _single_body(self, rule: Rule, event: ChangeEvent, row: dict[str, Any]) -> ArgV:
        """The kind and items of a hash, JSON or string write."""
        if self._in_parts(rule):
            return self._part_body(rule, event, row)
        if rule.type is TargetType.HASH:
            return self._hash_body(rule, event, row)
        if rule.type is TargetType.STRING and rule.value_template is not None:
            template = rule.value_template
            if event.unchanged and not event.unchanged.isdisjoint(template.columns):
                # the value cannot be rendered: drop the cached one, the next change fills it
                return [ROW_DELETE]
            try:
                value = template.render(row)
            except NullColumnError:
                # a null value: no key, as for a null hash row's missing fields
                return [ROW_DELETE]
            return [ROW_JSON, value]
        return self._json_body(rule, event, row)

    def _stream_row(
        self,
        rule: Rule,
        *,
        event: ChangeEvent,
        row: dict[str, Any],
        position: str,
        identity: str,
        present: bool,
    ) -> RowWrite:
        target = rule.template.render(row)
        table = self.tables.table(rule, target)
        pairs: ArgV = ["op", event.op, "table", event.table, "position", position]
        if event.op == "d":
            shaped = {rule.rename.get(c, c): v for c, v in (event.primary_key() or {}).items()}
        elif present:
            self._check_available(rule, event)
            shaped = self._shaped(rule, row)
        else:
            # a row that does not match the filter is not published
            return self.removal(table, record_field(identity), position)
        for name, value in shaped.items():
            if value is not None and name not in event.unchanged:
                pairs += (name, hash_value(value))
        return self._event(rule, table, target, (identity, position), pairs)

    def _event(
        self, rule: Rule, table: Table, stream: str, row: tuple[str, str], pairs: ArgV
    ) -> RowWrite:
        """The row publishing ``pairs`` to ``stream`` for ``row`` (its identity and position)."""
        name, position = row
        bucket, field = table.locate(name)
        return RowWrite(
            [stream, bucket],
            [ROW_STREAM, field, position, str(rule.max_len or 0), str(len(pairs) // 2), *pairs],
            table,
            table.buckets,
        )

    def truncate_event(self, rule: Rule, table: str, position: str) -> RowWrite:
        """The event a stream rule publishes for a TRUNCATE of its table."""
        stream = rule.template.render({})
        pairs: ArgV = ["op", "t", "table", table, "position", position]
        return self._event(
            rule, self.tables.table(rule, stream), stream, ("#truncate", position), pairs
        )

    def removal(
        self, table: Table, field: str | bytes, position: str, *, keep: bool = False
    ) -> RowWrite:
        """The row removing the placement recorded in ``field`` (as the bucket holds it) of
        ``table``, unless a change newer than ``position`` wrote it (a delete, a row leaving
        the rule, TRUNCATE, resync); ``keep``: a list's entries stay (``on_delete: ignore``)."""
        return RowWrite(
            [table.bucket_of(as_bytes(field))],
            [ROW_REMOVE, field, position, "0" if keep else "1"],
            table,
            table.buckets,
            at=0,
        )

    def key_removal(self, rule: Rule, target: str, position: str) -> RowWrite:
        """The row deleting ``target``, a key ``rule`` names, unless a change newer than
        ``position`` was applied to it (TRUNCATE, resync; invalidate rules' keys)."""
        if rule.mode is Mode.INVALIDATE:
            return self.single(rule, target, position, self._invalidation())
        return self.single(rule, target, position, self._delete_body(rule))

    def _invalidation(self) -> ArgV:
        """An invalidate rule's delete, which also voids the key's outstanding cache-aside
        lease (``streamsync.cache_aside``): the library finds the lease under the state
        prefix."""
        return [ROW_INVALIDATE, self.keys.state_prefix]

    # -- parts of keys several rules write (merge) ----------------------------------------

    def _in_parts(self, rule: Rule) -> bool:
        """Whether ``rule`` writes a part of its keys: it merges, or others merge into it."""
        return rule.merge or rule.state_name in self._merged

    def _json_part_encoding(self, rule: Rule) -> str:
        owner = self._owners.get(rule.state_name, rule)
        return JSON_PART_REDISJSON if owner.stores_redisjson(self.redisjson) else JSON_PART_TEXT

    def _delete_body(self, rule: Rule) -> ArgV:
        """What a delete of a row (or its leaving the rule) does: the key goes, or only the
        rule's part of it (the merged fields, or for the owning rule all the others)."""
        if rule.merge:
            names: Iterable[str] = rule.owned_names
            kinds = (ROW_HASH_PART_REMOVED, ROW_JSON_PART_REMOVED)
        elif rule.state_name in self._merged:
            names = sorted(self._merged[rule.state_name])
            kinds = (ROW_HASH_OWNER_REMOVED, ROW_JSON_OWNER_REMOVED)
        else:
            return [ROW_DELETE]
        if rule.type is TargetType.HASH:
            listed = list(names)
            return [kinds[0], str(len(listed)), *listed]
        tokens = [orjson.dumps(name) for name in names]
        return [kinds[1], self._json_part_encoding(rule), str(len(tokens)), *tokens]

    def _child_body(self, rule: Rule, event: ChangeEvent, row: dict[str, Any]) -> ArgV:
        """A nested child: its parent document's encoding, then its members as a partial JSON
        row's (an unchanged TOAST column keeps the cached child's member)."""
        rename = rule.rename
        members: ArgV = []
        for column in rule.fields if rule.fields is not None else row.keys():
            members.append(orjson.dumps(rename.get(column, column)))
            if column in event.unchanged:
                members += ["k", ""]
            else:
                members += ["v", orjson.dumps(row.get(column))]
        return [self._json_part_encoding(rule), str(len(members) // 3), *members]

    def _part_body(self, rule: Rule, event: ChangeEvent, row: dict[str, Any]) -> ArgV:
        """A write of the rule's part of the key: a merging rule's fields, or the owning
        rule's columns but those merged in."""
        rename = rule.rename
        if rule.merge:
            columns: Iterable[str] = rule.owned_columns
        else:
            merged = self._merged[rule.state_name]
            selected = rule.fields if rule.fields is not None else row.keys()
            columns = [c for c in selected if rename.get(c, c) not in merged]
        if rule.type is TargetType.HASH:
            pairs: ArgV = []
            nulls: ArgV = []
            keep: ArgV = []
            for column in columns:
                value = row.get(column)
                name = rename.get(column, column)
                if column in event.unchanged:
                    keep.append(name)
                elif value is None:
                    nulls.append(name)
                else:
                    pairs += (name, hash_value(value))
            counts = (str(len(pairs) // 2), str(len(nulls)), str(len(keep)))
            return [ROW_HASH_PART, *counts, *pairs, *nulls, *keep]
        members: ArgV = []
        for column in columns:
            members.append(orjson.dumps(rename.get(column, column)))
            if column in event.unchanged:
                members += ["k", ""]
            else:
                members += ["v", orjson.dumps(row.get(column))]
        encoding = self._json_part_encoding(rule)
        return [ROW_JSON_PART, encoding, str(len(members) // 3), *members]

    def _hash_body(self, rule: Rule, event: ChangeEvent, row: dict[str, Any]) -> ArgV:
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
            head: ArgV = [ROW_HASH, str(len(names))]
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
            str(len(pairs) // 2),
            str(len(nulls)),
            str(len(keep)),
            *pairs,
            *nulls,
            *keep,
        ]

    def _json_body(self, rule: Rule, event: ChangeEvent, row: dict[str, Any]) -> ArgV:
        unchanged = event.unchanged.intersection(rule.fields or row)
        doc = self._shaped(rule, row)
        native = rule.stores_redisjson(self.redisjson)
        if not unchanged:
            return [ROW_REDISJSON if native else ROW_JSON, orjson.dumps(doc)]
        renamed = {rule.rename.get(c, c) for c in unchanged}
        members: ArgV = []
        for name, value in doc.items():
            members.append(orjson.dumps(name))
            if name in renamed:
                members += ["k", ""]
            else:
                members += ["v", orjson.dumps(value)]
        return [ROW_REDISJSON_PARTIAL if native else ROW_JSON_PARTIAL, str(len(doc)), *members]
