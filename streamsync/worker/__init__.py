"""The consumer-group worker: a pure batch core (``core``) inside a loop (``loop``) that reads,
applies, acknowledges, reclaims, dead-letters, trims and stops cleanly.

Modules, in the order a batch meets them:

- ``session``: the connections (client, pipelined link, Functions library) to the streams' Redis
  and to the target holding the cache (one and the same without a ``target`` section);
- ``roundtrip``: one pipelined round trip of named command groups, each on its Redis's link;
- ``entry``: a delivered stream entry and what it becomes;
- ``core``: decode + plan + pack into calls + settle the replies (no I/O);
- ``barrier``: entries held until the older entries of their stream are settled (a TRUNCATE, a
  change of the first transaction after a snapshot);
- ``deadletters``: writing dead letters (the record layout is ``streamsync.deadletter``'s);
- ``counters``: counts, latency samples, the stats hashes and the observer;
- ``housekeeping``: discovery, claims, trimming, memory, pruning, liveness;
- ``policy``: the target's eviction policy, read now and then.
"""

from streamsync.worker.counters import WorkerObserver
from streamsync.worker.housekeeping import CONSUMER_PRUNE_IDLE_MS, heartbeat_ttl_ms
from streamsync.worker.loop import Worker, default_consumer_name, run_worker

__all__ = [
    "CONSUMER_PRUNE_IDLE_MS",
    "Worker",
    "WorkerObserver",
    "default_consumer_name",
    "heartbeat_ttl_ms",
    "run_worker",
]
