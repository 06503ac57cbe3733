"""The least-privilege Redis ACL a configuration needs (``streamsync acl``): the key patterns
of its streams, streamsync's records and the rules' keys, and the reviewed command sets the
worker, its Functions library and ``streamsync status`` send.

With a ``target`` section the cache has a Redis of its own, and each Redis gets a user of its
own: the streams' (streams, dead letters, epochs, counters, liveness marks; the library's stream
functions) and the target's (the rules' keys and their bookkeeping; the batch calls)."""

from __future__ import annotations

from redis.connection import parse_url

from streamsync.config import JsonEncoding, Settings, TargetType
from streamsync.keys import dead_letter_stream, glob_escape
from streamsync.templates import KeyTemplate

#: Commands the worker (and ``streamsync resync``) sends itself.
WORKER_COMMANDS: tuple[str, ...] = (
    "client|setname",  # the connection's name, streamsync:<consumer>
    "ping",
    "info",  # at connect: a Redis Cluster or not (INFO cluster); metrics: INFO memory, stats
    "time",  # metrics
    "xlen",  # metrics
    "xreadgroup",
    "xack",
    "xadd",  # dead letters (<stream>:dlq)
    "xautoclaim",
    "xclaim",
    "xpending",
    "xrange",  # resync --finish: dead letters of the new epoch
    "xgroup|create",
    "xinfo|stream",
    "xinfo|groups",
    "xinfo|consumers",
    "exists",
    "scan",  # stream_prefix discovery; TRUNCATE of invalidate rules (keys the app writes)
    "hkeys",  # TRUNCATE, resync and splits read the rules' buckets
    "hget",
    "hmget",
    "hgetall",  # resync epochs, snapshot marks
    "hincrby",  # status counters
    "hset",
    "set",  # the liveness mark (with a TTL); the expiry lease; the bookkeeping layout marker
    "get",  # the expiry lease; the bookkeeping layout marker (streamsync.layout)
    "pexpire",
    "del",  # the liveness mark, when the worker stops
    "fcall",
    "fcall_ro",
    "function|load",  # the worker loads (and upgrades) its library at start
    "module|list",  # at connect, with json rules: whether the cache's Redis loads RedisJSON
)

#: Commands the Functions library (lua/streamsync.lua) runs on the worker's behalf: Redis checks
#: them, with their keys, against the caller's ACL as if the caller sent them.
LIBRARY_COMMANDS: tuple[str, ...] = (
    "get",
    "set",
    "del",
    "exists",
    "type",
    "pexpire",
    "pttl",  # cache-aside leases: how long another reader's may still hold
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
)

#: Commands the library runs for json rules writing RedisJSON documents: the module's, granted
#: only when the cache's Redis loads it (ACL SETUSER refuses a command a Redis does not know).
REDISJSON_COMMANDS: tuple[str, ...] = ("json.set", "json.get")

#: Commands of a read-only monitoring user (``streamsync status``), on read-only keys.
STATUS_COMMANDS: tuple[str, ...] = (
    "ping",
    "scan",  # stream_prefix discovery
    "type",
    "xlen",
    "xrange",
    "xrevrange",
    "xpending",
    "xinfo|stream",
    "xinfo|groups",
    "xinfo|consumers",
    "hgetall",  # status counters
    "exists",  # the workers' liveness marks; 1.x indexes (streamsync.layout)
    "get",  # the bookkeeping layout marker (streamsync.layout)
    "fcall_ro",  # streamsync_version, a no-writes function
    "time",  # ages on Redis's clock
    "info",  # memory, eviction policy, hit rate
    "module|list",  # what json rules write (RedisJSON or text)
)


#: Of WORKER_COMMANDS, what the worker (and ``resync --finish``, ``dlq replay --direct``) sends
#: a target of its own: no stream command, only the batch calls and the sweeps' index walks.
TARGET_WORKER_COMMANDS: tuple[str, ...] = (
    "client|setname",
    "ping",
    "info",  # at connect: a Redis Cluster or not; every minute: the maxmemory-policy
    "exists",  # sweeps: which per-slot indexes of a cluster exist; 1.x indexes (at connect)
    "get",  # the bookkeeping layout marker (streamsync.layout), read at connect
    "set",  # ... and written once, on a Redis without 1.x bookkeeping
    "scan",  # TRUNCATE of invalidate rules
    "sscan",  # TRUNCATE and resync walk the rules' indexes
    "fcall",
    "fcall_ro",
    "function|load",
    "module|list",
)

#: Of LIBRARY_COMMANDS, those only its stream functions run (streamsync_trim,
#: streamsync_prune_consumer, streamsync_mark_epoch, streamsync_raise_hwm): with a target, in
#: the streams' Redis; the batch calls run the others in the target.
LIBRARY_STREAM_COMMANDS: tuple[str, ...] = (
    "exists",
    "hget",  # epochs, high-water marks
    "hset",
    "xtrim",
    "xpending",
    "xinfo|stream",
    "xinfo|groups",
    "xinfo|consumers",
    "xgroup|delconsumer",
)
#: Of those, the ones no batch call runs.
_STREAM_FUNCTIONS_ONLY = frozenset(LIBRARY_STREAM_COMMANDS) - {"hget", "hset"}

#: What ``streamsync status`` and the metrics read from a target of its own: no cache key, only
#: streamsync's records (read-only).
TARGET_STATUS_COMMANDS: tuple[str, ...] = (
    "ping",
    "info",  # memory, eviction policy, evicted keys, hit rate
    "fcall_ro",  # streamsync_version
    "get",  # the bookkeeping layout marker (streamsync.layout)
    "exists",  # 1.x indexes, when there is no marker
    "module|list",  # what json rules write (RedisJSON or text)
)


def template_glob(template: KeyTemplate) -> str:
    """A key template as a glob matching every key it renders: ``plan:{plan}:users`` ->
    ``plan:*:users``, ``{{t:{tenant}}}:user:{id}`` -> ``{t:*}:user:*``."""
    glob = glob_escape(template.literals[0])
    for literal in template.literals[1:]:
        if not glob.endswith("*"):
            glob += "*"
        glob += glob_escape(literal)
    return glob


def _add(patterns: list[str], pattern: str) -> None:
    if pattern not in patterns:
        patterns.append(pattern)


def acl_stream_patterns(settings: Settings) -> list[str]:
    """Glob patterns of the source streams and their dead-letter streams."""
    source = settings.source
    if source.stream_prefix is not None:
        # the dead-letter streams <stream>:dlq share the prefix
        return [glob_escape(source.stream_prefix) + "*"]
    return [glob_escape(name) for s in source.streams or () for name in (s, dead_letter_stream(s))]


def acl_state_patterns(settings: Settings) -> list[str]:
    """Glob patterns of streamsync's own records: positions, placements, indexes, list order
    and reserve records, resync epochs, status counters."""
    worker = settings.worker
    patterns = [glob_escape(worker.state_prefix) + "*"]
    if not worker.position_prefix.startswith(worker.state_prefix):
        patterns.append(glob_escape(worker.position_prefix) + "*")
    return patterns


def acl_cache_patterns(settings: Settings) -> list[str]:
    """Glob patterns of the keys the rules write (or, for invalidate rules, delete)."""
    patterns: list[str] = []
    for rule in settings.rules:
        _add(patterns, template_glob(rule.template))
    return patterns


def acl_key_patterns(settings: Settings) -> list[str]:
    """Every key pattern the worker needs, derived from the configuration."""
    patterns: list[str] = []
    for pattern in (
        *acl_stream_patterns(settings),
        *acl_state_patterns(settings),
        *acl_cache_patterns(settings),
    ):
        _add(patterns, pattern)
    return patterns


def _user(
    settings: Settings, *, read_only: bool, target: bool, redisjson: bool
) -> tuple[list[str], list[str]]:
    """The key rules and the commands of one user."""
    json = list(REDISJSON_COMMANDS) if redisjson else []
    if target:
        if read_only:
            keys = ["%R~" + p for p in acl_state_patterns(settings)]
            return keys, list(TARGET_STATUS_COMMANDS)
        patterns = [*acl_state_patterns(settings), *acl_cache_patterns(settings)]
        library = [c for c in LIBRARY_COMMANDS if c not in _STREAM_FUNCTIONS_ONLY]
        return ["~" + p for p in patterns], [*TARGET_WORKER_COMMANDS, *library, *json]
    streams = acl_stream_patterns(settings)
    if read_only:
        keys = ["%R~" + p for p in (*streams, *acl_state_patterns(settings))]
        return keys, list(STATUS_COMMANDS)
    if settings.target is None:
        commands = [*WORKER_COMMANDS, *LIBRARY_COMMANDS, *json]
        return ["~" + p for p in acl_key_patterns(settings)], commands
    # the streams' Redis of a configuration with a target: no cache key, no position record
    keys = ["~" + p for p in (*streams, glob_escape(settings.worker.state_prefix) + "*")]
    worker = [c for c in WORKER_COMMANDS if c != "sscan"]
    return keys, [*worker, *LIBRARY_STREAM_COMMANDS]


def acl_rules(
    settings: Settings, *, read_only: bool = False, target: bool = False, redisjson: bool = False
) -> list[str]:
    """The ``ACL SETUSER`` rules of the least-privileged user for ``settings``: the worker's
    (read and write on the streams, streamsync's records and the rules' keys; the commands the
    worker and its Functions library send), or with ``read_only`` a monitoring user's
    (``streamsync status``: read-only keys, read-only commands, no cache keys).

    With a ``target`` section these are the users of the streams' Redis; ``target`` asks for
    those of the cache's Redis instead (ValueError without the section). ``redisjson``: the
    cache's Redis loads the RedisJSON module, so json rules may write RedisJSON documents (a
    rule with ``encoding: redisjson`` implies it).

    They reset the user's keys, channels and commands first, so applying them to an existing
    user replaces its permissions (its passwords and on/off state are left alone).
    """
    if target and settings.target is None:
        raise ValueError("the configuration has no target section: the cache is in redis")
    redisjson = redisjson or any(
        rule.type is TargetType.JSON and rule.encoding is JsonEncoding.REDISJSON
        for rule in settings.rules
    )
    keys, wanted = _user(settings, read_only=read_only, target=target, redisjson=redisjson)
    commands: list[str] = []
    for command in wanted:
        _add(commands, "+" + command)
    where = settings.target if target and settings.target is not None else settings.redis
    if parse_url(where.url).get("db", 0) not in (0, "0"):
        commands.append("+select")  # redis-py selects the URL's database on connect
    return ["resetkeys", *keys, "resetchannels", "-@all", *commands]


def acl_setuser(
    settings: Settings,
    user: str = "streamsync",
    *,
    password: str = "<password>",
    read_only: bool = False,
    target: bool = False,
    redisjson: bool = False,
) -> str:
    """The whole ``ACL SETUSER`` command line for ``user`` (``reset`` first: it replaces
    whatever the user had), as typed in ``redis-cli``; ``target``: for the cache's Redis."""
    words = ["ACL", "SETUSER", user, "reset", "on", ">" + password]
    words += acl_rules(settings, read_only=read_only, target=target, redisjson=redisjson)
    return " ".join(_cli_quote(w) for w in words)


def _cli_quote(word: str) -> str:
    """``word`` as one redis-cli argument."""
    if word and not any(c.isspace() or c in "\"'" for c in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
