"""The dead-letter record: the one layout a worker writes to ``<stream>:dlq`` and the ``dlq``
commands read back.

Fields, in this order: ``reason``, ``stream``, ``id`` (the original entry id), ``deliveries``,
``consumer``, ``failed_at_ms``, ``fields`` (N), then the original entry's N field/value pairs
verbatim (order and duplicates kept, so a replay re-adds exactly what Debezium wrote).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from streamsync.keys import dead_letter_stream

#: The metadata fields of a dead letter, in the order they are written.
META_FIELDS = ("reason", "stream", "id", "deliveries", "consumer", "failed_at_ms", "fields")

ID_RE = re.compile(r"^\d+-\d+$")


def xadd_command(
    *,
    stream: str,
    entry_id: bytes,
    fields: list[bytes] | None,
    reason: str,
    deliveries: int,
    consumer: str,
    failed_at_ms: int,
    max_len: int,
) -> tuple[Any, ...]:
    """The XADD writing the dead letter of entry ``entry_id`` of ``stream`` (its original
    ``fields``, None when the entry vanished from the stream) to the stream's dead-letter
    stream, capped near ``max_len`` letters."""
    original = fields or []
    return (
        "XADD",
        dead_letter_stream(stream),
        "MAXLEN",
        "~",
        max_len,
        "*",
        "reason",
        reason,
        "stream",
        stream,
        "id",
        entry_id,
        "deliveries",
        deliveries,
        "consumer",
        consumer,
        "failed_at_ms",
        failed_at_ms,
        "fields",
        len(original) // 2,
        *original,
    )


def as_text(value: bytes) -> str:
    """``value`` as text, undecodable bytes as backslash escapes."""
    return value.decode("utf-8", "backslashreplace")


def as_utf8(value: bytes) -> str | None:
    """``value`` as text, or None when it is not UTF-8."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def iso_utc(ms: int) -> str:
    """Milliseconds since the epoch as ISO-8601 UTC, e.g. ``2024-05-01T12:00:00.123Z``."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


@dataclass(slots=True)
class DeadLetter:
    """One entry of a dead-letter stream, parsed from its raw field/value list."""

    dlq_id: bytes
    #: Every field/value pair, as stored.
    raw: list[bytes]
    #: The metadata fields found (all of META_FIELDS for a well-formed dead letter).
    meta: dict[str, bytes] = field(default_factory=dict)
    #: The original entry's flat field/value list; None when the layout is not streamsync's.
    fields: list[bytes] | None = None
    #: Why the layout is not streamsync's, if it is not.
    problem: str | None = None

    @classmethod
    def parse(cls, dlq_id: bytes, raw: list[bytes]) -> DeadLetter:
        """Read the worker's layout; a dead letter not in it keeps ``problem`` set."""
        letter = cls(dlq_id, raw)
        for i, name in enumerate(META_FIELDS):
            if 2 * i + 1 >= len(raw) or raw[2 * i] != name.encode():
                letter.problem = f"not a streamsync dead letter (no {name!r} field in place)"
                break
            letter.meta[name] = raw[2 * i + 1]
        if letter.problem is None:
            rest = raw[2 * len(META_FIELDS) :]
            count = letter.meta["fields"]
            if not count.isdigit() or int(count) * 2 != len(rest):
                letter.problem = (
                    f"not a streamsync dead letter ('fields' says {as_text(count)},"
                    f" {len(rest) // 2} pair(s) follow)"
                )
            else:
                letter.fields = rest
        if letter.problem is not None:
            # best effort for display: the pairs as they come
            letter.meta = {}
            for i in range(0, len(raw) - 1, 2):
                letter.meta.setdefault(as_text(raw[i]), raw[i + 1])
        return letter

    @property
    def reason(self) -> str:
        return as_text(self.meta.get("reason", b"?"))

    @property
    def original_id(self) -> bytes | None:
        value = self.meta.get("id")
        return value if value is not None and ID_RE.match(as_text(value)) else None

    @property
    def deliveries(self) -> int | None:
        value = self.meta.get("deliveries", b"")
        return int(value) if value.isdigit() else None

    @property
    def consumer(self) -> str:
        return as_text(self.meta.get("consumer", b"?"))

    @property
    def failed_at_ms(self) -> int | None:
        value = self.meta.get("failed_at_ms", b"")
        return int(value) if value.isdigit() else None

    def summary(self) -> dict[str, Any]:
        """The metadata as JSON-ready values."""
        failed = self.failed_at_ms
        original = self.meta.get("id")
        return {
            "dlq_id": as_text(self.dlq_id),
            "reason": self.reason,
            "stream": as_text(self.meta["stream"]) if "stream" in self.meta else None,
            "id": as_text(original) if original is not None else None,
            "deliveries": self.deliveries,
            "consumer": self.consumer,
            "failed_at_ms": failed,
            "failed_at": iso_utc(failed) if failed is not None else None,
            "fields": len(self.fields) // 2 if self.fields is not None else None,
            "problem": self.problem,
        }
