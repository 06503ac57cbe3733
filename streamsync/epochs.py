"""Resync epochs: which epoch a stream entry belongs to, and how positions carry it.

After a point-in-time restore, or on a new replication slot, the database produces positions
lower than those already cached, and every change would be refused as stale. ``streamsync resync``
starts a new epoch for a table's stream at its current end: entries added afterwards (the
re-snapshot and what follows) carry positions prefixed by the epoch, which compare newer than any
position of an earlier epoch. Epoch 0, the default, adds no prefix, so positions cached before
any resync keep their meaning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson

from streamsync.positions import EPOCH_WIDTH, epoch_floor, epoch_prefix

__all__ = ["EPOCH_WIDTH", "Epochs", "epoch_floor", "epoch_prefix", "parse_id", "read_epochs"]


def parse_id(entry_id: bytes | str) -> tuple[int, int]:
    """A stream id as (milliseconds, sequence), in the order Redis gives ids."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class Epochs:
    """The epoch marks of every stream, as read from the epochs hash."""

    def __init__(self) -> None:
        self._marks: dict[str, list[tuple[tuple[int, int], str]]] = {}

    def load(self, hash_fields: Mapping[Any, Any] | list[Any] | None) -> None:
        """Replace the marks with an HGETALL reply (a flat list or a mapping)."""
        self.load_all([hash_fields])

    def load_all(self, replies: Iterable[Mapping[Any, Any] | list[Any] | None]) -> None:
        """Replace the marks with the HGETALL replies of every epochs hash (one, or in a Redis
        Cluster one per stream: ``StateKeys.epochs_commands``)."""
        marks: dict[str, list[tuple[tuple[int, int], str]]] = {}
        pairs: list[tuple[Any, Any]] = []
        for hash_fields in replies:
            if isinstance(hash_fields, list):
                pairs += zip(hash_fields[0::2], hash_fields[1::2], strict=True)
            else:
                pairs += (hash_fields or {}).items()
        for stream, value in pairs:
            try:
                parsed = orjson.loads(value)
                marks[stream.decode()] = [
                    (parse_id(str(start)), epoch_prefix(int(epoch))) for epoch, start in parsed
                ]
            except (ValueError, TypeError):
                continue
        self._marks = marks

    def prefix(self, stream: str, entry_id: bytes) -> str:
        """The position prefix of entry ``entry_id`` of ``stream``."""
        marks = self._marks.get(stream)
        if not marks:
            return ""
        eid = parse_id(entry_id)
        prefix = ""
        for start, mark in marks:
            if eid > start:
                prefix = mark
        return prefix

    def latest_start(self, stream: str) -> tuple[int, int] | None:
        """The id after which the newest epoch of ``stream`` starts, as (milliseconds,
        sequence); None when the stream was never resynced."""
        marks = self._marks.get(stream)
        return marks[-1][0] if marks else None

    def latest(self, stream: str) -> int:
        """The newest epoch of ``stream`` (0 when it was never resynced)."""
        marks = self._marks.get(stream)
        if not marks:
            return 0
        return int(marks[-1][1][1:])


def read_epochs(client: Any, commands: Sequence[tuple[str, str]]) -> Epochs:
    """The marks read by ``commands`` (``StateKeys.epochs_commands``) on ``client``."""
    epochs = Epochs()
    epochs.load_all([client.execute_command(*command) for command in commands])
    return epochs
