"""The command line as a first-time user meets it: what a missing extra, a wrong option or a
missing configuration file says, and the exit codes scripts rely on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from streamsync.cli import cli
from streamsync.cli.options import CONFIG_ENV
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


# -- usage errors exit 64, apart from status's 2 ---------------------------------------------


@pytest.fixture
def config(tmp_path: Path, redis_url: str) -> Path:
    return write_config(tmp_path / "c.yaml", redis_url)


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--no-such-option"],
        ["no-such-command"],
        ["status", "--max-lag-s", "soon"],
        ["dlq", "show", "--stream", "app.public.users"],  # the ID argument is missing
        ["dlq", "show", "--stream", "app.public.users", "not-an-id"],
        ["resync"],  # neither --table nor --all
        ["resync", "--all", "--force"],  # --force without --finish
    ],
)
def test_usage_errors_exit_64(args: list[str], config: Path) -> None:
    result = CliRunner().invoke(cli, [*args, "-c", str(config)])
    assert result.exit_code == int(ExitCode.USAGE) == 64, result.output
    assert "Error:" in result.stderr or "Usage:" in result.stderr


def test_status_finding_a_problem_still_exits_2(r: redis.Redis, config: Path) -> None:
    result = CliRunner().invoke(cli, ["status", "-c", str(config)])
    assert result.exit_code == int(ExitCode.UNHEALTHY) == 2, result.output  # no library loaded
    assert "Functions library streamsync not loaded" in result.stdout


def test_the_installed_entry_point_exits_64_on_a_usage_error() -> None:
    script = shutil.which("streamsync")
    if script is None:
        pytest.skip("the streamsync console script is not installed (pip install -e .)")
    proc = subprocess.run(
        [script, "run", "--no-such-option"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == ExitCode.USAGE, proc.stderr
    assert "No such option" in proc.stderr and "--no-such-option" in proc.stderr


def test_every_exit_code_is_documented_in_help_and_readme() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    help_lines = result.stdout.splitlines()
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for code in ExitCode:
        assert any(line.strip().startswith(f"{int(code):<4} ") for line in help_lines), code
        assert f"\n| `{int(code)}` |" in readme, f"README's exit code table lacks {int(code)}"


# -- finding the configuration ---------------------------------------------------------------


def test_the_configuration_comes_from_the_environment(config: Path) -> None:
    result = CliRunner().invoke(cli, ["check-config"], env={CONFIG_ENV: str(config)})
    assert result.exit_code == 0, result.output
    assert f"{config}: ok" in result.stdout
    # -c wins over the environment
    other = write_config(config.parent / "other.yaml", "redis://127.0.0.1:6379/0")
    result = CliRunner().invoke(
        cli, ["check-config", "-c", str(other)], env={CONFIG_ENV: str(config)}
    )
    assert f"{other}: ok" in result.stdout


def test_the_configuration_defaults_to_streamsync_yaml_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path / "streamsync.yaml", "redis://127.0.0.1:6379/0")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["check-config"], env={CONFIG_ENV: None})
    assert result.exit_code == 0, result.output
    assert "streamsync.yaml: ok" in result.stdout


def test_no_configuration_anywhere_names_every_way_to_give_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["status"], env={CONFIG_ENV: None})
    assert result.exit_code == ExitCode.CONFIG_INVALID, result.output
    message = result.stderr
    assert "-c/--config" in message and CONFIG_ENV in message
    assert str(tmp_path / "streamsync.yaml") in message
