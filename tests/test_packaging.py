"""The wheel ships the Functions library, the type marker, the capture engine's logging
configuration and the console script."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_wheel_ships_the_library(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        timeout=300,
    )
    [wheel] = tmp_path.glob("streamsync-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert "streamsync/py.typed" in names
        assert "streamsync/embedded/log4j2-capture.properties" in names
        assert "streamsync/cli/__init__.py" in names
        shipped = z.read("streamsync/lua/streamsync.lua")
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert b"streamsync = streamsync.cli:main" in z.read(entry_points)
    assert shipped == (ROOT / "lua" / "streamsync.lua").read_bytes()


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "python3 -m pytest"
    assert f"\n{command}\n" in readme
    assert ci.rstrip().endswith(f"exec {command}")


def test_readme_lists_what_the_tests_need_and_ci_installs_it() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    start = readme.index("## Development and tests")
    section = readme[start : readme.index("### Code map", start)]
    for needed in ("redis-server", "PostgreSQL server binaries", "Java 17", "docker-compose"):
        assert needed in section, needed
    assert "`promtool` and `prometheus`" in section
    # the table whose last column names the package (the code map above it is another table)
    table = section[section.index("| what | for | Debian package |") :].split("\n\n", 1)[0]
    packages = [
        line.rsplit("|", 2)[1].strip(" `")
        for line in table.splitlines()
        if line.startswith("| ") and line.rstrip().endswith("` |")
    ]
    assert packages == [
        "redis-server",
        "postgresql-15",
        "openjdk-17-jre-headless",
        "docker-compose",
        "prometheus",
    ]
    for package in packages:
        assert package in ci, f".ci/run does not install {package}"
