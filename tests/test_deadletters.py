"""Dead letters as the worker writes them, on a real redis-server: at the delivery
``max_deliveries`` says and not one earlier or later, never acknowledged before the letter is
written, and written once, by the consumer the entry is pending to."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from streamsync.config import RedisSettings, load_settings
from streamsync.deadletter import DeadLetter
from streamsync.epochs import Epochs
from streamsync.errors import ExitCode
from streamsync.events import Decoder
from streamsync.keys import StateKeys, dead_letter_stream
from streamsync.mapping import Planner
from streamsync.worker import Worker
from streamsync.worker.core import BatchCore
from streamsync.worker.deadletters import still_ours
from streamsync.worker.entry import Entry
from streamsync.worker.session import Session, open_session
from tests.debezium import add_change, write_config
from tests.replies import pending_entries, raw_range, xadd
from tests.servers import wait_until
from tests.workers import WorkerThread, drain, outcomes

STREAM = "app.public.users"
DLQ = dead_letter_stream(STREAM)
GROUP = "streamsync"
#: An entry that can never be applied (its value is not JSON): dead-lettered on any delivery.
MALFORMED = {'{"id":2}': "this is not json"}
#: Long enough that nothing is reclaimed during a test unless the test makes it idle.
NEVER_IDLE_MS = 3_600_000


def letters(r: redis.Redis) -> list[DeadLetter]:
    """The dead letters of STREAM, oldest first, parsed as the ``dlq`` commands read them."""
    parsed = [DeadLetter.parse(dlq_id, raw) for dlq_id, raw in raw_range(r, DLQ)]
    for letter in parsed:
        assert letter.problem is None, letter
    return parsed


def deliveries(r: redis.Redis, entry_id: bytes) -> int:
    """How many times the group delivered ``entry_id`` (0 when it is not pending)."""
    for pending in pending_entries(r, STREAM, GROUP):
        if pending.id == entry_id:
            return pending.deliveries
    return 0


# -- max_deliveries ----------------------------------------------------------------------------


@pytest.mark.parametrize("max_deliveries", [1, 2, 5])
def test_exhausted_on_exactly_the_last_allowed_delivery(max_deliveries: int) -> None:
    planner = Planner({}, StateKeys())
    core = BatchCore(Decoder(), planner, Epochs(), tombstone_s=1, max_deliveries=max_deliveries)
    exhausted = [
        core.exhausted(Entry(STREAM, b"1-0", [], deliveries=n))
        for n in range(1, max_deliveries + 3)
    ]
    assert exhausted == [False] * (max_deliveries - 1) + [True] * 3


@pytest.mark.parametrize("max_deliveries", [1, 3])
def test_a_failing_row_is_dead_lettered_on_delivery_max_deliveries(
    r: redis.Redis, redis_url: str, tmp_path: Path, max_deliveries: int
) -> None:
    # row 7's set is a string: every apply of the row fails with WRONGTYPE, and no retry
    # repairs it
    r.set("names:7", "not a set")
    add_change(r, STREAM, "c", {"id": 1, "name": "good"}, lsn=10)
    failing = add_change(r, STREAM, "c", {"id": 7, "name": "bad"}, lsn=11)
    cfg = write_config(
        tmp_path / "c.yaml",
        redis_url,
        rules=[{"table": "public.users", "key": "names:{id}", "type": "set", "member": "{name}"}],
        max_deliveries=max_deliveries,
        claim_idle_ms=100,
        claim_interval_ms=100,
    )
    worker = drain(cfg)
    (letter,) = letters(r)
    assert letter.original_id == failing
    assert "WRONGTYPE" in letter.reason
    # dead-lettered on the delivery max_deliveries allows, not one earlier, not one later
    assert letter.deliveries == max_deliveries
    counts = outcomes(worker)
    assert counts.get("failed", 0) == max_deliveries - 1, counts
    assert counts["dead_lettered"] == 1, counts
    assert counts["applied"] == 1, counts
    assert r.xpending(STREAM, GROUP)["pending"] == 0


# -- a dead letter that cannot be written ------------------------------------------------------


def test_an_entry_whose_dead_letter_cannot_be_written_stays_pending(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # the dead-letter stream's name holds a string: every XADD to it fails with WRONGTYPE
    r.set(DLQ, "not a stream")
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    add_change(r, STREAM, "c", {"id": 1, "name": "good"}, lsn=10)
    bad = xadd(r, STREAM, MALFORMED)
    cfg = write_config(tmp_path / "c.yaml", redis_url, claim_idle_ms=100, claim_interval_ms=100)
    worker = Worker(load_settings(cfg, environ={}), consumer="w1", drain=True)
    with WorkerThread(worker) as running:
        # written or not, the entry was acknowledged if it is no longer pending; pending, it is
        # reclaimed and its letter tried again
        wait_until(
            lambda: deliveries(r, bad) >= 3,
            message="the entry reclaimed twice after its dead letter failed, still pending",
        )
        assert r.type(DLQ) == b"string"
        assert r.hgetall("user:1") == {b"id": b"1", b"name": b"good"}
        # the operator repairs the key: the next claim writes the letter, then acknowledges
        r.delete(DLQ)
        assert running.join(timeout=30) == ExitCode.OK
    (letter,) = letters(r)
    assert letter.original_id == bad
    assert letter.fields == [k.encode() for kv in MALFORMED.items() for k in kv]
    assert letter.deliveries is not None and letter.deliveries >= 3
    assert r.xpending(STREAM, GROUP)["pending"] == 0
    assert outcomes(worker)["dead_lettered"] == 1


# -- dead-lettered only while still pending to this consumer ------------------------------------


@pytest.fixture
def session(redis_url: str) -> Iterator[Session]:
    opened = open_session(RedisSettings(url=redis_url), client_name="test", timeout_s=5)
    yield opened
    opened.close()


def test_still_ours_only_while_pending_to_the_consumer(r: redis.Redis, session: Session) -> None:
    first = xadd(r, STREAM, MALFORMED)
    second = xadd(r, STREAM, MALFORMED)
    r.xgroup_create(STREAM, GROUP, id="0")
    r.xreadgroup(GROUP, "w1", {STREAM: ">"})
    entry = Entry(STREAM, first, None, deliveries=2)
    assert still_ours(session, GROUP, "w1", entry)
    assert not still_ours(session, GROUP, "w2", entry)
    # another consumer claims it: no longer w1's, though w1 still holds the entry after it
    r.xclaim(STREAM, GROUP, "w2", 0, [first])
    assert not still_ours(session, GROUP, "w1", entry)
    assert still_ours(session, GROUP, "w2", entry)
    assert still_ours(session, GROUP, "w1", Entry(STREAM, second, None, deliveries=2))
    # settled by the other consumer: nobody's
    r.xack(STREAM, GROUP, first)
    assert not still_ours(session, GROUP, "w2", entry)
    assert not still_ours(session, GROUP, "w1", entry)


class ClaimedAwayObserver:
    """Has consumer ``thief`` claim ``entry_id`` as soon as the worker reports that it claimed
    entries: the worker holds the entry, decides to dead-letter it, and by the time it would
    write the letter the entry is pending to another consumer."""

    def __init__(self, r: redis.Redis, entry_id: bytes, thief: str) -> None:
        self.r = r
        self.entry_id = entry_id
        self.thief = thief
        self.claimed_away = threading.Event()

    def counted(self, stream: str, table: str, op: str, outcome: str, n: int) -> None:
        if outcome == "claimed" and not self.claimed_away.is_set():
            self.r.xclaim(stream, GROUP, self.thief, 0, [self.entry_id])
            self.claimed_away.set()

    def applied_batch(self, entries: int, rows: int, seconds: float) -> None:
        pass

    def sync_lag(self, seconds: float) -> None:
        pass

    def reconnected(self) -> None:
        pass


def test_an_entry_claimed_away_before_its_letter_is_written_gets_one_letter(
    r: redis.Redis, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamsync.worker")
    bad = xadd(r, STREAM, MALFORMED)
    r.xgroup_create(STREAM, GROUP, id="0")
    # a first consumer read it and went away long ago
    r.xreadgroup(GROUP, "w0", {STREAM: ">"})
    r.xclaim(STREAM, GROUP, "w0", 0, [bad], idle=NEVER_IDLE_MS + 1)
    # w1 reclaims it (a redelivery, so w1 checks it is still its own before writing) and
    # decides to dead-letter it; meanwhile w2 claims it; nothing is idle again during the test
    cfg = write_config(
        tmp_path / "c.yaml", redis_url, claim_idle_ms=NEVER_IDLE_MS, claim_interval_ms=100
    )
    observer = ClaimedAwayObserver(r, bad, "w2")
    w1 = Worker(load_settings(cfg, environ={}), consumer="w1", observer=observer)
    with WorkerThread(w1):
        wait_until(observer.claimed_away.is_set, message="w1 claimed the entry, then w2 did")
        wait_until(
            lambda: "no longer pending to w1, not dead-lettered here" in caplog.text,
            message="w1 to let the entry go",
        )
    assert r.exists(DLQ) == 0
    assert outcomes(w1).get("dead_lettered", 0) == 0, outcomes(w1)
    assert deliveries(r, bad) > 1
    # w2 settles what is pending to it: the one dead letter
    w2 = drain(cfg, consumer="w2")
    (letter,) = letters(r)
    assert letter.original_id == bad and letter.consumer == "w2"
    assert outcomes(w2)["dead_lettered"] == 1
    assert r.xpending(STREAM, GROUP)["pending"] == 0
