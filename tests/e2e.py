"""End-to-end harness: ``streamsync capture`` subprocesses, their configuration, and the comparator.

A capture runs the real embedded Debezium engine as ``python -m streamsync capture`` (one JVM per
process; SIGTERM and SIGKILL are test inputs) against the test's PostgreSQL, writing into the
test's Redis. ``CaptureSetup.write`` builds a capture from properties of its own (the capture
tests); ``CaptureSetup.shipped`` starts from the shipped ``debezium/application.properties`` and
changes only what one test needs through ``capture.overrides``, as a developer running
``streamsync capture`` outside the compose stack would.

The comparator checks a whole table against Redis. What each row must look like is computed by
SQL in the test (``to_char``, ``encode``, ``extract(epoch ...)``), never by streamsync's code, so
a decoding or mapping bug cannot hide behind the very function that has it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, cast

import pytest
import redis
import yaml

from streamsync.embedded.sandbox import die_with_parent_hook
from tests.replies import xadd, xrange
from tests.servers import PostgresServer, wait_until
from tests.workers import WorkerProcess

#: Makes a test's pipelines: ``Pipeline.create`` arguments after the fixtures (conftest's
#: ``pipelines`` fixture).
MakePipeline = Callable[..., "Pipeline"]

__all__ = [
    "ENTRIES_TIMEOUT_S",
    "FAIL_FAST_TIMEOUT_S",
    "GROUP",
    "PLACEHOLDER",
    "POSITION_PREFIX",
    "REDIS_OFFSET_STORE",
    "SETTLE_TIMEOUT_S",
    "SHIPPED_PROPERTIES",
    "STOP_TIMEOUT_S",
    "CaptureProcess",
    "CaptureSetup",
    "Kind",
    "KnownBugError",
    "Pipeline",
    "StreamEntries",
    "assert_no_placeholder",
    "assert_settled",
    "assert_table_matches",
    "debezium_properties",
    "entries",
    "entries_added",
    "expected_rows",
    "known_bug",
    "needs_engine",
    "positions",
    "replay_sample",
    "run_to_exit",
    "table_mismatches",
    "values",
    "wait_for_added",
    "wait_for_entries",
    "wait_for_event",
    "wait_settled",
    "xrange",
]

ROOT = Path(__file__).parent.parent
SHIPPED_PROPERTIES = ROOT / "debezium" / "application.properties"

#: Deadlines: a JVM start plus the first snapshot takes 2-5 s here; generous for slow CI.
ENTRIES_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
FAIL_FAST_TIMEOUT_S = 15.0
#: How long the workers may take to read and settle everything capture wrote.
SETTLE_TIMEOUT_S = 60.0

REDIS_OFFSET_STORE = "io.debezium.storage.redis.offset.RedisOffsetBackingStore"
#: streamsync's default consumer group and position-record prefix.
GROUP = "streamsync"
POSITION_PREFIX = "streamsync:pos:"
#: Debezium's unavailable-TOAST placeholder, and its base64 form (bytea columns).
PLACEHOLDER = "__debezium_unavailable_value"
_PLACEHOLDER_FORMS = (PLACEHOLDER.encode(), base64.b64encode(PLACEHOLDER.encode()))


#: Marks a test that needs the real engine: skipped where it is missing, failed in CI (CI=true):
#: an install step must not go missing.
needs_engine = pytest.mark.usefixtures("embedded_engine")


class KnownBugError(AssertionError):
    """A failure that is a reported bug: ``xfail(raises=KnownBugError, strict=True)`` expects this
    failure and no other, so the test still fails if it breaks in any other way."""


@contextlib.contextmanager
def known_bug(symptom: str) -> Iterator[None]:
    """Turn an AssertionError whose message matches the regex ``symptom`` into ``KnownBugError``."""
    try:
        yield
    except AssertionError as exc:
        if re.search(symptom, str(exc)):
            raise KnownBugError(str(exc)) from None
        raise


# -- capture configuration -----------------------------------------------------------------


def debezium_properties(dbname: str, name: str) -> dict[str, str]:
    """Debezium Server properties for ``public.items`` of ``dbname``, unique slot and names.

    Host and port are the compose stack's (``postgres:5432``): the streamsync config overrides
    them, as a developer running capture outside the containers would.
    """
    return {
        "debezium.sink.type": "redis",
        # Ignored by capture, which writes to streamsync's redis.url.
        "debezium.sink.redis.address": "redis:6379",
        "debezium.source.connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "debezium.source.database.hostname": "postgres",
        "debezium.source.database.port": "5432",
        "debezium.source.database.user": "postgres",
        "debezium.source.database.password": "postgres",
        "debezium.source.database.dbname": dbname,
        "debezium.source.plugin.name": "pgoutput",
        "debezium.source.slot.name": f"slot_{name}",
        "debezium.source.slot.drop.on.stop": "false",
        "debezium.source.publication.name": f"pub_{name}",
        "debezium.source.publication.autocreate.mode": "filtered",
        "debezium.source.topic.prefix": name,
        "debezium.source.table.include.list": "public.items",
        "debezium.source.tombstones.on.delete": "false",
        # The container's Redis offset store: capture replaces it with a file.
        "debezium.source.offset.storage": REDIS_OFFSET_STORE,
        "debezium.source.offset.storage.redis.address": "redis:6379",
        "debezium.source.offset.flush.interval.ms": "200",
        "debezium.format.key.schemas.enable": "false",
        "debezium.format.value.schemas.enable": "false",
    }


def _unique_prefix() -> str:
    return f"cap{uuid.uuid4().hex[:10]}"


@dataclass
class CaptureSetup:
    """A streamsync config (worker and capture sections) for one test, in a directory of its own.

    ``tables`` are the captured tables of schema ``public``; each has the stream
    ``<prefix>.public.<table>``.
    """

    dir: Path
    config: Path
    properties: Path
    prefix: str
    tables: tuple[str, ...] = ("items",)

    @property
    def stream(self) -> str:
        """The stream of the first table (``public.items`` for ``write``)."""
        return self.stream_for(self.tables[0])

    @property
    def streams(self) -> list[str]:
        """The streams of every captured table."""
        return [self.stream_for(t) for t in self.tables]

    def stream_for(self, table: str) -> str:
        """The stream Debezium names for ``public.<table>``."""
        return f"{self.prefix}.public.{table}"

    @property
    def offsets_file(self) -> Path:
        """Where the engine keeps its offsets (``capture.offsets_file``)."""
        return self.dir / "state" / "offsets.dat"

    @property
    def slot(self) -> str:
        """The replication slot of this capture."""
        return f"slot_{self.prefix}"

    @classmethod
    def write(
        cls,
        dir: Path,
        pg: PostgresServer,
        dbname: str,
        redis_url: str,
        extra: Mapping[str, str] | None = None,
        *,
        port: int | None = None,
    ) -> Self:
        """Properties of its own (``debezium_properties`` plus ``extra``) for ``public.items``,
        with an invalidate rule; host and port come from ``capture.overrides``."""
        dir.mkdir(parents=True, exist_ok=True)
        prefix = _unique_prefix()
        props = debezium_properties(dbname, prefix) | dict(extra or {})
        properties = dir / "debezium.properties"
        properties.write_text(
            "# written by tests/e2e.py\n"
            + "".join(f"{key}={value}\n" for key, value in props.items())
        )
        config = dir / "streamsync.yaml"
        data: dict[str, Any] = {
            "redis": {"url": redis_url},
            "source": {"streams": [f"{prefix}.public.items"]},
            "rules": [{"table": "public.items", "mode": "invalidate", "key": "item:{id}"}],
            "capture": {
                "properties": "debezium.properties",
                "offsets_file": "state/offsets.dat",
                "overrides": {
                    "debezium.source.database.hostname": "127.0.0.1",
                    "debezium.source.database.port": str(port if port is not None else pg.port),
                },
            },
        }
        config.write_text(yaml.safe_dump(data))
        return cls(dir, config, properties, prefix)

    @classmethod
    def shipped(
        cls,
        dir: Path,
        pg: PostgresServer,
        dbname: str,
        redis_url: str,
        *,
        tables: Sequence[str],
        rules: Sequence[Mapping[str, Any]],
        worker: Mapping[str, Any] | None = None,
        overrides: Mapping[str, str] | None = None,
    ) -> Self:
        """The shipped ``debezium/application.properties`` as is, with ``capture.overrides``
        for what differs per test: the database (127.0.0.1, the test server's port and
        database), a unique slot, publication and topic prefix, and the captured ``tables``
        (schema ``public``). ``worker`` settings are merged over fast test timings; ``rules``
        are streamsync rules. One file configures the worker and the capture."""
        dir.mkdir(parents=True, exist_ok=True)
        prefix = _unique_prefix()
        include = ",".join(f"public.{t}" for t in tables)
        capture_overrides = {
            "debezium.source.database.hostname": "127.0.0.1",
            "debezium.source.database.port": str(pg.port),
            "debezium.source.database.dbname": dbname,
            "debezium.source.slot.name": f"slot_{prefix}",
            "debezium.source.publication.name": f"pub_{prefix}",
            "debezium.source.topic.prefix": prefix,
            "debezium.source.table.include.list": include,
            **(overrides or {}),
        }
        data: dict[str, Any] = {
            "redis": {"url": redis_url},
            "source": {"streams": [f"{prefix}.public.{t}" for t in tables], "group": GROUP},
            "worker": {
                "block_ms": 100,
                "claim_interval_ms": 200,
                "trim_interval_ms": 200,
                **(worker or {}),
            },
            "rules": [dict(rule) for rule in rules],
            "capture": {
                "properties": str(SHIPPED_PROPERTIES),
                "offsets_file": "state/offsets.dat",
                "overrides": capture_overrides,
            },
        }
        config = dir / "streamsync.yaml"
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        return cls(dir, config, SHIPPED_PROPERTIES, prefix, tuple(tables))


# -- the capture process -------------------------------------------------------------------


class CaptureProcess:
    """One ``python -m streamsync capture`` child process, its log in a file of the test."""

    def __init__(self, setup: CaptureSetup, env: Mapping[str, str] | None = None) -> None:
        self.setup = setup
        self.env = {**os.environ, **(env or {})}
        self.log_path = setup.dir / f"capture-{uuid.uuid4().hex[:6]}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        """Launch the capture; return ``self``."""
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "streamsync", "capture", "-c", str(self.setup.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Where a default log4j2 configuration would create logs/.
                cwd=self.setup.dir,
                env=self.env,
                preexec_fn=die_with_parent_hook(),  # noqa: PLW1509
            )
        return self

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        """The child process (after ``start()``)."""
        assert self._proc is not None, "not started"
        return self._proc

    @property
    def running(self) -> bool:
        """Whether the capture process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        """The capture's whole log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait(self, timeout: float) -> int:
        """The exit code; AssertionError with the log if it is still running at the deadline."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"capture did not exit within {timeout:g}s; log:\n{self.log()}"
            ) from None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM; the exit code (AssertionError if it overstays ``timeout``)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def assert_alive(self) -> None:
        """AssertionError with the log if the capture has exited."""
        if not self.running:
            raise AssertionError(f"capture exited with {self.proc.returncode}; log:\n{self.log()}")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.running:
            self.proc.kill()
            self.proc.wait(timeout=10)


def run_to_exit(setup: CaptureSetup, env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Run capture until it exits by itself; (exit code, log)."""
    proc = CaptureProcess(setup, env)
    with proc:
        code = proc.wait(FAIL_FAST_TIMEOUT_S)
    return code, proc.log()


# -- reading the streams -------------------------------------------------------------------


#: Stream entries as a bytes client returns them: (id, field/value map).
StreamEntries = list[tuple[bytes, dict[bytes, bytes]]]


def entries(r: redis.Redis, stream: str) -> list[dict[bytes, bytes]]:
    """The field/value maps of every entry still in ``stream``."""
    return [fields for _, fields in xrange(r, stream)]


def values(r: redis.Redis, stream: str) -> list[dict[str, Any]]:
    """The change events (values) of a compact stream; tombstones are left out."""
    out = []
    for fields in entries(r, stream):
        [(_, value)] = fields.items()
        if value != b"default":
            out.append(json.loads(value))
    return out


def entries_added(r: redis.Redis, stream: str) -> int:
    """How many entries were ever added to ``stream`` (trimmed ones included); 0 if absent."""
    try:
        return int(r.xinfo_stream(stream)["entries-added"])
    except redis.ResponseError:
        return 0


def wait_for_added(
    r: redis.Redis,
    capture: CaptureProcess,
    stream: str,
    count: int,
    timeout: float = ENTRIES_TIMEOUT_S,
) -> None:
    """Wait until capture has added ``count`` entries to ``stream`` in all (trimming does not
    hide them); AssertionError if the capture exits or the deadline passes."""

    def enough() -> bool:
        capture.assert_alive()
        return entries_added(r, stream) >= count

    try:
        wait_until(enough, timeout=timeout, interval=0.05, message=f"{count} entries in {stream}")
    except AssertionError as exc:
        raise AssertionError(f"{exc} (have {entries_added(r, stream)})") from None


def wait_for_entries(r: redis.Redis, capture: CaptureProcess, count: int) -> None:
    """Wait until the setup's first stream holds ``count`` entries."""
    stream = capture.setup.stream

    def enough() -> bool:
        capture.assert_alive()
        return int(r.xlen(stream)) >= count

    wait_until(enough, timeout=ENTRIES_TIMEOUT_S, interval=0.05, message=f"{count} in {stream}")


# -- the consumer group --------------------------------------------------------------------


def _group(r: redis.Redis, stream: str, group: str) -> dict[str, Any] | None:
    try:
        infos = r.xinfo_groups(stream)
    except redis.ResponseError:
        return None
    for info in infos:
        if info["name"] == group.encode():
            return dict(info)
    return None


def _unsettled(r: redis.Redis, stream: str, group: str) -> str | None:
    """Why ``group`` has not settled ``stream`` yet, or None once it read and acked everything."""
    info = _group(r, stream, group)
    if info is None:
        return f"{stream}: no group {group!r}"
    last = r.xinfo_stream(stream)["last-generated-id"]
    if info["last-delivered-id"] != last:
        return f"{stream}: read up to {info['last-delivered-id']!r} of {last!r}"
    if info["pending"]:
        return f"{stream}: {info['pending']} entries pending"
    return None


def assert_settled(r: redis.Redis, streams: Iterable[str], group: str = GROUP) -> None:
    """The group read every entry of every stream, holds nothing pending (XPENDING), and
    dead-lettered nothing."""
    for stream in streams:
        summary = r.xpending(stream, group)
        assert summary["pending"] == 0, f"{stream}: entries left pending: {summary}"
        problem = _unsettled(r, stream, group)
        assert problem is None, problem
        dlq = entries(r, f"{stream}:dlq")
        assert not dlq, f"{stream}: dead-lettered entries: {dlq[:3]}"


def wait_settled(
    r: redis.Redis,
    streams: Iterable[str],
    workers: Iterable[WorkerProcess] = (),
    group: str = GROUP,
    timeout: float = SETTLE_TIMEOUT_S,
) -> None:
    """Wait until the group has read and acknowledged every entry of ``streams``, then check it
    with ``assert_settled``. ``workers`` (WorkerProcess) must stay alive meanwhile."""
    streams = list(streams)
    workers = list(workers)
    state = {"why": "not checked yet"}

    def settled() -> bool:
        for worker in workers:
            assert worker.running, f"{worker!r} exited; log:\n{worker.log_tail()}"
        for stream in streams:
            why = _unsettled(r, stream, group)
            if why is not None:
                state["why"] = why
                return False
        return True

    try:
        wait_until(settled, timeout=timeout, interval=0.05, message="the group to settle")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {state['why']}") from None
    assert_settled(r, streams, group)


# -- the comparator ------------------------------------------------------------------------

#: ``json`` a JSON text (GET), ``redisjson`` a RedisJSON document (JSON.GET).
Kind = Literal["hash", "json", "redisjson"]


def expected_rows(
    pg: PostgresServer, dbname: str, query: str, params: Sequence[Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Run ``query``; each row is (the Redis key, a JSON object: the row as Redis must hold it).

    For a hash rule every member is the exact text of the field or null (no field); for a json
    rule the object is the document. Build the object in SQL (``json_build_object``), with the
    encodings computed there, so the expectation owes nothing to streamsync.
    """
    out: dict[str, dict[str, Any]] = {}
    for key, row in pg.execute(query, params, dbname=dbname):
        doc = json.loads(row) if isinstance(row, str) else row
        assert isinstance(key, str) and isinstance(doc, dict), f"bad expectation row {key!r}"
        assert key not in out, f"the expectation query names {key!r} twice"
        out[key] = doc
    return out


def _scan(r: redis.Redis, pattern: str) -> set[str]:
    return {k.decode() for k in r.scan_iter(match=pattern, count=1000)}


def _hash_problem(key: str, want: Mapping[str, Any], got: Mapping[bytes, bytes]) -> str | None:
    for column, value in want.items():
        assert value is None or isinstance(value, str), (
            f"{key}: expected hash values are text or null, got {column}={value!r}"
        )
    want_fields = {c: v for c, v in want.items() if v is not None}
    got_fields = {f.decode(): v.decode(errors="replace") for f, v in got.items()}
    if got_fields == want_fields:
        return None
    diffs = [
        f"{c}: want {_short(want_fields.get(c))}, got {_short(got_fields.get(c))}"
        for c in sorted(set(want_fields) | set(got_fields))
        if want_fields.get(c) != got_fields.get(c)
    ]
    return f"{key}: " + "; ".join(diffs)


def _json_problem(key: str, want: Mapping[str, Any], got: bytes | None) -> str | None:
    if got is None:
        return f"{key}: not a string (json rule)"
    try:
        doc = json.loads(got)
    except ValueError:
        return f"{key}: not JSON: {_short(got.decode(errors='replace'))}"
    if _same_json(doc, want):
        return None
    if not isinstance(doc, dict):
        return f"{key}: not a JSON object: {_short(got.decode(errors='replace'))}"
    absent = object()
    diffs = [
        f"{c}: want {_short(want.get(c, '<absent>'))}, got {_short(doc.get(c, '<absent>'))}"
        for c in sorted(set(want) | set(doc))
        if not _same_json(want.get(c, absent), doc.get(c, absent))
    ]
    return f"{key}: " + "; ".join(diffs)


def _same_json(a: Any, b: Any) -> bool:
    """Equal JSON values, types included: unlike ``==``, ``true`` is not ``1`` nor ``1.0``."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def table_mismatches(
    r: redis.Redis, pattern: str, kind: Kind, expected: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """Every difference between Redis and ``expected`` (see ``expected_rows``).

    The keys matching ``pattern`` (SCAN) must be exactly the expected ones: a deleted row's key
    must be gone. A hash must have exactly the non-null columns as fields, each with the expected
    text; a JSON document must equal the expected object (nulls included).
    """
    problems: list[str] = []
    present = _scan(r, pattern)
    for key in sorted(present - set(expected)):
        problems.append(f"{key}: in Redis, but no such row in the table")
    for key in sorted(set(expected) - present):
        problems.append(f"{key}: row in the table, but no key in Redis")
    both = sorted(present & set(expected))
    pipe = r.pipeline(transaction=False)
    for key in both:
        if kind == "hash":
            pipe.hgetall(key)
        elif kind == "redisjson":
            pipe.execute_command("JSON.GET", key)
        else:
            pipe.get(key)
    for key, got in zip(both, pipe.execute(raise_on_error=False), strict=True):
        if isinstance(got, redis.ResponseError):
            problems.append(f"{key}: {got} (wrong type for a {kind} rule?)")
            continue
        problem = (
            _hash_problem(key, expected[key], got)
            if kind == "hash"
            else _json_problem(key, expected[key], got)
        )
        if problem:
            problems.append(problem)
    return problems


def assert_table_matches(
    r: redis.Redis,
    pg: PostgresServer,
    dbname: str,
    *,
    pattern: str,
    kind: Kind,
    query: str,
) -> dict[str, dict[str, Any]]:
    """The whole table, as ``query`` renders it (see ``expected_rows``), equals the keys of
    ``pattern`` in Redis, row by row; returns the expectation."""
    expected = expected_rows(pg, dbname, query)
    problems = table_mismatches(r, pattern, kind, expected)
    assert not problems, (
        f"{len(problems)} differences between the table ({len(expected)} rows) and Redis "
        f"({pattern}, {kind}):\n" + "\n".join(problems[:20])
    )
    return expected


def assert_no_placeholder(r: redis.Redis) -> int:
    """No key other than a stream holds the unavailable-TOAST placeholder (in a hash field name
    or value, or a string); returns how many keys were looked at."""
    seen = 0
    found: list[str] = []
    for raw_key in r.scan_iter(count=1000):
        kind = r.type(raw_key)
        if kind == b"stream":
            continue
        seen += 1
        if kind == b"hash":
            fields = cast(dict[bytes, bytes], r.hgetall(raw_key))
            blobs = [b for pair in fields.items() for b in pair]
        elif kind == b"string":
            blobs = [cast(bytes | None, r.get(raw_key)) or b""]
        else:
            blobs = []
        if any(form in blob for blob in blobs for form in _PLACEHOLDER_FORMS):
            found.append(raw_key.decode(errors="replace"))
    assert not found, f"the TOAST placeholder was written into Redis: {found[:10]}"
    return seen


def positions(r: redis.Redis, keys: Iterable[str]) -> dict[str, str | None]:
    """The source position each key's position record holds (``streamsync.positions``: they
    compare as strings), None if it has none."""
    keys = list(keys)
    names = [f"{POSITION_PREFIX}{{{key}}}" for key in keys]
    records = cast(list[bytes | None], r.mget(names) if keys else [])
    return {
        key: None if record is None else record.split(b"|", 1)[0].decode()
        for key, record in zip(keys, records, strict=True)
    }


def wait_for_event(
    r: redis.Redis,
    capture: CaptureProcess,
    stream: str,
    predicate: Callable[[dict[str, Any]], bool],
    *,
    what: str,
    timeout: float = ENTRIES_TIMEOUT_S,
) -> dict[str, Any]:
    """Wait until an event of ``stream`` (still in it: run such tests with ``trim: false``)
    satisfies ``predicate``; return it."""
    found: list[dict[str, Any]] = []
    seen: dict[str, bytes] = {"last": b"-"}

    def arrived() -> bool:
        capture.assert_alive()
        for entry_id, fields in xrange(r, stream, seen["last"]):
            seen["last"] = b"(" + entry_id
            [(_, value)] = fields.items()
            if value != b"default" and predicate(json.loads(value)):
                found.append(json.loads(value))
                return True
        return False

    wait_until(arrived, timeout=timeout, interval=0.05, message=f"{what} in {stream}")
    return found[0]


# -- one test's pipeline -------------------------------------------------------------------


class Pipeline:
    """One test's whole pipeline: its database, its configuration, the Redis both write to, and
    the capture and worker processes it started (all killed by ``close``).

    Made by ``Pipeline.create`` from the shipped Debezium properties (``CaptureSetup.shipped``).
    """

    def __init__(
        self, pg: PostgresServer, dbname: str, r: redis.Redis, setup: CaptureSetup
    ) -> None:
        self.pg = pg
        self.dbname = dbname
        self.r = r
        self.setup = setup
        self._captures: list[CaptureProcess] = []
        self._workers: list[WorkerProcess] = []

    @classmethod
    def create(
        cls,
        dir: Path,
        pg: PostgresServer,
        dbname: str,
        r: redis.Redis,
        redis_url: str,
        *,
        tables: Sequence[str],
        rules: Sequence[Mapping[str, Any]],
        worker: Mapping[str, Any] | None = None,
        overrides: Mapping[str, str] | None = None,
    ) -> Self:
        """A pipeline over ``tables`` of ``dbname`` (see ``CaptureSetup.shipped``)."""
        setup = CaptureSetup.shipped(
            dir,
            pg,
            dbname,
            redis_url,
            tables=tables,
            rules=rules,
            worker=worker,
            overrides=overrides,
        )
        return cls(pg, dbname, r, setup)

    def sql(self, query: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run SQL on the test database (autocommit); its rows, if any. Without ``params``,
        several statements in one text run as one transaction."""
        return self.pg.execute(query, params, dbname=self.dbname)

    def start_capture(self) -> CaptureProcess:
        """Start a capture; it is killed at ``close`` if still running."""
        capture = CaptureProcess(self.setup).start()
        self._captures.append(capture)
        return capture

    def worker_config(self, name: str, **worker: Any) -> Path:
        """A copy of the configuration with ``worker`` settings changed, named ``name``."""
        data = yaml.safe_load(self.setup.config.read_text())
        data["worker"] = {**data.get("worker", {}), **worker}
        path = self.setup.dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def start_worker(self, consumer: str, config: Path | None = None) -> WorkerProcess:
        """Start ``streamsync run`` as ``consumer``; it is killed at ``close`` if still running."""
        worker = WorkerProcess(config or self.setup.config, consumer, self.setup.dir / "logs")
        self._workers.append(worker.start())
        return worker

    def wait_for_added(self, capture: CaptureProcess, count: int, table: str | None = None) -> None:
        """Wait until ``count`` entries were added to ``table``'s stream (default: the first)."""
        stream = self.setup.stream_for(table) if table else self.setup.stream
        wait_for_added(self.r, capture, stream, count)

    def settle(self, *workers: WorkerProcess) -> None:
        """Wait until the group has read and acknowledged every entry of every stream."""
        wait_settled(self.r, self.setup.streams, workers)

    def assert_table(self, pattern: str, kind: Kind, query: str) -> dict[str, dict[str, Any]]:
        """The whole table equals Redis (see ``assert_table_matches``)."""
        return assert_table_matches(
            self.r, self.pg, self.dbname, pattern=pattern, kind=kind, query=query
        )

    def close(self) -> None:
        """Kill whatever is still running."""
        for capture in self._captures:
            if capture.running:
                capture.proc.kill()
                capture.proc.wait(timeout=10)
        for worker in self._workers:
            worker.close()


def replay_sample(p: Pipeline, rng: random.Random) -> tuple[int, int]:
    """XADD again a shuffled sample of the entries already applied (about half of every stream,
    and every TRUNCATE); returns (entries added, truncates among them)."""
    picked: list[tuple[str, dict[bytes, bytes]]] = []
    truncates = 0
    for stream in p.setup.streams:
        all_entries = entries(p.r, stream)
        chosen = set(rng.sample(range(len(all_entries)), len(all_entries) // 2))
        for i, fields in enumerate(all_entries):
            is_truncate = any(b'"op":"t"' in value for value in fields.values())
            if i in chosen or is_truncate:
                picked.append((stream, fields))
                truncates += is_truncate
    rng.shuffle(picked)
    for stream, fields in picked:
        xadd(p.r, stream, fields)
    return len(picked), truncates
