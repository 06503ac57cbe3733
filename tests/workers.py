"""Workers for tests: ``streamsync run`` subprocesses (started, signalled, killed, their logs read),
and in-process workers (drained, or run in a thread).

A worker runs as ``python -m streamsync run`` in a child process of the test session, so that
SIGTERM, SIGINT and SIGKILL are real test inputs. Its log goes to a file the test owns (never to a
pipe nobody drains, which would block a chatty worker), and the summary line it logs on exit is
parsed into counts. An in-process worker is for tests that read its counts or hand it an
observer; signals and crashes need a subprocess.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Self

from streamsync.config import load_settings
from streamsync.embedded.sandbox import die_with_parent_hook
from streamsync.errors import ExitCode
from streamsync.worker import Worker

__all__ = ["WorkerProcess", "WorkerThread", "drain", "outcomes"]

DEFAULT_EXIT_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 40

# "worker w1 stopped: applied 120, stale 3" (or "... stopped: nothing processed")
_SUMMARY_RE = re.compile(r"worker (?P<consumer>\S+) stopped: (?P<counts>.*)$", re.MULTILINE)
_COUNT_RE = re.compile(r"(?P<outcome>[a-z_]+) (?P<n>\d+)")


class WorkerProcess:
    """One ``streamsync run`` child process with a consumer name and a log file of its own."""

    def __init__(
        self,
        config: Path,
        consumer: str,
        log_dir: Path,
        *,
        drain: bool = False,
        log_level: str = "INFO",
    ) -> None:
        self.config = Path(config)
        self.consumer = consumer
        self.drain = drain
        self.log_level = log_level
        self.log_path = Path(log_dir) / f"worker-{consumer}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = "not started"
        if self._proc is not None:
            rc = self._proc.poll()
            state = f"pid={self._proc.pid}" if rc is None else f"exited {rc}"
        return f"WorkerProcess({self.consumer!r}, {state})"

    def command_line(self) -> list[str]:
        """The full command line of the worker."""
        args = [sys.executable, "-m", "streamsync", "--log-level", self.log_level]
        args += ["run", "-c", str(self.config), "--consumer", self.consumer]
        if self.drain:
            args.append("--drain")
        return args

    def start(self) -> Self:
        """Launch the worker; return ``self``. Its log is appended to ``log_path``."""
        if self._proc is not None:
            raise RuntimeError(f"{self!r} was already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.command_line(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent_hook(),  # noqa: PLW1509
            )
        return self

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        """The child process (after ``start()``)."""
        if self._proc is None:
            raise RuntimeError(f"{self!r} was never started")
        return self._proc

    @property
    def pid(self) -> int:
        """The worker's pid."""
        return self.proc.pid

    @property
    def running(self) -> bool:
        """Whether the worker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the worker (nothing if it already exited)."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)

    def terminate(self) -> None:
        """SIGTERM: the worker finishes and acknowledges the batch in hand, then exits 0."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """``kill -9`` the worker and reap it."""
        if self._proc is None:
            return
        self.send_signal(signal.SIGKILL)
        self._proc.wait(timeout=DEFAULT_EXIT_TIMEOUT_S)

    def wait(self, timeout: float = DEFAULT_EXIT_TIMEOUT_S) -> int:
        """Wait for the worker to exit and return its exit code.

        Raises ``AssertionError`` with the tail of its log if it is still running at the deadline.
        """
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.consumer} did not exit within {timeout:g}s; last lines of "
                f"{self.log_path}:\n{self.log_tail()}"
            ) from None

    def log(self) -> str:
        """The worker's whole log so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the worker's log, for failure messages."""
        tail = self.log().splitlines()[-lines:]
        return "\n".join(tail) if tail else "<log empty>"

    def summary(self) -> dict[str, int]:
        """The counts of the exit summary line (``{"applied": 120, "stale": 3}``).

        Raises ``AssertionError`` if the worker logged no summary for this consumer.
        """
        for match in _SUMMARY_RE.finditer(self.log()):
            if match["consumer"] == self.consumer:
                return {m["outcome"]: int(m["n"]) for m in _COUNT_RE.finditer(match["counts"])}
        raise AssertionError(
            f"worker {self.consumer} logged no exit summary; last lines of {self.log_path}:\n"
            f"{self.log_tail()}"
        )

    def close(self) -> None:
        """Kill the worker if it is still running (teardown); safe to call twice."""
        if self.running:
            self.kill()

    def __enter__(self) -> Self:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class WorkerThread:
    """An in-process worker running in a thread of its own, stopped and joined at exit."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.result: list[ExitCode] = []
        self._thread = threading.Thread(target=lambda: self.result.append(worker.run()))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def join(self, timeout: float) -> ExitCode:
        """Wait for a draining worker to return; its exit code."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"worker {self.worker.consumer} still running"
        (code,) = self.result
        return code

    def stop(self) -> None:
        """Ask the worker to finish the batch in hand and return; wait until it has."""
        self.worker.request_stop()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), f"worker {self.worker.consumer} did not stop"


def drain(cfg: Path, consumer: str = "w1") -> Worker:
    """Run an in-process worker on config file ``cfg`` until the group is drained."""
    worker = Worker(load_settings(cfg, environ={}), consumer=consumer, drain=True)
    assert worker.run() == ExitCode.OK
    return worker


def outcomes(worker: Worker) -> dict[str, int]:
    """A worker's counts per outcome, over every stream, table and op."""
    totals: dict[str, int] = {}
    for (_, _, _, outcome), n in worker.counts.items():
        totals[outcome] = totals.get(outcome, 0) + n
    return totals
