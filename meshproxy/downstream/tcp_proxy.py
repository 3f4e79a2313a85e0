"""L4 TCP proxy listener: accept, pick an upstream endpoint, connect, splice.

One accepted connection goes through:

1. ``connection_made``: ``admit(transport)`` (when set: the workload's AuthorizationPolicy)
   may refuse the connection, which is then closed without data; reading is paused (the client's first bytes wait in the kernel,
   or, if some were already delivered, in a bounded list), and a connect task owned by the
   connection starts.
2. connect: ``pick_upstream(transport, sni)`` -> ``(host, port[, tls, pool policy[, destination]])``
   (the transport's addresses and the SNI pick the route; ``destination``, what the route chose,
   is kept for telemetry; host None: the route chose a destination that has no endpoint);
   ``loop.create_connection`` under ``connect_timeout`` (with the TLS handshake and the
   server's identity check when the target originates TLS, on a half-closing
   :class:`~meshproxy.security.tls_transport.TlsTransport`). On failure (refused, timeout,
   other OSError) ``on_connect_failure(host, port, reason)`` is called and
   ``pick_upstream()`` is asked ONCE more; if it returns a different endpoint that one is
   tried, otherwise the client is closed.
   ``pick_upstream()`` returning None (no healthy endpoint) closes the client at once.
3. splice: both transports are handed to :class:`~meshproxy.downstream.splice.Splice`
   with whatever either side delivered early; from there on it is the splice's
   behaviour (backpressure, half-close, reset, idle timeout).
4. ``on_open(conn)`` once the upstream is connected (the route is chosen and the upstream's
   TLS, if any, verified: what telemetry labels the connection by), or when the connection
   ends before that; then ``on_close(conn, sent, received)`` exactly once per accepted
   connection, (0, 0) when no upstream was reached.  ``conn.tag`` is the owner's to keep
   what ``on_open`` computed; ``conn.started``, ``conn.flags`` (Envoy's response flags: NR,
   UH, UF) and ``conn.upstream_host`` are what the access log reads.

:class:`TcpProxyListener` owns every live connection (and through it the connect
task), so ``close(timeout)`` can wait for them and abort the rest.
"""
from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import time
from typing import Any, Callable

from ..security.client_hello import NEED_MORE, ClientHello, parse_client_hello
from ..security.tls_transport import TlsTransport
from ..upstream.socket_options import set_keepalive
from ..upstream.tls import UpstreamTlsContexts, UpstreamTlsError

from .splice import DEFAULT_HIGH_WATER, DEFAULT_LOW_WATER, Splice, reset_transport

PickUpstream = Callable[[asyncio.Transport], "tuple[str, int] | None"]   # given the accepted connection


def connection_addresses(transport: asyncio.Transport | None) -> tuple[str | None, str | None]:
    """(destination, source) addresses of an accepted connection: what TCP route matches
    (destinationSubnets, sourceSubnet) look at."""
    if transport is None:
        return None, None
    local, peer = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
    return (local[0] if isinstance(local, tuple) else None), (peer[0] if isinstance(peer, tuple) else None)

# failure reasons passed to on_connect_failure
CONNECT_TIMEOUT = "connect_timeout"
CONNECT_REFUSED = "connection_refused"
NO_UPSTREAM = "no_healthy_upstream"

# Envoy's response flags for a TCP proxy connection (the access log's)
NO_ROUTE_FOUND = "NR"
NO_HEALTHY_UPSTREAM = "UH"
UPSTREAM_CONNECTION_FAILURE = "UF"


class _PendingUpstream(asyncio.Protocol):
    """Protocol of an upstream connection until the splice takes it over: reading is
    paused at once; anything delivered anyway (bytes, EOF, loss) is kept for the
    handover."""

    __slots__ = ("transport", "chunks", "eof", "lost")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: list[bytes] = []
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class TcpProxyProtocol(asyncio.Protocol):
    """One accepted downstream connection, until it is spliced."""

    __slots__ = ("listener", "transport", "chunks", "eof", "lost", "task", "splice",
                 "pending", "_done", "sni", "_hello", "options", "deadline", "destination", "upstream",
                 "opened", "tag", "started", "flags", "upstream_host")

    def __init__(self, listener: "TcpProxyListener"):
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.chunks: list[bytes] = []      # bytes the client sent before the splice
        self.eof = False
        self.lost = False
        self.task: asyncio.Task | None = None
        self.splice: Splice | None = None
        self.pending: _PendingUpstream | None = None   # upstream being connected
        self._done = False
        self.sni: str | None = None        # SNI routing: the ClientHello's server name ("" = none)
        self._hello: asyncio.Future | None = None   # SNI routing: set when the first record is read
        self.options = None                # the cluster's ConnectionPoolPolicy, when the picker gives it
        self.deadline: asyncio.TimerHandle | None = None   # maxConnectionDuration
        self.destination = None            # what the route chose (the picker's 5th value), for telemetry
        self.upstream: asyncio.Transport | None = None     # the connected upstream (its TLS peer, if any)
        self.opened = False                # on_open called
        self.tag = None                    # the owner's (telemetry: the connection's metric handle)
        # for the access log: when it was accepted (Unix time), Envoy's response flags, the
        # upstream address last tried ("host:port", "" if none)
        self.started = 0.0
        self.flags = "-"
        self.upstream_host = ""

    # ------------------------------------------------------------ before the splice

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.started = time.time()
        transport.pause_reading()
        listener = self.listener
        if len(listener.connections) >= listener.max_connections:
            # at the listener's limit: reset at once, as Envoy's downstream_cx_overflow does;
            # the connection never counts as opened
            self._done = True
            listener.rejected_connections += 1
            if listener.on_overflow is not None:
                listener.on_overflow()
            reset_transport(transport)
            return
        if listener.admit is not None and not listener.admit(transport):
            # refused by policy (AuthorizationPolicy): closed without data, as Envoy's network RBAC
            self._done = True
            transport.close()
            return
        listener.connections.add(self)
        if listener.sni_routing is not None and listener.sni_routing():
            # Gateway PASSTHROUGH: read the ClientHello (bounded), route on its SNI, forward it untouched
            self._hello = listener.loop.create_future()
            transport.resume_reading()
        self.task = listener.loop.create_task(self._connect())

    def data_received(self, data: bytes) -> None:
        # reading is paused from the start; a chunk already on its way is kept, and
        # reading stays paused, so this holds at most a read or two (SNI routing: until
        # the first TLS record is complete, at most MAX_RECORD bytes)
        self.chunks.append(data)
        hello = self._hello
        if hello is not None and not hello.done():
            result = parse_client_hello(b"".join(self.chunks))
            if result == NEED_MORE:
                return
            hello.set_result(result.sni if isinstance(result, ClientHello) else "")
        self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        # only before the splice: afterwards the transport's protocol is the splice's
        self.lost = True
        self._drop_pending()
        self._finished(0, 0)

    def _drop_pending(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self._drop_pending_transport()

    def _drop_pending_transport(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None and pending.transport is not None:
            pending.transport.abort()

    # ------------------------------------------------------------ connect

    def _pick(self):
        listener = self.listener
        target = listener.pick_upstream(self.transport, self.sni)
        if target is not None and len(target) > 4:
            self.destination = target[4]
            if target[0] is None:
                return None                # the route's destination has no endpoint (or is a black hole)
        return target

    def _opened(self) -> None:
        if not self.opened:
            self.opened = True
            on_open = self.listener.on_open
            if on_open is not None:
                on_open(self)

    async def _connect(self) -> None:
        listener = self.listener
        if self._hello is not None:
            try:
                async with asyncio.timeout(listener.connect_timeout):
                    self.sni = await self._hello
            except TimeoutError:
                self.sni = ""
            self.transport.pause_reading()
        target = self._pick()
        if target is None:
            # no route took the connection, or its destination has no endpoint
            self.flags = NO_HEALTHY_UPSTREAM if self.destination is not None else NO_ROUTE_FOUND
            self._fail(None, NO_UPSTREAM)
            return
        up = await self._try(target)
        if up is None and not self.lost:
            second = self._pick()
            if second is not None and tuple(second) != tuple(target):
                up = await self._try(second)
        if self.lost:
            self._drop_pending_transport()
            return
        if up is None:
            self.flags = UPSTREAM_CONNECTION_FAILURE
            self.transport.close()
            return
        self._start_splice(up)

    async def _try(self, target: tuple) -> _PendingUpstream | None:
        """``target``: (host, port), then optionally the DestinationRule tls to originate and
        the cluster's connection pool policy (keepalive, idle timeout, max duration)."""
        listener = self.listener
        host, port = target[0], target[1]
        self.upstream_host = f"{host}:{port}"
        tls = target[2] if len(target) > 2 else None     # DestinationRule tls: originate TLS
        self.options = target[3] if len(target) > 3 else None
        pending = self.pending = _PendingUpstream()
        secure: TlsTransport | None = None
        try:
            async with asyncio.timeout(listener.connect_timeout):
                contexts = listener.upstream_tls
                if tls is not None:
                    sni = contexts.server_hostname(tls, host)
                    endpoint = (host, port, sni)
                    context = contexts.context(tls, endpoint)
                else:
                    context = None
                if context is None:
                    await listener.loop.create_connection(lambda: pending, host, port)
                else:
                    # TLS that half-closes (the event loop's cannot): see security/tls_transport.py
                    secure = TlsTransport(listener.loop, context, server_side=False, server_hostname=sni)
                    await listener.loop.create_connection(lambda: secure, host, port)
                    await secure.handshake
                    contexts.check_peer(tls, secure.get_extra_info("ssl_object"), endpoint)
                    secure.attach(pending)
        except asyncio.CancelledError:
            if secure is not None:
                secure.abort()
            raise
        except TimeoutError:
            reason = CONNECT_TIMEOUT
        except ConnectionRefusedError:
            reason = CONNECT_REFUSED
        except UpstreamTlsError as err:
            reason = f"tls: {err}"
        except ssl.SSLError as err:
            reason = f"tls handshake: {err.reason or err}"
        except OSError as err:
            reason = errno.errorcode.get(err.errno, type(err).__name__) if err.errno else type(err).__name__
        else:
            if self.options is not None and self.options.tcp_keepalive is not None:
                set_keepalive(pending.transport.get_extra_info("socket"), self.options.tcp_keepalive)
            return pending
        if secure is not None:
            secure.abort()
        self._drop_pending_transport()
        self._fail(target, reason)
        return None

    def _fail(self, target: tuple[str, int] | None, reason: str) -> None:
        listener = self.listener
        listener.connect_failures += 1
        if listener.on_connect_failure is not None:
            host, port = target if target is not None else ("", 0)
            listener.on_connect_failure(host, port, reason)
        if target is None and not self.lost:
            self.transport.close()

    def _start_splice(self, up: _PendingUpstream) -> None:
        listener = self.listener
        self.pending = None
        self.upstream = up.transport
        self._opened()
        options = self.options
        idle = listener.idle_timeout
        if options is not None and options.tcp_idle_timeout is not None:
            idle = options.tcp_idle_timeout or None          # 0s disables (Istio)
        self.splice = Splice(
            listener.loop, self.transport, up.transport, idle_timeout=idle,
            initial_to_upstream=b"".join(self.chunks), initial_to_downstream=b"".join(up.chunks),
            downstream_eof=self.eof, upstream_eof=up.eof, on_close=self._finished,
            high_water=listener.high_water, low_water=listener.low_water)
        self.chunks = []
        if up.lost:
            # closed between connect and now; the splice sees a closing transport
            up.transport.close()
        self.splice.start()
        if options is not None and options.max_connection_duration:
            self.deadline = listener.loop.call_later(options.max_connection_duration, self.splice.close)

    # ------------------------------------------------------------ end

    def _finished(self, sent: int, received: int) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if self._done:
            return
        self._done = True
        self._opened()
        self.listener._connection_done(self, sent, received)

    def abort(self) -> None:
        """Reset the client (and the upstream, if spliced) now."""
        self._drop_pending()
        if self.splice is not None:
            self.splice.abort()
        elif self.transport is not None and not self.lost:
            reset_transport(self.transport)


class TcpProxyListener:
    """The accepting side of a TCP proxy listener and the owner of its connections.

    ``listener.protocol_factory`` (or the listener itself, which is callable) is the
    protocol factory for ``loop.create_server``; or let ``start(sock)`` do it.
    ``model`` is an opaque value kept for the owner (its listener config).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, pick_upstream: PickUpstream,
                 connect_timeout: float, idle_timeout: float,
                 on_open: Callable[["TcpProxyProtocol"], None] | None = None,
                 on_close: Callable[["TcpProxyProtocol", int, int], None] | None = None,
                 on_connect_failure: Callable[[str, int, str], None] | None = None, *,
                 model: Any = None, high_water: int = DEFAULT_HIGH_WATER,
                 low_water: int = DEFAULT_LOW_WATER, max_connections: int = 2**31 - 1,
                 on_overflow: Callable[[], None] | None = None,
                 admit: Callable[[asyncio.Transport], bool] | None = None,
                 upstream_tls: UpstreamTlsContexts | None = None,
                 sni_routing: Callable[[], bool] | None = None):
        self.loop = loop
        self.pick_upstream = pick_upstream
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.on_open = on_open
        self.on_close = on_close
        self.on_connect_failure = on_connect_failure
        self.model = model
        self.high_water = high_water
        self.low_water = low_water
        self.connections: set[TcpProxyProtocol] = set()
        self.max_connections = max_connections      # open at once; more are reset on accept
        self.on_overflow = on_overflow
        self.admit = admit                          # None, or: may this accepted connection proceed?
        self.upstream_tls = upstream_tls or UpstreamTlsContexts()
        # None, or: does this listener route on the ClientHello's SNI (pick_upstream(sni))?
        self.sni_routing = sni_routing
        self.tls = None                             # a gateway's TLS servers (GatewayTls) when it terminates
        self.rejected_connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.connect_failures = 0
        self.total = 0
        self._idle_waiter: asyncio.Future | None = None

    def protocol_factory(self) -> TcpProxyProtocol:
        return TcpProxyProtocol(self)

    __call__ = protocol_factory

    @property
    def active(self) -> int:
        """Accepted connections not yet closed on both sides."""
        return len(self.connections)

    def splices(self) -> list[Splice]:
        return [c.splice for c in self.connections if c.splice is not None]

    async def start(self, sock: socket.socket, backlog: int = 1024) -> None:
        self.server = await self.loop.create_server(self.protocol_factory, sock=sock, backlog=backlog)

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    async def close(self, timeout: float) -> bool:
        """Stop accepting, wait up to ``timeout`` seconds for live connections to end
        on their own, then reset the rest. True when none had to be reset."""
        self.stop_accepting()
        if self.connections:
            self._idle_waiter = self.loop.create_future()
            try:
                async with asyncio.timeout(max(timeout, 0.0)):
                    await self._idle_waiter
            except TimeoutError:
                pass
            finally:
                self._idle_waiter = None
        clean = not self.connections
        for conn in list(self.connections):
            conn.abort()
        return clean

    def _connection_done(self, conn: TcpProxyProtocol, sent: int, received: int) -> None:
        self.connections.discard(conn)
        self.total += 1
        if self.on_close is not None:
            self.on_close(conn, sent, received)
        if not self.connections and self._idle_waiter is not None and not self._idle_waiter.done():
            self._idle_waiter.set_result(None)


def make_tcp_proxy_factory(loop: asyncio.AbstractEventLoop, pick_upstream: PickUpstream,
                           connect_timeout: float, idle_timeout: float,
                           on_open: Callable[[TcpProxyProtocol], None] | None = None,
                           on_close: Callable[[TcpProxyProtocol, int, int], None] | None = None,
                           on_connect_failure: Callable[[str, int, str], None] | None = None,
                           ) -> TcpProxyListener:
    """A :class:`TcpProxyListener`; pass it (it is callable) to ``loop.create_server``."""
    return TcpProxyListener(loop, pick_upstream, connect_timeout, idle_timeout,
                            on_open, on_close, on_connect_failure)
