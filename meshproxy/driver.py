"""What the downstream and upstream connection drivers share: an asyncio protocol that feeds
a sans-IO parser, queues its output and sends it in one go, and pauses reading for reasons.

* ``feed(data)``: bytes to the parser (a C call when both are compiled); a ProtocolError
  from the codec propagates to the driver, which decides what it means on its side.
* ``write(data)`` queues bytes; ``flush()`` has them sent at the end of this event-loop pass
  with the other connections' (the worker's :class:`~meshproxy.batch.SendBatch`), or at once
  without a batch; ``send_now()`` sends them now.  Several queued pieces (a head and a body)
  leave as one vectored write (``transport.writelines``: uvloop writes them with one writev,
  no join into a new bytes object); over TLS they are joined first, so that they leave as
  one TLS record (one encryption here, one decryption at the peer) instead of one per piece.
* ``pause_reading(reason)`` / ``resume_reading(reason)``: reading stops while any reason
  (a bit) is set and resumes when the last one clears.
* Write buffer limits: the transport asks for a pause once ``WRITE_HIGH_WATER`` bytes wait
  for the peer and for a resume under ``WRITE_LOW_WATER``; the pipeline then pauses reading
  on the other side, so what one slow peer makes the proxy hold stays about the high-water
  mark plus one read.
"""
from __future__ import annotations

import asyncio

import cython

from .batch import SendBatch
from .codec.api import MessageHandler
from .codec.httptools_backend import _Base as LlhttpParser

WRITE_HIGH_WATER = 64 * 1024
WRITE_LOW_WATER = 16 * 1024


class ConnectionDriver(MessageHandler):  # an asyncio protocol (not derived from asyncio.Protocol: compiled, it is a cdef class)
    __slots__ = ("transport", "parser", "out", "queued", "sender", "batch", "closed", "read_paused_by",
                 "send", "send_many")

    def __init__(self, batch: SendBatch | None):
        self.transport: asyncio.Transport | None = None
        self.parser = None
        self.out: list[bytes] = []                # bytes queued for the peer (see write)
        self.queued = False                       # ``sender`` is in the batch for this pass
        self.sender = self.send_now               # one bound method, queued once per pass
        self.batch = batch
        self.closed = False
        self.read_paused_by = 0                   # bit set of reasons reading is paused
        self.send = None                          # transport.write and .writelines, bound once
        self.send_many = None

    def attach(self, transport: asyncio.Transport) -> None:
        """From ``connection_made``: the transport, its write buffer limits, its bound writes."""
        self.transport = transport
        self.send = transport.write
        self.send_many = transport.writelines
        if transport.get_extra_info("sslcontext") is not None:
            self.send_many = _joined(transport.write)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    def feed(self, data: bytes) -> None:
        """Bytes from the peer to the parser; the codec's ProtocolError propagates."""
        parser = self.parser
        if cython.compiled and isinstance(parser, LlhttpParser):
            cython.cast(LlhttpParser, parser).feed(data)     # a C call
        else:
            parser.feed(data)

    def write(self, data: bytes) -> None:
        """Queue bytes for the peer (sent by ``flush`` or ``send_now``)."""
        self.out.append(data)

    def flush(self) -> None:
        """What is queued goes to the socket at the end of this loop pass (batch.py), or at
        once without a batch."""
        if not self.queued and self.out:
            if self.batch is None:
                self.send_now()
            else:
                self.queued = True
                self.batch.add(self.sender)

    def send_now(self) -> None:
        """What is queued goes to the transport now (the batch calls this; so does anything
        that must follow it: ``write_eof``, ``close``, a tunnel)."""
        self.queued = False
        out = self.out
        if out:
            if not self.closed:
                if len(out) == 1:
                    self.send(out[0])
                else:
                    self.send_many(out)               # vectored: no join
            out.clear()

    def pause_reading(self, reason: int) -> None:
        if not self.read_paused_by and not self.closed:
            self.transport.pause_reading()
        self.read_paused_by |= reason

    def resume_reading(self, reason: int) -> None:
        was = self.read_paused_by
        self.read_paused_by &= ~reason
        if was and not self.read_paused_by and not self.closed:
            self.transport.resume_reading()

    def abort(self) -> None:
        """Drop the connection now, queued bytes with it."""
        self.out.clear()
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def lost(self) -> None:
        """From ``connection_lost``: nothing more is sent or parsed.  The parser goes too: it
        holds this driver's bound handlers, and that cycle (and the parser's own) would keep
        both, and a partial head the parser holds, until the cyclic garbage collector runs,
        which a quiet process may not do for a long time after a burst."""
        self.closed = True
        self.out.clear()
        self.sender = None
        parser, self.parser = self.parser, None
        if parser is not None:
            parser.discard()


def _joined(write):
    """``writelines`` for a TLS transport: the pieces in one write, so in one TLS record."""
    def send_many(pieces):
        write(b"".join(pieces))
    return send_many
