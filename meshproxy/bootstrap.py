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
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from . import HOT_PATH
from .batch import SendBatch
from .cluster.state import ClusterManager
from .codec import DEFAULT_BACKEND, make_request_parser, make_response_parser
from .codec.api import CodecLimits
from .config.model import Listener, Snapshot, endpoint_tls, sni_matches
from .config.store import SnapshotStore
from .downstream.http_conn import IDLE, DownstreamConnection
from .downstream.tcp_proxy import TcpProxyListener, connection_addresses
from .downstream.tls import GatewayTls, TerminatingAcceptor
from .router.tcp import select_tcp_route
from .memory import Trimmer
from .listener import HttpListener, bind_socket, inbound_acceptor
from .proxy.observe import Telemetry
from .runtime import Runtime
from .security.authz import authorize_connection
from .security.tls import requested_server_name
from .telemetry.tracing import IdSource, random_uuid
from .upstream.pool import UpstreamPools
from .upstream.tls import UpstreamTlsContexts

log = logging.getLogger("meshproxy")


@dataclass
class WorkerOptions:
    codec: str = DEFAULT_BACKEND
    limits: CodecLimits = field(default_factory=CodecLimits)
    drain_timeout: float = 10.0
    drain_grace: float = 5.0        # after SIGTERM: still accepting, every answer says close
    worker_index: int = 0
    node_id: str = ""


class Worker:
    """One worker: the composition root.  Builds the :class:`~meshproxy.runtime.Runtime` the
    request path reads, owns the listeners, the periodic sweep and the config swap."""

    def __init__(self, loop: asyncio.AbstractEventLoop, store: SnapshotStore, options: WorkerOptions,
                 telemetry: Telemetry, rng: random.Random | None = None,
                 clock: Callable[[], float] | None = None):
        self.loop = loop
        self.store = store
        self.options = options
        rng = rng or random.Random()
        # an x-request-id (UUIDv4) when tracing does not make one: compiled, from an IdSource
        # seeded by the worker's rng (an injected rng makes them repeat); pure Python, the rng
        ids = IdSource(rng.randbytes(32)) if HOT_PATH == "compiled" else rng
        codec, limits = options.codec, options.limits
        batch = SendBatch(loop)
        self.runtime = Runtime(
            loop, telemetry=telemetry, clusters=ClusterManager(clock=clock or time.monotonic, rng=rng),
            pools=UpstreamPools(loop, lambda handler: make_response_parser(codec, handler, limits), clock,
                                batch=batch),
            batch=batch, make_request_parser=lambda handler: make_request_parser(codec, handler, limits),
            rng=rng, clock=clock or time.monotonic, system_clock=clock is None,
            new_request_id=partial(random_uuid, ids))
        self.http_listeners: dict[tuple[str, int], HttpListener] = {}
        self.tcp_listeners: dict[tuple[str, int], TcpProxyListener] = {}
        self.capture_listeners: dict[tuple[str, int], "CaptureListener"] = {}   # capture mode (meshproxy.capture)
        self.runtime.pools.tls = UpstreamTlsContexts(lambda: self.certificates)
        self.telemetry.metrics.attach(self.runtime.pools.tls)
        self._sweeper: asyncio.TimerHandle | None = None
        self.trimmer = Trimmer()             # freed buffers go back to the system after a burst
        self._reconcile: asyncio.Task | None = None      # the running listener reconcile (one at a time)
        self._reconcile_again = False
        self.listen_errors: list[str] = []
        # the workload certificate manager (meshproxy.security.CertificateManager), set by the
        # composition root when the proxy has an identity; None = no workload certificate
        self.certificates = None
        telemetry.identity = self._own_identity      # source/destination_principal of mTLS connections
        store.subscribe(self._on_swap)

    def _own_identity(self) -> str:
        """This workload's SPIFFE id, from its current certificate ("" without one)."""
        certificates = self.certificates
        current = certificates.current if certificates is not None else None
        identity = getattr(current, "identity", None)
        return str(identity) if identity else ""

    # the parts tests and the admin read
    @property
    def telemetry(self) -> Telemetry:
        return self.runtime.telemetry

    @property
    def clusters(self) -> ClusterManager:
        return self.runtime.clusters

    @property
    def pools(self) -> UpstreamPools:
        return self.runtime.pools

    @property
    def batch(self) -> SendBatch:
        return self.runtime.batch

    @property
    def clock(self) -> Callable[[], float]:
        return self.runtime.clock

    @property
    def draining(self) -> bool:
        return self.runtime.draining

    @property
    def settings(self):
        return self.runtime.settings

    @property
    def splitter(self):
        return self.runtime.splitter

    @property
    def snapshot(self) -> Snapshot | None:
        return self.runtime.snapshot

    # ---------------------------------------------------------------- snapshot lifecycle

    def _changed_clusters(self, snapshot: Snapshot):
        """The clusters an endpoint patch changed (config/incremental.py), or None: rebuild all."""
        return self.store.changed_clusters if self.store.current is snapshot else None

    def _on_swap(self, new: Snapshot, old: Snapshot | None) -> None:
        # runs synchronously inside SnapshotStore.swap: requests that already read the
        # old snapshot keep it; the next request reads the new one.
        self.runtime.install(new, self._changed_clusters(new))
        if self._sweeper is not None and not self.runtime.draining:    # started: bring listeners in line
            if self._reconcile is None:
                self._reconcile = self.loop.create_task(self._reconcile_until_current())
            else:
                self._reconcile_again = True      # the running one goes round once more

    async def _reconcile_until_current(self) -> None:
        try:
            while True:
                self._reconcile_again = False
                await self.reconcile_listeners()
                if not self._reconcile_again:
                    return
        except Exception:
            log.exception("reconciling listeners failed")
        finally:
            if self._reconcile is asyncio.current_task():
                self._reconcile = None

    async def start(self) -> None:
        snapshot = self.store.current
        if snapshot is None:
            raise RuntimeError("no config loaded")
        self.runtime.install(snapshot, self._changed_clusters(snapshot))
        await self.reconcile_listeners()
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    async def reconcile_listeners(self) -> None:
        """Open listeners the snapshot declares, drain those it no longer does."""
        snapshot = self.store.current
        wanted: dict[tuple[str, int], Listener] = {(l.address, l.port): l for l in snapshot.listeners}
        for key, listener in list(self.http_listeners.items()):
            model = wanted.get(key)
            if model is None or model.protocol not in ("HTTP", "HTTPS") or (model.tls is None) != (listener.tls is None):
                listener.drain()
                del self.http_listeners[key]
            else:
                listener.update(model)
        for key, tcp in list(self.tcp_listeners.items()):
            model = wanted.get(key)
            if model is None or model.protocol != "TCP" or (model.tls is None) != (tcp.tls is None):
                tcp.stop_accepting()
                del self.tcp_listeners[key]
            else:
                tcp.model = model
                if tcp.tls is not None:
                    tcp.tls.update(model.tls)
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
                tls = self._gateway_tls(model) if model.protocol == "HTTPS" and model.tls is not None else None
                listener = HttpListener(self.runtime, model, sock, DownstreamConnection,
                                        acceptor=partial(inbound_acceptor, self), tls=tls)
                if model.mtls:
                    listener.tls_passthrough = self._app_passthrough(listener)
                await listener.start()
                self.http_listeners[key] = listener
            elif model.protocol == "TCP":
                tcp = self._tcp_listener(model)
                if model.mtls:
                    # inbound: its PeerAuthentication decides per connection (mTLS or plaintext)
                    tcp.server = inbound_acceptor(self, model.name, sock, tcp.protocol_factory,
                                                  lambda: tcp.model.mtls, (), tcp=True)
                elif model.tls is not None:
                    # a gateway TLS server in front of TCP routes: terminated, then proxied as TCP
                    tcp.tls = self._gateway_tls(model)
                    accept = TerminatingAcceptor(
                        self.loop, tcp.tls, tcp.protocol_factory,
                        lambda reason, name=model.name: self.telemetry.handshake_failed(name, reason),
                        handshake_timeout=self.settings.header_read_timeout)
                    tcp.server = await self.loop.create_server(accept, sock=sock, backlog=1024)
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

    def _gateway_tls(self, model: Listener) -> GatewayTls:
        """A gateway listener's TLS: its servers' certificates (files, Secrets, or the workload
        certificate for ISTIO_MUTUAL), swapped in place by later snapshots."""
        return GatewayTls(model.tls, lambda: self.certificates,
                          on_failure=lambda reason: self.telemetry.handshake_failed(model.name, reason),
                          loop_tls=model.protocol == "HTTPS")

    def inbound_tls_context(self, alpn: tuple[str, ...], client_cert: str) -> ssl.SSLContext | None:
        """The workload's mTLS server context for inbound listeners (None: no certificate)."""
        certificates = self.certificates
        if certificates is None or certificates.current is None:
            return None
        return certificates.server_context(alpn=alpn, client_cert=client_cert)

    def _app_passthrough(self, http: HttpListener) -> TcpProxyListener:
        """An inbound HTTP port's splice to the application, for TLS that is not Istio's on a
        PERMISSIVE port (the app terminates TLS itself: Istio's passthrough filter chain
        forwards it as TCP to the port's inbound cluster).  The application is the cluster
        the listener's routes send to; its connections are reported like an inbound TCP
        listener's, under the HTTP listener's name."""
        runtime = self.runtime
        settings = runtime.settings

        def pick_upstream(transport=None, sni=None):
            snapshot = runtime.snapshot
            table = snapshot.route_tables.get(http.route_table) if snapshot is not None else None
            dest = _first_destination(table)
            if dest is None:
                return None
            cluster = runtime.clusters.get(dest.cluster) if dest.cluster else None
            endpoint = cluster.pick() if cluster is not None else None
            if endpoint is None:
                return None, 0, None, None, dest
            return endpoint.address, endpoint.port, None, cluster.cluster.policy.connection_pool, dest

        def admit(transport) -> bool:
            # the workload's AuthorizationPolicies, with TCP semantics (Istio's passthrough chain has
            # the network RBAC filter): HTTP-only rules do not allow, and deny as Istio says
            return self._admit_tcp(http.authz, http.name, transport)

        return TcpProxyListener(
            self.loop, pick_upstream, connect_timeout=settings.upstream_connect_timeout, admit=admit,
            idle_timeout=settings.tcp_idle_timeout, on_open=self.telemetry.tcp_opened(http.model),
            on_close=self.telemetry.tcp_closed(http.model), model=http.model,
            max_connections=settings.max_connections_per_listener,
            on_overflow=lambda: self.telemetry.downstream_overflow(http.name))

    def _admit_tcp(self, authz, listener: str, transport) -> bool:
        """A TCP connection against the listener's AuthorizationPolicies: the decision counted,
        a denied connection logged."""
        if authz is None:
            return True
        decision = authorize_connection(authz, transport.get_extra_info)
        self.telemetry.authz_decision(listener, decision, "tcp")
        if not decision.allowed:
            self.telemetry.tcp_denied(transport, decision.details)
        return decision.allowed

    def _tcp_listener(self, model: Listener) -> TcpProxyListener:
        runtime = self.runtime
        settings = runtime.settings

        def current_model() -> Listener:
            listener = self.tcp_listeners_by_name.get(model.name)
            return listener.model if listener else model

        def pick_upstream(transport=None, sni: str | None = None):
            current = current_model()
            routes = current.tcp_routes
            if sni is not None:     # Gateway PASSTHROUGH: the routes whose sniHosts take the SNI
                routes = [r for r in routes if sni_matches(r.sni_hosts, sni)]
            elif current.tls is not None:
                # Gateway TLS terminated here: tls routes whose sniHosts take the handshake's SNI, tcp routes
                sni = requested_server_name(transport.get_extra_info("ssl_object")) if transport is not None else ""
                routes = [r for r in routes if not r.sni_hosts or sni_matches(r.sni_hosts, sni)]
            # the first of them whose destinationSubnets / sourceSubnet take the connection
            route = select_tcp_route(routes, *connection_addresses(transport))
            if route is None:
                return None
            dest = runtime.splitter.pick_tcp(route)
            if dest is None:
                return None
            cluster = runtime.clusters.get(dest.cluster) if dest.cluster else None
            endpoint = cluster.pick() if cluster is not None else None
            if endpoint is None:
                return None, 0, None, None, dest          # the chosen destination, for telemetry
            return endpoint.address, endpoint.port, endpoint_tls(cluster.cluster.policy, endpoint), \
                cluster.cluster.policy.connection_pool, dest

        def admit(transport) -> bool:
            return self._admit_tcp(current_model().authz, model.name, transport)

        return TcpProxyListener(
            self.loop, pick_upstream, connect_timeout=settings.upstream_connect_timeout, admit=admit,
            idle_timeout=settings.tcp_idle_timeout, on_open=self.telemetry.tcp_opened(model),
            on_close=self.telemetry.tcp_closed(model), model=model,
            max_connections=settings.max_connections_per_listener,
            on_overflow=lambda: self.telemetry.downstream_overflow(model.name), upstream_tls=self.pools.tls,
            sni_routing=lambda: current_model().tls is None and any(r.sni_hosts for r in current_model().tcp_routes))

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
        listeners += [h.tls_passthrough for h in self.http_listeners.values() if h.tls_passthrough is not None]
        for capture in self.capture_listeners.values():
            listeners += capture.tcp_listeners()
        return listeners

    def _sweep(self) -> None:
        now = self.clock()
        for listener in self.all_http_listeners():
            listener.sweep(now)
        self.pools.sweep(60.0)
        self.telemetry.flush()
        listeners = self.all_http_listeners()
        self.trimmer.observe(sum(l.active for l in listeners), sum(l.take_most() for l in listeners))
        if not self.runtime.draining:
            self._sweeper = self.loop.call_later(1.0, self._sweep)

    @property
    def ready(self) -> bool:
        return (not self.runtime.draining and self.store.current is not None and self._sweeper is not None
                and not self.listen_errors)

    # ---------------------------------------------------------------- drain

    def _open_connections(self) -> int:
        return (sum(l.active for l in self.all_http_listeners())
                + sum(t.active for t in self.all_tcp_listeners()))

    async def drain(self, timeout: float | None = None, grace: float | None = None) -> bool:
        """Graceful shutdown within ``timeout`` (default ``drain_timeout``).

        First a grace period (default ``drain_grace``, Istio's terminationDrainDuration):
        readiness fails, listeners keep accepting and serving, and every response carries
        ``Connection: close``, so clients move to other endpoints without a request lost on
        a connection closed under them.  It ends early once no connection is open.  Then
        listeners stop accepting, idle connections close, and the responses in flight
        finish.  Returns True when every connection finished within the deadline."""
        self.runtime.draining = True
        self.telemetry.set_draining(True)
        task, self._reconcile = self._reconcile, None
        if task is not None:
            task.cancel()
        now = self.clock()
        deadline = now + (timeout if timeout is not None else self.options.drain_timeout)
        grace_end = min(deadline, now + (grace if grace is not None else self.options.drain_grace))
        while self.clock() < grace_end and self._open_connections():
            # our own idle upstream connections close (peers draining at the same time then
            # see theirs go and end their grace early); those in use stay pooled
            self.pools.sweep(0.5)
            await asyncio.sleep(0.05)
        for listener in self.http_listeners.values():
            listener.drain()
        for tcp in self.tcp_listeners.values():
            tcp.stop_accepting()
        for capture in self.capture_listeners.values():
            capture.drain()
        while self.clock() < deadline:
            if not self._open_connections():
                break
            for listener in self.all_http_listeners():
                for conn in list(listener.connections):
                    conn.check_timeouts(self.clock())
                    if conn.exchange is None and conn.state == IDLE:
                        conn.close()         # a head already arriving is let finish
            await asyncio.sleep(0.05)
        clean = sum(l.active for l in self.all_http_listeners()) == 0
        for listener in self.all_http_listeners():
            for conn in list(listener.connections):
                conn.abort()
        remaining = max(0.0, deadline - self.clock())
        for tcp in self.all_tcp_listeners():
            await tcp.close(remaining)
        for tunnel in list(self.runtime.tunnels):
            tunnel.abort()
        for task in list(self.runtime.mirror_tasks):
            task.cancel()
        self.pools.close()
        return clean


def _first_destination(table):
    """Where an inbound route table sends (its default virtual host's, else its first virtual
    host's, first route's first destination): the application's cluster."""
    if table is None:
        return None
    hosts = [table.default] if table.default is not None else []
    hosts += list(table.exact.values()) + [vh for _, vh in table.wildcards]
    for vh in hosts:
        for route in vh.routes:
            for dest in route.destinations or ():
                return dest
    return None
