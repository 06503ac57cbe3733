"""Throw-away local servers: a real ``redis-server`` and a real PostgreSQL, on free ports.

Used by ``streamsync demo`` and by the tests. Every server is a child process of the caller,
bound to 127.0.0.1 on a port of its own, with its data under a directory the caller owns; it can
be stopped, ``kill -9``-ed and restarted on the same port. Children are killed at interpreter
exit, and (on Linux, when started from the main thread) when the parent process dies.

PostgreSQL needs the ``embedded`` extra (psycopg) for ``PostgresServer.execute`` and its
readiness check; ``RedisServer`` needs nothing beyond streamsync's own dependencies.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from streamsync.errors import StreamsyncError

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "PostgresServer",
    "PostgresServerError",
    "RedisServer",
    "RedisServerError",
    "SandboxError",
    "die_with_parent_hook",
    "find_postgres_bindir",
    "free_port",
    "kill_all",
    "wait_until",
]

DEFAULT_START_TIMEOUT_S = 15.0
DEFAULT_STOP_TIMEOUT_S = 10.0
#: initdb writes a whole cluster; on a slow disk it takes several seconds.
INITDB_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 40
# A port that another socket grabbed between free_port() and the server's bind is retried on a
# new port this many times; restarts keep their port and retry it until the start deadline.
MAX_PORT_ATTEMPTS = 5
#: The unix socket path limit (sun_path) less the socket file name PostgreSQL appends.
_MAX_SOCKET_DIR_LEN = 107 - len("/.s.PGSQL.65535.lock")

_REDIS_ADDRESS_IN_USE = "Address already in use"
_PG_ADDRESS_IN_USE = "could not bind"
#: What PostgreSQL logs when a killed predecessor's backends still hold the shared memory.
_PG_RETRY_LATER = ("pre-existing shared memory block", "lock file", "Address already in use")

# Ports handed out by free_port() in this process. The kernel readily hands a just-released port
# out again, so without this a server killed mid-use could lose its port to the next
# free_port() caller and then fail to restart on it.
_issued_ports: set[int] = set()
_issued_lock = threading.Lock()

# Every live server child, killed at interpreter exit whatever happened to the caller.
_live: dict[int, subprocess.Popen[bytes]] = {}
_live_lock = threading.Lock()
_atexit_registered = False


class SandboxError(StreamsyncError):
    """Raised when a sandbox server cannot be found, started or stopped."""


class RedisServerError(SandboxError):
    """Raised when a redis-server cannot be found, started or stopped."""


class PostgresServerError(SandboxError):
    """Raised when PostgreSQL cannot be found, initialised, started or stopped."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now and not handed out before in this process."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        with _issued_lock:
            if port not in _issued_ports:
                _issued_ports.add(port)
                return port
    raise RedisServerError("no free port found that was not already handed out")


def wait_until(
    predicate: Callable[[], bool],
    timeout: float = 10.0,
    interval: float = 0.01,
    message: str = "",
) -> None:
    """Poll ``predicate`` until it returns true; raise ``AssertionError`` after ``timeout`` seconds.

    The predicate is always evaluated once more at the deadline, so a slow poll never turns a
    condition that became true in time into a failure. Exceptions from the predicate propagate.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            what = message or getattr(predicate, "__qualname__", repr(predicate))
            raise AssertionError(f"timed out after {timeout:g}s waiting for: {what}")
        time.sleep(min(interval, remaining))


def kill_all() -> None:
    """SIGKILL and reap every server started by this process that is still running."""
    with _live_lock:
        procs = list(_live.values())
        _live.clear()
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=DEFAULT_STOP_TIMEOUT_S)


def _track(proc: subprocess.Popen[bytes]) -> None:
    global _atexit_registered  # noqa: PLW0603
    with _live_lock:
        _live[proc.pid] = proc
        if not _atexit_registered:
            atexit.register(kill_all)
            _atexit_registered = True


def _untrack(proc: subprocess.Popen[bytes]) -> None:
    with _live_lock:
        _live.pop(proc.pid, None)


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
    _untrack(proc)


def die_with_parent_hook() -> Callable[[], None] | None:
    """Return a pre-exec hook asking Linux to SIGKILL the child when its parent thread dies.

    atexit covers normal exits; this covers the parent itself being killed (SIGKILL,
    ``os._exit`` from a timeout). The kernel ties the signal to the *thread* that forked, so it
    is only used from the main thread: a server started from a short-lived helper thread would
    otherwise die when that thread ends. (subprocess switches user before it runs the hook, so
    the setting survives ``user=``.)
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigkill = int(signal.SIGKILL)

    def hook() -> None:
        prctl(pr_set_pdeathsig, sigkill, 0, 0, 0)

    return hook


def _log_tail(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"<log unreadable: {exc}>"
    lines = text.splitlines()[-LOG_TAIL_LINES:]
    return "\n".join(lines) if lines else "<log empty>"


def _log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


# -- Redis -------------------------------------------------------------------------------------


#: The server binary to run instead of ``redis-server`` on PATH (e.g. ``valkey-server``).
SERVER_ENV = "STREAMSYNC_REDIS_SERVER"


def _redis_server_binary() -> str:
    chosen = os.environ.get(SERVER_ENV)
    if chosen:
        if not os.access(chosen, os.X_OK):
            raise RedisServerError(f"{SERVER_ENV}={chosen}: not an executable file")
        return chosen
    found = shutil.which("redis-server")
    if found:
        return found
    if os.access("/usr/bin/redis-server", os.X_OK):
        return "/usr/bin/redis-server"
    raise RedisServerError("redis-server not found on PATH nor at /usr/bin/redis-server")


class _ChildServer:
    """What a server child process has in common: a port of its own (kept across restarts), a
    data directory and log, start with a readiness deadline, stop, ``kill -9``, restart."""

    #: What ``start`` raises, and the server's name in messages.
    error: type[SandboxError] = SandboxError
    name = "server"
    #: The signal of a graceful stop.
    stop_signal = signal.SIGTERM

    def __init__(self, data_dir: Path, log_name: str, port: int | None) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.log_path = self.data_dir / log_name
        self._port = port
        # A port given by the caller, or one the server has already listened on, must be kept.
        self._port_fixed = port is not None
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = f"pid={self._proc.pid}" if self.running and self._proc else "stopped"
        return f"{type(self).__name__}(port={self._port}, {state}, data_dir={str(self.data_dir)!r})"

    @property
    def port(self) -> int:
        """The TCP port, chosen on first use if none was given."""
        if self._port is None:
            self._port = free_port()
        return self._port

    @property
    def pid(self) -> int:
        """The pid of the current (or last) server process."""
        if self._proc is None:
            raise self.error(f"{self!r} was never started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def command_line(self) -> list[str]:
        """The full command line for the current port."""
        raise NotImplementedError

    def start(self, timeout: float = DEFAULT_START_TIMEOUT_S) -> Self:
        """Launch the server and wait until it answers as itself; return ``self``.

        Raises ``error`` with the tail of the server log if it does not come up.
        """
        if self.running:
            raise self.error(f"{self!r} is already running")
        self._prepare()
        deadline = time.monotonic() + timeout
        attempts = 0
        while True:
            attempts += 1
            log_offset = _log_size(self.log_path)
            proc = self._spawn()
            error = self._wait_ready(proc, deadline)
            if error is None:
                self._port_fixed = True
                return self
            log_tail = _log_tail(self.log_path, log_offset)
            _reap(proc, DEFAULT_STOP_TIMEOUT_S)
            port_taken = self._port_taken(log_tail)
            if port_taken and not self._port_fixed and attempts < MAX_PORT_ATTEMPTS:
                self._port = free_port()
                continue
            if (port_taken or self._retry_later(log_tail)) and time.monotonic() < deadline:
                # Something briefly holds our port (e.g. a client's ephemeral source port), or
                # what a killed predecessor left behind has not gone yet.
                time.sleep(0.05)
                continue
            raise self.error(
                f"{self.name} on port {self.port} did not start: {error}\n"
                f"command: {shlex.join(self.command_line())}\n"
                f"last lines of {self.log_path}:\n{log_tail}"
            )

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """Shut down gracefully and wait; SIGKILL if it overstays. Nothing if not running."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            if proc is not None:
                _reap(proc, timeout)
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(self.stop_signal)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
        _reap(proc, timeout)

    def kill(self) -> None:
        """``kill -9`` the server and reap it. Does nothing if not running."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        _reap(proc, DEFAULT_STOP_TIMEOUT_S)

    def restart(self, timeout: float = DEFAULT_START_TIMEOUT_S) -> Self:
        """Start again on the same port with the same data directory (stopping it first if up)."""
        if self.running:
            self.stop()
        self._port_fixed = True
        return self.start(timeout=timeout)

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def _spawn_options(self) -> dict[str, Any]:
        return {}

    def _spawn(self) -> subprocess.Popen[bytes]:
        # stdout/stderr share the log file so that errors printed before the server opens its
        # own log (a bad argument, say) end up in the tail we report.
        with self.log_path.open("ab") as console:
            proc = subprocess.Popen(
                self.command_line(),
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                preexec_fn=die_with_parent_hook(),  # noqa: PLW1509
                # out of the terminal's process group: a Ctrl-C reaches the caller alone, which
                # then stops its servers in order (the hook still covers the caller dying)
                start_new_session=True,
                **self._spawn_options(),
            )
        self._proc = proc
        _track(proc)
        return proc

    def _wait_ready(self, proc: subprocess.Popen[bytes], deadline: float) -> str | None:
        """Return None once ``proc`` itself answers on our port, else why it did not."""
        raise NotImplementedError

    def _port_taken(self, log_tail: str) -> bool:
        return False

    def _retry_later(self, log_tail: str) -> bool:
        return False


class RedisServer(_ChildServer):
    """One real ``redis-server`` child process with its own port and data directory.

    ``start()`` picks a free port unless one was given; ``kill()`` is ``kill -9``; ``restart()``
    comes back on the same port with the same data directory, so with ``appendonly=True`` (which
    also sets ``appendfsync always``) every acknowledged write survives a kill. ``extra_args`` go
    last on the command line, so they override the defaults.
    """

    error = RedisServerError
    name = "redis-server"

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        appendonly: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(data_dir, "redis.log", port)
        self.appendonly = appendonly
        self.extra_args = tuple(extra_args)
        self._clients: list[redis.Redis] = []

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def command_line(self) -> list[str]:
        """The full ``redis-server`` command line for the current port."""
        args = [
            _redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--logfile",
            str(self.log_path),
            "--daemonize",
            "no",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
        ]
        if self.appendonly:
            args += ["--appendfsync", "always"]
        args += self.extra_args
        return args

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """Shut down gracefully (SIGTERM, no RDB save) and wait; SIGKILL if it overstays.

        Also closes every client made by ``client()``. Does nothing more if not running.
        """
        self._close_clients()
        super().stop(timeout)

    def client(self, **kwargs: Any) -> redis.Redis:
        """A ``redis.Redis`` for this server (bytes replies unless told otherwise).

        It keeps working across ``kill()``/``restart()`` (redis-py reconnects) and is closed by
        ``stop()``.
        """
        kwargs.setdefault("decode_responses", False)
        client = redis.Redis(host="127.0.0.1", port=self.port, **kwargs)
        self._clients.append(client)
        return client

    def _wait_ready(self, proc: subprocess.Popen[bytes], deadline: float) -> str | None:
        """Return None once ``proc`` itself answers on our port, else why it did not."""
        last_error = "no answer yet"
        while True:
            if proc.poll() is not None:
                return f"exited with code {proc.returncode}"
            # No client-side retries: this loop is the retry, and it must see the deadline.
            probe = redis.Redis(
                host="127.0.0.1",
                port=self.port,
                socket_connect_timeout=0.5,
                socket_timeout=1.0,
                retry=Retry(NoBackoff(), 0),
            )
            try:
                probe.ping()
                # Someone else may own the port (another server that won the race for it).
                server_pid = int(probe.info("server")["process_id"])
                if server_pid == proc.pid:
                    return None
                last_error = f"port {self.port} is answered by another process (pid {server_pid})"
            except redis.RedisError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            finally:
                probe.close()
            if time.monotonic() >= deadline:
                proc.kill()
                return f"no PING answer before the deadline ({last_error})"
            time.sleep(0.02)

    def _port_taken(self, log_tail: str) -> bool:
        return _REDIS_ADDRESS_IN_USE in log_tail

    def _close_clients(self) -> None:
        clients, self._clients = self._clients, []
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()


# -- PostgreSQL --------------------------------------------------------------------------------

_PG_VERSION_DIR_RE = re.compile(r"/usr/lib/postgresql/(\d+)/bin$")


def _has_server_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in ("postgres", "initdb"))


def find_postgres_bindir() -> Path:
    """The directory holding ``postgres`` and ``initdb``.

    Tried in order: ``pg_config --bindir``, the directory of a ``postgres`` on PATH, and the
    newest ``/usr/lib/postgresql/*/bin`` (Debian and Ubuntu keep the server binaries off PATH).
    """
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)

    def version(path: Path) -> int:
        match = _PG_VERSION_DIR_RE.search(path.as_posix())
        return int(match.group(1)) if match else 0

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for bindir in candidates:
        if _has_server_binaries(bindir):
            return bindir
    tried = ", ".join(str(c) for c in candidates) or "nothing found"
    raise PostgresServerError(
        "PostgreSQL server binaries (postgres, initdb) not found "
        f"(tried pg_config --bindir, PATH, /usr/lib/postgresql/*/bin: {tried}); "
        "install them, e.g. apt-get install postgresql"
    )


def _pg_user() -> pwd.struct_passwd | None:
    """The OS user PostgreSQL must run as: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresServerError(
            "running as root, and PostgreSQL refuses to run as root, but there is no 'postgres' "
            "OS user to run it as (create one, e.g. useradd --system postgres)"
        ) from None


def _check_reachable(path: Path, user: pwd.struct_passwd) -> None:
    """Fail clearly if ``user`` cannot traverse every directory above ``path``."""
    for parent in reversed(path.resolve().parents):
        st = parent.stat()
        if st.st_uid == user.pw_uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid == user.pw_gid or user.pw_name in _group_members(st.st_gid):
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            raise PostgresServerError(
                f"PostgreSQL runs as the OS user {user.pw_name!r}, which cannot reach {path}: "
                f"{parent} is mode {stat.filemode(st.st_mode)} owned by uid {st.st_uid}; put the "
                "data directory where that user can reach it (e.g. under /tmp)"
            )


def _group_members(gid: int) -> list[str]:
    import grp  # noqa: PLC0415  (rarely needed)

    try:
        return list(grp.getgrgid(gid).gr_mem)
    except KeyError:
        return []


class PostgresServer(_ChildServer):
    """One real PostgreSQL child process with its own port and data directory.

    ``data_dir`` holds the cluster (``data_dir/pgdata``, created by ``initdb`` on the first
    start, ``trust`` authentication, superuser ``postgres``) and the server log
    (``data_dir/postgres.log``). Settings go on the ``postgres`` command line, so ``restart()``
    brings back the same configuration on the same port. As root, ``initdb`` and the server run
    as the ``postgres`` OS user, so ``data_dir`` must be reachable by that user.

    ``fsync=False`` (also ``full_page_writes=off``) is much faster and still safe against
    ``kill()``: a commit is written to the OS before it returns, only an OS crash loses data.
    Right for tests and demos.
    """

    error = PostgresServerError
    name = "PostgreSQL"
    #: fast shutdown: disconnect clients, checkpoint
    stop_signal = signal.SIGINT

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        wal_level: Literal["minimal", "replica", "logical"] = "logical",
        fsync: bool = True,
        settings: Mapping[str, str] | None = None,
        bindir: Path | None = None,
    ) -> None:
        super().__init__(data_dir, "postgres.log", port)
        self.pgdata = self.data_dir / "pgdata"
        self.wal_level = wal_level
        self.fsync = fsync
        self.settings = dict(settings or {})
        self._bindir = bindir

    @property
    def bindir(self) -> Path:
        """Where ``postgres`` and ``initdb`` are (found on first use if not given)."""
        if self._bindir is None:
            self._bindir = find_postgres_bindir()
        return self._bindir

    @property
    def host(self) -> str:
        """Always ``127.0.0.1``."""
        return "127.0.0.1"

    @property
    def user(self) -> str:
        """The database superuser, ``postgres``."""
        return "postgres"

    @property
    def dsn(self) -> str:
        """libpq keyword/value connection string to the ``postgres`` database."""
        return self.dsn_for("postgres")

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/postgres``."""
        return self.url_for("postgres")

    def dsn_for(self, dbname: str) -> str:
        """libpq keyword/value connection string to ``dbname``."""
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname}"

    def url_for(self, dbname: str) -> str:
        """``postgresql://`` URL of ``dbname``."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def command_line(self) -> list[str]:
        """The full ``postgres`` command line for the current port."""
        socket_dir = str(self.pgdata) if len(str(self.pgdata)) <= _MAX_SOCKET_DIR_LEN else ""
        conf = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": socket_dir,
            "wal_level": self.wal_level,
            "max_replication_slots": "20",
            "max_wal_senders": "20" if self.wal_level != "minimal" else "0",
            "logging_collector": "off",
            "fsync": "on" if self.fsync else "off",
        }
        if not self.fsync:
            conf["full_page_writes"] = "off"
        conf |= self.settings
        args = [str(self.bindir / "postgres"), "-D", str(self.pgdata)]
        for name, value in conf.items():
            args += ["-c", f"{name}={value}"]
        return args

    def initdb(self) -> None:
        """Create the cluster in ``data_dir/pgdata`` unless it exists."""
        if (self.pgdata / "PG_VERSION").exists():
            return
        user = _pg_user()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if user is not None:
            _check_reachable(self.data_dir, user)
            os.chown(self.data_dir, user.pw_uid, user.pw_gid)
        if self.pgdata.exists():
            shutil.rmtree(self.pgdata)  # a half-made cluster from an interrupted initdb
        args = [
            str(self.bindir / "initdb"),
            "-D",
            str(self.pgdata),
            "-U",
            self.user,
            "-A",
            "trust",
            "--auth-local",
            "trust",
            "--auth-host",
            "trust",
            "-E",
            "UTF8",
            "--locale",
            "C",
            "--no-sync",
        ]
        with self.log_path.open("ab") as log:
            if user is not None:
                os.chown(self.log_path, user.pw_uid, user.pw_gid)
            offset = log.tell()
            try:
                result = subprocess.run(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    timeout=INITDB_TIMEOUT_S,
                    check=False,
                    **_as_user(user),
                )
            except subprocess.TimeoutExpired:
                raise PostgresServerError(
                    f"initdb did not finish within {INITDB_TIMEOUT_S:g}s"
                ) from None
        if result.returncode != 0:
            raise PostgresServerError(
                f"initdb failed with code {result.returncode}\ncommand: {shlex.join(args)}\n"
                f"last lines of {self.log_path}:\n{_log_tail(self.log_path, offset)}"
            )

    def connect(
        self, dbname: str = "postgres", *, autocommit: bool = True, timeout_s: float = 5.0
    ) -> psycopg.Connection[tuple[Any, ...]]:
        """A new psycopg connection to ``dbname`` (autocommit unless told otherwise)."""
        _require_psycopg()
        import psycopg  # noqa: PLC0415  (optional dependency: the embedded extra)

        return psycopg.connect(
            self.dsn_for(dbname),
            autocommit=autocommit,
            connect_timeout=max(2, round(timeout_s)),
        )

    def execute(
        self,
        query: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        dbname: str = "postgres",
    ) -> list[tuple[Any, ...]]:
        """Run one statement in autocommit mode on a fresh connection; return its rows, if any.

        Without ``params`` the text is sent as is (``%`` needs no escaping).
        """
        with self.connect(dbname) as conn, conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description is not None else []

    def create_database(self, dbname: str) -> None:
        """``CREATE DATABASE`` (the name is quoted as an identifier)."""
        from psycopg import sql  # noqa: PLC0415  (optional dependency: the embedded extra)

        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))

    def drop_database(self, dbname: str) -> None:
        """Drop ``dbname`` with what would keep it alive: its backends and replication slots.

        Logical replication slots belong to one database and block ``DROP DATABASE``; an active
        one (a connector still streaming) is released by terminating its walsender first.
        """
        from psycopg import errors, sql  # noqa: PLC0415  (optional dependency: the embedded extra)

        with self.connect() as conn:
            for _ in range(50):
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (dbname,),
                )
                conn.execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                    "WHERE database = %s AND active_pid IS NOT NULL",
                    (dbname,),
                )
                try:
                    conn.execute(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                        "WHERE database = %s",
                        (dbname,),
                    )
                    conn.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(dbname)
                        )
                    )
                    return
                except errors.ObjectInUse:
                    # A terminated walsender has not exited yet: its slot is still active.
                    time.sleep(0.1)
            raise PostgresServerError(f"could not drop database {dbname!r}: still in use")

    def _prepare(self) -> None:
        _require_psycopg()
        self.initdb()

    def _spawn_options(self) -> dict[str, Any]:
        return _as_user(_pg_user())

    def _port_taken(self, log_tail: str) -> bool:
        return _PG_ADDRESS_IN_USE in log_tail

    def _retry_later(self, log_tail: str) -> bool:
        # the backends of a killed postmaster may not have noticed its death yet and still
        # hold its shared memory
        return any(marker in log_tail for marker in _PG_RETRY_LATER)

    def _wait_ready(self, proc: subprocess.Popen[bytes], deadline: float) -> str | None:
        """Return None once ``proc`` itself answers queries on our port, else why it did not."""
        _require_psycopg()
        import psycopg  # noqa: PLC0415  (optional dependency: the embedded extra)

        last_error = "no answer yet"
        while True:
            if proc.poll() is not None:
                return f"exited with code {proc.returncode}"
            try:
                with psycopg.connect(self.dsn, connect_timeout=2, autocommit=True) as conn:
                    row = conn.execute("SHOW data_directory").fetchone()
                # Someone else may own the port (another server that won the race for it).
                if row is not None and Path(row[0]) == self.pgdata:
                    return None
                last_error = f"port {self.port} is answered by another server ({row})"
            except psycopg.OperationalError as exc:
                last_error = f"{type(exc).__name__}: {str(exc).strip()}"
            if time.monotonic() >= deadline:
                proc.kill()
                return f"no answer before the deadline ({last_error})"
            time.sleep(0.05)


def _as_user(user: pwd.struct_passwd | None) -> dict[str, Any]:
    """``subprocess`` arguments running a child as ``user`` (nothing when None)."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _require_psycopg() -> None:
    try:
        import psycopg  # noqa: F401, PLC0415  (optional dependency: the embedded extra)
    except ImportError:
        raise PostgresServerError(
            "PostgresServer needs psycopg: pip install 'streamsync[embedded]'"
        ) from None
