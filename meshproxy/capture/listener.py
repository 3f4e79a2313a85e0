"""The capture listeners: ``virtualOutbound`` (15001) and ``virtualInbound`` (15006).

Life of a captured connection:

1. accept (``loop.create_server``; one :class:`_Deciding` protocol per connection);
2. original destination (``SO_ORIGINAL_DST``); a connection that was not redirected (someone
   dialled the capture port itself) has none and is reset: proxying it would loop;
3. target (:mod:`meshproxy.config.capture`): outbound by (VIP, port), inbound by port; unknown
   outbound destinations follow ``outboundTrafficPolicy`` (Passthrough/BlackHole);
4. protocol: the target's declared one at once, or sniffed from the first bytes
   (:mod:`.sniff`) within the detection timeout (then TCP);
5. hand-over: the transport is given to the HTTP connection driver
   (:class:`~meshproxy.downstream.http_conn.DownstreamConnection`, the full L7 pipeline) or to
   the L4 proxy (:class:`~meshproxy.downstream.tcp_proxy.TcpProxyProtocol`), with any bytes
   read while sniffing, through a *view*: an HTTP or TCP listener object without a socket of
   its own that carries what the request path needs (route table, fallback table, original
   destination, metrics name).  Views are owned here; the worker drains them with its own
   listeners.

mTLS: captured outbound TCP originates the TLS the HTTP path would (the DestinationRule's,
else auto mTLS to an endpoint with a sidecar whose PeerAuthentication is not DISABLE; the
server's SPIFFE id checked), on a TLS transport that half-closes; the inbound side terminates
mTLS before step 2 (:class:`~meshproxy.security.inbound.PeerAuthAcceptor`), on that transport
too when the port is not declared HTTP, so a close_notify is a half-close there as well.

The sidecar's own upstream connections are not captured again: ``pod-init`` exempts the proxy's
uid, and inbound forwards to the application on 127.0.0.1 (never the pod address, which the
rules would send back to 15006).
"""
from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import replace
from typing import TYPE_CHECKING

from ..config.capture import CaptureTarget, InboundCapture, OutboundCapture
from ..config.model import Listener, endpoint_tls
from ..downstream.splice import reset_transport
from ..downstream.tcp_proxy import TcpProxyListener, connection_addresses
from ..listener import HttpListener
from ..router.tcp import select_tcp_route
from ..security.authz import authorize_connection
from ..security.inbound import PeerAuthAcceptor
from .original_dst import NoOriginalDestination, original_destination
from .sniff import MAX_SNIFF_BYTES, classify

if TYPE_CHECKING:
    from ..bootstrap import Worker

log = logging.getLogger("meshproxy.capture")


class _Deciding(asyncio.Protocol):
    """A captured connection until it knows where it goes and which protocol it speaks."""

    __slots__ = ("capture", "transport", "dst", "target", "buffer", "eof", "timer", "done", "tls_passthrough")

    def __init__(self, capture: "CaptureListener", tls_passthrough: bool = False):
        self.capture = capture
        # the app's own TLS on a PERMISSIVE port (no Istio ALPN): spliced as TCP whatever the
        # port's protocol, the bytes unchanged (Istio's passthrough filter chain)
        self.tls_passthrough = tls_passthrough
        self.transport = None
        self.dst = None
        self.target: CaptureTarget | None = None
        self.buffer = b""
        self.eof = False
        self.timer = None
        self.done = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        capture = self.capture
        try:
            self.dst = original_destination(transport.get_extra_info("socket"))
        except NoOriginalDestination as err:
            capture.not_redirected += 1
            log.debug("%s: %s; reset", capture.name, err)
            self.done = True
            reset_transport(transport)
            return
        self.target = capture.target_for(self.dst)
        if self.tls_passthrough:
            self._dispatch("TCP")
        elif self.target.protocol == "SNIFF":
            capture.deciding.add(self)
            self.timer = capture.worker.loop.call_later(capture.detection_timeout, self._dispatch, "TCP")
        else:
            self._dispatch(self.target.protocol)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.buffer += data
        verdict = classify(self.buffer)
        if verdict is None and len(self.buffer) >= MAX_SNIFF_BYTES:
            verdict = "TCP"
        if verdict is not None:
            self._dispatch(verdict)

    def eof_received(self) -> bool:
        if not self.done:
            self.eof = True
            self._dispatch("TCP")       # nothing more will come: whatever it was, splice it
        return True

    def connection_lost(self, exc) -> None:
        if not self.done:
            self.done = True
            self._stop_waiting()

    def _stop_waiting(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.capture.deciding.discard(self)

    def _dispatch(self, protocol: str) -> None:
        if self.done:
            return
        self.done = True
        self._stop_waiting()
        capture, transport = self.capture, self.transport
        if capture.closed:
            reset_transport(transport)
            return
        if protocol == "HTTP":
            proto = capture.http_protocol(self.dst, self.target)
        else:
            proto = capture.tcp_protocol(self.dst, self.target)
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if self.buffer and not transport.is_closing():
            proto.data_received(self.buffer)
        if self.eof and not transport.is_closing():
            proto.eof_received()

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self._stop_waiting()
            reset_transport(self.transport)


class _HttpView(HttpListener):
    """An HTTP listener without a socket: the captured connections that share a route table
    (and, for passthrough, an original destination)."""

    def __init__(self, capture: "CaptureListener", key, model: Listener, fallback_table: str,
                 original_dst: tuple[str, int] | None):
        super().__init__(capture.worker.runtime, model, None, protocol=None)   # a view: accepts nothing itself
        self.capture = capture
        self.key = key
        self.fallback_table = fallback_table
        self.original_dst = original_dst

    def connection_closed(self, conn) -> None:
        super().connection_closed(conn)
        if self.original_dst is not None and not self.connections:
            self.capture.http_views.pop(self.key, None)


class CaptureListener:
    """One capture listener (outbound or inbound) and the views of the connections it accepted."""

    def __init__(self, worker: "Worker", model: Listener, sock: socket.socket):
        self.worker = worker
        self.model = model
        self.name = model.name
        self.outbound = model.protocol == "CAPTURE_OUTBOUND"
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.server: asyncio.AbstractServer | None = None
        self.deciding: set[_Deciding] = set()
        self.http_views: dict[tuple, _HttpView] = {}
        self.tcp_views: dict[tuple, TcpProxyListener] = {}
        self.not_redirected = 0
        self.closed = False

    @property
    def table(self) -> OutboundCapture | InboundCapture:
        return self.model.capture

    @property
    def detection_timeout(self) -> float:
        return self.table.detection_timeout

    async def start(self) -> None:
        if not self.outbound and self.table.mtls is not None:
            # inbound: the port's PeerAuthentication decides per connection (mTLS or plaintext) before
            # the original destination and the protocol are looked at (on the decrypted bytes)
            worker = self.worker
            self.server = PeerAuthAcceptor(
                worker.loop, self.sock, lambda: _Deciding(self), lambda: "PERMISSIVE",
                lambda client_cert: worker.inbound_tls_context((), client_cert),
                lambda reason: worker.telemetry.handshake_failed(self.name, reason),
                detect_timeout=self.detection_timeout, handshake_timeout=worker.settings.header_read_timeout,
                mode_for=self._mtls_mode, passthrough_factory=lambda: _Deciding(self, tls_passthrough=True),
                half_close=self._not_http)
            self.server.start()
            return
        self.server = await self.worker.loop.create_server(lambda: _Deciding(self), sock=self.sock, backlog=1024)

    def _mtls_mode(self, sock: socket.socket) -> str:
        """PeerAuthentication's mode for the port the connection was sent to (portLevelMtls keys
        are the workload's ports); not redirected: DISABLE (the connection is reset after)."""
        try:
            _, port = original_destination(sock)
        except NoOriginalDestination:
            return "DISABLE"
        return self.table.mtls.for_port(port)

    def _not_http(self, sock: socket.socket) -> bool:
        """mTLS to a port not declared HTTP (TCP, or sniffed after the handshake) half-closes."""
        try:
            dst = original_destination(sock)
        except NoOriginalDestination:
            return False
        return self.target_for(dst).protocol != "HTTP"

    def update(self, model: Listener) -> None:
        """A new snapshot: targets are looked up anew for each connection; views keep their route
        tables (looked up by name per request) and take the new AuthorizationPolicies."""
        self.model = model
        if not self.outbound:
            for view in self.http_views.values():
                view.update(replace(view.model, authz=model.capture.authz))

    # ------------------------------------------------------------ where a connection goes

    def target_for(self, dst: tuple[str, int]) -> CaptureTarget:
        table = self.table
        if self.outbound:
            target = table.targets.get(dst)
            if target is not None:
                return target
            protocol = "SNIFF" if dst[1] in table.http_ports else "TCP"
            return CaptureTarget(protocol, "", table.unknown_http_table, table.unknown_tcp)
        target = table.targets.get(dst[1])
        return target if target is not None else CaptureTarget("TCP", "", "", table.passthrough)

    def http_protocol(self, dst: tuple[str, int], target: CaptureTarget):
        from ..downstream.http_conn import DownstreamConnection

        if self.outbound:
            unknown = not target.service
            key = ("http", target.route_table, dst if unknown else None)
            view = self.http_views.get(key)
            if view is None:
                model = Listener(self.name, dst[0], dst[1], "HTTP", route_table=self.table.mesh_table)
                view = self.http_views[key] = _HttpView(self, key, model, target.route_table,
                                                        dst if unknown else None)
        else:
            key = ("http", target.route_table, None)
            view = self.http_views.get(key)
            if view is None:
                model = Listener(f"inbound_{dst[1]}", dst[0], dst[1], "HTTP", route_table=target.route_table,
                                 authz=self.table.authz)
                view = self.http_views[key] = _HttpView(self, key, model, "", None)
        return DownstreamConnection(self.worker.runtime, view)

    def tcp_protocol(self, dst: tuple[str, int], target: CaptureTarget):
        model = target.tcp
        if self.outbound:
            original = dst
        else:
            original = ("127.0.0.1", dst[1])       # the application, on loopback (never the pod address)
        passthrough = model is not None and _is_passthrough(self.worker, model)
        key = ("tcp", model.name if model is not None else "", original if passthrough else None)
        view = self.tcp_views.get(key)
        if view is None:
            view = self.tcp_views[key] = self._tcp_view(key, model, original if passthrough else None)
        else:
            view.model = model
        return view.protocol_factory()

    def _tcp_view(self, key, model: Listener, original: tuple[str, int] | None) -> TcpProxyListener:
        worker = self.worker
        settings = worker.settings
        telemetry = worker.telemetry
        closed_metric = telemetry.tcp_closed(model)

        def pick_upstream(transport=None, sni=None):
            current = view.model
            if current is None:
                return None
            # TCP route matches see the original destination and the client's address
            local, source = connection_addresses(transport)
            route = select_tcp_route(current.tcp_routes, original[0] if original else local, source)
            if route is None:
                return None
            dest = worker.splitter.pick_tcp(route)
            if dest is None:
                return None
            cluster = worker.clusters.get(dest.cluster) if dest.cluster else None
            if cluster is None:
                return None, 0, None, None, dest   # BlackHoleCluster: closed
            if cluster.passthrough:
                return original[0], original[1], None, None, dest
            endpoint = cluster.pick()
            if endpoint is None:
                return None, 0, None, None, dest
            # the DestinationRule's TLS, else auto mTLS to an endpoint with a sidecar (as HTTP decides it)
            policy = cluster.cluster.policy
            return endpoint.address, endpoint.port, endpoint_tls(policy, endpoint), policy.connection_pool, dest

        def on_close(conn, sent: int, received: int) -> None:
            closed_metric(conn, sent, received)
            if original is not None and not view.connections:
                self.tcp_views.pop(key, None)

        def admit(transport) -> bool:
            policies = view.model.authz if view.model is not None else None
            if self.outbound or policies is None:
                return True
            decision = authorize_connection(policies, transport.get_extra_info)
            telemetry.authz_decision(view.model.name, decision, "tcp")
            if not decision.allowed:
                telemetry.tcp_denied(transport, decision.details)
            return decision.allowed

        view = TcpProxyListener(
            worker.loop, pick_upstream, connect_timeout=settings.upstream_connect_timeout,
            idle_timeout=settings.tcp_idle_timeout, on_open=telemetry.tcp_opened(model), on_close=on_close,
            model=model, max_connections=settings.max_connections_per_listener,
            on_overflow=lambda: telemetry.downstream_overflow(model.name), admit=admit,
            upstream_tls=worker.pools.tls)
        return view

    # ------------------------------------------------------------ lifecycle

    def http_listeners(self) -> list[HttpListener]:
        return list(self.http_views.values())

    def tcp_listeners(self) -> list[TcpProxyListener]:
        return list(self.tcp_views.values())

    @property
    def active(self) -> int:
        return (len(self.deciding) + sum(v.active for v in self.http_views.values())
                + sum(v.active for v in self.tcp_views.values()))

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.deciding):
            conn.abort()

    def drain(self) -> None:
        self.stop_accepting()
        for view in list(self.http_views.values()):
            view.drain()

    def close(self) -> None:
        self.closed = True
        self.drain()


def _is_passthrough(worker: "Worker", model: Listener) -> bool:
    for route in model.tcp_routes[:1]:
        for dest in route.destinations:
            cluster = worker.clusters.get(dest.cluster) if dest.cluster else None
            if cluster is not None and cluster.passthrough:
                return True
    return False
