"""Whether the target Redis loads the RedisJSON module, and what ``json`` rules write there:
``encoding: auto`` (the default) writes RedisJSON documents when the module is loaded when the
worker connects, JSON text otherwise; ``redisjson`` requires the module; ``text`` never uses it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from typing import Any

import redis

from streamsync.config import JsonEncoding, Rule, Settings, TargetType
from streamsync.errors import ConfigError

log = logging.getLogger(__name__)

#: The name ``MODULE LIST`` gives the RedisJSON module.
MODULE_NAME = "rejson"


def _names(modules: Iterable[Any]) -> set[str]:
    names = set()
    for module in modules:
        name = module.get(b"name", module.get("name", b"")) if isinstance(module, dict) else b""
        names.add((name.decode() if isinstance(name, bytes) else str(name)).lower())
    return names


def module_loaded(client: redis.Redis | redis.RedisCluster) -> bool:
    """Whether the Redis (every primary of a Cluster) loads the RedisJSON module."""
    if isinstance(client, redis.RedisCluster):
        return all(
            MODULE_NAME in _names(client.execute_command("MODULE LIST", target_nodes=node))
            for node in client.get_primaries()
        )
    return MODULE_NAME in _names(client.execute_command("MODULE LIST"))


def permitted(client: redis.Redis | redis.RedisCluster, probe: str) -> bool:
    """Whether this connection's ACL user may run the RedisJSON commands the library runs:
    writes, reads and deletes the key ``probe`` (a key of streamsync's own)."""
    send: Any = client
    try:
        send.execute_command("JSON.SET", probe, "$", "0")
        send.execute_command("JSON.GET", probe)
    except redis.exceptions.NoPermissionError:
        return False
    finally:
        with contextlib.suppress(redis.exceptions.NoPermissionError):
            client.delete(probe)
    return True


def target_loads_it(
    settings: Settings, client: redis.Redis | redis.RedisCluster, probe: str
) -> bool:
    """Whether json rules of ``settings`` can write RedisJSON documents in the target
    ``client`` reaches: the module is loaded and this user may run its commands (False without
    json rules: the target is not asked). Refuses rules that require it where they cannot."""
    if not json_rules(settings):
        return False
    loaded = module_loaded(client)
    if loaded and not permitted(client, probe):
        log.warning(
            "the target loads RedisJSON, but this ACL user may not run JSON.SET and JSON.GET"
            " (streamsync acl --redisjson grants them): json rules with encoding auto write text"
        )
        loaded = False
    check(settings, loaded)
    return loaded


def json_rules(settings: Settings) -> list[Rule]:
    """The write-through ``json`` rules."""
    return [rule for rule in settings.rules if rule.type is TargetType.JSON]


def check(settings: Settings, loaded: bool) -> None:
    """Refuse rules that require the module on a target without it."""
    if loaded:
        return
    wanting = [
        f"rules[{i}].encoding"
        for i, rule in enumerate(settings.rules)
        if rule.type is TargetType.JSON and rule.encoding is JsonEncoding.REDISJSON
    ]
    if wanting:
        raise ConfigError(
            f"{', '.join(wanting)}: redisjson, but the target Redis does not load the RedisJSON"
            " module, or this ACL user may not run JSON.SET and JSON.GET (load it, e.g."
            " redis-server --loadmodule /path/to/rejson.so; grant them, streamsync acl"
            " --redisjson; or set encoding: auto or text)"
        )


def encodings(settings: Settings, loaded: bool) -> dict[str, str]:
    """Per ``json`` rule (its state name), the encoding it writes with: ``redisjson`` or
    ``text``."""
    return {
        rule.state_name: (
            JsonEncoding.REDISJSON.value
            if rule.stores_redisjson(loaded)
            else JsonEncoding.TEXT.value
        )
        for rule in json_rules(settings)
    }
