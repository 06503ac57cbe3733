"""Nest end to end: real PostgreSQL (orders, and order_items with a foreign key ON DELETE
CASCADE), the real Debezium engine, two workers; every ``order:<id>`` document equals the order
row plus ``json_object_agg`` of its items, after a workload of inserts, updates, items moving
between orders, cascading deletes and re-inserts, and again after a shuffled replay of half of
each stream. JSON text, and RedisJSON documents in a cache Redis loading the module."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
import redis
import yaml

from tests.e2e import (
    Kind,
    MakePipeline,
    Pipeline,
    assert_table_matches,
    needs_engine,
    replay_sample,
    values,
)
from tests.servers import wait_until

pytestmark = [needs_engine, pytest.mark.slow]

TABLES = ["orders", "order_items"]
DDL = """
CREATE TABLE orders (id int PRIMARY KEY, status text NOT NULL, note text);
CREATE TABLE order_items (
    id int PRIMARY KEY,
    order_id int NOT NULL REFERENCES orders ON DELETE CASCADE,
    sku text NOT NULL,
    qty int
);
"""
#: The order row and, when it has items, ``items``: item id -> the item's selected columns.
EXPECTED = """
SELECT 'order:' || o.id,
       (jsonb_build_object('id', o.id, 'status', o.status, 'note', o.note)
        || COALESCE((SELECT jsonb_build_object('items', jsonb_object_agg(
                                 i.id::text,
                                 jsonb_build_object('id', i.id, 'sku', i.sku, 'qty', i.qty)))
                     FROM order_items i WHERE i.order_id = o.id HAVING count(*) > 0),
                    '{}'::jsonb))::json
FROM orders o
"""


def rules(encoding: str) -> list[dict[str, Any]]:
    return [
        {"table": "public.orders", "key": "order:{id}", "type": "json", "encoding": encoding},
        {
            "table": "public.order_items",
            "type": "json",
            "nest": {"parent_key": "order:{order_id}", "path": "items", "member": "{id}"},
            "fields": ["id", "sku", "qty"],
        },
    ]


def workload(p: Pipeline, rng: random.Random) -> None:
    for step in range(150):
        oid, iid = rng.randint(1, 20), rng.randint(1, 60)
        what = rng.randrange(7)
        if what == 0:
            p.sql("UPDATE orders SET status = %s WHERE id = %s", (f"s{step}", oid))
        elif what == 1:
            # cascades to the items, later in the same transaction
            p.sql("DELETE FROM orders WHERE id = %s", (oid,))
        elif what == 2:
            p.sql("INSERT INTO orders VALUES (%s, 'again', NULL) ON CONFLICT DO NOTHING", (oid,))
        elif what == 3:
            p.sql(
                "INSERT INTO order_items SELECT %s, id, %s, %s FROM orders WHERE id = %s"
                " ON CONFLICT (id) DO UPDATE SET qty = EXCLUDED.qty",
                (iid, f"sku{iid}", step, oid),
            )
        elif what == 4:
            # moves the item to another order, when that order exists
            p.sql(
                "UPDATE order_items SET order_id = o.id FROM orders o WHERE o.id = %s"
                " AND order_items.id = %s",
                (oid, iid),
            )
        elif what == 5:
            p.sql("DELETE FROM order_items WHERE id = %s", (iid,))
        else:
            p.sql("UPDATE order_items SET qty = NULL WHERE id = %s", (iid,))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("encoding", ["text", "redisjson"])
def test_nested_documents_follow_the_database(
    pipelines: MakePipeline, encoding: str, request: pytest.FixtureRequest
) -> None:
    p = pipelines(tables=TABLES, rules=rules(encoding), worker={"trim": False, "batch_size": 9})
    cache, kind = p.r, "json"
    if encoding == "redisjson":
        cache, kind = request.getfixturevalue("rj"), "redisjson"
        data = yaml.safe_load(p.setup.config.read_text())
        data["target"] = {"url": request.getfixturevalue("rejson_url")}
        p.setup.config.write_text(yaml.safe_dump(data, sort_keys=False))
    p.sql(DDL)
    p.sql("INSERT INTO orders SELECT g, 'new', NULL FROM generate_series(1, 20) g")
    p.sql(
        "INSERT INTO order_items SELECT g, 1 + g % 20, 'sku' || g, g FROM generate_series(1, 40) g"
    )
    workers = (p.start_worker("w1"), p.start_worker("w2"))
    capture = p.start_capture()
    p.wait_for_added(capture, 20, "orders")
    p.wait_for_added(capture, 40, "order_items")
    workload(p, random.Random(5))
    p.sql("INSERT INTO orders VALUES (1000, 'marker', NULL)")
    marker: redis.Redis = cache
    wait_until(lambda: bool(marker.exists("order:1000")), timeout=90, message="the marker")
    p.settle(*workers)
    assert capture.stop() == 0, capture.log()
    ops = {t: Counter(e["op"] for e in values(p.r, p.setup.stream_for(t))) for t in TABLES}
    assert ops["orders"]["d"] >= 5 and ops["order_items"]["d"] >= 10, ops
    assert ops["orders"]["c"] >= 3 and ops["order_items"]["u"] >= 10, ops
    check: Kind = "redisjson" if kind == "redisjson" else "json"
    assert_table_matches(cache, p.pg, p.dbname, pattern="order:*", kind=check, query=EXPECTED)

    # half of each stream again, shuffled: nothing changes
    replay_sample(p, random.Random(13))
    p.settle(*workers)
    assert_table_matches(cache, p.pg, p.dbname, pattern="order:*", kind=check, query=EXPECTED)
    assert not any(k.endswith(b":dlq") for k in p.r.scan_iter(count=1000))
    for worker in workers:
        worker.terminate()
        assert worker.wait() == 0, worker.log_tail()
