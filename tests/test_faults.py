"""Faults the worker must survive without losing, rolling back or half-applying a change.

Workers run as ``streamsync run`` subprocesses (kill -9 and SIGTERM are test inputs) against a real
redis-server. Every test ends the same way: Redis is compared with the newest change of every row,
computed here from what the test itself wrote (never read back from the stream), and the group
must have read every entry and hold nothing pending.
"""

from __future__ import annotations

import bisect
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from streamsync.config import Rule
from streamsync.positions import RANK_REMOVE, RANK_WRITE, streamed
from tests.debezium import change_fields, entry_fields, envelope, write_config
from tests.records import key_records
from tests.replies import (
    as_bytes,
    entry_fields_dict,
    pending_entries,
    xadd,
    xrange,
    xreadgroup,
)
from tests.servers import RedisServer, wait_until
from tests.workers import WorkerProcess

STREAM = "app.public.users"
GROUP = "streamsync"
DLQ = f"{STREAM}:dlq"
#: The rule every test here maps ``public.users`` with (tests.debezium.write_config's default).
USERS_RULE = Rule.model_validate({"table": "public.users", "key": "user:{id}", "type": "hash"})

#: LSNs look like PostgreSQL's: large, increasing, not contiguous.
LSN_START = 0x1_6B37_4D48
LSN_STEP = 56
#: Entries added per pipeline round trip.
XADD_CHUNK = 5_000

StartWorker = Callable[..., WorkerProcess]


# -- what the test wrote, and what Redis must hold because of it ------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """One change the test added to the stream."""

    entry_id: bytes
    op: str
    row: Mapping[str, Any]
    lsn: int

    @property
    def key(self) -> str:
        """The target key the users rule maps the row to."""
        return user_key(self.row["id"])


def user_key(i: int) -> str:
    return f"user:{i}"


def positions(r: redis.Redis, keys: Iterable[str]) -> dict[str, str | None]:
    """The position each users key's record holds (None: no record)."""
    return {
        key: None if record is None else record.position
        for key, record in key_records(r, USERS_RULE, keys).items()
    }


def user(i: int, version: int) -> dict[str, Any]:
    """Version ``version`` of row ``i``; ``note`` is null in some versions, so a full-row write
    must drop a field that an older version had."""
    return {
        "id": i,
        "name": f"user {i} v{version}",
        "version": version,
        "active": version % 2 == 0,
        "note": None if version % 3 == 1 else f"note {version}",
    }


def sid(entry_id: bytes | str) -> tuple[int, int]:
    """A stream id as a comparable (ms, seq) pair."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, seq = text.split("-")
    return int(ms), int(seq)


class Feed:
    """Adds changes to the stream and keeps the test's own record of them."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self.changes: list[Change] = []
        self._lsn = LSN_START

    def next_lsn(self) -> int:
        self._lsn += LSN_STEP
        return self._lsn

    def add(self, ops: Iterable[tuple[str, Mapping[str, Any]]]) -> list[Change]:
        """XADD each (op, row) with a new, higher LSN."""
        return self._xadd([(op, row, self.next_lsn()) for op, row in ops])

    def replay(self, changes: Iterable[Change]) -> list[Change]:
        """XADD changes again, exactly as they were (same row, same LSN)."""
        return self._xadd([(c.op, c.row, c.lsn) for c in changes])

    def _xadd(self, specs: Sequence[tuple[str, Mapping[str, Any], int]]) -> list[Change]:
        added: list[Change] = []
        for start in range(0, len(specs), XADD_CHUNK):
            chunk = specs[start : start + XADD_CHUNK]
            pipe = self.r.pipeline(transaction=False)
            for op, row, lsn in chunk:
                pipe.xadd(STREAM, entry_fields_dict(change_fields(op, row, lsn)))
            ids = [as_bytes(eid) for eid in pipe.execute()]
            added += [
                Change(eid, op, row, lsn) for eid, (op, row, lsn) in zip(ids, chunk, strict=True)
            ]
        self.changes += added
        return added

    def sorted_ids(self) -> list[tuple[int, int]]:
        return sorted(sid(c.entry_id) for c in self.changes)


def newest(changes: Iterable[Change]) -> dict[str, Change]:
    """The change with the highest LSN per target key."""
    out: dict[str, Change] = {}
    for change in changes:
        current = out.get(change.key)
        if current is None or change.lsn > current.lsn:
            out[change.key] = change
    return out


def _field_value(value: Any) -> bytes:
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"no expected hash value for {value!r}")


def expected_hash(change: Change) -> dict[bytes, bytes]:
    """The hash a full-row write of ``change`` leaves: null columns are absent fields."""
    return {k.encode(): _field_value(v) for k, v in change.row.items() if v is not None}


def assert_rows(r: redis.Redis, changes: Iterable[Change], keys: Iterable[str]) -> None:
    """Every key holds exactly the newest of ``changes`` for it (absent if none or a delete),
    and its position record holds that change's LSN."""
    keys = list(keys)
    expected = newest(changes)
    pipe = r.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
        pipe.hgetall(key)
    replies = pipe.execute(raise_on_error=False)
    recorded = positions(r, keys)
    wrong: list[str] = []
    for n, key in enumerate(keys):
        kind, fields = replies[2 * n : 2 * n + 2]
        position = recorded[key]
        change = expected.get(key)
        if change is None:
            if kind != b"none":
                wrong.append(f"{key}: no change for it was applied, but it is a {kind!r}")
            continue
        want_kind = b"none" if change.op == "d" else b"hash"
        want_fields = {} if change.op == "d" else expected_hash(change)
        rank = RANK_REMOVE if change.op == "d" else RANK_WRITE
        want_position = streamed(change.lsn, change.lsn, rank)
        if kind != want_kind or fields != want_fields:
            wrong.append(
                f"{key}: want {change.op} at lsn {change.lsn} {want_fields}, got {kind!r} "
                f"{fields} (position {position!r})"
            )
        elif position != want_position:
            wrong.append(f"{key}: position {position!r}, want {want_position!r}")
    assert not wrong, f"{len(wrong)} of {len(keys)} rows wrong, e.g.:\n" + "\n".join(wrong[:5])


def group_info(r: redis.Redis, group: str = GROUP) -> dict[str, Any]:
    for info in r.xinfo_groups(STREAM):
        if info["name"] == group.encode():
            return dict(info)
    raise AssertionError(f"no group {group!r} on {STREAM}")


def last_delivered(r: redis.Redis, group: str = GROUP) -> tuple[int, int]:
    return sid(group_info(r, group)["last-delivered-id"])


def delivered_count(r: redis.Redis, sorted_ids: Sequence[tuple[int, int]]) -> int:
    """How many of ``sorted_ids`` the group has been delivered (read, acked or not)."""
    try:
        return bisect.bisect_right(sorted_ids, last_delivered(r))
    except (AssertionError, redis.ResponseError):
        return 0  # the worker has not created its group yet


def consumer_pending(r: redis.Redis, consumer: str) -> int:
    for info in r.xinfo_consumers(STREAM, GROUP):
        if info["name"] == consumer.encode():
            return int(info["pending"])
    raise AssertionError(f"no consumer {consumer!r} in group {GROUP!r}")


def consumer_names(r: redis.Redis) -> set[bytes]:
    try:
        return {info["name"] for info in r.xinfo_consumers(STREAM, GROUP)}
    except redis.ResponseError:
        return set()


def settled(r: redis.Redis) -> bool:
    """The group has read every entry of the stream and holds none pending."""
    try:
        info = group_info(r)
    except (AssertionError, redis.ResponseError):
        return False
    last = r.xinfo_stream(STREAM)["last-generated-id"]
    return bool(info["pending"] == 0 and info["last-delivered-id"] == last)


def assert_settled(r: redis.Redis) -> None:
    pending = r.xpending(STREAM, GROUP)
    assert pending["pending"] == 0, f"entries left pending: {pending}"
    last = r.xinfo_stream(STREAM)["last-generated-id"]
    info = group_info(r)
    assert info["last-delivered-id"] == last, f"group has not read every entry: {info}"


def preload_with_deletes(feed: Feed, n_rows: int, n_versions: int) -> None:
    """``n_rows * n_versions`` interleaved updates, then every 7th row deleted and every 14th
    created again."""
    ops: list[tuple[str, Mapping[str, Any]]] = [
        ("u", user(i, v)) for v in range(n_versions) for i in range(n_rows)
    ]
    ops += [("d", user(i, n_versions - 1)) for i in range(0, n_rows, 7)]
    ops += [("c", user(i, n_versions)) for i in range(0, n_rows, 14)]
    feed.add(ops)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[StartWorker]:
    """Starts ``streamsync run`` subprocesses; kills any still running at teardown."""
    started: list[WorkerProcess] = []

    def start(config: Path, consumer: str, *, drain: bool = False) -> WorkerProcess:
        worker = WorkerProcess(config, consumer, tmp_path / "logs", drain=drain).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


# -- 1. two workers, one group -------------------------------------------------------------


def test_two_workers_share_interleaved_updates_and_replays_are_no_ops(
    r: redis.Redis, redis_url: str, tmp_path: Path, workers: StartWorker
) -> None:
    n_rows, n_versions = 50, 200
    config = write_config(tmp_path / "c.yaml", redis_url, batch_size=40)
    rng = random.Random(20240601)
    feed = Feed(r)
    updates = [("u", user(i, v)) for v in range(n_versions) for i in range(n_rows)]
    half = len(updates) // 2
    feed.add(updates[:half])
    # older events again, after newer ones of the same rows
    feed.replay(rng.sample(feed.changes, 200))

    first, second = workers(config, "w1"), workers(config, "w2")
    wait_until(
        lambda: {b"w1", b"w2"} <= consumer_names(r),
        timeout=20,
        message="both workers joined the group",
    )
    for start in range(half, len(updates), 250):
        feed.add(updates[start : start + 250])
        feed.replay(rng.sample(feed.changes, 25))
    # every row's newest update once more: an exact duplicate must change nothing
    feed.replay(list(newest(feed.changes).values()))
    # and old updates last of all: applied, they would leave rows rolled back
    feed.replay(rng.sample(feed.changes[:half], 100))

    wait_until(lambda: settled(r), timeout=60, message="every entry read and acknowledged")
    assert_rows(r, feed.changes, [user_key(i) for i in range(n_rows)])
    for worker in (first, second):
        worker.terminate()
    assert [first.wait(), second.wait()] == [0, 0]

    summaries = {w.consumer: w.summary() for w in (first, second)}
    for consumer, counts in summaries.items():
        assert counts.get("applied", 0) > 0, f"{consumer} applied nothing: {summaries}"
    processed = sum(c.get("applied", 0) + c.get("stale", 0) for c in summaries.values())
    assert processed >= len(feed.changes), summaries
    assert sum(c.get("stale", 0) for c in summaries.values()) > 0, summaries
    assert sum(c.get("failed", 0) + c.get("dead_lettered", 0) for c in summaries.values()) == 0
    assert r.exists(DLQ) == 0
    assert_settled(r)


# -- 2. kill -9 mid-batch --------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_mid_batch_then_another_worker_reclaims_and_finishes(
    r: redis.Redis, redis_url: str, tmp_path: Path, workers: StartWorker
) -> None:
    n_rows = 1_000
    config = write_config(tmp_path / "c.yaml", redis_url)
    feed = Feed(r)
    preload_with_deletes(feed, n_rows, 100)
    ids = feed.sorted_ids()

    doomed = workers(config, "doomed")
    wait_until(
        lambda: delivered_count(r, ids) >= len(ids) // 5,
        timeout=30,
        message="the first worker got a fifth of the way",
    )
    doomed.kill()
    held = consumer_pending(r, "doomed")
    assert held > 0, "killed between batches: it held nothing"
    assert delivered_count(r, ids) < len(ids), "it finished before it was killed"

    rescuer = workers(config, "rescuer", drain=True)
    assert rescuer.wait(timeout=60) == 0, rescuer.log_tail()
    assert consumer_pending(r, "doomed") == 0
    assert rescuer.summary().get("claimed", 0) >= held, rescuer.summary()
    assert_rows(r, feed.changes, [user_key(i) for i in range(n_rows)])
    assert_settled(r)


# -- 3. SIGTERM ------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_acks_the_batch_in_hand_and_leaves_nothing_half_applied(
    r: redis.Redis, redis_url: str, tmp_path: Path, workers: StartWorker
) -> None:
    n_rows = 1_000
    config = write_config(tmp_path / "c.yaml", redis_url)
    feed = Feed(r)
    preload_with_deletes(feed, n_rows, 100)
    ids = feed.sorted_ids()
    keys = [user_key(i) for i in range(n_rows)]

    stopping = workers(config, "stopping")
    wait_until(
        lambda: delivered_count(r, ids) >= len(ids) // 5,
        timeout=30,
        message="the worker got a fifth of the way",
    )
    stopping.terminate()
    assert stopping.wait(timeout=5) == 0, stopping.log_tail()

    # nothing pending to it: the stopped worker left the group
    assert b"stopping" not in consumer_names(r), "the stopped worker left entries pending"
    upto = last_delivered(r)
    pending = {sid(p.id) for p in pending_entries(r, STREAM, GROUP)}
    acked = [c for c in feed.changes if sid(c.entry_id) <= upto and sid(c.entry_id) not in pending]
    assert 0 < len(acked) < len(feed.changes), "not stopped mid-run"
    # every acknowledged change is visible, and nothing beyond them
    assert_rows(r, acked, keys)
    assert "stopped:" in stopping.log()

    finisher = workers(config, "finisher", drain=True)
    assert finisher.wait(timeout=60) == 0, finisher.log_tail()
    assert_rows(r, feed.changes, keys)
    assert_settled(r)


# -- 4. Redis restarted under a running worker ------------------------------------------------


@pytest.mark.parametrize("how", ["kill-9", "graceful"])
def test_worker_reconnects_after_redis_restarts_under_it(
    fresh_redis: RedisServer, tmp_path: Path, workers: StartWorker, how: str
) -> None:
    n_rows = 500
    r = redis.Redis.from_url(fresh_redis.url)
    try:
        config = write_config(tmp_path / "c.yaml", fresh_redis.url)
        feed = Feed(r)
        feed.add([("u", user(i, v)) for v in range(60) for i in range(n_rows)])
        ids = feed.sorted_ids()

        survivor = workers(config, "survivor")
        wait_until(
            lambda: delivered_count(r, ids) >= len(ids) // 4,
            timeout=30,
            message="the worker got a quarter of the way",
        )
        if how == "kill-9":
            fresh_redis.kill()
        fresh_redis.restart()  # graceful: SIGTERM (a clean SHUTDOWN), then start

        rng = random.Random(7)
        feed.add([("u", user(i, v)) for v in range(60, 100) for i in range(n_rows)])
        feed.replay(rng.sample(feed.changes, 500))
        wait_until(lambda: settled(r), timeout=30, message="every entry read and acknowledged")
        assert survivor.running, survivor.log_tail()
        assert "redis connection lost" in survivor.log()
        assert_rows(r, feed.changes, [user_key(i) for i in range(n_rows)])
        assert_settled(r)

        survivor.terminate()
        assert survivor.wait() == 0, survivor.log_tail()
    finally:
        r.close()


# -- 5. trimming ---------------------------------------------------------------------------


def _stream_ids(r: redis.Redis) -> set[bytes]:
    return {eid for eid, _ in xrange(r, STREAM)}


def test_trim_never_removes_an_entry_another_group_has_not_acknowledged(
    r: redis.Redis, redis_url: str, tmp_path: Path, workers: StartWorker
) -> None:
    n_rows = 100
    config = write_config(tmp_path / "c.yaml", redis_url, trim=True, trim_interval_ms=100)
    feed = Feed(r)
    feed.add([("u", user(i, v)) for v in range(30) for i in range(n_rows)])
    ids = [c.entry_id for c in feed.changes]
    assert len(ids) == 3_000

    # a second group reads the first 1000 entries and acks only some of them
    r.xgroup_create(STREAM, "audit", id="0")
    read = xreadgroup(r, "audit", "auditor", STREAM, count=1_000)
    assert [eid for eid, _ in read] == ids[:1_000]
    r.xack(STREAM, "audit", *ids[:300], *ids[500:600])

    worker = workers(config, "trimmer")
    wait_until(lambda: settled(r), timeout=30, message="the worker applied everything")
    # audit's oldest unacked entry is ids[300]: what is before it goes, nothing after it
    wait_until(lambda: r.xlen(STREAM) <= 2_700, timeout=10, message="acked entries trimmed")
    present = _stream_ids(r)
    assert set(ids[300:]) <= present, "an entry audit has not acked was trimmed"
    assert not set(ids[:300]) & present
    assert len(present) == 2_700

    # audit acks what it holds: its bound becomes its last-delivered id, ids[999]
    r.xack(STREAM, "audit", *ids[300:500], *ids[600:1_000])
    wait_until(lambda: r.xlen(STREAM) <= 2_001, timeout=10, message="audit's acks trimmed")
    assert _stream_ids(r) == set(ids[999:])

    # more changes while the worker runs; audit reads 200 of them and acks none
    more = feed.add([("u", user(i, v)) for v in range(30, 35) for i in range(n_rows)])
    read = xreadgroup(r, "audit", "auditor", STREAM, count=200)
    assert [eid for eid, _ in read] == ids[1_000:1_200]
    wait_until(lambda: settled(r), timeout=30, message="the worker applied the new changes")
    wait_until(lambda: r.xlen(STREAM) <= 2_500, timeout=10, message="trimmed up to audit's")
    unacked_by_audit = set(ids[1_000:]) | {c.entry_id for c in more}
    assert _stream_ids(r) == unacked_by_audit

    worker.terminate()
    assert worker.wait() == 0, worker.log_tail()
    assert r.xpending(STREAM, "audit")["pending"] == 200
    assert_rows(r, feed.changes, [user_key(i) for i in range(n_rows)])
    assert_settled(r)


# -- 6. poison entries -----------------------------------------------------------------------


def _dlq_entries(r: redis.Redis) -> dict[bytes, dict[str, Any]]:
    """Dead letters by original entry id: the fixed fields, then the original pairs."""
    out: dict[bytes, dict[str, Any]] = {}
    for _, flat in xrange(r, DLQ):
        items = list(flat.items())
        head = dict(items[:7])
        letter: dict[str, Any] = {k.decode(): v for k, v in head.items()}
        letter["original"] = items[7:]
        out[letter["id"]] = letter
    return out


def test_poison_entries_in_a_large_batch_are_dead_lettered_and_the_rest_applies(
    r: redis.Redis, redis_url: str, tmp_path: Path, workers: StartWorker
) -> None:
    n_rows = 200
    config = write_config(tmp_path / "c.yaml", redis_url, batch_size=500)
    feed = Feed(r)
    good = [("u", user(i, v)) for v in range(10) for i in range(n_rows)]
    poison: dict[bytes, tuple[str, list[tuple[bytes, bytes]]]] = {}

    def add_poison(fields: Mapping[str, str], reason: str) -> None:
        eid = xadd(r, STREAM, fields)
        poison[eid] = (reason, [(k.encode(), v.encode()) for k, v in fields.items()])

    feed.add(good[:700])
    add_poison({'{"id":1}': '{"before":null,"after":{"id":1,'}, "value is not valid JSON")
    feed.add(good[700:1_000])
    # a newer LSN than any good change: applied by mistake, it would show in user:2
    bad_op = envelope("u", "public.users", feed.next_lsn() + 10**9, after=user(2, 999))
    add_poison(entry_fields({"id": 2}, {**bad_op, "op": "x"}), "unknown op 'x'")
    feed.add(good[1_000:1_300])
    orders = envelope("u", "public.orders", feed.next_lsn() + 10**9, after={"id": 3})
    add_poison(entry_fields({"id": 3}, orders), "no rule maps table 'public.orders'")
    feed.add(good[1_300:])

    worker = workers(config, "sorter", drain=True)
    assert worker.wait(timeout=30) == 0, worker.log_tail()

    letters = _dlq_entries(r)
    assert set(letters) == set(poison), letters
    for eid, (reason, original) in poison.items():
        letter = letters[eid]
        assert reason in letter["reason"].decode(), letter
        assert letter["stream"] == STREAM.encode()
        assert letter["deliveries"] == b"1"
        assert letter["consumer"] == b"sorter"
        assert int(letter["failed_at_ms"]) > 0
        assert letter["fields"] == str(len(original)).encode()
        assert letter["original"] == original
    assert worker.summary().get("dead_lettered") == 3, worker.summary()
    assert_rows(r, feed.changes, [user_key(i) for i in range(n_rows)])
    assert_settled(r)


# -- 7. a row that fails at apply time ---------------------------------------------------------


def test_a_row_that_keeps_failing_is_retried_then_dead_lettered(
    r: redis.Redis, redis_url: str, tmp_path: Path, workers: StartWorker
) -> None:
    n_rows, bad = 100, "names:7"
    rules = [
        {"table": "public.users", "key": "user:{id}", "type": "hash"},
        {"table": "public.users", "key": "names:{id}", "type": "set", "member": "{name}"},
    ]
    config = write_config(
        tmp_path / "c.yaml",
        redis_url,
        rules=rules,
        max_deliveries=3,
        claim_idle_ms=200,
        claim_interval_ms=100,
    )
    # row 7's set is a string: SADD fails with WRONGTYPE, a failure no retry repairs
    r.set(bad, "not a set")
    feed = Feed(r)
    feed.add([("u", user(i, v)) for v in range(5) for i in range(n_rows)])
    failing = {c.entry_id for c in feed.changes if c.key == user_key(7)}

    worker = workers(config, "retrier", drain=True)
    assert worker.wait(timeout=30) == 0, worker.log_tail()

    letters = _dlq_entries(r)
    assert set(letters) == failing, letters
    for letter in letters.values():
        assert int(letter["deliveries"]) >= 3, letter
        reason = letter["reason"].decode()
        assert reason.startswith("redis error:"), letter
        assert "WRONGTYPE" in reason, letter
    log = worker.log()
    assert "failed on delivery 1 of 3" in log
    assert "failed on delivery 2 of 3" in log
    assert r.type(bad) == b"string"
    # the hash rule applied every row, the failing entries' included (its rows applied first)
    assert_rows(r, feed.changes, [user_key(i) for i in range(n_rows)])
    assert_settled(r)


# -- 8. reclaiming under load ----------------------------------------------------------------


@pytest.mark.slow
def test_a_crashed_workers_entries_are_reclaimed_while_the_survivor_is_busy(
    r: redis.Redis, redis_url: str, tmp_path: Path, workers: StartWorker
) -> None:
    """claim_interval_ms holds under load: a survivor busy with a backlog still takes over a
    crashed worker's entries once they have been idle claim_idle_ms, instead of leaving them
    pending (and the stream untrimmed behind them) until the backlog is gone. The survivor's
    batch_size 1 makes a modest backlog last it many seconds."""
    n_rows = 1_000
    survivor_config = write_config(tmp_path / "survivor.yaml", redis_url, batch_size=1)
    doomed_config = write_config(tmp_path / "doomed.yaml", redis_url, batch_size=20)
    feed = Feed(r)
    feed.add([("u", user(i, v)) for v in range(100) for i in range(n_rows)])
    ids = feed.sorted_ids()

    survivor = workers(survivor_config, "survivor")
    wait_until(lambda: b"survivor" in consumer_names(r), timeout=20, message="survivor joined")
    doomed = workers(doomed_config, "doomed")
    wait_until(
        lambda: b"doomed" in consumer_names(r) and delivered_count(r, ids) >= len(ids) // 10,
        timeout=30,
        message="both workers busy, a tenth of the backlog read",
    )
    doomed.kill()
    killed_at = time.monotonic()
    held = consumer_pending(r, "doomed")
    assert held > 0, "killed between batches: it held nothing"

    wait_until(
        lambda: consumer_pending(r, "doomed") < held,
        timeout=60,
        message="a first entry of the crashed worker reclaimed",
    )
    first_claim_after = time.monotonic() - killed_at
    assert delivered_count(r, ids) < len(ids), (
        f"the crashed worker's entries were first reclaimed {first_claim_after:.1f}s after the "
        f"kill, only once the survivor had read the whole backlog (claim_idle_ms 500, "
        f"claim_interval_ms 200): no claim ran while it was busy"
    )

    wait_until(lambda: settled(r), timeout=90, message="every entry read and acknowledged")
    assert_rows(r, feed.changes, [user_key(i) for i in range(n_rows)])
    assert_settled(r)
    survivor.terminate()
    assert survivor.wait() == 0, survivor.log_tail()
