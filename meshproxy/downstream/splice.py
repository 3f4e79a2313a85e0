"""Byte splice between two connected transports: the body of the L4 TCP proxy and of
HTTP Upgrade (WebSocket) tunnels.

A :class:`Splice` owns two already-connected ``asyncio`` transports, ``downstream``
(the client side) and ``upstream``, and relays bytes both ways with asyncio.Protocol
callbacks -- no tasks, no awaits, one ``write`` per ``data_received``.

Behaviour (Envoy ``tcp_proxy`` semantics, checklist rows 41-42):

* **Backpressure.** Each transport gets ``set_write_buffer_limits(high, low)``. When
  the upstream's write buffer passes ``high``, the upstream endpoint's
  ``pause_writing`` pauses *reading on the downstream*; ``resume_writing`` (buffer
  under ``low``) resumes it; the same the other way. Bytes buffered in the proxy per
  direction therefore stay under about ``high`` + one read. ``pauses``/``resumes``
  count these events and balance once the buffers drain.
* **Half-close.** A FIN from one side (``eof_received``, which returns True so the
  transport stays open for writing) becomes ``write_eof()`` on the other side after
  its buffered bytes; the other direction keeps flowing. Once both directions have
  seen their FIN, both transports are closed (``close()`` flushes first). A transport
  that cannot half-close (the event loop's TLS) makes the splice close both sides
  gracefully instead; the TCP paths' mTLS half-closes (a FIN is a close_notify:
  :mod:`meshproxy.security.tls_transport`).
* **Reset.** A side lost with an error (RST, EPIPE...) aborts the other with
  ``SO_LINGER`` 0, so the reset propagates as a reset, not as a clean FIN.
  A side closed cleanly by its peer (possible only for transports that ignore
  ``eof_received``'s result) closes the other gracefully.
* **Idle timeout.** No byte in either direction for ``idle_timeout`` seconds closes
  both sides (a side whose write buffer is stuck non-empty is aborted, so the close
  cannot wait forever). Implemented without touching the hot path: a periodic
  ``loop.call_later`` check every ``idle_timeout / 4`` compares the byte counters
  with the previous check, so a connection closes between ``idle_timeout`` and
  ``1.25 * idle_timeout`` after its last byte. The timer lives until both sides are
  gone, which also bounds a graceful close whose flush never completes.
* **Metrics.** ``sent`` (bytes written to the upstream, i.e. downstream -> upstream,
  including ``initial_to_upstream``) and ``received`` (bytes written to the downstream,
  including ``initial_to_downstream``); ``on_close(sent, received)`` is called exactly
  once, after both transports are gone.

Handover (HTTP connection driver after ``101 Switching Protocols``, or the TCP proxy
after its upstream connect), all in ONE callback with no ``await`` in between, so no
``data_received`` can land on the old protocols:

1. Send the 101 to the downstream as usual (``transport.write``); do not close or
   abort either transport, and do not call ``write_eof`` on them.
2. Detach the old protocol objects: cancel their timers, forget the upstream
   connection from its pool, stop counting the downstream as an HTTP connection.
   They receive no callbacks after step 4.
3. Collect what each side already read but did not consume:
   ``initial_to_upstream`` = bytes from the client after the upgrade request's head
   (parser leftovers + anything buffered since); ``initial_to_downstream`` = bytes from
   the upstream after the 101 response head. If a side already delivered EOF, pass
   ``downstream_eof=True`` / ``upstream_eof=True``.
4. ``splice = Splice(loop, down_transport, up_transport, idle_timeout=...,
   initial_to_upstream=..., initial_to_downstream=..., on_close=...)`` then
   ``splice.start()``. ``start`` calls ``transport.set_protocol`` on both, sets the
   write-buffer limits, writes the initial bytes, forwards a pending EOF, and resumes
   reading on both transports (the old protocols may have paused reading; the splice
   now owns the reading state). A transport already closing at ``start`` counts as
   closed cleanly, so the other side is closed after its initial bytes are flushed.
5. Keep a reference to the splice for shutdown: ``close()`` (graceful, flushes) or
   ``abort()`` (immediate, resets both). ``on_close`` tells you when it is gone.
"""
from __future__ import annotations

import asyncio
import socket
import struct
from typing import Callable

from ..driver import WRITE_HIGH_WATER, WRITE_LOW_WATER

DEFAULT_HIGH_WATER = WRITE_HIGH_WATER      # the HTTP connections' own
DEFAULT_LOW_WATER = WRITE_LOW_WATER

_LINGER_RESET = struct.pack("ii", 1, 0)


def reset_transport(transport: asyncio.BaseTransport) -> None:
    """Abort ``transport`` so the peer sees a TCP RST (SO_LINGER 0), not a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except (OSError, ValueError):
            pass  # already closed, or not a TCP socket: a plain abort will do
    transport.abort()


class _Endpoint(asyncio.Protocol):
    """The protocol installed on one transport of a splice: bytes read here are
    written to ``peer``'s transport."""

    __slots__ = ("splice", "transport", "peer", "count", "read_eof", "read_paused", "lost")

    def __init__(self, splice: "Splice", transport: asyncio.Transport):
        self.splice = splice
        self.transport = transport
        self.peer: _Endpoint = None  # type: ignore[assignment]  # set by Splice
        self.count = 0              # bytes read here and written to the peer
        self.read_eof = False       # this side sent its FIN
        self.read_paused = False    # reading paused because the peer's buffer is full
        self.lost = False

    # -------------------------------------------------------------- hot path

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)
        self.count += len(data)

    # -------------------------------------------------------------- flow control

    def pause_writing(self) -> None:
        """Our write buffer is above the high-water mark: stop reading the peer."""
        peer = self.peer
        if not peer.read_paused and not peer.read_eof and not peer.lost:
            peer.read_paused = True
            self.splice.pauses += 1
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer.read_paused:
            peer.read_paused = False
            self.splice.resumes += 1
            if not peer.lost:
                peer.transport.resume_reading()

    # -------------------------------------------------------------- end of stream

    def eof_received(self) -> bool:
        self.read_eof = True
        if self.read_paused:  # nothing more to read; keep pause/resume balanced
            self.read_paused = False
            self.splice.resumes += 1
        peer = self.peer
        if peer.lost or peer.transport.is_closing():
            return True
        if peer.transport.can_write_eof():
            peer.transport.write_eof()      # after the bytes already buffered
            if peer.read_eof:
                self.splice.close()
        else:
            self.splice.close()
        return True  # keep our transport open: the other direction still flows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        splice = self.splice
        peer = self.peer
        if not peer.lost:
            if exc is not None:
                splice.reset_by = self
                reset_transport(peer.transport)
            else:
                peer.transport.close()
        splice._endpoint_lost()


class Splice:
    """Relay bytes both ways between ``downstream`` and ``upstream`` transports.

    See the module docstring for the behaviour and the handover steps.
    """

    __slots__ = ("loop", "downstream", "upstream", "idle_timeout", "on_close", "high_water",
                 "low_water", "_initial_up", "_initial_down", "_down_eof", "_up_eof",
                 "pauses", "resumes", "reset_by", "idle_closed", "closed", "_started",
                 "_idle_handle", "_idle_interval", "_idle_seen", "_idle_since")

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 downstream: asyncio.Transport, upstream: asyncio.Transport, *,
                 idle_timeout: float | None = None,
                 initial_to_upstream: bytes = b"", initial_to_downstream: bytes = b"",
                 downstream_eof: bool = False, upstream_eof: bool = False,
                 on_close: Callable[[int, int], None] | None = None,
                 high_water: int = DEFAULT_HIGH_WATER, low_water: int = DEFAULT_LOW_WATER):
        if not 0 <= low_water <= high_water:
            raise ValueError(f"splice: need 0 <= low_water <= high_water, got {low_water}, {high_water}")
        self.loop = loop
        self.downstream = _Endpoint(self, downstream)
        self.upstream = _Endpoint(self, upstream)
        self.downstream.peer = self.upstream
        self.upstream.peer = self.downstream
        self.idle_timeout = idle_timeout if idle_timeout and idle_timeout > 0 else None
        self.on_close = on_close
        self.high_water = high_water
        self.low_water = low_water
        self._initial_up = initial_to_upstream
        self._initial_down = initial_to_downstream
        self._down_eof = downstream_eof
        self._up_eof = upstream_eof
        self.pauses = 0            # times a side's reading was paused for backpressure
        self.resumes = 0           # ... and resumed (equal once buffers drained)
        self.reset_by: _Endpoint | None = None  # side whose loss with an error reset the other
        self.idle_closed = False
        self.closed = False        # both transports gone, on_close called
        self._started = False
        self._idle_handle: asyncio.TimerHandle | None = None
        self._idle_interval = 0.0
        self._idle_seen = -1
        self._idle_since = 0.0

    # ------------------------------------------------------------------ counters

    @property
    def sent(self) -> int:
        """Bytes relayed downstream -> upstream."""
        return self.downstream.count

    @property
    def received(self) -> int:
        """Bytes relayed upstream -> downstream."""
        return self.upstream.count

    def buffered(self) -> tuple[int, int]:
        """Bytes waiting in the proxy: (to the upstream, to the downstream)."""
        up, down = self.upstream, self.downstream
        return (0 if up.lost else up.transport.get_write_buffer_size(),
                0 if down.lost else down.transport.get_write_buffer_size())

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Take over both transports and start relaying (handover step 4)."""
        if self._started:
            raise RuntimeError("splice: start() called twice")
        self._started = True
        down, up = self.downstream, self.upstream
        for ep in (down, up):
            ep.transport.set_protocol(ep)
        for ep in (down, up):
            if not ep.transport.is_closing():
                # may call ep.pause_writing() right away if its buffer is already full
                ep.transport.set_write_buffer_limits(high=self.high_water, low=self.low_water)
        if self._initial_up and not up.transport.is_closing():
            up.transport.write(self._initial_up)
            down.count += len(self._initial_up)
        if self._initial_down and not down.transport.is_closing():
            down.transport.write(self._initial_down)
            up.count += len(self._initial_down)
        self._initial_up = self._initial_down = b""
        for ep in (down, up):
            if ep.transport.is_closing():
                # closed before the handover; its connection_lost may have gone to the
                # old protocol, so settle it here (a later call is ignored)
                ep.connection_lost(None)
        if self.closed:
            return
        if self._down_eof and not down.lost:
            down.eof_received()
        if self._up_eof and not up.lost:
            up.eof_received()
        for ep in (down, up):
            if not (ep.lost or ep.read_paused or ep.read_eof or ep.transport.is_closing()):
                ep.transport.resume_reading()
        if self.idle_timeout is not None and not self.closed:
            self._idle_interval = self.idle_timeout / 4
            self._idle_since = self.loop.time()
            self._idle_seen = down.count + up.count
            self._idle_handle = self.loop.call_later(self._idle_interval, self._idle_check)

    def close(self) -> None:
        """Close both sides after flushing what is buffered (graceful)."""
        for ep in (self.downstream, self.upstream):
            if not ep.lost:
                ep.transport.close()

    def abort(self) -> None:
        """Reset both sides now, dropping buffered bytes."""
        for ep in (self.downstream, self.upstream):
            if not ep.lost:
                reset_transport(ep.transport)

    # ------------------------------------------------------------------ internals

    def _idle_check(self) -> None:
        self._idle_handle = None
        if self.closed:
            return
        now = self.loop.time()
        total = self.downstream.count + self.upstream.count
        if total != self._idle_seen:
            self._idle_seen = total
            self._idle_since = now
        elif now - self._idle_since >= self.idle_timeout:
            self.idle_closed = True
            for ep in (self.downstream, self.upstream):
                if ep.lost:
                    continue
                if ep.transport.get_write_buffer_size():
                    reset_transport(ep.transport)   # a flush that is not moving
                else:
                    ep.transport.close()
        if not self.closed:
            self._idle_handle = self.loop.call_later(self._idle_interval, self._idle_check)

    def _endpoint_lost(self) -> None:
        if self.closed or not (self.downstream.lost and self.upstream.lost):
            return
        self.closed = True
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        on_close = self.on_close
        self.on_close = None
        if on_close is not None:
            on_close(self.downstream.count, self.upstream.count)
