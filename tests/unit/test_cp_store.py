"""SQLite store: revisions, preconditions, rollback, registrations with an injected clock."""
from __future__ import annotations

import pytest

from controlplane.store import AlreadyExists, CHANGED_RESOURCES, CHANGED_WORKLOADS, Conflict, NotFound
from controlplane.store_sqlite import SqliteStore


def vs(weight=90, name="demo"):
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"hosts": [name], "http": [{"route": [{"destination": {"host": name}, "weight": weight}]}]}}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
async def store(tmp_path):
    clock = Clock()
    s = SqliteStore(str(tmp_path / "s.db"), clock=clock, sweep_interval=3600)
    s.clock = clock
    await s.start()
    yield s
    await s.close()


async def test_each_change_gets_the_next_revision_and_identical_content_gets_none(store):
    first = await store.put(vs(90))
    second = await store.put(vs(80))
    same = await store.put(vs(80))
    assert [first["metadata"]["resourceVersion"], second["metadata"]["resourceVersion"]] == ["1", "2"]
    assert same is second
    assert second["metadata"]["generation"] == 2
    assert second["metadata"]["creationTimestamp"] == first["metadata"]["creationTimestamp"]


async def test_preconditions_conflict_already_exists_and_not_found(store):
    await store.put(vs())
    with pytest.raises(AlreadyExists):
        await store.put(vs(), create_only=True)
    with pytest.raises(Conflict, match="resourceVersion 7 is stale, current is 1"):
        await store.put(vs(10), expect_version="7")
    with pytest.raises(NotFound):
        await store.delete(("VirtualService", "default", "missing"))


async def test_rollback_restores_state_as_one_new_revision_and_is_itself_in_history(store):
    await store.put(vs(90))                       # 1
    await store.put(vs(10))                       # 2
    await store.put(vs(50, "other"))              # 3
    revision = await store.rollback(1)
    assert revision == 4
    resources = store.resources()
    assert resources[("VirtualService", "default", "demo")]["spec"]["http"][0]["route"][0]["weight"] == 90
    assert ("VirtualService", "default", "other") not in resources
    newest = await store.history(2)
    assert {(e.revision, e.op, e.name) for e in newest} == {(4, "rollback", "demo"), (4, "rollback", "other")}
    assert await store.rollback(4) == 4           # already there: nothing written


async def test_state_survives_a_restart_and_registrations_get_a_fresh_ttl(tmp_path):
    clock = Clock()
    s = SqliteStore(str(tmp_path / "s.db"), clock=clock, sweep_interval=3600)
    await s.start()
    await s.put(vs())
    await s.register({"id": "w1", "service": "demo", "namespace": "default", "address": "10.0.0.1",
                      "ports": {"http": 80}, "labels": {}}, ttl=10)
    await s.close()
    clock.now += 60                                # down for longer than the TTL
    again = SqliteStore(str(tmp_path / "s.db"), clock=clock, sweep_interval=3600)
    await again.start()
    try:
        assert list(again.resources()) == [("VirtualService", "default", "demo")]
        assert again.expire() == []                # not expired at once: it gets one TTL to heartbeat
        clock.now += 10
        assert again.expire() == ["w1"]
    finally:
        await again.close()


async def test_heartbeat_extends_a_registration_and_expiry_notifies_subscribers(store):
    seen = []
    store.subscribe(seen.append)
    await store.register({"id": "w1", "service": "demo", "namespace": "default", "address": "10.0.0.1",
                          "ports": {"http": 80}, "labels": {}}, ttl=10)
    store.clock.now += 8
    assert await store.heartbeat("w1")
    store.clock.now += 8
    assert store.expire() == []
    store.clock.now += 3
    assert store.expire() == ["w1"]
    assert not await store.heartbeat("w1")         # the client registers again on this answer (404)
    assert seen == [CHANGED_WORKLOADS, CHANGED_WORKLOADS]
    await store.put(vs())
    assert seen[-1] == CHANGED_RESOURCES
