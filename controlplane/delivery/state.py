"""Where a canary's status and pending actions live, and who may drive canaries.

Status is not part of the Canary object in the resource store: it changes every interval,
and every resource change is a revision in the history (which a status must not flood).
It is kept beside the store instead:

* SQLite: a ``canary_status`` table in the same database file (its own connection); a single
  control-plane process drives every canary (:class:`AlwaysLeader`).
* etcd: ``/meshproxy/delivery/status/{ns}/{name}`` and ``.../actions/{ns}/{name}``; the
  replica holding ``/meshproxy/delivery/leader`` (a key attached to its lease) drives every
  canary, and its status writes are fenced by that key (a txn that compares the key's value
  with the writer's replica id), so a replica that lost the lease cannot overwrite the new
  leader's status.  A new leader continues each canary from the stored status.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import sqlite3
from typing import Protocol

log = logging.getLogger("controlplane.delivery")

Key = tuple[str, str]       # (namespace, name)


class StateBackend(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def load(self, key: Key) -> dict | None: ...
    async def load_all(self) -> dict[Key, dict]: ...
    async def save(self, key: Key, status: dict) -> bool: ...      # False: fenced off (not leader)
    async def delete(self, key: Key) -> None: ...
    async def request_action(self, key: Key, action: dict) -> None: ...
    async def take_action(self, key: Key) -> dict | None: ...


class Leadership(Protocol):
    is_leader: bool
    holder: str
    async def start(self) -> None: ...
    async def close(self) -> None: ...


# ---------------------------------------------------------------- SQLite / memory


class SqliteState:
    def __init__(self, path: str):
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._memory: dict[Key, dict] = {}
        self._actions: dict[Key, dict] = {}

    async def start(self) -> None:
        if self.path != ":memory:":
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
            self._db.execute("CREATE TABLE IF NOT EXISTS canary_status (namespace TEXT NOT NULL, name TEXT NOT NULL, "
                             "body TEXT NOT NULL, PRIMARY KEY (namespace, name))")

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def load(self, key: Key) -> dict | None:
        return (await self.load_all()).get(key)

    async def load_all(self) -> dict[Key, dict]:
        if self._db is None:
            return dict(self._memory)
        return {(ns, name): json.loads(body) for ns, name, body in
                self._db.execute("SELECT namespace, name, body FROM canary_status")}

    async def save(self, key: Key, status: dict) -> bool:
        if self._db is None:
            self._memory[key] = json.loads(json.dumps(status))
        else:
            self._db.execute("INSERT OR REPLACE INTO canary_status VALUES (?, ?, ?)", (*key, json.dumps(status)))
        return True

    async def delete(self, key: Key) -> None:
        self._memory.pop(key, None)
        if self._db is not None:
            self._db.execute("DELETE FROM canary_status WHERE namespace=? AND name=?", key)

    async def request_action(self, key: Key, action: dict) -> None:
        self._actions[key] = action

    async def take_action(self, key: Key) -> dict | None:
        return self._actions.pop(key, None)


class AlwaysLeader:
    is_leader = True
    holder = "local"

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


# ---------------------------------------------------------------- etcd

DELIVERY = "/meshproxy/delivery/"
STATUS = DELIVERY + "status/"
ACTIONS = DELIVERY + "actions/"
LEADER = DELIVERY + "leader"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def _end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class EtcdLeadership:
    """Leader election on an etcd lease: the leader key exists while its holder keeps the lease
    alive; whoever creates it (txn: the key does not exist) leads.  Every wait is bounded."""

    def __init__(self, client, replica_id: str, *, ttl: int = 3):
        self.client = client
        self.replica_id = replica_id
        self.ttl = ttl
        self.is_leader = False
        self.holder = ""
        self._lease = ""
        self._task: asyncio.Task | None = None
        self.changed = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._campaign(), name="delivery-leader-election")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._lease:
            try:
                await self.client.call("/v3/lease/revoke", {"ID": self._lease}, timeout=1.0)
            except Exception:       # shutting down: the lease expires by itself
                pass
        self.is_leader = False

    def _set(self, leader: bool, holder: str) -> None:
        if leader != self.is_leader:
            log.warning("delivery controller: %s leadership (replica %s)", "took" if leader else "lost", self.replica_id)
            self.changed.set()
        self.is_leader, self.holder = leader, holder

    async def _campaign(self) -> None:
        from ..store import StoreError
        while True:
            try:
                await self._round()
            except StoreError as exc:
                log.warning("delivery leader election: %s", exc)
                self._set(False, self.holder)
            await asyncio.sleep(self.ttl / 3)

    async def _round(self) -> None:
        if self.is_leader:
            result = await self.client.call("/v3/lease/keepalive", {"ID": self._lease}, timeout=self.ttl / 3)
            if int((result.get("result") or {}).get("TTL", 0)) > 0:
                return
            self._set(False, "")
            self._lease = ""
        if not self._lease:
            self._lease = (await self.client.call("/v3/lease/grant", {"TTL": str(self.ttl)}))["ID"]
        result = await self.client.call("/v3/kv/txn", {
            "compare": [{"key": _b64(LEADER), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
            "success": [{"request_put": {"key": _b64(LEADER), "value": _b64(self.replica_id), "lease": self._lease}}],
            "failure": [{"request_range": {"key": _b64(LEADER)}}]}, timeout=self.ttl / 3)
        if result.get("succeeded"):
            self._set(True, self.replica_id)
            return
        kvs = (((result.get("responses") or [{}])[0].get("response_range") or {}).get("kvs") or [])
        holder = _unb64(kvs[0]["value"]) if kvs else ""
        self._set(holder == self.replica_id, holder)
        if holder != self.replica_id:
            # keep our lease alive for the next round's attempt (or let it go; grant again later)
            await self.client.call("/v3/lease/keepalive", {"ID": self._lease}, timeout=self.ttl / 3)


class EtcdState:
    def __init__(self, client, replica_id: str):
        self.client = client
        self.replica_id = replica_id

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    @staticmethod
    def _key(prefix: str, key: Key) -> str:
        return f"{prefix}{key[0]}/{key[1]}"

    async def load(self, key: Key) -> dict | None:
        result = await self.client.call("/v3/kv/range", {"key": _b64(self._key(STATUS, key))})
        kvs = result.get("kvs") or []
        return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None

    async def load_all(self) -> dict[Key, dict]:
        result = await self.client.call("/v3/kv/range", {"key": _b64(STATUS), "range_end": _b64(_end(STATUS))})
        out = {}
        for kv in result.get("kvs") or []:
            ns, name = _unb64(kv["key"])[len(STATUS):].split("/", 1)
            out[(ns, name)] = json.loads(base64.b64decode(kv["value"]))
        return out

    async def save(self, key: Key, status: dict) -> bool:
        result = await self.client.call("/v3/kv/txn", {
            "compare": [{"key": _b64(LEADER), "target": "VALUE", "result": "EQUAL", "value": _b64(self.replica_id)}],
            "success": [{"request_put": {"key": _b64(self._key(STATUS, key)), "value": _b64(json.dumps(status))}}]})
        return bool(result.get("succeeded"))

    async def delete(self, key: Key) -> None:
        await self.client.call("/v3/kv/deleterange", {"key": _b64(self._key(STATUS, key))})

    async def request_action(self, key: Key, action: dict) -> None:
        await self.client.call("/v3/kv/put", {"key": _b64(self._key(ACTIONS, key)), "value": _b64(json.dumps(action))})

    async def take_action(self, key: Key) -> dict | None:
        result = await self.client.call("/v3/kv/deleterange", {"key": _b64(self._key(ACTIONS, key)), "prev_kv": True})
        kvs = result.get("prev_kvs") or []
        return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None


def for_store(store) -> tuple[StateBackend, Leadership]:
    """The state backend and leadership that match a resource store."""
    client = getattr(store, "client", None)
    if client is not None and hasattr(store, "replica_id"):
        return EtcdState(client, store.replica_id), EtcdLeadership(client, store.replica_id)
    return SqliteState(getattr(store, "path", ":memory:")), AlwaysLeader()
