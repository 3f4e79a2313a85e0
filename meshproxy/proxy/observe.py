"""What the request path reports, and to whom.

:class:`Telemetry` is the one object the worker calls at the points of a request's
life that matter to observers (routed, response head, done, rejected, overflow,
retry, connections opened/closed).  It fans out to the Istio-standard metrics, the
tracer and the access log; tracing and the access log are optional, so the pipeline
never asks which of them are on.  Label handles are interned once per cluster.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from ..codec.api import field_names
from ..config.model import Cluster, Listener, Snapshot
from ..telemetry import AccessLog, PeerInfo, UNKNOWN_PEER
from ..telemetry.metrics import ProxyMetrics, workload_peer
from ..telemetry.peer_metadata import OVERFLOW, PeerMetadataExchange, metadata_value, namespace_of

# distinct peers (caller or destination metadata, per cluster) labelled by one worker; past it,
# a new peer's requests are counted without its metadata (rejected as too_many_peers)
MAX_LABELLED_PEERS = 4096


def peer_uri(transport) -> str:
    """The SPIFFE id of the verified peer of a TLS ``transport`` ("" if none or plaintext)."""
    if transport is None:
        return ""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return ""
    cert = ssl_object.getpeercert()
    uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"] if cert else []
    return uris[0] if len(uris) == 1 and uris[0].startswith("spiffe://") else ""

if TYPE_CHECKING:   # compiled, the attribute's type comes from observe.pxd (a cimport)
    from ..telemetry.tracing import ProxyTracer


def _service_peer(cluster: Cluster) -> PeerInfo:
    name, _, rest = cluster.service.partition(".")
    namespace = rest.split(".", 1)[0] if rest else cluster.namespace
    return workload_peer(cluster.labels, namespace, fallback_name=name, service=cluster.service)


class RequestInfo:
    """What telemetry reads about one request (Envoy's StreamInfo); the pipeline's Exchange is
    one, and fills these in as the request goes.  ``connection``: the downstream connection (its
    listener knows the peer's identity).  ``upstream_identity``: the SPIFFE id of the sidecar the
    request went to over mesh mutual TLS ("" otherwise); ``peer_metadata``: the peer metadata
    value that sidecar answered with (None without one)."""
    __slots__ = ("head", "connection", "client_ip", "scheme", "inbound", "status", "flags", "details", "route_name",
                 "destination", "upstream_identity", "peer_metadata",
                 "cluster", "endpoint", "attempts", "start_time", "upstream_start", "request_bytes",
                 "response_bytes", "trace")


class Telemetry:
    def __init__(self, metrics: ProxyMetrics | None = None, tracer: ProxyTracer | None = None,
                 access_log: AccessLog | None = None, source: PeerInfo = UNKNOWN_PEER,
                 reporter: str = "source", peer_exchange: PeerMetadataExchange | None = None):
        self.metrics = metrics if metrics is not None else ProxyMetrics()
        self.tracer = tracer
        self.access_log = access_log
        self.source = source
        self.reporter = reporter
        self._handles: dict[str, int] = {}
        # connection_security_policy: Istio reports "unknown" on every reporter="source" series
        self._policy = "unknown" if reporter == "source" else "none"
        self._unrouted = self.metrics.http_handle(reporter, source, UNKNOWN_PEER, security_policy=self._policy)
        # inbound (a sidecar's ingress listener): Istio's reporter="destination", this workload as destination
        self._inbound = self.metrics.http_handle("destination", UNKNOWN_PEER, self._own_service_peer(source))
        self._tcp_handles: dict[tuple, int] = {}
        # () -> this workload's SPIFFE id ("" without a certificate); set by the worker
        self.identity = None
        # inbound requests over mTLS: connection_security_policy="mutual_tls", per caller principal
        self._inbound_mtls: dict[str, int] = {}
        # Istio's peer metadata exchange (telemetry/peer_metadata.py); without this workload's own
        # metadata it still judges (and counts) what peers send, and sends nothing
        exchange = peer_exchange if peer_exchange is not None else PeerMetadataExchange(None, "")
        self.peer_exchange = exchange
        self.peer_request_block = exchange.request_block         # b"": nothing to send
        self.peer_response_fields = exchange.response_fields     # None: nothing to answer with
        self.metrics.attach(exchange)
        # (caller principal, metadata value) -> (handle, rejection reason or "")
        self._inbound_peers: dict[tuple, tuple] = {}
        # (cluster, destination SPIFFE id, metadata value) -> (handle, rejection reason or "")
        self._peer_handles: dict[tuple, tuple] = {}

    # ---------------------------------------------------------------- config

    def on_snapshot(self, snapshot: Snapshot) -> None:
        self._handles.clear()
        self._tcp_handles.clear()
        self._peer_handles.clear()
        self.metrics.declare_per("listener", [listener.name for listener in snapshot.listeners])
        self.metrics.config_applied(snapshot.version, True, time.time())

    def config_rejected(self, version: str) -> None:
        self.metrics.config_applied(version, False, time.time())

    def set_draining(self, draining: bool) -> None:
        self.metrics.set_draining(draining)

    @staticmethod
    def _own_service_peer(source: PeerInfo) -> PeerInfo:
        if source.app == "unknown":
            return source
        service = f"{source.app}.{source.namespace}.svc.cluster.local"
        return dataclasses.replace(source, service=service, service_name=source.app,
                                   service_namespace=source.namespace)

    def _handle(self, cluster: Cluster) -> int:
        handle = self._handles.get(cluster.name)
        if handle is None:
            handle = self._handles[cluster.name] = self.metrics.http_handle(
                self.reporter, self.source, _service_peer(cluster), security_policy=self._policy)
            # a cluster's counters exist at 0 from its first request on (not for every cluster
            # of a large mesh: that would be Envoy's stats bloat)
            self.metrics.declare_per("cluster", (cluster.name,))
        return handle

    # ---------------------------------------------------------------- requests

    def request_routed(self, exchange: "RequestInfo"):
        """The trace context of a routed request (None without a tracer)."""
        tracer = self.tracer
        if tracer is None:
            return None
        head = exchange.head
        kind = "server" if exchange.inbound else "client"
        return tracer.start(head.headers, kind, method=head.method, path=head.path, authority=head.host,
                            scheme=exchange.scheme, peer_address=exchange.client_ip, names=field_names(head))

    def exchange_done(self, exchange: "RequestInfo", now: float) -> None:
        cluster = exchange.cluster
        if exchange.inbound:
            handle = self._inbound_handle(exchange.connection, exchange.head)
        elif exchange.upstream_identity and cluster is not None:
            handle = self._mesh_handle(cluster.cluster, exchange.upstream_identity, exchange.peer_metadata)
        else:
            handle = self._handles.get(cluster.name) if cluster is not None else self._unrouted
            if handle is None:
                handle = self._handle(cluster.cluster)
        duration_ms = (now - exchange.start_time) * 1000.0
        self.metrics.record_http(handle, exchange.status, exchange.flags, duration_ms,
                                 exchange.request_bytes, exchange.response_bytes)
        trace = exchange.trace
        endpoint = exchange.endpoint
        if trace is not None and trace.sampled:
            self.tracer.finish(
                trace, exchange.status, route_name=exchange.route_name,
                upstream_cluster=cluster.name if cluster is not None else "",
                subset=(exchange.destination.subset or "") if exchange.destination is not None else "",
                upstream_address=endpoint.address if endpoint is not None else "",
                upstream_port=endpoint.port if endpoint is not None else 0,
                retries=max(0, exchange.attempts - 1), response_flags=exchange.flags)
        log = self.access_log
        if log is not None:
            head = exchange.head
            user_agent = b""
            request_id = b""
            for name, value in head.headers:
                if name == b"user-agent":
                    user_agent = value
                elif name == b"x-request-id":
                    request_id = value
            if trace is not None:
                request_id = trace.request_id
            down = exchange.connection
            peer = down.listener.peer(down).spiffe_id if down is not None else ""
            details = exchange.details or ("via_upstream" if endpoint is not None and exchange.flags == "-" else "")
            log.log(time.time() - duration_ms / 1000.0, head.method, head.path, "HTTP/" + head.version.decode(),
                    exchange.status, exchange.flags, exchange.request_bytes, exchange.response_bytes, duration_ms,
                    f"{endpoint.address}:{endpoint.port}" if endpoint is not None else "",
                    (now - exchange.upstream_start) * 1000.0 if exchange.upstream_start else None,
                    request_id, trace.trace_id if trace is not None else b"", exchange.route_name, user_agent,
                    exchange.client_ip, head.host, cluster.name if cluster is not None else "", details, peer)

    def rejected(self, reason: str, status: int) -> None:
        self.metrics.rejected(reason)

    def _inbound_handle(self, down, head) -> int:
        """Istio's labels for a request this workload served: ``mutual_tls`` and the caller's
        ``source_principal`` and namespace (from its certificate; this workload's principal as
        ``destination_principal``) when it came over mTLS, ``none`` otherwise; the caller's
        workload labels when it sent peer metadata that is believed (``peer_metadata.py``)."""
        peer = down.listener.peer(down)
        value = metadata_value(head)
        if value is not None:
            key = (peer.principal, value)
            entry = self._inbound_peers.get(key)
            if entry is None:
                entry = self._inbound_peer(peer, value)
                if len(self._inbound_peers) < MAX_LABELLED_PEERS:
                    self._inbound_peers[key] = entry
            if entry[1]:
                self.peer_exchange.rejected("request", entry[1])
            return entry[0]
        if not peer.mutual_tls:
            return self._inbound
        handle = self._inbound_mtls.get(peer.principal)
        if handle is None:
            handle = self._inbound_mtls[peer.principal] = self._caller_handle(
                replace(UNKNOWN_PEER, principal=peer.spiffe_id or "unknown",
                        namespace=namespace_of(peer.spiffe_id) or "unknown"))
        return handle

    def _caller_handle(self, source: PeerInfo) -> int:
        own = replace(self._own_service_peer(self.source), principal=self.own_principal())
        return self.metrics.http_handle("destination", source, own, security_policy="mutual_tls")

    def _inbound_peer(self, peer, value: bytes) -> tuple:
        """(handle, rejection reason) for a caller that sent peer metadata ``value``."""
        verdict = self.peer_exchange.judge(value, peer.spiffe_id if peer.mutual_tls else "")
        if isinstance(verdict, str):
            if not peer.mutual_tls:
                return self._inbound, verdict
            return self._caller_handle(replace(UNKNOWN_PEER, principal=peer.spiffe_id or "unknown",
                                               namespace=namespace_of(peer.spiffe_id) or "unknown")), verdict
        if len(self._inbound_peers) >= MAX_LABELLED_PEERS:
            return self._caller_handle(replace(UNKNOWN_PEER, principal=verdict.principal,
                                               namespace=verdict.namespace)), OVERFLOW
        return self._caller_handle(verdict), ""

    def _mesh_handle(self, cluster: Cluster, identity: str, value) -> int:
        """Istio's labels for a request sent over mesh mutual TLS to the sidecar ``identity``:
        this workload's principal as ``source_principal``, the server's as
        ``destination_principal``, and the destination workload's labels from the peer metadata it
        answered with ``value`` when that is believed (else the service's, as without it)."""
        key = (cluster.name, identity, value)
        entry = self._peer_handles.get(key)
        if entry is None:
            entry = self._destination_peer(cluster, identity, value)
            if len(self._peer_handles) < MAX_LABELLED_PEERS:
                self._peer_handles[key] = entry
        if entry[1]:
            self.peer_exchange.rejected("response", entry[1])
        return entry[0]

    def _destination_peer(self, cluster: Cluster, identity: str, value) -> tuple:
        service = _service_peer(cluster)
        verdict = self.peer_exchange.judge(value, identity) if value is not None else ""
        if not isinstance(verdict, str) and len(self._peer_handles) >= MAX_LABELLED_PEERS:
            verdict = OVERFLOW
        if isinstance(verdict, str):
            destination = replace(service, principal=identity, namespace=namespace_of(identity) or service.namespace)
        else:
            destination = replace(verdict, service=service.service, service_name=service.service_name,
                                  service_namespace=service.service_namespace)
        source = replace(self.source, principal=self.own_principal())
        handle = self.metrics.http_handle(self.reporter, source, destination, security_policy=self._policy)
        self.metrics.declare_per("cluster", (cluster.name,))
        return handle, verdict if isinstance(verdict, str) else ""

    def authz_decision(self, listener: str, decision, protocol: str = "http") -> None:
        """An AuthorizationPolicy decision (``meshproxy.security.authz.Decision``)."""
        metrics = self.metrics
        metrics.inc("meshproxy_authz_decisions_total",
                    (listener, protocol, "allowed" if decision.allowed else "denied", decision.policy))
        for name in decision.audit:
            metrics.inc("meshproxy_authz_decisions_total", (listener, protocol, "audit", name))
        for line in decision.dry_run:
            metrics.inc("meshproxy_authz_decisions_total", (listener, protocol, "dry_run", line.split(" ")[1]))

    def handshake_failed(self, listener: str, reason: str) -> None:
        self.metrics.inc("meshproxy_tls_handshake_failures_total", (listener, reason))

    def overflow(self, cluster: str) -> None:
        self.metrics.pool_overflow(cluster)

    def connection_overflow(self, cluster: str) -> None:
        self.metrics.inc("meshproxy_upstream_cx_overflow_total", (cluster,))

    def retry(self, cluster: str) -> None:
        self.metrics.retry(cluster)

    def retry_overflow(self, cluster: str) -> None:
        self.metrics.retry_budget_exhausted(cluster)

    def mirror_dropped(self) -> None:
        self.metrics.inc("meshproxy_mirror_dropped_total") if "meshproxy_mirror_dropped_total" in \
            getattr(self.metrics, "families", {}) else None

    # ---------------------------------------------------------------- connections

    def downstream_opened(self, listener: str) -> None:
        self.metrics.downstream_cx_opened(listener)

    def downstream_closed(self, listener: str) -> None:
        self.metrics.downstream_cx_closed(listener)

    def downstream_overflow(self, listener: str) -> None:
        self.metrics.downstream_cx_overflow(listener)

    def upstream_cx_opened(self, cluster: str) -> None:
        self.metrics.upstream_cx_opened(cluster)

    def upstream_cx_closed(self, cluster: str) -> None:
        self.metrics.upstream_cx_closed(cluster)

    def connect_failed(self, cluster: str) -> None:
        self.metrics.upstream_cx_connect_failed(cluster)

    def tcp_opened(self, listener: Listener):
        def opened(conn) -> None:
            conn.tag = handle = self._tcp_handle(listener, conn)
            self.metrics.record_tcp_open(handle)
        return opened

    def tcp_closed(self, listener: Listener):
        def closed(conn, sent: int, received: int) -> None:
            handle = conn.tag if conn is not None and conn.tag is not None else self._tcp_handle(listener, conn)
            self.metrics.record_tcp_close(handle, sent, received)
            if self.access_log is not None and conn is not None:
                self._log_tcp(conn, sent, received)
        return closed

    def tcp_denied(self, transport, details: str) -> None:
        """The access-log line of a TCP connection AuthorizationPolicy closed when it was accepted
        (Envoy's network RBAC: no response flag, no upstream; why in the details)."""
        log = self.access_log
        if log is None:
            return
        peer = transport.get_extra_info("peername") if transport is not None else None
        log.log(time.time(), b"", b"", "", 0, "-", 0, 0, 0.0, "", None, b"", b"", "", b"", peer[0] if peer else "",
                b"", "", details, peer_uri(transport))

    def _log_tcp(self, conn, sent: int, received: int) -> None:
        """One access-log line per TCP connection (a ``TcpProxyProtocol``), with the HTTP
        line's fields where they apply, as Envoy's TCP proxy logs: no method, path, protocol
        or response code (0); ``bytes_received`` from the downstream, ``bytes_sent`` to it."""
        now = time.time()
        transport = conn.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        dest = conn.destination
        started = conn.started or now
        self.access_log.log(started, b"", b"", "", 0, conn.flags, sent, received, (now - started) * 1000.0,
                            conn.upstream_host, None, b"", b"", "", b"", peer[0] if peer else "", b"",
                            dest.cluster if dest is not None else "", "", peer_uri(transport))

    def _tcp_handle(self, listener: Listener, conn) -> int:
        """Istio's labels for one TCP connection (``conn``: a
        :class:`~meshproxy.downstream.tcp_proxy.TcpProxyProtocol`, its upstream connected or
        given up on).  A sidecar's inbound (Sidecar ingress, capture's virtualInbound, explicit
        ``--inbound-port``) reports as the destination: ``mutual_tls`` with the caller's and this
        workload's principals when the connection came over mTLS, ``none`` otherwise.  Anything
        else reports as the source, labelled by the destination its route chose (not the
        listener's first route: destinationSubnets and SNI pick among several), with this
        workload's and the server's principals when the upstream connection is mTLS;
        ``connection_security_policy`` is ``unknown`` on the source side, as in Istio."""
        transport = conn.transport if conn is not None else None
        if listener.name.startswith("inbound"):
            peer = peer_uri(transport)
            key = ("inbound", listener.name, peer)
            handle = self._tcp_handles.get(key)
            if handle is None:
                own = self._own_service_peer(self.source)
                if peer:
                    handle = self.metrics.tcp_handle(
                        "destination", replace(UNKNOWN_PEER, principal=peer),
                        replace(own, principal=self.own_principal()), security_policy="mutual_tls")
                else:
                    handle = self.metrics.tcp_handle("destination", UNKNOWN_PEER, own)
                self._tcp_handles[key] = handle
            return handle
        dest = conn.destination if conn is not None else None
        host = dest.host if dest is not None else "unknown"
        server = peer_uri(conn.upstream) if conn is not None else ""
        key = (host, server)
        handle = self._tcp_handles.get(key)
        if handle is None:
            name, _, rest = host.partition(".")
            destination = PeerInfo(service=host, service_name=name, app=name,
                                   service_namespace=rest.split(".", 1)[0] if rest else "unknown",
                                   principal=server or "unknown")
            source = replace(self.source, principal=self.own_principal()) if server else self.source
            handle = self._tcp_handles[key] = self.metrics.tcp_handle(self.reporter, source, destination,
                                                                      security_policy=self._policy)
        return handle

    def own_principal(self) -> str:
        """This workload's SPIFFE id (its certificate's), or ``unknown``."""
        identity = self.identity
        return (identity() if identity is not None else "") or "unknown"

    # ---------------------------------------------------------------- housekeeping

    def flush(self) -> None:
        if self.access_log is not None:
            self.access_log.flush()

    def close(self) -> None:
        self.flush()
        if self.tracer is not None and self.tracer.export is not None:
            self.tracer.export.shutdown()
