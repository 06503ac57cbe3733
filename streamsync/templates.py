"""Templates such as ``user:{id}``: parsed once at config load, rendered per row.

They render keys, set and sorted-set members and list or string values. The syntax is the
replacement-field subset of Python's ``str.format``: ``{column}`` inserts a column's value, ``{{``
and ``}}`` are literal braces (useful for Redis Cluster hash tags, e.g.
``{{tenant:{tenant_id}}}:user:{id}``). A column may pass through named transforms,
``{email|lower}`` or ``{code|trim|upper}``: only the pure text functions in ``TRANSFORMS``.
Attribute access, indexing, conversions and format specs are refused: a template can only read
column values, never run anything.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from streamsync.errors import NullColumnError, TemplateError

_FORMATTER = string.Formatter()

#: The transforms a template may apply to a column's text, by name.
TRANSFORMS: Mapping[str, Callable[[str], str]] = {
    "lower": str.lower,
    "upper": str.upper,
    "trim": str.strip,
}


def render_value(value: Any) -> str:
    """The text of a scalar column value, the same wherever it goes: a key, a member, a list
    or string value, a hash or stream field, a score. Text as is, ``true``/``false``, integers
    in decimal, floats as the JSON documents spell them (orjson's shortest round-trip form, e.g.
    ``1e-7``), so a value reads the same in a key and in the document cached under it.
    TemplateError for an array, an object or a non-finite float."""
    kind = type(value)
    if kind is str:
        return value  # type: ignore[no-any-return]
    if kind is int:
        return str(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is float and math.isfinite(value):
        return orjson.dumps(value).decode()
    if kind is float:
        raise TemplateError(f"value {value!r} is not a finite number")
    raise TemplateError(f"value of type {kind.__name__} cannot be used in a key")


@dataclass(frozen=True, slots=True)
class KeyTemplate:
    """A parsed template: literal text interleaved with column references."""

    source: str
    literals: tuple[str, ...]
    columns: tuple[str, ...]
    #: Per column reference, the transforms applied to its text, in order.
    transforms: tuple[tuple[Callable[[str], str], ...], ...] = ()

    @classmethod
    def parse(cls, source: str, *, static_ok: bool = False) -> KeyTemplate:
        """Parse ``source``; raise ValueError with a readable reason when it is not valid.

        A template naming no column is refused unless ``static_ok`` (e.g. the one sorted set
        that ranks every row of a table).
        """
        literals: list[str] = []
        columns: list[str] = []
        transforms: list[tuple[Callable[[str], str], ...]] = []
        pending = ""
        try:
            parts = list(_FORMATTER.parse(source))
        except ValueError as exc:
            raise ValueError(f"invalid template {source!r}: {exc}") from None
        for literal, field, spec, conversion in parts:
            pending += literal
            if field is None:
                continue
            if not field:
                raise ValueError(f"invalid template {source!r}: empty {{}} names no column")
            if conversion or spec or any(c in field for c in ".[]"):
                raise ValueError(
                    f"invalid template {source!r}: {{{field}"
                    f"{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
                    " may only name a column, optionally with transforms such as {email|lower}"
                )
            column, *names = (part.strip() for part in field.split("|"))
            if not column:
                raise ValueError(f"invalid template {source!r}: {{{field}}} names no column")
            unknown = [n for n in names if n not in TRANSFORMS]
            if unknown:
                raise ValueError(
                    f"invalid template {source!r}: unknown transform {unknown[0]!r}"
                    f" (known: {', '.join(TRANSFORMS)})"
                )
            literals.append(pending)
            columns.append(column)
            transforms.append(tuple(TRANSFORMS[n] for n in names))
            pending = ""
        if not columns and not static_ok:
            raise ValueError(f"invalid template {source!r}: it names no column, e.g. 'user:{{id}}'")
        literals.append(pending)
        return cls(source, tuple(literals), tuple(columns), tuple(transforms))

    @property
    def is_static(self) -> bool:
        """True when the template names no column: it always renders the same text."""
        return not self.columns

    def render(self, row: Mapping[str, Any]) -> str:
        """The text for ``row``; TemplateError if a named column is missing or null."""
        literals = self.literals
        if len(literals) == 2 and not self.transforms[0]:
            # one column, the usual case ("user:{id}"): no list to build
            value = row.get(self.columns[0])
            if type(value) is int or type(value) is str:
                return f"{literals[0]}{value}{literals[1]}"
        out = [literals[0]]
        for i, column in enumerate(self.columns):
            try:
                value = row[column]
            except KeyError:
                raise TemplateError(
                    f"template {self.source!r} names column {column!r}, absent from the row"
                ) from None
            if value is None:
                raise NullColumnError(
                    f"template {self.source!r}: column {column!r} is null in this row"
                )
            text = render_value(value)
            for transform in self.transforms[i]:
                text = transform(text)
            out.append(text)
            out.append(literals[i + 1])
        return "".join(out)
