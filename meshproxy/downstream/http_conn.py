"""The downstream side of an HTTP/1.1 listener: one client connection.

Bytes go through the sans-IO request parser; its events start and feed
:class:`~meshproxy.proxy.pipeline.Exchange` objects, one at a time and in order.
Pipelined requests that arrive while an exchange is running are queued (and reading
is paused), so responses always leave in request order.  Bytes the codec refuses get
their 4xx and the connection closes; nothing after the bad bytes is parsed.  Complete
requests before them are answered first, in order (a request whose body holds the bad
bytes is not: it never reaches an upstream whole).

Timers are not per request: the listener's sweeper calls :meth:`check_timeouts`
about once a second to enforce the header-read, request-body and keep-alive idle
timeouts.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from ..codec.api import ProtocolError, RequestHead
from ..driver import ConnectionDriver
from ..proxy.errors import error_response
from ..proxy.pipeline import Downstream, Exchange

if TYPE_CHECKING:
    from ..listener import HttpListener
    from ..runtime import Runtime

# connection states
IDLE = 0          # keep-alive, waiting for the first byte of a request
READING = 1       # a request head has started arriving
ACTIVE = 2        # an exchange is running
CLOSING = 3

_HEAD, _BODY, _END = 0, 1, 2
_READ_PAUSE_QUEUED = 2             # pipelined requests wait for the exchange in front of them
_READ_PAUSE_UPGRADE = 4            # bytes after an upgrade request's head wait for the tunnel
_READ_PAUSE_REFUSED = 32           # bad bytes were read: nothing more is (the answers before them go out)


class DownstreamConnection(Downstream):
    __slots__ = ("state", "exchange", "queue", "requests", "upgrade_buffer", "replaying", "out_start",
                 "answer_sent", "refusal", "body_exchange", "body_seen", "body_since")

    def __init__(self, runtime: "Runtime", listener: "HttpListener"):
        ConnectionDriver.__init__(self, runtime.batch)
        self.runtime = runtime
        self.listener = listener
        self.client_ip = ""
        self.scheme = listener.scheme        # the listener's, read per request
        self.inbound = listener.inbound
        self.client_fields = None            # X-Forwarded-For/-Proto for this client (made once)
        self.state = IDLE
        self.exchange: Exchange | None = None
        self.queue: deque | None = None      # events of pipelined requests not yet started
        self.since = 0.0                     # when the current state began
        self.keep_alive = True
        self.requests = 0
        self.upgrade_buffer: list[bytes] | None = None
        self.replaying = False
        self.feeding = False                 # inside parser.feed (upstream writes are held)
        self.out_start = 0                   # where the current exchange's unsent bytes begin in ``out``
        self.answer_sent = False             # bytes of the current exchange's response reached the socket
        self.write_paused = False            # the transport's write buffer is over its high-water mark
        self.refusal = None                  # (status, reason) for bad bytes, answered after the requests before them
        self.body_exchange = None            # the request body the sweeper watches (check_timeouts)
        self.body_seen = 0
        self.body_since = 0.0
        # the virtual host the last request on this connection was routed to, for the snapshot
        # and Host it was chosen with (keep-alive clients repeat both)
        self.vhost_snapshot = None
        self.vhost_authority = b""
        self.vhost = None

    # ---------------------------------------------------------------- transport events

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.attach(transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        self.parser = self.runtime.make_request_parser(self)
        self.since = self.runtime.now()
        self.listener.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return                           # closing after an answer: what still arrives is dropped
        if self.upgrade_buffer is not None:
            self.upgrade_buffer.append(data)
            self.pause_reading(_READ_PAUSE_UPGRADE)
            return
        if self.state == IDLE:
            self.state = READING
            if self.requests:                # the first head's time counts from the accept
                self.since = self.runtime.now()
        self.feeding = True
        try:
            self.feed(data)
        except ProtocolError as err:
            self.feeding = False
            self.refuse(err.status, err.reason)
            return
        self.feeding = False
        exchange = self.exchange
        if exchange is not None and exchange.up_out:
            exchange.upstream_flush()
        if self.out:
            self.flush()

    def eof_received(self) -> bool:
        # A client half-close does not delimit a request (RFC 9112 §9.6).  Let the
        # response in flight finish; an incomplete request is abandoned.
        exchange = self.exchange
        if exchange is None or not exchange.request_complete:
            self.close()
            return False
        self.keep_alive = False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost()
        self.listener.connection_closed(self)
        if self.exchange is not None:
            self.exchange.downstream_lost()
            self.exchange = None

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.exchange is not None:
            self.exchange.downstream_write_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.exchange is not None:
            self.exchange.downstream_write_resumed()

    # ---------------------------------------------------------------- codec events

    def on_request_head(self, head: RequestHead) -> None:
        if self.closed:
            return                           # (a request after one answered with Connection: close)
        if self.exchange is not None or self.queue:
            self._enqueue((_HEAD, head))
            return
        self._start(head)

    def on_body(self, data: bytes) -> None:
        if self.queue:
            self._enqueue((_BODY, data))
        elif self.exchange is not None:      # (None: answered already and closing)
            self.exchange.request_body(data)

    def on_message_complete(self) -> None:
        if self.queue:
            self._enqueue((_END, None))
        elif self.exchange is not None:
            self.exchange.request_end()

    # ---------------------------------------------------------------- exchanges in order

    def _start(self, head: RequestHead) -> None:
        self.state = ACTIVE
        self.requests += 1
        if not head.keep_alive:
            self.keep_alive = False
        if head.upgrade:
            # bytes after an upgrade request's head belong to the tunnel
            self.upgrade_buffer = []
        self.out_start = len(self.out)
        self.answer_sent = False
        exchange = self.exchange = Exchange.__new__(Exchange)
        exchange.begin(self, head)
        exchange.start()

    def _enqueue(self, event) -> None:
        if self.queue is None:
            self.queue = deque()
        self.queue.append(event)
        self.pause_reading(_READ_PAUSE_QUEUED)

    def exchange_finished(self, exchange: Exchange, keep_alive: bool) -> None:
        """Called by the exchange once its response has been written completely."""
        if exchange is not self.exchange:
            return
        self.exchange = None
        if not keep_alive:
            self.keep_alive = False
        if not self.keep_alive or self.runtime.draining:
            self.queue = None
            self.close_after_flush()
            return
        self.state = IDLE
        self.since = self.runtime.now()
        if self.queue and not self.replaying:
            self._replay()
        if self.refusal is not None and self.exchange is None and not self.queue:
            # every request before the bad bytes is answered: now theirs
            status, _ = self.refusal
            self.refusal = None
            self._answer_and_close(status)
            return
        if self.out:
            self.flush()

    def _replay(self) -> None:
        """Feed queued pipelined events: a head starts the next exchange once the
        previous one is done; body and end events go to the exchange they belong to."""
        self.replaying = True
        queue = self.queue
        try:
            while queue and not self.closed:
                kind, value = queue[0]
                if kind == _HEAD:
                    if self.exchange is not None:
                        break
                    queue.popleft()
                    self._start(value)
                elif kind == _BODY:
                    queue.popleft()
                    if self.exchange is not None:
                        self.exchange.request_body(value)
                else:
                    queue.popleft()
                    if self.exchange is not None:
                        self.exchange.request_end()
        finally:
            self.replaying = False
        if not queue:
            self.queue = None
            self.resume_reading(_READ_PAUSE_QUEUED)
        if self.exchange is not None:
            self.exchange.upstream_flush()

    # ---------------------------------------------------------------- output

    def send_now(self) -> None:
        """The output so far goes to the transport now (see ConnectionDriver.send_now)."""
        if self.out:
            ConnectionDriver.send_now(self)
            self.out_start = 0
            exchange = self.exchange
            if exchange is not None and exchange.response_started():
                self.answer_sent = True
        else:
            self.queued = False

    def refuse(self, status: int, reason: str) -> None:
        """The codec refused bytes from the client: parse nothing more.  Complete requests
        before the bad bytes (in flight or queued) are answered first, in order, then the
        4xx goes and the connection closes; a request whose head or body the bad bytes are
        in is not forwarded (or, in flight, is abandoned: see ``reject``)."""
        exchange = self.exchange
        queue = self.queue
        if exchange is not None and not queue and not exchange.request_complete:
            return self.reject(status, reason)          # in the body of the request in flight
        if queue:
            while queue and queue[-1][0] != _END:       # in a queued request: it goes, whole
                queue.pop()
        if exchange is None and not queue:
            return self.reject(status, reason)
        self.runtime.telemetry.rejected(reason, status)
        self.refusal = (status, reason)
        self.pause_reading(_READ_PAUSE_REFUSED)
        if exchange is not None and exchange.up_out:
            exchange.upstream_flush()                   # its request is whole: it goes on
        if self.out:
            self.flush()

    def reject(self, status: int, reason: str) -> None:
        """A request the codec refused (or one that timed out): answer and close; parse
        nothing more."""
        self.runtime.telemetry.rejected(reason, status)
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.abandon()
            if self.answer_sent:
                # part of its response already left: an error status cannot follow it
                self.abort()
                return
            del self.out[self.out_start:]    # drop its unsent answer; earlier answers still go
        self._answer_and_close(status)

    def _answer_and_close(self, status: int) -> None:
        self.queue = None
        self.refusal = None
        if not self.closed:
            self.out.append(error_response(status, close=True))
        self.close_after_flush()

    def close_after_flush(self) -> None:
        self.send_now()
        if not self.closed:
            self.state = CLOSING
            self.closed = True
            # half-close first so the client reads the response before it sees a reset
            transport = self.transport
            if transport.can_write_eof():
                transport.write_eof()
                self.runtime.loop.call_later(1.0, transport.close)
            else:
                # TLS: no half-close; close() sends what is buffered, then close_notify
                transport.close()

    def close(self) -> None:
        if not self.closed:
            self.send_now()                  # answers still queued go first
            self.closed = True
            self.transport.close()

    # ---------------------------------------------------------------- timers and drain

    def check_timeouts(self, now: float) -> None:
        settings = self.runtime.settings
        state = self.state
        if state == READING or (state == IDLE and not self.requests):
            # a head must arrive within the header timeout, on a new connection counted from
            # the accept (a connection that sends nothing gets 408 then, not at the idle timeout)
            if now - self.since > settings.header_read_timeout:
                self.reject(408, "request header timeout")
        elif state == IDLE and now - self.since > settings.idle_timeout:
            self.close()
        elif state == ACTIVE:
            self._check_body_timeout(now, settings.body_timeout)

    def _check_body_timeout(self, now: float, timeout: float) -> None:
        """A request body must keep arriving: no byte of it within ``timeout`` gets 408 (or,
        once the response started, an abort) and the upstream attempt is cancelled.  Time
        reading is paused by the proxy itself (backpressure) does not count."""
        exchange = self.exchange
        if exchange is None or not exchange.body_outstanding():
            self.body_exchange = None
            return
        seen = exchange.request_bytes
        if exchange is not self.body_exchange or seen != self.body_seen or self.read_paused_by:
            self.body_exchange = exchange
            self.body_seen = seen
            self.body_since = now
        elif now - self.body_since > timeout:
            self.body_exchange = None
            if not exchange.response_started():
                exchange.status = 408
            self.reject(408, "request body timeout")

    def drain(self) -> None:
        """Graceful shutdown: idle connections close now; busy ones finish the
        response in flight (it carries ``Connection: close``) and then close."""
        self.keep_alive = False
        if self.state == IDLE and self.exchange is None:
            self.close()

    def take_tunnel_bytes(self) -> bytes:
        """The exchange became a tunnel: let go of it; the bytes the client sent after the
        upgrade request's head."""
        self.exchange = None
        parser, self.parser = self.parser, None
        pending = parser.unconsumed() + b"".join(self.upgrade_buffer or ())
        parser.discard()
        self.upgrade_buffer = None
        return pending
