"""Memory streamsync keeps per cached row, by rule type: position and placement records, indexes.

    python benchmarks/memory.py              # 10,000 rows per rule type
    python benchmarks/memory.py --rows 50000

Starts a private redis-server (no persistence) in a temporary directory, applies one insert per
row through the Functions library exactly as a worker does (Planner -> streamsync_batch), and
reports MEMORY USAGE per row: the user-visible data, each kind of streamsync record, and the
growth of used_memory (which includes Redis's per-key overhead). Deterministic: no timing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

from streamsync.config import Rule
from streamsync.embedded.sandbox import RedisServer
from streamsync.events import ChangeEvent
from streamsync.functions import FN_BATCH, ensure_library
from streamsync.keys import StateKeys
from streamsync.mapping import Planner
from streamsync.positions import RANK_WRITE, streamed

TABLE = "public.users"
BATCH = 500

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
    ("stream event", {"key": "changes", "type": "stream"}),
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


def measure(
    client: redis.Redis, rule: Rule, rows: int, make: Callable[[int], dict[str, Any]]
) -> dict[str, float]:
    client.flushall()
    ensure_library(client)
    planner = Planner({TABLE: (rule,)}, StateKeys("streamsync:pos:"))
    before = int(client.info("memory")["used_memory"])
    pipe = client.pipeline(transaction=False)
    for i in range(1, rows + 1):
        position = streamed(1000 + i, 1000 + i, RANK_WRITE)
        event = ChangeEvent("c", TABLE, position, None, make(i), None, {"id": i})
        for write in planner.plan(event):
            pipe.execute_command(
                "FCALL", FN_BATCH, len(write.keys), *write.keys, 60000, *write.args
            )
        if i % BATCH == 0:
            pipe.execute()
    pipe.execute()
    grown = int(client.info("memory")["used_memory"]) - before
    usage: dict[str, float] = {"data": 0.0}
    for key in client.scan_iter(count=1000):
        size = client.memory_usage(key) or 0
        if key.startswith(b"streamsync:"):
            kind = key.split(b":")[1].decode()
            usage[kind] = usage.get(kind, 0.0) + size
        else:
            usage["data"] += size
    result = {k: v / rows for k, v in usage.items()}
    result["used_memory"] = grown / rows
    return result


NAMES = {"pos": "position", "pl": "placement", "idx": "index", "ord": "list order"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000, help="rows per rule type")
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server not found on PATH")
    with tempfile.TemporaryDirectory(prefix="streamsync-mem-") as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            client = redis.Redis.from_url(server.url)
            version = client.info("server")["redis_version"]
            print(f"bytes per row, MEMORY USAGE over {args.rows:,} rows, redis {version}")
            print(
                f"{'rule':24} {'data':>6} {'position':>9} {'placement':>10} {'order':>6}"
                f" {'index':>6} {'used_memory':>12}"
            )
            for label, spec in RULES:
                rule = Rule(table=TABLE, **spec)
                m = measure(client, rule, args.rows, row)
                print(
                    f"{label:24} {m['data']:6.0f} {m.get('pos', 0):9.0f} {m.get('pl', 0):10.0f}"
                    f" {m.get('ord', 0):6.0f} {m.get('idx', 0):6.0f} {m['used_memory']:12.0f}"
                )
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
