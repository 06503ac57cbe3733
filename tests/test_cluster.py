"""The worker and the Functions library on a real 3-primary Redis Cluster started by the test:
commands routed by slot, the library on every primary, keys all over the keyspace, rules pinned
to a slot whose rows move (a set, a list, a key over a non-key column), and a primary restarted
(and one losing its library) while workers run."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import yaml
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from streamsync import status
from streamsync.cli import cli
from streamsync.config import load_settings, parse_settings
from streamsync.errors import ConfigError, ExitCode, PoisonEntryError
from streamsync.events import ChangeEvent
from streamsync.functions import library_version
from streamsync.keys import StateKeys
from streamsync.mapping import Planner
from streamsync.metrics import RedisCollector
from streamsync.worker import Worker
from tests.debezium import entry_fields, envelope, write_config
from tests.prerequisites import rejson_module
from tests.replies import Client, as_str, xadd, zscores
from tests.servers import RedisServer, free_port, wait_until

STREAM = "app.public.users"
ROWS = 400
PLANS = ("free", "pro", "team")

RULES: list[dict[str, Any]] = [
    {"table": "public.users", "key": "user:{id}", "type": "hash"},
    {
        "table": "public.users",
        "key": "{{plans}}:plan:{plan}:users",
        "type": "set",
        "member": "{id}",
    },
    {
        "table": "public.users",
        "key": "balances",
        "type": "zset",
        "member": "user:{id}",
        "score": "balance",
        "where": "active = true",
    },
    {
        "table": "public.users",
        "key": "{{feeds}}:feed:{plan}",
        "type": "list",
        "value": "{id}",
        "on_update": "replace",
    },
    {"table": "public.users", "key": "{{names}}:name:{name}", "type": "string", "value": "{id}"},
]


def _bus_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port + 10000))
        except OSError:
            return False
    return True


def _cluster_port() -> int:
    while True:
        port = free_port()
        if port + 10000 < 65536 and _bus_free(port):
            return port


class Cluster:
    """Three primaries, no replicas, AOF on so a restarted primary keeps its data."""

    def __init__(self, base: Path, modules: Sequence[str] = ()) -> None:
        loads = [arg for module in modules for arg in ("--loadmodule", module)]
        self.nodes = [
            RedisServer(
                base / f"n{i}",
                port=_cluster_port(),
                appendonly=True,
                extra_args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                    *loads,
                ],
            )
            for i in range(3)
        ]

    def start(self) -> None:
        for node in self.nodes:
            node.data_dir.mkdir(parents=True, exist_ok=True)
            node.start()
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        wait_until(self.ok, timeout=30, message="the cluster to be ok")

    def ok(self) -> bool:
        try:
            return all(n.client().cluster("info")["cluster_state"] == "ok" for n in self.nodes)
        except redis.RedisError:
            return False

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster")
    try:
        c.start()
        yield c
    finally:
        c.stop()


class Source:
    """Writes Debezium entries for a users table and remembers the newest row per id."""

    def __init__(self, rc: Client, seed: int) -> None:
        self.rc = rc
        self.rng = random.Random(seed)
        self.lsn = 1_000
        self.rows: dict[int, dict[str, Any] | None] = {}
        self.entries: list[dict[str, str]] = []

    def change(self, row_id: int) -> None:
        self.lsn += 8
        current = self.rows.get(row_id)
        if current is not None and self.rng.random() < 0.15:
            value = envelope("d", "public.users", self.lsn, before={"id": row_id})
            self.rows[row_id] = None
        else:
            row = {
                "id": row_id,
                "name": f"user{row_id}-{self.lsn}",
                "plan": self.rng.choice(PLANS),
                "balance": f"{self.rng.randint(0, 9999)}.{self.rng.randint(0, 99):02d}",
                "active": self.rng.random() < 0.7,
            }
            op = "c" if current is None else "u"
            value = envelope(op, "public.users", self.lsn, after=row)
            self.rows[row_id] = row
        fields = entry_fields({"id": row_id}, value)
        self.entries.append(fields)
        xadd(self.rc, STREAM, fields)

    def run(self, n: int) -> None:
        for _ in range(n):
            self.change(self.rng.randrange(ROWS))

    def replay(self, n: int) -> None:
        for fields in self.rng.sample(self.entries, min(n, len(self.entries))):
            xadd(self.rc, STREAM, fields)

    def truncated(self) -> None:
        self.rows = {}

    def expected(self) -> dict[str, Any]:
        """What the rules hold for the newest rows (a feed's entries sorted: their order
        depends on which changes applied before which, tests/test_types.py checks it)."""
        state = expected_state(self.rows)
        for row_id, row in self.rows.items():
            if row is not None:
                state.setdefault(f"{{feeds}}:feed:{row['plan']}", []).append(str(row_id))
                state[f"{{names}}:name:{row['name']}"] = str(row_id)
        for key, value in state.items():
            if key.startswith("{feeds}:"):
                value.sort()
        return state


def expected_state(rows: dict[int, dict[str, Any] | None]) -> dict[str, Any]:
    """What the hash, set and sorted-set rules hold for ``rows``."""
    state: dict[str, Any] = {}
    plans: dict[str, set[str]] = {}
    balances: dict[str, float] = {}
    for row_id, row in rows.items():
        if row is None:
            continue
        state[f"user:{row_id}"] = {
            k: ("true" if v is True else "false" if v is False else str(v)) for k, v in row.items()
        }
        plans.setdefault(f"{{plans}}:plan:{row['plan']}:users", set()).add(str(row_id))
        if row["active"]:
            balances[f"user:{row_id}"] = float(row["balance"])
    state.update(plans)
    if balances:
        state["balances"] = balances
    return state


def actual_state(rc: Client) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for raw in rc.scan_iter(count=1000):
        key = as_str(raw)
        if key.startswith("streamsync:") or key.startswith("app."):
            continue
        kind = as_str(rc.type(key))
        if kind == "hash":
            state[key] = {as_str(k): as_str(v) for k, v in rc.hgetall(key).items()}
        elif kind == "set":
            state[key] = {as_str(m) for m in rc.smembers(key)}
        elif kind == "zset":
            state[key] = {m.decode(): s for m, s in zscores(rc, key).items()}
        elif kind == "list":
            state[key] = sorted(as_str(v) for v in rc.lrange(key, 0, -1))
        elif kind == "string":
            state[key] = as_str(rc.get(key))
        else:
            state[key] = kind
    return state


def run_workers(cfg: Path, names: list[str]) -> list[Worker]:
    workers = [Worker(load_settings(cfg, environ={}), consumer=n, drain=True) for n in names]
    threads = [threading.Thread(target=w.run) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a worker did not drain in time"
    return workers


def drained(rc: Client) -> bool:
    """Every entry read by the group and acknowledged (trimming leaves XINFO's lag unknown)."""
    groups = rc.xinfo_groups(STREAM)
    last = rc.xinfo_stream(STREAM)["last-generated-id"]
    return bool(groups) and groups[0]["pending"] == 0 and groups[0]["last-delivered-id"] == last


def test_workload_across_slots_with_two_workers_replays_and_a_truncate(
    cluster: Cluster, tmp_path: Path
) -> None:
    rc = cluster.client()
    cfg = write_config(tmp_path / "c.yaml", cluster.url, streams=[STREAM], rules=RULES)
    source = Source(rc, seed=7)
    source.run(3000)
    source.replay(800)  # Debezium re-sends a range: older positions, shuffled
    workers = run_workers(cfg, ["w1", "w2"])
    assert drained(rc)
    expected = source.expected()
    assert actual_state(rc) == expected
    keys = StateKeys(cluster=True)
    for feed in (k for k in expected if k.startswith("{feeds}:")):
        # the order record parallels the list, in the list's slot
        assert rc.llen(keys.order(feed)) == rc.llen(feed) > 0
    slots = {rc.keyslot(k) for k in expected}
    assert len({rc.nodes_manager.get_node_from_slot(s).name for s in slots}) == 3
    assert not rc.exists(STREAM + ":dlq")
    applied = [n for w in workers for (_, _, _, o), n in w.counts.items() if o == "applied"]
    assert all(applied) and len(applied) >= 2  # both workers took a share
    # every primary holds the library
    for node in cluster.nodes:
        assert node.client().fcall_ro("streamsync_version", 0) is not None
    # a TRUNCATE empties every structure, on every node, and new rows come after it
    source.lsn += 8
    xadd(rc, STREAM, entry_fields(None, envelope("t", "public.users", source.lsn)))
    source.truncated()
    source.run(50)
    run_workers(cfg, ["w1"])
    assert actual_state(rc) == source.expected()


@pytest.mark.timeout(300)
def test_a_primary_restarted_and_a_library_lost_mid_run(cluster: Cluster, tmp_path: Path) -> None:
    rc = cluster.client()
    cfg = write_config(
        tmp_path / "c.yaml", cluster.url, streams=[STREAM], rules=RULES, batch_size=50
    )
    source = Source(rc, seed=11)
    source.run(2000)
    settings = load_settings(cfg, environ={})
    workers = [Worker(settings, consumer=f"w{i}") for i in range(2)]
    threads = [threading.Thread(target=w.run) for w in workers]
    for t in threads:
        t.start()
    try:
        victim = cluster.nodes[1]
        wait_until(
            lambda: any((g["entries-read"] or 0) > 300 for g in rc.xinfo_groups(STREAM)),
            timeout=60,
            message="the workers to be applying",
        )
        victim.kill()
        victim.restart()
        wait_until(cluster.ok, timeout=60, message="the cluster to recover")
        source.run(500)
        # a primary that lost the library (restarted without persistence): reloaded on demand
        cluster.nodes[2].client().function_flush()
        source.run(500)
        wait_until(lambda: drained(rc), timeout=120, message="the workers to drain")
    finally:
        for w in workers:
            w.request_stop()
        for t in threads:
            t.join(timeout=30)
    assert actual_state(rc) == source.expected()
    assert not rc.exists(STREAM + ":dlq")
    assert sum(w.reconnects for w in workers) >= 1


def with_target(cfg: Path, url: str) -> Path:
    data = yaml.safe_load(cfg.read_text())
    data["target"] = {"url": url}
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def test_the_cache_in_a_cluster_and_the_streams_in_a_server(
    cluster: Cluster, r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    rc = cluster.client()
    cfg = write_config(tmp_path / "c.yaml", redis_url, streams=[STREAM], rules=RULES)
    with_target(cfg, cluster.url)
    source = Source(r, seed=5)
    source.run(1500)
    source.replay(300)
    run_workers(cfg, ["w1", "w2"])
    assert drained(r)
    expected = source.expected()
    assert actual_state(rc) == expected
    assert len({rc.nodes_manager.get_node_from_slot(rc.keyslot(k)).name for k in expected}) == 3
    assert not any(as_str(k).startswith(("user:", "streamsync:pos:")) for k in r.keys("*"))
    # a TRUNCATE sweeps the cluster's per-slot indexes
    source.lsn += 8
    xadd(r, STREAM, entry_fields(None, envelope("t", "public.users", source.lsn)))
    source.rows = {}
    source.run(50)
    run_workers(cfg, ["w1"])
    assert actual_state(rc) == source.expected()


def test_the_streams_in_a_cluster_and_the_cache_in_a_server(
    cluster: Cluster, r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    rc = cluster.client()
    rules = [RULES[0], RULES[1] | {"key": "plan:{plan}:users"}, RULES[2]]
    cfg = write_config(tmp_path / "c.yaml", cluster.url, streams=[STREAM], rules=rules)
    with_target(cfg, redis_url)
    source = Source(rc, seed=9)
    source.run(1500)
    source.replay(300)
    run_workers(cfg, ["w1", "w2"])
    assert drained(rc)
    expected = {k.replace("{plans}:", ""): v for k, v in expected_state(source.rows).items()}
    assert actual_state(r) == expected
    assert rc.xlen(STREAM) < 1800  # trimmed in the cluster, by the library loaded there
    assert not any(as_str(k).startswith(("user:", "streamsync:pos:")) for k in rc.keys("*"))


def test_a_set_rule_must_pin_its_slot_in_a_cluster() -> None:
    rule = RULES[1] | {"key": "plan:{plan}:users"}
    settings = load_settings_from_rules([rule])
    with pytest.raises(ConfigError, match="hash tag"):
        Planner.from_settings(settings, cluster=True)


def test_a_key_over_a_non_key_column_must_pin_its_slot_in_a_cluster() -> None:
    rule = RULES[4] | {"key": "name:{name}"}
    planner = Planner.from_settings(load_settings_from_rules([rule]), cluster=True)
    event = ChangeEvent("c", "public.users", "1", None, {"id": 1, "name": "a"}, None, {"id": 1})
    with pytest.raises(PoisonEntryError, match="hash tag"):
        planner.plan(event)


def load_settings_from_rules(rules: list[dict[str, Any]]) -> Any:
    return parse_settings({"source": {"streams": [STREAM]}, "rules": rules})


def test_redisjson_documents_in_a_cluster(r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    c = Cluster(tmp_path / "cluster", modules=[rejson_module()])
    try:
        c.start()
        rc = c.client()
        rules = [{"table": "public.users", "key": "user:{id}", "type": "json"}]
        cfg = with_target(
            write_config(tmp_path / "c.yaml", redis_url, streams=[STREAM], rules=rules), c.url
        )
        source = Source(r, seed=9)
        source.run(1200)
        source.replay(300)
        run_workers(cfg, ["w1", "w2"])
        assert drained(r)
        expected = {f"user:{i}": row for i, row in source.rows.items() if row is not None}
        keys = sorted(as_str(k) for k in rc.scan_iter(match="user:*", count=1000))
        assert keys == sorted(expected)
        for key, row in expected.items():
            assert rc.type(key) == b"ReJSON-RL"
            assert orjson.loads(rc.execute_command("JSON.GET", key)) == row
        assert len({rc.nodes_manager.get_node_from_slot(rc.keyslot(k)).name for k in keys}) == 3
        # a TRUNCATE sweeps every node
        source.lsn += 8
        xadd(r, STREAM, entry_fields(None, envelope("t", "public.users", source.lsn)))
        run_workers(cfg, ["w1"])
        assert not list(rc.scan_iter(match="user:*", count=1000))
    finally:
        c.stop()


def test_nested_documents_in_a_cluster(
    cluster: Cluster, r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    rc = cluster.client()
    rules: list[dict[str, Any]] = [
        {"table": "public.orders", "key": "{{orders}}:order:{id}", "type": "json"},
        {
            "table": "public.order_items",
            "type": "json",
            "nest": {
                "parent_key": "{{orders}}:order:{order_id}",
                "path": "items",
                "member": "{id}",
            },
            "fields": ["id", "qty"],
        },
    ]
    streams = ["app.public.orders", "app.public.order_items"]
    cfg = with_target(
        write_config(tmp_path / "c.yaml", redis_url, streams=streams, rules=rules), cluster.url
    )
    rng = random.Random(3)
    orders: dict[int, dict[str, Any] | None] = {}
    items: dict[int, dict[str, Any]] = {}
    sent: list[tuple[str, dict[str, str]]] = []
    lsn = 1000

    def send(table: str, op: str, key: int, row: dict[str, Any] | None) -> None:
        nonlocal lsn
        lsn += 8
        value = envelope(op, table, lsn, after=row, before=None if row else {"id": key})
        sent.append((f"app.{table}", entry_fields({"id": key}, value)))

    for step in range(400):
        oid, iid = rng.randrange(10), rng.randrange(30)
        if orders.get(oid) is None:
            orders[oid] = {"id": oid, "n": step}
            send("public.orders", "c", oid, orders[oid])
        elif step % 7 == 0:
            orders[oid] = None
            send("public.orders", "d", oid, None)
            for gone in [i for i, it in items.items() if it["order_id"] == oid]:
                del items[gone]
                send("public.order_items", "d", gone, None)
        else:
            op = "u" if iid in items else "c"
            items[iid] = {"id": iid, "order_id": oid, "qty": step}
            send("public.order_items", op, iid, items[iid])
    replays = rng.sample(sent, 150)
    for stream, fields in sent + replays:
        xadd(r, stream, fields)
    run_workers(cfg, ["w1", "w2"])
    for oid in range(10):
        key = f"{{orders}}:order:{oid}"
        text = rc.get(key)
        row = orders.get(oid)
        if row is None:
            assert text is None, key
            continue
        want: dict[str, Any] = dict(row)
        children = {
            str(i): {"id": i, "qty": it["qty"]} for i, it in items.items() if it["order_id"] == oid
        }
        if children:
            want["items"] = children
        assert text is not None and orjson.loads(text) == want, key


def test_status_reads_every_node(cluster: Cluster, tmp_path: Path) -> None:
    rc = cluster.client()
    nodes = {node.name: node.redis_connection for node in rc.get_primaries()}

    def owner(key: str) -> str:
        return str(rc.nodes_manager.get_node_from_slot(rc.keyslot(key)).name)

    # two streams on every primary, each with changes and a dead letter
    streams: list[str] = []
    for k in range(200):
        name = f"app.public.t{k}"
        if sum(owner(s) == owner(name) for s in streams) < 2:
            streams.append(name)
    assert len(streams) == 6 and {owner(s) for s in streams} == set(nodes)
    rules = [
        {"table": s.removeprefix("app."), "key": s.removeprefix("app.public.") + ":{id}"}
        | {"type": "hash"}
        for s in streams
    ]
    cfg = write_config(tmp_path / "c.yaml", cluster.url, streams=streams, rules=rules, trim=False)
    for stream, rule in zip(streams, rules, strict=True):
        for i in range(5):
            value = envelope("c", rule["table"], 1000 + i, after={"id": i, "v": i})
            xadd(rc, stream, entry_fields({"id": i}, value))
        xadd(rc, stream, {"value": "not json"})  # a dead letter
    run_workers(cfg, ["w1"])
    settings = load_settings(cfg, environ={})
    report = status.collect(rc, settings)
    # every stream, on whatever node holds it, as that node tells it
    assert sorted(s.name for s in report.streams) == sorted(streams)
    for s in report.streams:
        node = nodes[owner(s.name)]
        assert s.length == node.xlen(s.name) == 6
        assert s.dlq_length == nodes[owner(s.name + ":dlq")].xlen(s.name + ":dlq") == 1
        assert s.pending == 0
    # per node: memory, evictions and library read on each one
    assert [n.node for n in report.nodes] == sorted(nodes)
    for each in report.nodes:
        info = nodes[each.node].info()
        assert each.memory is not None
        assert each.memory.maxmemory_policy == info["maxmemory_policy"]
        assert each.memory.evicted_keys == info["evicted_keys"]
        assert each.library.loaded == report.library.shipped
    assert report.memory is not None
    assert report.memory.used_memory_bytes == sum(
        each.memory.used_memory_bytes for each in report.nodes if each.memory
    )
    found = status.problems(report, status.Thresholds())
    assert len(found) == 6 and all("1 dead letter" in p for p in found), found
    # a node that lost the library is named
    lost = sorted(nodes)[1]
    nodes[lost].function_delete("streamsync")
    found = status.problems(status.collect(rc, settings), status.Thresholds())
    assert [p for p in found if "library" in p] == [
        f"node {lost}: Functions library streamsync not loaded in Redis (a worker loads"
        f" {report.library.shipped} when it starts)"
    ]
    # the command, as an operator runs it against any node's URL
    run = subprocess.run(
        [sys.executable, "-m", "streamsync", "status", "-c", str(cfg), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == ExitCode.UNHEALTHY, run.stderr
    doc = json.loads(run.stdout)
    assert [n["node"] for n in doc["nodes"]] == sorted(nodes)
    assert sorted(s["name"] for s in doc["streams"]) == sorted(streams)


def test_metrics_gauges_of_every_node(cluster: Cluster, tmp_path: Path) -> None:
    rc = cluster.client()
    nodes = {node.name: node.redis_connection for node in rc.get_primaries()}
    streams = [f"app.public.t{k}" for k in range(12)]
    rules: list[dict[str, Any]] = [
        {"table": s.removeprefix("app."), "key": s.removeprefix("app.public.") + ":{id}"}
        | {"type": "hash"}
        for s in streams
    ]
    cfg = write_config(tmp_path / "c.yaml", cluster.url, streams=streams, rules=rules, trim=False)
    for stream, rule in zip(streams, rules, strict=True):
        value = envelope("c", rule["table"], 1000, after={"id": 1})
        xadd(rc, stream, entry_fields({"id": 1}, value))
        xadd(rc, stream, {"value": "not json"})
    run_workers(cfg, ["w1"])
    registry = CollectorRegistry()
    collector = RedisCollector(load_settings(cfg, environ={}))
    registry.register(collector)
    try:
        for stream in streams:
            assert registry.get_sample_value("streamsync_stream_length", {"stream": stream}) == 2
            assert registry.get_sample_value("streamsync_dlq_length", {"stream": stream}) == 1
            assert registry.get_sample_value("streamsync_pending_entries", {"stream": stream}) == 0
        # the server-wide gauges per primary, each as that node tells it
        for name, node in nodes.items():
            labels = {"redis": f"streams@{name}"}
            maxmemory = registry.get_sample_value("streamsync_redis_maxmemory_bytes", labels)
            assert maxmemory == float(node.info("memory")["maxmemory"])
            version = registry.get_sample_value(
                "streamsync_library_loaded_info",
                {**labels, "version": ".".join(map(str, library_version() or ()))},
            )
            assert version == 1
        assert registry.get_sample_value("streamsync_redis_up", {"redis": "streams"}) == 1
    finally:
        collector.close()


def test_dead_letters_of_every_node(cluster: Cluster, tmp_path: Path) -> None:
    rc = cluster.client()
    nodes = {node.name: node.redis_connection for node in rc.get_primaries()}
    # a stream per table, some of its entries dead-lettered (no rule maps it yet), on every node
    streams = [f"app.public.t{k}" for k in range(9)]
    mapped = streams[:1]

    def config(name: str, tables: list[str]) -> Path:
        rules: list[dict[str, Any]] = [
            {"table": s.removeprefix("app."), "key": s.removeprefix("app.public.") + ":{id}"}
            | {"type": "hash"}
            for s in tables
        ]
        return write_config(tmp_path / name, cluster.url, streams=streams, rules=rules)

    broken, fixed = config("broken.yaml", mapped), config("fixed.yaml", streams)
    for k, stream in enumerate(streams):
        value = envelope("c", stream.removeprefix("app."), 1000 + k, after={"id": k, "v": k})
        xadd(rc, stream, entry_fields({"id": k}, value))
    run_workers(broken, ["w1"])
    dlqs = [s + ":dlq" for s in streams[1:]]
    owners = {rc.nodes_manager.get_node_from_slot(rc.keyslot(d)).name for d in dlqs}
    assert owners == set(nodes), "dead letters on every node"
    runner = CliRunner(env={"STREAMSYNC_REDIS_URL": None})
    listed = runner.invoke(cli, ["dlq", "list", "-c", str(fixed)], catch_exceptions=False)
    assert listed.exit_code == 0, listed.output
    for stream in streams[1:]:
        assert stream in listed.stdout
    # replayed through their streams (half), or applied directly (the rest)
    for k, stream in enumerate(streams[1:], start=1):
        how = ["--direct"] if k % 2 else []
        replay = ["dlq", "replay", "-c", str(fixed), "--stream", stream, "--all", *how]
        result = runner.invoke(cli, replay, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert rc.xlen(stream + ":dlq") == 0
    run_workers(fixed, ["w1"])
    for k, stream in enumerate(streams):
        assert rc.hgetall(f"{stream.removeprefix('app.public.')}:{k}") == {
            b"id": str(k).encode(),
            b"v": str(k).encode(),
        }


def test_resync_on_a_cluster(cluster: Cluster, tmp_path: Path) -> None:
    rc = cluster.client()
    tables = [f"public.t{k}" for k in range(3)]
    streams = [f"app.{t}" for t in tables]
    rules: list[dict[str, Any]] = [
        {"table": t, "key": t.removeprefix("public.") + ":{id}", "type": "hash"} for t in tables
    ]
    cfg = write_config(tmp_path / "c.yaml", cluster.url, streams=streams, rules=rules)
    epochs = [
        StateKeys.from_settings(load_settings(cfg, environ={}).worker).epochs_of(s, True)
        for s in streams
    ]
    assert len({rc.keyslot(e) for e in epochs}) == 3  # each beside its stream
    for stream, table in zip(streams, tables, strict=True):
        for i in range(4):
            value = envelope("c", table, 9000 + i, after={"id": i, "v": "old"})
            xadd(rc, stream, entry_fields({"id": i}, value))
    run_workers(cfg, ["w1"])
    runner = CliRunner(env={"STREAMSYNC_REDIS_URL": None})
    start = runner.invoke(cli, ["resync", "-c", str(cfg), "--all"], catch_exceptions=False)
    assert start.exit_code == 0, start.output
    for stream, key in zip(streams, epochs, strict=True):
        assert rc.hget(key, stream) is not None and rc.keyslot(key) == rc.keyslot(stream)
    # a restored database: its snapshot reads carry lower positions, and row 3 is gone
    for stream, table in zip(streams, tables, strict=True):
        for i in range(3):
            value = envelope("r", table, 100, after={"id": i, "v": "restored"}, snapshot="true")
            xadd(rc, stream, entry_fields({"id": i}, value))
    run_workers(cfg, ["w1", "w2"])
    finish = runner.invoke(
        cli, ["resync", "-c", str(cfg), "--all", "--finish"], catch_exceptions=False
    )
    assert finish.exit_code == 0, finish.output
    for table in tables:
        name = table.removeprefix("public.")
        for i in range(3):
            assert rc.hgetall(f"{name}:{i}") == {b"id": str(i).encode(), b"v": b"restored"}
        assert not rc.exists(f"{name}:3")
