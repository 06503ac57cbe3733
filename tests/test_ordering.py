"""Real captures of changes committed out of LSN order
(``fixtures/debezium-3.6.3-postgres-ordering``), applied by two worker processes out of stream
order: every row must end as the database committed it (the captures' ``final_rows``).

Each capture is written to its stream as Debezium Server's Redis sink writes it, then re-sent in
part as the sink does after a failure (a slice again, in order), and a slice of the entries whose
event carries its whole position is added again in random order. The beginning of the stream is
delivered to a consumer that never acknowledges it, as a worker killed with entries in hand leaves
them: the two workers apply the rest first, hold each change of a first transaction after a
snapshot whose reads are still pending there, and claim the beginning once it has been idle long
enough.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.debezium import write_config
from tests.e2e import GROUP, wait_settled
from tests.replies import as_str, xadd
from tests.workers import WorkerProcess

FIXTURES = Path(__file__).parent / "fixtures" / "debezium-3.6.3-postgres-ordering"
CAPTURES = ["a_a1", "a_a2s", "a_a2d", "b", "c"]
RULE = {"table": "public.items", "key": "item:{id}", "type": "hash"}
#: Worker settings: the killed worker's entries are claimed once the workers, started meanwhile,
#: have read the rest; batches small enough that the two workers and the claims interleave
#: (larger for the 6,000 entries of ``c``).
WORKER = {"claim_idle_ms": 2500, "claim_interval_ms": 200}
SETTLE_TIMEOUT_S = 90.0


def records(capture: str) -> list[dict[str, Any]]:
    """The capture's records, in the engine's emission order."""
    with (FIXTURES / f"{capture}.jsonl").open() as f:
        return [json.loads(line) for line in f]


def sink_fields(record: dict[str, Any]) -> dict[str, str]:
    """The entry Debezium Server's Redis sink writes for ``record`` (compact format)."""
    key, value = record["key"], record["value"]
    return {
        "default" if key is None else json.dumps(key, separators=(",", ":")): (
            "default" if value is None else json.dumps(value, separators=(",", ":"))
        )
    }


def carries_its_position(record: dict[str, Any]) -> bool:
    """A snapshot read, or a streamed change with a ``lastCommitLsn``: its event alone places
    it. (A change of the first transaction after a snapshot is placed by the stream's order.)"""
    value = record["value"]
    if value is None:
        return False
    return bool(value["op"] == "r" or json.loads(value["source"]["sequence"])[0] is not None)


def expected_rows(capture: str) -> dict[str, dict[str, str]]:
    """The hash of every row at the end: ``final_rows`` holds its name, or [name, qty]."""
    with (FIXTURES / f"{capture}.truth.json").open() as f:
        final: dict[str, Any] = json.load(f)["final_rows"]
    out = {}
    for row_id, row in final.items():
        name, qty = row if isinstance(row, list) else (row, None)
        out[f"item:{row_id}"] = {"id": row_id, "name": name} | (
            {} if qty is None else {"qty": str(qty)}
        )
    return out


def row_problems(r: redis.Redis, capture: str) -> list[str]:
    want = expected_rows(capture)
    have = {as_str(k) for k in r.scan_iter(match="item:*", count=1000)}
    problems = [f"{k}: in Redis, not in the table" for k in sorted(have - want.keys())]
    problems += [f"{k}: in the table, not in Redis" for k in sorted(want.keys() - have)]
    for key in sorted(have & want.keys()):
        got = {as_str(f): as_str(v) for f, v in r.hgetall(key).items()}
        # the a_* captures' truth names only the name: compare the columns it gives
        got = {c: v for c, v in got.items() if c in want[key]}
        if got != want[key]:
            problems.append(f"{key}: want {want[key]}, got {got}")
    return problems


@pytest.mark.timeout(180)
@pytest.mark.parametrize("capture", CAPTURES)
def test_every_row_ends_as_committed(
    r: redis.Redis, redis_url: str, tmp_path: Path, capture: str
) -> None:
    recs = records(capture)
    stream = recs[0]["dest"]
    rng = random.Random(capture)
    for rec in recs:
        xadd(r, stream, sink_fields(rec))
    n = len(recs)
    start = rng.randrange(n)
    for rec in recs[start : start + max(5, n // 5)]:
        xadd(r, stream, sink_fields(rec))
    start = rng.randrange(n)
    shuffled = [rec for rec in recs[start : start + max(5, n // 5)] if carries_its_position(rec)]
    rng.shuffle(shuffled)
    for rec in shuffled:
        xadd(r, stream, sink_fields(rec))

    # the killed worker held everything before the last change of a first transaction after a
    # snapshot: that change's snapshot is marked only once the claims bring its reads back
    last_first = max(i for i, rec in enumerate(recs) if not carries_its_position(rec))
    r.xgroup_create(stream, GROUP, id="0")
    r.xreadgroup(GROUP, "killed", {stream: ">"}, count=last_first)
    cfg = write_config(
        tmp_path / "c.yaml",
        redis_url,
        streams=[stream],
        rules=[RULE],
        batch_size=5 if n < 1000 else 100,
        **WORKER,
    )
    logs = tmp_path / "logs"
    with WorkerProcess(cfg, "w1", logs) as w1, WorkerProcess(cfg, "w2", logs) as w2:
        wait_settled(r, [stream], [w1, w2], timeout=SETTLE_TIMEOUT_S)
        problems = row_problems(r, capture)
        assert not problems, f"{len(problems)} rows wrong:\n" + "\n".join(problems[:10])
        for worker in (w1, w2):
            assert "no snapshot mark precedes" not in worker.log(), worker.log_tail()
    # the changes whose event lacks a lastCommitLsn waited for their snapshot's mark
    marks = json.loads(as_str(r.hget("streamsync:snaps", stream) or b"[]"))
    snapshots = {rec["value"]["source"]["lsn"] for rec in recs if rec["value"]["op"] == "r"}
    assert {int(lsn) for lsn, _ in marks} == snapshots
