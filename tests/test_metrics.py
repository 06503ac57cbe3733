"""Prometheus metrics on a real redis-server: the worker's counters and histograms against
worker.counts and what Redis holds, the scrape-time Redis gauges, the HTTP endpoint (checked by
promtool and scraped by a real Prometheus), and the monitoring/ files (Prometheus config, Grafana
provisioning and dashboard)."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from streamsync import __version__
from streamsync.config import Settings, load_settings, parse_settings
from streamsync.embedded.sandbox import die_with_parent_hook
from streamsync.errors import ExitCode
from streamsync.functions import ensure_library, library_version
from streamsync.keys import DLQ_SUFFIX
from streamsync.metrics import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    LAG_BUCKETS,
    RedisCollector,
    WorkerMetrics,
    serve,
)
from streamsync.worker import Worker
from tests.debezium import add_change, write_config
from tests.prerequisites import binary_missing, require
from tests.servers import free_port, wait_until

ROOT = Path(__file__).parent.parent
MONITORING = ROOT / "monitoring"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
GRAFANA = MONITORING / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "streamsync.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "streamsync.yml"
COMPOSE_FILE = ROOT / "docker-compose.yml"

STREAM = "app.public.users"
GROUP = "streamsync"
LABELS = {"stream", "table", "op", "outcome", "redis"}
INFO_LABELS = {"version", "library_version", "redis"}
#: The label of the server-wide figures of the Redis of redis.url.
STREAMS = {"redis": "streams"}
INSTALL_HINT = "apt-get install -y --no-install-recommends prometheus"
#: Seconds a started Prometheus has to answer, and then to have scraped the endpoint.
PROMETHEUS_DEADLINE_S = 60.0


# ---------------------------------------------------------------------------------------------
# Helpers


def settings_for(tmp_path: Path, url: str, **worker: Any) -> Settings:
    return load_settings(write_config(tmp_path / "c.yaml", url, **worker), environ={})


def run_drain(settings: Settings, metrics: WorkerMetrics, consumer: str = "w1") -> Worker:
    worker = Worker(settings, consumer, drain=True, observer=metrics)
    assert worker.run() == ExitCode.OK
    return worker


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def event(registry: CollectorRegistry, stream: str, table: str, op: str, outcome: str) -> Any:
    labels = {"stream": stream, "table": table, "op": op, "outcome": outcome}
    return registry.get_sample_value("streamsync_events_total", labels)


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample called ``name``: its sorted labels -> its value."""
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == name
    }


def sample_names(families: list[Metric]) -> set[str]:
    """The sample names the families expose, samples or not (Prometheus's metric names)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("_count", "_sum", "_created"),
        "info": ("_info",),
        "gauge": ("",),
    }
    return {family.name + suffix for family in families for suffix in suffixes[family.type]}


def defined_families() -> list[Metric]:
    """Every family metrics.py defines: the worker's and the Redis collector's."""
    registry = CollectorRegistry()
    WorkerMetrics(registry)
    families = list(registry.collect())
    # describe() queries nothing: the client connects on its first command only
    settings = parse_settings(
        {
            "redis": {"url": f"redis://127.0.0.1:{free_port()}/0"},
            "source": {"streams": [STREAM]},
            "rules": [{"table": "public.users", "key": "user:{id}", "type": "hash"}],
        }
    )
    collector = RedisCollector(settings)
    families += collector.describe()
    collector.close()
    return families


def tool(name: str) -> str:
    """The path of a binary of Debian's prometheus package; skip (fail under CI) without it."""
    require(binary_missing(name, INSTALL_HINT))
    path = shutil.which(name)
    assert path is not None
    return path


def fetch(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        assert response.status == 200
        text: str = response.read().decode()
        return text


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> WorkerMetrics:
    return WorkerMetrics(registry)


@pytest.fixture
def collector(redis_url: str, tmp_path: Path) -> Iterator[RedisCollector]:
    c = RedisCollector(settings_for(tmp_path, redis_url))
    yield c
    c.close()


class _Frozen:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def scrape(collector: RedisCollector) -> CollectorRegistry:
    """One scrape of Redis, kept: a registry whose every read returns what that scrape found."""
    registry = CollectorRegistry()
    registry.register(_Frozen(list(collector.collect())))
    return registry


def live(collector: RedisCollector) -> CollectorRegistry:
    """A registry holding the collector alone: every read of it scrapes Redis again."""
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


# ---------------------------------------------------------------------------------------------
# The worker's metrics


def test_counters_and_histograms_match_worker_counts_and_redis(
    r: redis.Redis, redis_url: str, tmp_path: Path, registry: CollectorRegistry
) -> None:
    metrics = WorkerMetrics(registry)
    for i in range(1, 6):
        add_change(r, STREAM, "c", {"id": i, "name": f"v{i}"}, lsn=100 + i)
    add_change(r, STREAM, "u", {"id": 1, "name": "old"}, lsn=50)  # stale
    add_change(r, STREAM, "d", {"id": 2}, lsn=200)
    r.xadd(STREAM, {'{"id":9}': "not json"})  # dead-lettered at once
    r.xadd(STREAM, {"a": "1", "b": "2"})  # dead-lettered at once
    worker = run_drain(settings_for(tmp_path, redis_url), metrics)

    # streamsync_events_total is worker.counts, label for label
    exported = samples(registry, "streamsync_events_total")
    expected = {
        (("op", op), ("outcome", outcome), ("stream", stream), ("table", table)): float(n)
        for (stream, table, op, outcome), n in worker.counts.items()
        if outcome != "claimed"
    }
    assert exported == expected
    assert worker.counts[(STREAM, "public.users", "c", "applied")] == 5
    # ... and Redis's truth
    assert len(r.keys("user:*")) == 4
    dlq_len = r.xlen(STREAM + DLQ_SUFFIX)
    assert dlq_len == 2
    assert value(registry, "streamsync_dead_lettered_total", stream=STREAM) == dlq_len
    dead = sum(n for (_, _, _, o), n in worker.counts.items() if o == "dead_lettered")
    assert dead == dlq_len
    assert int(r.xpending(STREAM, GROUP)["pending"]) == 0
    assert value(registry, "streamsync_reconnects_total") == worker.reconnects == 0
    assert value(registry, "streamsync_reclaimed_total", stream=STREAM) is None

    # every entry that reached a function call was in exactly one observed batch, and had a lag
    applied = sum(n for (_, _, _, o), n in worker.counts.items() if o in ("applied", "stale"))
    assert applied == 7
    rounds = value(registry, "streamsync_batch_entries_count")
    assert rounds is not None and rounds >= 1
    assert value(registry, "streamsync_batch_entries_sum") == applied
    assert value(registry, "streamsync_batch_rows_sum") == applied
    assert value(registry, "streamsync_apply_duration_seconds_count") == rounds
    duration = value(registry, "streamsync_apply_duration_seconds_sum")
    assert duration is not None and duration > 0
    # the sync lag is measured on applied changes only: a stale replay says nothing of it
    fresh = sum(n for (_, _, _, o), n in worker.counts.items() if o == "applied")
    assert value(registry, "streamsync_sync_lag_seconds_count") == fresh == len(worker.commit_lag)
    assert value(registry, "streamsync_sync_lag_seconds_bucket", le="+Inf") == fresh
    lag_sum = value(registry, "streamsync_sync_lag_seconds_sum")
    assert lag_sum is not None and 0 <= lag_sum < 60 * applied
    shipped = ".".join(map(str, library_version()))
    info = value(registry, "streamsync_build_info", version=__version__, library_version=shipped)
    assert info == 1


def test_reclaimed_entries_count_once_as_reclaimed(
    r: redis.Redis, redis_url: str, tmp_path: Path, metrics: WorkerMetrics
) -> None:
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    for i in range(1, 4):
        add_change(r, STREAM, "c", {"id": i, "name": "x"}, lsn=i)
    # a worker that read two entries and crashed: the survivor takes them over once idle
    r.xreadgroup(GROUP, "crashed", {STREAM: ">"}, count=2)
    add_change(r, STREAM, "c", {"id": 4, "name": "x"}, lsn=4)
    worker = run_drain(settings_for(tmp_path, redis_url), metrics)
    registry = metrics.registry
    claimed = worker.counts[(STREAM, "", "", "claimed")]
    assert claimed == 2
    assert value(registry, "streamsync_reclaimed_total", stream=STREAM) == claimed
    # a reclaim is not an outcome: the claimed entries count under events once, when applied
    assert event(registry, STREAM, "", "", "claimed") is None
    assert event(registry, STREAM, "public.users", "c", "applied") == 4
    assert len(r.keys("user:*")) == 4


def test_reconnects_are_counted(
    r: redis.Redis, redis_url: str, tmp_path: Path, metrics: WorkerMetrics
) -> None:
    worker = Worker(settings_for(tmp_path, redis_url), "w1", observer=metrics)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: r.exists(STREAM) == 1, message="the worker created its group")
        wait_until(lambda: any(b"streamsync:w1" in c for c in _client_names(r)))
        r.client_kill_filter(_type="normal", skipme=True)
        wait_until(
            lambda: value(metrics.registry, "streamsync_reconnects_total") == 1,
            message="a reconnect counted",
        )
        # it is connected again, and applies
        add_change(r, STREAM, "c", {"id": 1, "name": "after"}, lsn=1)
        wait_until(lambda: r.exists("user:1") == 1, message="applied after the reconnect")
    finally:
        worker.request_stop()
        thread.join(10)
    assert not thread.is_alive()
    assert value(metrics.registry, "streamsync_reconnects_total") == worker.reconnects


def _client_names(r: redis.Redis) -> list[bytes]:
    return [c.get("name", "").encode() for c in r.client_list()]


def test_observer_calls_map_to_metrics(metrics: WorkerMetrics) -> None:
    registry = metrics.registry
    metrics.counted("s", "public.t", "u", "dead_lettered", 3)
    metrics.counted("s", "", "", "claimed", 5)
    metrics.counted("s", "public.t", "u", "failed", 1)
    metrics.applied_batch(10, 12, 0.004)
    metrics.sync_lag(0.0005)
    metrics.sync_lag(-1.0)  # clocks disagree: never a negative observation
    metrics.sync_lag(120.0)
    metrics.reconnected()
    assert event(registry, "s", "public.t", "u", "dead_lettered") == 3
    assert value(registry, "streamsync_dead_lettered_total", stream="s") == 3
    assert value(registry, "streamsync_reclaimed_total", stream="s") == 5
    assert event(registry, "s", "public.t", "u", "failed") == 1
    assert value(registry, "streamsync_batch_entries_sum") == 10
    assert value(registry, "streamsync_batch_rows_sum") == 12
    assert value(registry, "streamsync_apply_duration_seconds_bucket", le="0.005") == 1
    assert value(registry, "streamsync_sync_lag_seconds_bucket", le="0.001") == 2
    assert value(registry, "streamsync_sync_lag_seconds_bucket", le="60.0") == 2
    assert value(registry, "streamsync_sync_lag_seconds_bucket", le="+Inf") == 3
    assert value(registry, "streamsync_reconnects_total") == 1
    assert LAG_BUCKETS[0] == 0.001 and LAG_BUCKETS[-1] == 60.0


def test_metric_names_and_labels_follow_the_conventions() -> None:
    families = defined_families()
    names = [f.name for f in families]
    assert len(names) == len(set(names))
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    metrics.counted("s", "public.t", "c", "applied", 1)
    metrics.counted("s", "", "", "claimed", 1)
    metrics.counted("s", "public.t", "c", "dead_lettered", 1)
    for family in list(registry.collect()) + families:
        assert family.name.startswith("streamsync_"), family.name
        assert family.documentation, family.name
        for s in family.samples:
            if family.type == "info":
                assert set(s.labels) <= INFO_LABELS, s
            elif not s.name.endswith("_bucket"):
                assert set(s.labels) <= LABELS, s
            if family.type == "counter" and not s.name.endswith("_created"):
                assert s.name.endswith("_total"), s.name
    durations = [f.name for f in families if "duration" in f.name or "lag_seconds" in f.name]
    assert all(n.endswith("_seconds") for n in durations)
    exposed = sample_names(families)
    for name in (
        "streamsync_events_total",
        "streamsync_batch_entries_bucket",
        "streamsync_apply_duration_seconds_bucket",
        "streamsync_sync_lag_seconds_bucket",
        "streamsync_reclaimed_total",
        "streamsync_dead_lettered_total",
        "streamsync_reconnects_total",
        "streamsync_build_info",
        "streamsync_redis_up",
        "streamsync_stream_length",
        "streamsync_pending_entries",
        "streamsync_group_lag_entries",
        "streamsync_dlq_length",
        "streamsync_oldest_pending_age_seconds",
        "streamsync_redis_used_memory_bytes",
        "streamsync_redis_maxmemory_bytes",
        "streamsync_redis_keyspace_hits_total",
        "streamsync_redis_keyspace_misses_total",
        "streamsync_redis_evicted_keys_total",
        "streamsync_library_loaded_info",
    ):
        assert name in exposed, name


# ---------------------------------------------------------------------------------------------
# The Redis collector


def test_collector_reports_what_redis_holds(
    r: redis.Redis, redis_url: str, tmp_path: Path, metrics: WorkerMetrics
) -> None:
    settings = settings_for(tmp_path, redis_url)
    for i in range(1, 4):
        add_change(r, STREAM, "c", {"id": i, "name": "x"}, lsn=i)
    r.xadd(STREAM, {"a": "1", "b": "2"})  # dead-lettered
    run_drain(settings, metrics)
    # after the drain: two entries held by a crashed consumer, one not yet delivered
    held = [add_change(r, STREAM, "c", {"id": i, "name": "y"}, lsn=10 + i) for i in (4, 5)]
    add_change(r, STREAM, "c", {"id": 6, "name": "y"}, lsn=20)
    r.xreadgroup(GROUP, "crashed", {STREAM: ">"}, count=2)
    maxmemory = r.config_get("maxmemory")["maxmemory"]
    r.config_set("maxmemory", str(256 * 1024 * 1024))
    collector = RedisCollector(settings)
    try:
        before = r.info("stats")
        found = scrape(collector)
        after = r.info("stats")
        seconds, micros = r.time()
    finally:
        r.config_set("maxmemory", maxmemory or "0")
        collector.close()
    stream = {"stream": STREAM}
    assert value(found, "streamsync_redis_up", **STREAMS) == 1
    assert value(found, "streamsync_stream_length", **stream) == r.xlen(STREAM)
    assert value(found, "streamsync_pending_entries", **stream) == 2
    assert value(found, "streamsync_group_lag_entries", **stream) == 1
    assert value(found, "streamsync_dlq_length", **stream) == r.xlen(STREAM + DLQ_SUFFIX) == 1
    oldest_ms = int(held[0].split(b"-")[0])
    age = value(found, "streamsync_oldest_pending_age_seconds", **stream)
    assert age is not None
    assert 0 <= age <= (seconds * 1000 + micros / 1000 - oldest_ms) / 1000 + 0.001
    used = value(found, "streamsync_redis_used_memory_bytes", **STREAMS)
    assert used is not None and used > 0
    assert value(found, "streamsync_redis_maxmemory_bytes", **STREAMS) == 256 * 1024 * 1024
    for counter in ("hits", "misses"):
        got = value(found, f"streamsync_redis_keyspace_{counter}_total", **STREAMS)
        assert got is not None
        assert before[f"keyspace_{counter}"] <= got <= after[f"keyspace_{counter}"]
    version = ".".join(map(str, library_version()))
    assert value(found, "streamsync_library_loaded_info", version=version, **STREAMS) == 1


def test_collector_without_a_group_library_or_lag(
    r: redis.Redis, redis_url: str, collector: RedisCollector
) -> None:
    # nothing yet: the stream, its group and the library are all absent
    found = scrape(collector)
    assert value(found, "streamsync_redis_up", **STREAMS) == 1
    assert value(found, "streamsync_stream_length", stream=STREAM) == 0
    assert value(found, "streamsync_dlq_length", stream=STREAM) == 0
    assert value(found, "streamsync_pending_entries", stream=STREAM) is None
    assert value(found, "streamsync_oldest_pending_age_seconds", stream=STREAM) is None
    assert not samples(found, "streamsync_library_loaded_info")
    # a group, nothing pending, and a deleted entry: Redis cannot tell the lag any more
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    ids = [r.xadd(STREAM, {"k": str(i)}) for i in range(3)]
    r.xdel(STREAM, ids[1])
    ensure_library(r)
    found = scrape(collector)
    assert value(found, "streamsync_pending_entries", stream=STREAM) == 0
    assert value(found, "streamsync_oldest_pending_age_seconds", stream=STREAM) == 0
    assert r.xinfo_groups(STREAM)[0]["lag"] is None
    assert value(found, "streamsync_group_lag_entries", stream=STREAM) is None
    assert len(samples(found, "streamsync_library_loaded_info")) == 1


def test_collector_discovers_streams_by_prefix(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.yaml", redis_url)
    data = yaml.safe_load(cfg.read_text())
    data["source"] = {"stream_prefix": "app.", "group": GROUP}
    cfg.write_text(yaml.safe_dump(data))
    for name in ("app.a", "app.b", "app.a" + DLQ_SUFFIX, "other.c"):
        r.xadd(name, {"k": "v"})
    r.set("app.not-a-stream", "x")
    collector = RedisCollector(load_settings(cfg, environ={}))
    try:
        lengths = samples(scrape(collector), "streamsync_stream_length")
    finally:
        collector.close()
    assert lengths == {(("stream", "app.a"),): 1, (("stream", "app.b"),): 1}


def test_scrape_reports_redis_down_without_raising(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    collector = RedisCollector(settings_for(tmp_path, f"redis://127.0.0.1:{port}/0"))
    try:
        start = time.monotonic()
        families = list(collector.collect())
        assert time.monotonic() - start < 2
    finally:
        collector.close()
    found = [(f.name, [s.value for s in f.samples]) for f in families]
    assert found == [("streamsync_redis_up", [0])]


def test_scrape_of_a_hung_redis_times_out(tmp_path: Path) -> None:
    # a socket that accepts connections (the kernel's backlog) and never answers
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        url = f"redis://127.0.0.1:{hung.getsockname()[1]}/0"
        collector = RedisCollector(settings_for(tmp_path, url), timeout_s=0.5)
        try:
            start = time.monotonic()
            found = scrape(collector)
            assert value(found, "streamsync_redis_up", **STREAMS) == 0
            assert time.monotonic() - start < 3
        finally:
            collector.close()


def test_scrape_recovers_when_redis_comes_back(
    r: redis.Redis, redis_url: str, collector: RedisCollector
) -> None:
    registry = live(collector)
    assert value(registry, "streamsync_redis_up", **STREAMS) == 1
    r.client_kill_filter(_type="normal", skipme=True)  # the collector's connection too
    assert value(registry, "streamsync_redis_up", **STREAMS) in (0, 1)
    assert value(registry, "streamsync_redis_up", **STREAMS) == 1


# ---------------------------------------------------------------------------------------------
# The HTTP endpoint


def test_endpoint_serves_what_promtool_accepts(
    r: redis.Redis, redis_url: str, tmp_path: Path, metrics: WorkerMetrics
) -> None:
    promtool = tool("promtool")
    settings = settings_for(tmp_path, redis_url)
    add_change(r, STREAM, "c", {"id": 1, "name": "x"}, lsn=1)
    r.xadd(STREAM, {"a": "1", "b": "2"})
    worker = run_drain(settings, metrics)
    with serve(settings, metrics.registry, port=free_port()) as server:
        text = fetch(server.url)
        openmetrics = urllib.request.Request(
            server.url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        with urllib.request.urlopen(openmetrics, timeout=10) as response:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            assert response.read().decode().endswith("# EOF\n")
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'streamsync_redis_up{redis="streams"} 1.0' in text
    applied = worker.counts[(STREAM, "public.users", "c", "applied")]
    assert (
        'streamsync_events_total{op="c",outcome="applied",stream="app.public.users",'
        f'table="public.users"}} {float(applied)}' in text
    )
    assert f'streamsync_dlq_length{{stream="{STREAM}"}} 1.0' in text
    # never an entry id in a label or a value's name
    assert not re.search(r"\d{10,}-\d+", text)


def test_endpoint_binds_loopback_by_default(redis_url: str, tmp_path: Path) -> None:
    assert inspect.signature(serve).parameters["host"].default == DEFAULT_HOST == "127.0.0.1"
    registry = CollectorRegistry()
    WorkerMetrics(registry)
    with serve(settings_for(tmp_path, redis_url), registry, port=0) as server:
        assert server.httpd.socket.getsockname()[0] == "127.0.0.1"
        assert server.host == "127.0.0.1" and server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        assert "streamsync_build_info" in fetch(server.url)


def test_close_stops_the_endpoint_and_drops_the_collector(
    redis_url: str, tmp_path: Path, metrics: WorkerMetrics
) -> None:
    registry = metrics.registry
    server = serve(settings_for(tmp_path, redis_url), registry, port=0)
    assert value(registry, "streamsync_redis_up", **STREAMS) == 1
    server.close()
    server.close()  # idempotent
    assert not server.thread.is_alive()
    with pytest.raises(urllib.error.URLError):
        fetch(server.url, timeout=2)
    assert value(registry, "streamsync_redis_up", **STREAMS) is None
    assert value(registry, "streamsync_reconnects_total") == 0


def test_a_port_in_use_raises_and_leaves_the_registry_clean(
    redis_url: str, tmp_path: Path, metrics: WorkerMetrics
) -> None:
    settings = settings_for(tmp_path, redis_url)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(OSError):
            serve(settings, metrics.registry, port=taken.getsockname()[1])
    # the collector was unregistered: serving again registers it anew
    with serve(settings, metrics.registry, port=0) as server:
        assert 'streamsync_redis_up{redis="streams"} 1.0' in fetch(server.url)


def test_prometheus_scrapes_the_endpoint_and_evaluates_the_dashboard(
    r: redis.Redis, redis_url: str, tmp_path: Path, metrics: WorkerMetrics
) -> None:
    prometheus = tool("prometheus")
    settings = settings_for(tmp_path, redis_url)
    for i in range(1, 4):
        add_change(r, STREAM, "c", {"id": i, "name": "x"}, lsn=i)
    worker = run_drain(settings, metrics)
    applied = worker.counts[(STREAM, "public.users", "c", "applied")]
    assert applied == 3
    with serve(settings, metrics.registry, port=free_port()) as server:
        api = start_prometheus(prometheus, tmp_path / "prometheus", f"127.0.0.1:{server.port}")
        try:
            found: dict[str, Any] = {}

            def scraped() -> bool:
                result = query(api.url, "streamsync_events_total")
                found.update({s["metric"]["outcome"]: s for s in result})
                return "applied" in found

            wait_until(scraped, timeout=PROMETHEUS_DEADLINE_S, interval=0.5, message="scraped")
            sample = found["applied"]
            assert float(sample["value"][1]) == applied
            assert sample["metric"]["stream"] == STREAM
            assert sample["metric"]["job"] == "streamsync"
            assert float(query(api.url, "streamsync_redis_up")[0]["value"][1]) == 1
            # every dashboard expression is valid PromQL to a real Prometheus
            for expr in dashboard_exprs():
                query(api.url, grafana_to_promql(expr))
        finally:
            api.stop()


class _Prometheus:
    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def start_prometheus(binary: str, workdir: Path, target: str) -> _Prometheus:
    """A Prometheus of the test's own on a free loopback port, scraping ``target`` every second
    with the job name monitoring/prometheus.yml uses."""
    workdir.mkdir()
    config = workdir / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [
                    {"job_name": "streamsync", "static_configs": [{"targets": [target]}]}
                ],
            }
        )
    )
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    api = _Prometheus(process, f"http://127.0.0.1:{port}", log)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"prometheus exited {process.returncode}:\n{log.read_text()}")
        try:
            fetch(api.url + "/-/ready", timeout=2)
        except (urllib.error.URLError, ConnectionError):
            return False
        return True

    try:
        wait_until(ready, timeout=PROMETHEUS_DEADLINE_S, interval=0.2, message="prometheus ready")
    except BaseException:
        api.stop()
        raise
    return api


def query(base: str, promql: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    try:
        body = json.loads(fetch(url))
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{promql}: {exc.read().decode()}") from None
    assert body["status"] == "success", (promql, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result if isinstance(result, list) else []


# ---------------------------------------------------------------------------------------------
# monitoring/: the Prometheus config and the Grafana dashboard

#: PromQL functions and aggregations the dashboard may call.
PROMQL_FUNCTIONS = {
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "topk",
    "bottomk",
    "quantile",
    "rate",
    "irate",
    "increase",
    "delta",
    "histogram_quantile",
    "label_values",
    "clamp_min",
    "clamp_max",
    "abs",
    "vector",
    "time",
    "absent",
}
PROMQL_KEYWORDS = {"by", "without", "and", "or", "unless", "bool", "on", "ignoring", "offset"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'")
_BRACES = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.$])([A-Za-z_:][\w:]*)(\s*\()?")


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    for variable in dashboard().get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            q = variable["query"]
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables replaced as Grafana would, for a Prometheus of its own."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")
    expr = expr.replace("$stream", ".*")
    match = re.fullmatch(r"label_values\((\w+), *\w+\)", expr)
    return match[1] if match else expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects; AssertionError for an unknown function."""
    stripped = _STRING.sub('""', expr)
    stripped = _BRACES.sub("", stripped)
    stripped = _RANGE.sub("", stripped)
    stripped = _GROUPING.sub("", stripped)
    names = set()
    for match in _IDENT.finditer(stripped):
        ident, call = match[1], match[2]
        if call:
            assert ident in PROMQL_FUNCTIONS, f"{expr}: unknown function {ident}"
        elif ident not in PROMQL_KEYWORDS:
            names.add(ident)
    return names


def test_metric_names_finds_the_selected_metrics() -> None:
    expr = (
        'sum by (le, stream) (rate(streamsync_sync_lag_seconds_bucket{stream=~"$stream"}'
        "[$__rate_interval])) / on (stream) max(streamsync_stream_length) > bool 0"
    )
    assert metric_names(expr) == {"streamsync_sync_lag_seconds_bucket", "streamsync_stream_length"}
    assert metric_names("label_values(streamsync_stream_length, stream)") == {
        "streamsync_stream_length",
        "stream",
    }
    with pytest.raises(AssertionError, match="unknown function"):
        metric_names("frobnicate(streamsync_stream_length)")


def test_dashboard_queries_only_metrics_metrics_py_defines() -> None:
    board = dashboard()
    assert board["uid"] == "streamsync" and board["title"]
    exposed = sample_names(defined_families())
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    used: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, f"{panel['title']}: {target['expr']} selects no metric"
            unknown = names - exposed
            assert not unknown, f"{panel['title']}: {target['expr']} names {unknown}"
            used |= names
    for variable in board["templating"]["list"]:
        q = variable["query"]
        names = metric_names(q["query"] if isinstance(q, dict) else q) - LABELS
        assert names and names <= exposed, variable
    titles = " | ".join(p["title"].lower() for p in panels)
    for wanted in (
        "events/s by outcome",
        "sync lag",
        "pending entries",
        "stream length",
        "dlq length",
        "apply duration",
        "reconnects",
        "redis memory",
        "keyspace hit ratio",
        "evicted keys",
    ):
        assert wanted in titles, wanted
    exprs = " ".join(dashboard_exprs())
    for quantile in ("histogram_quantile(0.5,", "histogram_quantile(0.99,"):
        assert f"{quantile} sum by (le) (rate(streamsync_sync_lag_seconds_bucket" in exprs
    assert {
        "streamsync_events_total",
        "streamsync_pending_entries",
        "streamsync_stream_length",
        "streamsync_dlq_length",
        "streamsync_apply_duration_seconds_bucket",
        "streamsync_reconnects_total",
        "streamsync_redis_used_memory_bytes",
        "streamsync_redis_maxmemory_bytes",
        "streamsync_redis_keyspace_hits_total",
        "streamsync_redis_keyspace_misses_total",
        "streamsync_redis_evicted_keys_total",
    } <= used


def test_dashboard_uses_the_provisioned_datasource() -> None:
    datasources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert len(datasources) == 1
    source = datasources[0]
    assert source["type"] == "prometheus"
    assert urllib.parse.urlsplit(source["url"]).hostname == "prometheus"
    board = dashboard()
    refs = [p["datasource"] for p in board["panels"]]
    refs += [t["datasource"] for p in board["panels"] for t in p["targets"] if "datasource" in t]
    refs += [v["datasource"] for v in board["templating"]["list"]]
    assert refs and all(ref == {"type": "prometheus", "uid": source["uid"]} for ref in refs)
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert [p["type"] for p in providers] == ["file"]
    assert Path(providers[0]["options"]["path"]).is_absolute()


def test_prometheus_config_scrapes_every_worker_replica() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    sd = jobs["streamsync"]["dns_sd_configs"]
    assert len(sd) == 1
    assert sd[0]["names"] == ["worker"] and sd[0]["type"] == "A"
    assert sd[0]["port"] == DEFAULT_PORT
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    assert "worker" in compose["services"]


def _compose_services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return services


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path (resolved) of a service's bind mounts."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            found[target] = (ROOT / source).resolve()
    return found


def test_compose_monitoring_profile_uses_these_files() -> None:
    services = _compose_services()
    worker = services["worker"]
    port = str(DEFAULT_PORT)
    assert worker["environment"]["STREAMSYNC_METRICS_PORT"] == port
    assert worker["environment"]["STREAMSYNC_METRICS_HOST"] == "0.0.0.0"
    assert port in [str(p) for p in worker.get("expose", [])]
    assert not worker.get("ports")
    prometheus, grafana = services["prometheus"], services["grafana"]
    for service in (prometheus, grafana):
        assert service["profiles"] == ["monitoring"]
        assert service.get("healthcheck", {}).get("test")
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    assert _mounts(prometheus)[config_flag.partition("=")[2]] == PROMETHEUS_CONFIG.resolve()
    grafana_mounts = _mounts(grafana)
    assert grafana_mounts["/etc/grafana/provisioning"] == (GRAFANA / "provisioning").resolve()
    provider_path = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"][0]["options"]
    assert grafana_mounts[provider_path["path"]] == DASHBOARD.parent.resolve()
    source = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert urllib.parse.urlsplit(source["url"]).port == 9090
    assert any(str(p).endswith(":9090") for p in prometheus.get("ports", []))


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = tool("promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# `streamsync run --metrics-port`


def run_command(cfg: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "streamsync", "run", "-c", str(cfg), "--consumer", "w1", *args]


def test_run_serves_metrics_on_the_port_the_environment_names(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.yaml", redis_url)
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    env = {**os.environ, "STREAMSYNC_METRICS_PORT": str(port)}
    env.pop("STREAMSYNC_METRICS_HOST", None)
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            run_command(cfg),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent_hook(),  # noqa: PLW1509
        )
    try:

        def serving() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the worker exited {proc.returncode}:\n{log.read_text()}")
            try:
                return 'streamsync_redis_up{redis="streams"} 1.0' in fetch(url, timeout=2)
            except (urllib.error.URLError, ConnectionError):
                return False

        wait_until(serving, timeout=30, interval=0.1, message="metrics served")
        add_change(r, STREAM, "c", {"id": 1, "name": "x"}, lsn=1)
        applied = (
            'streamsync_events_total{op="c",outcome="applied",stream="app.public.users",'
            'table="public.users"} 1.0'
        )
        wait_until(lambda: applied in fetch(url), timeout=30, interval=0.1, message="counted")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == ExitCode.OK, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    with pytest.raises(urllib.error.URLError):
        fetch(url, timeout=2)


def test_run_metrics_options(r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", redis_url)
    add_change(r, STREAM, "c", {"id": 1, "name": "x"}, lsn=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSYNC_METRICS_")}
    options = ["--drain", "--metrics-port", str(free_port()), "--metrics-host", "127.0.0.2"]
    drained = subprocess.run(
        run_command(cfg, *options),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert drained.returncode == ExitCode.OK, drained.stderr
    assert "serving metrics at http://127.0.0.2:" in drained.stderr
    assert r.exists("user:1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        refused = subprocess.run(
            run_command(cfg, "--drain", "--metrics-port", str(port)),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert refused.returncode == ExitCode.FAILURE
    assert f"cannot serve metrics on 127.0.0.1:{port}" in refused.stderr
