"""Drain throughput with 1, 2 and 4 worker processes in one consumer group (and more streams).

One command, no setup: ``python benchmarks/scaling.py``. It starts a private ``redis-server`` on a
free port, generates the workload of ``throughput.py`` (Debezium Server change events for
``public.users``, same generator, same seed), and for each configuration in interleaved rounds:

1. empties Redis (FLUSHALL) and preloads the stream, or, with ``--streams 2,4``, the same events
   split by row id over 2 or 4 streams (tables ``public.users_0`` ... each with its own
   ``user:{id}`` hash rule; every row's changes stay in one stream, in order);
2. pauses Redis' writes (``CLIENT PAUSE ... WRITE``), starts N ``streamsync run --drain``
   subprocesses with distinct consumer names in group ``bench``, and waits until each one is
   held by the pause at its first write, so that N Python start-ups do not count;
3. unpauses, and times until the group has read and acknowledged every entry of every stream
   (polled every ``--poll-ms``), measuring the CPU time of the workers (``/proc``) and of
   redis-server (``INFO cpu``) over that window;
4. waits for the workers to exit 0, then checks: nothing pending, each event applied or stale
   exactly once (the workers' exit summaries), a sample of rows equal to the newest generated
   state with its position record.

Printed: every round, then the median events/s per configuration and its ratio to the 1-worker,
1-stream median of the same run. Exit status 1 if a check failed; Ctrl-C and SIGTERM stop the
workers and the server on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

# the benchmarks directory is not a package: throughput.py is imported from the path above
from throughput import (
    KEY_PREFIX,
    PRELOAD_CHUNK,
    STREAM,
    Workload,
    _pack_command,
    _raise_exit,
    generate,
    preload,
    redis_server,
    verify_rows,
)

from streamsync import __version__ as streamsync_version
from streamsync.buckets import Tables
from streamsync.config import load_settings
from streamsync.embedded.sandbox import RedisServer, die_with_parent_hook
from streamsync.keys import StateKeys

GROUP = "bench"
#: How long the workers may take to start and reach the pause.
START_TIMEOUT_S = 60.0
#: The pause is lifted explicitly; this only bounds it if the benchmark dies.
PAUSE_MS = 120_000
STOP_TIMEOUT_S = 10.0

_SUMMARY_RE = re.compile(r"worker (?P<consumer>\S+) stopped: (?P<counts>.*)$", re.MULTILINE)
_COUNT_RE = re.compile(r"(?P<outcome>[a-z_]+) (?P<n>\d+)")


# -- the streams ----------------------------------------------------------------------------


def stream_names(n_streams: int) -> list[str]:
    """``app.public.users`` alone, or ``app.public.users_0`` ... for a split."""
    if n_streams == 1:
        return [STREAM]
    return [f"{STREAM}_{k}" for k in range(n_streams)]


def table_names(n_streams: int) -> list[str]:
    if n_streams == 1:
        return ["public.users"]
    return [f"public.users_{k}" for k in range(n_streams)]


def split(workload: Workload, n_streams: int) -> list[list[tuple[bytes, bytes]]]:
    """The entries of each stream: row ``id`` goes to stream ``id % n``, its table renamed."""
    if n_streams == 1:
        return [workload.entries]
    out: list[list[tuple[bytes, bytes]]] = [[] for _ in range(n_streams)]
    for (key, value), change in zip(workload.entries, workload.changes, strict=True):
        k = change.id % n_streams
        renamed = value.replace(b'"table":"users"', b'"table":"users_%d"' % k, 1)
        if renamed == value:
            raise AssertionError('the generated envelope has no "table":"users"')
        out[k].append((key, renamed))
    return out


def preload_split(client: redis.Redis, streams: Sequence[str], parts: Sequence[Any]) -> None:
    """FLUSHALL, then XADD each stream's entries, pipelined."""
    if len(streams) == 1:
        preload(client, parts[0])
        return
    client.flushall()
    conn: Any = client.connection_pool.get_connection()
    try:
        for stream, entries in zip(streams, parts, strict=True):
            name = stream.encode()
            for start in range(0, len(entries), PRELOAD_CHUNK):
                chunk = entries[start : start + PRELOAD_CHUNK]
                conn.send_packed_command(
                    [b"".join(_pack_command((b"XADD", name, b"*", k, v)) for k, v in chunk)]
                )
                for _ in chunk:
                    conn.read_response()
    finally:
        client.connection_pool.release(conn)


def write_config(path: Path, url: str, n_streams: int, batch_size: int) -> Path:
    data = {
        "redis": {"url": url},
        "source": {"streams": stream_names(n_streams), "group": GROUP},
        "worker": {"batch_size": batch_size},
        "rules": [
            {"table": table, "key": KEY_PREFIX + "{id}", "type": "hash"}
            for table in table_names(n_streams)
        ],
    }
    path.write_text(yaml.safe_dump(data))
    return path


# -- the workers ----------------------------------------------------------------------------


class Workers:
    """N ``streamsync run --drain`` subprocesses, stopped whatever happens."""

    def __init__(self, config: Path, n: int, log_dir: Path, tag: str) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.names = [f"{tag}-{i}" for i in range(n)]
        self.logs = [log_dir / f"{name}.log" for name in self.names]
        self.config = config

    def start(self) -> None:
        for name, log_path in zip(self.names, self.logs, strict=True):
            args = [sys.executable, "-m", "streamsync", "--log-level", "INFO", "run"]
            args += ["-c", str(self.config), "--consumer", name, "--drain"]
            with log_path.open("wb") as log:
                self.procs.append(
                    subprocess.Popen(
                        args,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        # out of the terminal's process group: Ctrl-C reaches the benchmark,
                        # which stops them (the hook kills them if the benchmark dies)
                        start_new_session=True,
                        preexec_fn=die_with_parent_hook(),  # noqa: PLW1509
                    )
                )

    def cpu_s(self) -> float | None:
        """User + system CPU seconds of the live workers so far (Linux /proc), else None."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for proc in self.procs:
            try:
                stat = Path(f"/proc/{proc.pid}/stat").read_text()
            except OSError:
                return None
            fields = stat.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        return total

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def wait(self, timeout: float) -> list[int | None]:
        deadline = time.monotonic() + timeout
        codes: list[int | None] = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes

    def outcomes(self) -> Counter[str]:
        totals: Counter[str] = Counter()
        for log_path in self.logs:
            text = log_path.read_text(errors="replace") if log_path.exists() else ""
            for match in _SUMMARY_RE.finditer(text):
                for m in _COUNT_RE.finditer(match["counts"]):
                    totals[m["outcome"]] += int(m["n"])
        return totals

    def tail(self, lines: int = 15) -> str:
        out = []
        for log_path in self.logs:
            text = log_path.read_text(errors="replace") if log_path.exists() else ""
            out.append(f"--- {log_path.name}\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(out)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL whatever is still running."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)


def held_by_pause(client: redis.Redis, names: Sequence[str]) -> bool:
    """Every worker has a connection waiting on the pause (flag ``b``)."""
    waiting = {
        c.get("name", "")
        for c in client.client_list()
        if "b" in c.get("flags", "") and c.get("name", "").startswith("streamsync:")
    }
    return all(f"streamsync:{name}" in waiting for name in names)


# -- one measurement ------------------------------------------------------------------------


@dataclass(slots=True)
class Measurement:
    """One timed drain of one configuration."""

    workers: int
    streams: int
    round: int
    events: int
    elapsed_s: float
    #: CPU seconds of all workers together, and of redis-server, over the timed window.
    workers_cpu_s: float | None
    redis_cpu_s: float
    #: The 1-minute load average when the drain ended (other work on the machine shows here).
    load_avg: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def events_per_s(self) -> float:
        return self.events / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def config(self) -> tuple[int, int]:
        return self.workers, self.streams


def _redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _drained(client: redis.Redis, streams: Sequence[str], last_ids: dict[str, bytes]) -> bool:
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.xinfo_groups(stream)
    for stream, groups in zip(streams, pipe.execute(), strict=True):
        group = next((g for g in groups if g["name"] == GROUP.encode()), None)
        if group is None or group["pending"] or group["last-delivered-id"] != last_ids[stream]:
            return False
    return True


def check(
    client: redis.Redis,
    workload: Workload,
    streams: Sequence[str],
    outcomes: Counter[str],
    *,
    config: Path,
    sample: int,
    seed: int,
) -> list[str]:
    """Nothing pending, every event applied or stale exactly once, sampled rows and their
    records right (``config``: the workers' configuration)."""
    problems = []
    for stream in streams:
        pending = client.xpending(stream, GROUP)["pending"]
        if pending:
            problems.append(f"{stream}: {pending} entries still pending")
    n = len(workload.entries)
    processed = outcomes.get("applied", 0) + outcomes.get("stale", 0)
    if processed != n:
        problems.append(f"applied + stale = {processed:,}, not {n:,}")
    unexpected = {k: v for k, v in outcomes.items() if k not in ("applied", "stale") and v}
    if unexpected:
        problems.append(f"unexpected outcomes {unexpected}")
    settings = load_settings(config, environ={})
    tables = Tables(StateKeys.from_settings(settings.worker))
    by_stream = [tables.table(rule) for rule in settings.rules]
    return problems + verify_rows(
        client,
        workload,
        n,
        sample=sample,
        seed=seed,
        records=lambda row_id: by_stream[row_id % len(by_stream)],
    )


def measure(
    args: argparse.Namespace,
    server: RedisServer,
    *,
    client: redis.Redis,
    workload: Workload,
    parts: Sequence[Any],
    n_workers: int,
    n_streams: int,
    round_no: int,
    tmp: Path,
) -> Measurement:
    streams = stream_names(n_streams)
    preload_split(client, streams, parts)
    last_ids = {s: client.xinfo_stream(s)["last-generated-id"] for s in streams}
    for stream in streams:
        client.xgroup_create(stream, GROUP, id="0")
    tag = f"r{round_no}-w{n_workers}-s{n_streams}"
    config = write_config(tmp / f"{tag}.yaml", server.url, n_streams, args.batch_size)
    workers = Workers(config, n_workers, tmp, tag)
    client.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")
    try:
        workers.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not held_by_pause(client, workers.names):
            if not workers.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"workers did not reach the pause:\n{workers.tail()}")
            time.sleep(0.01)
        cpu0, redis0 = workers.cpu_s(), _redis_cpu_s(client)
        start = time.perf_counter()
        client.execute_command("CLIENT", "UNPAUSE")
        deadline = time.monotonic() + args.drain_timeout_s
        poll = args.poll_ms / 1000
        while not _drained(client, streams, last_ids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"not drained within {args.drain_timeout_s:g}s")
            if not workers.alive():
                break  # a worker died: the checks report it
            time.sleep(poll)
        elapsed = time.perf_counter() - start
        cpu1, redis1 = workers.cpu_s(), _redis_cpu_s(client)
        codes = workers.wait(timeout=STOP_TIMEOUT_S + 5)
    finally:
        with contextlib.suppress(redis.RedisError):
            client.execute_command("CLIENT", "UNPAUSE")
        workers.stop()
    outcomes = workers.outcomes()
    m = Measurement(
        n_workers,
        n_streams,
        round_no,
        len(workload.entries),
        elapsed,
        None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
        redis1 - redis0,
        os.getloadavg()[0],
        dict(sorted(outcomes.items())),
    )
    if any(code != 0 for code in codes):
        m.problems.append(f"worker exit codes {codes}:\n{workers.tail()}")
    m.problems += check(
        client,
        workload,
        streams,
        outcomes,
        config=config,
        sample=args.check_sample,
        seed=args.seed + round_no,
    )
    return m


# -- the run --------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Drain throughput of 1, 2 and 4 streamsync worker processes in one group."
    )
    parser.add_argument("--events", type=int, default=200_000, help="default %(default)s")
    parser.add_argument("--rows", type=int, default=49_000, help="default %(default)s")
    parser.add_argument("--runs", type=int, default=3, help="rounds (default %(default)s)")
    parser.add_argument(
        "--workers", type=_int_list, default=[1, 2, 4], help="worker counts (default 1,2,4)"
    )
    parser.add_argument(
        "--streams",
        type=_int_list,
        default=[1],
        help="stream counts to split the events over, e.g. 1,2,4 (default 1)",
    )
    parser.add_argument("--batch-size", type=int, default=500, help="default %(default)s")
    parser.add_argument("--seed", type=int, default=1, help="workload seed (default %(default)s)")
    parser.add_argument(
        "--check-sample",
        type=int,
        default=200,
        help="rows compared after each drain; 0 = every touched row (default %(default)s)",
    )
    parser.add_argument(
        "--poll-ms", type=float, default=5.0, help="drain-end polling (default %(default)s)"
    )
    parser.add_argument("--drain-timeout-s", type=float, default=600.0, help="default %(default)s")
    parser.add_argument("--json", action="store_true", help="also print one JSON object")
    args = parser.parse_args(argv)
    for name in ("events", "rows", "runs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _configs(args: argparse.Namespace) -> list[tuple[int, int]]:
    configs = [(w, s) for s in args.streams for w in args.workers]
    if (1, 1) not in configs:
        configs.insert(0, (1, 1))  # the reference of the ratios
    return configs


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def _pct(cpu: float | None, elapsed: float) -> str:
    return "n/a" if cpu is None else f"{100 * cpu / elapsed:.0f}%"


def measure_all(
    args: argparse.Namespace, workload: Workload, server: RedisServer
) -> list[Measurement]:
    client = redis.Redis.from_url(server.url, decode_responses=False)
    parts = {s: split(workload, s) for s in sorted({s for _, s in _configs(args)})}
    measurements: list[Measurement] = []
    try:
        with tempfile.TemporaryDirectory(prefix="streamsync-scaling-") as tmp:
            for round_no in range(1, args.runs + 1):
                for n_workers, n_streams in _configs(args):
                    m = measure(
                        args,
                        server,
                        client=client,
                        workload=workload,
                        parts=parts[n_streams],
                        n_workers=n_workers,
                        n_streams=n_streams,
                        round_no=round_no,
                        tmp=Path(tmp),
                    )
                    measurements.append(m)
                    failed = "  CHECK FAILED: " + "; ".join(m.problems) if m.problems else ""
                    print(
                        f"  round {round_no}  {n_workers} worker(s)  {n_streams} stream(s)  "
                        f"{m.elapsed_s:6.2f}s  {m.events_per_s:>9,.0f}/s  "
                        f"CPU workers {_pct(m.workers_cpu_s, m.elapsed_s)} "
                        f"redis {_pct(m.redis_cpu_s, m.elapsed_s)}  "
                        f"load {m.load_avg:.2f}  "
                        + ", ".join(f"{k} {v:,}" for k, v in m.outcomes.items())
                        + failed,
                        flush=True,
                    )
    finally:
        client.close()
    return measurements


def summarize(measurements: Sequence[Measurement]) -> dict[tuple[int, int], dict[str, float]]:
    """Per configuration: median events/s, ratio to (1 worker, 1 stream), median CPU shares."""
    configs = dict.fromkeys(m.config for m in measurements)
    out: dict[tuple[int, int], dict[str, float]] = {}
    for config in configs:
        ms = [m for m in measurements if m.config == config]
        cpu = [m.workers_cpu_s / m.elapsed_s for m in ms if m.workers_cpu_s is not None]
        cpu_us = [m.workers_cpu_s / m.events * 1e6 for m in ms if m.workers_cpu_s is not None]
        out[config] = {
            "events_per_s": statistics.median(m.events_per_s for m in ms),
            "workers_cpu": statistics.median(cpu) if cpu else float("nan"),
            "redis_cpu": statistics.median(m.redis_cpu_s / m.elapsed_s for m in ms),
            "workers_cpu_us_per_event": statistics.median(cpu_us) if cpu_us else float("nan"),
            "redis_cpu_us_per_event": statistics.median(m.redis_cpu_s / m.events * 1e6 for m in ms),
            "load_avg": statistics.median(m.load_avg for m in ms),
        }
    base = out[(1, 1)]["events_per_s"]
    for config, figures in out.items():
        figures["ratio"] = figures["events_per_s"] / base if base else float("nan")
        same_streams = out.get((1, config[1]))
        figures["ratio_same_streams"] = (
            figures["events_per_s"] / same_streams["events_per_s"] if same_streams else float("nan")
        )
    return out


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    workload = generate(args.events, args.rows, args.seed)
    print(
        f"workload: {args.events:,} events over {args.rows:,} ids (throughput.py's generator, "
        f"seed {args.seed}), mean value {workload.mean_value_bytes():.0f} B; generated in "
        f"{time.perf_counter() - t0:.1f}s"
    )
    gc.collect()
    gc.freeze()
    with redis_server() as server:
        probe = redis.Redis.from_url(server.url)
        env: dict[str, Any] = {
            "redis": str(probe.info("server")["redis_version"]),
            "python": platform.python_version(),
            "redis_py": redis.__version__,
            "streamsync": streamsync_version,
            "cpus": os.cpu_count() or 0,
            "load_avg_at_start": round(os.getloadavg()[0], 2),
        }
        probe.close()
        print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
        measurements = measure_all(args, workload, server)
    summary = summarize(measurements)
    print(
        f"\nmedians of {args.runs} interleaved round(s), batch size {args.batch_size}; ratios to "
        "the 1-worker, 1-stream median of this run (and to 1 worker on as many streams):"
    )
    rows = []
    for (n_workers, n_streams), f in summary.items():
        rounds = " · ".join(
            f"{m.events_per_s:,.0f}" for m in measurements if m.config == (n_workers, n_streams)
        )
        rows.append(
            [
                str(n_workers),
                str(n_streams),
                f"{f['events_per_s']:,.0f}",
                f"{f['ratio']:.2f}x",
                f"{f['ratio_same_streams']:.2f}x",
                f"{100 * f['workers_cpu']:.0f}%",
                f"{100 * f['redis_cpu']:.0f}%",
                f"{f['workers_cpu_us_per_event']:.1f}",
                f"{f['redis_cpu_us_per_event']:.1f}",
                f"{f['load_avg']:.2f}",
                rounds,
            ]
        )
    _table(
        [
            "workers",
            "streams",
            "events/s",
            "vs 1w 1s",
            "vs 1w same s",
            "CPU workers",
            "CPU redis",
            "µs/ev workers",
            "µs/ev redis",
            "load",
            "rounds",
        ],
        rows,
    )
    print(
        f"CPU: share of one core over the timed window ({env['cpus']} CPUs here: at most "
        f"{100 * env['cpus']}% in all), and CPU time per event (all workers together; "
        "redis-server). load: the 1-minute load average at the end of the drains (work of "
        "others on the machine shows here)."
    )
    failed = [m for m in measurements if m.problems]
    if failed:
        print(f"\n{len(failed)} drain(s) FAILED their checks (see above)")
    if args.json:
        print(
            json.dumps(
                {
                    "params": {k: v for k, v in vars(args).items() if k != "json"},
                    "environment": env,
                    "runs": [
                        {**asdict(m), "events_per_s": round(m.events_per_s, 1)}
                        for m in measurements
                    ],
                    "medians": {
                        f"{w}w{s}s": {k: round(v, 3) for k, v in f.items()}
                        for (w, s), f in summary.items()
                    },
                    "ok": not failed,
                }
            )
        )
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python benchmarks/scaling.py [options]``."""
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the workers and the private redis-server are stopped
    signal.signal(signal.SIGTERM, _raise_exit)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
