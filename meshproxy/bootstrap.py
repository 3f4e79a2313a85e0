"""The composition root: builds one worker's runtime and wires everything together.

A :class:`Worker` owns, for one process and one event loop: the snapshot store, the
per-worker runtime built from each snapshot (split state, cluster state), the upstream
pools, the listeners and their connections, telemetry, and the tasks that keep these
fresh (config watch or control-plane stream, timeout sweeper).  Nothing here is global:
tests build several workers in one process.

Shutdown order (SIGTERM): readiness 503 -> listeners stop accepting -> idle keep-alive
connections close -> responses in flight finish with ``Connection: close`` -> exit
when the last connection is gone or the drain deadline passes.
"""
from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from dataclasses import dataclass, field, replace
from functools import partial
from types import MappingProxyType
from typing import Callable

import cython

from .batch import SendBatch
from .clock import monotonic
from .cluster.state import ClusterManager
from .codec import make_request_parser, make_response_parser
from .codec.api import CodecLimits
from .config.model import Endpoint, Listener, Snapshot, endpoint_tls, sni_matches
from .config.store import SnapshotStore
from .downstream.splice import Splice
from .downstream.tcp_proxy import TcpProxyListener
from .listener import HttpListener, bind_socket, inbound_acceptor
from .router.split import Splitter
from .security.authz import authorize_connection
from .proxy.observe import Telemetry
from .telemetry.tracing import IdSource, random_uuid
from .upstream.pool import UpstreamPools
from .upstream.tls import UpstreamTlsContexts

log = logging.getLogger("meshproxy")


@dataclass
class WorkerOptions:
    codec: str = "httptools"
    limits: CodecLimits = field(default_factory=CodecLimits)
    drain_timeout: float = 10.0
    worker_index: int = 0
    node_id: str = ""


class Worker:
    def __init__(self, loop: asyncio.AbstractEventLoop, store: SnapshotStore, options: WorkerOptions,
                 telemetry: Telemetry, rng: random.Random | None = None,
                 clock: Callable[[], float] | None = None):
        self.loop = loop
        self.store = store
        self.options = options
        self.rng = rng or random.Random()
        # an x-request-id (UUIDv4) when tracing does not make one: compiled, from an IdSource
        # seeded by the worker's rng (an injected rng makes them repeat); pure Python, the rng
        ids = IdSource(self.rng.randbytes(32)) if cython.compiled else self.rng
        self.new_request_id = partial(random_uuid, ids)
        # the worker's clock, injectable; ``now()`` reads it (the default at C level when compiled)
        self.clock = clock or time.monotonic
        self.system_clock = clock is None
        self.telemetry = telemetry
        self.settings = store.current.settings if store.current else None
        # the snapshot requests route on: store.current, set after the runtime built from it
        # (a C attribute read per request instead of a Python one)
        self.snapshot = store.current
        self.draining = False
        self.downstream_active = 0
        self.http_listeners: dict[tuple[str, int], HttpListener] = {}
        self.tcp_listeners: dict[tuple[str, int], TcpProxyListener] = {}
        self.capture_listeners: dict[tuple[str, int], "CaptureListener"] = {}   # capture mode (meshproxy.capture)
        self.tunnels: set[Splice] = set()
        self.mirror_tasks: set[asyncio.Task] = set()
        self.clusters = ClusterManager(clock=self.clock, rng=self.rng)
        self.splitter: Splitter | None = None
        codec, limits = options.codec, options.limits
        self._request_parser = lambda handler: make_request_parser(codec, handler, limits)
        # where the connections' writes go: at once, or after a busy loop pass at the end of the next (batch.py)
        self.batch = SendBatch(loop)
        self.pools = UpstreamPools(loop, lambda handler: make_response_parser(codec, handler, limits), clock,
                                   batch=self.batch)
        self.pools.tls = UpstreamTlsContexts(lambda: self.certificates)
        self._sweeper: asyncio.TimerHandle | None = None
        self.listen_errors: list[str] = []
        # the workload certificate manager (meshproxy.security.CertificateManager), set by the
        # composition root when the proxy has an identity; None = no workload certificate
        self.certificates = None
        store.subscribe(self._on_swap)

    # ---------------------------------------------------------------- snapshot lifecycle

    def make_request_parser(self, handler):
        return self._request_parser(handler)

    def _build_runtime(self, snapshot: Snapshot) -> None:
        self.settings = snapshot.settings
        changed = self.store.changed_clusters if self.store.current is snapshot else None
        if changed is not None:          # an endpoint patch: only these clusters differ (no DNS ones)
            self.clusters.update_only(snapshot, changed)
        else:
            self.clusters.update(with_dns_endpoints(snapshot))
        old = self.splitter
        if old is not None and old.snapshot.route_tables is snapshot.route_tables \
                and old.snapshot.listeners is snapshot.listeners:
            old.snapshot = snapshot      # endpoints patched (config/incremental.py): same routes, same split state
        else:
            self.splitter = Splitter(snapshot, rng=self.rng, previous=old)
        self.telemetry.on_snapshot(snapshot)
        self.snapshot = snapshot

    def _on_swap(self, new: Snapshot, old: Snapshot | None) -> None:
        # runs synchronously inside SnapshotStore.swap: requests that already read the
        # old snapshot keep it; the next request reads the new one.
        self._build_runtime(new)
        if self._sweeper is not None:      # started: bring listeners in line
            self.loop.create_task(self.reconcile_listeners())

    async def start(self) -> None:
        snapshot = self.store.current
        if snapshot is None:
            raise RuntimeError("no config loaded")
        self._build_runtime(snapshot)
        await self.reconcile_listeners()
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    async def reconcile_listeners(self) -> None:
        """Open listeners the snapshot declares, drain those it no longer does."""
        snapshot = self.store.current
        wanted: dict[tuple[str, int], Listener] = {(l.address, l.port): l for l in snapshot.listeners}
        for key, listener in list(self.http_listeners.items()):
            model = wanted.get(key)
            if model is None or model.protocol not in ("HTTP", "HTTPS"):
                listener.drain()
                del self.http_listeners[key]
            else:
                listener.update(model)
        for key, tcp in list(self.tcp_listeners.items()):
            model = wanted.get(key)
            if model is None or model.protocol != "TCP":
                tcp.stop_accepting()
                del self.tcp_listeners[key]
            else:
                tcp.model = model
        for key, capture in list(self.capture_listeners.items()):
            model = wanted.get(key)
            if model is None or model.protocol != capture.model.protocol:
                capture.drain()
                del self.capture_listeners[key]
            else:
                capture.update(model)
        errors = []
        for key, model in wanted.items():
            if key in self.http_listeners or key in self.tcp_listeners or key in self.capture_listeners:
                continue
            try:
                sock = bind_socket(model.address, model.port)
            except OSError as err:
                errors.append(f"listener {model.name} {model.address}:{model.port}: {err.strerror or err}")
                continue
            if model.protocol in ("HTTP", "HTTPS"):
                ctx = self._tls_context(model) if model.protocol == "HTTPS" else None
                listener = HttpListener(self, model, sock, ctx)
                await listener.start()
                self.http_listeners[key] = listener
            elif model.protocol == "TCP":
                tcp = self._tcp_listener(model)
                if model.mtls:
                    # inbound: its PeerAuthentication decides per connection (mTLS or plaintext)
                    tcp.server = inbound_acceptor(self, model.name, sock, tcp.protocol_factory,
                                                  lambda: tcp.model.mtls, ())
                else:
                    await tcp.start(sock)
                self.tcp_listeners[key] = tcp
            elif model.protocol in ("CAPTURE_OUTBOUND", "CAPTURE_INBOUND"):
                from .capture.listener import CaptureListener
                capture = CaptureListener(self, model, sock)
                await capture.start()
                self.capture_listeners[key] = capture
        self.listen_errors = errors
        for error in errors:
            log.error("%s", error)

    def _tls_context(self, model: Listener) -> ssl.SSLContext:
        certs = model.tls.certificates
        default = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        default.load_cert_chain(certs[0][1], certs[0][2])
        by_sni = {}
        for sni, cert, key in certs:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            by_sni[sni.lower()] = ctx

        def pick(sock, server_name, _ctx):
            if server_name:
                name = server_name.lower()
                chosen = by_sni.get(name)
                if chosen is None:
                    _, _, parent = name.partition(".")
                    chosen = by_sni.get("*." + parent)
                if chosen is not None:
                    sock.context = chosen
            return None

        default.sni_callback = pick
        return default

    def inbound_tls_context(self, alpn: tuple[str, ...], client_cert: str) -> ssl.SSLContext | None:
        """The workload's mTLS server context for inbound listeners (None: no certificate)."""
        certificates = self.certificates
        if certificates is None or certificates.current is None:
            return None
        return certificates.server_context(alpn=alpn, client_cert=client_cert)

    def _tcp_listener(self, model: Listener) -> TcpProxyListener:
        settings = self.settings

        def current_model() -> Listener:
            listener = self.tcp_listeners_by_name.get(model.name)
            return listener.model if listener else model

        def pick_upstream(sni: str | None = None):
            current = current_model()
            if sni is None:
                route = current.tcp_routes[0] if current.tcp_routes else None
            else:     # Gateway PASSTHROUGH: the first route whose sniHosts take the SNI
                route = next((r for r in current.tcp_routes if sni_matches(r.sni_hosts, sni)), None)
            if route is None:
                return None
            dest = self.splitter.pick_tcp(route)
            if dest is None or not dest.cluster:
                return None
            cluster = self.clusters.get(dest.cluster)
            endpoint = cluster.pick() if cluster is not None else None
            if endpoint is None:
                return None
            tls = endpoint_tls(cluster.cluster.policy, endpoint)
            return (endpoint.address, endpoint.port) if tls is None else (endpoint.address, endpoint.port, tls)

        def admit(transport) -> bool:
            listener = self.tcp_listeners_by_name.get(model.name)
            current = listener.model if listener else model
            if current.authz is None:
                return True
            decision = authorize_connection(current.authz, transport.get_extra_info)
            self.telemetry.authz_decision(model.name, decision, "tcp")
            return decision.allowed

        return TcpProxyListener(
            self.loop, pick_upstream, connect_timeout=settings.upstream_connect_timeout, admit=admit,
            idle_timeout=settings.tcp_idle_timeout, on_open=self.telemetry.tcp_opened(model),
            on_close=self.telemetry.tcp_closed(model), model=model,
            max_connections=settings.max_connections_per_listener,
            on_overflow=lambda: self.telemetry.downstream_overflow(model.name), upstream_tls=self.pools.tls,
            sni_routing=lambda: any(r.sni_hosts for r in current_model().tcp_routes))

    @property
    def tcp_listeners_by_name(self) -> dict[str, TcpProxyListener]:
        return {t.model.name: t for t in self.tcp_listeners.values()}

    # ---------------------------------------------------------------- periodic work

    def all_http_listeners(self) -> list[HttpListener]:
        """The HTTP listeners and the capture listeners' HTTP views (their connections drain alike)."""
        listeners = list(self.http_listeners.values())
        for capture in self.capture_listeners.values():
            listeners += capture.http_listeners()
        return listeners

    def all_tcp_listeners(self) -> list[TcpProxyListener]:
        listeners = list(self.tcp_listeners.values())
        for capture in self.capture_listeners.values():
            listeners += capture.tcp_listeners()
        return listeners

    def _sweep(self) -> None:
        now = self.clock()
        for listener in self.all_http_listeners():
            listener.sweep(now)
        self.pools.sweep(60.0)
        self.telemetry.flush()
        if not self.draining:
            self._sweeper = self.loop.call_later(1.0, self._sweep)

    @property
    def ready(self) -> bool:
        return (not self.draining and self.store.current is not None and self._sweeper is not None
                and not self.listen_errors)

    # ---------------------------------------------------------------- drain

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting, close idle connections, let responses in flight finish.
        Returns True when every connection finished within the deadline."""
        self.draining = True
        self.telemetry.set_draining(True)
        deadline = self.clock() + (timeout if timeout is not None else self.options.drain_timeout)
        for listener in self.http_listeners.values():
            listener.drain()
        for tcp in self.tcp_listeners.values():
            tcp.stop_accepting()
        for capture in self.capture_listeners.values():
            capture.drain()
        while self.clock() < deadline:
            busy = sum(l.active for l in self.all_http_listeners())
            busy += sum(t.active for t in self.all_tcp_listeners())
            if busy == 0:
                break
            for listener in self.all_http_listeners():
                for conn in list(listener.connections):
                    conn.check_timeouts(self.clock())
                    if conn.exchange is None:
                        conn.close()
            await asyncio.sleep(0.05)
        clean = sum(l.active for l in self.all_http_listeners()) == 0
        for listener in self.all_http_listeners():
            for conn in list(listener.connections):
                conn.abort()
        remaining = max(0.0, deadline - self.clock())
        for tcp in self.all_tcp_listeners():
            await tcp.close(remaining)
        for tunnel in list(self.tunnels):
            tunnel.abort()
        self.pools.close()
        return clean

    # ---------------------------------------------------------------- hooks the pipeline calls

    def now(self) -> float:
        """``clock()``: compiled with the default clock, CLOCK_MONOTONIC read at C level."""
        if cython.compiled and self.system_clock:
            return monotonic()
        return self.clock()

    def metrics_rejected(self, reason: str, status: int) -> None:
        self.telemetry.rejected(reason, status)

    def on_exchange_done(self, exchange) -> None:
        self.telemetry.exchange_done(exchange, self.now())

    def on_overflow(self, cluster) -> None:
        self.telemetry.overflow(cluster.name)

    def on_connection_overflow(self, cluster) -> None:
        self.telemetry.connection_overflow(cluster.name)

    def on_retry_overflow(self, cluster) -> None:
        self.telemetry.retry_overflow(cluster.name)

    def on_retry(self, cluster) -> None:
        self.telemetry.retry(cluster.name)

    def clusters_record(self, cluster, host, outcome) -> None:
        if cluster is not None and host is not None:
            cluster.record_host(host, outcome)

    def start_tunnel(self, down, conn, to_upstream: bytes, to_downstream: bytes) -> None:
        """A 101 Switching Protocols: from here on the two connections are spliced as bytes."""
        down.listener.connection_closed(down)

        def finished(sent: int, received: int) -> None:
            self.tunnels.discard(splice)

        splice = Splice(self.loop, down.transport, conn.transport,
                        idle_timeout=self.settings.tcp_idle_timeout,
                        initial_to_upstream=to_upstream, initial_to_downstream=to_downstream,
                        on_close=finished)
        self.tunnels.add(splice)
        splice.start()


def wall_clock() -> float:
    return time.time()


def with_dns_endpoints(snapshot: Snapshot) -> Snapshot:
    """ServiceEntry ``resolution: DNS`` clusters carry names, not addresses: give the
    cluster runtime one endpoint per name; the upstream pools resolve each name when
    they connect (cached, last good answer kept on failure)."""
    dns = {name: c for name, c in snapshot.clusters.items() if c.resolution == "DNS" and not c.endpoints}
    if not dns:
        return snapshot
    clusters = dict(snapshot.clusters)
    for name, c in dns.items():
        clusters[name] = replace(c, endpoints=tuple(Endpoint(host, port) for host, port in c.dns_hosts))
    return replace(snapshot, clusters=MappingProxyType(clusters))
