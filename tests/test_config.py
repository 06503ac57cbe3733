"""Configuration: the documented format loads; every misuse names the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from streamsync.cli import cli
from streamsync.config import (
    REDIS_URL_ENV,
    CaptureSettings,
    Mode,
    RedisSettings,
    Rule,
    SourceSettings,
    TargetType,
    WorkerSettings,
    load_settings,
)
from streamsync.errors import ConfigError, ExitCode
from streamsync.templates import KeyTemplate

EXAMPLE = """\
redis:
  url: redis://127.0.0.1:6379/0
source:
  streams: [app.public.users, app.public.orders, app.public.products, app.public.activity]
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
  - table: public.users                 # a profile cache: one hash per user
    mode: write_through
    key: "user:{id}"
    type: hash
    fields: [id, name, email, plan]
    rename: {email: mail}               # column -> field name in Redis
    ttl_s: 86400
  - table: public.orders                # cache-aside: the application fills, changes evict
    mode: invalidate
    key: "order:{id}"
  - table: public.users                 # the same change also maintains a membership set
    key: "plan:{plan}:users"
    type: set
    member: "{id}"
  - table: public.products              # a ranking: ZRANGEBYSCORE product_prices 0 40
    key: product_prices
    type: zset
    member: "product:{id}"
    score: price
    where: "active = true"              # rows that stop matching leave the sorted set
  - table: public.activity              # a feed: the newest 100 activities per user
    key: "feed:{user_id}"
    type: list
    value: json
    max_len: 100
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "streamsync.yaml"
    path.write_text(text)
    return path


def test_the_documented_example_loads(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, EXAMPLE), environ={})
    users, orders, plans, prices, feed = settings.rules
    assert users.type is TargetType.HASH and users.fields == ("id", "name", "email", "plan")
    assert users.rename == {"email": "mail"}
    assert plans.type is TargetType.SET and plans.member == "{id}"
    assert prices.filter is not None and prices.filter.columns == {"active"}
    assert feed.max_len == 100 and feed.value == "json"
    assert settings.rules_by_table["public.users"] == (users, plans)
    assert orders.mode is Mode.INVALIDATE
    assert settings.rules_by_table["public.orders"] == (orders,)
    assert settings.worker.max_deliveries == 5


def test_readme_example_is_the_tested_one() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert EXAMPLE.strip() in readme


@pytest.mark.parametrize(
    "section", [RedisSettings, SourceSettings, WorkerSettings, CaptureSettings, Rule]
)
def test_readme_documents_every_setting(section: type[BaseModel]) -> None:
    rows = [
        line.split("|")[1]
        for line in (Path(__file__).parent.parent / "README.md").read_text().splitlines()
        if line.startswith("| `")
    ]
    documented = {name.strip(" `") for row in rows for name in row.split(",")}
    # the resolved password is not a key of the file (password_file and the environment are)
    undocumented = set(section.model_fields) - documented - {"password"}
    assert not undocumented, f"README.md's configuration tables lack {sorted(undocumented)}"


def test_environment_overrides_the_redis_url(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    settings = load_settings(path, environ={REDIS_URL_ENV: "redis://secret@10.0.0.1:6380/2"})
    assert settings.redis.url == "redis://secret@10.0.0.1:6380/2"


@pytest.mark.parametrize(
    ("old", "new", "field", "message"),
    [
        ("  batch_size: 500", "  batch_sise: 500", "worker.batch_sise", "unknown field"),
        (
            "  batch_size: 500",
            "  batch_size: many",
            "worker.batch_size",
            "expected a whole number, got text 'many'",
        ),
        ('    key: "user:{id}"', '    key: "user"', "rules[0].key", "names no column"),
        ('    key: "user:{id}"', '    key: "user:{id!r}"', "rules[0].key", "only name a column"),
        ('    key: "user:{id}"', '    key: "user:{}"', "rules[0].key", "names no column"),
        ("    type: hash\n", "", "rules[0].type", "is required"),
        ("    type: hash", "    type: bag", "rules[0].type", "'hash', 'json'"),
        ("  - table: public.users", "  - table: users", "rules[0].table", "schema.table"),
        ('    key: "order:{id}"\n', "", "rules[1].key", "is required"),
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
            "  streams: [app.public.users, app.public.orders, app.public.products,"
            " app.public.activity]",
            "  stream_prefix: app.",
            "source.stream_prefix",
            None,
        ),
        (
            "  streams: [app.public.users, app.public.orders, app.public.products,"
            " app.public.activity]",
            "  streams: []",
            "source",
            "at least one stream",
        ),
        (
            "  streams: [app.public.users, app.public.orders, app.public.products,"
            " app.public.activity]",
            "",
            "source",
            "exactly one of 'streams'",
        ),
        ('  start: "0"', '  start: "5"', "source.start", "must be '0' or '$' (got text '5')"),
        ("  url: redis://127.0.0.1:6379/0", "  url: http://x", "redis.url", "redis://"),
        ("  max_deliveries: 5", "  max_deliveries: 0", "worker.max_deliveries", "at least 1"),
        ('    member: "{id}"\n', "", "rules[2].member", "is required for type set"),
        ("    score: price\n", "", "rules[3].score", "is required for type zset"),
        ("    value: json\n", "", "rules[4].value", "is required for type list"),
        ("    max_len: 100", "    max_len: 0", "rules[4].max_len", "must be at least 1"),
        # Lua hands Redis larger numbers as 1e+17: every write of the rule would fail
        ("    max_len: 100", "    max_len: 4294967296", "rules[4].max_len", "must be at most"),
        ("    ttl_s: 86400", "    ttl_s: 1000000001", "rules[0].ttl_s", "must be at most"),
        (
            "  tombstone_ttl_s: 86400",
            "  tombstone_ttl_s: 100000000000000000000",
            "worker.tombstone_ttl_s",
            "must be at most",
        ),
        ("    max_len: 100", "    on_delete: forget", "rules[4].on_delete", "'remove' or"),
        (
            "    ttl_s: 86400\n  - table: public.orders",
            "    member: '{id}'\n  - table: public.orders",
            "rules[0].member",
            "no meaning for type hash",
        ),
        (
            '    where: "active = true"',
            '    where: "active = "',
            "rules[3].where",
            "expected a value at position",
        ),
        ('    where: "active = true"', '    where: "active == true"', "rules[3].where", "'='"),
        (
            '    member: "product:{id}"',
            '    member: "product:{id|title}"',
            "rules[3].member",
            "unknown transform 'title'",
        ),
        (
            '    key: "plan:{plan}:users"',
            '    key: "plan:{plan}:users"\n    fields: [id]',
            "rules[2].fields",
            "no meaning for type set",
        ),
        (
            "    rename: {email: mail}",
            "    rename: {email: mail, name: mail}",
            "rules[0].rename",
            "the same name",
        ),
        (
            '    key: "order:{id}"',
            '    key: "order:{id}"\n    where: "id > 1"',
            "rules[1].where",
            "no meaning when mode is invalidate",
        ),
        ('    key: "user:{id}"', '    key: "users"', "rules[0].key", "one key per row"),
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


def test_two_rules_with_one_name_are_refused(tmp_path: Path) -> None:
    twice = EXAMPLE + '  - table: public.users\n    key: "plan:{plan}:users"\n    type: set\n'
    twice += '    member: "{id}"\n'
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, twice), environ={})
    assert "rules[2] and rules[5] share the name" in str(info.value)
    assert "distinct 'name'" in str(info.value)
    named = twice + "    name: plan-members-again\n"
    load_settings(write(tmp_path, named), environ={})


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
    # a password in the file is refused, and the refusal does not repeat it
    assert result.exit_code == ExitCode.CONFIG_INVALID and "holds a password" in result.output
    assert "hunter2" not in result.output
    ok = CliRunner().invoke(
        cli,
        ["check-config", "-c", str(write(tmp_path, EXAMPLE))],
        env={REDIS_URL_ENV: "redis://user:hunter2@127.0.0.1:6379/0"},
    )
    assert ok.exit_code == 0 and "hunter2" not in ok.output


def test_key_templates() -> None:
    t = KeyTemplate.parse("order_item:{order_id}:{line_no}")
    assert t.columns == ("order_id", "line_no")
    assert t.render({"order_id": 7, "line_no": 2, "x": None}) == "order_item:7:2"
    tagged = KeyTemplate.parse("{{tenant:{tenant}}}:user:{id}")
    assert tagged.render({"tenant": "acme", "id": "u1"}) == "{tenant:acme}:user:u1"
    assert KeyTemplate.parse("flag:{on}").render({"on": True}) == "flag:true"


def problems_of(tmp_path: Path, text: str) -> list[str]:
    """The lines of the ConfigError loading ``text`` raises."""
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), environ={})
    return str(info.value).splitlines()


def test_one_problem_and_two_problems_are_counted_in_words(tmp_path: Path) -> None:
    path = tmp_path / "streamsync.yaml"
    one = problems_of(tmp_path, EXAMPLE.replace("  batch_size: 500", "  batch_size: 0"))
    assert one[0] == f"{path}: invalid configuration (1 problem)"
    two = EXAMPLE.replace("  batch_size: 500", "  batch_size: 0").replace(
        "  block_ms: 1000", "  block_ms: 0"
    )
    assert problems_of(tmp_path, two)[0] == f"{path}: invalid configuration (2 problems)"


@pytest.mark.parametrize(
    ("old", "new", "line"),
    [
        (
            "  streams: [app.public.users, app.public.orders, app.public.products,"
            " app.public.activity]",
            "  streams: app.public.users",
            "source.streams: expected a list, e.g. [a, b], got text 'app.public.users'",
        ),
        (
            "    fields: [id, name, email, plan]",
            "    fields: id",
            "rules[0].fields: expected a list, e.g. [a, b], got text 'id'",
        ),
        (
            "    rename: {email: mail}",
            "    rename: [email, mail]",
            "rules[0].rename: expected a mapping (key: value), got a list",
        ),
        (
            "worker:\n  batch_size: 500",
            "worker: 500\nworkers:\n  batch_size: 500",
            "worker: expected a mapping (key: value), got the number 500",
        ),
        ("  block_ms: 1000", "  block_ms: 1.5", "worker.block_ms: expected a whole number"),
        ("  block_ms: 1000", "  block_ms: 0", "worker.block_ms: must be at least 1"),
        ("  block_ms: 1000", "  block_ms: 90000", "worker.block_ms: must be at most 60000"),
        ("  group: streamsync", '  group: ""', "source.group: must not be empty"),
        ("  group: streamsync", "  group: [a]", "source.group: expected text, got a list"),
        (
            "  format: auto",
            "  format: json",
            "source.format: must be 'compact', 'extended' or 'auto' (got text 'json')",
        ),
        ("  format: auto", "  format:", "source.format: must be 'compact', 'extended' or 'auto'"),
        ("  max_deliveries: 5", "  trim: maybe", "worker.trim: expected true or false"),
        (
            "  url: redis://127.0.0.1:6379/0",
            "  url: redis://127.0.0.1:6379/0\n  socket_timeout_s: s3cret",
            "redis.socket_timeout_s: expected a number, got text",
        ),
    ],
)
def test_validation_errors_read_as_sentences(tmp_path: Path, old: str, new: str, line: str) -> None:
    assert old in EXAMPLE
    lines = problems_of(tmp_path, EXAMPLE.replace(old, new))
    path = tmp_path / "streamsync.yaml"
    assert any(item.startswith(f"  {path}: {line}") for item in lines[1:]), lines
    text = "\n".join(lines)
    assert "Input should" not in text and "valid tuple" not in text, text
    assert "s3cret" not in text  # the redis section's values are never echoed


def test_yaml_syntax_errors_name_the_file_on_every_line(tmp_path: Path) -> None:
    path = tmp_path / "streamsync.yaml"
    lines = problems_of(tmp_path, "source:\n  streams: [a, b\nrules: []\n")
    assert lines[0].startswith(f"{path}:3:6: not valid YAML: ")
    assert all(line.startswith(f"{path}:") for line in lines), lines
    assert any(line.startswith(f"{path}:2:12: ") for line in lines), lines  # where it started
    bad_indent = "source:\n  streams: [a]\n group: g\nrules: []\n"
    lines = problems_of(tmp_path, bad_indent)
    assert all(line.startswith(f"{path}:") for line in lines), lines
    assert lines[0].startswith(f"{path}:3:2: not valid YAML: "), lines


TLS_DEFAULT = "  url: redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("url", "extra", "error"),
    [
        ("redis://127.0.0.1:6379/0", "tls_verify: true", None),
        ("unix:///run/redis.sock", "tls_verify: true", None),
        ("rediss://127.0.0.1:6379/0", "tls_verify: false", None),
        (
            "redis://127.0.0.1:6379/0",
            "tls_verify: false",
            "redis.tls_verify: false turns off TLS certificate checks, but a redis:// url uses no"
            " TLS: use a rediss:// url, or remove it",
        ),
        (
            "redis://127.0.0.1:6379/0",
            "tls_ca_file: ca.pem",
            "redis.tls_ca_file: is for TLS, but a redis:// url uses no TLS: use a rediss:// url,"
            " or remove it",
        ),
    ],
)
def test_tls_settings_without_tls(tmp_path: Path, url: str, extra: str, error: str | None) -> None:
    text = EXAMPLE.replace(TLS_DEFAULT, f"  url: {url}\n  {extra}")
    if error is None:
        load_settings(write(tmp_path, text), environ={})
        return
    lines = problems_of(tmp_path, text)
    assert lines[1] == f"  {tmp_path / 'streamsync.yaml'}: {error}", lines


CAPTURE = """\
capture:
  overrides:
    debezium.source.database.hostname: 127.0.0.1
    debezium.source.database.port: 5433
    debezium.source.snapshot.fetch.size: 10240.5
    debezium.source.tombstones.on.delete: false
    debezium.source.include.schema.changes: True
"""


def test_capture_overrides_take_scalars_as_java_properties(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, EXAMPLE + CAPTURE), environ={})
    assert settings.capture.overrides == {
        "debezium.source.database.hostname": "127.0.0.1",
        "debezium.source.database.port": "5433",
        "debezium.source.snapshot.fetch.size": "10240.5",
        "debezium.source.tombstones.on.delete": "false",
        "debezium.source.include.schema.changes": "true",
    }


@pytest.mark.parametrize(
    ("value", "kind"), [("[a, b]", "a list"), ("{a: b}", "a mapping"), ("", "empty")]
)
def test_capture_overrides_refuse_lists_and_mappings(tmp_path: Path, value: str, kind: str) -> None:
    text = EXAMPLE + f"capture:\n  overrides:\n    debezium.source.table.include.list: {value}\n"
    lines = problems_of(tmp_path, text)
    assert lines[1] == (
        f"  {tmp_path / 'streamsync.yaml'}:"
        " capture.overrides['debezium.source.table.include.list']: is"
        f" {kind}: a property value is text, a number or true/false"
    ), lines
