"""Library 1.x bookkeeping as the last 1.x release (1.1.0) left it, read for ``streamsync migrate``:
the names of its keys and the text of its records. Pure: no I/O.

1.x kept, in the Redis holding the cache:

- per key of a single-value rule (hash, JSON, string, invalidate), a *position record*, a string
  key named by ``guarded_name(<position_prefix>, <key>)``: ``<position>``, then ``|<shape>`` (a
  hash as last written whole) or ``|=`` (a JSON or string value cached); with a TTL while it is a
  tombstone, or while its row has one. Every rule writing the key shared it.
- per rule, the keys it cached (``<state_prefix>idx:<rule>:keys``, per hash slot in a Cluster)
  and the rows it placed (``<state_prefix>idx:<rule>:rows``);
- per row of a rule that places rows (set, sorted set, list, stream, a key over non-key columns),
  a *placement record* ``<state_prefix>pl:<rule>:<identity>``: ``<position>|`` (placed nowhere: a
  tombstone, a stream's row) or ``<position>|<kind><msgpack array>`` (``Placement``);
- per list, an order sorted set ``guarded_name(<state_prefix>ord:, <list>)`` (members
  ``<position>|<row token>``, score 0 in the list, -1 in the reserve) and the reserve's values in
  a hash ``guarded_name(<state_prefix>rsv:, <list>)``.

A 1.x position is an optional resync epoch (``e000001``), the LSN as 20 digits and a rank digit;
the end of a resync removed rows at its epoch's floor, ``e000001`` then ``0``.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from streamsync import positions
from streamsync.config import Rule
from streamsync.keys import CLUSTER_SLOTS, key_slot, rule_pin, slot_tag

#: What ends a record's position.
MARK = b"|"

#: An order member's row token for a row whose key is one non-negative integer: 20 digits.
_INTEGER_TOKEN = re.compile(rb"[0-9]{20}")
_FLOOR = re.compile(rf"(e[0-9]{{{positions.EPOCH_WIDTH}}})?0")


def guarded_name(prefix: bytes, target: bytes) -> bytes:
    """The name of ``target``'s position record under ``prefix`` (or of its list's order or
    reserve): in ``target``'s hash slot, as 1.x named it (``mapping.position_key``)."""
    start = target.find(b"{")
    if start >= 0 and target.find(b"}", start + 1) > start + 1:
        return prefix + target
    if start < 0 and b"}" not in target:
        return prefix + b"{" + target + b"}"
    return prefix + b"{" + slot_tag(key_slot(target)).encode() + b"}:" + target


def targets_of(prefix: bytes, name: bytes) -> list[bytes]:
    """The keys ``name`` is the ``guarded_name`` of under ``prefix``: one, or none (not a name
    1.x gave), or two when a key that is a hash tag alone (``{t1}``) and the tag's text (``t1``)
    shared one record."""
    if not name.startswith(prefix):
        return []
    rest = name[len(prefix) :]
    candidates = [rest]
    if rest.startswith(b"{"):
        end = rest.find(b"}")
        if end == len(rest) - 1:
            candidates.append(rest[1:-1])
        elif end > 0 and rest[end + 1 : end + 2] == b":":
            candidates.append(rest[end + 2 :])
    return [c for c in dict.fromkeys(candidates) if guarded_name(prefix, c) == name]


# -- key names -------------------------------------------------------------------------------


def _tag(rule: Rule, cluster: bool) -> str:
    # in a Cluster a rule's records shared the slot its keys were pinned to
    return f"{{{rule_pin(rule)}}}:" if cluster else ""


def key_indexes(state_prefix: str, rule: Rule, cluster: bool) -> list[str]:
    """The sets of keys a single-value rule cached: one, or one per hash slot in a Cluster."""
    name = f"{state_prefix}idx:{rule.state_name}:keys"
    if not cluster:
        return [name]
    return [f"{name}:{{{slot_tag(slot)}}}" for slot in range(CLUSTER_SLOTS)]


def key_index(state_prefix: str, rule: Rule, target: bytes, cluster: bool) -> str:
    """The set of keys of ``rule`` that holds ``target`` when the rule cached it."""
    name = f"{state_prefix}idx:{rule.state_name}:keys"
    return f"{name}:{{{slot_tag(key_slot(target))}}}" if cluster else name


def row_index(state_prefix: str, rule: Rule, cluster: bool) -> str:
    """The set of rows a rule placed."""
    return f"{state_prefix}idx:{_tag(rule, cluster)}{rule.state_name}:rows"


def placement_prefix(state_prefix: str, rule: Rule, cluster: bool) -> str:
    """What the names of a rule's placement records start with, before the row identity."""
    return f"{state_prefix}pl:{_tag(rule, cluster)}{rule.state_name}:"


def order_prefix(state_prefix: str) -> str:
    """What the names of lists' order sorted sets start with (``guarded_name``)."""
    return f"{state_prefix}ord:"


def reserve_prefix(state_prefix: str) -> str:
    """What the names of lists' reserve hashes start with (``guarded_name``)."""
    return f"{state_prefix}rsv:"


# -- records ---------------------------------------------------------------------------------


def position(old: bytes) -> str:
    """A 1.x record's position in the 2.0 format (``positions.from_v1``; a resync's floor
    becomes the 2.0 floor of its epoch). ValueError when ``old`` is not a 1.x position."""
    text = old.decode("ascii", errors="replace")
    floor = _FLOOR.fullmatch(text)
    if floor is not None:
        return (floor[1] or "") + positions.FLOOR
    return positions.from_v1(text)


def split_record(value: bytes) -> tuple[bytes, bytes | None]:
    """A record's position and what follows its ``|`` (None: no ``|``)."""
    head, mark, rest = value.partition(MARK)
    return head, rest if mark else None


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a 1.x placement record says its row is."""

    #: ``T`` set member, ``Z`` sorted-set member, ``M`` single-value key, ``L`` list entries.
    kind: str
    #: The set, sorted set, single-value key or list.
    key: bytes
    #: T, Z: the member.
    member: bytes = b""
    #: M: the key's position record.
    record: bytes = b""
    #: L: the list's order sorted set and reserve hash, and the row's entries (order members
    #: ``<position>|<token>``) as placed, oldest first.
    order: bytes = b""
    reserve: bytes = b""
    entries: tuple[bytes, ...] = ()


def placement(data: bytes) -> Placement:
    """What follows a placement record's ``|``: its kind, then a msgpack array. ValueError when
    it is not one 1.x wrote."""
    kind = data[:1].decode("ascii", errors="replace")
    fields = unpack(data[1:])
    if not isinstance(fields, list) or not all(isinstance(f, bytes | list) for f in fields):
        raise ValueError(f"placement {kind!r} holds {fields!r}, not an array of strings")
    if kind in ("T", "Z") and len(fields) == 2:
        return Placement(kind, _text(fields[0]), member=_text(fields[1]))
    if kind == "M" and len(fields) == 2:
        return Placement(kind, _text(fields[0]), record=_text(fields[1]))
    if kind == "L" and len(fields) == 4 and isinstance(fields[3], list):
        entries = tuple(_text(e) for e in fields[3])
        return Placement(
            kind,
            _text(fields[0]),
            order=_text(fields[1]),
            reserve=_text(fields[2]),
            entries=entries,
        )
    raise ValueError(f"unknown placement {kind!r} of {len(fields)} field(s)")


def _text(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise ValueError(f"expected a string, found {value!r}")
    return value


def entry_parts(member: bytes) -> tuple[bytes, bytes]:
    """An order member's position and row token."""
    head, _, token = member.partition(MARK)
    return head, token


def identity_of_token(token: bytes) -> bytes:
    """The row identity an order member's token most likely stands for, when no placement
    record names the member: 1.x wrote a non-negative integer key as 20 digits."""
    if _INTEGER_TOKEN.fullmatch(token):
        return str(int(token)).encode()
    return token


# -- msgpack, as Redis's cmsgpack packs Lua values -------------------------------------------------


def unpack(data: bytes) -> object:
    """The one value msgpack ``data`` holds (strings as bytes). ValueError when it is not one
    whole msgpack value."""
    try:
        value, end = _value(data, 0)
    except (IndexError, struct.error) as exc:
        raise ValueError(f"truncated msgpack: {exc}") from None
    if end != len(data):
        raise ValueError(f"{len(data) - end} byte(s) after the msgpack value")
    return value


_SIZED: dict[int, tuple[str, str]] = {
    # type byte -> (what it holds, struct format of its length)
    0xC4: ("raw", ">B"),
    0xC5: ("raw", ">H"),
    0xC6: ("raw", ">I"),
    0xD9: ("raw", ">B"),
    0xDA: ("raw", ">H"),
    0xDB: ("raw", ">I"),
    0xDC: ("array", ">H"),
    0xDD: ("array", ">I"),
    0xDE: ("map", ">H"),
    0xDF: ("map", ">I"),
}
_SCALARS: dict[int, str] = {
    0xCA: ">f",
    0xCB: ">d",
    0xCC: ">B",
    0xCD: ">H",
    0xCE: ">I",
    0xCF: ">Q",
    0xD0: ">b",
    0xD1: ">h",
    0xD2: ">i",
    0xD3: ">q",
}
_CONSTANTS: dict[int, object] = {0xC0: None, 0xC2: False, 0xC3: True}


def _value(data: bytes, at: int) -> tuple[object, int]:
    byte = data[at]
    if byte <= 0x7F or byte >= 0xE0:
        return byte - (0x100 if byte >= 0xE0 else 0), at + 1
    if 0xA0 <= byte <= 0xBF:
        return _sized("raw", data, at + 1, byte & 0x1F)
    if 0x90 <= byte <= 0x9F:
        return _sized("array", data, at + 1, byte & 0x0F)
    if 0x80 <= byte <= 0x8F:
        return _sized("map", data, at + 1, byte & 0x0F)
    if byte in _CONSTANTS:
        return _CONSTANTS[byte], at + 1
    if byte in _SCALARS:
        fmt = _SCALARS[byte]
        return struct.unpack_from(fmt, data, at + 1)[0], at + 1 + struct.calcsize(fmt)
    if byte in _SIZED:
        what, fmt = _SIZED[byte]
        (n,) = struct.unpack_from(fmt, data, at + 1)
        return _sized(what, data, at + 1 + struct.calcsize(fmt), n)
    raise ValueError(f"msgpack type 0x{byte:02x} is not one cmsgpack writes")


def _sized(what: str, data: bytes, at: int, n: int) -> tuple[object, int]:
    if what == "raw":
        if at + n > len(data):
            raise IndexError("string past the end")
        return data[at : at + n], at + n
    items: list[object] = []
    for _ in range(n * (2 if what == "map" else 1)):
        item, at = _value(data, at)
        items.append(item)
    if what == "array":
        return items, at
    try:
        return dict(zip(items[0::2], items[1::2], strict=True)), at
    except TypeError:
        raise ValueError("a msgpack map keyed by an array or a map") from None
