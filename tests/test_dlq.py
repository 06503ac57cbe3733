"""``streamsync dlq`` on a real redis-server: dead letters produced by a real worker, listed,
shown, replayed through the stream or directly, and purged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from click.testing import CliRunner, Result

from streamsync import resync
from streamsync.buckets import Table, Tables
from streamsync.cli import cli
from streamsync.config import load_settings
from streamsync.errors import ExitCode
from streamsync.keys import StateKeys
from streamsync.positions import RANK_WRITE, after_snapshot
from tests.debezium import add_change, entry_fields, envelope, write_config
from tests.records import records
from tests.replies import raw_range, xadd
from tests.servers import free_port
from tests.workers import drain, outcomes

USERS = "app.public.users"
ORDERS = "app.public.orders"
USERS_DLQ = USERS + ":dlq"
ORDERS_DLQ = ORDERS + ":dlq"

USERS_RULE = {"table": "public.users", "key": "user:{id}", "type": "hash"}
ORDERS_RULE = {"table": "public.orders", "key": "order:{id}", "type": "hash"}
#: A feed: a change applied twice would push twice, so it shows duplicate effects.
ORDERS_FEED = {"table": "public.orders", "key": "orders", "type": "list", "value": "json"}

NOT_JSON = {'{"id":2}': "this is not json"}
NO_KEY_OR_VALUE = {"a": "1", "b": "2"}


def invoke(*args: str, stdin: str | None = None) -> Result:
    """Run ``streamsync dlq ARGS`` in-process (no STREAMSYNC_REDIS_URL from the environment)."""
    runner = CliRunner(env={"STREAMSYNC_REDIS_URL": None})
    return runner.invoke(cli, ["dlq", *args], input=stdin, catch_exceptions=False)


def dlq_ids(r: redis.Redis, key: str) -> list[str]:
    return [eid.decode() for eid, _ in raw_range(r, key)]


def snapshot(r: redis.Redis) -> dict[bytes, Any]:
    """Every key with its type and content: what a dry run must leave alone."""
    state: dict[bytes, Any] = {}
    for key in sorted(r.scan_iter("*")):
        kind = r.type(key)
        if kind == b"stream":
            state[key] = raw_range(r, key.decode())
        elif kind == b"hash":
            state[key] = r.hgetall(key)
        elif kind == b"list":
            state[key] = r.lrange(key, 0, -1)
        elif kind == b"set":
            state[key] = r.smembers(key)
        else:
            state[key] = (kind, r.dump(key))
    return state


def add_order(r: redis.Redis, lsn: int, total: str = "5.00", order_id: int = 9) -> bytes:
    return add_change(
        r, ORDERS, "c", {"id": order_id, "total": total}, lsn=lsn, table="public.orders"
    )


def orders_table(config: str | Path) -> Table:
    """The table of the orders rule's records."""
    settings = load_settings(config, environ={})
    (rule,) = settings.rules_by_table["public.orders"]
    return Tables(StateKeys.from_settings(settings.worker)).table(rule)


class Setup:
    """A config that maps users only, streams of users and orders, and dead letters in both:
    two malformed users entries and an orders change no rule maps."""

    def __init__(self, r: redis.Redis, url: str, tmp_path: Path) -> None:
        self.r, self.url, self.tmp_path = r, url, tmp_path
        self.cfg = self.config("c.yaml", [USERS_RULE])
        add_change(r, USERS, "c", {"id": 1, "name": "a"}, lsn=10)
        self.not_json = xadd(r, USERS, NOT_JSON)
        self.no_key = xadd(r, USERS, NO_KEY_OR_VALUE)
        self.order = add_order(r, lsn=20)
        self.order_fields = raw_range(r, ORDERS)[0][1]
        worker = drain(self.cfg)
        assert outcomes(worker)["dead_lettered"] == 3
        assert r.hgetall("user:1") == {b"id": b"1", b"name": b"a"}
        assert not r.exists("order:9")

    def config(self, name: str, rules: list[dict[str, Any]], **worker: Any) -> Path:
        return write_config(
            self.tmp_path / name, self.url, streams=[USERS, ORDERS], rules=rules, **worker
        )

    def fixed(self, *order_rules: dict[str, Any]) -> Path:
        """The configuration with a rule for the orders table."""
        return self.config("fixed.yaml", [USERS_RULE, *(order_rules or [ORDERS_RULE])])


@pytest.fixture
def dead(r: redis.Redis, redis_url: str, tmp_path: Path) -> Setup:
    return Setup(r, redis_url, tmp_path)


# -- list and show -------------------------------------------------------------------------


def test_list_shows_every_stream_with_its_reasons(dead: Setup) -> None:
    result = invoke("list", "-c", str(dead.cfg))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"{USERS_DLQ}: 2 dead letter(s)" in out
    assert f"{ORDERS_DLQ}: 1 dead letter(s)" in out
    assert "value is not valid JSON" in out
    assert "extended entry lacks its 'key' or 'value' field" in out
    assert "no rule maps table 'public.orders'" in out
    for original in (dead.not_json, dead.no_key, dead.order):
        assert original.decode() in out
    assert "DLQ ID" in out and "FAILED AT (UTC)" in out and " w1 " in out
    # newest first, and --count bounds it
    result = invoke("list", "-c", str(dead.cfg), "--stream", USERS, "--count", "1")
    assert result.exit_code == 0, result.output
    assert f"{USERS_DLQ}: 2 dead letter(s), newest 1" in result.stdout
    assert dead.no_key.decode() in result.stdout
    assert dead.not_json.decode() not in result.stdout
    assert ORDERS_DLQ not in result.stdout


def test_list_json_parses(dead: Setup) -> None:
    result = invoke("list", "-c", str(dead.cfg), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    streams = {s["stream"]: s for s in data["streams"]}
    assert set(streams) == {USERS, ORDERS}
    users = streams[USERS]
    assert users["dlq"] == USERS_DLQ and users["length"] == 2
    newest, oldest = users["entries"]
    assert newest["id"] == dead.no_key.decode() and oldest["id"] == dead.not_json.decode()
    assert "not valid JSON" in oldest["reason"]
    assert oldest["deliveries"] == 1 and oldest["consumer"] == "w1"
    assert oldest["stream"] == USERS and oldest["fields"] == 1 and newest["fields"] == 2
    assert oldest["failed_at"].endswith("Z") and isinstance(oldest["failed_at_ms"], int)
    assert oldest["problem"] is None
    (order,) = streams[ORDERS]["entries"]
    assert order["reason"] == "no rule maps table 'public.orders'"


def test_list_empty_and_stream_prefix_discovery(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.yaml", redis_url, streams=[USERS, ORDERS])
    add_change(r, USERS, "c", {"id": 1, "name": "a"}, lsn=1)
    drain(cfg)
    result = invoke("list", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    assert f"{USERS_DLQ}: empty" in result.stdout and f"{ORDERS_DLQ}: empty" in result.stdout
    # with stream_prefix the streams are found in Redis (and a DLQ that outlived its stream)
    xadd(r, USERS, NOT_JSON)
    r.xadd("app.public.gone:dlq", {"reason": "from an older deployment"})
    text = cfg.read_text().replace(f"  streams:\n  - {USERS}\n  - {ORDERS}\n", "")
    prefix_cfg = tmp_path / "prefix.yaml"
    prefix_cfg.write_text(text.replace("source:\n", "source:\n  stream_prefix: app.\n"))
    drain(prefix_cfg)
    result = invoke("list", "-c", str(prefix_cfg), "--json")
    assert result.exit_code == 0, result.output
    streams = {s["stream"]: s for s in json.loads(result.stdout)["streams"]}
    assert set(streams) == {USERS, ORDERS, "app.public.gone"}
    assert streams[USERS]["length"] == 1
    (foreign,) = streams["app.public.gone"]["entries"]
    assert foreign["reason"] == "from an older deployment"
    assert foreign["problem"].startswith("not a streamsync dead letter")
    result = invoke("list", "-c", str(prefix_cfg), "--stream", "other.public.users")
    assert result.exit_code == 1
    assert "does not start with source.stream_prefix" in result.stderr


def test_show_prints_the_original_fields_verbatim(r: redis.Redis, dead: Setup) -> None:
    (not_json_id,) = [
        eid for eid, f in raw_range(r, USERS_DLQ) if f[f.index(b"id") + 1] == dead.not_json
    ]
    result = invoke("show", "-c", str(dead.cfg), "--stream", USERS, not_json_id.decode())
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"dead letter {not_json_id.decode()} in {USERS_DLQ}" in out
    assert f"  id:           {dead.not_json.decode()}\n" in out
    assert "  stream:       app.public.users\n" in out
    assert "  deliveries:   1\n" in out and "  consumer:     w1\n" in out
    assert "  fields:       1\n" in out and "value is not valid JSON" in out
    assert '  field: {"id":2}\n  value: this is not json\n' in out
    # a JSON value is indented, unless --raw
    (order_dlq_id,) = dlq_ids(r, ORDERS_DLQ)
    key, value = dead.order_fields
    result = invoke("show", "-c", str(dead.cfg), "--stream", ORDERS, order_dlq_id)
    assert result.exit_code == 0, result.output
    assert f"  field: {key.decode()}\n  value (JSON, indented):\n    {{\n" in result.stdout
    assert '      "op": "c",\n' in result.stdout
    result = invoke("show", "-c", str(dead.cfg), "--stream", ORDERS, order_dlq_id, "--raw")
    assert result.exit_code == 0, result.output
    assert f"  field: {key.decode()}\n  value: {value.decode()}\n" in result.stdout


def test_show_json_parses_and_keeps_the_values_verbatim(r: redis.Redis, dead: Setup) -> None:
    (order_dlq_id,) = dlq_ids(r, ORDERS_DLQ)
    result = invoke("show", "-c", str(dead.cfg), "--stream", ORDERS, order_dlq_id, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["dlq"] == ORDERS_DLQ and data["dlq_id"] == order_dlq_id
    assert data["id"] == dead.order.decode() and data["stream"] == ORDERS
    assert data["reason"] == "no rule maps table 'public.orders'"
    assert data["deliveries"] == 1 and data["consumer"] == "w1" and data["fields"] == 1
    (pair,) = data["entry"]
    key, value = dead.order_fields
    assert pair["field"] == key.decode() and pair["value"] == value.decode()
    assert pair["value_json"] == orjson.loads(value)
    assert pair["value_json"]["after"] == {"id": 9, "total": "5.00"}


def test_show_unknown_id_stream_or_config(dead: Setup, tmp_path: Path) -> None:
    cfg = str(dead.cfg)
    result = invoke("show", "-c", cfg, "--stream", USERS, "1-0")
    assert result.exit_code == ExitCode.FAILURE
    assert result.stderr == f"dlq show: no dead letter 1-0 in {USERS_DLQ}\n"
    result = invoke("show", "-c", cfg, "--stream", "app.public.nope", "1-0")
    assert result.exit_code == ExitCode.FAILURE
    assert "'app.public.nope' is not a configured stream" in result.stderr
    result = invoke("show", "-c", cfg, "--stream", USERS_DLQ, "1-0")
    assert result.exit_code == ExitCode.FAILURE
    assert f"name its source stream, {USERS!r}" in result.stderr
    result = invoke("show", "-c", cfg, "--stream", USERS, "latest")
    assert result.exit_code == ExitCode.USAGE and "is not a stream id" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: {streams: [x]}\nrules: []\nworker: {batch_sise: 1}\n")
    result = invoke("show", "-c", str(bad), "--stream", USERS, "1-0")
    assert result.exit_code == ExitCode.CONFIG_INVALID
    assert "batch_sise" in result.stderr


def test_a_redis_error_is_one_line_and_exit_1(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", f"redis://127.0.0.1:{free_port()}/0")
    for args in (["list"], ["replay", "--stream", USERS, "--all"]):
        result = invoke(*args, "-c", str(cfg))
        assert result.exit_code == ExitCode.FAILURE
        assert result.stderr.startswith(f"dlq {args[0]}: redis: ")
        assert result.stderr.count("\n") == 1


# -- replay ----------------------------------------------------------------------------------


def test_replay_through_the_stream_after_fixing_the_config(r: redis.Redis, dead: Setup) -> None:
    fixed = dead.fixed()
    before = raw_range(r, ORDERS)
    result = invoke("replay", "-c", str(fixed), "--stream", ORDERS, "--all")
    assert result.exit_code == 0, result.output
    assert "re-added (as app.public.orders " in result.stdout
    assert f"{ORDERS}: replayed 1, left 0 in {ORDERS_DLQ}" in result.stdout
    # the original fields, verbatim and in order, in a new entry of the source stream
    after = raw_range(r, ORDERS)
    assert len(after) == len(before) + 1 and after[-1][1] == dead.order_fields
    assert r.xlen(ORDERS_DLQ) == 0
    assert not r.exists("order:9")  # the workers apply it, not the command
    worker = drain(fixed)
    assert r.hgetall("order:9") == {b"id": b"9", b"total": b"5.00"}
    assert outcomes(worker) == {"applied": 1}
    assert r.xlen(ORDERS_DLQ) == 0


def test_replay_leaves_what_the_config_still_cannot_apply(r: redis.Redis, dead: Setup) -> None:
    fixed = str(dead.fixed())
    stream_before = raw_range(r, USERS)
    dlq_before = raw_range(r, USERS_DLQ)
    result = invoke("replay", "-c", fixed, "--stream", USERS, "--all")
    assert result.exit_code == ExitCode.UNHEALTHY, result.output
    assert result.exit_code == 2, "the documented exit code of a replay that left entries"
    assert "left: value is not valid JSON" in result.stdout
    assert "left: extended entry lacks its 'key' or 'value' field" in result.stdout
    assert f"{USERS}: replayed 0, left 2 in {USERS_DLQ}" in result.stdout
    assert raw_range(r, USERS) == stream_before and raw_range(r, USERS_DLQ) == dlq_before
    # --force re-adds them anyway; the workers dead-letter them again
    (not_json_dlq_id, _) = dlq_before[0]
    result = invoke("replay", "-c", fixed, "--stream", USERS, not_json_dlq_id.decode(), "--force")
    assert result.exit_code == 0, result.output
    assert raw_range(r, USERS)[-1][1] == [b'{"id":2}', b"this is not json"]
    assert dlq_ids(r, USERS_DLQ) == [dlq_before[1][0].decode()]
    drain(dead.cfg)
    assert r.xlen(USERS_DLQ) == 2


def test_replay_direct_applies_without_a_worker(r: redis.Redis, dead: Setup) -> None:
    fixed = dead.fixed()
    r.function_flush()  # the command loads the library itself
    stream_before = raw_range(r, ORDERS)
    (dlq_id,) = dlq_ids(r, ORDERS_DLQ)
    result = invoke("replay", "-c", str(fixed), "--stream", ORDERS, dlq_id, "--direct")
    assert result.exit_code == 0, result.output
    assert f"{dlq_id} (entry {dead.order.decode()}): applied (rows: 1 applied)" in result.stdout
    assert r.hgetall("order:9") == {b"id": b"9", b"total": b"5.00"}
    assert r.xlen(ORDERS_DLQ) == 0
    assert raw_range(r, ORDERS) == stream_before
    # the position record is the worker's: a worker replaying the same change finds it stale
    add_change(r, ORDERS, "c", {"id": 9, "total": "5.00"}, lsn=20, table="public.orders")
    assert outcomes(drain(fixed)) == {"stale": 1}


def test_replay_direct_leaves_failing_entries_with_exit_2(r: redis.Redis, dead: Setup) -> None:
    fixed = str(dead.fixed())
    dlq_before = raw_range(r, USERS_DLQ)
    result = invoke("replay", "-c", fixed, "--stream", USERS, "--all", "--direct")
    assert result.exit_code == ExitCode.UNHEALTHY, result.output
    assert result.stdout.count(": left: ") == 2
    assert raw_range(r, USERS_DLQ) == dlq_before
    # a Redis refusal at apply time: the orders rule's bucket is of the wrong type
    bucket = orders_table(fixed).meta
    r.sadd(bucket, "not a bucket")
    result = invoke("replay", "-c", fixed, "--stream", ORDERS, "--all", "--direct")
    assert result.exit_code == ExitCode.UNHEALTHY, result.output
    assert "left: redis error: " in result.stdout and "WRONGTYPE" in result.stdout
    assert r.xlen(ORDERS_DLQ) == 1
    r.delete(bucket)
    result = invoke("replay", "-c", fixed, "--stream", ORDERS, "--all", "--direct")
    assert result.exit_code == 0, result.output
    assert r.hgetall("order:9") == {b"id": b"9", b"total": b"5.00"} and r.xlen(ORDERS_DLQ) == 0


def test_replaying_twice_has_no_duplicate_effect(r: redis.Redis, dead: Setup) -> None:
    fixed = dead.fixed(ORDERS_FEED)
    (dlq_id, raw) = raw_range(r, ORDERS_DLQ)[0]
    copies = [r.execute_command("XADD", ORDERS_DLQ, "*", *raw) for _ in range(3)]
    # through the stream, twice: the workers apply the change once, the copy is stale
    for target in (dlq_id, copies[0]):
        result = invoke("replay", "-c", str(fixed), "--stream", ORDERS, target.decode())
        assert result.exit_code == 0, result.output
    assert outcomes(drain(fixed)) == {"applied": 1, "stale": 1}
    assert [orjson.loads(v) for v in r.lrange("orders", 0, -1)] == [{"id": 9, "total": "5.00"}]
    # a newer change lands (the feed gets its entry, newest first); direct replays of the old
    # one are stale: no entry pushed again, nothing rolled back
    add_order(r, lsn=30, total="7.00")
    drain(fixed)
    feed = [{"id": 9, "total": "7.00"}, {"id": 9, "total": "5.00"}]
    assert [orjson.loads(v) for v in r.lrange("orders", 0, -1)] == feed
    result = invoke("replay", "-c", str(fixed), "--stream", ORDERS, "--all", "--direct")
    assert result.exit_code == 0, result.output
    assert result.stdout.count(": stale (rows: 1 stale)") == 2
    assert [orjson.loads(v) for v in r.lrange("orders", 0, -1)] == feed
    assert r.xlen(ORDERS_DLQ) == 0
    # an id replayed already is reported, harmlessly
    result = invoke("replay", "-c", str(fixed), "--stream", ORDERS, dlq_id.decode())
    assert result.exit_code == 0, result.output
    assert f"{dlq_id.decode()}: not in {ORDERS_DLQ} (already replayed or purged?)" in result.stdout


@pytest.mark.parametrize("direct", [False, True])
def test_replay_dry_run_changes_nothing(r: redis.Redis, dead: Setup, direct: bool) -> None:
    fixed = str(dead.fixed())
    r.function_flush()
    before = snapshot(r)
    mode = ["--direct"] if direct else []
    for stream in (USERS, ORDERS):
        result = invoke("replay", "-c", fixed, "--stream", stream, "--all", "--dry-run", *mode)
        assert result.exit_code == (ExitCode.UNHEALTHY if stream == USERS else 0), result.output
        assert "(dry run)" in result.stdout
    assert ("would apply 1 row(s)" if direct else "would re-add to") in result.stdout
    assert f"{ORDERS}: would replay 1, left 0" in result.stdout
    assert snapshot(r) == before
    assert r.function_list() == []


def test_replay_through_the_stream_refuses_entries_older_than_a_resync_epoch(
    r: redis.Redis, dead: Setup
) -> None:
    fixed = dead.fixed()
    resync.start(r, load_settings(fixed, environ={}), ["public.orders"])
    result = invoke("replay", "-c", str(fixed), "--stream", ORDERS, "--all")
    assert result.exit_code == ExitCode.UNHEALTHY, result.output
    assert "predates the stream's latest resync epoch" in result.stdout
    assert r.xlen(ORDERS_DLQ) == 1
    # --direct applies it under its own (older) epoch
    result = invoke("replay", "-c", str(fixed), "--stream", ORDERS, "--all", "--direct")
    assert result.exit_code == 0, result.output
    assert r.hgetall("order:9") == {b"id": b"9", b"total": b"5.00"}
    assert not records(r, orders_table(fixed))[b"9"].position.startswith("e")


def test_replay_through_the_stream_refuses_entries_of_an_older_snapshot(
    r: redis.Redis, dead: Setup
) -> None:
    def order(op: str, lsn: int, total: str, sequence: tuple[int | None, int]) -> bytes:
        row = {"id": 7, "total": total}
        snapshot = "true" if op == "r" else "false"
        value = envelope(op, "public.orders", lsn, after=row, snapshot=snapshot, sequence=sequence)
        return xadd(r, ORDERS, entry_fields({"id": 7}, value))

    # a snapshot at 700, the change in flight during it (LSN 650, no lastCommitLsn), and a
    # snapshot at 800: no rule maps the table yet, all three are dead-lettered
    order("r", 700, "1.00", (None, 700))
    order("u", 650, "2.00", (None, 650))
    order("r", 800, "3.00", (None, 800))
    drain(dead.cfg)
    *_, read_700, change, read_800 = dlq_ids(r, ORDERS_DLQ)
    fixed = str(dead.fixed())
    # re-added after the snapshot at 800, the first two would be taken for that one's
    result = invoke("replay", "-c", fixed, "--stream", ORDERS, read_700, change, read_800)
    assert result.exit_code == ExitCode.UNHEALTHY, result.output
    assert result.stdout.count("belongs to an older snapshot than the stream's latest") == 2
    assert dlq_ids(r, ORDERS_DLQ)[-2:] == [read_700, change]
    # --direct applies them where they were: the change after the snapshot at 700
    result = invoke("replay", "-c", fixed, "--stream", ORDERS, read_700, change, "--direct")
    assert result.exit_code == 0, result.output
    assert r.hget("order:7", "total") == b"2.00"
    position = records(r, orders_table(fixed))[b"7"].position
    assert position == after_snapshot(700, 650, RANK_WRITE)
    drain(Path(fixed))  # the read at 800, re-added
    assert r.hget("order:7", "total") == b"3.00"


def test_a_dead_lettered_truncate_is_replayed_through_the_stream(
    r: redis.Redis, dead: Setup
) -> None:
    fixed = str(dead.fixed())
    assert invoke("replay", "-c", fixed, "--stream", ORDERS, "--all", "--direct").exit_code == 0
    assert r.exists("order:9")
    xadd(r, ORDERS, entry_fields(None, envelope("t", "public.orders", 25)))
    drain(dead.cfg)  # no rule for the table yet: dead-lettered
    (dlq_id,) = dlq_ids(r, ORDERS_DLQ)
    # applied here it could overtake older entries of the stream: only the workers order it
    result = invoke("replay", "-c", fixed, "--stream", ORDERS, dlq_id, "--direct")
    assert result.exit_code == ExitCode.UNHEALTHY, result.output
    assert "left: a TRUNCATE must wait for the older entries of its stream" in result.stdout
    assert r.exists("order:9") and r.xlen(ORDERS_DLQ) == 1
    result = invoke("replay", "-c", fixed, "--stream", ORDERS, dlq_id)
    assert result.exit_code == 0, result.output
    assert outcomes(drain(Path(fixed))) == {"applied": 1}
    assert not r.exists("order:9") and r.xlen(ORDERS_DLQ) == 0


def test_replay_needs_ids_or_all(dead: Setup) -> None:
    for args in ([], [dead.order.decode(), "--all"]):
        result = invoke("replay", "-c", str(dead.cfg), "--stream", ORDERS, *args)
        assert result.exit_code == ExitCode.USAGE
        assert "name dead-letter ids, or use --all" in result.output
    result = invoke(
        "replay", "-c", str(dead.cfg), "--stream", ORDERS, "--all", "--direct", "--force"
    )
    assert result.exit_code == ExitCode.USAGE
    assert "--force applies to a replay through the stream" in result.output


# -- purge -----------------------------------------------------------------------------------


def test_purge_by_id_with_confirmation(r: redis.Redis, dead: Setup) -> None:
    first, second = dlq_ids(r, USERS_DLQ)
    cfg = str(dead.cfg)
    result = invoke("purge", "-c", cfg, "--stream", USERS, first, stdin="n\n")
    assert result.exit_code == 1 and "Aborted" in result.output
    assert dlq_ids(r, USERS_DLQ) == [first, second]
    result = invoke("purge", "-c", cfg, "--stream", USERS, first, "--dry-run")
    assert result.exit_code == 0 and "would delete 1 dead letter(s)" in result.stdout
    assert dlq_ids(r, USERS_DLQ) == [first, second]
    result = invoke("purge", "-c", cfg, "--stream", USERS, first, "9-9", stdin="y\n")
    assert result.exit_code == 0, result.output
    assert f"9-9: not in {USERS_DLQ}" in result.stdout
    assert f"{USERS_DLQ}: deleted 1 dead letter(s)" in result.stdout
    assert dlq_ids(r, USERS_DLQ) == [second]
    result = invoke("purge", "-c", cfg, "--stream", USERS, first, "--yes")
    assert result.exit_code == 0 and f"{USERS_DLQ}: nothing to purge" in result.stdout


def test_purge_all_and_older_than(r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    # an old dead letter, as a worker wrote it long ago
    old = {"reason": "old", "stream": USERS, "id": "1000-0", "deliveries": "1", "consumer": "w0"}
    xadd(r, USERS_DLQ, {**old, "failed_at_ms": "1000", "fields": "1", "k": "v"}, entry_id="1000-0")
    setup = Setup(r, redis_url, tmp_path)
    cfg = str(setup.cfg)
    assert r.xlen(USERS_DLQ) == 3
    result = invoke("purge", "-c", cfg, "--stream", USERS, "--older-than-s", "3600", "--yes")
    assert result.exit_code == 0, result.output
    assert f"{USERS_DLQ}: deleted 1 dead letter(s)" in result.stdout
    assert "1000-0" not in dlq_ids(r, USERS_DLQ) and r.xlen(USERS_DLQ) == 2
    result = invoke("purge", "-c", cfg, "--stream", USERS, "--older-than-s", "3600", "--yes")
    assert result.exit_code == 0 and "nothing to purge" in result.stdout
    result = invoke("purge", "-c", cfg, "--stream", USERS, "--all", "--dry-run")
    assert result.exit_code == 0 and "would delete all 2 dead letter(s)" in result.stdout
    assert r.xlen(USERS_DLQ) == 2
    result = invoke("purge", "-c", cfg, "--stream", USERS, "--all", stdin="y\n")
    assert result.exit_code == 0, result.output
    assert f"delete all 2 dead letter(s) of {USERS_DLQ}?" in result.output
    assert r.xlen(USERS_DLQ) == 0 and r.xlen(ORDERS_DLQ) == 1
    for args in ([], ["--all", "--older-than-s", "1"], ["1-0", "--all"]):
        result = invoke("purge", "-c", cfg, "--stream", ORDERS, *args, "--yes")
        assert result.exit_code == ExitCode.USAGE and "name dead-letter ids" in result.output
    assert r.xlen(ORDERS_DLQ) == 1
