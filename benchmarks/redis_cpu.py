"""Redis CPU per change: where a position-checked apply spends the cache's CPU.

    python benchmarks/redis_cpu.py                 # 100,000 changes, 5 interleaved rounds
    python benchmarks/redis_cpu.py --events 20000 --runs 1

The same changes (``throughput.py``'s workload: 20% creates, 70% updates, 10% deletes of a
6-column row) are applied in batches of ``--batch-size`` rows by several designs, each on an
emptied Redis, and the Redis server's CPU time (``INFO cpu``: ``used_cpu_user`` +
``used_cpu_sys``) is divided by the number of changes:

- ``stream``: what reading and acknowledging costs any consumer (XREADGROUP COUNT n + XACK of
  the n ids), measured once per round; added to every design below for the totals;
- ``blind``: the blind batch consumer's writes, pipelined HSET (or DEL) per change;
- ``lua write``: the same writes from one FCALL per batch (a throwaway library): what calling
  Lua costs (arguments, ``redis.call``) before any bookkeeping;
- ``lua record``: plus the least exact bookkeeping there is: per change, HGET a position from a
  small hash (1,024 of them), compare, HSET it back;
- ``streamsync``: ``streamsync_changes`` of the real planner's rows (library 2.0 records in the
  rule table's buckets, TTL and tombstone suffixes, the table's counters).

Ratios are of totals (design + stream) to the blind consumer's total in the same round; medians
of ``--runs`` rounds.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

# the benchmarks directory is not a package: throughput.py is imported from the path above
from throughput import (
    KEY_PREFIX,
    STREAM,
    Workload,
    generate,
    preload,
    redis_server,
    streamsync_settings,
)

from streamsync.events import ChangeEvent
from streamsync.functions import Library, RowWrite
from streamsync.keys import StateKeys
from streamsync.mapping import Planner, hash_value
from streamsync.positions import RANK_REMOVE, RANK_WRITE, streamed

GROUP = "cpu"
BUCKETS = 1024

BENCH_LIBRARY = """#!lua name=streamsync_cpu_bench
-- KEYS: per change its key; ARGV: per change 'd', or the number of field-value items then them
local function write(keys, argv)
    local i = 1
    for k = 1, #keys do
        local n = tonumber(argv[i])
        if n == 0 then
            redis.call('DEL', keys[k])
        else
            redis.call('HSET', keys[k], unpack(argv, i + 1, i + n))
        end
        i = i + 1 + n
    end
    return #keys
end
-- KEYS: per change its key and its record's bucket; ARGV: per change the record field, the
-- position, the number of items and them
local function record(keys, argv)
    local i, applied = 1, 0
    for k = 1, #keys, 2 do
        local field, pos, n = argv[i], argv[i + 1], tonumber(argv[i + 2])
        local current = redis.call('HGET', keys[k + 1], field)
        if not current or current < pos then
            if n == 0 then
                redis.call('DEL', keys[k])
            else
                redis.call('HSET', keys[k], unpack(argv, i + 3, i + 2 + n))
            end
            redis.call('HSET', keys[k + 1], field, pos)
            applied = applied + 1
        end
        i = i + 3 + n
    end
    return applied
end
redis.register_function('bench_write', write)
redis.register_function('bench_record', record)
"""


def redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def measured(client: redis.Redis, run: Callable[[], None]) -> float:
    """Redis CPU seconds spent while ``run`` runs."""
    before = redis_cpu_s(client)
    run()
    return redis_cpu_s(client) - before


def batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def fields_of(after: dict[str, Any] | None) -> list[str]:
    if after is None:
        return []
    return [str(x) for k, v in after.items() if v is not None for x in (k, hash_value(v))]


def position_of(change: Any) -> str:
    rank = RANK_REMOVE if change.after is None else RANK_WRITE
    return str(streamed(change.last_commit_lsn, change.lsn, rank))


def run_blind(client: redis.Redis, workload: Workload, n: int, size: int) -> None:
    for chunk in batches(workload.changes[:n], size):
        pipe = client.pipeline(transaction=False)
        for change in chunk:
            key = f"{KEY_PREFIX}{change.id}"
            if change.after is None:
                pipe.delete(key)
            else:
                pipe.hset(key, mapping={k: hash_value(v) for k, v in change.after.items()})
        pipe.execute()


def run_lua_write(client: redis.Redis, workload: Workload, n: int, size: int) -> None:
    for chunk in batches(workload.changes[:n], size):
        keys, args = [], []
        for change in chunk:
            items = fields_of(change.after)
            keys.append(f"{KEY_PREFIX}{change.id}")
            args += [str(len(items)), *items]
        client.fcall("bench_write", len(keys), *keys, *args)


def run_lua_record(client: redis.Redis, workload: Workload, n: int, size: int) -> None:
    for chunk in batches(workload.changes[:n], size):
        keys, args = [], []
        for change in chunk:
            items = fields_of(change.after)
            keys += [f"{KEY_PREFIX}{change.id}", f"bench:b:{change.id % BUCKETS}"]
            args += [str(change.id), position_of(change), str(len(items)), *items]
        client.fcall("bench_record", len(keys), *keys, *args)


def planned(workload: Workload, n: int, planner: Planner) -> list[RowWrite]:
    rows: list[RowWrite] = []
    table = streamsync_settings("redis://unused", 500).rules[0].table
    for change in workload.changes[:n]:
        op = "d" if change.after is None else "u"
        key = {"id": change.id}
        event = ChangeEvent(op, table, position_of(change), None, change.after, None, key)
        rows += planner.plan(event)
    return rows


def run_streamsync(client: redis.Redis, rows: list[RowWrite], size: int) -> None:
    library = Library(client)
    library.ensure()
    for chunk in batches(rows, size):
        library.changes(chunk, 86_400)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rows", type=int, default=49_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    workload = generate(args.events, args.rows, args.seed)
    n, size = args.events, args.batch_size
    settings = streamsync_settings("redis://unused", size)
    designs = ("blind", "lua write", "lua record", "streamsync")
    cpu: dict[str, list[float]] = {name: [] for name in ("stream", *designs)}
    with redis_server() as server:
        client = redis.Redis.from_url(server.url)
        for round_no in range(1, args.runs + 1):
            planner = Planner(settings.rules_by_table, StateKeys.from_settings(settings.worker))
            rows = planned(workload, n, planner)
            runs: dict[str, Callable[[], None]] = {
                "stream": lambda: drain_only(client, size),
                "blind": lambda: run_blind(client, workload, n, size),
                "lua write": lambda: run_lua_write(client, workload, n, size),
                "lua record": lambda: run_lua_record(client, workload, n, size),
                "streamsync": functools.partial(run_streamsync, client, rows, size),
            }
            for name, run in runs.items():
                client.flushall()
                client.function_flush()
                client.function_load(BENCH_LIBRARY)
                if name == "stream":
                    # the preload is not part of the measure
                    preload(client, workload.entries[:n])
                    client.xgroup_create(STREAM, GROUP, id="0")
                spent = measured(client, run)
                cpu[name].append(spent * 1e6 / n)
            print(
                f"  round {round_no}: "
                + ", ".join(f"{name} {cpu[name][-1]:.2f}" for name in cpu)
                + " µs/change"
            )
    stream = statistics.median(cpu["stream"])
    blind = statistics.median(cpu["blind"])
    print(f"\nRedis CPU per change, medians of {args.runs} round(s), {n:,} changes, batch {size}:")
    print(f"{'design':<12} {'apply µs':>9} {'+ stream µs':>12} {'vs blind':>9}")
    print(f"{'stream':<12} {stream:>9.2f} {'':>12} {'':>9}")
    for name in designs:
        apply_us = statistics.median(cpu[name])
        total = apply_us + stream
        print(f"{name:<12} {apply_us:>9.2f} {total:>12.2f} {total / (blind + stream):>8.2f}x")
    return 0


def drain_only(client: redis.Redis, size: int) -> None:
    while True:
        reply: Any = client.xreadgroup(GROUP, "c", {STREAM: ">"}, count=size)
        if not reply or not reply[0][1]:
            return
        client.xack(STREAM, GROUP, *(entry_id for entry_id, _ in reply[0][1]))


if __name__ == "__main__":
    raise SystemExit(main())
