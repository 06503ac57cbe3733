"""Latency samples: bounded, exact nearest-rank quantiles."""

from __future__ import annotations

from streamsync.latency import LatencySamples


def test_quantiles_are_nearest_rank() -> None:
    samples = LatencySamples()
    assert samples.quantile(0.5) is None and samples.mean() is None
    for ms in range(1, 101):
        samples.add(float(ms))
    assert samples.quantile(0.5) == 50.0
    assert samples.quantile(0.99) == 99.0
    assert samples.quantile(1.0) == 100.0
    assert samples.quantile(0.0) == 1.0
    assert samples.last == 100.0
    assert samples.mean() == 50.5


def test_only_the_most_recent_are_kept() -> None:
    samples = LatencySamples(size=3)
    for ms in (100.0, 1.0, 2.0, 3.0):
        samples.add(ms)
    assert len(samples) == 3
    assert samples.quantile(1.0) == 3.0
    samples.clear()
    assert len(samples) == 0 and samples.last is None
