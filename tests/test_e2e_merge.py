"""Merge end to end: real PostgreSQL (users, and user_settings with a foreign key ON DELETE
CASCADE), the real Debezium engine, two workers; every ``user:<id>`` hash or JSON document
equals the user row joined with its settings, after a workload of inserts, updates, cascading
deletes and re-inserts, and again after a shuffled replay of half of each stream."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from tests.e2e import Kind, MakePipeline, Pipeline, needs_engine, replay_sample, values
from tests.servers import wait_until

pytestmark = [needs_engine, pytest.mark.slow]

TABLES = ["users", "user_settings"]
RULES: list[dict[str, Any]] = [
    {"table": "public.users", "key": "user:{id}", "type": "hash"},
    {
        "table": "public.user_settings",
        "key": "user:{user_id}",
        "type": "hash",
        "merge": True,
        "fields": ["theme", "locale"],
        "rename": {"locale": "lang"},
    },
]
DDL = """
CREATE TABLE users (id int PRIMARY KEY, name text NOT NULL, bio text);
CREATE TABLE user_settings (
    user_id int PRIMARY KEY REFERENCES users ON DELETE CASCADE,
    theme text,
    locale text NOT NULL
);
"""
#: What each key must hold: the user row and, when it has one, its settings. A hash has no
#: field for a null; a document has a null member, and no settings members without settings.
EXPECTED = {
    "hash": """
        SELECT 'user:' || u.id,
               json_build_object('id', u.id::text, 'name', u.name, 'bio', u.bio,
                                 'theme', s.theme, 'lang', s.locale)
        FROM users u LEFT JOIN user_settings s ON s.user_id = u.id""",
    "json": """
        SELECT 'user:' || u.id,
               (jsonb_build_object('id', u.id, 'name', u.name, 'bio', u.bio)
                || CASE WHEN s.user_id IS NULL THEN '{}'::jsonb
                        ELSE jsonb_build_object('theme', s.theme, 'lang', s.locale) END)::json
        FROM users u LEFT JOIN user_settings s ON s.user_id = u.id""",
}


def snapshot(p: Pipeline) -> None:
    p.sql("INSERT INTO users SELECT g, 'user ' || g, NULL FROM generate_series(1, 30) g")
    p.sql(
        "INSERT INTO user_settings SELECT g, CASE WHEN g % 3 = 0 THEN NULL ELSE 'dark' END, 'en'"
        " FROM generate_series(1, 30, 2) g"
    )


def workload(p: Pipeline, rng: random.Random) -> None:
    for step in range(120):
        uid = rng.randint(1, 30)
        what = rng.randrange(6)
        if what == 0:
            p.sql("UPDATE users SET name = %s, bio = %s WHERE id = %s", (f"n{step}", None, uid))
        elif what == 1:
            p.sql("UPDATE user_settings SET theme = %s WHERE user_id = %s", (f"t{step}", uid))
        elif what == 2:
            # cascades to the settings, later in the same transaction
            p.sql("DELETE FROM users WHERE id = %s", (uid,))
        elif what == 3:
            p.sql("DELETE FROM user_settings WHERE user_id = %s", (uid,))
        elif what == 4:
            p.sql(
                "INSERT INTO users VALUES (%s, %s, %s) ON CONFLICT (id) DO UPDATE SET bio = %s",
                (uid, f"again {step}", "b", f"bio {step}"),
            )
        else:
            p.sql(
                "INSERT INTO user_settings SELECT id, NULL, %s FROM users WHERE id = %s"
                " ON CONFLICT (user_id) DO UPDATE SET locale = EXCLUDED.locale",
                (f"l{step}", uid),
            )


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", ["hash", "json"])
def test_merged_keys_follow_the_join(pipelines: MakePipeline, kind: Kind) -> None:
    rules: list[dict[str, Any]] = [{**rule, "type": kind} for rule in RULES]
    p = pipelines(tables=TABLES, rules=rules, worker={"trim": False, "batch_size": 7})
    p.sql(DDL)
    snapshot(p)
    workers = (p.start_worker("w1"), p.start_worker("w2"))
    capture = p.start_capture()
    p.wait_for_added(capture, 30, "users")
    p.wait_for_added(capture, 15, "user_settings")
    workload(p, random.Random(7))
    written = {t: p.sql(f"SELECT count(*) FROM {t}")[0][0] for t in TABLES}
    assert all(written.values()), written
    # the workload's last changes are in the streams once a row written after them is applied
    p.sql("INSERT INTO users VALUES (1000, 'marker', NULL)")
    wait_until(lambda: bool(p.r.exists("user:1000")), timeout=90, message="the marker applied")
    p.settle(*workers)
    assert capture.stop() == 0, capture.log()
    ops = {t: Counter(e["op"] for e in values(p.r, p.setup.stream_for(t))) for t in TABLES}
    # the workload did what it claims: cascading deletes, re-inserts, settings deleted alone
    assert ops["users"]["d"] >= 5 and ops["user_settings"]["d"] >= 5, ops
    assert ops["users"]["c"] >= 3 and ops["user_settings"]["u"] >= 5, ops
    p.assert_table("user:*", kind, EXPECTED[kind])

    # half of each stream again, shuffled: nothing changes
    replay_sample(p, random.Random(11))
    p.settle(*workers)
    p.assert_table("user:*", kind, EXPECTED[kind])
    assert not any(k.endswith(b":dlq") for k in p.r.scan_iter(count=1000))
    for worker in workers:
        worker.terminate()
        assert worker.wait() == 0, worker.log_tail()
