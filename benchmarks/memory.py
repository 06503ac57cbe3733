"""Memory and Redis CPU streamsync spends per cached row, by rule type.

    python benchmarks/memory.py                    # 10,000 and 1,000,000 rows per rule type
    python benchmarks/memory.py --rows 50000

Starts a private redis-server (no persistence) in a temporary directory and applies one insert
per row through the Functions library exactly as a worker does (Planner -> streamsync_changes,
the tables split as they grow). Reports per row: the user-visible data (MEMORY USAGE of the
cache's keys), the bookkeeping (the growth of used_memory less that data: records, overflow,
list order and reserve records, and Redis's per-key overhead of each), the share of it in
buckets, and the Redis CPU of the calls (INFO commandstats: FCALL microseconds per row, splits
included). Positions are written as the worker writes streamed changes (streamsync.positions).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from streamsync.config import Rule
from streamsync.embedded.sandbox import RedisServer
from streamsync.events import ChangeEvent
from streamsync.functions import Library, changes_command, changes_reply, ensure_library
from streamsync.keys import StateKeys
from streamsync.mapping import Planner
from streamsync.positions import RANK_WRITE, streamed

TABLE = "public.users"
#: Rows per streamsync_changes call, as a worker batches them.
BATCH = 500
TOMBSTONE_S = 600
#: A realistic write-ahead-log position: 11 digits.
LSN_BASE = 30_000_000_000

RULES: list[tuple[str, dict[str, Any]]] = [
    ("hash keyed by id", {"key": "user:{id}", "type": "hash"}),
    ("json keyed by id", {"key": "doc:{id}", "type": "json"}),
    ("string keyed by email", {"key": "email:{email}", "type": "string", "value": "{id}"}),
    ("set member", {"key": "plan:{plan}:users", "type": "set", "member": "{id}"}),
    ("zset member", {"key": "prices", "type": "zset", "member": "product:{id}", "score": "price"}),
    (
        "list entry",
        {"key": "feed:{uid}", "type": "list", "value": "json", "fields": ["id", "name"]},
    ),
    (
        "list entry, max_len 10",
        {
            "key": "feed:{uid}",
            "type": "list",
            "value": "json",
            "fields": ["id", "name"],
            "max_len": 10,
        },
    ),
    ("stream event", {"key": "changes", "type": "stream", "max_len": 1000}),
]


def row(i: int) -> dict[str, Any]:
    return {
        "id": i,
        "name": f"user{i}",
        "email": f"u{i}@example.com",
        "plan": ("free", "pro", "team")[i % 3],
        "price": f"{i % 100}.50",
        "uid": i % 500,
    }


@dataclass(slots=True)
class Measure:
    """Bytes and Redis CPU per row of one rule type."""

    data: float
    bookkeeping: float
    buckets: float
    cpu_us: float


def _position(i: int) -> str:
    lsn = LSN_BASE + 100 * i
    return streamed(lsn - 60, lsn, RANK_WRITE)


def measure(
    client: redis.Redis, rule: Rule, rows: int, make: Callable[[int], dict[str, Any]]
) -> Measure:
    client.flushall()
    ensure_library(client)
    library = Library(client)
    planner = Planner({TABLE: (rule,)}, StateKeys())
    before = int(client.info("memory")["used_memory"])
    client.config_resetstat()
    for start in range(1, rows + 1, BATCH):
        writes = []
        for i in range(start, min(rows, start + BATCH - 1) + 1):
            event = ChangeEvent("c", TABLE, _position(i), None, make(i), None, {"id": i})
            writes += planner.plan(event)
        command, tables = changes_command(writes, TOMBSTONE_S)
        changes_reply(client.execute_command(*command), tables)
        for table in tables:
            while table.splits_due and library.split(table):
                pass
    calls = client.info("commandstats").get("cmdstat_fcall", {"usec": 0})
    grown = int(client.info("memory")["used_memory"]) - before
    data = buckets = 0
    keys = list(client.scan_iter(count=1000))
    for start in range(0, len(keys), 1000):
        chunk = keys[start : start + 1000]
        pipe = client.pipeline(transaction=False)
        for key in chunk:
            pipe.memory_usage(key, samples=0)
        for key, size in zip(chunk, pipe.execute(), strict=True):
            if key.startswith(b"streamsync:b:"):
                buckets += int(size or 0)
            elif not key.startswith(b"streamsync:"):
                data += int(size or 0)
    return Measure(data / rows, (grown - data) / rows, buckets / rows, calls["usec"] / rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, nargs="+", default=[10_000, 1_000_000], help="rows per rule type"
    )
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server not found on PATH")
    with tempfile.TemporaryDirectory(prefix="streamsync-mem-") as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            client = redis.Redis.from_url(server.url)
            version = client.info("server")["redis_version"]
            print(
                f"bytes and Redis CPU per row, redis {version}, positions of"
                f" {len(_position(1))} characters"
            )
            # a first run grows what every later one reuses (the Lua heap, Redis's buffers)
            for _, spec in RULES:
                measure(client, Rule(table=TABLE, **spec), BATCH, row)
            for rows in args.rows:
                print(f"\n{rows:,} rows")
                print(
                    f"{'rule':24} {'data':>6} {'bookkeeping':>12} {'in buckets':>11} {'CPU us':>7}"
                )
                for label, spec in RULES:
                    m = measure(client, Rule(table=TABLE, **spec), rows, row)
                    print(
                        f"{label:24} {m.data:6.0f} {m.bookkeeping:12.0f} {m.buckets:11.0f}"
                        f" {m.cpu_us:7.1f}"
                    )
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
