"""``streamsync demo``: the scripted changes reach Redis, and it cleans up after itself."""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis

from tests.prerequisites import postgres_missing, require
from tests.servers import PostgresServer

#: the demo needs the embedded extra and Java 17+ (skipped without, failed under CI)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.usefixtures("embedded_engine"),
]


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamsync", "demo", "--once", "--pace", "0", *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_demo_on_its_own_servers() -> None:
    require(postgres_missing())
    proc = run_demo()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Every row of the table matches its Redis key." in proc.stdout
    assert "DELETE carol" in proc.stdout
    assert "demo failed" not in proc.stdout


def test_demo_on_given_servers_leaves_nothing_behind(
    postgres_server: PostgresServer, pg_db: str, redis_url: str, r: redis.Redis
) -> None:
    r.set("my:own:key", "untouched")
    proc = run_demo("--postgres-url", postgres_server.url_for(pg_db), "--redis-url", redis_url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Every row of the table matches its Redis key." in proc.stdout
    # the user's data is untouched, the demo's is gone
    assert r.get("my:own:key") == b"untouched"
    assert sorted(r.keys("*")) == [b"my:own:key"]
    schemas = postgres_server.execute(
        "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'streamsync_demo%'", dbname=pg_db
    )
    assert schemas == []
    slots = postgres_server.execute(
        "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (pg_db,)
    )
    assert slots == []
