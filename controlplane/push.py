"""Push: one long-lived stream per proxy, versioned config, ACK/NACK, debounce.

The flow, in order:

1. The store tells the engine that resources or workloads changed (:meth:`PushEngine.changed`).
2. Debounce: the engine waits for ``debounce`` seconds of quiet (at most ``debounce_max``
   after the first change), so a burst of applies becomes one push (istiod: 100 ms / 10 s).
3. It takes one consistent view of the store and, per distinct proxy identity, selects what
   that proxy needs (:mod:`controlplane.scope`).  Each distinct list of resources and each
   distinct list of workloads is serialised once; its SHA-256 is its version.  The config
   version a proxy runs is ``<resources version>.<endpoints version>``: a content hash, so
   a restarted control plane computes the same versions and sends nothing new.
4. Each proxy's stream writer sends a message naming both part versions, carrying only the
   parts that proxy has not received yet: an endpoint-only change resends no routes.
   Resources and workloads arrive in one message and become one snapshot on the proxy,
   so a route never reaches a proxy before the subset and endpoints it needs
   (make-before-break with no ordering protocol to get wrong).
5. The proxy answers with an ACK or a NACK (its errors) for that nonce.  A NACK is recorded
   and the proxy stays on its last good config; stale nonces are ignored (as in xDS).

Per-proxy state is a table of (state, event) -> state, see :data:`TRANSITIONS`.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from .resources import canonical_json, is_proxy_kind, proxy_view
from .scope import Identity, select_resources, select_workloads
from .store import ConfigStore
from .vips import VipAllocator

PING_INTERVAL = 10.0      # a stream writes at least this often, so both ends notice a dead peer

# ---------------------------------------------------------------- proxy state machine

CONNECTED, SENT, ACKED, NACKED, DISCONNECTED = "connected", "sent", "acked", "nacked", "disconnected"
SEND, IN_SYNC, ACK, NACK, DISCONNECT = "send", "in_sync", "ack", "nack", "disconnect"

TRANSITIONS: dict[tuple[str, str], str] = {
    (CONNECTED, SEND): SENT,
    (CONNECTED, IN_SYNC): ACKED,        # the proxy already runs the current version
    (SENT, SEND): SENT,                 # a newer version superseded one not yet answered
    (SENT, ACK): ACKED,
    (SENT, NACK): NACKED,
    (ACKED, SEND): SENT,
    (NACKED, SEND): SENT,
    **{(state, DISCONNECT): DISCONNECTED for state in (CONNECTED, SENT, ACKED, NACKED)},
}


class IllegalTransition(Exception):
    pass


def next_state(state: str, event: str) -> str:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"push stream (control-plane side): event {event!r} is illegal in state {state!r}") from None


# ---------------------------------------------------------------- payload parts


@dataclass(frozen=True, slots=True)
class Part:
    """One serialised list (resources or workloads) and its content version."""
    version: str
    body: bytes


@dataclass(slots=True)
class Target:
    resources: Part
    workloads: Part
    changed_at: float          # monotonic time of the change that produced it (for convergence)

    @property
    def version(self) -> str:
        return f"{self.resources.version}.{self.workloads.version}"


# ---------------------------------------------------------------- one proxy


@dataclass
class ProxyConnection:
    node_id: str
    info: dict
    identity: Identity
    connected_since: float
    conn_id: int
    state: str = CONNECTED
    target: Target | None = None
    has_resources: str = ""            # part versions the proxy holds (told on connect, then sent)
    has_workloads: str = ""
    sent_version: str = ""
    nonce: str = ""
    acked_version: str = ""
    acked_at: float = 0.0
    convergence: float | None = None    # seconds from change to this proxy's ACK
    last_nack: dict | None = None
    sent_at_change: float = 0.0
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def fire(self, event: str) -> None:
        self.state = next_state(self.state, event)

    def to_dict(self) -> dict:
        return {"node_id": self.node_id, "service": self.info.get("service", ""),
                "namespace": self.identity.namespace, "mode": self.identity.mode,
                "labels": dict(self.identity.labels), "admin": self.info.get("admin", ""), "peer": self.info.get("peer", ""),
                "state": self.state,
                "sent_version": self.sent_version, "acked_version": self.acked_version,
                "acked_at": self.acked_at, "convergence_seconds": self.convergence,
                "last_nack": self.last_nack, "connected_since": self.connected_since,
                "principal": self.info.get("principal", ""), "cert_not_after": self.info.get("cert_not_after", "")}


# ---------------------------------------------------------------- the engine


@dataclass
class PushStats:
    pushes: int = 0                 # debounced recomputations that changed something
    messages: int = 0               # config messages written to streams
    serialisations: int = 0         # distinct parts serialised
    acks: int = 0
    nacks: int = 0
    stale_acks: int = 0


class PushEngine:
    def __init__(self, store: ConfigStore, *, debounce: float = 0.1, debounce_max: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 ping_interval: float = PING_INTERVAL, metrics=None, vips: VipAllocator | None = None):
        self.store = store
        self.vips = vips if vips is not None else VipAllocator()   # service VIPs (controlplane.vips)
        self.metrics = metrics          # controlplane.metrics.ControlPlaneMetrics, or None
        self.debounce = debounce
        self.debounce_max = debounce_max
        self.ping_interval = ping_interval
        self._clock = clock
        self._wall = wall
        self.proxies: dict[str, ProxyConnection] = {}
        self.stats = PushStats()
        self._next_conn = 0
        self._first_change: float | None = None
        self._last_change = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        # computed once per push, shared by every proxy with the same identity
        self._resource_views: list[dict] = []
        self._workload_views: list[dict] = []
        self._changed_at = clock()
        self._by_identity: dict[Identity, Target] = {}
        self._parts: dict[str, Part] = {}
        self._label_scoped: set[str] = set()

    async def start(self) -> None:
        self.store.subscribe(self.changed)
        self._recompute(self._clock())
        self._task = asyncio.create_task(self._debounce_loop(), name="push-debounce")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # ------------------------------------------------------------ change -> debounce -> push

    def changed(self, what: str) -> None:
        now = self._clock()
        if self._first_change is None:
            self._first_change = now
        self._last_change = now
        self._wake.set()

    async def _debounce_loop(self) -> None:
        while True:
            await self._wake.wait()
            while True:
                fire_at = min(self._last_change + self.debounce, self._first_change + self.debounce_max)
                delay = fire_at - self._clock()
                if delay <= 0:
                    break
                await asyncio.sleep(delay)
            self._wake.clear()
            changed_at, self._first_change = self._first_change, None
            self._recompute(changed_at)

    def _recompute(self, changed_at: float) -> None:
        """One consistent view of the store -> a target per proxy; wake the streams that changed."""
        resources = sorted((proxy_view(o) for o in self.store.resources().values() if is_proxy_kind(o["kind"])),
                           key=lambda o: (o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]))
        workloads = sorted(({"service": w["service"], "namespace": w["namespace"], "address": w["address"],
                             "ports": w["ports"], "labels": w.get("labels") or {},
                             # explicit sidecars: peers connect to the sidecar's inbound listener
                             **({"proxy_port": w["proxy_port"]} if w.get("proxy_port") else {})}
                            for w in self.store.workloads().values()),
                           key=lambda w: (w["namespace"], w["service"], w["address"], sorted(w["ports"].items()),
                                          sorted(w["labels"].items())))
        resources, workloads = self.vips.annotate(resources, workloads)
        self._resource_views, self._workload_views = resources, workloads
        # labels only change what a proxy gets where a Sidecar selects workloads by label
        self._label_scoped = {o["metadata"]["namespace"] for o in resources if o["kind"] == "Sidecar"
                              and (o["spec"].get("workloadSelector") or {}).get("labels")}
        self._changed_at = changed_at
        self._by_identity = {}
        woken = 0
        for proxy in self.proxies.values():
            if self._retarget(proxy):
                woken += 1
        if woken:
            self.stats.pushes += 1
        live = {p.target.resources.version for p in self.proxies.values() if p.target} | {
            p.target.workloads.version for p in self.proxies.values() if p.target}
        self._parts = {v: part for v, part in self._parts.items() if v in live}
        if self.metrics:
            services = {(w["namespace"], w["service"]) for w in workloads}
            self.metrics.registry_size(len(services), len(workloads))

    def target_for(self, identity: Identity) -> Target:
        if identity.labels and identity.namespace not in self._label_scoped:
            identity = Identity(identity.namespace, identity.mode, ())     # same payload as its namespace peers
        target = self._by_identity.get(identity)
        if target is None:
            selected = select_resources(self._resource_views, identity)
            workloads = select_workloads(self._workload_views, self._resource_views, identity)
            # parts are shared across identities when equal: serialise each distinct list once
            target = Target(self._part(selected), self._part(workloads), self._changed_at)
            self._by_identity[identity] = target
        return target

    def _part(self, items: list[dict]) -> Part:
        """Serialise a list once per distinct content; equal lists share one Part."""
        body = canonical_json(items)
        version = hashlib.sha256(body).hexdigest()[:16]
        part = self._parts.get(version)
        if part is None:
            self.stats.serialisations += 1
            part = self._parts[version] = Part(version, body)
        return part

    def _retarget(self, proxy: ProxyConnection) -> bool:
        target = self.target_for(proxy.identity)
        if proxy.target is not None and proxy.target.version == target.version:
            return False
        proxy.target = target
        proxy.wake.set()
        return True

    # ------------------------------------------------------------ streams

    def connect(self, node_id: str, info: dict, *, resources_version: str = "",
                endpoints_version: str = "") -> ProxyConnection:
        self._next_conn += 1
        proxy = ProxyConnection(node_id, info, Identity.from_info(info), self._wall(), self._next_conn,
                                has_resources=resources_version, has_workloads=endpoints_version)
        old = self.proxies.get(node_id)
        if old is not None:
            old.fire(DISCONNECT)
            old.wake.set()
        self.proxies[node_id] = proxy
        if self.metrics and old is None:
            self.metrics.proxy_connected()
        self._retarget(proxy)
        proxy.wake.set()
        return proxy

    def disconnect(self, proxy: ProxyConnection) -> None:
        if self.proxies.get(proxy.node_id) is proxy:
            del self.proxies[proxy.node_id]
            if self.metrics:
                self.metrics.proxy_disconnected()
        if proxy.state != DISCONNECTED:
            proxy.fire(DISCONNECT)

    async def stream(self, proxy: ProxyConnection) -> AsyncIterator[bytes]:
        """The chunks of one proxy's stream: config messages, in-sync notices and pings."""
        try:
            while proxy.state != DISCONNECTED:
                try:
                    async with asyncio.timeout(self.ping_interval):
                        await proxy.wake.wait()
                except asyncio.TimeoutError:
                    yield b'{"type":"ping"}\n'
                    continue
                proxy.wake.clear()
                if proxy.state == DISCONNECTED:
                    break
                message = self._message_for(proxy)
                if message is not None:
                    yield message
        finally:
            self.disconnect(proxy)

    def _message_for(self, proxy: ProxyConnection) -> bytes | None:
        target = proxy.target
        if target is None or target.version == proxy.sent_version:
            return None
        if proxy.state == CONNECTED and (proxy.has_resources, proxy.has_workloads) == (
                target.resources.version, target.workloads.version):
            proxy.fire(IN_SYNC)
            proxy.sent_version = proxy.acked_version = target.version
            proxy.acked_at = self._wall()
            return b'{"type":"in_sync","version":"%s"}\n' % target.version.encode()
        proxy.fire(SEND)
        proxy.nonce = f"{proxy.conn_id}-{self.stats.messages + 1}"
        proxy.sent_version = target.version
        proxy.sent_at_change = target.changed_at
        head = {"type": "config", "version": target.version, "nonce": proxy.nonce,
                "resources_version": target.resources.version,
                "endpoints_version": target.workloads.version}
        resources = target.resources.body if target.resources.version != proxy.has_resources else b"null"
        workloads = target.workloads.body if target.workloads.version != proxy.has_workloads else b"null"
        proxy.has_resources, proxy.has_workloads = target.resources.version, target.workloads.version
        self.stats.messages += 1
        if self.metrics:
            self.metrics.push_sent("resources" if resources != b"null" else "endpoints")
        return b"".join((json.dumps(head)[:-1].encode(), b',"resources":', resources,
                         b',"workloads":', workloads, b"}\n"))

    # ------------------------------------------------------------ ACK / NACK

    def acknowledge(self, node_id: str, nonce: str, version: str, errors: list[str]) -> str:
        """Record an ACK ([] errors) or NACK; returns "ack" | "nack" | "stale" | "unknown"."""
        proxy = self.proxies.get(node_id)
        if proxy is None:
            return "unknown"
        if nonce != proxy.nonce or proxy.state != SENT:
            self.stats.stale_acks += 1
            return "stale"
        if errors:
            proxy.fire(NACK)
            proxy.last_nack = {"version": version, "errors": list(errors), "at": self._wall()}
            self.stats.nacks += 1
            if self.metrics:
                self.metrics.nack()
            return "nack"
        proxy.fire(ACK)
        proxy.acked_version = version
        proxy.acked_at = self._wall()
        proxy.convergence = self._clock() - proxy.sent_at_change
        self.stats.acks += 1
        if self.metrics:
            self.metrics.converged(proxy.convergence)
        return "ack"

    def current_version(self, identity: Identity) -> str:
        return self.target_for(identity).version
