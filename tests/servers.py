"""Real ``redis-server`` processes for tests, on free ports, that can be killed and restarted.

Tests never talk to the Redis on 6379 and never use fakes: every server here is a child process
of the test session, bound to 127.0.0.1 on a port of its own, with its data under a directory the
test owns. ``wait_until`` is the one way tests synchronise with anything asynchronous.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["RedisServer", "RedisServerError", "free_port", "kill_all", "wait_until"]

DEFAULT_START_TIMEOUT_S = 15.0
DEFAULT_STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 40
# A port that another socket grabbed between free_port() and the server's bind is retried on a
# new port this many times; restarts keep their port and retry it until the start deadline.
MAX_PORT_ATTEMPTS = 5

_ADDRESS_IN_USE = "Address already in use"

# Ports handed out by free_port() in this process. The kernel readily hands a just-released port
# out again, so without this a server killed mid-test could lose its port to the next
# free_port() caller and then fail to restart on it.
_issued_ports: set[int] = set()
_issued_lock = threading.Lock()

# Every live redis-server child, killed at interpreter exit whatever happened to the tests.
_live: dict[int, subprocess.Popen[bytes]] = {}
_live_lock = threading.Lock()


class RedisServerError(RuntimeError):
    """Raised when a redis-server cannot be found, started or stopped."""


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
    """SIGKILL and reap every redis-server started by this process that is still running."""
    with _live_lock:
        procs = list(_live.values())
        _live.clear()
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=DEFAULT_STOP_TIMEOUT_S)


atexit.register(kill_all)


def _redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    if os.access("/usr/bin/redis-server", os.X_OK):
        return "/usr/bin/redis-server"
    raise RedisServerError("redis-server not found on PATH nor at /usr/bin/redis-server")


def _die_with_parent_hook() -> Callable[[], None] | None:
    """Return a pre-exec hook asking Linux to SIGKILL the child when its parent thread dies.

    atexit covers normal exits and failing tests; this covers the test process itself being
    killed (SIGKILL, ``os._exit`` from a timeout). The kernel ties the signal to the *thread*
    that forked, so it is only used from the main thread: a server started from a short-lived
    helper thread would otherwise die when that thread ends.
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


class RedisServer:
    """One real ``redis-server`` child process with its own port and data directory.

    ``start()`` picks a free port unless one was given; ``kill()`` is ``kill -9``; ``restart()``
    comes back on the same port with the same data directory, so with ``appendonly=True`` (which
    also sets ``appendfsync always``) every acknowledged write survives a kill. ``extra_args`` go
    last on the command line, so they override the defaults.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        appendonly: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.data_dir = Path(data_dir)
        self.appendonly = appendonly
        self.extra_args = tuple(extra_args)
        self.log_path = self.data_dir / "redis.log"
        self._port = port
        # A port given by the caller, or one the server has already listened on, must be kept.
        self._port_fixed = port is not None
        self._proc: subprocess.Popen[bytes] | None = None
        self._clients: list[redis.Redis] = []

    def __repr__(self) -> str:
        state = f"pid={self._proc.pid}" if self.running and self._proc else "stopped"
        return f"RedisServer(port={self._port}, {state}, data_dir={str(self.data_dir)!r})"

    @property
    def port(self) -> int:
        """The TCP port, chosen on first use if none was given."""
        if self._port is None:
            self._port = free_port()
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        """The pid of the current (or last) redis-server process."""
        if self._proc is None:
            raise RedisServerError(f"{self!r} was never started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the redis-server process is alive."""
        return self._proc is not None and self._proc.poll() is None

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

    def start(self, timeout: float = DEFAULT_START_TIMEOUT_S) -> Self:
        """Launch redis-server and wait until it answers PING as itself; return ``self``.

        Raises ``RedisServerError`` with the tail of the server log if it does not come up.
        """
        if self.running:
            raise RedisServerError(f"{self!r} is already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        attempts = 0
        while True:
            attempts += 1
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            proc = self._spawn()
            error = self._wait_ready(proc, deadline)
            if error is None:
                self._port_fixed = True
                return self
            log_tail = self._log_tail(log_offset)
            self._reap(proc, DEFAULT_STOP_TIMEOUT_S)
            port_taken = _ADDRESS_IN_USE in log_tail
            if port_taken and not self._port_fixed and attempts < MAX_PORT_ATTEMPTS:
                self._port = free_port()
                continue
            if port_taken and self._port_fixed and time.monotonic() < deadline:
                # Something briefly holds our port (e.g. a client's ephemeral source port).
                time.sleep(0.05)
                continue
            raise RedisServerError(
                f"redis-server on port {self.port} did not start: {error}\n"
                f"command: {shlex.join(self.command_line())}\n"
                f"last lines of {self.log_path}:\n{log_tail}"
            )

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """Shut down gracefully (SIGTERM, no RDB save) and wait; SIGKILL if it overstays.

        Also closes every client made by ``client()``. Does nothing more if not running.
        """
        self._close_clients()
        proc = self._proc
        if proc is None or proc.poll() is not None:
            if proc is not None:
                self._reap(proc, timeout)
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
        self._reap(proc, timeout)

    def kill(self) -> None:
        """``kill -9`` the server and reap it. Does nothing if not running."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        self._reap(proc, DEFAULT_STOP_TIMEOUT_S)

    def restart(self, timeout: float = DEFAULT_START_TIMEOUT_S) -> Self:
        """Start again on the same port with the same data directory (stopping it first if up)."""
        if self.running:
            self.stop()
        self._port_fixed = True
        return self.start(timeout=timeout)

    def client(self, **kwargs: Any) -> redis.Redis:
        """A ``redis.Redis`` for this server (bytes replies unless told otherwise).

        It keeps working across ``kill()``/``restart()`` (redis-py reconnects) and is closed by
        ``stop()``.
        """
        kwargs.setdefault("decode_responses", False)
        client = redis.Redis(host="127.0.0.1", port=self.port, **kwargs)
        self._clients.append(client)
        return client

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

    def _spawn(self) -> subprocess.Popen[bytes]:
        # stdout/stderr share the log file so that errors printed before the logfile is opened
        # (a bad argument, say) end up in the tail we report.
        with self.log_path.open("ab") as console:
            proc = subprocess.Popen(
                self.command_line(),
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                preexec_fn=_die_with_parent_hook(),  # noqa: PLW1509
            )
        self._proc = proc
        with _live_lock:
            _live[proc.pid] = proc
        return proc

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

    def _reap(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
        with _live_lock:
            _live.pop(proc.pid, None)

    def _close_clients(self) -> None:
        clients, self._clients = self._clients, []
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()

    def _log_tail(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                text = log.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"<log unreadable: {exc}>"
        lines = text.splitlines()[-LOG_TAIL_LINES:]
        return "\n".join(lines) if lines else "<log empty>"
