"""Faults under load: several workers, a producer that never stops, faults injected mid-run.

Every test runs 3 ``streamsync run`` subprocesses in one consumer group while a producer thread
XADDs a realistic stream of ``public.users`` changes (creates, updates and deletes over a few
thousand rows, strictly increasing LSNs) mapped by three rules at once:

- a hash ``user:{id}`` (every column),
- a set ``plan:{plan}:users`` with member ``{id}`` (rows move between sets when the plan changes),
- a sorted set ``active_balance`` with member ``user:{id}`` scored by ``balance``, filtered by
  ``active = true`` (rows enter and leave it; a null balance leaves it too).

The producer keeps its own record of every entry that landed in the stream (it chooses the entry
ids itself, so a pipeline cut by a fault is re-sent without doubt about what landed), and the
expected Redis state is computed from that record alone: the newest change (highest LSN) of every
row. Each test waits until the producer is done and the group has read and acknowledged every
entry, then compares every hash, set and sorted set (and the hash rule's records of positions and
the other rules' records of where each row is) with it, and prints one summary line: the faults
injected, the entries, and ``lost`` (an expected key, field set or member missing or older) and
``stale`` (a key or member that should not be there), both asserted to be 0.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from streamsync.buckets import Tables
from streamsync.config import Rule
from streamsync.functions import loaded_version
from streamsync.keys import StateKeys
from streamsync.mapping import hash_value
from streamsync.positions import RANK_REMOVE, RANK_WRITE, streamed
from tests.debezium import entry_fields, envelope, write_config
from tests.records import placement, records
from tests.replies import as_bytes, entry_fields_dict, xrange, zscores
from tests.servers import RedisServer, wait_until
from tests.test_faults import (
    DLQ,
    GROUP,
    STREAM,
    _dlq_entries,
    consumer_names,
    group_info,
    positions,
    settled,
)
from tests.workers import WorkerProcess

TABLE = "public.users"
ZSET_KEY = "active_balance"
PLANS = ("free", "pro", "team", "enterprise")
RULES: list[dict[str, Any]] = [
    {"table": TABLE, "key": "user:{id}", "type": "hash"},
    {"table": TABLE, "key": "plan:{plan}:users", "type": "set", "member": "{id}"},
    {
        "table": TABLE,
        "key": ZSET_KEY,
        "type": "zset",
        "member": "user:{id}",
        "score": "balance",
        "where": "active = true",
    },
]
HASH_RULE, SET_RULE, ZSET_RULE = (Rule.model_validate(rule) for rule in RULES)

LSN_START = 0x2_0000_0000
#: How long the group may take to catch up once the producer is done.
SETTLE_TIMEOUT_S = 40.0


# -- the producer and its record ------------------------------------------------------------


#: An entry to send: fields, op, row id, row (None for a delete or a poison entry), lsn, replay.
Outgoing = tuple[Mapping[str, str], str, int, Mapping[str, Any] | None, int, bool]


@dataclass(frozen=True, slots=True)
class Sent:
    """One entry that landed in the stream."""

    entry_id: bytes
    fields: Mapping[str, str]
    #: c, u or d; "poison" for an entry that must be dead-lettered.
    op: str
    row_id: int
    #: The row after the change (None for a delete or a poison entry).
    row: Mapping[str, Any] | None
    lsn: int
    replay: bool = False


def _balance(rng: random.Random) -> str | None:
    if rng.random() < 0.05:
        return None  # no score: the row is in no sorted set
    return f"{rng.randint(0, 99_999)}.{rng.randint(0, 99):02d}"


def _new_row(rng: random.Random, row_id: int, version: int) -> dict[str, Any]:
    return {
        "id": row_id,
        "name": f"user {row_id} v{version}",
        "plan": rng.choice(PLANS),
        "balance": _balance(rng),
        "active": rng.random() < 0.6,
        "note": None if rng.random() < 0.3 else f"note {version}",
    }


def _updated_row(rng: random.Random, row: Mapping[str, Any], version: int) -> dict[str, Any]:
    new = dict(row)
    new["name"] = f"user {row['id']} v{version}"
    if rng.random() < 0.3:
        new["plan"] = rng.choice(PLANS)
    if rng.random() < 0.3:
        new["active"] = not row["active"]
    if rng.random() < 0.7:
        new["balance"] = _balance(rng)
    if rng.random() < 0.3:
        new["note"] = None if row["note"] is not None else f"note {version}"
    return new


class Producer:
    """XADDs generated changes from a thread of its own, at a steady rate, and records what
    landed.

    It picks every entry id itself (``<ms>-<seq>``, increasing, as Redis would), so a pipeline
    cut by a fault (Redis killed, connection killed, LOADING) is simply sent again: an entry that
    had landed is refused as "equal or smaller than the top item" and counts as landed, one that
    had not lands now. Only this producer writes the stream, so what landed is always a prefix
    of what was sent.
    """

    def __init__(
        self,
        url: str,
        *,
        rows: int,
        seed: int,
        chunk: int = 50,
        replay_every: int = 0,
        replay_size: int = 0,
    ) -> None:
        self.r = redis.Redis.from_url(
            url, socket_timeout=5, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
        )
        self.rows = rows
        self.rng = random.Random(seed)
        self.chunk = chunk
        self.replay_every = replay_every
        self.replay_size = replay_size
        self.sent: list[Sent] = []
        self.table: dict[int, dict[str, Any]] = {}
        self.version = 0
        self.lsn = LSN_START
        self.last_id = (0, 0)
        self.resends = 0
        self.replays = 0
        self.replayed = 0
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- generation

    def _next_id(self) -> bytes:
        ms, seq = self.last_id
        now = int(time.time() * 1000)
        self.last_id = (now, 0) if now > ms else (ms, seq + 1)
        return f"{self.last_id[0]}-{self.last_id[1]}".encode()

    def _next_lsn(self) -> int:
        self.lsn += self.rng.randint(1, 50) * 8
        return self.lsn

    def _change(self) -> tuple[dict[str, str], str, int, dict[str, Any] | None, int]:
        row_id = self.rng.randint(1, self.rows)
        self.version += 1
        lsn = self._next_lsn()
        current = self.table.get(row_id)
        if current is None:
            op, row = "c", _new_row(self.rng, row_id, self.version)
        elif self.rng.random() < 0.8:
            op, row = "u", _updated_row(self.rng, current, self.version)
        else:
            op, row = "d", None
        if row is None:
            assert current is not None
            del self.table[row_id]
            # REPLICA IDENTITY DEFAULT: a delete's "before" holds only the key
            before = {c: (row_id if c == "id" else None) for c in current}
            value = envelope("d", TABLE, lsn, before=before)
        else:
            self.table[row_id] = row
            value = envelope(op, TABLE, lsn, after=row)
        return entry_fields({"id": row_id}, value), op, row_id, row, lsn

    # -- sending

    def _send(self, items: Sequence[Outgoing]) -> None:
        """XADD ``items`` (fields, op, row id, row, lsn, replay) with ids of ours, re-sending
        after a fault until every one has landed; record them."""
        ids = [self._next_id() for _ in items]
        deadline = time.monotonic() + 30
        while True:
            try:
                pipe = self.r.pipeline(transaction=False)
                for eid, (fields, *_) in zip(ids, items, strict=True):
                    pipe.xadd(STREAM, entry_fields_dict(fields), id=eid)
                replies = pipe.execute(raise_on_error=False)
                failed = [
                    reply
                    for reply in replies
                    if isinstance(reply, Exception) and "equal or smaller" not in str(reply)
                ]
                if not failed:
                    break
                if not str(failed[0]).startswith(("LOADING", "BUSY")):
                    raise failed[0]
            except (redis.ConnectionError, redis.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the producer could not XADD for 30 s")
            self.resends += 1
            time.sleep(0.02)
        for eid, (fields, op, row_id, row, lsn, replay) in zip(ids, items, strict=True):
            self.sent.append(Sent(eid, fields, op, row_id, row, lsn, replay))

    def add(self, n: int) -> None:
        """Generate and XADD ``n`` new changes."""
        for start in range(0, n, 500):
            items = [(*self._change(), False) for _ in range(min(500, n - start))]
            self._send(items)

    def add_raw(self, fields: Mapping[str, str], row_id: int, lsn: int | None = None) -> bytes:
        """XADD an entry that is no row change of the model (a poison entry)."""
        self._send([(dict(fields), "poison", row_id, None, lsn or self._next_lsn(), False)])
        return self.sent[-1].entry_id

    def replay(self, window: int, size: int) -> None:
        """XADD again, shuffled, ``size`` consecutive entries among the last ``window`` sent:
        the source re-sending a range it already sent (same rows, same LSNs)."""
        originals = [s for s in self.sent[-window:] if s.op != "poison" and not s.replay]
        if len(originals) <= size:
            return
        start = self.rng.randrange(len(originals) - size)
        picked = originals[start : start + size]
        self.rng.shuffle(picked)
        self._send([(s.fields, s.op, s.row_id, s.row, s.lsn, True) for s in picked])
        self.replays += 1
        self.replayed += size

    # -- the thread

    def start(self, events: int, rate: float) -> None:
        """Produce ``events`` changes at ``rate`` per second in a thread."""

        def run() -> None:
            interval = self.chunk / rate
            due = time.monotonic()
            chunks = 0
            try:
                while chunks * self.chunk < events and not self._stop.is_set():
                    self.add(min(self.chunk, events - chunks * self.chunk))
                    chunks += 1
                    if self.replay_every and chunks % self.replay_every == 0:
                        self.replay(window=len(self.sent), size=self.replay_size)
                    due += interval
                    self._stop.wait(max(0.0, due - time.monotonic()))
            except BaseException as exc:
                self.error = exc
            finally:
                self.done.set()

        self._thread = threading.Thread(target=run, name="producer", daemon=True)
        self._thread.start()

    def produced(self) -> int:
        return len(self.sent)

    def join(self, timeout: float = 60.0) -> None:
        """Wait for the thread; re-raise what it raised."""
        assert self.done.wait(timeout), f"the producer did not finish within {timeout:g}s"
        if self.error is not None:
            raise AssertionError(f"the producer failed: {self.error!r}") from self.error

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.r.close()


# -- the workers ------------------------------------------------------------------------------


class Fleet:
    """Worker subprocesses of one group; each (re)start gets a new consumer name."""

    def __init__(self, config: Path, log_dir: Path) -> None:
        self.config = config
        self.log_dir = log_dir
        self.live: list[WorkerProcess] = []
        self.all: list[WorkerProcess] = []
        self.killed: list[WorkerProcess] = []

    def start(self, name: str) -> WorkerProcess:
        worker = WorkerProcess(self.config, name, self.log_dir).start()
        self.live.append(worker)
        self.all.append(worker)
        return worker

    def kill(self, worker: WorkerProcess) -> None:
        worker.kill()
        self.live.remove(worker)
        self.killed.append(worker)

    def wait_connected(self, worker: WorkerProcess) -> None:
        """Until ``worker`` has connected (its signal handlers are installed by then)."""
        wait_until(
            lambda: "connected to redis" in worker.log() or not worker.running,
            timeout=20,
            interval=0.02,
            message=f"worker {worker.consumer} connected",
        )
        assert worker.running, worker.log_tail()

    def stop(self) -> dict[str, int]:
        """SIGTERM every live worker; the summed counts of their exit summaries."""
        for worker in self.live:
            self.wait_connected(worker)
        for worker in self.live:
            worker.terminate()
        totals: dict[str, int] = {}
        for worker in self.live:
            assert worker.wait(timeout=15) == 0, worker.log_tail()
            for outcome, n in worker.summary().items():
                totals[outcome] = totals.get(outcome, 0) + n
        self.live = []
        return totals

    def logs(self) -> str:
        return "\n".join(w.log() for w in self.all)

    def close(self) -> None:
        for worker in self.all:
            worker.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Callable[[Path], Fleet]]:
    fleets: list[Fleet] = []

    def make(config: Path) -> Fleet:
        made = Fleet(config, tmp_path / "logs")
        fleets.append(made)
        return made

    yield make
    for made in fleets:
        made.close()


def config_for(tmp_path: Path, url: str, **worker: Any) -> Path:
    return write_config(tmp_path / "c.yaml", url, rules=RULES, **worker)


def consumer_held(r: redis.Redis, consumer: str) -> int:
    """Entries pending for ``consumer`` (0 if it never joined the group)."""
    for info in r.xinfo_consumers(STREAM, GROUP):
        if info["name"] == consumer.encode():
            return int(info["pending"])
    return 0


def busiest(r: redis.Redis, workers: list[WorkerProcess], rng: random.Random) -> WorkerProcess:
    """A worker holding entries (read, not yet acknowledged) if one does within a second, else
    any: a kill then lands mid-batch most of the time."""
    deadline = time.monotonic() + 1.0
    by_name = {w.consumer.encode(): w for w in workers}
    while time.monotonic() < deadline:
        busy = [
            by_name[info["name"]]
            for info in r.xinfo_consumers(STREAM, GROUP)
            if info["name"] in by_name and info["pending"] > 0
        ]
        if busy:
            return rng.choice(busy)
    return rng.choice(workers)


def fault_points(rng: random.Random, events: int, n: int) -> list[int]:
    """``n`` random produced-entry counts, spread over the run, at which to inject a fault."""
    slots = [events * (k + 1) // (n + 1) for k in range(n)]
    width = events // (n + 1) // 2
    return [max(1, s + rng.randint(-width, width)) for s in slots]


def wait_produced(producer: Producer, count: int) -> None:
    wait_until(
        lambda: producer.produced() >= count or producer.done.is_set(),
        timeout=60,
        message=f"the producer reached {count} entries",
    )


# -- the expected state and the comparison ----------------------------------------------------


@dataclass(slots=True)
class Report:
    """What a test injected and what the final comparison found."""

    name: str
    faults: int
    fault_detail: str = ""
    entries: int = 0
    replayed: int = 0
    rows: int = 0
    hashes: int = 0
    set_members: int = 0
    zset_members: int = 0
    lost: int = 0
    stale: int = 0
    index_errors: int = 0
    dead_letters: int = 0
    examples: list[str] = field(default_factory=list)

    def line(self) -> str:
        detail = f" ({self.fault_detail})" if self.fault_detail else ""
        return (
            f"FAULT-LOAD {self.name}: faults={self.faults}{detail} entries={self.entries:,} "
            f"(replayed {self.replayed:,}) rows={self.rows:,} checked: hashes={self.hashes:,} "
            f"set members={self.set_members:,} zset members={self.zset_members:,} "
            f"lost={self.lost} stale={self.stale} index errors={self.index_errors} pending=0 "
            f"dead-lettered entries={self.dead_letters}"
        )


def newest(sent: list[Sent]) -> dict[int, Sent]:
    """The change with the highest LSN per row (poison entries are no change)."""
    out: dict[int, Sent] = {}
    for s in sent:
        if s.op == "poison":
            continue
        current = out.get(s.row_id)
        if current is None or s.lsn > current.lsn:
            out[s.row_id] = s
    return out


def _scan(r: redis.Redis, pattern: str) -> set[bytes]:
    return set(r.scan_iter(match=pattern, count=1000))


@dataclass
class Tally:
    """What a comparison found so far: rows or members lost or stale, and what differed."""

    lost: int = 0
    stale: int = 0
    wrong: list[str] = field(default_factory=list)


def compare(r: redis.Redis, sent: list[Sent], report: Report) -> None:
    """Fill ``report``'s counts: every hash, set and sorted set against the newest change of
    every row; also the hash rule's records of positions, and where the set and sorted-set
    rules' records say each row is."""
    state = newest(sent)
    live = {i: s for i, s in state.items() if s.op != "d"}
    want_hashes = {
        f"user:{i}".encode(): {
            k.encode(): _as_bytes(hash_value(v)) for k, v in (s.row or {}).items() if v is not None
        }
        for i, s in live.items()
    }
    want_sets: dict[bytes, set[bytes]] = {}
    want_zset: dict[bytes, float] = {}
    for i, s in live.items():
        row = s.row or {}
        want_sets.setdefault(f"plan:{row['plan']}:users".encode(), set()).add(str(i).encode())
        if row["active"] is True and row["balance"] is not None:
            want_zset[f"user:{i}".encode()] = float(row["balance"])
    tally = Tally()
    check_hashes(r, want_hashes, tally)
    check_positions(r, state, tally)
    check_sets(r, want_sets, tally)
    check_zset(r, want_zset, tally)
    index_errors = check_placements(
        r,
        [
            (
                SET_RULE,
                {str(i).encode(): f"plan:{(s.row or {})['plan']}:users" for i, s in live.items()},
            ),
            (ZSET_RULE, {m.removeprefix(b"user:"): ZSET_KEY for m in want_zset}),
        ],
        tally.wrong,
    )
    report.rows = len(state)
    report.hashes = len(want_hashes)
    report.set_members = sum(len(m) for m in want_sets.values())
    report.zset_members = len(want_zset)
    report.lost, report.stale, report.index_errors = tally.lost, tally.stale, index_errors
    report.examples = tally.wrong[:10]


def check_hashes(
    r: redis.Redis, want_hashes: dict[bytes, dict[bytes, bytes]], tally: Tally
) -> None:
    """Every hash that is there, every hash that should be."""
    keys = sorted(_scan(r, "user:*") | set(want_hashes))
    pipe = r.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    for key, have in zip(keys, pipe.execute(), strict=True):
        want = want_hashes.get(key)
        if want is None:
            tally.stale += 1
            tally.wrong.append(f"stale hash {key!r}: {have}")
        elif have != want:
            tally.lost += 1
            tally.wrong.append(f"hash {key!r}: want {want}, got {have or 'absent'}")


def check_positions(r: redis.Redis, state: dict[int, Sent], tally: Tally) -> None:
    """The hash rule's records: the newest LSN of every row, deleted ones included (rank 0)."""
    recorded = positions(r, [f"user:{i}" for i in state])
    for i, s in state.items():
        rank = RANK_REMOVE if s.op == "d" else RANK_WRITE
        want_pos = streamed(s.lsn, s.lsn, rank)
        if recorded[f"user:{i}"] != want_pos:
            tally.lost += 1
            tally.wrong.append(
                f"position of user:{i}: want {want_pos!r}, got {recorded[f'user:{i}']}"
            )


def check_sets(r: redis.Redis, want_sets: dict[bytes, set[bytes]], tally: Tally) -> None:
    """A member in a set it left is stale, one missing from its set is lost."""
    set_keys = sorted(_scan(r, "plan:*:users") | set(want_sets))
    pipe = r.pipeline(transaction=False)
    for key in set_keys:
        pipe.smembers(key)
    for key, have_members in zip(set_keys, pipe.execute(), strict=True):
        want_members = want_sets.get(key, set())
        extra, missing = have_members - want_members, want_members - have_members
        tally.stale += len(extra)
        tally.lost += len(missing)
        if extra or missing:
            tally.wrong.append(
                f"set {key!r}: extra {sorted(extra)[:5]}, missing {sorted(missing)[:5]}"
            )


def check_zset(r: redis.Redis, want_zset: dict[bytes, float], tally: Tally) -> None:
    """The sorted set's members and scores."""
    have_zset = zscores(r, ZSET_KEY)
    for member in set(have_zset) - set(want_zset):
        tally.stale += 1
        tally.wrong.append(f"stale zset member {member!r} (score {have_zset[member]})")
    for member, score in want_zset.items():
        if have_zset.get(member) != score:
            tally.lost += 1
            tally.wrong.append(f"zset member {member!r}: want {score}, got {have_zset.get(member)}")


def check_placements(
    r: redis.Redis, expected: list[tuple[Rule, dict[bytes, str]]], wrong: list[str]
) -> int:
    """How many rows the set and sorted-set rules' records place otherwise than expected (the
    records say exactly which rows are placed, and where)."""
    index_errors = 0
    tables = Tables(StateKeys())
    for rule, want_placed in expected:
        table = tables.table(rule)
        have_placed = {
            field: where.key
            for field, record in records(r, table).items()
            if (where := placement(table, field, record)) is not None
        }
        diff = set(have_placed.items()) ^ set(want_placed.items())
        index_errors += len(diff)
        if diff:
            wrong.append(f"{rule.key} records: {len(diff)} differences, e.g. {sorted(diff)[:5]}")
    return index_errors


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def wait_settled(r: redis.Redis, producer: Producer, workers: Fleet) -> None:
    """Until the producer is done and the group has read and acknowledged every entry; fails
    at once if a worker exits."""
    producer.join()

    def done() -> bool:
        for worker in workers.live:
            assert worker.running, f"worker {worker.consumer} exited:\n{worker.log_tail()}"
        return settled(r)

    wait_until(
        done,
        timeout=SETTLE_TIMEOUT_S,
        interval=0.05,
        message="every entry read and acknowledged group-wide",
    )


def finish(
    r: redis.Redis,
    producer: Producer,
    report: Report,
    *,
    poison: Mapping[bytes, str] | None = None,
) -> None:
    """The closing checks every test shares: the group settled, the stream holds exactly what
    the producer recorded, Redis equals the model, the dead letters are exactly the poison."""
    info = group_info(r)
    assert info["pending"] == 0, info
    assert info.get("lag") in (0, None), info
    stream = r.xinfo_stream(STREAM)
    assert info["last-delivered-id"] == stream["last-generated-id"], (info, stream)
    assert stream["entries-added"] == len(producer.sent), (
        f"the stream got {stream['entries-added']} entries, the producer recorded "
        f"{len(producer.sent)}"
    )
    assert r.xpending(STREAM, GROUP)["pending"] == 0
    report.entries = len(producer.sent)
    report.replayed = producer.replayed
    compare(r, producer.sent, report)
    letters = _dlq_entries(r) if r.exists(DLQ) else {}
    report.dead_letters = len(letters)
    print("\n" + report.line(), flush=True)
    assert report.lost == 0 and report.stale == 0 and report.index_errors == 0, (
        report.line() + "\n" + "\n".join(report.examples)
    )
    expected = dict(poison or {})
    assert set(letters) == set(expected), f"dead letters {letters}, expected {expected}"
    for eid, reason in expected.items():
        assert reason in letters[eid]["reason"].decode(), letters[eid]


# -- a) kill -9 at random points ------------------------------------------------------------


@pytest.mark.slow
def test_workers_killed_9_again_and_again_under_load_lose_nothing(
    r: redis.Redis, redis_url: str, tmp_path: Path, fleet: Callable[[Path], Fleet]
) -> None:
    events, kills = 24_000, 10
    rng = random.Random(101)
    config = config_for(tmp_path, redis_url, batch_size=200)
    workers = fleet(config)
    producer = Producer(redis_url, rows=3_000, seed=1)
    try:
        producer.add(3_000)  # a backlog, so the first kills find batches in hand
        for name in ("w1", "w2", "w3"):
            workers.start(name)
        wait_until(lambda: {b"w1", b"w2", b"w3"} <= consumer_names(r), timeout=20, message="joined")
        producer.start(events, rate=2_500)
        held_total = held_kills = 0
        for n, point in enumerate(sorted(fault_points(rng, events, kills)), start=1):
            wait_produced(producer, 3_000 + point)
            victim = busiest(r, workers.live, rng)
            workers.kill(victim)
            held = consumer_held(r, victim.consumer)
            held_total += held
            held_kills += held > 0
            workers.wait_connected(workers.start(f"r{n}"))
        wait_settled(r, producer, workers)
        totals = workers.stop()
        report = Report(
            "kill -9",
            kills,
            f"{held_kills} of them mid-batch, holding {held_total:,} entries in all",
        )
        finish(r, producer, report)
        assert held_kills >= kills // 2, "most kills found the victim between batches"
        # every worker's counts, the killed ones' included (flushed with each round trip)
        stats = r.hgetall(f"streamsync:stats:{GROUP}:{STREAM}")
        claimed = sum(int(v) for k, v in stats.items() if as_bytes(k).endswith(b":claimed"))
        assert claimed >= held_total, (claimed, held_total, stats)
        assert totals.get("failed", 0) == 0, totals
    finally:
        producer.close()


# -- b) Redis restarted with AOF, the library lost ------------------------------------------


@pytest.mark.slow
def test_redis_restarts_with_aof_and_a_lost_library_under_load_lose_nothing(
    fresh_redis: RedisServer, tmp_path: Path, fleet: Callable[[Path], Fleet]
) -> None:
    """``fresh_redis`` runs with ``appendonly yes`` and ``appendfsync always``. Faults, in turn:
    FUNCTION FLUSH on the live server (the next FCALL finds no function); kill -9 and restart;
    FUNCTION FLUSH then a graceful restart (the AOF replays the flush: the library is gone
    after the restart); FUNCTION FLUSH then kill -9 and restart."""
    events = 15_000
    rng = random.Random(202)
    r = fresh_redis.client()
    config = config_for(tmp_path, fresh_redis.url, batch_size=200)
    workers = fleet(config)
    producer = Producer(fresh_redis.url, rows=3_000, seed=2)

    def flush_live() -> None:
        r.function_flush()

    def kill_restart() -> None:
        fresh_redis.kill()
        fresh_redis.restart()

    def flush_graceful_restart() -> None:
        r.function_flush()
        fresh_redis.restart()

    def flush_kill_restart() -> None:
        r.function_flush()
        kill_restart()

    faults = [flush_live, kill_restart, flush_graceful_restart, flush_kill_restart]
    try:
        producer.add(2_000)
        for name in ("w1", "w2", "w3"):
            workers.start(name)
        wait_until(lambda: {b"w1", b"w2", b"w3"} <= consumer_names(r), timeout=20, message="joined")
        producer.start(events, rate=1_500)
        for fault, point in zip(faults, fault_points(rng, events, len(faults)), strict=True):
            wait_produced(producer, 2_000 + point)
            fault()
            # the library is back (reloaded by a worker) and the workers make progress
            wait_until(
                lambda: loaded_version(r) is not None,
                timeout=20,
                message=f"a worker loaded the library again after {fault.__name__}",
            )
        wait_settled(r, producer, workers)
        assert all(w.running for w in workers.live), workers.logs()[-3000:]
        totals = workers.stop()
        logs = workers.logs()
        report = Report(
            "redis restart (AOF always)",
            len(faults),
            "FUNCTION FLUSH live; kill -9 + restart; FUNCTION FLUSH + graceful restart; "
            f"FUNCTION FLUSH + kill -9 + restart; producer re-sent {producer.resends} pipelines",
        )
        finish(r, producer, report)
        assert logs.count("redis connection lost") >= 3 * 3, "every worker lost Redis 3 times"
        assert totals.get("failed", 0) == 0, totals
    finally:
        producer.close()


# -- c) the source replays ranges it already sent -------------------------------------------


@pytest.mark.slow
def test_replayed_ranges_shuffled_under_load_change_nothing(
    r: redis.Redis, redis_url: str, tmp_path: Path, fleet: Callable[[Path], Fleet]
) -> None:
    events = 20_000
    config = config_for(tmp_path, redis_url, batch_size=300)
    workers = fleet(config)
    # every 20 chunks of 50 new entries, 400 older entries again, shuffled
    producer = Producer(redis_url, rows=3_000, seed=3, replay_every=20, replay_size=400)
    try:
        producer.add(2_000)
        for name in ("w1", "w2", "w3"):
            workers.start(name)
        wait_until(lambda: {b"w1", b"w2", b"w3"} <= consumer_names(r), timeout=20, message="joined")
        producer.start(events, rate=2_500)
        producer.join()
        # at the very end, a large shuffled slice of the oldest history once more
        producer.replay(window=len(producer.sent), size=3_000)
        wait_settled(r, producer, workers)
        totals = workers.stop()
        report = Report(
            "replayed ranges", producer.replays, f"{producer.replayed:,} entries sent twice"
        )
        finish(r, producer, report)
        assert totals.get("stale", 0) > 0, totals
        processed = sum(totals.get(k, 0) for k in ("applied", "stale", "skipped", "dropped"))
        assert processed == len(producer.sent), totals
    finally:
        producer.close()


# -- d) network blips -----------------------------------------------------------------------


def _kill_streamsync_clients(r: redis.Redis) -> int:
    """CLIENT KILL ID of every connection named ``streamsync:*``; how many were killed."""
    killed = 0
    for client in r.client_list():
        if client.get("name", "").startswith("streamsync:"):
            killed += int(r.execute_command("CLIENT", "KILL", "ID", client["id"]))
    return killed


@pytest.mark.slow
def test_connections_killed_again_and_again_under_load_lose_nothing(
    r: redis.Redis, redis_url: str, tmp_path: Path, fleet: Callable[[Path], Fleet]
) -> None:
    """Alternately ``CLIENT KILL TYPE normal`` (every connection but the caller's: the workers'
    and the producer's) and ``CLIENT KILL ID`` of each connection named ``streamsync:*``."""
    events, blips = 20_000, 8
    rng = random.Random(404)
    config = config_for(tmp_path, redis_url, batch_size=200)
    workers = fleet(config)
    producer = Producer(redis_url, rows=3_000, seed=4)
    killer = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        producer.add(2_000)
        for name in ("w1", "w2", "w3"):
            workers.start(name)
        wait_until(lambda: {b"w1", b"w2", b"w3"} <= consumer_names(r), timeout=20, message="joined")
        producer.start(events, rate=2_500)
        killed = 0
        for n, point in enumerate(fault_points(rng, events, blips)):
            wait_produced(producer, 2_000 + point)
            if n % 2 == 0:
                killed += int(killer.execute_command("CLIENT", "KILL", "TYPE", "normal"))
            else:
                killed += _kill_streamsync_clients(killer)
        wait_settled(r, producer, workers)
        assert all(w.running for w in workers.live), workers.logs()[-3000:]
        totals = workers.stop()
        lost_lines = workers.logs().count("redis connection lost")
        report = Report(
            "network blips",
            blips,
            f"{killed} connections killed, {lost_lines} worker reconnects, "
            f"producer re-sent {producer.resends} pipelines",
        )
        finish(r, producer, report)
        assert lost_lines >= blips * 3 // 2, "the blips did not cut the workers' connections"
        assert totals.get("failed", 0) == 0, totals
    finally:
        producer.close()
        killer.close()


# -- e) poison entries in the middle of large batches ---------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("claim_idle_ms", [30_000, 100], ids=["claim-default", "claim-eager"])
def test_poison_in_the_middle_of_large_batches_under_load_dead_letters_exactly_it(
    r: redis.Redis,
    redis_url: str,
    tmp_path: Path,
    fleet: Callable[[Path], Fleet],
    claim_idle_ms: int,
) -> None:
    """batch_size 2000 and a backlog of 9,000 entries: every read takes 2,000 consecutive
    entries, so the poison at 5,000 and 7,000 sit in the middle of the third and fourth
    batch, whichever worker reads them. One fails to plan (a non-numeric sorted-set score),
    one to decode (truncated JSON).

    With the default claim_idle_ms every entry is delivered once: each poison entry is
    dead-lettered once, on its first delivery. With claim_idle_ms 100 (the least allowed),
    shorter than a 2,000-entry batch takes from read to ack (two round trips: read with one,
    applied with the next, acked with the one after), live workers' batches are claimed by the
    others and applied again: the rows must still come out right, and the dead letters name
    only the poison entries (possibly several times: delivery is at least once)."""
    events = 15_000
    config = config_for(
        tmp_path,
        redis_url,
        batch_size=2_000,
        claim_idle_ms=claim_idle_ms,
        claim_interval_ms=max(100, min(5_000, claim_idle_ms // 2)),
    )
    workers = fleet(config)
    producer = Producer(redis_url, rows=3_000, seed=5)
    poison: dict[bytes, str] = {}
    try:
        producer.add(5_000)
        row = {"id": 17, "name": "x", "plan": "pro", "balance": "n/a", "active": True}
        lsn = producer._next_lsn()
        fields = entry_fields({"id": 17}, envelope("u", TABLE, lsn, after=row))
        poison[producer.add_raw(fields, 17, lsn)] = "zset score column 'balance' is not numeric"
        producer.add(1_999)
        broken = {'{"id":18}': '{"before":null,"after":{"id":18,'}
        poison[producer.add_raw(broken, 18)] = "value is not valid JSON"
        producer.add(1_999)
        assert r.xlen(STREAM) == 9_000
        for name in ("w1", "w2", "w3"):
            workers.start(name)
        producer.start(events, rate=2_500)
        wait_settled(r, producer, workers)
        totals = workers.stop()
        letters_written = r.xlen(DLQ)
        per_poison = Counter(fields[b"id"] for _, fields in xrange(r, DLQ))
        report = Report(
            f"poison in a 2000-entry batch, claim_idle_ms {claim_idle_ms}",
            len(poison),
            f"bad score, bad JSON; {totals.get('claimed', 0):,} entries claimed from live "
            f"workers, {letters_written} dead letters written "
            f"({', '.join(str(per_poison[eid]) for eid in poison)} per poison entry)",
        )
        finish(r, producer, report, poison=poison)
        assert totals.get("failed", 0) == 0, totals
        if claim_idle_ms == 30_000:
            assert totals.get("claimed", 0) == 0, totals
            assert letters_written == len(poison)
            assert totals.get("dead_lettered") == len(poison), totals
            processed = sum(totals.get(k, 0) for k in ("applied", "stale", "skipped", "dropped"))
            assert processed == len(producer.sent) - len(poison), totals
            letters = _dlq_entries(r)
            for eid in poison:
                assert letters[eid]["deliveries"] == b"1", letters[eid]
                assert letters[eid]["stream"] == STREAM.encode(), letters[eid]
    finally:
        producer.close()
