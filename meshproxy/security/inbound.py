"""Peer authentication at an inbound listener: per accepted connection, mTLS or plaintext.

An inbound listener (a sidecar's ingress) accepts sockets itself instead of through
``loop.create_server``, so it can look at a connection's first bytes before deciding what
it is (Envoy's ``tls_inspector`` listener filter), then hand the socket to the event loop
with or without TLS (``loop.connect_accepted_socket``).  Per connection, the port's
PeerAuthentication mode (read from the listener's current config, so a changed policy
applies to the next connection):

* ``DISABLE``: plaintext; nothing is peeked (TLS bytes reach the app as they are).
* ``STRICT``: the first bytes must start a TLS handshake, which is terminated with the
  workload certificate and **requires** a client certificate from the mesh's trust
  bundle; plaintext, a handshake failure (no certificate, another CA, expired, garbage)
  or the lack of a workload certificate close the connection and are counted.
* ``PERMISSIVE``: a TLS ClientHello that offers an Istio ALPN (``istio``, ``istio-*``: a
  sidecar's auto mTLS) is terminated as in STRICT; anything else is plaintext.  TLS without
  Istio's ALPN is the app's own TLS: it goes to ``passthrough_factory`` when the listener
  has one (an HTTP port: Istio's passthrough filter chain, the bytes spliced to the
  application as TCP, unchanged), else to the listener's own protocol (a TCP port already
  splices).  Without a workload certificate PERMISSIVE is plaintext and nothing is peeked.

mTLS is terminated by the event loop's TLS transport for HTTP, and by a
:class:`~meshproxy.security.tls_transport.TlsTransport` where ``half_close(conn)`` says so
(TCP: a peer's close_notify is a half-close, the other direction keeps flowing).

Every wait has a limit: the peek (``detect_timeout``) and the handshake
(``handshake_timeout``).  The tasks deciding connections are owned by the acceptor and
cancelled by :meth:`close`; nothing is kept per connection once it is handed over.  Who
the caller is (its SPIFFE id, the SNI it sent: for AuthorizationPolicy) is read from the
TLS connection afterwards (:func:`meshproxy.security.authz.peer_from_transport`).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Callable

from .client_hello import MAX_RECORD, NEED_MORE, NOT_TLS, ClientHello, looks_like_tls, parse_client_hello
from .peer_authn import DISABLE, PERMISSIVE, STRICT
from .tls_transport import TlsTransport

log = logging.getLogger("meshproxy")

ISTIO_ALPN_PREFIX = "istio"
_POLL = 0.005                      # re-peek interval while a ClientHello arrives in pieces

# refusal reasons (meshproxy_tls_handshake_failures_total{reason})
PLAINTEXT_REFUSED = "plaintext_refused"
NO_CERTIFICATE = "no_workload_certificate"
HANDSHAKE_FAILED = "handshake_failed"
DETECT_TIMEOUT = "detect_timeout"


def offers_istio_alpn(hello: ClientHello) -> bool:
    return any(p == ISTIO_ALPN_PREFIX or p.startswith(ISTIO_ALPN_PREFIX + "-") for p in hello.alpn)


class PeerAuthAcceptor:
    """Accepts on ``sock`` for one inbound listener.  ``mode()`` is the port's current
    PeerAuthentication mode; ``server_context(client_cert)`` the workload's TLS server
    context (None without a workload certificate); ``on_refused(reason)`` counts."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol_factory: Callable,
                 mode: Callable[[], str], server_context: Callable[[str], ssl.SSLContext | None],
                 on_refused: Callable[[str], None], detect_timeout: float = 10.0,
                 handshake_timeout: float = 10.0, mode_for: Callable[[socket.socket], str] | None = None,
                 passthrough_factory: Callable | None = None,
                 half_close: Callable[[socket.socket], bool] | None = None):
        self.loop = loop
        self.sock = sock
        self.protocol_factory = protocol_factory
        self.passthrough_factory = passthrough_factory     # PERMISSIVE, TLS that is not Istio's (None: as plaintext)
        self.mode = mode
        self.mode_for = mode_for            # per connection (the capture listener: by original destination)
        # per connection: terminate mTLS on a TlsTransport, which half-closes (TCP), rather than
        # the event loop's TLS (HTTP); None: never
        self.half_close = half_close
        self.server_context = server_context
        self.on_refused = on_refused
        self.detect_timeout = detect_timeout
        self.handshake_timeout = handshake_timeout
        self.tasks: set[asyncio.Task] = set()
        self._accepting: asyncio.Task | None = None
        self.refused = 0

    # ---------------------------------------------------------------- lifecycle (AbstractServer-like)

    def start(self) -> None:
        self._accepting = self.loop.create_task(self._accept_loop())

    def close(self) -> None:
        """Stop accepting; connections being decided are dropped (established ones are not ours)."""
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None
        for task in list(self.tasks):
            task.cancel()
        try:
            self.sock.close()
        except OSError:
            pass

    # ---------------------------------------------------------------- accept and decide

    async def _accept_loop(self) -> None:
        loop = self.loop
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except asyncio.CancelledError:
                raise
            except OSError as err:
                if self.sock.fileno() < 0:
                    return
                log.warning("inbound accept failed: %s", err)
                await asyncio.sleep(0.05)
                continue
            conn.setblocking(False)
            task = loop.create_task(self._decide(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _decide(self, conn: socket.socket) -> None:
        handed_over = False
        try:
            mode = self.mode_for(conn) if self.mode_for is not None else self.mode()
            context = self.server_context("required") if mode in (STRICT, PERMISSIVE) else None
            if mode == DISABLE or (mode == PERMISSIVE and context is None):
                await self._plaintext(conn)
                handed_over = True
                return
            hello = await self._peek_hello(conn)
            if hello is None:
                self._refuse(DETECT_TIMEOUT)
                return
            if hello == NOT_TLS:
                if mode == STRICT:
                    self._refuse(PLAINTEXT_REFUSED)
                    return
                await self._plaintext(conn)
                handed_over = True
                return
            if mode == PERMISSIVE and not offers_istio_alpn(hello):
                # the app's own TLS: its bytes pass as they are
                await self.loop.connect_accepted_socket(self.passthrough_factory or self.protocol_factory, conn)
                handed_over = True
                return
            if context is None:
                self._refuse(NO_CERTIFICATE)
                return
            if self.half_close is not None and self.half_close(conn):
                handed_over = True               # the TLS transport owns the socket, even if the handshake fails
                await self._terminate_half_closing(conn, context)
                return
            try:
                await self.loop.connect_accepted_socket(self.protocol_factory, conn, ssl=context,
                                                        ssl_handshake_timeout=self.handshake_timeout)
            except (ssl.SSLError, OSError, asyncio.TimeoutError, ConnectionError) as err:
                self._refuse(HANDSHAKE_FAILED, err)
                return
            handed_over = True
        finally:
            if not handed_over:
                try:
                    conn.close()
                except OSError:
                    pass

    async def _terminate_half_closing(self, conn: socket.socket, context: ssl.SSLContext) -> None:
        """mTLS for a TCP connection, on a :class:`TlsTransport` (half-close passes through)."""
        tls = TlsTransport(self.loop, context, server_side=True)
        try:
            await self.loop.connect_accepted_socket(lambda: tls, conn)
        except OSError as err:
            conn.close()
            self._refuse(HANDSHAKE_FAILED, err)
            return
        try:
            async with asyncio.timeout(self.handshake_timeout):
                await tls.handshake
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as err:
            tls.abort()
            self._refuse(HANDSHAKE_FAILED, err)
            return
        except asyncio.CancelledError:
            tls.abort()
            raise
        tls.attach(self.protocol_factory())

    async def _plaintext(self, conn: socket.socket) -> None:
        await self.loop.connect_accepted_socket(self.protocol_factory, conn)

    def _refuse(self, reason: str, err: BaseException | None = None) -> None:
        self.refused += 1
        self.on_refused(reason)
        if err is not None:
            log.debug("inbound connection refused (%s): %s", reason, err)

    async def _peek_hello(self, conn: socket.socket):
        """NOT_TLS, a ClientHello, or None (nothing decisive before the deadline / EOF)."""
        loop = self.loop
        deadline = loop.time() + self.detect_timeout
        seen = -1
        while True:
            try:
                data = conn.recv(MAX_RECORD, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                return None
            if data is not None:
                if not data:
                    return None                          # closed before saying anything
                if not looks_like_tls(data[:3]):
                    return NOT_TLS
                result = parse_client_hello(data)
                if result != NEED_MORE:
                    return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            if data is not None and len(data) == seen:
                await asyncio.sleep(min(_POLL, remaining))     # a partial hello: wait for more bytes
                continue
            seen = len(data) if data is not None else seen
            ready = loop.create_future()
            fd = conn.fileno()
            loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
            try:
                async with asyncio.timeout(remaining):
                    await ready
            except TimeoutError:
                return None
            finally:
                loop.remove_reader(fd)
