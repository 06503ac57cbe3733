"""TRUNCATE and resync through the worker and the CLI, on a real redis-server: a TRUNCATE waits
for the older entries of its stream, a resync lets a restored database's lower positions
overwrite the cache and then sweeps what it no longer has."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner, Result

from streamsync.cli import cli
from streamsync.config import RedisSettings, load_settings, parse_settings
from streamsync.epochs import Epochs
from streamsync.errors import ExitCode
from streamsync.events import Decoder
from streamsync.mapping import Planner
from streamsync.worker import Worker
from streamsync.worker.barrier import StreamBarrier
from streamsync.worker.core import BatchCore
from streamsync.worker.entry import from_read
from streamsync.worker.session import open_session
from tests.debezium import add_change, entry_fields, envelope, write_config
from tests.replies import xadd
from tests.servers import wait_until
from tests.workers import WorkerThread, drain

STREAM = "app.public.users"


def add_truncate(r: redis.Redis, lsn: int, table: str = "public.users") -> bytes:
    return xadd(r, STREAM, entry_fields(None, envelope("t", table, lsn)))


def test_truncate_waits_for_older_entries_held_by_another_consumer(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.yaml", redis_url, streams=[STREAM], claim_idle_ms=300)
    r.xgroup_create(STREAM, "streamsync", id="0", mkstream=True)
    add_change(r, STREAM, "c", {"id": 1, "name": "before the truncate"}, 100)
    add_truncate(r, 200)
    # a consumer takes the insert and dies without applying it
    r.xreadgroup("streamsync", "crashed", {STREAM: ">"}, count=1)
    worker = Worker(load_settings(cfg, environ={}), consumer="w1", drain=True)
    with WorkerThread(worker) as thread:
        # the truncate is read at once, but applied only after the insert is reclaimed and
        # applied: otherwise the insert would land after it and bring the row back
        thread.join(30)
    assert not r.exists("user:1")
    assert r.xpending(STREAM, "streamsync")["pending"] == 0
    assert not r.exists(STREAM + ":dlq")
    counts = {o: n for (_, _, op, o), n in worker.counts.items() if op == "t"}
    assert counts == {"applied": 1}


def test_a_first_transaction_change_waits_for_its_snapshot_reads_held_by_another_consumer(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.yaml", redis_url, streams=[STREAM], claim_idle_ms=300)
    r.xgroup_create(STREAM, "streamsync", id="0", mkstream=True)
    add_change(r, STREAM, "r", {"id": 1, "name": "read by the snapshot"}, 700)
    # in flight while the snapshot was taken: an LSN below the snapshot's, no lastCommitLsn
    value = envelope("u", "public.users", 650, after={"id": 1, "name": "in flight"})
    value["source"]["sequence"] = '[null,"650"]'
    xadd(r, STREAM, entry_fields({"id": 1}, value))
    # a consumer takes the read and dies without applying it
    r.xreadgroup("streamsync", "crashed", {STREAM: ">"}, count=1)
    worker = Worker(load_settings(cfg, environ={}), consumer="w1", drain=True)
    with WorkerThread(worker) as thread:
        # placed at once, the change would know no snapshot and lose to the read applied later
        thread.join(30)
    assert r.hget("user:1", "name") == b"in flight"
    assert r.xpending(STREAM, "streamsync")["pending"] == 0
    assert not r.exists(STREAM + ":dlq")


def test_the_barrier_releases_a_first_transaction_at_once_and_a_truncate_after_it(
    r: redis.Redis, redis_url: str
) -> None:
    r.xgroup_create(STREAM, "streamsync", id="0", mkstream=True)
    read_id = add_change(r, STREAM, "r", {"id": 1}, 700)
    r.xreadgroup("streamsync", "crashed", {STREAM: ">"}, count=1)
    first: list[bytes] = []
    for i in range(2, 6):
        value = envelope("u", "public.users", 700 + i, after={"id": i}, sequence=(None, 700 + i))
        first.append(xadd(r, STREAM, entry_fields({"id": i}, value)))
    add_truncate(r, 900)
    value = envelope("u", "public.users", 950, after={"id": 9}, sequence=(None, 950))
    xadd(r, STREAM, entry_fields({"id": 9}, value))
    settings = parse_settings(
        {
            "source": {"streams": [STREAM]},
            "rules": [{"table": "public.users", "key": "u:{id}", "type": "hash"}],
        }
    )
    core = BatchCore(
        Decoder(), Planner.from_settings(settings), Epochs(), tombstone_s=1, max_deliveries=1
    )
    session = open_session(RedisSettings(url=redis_url), client_name="test", timeout_s=5)
    try:
        read = session.call("XREADGROUP", "GROUP", "streamsync", "w1", "STREAMS", STREAM, ">")
        barrier = StreamBarrier("streamsync", "w1", claim_every_s=1)
        barrier.waiting += core.prepare(from_read(read)).held
        assert len(barrier.waiting) == 6

        def released(*settled: bytes) -> list[bytes]:
            return [h.entry.id for h in barrier.release(session, {STREAM: settled}, 0.0)]

        # the snapshot's read, pending elsewhere, holds everything
        assert released() == []
        # once it is settled, the whole first transaction goes, not the TRUNCATE: it waits for
        # those changes to be applied
        assert released(read_id) == first
        assert released(read_id, *first[:3]) == []
        # then the TRUNCATE, and the change after it (a change needs no TRUNCATE applied first)
        truncate_and_after = released(read_id, *first)
        assert len(truncate_and_after) == 2 and not barrier
    finally:
        session.close()


def test_truncate_waits_for_a_failed_entry_beyond_the_first_hundred_pending(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """One batch of 150 changes and a TRUNCATE; row 120's write fails once (its set is not a
    set). The TRUNCATE must wait until row 120 is retried and applied, however far down the
    pending list it sits: run before, the retry would bring the row back."""
    cfg = write_config(
        tmp_path / "c.yaml",
        redis_url,
        streams=[STREAM],
        rules=[
            {"table": "public.users", "key": "user:{id}", "type": "hash"},
            {"table": "public.users", "key": "plan:{plan}", "type": "set", "member": "{id}"},
        ],
        batch_size=500,
        claim_idle_ms=300,
        claim_interval_ms=100,
        max_deliveries=100,
    )
    r.xgroup_create(STREAM, "streamsync", id="0", mkstream=True)
    settings = load_settings(cfg, environ={})
    r.set("plan:bad", "not a set")
    for i in range(1, 151):
        plan = "bad" if i == 120 else "free"
        add_change(r, STREAM, "c", {"id": i, "name": f"row {i}", "plan": plan}, 100 + i)
    add_truncate(r, 1000)
    worker = Worker(settings, consumer="w1", drain=True)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        # dict(): one atomic copy of the counts the worker thread updates
        wait_until(lambda: any(k[3] == "failed" for k in dict(worker.counts)), timeout=30)
        r.delete("plan:bad")
        thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        worker.request_stop()
        thread.join()
    assert not r.exists("user:120") and not r.exists("plan:bad")
    assert r.keys("user:*") == [] and r.keys("plan:*") == []
    assert r.xpending(STREAM, "streamsync")["pending"] == 0
    assert not r.exists(STREAM + ":dlq")


def test_truncate_keeps_rows_written_after_it_and_refuses_older_replays(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    rules = [
        {"table": "public.users", "key": "user:{id}", "type": "hash"},
        {"table": "public.users", "key": "plan:{plan}", "type": "set", "member": "{id}"},
    ]
    cfg = write_config(tmp_path / "c.yaml", redis_url, streams=[STREAM], rules=rules)
    for i in range(1, 4):
        add_change(r, STREAM, "c", {"id": i, "plan": "free"}, 100 + i)
    add_truncate(r, 200)
    add_change(r, STREAM, "c", {"id": 9, "plan": "pro"}, 300)
    drain(cfg)
    assert sorted(r.keys("user:*")) == [b"user:9"]
    assert r.smembers("plan:pro") == {b"9"} and not r.exists("plan:free")
    # capture replays the changes from before the truncate: nothing comes back
    for i in range(1, 4):
        add_change(r, STREAM, "c", {"id": i, "plan": "free"}, 100 + i)
    drain(cfg)
    assert sorted(r.keys("user:*")) == [b"user:9"] and not r.exists("plan:free")


def test_resync_lets_a_restored_database_overwrite_and_finish_sweeps(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.yaml", redis_url, streams=[STREAM])
    # the cache was filled from the old database, far into its WAL
    add_change(r, STREAM, "u", {"id": 1, "name": "newer, lost by the restore"}, 9_000_000)
    add_change(r, STREAM, "c", {"id": 2, "name": "created after the restore point"}, 9_000_100)
    drain(cfg)
    runner = CliRunner()
    result = runner.invoke(cli, ["resync", "-c", str(cfg), "--table", "public.users"])
    assert result.exit_code == 0, result.output
    assert "epoch 1" in result.output
    # capture starts over on the restored database: its snapshot has lower positions
    add_change(
        r,
        STREAM,
        "r",
        {"id": 1, "name": "as restored"},
        5_000,
    )
    add_change(r, STREAM, "r", {"id": 3, "name": "only in the restored database"}, 5_000)
    drain(cfg)
    assert r.hget("user:1", "name") == b"as restored"
    assert r.hget("user:3", "name") == b"only in the restored database"
    assert r.exists("user:2")  # no event will ever delete it...
    result = runner.invoke(
        cli, ["resync", "-c", str(cfg), "--table", "public.users", "--finish", "--wait-s", "10"]
    )
    assert result.exit_code == 0, result.output
    assert "1 row(s)" in result.output
    assert not r.exists("user:2")  # ...so the finish sweeps it
    assert sorted(r.keys("user:*")) == [b"user:1", b"user:3"]
    # changes after the restore keep applying in the new epoch, in position order
    add_change(r, STREAM, "u", {"id": 1, "name": "later"}, 6_000)
    add_change(r, STREAM, "u", {"id": 1, "name": "replayed older"}, 5_500)
    drain(cfg)
    assert r.hget("user:1", "name") == b"later"


def test_without_resync_a_restored_database_is_refused_as_stale(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.yaml", redis_url, streams=[STREAM])
    add_change(r, STREAM, "u", {"id": 1, "name": "newer, lost by the restore"}, 9_000_000)
    drain(cfg)
    add_change(r, STREAM, "r", {"id": 1, "name": "as restored"}, 5_000)
    drain(cfg)
    assert r.hget("user:1", "name") == b"newer, lost by the restore"


def test_resync_finish_waits_for_the_workers_then_gives_up(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.yaml", redis_url, streams=[STREAM])
    runner = CliRunner()
    assert runner.invoke(cli, ["resync", "-c", str(cfg), "--all"]).exit_code == 0
    r.xgroup_create(STREAM, "streamsync", id="0", mkstream=True)
    add_change(r, STREAM, "r", {"id": 1, "name": "not applied yet"}, 5_000)
    result = runner.invoke(cli, ["resync", "-c", str(cfg), "--all", "--finish", "--wait-s", "0.5"])
    assert result.exit_code == ExitCode.FAILURE
    assert "has not applied everything" in result.output


def test_resync_names_unknown_tables(r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", redis_url, streams=[STREAM])
    result = CliRunner().invoke(cli, ["resync", "-c", str(cfg), "--table", "public.nope"])
    assert result.exit_code == ExitCode.FAILURE
    assert "no rule maps table 'public.nope'" in result.output


def restored_cache(r: redis.Redis, cfg: Path) -> None:
    """The cache as the old database left it: user:1 and user:2, far into its WAL."""
    add_change(r, STREAM, "u", {"id": 1, "name": "newer, lost by the restore"}, 9_000_000)
    add_change(r, STREAM, "c", {"id": 2, "name": "created after the restore point"}, 9_000_100)
    drain(cfg)


def finish(cfg: Path, *args: str) -> Result:
    return CliRunner().invoke(
        cli, ["resync", "-c", str(cfg), "--table", "public.users", "--finish", *args]
    )


def test_finish_right_after_resync_refuses_to_empty_the_cache(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.yaml", redis_url, streams=[STREAM])
    restored_cache(r, cfg)
    last_id = r.xinfo_stream(STREAM)["last-generated-id"].decode()
    started = CliRunner().invoke(cli, ["resync", "-c", str(cfg), "--table", "public.users"])
    assert started.exit_code == 0, started.output
    # no capture started over: nothing of the new epoch to keep, everything would go
    result = finish(cfg, "--wait-s", "10")
    assert result.exit_code == ExitCode.FAILURE, result.output
    assert result.stderr.startswith(
        f"resync: public.users: nothing was added to {STREAM} since resync started epoch 1"
        f" after entry {last_id}: no re-snapshot was captured, and finishing now would remove"
        " every cached row of the table. Start capture over"
    ), result.stderr
    assert "--force" in result.stderr
    assert sorted(r.keys("user:*")) == [b"user:1", b"user:2"]
    # --force is the way to mean it
    forced = finish(cfg, "--force", "--wait-s", "10")
    assert forced.exit_code == 0, forced.output
    assert "2 row(s) not in the re-snapshot removed" in forced.output
    assert r.keys("user:*") == []


def test_finish_refuses_when_the_re_snapshot_went_to_dead_letters(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.yaml", redis_url, streams=[STREAM])
    restored_cache(r, cfg)
    assert CliRunner().invoke(cli, ["resync", "-c", str(cfg), "--all"]).exit_code == 0
    add_change(r, STREAM, "r", {"id": 1, "name": "as restored"}, 5_000)
    r.xadd(STREAM, {"not": "a debezium entry"})  # the snapshot of user:2, say, unreadable
    drain(cfg)
    assert r.xlen(STREAM + ":dlq") == 1
    result = finish(cfg, "--wait-s", "10")
    assert result.exit_code == ExitCode.FAILURE, result.output
    assert (
        f"public.users: 1 entry of {STREAM} added since epoch 1 started went to {STREAM}:dlq:"
        in result.stderr
    ), result.stderr
    assert f"streamsync dlq replay --stream {STREAM} --all" in result.stderr
    assert sorted(r.keys("user:*")) == [b"user:1", b"user:2"]
    assert finish(cfg, "--force", "--wait-s", "10").exit_code == 0
    assert r.keys("user:*") == [b"user:1"]


@contextmanager
def running_workers(cfg: Path, *consumers: str) -> Iterator[list[Worker]]:
    """In-process workers, each in a thread, stopped at the end of the block."""
    settings = load_settings(cfg, environ={})
    workers = [Worker(settings, consumer=name) for name in consumers]
    threads = [threading.Thread(target=w.run) for w in workers]
    for thread in threads:
        thread.start()
    try:
        yield workers
    finally:
        for worker in workers:
            worker.request_stop()
        for thread in threads:
            thread.join(timeout=30)
            assert not thread.is_alive()


def test_finish_after_a_re_snapshot_applied_by_several_workers_and_trimmed(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.yaml", redis_url, streams=[STREAM])
    restored_cache(r, cfg)
    assert CliRunner().invoke(cli, ["resync", "-c", str(cfg), "--all"]).exit_code == 0
    with running_workers(cfg, "w1", "w2"):
        for i in range(1, 40):
            add_change(r, STREAM, "r", {"id": 100 + i, "name": "as restored"}, 5_000)
        add_change(r, STREAM, "r", {"id": 1, "name": "as restored"}, 5_000)
        # applied, acknowledged and trimmed away (all but the last entry delivered): the stream
        # no longer shows the re-snapshot
        wait_until(
            lambda: r.xlen(STREAM) == 1 and r.hget("user:1", "name") == b"as restored",
            timeout=30,
            message="the re-snapshot applied and trimmed",
        )
        result = finish(cfg, "--wait-s", "30")
    assert result.exit_code == 0, result.output
    assert "1 row(s) not in the re-snapshot removed" in result.output
    assert not r.exists("user:2")
    assert r.hget("user:1", "name") == b"as restored" and r.exists("user:139")


def test_resync_reports_the_plain_entry_id(
    r: redis.Redis, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = write_config(tmp_path / "c.yaml", redis_url, streams=[STREAM])
    add_change(r, STREAM, "c", {"id": 1, "name": "cached"}, 100)
    last_id = r.xinfo_stream(STREAM)["last-generated-id"].decode()
    caplog.set_level(logging.INFO, logger="streamsync.resync")
    result = CliRunner().invoke(cli, ["resync", "-c", str(cfg), "--table", "public.users"])
    assert result.exit_code == 0, result.output
    assert f"public.users: epoch 1 on {STREAM}, for entries after {last_id}\n" in result.stdout
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "streamsync.resync"]
    assert logged == [f"public.users: epoch 1 starts after entry {last_id} of {STREAM}"]
