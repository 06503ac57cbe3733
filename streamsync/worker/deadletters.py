"""Writing dead letters: an entry that can never be applied, or failed its last allowed delivery,
goes to ``<stream>:dlq`` (layout: ``streamsync.deadletter``) and is acknowledged only once its
letter is written."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis

from streamsync.deadletter import xadd_command
from streamsync.functions import Command
from streamsync.keys import dead_letter_stream
from streamsync.worker.entry import Entry
from streamsync.worker.session import Session

log = logging.getLogger(__name__)


def still_ours(session: Session, group: str, consumer: str, entry: Entry) -> bool:
    """Whether a redelivered entry is still pending to ``consumer``. Another worker may have
    claimed it again, or settled it, while it waited here: then its dead letter is that
    worker's to write (or already written), not a second one."""
    pending = session.call("XPENDING", entry.stream, group, entry.id, entry.id, 1, consumer)
    if pending:
        return True
    log.info("%s: no longer pending to %s, not dead-lettered here", entry.label, consumer)
    return False


def commands(entries: Sequence[Entry], consumer: str, max_len: int, now_ms: int) -> list[Command]:
    """The XADDs writing the dead letters of ``entries`` (their ``error`` is the reason)."""
    return [
        xadd_command(
            stream=entry.stream,
            entry_id=entry.id,
            fields=entry.fields,
            reason=entry.error or "unknown",
            deliveries=entry.deliveries,
            consumer=consumer,
            failed_at_ms=now_ms,
            max_len=max_len,
        )
        for entry in entries
    ]


def written(entries: Sequence[Entry], replies: Sequence[Any]) -> list[Entry]:
    """The entries whose dead letter the replies say was written (to acknowledge). One that was
    not is left pending: it comes back with a claim and is dead-lettered then."""
    done: list[Entry] = []
    for entry, reply in zip(entries, replies, strict=True):
        if isinstance(reply, redis.ResponseError):
            log.error("%s: cannot write the dead letter: %s", entry.label, reply)
            continue
        log.warning(
            "%s: dead-lettered to %s: %s",
            entry.label,
            dead_letter_stream(entry.stream),
            entry.error,
        )
        done.append(entry)
    return done
