"""``streamsync check-config``: validate a configuration file and summarise it."""

from __future__ import annotations

from pathlib import Path

import click

from streamsync.cli.options import config_option, load_or_exit
from streamsync.config import JsonEncoding, TargetType, redact_url


@click.command("check-config")
@config_option
def check_config_command(config_path: Path) -> None:
    """Validate a configuration file and summarise it; exit non-zero if it is invalid."""
    settings = load_or_exit(config_path)
    source = settings.source
    streams = ", ".join(source.streams) if source.streams else f"prefix {source.stream_prefix!r}"
    click.echo(f"{config_path}: ok")
    click.echo(f"  redis: {redact_url(settings.redis.url)}")
    if settings.target is None:
        click.echo("  target: none (the cache is in redis)")
    else:
        click.echo(f"  target: {redact_url(settings.target.url)} (the cache)")
    click.echo(f"  streams: {streams} (group {source.group}, format {source.format.value})")
    for rule in settings.rules:
        detail = f"{rule.type.value} " if rule.type else ""
        extras = [
            f"{name} {value}"
            for name in ("member", "score", "value", "max_len", "where")
            if (value := getattr(rule, name)) is not None
        ]
        if rule.type is TargetType.JSON and not rule.writes_a_part:
            encoding = rule.encoding or JsonEncoding.AUTO
            auto = encoding is JsonEncoding.AUTO
            where = " (RedisJSON where the target loads it)" if auto else ""
            extras.append(f"encoding {encoding.value}{where}")
        if rule.merge:
            extras.append("merged into the key's owner")
        if rule.nest is not None:
            extras.append(f"nested under {rule.nest.path!r} by {rule.nest.member!r}")
        if rule.ttl_s:
            extras.append(f"ttl {rule.ttl_s}s")
        more = f" ({', '.join(extras)})" if extras else ""
        click.echo(f"  {rule.table} -> {rule.mode.value} {detail}{rule.key}{more}")
