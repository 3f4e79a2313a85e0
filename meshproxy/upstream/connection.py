"""One connection to an upstream endpoint: the client side of an HTTP/1.1 exchange.

The connection drives a sans-IO response parser and hands its events to the exchange
that currently owns it (``self.exchange``).  Between exchanges it sits idle in its
endpoint's pool; any byte or EOF that arrives while idle means the upstream closed
or misbehaved, and the connection is dropped from the pool.

A connection is reused only when the last response was framed correctly and read to
its end, the upstream did not ask to close, and the request was sent completely.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable

import cython

from ..codec.api import MessageHandler, ProtocolError, ResponseHead
from ..codec.httptools_backend import _Base as LlhttpParser
from ..batch import SendBatch
from ..lists import clear, push

if TYPE_CHECKING:
    from .pool import EndpointPool


class UpstreamConnection(MessageHandler):  # an asyncio protocol (not derived from asyncio.Protocol: compiled, it is a cdef class)
    __slots__ = (
        "transport", "parser", "exchange", "pool", "idle_since", "requests", "closed",
        "_counted", "on_close", "out", "queued", "batch", "sender",
    )

    def __init__(self, pool: "EndpointPool", make_parser: Callable, batch: SendBatch | None = None):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = make_parser(self)
        self.exchange = None           # the Exchange being served, or None while idle
        self.idle_since = 0.0
        self.requests = 0
        self.closed = False
        self._counted = False          # included in the pool's open-connection count
        self.on_close: Callable[[], None] | None = None   # releases the owning cluster's connection slot
        self.out: list[bytes] = []     # bytes for the upstream not yet handed to the transport
        self.queued = False            # ``sender`` is in the batch for this pass
        self.batch = batch
        self.sender = self.send        # one bound method, queued once per pass (dropped when the connection goes)

    # ---------------------------------------------------------------- transport events

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=256 * 1024, low=64 * 1024)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes on an idle keep-alive connection: the upstream is confused; never reuse.
            self.close()
            return
        parser = self.parser
        try:
            if cython.compiled and isinstance(parser, LlhttpParser):
                cython.cast(LlhttpParser, parser).feed(data)     # a C call
            else:
                parser.feed(data)
        except ProtocolError as err:
            exchange.upstream_protocol_error(self, err)
            return
        exchange.downstream_flush()

    def eof_received(self) -> bool:
        exchange = self.exchange
        if exchange is not None:
            try:
                self.parser.feed_eof()
            except ProtocolError as err:
                exchange.upstream_reset(self, err)
            else:
                exchange.downstream_flush()
        return False   # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.out.clear()
        self.sender = None
        self.pool.forget(self)
        self._run_on_close()
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.upstream_reset(self, exc)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_write_paused()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_write_resumed()

    # ---------------------------------------------------------------- parser events -> exchange

    def on_response_head(self, head: ResponseHead) -> None:
        exchange = self.exchange
        if exchange is None:
            # a response after the one that was asked for, in the same read (the exchange
            # was released when the first completed): the upstream is out of step
            self.close()
            return
        exchange.upstream_response_head(head)

    def on_body(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:      # None: see on_response_head
            exchange.upstream_body(data)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.upstream_complete(self)

    # ---------------------------------------------------------------- used by the exchange

    def write(self, data: bytes) -> None:
        """Bytes for the upstream (no frame of our own), sent as the worker's send batch
        decides (batch.py: at once, or after a busy pass at the end of this one); at once
        without a batch."""
        push(self.out, data)
        if self.batch is None:
            self.send()
        elif not self.queued:
            self.queued = True
            self.batch.add(self.sender)

    def send(self) -> None:
        """What was written so far goes to the transport now (the batch calls this)."""
        self.queued = False
        out = self.out
        if out:
            if not self.closed:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            clear(out)                       # keeps the list's room for the next request

    def close(self) -> None:
        """Close without reuse (also used for aborts: pending writes are dropped)."""
        if not self.closed:
            self.closed = True
            self.out.clear()
            self.pool.forget(self)
            self._run_on_close()
            if self.transport is not None:
                self.transport.abort()

    def _run_on_close(self) -> None:
        callback, self.on_close = self.on_close, None
        if callback is not None:
            callback()
