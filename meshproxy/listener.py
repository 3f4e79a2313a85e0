"""Binding, accepting and owning connections.  Knows no HTTP beyond which protocol
factory to hand accepted sockets to.

Sockets are bound with SO_REUSEPORT so that several worker processes can each bind
the same address and let the kernel spread connections between them.
"""
from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, Callable

from .config.model import Listener
from .downstream.tls import ClientCertificateGate, GatewayTls
from .security.authz import AuthzRequest, Decision, PeerInfo, evaluate, peer_from_transport
from .security.inbound import PeerAuthAcceptor

if TYPE_CHECKING:
    from .bootstrap import Worker
    from .runtime import Runtime


def bind_socket(address: str, port: int, backlog: int = 1024, reuse_port: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def inbound_acceptor(worker: "Worker", name: str, sock: socket.socket, factory, mode, alpn: tuple[str, ...],
                     passthrough_factory: Callable | None = None, tcp: bool = False) -> PeerAuthAcceptor:
    """A started :class:`PeerAuthAcceptor` for inbound listener ``name`` of ``worker``;
    ``mode()`` reads the port's current PeerAuthentication mode; ``passthrough_factory``
    takes the app's own TLS on a PERMISSIVE port; ``tcp``: a TCP port, whose mTLS
    half-closes (see :mod:`meshproxy.security.inbound`)."""
    acceptor = PeerAuthAcceptor(
        worker.loop, sock, factory, mode, lambda client_cert: worker.inbound_tls_context(alpn, client_cert),
        lambda reason: worker.telemetry.handshake_failed(name, reason),
        detect_timeout=worker.settings.header_read_timeout, handshake_timeout=worker.settings.header_read_timeout,
        passthrough_factory=passthrough_factory, half_close=(lambda conn: True) if tcp else None)
    acceptor.start()
    return acceptor


class HttpListener:
    """An HTTP (or TLS-terminated HTTPS) listener and the connections it accepted.

    ``protocol(runtime, listener)`` makes the driver of an accepted connection (the composition
    root passes :class:`~meshproxy.downstream.http_conn.DownstreamConnection`); ``acceptor``
    makes the PeerAuthentication acceptor of an inbound listener (see :func:`inbound_acceptor`,
    bound to the worker)."""

    # capture mode (meshproxy.capture): a Host that names no service falls back to this table's
    # default virtual host; PASSTHROUGH clusters connect to the connection's original destination
    fallback_table = ""
    original_dst: tuple[str, int] | None = None
    # an inbound port's TCP splice to the application for TLS that is not Istio's (PERMISSIVE),
    # a TcpProxyListener set by the composition root before start(); None: none
    tls_passthrough = None

    def __init__(self, runtime: "Runtime", model: Listener, sock: socket.socket | None, protocol: Callable,
                 ssl_context=None, acceptor: Callable | None = None, tls: GatewayTls | None = None):
        self.runtime = runtime
        self.protocol = protocol
        self.make_acceptor = acceptor
        self.model = model
        self.name = model.name
        self.route_table = model.route_table
        self.inbound = model.name.startswith("inbound")   # a sidecar's ingress: reports as the destination
        self.port = sock.getsockname()[1] if sock is not None else model.port   # None: a capture view
        self.tls = tls                   # a gateway's TLS servers (their certificates follow update())
        if tls is not None:
            ssl_context = tls.front
        self.scheme = "https" if ssl_context is not None else "http"
        self.sock = sock
        self.ssl_context = ssl_context
        self.connections: set = set()
        self.most = 0                    # the most connections open at once since take_most()
        self.server: asyncio.AbstractServer | None = None
        self.max_connections = runtime.settings.max_connections_per_listener
        self.rejected_connections = 0
        self.authz = model.authz         # the workload's AuthorizationPolicies (PolicySet) or None
        self.peers: dict = {}                   # connection -> PeerInfo   # read once per connection, when asked
        self.acceptor: PeerAuthAcceptor | None = None

    async def start(self) -> None:
        runtime, protocol = self.runtime, self.protocol
        if self.model.mtls:
            # an inbound listener: its PeerAuthentication decides per connection (mTLS or plaintext)
            passthrough = self.tls_passthrough
            self.acceptor = self.make_acceptor(self.name, self.sock, lambda: protocol(runtime, self),
                                               lambda: self.model.mtls, ("http/1.1",),
                                               passthrough.protocol_factory if passthrough is not None else None)
            self.server = self.acceptor
            return
        factory = lambda: protocol(runtime, self)
        if self.tls is not None:
            # client certificates are checked before the HTTP connection exists
            refused = lambda reason: runtime.telemetry.handshake_failed(self.name, reason)
            factory = lambda: ClientCertificateGate(lambda: protocol(runtime, self), refused)
        extra = {"ssl_handshake_timeout": runtime.settings.header_read_timeout} if self.ssl_context else {}
        self.server = await runtime.loop.create_server(factory, sock=self.sock, ssl=self.ssl_context, backlog=1024,
                                                       **extra)

    def update(self, model: Listener) -> None:
        """Same address, new config: the route table name and (a gateway's) TLS servers change in
        place; open connections keep the certificate they started with."""
        self.model = model
        self.route_table = model.route_table
        if self.tls is not None and model.tls is not None:
            self.tls.update(model.tls)
        self.authz = model.authz

    def connection_opened(self, conn) -> bool:
        """False: the listener is full and the connection was refused (aborted)."""
        if len(self.connections) >= self.max_connections:
            self.rejected_connections += 1
            self.runtime.telemetry.downstream_overflow(self.name)
            conn.closed = True
            conn.transport.abort()
            return False
        self.connections.add(conn)
        if len(self.connections) > self.most:
            self.most = len(self.connections)
        self.runtime.telemetry.downstream_opened(self.name)
        return True

    def connection_closed(self, conn) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.runtime.telemetry.downstream_closed(self.name)
        self.peers.pop(conn, None)

    def peer(self, conn) -> PeerInfo:
        """Who is on the other end of ``conn`` (address, verified SPIFFE id), read once."""
        info = self.peers.get(conn)
        if info is None:
            info = peer_from_transport(conn.transport.get_extra_info)
            self.peers[conn] = info
        return info

    def authorize(self, conn, view) -> Decision:
        """The AuthorizationPolicy decision for one request (``view``: a RequestView)."""
        peer = self.peer(conn)
        decision = evaluate(self.authz, AuthzRequest(
            source_ip=peer.source_ip, destination_port=self.port, principal=peer.principal,
            destination_ip=peer.destination_ip, sni=peer.sni, http=True, host=view.authority,
            method=view.method, path=view.path, headers=view.headers))
        self.runtime.telemetry.authz_decision(self.name, decision)
        return decision

    def sweep(self, now: float) -> None:
        for conn in list(self.connections):
            conn.check_timeouts(now)

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    def drain(self) -> None:
        self.stop_accepting()
        for conn in list(self.connections):
            conn.drain()

    @property
    def active(self) -> int:
        return len(self.connections)

    def take_most(self) -> int:
        """The most connections that were open at once since the last call (a burst that came
        and went between two calls counts), then start again from those open now."""
        most, self.most = self.most, len(self.connections)
        return most

    def clients_not_reading(self) -> int:
        """Connections whose client is not taking what it was sent (the write buffer is over its
        high-water mark, so their upstream reads are paused)."""
        return sum(1 for conn in self.connections if conn.write_paused)
