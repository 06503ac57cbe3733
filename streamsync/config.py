"""Validated settings and mapping rules, loaded once from a YAML file.

Every model forbids unknown keys, so a typo is an error that names the file and the field.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from streamsync.errors import ConfigError
from streamsync.templates import KeyTemplate

#: Environment variable that overrides ``redis.url``, so credentials can stay out of the file.
REDIS_URL_ENV = "STREAMSYNC_REDIS_URL"

_TABLE_RE = re.compile(r"^[^.\s]+\.[^.\s]+$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RedisSettings(_Model):
    """Where the cache (and the streams) live."""

    url: str = "redis://127.0.0.1:6379/0"
    socket_timeout_s: Annotated[float, Field(gt=0)] = 10.0

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return url


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
            if any(s.endswith(DLQ_SUFFIX) for s in self.streams):
                raise ValueError(f"'streams' must not name a dead-letter stream (*{DLQ_SUFFIX})")
        return self


#: Suffix of a stream's dead-letter stream: ``<stream>:dlq``.
DLQ_SUFFIX = ":dlq"


class WorkerSettings(_Model):
    """How the consumer-group loop reads, retries, reclaims and trims."""

    batch_size: Annotated[int, Field(ge=1, le=10_000)] = 500
    block_ms: Annotated[int, Field(ge=1, le=60_000)] = 1000
    claim_idle_ms: Annotated[int, Field(ge=100)] = 30_000
    claim_interval_ms: Annotated[int, Field(ge=100)] = 5_000
    max_deliveries: Annotated[int, Field(ge=1)] = 5
    tombstone_ttl_s: Annotated[int, Field(ge=1)] = 86_400
    trim: bool = True
    trim_interval_ms: Annotated[int, Field(ge=100)] = 5_000
    dlq_max_len: Annotated[int, Field(ge=1)] = 100_000
    position_prefix: Annotated[str, Field(min_length=1)] = "streamsync:pos:"

    @field_validator("position_prefix")
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


class Rule(_Model):
    """One mapping: changes of ``table`` update the key rendered from ``key``."""

    table: str
    mode: Mode = Mode.WRITE_THROUGH
    key: str
    type: TargetType | None = None
    fields: tuple[Annotated[str, Field(min_length=1)], ...] | None = None
    ttl_s: Annotated[int, Field(ge=1)] | None = None

    @field_validator("table")
    @classmethod
    def _table_form(cls, table: str) -> str:
        if not _TABLE_RE.match(table):
            raise ValueError("must be 'schema.table', as in the event's source.schema/source.table")
        return table

    @field_validator("key")
    @classmethod
    def _key_template(cls, key: str) -> str:
        KeyTemplate.parse(key)
        return key

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
        if self.mode is Mode.WRITE_THROUGH:
            if self.type is None:
                raise ValueError("'type' is required when mode is write_through (hash or json)")
            if self.fields is not None:
                missing = [c for c in self.template.columns if c not in self.fields]
                if missing:
                    raise ValueError(f"'fields' must include the key's columns {missing}")
        else:
            for name in ("type", "fields", "ttl_s"):
                if getattr(self, name) is not None:
                    raise ValueError(f"'{name}' has no meaning when mode is invalidate")
        return self

    @cached_property
    def template(self) -> KeyTemplate:
        """The parsed key template."""
        return KeyTemplate.parse(self.key)

    @property
    def schema_name(self) -> str:
        """The schema part of ``table``."""
        return self.table.split(".", 1)[0]


class CaptureSettings(_Model):
    """The embedded Debezium engine of ``streamsync capture`` and ``streamsync demo``."""

    #: Debezium Server's application.properties: its ``debezium.source.*`` keys configure the
    #: embedded engine, so one file serves the container and the embedded engine alike.
    properties: Path = Path("debezium/application.properties")
    #: Where the embedded engine keeps its source offsets (FileOffsetBackingStore).
    offsets_file: Path = Path(".streamsync/offsets.dat")
    #: Properties applied over the file (e.g. a database host that differs outside containers).
    overrides: dict[str, str] = Field(default_factory=dict)
    #: Options for the JVM that runs the engine.
    jvm_options: tuple[str, ...] = ("-Xmx384m",)


class Settings(_Model):
    """The whole configuration file."""

    redis: RedisSettings = RedisSettings()
    source: SourceSettings
    worker: WorkerSettings = WorkerSettings()
    rules: tuple[Rule, ...]
    capture: CaptureSettings = CaptureSettings()

    @field_validator("rules")
    @classmethod
    def _some_rules(cls, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
        if not rules:
            raise ValueError("at least one rule is needed")
        return rules

    @cached_property
    def rules_by_table(self) -> Mapping[str, tuple[Rule, ...]]:
        """Rules grouped by ``schema.table``, in file order."""
        grouped: dict[str, list[Rule]] = {}
        for rule in self.rules:
            grouped.setdefault(rule.table, []).append(rule)
        return {table: tuple(rules) for table, rules in grouped.items()}


def _format_location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def format_validation_error(path: Path | str, exc: ValidationError) -> str:
    """One line per problem, each naming the file and the field."""
    lines = [f"{path}: invalid configuration ({exc.error_count()} problem(s))"]
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (not part of the configuration format)"
        lines.append(f"  {path}: {_format_location(loc)}: {msg}")
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
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(data, dict) and environ.get(REDIS_URL_ENV):
        redis_section = data.get("redis")
        redis_section = dict(redis_section) if isinstance(redis_section, dict) else {}
        redis_section["url"] = environ[REDIS_URL_ENV]
        data = {**data, "redis": redis_section}
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
    return settings.model_copy(update={"capture": resolved})


def redact_url(url: str) -> str:
    """``url`` without its credentials, fit for logs and terminals."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest
