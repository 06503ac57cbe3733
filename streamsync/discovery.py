"""Which streams a configuration consumes: those it names, or those its prefix finds."""

from __future__ import annotations

from typing import Any

from streamsync.config import SourceSettings
from streamsync.keys import glob_escape, is_dead_letter_stream


def find_streams(client: Any, prefix: str, *, dead_letters: bool = False) -> list[str]:
    """The streams whose name starts with ``prefix`` (a non-blocking SCAN ... TYPE stream),
    sorted; dead-letter streams only if ``dead_letters``."""
    names = {
        key.decode() if isinstance(key, bytes) else str(key)
        for key in client.scan_iter(match=glob_escape(prefix) + "*", count=1000, _type="stream")
    }
    return sorted(n for n in names if dead_letters or not is_dead_letter_stream(n))


def source_streams(client: Any, source: SourceSettings) -> list[str]:
    """``source.streams``, or the streams ``source.stream_prefix`` finds."""
    if source.streams is not None:
        return list(source.streams)
    return find_streams(client, source.stream_prefix or "")
