"""The cache in a Redis of its own (``target:``): the configuration section, and a worker, its
TRUNCATE and resync paths and the operator commands on two real redis-servers (streams on the
session server, the cache on a second one), the target restarted under a running worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from streamsync.config import (
    REDIS_PASSWORD_ENV,
    TARGET_PASSWORD_ENV,
    TARGET_URL_ENV,
    load_settings,
)
from streamsync.errors import ConfigError

SECRET = "target-Secret-5e1"

BASE: dict[str, Any] = {
    "redis": {"url": "redis://10.0.0.1:6379/0"},
    "source": {"streams": ["app.public.users"]},
    "rules": [{"table": "public.users", "key": "user:{id}", "type": "hash"}],
}


def write(tmp_path: Path, data: dict[str, Any], name: str = "streamsync.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def with_target(**target: Any) -> dict[str, Any]:
    return {**BASE, "target": target}


# -- the configuration ---------------------------------------------------------------------------


def test_without_a_target_the_cache_is_in_the_streams_redis(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, BASE), environ={})
    assert settings.target is None
    assert settings.cache_redis is settings.redis


def test_a_target_takes_the_keys_of_redis(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "cache.pw").write_text(SECRET + "\n")
    cfg = write(
        tmp_path,
        with_target(
            url="rediss://cache.example:6380/1",
            username="cache",
            password_file="secrets/cache.pw",
            tls_ca_file="ca.pem",
            socket_timeout_s=3,
        ),
    )
    settings = load_settings(cfg, environ={REDIS_PASSWORD_ENV: "streams-pw"})
    target = settings.target
    assert target is not None and settings.cache_redis is target
    assert target.url == "rediss://cache.example:6380/1" and target.username == "cache"
    assert target.password is not None and target.password.get_secret_value() == SECRET
    assert target.tls_ca_file == tmp_path / "ca.pem" and target.socket_timeout_s == 3
    # each section keeps its own password
    assert settings.redis.password is not None
    assert settings.redis.password.get_secret_value() == "streams-pw"
    assert SECRET not in repr(settings) and SECRET not in settings.model_dump_json()


def test_the_target_environment_variables(tmp_path: Path) -> None:
    cfg = write(tmp_path, with_target(url="redis://10.0.0.2:6379/0", password_file="absent.pw"))
    settings = load_settings(cfg, environ={TARGET_PASSWORD_ENV: SECRET})
    assert settings.target is not None and settings.target.password is not None
    assert settings.target.password.get_secret_value() == SECRET
    assert settings.redis.password is None
    # the URL variable overrides the file's, and may carry the password
    env = {TARGET_URL_ENV: f"redis://app:{SECRET}@10.0.0.3:6381/2"}
    settings = load_settings(cfg, environ={**env, TARGET_PASSWORD_ENV: "wins"})
    assert settings.target is not None and settings.target.url == "redis://app@10.0.0.3:6381/2"
    assert settings.target.password is not None
    assert settings.target.password.get_secret_value() == "wins"
    # and names a target where the file has none
    settings = load_settings(write(tmp_path, BASE, "plain.yaml"), environ=env)
    assert settings.target is not None and settings.target.url == "redis://app@10.0.0.3:6381/2"
    assert settings.redis.url == "redis://10.0.0.1:6379/0"


def test_a_target_password_without_a_target_is_an_error(tmp_path: Path) -> None:
    cfg = write(tmp_path, BASE)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={TARGET_PASSWORD_ENV: SECRET})
    text = str(info.value)
    assert text.startswith(f"{cfg}: target: {TARGET_PASSWORD_ENV} is set, but")
    assert SECRET not in text


@pytest.mark.parametrize(
    ("section", "field", "message"),
    [
        ({"url": "redis://10.0.0.2/0", "password": SECRET}, "target.password", "does not belong"),
        ({"url": f"redis://u:{SECRET}@10.0.0.2/0"}, "target.url", "holds a password"),
    ],
)
def test_a_target_password_in_the_file_is_refused(
    tmp_path: Path, section: dict[str, Any], field: str, message: str
) -> None:
    cfg = write(tmp_path, {**BASE, "target": section})
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    text = str(info.value)
    assert f"{cfg}: {field}: " in text and message in text
    assert "target.password_file" in text and TARGET_PASSWORD_ENV in text
    assert SECRET not in text


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"username": "cache"}, "target: needs a 'url'"),
        ({"url": "http://10.0.0.2/0"}, "target.url: must start with redis://"),
        ({"url": "redis://10.0.0.2/0", "tls_verify": False}, "target.tls_verify: false turns"),
        ({"url": "redis://10.0.0.2/0", "socket_timeout_s": SECRET}, "target.socket_timeout_s:"),
        ({"url": "redis://10.0.0.2/0", "db": 1}, "target.db: unknown field"),
    ],
)
def test_target_errors_name_the_file_and_the_field(
    tmp_path: Path, section: dict[str, Any], expected: str
) -> None:
    cfg = write(tmp_path, {**BASE, "target": section})
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert f"{cfg}: {expected}" in str(info.value)
    assert SECRET not in str(info.value)  # values of the section are never echoed


def test_an_unreadable_target_password_file_names_the_field(tmp_path: Path) -> None:
    cfg = write(tmp_path, with_target(url="redis://10.0.0.2/0", password_file="missing.pw"))
    with pytest.raises(ConfigError, match=r"target\.password_file: cannot read .*missing\.pw"):
        load_settings(cfg, environ={})
