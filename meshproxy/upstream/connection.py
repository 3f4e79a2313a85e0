"""One connection to an upstream endpoint: the client side of an HTTP/1.1 exchange.

The connection drives a sans-IO response parser and reports its events to the
:class:`UpstreamHandler` it currently serves (``self.handler``: the pipeline's attempt).
Between requests it sits idle in its endpoint's pool; any byte or EOF that arrives while
idle means the upstream closed or misbehaved, and the connection is dropped from the pool.

A connection is reused only when the last response was framed correctly and read to
its end, the upstream did not ask to close, and the request was sent completely.

Reads are bounded by what the downstream can take (an asyncio buffered protocol:
``get_buffer`` / ``buffer_updated``).  Every upstream connection of the process reads
into one shared buffer of ``READ_SIZE`` bytes and the bytes read are copied out of it at
once (the copy the loop makes for a plain protocol), so one read is never more than the
downstream's write high-water mark.  The request using the connection sets ``read_size``
to the room left under that mark while a response streams to a client (at least
``MIN_READ``): a client that reads slowly makes the proxy hold about the mark, not the
mark and a whole socket-buffer's read above it.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable

import cython

from ..batch import SendBatch
from ..codec.api import ProtocolError, ResponseHead
from ..driver import WRITE_HIGH_WATER, ConnectionDriver

_NEVER = float("inf")

READ_SIZE = WRITE_HIGH_WATER     # the most one read from an upstream returns
MIN_READ = 4096                  # the least (a read must have room; the mark is crossed, then reading pauses)
_READ_SIZE = READ_SIZE           # (the same two as C integers when compiled)
_MIN_READ = MIN_READ
# the buffer every upstream read goes to (one read at a time in a process: get_buffer, the
# read, buffer_updated follow each other without a loop pass between them)
_READ_BUFFER = bytearray(READ_SIZE)
_READ_VIEW = memoryview(_READ_BUFFER)
if cython.compiled:
    _read_start = PyByteArray_AS_STRING(_READ_BUFFER)

if TYPE_CHECKING:
    from .pool import EndpointPool


class UpstreamHandler:
    """What an upstream connection reports to the request it serves (implemented by the
    pipeline's ``Attempt``)."""
    __slots__ = ()

    def upstream_response_head(self, head: ResponseHead) -> None:
        raise NotImplementedError

    def upstream_body(self, data: bytes) -> None:
        raise NotImplementedError

    def upstream_complete(self) -> None:
        raise NotImplementedError

    def upstream_read_done(self) -> None:
        """A read from the upstream was parsed (its events, if any, were reported)."""
        raise NotImplementedError

    def upstream_reset(self, exc) -> None:
        """The connection closed or broke before the response was complete."""
        raise NotImplementedError

    def upstream_protocol_error(self, err: ProtocolError) -> None:
        raise NotImplementedError

    def upstream_write_paused(self) -> None:
        raise NotImplementedError

    def upstream_write_resumed(self) -> None:
        raise NotImplementedError


class UpstreamConnection(ConnectionDriver):
    __slots__ = ("handler", "pool", "idle_since", "expires_at", "requests", "_counted", "on_close", "read_size",
                 "peer_identity")

    def __init__(self, pool: "EndpointPool", make_parser: Callable, batch: SendBatch | None = None):
        ConnectionDriver.__init__(self, batch)
        self.pool = pool
        self.parser = make_parser(self)
        self.handler: UpstreamHandler | None = None   # the request being served, or None while idle
        self.idle_since = 0.0
        # connectionPool.tcp.maxConnectionDuration: not reused from then on (set at connect)
        self.expires_at = _NEVER
        self.requests = 0
        self._counted = False          # included in the pool's open-connection count
        self.on_close: Callable[[], None] | None = None   # releases the owning cluster's connection slot
        self.read_size = READ_SIZE     # the most the next read takes (set by the request it serves)
        # the SPIFFE id of the sidecar at the other end of a mesh mutual-TLS (ISTIO_MUTUAL)
        # connection, checked at connect; "" for any other connection
        self.peer_identity = ""

    # ---------------------------------------------------------------- transport events

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.attach(transport)

    def get_buffer(self, sizehint: int):
        """Where the next read goes: the shared buffer, cut to ``read_size`` (asyncio's
        BufferedProtocol; ``sizehint`` is the loop's suggestion, not a limit)."""
        size = self.read_size
        if size >= _READ_SIZE:
            return _READ_VIEW
        return _READ_VIEW[:size if size > _MIN_READ else _MIN_READ]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were read into the shared buffer: out of it at once, then as a plain read."""
        if cython.compiled:
            data = PyBytes_FromStringAndSize(_read_start, nbytes)
        else:
            data = _READ_VIEW[:nbytes].tobytes()
        self.data_received(data)

    def data_received(self, data: bytes) -> None:
        handler = self.handler
        if handler is None:
            # Bytes on an idle keep-alive connection: the upstream is confused; never reuse.
            self.close()
            return
        try:
            self.feed(data)
        except ProtocolError as err:
            handler.upstream_protocol_error(err)
            return
        handler = self.handler
        if handler is not None:
            handler.upstream_read_done()

    def eof_received(self) -> bool:
        handler = self.handler
        if handler is not None:
            try:
                self.parser.feed_eof()
            except ProtocolError as err:
                handler.upstream_reset(err)
            else:
                handler = self.handler
                if handler is not None:
                    handler.upstream_read_done()
        return False   # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost()
        self.pool.forget(self)
        self._run_on_close()
        handler = self.handler
        if handler is not None:
            self.handler = None
            handler.upstream_reset(exc)

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.upstream_write_paused()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.upstream_write_resumed()

    # ---------------------------------------------------------------- parser events -> handler

    def on_response_head(self, head: ResponseHead) -> None:
        handler = self.handler
        if handler is None:
            # a response after the one that was asked for, in the same read (the request
            # was released when the first completed): the upstream is out of step
            self.close()
            return
        handler.upstream_response_head(head)

    def on_body(self, data: bytes) -> None:
        handler = self.handler
        if handler is not None:      # None: see on_response_head
            handler.upstream_body(data)

    def on_message_complete(self) -> None:
        handler = self.handler
        if handler is not None:
            handler.upstream_complete()

    # ---------------------------------------------------------------- used by the pipeline
    # (write, flush and send_now are the driver's: bytes for the upstream, no frame of our own)

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
