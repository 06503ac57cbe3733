"""Latency samples a worker keeps while it runs (commit to applied, stream entry to applied),
with exact quantiles: what benchmarks and tests read."""

from __future__ import annotations

import math
from collections import deque


class LatencySamples:
    """The most recent latencies (milliseconds), bounded, with exact quantiles over them."""

    def __init__(self, size: int = 100_000) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self.last: float | None = None

    def add(self, ms: float) -> None:
        """Record one latency."""
        self._samples.append(ms)
        self.last = ms

    def __len__(self) -> int:
        return len(self._samples)

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1, nearest rank) of the recorded samples, None if empty."""
        if not self._samples:
            return None
        ordered = sorted(self._samples)
        rank = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        return ordered[rank]

    def mean(self) -> float | None:
        """The mean of the recorded samples, None if empty."""
        return sum(self._samples) / len(self._samples) if self._samples else None

    def clear(self) -> None:
        """Forget every sample."""
        self._samples.clear()
        self.last = None
