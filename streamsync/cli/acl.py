"""``streamsync acl``: print the least-privilege Redis ACL of a configuration."""

from __future__ import annotations

from pathlib import Path

import click

from streamsync.acl import acl_setuser
from streamsync.cli.options import config_option, load_or_exit


@click.command("acl")
@config_option
@click.option("--user", default=None, help="The ACL user name (default: streamsync).")
@click.option(
    "--read-only",
    is_flag=True,
    help="The monitoring user `streamsync status` needs instead of the worker's.",
)
@click.option(
    "--target",
    is_flag=True,
    help="The user of the cache's own Redis (the target section) instead of the streams'.",
)
@click.option(
    "--redisjson",
    is_flag=True,
    help="The cache's Redis loads the RedisJSON module: grant the JSON commands json rules then"
    " write with (ACL SETUSER refuses commands a Redis does not know).",
)
def acl_command(
    config_path: Path, user: str | None, read_only: bool, target: bool, redisjson: bool
) -> None:
    """Print the least-privilege Redis ACL for this configuration (ACL SETUSER ...).

    The worker's user may read and write only the configured streams, their dead letters,
    streamsync's own records and the rules' keys, with only the commands the worker and its
    Functions library send. With a target section each Redis gets its own user: the streams'
    by default, the target's with --target. Replace <password> before running it in redis-cli.
    """
    settings = load_or_exit(config_path)
    if target and settings.target is None:
        raise click.UsageError(
            f"--target: {config_path} has no target section (the cache is in redis)"
        )
    default = "streamsync-status" if read_only else "streamsync"
    click.echo(
        acl_setuser(
            settings, user or default, read_only=read_only, target=target, redisjson=redisjson
        )
    )
