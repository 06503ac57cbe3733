"""The exception tree and the process exit codes, in one place."""

from __future__ import annotations

import enum
import reprlib
from typing import Any

#: Bounds what a reason quotes of a value: an entry may hold megabytes, or nest 1,000 levels
#: deep (``repr`` would recurse through every level).
_EXCERPT = reprlib.Repr()
_EXCERPT.maxlevel, _EXCERPT.maxlist, _EXCERPT.maxdict = 3, 4, 4
_EXCERPT.maxstring = _EXCERPT.maxother = _EXCERPT.maxlong = 60


def excerpt(value: Any) -> str:
    """``repr(value)``, short enough for a log line or a dead-letter reason, whatever the value."""
    return _EXCERPT.repr(value)


class ExitCode(enum.IntEnum):
    """Process exit codes of the `streamsync` command, stable for scripts and orchestrators."""

    OK = 0
    #: An unexpected error: a bug or an environment failure worth a look.
    FAILURE = 1
    #: `streamsync status` found something wrong (each problem is listed); `dlq replay` left
    #: dead letters in place.
    UNHEALTHY = 2
    #: The configuration file is missing, unreadable or invalid.
    CONFIG_INVALID = 3
    #: Redis holds a newer, incompatible streamsync Functions library: this worker is too old.
    LIBRARY_INCOMPATIBLE = 4
    #: The cache's Redis holds library 1.x bookkeeping (or a migration that did not finish):
    #: stop every 1.x worker, then run `streamsync migrate`. The worker applied nothing.
    MIGRATION_NEEDED = 5
    #: `streamsync migrate` found live workers (liveness marks, connections named
    #: ``streamsync:<consumer>``): stop them first, or pass --force.
    WORKERS_RUNNING = 6
    #: The command line is wrong (an unknown option, a missing argument): sysexits' EX_USAGE.
    USAGE = 64
    #: A second SIGTERM/SIGINT arrived before the graceful stop finished.
    INTERRUPTED = 130


class StreamsyncError(Exception):
    """Base class of every error streamsync raises on purpose."""


class ConfigError(StreamsyncError):
    """Raised when a configuration file is missing, unreadable or invalid; names file and field."""


class LibraryIncompatibleError(StreamsyncError):
    """Raised when Redis holds a Functions library this worker cannot use or must not replace."""


class LegacyLayoutError(StreamsyncError):
    """Raised when the cache's Redis holds library 1.x bookkeeping, or a migration of it that did
    not finish: a 2.0 worker would apply changes against records it cannot read."""


class MigrationError(StreamsyncError):
    """Raised when ``streamsync migrate`` cannot proceed (live workers, an unreadable record)."""


class PoisonEntryError(StreamsyncError):
    """Raised when a stream entry can never be applied (malformed, unmapped, unsupported op)."""


class TemplateError(PoisonEntryError):
    """Raised when a template cannot be rendered from a row (missing or null column)."""


class NullColumnError(TemplateError):
    """Raised when a column a template names is null in the row: the row has no key or member
    under that rule, as a SQL query grouping by the column would leave it out."""


class ColumnValueError(PoisonEntryError):
    """Raised when a column value cannot be written under a rule: a sorted-set score Redis would
    refuse, a value nested too deeply for a JSON document."""


class FilterError(PoisonEntryError):
    """Raised when a row cannot be evaluated by a rule's filter: a named column is absent, or a
    value has a type that cannot be compared with the literal."""


class ResyncError(StreamsyncError):
    """Raised when a resync cannot proceed (unknown table, workers not caught up in time, a
    finish with nothing re-snapshotted)."""


class DlqError(StreamsyncError):
    """Raised when a dead-letter command cannot proceed (unknown stream, unknown id)."""
