"""etcd v3 backend over etcd's JSON gateway (``/v3/kv/*``, ``/v3/watch``, ``/v3/lease/*``).

Keys (values are JSON)::

    /meshproxy/resources/{kind}/{namespace}/{name}   the object (resourceVersion = its mod_revision)
    /meshproxy/history/{uuid}                        one history entry, written in the same txn
    /meshproxy/workloads/{id}                        a registration, attached to its own lease
    /meshproxy/security/{name}                       CA state and token records (not cached, not watched)

Every write is one transaction guarded by the key's ``mod_revision``, so two replicas never
overwrite each other blindly: a stale ``resourceVersion`` (the caller's or the replica's own
cache) fails the compare.  The revision of an accepted change is etcd's revision, like
Kubernetes.  Each replica keeps a cache fed by one watch on ``/meshproxy/`` (and updates it
with its own writes at once, for read-your-writes), and notifies the push engine, so any
replica's change reaches every replica's proxies.  Registrations are leases: a heartbeat is a
lease keep-alive and a workload whose sidecar stops is deleted by etcd after its TTL.

Every request has a timeout and moves to the next endpoint on failure.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from typing import Callable, Mapping

import h11

from .httpclient import exchange
from .store import (CHANGED_RESOURCES, CHANGED_WORKLOADS, StoreViews, BadRequest, Conflict, HistoryEntry, NotFound,
                    ResourceKey, StoreError, check_precondition, plan_changes, rollback_plan, same_content, stamp)

log = logging.getLogger("controlplane.store_etcd")

PREFIX = "/meshproxy/"
RESOURCES = PREFIX + "resources/"
HISTORY = PREFIX + "history/"
WORKLOADS = PREFIX + "workloads/"
SECURITY = PREFIX + "security/"
PROXIES = PREFIX + "proxies/"          # one key per replica: the proxies connected to it (under its lease)
REPLICA_TTL = 10
REQUEST_TIMEOUT = 3.0


class EtcdUnavailable(StoreError):
    code = 503
    reason = "ServiceUnavailable"


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def prefix_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def resource_key(key: ResourceKey) -> str:
    return f"{RESOURCES}{key[0]}/{key[1]}/{key[2]}"


class EtcdClient:
    """POSTs JSON to the gateway of whichever endpoint answers."""

    def __init__(self, endpoints: list[str]):
        self.endpoints = [e if "://" not in e else e.split("://", 1)[1] for e in endpoints]
        self._current = 0

    async def call(self, path: str, body: dict, timeout: float = REQUEST_TIMEOUT) -> dict:
        last = None
        for attempt in range(len(self.endpoints)):
            endpoint = self.endpoints[(self._current + attempt) % len(self.endpoints)]
            try:
                async with asyncio.timeout(timeout):
                    status, payload = await self._post(endpoint, path, body)
            except (OSError, asyncio.TimeoutError, h11.ProtocolError) as exc:
                last = f"{endpoint}: {type(exc).__name__} {exc}"
                continue
            if status == 200:
                self._current = (self._current + attempt) % len(self.endpoints)
                return json.loads(payload)
            last = f"{endpoint}: HTTP {status}: {payload[:200].decode(errors='replace')}"
            if status < 500:
                break
        raise EtcdUnavailable(f"etcd {path} failed: {last}")

    async def _post(self, endpoint: str, path: str, body: dict) -> tuple[int, bytes]:
        host, _, port = endpoint.rpartition(":")
        # a range over every resource at 10,000 services is far beyond the admin-stats cap
        return await exchange(host, int(port), "POST", path, json.dumps(body).encode(),
                              [("content-type", "application/json")], max_response=None)

    async def watch(self, key: str, range_end: str, start_revision: int, idle_timeout: float):
        """Yield watch results from one endpoint (the caller reconnects on failure)."""
        endpoint = self.endpoints[self._current % len(self.endpoints)]
        self._current += 1      # the next reconnect tries the next member
        host, _, port = endpoint.rpartition(":")
        async with asyncio.timeout(REQUEST_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, int(port))
        try:
            conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 24)
            data = json.dumps({"create_request": {"key": b64(key), "range_end": b64(range_end),
                                                  "start_revision": str(start_revision), "prev_kv": True,
                                                  "progress_notify": True}}).encode()
            writer.write(conn.send(h11.Request(method="POST", target="/v3/watch", headers=[
                ("host", endpoint), ("content-type", "application/json"), ("content-length", str(len(data)))])))
            writer.write(conn.send(h11.Data(data=data)))
            await writer.drain()
            decoder = json.JSONDecoder()
            buffer = ""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    async with asyncio.timeout(idle_timeout):
                        chunk = await reader.read(1 << 20)
                    if not chunk:
                        return
                    conn.receive_data(chunk)
                elif isinstance(event, h11.Response):
                    if event.status_code != 200:
                        raise EtcdUnavailable(f"watch refused by {endpoint}: {event.status_code}")
                elif isinstance(event, h11.Data):
                    buffer += event.data.decode()
                    while True:
                        stripped = buffer.lstrip()
                        if not stripped:
                            buffer = ""
                            break
                        try:
                            message, end = decoder.raw_decode(stripped)
                        except ValueError:
                            buffer = stripped
                            break
                        buffer = stripped[end:]
                        yield message
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return
        finally:
            writer.close()


class EtcdStore(StoreViews):
    def __init__(self, endpoints: list[str], *, clock: Callable[[], float] | None = None,
                 watch_idle_timeout: float = 30.0):
        self.client = EtcdClient(endpoints)
        self._wall = time.time
        self._watch_idle_timeout = watch_idle_timeout
        self._resources: dict[ResourceKey, dict] = {}
        self._workloads: dict[str, dict] = {}
        self._leases: dict[str, str] = {}           # workload id -> lease id
        self._key_revision: dict[str, int] = {}    # etcd key -> last revision applied to the cache
        self._subscribers: list[Callable[[str], None]] = []
        self._revision = 0
        self.replica_id = uuid.uuid4().hex[:12]
        self._replica_lease = ""
        self._remote_proxies: dict[str, list[dict]] = {}   # replica id -> its proxies
        self._published = None
        self._keepalive: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------ lifecycle and cache

    async def start(self) -> None:
        await self._load()
        lease = await self.client.call("/v3/lease/grant", {"TTL": str(REPLICA_TTL)})
        self._replica_lease = lease["ID"]
        self._watcher = asyncio.create_task(self._watch_loop(), name="etcd-store-watch")
        self._keepalive = asyncio.create_task(self._replica_keepalive(), name="etcd-replica-lease")

    async def close(self) -> None:
        for task in (self._watcher, self._keepalive):
            if task:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._replica_lease:
            try:
                await self.client.call("/v3/lease/revoke", {"ID": self._replica_lease}, timeout=1.0)
            except StoreError:
                pass

    async def _replica_keepalive(self) -> None:
        """Keep this replica's lease (its published proxy list) alive; re-grant if it expired."""
        while True:
            await asyncio.sleep(REPLICA_TTL / 3)
            try:
                result = await self.client.call("/v3/lease/keepalive", {"ID": self._replica_lease})
                if int((result.get("result") or {}).get("TTL", 0)) <= 0:
                    lease = await self.client.call("/v3/lease/grant", {"TTL": str(REPLICA_TTL)})
                    self._replica_lease, self._published = lease["ID"], None
            except StoreError as exc:
                log.warning("replica lease keepalive failed: %s", exc)

    # ------------------------------------------------------------ proxies of every replica

    async def publish_proxies(self, items: list[dict]) -> None:
        """Make this replica's connected proxies visible to the other replicas."""
        if items == self._published:
            return
        await self.client.call("/v3/kv/put", {"key": b64(PROXIES + self.replica_id),
                                              "value": b64(json.dumps(items)), "lease": self._replica_lease})
        self._published = items

    def remote_proxies(self) -> list[dict]:
        return [p for replica, items in self._remote_proxies.items() if replica != self.replica_id for p in items]

    async def _load(self) -> None:
        result = await self.client.call("/v3/kv/range", {"key": b64(PREFIX), "range_end": b64(prefix_end(PREFIX))})
        self._resources.clear()
        self._workloads.clear()
        self._leases.clear()
        self._key_revision.clear()
        self._remote_proxies.clear()
        for kv in result.get("kvs", []):
            self._apply_put(kv)
        self._revision = int(result["header"]["revision"])
        self._resource_revision = self._revision

    def _apply_put(self, kv: dict) -> str | None:
        key = unb64(kv["key"])
        if key.startswith(PROXIES):
            self._remote_proxies[key[len(PROXIES):]] = json.loads(base64.b64decode(kv["value"]))
            return None
        if not key.startswith((RESOURCES, WORKLOADS)):
            return None
        revision = int(kv.get("mod_revision", 0))
        if self._key_revision.get(key, 0) >= revision:
            return None
        self._key_revision[key] = revision
        if key.startswith(RESOURCES):
            self._resource_revision = max(self._resource_revision, revision)
            obj = json.loads(base64.b64decode(kv["value"]))
            obj["metadata"]["resourceVersion"] = str(revision)
            md = obj["metadata"]
            self._resources[(obj["kind"], md["namespace"], md["name"])] = obj
            return CHANGED_RESOURCES
        if key.startswith(WORKLOADS):
            workload = json.loads(base64.b64decode(kv["value"]))
            self._workloads[workload["id"]] = workload
            self._leases[workload["id"]] = kv.get("lease", "0")
            return CHANGED_WORKLOADS
        return None

    def _apply_delete(self, key: str, revision: int) -> str | None:
        if key.startswith(PROXIES):
            self._remote_proxies.pop(key[len(PROXIES):], None)
            return None
        if self._key_revision.get(key, 0) >= revision:
            return None
        self._key_revision[key] = revision
        if key.startswith(RESOURCES):
            self._resource_revision = max(self._resource_revision, revision)
            kind, ns, name = key[len(RESOURCES):].split("/", 2)
            return CHANGED_RESOURCES if self._resources.pop((kind, ns, name), None) is not None else None
        if key.startswith(WORKLOADS):
            wid = key[len(WORKLOADS):]
            self._leases.pop(wid, None)
            return CHANGED_WORKLOADS if self._workloads.pop(wid, None) is not None else None
        return None

    async def _watch_loop(self) -> None:
        while True:
            try:
                async for message in self.client.watch(PREFIX, prefix_end(PREFIX), self._revision + 1,
                                                       self._watch_idle_timeout):
                    result = message.get("result") or {}
                    if result.get("compact_revision") and int(result["compact_revision"]) > self._revision:
                        await self._load()
                        self._notify(CHANGED_RESOURCES, CHANGED_WORKLOADS)
                        break
                    changed = set()
                    for event in result.get("events", []):
                        kv = event["kv"]
                        if event.get("type") == "DELETE":
                            what = self._apply_delete(unb64(kv["key"]), int(kv["mod_revision"]))
                        else:
                            what = self._apply_put(kv)
                        if what:
                            changed.add(what)
                    if "header" in result:
                        self._revision = max(self._revision, int(result["header"]["revision"]))
                    self._notify(*changed)
            except TimeoutError:
                # nothing for a while: reopen the watch from the last revision (also how a silently
                # dead member is noticed); nothing is lost, events resume from that revision
                log.debug("etcd watch idle for %s s; reopening", self._watch_idle_timeout)
            except (OSError, h11.ProtocolError, StoreError, ValueError) as exc:
                log.warning("etcd watch lost (%s); reconnecting", exc)
            await asyncio.sleep(0.2)

    # ------------------------------------------------------------ views


    # ------------------------------------------------------------ resources

    async def _current(self, key: ResourceKey) -> tuple[dict | None, int]:
        """The object and its mod_revision, read from etcd (not the cache): the txn guard."""
        result = await self.client.call("/v3/kv/range", {"key": b64(resource_key(key))})
        kvs = result.get("kvs") or []
        if not kvs:
            return None, 0
        obj = json.loads(base64.b64decode(kvs[0]["value"]))
        obj["metadata"]["resourceVersion"] = kvs[0]["mod_revision"]
        return obj, int(kvs[0]["mod_revision"])

    async def _txn(self, guards: list[tuple[ResourceKey, int]], changes, origin: str) -> int:
        """changes: [(op, key, before, after_or_None)]; returns the revision, raises Conflict if a guard moved."""
        now = self._wall()
        compare = [{"key": b64(resource_key(k)), "target": "MOD", "result": "EQUAL", "mod_revision": str(rev)}
                   for k, rev in guards]
        success = []
        for seq, (op, key, before, after) in enumerate(changes):
            if after is None:
                success.append({"request_delete_range": {"key": b64(resource_key(key))}})
            else:
                body = {**after, "metadata": {k: v for k, v in after["metadata"].items() if k != "resourceVersion"}}
                success.append({"request_put": {"key": b64(resource_key(key)), "value": b64(json.dumps(body))}})
            entry = {"seq": seq, "at": now, "op": op, "kind": key[0], "namespace": key[1], "name": key[2],
                     "before": before, "after": after, "origin": origin}
            success.append({"request_put": {"key": b64(f"{HISTORY}{uuid.uuid4().hex}"),
                                            "value": b64(json.dumps(entry))}})
        result = await self.client.call("/v3/kv/txn", {"compare": compare, "success": success})
        if not result.get("succeeded"):
            raise Conflict("the object was modified concurrently (by another replica?); re-read and retry")
        revision = int(result["header"]["revision"])
        changed = set()
        for op, key, before, after in changes:
            if after is None:
                what = self._apply_delete(resource_key(key), revision)
            else:
                stored = dict(after, metadata=dict(after["metadata"], resourceVersion=str(revision)))
                what = self._apply_put({"key": b64(resource_key(key)), "mod_revision": str(revision),
                                        "value": b64(json.dumps(stored))})
            if what:
                changed.add(what)
        self._notify(*changed)
        return revision

    async def put(self, obj: dict, *, expect_version: str | None = None,
                  create_only: bool = False, origin: str = "api") -> dict:
        md = obj["metadata"]
        key = (obj["kind"], md["namespace"], md["name"])
        for _ in range(5):     # retry only races with another replica on unconditional puts
            existing, mod = await self._current(key)
            check_precondition(key, existing, expect_version, create_only)
            if existing is not None and same_content(existing, obj):
                return existing
            stored = stamp(obj, existing, 0, self._wall())
            try:
                revision = await self._txn([(key, mod)], [("update" if existing else "create", key, existing, stored)],
                                           origin)
            except Conflict:
                if expect_version is not None or create_only:
                    raise
                continue
            return self._resources.get(key) or dict(stored, metadata=dict(stored["metadata"],
                                                                         resourceVersion=str(revision)))
        raise Conflict(f"{key[0]} {key[1]}/{key[2]}: too many concurrent writers; retry")

    async def delete(self, key: ResourceKey, *, expect_version: str | None = None,
                     origin: str = "api") -> dict:
        existing, mod = await self._current(key)
        if existing is None:
            raise NotFound(f"{key[0]} {key[1]}/{key[2]} not found")
        check_precondition(key, existing, expect_version, False)
        revision = await self._txn([(key, mod)], [("delete", key, existing, None)], origin)
        return dict(existing, metadata=dict(existing["metadata"], resourceVersion=str(revision)))

    async def _all_history(self) -> list[HistoryEntry]:
        result = await self.client.call("/v3/kv/range", {"key": b64(HISTORY), "range_end": b64(prefix_end(HISTORY))})
        entries = []
        for kv in result.get("kvs", []):
            e = json.loads(base64.b64decode(kv["value"]))
            entries.append((int(kv["mod_revision"]), e["seq"], HistoryEntry(
                int(kv["mod_revision"]), e["at"], e["op"], e["kind"], e["namespace"], e["name"], e["before"],
                e["after"], e["origin"])))
        entries.sort(key=lambda t: (t[0], t[1]))
        return [e for _, _, e in entries]

    async def history(self, limit: int = 100) -> list[HistoryEntry]:
        return list(reversed(await self._all_history()))[:limit]

    async def rollback(self, revision: int, origin: str = "api", guard=None) -> int:
        entries = await self._all_history()
        if not entries or not entries[0].revision <= revision <= entries[-1].revision:
            span = f"{entries[0].revision}..{entries[-1].revision}" if entries else "empty"
            raise BadRequest(f"revision {revision} is not in the history ({span})")
        state: dict[ResourceKey, dict] = {}
        for e in entries:
            if e.revision > revision:
                break
            if e.after is None:
                state.pop((e.kind, e.namespace, e.name), None)
            else:
                state[(e.kind, e.namespace, e.name)] = e.after
        result = await self.client.call("/v3/kv/range", {"key": b64(RESOURCES), "range_end": b64(prefix_end(RESOURCES))})
        current, mods = {}, {}
        for kv in result.get("kvs", []):
            obj = json.loads(base64.b64decode(kv["value"]))
            k = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
            current[k], mods[k] = obj, int(kv["mod_revision"])
        plan = rollback_plan(state, current)
        if not plan:
            return int(result["header"]["revision"])
        if guard is not None:               # may refuse (raise): nothing is written
            guard(plan_changes(plan, current))
        changes = [("rollback", key, current.get(key),
                    None if target is None else stamp(target, current.get(key), 0, self._wall()))
                   for key, target in plan]
        return await self._txn([(key, mods.get(key, 0)) for key, _ in plan], changes, origin)

    # ------------------------------------------------------------ registry (leases)

    async def register(self, workload: dict, ttl: float) -> dict:
        wid = workload["id"]
        old_lease = self._leases.get(wid)
        if old_lease and self._workloads.get(wid) == workload and await self.heartbeat(wid):
            return workload
        lease = await self.client.call("/v3/lease/grant", {"TTL": str(max(1, round(ttl)))})
        lease_id = lease["ID"]
        result = await self.client.call("/v3/kv/put", {"key": b64(WORKLOADS + wid), "value": b64(json.dumps(workload)),
                                                       "lease": lease_id})
        if old_lease and old_lease != lease_id:
            await self.client.call("/v3/lease/revoke", {"ID": old_lease})
        what = self._apply_put({"key": b64(WORKLOADS + wid), "value": b64(json.dumps(workload)), "lease": lease_id,
                                "mod_revision": result["header"]["revision"]})
        self._notify(*((what,) if what else ()))
        return workload

    async def heartbeat(self, workload_id: str) -> bool:
        lease = self._leases.get(workload_id)
        if not lease or lease == "0":
            return False
        result = await self.client.call("/v3/lease/keepalive", {"ID": lease})
        return int((result.get("result") or {}).get("TTL", 0)) > 0

    async def deregister(self, workload_id: str) -> bool:
        lease = self._leases.get(workload_id)
        if lease is None:
            return False
        try:
            await self.client.call("/v3/lease/revoke", {"ID": lease})
        except EtcdUnavailable:      # the lease expired meanwhile; make sure the key is gone
            pass
        result = await self.client.call("/v3/kv/deleterange", {"key": b64(WORKLOADS + workload_id)})
        what = self._apply_delete(WORKLOADS + workload_id, int(result["header"]["revision"]))
        self._notify(*((what,) if what else ()))
        return True

    # ------------------------------------------------------------ security records

    async def get_secret(self, name: str) -> str | None:
        result = await self.client.call("/v3/kv/range", {"key": b64(SECURITY + name)})
        kvs = result.get("kvs") or []
        return unb64(kvs[0]["value"]) if kvs else None

    async def create_secret(self, name: str, value: str) -> bool:
        key = b64(SECURITY + name)
        result = await self.client.call("/v3/kv/txn", {
            "compare": [{"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
            "success": [{"request_put": {"key": key, "value": b64(value)}}]})
        return bool(result.get("succeeded"))

    async def put_secret(self, name: str, value: str) -> None:
        await self.client.call("/v3/kv/put", {"key": b64(SECURITY + name), "value": b64(value)})

    async def take_secret(self, name: str) -> str | None:
        result = await self.client.call("/v3/kv/deleterange", {"key": b64(SECURITY + name), "prev_kv": True})
        prev = result.get("prev_kvs") or []
        return unb64(prev[0]["value"]) if int(result.get("deleted", 0)) == 1 and prev else None

    async def list_secrets(self, prefix: str) -> dict[str, str]:
        start = SECURITY + prefix
        result = await self.client.call("/v3/kv/range", {"key": b64(start), "range_end": b64(prefix_end(start))})
        return {unb64(kv["key"])[len(SECURITY):]: unb64(kv["value"]) for kv in result.get("kvs") or []}
