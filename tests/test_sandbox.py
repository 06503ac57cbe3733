"""streamsync.embedded.sandbox's PostgreSQL: it starts, dies, comes back, and cleans up after
itself.

(The Redis launcher is covered by tests/test_servers.py.)
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamsync.embedded.sandbox import find_postgres_bindir
from tests.servers import PostgresServer, PostgresServerError, postgres_dir, wait_until

pytestmark = pytest.mark.usefixtures("postgres_server")  # skips all without PostgreSQL


def _port_accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def pg_dir() -> Iterator[Path]:
    with postgres_dir() as path:
        yield path


def test_bindir_holds_the_server_binaries() -> None:
    bindir = find_postgres_bindir()
    assert os.access(bindir / "postgres", os.X_OK)
    assert os.access(bindir / "initdb", os.X_OK)


def test_start_query_stop(pg_dir: Path) -> None:
    server = PostgresServer(pg_dir / "pg", fsync=False)
    with server:
        assert server.running
        assert server.port != 5432
        assert server.url == f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
        assert server.dsn == f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres"
        settings = dict(
            server.execute(
                "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                (["wal_level", "max_replication_slots", "max_wal_senders", "fsync"],),
            )
        )
        assert settings == {
            "wal_level": "logical",
            "max_replication_slots": "20",
            "max_wal_senders": "20",
            "fsync": "off",
        }
        assert server.execute("SHOW listen_addresses") == [("127.0.0.1",)]
        # the unix socket lives in the data directory, never in /var/run/postgresql
        assert server.execute("SHOW unix_socket_directories") == [(str(server.pgdata),)]
        assert server.execute("CREATE TABLE t (id int)") == []
        assert server.execute("SELECT '100%'") == [("100%",)]
        port, pid = server.port, server.pid
    assert not server.running
    assert not _port_accepts(port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_kill_then_restart_keeps_port_and_committed_data(pg_dir: Path) -> None:
    server = PostgresServer(pg_dir / "pg", fsync=False).start()
    try:
        server.execute("CREATE TABLE t (id int)")
        server.execute("INSERT INTO t VALUES (1), (2)")
        port, old_pid = server.port, server.pid
        server.kill()
        assert not server.running
        assert not _port_accepts(port)
        server.restart()
        assert server.port == port
        assert server.pid != old_pid
        assert server.execute("SELECT count(*) FROM t") == [(2,)]
        server.restart()  # a running server restarts too
        assert server.execute("SELECT count(*) FROM t") == [(2,)]
    finally:
        server.stop()


def test_wal_level_and_fsync_options(pg_dir: Path) -> None:
    with PostgresServer(pg_dir / "pg", wal_level="replica") as server:
        assert server.execute("SHOW wal_level") == [("replica",)]
        assert server.execute("SHOW fsync") == [("on",)]


def test_start_failure_reports_the_log_tail(pg_dir: Path) -> None:
    server = PostgresServer(pg_dir / "pg", settings={"no_such_setting": "1"})
    with pytest.raises(PostgresServerError, match="no_such_setting"):
        server.start(timeout=10)
    assert not server.running


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as another OS user")
def test_a_data_dir_the_postgres_user_cannot_reach_is_named(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    server = PostgresServer(private / "pg")
    with pytest.raises(PostgresServerError, match=f"cannot reach {private / 'pg'}"):
        server.start()


def test_pg_db_is_a_fresh_database(postgres_server: PostgresServer, pg_db: str) -> None:
    assert postgres_server.execute("SELECT current_database()", dbname=pg_db) == [(pg_db,)]
    assert postgres_server.execute(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", dbname=pg_db
    ) == [(0,)]


def test_drop_database_ends_backends_and_drops_slots(postgres_server: PostgresServer) -> None:
    server = postgres_server
    server.create_database("dropme")
    server.execute("CREATE TABLE t (id int PRIMARY KEY)", dbname="dropme")
    server.execute(
        "SELECT pg_create_logical_replication_slot('idle_slot', 'pgoutput')", dbname="dropme"
    )
    server.execute(
        "SELECT pg_create_logical_replication_slot('busy_slot', 'test_decoding')", dbname="dropme"
    )
    # A client still connected, and a walsender streaming from the busy slot.
    conn = server.connect("dropme")
    receiver = subprocess.Popen(
        [
            str(server.bindir / "pg_recvlogical"),
            "--dbname",
            server.dsn_for("dropme"),
            "--slot",
            "busy_slot",
            "--start",
            "--file",
            os.devnull,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: (
                server.execute(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = 'busy_slot'"
                )
                == [(True,)]
            ),
            timeout=10,
            message="the busy slot to be active",
        )
        server.drop_database("dropme")
    finally:
        conn.close()
        receiver.kill()
        receiver.wait(timeout=10)
    assert server.execute("SELECT 1 FROM pg_database WHERE datname = 'dropme'") == []
    assert server.execute("SELECT slot_name FROM pg_replication_slots") == []
