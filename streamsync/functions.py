"""Load and verify the streamsync Functions library (lua/streamsync.lua) in Redis."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import redis

from streamsync.errors import LibraryIncompatibleError

log = logging.getLogger(__name__)

VERSION_FUNCTION = "streamsync_version"

_VERSION_RE = re.compile(r"^local VERSION = '(\d+)\.(\d+)\.(\d+)'$", re.MULTILINE)

Version = tuple[int, int, int]


@cache
def library_source() -> str:
    """The library's Lua source: from the wheel, or from the source tree in a checkout."""
    packaged = resources.files("streamsync").joinpath("lua/streamsync.lua")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    checkout = Path(__file__).resolve().parent.parent / "lua" / "streamsync.lua"
    return checkout.read_text(encoding="utf-8")


def parse_version(text: str) -> Version:
    """``"1.2.3"`` -> ``(1, 2, 3)``; ValueError otherwise."""
    parts = text.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a MAJOR.MINOR.PATCH version: {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


@cache
def library_version() -> Version:
    """The version of the library this package ships."""
    match = _VERSION_RE.search(library_source())
    if not match:
        raise RuntimeError("lua/streamsync.lua has no `local VERSION = 'X.Y.Z'` line")
    return int(match[1]), int(match[2]), int(match[3])


Execute = Callable[..., Any]


def loaded_version(client: redis.Redis) -> Version | None:
    """The version of the library loaded in Redis, or None when there is none."""
    return _loaded(client.execute_command)


def _loaded(execute: Execute) -> Version | None:
    try:
        reply = execute("FCALL_RO", VERSION_FUNCTION, 0)
    except redis.ResponseError as exc:
        if "function not found" in str(exc).lower():
            return None
        raise
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    return parse_version(text)


def ensure_library(client: redis.Redis | redis.RedisCluster) -> Version:
    """Load the shipped library unless Redis holds a newer compatible one; return the version
    in use. Raises LibraryIncompatibleError when Redis holds a newer major version: this worker
    is too old for it and must not downgrade it under newer workers. In a Redis Cluster, on
    every primary (a replica gets it from its primary)."""
    if isinstance(client, redis.RedisCluster):
        cluster = client
        versions = [
            _ensure(functools.partial(cluster.execute_command, target_nodes=node))
            for node in cluster.get_primaries()
        ]
        return min(versions)
    return _ensure(client.execute_command)


def _ensure(execute: Execute) -> Version:
    ours = library_version()
    current = _loaded(execute)
    if current is not None and current > ours:
        if current[0] != ours[0]:
            raise LibraryIncompatibleError(
                f"Redis holds streamsync library {_fmt(current)}, incompatible with this "
                f"worker's {_fmt(ours)}: upgrade streamsync"
            )
        log.info("keeping newer compatible library %s (ours is %s)", _fmt(current), _fmt(ours))
        return current
    if current == ours:
        # already there (loaded by another worker, or by an operator, so that the workers'
        # ACL can go without FUNCTION LOAD)
        return ours
    execute("FUNCTION", "LOAD", "REPLACE", library_source())
    if current != ours:
        log.info(
            "loaded streamsync library %s (was %s)",
            _fmt(ours),
            _fmt(current) if current else "absent",
        )
    return ours


def _fmt(version: Version) -> str:
    return ".".join(map(str, version))
