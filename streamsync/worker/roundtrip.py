"""One round trip to Redis: named groups of commands sent as one pipeline, their replies handed
back by group name, never by position."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from streamsync.functions import Command


class Link(Protocol):
    """A pipelined connection (``streamsync.link``): send many commands, receive their replies
    in order, error replies as ResponseError values."""

    def send(self, commands: Sequence[Command]) -> None: ...

    def receive(self) -> list[Any]: ...


class Replies:
    """The replies of a round trip, by group name."""

    def __init__(self, groups: dict[str, list[Any]]) -> None:
        self._groups = groups

    def __getitem__(self, name: str) -> list[Any]:
        return self._groups[name]

    def one(self, name: str) -> Any:
        """The reply of a group of exactly one command."""
        (reply,) = self._groups[name]
        return reply


class RoundTrip:
    """Commands gathered in named groups, sent together, answered by group."""

    def __init__(self) -> None:
        self._groups: dict[str, list[Command]] = {}

    def add(self, name: str, commands: Sequence[Command]) -> None:
        """Add a group (sent in the order groups are added); a name is used once."""
        if name in self._groups:
            raise ValueError(f"round trip group {name!r} added twice")
        self._groups[name] = list(commands)

    def __len__(self) -> int:
        return sum(len(commands) for commands in self._groups.values())

    def send(self, link: Link) -> None:
        """Send every group's commands in one write."""
        link.send([command for commands in self._groups.values() for command in commands])

    def receive(self, link: Link) -> Replies:
        """Read the replies of what ``send`` sent, grouped by name."""
        replies = link.receive()
        if len(replies) != len(self):
            raise RuntimeError(f"round trip: {len(replies)} replies to {len(self)} commands")
        grouped: dict[str, list[Any]] = {}
        start = 0
        for name, commands in self._groups.items():
            grouped[name] = replies[start : start + len(commands)]
            start += len(commands)
        return Replies(grouped)
