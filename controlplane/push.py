"""Push: one long-lived stream per proxy, per-resource versions, deltas, ACK/NACK, debounce.

The flow, in order:

1. The store tells the engine that resources or workloads changed (:meth:`PushEngine.changed`).
2. Debounce: the first change after ``debounce`` seconds of quiet is pushed at once (leading
   edge); changes that follow within ``debounce`` of a push wait for ``debounce`` seconds of
   quiet (at most ``debounce_max`` after the first), so a burst of applies becomes one more
   push (istiod: 100 ms / 10 s, trailing edge only).
3. It takes one consistent view of the store.  Every resource and every workload gets a
   content version (the hash of its canonical JSON, computed once per stored object).  Per
   distinct proxy identity it selects what that proxy needs (:mod:`controlplane.scope`):
   a *part* (the resources, or the workloads, one proxy gets) maps each item's key to its
   version and view; the part's version is the hash of its sorted ``key=version`` lines.
   The config version a proxy runs is ``<resources version>.<endpoints version>``: content
   hashes, so a restarted control plane computes the same versions and sends nothing new.
4. Each proxy's stream writer sends, for each part the proxy does not hold yet, a *delta*
   from the part version it holds: the items added or updated (each with its version) and
   the keys removed; or the whole part (``base: ""``) when the engine no longer knows the
   proxy's version.  A delta between two part versions is computed and serialised once and
   shared by every proxy that makes the same step; an endpoint change is a few hundred
   bytes.  Resources and workloads arrive in one message and become one snapshot on the
   proxy, so a route never reaches a proxy before the subset and endpoints it needs.
5. The proxy answers with an ACK or a NACK for that nonce.  A NACK names the refused
   resources; the proxy applied the rest (refusal is per resource) and keeps the refused
   ones at their last good version.  A proxy whose held version is not a delta's base asks
   for a resync and gets whole parts.  Stale nonces are ignored (as in xDS).

Per-proxy state is a table of (state, event) -> state, see :data:`TRANSITIONS`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import ssl
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from .resources import canonical_json, content_hash, is_proxy_kind, proxy_view
from .scope import NOT_GRANTED, ROOT_NAMESPACE, Identity, MeshScope, scope_for, select_resources, select_workloads
from .store import ConfigStore
from .vips import VipAllocator

PING_INTERVAL = 10.0      # a stream writes at least this often, so both ends notice a dead peer

# ---------------------------------------------------------------- proxy state machine

CONNECTED, SENT, ACKED, NACKED, DISCONNECTED = "connected", "sent", "acked", "nacked", "disconnected"
SEND, IN_SYNC, ACK, NACK, RESYNC, DISCONNECT = "send", "in_sync", "ack", "nack", "resync", "disconnect"

TRANSITIONS: dict[tuple[str, str], str] = {
    (CONNECTED, SEND): SENT,
    (CONNECTED, IN_SYNC): ACKED,        # the proxy already runs the current version
    (SENT, SEND): SENT,                 # a newer version superseded one not yet answered
    (SENT, ACK): ACKED,
    (SENT, NACK): NACKED,
    (SENT, RESYNC): CONNECTED,          # the proxy could not apply a delta: whole parts follow
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


class Part:
    """One part (the resources or the workloads a proxy gets): key -> (item version, view),
    and its content version.  The whole part is serialised only when someone needs it."""

    __slots__ = ("version", "items", "_full")

    def __init__(self, version: str, items: dict[str, tuple[str, dict]]):
        self.version = version
        self.items = items
        self._full: bytes | None = None

    def full(self) -> bytes:
        if self._full is None:
            self._full = _delta_body("", [(k, v, view) for k, (v, view) in sorted(self.items.items())], [])
        return self._full


def _delta_body(base: str, updated: list[tuple[str, str, dict]], removed: list[str]) -> bytes:
    return canonical_json({"base": base, "updated": [{"key": k, "version": v, "item": view} for k, v, view in updated],
                           "removed": removed})


def part_version(items: dict[str, tuple[str, dict]]) -> str:
    """The hash of the part's ``key=version`` lines; ``items`` are in key order (built from the
    sorted views), so no sort is needed here."""
    lines = "\n".join(f"{k}={v}" for k, (v, _) in items.items())
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def resource_key(view: dict) -> str:
    md = view["metadata"]
    return f"{view['kind']}/{md.get('namespace') or 'default'}/{md['name']}"


@dataclass(slots=True)
class Target:
    resources: Part
    workloads: Part
    changed_at: float          # monotonic time of the change that produced it (for convergence)

    @property
    def version(self) -> str:
        return f"{self.resources.version}.{self.workloads.version}"


def workload_view(w: dict) -> dict:
    view = {"service": w["service"], "namespace": w["namespace"], "address": w["address"],
            "ports": w["ports"], "labels": w.get("labels") or {}}
    if w.get("proxy_port"):          # explicit sidecars: peers connect to the sidecar's inbound listener
        view["proxy_port"] = w["proxy_port"]
    if w.get("identity"):            # registered with a workload certificate: peers originate mTLS to it
        view["identity"] = w["identity"]   # (auto mTLS) and check this SPIFFE id
    return view


def _versioned(stored, cache: dict, view_of, key_of) -> dict:
    """store key -> (stored object, view, item key, item version); the view and its version
    are computed once per stored object (the stores replace objects, never mutate them)."""
    out = {}
    for skey, obj in stored.items():
        hit = cache.get(skey)
        if hit is None or hit[0] is not obj:
            view = view_of(obj)
            hit = (obj, view, key_of(view, skey), content_hash(view))
        out[skey] = hit
    return out


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
    applied_version: str = ""           # what the proxy runs: the ACKed version, or a NACKed one it applied in part
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
                "applied_version": self.applied_version,
                "acked_at": self.acked_at, "convergence_seconds": self.convergence,
                "last_nack": self.last_nack, "connected_since": self.connected_since,
                "secrets": "granted" if self.identity.secrets_granted else f"withheld: {self.identity.secrets_refusal}",
                "principal": self.info.get("principal", ""), "cert_not_after": self.info.get("cert_not_after", ""),
                "cert_expires_at": expires_at(self.info.get("cert_not_after", ""))}


def expires_at(not_after: str) -> float | None:
    """OpenSSL's notAfter text (``Dec  8 14:38:02 2026 GMT``) as seconds since the epoch."""
    try:
        return float(ssl.cert_time_to_seconds(not_after)) if not_after else None
    except ValueError:
        return None


# ---------------------------------------------------------------- the engine


@dataclass
class PushStats:
    pushes: int = 0                 # debounced recomputations that changed something
    messages: int = 0               # config messages written to streams
    serialisations: int = 0         # distinct parts built
    deltas: int = 0                 # distinct part-to-part deltas serialised
    resyncs: int = 0
    acks: int = 0
    nacks: int = 0
    stale_acks: int = 0


class PushEngine:
    def __init__(self, store: ConfigStore, *, debounce: float = 0.1, debounce_max: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 ping_interval: float = PING_INTERVAL, metrics=None, vips: VipAllocator | None = None,
                 mesh: MeshScope = MeshScope()):
        self.store = store
        self.vips = vips if vips is not None else VipAllocator()   # service VIPs (controlplane.vips)
        self.metrics = metrics          # controlplane.metrics.ControlPlaneMetrics, or None
        self.debounce = debounce
        self.mesh = mesh
        self.debounce_max = debounce_max
        self.ping_interval = ping_interval
        self._clock = clock
        self._wall = wall
        self.proxies: dict[str, ProxyConnection] = {}
        self.stats = PushStats()
        self._next_conn = 0
        self._first_change: float | None = None
        self._last_change = 0.0
        self._last_push = float("-inf")
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        # computed once per push, shared by every proxy with the same identity
        self._resource_views: list[dict] = []
        self._workload_views: list[dict] = []
        self._item_meta: dict[int, tuple[str, str]] = {}       # id(view) -> (key, item version)
        self._annotated: dict = {}                              # (key, VIP annotation) -> (raw view, version)
        self._resource_items: dict = {}                         # store key -> (stored object, view, key, version)
        self._workload_items: dict = {}
        self._changed_at = clock()
        self._by_identity: dict[Identity, Target] = {}
        self._withheld: dict[tuple[str, str], dict] = {}         # withheld Secret views, kept for their ids
        self._parts: dict[str, Part] = {}
        self._deltas: dict[tuple[str, str], bytes] = {}
        self._label_scoped: set[str] = set()
        self._sidecar_namespaces: set[str] = set()
        self._root_sidecar = False

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
            # leading edge: the first change after a quiet period goes out at once; changes
            # that follow within ``debounce`` of a push are gathered (trailing edge)
            quiet = self._first_change is not None and self._first_change - self._last_push >= self.debounce
            while not quiet:
                fire_at = min(self._last_change + self.debounce, self._first_change + self.debounce_max)
                delay = fire_at - self._clock()
                if delay <= 0:
                    break
                await asyncio.sleep(delay)
            self._wake.clear()
            changed_at, self._first_change = self._first_change, None
            self._recompute(changed_at)
            self._last_push = self._clock()

    def _recompute(self, changed_at: float) -> None:
        """One consistent view of the store -> a target per proxy; wake the streams that changed."""
        stored = {k: o for k, o in self.store.resources().items() if is_proxy_kind(o["kind"])}
        self._resource_items = _versioned(stored, self._resource_items, proxy_view,
                                          lambda view, skey: resource_key(view))
        self._workload_items = _versioned(self.store.workloads(), self._workload_items, workload_view,
                                          lambda view, wid: wid)
        discovers = self.mesh.discovers
        ordered_resources = sorted((e for e in self._resource_items.values()
                                    if discovers(e[1]["metadata"].get("namespace") or "default")), key=lambda e: e[2])
        ordered_workloads = sorted((e for e in self._workload_items.values() if discovers(e[1]["namespace"])),
                                   key=lambda e: e[2])
        # service VIPs (controlplane.vips): the proxies' copies carry the allocated addresses.  A
        # VIP is per service, so the allocator sees one workload per service, and each workload's
        # annotated copy (and its version) is made once per (workload, VIP) and then reused
        per_service: dict[tuple[str, str], dict] = {}
        for entry in ordered_workloads:
            per_service.setdefault((entry[1]["service"], entry[1]["namespace"]), entry[1])
        resources, samples = self.vips.annotate([e[1] for e in ordered_resources], list(per_service.values()))
        vip_of = {(v["service"], v["namespace"]): v.get("vip") or "" for v in samples}
        annotated: dict = {}
        self._item_meta = meta = {}
        for entry, view in zip(ordered_resources, resources):
            meta[id(view)] = self._annotated_meta(entry, view, annotated)
        workloads = []
        previous = self._annotated
        for _, raw, key, version in ordered_workloads:
            vip = vip_of.get((raw["service"], raw["namespace"]), "")
            if vip:
                hit = previous.get((key, vip))
                if hit is None or hit[0] is not raw:
                    view = dict(raw, vip=vip)
                    hit = (raw, content_hash(view), view)
                annotated[(key, vip)] = hit
                raw, version = hit[2], hit[1]
            workloads.append(raw)
            meta[id(raw)] = (key, version)
        self._annotated = annotated
        self._resource_views, self._workload_views = resources, workloads
        # labels only change what a proxy gets where a Sidecar selects workloads by label
        self._label_scoped = {o["metadata"].get("namespace") or "default" for o in resources if o["kind"] == "Sidecar"
                              and (o["spec"].get("workloadSelector") or {}).get("labels")}
        self._sidecar_namespaces = {o["metadata"].get("namespace") or "default" for o in resources
                                    if o["kind"] == "Sidecar"}
        self._root_sidecar = any(o["kind"] == "Sidecar" and o["metadata"].get("namespace") == ROOT_NAMESPACE
                                 and not (o["spec"].get("workloadSelector") or {}).get("labels") for o in resources)
        self._changed_at = changed_at
        self._by_identity = {}
        self._withheld = {}
        woken = 0
        for proxy in self.proxies.values():
            if self._retarget(proxy):
                woken += 1
        if woken:
            self.stats.pushes += 1
        self._prune_parts()
        if self.metrics:
            services = {(w["namespace"], w["service"]) for w in workloads}
            self.metrics.registry_size(len(services), len(workloads))

    def _annotated_meta(self, entry: tuple, view: dict, fresh: dict) -> tuple[str, str]:
        """(key, version) of a view as sent: the stored item's own when the VIP annotation left it
        as it was, else the annotated copy's, hashed once per (item, annotation)."""
        _, raw, key, version = entry
        if view is raw:
            return key, version
        cache_key = (key, repr((view.get("spec") or {}).get("addresses")))
        hit = self._annotated.get(cache_key)
        if hit is None or hit[0] is not raw:
            hit = (raw, content_hash(view), view)
        fresh[cache_key] = hit
        return key, hit[1]

    def _prune_parts(self) -> None:
        """Keep the parts some proxy is sent or holds (the bases of the next deltas)."""
        live = set()
        for p in self.proxies.values():
            live.update((p.has_resources, p.has_workloads))
            if p.target is not None:
                live.update((p.target.resources.version, p.target.workloads.version))
        self._parts = {v: part for v, part in self._parts.items() if v in live}
        self._deltas = {k: d for k, d in self._deltas.items() if k[0] in live and k[1] in live}

    def target_for(self, identity: Identity) -> Target:
        # labels and the own service change the payload only where a Sidecar selects by label
        # or narrows the scope: elsewhere proxies of a namespace share one target
        # (a gateway's labels pick the Gateways, and so the Secrets, it is sent: gateways are few)
        labels = identity.labels if identity.namespace in self._label_scoped or identity.mode == "gateway" else ()
        narrowed = identity.mode == "sidecar" and (self._root_sidecar or identity.namespace in self._sidecar_namespaces)
        gateway = identity.mode == "gateway"
        identity = Identity(identity.namespace, identity.mode, labels, identity.service if narrowed else "",
                            gateway and identity.secrets_granted,
                            identity.secrets_refusal if gateway else NOT_GRANTED)
        target = self._by_identity.get(identity)
        if target is None:
            scope = scope_for(self._resource_views, identity)
            selected = [self._withheld_view(v) for v in select_resources(self._resource_views, identity, scope)]
            workloads = select_workloads(self._workload_views, self._resource_views, identity, scope)
            # parts are shared across identities when equal
            target = Target(self._part(selected), self._part(workloads), self._changed_at)
            self._by_identity[identity] = target
        return target

    def _withheld_view(self, view: dict) -> dict:
        """A withheld Secret (made by ``select_resources``) as one kept view per (Secret, reason),
        with its own version, under the Secret's key."""
        if id(view) in self._item_meta:
            return view
        key = resource_key(view)
        cache_key = (key, json.dumps(view, sort_keys=True))
        kept = self._withheld.get(cache_key)
        if kept is None:
            kept = self._withheld[cache_key] = view
            self._item_meta[id(view)] = (key, content_hash(view))
        return kept

    def _part(self, views: list[dict]) -> Part:
        """The part holding ``views`` (in key order); equal contents share one Part."""
        meta = self._item_meta
        items = {}
        for view in views:
            key, version = meta[id(view)]
            items[key] = (version, view)
        version = part_version(items)
        part = self._parts.get(version)
        if part is None:
            self.stats.serialisations += 1
            part = self._parts[version] = Part(version, items)
        return part

    def _part_body(self, held: str, part: Part) -> bytes:
        """What takes a proxy holding part version ``held`` to ``part``: a delta when this engine
        still knows ``held``, else the whole part.  Each step is serialised once."""
        base = self._parts.get(held) if held else None
        if base is None:
            return part.full()
        body = self._deltas.get((held, part.version))
        if body is None:
            old = base.items
            updated = [(k, v, view) for k, (v, view) in part.items.items() if (old.get(k) or ("",))[0] != v]
            removed = [k for k in old if k not in part.items]
            body = self._deltas[(held, part.version)] = _delta_body(held, updated, removed)
            self.stats.deltas += 1
        return body

    def _retarget(self, proxy: ProxyConnection) -> bool:
        target = self.target_for(proxy.identity)
        if proxy.target is not None and proxy.target.version == target.version:
            return False
        proxy.target = target
        proxy.wake.set()
        return True

    # ------------------------------------------------------------ streams

    def connect(self, node_id: str, info: dict, *, resources_version: str = "",
                endpoints_version: str = "", secrets_granted: bool = False,
                secrets_refusal: str = NOT_GRANTED) -> ProxyConnection:
        """``secrets_granted``: this proxy's authenticated identity may read the Secrets of its
        namespace, else ``secrets_refusal`` says why not (the caller decides from the verified
        identity, never from ``info``, which the proxy declares)."""
        self._next_conn += 1
        identity = dataclasses.replace(Identity.from_info(info), secrets_granted=secrets_granted,
                                       secrets_refusal="" if secrets_granted else secrets_refusal)
        proxy = ProxyConnection(node_id, info, identity, self._wall(), self._next_conn,
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
        resources = self._part_body(proxy.has_resources, target.resources) \
            if target.resources.version != proxy.has_resources else b"null"
        workloads = self._part_body(proxy.has_workloads, target.workloads) \
            if target.workloads.version != proxy.has_workloads else b"null"
        proxy.has_resources, proxy.has_workloads = target.resources.version, target.workloads.version
        self.stats.messages += 1
        if self.metrics:
            self.metrics.push_sent("resources" if resources != b"null" else "endpoints")
        return b"".join((json.dumps(head)[:-1].encode(), b',"resources":', resources,
                         b',"workloads":', workloads, b"}\n"))

    # ------------------------------------------------------------ ACK / NACK

    def resync(self, node_id: str, nonce: str) -> str:
        """The proxy could not apply the message ``nonce`` (a delta whose base it does not
        hold): forget what it holds and send whole parts.  Returns "resync" | "stale" | "unknown"."""
        proxy = self.proxies.get(node_id)
        if proxy is None:
            return "unknown"
        if nonce != proxy.nonce or proxy.state != SENT:
            self.stats.stale_acks += 1
            return "stale"
        proxy.fire(RESYNC)
        proxy.has_resources = proxy.has_workloads = proxy.sent_version = ""
        self.stats.resyncs += 1
        proxy.wake.set()
        return "resync"

    def acknowledge(self, node_id: str, nonce: str, version: str, errors: list[str],
                    rejected: dict[str, list[str]] | None = None, applied: bool | None = None) -> str:
        """Record an ACK ([] errors) or NACK; returns "ack" | "nack" | "stale" | "unknown".

        A NACK names the refused resources (``rejected``: "Kind ns/name" -> errors); with
        ``applied`` the proxy runs the version with those resources at their last good
        version (refusal is per resource), without it the proxy stays on its last good config."""
        proxy = self.proxies.get(node_id)
        if proxy is None:
            return "unknown"
        if nonce != proxy.nonce or proxy.state != SENT:
            self.stats.stale_acks += 1
            return "stale"
        if errors:
            proxy.fire(NACK)
            applied = bool(applied) if applied is not None else False
            proxy.last_nack = {"version": version, "errors": list(errors), "at": self._wall(),
                               "resources": {str(k): list(v) for k, v in (rejected or {}).items()},
                               "applied": applied}
            if applied:
                proxy.applied_version = version
            self.stats.nacks += 1
            if self.metrics:
                self.metrics.nack()
            return "nack"
        proxy.fire(ACK)
        proxy.acked_version = proxy.applied_version = version
        proxy.acked_at = self._wall()
        proxy.convergence = self._clock() - proxy.sent_at_change
        self.stats.acks += 1
        if self.metrics:
            self.metrics.converged(proxy.convergence)
        return "ack"

    def current_version(self, identity: Identity) -> str:
        return self.target_for(identity).version
