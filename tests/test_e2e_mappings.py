"""End to end, the mappings of the seed article in one configuration, judged as a new user would:
PostgreSQL -> the real Debezium engine (``streamsync capture``) -> Redis Streams -> two
``streamsync run`` workers of one consumer group -> hashes, sets, a sorted set and capped lists.

The workload runs through psycopg on a real PostgreSQL, in many transactions: inserts, updates
that move users between plans and products in and out of the sorted set, role grants and revokes,
a primary-key change, deletes, a TRUNCATE followed by new grants, and enough activity that feeds
are trimmed. Every structure is then compared with what a fresh query of the database builds,
and no other user-visible key may exist. Finally a shuffled sample of already-applied stream
entries is added again (a replay at old positions): nothing may change.

A second test makes the out-of-order delivery of a consumer group deterministic for a capped list:
a worker applies a delete inside a full feed after the other worker applied a newer insert.

What each structure must hold is computed by SQL here, never by streamsync's code.
"""

from __future__ import annotations

import json
import random
from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

import pytest
import redis

from tests.e2e import (
    GROUP,
    CaptureProcess,
    MakePipeline,
    Pipeline,
    needs_engine,
    replay_sample,
    values,
    wait_for_event,
    xrange,
)
from tests.servers import wait_until
from tests.workers import WorkerProcess

if TYPE_CHECKING:
    import psycopg

pytestmark = [needs_engine, pytest.mark.slow]

#: The ``pipelines`` fixture: ``Pipeline.create``'s keyword arguments -> a pipeline.

TABLES = ["users", "user_roles", "products", "activity"]
DDL = """
CREATE TABLE users (id serial PRIMARY KEY, name text, email text, plan text, active bool);
CREATE TABLE user_roles (user_id int, role text, PRIMARY KEY (user_id, role));
CREATE TABLE products (id serial PRIMARY KEY, name text, price numeric(10, 2), active bool);
CREATE TABLE activity (
    id bigserial PRIMARY KEY, user_id int, action text, created_at timestamptz DEFAULT now()
);
"""
FEED_LEN = 5
FEED_RULE = {
    "table": "public.activity",
    "key": "feed:{user_id}",
    "type": "list",
    "value": "json",
    "max_len": FEED_LEN,
}
RULES: list[dict[str, Any]] = [
    {
        "table": "public.users",
        "key": "user:{id}",
        "type": "hash",
        "fields": ["id", "name", "email", "plan"],
        "rename": {"email": "mail"},
    },
    {"table": "public.users", "key": "plan:{plan}:users", "type": "set", "member": "{id}"},
    {
        "table": "public.user_roles",
        "key": "role:{role}:users",
        "type": "set",
        "member": "{user_id}",
    },
    {
        "table": "public.products",
        "key": "product_prices",
        "type": "zset",
        "member": "product:{id}",
        "score": "price",
        "where": "active = true",
    },
    FEED_RULE,
]

# -- what the database says each structure must hold ---------------------------------------

USER_HASHES = """
SELECT 'user:' || id, json_build_object('id', id::text, 'name', name, 'mail', email, 'plan', plan)
FROM users
"""
PLAN_SETS = "SELECT 'plan:' || plan || ':users', array_agg(id::text) FROM users GROUP BY plan"
ROLE_SETS = """
SELECT 'role:' || role || ':users', array_agg(user_id::text) FROM user_roles GROUP BY role
"""
#: A product without a price has no score: it ranks nowhere, like an inactive one.
PRICES = """
SELECT 'product:' || id, price FROM products WHERE active AND price IS NOT NULL
"""
#: The newest FEED_LEN rows of each user, newest first, as the JSON documents Debezium sends
#: (timestamptz: ISO 8601 in UTC with 6 digits).
FEEDS = f"""
SELECT 'feed:' || user_id,
       json_agg(json_build_object(
           'id', id, 'user_id', user_id, 'action', action,
           'created_at', to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
         ORDER BY id DESC)
FROM (SELECT *, row_number() OVER (PARTITION BY user_id ORDER BY id DESC) AS n FROM activity) a
WHERE n <= {FEED_LEN}
GROUP BY user_id
"""


def canonical(doc: Any) -> str:
    """A JSON value as canonical text: equal texts are equal values, types included (unlike
    ``==``, ``1`` is not ``"1"`` nor ``1.0`` nor ``true``)."""
    return json.dumps(doc, sort_keys=True)


def query(p: Pipeline, sql: str) -> dict[str, Any]:
    """``sql``'s rows as {first column: second column}."""
    out: dict[str, Any] = {}
    for key, value in p.sql(sql):
        assert key not in out, f"the expectation names {key!r} twice"
        out[key] = value
    return out


def user_keys(r: redis.Redis) -> dict[str, bytes]:
    """Every key a cache user sees (not streams, not streamsync's own records), with its type."""
    out: dict[str, bytes] = {}
    for raw in r.scan_iter(count=1000):
        key = raw.decode()
        kind = cast(bytes, r.type(raw))
        if kind != b"stream" and not key.startswith("streamsync:"):
            out[key] = kind
    return out


def mismatches(p: Pipeline) -> list[str]:
    """Every difference between the database, queried now, and the cache."""
    # each check adds the keys it expects, with their types, to want_types
    want_types: dict[str, bytes] = {}
    return [
        *hash_mismatches(p, want_types),
        *set_mismatches(p, want_types),
        *zset_mismatches(p, want_types),
        *feed_mismatches(p, want_types),
        *key_mismatches(p.r, want_types),
    ]


def hash_mismatches(p: Pipeline, want_types: dict[str, bytes]) -> list[str]:
    """The users' hashes."""
    problems: list[str] = []
    hashes = {k: json.loads(v) if isinstance(v, str) else v for k, v in p.sql(USER_HASHES)}
    for key, row in hashes.items():
        want_types[key] = b"hash"
        want = {c: v for c, v in row.items() if v is not None}
        got = {
            f.decode(): v.decode() for f, v in cast(dict[bytes, bytes], p.r.hgetall(key)).items()
        }
        if got != want:
            problems.append(f"{key}: HGETALL {got} != {want}")
    return problems


def set_mismatches(p: Pipeline, want_types: dict[str, bytes]) -> list[str]:
    """The plan and role sets."""
    problems: list[str] = []
    for sql in (PLAN_SETS, ROLE_SETS):
        for key, members in query(p, sql).items():
            want_types[key] = b"set"
            got_members = {m.decode() for m in cast(set[bytes], p.r.smembers(key))}
            if got_members != set(members):
                problems.append(f"{key}: SMEMBERS {sorted(got_members)} != {sorted(members)}")
    return problems


def zset_mismatches(p: Pipeline, want_types: dict[str, bytes]) -> list[str]:
    """The product prices: members, scores and their order."""
    prices = query(p, PRICES)
    if prices:
        want_types["product_prices"] = b"zset"
    got_scores = cast(
        list[tuple[bytes, float]], p.r.zrange("product_prices", 0, -1, withscores=True)
    )
    got_prices = {m.decode(): s for m, s in got_scores}
    want_prices = {m: float(cast(Decimal, price)) for m, price in prices.items()}
    if got_prices != want_prices:
        return [f"product_prices: ZRANGE WITHSCORES {got_prices} != {want_prices}"]
    if [m.decode() for m, _ in got_scores] != sorted(
        want_prices, key=lambda m: (want_prices[m], m.encode())
    ):
        return [f"product_prices: members out of score order: {got_scores}"]
    return []


def feed_mismatches(p: Pipeline, want_types: dict[str, bytes]) -> list[str]:
    """The feeds: the newest rows as JSON documents, in order."""
    problems: list[str] = []
    for key, docs in query(p, FEEDS).items():
        want_types[key] = b"list"
        got_docs = [json.loads(v) for v in cast(list[bytes], p.r.lrange(key, 0, -1))]
        if [canonical(d) for d in got_docs] != [canonical(d) for d in docs]:
            problems.append(
                f"{key}: LRANGE ids {[d.get('id') for d in got_docs]} != "
                f"{[d['id'] for d in docs]} (newest {FEED_LEN} rows, id desc)\n"
                f"    got  {got_docs}\n    want {docs}"
            )
    return problems


def key_mismatches(r: redis.Redis, want_types: dict[str, bytes]) -> list[str]:
    """Keys present that nothing expects, expected keys missing, keys of another type."""
    problems: list[str] = []
    present = user_keys(r)
    for key in sorted(set(present) - set(want_types)):
        problems.append(f"{key}: a {present[key].decode()} the database would not produce")
    for key in sorted(set(want_types) - set(present)):
        problems.append(f"{key}: missing ({want_types[key].decode()} expected)")
    for key in sorted(set(want_types) & set(present)):
        if present[key] != want_types[key]:
            problems.append(f"{key}: a {present[key].decode()}, not a {want_types[key].decode()}")
    return problems


def assert_cache_matches_database(p: Pipeline, when: str) -> None:
    problems = mismatches(p)
    assert not problems, f"{when}: {len(problems)} differences:\n" + "\n".join(problems)


def dump(r: redis.Redis) -> dict[str, Any]:
    """Every key but the streams and the workers' counters (the cache and streamsync's
    records), with its content."""
    out: dict[str, Any] = {}
    for raw in r.scan_iter(count=1000):
        kind = cast(bytes, r.type(raw))
        if kind == b"stream" or raw.startswith(b"streamsync:stats:"):
            continue
        if kind == b"string":
            content: Any = r.get(raw)
        elif kind == b"hash":
            content = r.hgetall(raw)
        elif kind == b"set":
            content = sorted(cast(set[bytes], r.smembers(raw)))
        elif kind == b"zset":
            content = r.zrange(raw, 0, -1, withscores=True)
        elif kind == b"list":
            content = r.lrange(raw, 0, -1)
        else:
            content = f"<{kind.decode()}>"
        out[raw.decode()] = (kind.decode(), content)
    return out


# -- the pipeline ----------------------------------------------------------------------------


def run(conn: psycopg.Connection[Any], *statements: str) -> list[tuple[Any, ...]]:
    """One transaction of ``statements``; the rows of the last one, if any."""
    rows: list[tuple[Any, ...]] = []
    with conn.transaction(), conn.cursor() as cur:
        for statement in statements:
            cur.execute(statement)
            rows = cur.fetchall() if cur.description is not None else []
    return rows


def add_activity(conn: psycopg.Connection[Any], users: list[int], action: str) -> None:
    """One activity row per item of ``users``, in that order, in one transaction."""
    with conn.transaction(), conn.cursor() as cur:
        for n, user in enumerate(users):
            cur.execute(
                "INSERT INTO activity (user_id, action) VALUES (%s, %s)", (user, f"{action} {n}")
            )


def barrier(
    p: Pipeline,
    conn: psycopg.Connection[Any],
    capture: CaptureProcess,
    workers: tuple[WorkerProcess, ...],
    name: str,
) -> None:
    """Mark the end of a phase with a last change (user 2 renamed ``name``), wait until capture
    sent it (changes arrive in commit order: everything before it is in the streams too), and
    until the workers applied and acknowledged everything."""
    run(conn, f"UPDATE users SET name = '{name}' WHERE id = 2")
    wait_for_event(
        p.r,
        capture,
        p.setup.stream_for("users"),
        lambda e: e["op"] == "u" and e["after"]["name"] == name,
        what=f"the end of {name}",
    )
    p.settle(*workers)


SNAPSHOT = """
INSERT INTO users (name, email, plan, active) VALUES
    ('ann', 'ann@example.com', 'free', true),
    ('bob', 'bob@example.com', 'pro', true),
    ('cid', 'cid@example.com', 'free', true),
    ('dee', NULL, 'team', true),
    ('eve', 'eve@example.com', 'pro', false),
    ('fay', 'fay@example.com', 'free', true);
INSERT INTO user_roles VALUES
    (1, 'admin'), (1, 'editor'), (2, 'editor'), (3, 'viewer'), (4, 'viewer'), (5, 'admin');
INSERT INTO products (name, price, active) VALUES
    ('pen', 1.50, true),
    ('book', 12.00, true),
    ('lamp', 30.25, false),
    ('desk', 199.99, true),
    ('mug', 7.00, NULL),
    ('chair', NULL, true);
-- users 1, 2 and 3 have 2 rows each, user 4 has 7 (its feed is trimmed from the snapshot on)
INSERT INTO activity (user_id, action)
    SELECT u, 'snapshot ' || u || '.' || n
    FROM unnest(ARRAY[1, 1, 2, 2, 3, 3, 4, 4, 4, 4, 4, 4, 4]) WITH ORDINALITY AS t(u, n)
    ORDER BY n;
"""
SNAPSHOT_ROWS = {"users": 6, "user_roles": 6, "products": 6, "activity": 13}


def phase_one(conn: psycopg.Connection[Any]) -> None:
    """Changes of every kind, with no pause: the workers apply them as they come, in batches
    two workers share (so out of order across workers)."""
    # inserts
    run(
        conn,
        "INSERT INTO users (name, email, plan, active) VALUES "
        "('gus', 'gus@example.com', 'team', true), ('hal', 'hal@example.com', 'free', true)",
        "INSERT INTO user_roles VALUES (7, 'editor'), (8, 'viewer')",
        "INSERT INTO products (name, price, active) VALUES ('pad', 3.33, true)",
    )
    add_activity(conn, [1, 7, 1, 7, 1, 2, 7, 1], "first")
    # users change plans: 6 into a new plan and out again, so its set must not remain
    run(conn, "UPDATE users SET plan = 'pro' WHERE id = 1")
    run(
        conn,
        "UPDATE users SET plan = 'team', name = 'cid c.' WHERE id = 3",
        "UPDATE users SET plan = 'enterprise' WHERE id = 6",
    )
    run(conn, "UPDATE users SET email = NULL WHERE id = 2")  # a hash field goes
    run(conn, "UPDATE users SET email = 'dee@example.com', active = false WHERE id = 4")
    run(conn, "UPDATE users SET plan = 'free' WHERE id = 6")
    # products leave and enter the sorted set, change score
    run(
        conn,
        "UPDATE products SET active = false WHERE id = 2",
        "UPDATE products SET active = true, price = 29.99 WHERE id = 3",
        "UPDATE products SET price = 2.25 WHERE id = 1",
    )
    run(conn, "UPDATE products SET price = 5.00 WHERE id = 6")  # priced: enters
    run(conn, "UPDATE products SET active = true WHERE id = 5")  # active was NULL: enters
    run(conn, "UPDATE products SET price = NULL WHERE id = 4")  # no score: leaves
    run(
        conn,
        "UPDATE products SET active = false WHERE id = 7",
        "UPDATE products SET active = true, price = 3.50 WHERE id = 7",
    )
    add_activity(conn, [7, 1, 7, 1, 7, 1], "second")
    # role grants and revokes
    run(conn, "INSERT INTO user_roles VALUES (2, 'admin'), (6, 'viewer')")
    run(conn, "DELETE FROM user_roles WHERE user_id = 1 AND role = 'editor'")
    run(conn, "DELETE FROM user_roles WHERE user_id = 4 AND role = 'viewer'")
    # a primary-key change, deletes, and a primary-key change onto a deleted user's id
    run(conn, "UPDATE users SET id = 103 WHERE id = 3")
    run(conn, "DELETE FROM users WHERE id = 5", "DELETE FROM products WHERE id = 2")
    run(conn, "UPDATE users SET id = 5, plan = 'pro' WHERE id = 8")
    # activity rows deleted once they are out of their feed's window (trimmed away already)
    run(
        conn,
        "DELETE FROM activity WHERE id IN (SELECT id FROM activity WHERE user_id = 1 "
        f"ORDER BY id DESC OFFSET {FEED_LEN} LIMIT 3)",
        "DELETE FROM activity WHERE id = (SELECT min(id) FROM activity WHERE user_id = 4)",
    )
    # TRUNCATE (after a grant of the same transaction), new grants, one of a truncated row
    run(
        conn,
        "INSERT INTO user_roles VALUES (6, 'editor')",
        "TRUNCATE user_roles",
        "INSERT INTO user_roles VALUES (1, 'admin')",
    )
    run(conn, "INSERT INTO user_roles VALUES (7, 'owner'), (103, 'viewer'), (2, 'viewer')")
    run(conn, "DELETE FROM user_roles WHERE user_id = 2 AND role = 'viewer'")
    add_activity(conn, [7, 1, 9, 7, 1], "third")


def phase_two(conn: psycopg.Connection[Any]) -> None:
    """Deletes of rows inside feeds: a feed shrinks, or goes altogether.

    Phase one deletes only rows already trimmed out of their feed; these deletes and the inserts
    refilling the feeds (phase three) are kept apart by barriers: a delete inside a full feed
    applied after a newer insert leaves a different feed (see the second test)."""
    run(
        conn,
        "DELETE FROM activity WHERE id IN (SELECT id FROM activity WHERE user_id = 1 "
        "ORDER BY id DESC LIMIT 2)",
    )
    run(
        conn,
        "DELETE FROM activity WHERE id = (SELECT max(id) FROM activity WHERE user_id = 7)",
    )
    run(conn, "DELETE FROM activity WHERE user_id = 4")  # the whole feed goes
    run(conn, "DELETE FROM activity WHERE id = (SELECT max(id) FROM activity WHERE user_id = 3)")


def phase_three(conn: psycopg.Connection[Any]) -> None:
    """New activity refilling the shrunk feeds (at least as many rows as they lost), and more
    changes elsewhere."""
    add_activity(conn, [1, 7, 7, 1, 7], "fourth")
    run(conn, "INSERT INTO activity (user_id, action) VALUES (9, NULL)")  # a null in the JSON
    run(conn, "UPDATE products SET price = 0.99 WHERE id = 5")
    run(conn, "UPDATE users SET plan = 'team' WHERE id = 1")
    run(conn, "INSERT INTO user_roles VALUES (5, 'editor')")


@pytest.mark.timeout(180)
def test_seed_article_mappings_follow_the_database(pipelines: MakePipeline) -> None:
    # trim: false keeps the applied entries in the streams, to read them back and replay them;
    # small batches make the two workers share the streams
    p = pipelines(tables=TABLES, rules=RULES, worker={"trim": False, "batch_size": 4})
    p.sql(DDL)
    p.sql(SNAPSHOT)
    workers = (p.start_worker("w1"), p.start_worker("w2"))
    capture = p.start_capture()
    for table, rows in SNAPSHOT_ROWS.items():
        p.wait_for_added(capture, rows, table)
    p.settle(*workers)
    assert_cache_matches_database(p, "after the snapshot")

    with p.pg.connect(p.dbname) as conn:
        phase_one(conn)
        barrier(p, conn, capture, workers, "bob, phase 1")
        assert_cache_matches_database(p, "after phase 1")
        phase_two(conn)
        barrier(p, conn, capture, workers, "bob, phase 2")
        phase_three(conn)
        barrier(p, conn, capture, workers, "bob, phase 3")
    assert capture.stop() == 0, capture.log()
    assert_cache_matches_database(p, "after the workload")

    # the workload did what it claims
    events = {t: values(p.r, p.setup.stream_for(t)) for t in TABLES}
    ops = {t: [e["op"] for e in evs] for t, evs in events.items()}
    assert ops["user_roles"].count("t") == 1, ops["user_roles"]
    user_lsns = [e["source"]["lsn"] for e in events["users"] if e["op"] in ("d", "c")]
    assert any(user_lsns.count(lsn) == 2 for lsn in user_lsns), "no primary-key change"
    assert max(n for (n,) in p.sql("SELECT count(*) FROM activity GROUP BY user_id")) > FEED_LEN
    assert not p.r.exists("plan:enterprise:users")
    assert not p.r.exists("feed:4")
    assert {k.decode() for k in cast(set[bytes], p.r.smembers("plan:pro:users"))} == {"2", "5"}
    assert not any(k.endswith(b":dlq") for k in p.r.scan_iter(count=1000))

    # duplicates at old positions, in shuffled order: nothing changes
    before = dump(p.r)
    replayed, truncates = replay_sample(p, random.Random(20240501))
    assert truncates == 1
    p.settle(*workers)
    after = dump(p.r)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, "replayed entries changed keys: " + "; ".join(
        f"{k}: {before.get(k)} -> {after.get(k)}" for k in changed[:10]
    )
    assert_cache_matches_database(p, "after the replay")

    summaries = []
    for worker in workers:
        worker.terminate()
        assert worker.wait() == 0, worker.log_tail()
        summaries.append(worker.summary())
    assert all(s.get("applied", 0) > 0 for s in summaries), summaries  # both took part
    total = {k: sum(s.get(k, 0) for s in summaries) for s in summaries for k in s}
    assert not {"dead_lettered", "failed"} & set(total), total
    written = sum(len(xrange(p.r, s)) for s in p.setup.streams)
    assert total.get("applied", 0) + total.get("stale", 0) == written, total
    # every replayed change was a no-op (a replayed TRUNCATE counts as applied: it swept nothing)
    assert total.get("stale", 0) >= replayed - truncates, (total, replayed)


# -- a capped list, a delete inside it, and a newer insert applied first ----------------------


def deliver_to(p: Pipeline, consumer: str, count: int) -> list[dict[str, Any]]:
    """Have ``consumer`` of the group read the next ``count`` entries of the activity stream
    (as a worker does before it applies them); their events."""
    reply = p.r.xreadgroup(GROUP, consumer, {p.setup.stream_for("activity"): ">"}, count=count)
    [(_, items)] = cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]], reply)
    return [json.loads(next(iter(fields.values()))) for _, fields in items]


def feed_ids(r: redis.Redis, key: str) -> list[int]:
    """The activity ids a feed holds, in list order."""
    return [json.loads(v)["id"] for v in cast(list[bytes], r.lrange(key, 0, -1))]


@pytest.mark.timeout(180)
def test_a_feed_is_the_same_whichever_worker_applies_first(pipelines: MakePipeline) -> None:
    """Two workers of a group apply the batches they read independently: a worker that read a
    delete (and stalled, or crashed and came back under its consumer name) applies it after the
    other worker applied a newer insert. The feed must not depend on which came first.

    Users 1 and 2 get the same changes: a delete of a row inside the full feed, then a newer
    insert. User 1's delete is held by w1 while w2 applies the rest in commit order."""
    p = pipelines(tables=["activity"], rules=[FEED_RULE], worker={"trim": False})
    p.sql(DDL)
    # rows 1-6 of user 1, rows 7-12 of user 2: both feeds full, their oldest row trimmed
    p.sql(
        "INSERT INTO activity (user_id, action) "
        "SELECT 1 + (g - 1) / 6, 'row ' || g FROM generate_series(1, 12) g"
    )
    first = p.start_worker("w2")
    capture = p.start_capture()
    p.wait_for_added(capture, 12)
    p.settle(first)
    first.terminate()
    assert first.wait() == 0, first.log_tail()
    assert feed_ids(p.r, "feed:1") == [6, 5, 4, 3, 2]
    assert feed_ids(p.r, "feed:2") == [12, 11, 10, 9, 8]

    p.sql("DELETE FROM activity WHERE id = 5")  # inside user 1's feed
    p.sql("DELETE FROM activity WHERE id = 11")  # inside user 2's feed
    p.sql("INSERT INTO activity (user_id, action) VALUES (1, 'row 13'), (2, 'row 14')")
    p.wait_for_added(capture, 12 + 4)
    assert capture.stop() == 0, capture.log()
    # w1 reads the delete of row 5 and is slow to apply it
    [delete] = deliver_to(p, "w1", 1)
    assert delete["op"] == "d" and delete["before"]["id"] == 5
    # meanwhile w2 reads and applies the rest, in commit order: delete 11, insert 13, insert 14
    second = p.start_worker("w2")
    stream = p.setup.stream_for("activity")

    def only_w1_holds_an_entry() -> bool:
        held = {c["name"]: c["pending"] for c in p.r.xinfo_consumers(stream, GROUP)}
        group = next(g for g in p.r.xinfo_groups(stream) if g["name"] == GROUP.encode())
        last = p.r.xinfo_stream(stream)["last-generated-id"]
        return group["last-delivered-id"] == last and held == {b"w1": 1, b"w2": 0}

    wait_until(only_w1_holds_an_entry, timeout=30, message="w2 to apply what it read")
    # then w1 comes back and applies the delete it held
    late = p.start_worker("w1")
    p.settle(second, late)

    newest = "SELECT id FROM activity WHERE user_id = %s ORDER BY id DESC LIMIT 5"
    assert [i for (i,) in p.sql(newest, (1,))] == [13, 6, 4, 3, 2]
    assert [i for (i,) in p.sql(newest, (2,))] == [14, 12, 10, 9, 8]
    # in commit order the feed follows the table: the delete leaves 4 entries, the insert a 5th
    assert feed_ids(p.r, "feed:2") == [14, 12, 10, 9, 8]
    # the same changes, the delete applied last: the insert trimmed row 2, the delete then left
    # 4 entries, and row 2 never comes back
    assert_cache_matches_database(p, "after user 1's delete was applied after the insert")
