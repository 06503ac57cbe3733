"""The demo stack: docker-compose.yml, Debezium Server's properties, the worker image.

No Docker engine runs here, so docker-compose (v1, the Debian package) validates and normalises the
compose file with ``docker-compose config``, and the tests check that the files which must agree
do: the compose services, debezium/application.properties, streamsync.yaml, the init SQL and the
Dockerfile.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from click.testing import CliRunner

from streamsync.cli import cli
from streamsync.config import REDIS_URL_ENV, Settings, StreamFormat, load_settings
from streamsync.embedded.demo import _Stack, _write_config
from tests.prerequisites import skip_unless_ci

ROOT = Path(__file__).parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROPERTIES_FILE = ROOT / "debezium" / "application.properties"
CONFIG_FILE = ROOT / "streamsync.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

SERVICES = {"postgres", "redis", "debezium", "worker", "prometheus", "grafana"}
DEBEZIUM_CONFIG = "/debezium/config/application.properties"
DEBEZIUM_DATA = "/debezium/data"
WORKER_CONFIG = "/etc/streamsync/streamsync.yaml"
INITDB_DIR = "/docker-entrypoint-initdb.d/"
REDIS_OFFSET_STORE = "io.debezium.storage.redis.offset.RedisOffsetBackingStore"
#: Variables the compose files interpolate (host ports), left to their defaults by the tests.
COMPOSE_VARIABLES = {
    "POSTGRES_PORT",
    "MARIADB_PORT",
    "REDIS_PORT",
    "PROMETHEUS_PORT",
    "GRAFANA_PORT",
}

#: Debezium settings the worker depends on, with the value it needs.
REQUIRED_PROPERTIES = {
    "debezium.sink.type": "redis",
    "debezium.source.connector.class": "io.debezium.connector.postgresql.PostgresConnector",
    "debezium.source.plugin.name": "pgoutput",
    "debezium.source.publication.autocreate.mode": "filtered",
    "debezium.source.decimal.handling.mode": "string",
    # dates and times as ISO-8601 strings, not epoch integers (tests/test_e2e.py: the types test)
    "debezium.source.time.precision.mode": "isostring",
    "debezium.source.tombstones.on.delete": "false",
    "debezium.source.skipped.operations": "none",
    "debezium.source.offset.storage": REDIS_OFFSET_STORE,
    "debezium.format.key.schemas.enable": "false",
    "debezium.format.value.schemas.enable": "false",
    "debezium.format.value.replace.null.with.default": "false",
    # a batch is handed over after at most 50 ms, not 500: it bounds the commit-to-Redis latency
    "debezium.source.poll.interval.ms": "50",
}
#: What ``streamsync demo``'s own properties may leave out: its capture keeps offsets in a file.
DEMO_EXEMPT = {"debezium.source.offset.storage"}

_CREATE_TABLE_RE = re.compile(
    r'\bcreate\s+table\s+(?:if\s+not\s+exists\s+)?((?:"?\w+"?\.)?"?\w+"?)', re.IGNORECASE
)


# ---------------------------------------------------------------------------------------------
# Parsers


def property_lines(path: Path) -> list[tuple[int, str, str, str]]:
    """``(line number, raw line, key, value)`` of every property of a ``.properties`` file.

    Deliberately tiny: ``key=value`` lines, ``#`` and ``!`` comment lines, blank lines. Anything
    else (``key: value``, continuation lines) is rejected rather than half-understood.
    """
    found = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}:{number}: not a key=value line: {raw!r}"
        assert not line.endswith("\\"), f"{path.name}:{number}: continuation lines not supported"
        found.append((number, raw, key.strip(), value.strip()))
    return found


def read_properties(path: Path) -> dict[str, str]:
    """The properties of a ``.properties`` file; a key set twice is an error."""
    properties: dict[str, str] = {}
    for number, _, key, value in property_lines(path):
        assert key not in properties, f"{path.name}:{number}: {key} is set twice"
        properties[key] = value
    return properties


def split_list(value: str) -> list[str]:
    """A comma-separated Debezium list property."""
    return [item.strip() for item in value.split(",") if item.strip()]


def host_port(address: str) -> tuple[str, int]:
    """``host:port`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    assert sep and host and port.isdigit(), f"not host:port: {address!r}"
    return host, int(port)


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read-only) of a normalised service's volumes."""
    found: dict[str, tuple[str, bool]] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found[volume["target"]] = (str(volume.get("source", "")), bool(volume.get("read_only")))
        else:
            source, target, *mode = volume.split(":")
            found[target] = (source, bool(mode) and "ro" in mode[0].split(","))
    return found


def container_ports(service: dict[str, Any]) -> set[int]:
    """The ports a service listens on inside the compose network (``expose`` and ``ports``)."""
    found = {int(str(port).split("/")[0]) for port in service.get("expose", [])}
    for port in service.get("ports", []):
        if isinstance(port, dict):
            found.add(int(port["target"]))
        else:
            found.add(int(str(port).split("/")[0].rsplit(":", 1)[-1]))
    return found


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment, whether normalised as a mapping or as ``K=V`` items."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def command(service: dict[str, Any]) -> list[str]:
    """A service's command as a list of arguments."""
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(arg) for arg in cmd]


def healthy_dependencies(service: dict[str, Any]) -> dict[str, str]:
    """Service -> start condition of a normalised ``depends_on`` (a plain list has none)."""
    depends_on = service.get("depends_on") or {}
    if isinstance(depends_on, list):
        return dict.fromkeys(depends_on, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in depends_on.items()}


def created_tables(sql: str) -> set[str]:
    """``schema.table`` of every ``create table`` of an SQL script (unqualified: ``public``)."""
    tables = set()
    for match in _CREATE_TABLE_RE.finditer(sql):
        name = match.group(1).replace('"', "").lower()
        tables.add(name if "." in name else f"public.{name}")
    return tables


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile: comments dropped, continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path.name}: ends inside a continuation line"
    return instructions


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml as ``docker-compose config`` validates and normalises it."""
    return validated(COMPOSE_FILE)


def validated(compose_file: Path) -> dict[str, Any]:
    """``compose_file`` as ``docker-compose config`` validates and normalises it."""
    exe = shutil.which("docker-compose")
    if exe is None:
        skip_unless_ci(
            "the docker-compose binary is missing (Debian: apt-get install docker-compose; "
            ".ci/run installs it): cannot validate docker-compose.yml"
        )
    # Interpolation must see the defaults written in the file, not this shell's settings.
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("COMPOSE_", "DOCKER_")) and key not in COMPOSE_VARIABLES
    }
    result = subprocess.run(
        [exe, "-f", str(compose_file), "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, (
        f"docker-compose config rejects {compose_file.name}:\n{result.stderr}"
    )
    normalised = yaml.safe_load(result.stdout)
    assert isinstance(normalised, dict)
    return normalised


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The normalised services."""
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


@pytest.fixture(scope="module")
def properties() -> dict[str, str]:
    """debezium/application.properties."""
    return read_properties(PROPERTIES_FILE)


@pytest.fixture(scope="module")
def settings() -> Settings:
    """streamsync.yaml, without environment overrides."""
    return load_settings(CONFIG_FILE, environ={})


@pytest.fixture(scope="module")
def captured_tables(properties: dict[str, str]) -> list[str]:
    """The tables of Debezium's ``table.include.list``."""
    tables = split_list(properties["debezium.source.table.include.list"])
    assert len(set(tables)) == len(tables), "table.include.list names a table twice"
    return tables


# ---------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_defines_the_stack(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == SERVICES


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        check = service.get("healthcheck") or {}
        assert check.get("test"), f"{name}: no healthcheck"
        assert not check.get("disable") and check["test"] != ["NONE"], f"{name}: disabled"


def test_debezium_starts_once_postgres_and_redis_are_healthy(
    services: dict[str, dict[str, Any]],
) -> None:
    assert healthy_dependencies(services["debezium"]) == {
        "postgres": "service_healthy",
        "redis": "service_healthy",
    }


def test_worker_starts_once_redis_is_healthy(services: dict[str, dict[str, Any]]) -> None:
    assert healthy_dependencies(services["worker"]).get("redis") == "service_healthy"


def test_postgres_runs_with_logical_decoding(services: dict[str, dict[str, Any]]) -> None:
    args = command(services["postgres"])
    assert args[0] == "postgres"
    settings = {args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "-c"}
    assert "wal_level=logical" in settings


def test_worker_can_be_scaled(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    # `docker compose up --scale worker=N` needs N containers with distinct names and no
    # host port they would all claim.
    assert "container_name" not in worker
    assert not worker.get("ports")
    assert worker.get("deploy", {}).get("replicas") == 2
    assert worker.get("restart") == "unless-stopped"


def test_worker_stops_gracefully(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert worker.get("stop_signal") == "SIGTERM"
    assert worker.get("stop_grace_period")


def test_worker_runs_streamsync_on_the_mounted_config(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    build = worker["build"]
    context = build if isinstance(build, str) else build["context"]
    assert Path(context).resolve() == ROOT
    assert isinstance(build, str) or build.get("dockerfile", "Dockerfile") == "Dockerfile"
    assert command(worker) == ["run", "-c", WORKER_CONFIG]
    source, read_only = mounts(worker)[WORKER_CONFIG]
    assert Path(source).resolve() == CONFIG_FILE.resolve()
    assert read_only


def test_worker_uses_the_compose_redis(services: dict[str, dict[str, Any]]) -> None:
    url = urlsplit(environment(services["worker"])[REDIS_URL_ENV])
    assert url.scheme == "redis"
    assert url.hostname == "redis"
    assert (url.port or 6379) in container_ports(services["redis"])


def test_redis_persists_its_data(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    args = command(redis)
    assert "--appendonly" in args
    assert args[args.index("--appendonly") + 1] == "yes"
    assert "/data" in mounts(redis)


def test_debezium_reads_the_properties_file(services: dict[str, dict[str, Any]]) -> None:
    debezium = services["debezium"]
    assert debezium["image"].startswith("quay.io/debezium/server:")
    found = mounts(debezium)
    source, read_only = found[DEBEZIUM_CONFIG]
    assert Path(source).resolve() == PROPERTIES_FILE.resolve()
    assert read_only
    assert DEBEZIUM_DATA in found


# ---------------------------------------------------------------------------------------------
# debezium/application.properties against the compose services and streamsync.yaml


def test_no_property_line_carries_a_comment() -> None:
    # Java properties have no trailing comments: `a=b # note` sets a to "b # note".
    for number, raw, key, value in property_lines(PROPERTIES_FILE):
        assert "#" not in value, f"application.properties:{number}: '#' in the value of {key}"
        assert raw == raw.rstrip(), f"application.properties:{number}: trailing blanks in {key}"


@pytest.mark.parametrize(("key", "expected"), sorted(REQUIRED_PROPERTIES.items()))
def test_debezium_emits_what_the_worker_expects(
    properties: dict[str, str], key: str, expected: str
) -> None:
    assert properties.get(key) == expected


@pytest.fixture(scope="module")
def demo_properties(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The Debezium properties ``streamsync demo`` writes for its capture."""
    stack = _Stack(tmp_path_factory.mktemp("demo"), redis_url="redis://127.0.0.1:6379")
    config = _write_config(stack)
    return read_properties(config.parent / "application.properties")


@pytest.mark.parametrize(
    ("key", "expected"),
    sorted((k, v) for k, v in REQUIRED_PROPERTIES.items() if k not in DEMO_EXEMPT),
)
def test_the_demo_emits_what_the_worker_expects(
    demo_properties: dict[str, str], key: str, expected: str
) -> None:
    assert demo_properties.get(key) == expected


def test_debezium_keeps_progress_moving(properties: dict[str, str]) -> None:
    assert properties.get("debezium.source.slot.name")
    assert 0 < int(properties["debezium.source.heartbeat.interval.ms"]) <= 60_000
    assert 0 <= int(properties["debezium.source.offset.flush.interval.ms"]) <= 10_000


def test_sink_writes_to_the_compose_redis(
    properties: dict[str, str], services: dict[str, dict[str, Any]]
) -> None:
    host, port = host_port(properties["debezium.sink.redis.address"])
    assert host == "redis"
    assert port in container_ports(services[host])


def test_offsets_are_kept_in_the_compose_redis(
    properties: dict[str, str], services: dict[str, dict[str, Any]]
) -> None:
    # Without its own address the offset store uses the sink's.
    address = properties.get(
        "debezium.source.offset.storage.redis.address", properties["debezium.sink.redis.address"]
    )
    host, port = host_port(address)
    assert host == "redis"
    assert port in container_ports(services[host])


def test_source_reads_the_compose_postgres(
    properties: dict[str, str], services: dict[str, dict[str, Any]]
) -> None:
    host = properties["debezium.source.database.hostname"]
    assert host == "postgres"
    postgres = services[host]
    assert int(properties["debezium.source.database.port"]) in container_ports(postgres)
    env = environment(postgres)
    assert properties["debezium.source.database.dbname"] == env["POSTGRES_DB"]
    assert properties["debezium.source.database.user"] == env["POSTGRES_USER"]
    assert properties["debezium.source.database.password"] == env["POSTGRES_PASSWORD"]


def test_streams_are_those_of_the_captured_tables(
    properties: dict[str, str], captured_tables: list[str], settings: Settings
) -> None:
    prefix = properties["debezium.source.topic.prefix"]
    assert settings.source.streams is not None
    assert sorted(settings.source.streams) == sorted(f"{prefix}.{t}" for t in captured_tables)


def test_captured_tables_are_the_mapped_tables(
    captured_tables: list[str], settings: Settings
) -> None:
    assert set(captured_tables) == {rule.table for rule in settings.rules}


def test_entry_layout_matches_the_worker(properties: dict[str, str], settings: Settings) -> None:
    message_format = properties.get("debezium.sink.redis.message.format", "compact")
    assert settings.source.format in (StreamFormat.AUTO, message_format)
    for key in ("debezium.sink.redis.null.key", "debezium.sink.redis.null.value"):
        assert properties.get(key, "default") == settings.source.null_marker


def test_mapped_tables_exist_in_the_init_sql(
    services: dict[str, dict[str, Any]], captured_tables: list[str], settings: Settings
) -> None:
    scripts = [
        Path(source)
        for target, (source, _) in mounts(services["postgres"]).items()
        if target.startswith(INITDB_DIR)
    ]
    assert scripts, f"postgres mounts no init script into {INITDB_DIR}"
    tables = set()
    for script in scripts:
        tables |= created_tables(script.read_text(encoding="utf-8"))
    assert {rule.table for rule in settings.rules} | set(captured_tables) <= tables


def test_streamsync_config_passes_check_config() -> None:
    result = CliRunner().invoke(
        cli, ["check-config", "-c", str(CONFIG_FILE)], env={REDIS_URL_ENV: None}
    )
    assert result.exit_code == 0, result.output
    assert f"{CONFIG_FILE}: ok" in result.output


# ---------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore


def test_dockerfile_builds_the_worker_image() -> None:
    instructions = dockerfile_instructions(DOCKERFILE)
    by_name: dict[str, list[str]] = {}
    for name, args in instructions:
        by_name.setdefault(name, []).append(args)
    assert by_name["FROM"][0].split()[0] == "python:3.11-slim"
    assert any("pip install" in run and "--no-cache-dir" in run for run in by_name["RUN"])
    assert by_name["USER"][-1].split(":")[0] not in {"root", "0"}
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "scripts"
    ]
    assert json.loads(by_name["ENTRYPOINT"][-1]) == ["streamsync"]
    assert "streamsync" in scripts
    assert json.loads(by_name["CMD"][-1]) == ["run", "-c", WORKER_CONFIG]
    assert by_name["STOPSIGNAL"][-1] == "SIGTERM"


def test_image_gets_what_the_wheel_is_built_from() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    wheel = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = [
        "pyproject.toml",
        pyproject["project"]["readme"],
        *wheel["packages"],
        *wheel.get("force-include", {}),
    ]
    copied = []
    for name, args in dockerfile_instructions(DOCKERFILE):
        if name in {"COPY", "ADD"}:
            words = json.loads(args) if args.startswith("[") else args.split()
            copied += [word for word in words if not word.startswith("--")][:-1]
    ignored = [
        line.strip().strip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in ignored), "exceptions are not understood here"
    for path in needed:
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        assert any(p in copied for p in prefixes), f"the Dockerfile does not copy {path}"
        for prefix in prefixes:
            hits = [p for p in ignored if fnmatch.fnmatch(prefix, p)]
            assert not hits, f".dockerignore excludes {path} ({hits})"


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = {
        line.strip().strip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", "tests", "benchmarks", ".pytest_cache", ".mypy_cache"} <= ignored
