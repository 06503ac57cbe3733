"""What a worker counts while it runs, and how it publishes it: the stats hashes
``streamsync status`` reads, the observer (Prometheus metrics), the latency samples, and the
exit summary."""

from __future__ import annotations

from collections import Counter
from typing import Any, Protocol

from streamsync.functions import Command
from streamsync.keys import StateKeys
from streamsync.latency import LatencySamples
from streamsync.worker.entry import Entry

#: (stream, table, op, outcome)
CountKey = tuple[str, str, str, str]


class WorkerObserver(Protocol):
    """What a worker reports as it goes (streamsync.metrics implements it)."""

    def counted(self, stream: str, table: str, op: str, outcome: str, n: int) -> None:
        """``n`` entries of ``stream`` reached ``outcome`` (applied, stale, dead_lettered...)."""

    def applied_batch(self, entries: int, rows: int, seconds: float) -> None:
        """A round trip applied ``entries`` entries (``rows`` rows) in ``seconds``."""

    def sync_lag(self, seconds: float) -> None:
        """An applied change's source commit (``source.ts_ms``) to applied in Redis."""

    def reconnected(self) -> None:
        """The worker lost its connection and reconnects."""


class Counters:
    """Counts per (stream, table, op, outcome), the newest applied change per stream, and the
    latency samples, published with each round trip."""

    def __init__(self, keys: StateKeys, group: str, observer: WorkerObserver | None) -> None:
        self.keys = keys
        self.group = group
        self.observer = observer
        self.counts: Counter[CountKey] = Counter()
        #: Source commit (``source.ts_ms``) to applied in Redis, per applied entry.
        self.commit_lag = LatencySamples()
        #: Stream entry added (its id's time) to applied in Redis: the part streamsync adds.
        self.stream_lag = LatencySamples()
        # counts as last published, and the newest applied change per stream (applied at,
        # source commit time, entry id), published with the next round trip
        self._published: Counter[CountKey] = Counter()
        self._counted = False
        self._last_applied: dict[str, tuple[int, int | None, bytes]] = {}

    def count(self, entry: Entry, outcome: str, n: int = 1) -> None:
        """``n`` entries like ``entry`` reached ``outcome``."""
        self.counts[(entry.stream, entry.table, entry.op, outcome)] += n
        self._counted = True

    def count_stream(self, stream: str, outcome: str, n: int) -> None:
        """``n`` entries of ``stream``, not yet decoded, reached ``outcome`` (claimed)."""
        self.counts[(stream, "", "", outcome)] += n
        self._counted = True

    def settled(self, entry: Entry, now_ms: float) -> None:
        """``entry`` was applied (or found stale) at ``now_ms``: count it and time it."""
        self.count(entry, entry.outcome or "applied")
        self.stream_lag.add(now_ms - entry.added_ms)
        if entry.outcome not in (None, "applied"):
            # a replay found stale says nothing of how far behind the cache is
            return
        if entry.ts_ms is not None:
            self.commit_lag.add(now_ms - entry.ts_ms)
            if self.observer is not None:
                self.observer.sync_lag(max(0.0, now_ms - entry.ts_ms) / 1000)
        self._last_applied[entry.stream] = (int(now_ms), entry.ts_ms, entry.id)

    @property
    def unpublished(self) -> bool:
        """Whether something was counted since the last ``publish``."""
        return self._counted or bool(self._last_applied)

    def publish(self) -> list[Command]:
        """The HINCRBY/HSET commands publishing what was counted since the last call (the
        growth of ``counts`` since then), which the observer hears of too."""
        commands: list[Command] = []
        if self._counted:
            for (stream, table, op, outcome), total in self.counts.items():
                n = total - self._published[(stream, table, op, outcome)]
                if not n:
                    continue
                key = self.keys.stats(self.group, stream)
                commands.append(("HINCRBY", key, f"n:{table}:{op}:{outcome}", n))
                if self.observer is not None:
                    self.observer.counted(stream, table, op, outcome, n)
            self._published = self.counts.copy()
            self._counted = False
        for stream, (applied_ms, ts_ms, entry_id) in self._last_applied.items():
            fields: list[Any] = ["last_applied_ms", applied_ms, "last_id", entry_id]
            if ts_ms is not None:
                fields += ["last_source_ts_ms", ts_ms]
            commands.append(("HSET", self.keys.stats(self.group, stream), *fields))
        self._last_applied.clear()
        return commands

    def totals(self) -> Counter[str]:
        """Counts per outcome over every stream, table and op."""
        totals: Counter[str] = Counter()
        for (_, _, _, outcome), n in self.counts.items():
            totals[outcome] += n
        return totals

    def summary(self) -> str:
        """``applied 120, stale 3`` (outcomes sorted), or ``nothing processed``."""
        totals = self.totals()
        return ", ".join(f"{k} {v}" for k, v in sorted(totals.items())) or "nothing processed"
