"""One round trip to Redis: named groups of commands, each on the link of the Redis it is for,
sent as one pipeline per link, their replies handed back by group name, never by position.

With two Redis (the streams' and a ``target`` holding the cache), every link gets its write
before any reply is read, so both servers work at the same time and the round trip costs the
slower of the two, not their sum."""

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
    """Commands gathered in named groups, each for one link, sent together, answered by
    group."""

    def __init__(self) -> None:
        self._groups: dict[str, tuple[Link, list[Command]]] = {}
        self._sent: list[tuple[Link, list[str]]] = []

    def add(self, name: str, commands: Sequence[Command], link: Link) -> None:
        """Add a group for ``link`` (a link's groups are sent in the order they are added); a
        name is used once."""
        if name in self._groups:
            raise ValueError(f"round trip group {name!r} added twice")
        self._groups[name] = (link, list(commands))

    def __len__(self) -> int:
        return sum(len(commands) for _, commands in self._groups.values())

    def _by_link(self) -> list[tuple[Link, list[str]]]:
        links: list[tuple[Link, list[str]]] = []
        for name, (link, _) in self._groups.items():
            for known, names in links:
                if known is link:
                    names.append(name)
                    break
            else:
                links.append((link, [name]))
        return links

    def send(self) -> None:
        """Send each link's commands in one write (links without commands are left alone)."""
        self._sent = []
        for link, names in self._by_link():
            commands = [c for name in names for c in self._groups[name][1]]
            if commands:
                link.send(commands)
                self._sent.append((link, names))

    def receive(self) -> Replies:
        """Read the replies of what ``send`` sent, link by link, grouped by name."""
        grouped: dict[str, list[Any]] = {name: [] for name in self._groups}
        for link, names in self._sent:
            replies = link.receive()
            expected = sum(len(self._groups[name][1]) for name in names)
            if len(replies) != expected:
                raise RuntimeError(f"round trip: {len(replies)} replies to {expected} commands")
            start = 0
            for name in names:
                n = len(self._groups[name][1])
                grouped[name] = replies[start : start + n]
                start += n
        return Replies(grouped)
