"""Credentials, TLS and least privilege: the password stays out of the file, the logs and the
settings' repr; ``rediss://`` works against a real TLS redis-server; a worker runs end to end as
the ACL user ``acl.acl_rules`` describes, and that user can do nothing else."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import re
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import yaml
from click.testing import CliRunner
from pydantic import SecretStr

from streamsync import acl, connection, status
from streamsync.cli import cli
from streamsync.config import (
    REDIS_PASSWORD_ENV,
    REDIS_URL_ENV,
    RedisSettings,
    Settings,
    load_settings,
)
from streamsync.connection import NO_SETINFO
from streamsync.errors import ConfigError, ExitCode
from streamsync.functions import ensure_library, library_source
from streamsync.worker import Worker
from tests.debezium import add_change, entry_fields, envelope
from tests.prerequisites import module_missing, require, skip_unless_ci
from tests.replies import as_bytes, as_int, raw, xadd, xrange
from tests.servers import RedisServer, RedisServerError, free_port, wait_until

SECRET = "hunter2-Secret"
ADMIN_PASSWORD = "admin-pw-7f3a"
WORKER_PASSWORD = "worker-pw-91c2"
STATUS_PASSWORD = "status-pw-44d0"
DOCS = Path(__file__).parent.parent / "docs" / "security.md"

BASE = {
    "source": {"streams": ["app.public.users"]},
    "rules": [{"table": "public.users", "key": "user:{id}", "type": "hash"}],
}


def write(tmp_path: Path, data: dict[str, Any], name: str = "streamsync.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def with_redis(**redis_section: Any) -> dict[str, Any]:
    return {**BASE, "redis": redis_section}


# -- credentials in the configuration ----------------------------------------------------------


def test_password_file_is_relative_to_the_config_and_hidden(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "redis.pw").write_text(SECRET + "\n")
    cfg = write(
        tmp_path,
        with_redis(
            url="redis://127.0.0.1:6379/0", username="app", password_file="secrets/redis.pw"
        ),
    )
    settings = load_settings(cfg, environ={})
    assert settings.redis.password is not None
    assert settings.redis.password.get_secret_value() == SECRET
    assert settings.redis.password_file == tmp_path / "secrets" / "redis.pw"
    for shown in (
        repr(settings),
        str(settings),
        repr(settings.redis),
        str(settings.redis),
        settings.model_dump_json(),
        str(settings.model_dump()),
        connection.describe(settings.redis),
    ):
        assert SECRET not in shown
    kwargs = connection.connection_kwargs(settings.redis)
    assert kwargs["password"] == SECRET and kwargs["username"] == "app"
    assert connection.describe(settings.redis).endswith("(user app, password set)")


@pytest.mark.parametrize(
    ("content", "password"),
    [("pw\n", "pw"), ("pw\r\n", "pw"), ("pw", "pw"), (" pw with spaces \n", " pw with spaces ")],
)
def test_password_file_loses_only_its_trailing_newline(
    tmp_path: Path, content: str, password: str
) -> None:
    (tmp_path / "pw").write_text(content)
    settings = load_settings(write(tmp_path, with_redis(password_file="pw")), environ={})
    assert settings.redis.password is not None
    assert settings.redis.password.get_secret_value() == password


def test_environment_password_wins_over_the_file(tmp_path: Path) -> None:
    # the file is not even read (it may not exist where the variable is used)
    cfg = write(tmp_path, with_redis(password_file="absent.pw"))
    settings = load_settings(cfg, environ={REDIS_PASSWORD_ENV: SECRET})
    assert settings.redis.password is not None
    assert settings.redis.password.get_secret_value() == SECRET
    (tmp_path / "absent.pw").write_text("from-the-file\n")
    settings = load_settings(cfg, environ={REDIS_PASSWORD_ENV: SECRET})
    assert settings.redis.password is not None
    assert settings.redis.password.get_secret_value() == SECRET


def test_unreadable_password_file_names_the_file_and_the_field(tmp_path: Path) -> None:
    cfg = write(tmp_path, with_redis(password_file="missing.pw"))
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    text = str(info.value)
    assert f"{cfg}: redis.password_file: cannot read {tmp_path / 'missing.pw'}" in text, text
    (tmp_path / "missing.pw").mkdir()  # a directory is unreadable as a password too
    with pytest.raises(ConfigError, match=r"redis\.password_file: cannot read"):
        load_settings(cfg, environ={})
    (tmp_path / "empty.pw").write_text("\n")
    with pytest.raises(ConfigError, match=r"redis.password_file: .*empty.pw is empty"):
        load_settings(write(tmp_path, with_redis(password_file="empty.pw")), environ={})


@pytest.mark.parametrize(
    "url",
    [
        f"redis://user:{SECRET}@127.0.0.1:6379/0",
        f"redis://:{SECRET}@127.0.0.1:6379/0",
        f"rediss://user:{SECRET}@redis.example:6380/0",
        f"unix:///run/redis.sock?db=0&password={SECRET}",
    ],
)
def test_a_password_in_the_file_url_is_refused(tmp_path: Path, url: str) -> None:
    cfg = write(tmp_path, with_redis(url=url))
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    text = str(info.value)
    assert f"{cfg}: redis.url: holds a password in plain text" in text
    assert "redis.password_file" in text and REDIS_PASSWORD_ENV in text
    assert SECRET not in text
    # even when the environment overrides the URL: the file still holds a password
    with pytest.raises(ConfigError, match="holds a password"):
        load_settings(cfg, environ={REDIS_URL_ENV: "redis://127.0.0.1:6379/0"})


def test_a_password_key_in_the_file_is_refused(tmp_path: Path) -> None:
    cfg = write(tmp_path, with_redis(password=SECRET))
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    text = str(info.value)
    assert f"{cfg}: redis.password: a password does not belong in the configuration" in text
    assert SECRET not in text


def test_a_password_in_the_environment_url_is_allowed_and_hidden(tmp_path: Path) -> None:
    cfg = write(tmp_path, with_redis(url="redis://127.0.0.1:6379/0"))
    env_url = f"redis://app:{SECRET.replace('-', '%2D')}@10.0.0.1:6380/2"
    settings = load_settings(cfg, environ={REDIS_URL_ENV: env_url})
    assert settings.redis.url == "redis://app@10.0.0.1:6380/2"
    assert settings.redis.password is not None
    assert settings.redis.password.get_secret_value() == SECRET
    assert SECRET not in repr(settings) and SECRET not in str(settings.redis)
    pool = connection.pool(settings.redis)
    try:
        options = pool.connection_kwargs
        assert options["password"] == SECRET and options["username"] == "app"
        assert options["host"] == "10.0.0.1" and options["port"] == 6380 and options["db"] == 2
        assert SECRET not in repr(pool)
    finally:
        pool.disconnect()
    # STREAMSYNC_REDIS_PASSWORD wins over the URL's password
    settings = load_settings(cfg, environ={REDIS_URL_ENV: env_url, REDIS_PASSWORD_ENV: "other"})
    assert settings.redis.password is not None
    assert settings.redis.password.get_secret_value() == "other"


def test_errors_about_a_url_never_show_its_password(tmp_path: Path) -> None:
    cfg = write(tmp_path, with_redis())
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={REDIS_URL_ENV: f"http://user:{SECRET}@host/0"})
    assert "redis.url: must start with redis://" in str(info.value)
    assert SECRET not in str(info.value)
    with pytest.raises(ValueError) as direct:
        RedisSettings(url=f"http://user:{SECRET}@host/0")
    assert SECRET not in str(direct.value)
    # built in code: the URL's password moves out of it, an explicit one wins
    built = RedisSettings(url=f"redis://user:{SECRET}@host/0", password=SecretStr("explicit"))
    assert built.url == "redis://user@host/0" and built.password is not None
    assert built.password.get_secret_value() == "explicit"
    with pytest.raises(ValueError) as other:
        RedisSettings(url=f"redis://user:{SECRET}@host/0", socket_timeout_s=-1)
    assert SECRET not in str(other.value)


def test_username_in_the_file_and_in_the_url_must_agree(tmp_path: Path) -> None:
    same = write(tmp_path, with_redis(url="redis://app@127.0.0.1/0", username="app"))
    assert load_settings(same, environ={}).redis.effective_username == "app"
    other = write(tmp_path, with_redis(url="redis://admin@127.0.0.1/0", username="app"))
    with pytest.raises(ConfigError, match=r"redis.username: differs from the user 'admin'"):
        load_settings(other, environ={})


def test_check_config_shows_no_password(tmp_path: Path) -> None:
    cfg = write(tmp_path, with_redis())
    env = {REDIS_URL_ENV: f"redis://app:{SECRET}@127.0.0.1:6379/0"}
    result = CliRunner().invoke(cli, ["check-config", "-c", str(cfg)], env=env)
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    refused = write(
        tmp_path, with_redis(url=f"redis://app:{SECRET}@127.0.0.1:6379/0"), "refused.yaml"
    )
    result = CliRunner().invoke(cli, ["check-config", "-c", str(refused)], env={})
    assert result.exit_code == ExitCode.CONFIG_INVALID
    assert "holds a password" in result.output and SECRET not in result.output


# -- TLS settings ------------------------------------------------------------------------------


def test_tls_files_are_relative_to_the_config_and_reach_redis_py(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        with_redis(
            url="rediss://redis.example:6380/0",
            tls_ca_file="tls/ca.pem",
            tls_cert_file="tls/client.pem",
            tls_key_file="tls/client.key",
        ),
    )
    settings = load_settings(cfg, environ={}).redis
    assert settings.tls and settings.tls_verify
    assert connection.tls_kwargs(settings) == {
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
        "ssl_ca_certs": str(tmp_path / "tls" / "ca.pem"),
        "ssl_certfile": str(tmp_path / "tls" / "client.pem"),
        "ssl_keyfile": str(tmp_path / "tls" / "client.key"),
    }
    pool = connection.pool(settings)
    assert pool.connection_class is redis.SSLConnection
    pool.disconnect()
    unverified = write(tmp_path, with_redis(url="rediss://h:6380/0", tls_verify=False), "u.yaml")
    assert connection.tls_kwargs(load_settings(unverified, environ={}).redis) == {
        "ssl_cert_reqs": "none",
        "ssl_check_hostname": False,
    }
    plain = write(tmp_path, with_redis(url="redis://h:6379/0"), "p.yaml")
    assert connection.tls_kwargs(load_settings(plain, environ={}).redis) == {}


@pytest.mark.parametrize(
    ("section", "field", "message"),
    [
        ({"url": "redis://h/0", "tls_ca_file": "ca.pem"}, "tls_ca_file", "is for TLS, but a"),
        ({"url": "redis://h/0", "tls_verify": False}, "tls_verify", "false turns off TLS"),
        ({"url": "rediss://h/0", "tls_cert_file": "c.pem"}, "tls_key_file", "is required"),
        ({"url": "rediss://h/0", "tls_key_file": "c.key"}, "tls_cert_file", "is required"),
        ({"url": "rediss://h/0", "tls_ca": "ca.pem"}, "tls_ca", "unknown field"),
    ],
)
def test_tls_misuse_names_the_field(
    tmp_path: Path, section: dict[str, Any], field: str, message: str
) -> None:
    cfg = write(tmp_path, with_redis(**section))
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert f"{cfg}: redis.{field}: {message}" in str(info.value), str(info.value)


# -- ACL rules ---------------------------------------------------------------------------------


def test_acl_patterns_follow_the_configuration(tmp_path: Path) -> None:
    data = {
        "source": {"stream_prefix": "app."},
        "worker": {"state_prefix": "ss:", "position_prefix": "pos:"},
        "rules": [
            {"table": "public.users", "key": "user:{id}", "type": "hash"},
            {"table": "public.users", "key": "plan:{plan}:users", "type": "set", "member": "{id}"},
            {"table": "public.users", "key": "{{t:{tenant}}}:u:{id}", "type": "hash"},
            {"table": "public.users", "key": "pair:{a}{b}", "mode": "invalidate"},
            {"table": "public.users", "key": "top[1]", "type": "zset", "member": "{id}"}
            | {"score": "score"},
        ],
    }
    settings = load_settings(write(tmp_path, data), environ={})
    assert acl.acl_key_patterns(settings) == [
        "app.*",
        "ss:*",
        "pos:*",
        "user:*",
        "plan:*:users",
        "{t:*}:u:*",
        "pair:*",
        "top\\[1\\]",
    ]
    rules = acl.acl_rules(settings)
    assert rules[:2] == ["resetkeys", "~app.*"]
    assert "-@all" in rules and "+select" not in rules
    assert rules.index("-@all") < rules.index("+xreadgroup")
    assert len(rules) == len(set(rules))
    read_only = acl.acl_rules(settings, read_only=True)
    assert [r for r in read_only if "~" in r] == ["%R~app.*", "%R~ss:*", "%R~pos:*"]
    assert "+xadd" not in read_only and "+fcall" not in read_only
    line = acl.acl_setuser(settings, password="pw")
    assert line.startswith("ACL SETUSER streamsync reset on >pw resetkeys ~app.* ")
    assert "~top\\[1\\]" in line.split()


# The reviewed command sets, pinned: granting the worker, its library or the status user one more
# command (``+xdel``, ``+config``...) must be a deliberate change to this test too, after a review
# of what it lets a leaked password do.
REVIEWED_WORKER_COMMANDS = frozenset(
    {
        "client|setname",
        "ping",
        "info",
        "time",
        "xlen",
        "xreadgroup",
        "xack",
        "xadd",
        "xautoclaim",
        "xclaim",
        "xpending",
        "xrange",  # resync --finish: the new epoch's entries
        "xgroup|create",
        "xinfo|stream",
        "xinfo|groups",
        "xinfo|consumers",
        "exists",
        "scan",
        "hkeys",
        "hget",
        "hmget",
        "hgetall",
        "hincrby",
        "hset",
        "set",
        "get",
        "pexpire",
        "del",
        "fcall",
        "fcall_ro",
        "function|load",
        "module|list",
    }
)
REVIEWED_LIBRARY_COMMANDS = frozenset(
    {
        "get",
        "set",
        "del",
        "exists",
        "type",
        "pexpire",
        "pttl",
        "time",  # records' expiry times
        "hget",
        "hmget",
        "hset",
        "hdel",
        "hexists",
        "hlen",
        "hkeys",
        "hgetall",
        "hincrby",
        "sadd",
        "srem",
        "zadd",
        "zrem",
        "llen",
        "lindex",
        "lpos",
        "linsert",
        "lpush",
        "rpush",
        "lpop",
        "rpop",
        "lset",
        "lrem",
        "xadd",
        "xtrim",
        "xpending",
        "xinfo|stream",
        "xinfo|groups",
        "xinfo|consumers",
        "xgroup|delconsumer",
    }
)
#: Run by the library for json rules writing RedisJSON documents (granted with --redisjson).
REVIEWED_REDISJSON_COMMANDS = frozenset({"json.set", "json.get"})
REVIEWED_STATUS_COMMANDS = frozenset(
    {
        "ping",
        "scan",
        "type",
        "xlen",
        "xrange",
        "xrevrange",
        "xpending",
        "xinfo|stream",
        "xinfo|groups",
        "xinfo|consumers",
        "hgetall",
        "exists",  # the workers' liveness marks; 1.x indexes
        "get",  # the bookkeeping layout marker
        "fcall_ro",
        "time",
        "info",
        "module|list",
    }
)
#: What Redis lets every connection run, whatever its ACL: logging in, and leaving.
ALWAYS_RUNNABLE = frozenset({"auth", "hello", "quit", "reset"})
#: Commands whose first argument is a subcommand, granted as ``command|subcommand``.
CONTAINER_COMMANDS = frozenset(
    {"xinfo", "xgroup", "client", "config", "function", "object", "module"}
)
#: A call in the Lua library: ``redis.call('CMD', 'SUB'...``, ``pcall(redis.call, 'CMD'...``.
LUA_CALL_RE = re.compile(
    r"(?:redis\.p?call\(|pcall\(\s*redis\.call\s*,)\s*'(?P<command>[\w.]+)'"
    r"(?:\s*,\s*'(?P<sub>\w+)')?"
)


@pytest.mark.parametrize(
    ("commands", "reviewed"),
    [
        (acl.WORKER_COMMANDS, REVIEWED_WORKER_COMMANDS),
        (acl.LIBRARY_COMMANDS, REVIEWED_LIBRARY_COMMANDS),
        (acl.STATUS_COMMANDS, REVIEWED_STATUS_COMMANDS),
    ],
    ids=["worker", "library", "status"],
)
def test_the_command_sets_are_the_reviewed_ones(
    commands: tuple[str, ...], reviewed: frozenset[str]
) -> None:
    assert len(commands) == len(set(commands)), "a command is listed twice"
    assert set(commands) - reviewed == set(), "granted but never reviewed"
    assert reviewed - set(commands) == set(), "reviewed but no longer granted: update this test"


def test_the_library_commands_are_those_the_lua_library_calls() -> None:
    called: set[str] = set()
    for match in LUA_CALL_RE.finditer(library_source()):
        command, sub = match["command"].lower(), match["sub"]
        if command in CONTAINER_COMMANDS:
            assert sub, f"{command} called without a literal subcommand"
            command += "|" + sub.lower()
        called.add(command)
    assert called == REVIEWED_LIBRARY_COMMANDS | REVIEWED_REDISJSON_COMMANDS


def _split_rules(rules: list[str]) -> tuple[list[str], list[str]]:
    """The key patterns and the granted commands of ``rules``, after checking that they are
    all there is: keys and channels reset, every command denied, then these granted."""
    keys = [rule for rule in rules if "~" in rule]
    granted = [rule.removeprefix("+") for rule in rules if rule.startswith("+")]
    assert rules == ["resetkeys", *keys, "resetchannels", "-@all", *[f"+{c}" for c in granted]]
    assert len(granted) == len(set(granted)), granted
    return keys, granted


@pytest.mark.parametrize("db", [0, 3])
def test_the_acl_rules_grant_exactly_the_reviewed_commands(tmp_path: Path, db: int) -> None:
    data = {**BASE, "redis": {"url": f"redis://127.0.0.1:6379/{db}"}}
    settings = load_settings(write(tmp_path, data), environ={})
    # redis-py selects the URL's database when it connects
    select = {"select"} if db else set()
    keys, granted = _split_rules(acl.acl_rules(settings))
    assert keys == ["~" + p for p in acl.acl_key_patterns(settings)]
    assert set(granted) == REVIEWED_WORKER_COMMANDS | REVIEWED_LIBRARY_COMMANDS | select
    keys, granted = _split_rules(acl.acl_rules(settings, read_only=True))
    assert keys and all(k.startswith("%R~") for k in keys)
    assert set(granted) == REVIEWED_STATUS_COMMANDS | select


def _docs_blocks() -> tuple[str, list[str]]:
    text = DOCS.read_text()
    config = re.search(r"<!-- acl-example-config -->\s*```yaml\n(.*?)```", text, re.S)
    lines = re.search(r"<!-- acl-example-lines -->\s*```\n(.*?)```", text, re.S)
    assert config and lines, "docs/security.md lost its marked example blocks"
    return config.group(1), [line.strip() for line in lines.group(1).splitlines() if line.strip()]


def test_the_documented_acl_lines_are_the_derived_ones(tmp_path: Path) -> None:
    config, lines = _docs_blocks()
    path = tmp_path / "streamsync.yaml"
    path.write_text(config)
    settings = load_settings(path, environ={})
    assert lines == [
        acl.acl_setuser(settings, "streamsync"),
        acl.acl_setuser(settings, "streamsync-status", read_only=True),
    ]


# -- a real server with ACL users --------------------------------------------------------------


@dataclass
class AclServer:
    server: RedisServer
    admin: redis.Redis

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.server.port}/{db}"

    def create_user(self, settings: Settings, user: str, password: str, **kw: Any) -> None:
        self.admin.execute_command(
            "ACL", "SETUSER", user, "reset", "on", ">" + password,
            *acl.acl_rules(settings, **kw),
        )  # fmt: skip

    def as_user(self, user: str, password: str, db: int = 0) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.server.port,
            db=db,
            username=user,
            password=password,
            **NO_SETINFO,
        )


@pytest.fixture
def acl_server(tmp_path: Path) -> Iterator[AclServer]:
    """A redis-server of this test's own whose default user needs a password."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    bootstrap = redis.Redis(host="127.0.0.1", port=server.port)
    bootstrap.execute_command("ACL", "SETUSER", "default", "on", "resetpass", ">" + ADMIN_PASSWORD)
    bootstrap.close()
    admin = redis.Redis(host="127.0.0.1", port=server.port, password=ADMIN_PASSWORD)
    anonymous = redis.Redis(host="127.0.0.1", port=server.port)
    try:
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
    finally:
        anonymous.close()
    try:
        yield AclServer(server, admin)
    finally:
        admin.close()
        server.stop()


USERS = "app.public.users"
ORDERS = "app.public.orders"

RULES: list[dict[str, Any]] = [
    {"table": "public.users", "key": "user:{id}", "type": "hash", "fields": ["id", "name", "plan"]},
    {"table": "public.users", "key": "plan:{plan}:users", "type": "set", "member": "{id}"},
    {
        "table": "public.users",
        "key": "user_scores",
        "type": "zset",
        "member": "user:{id}",
        "score": "score",
    },
    {
        "table": "public.users",
        "key": "feed:{plan}",
        "type": "list",
        "value": "json",
        "fields": ["id", "name"],
        "max_len": 10,
    },
    {"table": "public.users", "key": "changes:users", "type": "stream", "fields": ["id", "plan"]},
    {"table": "public.users", "key": "page:user:{id}", "mode": "invalidate"},
    {"table": "public.users", "key": "email:{email|lower}", "type": "string", "value": "{id}"},
    {"table": "public.orders", "key": "order:{id}", "type": "hash"},
]


def worker_config(
    tmp_path: Path,
    url: str,
    *,
    prefix: bool = False,
    password: str = WORKER_PASSWORD,
    **redis_kw: Any,
) -> Path:
    (tmp_path / "worker.pw").write_text(password + "\n")
    source: dict[str, Any] = {"stream_prefix": "app."} if prefix else {"streams": [USERS, ORDERS]}
    data = {
        "redis": {"url": url, "username": "streamsync", "password_file": "worker.pw", **redis_kw},
        "source": source,
        "worker": {
            "block_ms": 100,
            "claim_idle_ms": 500,
            "claim_interval_ms": 200,
            "trim_interval_ms": 200,
            "max_deliveries": 2,
        },
        "rules": RULES,
    }
    return write(tmp_path, data)


def user(id_: int, name: str, plan: str, score: Any, email: str) -> dict[str, Any]:
    return {"id": id_, "name": name, "plan": plan, "score": score, "email": email}


def add_truncate(r: redis.Redis, stream: str, table: str, lsn: int) -> None:
    xadd(r, stream, entry_fields(None, envelope("t", table, lsn)))


def seed(r: redis.Redis) -> None:
    """What Debezium would have written: changes, TRUNCATEs, and two entries that cannot apply."""
    r.set("page:user:1", "<html>")  # cache-aside pages the application filled
    r.set("page:user:3", "<html>")
    add_change(r, USERS, "c", user(1, "a", "pro", 10, "A@X.io"), lsn=10)
    add_change(r, USERS, "c", user(2, "b", "free", 20, "b@x.io"), lsn=11)
    add_truncate(r, USERS, "public.users", 12)
    add_change(r, USERS, "c", user(3, "c", "pro", 30, "C@x.io"), lsn=13)
    add_change(r, USERS, "c", user(4, "d", "free", 40, "d@x.io"), lsn=14)
    add_change(r, USERS, "u", user(3, "c2", "free", 35, "C@x.io"), lsn=15)
    add_change(r, USERS, "d", user(4, "d", "free", 40, "d@x.io"), lsn=16)
    r.xadd(USERS, {'{"id":9}': "this is not json"})
    add_change(r, USERS, "c", user(5, "e", "pro", "lots", "e@x.io"), lsn=17)
    for i in (1, 2):
        add_change(r, ORDERS, "c", {"id": i, "total": "9.99"}, lsn=10 + i, table="public.orders")
    add_truncate(r, ORDERS, "public.orders", 13)
    add_change(r, ORDERS, "c", {"id": 3, "total": "1.50"}, lsn=14, table="public.orders")


def settled(r: redis.Redis) -> bool:
    """Every seeded entry applied, dead-lettered or acknowledged."""
    try:
        idle = all(r.xpending(s, "streamsync")["pending"] == 0 for s in (USERS, ORDERS))
        groups = all(r.xinfo_groups(s)[0]["lag"] == 0 for s in (USERS, ORDERS))
    except (redis.ResponseError, IndexError):
        return False  # no group yet
    return idle and groups and r.xlen(USERS + ":dlq") == 2


def check_results(r: redis.Redis) -> None:
    assert r.hgetall("user:3") == {b"id": b"3", b"name": b"c2", b"plan": b"free"}
    assert not any(r.exists(f"user:{i}") for i in (1, 2, 4, 5))
    assert r.smembers("plan:free:users") == {b"3"} and not r.exists("plan:pro:users")
    assert r.zrange("user_scores", 0, -1, withscores=True) == [(b"user:3", 35.0)]
    assert [orjson.loads(v) for v in r.lrange("feed:free", 0, -1)] == [{"id": 3, "name": "c2"}]
    assert not r.exists("feed:pro")
    assert r.get("email:c@x.io") == b"3"
    assert not any(r.exists(f"email:{c}@x.io") for c in "abde")
    assert not r.exists("page:user:1") and not r.exists("page:user:3")
    events = [fields for _, fields in xrange(r, "changes:users")]
    assert Counter(f[b"op"] for f in events) == {b"c": 4, b"u": 1, b"d": 1, b"t": 1}
    assert {b"op": b"u", b"table": b"public.users", b"id": b"3", b"plan": b"free"}.items() <= (
        next(f for f in events if f[b"op"] == b"u").items()
    )
    assert r.hgetall("order:3") == {b"id": b"3", b"total": b"1.50"}
    assert not r.exists("order:1") and not r.exists("order:2")
    reasons = [f[b"reason"].decode() for _, f in xrange(r, USERS + ":dlq")]
    assert len(reasons) == 2, reasons
    assert "not valid JSON" in reasons[0] and "is not numeric" in reasons[1], reasons
    for stream in (USERS, ORDERS):
        assert r.xpending(stream, "streamsync")["pending"] == 0


@pytest.mark.parametrize(
    ("prefix", "db"), [(False, 0), (True, 3)], ids=["streams-db0", "prefix-db3"]
)
def test_worker_runs_as_the_least_privileged_user(
    acl_server: AclServer, tmp_path: Path, prefix: bool, db: int
) -> None:
    admin = redis.Redis(
        host="127.0.0.1", port=acl_server.server.port, db=db, password=ADMIN_PASSWORD
    )
    seed(admin)
    cfg = worker_config(tmp_path, acl_server.url(db), prefix=prefix)
    settings = load_settings(cfg, environ={})
    acl_server.create_user(settings, "streamsync", WORKER_PASSWORD)
    acl_server.admin.acl_log_reset()
    worker = Worker(settings, consumer="w1", drain=True)
    assert worker.run() == ExitCode.OK
    denied = acl_server.admin.acl_log()
    assert denied == [], denied  # not one NOPERM, from the worker nor from its functions
    outcomes: Counter[str] = Counter()
    for (_, _, _, outcome), n in worker.counts.items():
        outcomes[outcome] += n
    assert outcomes["dead_lettered"] == 2 and "failed" not in outcomes, outcomes
    check_results(admin)
    assert admin.hgetall(f"streamsync:stats:streamsync:{USERS}")  # status counters written
    admin.close()


def test_resync_runs_as_the_worker_user(acl_server: AclServer, tmp_path: Path) -> None:
    from streamsync import resync  # noqa: PLC0415

    admin = acl_server.admin
    seed(admin)
    settings = load_settings(worker_config(tmp_path, acl_server.url()), environ={})
    acl_server.create_user(settings, "streamsync", WORKER_PASSWORD)
    admin.acl_log_reset()
    assert Worker(settings, consumer="w1", drain=True).run() == ExitCode.OK
    client = connection.client(settings.redis)
    try:
        (mark,) = resync.start(client, settings, ["public.orders"])
        assert mark.epoch == 1
        # the restored database's re-snapshot: lower positions, yet they overwrite
        add_change(admin, ORDERS, "r", {"id": 7, "total": "7.00"}, lsn=1, table="public.orders")
        assert Worker(settings, consumer="w1", drain=True).run() == ExitCode.OK
        assert resync.finish(client, settings, "public.orders", 30) == 1  # order:3 is gone
    finally:
        client.close()
    assert admin.hgetall("order:7") == {b"id": b"7", b"total": b"7.00"}
    assert not admin.exists("order:3")
    assert admin.acl_log() == []


def runnable_commands(admin: redis.Redis, user: str) -> set[str]:
    """Every command and subcommand (``xinfo|stream``) ``user`` may run, as Redis itself decides
    (``ACL DRYRUN`` of each command the server has, with as many arguments as it needs)."""
    table = raw(admin, "COMMAND")
    assert isinstance(table, list)
    candidates: list[tuple[str, int]] = []
    for info in table:
        name, arity, subcommands = info[0], info[1], info[9]
        for entry in subcommands or [info]:
            candidates.append((as_bytes(entry[0]).decode(), as_int(entry[1])))
        assert subcommands or as_bytes(name).decode() == candidates[-1][0]
    assert len(candidates) > 200, "COMMAND lists too few commands to prove anything"
    pipe = admin.pipeline(transaction=False)
    for name, arity in candidates:
        words = name.split("|")
        padding = [USERS] * max(abs(arity) - len(words), 0)
        pipe.execute_command("ACL", "DRYRUN", user, *words, *padding)
    runnable: set[str] = set()
    for (name, _), reply in zip(candidates, pipe.execute(raise_on_error=False), strict=True):
        assert not isinstance(reply, Exception), (name, reply)
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        # allowed, though maybe not on this key: "... no permissions to access the 'k' key"
        if f"no permissions to run the '{name}' command" not in text:
            runnable.add(name)
    return runnable


def test_redis_lets_the_users_run_exactly_the_reviewed_commands(
    acl_server: AclServer, tmp_path: Path
) -> None:
    settings = load_settings(worker_config(tmp_path, acl_server.url()), environ={})
    acl_server.create_user(settings, "streamsync", WORKER_PASSWORD)
    acl_server.create_user(settings, "streamsync-status", STATUS_PASSWORD, read_only=True)
    worker = runnable_commands(acl_server.admin, "streamsync") - ALWAYS_RUNNABLE
    assert worker == REVIEWED_WORKER_COMMANDS | REVIEWED_LIBRARY_COMMANDS
    status = runnable_commands(acl_server.admin, "streamsync-status") - ALWAYS_RUNNABLE
    assert status == REVIEWED_STATUS_COMMANDS
    # and no channel: -@all denies PUBLISH, resetchannels any pattern
    user = acl_server.admin.acl_getuser("streamsync")
    assert user is not None and user["channels"] == []


def test_the_worker_user_can_touch_nothing_else(acl_server: AclServer, tmp_path: Path) -> None:
    settings = load_settings(worker_config(tmp_path, acl_server.url()), environ={})
    acl_server.create_user(settings, "streamsync", WORKER_PASSWORD)
    acl_server.admin.set("secret:1", "x")
    ensure_library(acl_server.admin)
    w = acl_server.as_user("streamsync", WORKER_PASSWORD)
    try:
        w.hset("user:1", "name", "allowed")  # inside its patterns
        assert w.xadd(USERS + ":dlq", {"reason": "test"})
        refused: list[tuple[str, ...]] = [
            ("GET", "secret:1"),
            ("SET", "other:1", "x"),
            ("DEL", "secret:1"),
            ("XADD", "app.private.salaries", "*", "k", "v"),
            ("HGETALL", "session:1"),
            ("FLUSHALL",),
            ("FLUSHDB",),
            ("KEYS", "*"),
            ("CONFIG", "GET", "requirepass"),
            ("CONFIG", "SET", "appendonly", "no"),
            ("ACL", "LIST"),
            ("FUNCTION", "DELETE", "streamsync"),
            ("FUNCTION", "FLUSH"),
            ("EVAL", "return 1", "0"),
            ("SHUTDOWN",),
            ("CLIENT", "LIST"),
            ("CLIENT", "KILL", "TYPE", "normal"),
            ("XGROUP", "DESTROY", USERS, "streamsync"),
            ("SUBSCRIBE", "news"),
            ("SELECT", "1"),
        ]
        for command in refused:
            with pytest.raises(redis.exceptions.NoPermissionError):
                w.execute_command(*command)
        # the Functions library runs with the caller's permissions: no way around the patterns
        with pytest.raises(redis.ResponseError, match=r"(?i)no permissions|noperm"):
            w.fcall("streamsync_trim", 1, "secret:1")
        assert acl_server.admin.get("secret:1") == b"x"
    finally:
        w.close()


def test_the_status_user_reads_and_cannot_write(acl_server: AclServer, tmp_path: Path) -> None:
    admin = acl_server.admin
    seed(admin)
    settings = load_settings(worker_config(tmp_path, acl_server.url()), environ={})
    acl_server.create_user(settings, "streamsync", WORKER_PASSWORD)
    assert Worker(settings, consumer="w1", drain=True).run() == ExitCode.OK
    acl_server.create_user(settings, "streamsync-status", STATUS_PASSWORD, read_only=True)
    admin.acl_log_reset()
    s = acl_server.as_user("streamsync-status", STATUS_PASSWORD)
    try:
        # what a status report reads
        assert s.ping()
        assert s.xlen(USERS) >= 0 and s.xlen(USERS + ":dlq") == 2
        assert s.xinfo_stream(USERS)["length"] >= 0
        assert [g["name"] for g in s.xinfo_groups(USERS)] == [b"streamsync"]
        # the drained worker stopped cleanly with nothing pending: it left the group
        assert s.xinfo_consumers(USERS, "streamsync") == []
        assert s.xpending(USERS, "streamsync")["pending"] == 0
        assert len(s.xrevrange(USERS + ":dlq", count=10) or []) == 2
        assert s.hgetall(f"streamsync:stats:streamsync:{USERS}")
        assert s.hgetall("streamsync:epochs") == {}
        assert s.fcall_ro("streamsync_version", 0)
        assert s.time() and s.info("memory")
        assert sorted(s.scan_iter(match="app.*", _type="stream")) == [
            ORDERS.encode(),
            USERS.encode(),
            (USERS + ":dlq").encode(),
        ]
        assert admin.acl_log() == []
        report = status.collect(s, settings)
        assert [st.name for st in report.streams] == [USERS, ORDERS]
        assert report.notes == ()  # nothing was refused: TIME and INFO included
        assert admin.acl_log() == []
        refused: list[tuple[Any, ...]] = [
            ("XADD", USERS, "*", "k", "v"),
            ("XACK", USERS, "streamsync", "0-1"),
            ("XTRIM", USERS, "MAXLEN", "0"),
            ("HSET", f"streamsync:stats:streamsync:{USERS}", "x", "1"),
            ("DEL", "streamsync:epochs"),
            ("HGETALL", "user:3"),  # the cache itself is none of its business
            ("FCALL", "streamsync_trim", "1", USERS),
            ("FUNCTION", "LOAD", "#!lua name=x\nredis.register_function('f', function() end)"),
            ("FLUSHALL",),
        ]
        for command in refused:
            with pytest.raises(redis.exceptions.NoPermissionError):
                s.execute_command(*command)
    finally:
        s.close()


# -- the password never reaches the logs -------------------------------------------------------


def test_no_log_line_holds_the_password(
    acl_server: AclServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    admin = acl_server.admin
    seed(admin)
    wrong, right = "wrong-pw-0a1b2c", "right-pw-3d4e5f"
    cfg = worker_config(tmp_path, acl_server.url(), password=wrong)
    settings = load_settings(cfg, environ={})
    acl_server.create_user(settings, "streamsync", right)
    worker = Worker(settings, consumer="w1")
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        # refused: the worker's password is not the user's
        wait_until(lambda: worker.reconnects >= 2, timeout=30, message="failed logins")
        assert "invalid username-password pair" in caplog.text
        # the operator fixes the user's password; the next attempt gets in and applies
        admin.execute_command("ACL", "SETUSER", "streamsync", "resetpass", ">" + wrong)
        wait_until(lambda: settled(admin), timeout=30, message="everything applied")
        # a dropped connection: the worker logs in again
        before = worker.reconnects
        wait_until(lambda: admin.client_kill_filter(user="streamsync") > 0, message="worker killed")
        add_change(admin, ORDERS, "c", {"id": 4, "total": "2"}, lsn=20, table="public.orders")
        wait_until(lambda: admin.exists("order:4") == 1, timeout=30, message="applied again")
        assert worker.reconnects > before
    finally:
        worker.request_stop()
        thread.join(timeout=30)
    assert not thread.is_alive()
    check_results(admin)
    assert caplog.records
    for record in caplog.records:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        for secret in (wrong, right, ADMIN_PASSWORD):
            assert secret not in text, (record.levelname, text)
    for secret in (wrong, right):
        assert secret not in caplog.text


# -- TLS against a real server -----------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _make_pki(directory: Path) -> Pki:
    # pip install -e '.[test]' brings it; the TLS tests need it for their certificates
    require(module_missing("cryptography", "pip install -e '.[test]'"))
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def save_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return path

    def save_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def issue(
        ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str, server: bool
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return key, builder.sign(ca_key, hashes.SHA256())

    ca_key, ca_cert = make_ca("streamsync test CA")
    server_key, server_cert = issue(ca_key, ca_cert, "localhost", server=True)
    client_key, client_cert = issue(ca_key, ca_cert, "streamsync", server=False)
    _, other_cert = make_ca("some other CA")
    return Pki(
        ca=save_cert(ca_cert, directory / "ca.pem"),
        server_cert=save_cert(server_cert, directory / "server.pem"),
        server_key=save_key(server_key, directory / "server.key"),
        client_cert=save_cert(client_cert, directory / "client.pem"),
        client_key=save_key(client_key, directory / "client.key"),
        other_ca=save_cert(other_cert, directory / "other-ca.pem"),
    )


@dataclass
class TlsServer:
    server: RedisServer
    tls_port: int
    pki: Pki


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[TlsServer]:
    """A redis-server answering TLS (client certificates required) on a port of its own; its
    plain port serves the readiness probe and the test's own seeding."""
    pki = _make_pki(tmp_path / "tls")
    tls_port = free_port()
    server = RedisServer(
        tmp_path / "redis-tls",
        extra_args=[
            "--tls-port", str(tls_port),
            "--tls-cert-file", str(pki.server_cert),
            "--tls-key-file", str(pki.server_key),
            "--tls-ca-cert-file", str(pki.ca),
            "--tls-auth-clients", "yes",
        ],
    )  # fmt: skip
    try:
        server.start()
    except RedisServerError as exc:
        if re.search(r"(?i)tls|bad directive|unrecognized", str(exc)):
            skip_unless_ci(f"this redis-server has no TLS support: {str(exc).splitlines()[0]}")
        raise
    try:
        yield TlsServer(server, tls_port, pki)
    finally:
        server.stop()


def test_worker_over_tls_with_a_client_certificate(tls_server: TlsServer, tmp_path: Path) -> None:
    plain = tls_server.server.client()
    seed(plain)
    cfg_dir = tmp_path / "conf"
    cfg_dir.mkdir()
    (cfg_dir / "tls").symlink_to(tls_server.pki.ca.parent)
    url = f"rediss://127.0.0.1:{tls_server.tls_port}/0"
    base = {
        "source": {"streams": [USERS, ORDERS]},
        "worker": {"block_ms": 100, "max_deliveries": 2, "claim_interval_ms": 200},
        "rules": RULES,
    }
    tls = {
        "tls_ca_file": "tls/ca.pem",
        "tls_cert_file": "tls/client.pem",
        "tls_key_file": "tls/client.key",
    }
    cfg = write(cfg_dir, {**base, "redis": {"url": url, **tls}})
    settings = load_settings(cfg, environ={})
    assert settings.redis.tls_ca_file == cfg_dir / "tls" / "ca.pem"
    assert Worker(settings, consumer="w1", drain=True).run() == ExitCode.OK
    check_results(plain)

    def ping(**section: Any) -> None:
        path = write(cfg_dir, {**base, "redis": {"url": url, **section}}, "probe.yaml")
        client = connection.client(load_settings(path, environ={}).redis)
        try:
            client.ping()
        finally:
            client.close()

    ping(**tls)
    # the server's certificate is checked against the CA given, not any
    with pytest.raises(redis.ConnectionError, match=r"(?i)certificate verify failed"):
        ping(**{**tls, "tls_ca_file": str(tls_server.pki.other_ca)})
    # without verification any server certificate passes (tests only), still with our own
    ping(**{**tls, "tls_ca_file": str(tls_server.pki.other_ca), "tls_verify": False})
    # the server requires a client certificate
    with pytest.raises(redis.ConnectionError):
        ping(tls_ca_file="tls/ca.pem")
    # and plain text gets nowhere on the TLS port
    with pytest.raises(redis.ConnectionError):
        plain_url = url.replace("rediss://", "redis://")
        client = redis.Redis.from_url(plain_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
