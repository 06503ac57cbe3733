"""Real servers for tests, on free ports, that can be killed and restarted.

The launchers live in ``streamsync.embedded.sandbox`` (``streamsync demo`` uses them too); this
module is what tests import. Tests never talk to the Redis on 6379 or to a PostgreSQL they did not
start, and never use fakes: every server is a child process of the test session, bound to
127.0.0.1 on a port of its own, with its data under a directory the test owns. ``wait_until`` is
the one way tests synchronise with anything asynchronous.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from streamsync.embedded.sandbox import (
    PostgresServer,
    PostgresServerError,
    RedisServer,
    RedisServerError,
    free_port,
    kill_all,
    wait_until,
)

__all__ = [
    "PostgresServer",
    "PostgresServerError",
    "RedisServer",
    "RedisServerError",
    "free_port",
    "kill_all",
    "postgres_dir",
    "wait_until",
]


@contextmanager
def postgres_dir(prefix: str = "streamsync-pg-") -> Iterator[Path]:
    """A fresh directory for a ``PostgresServer``, removed afterwards.

    Not under pytest's ``tmp_path``: as root, PostgreSQL runs as the ``postgres`` OS user, which
    cannot enter pytest's private ``/tmp/pytest-of-root`` (mode 0700).
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        os.chmod(path, 0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
