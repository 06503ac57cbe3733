"""Validated settings and mapping rules, loaded once from a YAML file.

Every model forbids unknown keys, so a typo is an error that names the file and the field.
"""

from __future__ import annotations

import binascii
import os
import re
from collections.abc import Mapping, Sequence
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from streamsync.errors import ConfigError
from streamsync.filters import RowFilter
from streamsync.keys import dead_letter_stream, is_dead_letter_stream
from streamsync.templates import KeyTemplate

#: Environment variable that overrides ``redis.url``, so credentials can stay out of the file.
REDIS_URL_ENV = "STREAMSYNC_REDIS_URL"
#: Environment variable holding the Redis password; wins over ``redis.password_file``.
REDIS_PASSWORD_ENV = "STREAMSYNC_REDIS_PASSWORD"
#: The same two for the ``target`` section (the Redis holding the cache, when it is another).
TARGET_URL_ENV = "STREAMSYNC_TARGET_URL"
TARGET_PASSWORD_ENV = "STREAMSYNC_TARGET_PASSWORD"
#: Each section describing a Redis, with its URL and password environment variables.
REDIS_SECTIONS: Mapping[str, tuple[str, str]] = {
    "redis": (REDIS_URL_ENV, REDIS_PASSWORD_ENV),
    "target": (TARGET_URL_ENV, TARGET_PASSWORD_ENV),
}

_TABLE_RE = re.compile(r"^[^.\s]+\.[^.\s]+$")

#: The longest TTL, and tombstone window, a configuration may set: about 31 years. The library
#: adds the two in milliseconds in Lua, whose numbers reach Redis as integers only below 10**17.
MAX_TTL_S = 10**9
#: The most entries a list or stream rule, or a dead-letter stream, may keep: a Redis list holds
#: at most 2**32 - 1.
MAX_ENTRIES = 2**32 - 1


def _field_error(model: BaseModel, name: str, message: str) -> ValidationError:
    """A validation error located at ``name`` (a model validator's own errors would otherwise
    name only the model)."""
    return ValidationError.from_exception_data(
        type(model).__name__,
        [
            InitErrorDetails(
                type=PydanticCustomError("value_error", message),
                loc=(name,),
                input=getattr(model, name, None),
            )
        ],
    )


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def split_url_password(url: str) -> tuple[str, str | None]:
    """``url`` without its password, and the password (None when it holds none).

    Both places redis-py reads a password from are looked at: the user info
    (``redis://user:secret@host``, which wins, as in redis-py) and a ``password`` query
    parameter (``unix:///run/redis.sock?password=secret``). A URL without a password comes back
    unchanged.
    """
    parts = urlsplit(url)
    password: str | None = None
    netloc = parts.netloc
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        kept = [(k, v) for k, v in pairs if k != "password"]
        if len(kept) != len(pairs):
            given = [v for k, v in pairs if k == "password"]
            password = given[0] or None
            query = urlencode(kept)
    userinfo, at, hostport = netloc.rpartition("@")
    if at:
        user, colon, secret = userinfo.partition(":")
        if colon:
            if secret:
                password = unquote(secret)
            netloc = f"{user}@{hostport}" if user else hostport
    if netloc == parts.netloc and query == parts.query:
        return url, None
    rebuilt = f"{parts.scheme}://{netloc}{parts.path}"
    if query:
        rebuilt += "?" + query
    if parts.fragment:
        rebuilt += "#" + parts.fragment
    return rebuilt, password


def _url_username(url: str) -> str | None:
    userinfo, at, _ = urlsplit(url).netloc.rpartition("@")
    user = unquote(userinfo.partition(":")[0]) if at else ""
    return user or None


_TLS_FILES = ("tls_ca_file", "tls_cert_file", "tls_key_file")


class RedisSettings(_Model):
    """A Redis streamsync uses (the ``redis`` section: the streams, and the cache unless a
    ``target`` section names another Redis), and how to authenticate to it.

    The password never sits in the configuration file: it comes from ``password_file``, from
    the environment (``STREAMSYNC_REDIS_PASSWORD``, ``STREAMSYNC_TARGET_PASSWORD``), or from a
    URL given in the environment (``STREAMSYNC_REDIS_URL``, ``STREAMSYNC_TARGET_URL``).
    ``load_settings`` resolves it into ``password``, a SecretStr, and ``url`` never keeps it, so
    neither ``repr`` nor ``str`` of the settings can show it.
    """

    # inputs are never echoed in validation errors: a URL may carry a password
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    url: str = "redis://127.0.0.1:6379/0"
    #: The ACL user (Redis 6+); a user named in ``url`` must be the same.
    username: Annotated[str, Field(min_length=1)] | None = None
    #: A file holding the password (its trailing newline is dropped); relative paths are
    #: relative to the configuration file.
    password_file: Path | None = None
    #: The resolved password: set by ``load_settings``, not a key of the configuration file.
    password: SecretStr | None = None
    socket_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    #: TLS (``rediss://`` only): the CA bundle verifying the server, and a client certificate
    #: with its key for servers that require one (``tls-auth-clients``).
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: Verify the server's certificate and host name (turn off for tests only).
    tls_verify: bool = True

    @model_validator(mode="before")
    @classmethod
    def _password_out_of_url(cls, data: Any) -> Any:
        # a password in the URL moves to the SecretStr, so the URL can be shown and logged; an
        # explicit password wins (no error here: it would echo the input, password included)
        if isinstance(data, dict) and isinstance(data.get("url"), str):
            url, password = split_url_password(data["url"])
            if password is not None:
                data = {**data, "url": url}
                if data.get("password") is None:
                    data["password"] = password
        return data

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return url

    @model_validator(mode="after")
    def _consistent(self) -> RedisSettings:
        in_url = _url_username(self.url)
        if self.username is not None and in_url is not None and in_url != self.username:
            raise _field_error(self, "username", f"differs from the user {in_url!r} named in 'url'")
        if not self.tls:
            # without TLS these would be silently ignored; tls_verify: true is the default anyway
            scheme = self.url.partition("://")[0]
            for name in _TLS_FILES:
                if getattr(self, name) is not None:
                    raise _field_error(
                        self,
                        name,
                        f"is for TLS, but a {scheme}:// url uses no TLS: use a rediss:// url,"
                        " or remove it",
                    )
            if not self.tls_verify:
                raise _field_error(
                    self,
                    "tls_verify",
                    f"false turns off TLS certificate checks, but a {scheme}:// url uses no TLS:"
                    " use a rediss:// url, or remove it",
                )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            missing = "tls_key_file" if self.tls_key_file is None else "tls_cert_file"
            raise _field_error(
                self, missing, "is required with the other one (a client certificate and its key)"
            )
        return self

    @property
    def tls(self) -> bool:
        """Whether the connection uses TLS (a ``rediss://`` URL)."""
        return self.url.startswith("rediss://")

    @property
    def effective_username(self) -> str | None:
        """The ACL user the connection authenticates as (None: the default user)."""
        return self.username or _url_username(self.url)


class StreamFormat(StrEnum):
    """How Debezium Server's Redis sink lays out an entry (its ``message.format``)."""

    COMPACT = "compact"
    EXTENDED = "extended"
    AUTO = "auto"


class SourceSettings(_Model):
    """Which streams to consume and how their entries are laid out."""

    streams: tuple[Annotated[str, Field(min_length=1)], ...] | None = None
    stream_prefix: str | None = None
    group: Annotated[str, Field(min_length=1)] = "streamsync"
    start: Literal["0", "$"] = "0"
    format: StreamFormat = StreamFormat.AUTO
    null_marker: Annotated[str, Field(min_length=1)] = "default"
    discover_interval_s: Annotated[float, Field(gt=0)] = 10.0

    @model_validator(mode="after")
    def _one_source(self) -> SourceSettings:
        if (self.streams is None) == (self.stream_prefix is None):
            raise ValueError("set exactly one of 'streams' (a list) or 'stream_prefix'")
        if self.streams is not None:
            if not self.streams:
                raise ValueError("'streams' must name at least one stream")
            if len(set(self.streams)) != len(self.streams):
                raise ValueError("'streams' lists a stream twice")
            if any(is_dead_letter_stream(s) for s in self.streams):
                raise ValueError(
                    f"'streams' must not name a dead-letter stream ({dead_letter_stream('*')})"
                )
        return self


class WorkerSettings(_Model):
    """How the consumer-group loop reads, retries, reclaims and trims."""

    batch_size: Annotated[int, Field(ge=1, le=10_000)] = 500
    block_ms: Annotated[int, Field(ge=1, le=60_000)] = 1000
    claim_idle_ms: Annotated[int, Field(ge=100)] = 30_000
    claim_interval_ms: Annotated[int, Field(ge=100)] = 5_000
    max_deliveries: Annotated[int, Field(ge=1)] = 5
    tombstone_ttl_s: Annotated[int, Field(ge=1, le=MAX_TTL_S)] = 86_400
    trim: bool = True
    trim_interval_ms: Annotated[int, Field(ge=100)] = 5_000
    dlq_max_len: Annotated[int, Field(ge=1, le=MAX_ENTRIES)] = 100_000
    position_prefix: Annotated[str, Field(min_length=1)] = "streamsync:pos:"
    #: Prefix of the other records streamsync keeps: placements, indexes, resync epochs.
    state_prefix: Annotated[str, Field(min_length=1)] = "streamsync:"

    @field_validator("position_prefix", "state_prefix")
    @classmethod
    def _no_braces(cls, prefix: str) -> str:
        if "{" in prefix or "}" in prefix:
            raise ValueError("must not contain '{' or '}' (they would change the hash slot)")
        return prefix


class Mode(StrEnum):
    """What a change does to the cache."""

    WRITE_THROUGH = "write_through"
    INVALIDATE = "invalidate"


class TargetType(StrEnum):
    """The Redis data type a write-through rule maintains."""

    HASH = "hash"
    JSON = "json"
    STRING = "string"
    ZSET = "zset"
    SET = "set"
    LIST = "list"
    STREAM = "stream"


#: Types holding one row per key: the key identifies the row.
SINGLE_VALUE_TYPES = frozenset({TargetType.HASH, TargetType.JSON, TargetType.STRING})


class ListDelete(StrEnum):
    """What a delete (or a row leaving the rule's ``where``) does to a list rule's entries."""

    REMOVE = "remove"
    IGNORE = "ignore"


class ListUpdate(StrEnum):
    """What a newer change of a row already in a list does."""

    PUSH = "push"
    REPLACE = "replace"


#: The ``value`` that stores the whole (selected, renamed) row as a JSON document.
JSON_VALUE = "json"


class JsonEncoding(StrEnum):
    """How a ``json`` rule stores its documents."""

    #: A JSON text in a string key (``GET`` reads it).
    TEXT = "text"
    #: A RedisJSON document (``JSON.GET`` reads it): the target must load the ReJSON module.
    REDISJSON = "redisjson"
    #: RedisJSON when the target loads the module when the worker connects, else text.
    AUTO = "auto"


_NAME_RE = re.compile(r"^[A-Za-z0-9_.:@#/-]+$")

# options each type accepts besides table, mode, key, type, name, where, fields, rename, ttl_s
_TYPE_OPTIONS: Mapping[TargetType, frozenset[str]] = {
    TargetType.HASH: frozenset(),
    TargetType.JSON: frozenset({"encoding"}),
    TargetType.STRING: frozenset({"value"}),
    TargetType.SET: frozenset({"member"}),
    TargetType.ZSET: frozenset({"member", "score"}),
    TargetType.LIST: frozenset({"value", "max_len", "on_delete", "on_update"}),
    TargetType.STREAM: frozenset({"max_len"}),
}
_REQUIRED: Mapping[TargetType, tuple[str, ...]] = {
    TargetType.STRING: ("value",),
    TargetType.SET: ("member",),
    TargetType.ZSET: ("member", "score"),
    TargetType.LIST: ("value",),
}
_OPTIONAL = ("value", "member", "score", "max_len", "on_delete", "on_update", "encoding")


_PATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Nest(_Model):
    """Where a ``json`` rule's rows go inside their parent's document."""

    #: The parent's document, a template over the child's columns (``order:{order_id}``).
    parent_key: str
    #: The member of the parent document holding the children: a map from member to child.
    path: str
    #: The child's key in that map, a template (``{id}``).
    member: str

    @field_validator("parent_key", "member")
    @classmethod
    def _template(cls, template: str) -> str:
        KeyTemplate.parse(template)
        return template

    @field_validator("path")
    @classmethod
    def _path_form(cls, path: str) -> str:
        if not _PATH_RE.match(path):
            raise ValueError(
                "must be a member name: letters, digits and _, not starting with a digit"
            )
        return path


class Rule(_Model):
    """One mapping: changes of ``table`` update the Redis structure named by ``key``."""

    table: str
    mode: Mode = Mode.WRITE_THROUGH
    key: str
    type: TargetType | None = None
    #: A stable name for the rule's state in Redis (placement records and indexes). Derived from
    #: table, type and templates when omitted; set it to keep that state across a template edit.
    name: str | None = None
    #: Optional row filter, e.g. ``active = true and price < 40`` (see streamsync.filters).
    where: str | None = None
    fields: tuple[Annotated[str, Field(min_length=1)], ...] | None = None
    #: Column -> field (or JSON member) name in Redis.
    rename: dict[Annotated[str, Field(min_length=1)], Annotated[str, Field(min_length=1)]] = Field(
        default_factory=dict
    )
    ttl_s: Annotated[int, Field(ge=1, le=MAX_TTL_S)] | None = None
    #: set and zset: the member template, e.g. ``product:{id}``.
    member: str | None = None
    #: zset: the numeric column that scores the member.
    score: Annotated[str, Field(min_length=1)] | None = None
    #: string and list: ``json`` (the whole selected row) or a template such as ``{value}``.
    value: str | None = None
    #: list and stream: keep at most this many entries (newest kept).
    max_len: Annotated[int, Field(ge=1, le=MAX_ENTRIES)] | None = None
    on_delete: ListDelete | None = None
    on_update: ListUpdate | None = None
    #: json: text, redisjson or auto (the default).
    encoding: JsonEncoding | None = None
    #: hash and json: write ``fields`` into the key another rule of the same type owns (a key
    #: template with the same literals), keeping that rule's fields and the other merged ones.
    merge: bool = False
    #: json: each row is a child inside its parent's document (``key`` is ``nest.parent_key``).
    nest: Nest | None = None

    @model_validator(mode="before")
    @classmethod
    def _nest_key(cls, data: Any) -> Any:
        # a nested rule's key is its parent's document: written once, under nest
        if isinstance(data, dict) and isinstance(data.get("nest"), dict) and "key" not in data:
            parent = data["nest"].get("parent_key")
            if isinstance(parent, str):
                return {**data, "key": parent}
        return data

    @field_validator("table")
    @classmethod
    def _table_form(cls, table: str) -> str:
        if not _TABLE_RE.match(table):
            raise ValueError("must be 'schema.table', as in the event's source.schema/source.table")
        return table

    @field_validator("key")
    @classmethod
    def _key_template(cls, key: str) -> str:
        KeyTemplate.parse(key, static_ok=True)
        return key

    @field_validator("member")
    @classmethod
    def _member_template(cls, member: str | None) -> str | None:
        if member is not None:
            KeyTemplate.parse(member)
        return member

    @field_validator("value")
    @classmethod
    def _value_template(cls, value: str | None) -> str | None:
        if value is not None and value != JSON_VALUE:
            KeyTemplate.parse(value)
        return value

    @field_validator("where")
    @classmethod
    def _where_filter(cls, where: str | None) -> str | None:
        if where is not None:
            RowFilter.parse(where)
        return where

    @field_validator("name")
    @classmethod
    def _name_form(cls, name: str | None) -> str | None:
        if name is not None and not _NAME_RE.match(name):
            raise ValueError(
                "may hold letters, digits and _ . : @ # / - only (no braces: they would change"
                " the hash slot of the rule's records)"
            )
        return name

    @field_validator("fields")
    @classmethod
    def _fields_unique(cls, fields: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if fields is not None:
            if not fields:
                raise ValueError("must list at least one column (omit it to keep all)")
            if len(set(fields)) != len(fields):
                raise ValueError("lists a column twice")
        return fields

    @model_validator(mode="after")
    def _mode_fits(self) -> Rule:
        if self.mode is Mode.INVALIDATE:
            self._invalidate_fits()
        else:
            self._type_fits()
            self._columns_fit()
        return self

    def _invalidate_fits(self) -> None:
        """An invalidate rule names a key per row and nothing about what a write would hold."""
        if self.merge:
            raise _field_error(self, "merge", "has no meaning when mode is invalidate")
        for name in ("type", "fields", "ttl_s", "where", *_OPTIONAL):
            if getattr(self, name) is not None:
                raise _field_error(self, name, "has no meaning when mode is invalidate")
        if self.rename:
            raise _field_error(self, "rename", "has no meaning when mode is invalidate")
        self._require_key_column()

    def _type_fits(self) -> None:
        """A write-through rule has a type, and sets what that type requires and nothing it
        has no use for."""
        if self.type is None:
            raise _field_error(
                self,
                "type",
                "is required when mode is write_through"
                f" ({', '.join(t.value for t in TargetType)})",
            )
        allowed = _TYPE_OPTIONS[self.type]
        for name in _OPTIONAL:
            if getattr(self, name) is not None and name not in allowed:
                raise _field_error(self, name, f"has no meaning for type {self.type.value}")
        for name in _REQUIRED.get(self.type, ()):
            if getattr(self, name) is None:
                raise _field_error(self, name, f"is required for type {self.type.value}")
        if self.keyed_per_row:
            self._require_key_column()
        if self.type in (TargetType.SET, TargetType.ZSET):
            for name in ("fields", "rename"):
                if getattr(self, name):
                    raise _field_error(self, name, f"has no meaning for type {self.type.value}")
        if self.merge:
            self._merge_fits()
        if self.nest is not None:
            self._nest_fits()

    def _nest_fits(self) -> None:
        """A nested rule writes JSON children into its parent's document, under its key."""
        assert self.nest is not None
        if self.type is not TargetType.JSON:
            assert self.type is not None
            raise _field_error(
                self,
                "nest",
                f"has no meaning for type {self.type.value}: children nest in a JSON document",
            )
        if self.key != self.nest.parent_key:
            raise _field_error(self, "key", "must be nest.parent_key, or left out")
        if self.merge:
            raise _field_error(self, "merge", "and nest exclude each other")
        for name in ("ttl_s", "encoding"):
            if getattr(self, name) is not None:
                raise _field_error(
                    self, name, "has no meaning with nest: the rule owning the document decides it"
                )

    def _merge_fits(self) -> None:
        """A merging rule names the fields it owns, and leaves the key's TTL and encoding to
        the rule owning the key."""
        if self.type not in (TargetType.HASH, TargetType.JSON):
            assert self.type is not None
            raise _field_error(self, "merge", f"has no meaning for type {self.type.value}")
        if self.fields is None:
            raise _field_error(
                self, "fields", "is required with merge: the fields (or members) this rule owns"
            )
        for name in ("ttl_s", "encoding"):
            if getattr(self, name) is not None:
                raise _field_error(
                    self, name, "has no meaning with merge: the rule owning the key decides it"
                )

    def _columns_fit(self) -> None:
        """``fields`` keeps the key's columns and every renamed one; no two columns end up
        with one name."""
        if self.fields is not None and self.keyed_per_row and not self.merge:
            missing = [c for c in self.template.columns if c not in self.fields]
            if missing:
                raise _field_error(self, "fields", f"must include the key's columns {missing}")
        if self.fields is not None:
            unknown = [c for c in self.rename if c not in self.fields]
            if unknown:
                raise _field_error(
                    self, "rename", f"names columns {unknown} that 'fields' leaves out"
                )
        targets = [self.rename.get(c, c) for c in (self.fields or self.rename)]
        renamed = list(self.rename.values())
        if len(set(renamed)) != len(renamed) or (
            self.fields is not None and len(set(targets)) != len(targets)
        ):
            raise _field_error(self, "rename", "gives two columns the same name")

    def _require_key_column(self) -> None:
        if self.template.is_static:
            kind = self.type.value if self.type else "invalidate"
            raise _field_error(
                self,
                "key",
                f"names no column, but a {kind} rule needs one key per row, e.g. 'user:{{id}}'",
            )

    @cached_property
    def template(self) -> KeyTemplate:
        """The parsed key template."""
        return KeyTemplate.parse(self.key, static_ok=True)

    @cached_property
    def member_template(self) -> KeyTemplate | None:
        """The parsed member template (set, zset)."""
        return None if self.member is None else KeyTemplate.parse(self.member)

    @cached_property
    def value_template(self) -> KeyTemplate | None:
        """The parsed value template (string, list); None for ``json`` or no value."""
        if self.value is None or self.value == JSON_VALUE:
            return None
        return KeyTemplate.parse(self.value)

    def stores_redisjson(self, module_loaded: bool) -> bool:
        """Whether this rule writes RedisJSON documents, given whether the target loads the
        ReJSON module (``encoding: auto`` follows it)."""
        if self.type is not TargetType.JSON:
            return False
        encoding = self.encoding or JsonEncoding.AUTO
        return encoding is JsonEncoding.REDISJSON or (
            encoding is JsonEncoding.AUTO and module_loaded
        )

    @property
    def keyed_per_row(self) -> bool:
        """Whether each row has a key of its own (hash, JSON, string), not nested in another's."""
        return self.type in SINGLE_VALUE_TYPES and self.nest is None

    @property
    def gathers_rows(self) -> bool:
        """Whether the rule's keys gather many rows (sets, sorted sets, lists, streams, nested
        children): each row keeps a placement record."""
        return self.mode is Mode.WRITE_THROUGH and not self.keyed_per_row

    @cached_property
    def nest_member_template(self) -> KeyTemplate | None:
        """The parsed ``nest.member`` template."""
        return None if self.nest is None else KeyTemplate.parse(self.nest.member)

    @property
    def owned_columns(self) -> tuple[str, ...]:
        """The columns a merging rule writes (its ``fields``)."""
        return self.fields or ()

    @property
    def owned_names(self) -> tuple[str, ...]:
        """The fields (or JSON members) of its owner's key a merging rule writes: ``fields``
        under their Redis names; a nested rule's, ``nest.path``."""
        if self.nest is not None:
            return (self.nest.path,)
        return tuple(self.rename.get(c, c) for c in self.fields or ())

    @property
    def writes_a_part(self) -> bool:
        """Whether the rule writes into keys another rule owns (merge, nest)."""
        return self.merge or self.nest is not None

    @cached_property
    def filter(self) -> RowFilter | None:
        """The parsed ``where`` filter."""
        return None if self.where is None else RowFilter.parse(self.where)

    @cached_property
    def state_name(self) -> str:
        """The rule's name in its Redis state: ``name`` or one derived from what it maps."""
        if self.name is not None:
            return self.name
        kind = self.type.value if self.type else self.mode.value
        what = "\0".join((self.key, self.member or "", self.value or "", self.score or ""))
        return f"{self.table}:{kind}:{binascii.crc32(what.encode()):08x}"


def _property_value(value: Any) -> Any:
    """A YAML scalar as the text of a Java property: booleans lowercase, numbers as written."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return value
    raise ValueError(f"is {_describe(value)}: a property value is text, a number or true/false")


class CaptureSettings(_Model):
    """The embedded Debezium engine of ``streamsync capture`` and ``streamsync demo``."""

    #: Debezium Server's application.properties: its ``debezium.source.*`` keys configure the
    #: embedded engine, so one file serves the container and the embedded engine alike.
    properties: Path = Path("debezium/application.properties")
    #: Where the embedded engine keeps its source offsets (FileOffsetBackingStore).
    offsets_file: Path = Path(".streamsync/offsets.dat")
    #: Properties applied over the file (e.g. a database host that differs outside containers);
    #: numbers and booleans become the text Java reads (``5433``, ``true``).
    overrides: dict[str, Annotated[str, BeforeValidator(_property_value)]] = Field(
        default_factory=dict
    )
    #: Options for the JVM that runs the engine.
    jvm_options: tuple[str, ...] = ("-Xmx384m",)


def merge_owner(rules: Sequence[Rule], merging: Rule) -> Rule:
    """The rule owning the keys ``merging`` writes into: the one write-through rule of the same
    type, not merging itself, whose key template has the same literals and as many columns
    (``user:{id}`` for ``user:{user_id}``). ValueError naming the rule when there is none, or
    more than one."""
    where = f"rules[{_index(rules, merging)}].{'nest' if merging.nest else 'merge'}"
    owners = [
        rule
        for rule in rules
        if not rule.writes_a_part
        and rule.mode is Mode.WRITE_THROUGH
        and rule.type is merging.type
        and rule.template.literals == merging.template.literals
        and len(rule.template.columns) == len(merging.template.columns)
    ]
    if not owners and merging.nest is not None:
        other = [
            i
            for i, rule in enumerate(rules)
            if not rule.writes_a_part and rule.template.literals == merging.template.literals
        ]
        if other:
            raise ValueError(
                f"{where}: rules[{other[0]}] owns keys like {merging.key!r} but is not a json"
                " rule: children nest in JSON documents only (a hash cannot hold a map of them)"
            )
    if len(owners) != 1:
        assert merging.type is not None
        found = "no" if not owners else f"{len(owners)}"
        raise ValueError(
            f"{where}: {found} {merging.type.value} rules own keys like {merging.key!r} (one"
            " rule, not merging, with the same key template but for its columns must)"
        )
    return owners[0]


def merged_names(rules: Sequence[Rule]) -> dict[str, frozenset[str]]:
    """Per rule that others merge into (its ``state_name``), the names those rules own; its
    own writes leave them alone. ValueError when two rules of one key would own a name."""
    owned: dict[str, dict[str, int]] = {}
    for i, rule in enumerate(rules):
        if not rule.writes_a_part:
            continue
        owner = merge_owner(rules, rule)
        names = owned.setdefault(owner.state_name, {})
        if owner.fields is not None:
            for name in owner.owned_names:
                names.setdefault(name, _index(rules, owner))
        for name in rule.owned_names:
            if name in names:
                what = "nest.path" if rule.nest is not None else "fields"
                raise ValueError(
                    f"rules[{i}].{what}: {name!r} is written by rules[{names[name]}] too, into"
                    f" the same key ({rule.key!r}): each field or member has one owner"
                )
            names[name] = i
    return {
        owner: frozenset(n for n, i in names.items() if rules[i].writes_a_part)
        for owner, names in owned.items()
    }


def _index(rules: Sequence[Rule], rule: Rule) -> int:
    return next(i for i, r in enumerate(rules) if r is rule)


class Settings(_Model):
    """The whole configuration file."""

    #: The streams, streamsync's stream-side records, and the cache unless ``target`` is set.
    redis: RedisSettings = RedisSettings()
    #: A Redis of its own for the cache and its bookkeeping (absent: the cache is in ``redis``).
    target: RedisSettings | None = None
    source: SourceSettings
    worker: WorkerSettings = WorkerSettings()
    rules: tuple[Rule, ...]
    capture: CaptureSettings = CaptureSettings()

    @field_validator("target")
    @classmethod
    def _target_url(cls, target: RedisSettings | None) -> RedisSettings | None:
        if target is not None and "url" not in target.model_fields_set:
            raise ValueError(
                "needs a 'url' (the Redis holding the cache); leave the section out to keep"
                " the cache in the streams' Redis"
            )
        return target

    @field_validator("rules")
    @classmethod
    def _some_rules(cls, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
        if not rules:
            raise ValueError("at least one rule is needed")
        seen: dict[str, int] = {}
        for i, rule in enumerate(rules):
            if rule.state_name in seen:
                raise ValueError(
                    f"rules[{seen[rule.state_name]}] and rules[{i}] share the name"
                    f" {rule.state_name!r}: give one of them a distinct 'name'"
                )
            seen[rule.state_name] = i
        merged_names(rules)
        return rules

    @property
    def cache_redis(self) -> RedisSettings:
        """The Redis the rules write to, with their bookkeeping: ``target``, else ``redis``."""
        return self.redis if self.target is None else self.target

    @cached_property
    def rules_by_table(self) -> Mapping[str, tuple[Rule, ...]]:
        """Rules grouped by ``schema.table``, in file order."""
        grouped: dict[str, list[Rule]] = {}
        for rule in self.rules:
            grouped.setdefault(rule.table, []).append(rule)
        return {table: tuple(rules) for table, rules in grouped.items()}


_IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _format_location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _IDENTIFIER_RE.match(part):
            # a mapping's key such as a Java property name: dots would read as nesting
            out += f"[{part!r}]"
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


#: What a pydantic type error expected, in words.
_EXPECTED = {
    "list_type": "a list, e.g. [a, b]",
    "tuple_type": "a list, e.g. [a, b]",
    "set_type": "a list, e.g. [a, b]",
    "dict_type": "a mapping (key: value)",
    "model_type": "a mapping (key: value)",
    "model_attributes_type": "a mapping (key: value)",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "text",
    "path_type": "a file path",
}
#: Bounds, in words: pydantic's context key and the phrase before its value.
_BOUNDS = {
    "greater_than_equal": ("ge", "must be at least"),
    "greater_than": ("gt", "must be greater than"),
    "less_than_equal": ("le", "must be at most"),
    "less_than": ("lt", "must be less than"),
}
#: Longest text of a value repeated in a message.
_ECHO_MAX = 40


def _describe(value: Any, *, echo: bool = True) -> str:
    """What a YAML value is, in words: ``text 'abc'``, ``the number 3``, ``a list``. With
    ``echo`` false, a text's content is left out."""
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        if not echo:
            return "text"
        shown = value if len(value) <= _ECHO_MAX else value[: _ECHO_MAX - 3] + "..."
        return f"text {shown!r}"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _sentence(err: Any, *, echo: bool) -> str:
    """One pydantic error as a sentence about the field."""
    kind, ctx = err["type"], err.get("ctx") or {}
    got = _describe(err.get("input"), echo=echo)
    if kind == "extra_forbidden":
        return "unknown field (not part of the configuration format)"
    if kind == "missing":
        return "is required"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {got}"
    if kind in ("literal_error", "enum"):
        return f"must be {ctx.get('expected', 'one of the documented values')} (got {got})"
    if kind in _BOUNDS:
        key, words = _BOUNDS[kind]
        return f"{words} {ctx.get(key)}"
    if kind == "string_too_short":
        length = ctx.get("min_length", 1)
        return "must not be empty" if length == 1 else f"must be at least {length} characters"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s)"
    return str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")


def format_validation_error(path: Path | str, exc: ValidationError) -> str:
    """One line per problem, each naming the file and the field, in plain sentences."""
    count = exc.error_count()
    lines = [f"{path}: invalid configuration ({count} problem{'' if count == 1 else 's'})"]
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # the redis and target sections' values may hold credentials: never repeated
        echo = not (loc and loc[0] in REDIS_SECTIONS)
        lines.append(f"  {path}: {_format_location(loc)}: {_sentence(err, echo=echo)}")
    return "\n".join(lines)


def _at(path: Path | str, mark: Any) -> str:
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)


def format_yaml_error(path: Path | str, exc: yaml.YAMLError) -> str:
    """A YAML syntax error as ``file:line:column: ...`` lines, each naming the file."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return f"{path}: not valid YAML: {' '.join(str(exc).split())}"
    lines = [f"{_at(path, exc.problem_mark)}: not valid YAML: {exc.problem or 'syntax error'}"]
    if exc.context and exc.context_mark is not None:
        lines.append(f"{_at(path, exc.context_mark)}: {exc.context} that started here")
    if exc.note:
        lines.append(f"{path}: {exc.note}")
    return "\n".join(lines)


def parse_settings(data: Any, path: Path | str = "<config>") -> Settings:
    """Validate already-parsed configuration data; ConfigError names ``path`` and the fields."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the configuration must be a YAML mapping at the top level")
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from None


def load_settings(path: Path | str, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, parse and validate a configuration file, applying environment overrides."""
    environ = os.environ if environ is None else environ
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(format_yaml_error(path, exc)) from None
    if isinstance(data, dict):
        for section, (url_env, _) in REDIS_SECTIONS.items():
            _refuse_inline_password(path, data, section)
            if environ.get(url_env):
                given = data.get(section)
                given = dict(given) if isinstance(given, dict) else {}
                given["url"] = environ[url_env]
                data = {**data, section: given}
    settings = parse_settings(data, path)
    # files named in the configuration are relative to the file that names them
    capture = settings.capture
    base = path.parent
    resolved = capture.model_copy(
        update={
            "properties": base / capture.properties,
            "offsets_file": base / capture.offsets_file,
        }
    )
    update: dict[str, Any] = {"capture": resolved}
    update["redis"] = _resolve_redis(settings.redis, path, environ, "redis")
    if settings.target is not None:
        update["target"] = _resolve_redis(settings.target, path, environ, "target")
    elif environ.get(TARGET_PASSWORD_ENV):
        # a password meant for a cache Redis this configuration does not use: say so rather
        # than ignore it, the cache would silently stay in the streams' Redis
        raise ConfigError(
            f"{path}: target: {TARGET_PASSWORD_ENV} is set, but the configuration has no"
            f" target section (nor {TARGET_URL_ENV}): add one, or unset the variable"
        )
    return settings.model_copy(update=update)


def _refuse_inline_password(path: Path, data: Mapping[str, Any], name: str) -> None:
    """A password written in the configuration file is an error, never used."""
    section = data.get(name)
    if not isinstance(section, dict):
        return
    url_env, password_env = REDIS_SECTIONS[name]
    instead = (
        f"put it in a file named by {name}.password_file, or in the environment variable"
        f" {password_env} (or the whole URL in {url_env})"
    )
    if "password" in section:
        raise ConfigError(
            f"{path}: {name}.password: a password does not belong in the configuration file: "
            + instead
        )
    url = section.get("url")
    if isinstance(url, str) and split_url_password(url)[1] is not None:
        raise ConfigError(
            f"{path}: {name}.url: holds a password in plain text; remove it from the URL and "
            + instead
        )


def _resolve_redis(
    settings: RedisSettings, path: Path, environ: Mapping[str, str], name: str
) -> RedisSettings:
    """Paths relative to the configuration file, and the password from where it is kept: the
    section's password variable (STREAMSYNC_REDIS_PASSWORD, STREAMSYNC_TARGET_PASSWORD), else a
    URL given in its URL variable, else password_file."""
    base = path.parent
    update: dict[str, Any] = {}
    for option in ("password_file", *_TLS_FILES):
        value = getattr(settings, option)
        if value is not None:
            update[option] = base / value
    from_env = environ.get(REDIS_SECTIONS[name][1])
    if from_env:
        update["password"] = SecretStr(from_env)
    elif settings.password is None and settings.password_file is not None:
        update["password"] = SecretStr(_read_password(path, update["password_file"], name))
    return settings.model_copy(update=update) if update else settings


def _read_password(path: Path, password_file: Path, name: str) -> str:
    where = f"{path}: {name}.password_file"
    try:
        text = password_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {password_file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: {password_file} is not UTF-8 text") from None
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        raise ConfigError(f"{where}: {password_file} is empty")
    return password


def redact_url(url: str) -> str:
    """``url`` without its credentials, fit for logs and terminals."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest
