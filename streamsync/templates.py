"""Key templates such as ``user:{id}``: parsed once at config load, rendered per row.

The syntax is the replacement-field subset of Python's ``str.format``: ``{column}`` inserts a
column's value, ``{{`` and ``}}`` are literal braces (useful for Redis Cluster hash tags, e.g.
``{{tenant:{tenant_id}}}:user:{id}``). Attribute access, indexing, conversions and format specs
are refused: a template can only read column values, never run anything.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streamsync.errors import TemplateError

_FORMATTER = string.Formatter()


def render_value(value: Any) -> str:
    """The text a column value takes inside a key or a member."""
    if isinstance(value, str):
        return value
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int | float):
        return repr(value) if isinstance(value, float) else str(value)
    raise TemplateError(f"value of type {type(value).__name__} cannot be used in a key")


@dataclass(frozen=True, slots=True)
class KeyTemplate:
    """A parsed key template: literal text interleaved with column references."""

    source: str
    literals: tuple[str, ...]
    columns: tuple[str, ...]

    @classmethod
    def parse(cls, source: str) -> KeyTemplate:
        """Parse ``source``; raise ValueError with a readable reason when it is not valid."""
        literals: list[str] = []
        columns: list[str] = []
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
                    " may only name a column"
                )
            literals.append(pending)
            columns.append(field)
            pending = ""
        if not columns:
            raise ValueError(f"invalid template {source!r}: it names no column, e.g. 'user:{{id}}'")
        literals.append(pending)
        return cls(source, tuple(literals), tuple(columns))

    def render(self, row: Mapping[str, Any]) -> str:
        """The key for ``row``; TemplateError if a named column is missing or null."""
        literals = self.literals
        if len(literals) == 2:
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
                    f"key template {self.source!r} names column {column!r}, absent from the row"
                ) from None
            if value is None:
                raise TemplateError(
                    f"key template {self.source!r}: column {column!r} is null in this row"
                )
            out.append(render_value(value))
            out.append(literals[i + 1])
        return "".join(out)
