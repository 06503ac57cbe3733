"""The MariaDB variant of the stack (``docker-compose.mariadb.yml``), validated by parsing (no
Docker engine here) and cross-checked with its Debezium properties, its streamsync
configuration and its init SQL, as ``tests/test_compose.py`` does for the PostgreSQL stack."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from streamsync.cli import cli
from streamsync.config import Settings, StreamFormat, load_settings
from tests.test_compose import (
    REDIS_OFFSET_STORE,
    ROOT,
    container_ports,
    environment,
    host_port,
    mounts,
    property_lines,
    read_properties,
    split_list,
    validated,
)

COMPOSE_FILE = ROOT / "docker-compose.mariadb.yml"
PROPERTIES_FILE = ROOT / "debezium" / "mariadb" / "application.properties"
CONFIG_FILE = ROOT / "streamsync.mariadb.yaml"
REQUIRED_PROPERTIES = {
    "debezium.sink.type": "redis",
    "debezium.source.connector.class": "io.debezium.connector.mariadb.MariaDbConnector",
    "debezium.source.decimal.handling.mode": "string",
    "debezium.source.bigint.unsigned.handling.mode": "precise",
    "debezium.source.tombstones.on.delete": "false",
    "debezium.source.skipped.operations": "none",
    "debezium.source.offset.storage": REDIS_OFFSET_STORE,
    "debezium.source.schema.history.internal": (
        "io.debezium.storage.redis.history.RedisSchemaHistory"
    ),
    "debezium.format.key.schemas.enable": "false",
    "debezium.format.value.schemas.enable": "false",
    "debezium.format.value.replace.null.with.default": "false",
    "debezium.source.poll.interval.ms": "50",
}


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = validated(COMPOSE_FILE)["services"]
    return found


@pytest.fixture(scope="module")
def properties() -> dict[str, str]:
    return read_properties(PROPERTIES_FILE)


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(CONFIG_FILE, environ={})


def test_the_stack_and_its_health(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"mariadb", "redis", "debezium", "worker"}
    for name in ("mariadb", "redis", "debezium"):
        assert services[name].get("healthcheck"), name
    assert services["debezium"]["depends_on"] == {
        "mariadb": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }


def test_mariadb_writes_a_row_binlog_with_full_images(services: dict[str, dict[str, Any]]) -> None:
    command = services["mariadb"]["command"]
    assert any(arg.startswith("--log-bin") for arg in command)
    assert "--binlog-format=ROW" in command and "--binlog-row-image=FULL" in command
    assert any(arg.startswith("--server-id=") for arg in command)


def test_no_property_line_carries_a_comment() -> None:
    for number, raw, key, value in property_lines(PROPERTIES_FILE):
        assert "#" not in value, f"line {number}: '#' in the value of {key}"
        assert raw == raw.rstrip(), f"line {number}: trailing blanks in {key}"


@pytest.mark.parametrize(("key", "expected"), sorted(REQUIRED_PROPERTIES.items()))
def test_debezium_emits_what_the_worker_expects(
    properties: dict[str, str], key: str, expected: str
) -> None:
    assert properties.get(key) == expected


def test_debezium_reads_the_compose_mariadb_as_the_init_sql_user(
    properties: dict[str, str], services: dict[str, dict[str, Any]]
) -> None:
    host = properties["debezium.source.database.hostname"]
    assert host == "mariadb"
    assert int(properties["debezium.source.database.port"]) in container_ports(services[host])
    sql = init_sql(services)
    user, password = (
        properties["debezium.source.database.user"],
        properties["debezium.source.database.password"],
    )
    assert re.search(rf"CREATE USER IF NOT EXISTS '{user}'@'%' IDENTIFIED BY '{password}'", sql)
    grants = re.search(rf"GRANT (.*?) ON \*\.\* TO '{user}'@'%'", sql, re.S)
    assert grants is not None
    for privilege in ("REPLICATION SLAVE", "REPLICATION CLIENT", "BINLOG MONITOR", "SELECT"):
        assert privilege in grants[1]


def test_sink_offsets_and_schema_history_in_the_compose_redis(
    properties: dict[str, str], services: dict[str, dict[str, Any]]
) -> None:
    for key in (
        "debezium.sink.redis.address",
        "debezium.source.offset.storage.redis.address",
        "debezium.source.schema.history.internal.redis.address",
    ):
        host, port = host_port(properties[key])
        assert host == "redis" and port in container_ports(services["redis"]), key


def test_streams_rules_and_tables_agree(
    properties: dict[str, str], settings: Settings, services: dict[str, dict[str, Any]]
) -> None:
    prefix = properties["debezium.source.topic.prefix"]
    tables = split_list(properties["debezium.source.table.include.list"])
    assert settings.source.streams is not None
    # MySQL-family streams are <topic.prefix>.<database>.<table>, rules name <database>.<table>
    assert sorted(settings.source.streams) == sorted(f"{prefix}.{t}" for t in tables)
    assert {rule.table for rule in settings.rules} == set(tables)
    databases = split_list(properties["debezium.source.database.include.list"])
    assert {t.split(".")[0] for t in tables} <= set(databases)
    created = {
        m.lower() for m in re.findall(r"CREATE TABLE IF NOT EXISTS (\w+\.\w+)", init_sql(services))
    }
    assert set(tables) <= created
    assert settings.source.format in (StreamFormat.AUTO, "compact")


def test_workers_run_the_mariadb_configuration(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    config = "/etc/streamsync/streamsync.yaml"
    assert worker["command"] == ["run", "-c", config]
    assert Path(mounts(worker)[config][0]) == CONFIG_FILE
    assert environment(worker)["STREAMSYNC_REDIS_URL"].startswith("redis://redis:6379")
    result = CliRunner().invoke(
        cli, ["check-config", "-c", str(CONFIG_FILE)], env={"STREAMSYNC_REDIS_URL": None}
    )
    assert result.exit_code == 0, result.output


def init_sql(services: dict[str, dict[str, Any]]) -> str:
    scripts = [
        Path(source)
        for target, (source, _) in mounts(services["mariadb"]).items()
        if target.startswith("/docker-entrypoint-initdb.d/")
    ]
    assert scripts, "mariadb mounts no init script"
    return "\n".join(script.read_text(encoding="utf-8") for script in scripts)
