"""``streamsync dlq``: inspect, replay and purge the dead-letter streams.

A worker writes an entry it cannot apply to ``<stream>:dlq`` in the layout
``streamsync.deadletter`` owns; these commands read it back.

``replay`` puts dead letters back to work, oldest first, in one of two ways:

- by default it re-adds the original fields verbatim to the source stream (XADD, same field
  order) and deletes the dead letter in the same MULTI/EXEC, so the workers apply the entry
  again. Positions make that idempotent: a change already applied is stale.
- ``--direct`` decodes and plans the entry with the worker's Decoder and Planner (under the
  resync epoch of its original id) and applies it with the worker's FCALL, without any worker;
  the dead letter is removed once applied (or stale) and left, with the reason, otherwise.

Both modes first check that the current configuration can decode and map the entry, and leave
it in place (reporting why) when it cannot: re-adding it would only dead-letter it again
(``--force`` re-adds it anyway). A re-added entry gets a new id, so one older than the stream's
latest resync epoch is left for ``--direct``, and a TRUNCATE is only ever re-added: applied here
it could overtake older entries of its stream that the workers have not applied yet.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import click
import redis

from streamsync import connection, deadletter
from streamsync.config import Settings
from streamsync.deadletter import ID_RE, DeadLetter, as_text, as_utf8, iso_utc
from streamsync.discovery import find_streams
from streamsync.epochs import Epochs
from streamsync.errors import DlqError, ExitCode, LibraryIncompatibleError, PoisonEntryError
from streamsync.events import Decoder, Skip
from streamsync.functions import Library, RowStatus, RowWrite
from streamsync.keys import (
    StateKeys,
    dead_letter_stream,
    is_dead_letter_stream,
    source_of_dead_letters,
)
from streamsync.mapping import Planner
from streamsync.options import config_option, load_or_exit
from streamsync.worker.core import BatchCore

#: Dead letters shown per stream by ``dlq list`` unless ``--count`` says otherwise.
DEFAULT_COUNT = 10
#: Width of the reason column of ``dlq list``.
REASON_WIDTH = 60
#: Dead letters read per XRANGE while walking a dead-letter stream.
PAGE_SIZE = 500
#: WATCH conflicts (the dead-letter stream written meanwhile) retried per replayed entry.
MAX_WATCH_RETRIES = 20

#: A stream id above every real one: its epoch prefix is the stream's current epoch.
_NEWEST_ID = b"18446744073709551615-18446744073709551615"


def _pretty_json(value: bytes) -> str | None:
    """``value`` indented when it is a JSON object or array; None otherwise."""
    text = as_utf8(value)
    if text is None or not text.lstrip().startswith(("{", "[")):
        return None
    try:
        parsed = json.loads(text)
    except ValueError:
        return None
    return json.dumps(parsed, indent=2, ensure_ascii=False)


def _field_json(name: bytes, value: bytes) -> dict[str, Any]:
    item: dict[str, Any] = {"field": as_text(name), "value": as_text(value)}
    for key, raw in (("field", name), ("value", value)):
        if as_utf8(raw) is None:
            item[key + "_base64"] = base64.b64encode(raw).decode()
    text = as_utf8(value)
    if text is not None:
        with contextlib.suppress(ValueError):
            item["value_json"] = json.loads(text)
    return item


# -- Redis access --------------------------------------------------------------------------


class DeadLetters:
    """The dead-letter streams of one configuration, on one Redis."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        # stream entries are read unparsed: field lists keep their order and duplicates
        for command in ("XRANGE", "XREVRANGE"):
            client.set_response_callback(command, lambda reply, **_: reply)

    # -- streams

    def source_streams(self) -> list[str]:
        """The configured streams, or with ``stream_prefix`` those found in Redis (a stream
        whose dead letters outlived it included)."""
        source = self.settings.source
        if source.streams is not None:
            return list(source.streams)
        prefix = source.stream_prefix or ""
        found: set[str] = set()
        for name in find_streams(self.client, prefix, dead_letters=True):
            stream = source_of_dead_letters(name)
            if stream.startswith(prefix) and not is_dead_letter_stream(stream):
                found.add(stream)
        return sorted(found)

    def check_stream(self, stream: str) -> str:
        """``stream``'s dead-letter stream; DlqError unless it is a source stream."""
        if is_dead_letter_stream(stream):
            raise DlqError(
                f"{stream!r} is a dead-letter stream: name its source stream,"
                f" {source_of_dead_letters(stream)!r}"
            )
        source = self.settings.source
        if source.streams is not None:
            if stream not in source.streams:
                raise DlqError(
                    f"{stream!r} is not a configured stream (source.streams:"
                    f" {', '.join(source.streams)})"
                )
        else:
            prefix = source.stream_prefix or ""
            if not stream.startswith(prefix):
                raise DlqError(f"{stream!r} does not start with source.stream_prefix {prefix!r}")
            types = {self._type(stream), self._type(dead_letter_stream(stream))}
            if "stream" not in types:
                raise DlqError(f"{stream!r}: no such stream in Redis (nor dead letters of it)")
        return dead_letter_stream(stream)

    def _type(self, key: str) -> str:
        kind = self.client.type(key)
        return kind.decode() if isinstance(kind, bytes) else str(kind)

    # -- reading

    def length(self, dlq: str) -> int:
        return int(self.client.xlen(dlq))

    def newest(self, dlq: str, count: int) -> list[DeadLetter]:
        reply = self.client.execute_command("XREVRANGE", dlq, "+", "-", "COUNT", count)
        return [DeadLetter.parse(eid, list(raw)) for eid, raw in reply]

    def get(self, dlq: str, dlq_id: str) -> DeadLetter | None:
        reply = self.client.execute_command("XRANGE", dlq, dlq_id, dlq_id)
        return DeadLetter.parse(reply[0][0], list(reply[0][1])) if reply else None

    def walk(self, dlq: str, upto: bytes | None = None) -> Iterator[DeadLetter]:
        """Every dead letter, oldest first, up to ``upto`` (default: the newest one now), so
        what is dead-lettered meanwhile is not walked."""
        if upto is None:
            last = self.newest(dlq, 1)
            if not last:
                return
            upto = last[0].dlq_id
        start: bytes = b"-"
        while True:
            reply = self.client.execute_command("XRANGE", dlq, start, upto, "COUNT", PAGE_SIZE)
            for eid, raw in reply:
                yield DeadLetter.parse(eid, list(raw))
            if len(reply) < PAGE_SIZE:
                return
            start = b"(" + reply[-1][0]

    def count_older(self, dlq: str, cutoff_ms: int) -> int:
        """Dead letters whose id (the time they were dead-lettered) is before ``cutoff_ms``."""
        if cutoff_ms <= 0:
            return 0
        return sum(1 for _ in self.walk(dlq, f"{cutoff_ms - 1}-18446744073709551615".encode()))

    def epochs(self) -> Epochs:
        epochs = Epochs()
        epochs.load(self.client.hgetall(StateKeys.from_settings(self.settings.worker).epochs))
        return epochs


# -- replay --------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """What a replay did (or, in a dry run, would do) with one dead letter."""

    letter: DeadLetter
    #: re-added, applied, stale, skipped, dropped, nothing, removed... or "left".
    action: str
    detail: str = ""

    @property
    def left(self) -> bool:
        return self.action == "left"


@dataclass(slots=True)
class Planned:
    """What the worker would make of a dead letter's original entry, under this configuration."""

    rows: list[RowWrite] = field(default_factory=list)
    #: A tombstone or heartbeat: nothing to apply.
    skip: Skip | None = None
    #: A TRUNCATE (the worker sweeps for it, after the older entries of its stream).
    truncate: bool = False
    #: Why it cannot be applied.
    error: str | None = None


class Replayer:
    """Replays dead letters of one stream: through the stream, or applied directly."""

    def __init__(self, store: DeadLetters, stream: str, *, force: bool = False) -> None:
        settings = store.settings
        self.store = store
        self.client = store.client
        self.stream = stream
        self.dlq = dead_letter_stream(stream)
        self.force = force
        self.epochs = store.epochs()
        # the worker's own decoding and planning, so a replay sees the entry as a worker would
        self.core = BatchCore(
            Decoder(settings.source.format, settings.source.null_marker),
            Planner.from_settings(settings),
            self.epochs,
            tombstone_ms=settings.worker.tombstone_ttl_s * 1000,
            max_deliveries=settings.worker.max_deliveries,
        )
        self.library = Library(self.client)

    def plan(self, letter: DeadLetter) -> Planned:
        """Decode and plan ``letter`` as the worker would, under its original id's epoch."""
        original = letter.original_id
        if letter.fields is None or original is None:
            return Planned(error=letter.problem or "the dead letter has no valid original 'id'")
        try:
            plan = self.core.plan(self.stream, original, letter.fields)
        except PoisonEntryError as exc:
            return Planned(error=str(exc))
        except Exception as exc:  # a bug, as the worker reports it
            return Planned(error=f"internal error: {type(exc).__name__}: {exc}")
        if isinstance(plan.event, Skip):
            return Planned(skip=plan.event)
        if plan.truncate_at is not None:
            return Planned(truncate=True)
        return Planned(rows=plan.rows)

    # -- through the stream

    def requeue(self, letter: DeadLetter, dry_run: bool) -> Outcome:
        """Re-add ``letter``'s original fields to the source stream and delete it from the
        dead-letter stream, atomically; its original fields are XADDed verbatim."""
        original = letter.original_id
        if letter.fields is None or original is None:
            return Outcome(letter, "left", self.plan(letter).error or "")
        planned = self.plan(letter)
        if planned.error is not None and not self.force:
            return Outcome(letter, "left", planned.error)
        old, new = (
            self.epochs.prefix(self.stream, original),
            self.epochs.prefix(self.stream, _NEWEST_ID),
        )
        if old != new:
            return Outcome(
                letter,
                "left",
                "the entry predates the stream's latest resync epoch: re-adding it would"
                " overwrite newer rows; replay it with --direct, which keeps its epoch",
            )
        if dry_run:
            return Outcome(letter, "re-added", "would re-add to " + self.stream)
        for _ in range(MAX_WATCH_RETRIES):
            try:
                return self._requeue_once(letter)
            except redis.WatchError:
                time.sleep(0.01)
        return Outcome(letter, "left", "the dead-letter stream kept changing; try again")

    def _requeue_once(self, letter: DeadLetter) -> Outcome:
        assert letter.fields is not None
        dlq_id = letter.dlq_id
        with self.client.pipeline(transaction=True) as pipe:
            # WATCH: a concurrent replay or purge of the same dead letter aborts this one
            pipe.watch(self.dlq)
            if not pipe.execute_command("XRANGE", self.dlq, dlq_id, dlq_id):
                return Outcome(letter, "gone", "no longer in the dead-letter stream")
            kind = pipe.type(self.stream)
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            if kind not in ("stream", "none"):
                return Outcome(letter, "left", f"{self.stream} holds a {kind}, not a stream")
            pipe.multi()
            pipe.execute_command("XADD", self.stream, "*", *letter.fields)
            pipe.xdel(self.dlq, dlq_id)
            added, deleted = pipe.execute(raise_on_error=False)
        if isinstance(added, Exception):
            # cannot happen short of a race on the stream's type: keep the dead letter anyway
            if not isinstance(deleted, Exception) and deleted:
                self.client.execute_command("XADD", self.dlq, "*", *letter.raw)
            return Outcome(letter, "left", f"XADD to {self.stream} failed: {added}")
        new_id = added.decode() if isinstance(added, bytes) else str(added)
        return Outcome(letter, "re-added", f"as {self.stream} {new_id}")

    # -- applied directly

    def apply(self, letter: DeadLetter, dry_run: bool) -> Outcome:
        """Apply ``letter`` with the worker's batch call; delete it once applied or stale."""
        planned = self.plan(letter)
        if planned.error is not None:
            return Outcome(letter, "left", planned.error)
        if planned.truncate:
            return Outcome(
                letter,
                "left",
                "a TRUNCATE must wait for the older entries of its stream: replay it without"
                " --direct",
            )
        if planned.skip is not None:
            action, detail = "nothing", f"a {planned.skip.value}: nothing to apply"
        elif not planned.rows:
            action, detail = "nothing", "no row to apply"
        elif dry_run:
            return Outcome(letter, "applied", f"would apply {len(planned.rows)} row(s)")
        else:
            try:
                replies = self.library.batch(planned.rows, self.core.tombstone_ms)
            except redis.ResponseError as exc:
                return Outcome(letter, "left", f"redis error: {exc}")
            errors = [s for s in replies if isinstance(s, str)]
            if errors:
                return Outcome(letter, "left", f"redis error: {errors[0]}")
            statuses = Counter(s.outcome for s in replies if isinstance(s, RowStatus))
            action = "applied" if "applied" in statuses else next(iter(statuses))
            detail = "rows: " + ", ".join(f"{n} {o}" for o, n in statuses.items())
        if dry_run:
            return Outcome(letter, action, "would remove: " + detail)
        self.client.xdel(self.dlq, letter.dlq_id)
        return Outcome(letter, action, detail)


# -- the commands --------------------------------------------------------------------------


def _fail(message: str, code: int = ExitCode.FAILURE) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(code)


@contextlib.contextmanager
def _session(config_path: Path, command: str) -> Iterator[DeadLetters]:
    """The dead letters of the configuration's Redis; Redis errors end the command with one
    line and exit code 1."""
    settings = load_or_exit(config_path)
    client = connection.client(settings.redis, decode_responses=False, protocol=2)
    try:
        yield DeadLetters(client, settings)
    except DlqError as exc:
        _fail(f"dlq {command}: {exc}")
    except LibraryIncompatibleError as exc:
        _fail(f"dlq {command}: {exc}", ExitCode.LIBRARY_INCOMPATIBLE)
    except redis.RedisError as exc:
        _fail(f"dlq {command}: redis: {' '.join(str(exc).split())}")
    finally:
        client.close()


def _check_ids(
    _ctx: click.Context, _param: click.Parameter, ids: tuple[str, ...]
) -> tuple[str, ...]:
    return tuple(_check_one(dlq_id) for dlq_id in ids)


def _check_one(dlq_id: str) -> str:
    if not ID_RE.match(dlq_id):
        raise click.BadParameter(f"{dlq_id!r} is not a stream id (<ms>-<seq>)")
    return dlq_id


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


@click.group("dlq", context_settings={"help_option_names": ["-h", "--help"]})
def dlq_group() -> None:
    """Inspect, replay and purge dead letters (<stream>:dlq).

    An entry a worker cannot apply is written to its stream's dead-letter stream with the
    reason, and acknowledged. Fix the cause (often the configuration), then replay it.
    """


@dlq_group.command("list")
@config_option
@click.option(
    "--stream", metavar="STREAM", help="Only this source stream (default: every source stream)."
)
@click.option(
    "--count",
    default=DEFAULT_COUNT,
    show_default=True,
    type=click.IntRange(min=0),
    help="Newest dead letters shown per stream.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_command(config_path: Path, stream: str | None, count: int, as_json: bool) -> None:
    """Per stream: how many dead letters it has, and the newest ones."""
    with _session(config_path, "list") as store:
        streams = [stream] if stream is not None else store.source_streams()
        report = []
        for name in streams:
            dlq = store.check_stream(name)
            letters = store.newest(dlq, count) if count else []
            report.append((name, dlq, store.length(dlq), letters))
    if as_json:
        _echo_json(
            {
                "streams": [
                    {
                        "stream": name,
                        "dlq": dlq,
                        "length": length,
                        "entries": [letter.summary() for letter in letters],
                    }
                    for name, dlq, length, letters in report
                ]
            }
        )
        return
    if not report:
        click.echo("no source streams found")
    for _, dlq, length, letters in report:
        if not length:
            click.echo(f"{dlq}: empty")
            continue
        shown = f", newest {len(letters)}" if letters and len(letters) < length else ""
        click.echo(f"{dlq}: {length} dead letter(s){shown}")
        if not letters:
            continue
        rows = [("DLQ ID", "ORIGINAL ID", "FAILED AT (UTC)", "DELIVERIES", "CONSUMER", "REASON")]
        for letter in letters:
            failed = letter.failed_at_ms
            original = letter.meta.get("id")
            rows.append(
                (
                    as_text(letter.dlq_id),
                    as_text(original) if original is not None else "?",
                    iso_utc(failed) if failed is not None else "?",
                    str(letter.deliveries) if letter.deliveries is not None else "?",
                    letter.consumer,
                    _shorten(letter.problem or letter.reason, REASON_WIDTH),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
            click.echo("  " + "  ".join([*cells, row[-1]]))


@dlq_group.command("show")
@config_option
@click.option(
    "--stream", required=True, metavar="STREAM", help="The source stream (its DLQ is <stream>:dlq)."
)
@click.argument("dlq_id", metavar="ID", callback=lambda ctx, param, value: _check_one(value))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--raw", is_flag=True, help="Print values verbatim, JSON not re-indented.")
def show_command(config_path: Path, stream: str, dlq_id: str, as_json: bool, raw: bool) -> None:
    """One dead letter: its metadata and the original entry's fields."""
    with _session(config_path, "show") as store:
        dlq = store.check_stream(stream)
        letter = store.get(dlq, dlq_id)
        if letter is None:
            raise DlqError(f"no dead letter {dlq_id} in {dlq}")
    pairs = letter.fields if letter.fields is not None else []
    pairs_list = list(zip(pairs[0::2], pairs[1::2], strict=True))
    if as_json:
        data = {"dlq": dlq, **letter.summary()}
        data["entry"] = [_field_json(name, value) for name, value in pairs_list]
        if letter.problem is not None:
            raw_pairs = zip(letter.raw[0::2], letter.raw[1::2], strict=False)
            data["raw"] = [_field_json(n, v) for n, v in raw_pairs]
        _echo_json(data)
        return
    click.echo(f"dead letter {as_text(letter.dlq_id)} in {dlq}")
    if letter.problem is not None:
        click.echo(f"  ({letter.problem}; its fields as stored:)")
        for raw_name, raw_value in zip(letter.raw[0::2], letter.raw[1::2], strict=False):
            click.echo(f"  {as_text(raw_name)}: {as_text(raw_value)}")
        return
    width = max(len(meta) for meta in deadletter.META_FIELDS) + 1
    for meta in deadletter.META_FIELDS:
        text = as_text(letter.meta[meta])
        if meta == "failed_at_ms" and letter.failed_at_ms is not None:
            text += f" ({iso_utc(letter.failed_at_ms)})"
        click.echo(f"  {(meta + ':').ljust(width)} {text}")
    click.echo(f"original entry, {len(pairs_list)} field/value pair(s):")
    for name, value in pairs_list:
        click.echo(f"  field: {as_text(name)}")
        pretty = None if raw else _pretty_json(value)
        if pretty is None:
            click.echo(f"  value: {as_text(value)}")
        else:
            click.echo("  value (JSON, indented):")
            for line in pretty.splitlines():
                click.echo("    " + line)


def _selected(
    store: DeadLetters, dlq: str, ids: tuple[str, ...], all_entries: bool
) -> Iterator[DeadLetter | str]:
    """The dead letters named (an id not found is yielded as is), or all of them."""
    if all_entries:
        yield from store.walk(dlq)
        return
    for dlq_id in sorted(set(ids), key=lambda i: tuple(map(int, i.split("-")))):
        letter = store.get(dlq, dlq_id)
        yield letter if letter is not None else dlq_id


@dlq_group.command("replay")
@config_option
@click.option(
    "--stream", required=True, metavar="STREAM", help="The source stream (its DLQ is <stream>:dlq)."
)
@click.argument("ids", nargs=-1, metavar="[ID ...]", callback=_check_ids)
@click.option("--all", "all_entries", is_flag=True, help="Every dead letter of the stream.")
@click.option(
    "--direct",
    is_flag=True,
    help="Apply the entries here, as the worker would, instead of re-adding them to the stream.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Re-add entries even when this configuration cannot apply them (not with --direct).",
)
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
def replay_command(  # noqa: PLR0917 (click passes every option)
    config_path: Path,
    stream: str,
    ids: tuple[str, ...],
    all_entries: bool,
    direct: bool,
    force: bool,
    dry_run: bool,
) -> None:
    """Put dead letters back to work, oldest first.

    By default each entry's original fields are re-added verbatim to the source stream (and the
    dead letter deleted, in one transaction) for the workers to apply again; positions make a
    change already applied a no-op. With --direct the entry is decoded, mapped and applied here,
    with the workers' function call, and deleted once applied (or found stale). Entries this
    configuration still cannot apply are left in place with the reason (exit code 2).
    """
    if all_entries == bool(ids):
        raise click.UsageError("name dead-letter ids, or use --all")
    if force and direct:
        raise click.UsageError("--force applies to a replay through the stream, not --direct")
    done = left = 0
    with _session(config_path, "replay") as store:
        dlq = store.check_stream(stream)
        replayer = Replayer(store, stream, force=force)
        if direct and not dry_run:
            replayer.library.ensure()
        step: Callable[[DeadLetter, bool], Outcome] = replayer.apply if direct else replayer.requeue
        for letter in _selected(store, dlq, ids, all_entries):
            if isinstance(letter, str):
                click.echo(f"{letter}: not in {dlq} (already replayed or purged?)")
                continue
            outcome = step(letter, dry_run)
            original = as_text(letter.meta.get("id", b"?"))
            prefix = f"{as_text(letter.dlq_id)} (entry {original})"
            if outcome.left:
                left += 1
                click.echo(f"{prefix}: left: {outcome.detail}")
            else:
                done += outcome.action != "gone"
                detail = f" ({outcome.detail})" if outcome.detail else ""
                click.echo(f"{prefix}: {outcome.action}{detail}")
    verb = "would replay" if dry_run else "replayed"
    click.echo(f"{stream}: {verb} {done}, left {left} in {dlq}" + (" (dry run)" if dry_run else ""))
    if left:
        sys.exit(ExitCode.UNHEALTHY)


@dlq_group.command("purge")
@config_option
@click.option(
    "--stream", required=True, metavar="STREAM", help="The source stream (its DLQ is <stream>:dlq)."
)
@click.argument("ids", nargs=-1, metavar="[ID ...]", callback=_check_ids)
@click.option("--all", "all_entries", is_flag=True, help="Every dead letter of the stream.")
@click.option(
    "--older-than-s",
    type=click.IntRange(min=0),
    help="Dead letters written more than this many seconds ago.",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
def purge_command(  # noqa: PLR0917 (click passes every option)
    config_path: Path,
    stream: str,
    ids: tuple[str, ...],
    all_entries: bool,
    older_than_s: int | None,
    yes: bool,
    dry_run: bool,
) -> None:
    """Delete dead letters for good: by id, --all, or --older-than-s N."""
    if sum((bool(ids), all_entries, older_than_s is not None)) != 1:
        raise click.UsageError("name dead-letter ids, or use --all, or --older-than-s N")
    with _session(config_path, "purge") as store:
        dlq = store.check_stream(stream)
        client = store.client
        if ids:
            found = [i for i in sorted(set(ids)) if store.get(dlq, i) is not None]
            for missing in sorted(set(ids) - set(found)):
                click.echo(f"{missing}: not in {dlq}")
            count, what = len(found), f"{len(found)} dead letter(s) from {dlq}"
        elif all_entries:
            newest = store.newest(dlq, 1)
            count = store.length(dlq)
            what = f"all {count} dead letter(s) of {dlq}"
        else:
            assert older_than_s is not None
            cutoff = int(time.time() * 1000) - older_than_s * 1000
            count = store.count_older(dlq, cutoff)
            what = f"{count} dead letter(s) older than {iso_utc(max(cutoff, 0))} from {dlq}"
        if not count:
            click.echo(f"{dlq}: nothing to purge")
            return
        if dry_run:
            click.echo(f"would delete {what} (dry run)")
            return
        if not yes:
            click.confirm(f"delete {what}?", abort=True)
        if ids:
            deleted = int(client.xdel(dlq, *found))
        elif all_entries:
            # up to the newest one seen: what was dead-lettered since the question stays
            ms, _, seq = newest[0].dlq_id.decode().partition("-")
            deleted = int(client.xtrim(dlq, minid=f"{ms}-{int(seq) + 1}", approximate=False))
        else:
            deleted = int(client.xtrim(dlq, minid=max(cutoff, 0), approximate=False))
    click.echo(f"{dlq}: deleted {deleted} dead letter(s)")
