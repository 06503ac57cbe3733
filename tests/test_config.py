"""Configuration: the documented format loads; every misuse names the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from streamsync.cli import cli
from streamsync.config import REDIS_URL_ENV, Mode, TargetType, load_settings
from streamsync.errors import ConfigError, ExitCode
from streamsync.templates import KeyTemplate

EXAMPLE = """\
redis:
  url: redis://127.0.0.1:6379/0
source:
  streams: [app.public.users, app.public.orders]
  group: streamsync
  start: "0"
  format: auto
  null_marker: default
worker:
  batch_size: 500
  block_ms: 1000
  claim_idle_ms: 30000
  max_deliveries: 5
  tombstone_ttl_s: 86400
rules:
  - table: public.users
    mode: write_through
    key: "user:{id}"
    type: hash
    fields: [id, name, email, plan]
    ttl_s: 86400
  - table: public.orders
    mode: invalidate
    key: "order:{id}"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "streamsync.yaml"
    path.write_text(text)
    return path


def test_the_documented_example_loads(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, EXAMPLE), environ={})
    users, orders = settings.rules
    assert users.type is TargetType.HASH and users.fields == ("id", "name", "email", "plan")
    assert orders.mode is Mode.INVALIDATE
    assert settings.rules_by_table["public.orders"] == (orders,)
    assert settings.worker.max_deliveries == 5


def test_readme_example_is_the_tested_one() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert EXAMPLE.strip() in readme


def test_environment_overrides_the_redis_url(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    settings = load_settings(path, environ={REDIS_URL_ENV: "redis://secret@10.0.0.1:6380/2"})
    assert settings.redis.url == "redis://secret@10.0.0.1:6380/2"


@pytest.mark.parametrize(
    ("old", "new", "field", "message"),
    [
        ("  batch_size: 500", "  batch_sise: 500", "worker.batch_sise", "unknown field"),
        ("  batch_size: 500", "  batch_size: many", "worker.batch_size", "integer"),
        ('    key: "user:{id}"', '    key: "user"', "rules[0].key", "names no column"),
        ('    key: "user:{id}"', '    key: "user:{id!r}"', "rules[0].key", "only name a column"),
        ('    key: "user:{id}"', '    key: "user:{}"', "rules[0].key", "names no column"),
        ("    type: hash\n", "", "rules[0].type", "is required"),
        ("    type: hash", "    type: bag", "rules[0].type", "'hash', 'json'"),
        ("  - table: public.users", "  - table: users", "rules[0].table", "schema.table"),
        ('    key: "order:{id}"\n', "", "rules[1].key", "Field required"),
        (
            "    fields: [id, name, email, plan]",
            "    fields: [name]",
            "rules[0]",
            "must include the key's columns",
        ),
        (
            '    key: "order:{id}"',
            '    key: "order:{id}"\n    ttl_s: 5',
            "rules[1]",
            "no meaning when mode is invalidate",
        ),
        (
            "  streams: [app.public.users, app.public.orders]",
            "  stream_prefix: app.",
            "source.stream_prefix",
            None,
        ),
        (
            "  streams: [app.public.users, app.public.orders]",
            "  streams: []",
            "source",
            "at least one stream",
        ),
        (
            "  streams: [app.public.users, app.public.orders]",
            "",
            "source",
            "exactly one of 'streams'",
        ),
        ('  start: "0"', '  start: "5"', "source.start", "'0' or '$'"),
        ("  url: redis://127.0.0.1:6379/0", "  url: http://x", "redis.url", "redis://"),
        ("  max_deliveries: 5", "  max_deliveries: 0", "worker.max_deliveries", "greater"),
    ],
)
def test_invalid_configuration_names_file_and_field(
    tmp_path: Path, old: str, new: str, field: str, message: str | None
) -> None:
    assert old in EXAMPLE
    path = write(tmp_path, EXAMPLE.replace(old, new))
    if message is None:  # a valid variation
        load_settings(path, environ={})
        return
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    text = str(info.value)
    assert f"{path}: {field}" in text, text
    assert message in text, text


def test_unreadable_and_non_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml", environ={})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "rules: [\n"), environ={})
    with pytest.raises(ConfigError, match="YAML mapping"):
        load_settings(write(tmp_path, "- a\n- b\n"), environ={})


def test_check_config_command(tmp_path: Path) -> None:
    runner = CliRunner()
    good = runner.invoke(cli, ["check-config", "-c", str(write(tmp_path, EXAMPLE))])
    assert good.exit_code == 0, good.output
    assert "public.users -> write_through hash user:{id}" in good.output
    bad = write(tmp_path, EXAMPLE.replace("  batch_size: 500", "  batch_sise: 500"))
    result = runner.invoke(cli, ["check-config", "-c", str(bad)])
    assert result.exit_code == ExitCode.CONFIG_INVALID
    assert f"{bad}: worker.batch_sise: unknown field" in result.output


def test_check_config_never_prints_the_password(tmp_path: Path) -> None:
    text = EXAMPLE.replace("redis://127.0.0.1", "redis://user:hunter2@127.0.0.1")
    result = CliRunner().invoke(cli, ["check-config", "-c", str(write(tmp_path, text))])
    assert result.exit_code == 0
    assert "hunter2" not in result.output


def test_key_templates() -> None:
    t = KeyTemplate.parse("order_item:{order_id}:{line_no}")
    assert t.columns == ("order_id", "line_no")
    assert t.render({"order_id": 7, "line_no": 2, "x": None}) == "order_item:7:2"
    tagged = KeyTemplate.parse("{{tenant:{tenant}}}:user:{id}")
    assert tagged.render({"tenant": "acme", "id": "u1"}) == "{tenant:acme}:user:u1"
    assert KeyTemplate.parse("flag:{on}").render({"on": True}) == "flag:true"
