"""Several tables, one key (``merge: true``): each rule owns its fields (or JSON members) and
keeps its own positions; the owning rule's write keeps the merged fields, a merged row's delete
removes only its fields, the owner's delete removes all but those (with the foreign key, its
rows' deletes follow: the key goes). With the foreign key in place, any delivery order, replays
and two workers end with the key a fresh query builds.

Hash, JSON text and RedisJSON documents, against a real redis-server loading RedisJSON."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamsync.config import parse_settings
from streamsync.errors import ConfigError
from streamsync.events import ChangeEvent
from streamsync.functions import Library, RowStatus
from streamsync.keys import StateKeys
from streamsync.mapping import Planner
from streamsync.positions import epoch_floor, epoch_prefix, streamed
from streamsync.sweep import Sweeper
from tests.replies import as_str

USERS, SETTINGS = "public.users", "public.user_settings"
TOMBSTONE_S = 3600
#: (type, the owner's encoding): a hash, JSON text, a RedisJSON document
FLAVOURS = [("hash", None), ("json", "text"), ("json", "redisjson")]


def rules(kind: str, encoding: str | None) -> list[dict[str, Any]]:
    owner: dict[str, Any] = {"table": USERS, "key": "user:{id}", "type": kind}
    if encoding is not None:
        owner["encoding"] = encoding
    merged = {
        "table": SETTINGS,
        "key": "user:{user_id}",
        "type": kind,
        "merge": True,
        "fields": ["theme", "locale"],
        "rename": {"locale": "lang"},
    }
    return [owner, merged]


def planner(kind: str, encoding: str | None) -> Planner:
    s = parse_settings({"source": {"streams": ["s"]}, "rules": rules(kind, encoding)})
    return Planner(s.rules_by_table, StateKeys.from_settings(s.worker), redisjson=True)


@pytest.fixture
def lib(rj: redis.Redis) -> Iterator[Library]:
    library = Library(rj)
    library.ensure()
    yield library


def user(op: str, uid: int, lsn: int, **columns: Any) -> ChangeEvent:
    row = {"id": uid, "name": columns.get("name", f"u{uid}"), "bio": columns.get("bio")}
    return _event(op, USERS, {"id": uid}, row, lsn)


def prefs(
    op: str, uid: int, lsn: int, theme: str | None = "dark", locale: str = "en"
) -> ChangeEvent:
    row = {"user_id": uid, "theme": theme, "locale": locale, "extra": "not merged"}
    return _event(op, SETTINGS, {"user_id": uid}, row, lsn)


def _event(op: str, table: str, key: dict[str, Any], row: dict[str, Any], lsn: int) -> ChangeEvent:
    position = streamed(lsn, lsn, "0" if op == "d" else "1")
    after = None if op == "d" else row
    before = row if op == "d" else None
    return ChangeEvent(op, table, position, None, after, before, key)


def apply(lib: Library, p: Planner, *events: ChangeEvent) -> list[RowStatus | str]:
    rows = [row for event in events for row in p.plan(event)]
    return lib.changes(rows, TOMBSTONE_S).rows


def read(r: redis.Redis, key: str, kind: str) -> dict[str, Any] | None:
    """The key as a dict (a hash's fields, a document's members), None when absent."""
    found = r.type(key)
    if found == b"none":
        return None
    if kind == "hash":
        return {as_str(k): as_str(v) for k, v in r.hgetall(key).items()}
    text = r.execute_command("JSON.GET", key) if found == b"ReJSON-RL" else r.get(key)
    assert isinstance(text, bytes)
    doc: dict[str, Any] = orjson.loads(text)
    return doc


def expected(kind: str, owner: dict[str, Any] | None, merged: dict[str, Any] | None) -> Any:
    """What a fresh query builds: the user's columns and, if it has one, its settings' (a
    hash leaves null columns out, a document keeps them as null)."""
    if owner is None:
        return None
    doc = dict(owner)
    if merged is not None:
        doc.update(theme=merged["theme"], lang=merged["locale"])
    if kind == "hash":
        return {k: str(v) for k, v in doc.items() if v is not None}
    return doc


@pytest.mark.parametrize(("kind", "encoding"), FLAVOURS)
def test_each_rule_writes_its_own_fields(
    rj: redis.Redis, lib: Library, kind: str, encoding: str | None
) -> None:
    p = planner(kind, encoding)
    assert apply(lib, p, user("c", 1, 100, bio="hi")) == [RowStatus.APPLIED]
    assert apply(lib, p, prefs("c", 1, 200)) == [RowStatus.APPLIED]
    owner = {"id": 1, "name": "u1", "bio": "hi"}
    merged = {"theme": "dark", "locale": "en"}
    assert read(rj, "user:1", kind) == expected(kind, owner, merged)
    # the owner's write keeps the merged fields; a null column leaves only its own field
    assert apply(lib, p, user("u", 1, 300, name="Ann")) == [RowStatus.APPLIED]
    owner = {"id": 1, "name": "Ann", "bio": None}
    assert read(rj, "user:1", kind) == expected(kind, owner, merged)
    # a settings change never touches the user's columns; a replay of an older one is stale
    assert apply(lib, p, prefs("u", 1, 400, theme=None, locale="fr")) == [RowStatus.APPLIED]
    assert apply(lib, p, prefs("u", 1, 200)) == [RowStatus.STALE]
    assert read(rj, "user:1", kind) == expected(kind, owner, {"theme": None, "locale": "fr"})
    # deleting the settings row removes only its fields
    assert apply(lib, p, prefs("d", 1, 500)) == [RowStatus.APPLIED]
    assert read(rj, "user:1", kind) == expected(kind, owner, None)
    # deleting the user (with its settings, ON DELETE CASCADE) removes the key; older changes
    # of either row never bring it back
    assert apply(lib, p, prefs("c", 1, 550)) == [RowStatus.APPLIED]
    assert apply(lib, p, user("d", 1, 600), prefs("d", 1, 601)) == [RowStatus.APPLIED] * 2
    assert apply(lib, p, user("u", 1, 350), prefs("u", 1, 450)) == [RowStatus.STALE] * 2
    assert read(rj, "user:1", kind) is None


@pytest.mark.parametrize(("kind", "encoding"), FLAVOURS)
def test_settings_before_their_user_and_a_cascade_after_the_delete(
    rj: redis.Redis, lib: Library, kind: str, encoding: str | None
) -> None:
    p = planner(kind, encoding)
    # the settings arrive first: the key holds them alone until the user's row comes
    assert apply(lib, p, prefs("c", 2, 200)) == [RowStatus.APPLIED]
    assert apply(lib, p, user("c", 2, 100)) == [RowStatus.APPLIED]
    owner = {"id": 2, "name": "u2", "bio": None}
    assert read(rj, "user:2", kind) == expected(kind, owner, {"theme": "dark", "locale": "en"})
    # ON DELETE CASCADE: the user's delete, then its settings' (later in the transaction); an
    # update of the settings older than both arrives between them
    assert apply(lib, p, user("d", 2, 600)) == [RowStatus.APPLIED]
    assert apply(lib, p, prefs("u", 2, 300, theme="light")) == [RowStatus.APPLIED]
    assert apply(lib, p, prefs("d", 2, 601)) == [RowStatus.APPLIED]
    assert read(rj, "user:2", kind) is None


@pytest.mark.parametrize(("kind", "encoding"), FLAVOURS)
def test_a_truncate_of_either_table(
    rj: redis.Redis, lib: Library, kind: str, encoding: str | None
) -> None:
    p = planner(kind, encoding)
    for uid in range(20):
        apply(lib, p, user("c", uid, 100 + uid), prefs("c", uid, 200 + uid))
    Sweeper(rj, p, TOMBSTONE_S).truncate(SETTINGS, streamed(1000, 1000, "0"))
    for uid in range(20):
        assert read(rj, f"user:{uid}", kind) == expected(
            kind, {"id": uid, "name": f"u{uid}", "bio": None}, None
        )
    # replays of the settings older than the truncate stay out
    assert set(apply(lib, p, *(prefs("u", uid, 300) for uid in range(20)))) == {RowStatus.STALE}
    Sweeper(rj, p, TOMBSTONE_S).truncate(USERS, streamed(1001, 1001, "0"))
    assert not list(rj.scan_iter(match="user:*"))


def test_unchanged_toast_columns_of_the_owner_keep_the_merged_fields(
    rj: redis.Redis, lib: Library
) -> None:
    for kind, encoding in FLAVOURS:
        rj.flushall()
        p = planner(kind, encoding)
        apply(lib, p, user("c", 3, 100, bio="long"), prefs("c", 3, 200))
        toast = user("u", 3, 300, name="New")
        toast.unchanged = frozenset({"bio"})
        assert apply(lib, p, toast) == [RowStatus.APPLIED]
        owner = {"id": 3, "name": "New", "bio": "long"}
        assert read(rj, "user:3", kind) == expected(kind, owner, {"theme": "dark", "locale": "en"})


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        ({"fields": None}, r"rules\[1\]\.fields: is required with merge"),
        ({"ttl_s": 60}, r"rules\[1\]\.ttl_s: has no meaning with merge"),
        ({"key": "account:{user_id}"}, r"rules\[1\]\.merge: no hash rules own keys"),
        ({"fields": ["theme", "name"]}, r"rules\[1\]\.fields: 'name' is written by rules\[0\]"),
        ({"type": "set", "member": "{user_id}", "fields": None}, r"merge: has no meaning for"),
    ],
)
def test_a_merge_that_cannot_work_is_refused_at_load(changed: dict[str, Any], message: str) -> None:
    owner, merged = rules("hash", None)
    owner["fields"] = ["id", "name"]
    merged.update(changed, rename={})
    merged = {k: v for k, v in merged.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        parse_settings({"source": {"streams": ["s"]}, "rules": [owner, merged]})


def test_two_merging_rules_may_not_share_a_field() -> None:
    owner, merged = rules("hash", None)
    other = {**merged, "table": "public.prefs", "fields": ["theme"], "rename": {}}
    with pytest.raises(ConfigError, match=r"rules\[2\]\.fields: 'theme' is written by rules\[1\]"):
        parse_settings({"source": {"streams": ["s"]}, "rules": [owner, merged, other]})


# -- any delivery order ------------------------------------------------------------------------


@dataclass
class History:
    """Changes in commit order, with the foreign key held: settings exist only while their
    user does, and a user's delete cascades to its settings (later in the transaction)."""

    events: list[ChangeEvent]
    users: dict[int, dict[str, Any] | None]
    merged: dict[int, dict[str, Any] | None]


def history(steps: list[tuple[int, int]]) -> History:
    events: list[ChangeEvent] = []
    users: dict[int, dict[str, Any] | None] = {}
    merged: dict[int, dict[str, Any] | None] = {}
    lsn = 100
    for n, (uid, what) in enumerate(steps):
        lsn += 10
        alive, has = users.get(uid) is not None, merged.get(uid) is not None
        if not alive:
            users[uid] = {"id": uid, "name": f"u{uid}-{n}", "bio": None}
            events.append(user("c", uid, lsn, name=f"u{uid}-{n}"))
        elif what == 0:
            bio = None if n % 3 else f"b{n}"
            users[uid] = {"id": uid, "name": f"u{uid}-{n}", "bio": bio}
            events.append(user("u", uid, lsn, name=f"u{uid}-{n}", bio=bio))
        elif what == 1:
            users[uid] = None
            events.append(user("d", uid, lsn))
            if has:
                merged[uid] = None
                events.append(prefs("d", uid, lsn + 1))
        elif what == 2 and has:
            merged[uid] = None
            events.append(prefs("d", uid, lsn))
        else:
            theme = None if n % 4 == 0 else f"t{n}"
            merged[uid] = {"theme": theme, "locale": f"l{n}"}
            events.append(prefs("u" if has else "c", uid, lsn, theme=theme, locale=f"l{n}"))
    return History(events, users, merged)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=40),
    seed=st.integers(0, 2**32 - 1),
    flavour=st.sampled_from(FLAVOURS),
)
def test_any_delivery_order_ends_as_a_fresh_query(
    rj: redis.Redis,
    lib: Library,
    steps: list[tuple[int, int]],
    seed: int,
    flavour: tuple[str, str | None],
) -> None:
    rj.flushall()
    kind, encoding = flavour
    h = history(steps)
    rng = random.Random(seed)
    # every change, some twice, shuffled, split between two workers' planners
    deliveries = h.events + rng.sample(h.events, len(h.events) // 3)
    rng.shuffle(deliveries)
    workers = (planner(kind, encoding), planner(kind, encoding))
    for event in deliveries:
        statuses = apply(lib, rng.choice(workers), event)
        assert not [s for s in statuses if isinstance(s, str)], statuses
    for uid in range(4):
        assert read(rj, f"user:{uid}", kind) == expected(kind, h.users.get(uid), h.merged.get(uid))


@pytest.mark.parametrize(("kind", "encoding"), FLAVOURS)
def test_resync_finish_removes_the_settings_the_new_snapshot_did_not_write(
    rj: redis.Redis, lib: Library, kind: str, encoding: str | None
) -> None:
    p = planner(kind, encoding)
    for uid in range(6):
        apply(lib, p, user("c", uid, 100 + uid), prefs("c", uid, 200 + uid))
    # a re-snapshot in epoch 1 reads every user, and the settings of even users only
    rows = [row for uid in range(6) for row in p.plan(user("r", uid, 900), epoch_prefix(1))]
    rows += [r for uid in range(0, 6, 2) for r in p.plan(prefs("r", uid, 900), epoch_prefix(1))]
    lib.changes(rows, TOMBSTONE_S)
    for table in (USERS, SETTINGS):
        Sweeper(rj, p, TOMBSTONE_S).remove_older(table, epoch_floor(1))
    for uid in range(6):
        merged = {"theme": "dark", "locale": "en"} if uid % 2 == 0 else None
        owner = {"id": uid, "name": f"u{uid}", "bio": None}
        assert read(rj, f"user:{uid}", kind) == expected(kind, owner, merged)
