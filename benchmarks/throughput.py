"""Throughput of a streamsync drain against the naive handler and a pipelined baseline.

One command, no setup: ``python benchmarks/throughput.py``. It starts a private ``redis-server``
on a free port, generates a deterministic stream of Debezium Server change events for
``public.users`` (compact format, the envelope of the real 3.6.3 fixtures), and times, in
interleaved rounds on identical data:

- streamsync: ``Worker(settings, drain=True).run()`` in this process (position-checked apply);
- naive: XREADGROUP COUNT 1, ``json.loads``, HSET or DEL, XACK: three round trips per event,
  no position check (timed on the first ``--naive-events`` entries only: it is slow);
- pipelined: XREADGROUP COUNT 500, ``orjson``, one pipeline of HSET/DEL per batch with one XACK,
  no position check: what the position check costs next to a plain batch consumer.

Before every measured drain Redis is emptied (FLUSHALL) and the stream preloaded again (not
timed). After every drain the group must hold nothing pending and a sample of rows must equal the
newest generated state of that row; a failed check makes the exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import gc
import io
import json
import logging
import os
import platform
import pstats
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, cast

import hiredis
import orjson
import redis

from streamsync import __version__ as streamsync_version
from streamsync.buckets import Table, Tables
from streamsync.config import Settings, parse_settings
from streamsync.embedded.sandbox import RedisServer
from streamsync.keys import StateKeys
from streamsync.mapping import hash_value
from streamsync.positions import RANK_REMOVE, RANK_WRITE, streamed
from streamsync.worker import Worker

STREAM = "app.public.users"
SCHEMA, TABLE = "public", "users"
KEY_PREFIX = "user:"
COLUMNS = ("id", "name", "email", "plan", "balance", "updated_at")
GROUP_STREAMSYNC, GROUP_NAIVE, GROUP_PIPELINED = "bench", "naive", "pipelined"

#: Share of creates and deletes; the rest are updates.
SHARE_CREATE, SHARE_DELETE = 0.20, 0.10
#: Commit time of the first generated transaction (the fixtures were captured around then).
START_US = 1_795_674_994_000_000
#: LSN of the first generated change, as in the fixtures.
START_LSN = 27_103_800
#: Entries per pipeline when preloading the stream.
PRELOAD_CHUNK = 1_000

#: The targets printed next to the medians (library 2.0's goals).
TARGET_EVENTS_PER_S = 120_000
TARGET_RATIO_NAIVE = 20.0
#: streamsync's drain rate against the blind pipelined consumer's, at least.
TARGET_RATIO_PIPELINED = 2.0
#: streamsync's Redis CPU per change against the blind pipelined consumer's, at most.
TARGET_REDIS_CPU_RATIO = 1.3

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0

FIRST_NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan")
LAST_NAMES = ("smith", "jones", "garcia", "miller", "davis", "martin", "lopez", "wilson")
PLANS = ("free", "free", "free", "pro", "pro", "team", "enterprise")

# hiredis's stub types the command as a one-element tuple; it takes any number of arguments
_pack_command = cast(Callable[[tuple[bytes, ...]], bytes], hiredis.pack_command)

Row = dict[str, Any]


# -- the workload ---------------------------------------------------------------------------


@dataclass(slots=True)
class Change:
    """What one generated event does to its row: the row after it (None: deleted), its LSN
    and its transaction's ``lastCommitLsn``."""

    id: int
    after: Row | None
    lsn: int
    last_commit_lsn: int


@dataclass(slots=True)
class Workload:
    """The generated stream entries, in order, and what each does to its row."""

    entries: list[tuple[bytes, bytes]]
    changes: list[Change]
    ops: Counter[str]
    rows: int

    def final_state(self, n: int) -> dict[int, Change]:
        """The newest change of every row touched by the first ``n`` entries."""
        state: dict[int, Change] = {}
        for change in self.changes[:n]:
            state[change.id] = change
        return state

    def mean_value_bytes(self) -> float:
        """Mean size of an entry's value JSON."""
        return sum(len(v) for _, v in self.entries) / max(1, len(self.entries))


class _IdPool:
    """A set of ids with O(1) uniform random pick and removal."""

    def __init__(self, ids: Sequence[int] = ()) -> None:
        self._items = list(ids)
        self._index = {v: i for i, v in enumerate(self._items)}

    def __len__(self) -> int:
        return len(self._items)

    def add(self, value: int) -> None:
        self._index[value] = len(self._items)
        self._items.append(value)

    def pick(self, rng: random.Random) -> int:
        return self._items[rng.randrange(len(self._items))]

    def remove(self, value: int) -> None:
        i = self._index.pop(value)
        last = self._items.pop()
        if i < len(self._items):
            self._items[i] = last
            self._index[last] = i


def _iso_utc(us: int) -> str:
    """A timestamptz as Debezium's ZonedTimestamp spells it: ISO-8601 in UTC, ``Z`` suffix."""
    moment = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(
        microseconds=us
    )
    return moment.isoformat().replace("+00:00", "Z")


def _balance(rng: random.Random) -> str:
    """A numeric(12,2) with ``decimal.handling.mode=string``: ``"1234.50"``, ``"-0.05"``."""
    cents = rng.randint(-50_000, 200_000_000)
    sign = "-" if cents < 0 else ""
    return f"{sign}{abs(cents) // 100}.{abs(cents) % 100:02d}"


def _new_row(rng: random.Random, row_id: int, now_us: int) -> Row:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    return {
        "id": row_id,
        "name": f"{first} {last}",
        "email": f"{first}.{last}{row_id}@example.com",
        "plan": rng.choice(PLANS),
        "balance": _balance(rng),
        "updated_at": _iso_utc(now_us),
    }


def _updated_row(rng: random.Random, row: Row, now_us: int) -> Row:
    new = dict(row)
    new["balance"] = _balance(rng)
    new["updated_at"] = _iso_utc(now_us)
    if rng.random() < 0.3:
        new["plan"] = rng.choice(PLANS)
    if rng.random() < 0.1:
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        new["name"] = f"{first} {last}"
        new["email"] = f"{first}.{last}{row['id']}@example.com"
    return new


def generate(events: int, rows: int, seed: int) -> Workload:
    """``events`` change events over ids 1..``rows``, deterministic for a given seed.

    The table already holds about half of the ids when capture starts (not in Redis: there is no
    snapshot), so updates and deletes of rows never created in the stream occur, as in a real
    cache filled by change data capture. Creates take an id not currently in the table, updates
    and deletes a uniformly random one that is. Transactions of 1-3 changes share a txId, a commit
    time and the first element of ``source.sequence``; ``source.lsn`` strictly increases.
    """
    rng = random.Random(seed)
    # leave enough absent ids for the expected net growth (creates minus deletes)
    growth = int(events * (SHARE_CREATE - SHARE_DELETE))
    initial = max(rows // 10, rows - growth - rows // 10) if rows > 1 else rows
    live = _IdPool(range(1, initial + 1))
    absent = _IdPool(range(initial + 1, rows + 1))
    table: dict[int, Row] = {}
    entries: list[tuple[bytes, bytes]] = []
    changes: list[Change] = []
    ops: Counter[str] = Counter()
    lsn, tx_id, commit_us = START_LSN, 780, START_US
    in_tx, tx_first_lsn = 0, lsn
    for _ in range(events):
        if in_tx == 0:
            in_tx = 1 if rng.random() < 0.8 else rng.randint(2, 3)
            tx_id += 1 if rng.random() < 0.9 else rng.randint(2, 5)
            commit_us += rng.randint(50, 2_000)
            lsn += rng.randint(5, 60) * 8
            tx_first_lsn = lsn
        else:
            lsn += rng.randint(5, 40) * 8
        in_tx -= 1
        draw = rng.random()
        if (draw < SHARE_CREATE and len(absent)) or not len(live):
            op = "c"
            row_id = absent.pick(rng)
            absent.remove(row_id)
            live.add(row_id)
            after: Row | None = _new_row(rng, row_id, commit_us)
            before: Row | None = None
        elif draw < SHARE_CREATE + SHARE_DELETE:
            op = "d"
            row_id = live.pick(rng)
            live.remove(row_id)
            absent.add(row_id)
            table.pop(row_id, None)
            after = None
            # REPLICA IDENTITY DEFAULT: only the key is real (fixture event #7)
            before = {c: (row_id if c == "id" else None) for c in COLUMNS}
        else:
            op = "u"
            row_id = live.pick(rng)
            current = table.get(row_id) or _new_row(rng, row_id, START_US - 86_400_000_000)
            after = _updated_row(rng, current, commit_us)
            before = None
        if after is not None:
            table[row_id] = after
        ops[op] += 1
        processed_ns = (commit_us + rng.randint(20_000, 400_000)) * 1_000 + rng.randint(0, 999)
        value = {
            "before": before,
            "after": after,
            "source": {
                "version": "3.6.3.Final",
                "connector": "postgresql",
                "name": "app",
                "ts_ms": commit_us // 1_000,
                "snapshot": "false",
                "db": "app",
                "sequence": orjson.dumps([str(tx_first_lsn), str(lsn)]).decode(),
                "ts_us": commit_us,
                "ts_ns": commit_us * 1_000,
                "schema": SCHEMA,
                "table": TABLE,
                "txId": tx_id,
                "lsn": lsn,
                "xmin": None,
                "origin": None,
                "origin_lsn": None,
            },
            "transaction": None,
            "op": op,
            "ts_ms": processed_ns // 1_000_000,
            "ts_us": processed_ns // 1_000,
            "ts_ns": processed_ns,
        }
        entries.append((orjson.dumps({"id": row_id}), orjson.dumps(value)))
        changes.append(Change(row_id, after, lsn, tx_first_lsn))
    return Workload(entries, changes, ops, rows)


# -- the private redis-server ---------------------------------------------------------------


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """A running private server, stopped on the way out whatever happened (Ctrl-C included)."""
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server not found on PATH (apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="streamsync-bench-") as tmp:
        server = RedisServer(Path(tmp))
        try:
            server.start()
            yield server
        finally:
            server.stop()


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


# -- measurements ---------------------------------------------------------------------------


@dataclass(slots=True)
class Measurement:
    """One timed drain."""

    design: str
    round: int
    events: int
    elapsed_s: float
    #: CPU time of this process (all threads) during the drain, per event.
    client_cpu_us: float
    #: CPU time of the redis-server process during the drain, per event.
    redis_cpu_us: float
    outcomes: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def events_per_s(self) -> float:
        return self.events / self.elapsed_s if self.elapsed_s > 0 else 0.0


def preload(client: redis.Redis, entries: Sequence[tuple[bytes, bytes]]) -> None:
    """FLUSHALL, then XADD the entries, pipelined (compact format: key JSON -> value JSON)."""
    client.flushall()
    # raw packed commands: several times faster than redis-py pipelines for this many entries
    conn: Any = client.connection_pool.get_connection()
    stream = STREAM.encode()
    try:
        for start in range(0, len(entries), PRELOAD_CHUNK):
            chunk = entries[start : start + PRELOAD_CHUNK]
            packed: list[bytes] = [_pack_command((b"XADD", stream, b"*", k, v)) for k, v in chunk]
            conn.send_packed_command([b"".join(packed)])
            for _ in chunk:
                conn.read_response()
    finally:
        client.connection_pool.release(conn)


def _redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _measure(
    client: redis.Redis,
    design: str,
    round_no: int,
    events: int,
    drain: Callable[[], dict[str, int]],
) -> Measurement:
    redis_cpu = _redis_cpu_s(client)
    cpu = time.process_time()
    start = time.perf_counter()
    outcomes = drain()
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    redis_cpu = _redis_cpu_s(client) - redis_cpu
    return Measurement(
        design, round_no, events, elapsed, cpu / events * 1e6, redis_cpu / events * 1e6, outcomes
    )


def streamsync_settings(url: str, batch_size: int) -> Settings:
    """The configuration of the measured worker (the one in benchmarks/README.md)."""
    return parse_settings(
        {
            "redis": {"url": url},
            "source": {"streams": [STREAM], "group": GROUP_STREAMSYNC},
            "worker": {"batch_size": batch_size},
            "rules": [{"table": f"{SCHEMA}.{TABLE}", "key": KEY_PREFIX + "{id}", "type": "hash"}],
        }
    )


def drain_streamsync(
    settings: Settings, timeout_s: float, profile: cProfile.Profile | None = None
) -> dict[str, int]:
    """Run a draining Worker until it returns; its outcome totals.

    The worker runs in a helper thread so that it installs no signal handlers: Ctrl-C stays a
    KeyboardInterrupt here, which asks the worker to stop, and a drain that does not end within
    ``timeout_s`` is stopped and reported instead of hanging the benchmark.
    """
    worker = Worker(settings, consumer="bench", drain=True)
    result: list[int] = []
    failure: list[BaseException] = []
    # An Event, not Thread.join/is_alive: on Python < 3.13 a join() interrupted by Ctrl-C can
    # leave is_alive() False while the thread still runs, and the stop request would be skipped.
    done = threading.Event()

    def target() -> None:
        try:
            if profile is not None:
                profile.enable()
            result.append(int(worker.run()))
        except BaseException as exc:
            failure.append(exc)
        finally:
            if profile is not None:
                profile.disable()
            done.set()

    threading.Thread(target=target, name="streamsync-worker", daemon=True).start()
    finished = False
    try:
        finished = done.wait(timeout_s)
    finally:
        if not done.is_set():
            worker.request_stop()
            done.wait(STOP_TIMEOUT_S)
    totals: Counter[str] = Counter()
    for (_, _, _, outcome), n in worker.counts.items():
        totals[outcome] += n
    outcomes = dict(sorted(totals.items()))
    if failure:
        raise RuntimeError(f"the worker raised {failure[0]!r}") from failure[0]
    if not finished:
        outcomes["drain_timeout"] = 1
    if result and result[0] != 0:
        outcomes["exit_code"] = result[0]
    return outcomes


def _entry_fields(fields: Any) -> tuple[bytes, bytes]:
    (key, value), *_ = fields.items()
    return key, value


def drain_naive(client: redis.Redis) -> dict[str, int]:
    """The seed article's handler: one entry per XREADGROUP, stdlib json, HSET or DEL, XACK."""
    n = 0
    while True:
        reply: Any = client.xreadgroup(GROUP_NAIVE, "c1", {STREAM: ">"}, count=1)
        if not reply or not reply[0][1]:
            break
        entry_id, fields = reply[0][1][0]
        _, raw_value = _entry_fields(fields)
        if raw_value != b"default":
            event = json.loads(raw_value)
            if event["op"] == "d":
                client.delete(f"{KEY_PREFIX}{event['before']['id']}")
            else:
                after = event["after"]
                client.hset(
                    f"{KEY_PREFIX}{after['id']}",
                    mapping={k: v for k, v in after.items() if v is not None},
                )
        client.xack(STREAM, GROUP_NAIVE, entry_id)
        n += 1
    return {"handled": n}


def drain_pipelined(client: redis.Redis, batch_size: int) -> dict[str, int]:
    """A batch consumer without a position check: XREADGROUP COUNT n, orjson, one pipeline of
    HSET/DEL per entry plus one XACK per batch."""
    n = 0
    while True:
        reply: Any = client.xreadgroup(GROUP_PIPELINED, "c1", {STREAM: ">"}, count=batch_size)
        if not reply or not reply[0][1]:
            break
        pipe = client.pipeline(transaction=False)
        ids: list[bytes] = []
        for entry_id, fields in reply[0][1]:
            ids.append(entry_id)
            _, raw_value = _entry_fields(fields)
            if raw_value == b"default":
                continue
            event = orjson.loads(raw_value)
            if event["op"] == "d":
                pipe.delete(f"{KEY_PREFIX}{event['before']['id']}")
            else:
                after = event["after"]
                pipe.hset(
                    f"{KEY_PREFIX}{after['id']}",
                    mapping={k: v for k, v in after.items() if v is not None},
                )
        pipe.xack(STREAM, GROUP_PIPELINED, *ids)
        pipe.execute()
        n += len(ids)
    return {"handled": n}


def verify(
    client: redis.Redis,
    workload: Workload,
    n: int,
    group: str,
    *,
    sample: int,
    seed: int,
    records: Callable[[int], Table] | None = None,
) -> list[str]:
    """Problems after a drain of the first ``n`` entries: entries still pending, sampled rows
    that differ from their newest generated state, and (for streamsync) records in the rule
    table that do not hold the row's newest position. ``sample`` 0 checks every touched row."""
    problems: list[str] = []
    pending = client.xpending(STREAM, group)["pending"]
    if pending:
        problems.append(f"{pending} entries still pending in group {group}")
    return problems + verify_rows(client, workload, n, sample=sample, seed=seed, records=records)


def verify_rows(
    client: redis.Redis,
    workload: Workload,
    n: int,
    *,
    sample: int,
    seed: int,
    records: Callable[[int], Table] | None = None,
) -> list[str]:
    """Sampled rows that differ from their newest generated state after the first ``n``
    entries, and records (``records``: the rule table of a row id) that do not hold the row's
    newest position."""
    problems: list[str] = []
    state = workload.final_state(n)
    ids = sorted(state)
    if 0 < sample < len(ids):
        ids = random.Random(seed).sample(ids, sample)
    if records is not None:
        for table in {records(row_id) for row_id in ids}:
            table.seen(int(client.hget(table.meta, "#n") or 1), 0)
    pipe = client.pipeline(transaction=False)
    for row_id in ids:
        pipe.hgetall(f"{KEY_PREFIX}{row_id}")
        if records is not None:
            pipe.hget(*records(row_id).locate(str(row_id)))
    replies = iter(pipe.execute())
    wrong = []
    for row_id in ids:
        change = state[row_id]
        got = {k.decode(): v.decode() for k, v in next(replies).items()}
        want = (
            {}
            if change.after is None
            else {k: str(hash_value(v)) for k, v in change.after.items() if v is not None}
        )
        if got != want:
            wrong.append(f"{KEY_PREFIX}{row_id}: got {got or 'absent'}, want {want or 'absent'}")
        if records is not None:
            position = next(replies)
            # the record holds the position, then (a tombstone) "~" and when it may go
            rank = RANK_REMOVE if change.after is None else RANK_WRITE
            want_position = streamed(change.last_commit_lsn, change.lsn, rank).encode()
            if position is None or position.split(b"~")[0] != want_position:
                wrong.append(f"{KEY_PREFIX}{row_id}: position {position!r}, want {change.lsn}")
    if wrong:
        problems.append(f"{len(wrong)} of {len(ids)} sampled rows wrong, e.g. {wrong[0]}")
    return problems


# -- the run --------------------------------------------------------------------------------


def _fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(
        h.ljust(w) if i < 2 else h.rjust(w)
        for i, (h, w) in enumerate(zip(headers, widths, strict=True))
    )
    print(line.rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )


def _pin(mode: str, server: RedisServer) -> str:
    """Apply ``--pin``; threads started later (the worker's) inherit this thread's affinity."""
    if mode == "off" or not server.running:
        return mode
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 and mode == "split":
        raise SystemExit("--pin split needs two CPUs")
    os.sched_setaffinity(server.pid, {cpus[0]})
    os.sched_setaffinity(0, {cpus[0] if mode == "same" else cpus[1]})
    return mode


def _profile_text(profile: cProfile.Profile, top: int) -> str:
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        description="Drain throughput of streamsync vs a naive and a pipelined consumer."
    )
    parser.add_argument(
        "--events",
        type=int,
        default=200_000,
        help="change events in the stream (default %(default)s)",
    )
    parser.add_argument(
        "--rows",
        type=int,
        default=49_000,
        help="distinct ids the events touch (default %(default)s)",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=3,
        help="interleaved rounds; medians are over these (default %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=500,
        help="entries per read, streamsync and pipelined (default %(default)s)",
    )
    parser.add_argument(
        "--naive-events",
        type=int,
        default=20_000,
        help="the naive handler is timed on this many leading entries (default %(default)s)",
    )
    parser.add_argument("--skip-naive", action="store_true", help="do not run the naive handler")
    parser.add_argument(
        "--skip-pipelined", action="store_true", help="do not run the pipelined baseline"
    )
    parser.add_argument(
        "--check-sample",
        type=int,
        default=200,
        help="rows compared after each drain; 0 = every touched row (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=1, help="workload seed (default %(default)s)")
    parser.add_argument(
        "--drain-timeout-s",
        type=float,
        default=600.0,
        help="a streamsync drain taking longer is stopped and reported as a "
        "failure (default %(default)s)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the rounds, profile one more streamsync drain with cProfile "
        "and print the top functions",
    )
    parser.add_argument(
        "--pin",
        choices=("off", "same", "split"),
        default="off",
        help="CPU affinity: off (the scheduler decides), same (this process and redis-server "
        "on CPU 0), split (this process on CPU 1, redis-server on CPU 0) (default %(default)s)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="also print the results as one JSON object on the last line",
    )
    args = parser.parse_args(argv)
    for name in ("events", "rows", "runs", "batch_size", "naive_events"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    args.naive_events = min(args.naive_events, args.events)
    return args


@dataclass(slots=True)
class Design:
    """One consumer under test: how many leading entries it drains and how to check it."""

    name: str
    events: int
    drain: Callable[[], dict[str, int]]
    group: str
    #: streamsync's rule table of a row id, to check its records too.
    records: Callable[[int], Table] | None = None


def measure_all(
    args: argparse.Namespace, workload: Workload, server: RedisServer
) -> tuple[list[Measurement], str | None]:
    """The interleaved rounds on identical data (FLUSHALL + preload before each drain); then,
    with ``--profile``, one more streamsync drain under cProfile."""
    client = redis.Redis.from_url(server.url, decode_responses=False)
    settings = streamsync_settings(server.url, args.batch_size)
    table = Tables(StateKeys.from_settings(settings.worker)).table(settings.rules[0])
    designs = [
        Design(
            "streamsync",
            args.events,
            lambda: drain_streamsync(settings, args.drain_timeout_s),
            GROUP_STREAMSYNC,
            lambda _row_id: table,
        )
    ]
    if not args.skip_naive:
        designs.append(Design("naive", args.naive_events, lambda: drain_naive(client), GROUP_NAIVE))
    if not args.skip_pipelined:
        designs.append(
            Design(
                "pipelined",
                args.events,
                lambda: drain_pipelined(client, args.batch_size),
                GROUP_PIPELINED,
            )
        )
    measurements: list[Measurement] = []
    try:
        for round_no in range(1, args.runs + 1):
            for d in designs:
                preload(client, workload.entries[: d.events])
                if d.name != "streamsync":
                    client.xgroup_create(STREAM, d.group, id="0")
                m = _measure(client, d.name, round_no, d.events, d.drain)
                m.problems = verify(
                    client,
                    workload,
                    d.events,
                    d.group,
                    sample=args.check_sample,
                    seed=args.seed + round_no,
                    records=d.records,
                )
                m.problems += _outcome_problems(m)
                measurements.append(m)
                failed = "  CHECK FAILED: " + "; ".join(m.problems) if m.problems else ""
                print(
                    f"  round {round_no} {d.name:<10} {d.events:>9,} events {m.elapsed_s:7.2f}s "
                    f"{_fmt_rate(m.events_per_s):>9}/s  {_outcome_text(m)}{failed}",
                    flush=True,
                )
        if not args.profile:
            return measurements, None
        preload(client, workload.entries)
        profile = cProfile.Profile()
        drain_streamsync(settings, args.drain_timeout_s, profile)
        return measurements, _profile_text(profile, 25)
    finally:
        client.close()


def summarize(
    args: argparse.Namespace, measurements: Sequence[Measurement]
) -> tuple[dict[str, float], dict[str, float]]:
    """Median events/s per design, and the ratios of streamsync's median to the others'
    (``redis CPU streamsync/pipelined``: of the medians of Redis CPU per change)."""
    names = dict.fromkeys(m.design for m in measurements)
    medians = {
        name: statistics.median(m.events_per_s for m in measurements if m.design == name)
        for name in names
    }
    ratios = {
        f"streamsync/{name}": medians["streamsync"] / rate
        for name, rate in medians.items()
        if name != "streamsync" and rate > 0
    }
    if "pipelined" in names:
        cpu = {
            name: statistics.median(m.redis_cpu_us for m in measurements if m.design == name)
            for name in ("streamsync", "pipelined")
        }
        if cpu["pipelined"] > 0:
            ratios["redis CPU streamsync/pipelined"] = cpu["streamsync"] / cpu["pipelined"]
    return medians, ratios


ROUND_HEADERS = (
    "round",
    "design",
    "events",
    "elapsed s",
    "events/s",
    "client CPU µs/ev",
    "redis CPU µs/ev",
    "check",
)


def _round_row(m: Measurement) -> list[str]:
    check = "FAILED" if m.problems else "ok"
    rate, elapsed = _fmt_rate(m.events_per_s), f"{m.elapsed_s:.2f}"
    cpu, redis_cpu = f"{m.client_cpu_us:.1f}", f"{m.redis_cpu_us:.1f}"
    return [str(m.round), m.design, f"{m.events:,}", elapsed, rate, cpu, redis_cpu, check]


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_results(
    args: argparse.Namespace,
    measurements: Sequence[Measurement],
    medians: dict[str, float],
    ratios: dict[str, float],
) -> None:
    """Every round's figures, then the medians and ratios next to their targets."""
    print()
    _print_table(ROUND_HEADERS, [_round_row(m) for m in measurements])
    ss = medians["streamsync"]
    target = f">= {_fmt_rate(TARGET_EVENTS_PER_S)}/s"
    rows = [
        [
            "streamsync",
            "position-checked Worker drain",
            _fmt_rate(ss),
            target,
            _verdict(ss >= TARGET_EVENTS_PER_S),
        ]
    ]
    if "naive" in medians:
        what = f"COUNT 1, first {args.naive_events:,} entries"
        rows.append(["naive", what, _fmt_rate(medians["naive"]), "", ""])
    if "pipelined" in medians:
        what = "batch HSET/DEL, no position check"
        rows.append(["pipelined", what, _fmt_rate(medians["pipelined"]), "", ""])
    if "streamsync/naive" in ratios:
        ratio, target = ratios["streamsync/naive"], f">= {TARGET_RATIO_NAIVE:g}x"
        verdict = _verdict(ratio >= TARGET_RATIO_NAIVE)
        rows.append(["streamsync/naive", "ratio of medians", f"{ratio:.1f}x", target, verdict])
    if "streamsync/pipelined" in ratios:
        ratio, target = ratios["streamsync/pipelined"], f">= {TARGET_RATIO_PIPELINED:g}x"
        verdict = _verdict(ratio >= TARGET_RATIO_PIPELINED)
        rows.append(["streamsync/pipelined", "ratio of medians", f"{ratio:.2f}x", target, verdict])
    cpu_ratio = ratios.get("redis CPU streamsync/pipelined")
    if cpu_ratio is not None:
        target = f"<= {TARGET_REDIS_CPU_RATIO:g}x"
        verdict = _verdict(cpu_ratio <= TARGET_REDIS_CPU_RATIO)
        what = "Redis CPU per change, medians"
        rows.append(["streamsync/pipelined", what, f"{cpu_ratio:.2f}x", target, verdict])
    print(f"\nmedians of {args.runs} interleaved round(s), events/s, batch size {args.batch_size}:")
    _print_table(["", "what", "median", "target", ""], rows)
    if "naive" in medians:
        print(
            "note: the naive handler is timed on the first "
            f"{args.naive_events:,} entries only. Its rate depends on whether the scheduler "
            "keeps it and redis-server on one CPU (a round trip across CPUs costs ~2.5x on a "
            "small VM): compare rounds, or fix the placement with --pin."
        )


def run(args: argparse.Namespace) -> int:
    """Generate, measure, check, print; the exit status (1 when a correctness check failed)."""
    t0 = time.perf_counter()
    workload = generate(args.events, args.rows, args.seed)
    touched = len(workload.final_state(args.events))
    mix = ", ".join(f"{op} {n / args.events:.0%}" for op, n in sorted(workload.ops.items()))
    print(
        f"workload: {args.events:,} events on {STREAM} ({mix}), {touched:,} distinct ids "
        f"touched of {args.rows:,}, mean value {workload.mean_value_bytes():.0f} B; "
        f"generated in {time.perf_counter() - t0:.1f}s"
    )
    # The workload is a few hundred thousand live objects that a worker process would not hold;
    # left to the cyclic GC they make every collection during a drain slower (seen as ~15% of
    # the worker's time in py-spy). Freeze them out of its reach.
    gc.collect()
    gc.freeze()
    with redis_server() as server:
        probe = redis.Redis.from_url(server.url)
        env: dict[str, str | int] = {
            "redis": str(probe.info("server")["redis_version"]),
            "python": platform.python_version(),
            "redis_py": redis.__version__,
            "hiredis": hiredis.__version__,
            "streamsync": streamsync_version,
            "cpus": os.cpu_count() or 0,
            "pin": _pin(args.pin, server),
        }
        probe.close()
        print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
        measurements, profile_text = measure_all(args, workload, server)
    medians, ratios = summarize(args, measurements)
    print_results(args, measurements, medians, ratios)
    if profile_text is not None:
        print("\ncProfile of one more streamsync drain (top functions by own time):")
        print(profile_text)
    failed = [m for m in measurements if m.problems]
    if failed:
        print(f"\n{len(failed)} drain(s) FAILED their checks (see above)")
    if args.json:
        print(
            json.dumps(
                {
                    "params": {k: v for k, v in vars(args).items() if k != "json"},
                    "environment": env,
                    "workload": {
                        "ops": dict(workload.ops),
                        "distinct_ids": touched,
                        "mean_value_bytes": round(workload.mean_value_bytes(), 1),
                    },
                    "runs": [
                        {**asdict(m), "events_per_s": round(m.events_per_s, 1)}
                        for m in measurements
                    ],
                    "medians_events_per_s": {k: round(v, 1) for k, v in medians.items()},
                    "ratios": {k: round(v, 3) for k, v in ratios.items()},
                    "targets": {
                        "streamsync_events_per_s": TARGET_EVENTS_PER_S,
                        "streamsync_over_naive": TARGET_RATIO_NAIVE,
                        "streamsync_over_pipelined": TARGET_RATIO_PIPELINED,
                        "redis_cpu_streamsync_over_pipelined": TARGET_REDIS_CPU_RATIO,
                    },
                    "ok": not failed,
                }
            )
        )
    return 1 if failed else 0


def _outcome_text(m: Measurement) -> str:
    outcomes = dict(m.outcomes)
    if m.design == "streamsync":
        # stale is the number to watch: it must stay 0 here (one consumer, increasing LSNs)
        outcomes = {"applied": 0, "stale": 0, **outcomes}
    return ", ".join(f"{k} {v:,}" for k, v in outcomes.items())


def _outcome_problems(m: Measurement) -> list[str]:
    """Outcome counts that cannot be right for this workload (one consumer, LSNs increasing:
    every event must be applied once, none stale)."""
    if m.design != "streamsync":
        handled = m.outcomes.get("handled", 0)
        return [] if handled == m.events else [f"handled {handled} of {m.events} entries"]
    problems = []
    if m.outcomes.get("applied", 0) != m.events:
        problems.append(f"applied {m.outcomes.get('applied', 0)} of {m.events}")
    unexpected = {k: v for k, v in m.outcomes.items() if k != "applied" and v}
    if unexpected:
        problems.append(f"unexpected outcomes {unexpected}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python benchmarks/throughput.py [options]``."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("streamsync").setLevel(logging.WARNING)
    # SIGTERM unwinds like Ctrl-C, so the private redis-server is stopped on the way out
    signal.signal(signal.SIGTERM, _raise_exit)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
