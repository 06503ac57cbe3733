"""``streamsync demo``: the whole pipeline on throw-away servers, watched side by side.

Starts a PostgreSQL (wal_level=logical) and a redis-server from the local binaries, or uses the
ones given by URL; creates a demo ``users`` table; runs ``streamsync capture`` (the real Debezium
engine) and ``streamsync run`` as child processes; makes a few changes and shows each database
row next to its Redis key as they change. Ctrl-C stops and removes everything it started.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import redis
import yaml
from rich.console import Console
from rich.table import Table

from streamsync.config import redact_url
from streamsync.embedded.sandbox import (
    PostgresServer,
    RedisServer,
    SandboxError,
    die_with_parent_hook,
    wait_until,
)
from streamsync.errors import ExitCode, StreamsyncError
from streamsync.keys import glob_escape

#: How long a change may take to show in Redis before the demo calls it a failure.
SYNC_TIMEOUT_S = 30.0
#: How long capture may take to start (a JVM, the engine, the initial snapshot).
CAPTURE_START_TIMEOUT_S = 90.0
COLUMNS = ("id", "name", "email", "plan", "balance", "updated_at")

SCHEMA_SQL = """
CREATE TABLE {table} (
    id serial PRIMARY KEY,
    name text NOT NULL,
    email text,
    plan text NOT NULL DEFAULT 'free',
    balance numeric(12,2) NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO {table} (name, email, plan, balance) VALUES
    ('alice', 'alice@example.com', 'free', 10.50),
    ('bob', 'bob@example.com', 'pro', 99.00),
    ('carol', NULL, 'free', 0);
"""

#: The scripted changes: what a person would do in psql, one step at a time.
STEPS: tuple[tuple[str, str], ...] = (
    ("INSERT a new user", "INSERT INTO {table} (name, email) VALUES ('dave', 'dave@example.com')"),
    (
        "UPDATE alice's plan",
        "UPDATE {table} SET plan = 'pro', updated_at = now() WHERE name = 'alice'",
    ),
    (
        "UPDATE bob's balance and email in one transaction",
        "BEGIN; UPDATE {table} SET balance = balance - 19.99 WHERE name = 'bob';"
        " UPDATE {table} SET email = 'bob@corp.example' WHERE name = 'bob'; COMMIT",
    ),
    (
        "UPDATE carol's email from NULL",
        "UPDATE {table} SET email = 'carol@example.com' WHERE name = 'carol'",
    ),
    (
        "UPDATE dave's primary key (the old key goes, the new one comes)",
        "UPDATE {table} SET id = 100 WHERE name = 'dave'",
    ),
    ("DELETE carol", "DELETE FROM {table} WHERE name = 'carol'"),
)


class DemoError(StreamsyncError):
    """Raised when the demo cannot start or a change does not reach Redis in time."""


@dataclass
class DemoOptions:
    """What ``streamsync demo`` was asked to do."""

    postgres_url: str | None = None
    redis_url: str | None = None
    #: Seconds between scripted steps.
    pace_s: float = 1.5
    #: Run the scripted steps, check them, and exit (no watching afterwards).
    once: bool = False
    #: Keep the temporary directory (logs, configuration) after exit.
    keep: bool = False


@dataclass
class _Stack:
    """What the demo started and must clean up."""

    workdir: Path
    postgres: PostgresServer | None = None
    redis_server: RedisServer | None = None
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    pg_conninfo: dict[str, Any] = field(default_factory=dict)
    redis_url: str = ""
    schema: str = "public"
    slot: str = ""
    external_db: bool = False
    external_redis: bool = False


def run_demo(options: DemoOptions, console: Console | None = None) -> ExitCode:
    """Run the demo; returns the process exit code."""
    console = console or Console()
    # a closed terminal (SIGHUP) or a SIGTERM stops the demo like Ctrl-C: cleaned up
    previous = {
        sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)
    }
    workdir = Path(tempfile.mkdtemp(prefix="streamsync-demo-"))
    # PostgreSQL runs as the postgres user when we are root: it must reach its data directory
    os.chmod(workdir, 0o755)
    stack = _Stack(workdir)
    try:
        _start(stack, options, console)
        table = f"{stack.schema}.users"
        for title, sql in STEPS:
            time.sleep(options.pace_s)
            console.rule(f"[bold]{title}")
            console.print(f"[dim]{sql.format(table=table)}")
            _execute(stack, sql.format(table=table))
            _wait_synced(stack)
            console.print(_side_by_side(stack))
        console.print("[bold green]Every row of the table matches its Redis key.")
        if options.once:
            return ExitCode.OK
        _watch(stack, console)
        return ExitCode.OK
    except KeyboardInterrupt:
        console.print("\nstopping")
        return ExitCode.OK
    except (DemoError, SandboxError) as exc:
        console.print(f"[bold red]demo failed:[/] {exc}")
        _print_logs(stack, console)
        return ExitCode.FAILURE
    finally:
        _cleanup(stack, options, console)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


# -- start-up ----------------------------------------------------------------------------------


def _start(stack: _Stack, options: DemoOptions, console: Console) -> None:
    import psycopg.conninfo  # noqa: PLC0415 (the optional embedded extra)

    if options.postgres_url:
        stack.pg_conninfo = psycopg.conninfo.conninfo_to_dict(options.postgres_url)
        stack.external_db = True
        # never touch the user's own tables: the demo lives in a schema of its own
        stack.schema = f"streamsync_demo_{uuid.uuid4().hex[:8]}"
        console.print(f"using PostgreSQL {redact_url(options.postgres_url)}")
    else:
        stack.postgres = PostgresServer(stack.workdir / "postgres").start()
        stack.postgres.create_database("demo")
        stack.pg_conninfo = psycopg.conninfo.conninfo_to_dict(stack.postgres.dsn_for("demo"))
        console.print(f"started PostgreSQL on 127.0.0.1:{stack.postgres.port} (wal_level=logical)")
    if options.redis_url:
        stack.redis_url = options.redis_url
        stack.external_redis = True
        console.print(f"using Redis {redact_url(options.redis_url)}")
    else:
        stack.redis_server = RedisServer(stack.workdir / "redis").start()
        stack.redis_url = stack.redis_server.url
        console.print(f"started redis-server on 127.0.0.1:{stack.redis_server.port}")
    if stack.external_db:
        _execute(stack, f"CREATE SCHEMA {stack.schema}")
    _execute(stack, SCHEMA_SQL.format(table=f"{stack.schema}.users"))
    config = _write_config(stack)
    stack.children.append(_spawn(stack, "capture", config))
    stack.children.append(_spawn(stack, "run", config))
    console.print("capture (the Debezium engine) and a worker are starting...")
    _wait_synced(stack, timeout=CAPTURE_START_TIMEOUT_S)
    console.rule("[bold]The initial snapshot")
    console.print(_side_by_side(stack))


def _write_config(stack: _Stack) -> Path:
    info = stack.pg_conninfo
    stack.slot = f"streamsync_demo_{uuid.uuid4().hex[:8]}"
    properties = {
        "debezium.sink.type": "redis",
        "debezium.sink.redis.address": "127.0.0.1:6379",
        "debezium.source.connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "debezium.source.database.hostname": info.get("host") or "127.0.0.1",
        "debezium.source.database.port": str(info.get("port") or 5432),
        "debezium.source.database.dbname": info.get("dbname") or "postgres",
        "debezium.source.database.user": info.get("user") or "postgres",
        "debezium.source.database.password": info.get("password") or "",
        "debezium.source.plugin.name": "pgoutput",
        "debezium.source.slot.name": stack.slot,
        "debezium.source.publication.name": stack.slot,
        "debezium.source.publication.autocreate.mode": "filtered",
        "debezium.source.topic.prefix": "demo",
        "debezium.source.table.include.list": f"{stack.schema}.users",
        "debezium.source.decimal.handling.mode": "string",
        "debezium.source.time.precision.mode": "isostring",
        "debezium.source.tombstones.on.delete": "false",
        "debezium.source.skipped.operations": "none",
        "debezium.source.offset.flush.interval.ms": "1000",
        "debezium.source.poll.interval.ms": "50",
        "debezium.format.key.schemas.enable": "false",
        "debezium.format.value.schemas.enable": "false",
        "debezium.format.value.replace.null.with.default": "false",
    }
    props_path = stack.workdir / "application.properties"
    props_path.write_text("".join(f"{k}={v}\n" for k, v in properties.items()))
    config = {
        "redis": {"url": stack.redis_url},
        "source": {"streams": [_stream(stack)], "group": "streamsync-demo"},
        "worker": {"block_ms": 200, "state_prefix": _state_prefix(stack)},
        "rules": [
            {"table": f"{stack.schema}.users", "key": "demo:user:{id}", "type": "hash"},
        ],
        "capture": {"properties": str(props_path), "offsets_file": "offsets.dat"},
    }
    path = stack.workdir / "streamsync.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _state_prefix(stack: _Stack) -> str:
    """Where the demo's worker keeps its indexes and placements: its own prefix, so that the
    clean-up of a Redis given by URL removes exactly those."""
    return f"streamsync:{stack.schema}:"


def _stream(stack: _Stack) -> str:
    return f"demo.{stack.schema}.users"


def _spawn(stack: _Stack, command: str, config: Path) -> subprocess.Popen[bytes]:
    log = (stack.workdir / f"{command}.log").open("wb")
    env = {k: v for k, v in os.environ.items() if k != "STREAMSYNC_REDIS_URL"}
    return subprocess.Popen(
        [sys.executable, "-m", "streamsync", command, "-c", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        # its own process group: Ctrl-C in the terminal goes to the demo, which stops it;
        # and if the demo itself is killed, the child goes with it
        start_new_session=True,
        preexec_fn=die_with_parent_hook(),  # noqa: PLW1509
    )


# -- the database and the cache side by side ---------------------------------------------------


@contextlib.contextmanager
def _connection(stack: _Stack) -> Iterator[Any]:
    import psycopg  # noqa: PLC0415 (the optional embedded extra)

    with psycopg.connect(**stack.pg_conninfo, autocommit=True, connect_timeout=10) as conn:
        yield conn


def _execute(stack: _Stack, sql: str) -> None:
    with _connection(stack) as conn:
        conn.execute(sql)


def _rows(stack: _Stack) -> dict[int, dict[str, str | None]]:
    """Every row of the demo table, each column as text the way the pipeline stores it."""
    with _connection(stack) as conn:
        cursor = conn.execute(
            "SELECT id, name, email, plan, balance::text,"
            " to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
            f" FROM {stack.schema}.users ORDER BY id"
        )
        return {
            row[0]: dict(zip(COLUMNS, [str(row[0]), *row[1:]], strict=True))
            for row in cursor.fetchall()
        }


def _cached(stack: _Stack, ids: Iterator[int] | list[int]) -> dict[int, dict[str, str]]:
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        keys = {int(k.rsplit(":", 1)[1]) for k in client.scan_iter("demo:user:*", _type="hash")}
        wanted = sorted(keys | set(ids))
        pipe = client.pipeline(transaction=False)
        for row_id in wanted:
            pipe.hgetall(f"demo:user:{row_id}")
        return {i: h for i, h in zip(wanted, pipe.execute(), strict=True) if h}
    finally:
        client.close()


def _same(row: dict[str, str | None], cached: dict[str, str] | None) -> bool:
    if cached is None:
        return False
    expected = {k: v for k, v in row.items() if v is not None}
    if expected.keys() != cached.keys():
        return False
    for column, value in expected.items():
        if column == "updated_at":
            if _instant(value) != _instant(cached[column]):
                return False
        elif value != cached[column]:
            return False
    return True


def _instant(text: str | None) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromisoformat((text or "").replace("Z", "+00:00"))
    except ValueError:
        return None


def _in_sync(stack: _Stack) -> bool:
    rows = _rows(stack)
    cached = _cached(stack, list(rows))
    return cached.keys() == rows.keys() and all(_same(r, cached.get(i)) for i, r in rows.items())


def _wait_synced(stack: _Stack, timeout: float = SYNC_TIMEOUT_S) -> None:
    try:
        wait_until(
            lambda: _children_alive(stack) and _in_sync(stack),
            timeout=timeout,
            interval=0.05,
            message="Redis to match the table",
        )
    except AssertionError as exc:
        dead = [p for p in stack.children if p.poll() is not None]
        if dead:
            raise DemoError(f"{_command(dead[0])} exited early") from None
        raise DemoError(str(exc)) from None


def _children_alive(stack: _Stack) -> bool:
    if any(p.poll() is not None for p in stack.children):
        raise AssertionError("a child process exited")
    return True


def _side_by_side(stack: _Stack) -> Table:
    rows = _rows(stack)
    cached = _cached(stack, list(rows))
    table = Table(title=f"PostgreSQL {stack.schema}.users  |  Redis demo:user:<id>")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in ("id", "balance") else "left")
    table.add_column("Redis hash")
    for row_id in sorted(rows.keys() | cached.keys()):
        row = rows.get(row_id)
        hashed = cached.get(row_id)
        if row is None:
            table.add_row(
                str(row_id), "[dim](no row)", *[""] * (len(COLUMNS) - 2), "[yellow]still cached"
            )
            continue
        shown = [row[c] or "[dim]null" for c in COLUMNS]
        shown[-1] = _short_time(row["updated_at"])
        if hashed is None:
            verdict = "[yellow]not cached yet"
        elif _same(row, hashed):
            verdict = f"[green]= {len(hashed)} fields"
        else:
            differing = [c for c in COLUMNS if (row[c] or None) != hashed.get(c)]
            verdict = "[yellow]differs: " + ", ".join(f"{c}={hashed.get(c)}" for c in differing)
        table.add_row(*shown, verdict)
    return table


def _short_time(text: str | None) -> str:
    instant = _instant(text)
    return instant.strftime("%H:%M:%S.%f")[:-3] if instant else str(text)


def _watch(stack: _Stack, console: Console) -> None:
    info = stack.pg_conninfo
    console.rule("[bold]Your turn")
    console.print(
        "Change the table and watch Redis follow, e.g.\n"
        f"  psql -h {info.get('host')} -p {info.get('port')} -U {info.get('user')}"
        f" {info.get('dbname')} -c \"UPDATE {stack.schema}.users SET plan = 'team'\"\n"
        f"  redis-cli -u {redact_url(stack.redis_url)} HGETALL demo:user:1\n"
        "Ctrl-C stops the demo and removes everything it started."
    )
    last = ""
    while True:
        time.sleep(1)
        _children_alive_or_fail(stack)
        with console.capture() as capture:
            console.print(_side_by_side(stack))
        text = capture.get()
        if text != last:
            # already rendered (styles included): write it as is
            console.file.write(text)
            console.file.flush()
            last = text


def _command(proc: subprocess.Popen[bytes]) -> str:
    args = proc.args
    return " ".join(map(str, args)) if isinstance(args, list) else str(args)


def _children_alive_or_fail(stack: _Stack) -> None:
    for proc in stack.children:
        if proc.poll() is not None:
            raise DemoError(f"{_command(proc)} exited with {proc.returncode}")


# -- clean-up ----------------------------------------------------------------------------------


def _cleanup(stack: _Stack, options: DemoOptions, console: Console) -> None:
    _stop_children(stack)
    if stack.external_db:
        _drop_demo_objects(stack, console)
    if stack.external_redis and stack.redis_url:
        with contextlib.suppress(Exception):
            _delete_demo_keys(stack)
    if stack.postgres is not None:
        stack.postgres.stop()
    if stack.redis_server is not None:
        stack.redis_server.stop()
    if options.keep:
        console.print(f"kept {stack.workdir} (logs, configuration)")
    else:
        shutil.rmtree(stack.workdir, ignore_errors=True)


def _stop_children(stack: _Stack) -> None:
    """SIGTERM to every child still running, then wait for each (killed after 20 s)."""
    for proc in stack.children:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in stack.children:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _drop_demo_objects(stack: _Stack, console: Console) -> None:
    """The replication slot, publication and schema the demo made in a database it was given."""
    for sql in (
        f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
        f" WHERE slot_name = '{stack.slot}'",
        f"DROP PUBLICATION IF EXISTS {stack.slot}",
        f"DROP SCHEMA IF EXISTS {stack.schema} CASCADE",
    ):
        try:
            _execute(stack, sql)
        except Exception as exc:  # clean up what can be, say what could not
            console.print(f"[yellow]could not clean up ({sql}): {exc}")


def _delete_demo_keys(stack: _Stack) -> None:
    """The keys the demo wrote to a Redis it was given: its cache, records, state, streams."""
    client = redis.Redis.from_url(stack.redis_url)
    doomed = [
        *client.scan_iter("demo:user:*"),
        *client.scan_iter("streamsync:pos:{demo:user:*"),
        *client.scan_iter(glob_escape(_state_prefix(stack)) + "*"),
        _stream(stack),
        _stream(stack) + ":dlq",
    ]
    for i in range(0, len(doomed), 500):
        client.delete(*doomed[i : i + 500])
    client.close()


def _print_logs(stack: _Stack, console: Console) -> None:
    for name in ("capture.log", "run.log"):
        path = stack.workdir / name
        if path.exists():
            tail = path.read_text(errors="replace").splitlines()[-15:]
            console.print(f"[bold]{name}[/] (last lines):")
            console.print("\n".join(tail), markup=False, highlight=False)
