"""TLS over a plain asyncio transport, with half-close: the TCP paths' mTLS.

The event loop's TLS transports (asyncio's and uvloop's) cannot half-close: ``write_eof``
is not supported, and the peer's close_notify closes the whole connection after
``eof_received``.  A TCP proxy must keep the other direction flowing (a client that
sends its request and shuts its write side still reads the whole reply), so the TCP
paths drive an ``ssl.SSLObject`` over memory BIOs themselves.  :class:`TlsTransport` is
the protocol of the plain TCP transport and the transport the application protocol
(the TCP splice) sees.

Life of a connection:

1. ``connection_made(raw)``: the ``SSLObject`` is made (``context.wrap_bio``: a
   :class:`~meshproxy.upstream.tls.ResumingContext` offers its session); a client sends
   its hello at once.
2. handshake: bytes read go to the incoming BIO and ``do_handshake`` runs until it
   completes; :attr:`handshake` (a future) then holds None, or the error (a failed
   handshake's alert is sent and the connection closed).  Its time limit is the caller's.
3. :meth:`attach`: the application protocol gets ``connection_made(self)``, then the bytes
   decrypted from there on (those that came with the handshake's last flight first).
4. half-close: :meth:`write_eof` sends close_notify once (``SSL_shutdown``) and then the
   TCP FIN; reading goes on.  The peer's close_notify (or a FIN without one) is
   ``eof_received`` for the application; if that returns false the transport closes
   (asyncio's rule), otherwise it stays open for writing.
5. :meth:`close` sends close_notify (if not sent yet) and closes after the buffered bytes;
   :meth:`abort` drops the connection now.

Flow control passes through: ``pause_reading`` stops reading the TCP socket (bytes
already read wait, encrypted, in the incoming BIO), and the TCP transport's
``pause_writing``/``resume_writing`` go to the application protocol.
"""
from __future__ import annotations

import asyncio
import logging
import ssl

log = logging.getLogger("meshproxy")

# the most plaintext one TLS record carries: SSL_read returns at most one record per call
_READ_SIZE = 16384
# bytes put through a BIO at a time: the event loop reads and the splice writes up to 256 KiB,
# and a BIO (and the bytes read out of it) that big is malloc'ed fresh (mmap) and page-faulted
# in every time; in 64 KiB slices the buffers come from the heap and are reused
_SLICE = 65536


class TlsTransport(asyncio.Transport):
    __slots__ = ("_loop", "_context", "_server_side", "_server_hostname", "_raw", "_incoming", "_outgoing",
                 "_ssl", "handshake", "_protocol", "_paused", "_read_eof", "_eof_sent", "_closing", "_lost",
                 "_scheduled", "_raw_eof")

    def __init__(self, loop: asyncio.AbstractEventLoop, context, *, server_side: bool,
                 server_hostname: str | None = None):
        super().__init__()
        self._loop = loop
        self._context = context          # an SSLContext, or anything with its wrap_bio
        self._server_side = server_side
        self._server_hostname = server_hostname
        self._raw: asyncio.Transport | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl: ssl.SSLObject | None = None
        self.handshake: asyncio.Future = loop.create_future()
        self._protocol: asyncio.Protocol | None = None
        self._paused = False             # the application paused reading
        self._read_eof = False           # the peer's close_notify (or FIN) was delivered
        self._eof_sent = False           # our close_notify was sent
        self._closing = False
        self._lost = False
        self._scheduled = False          # a read of what the BIOs hold is scheduled
        self._raw_eof = False            # the TCP FIN came

    # ------------------------------------------------------------ the TCP transport's protocol

    def connection_made(self, raw: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = raw
        try:
            self._ssl = self._context.wrap_bio(self._incoming, self._outgoing, self._server_side,
                                               self._server_hostname)
        except (ssl.SSLError, ValueError) as err:
            self._handshake_failed(err)
            return
        self._handshake_step()

    def data_received(self, data: bytes) -> None:
        if len(data) <= _SLICE or not self.handshake.done():
            self._incoming.write(data)
            if not self.handshake.done():
                self._handshake_step()
            elif self._protocol is not None and not self._paused:
                self._read_records()
            return
        # a big read goes through the BIO in slices: its buffer stays small (see _SLICE)
        view = memoryview(data)
        for i in range(0, len(data), _SLICE):
            self._incoming.write(view[i:i + _SLICE])
            if self._protocol is not None and not self._paused:
                self._read_records()

    def eof_received(self) -> bool:
        self._raw_eof = True             # once the BIOs are read, a FIN without close_notify is the end
        if not self.handshake.done():
            self._handshake_failed(ConnectionResetError("connection closed during the TLS handshake"))
            return False
        if self._protocol is not None and not self._paused:
            self._read_records()
        return True                      # our direction may still have bytes to send

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._closing = True
        if not self.handshake.done():
            self.handshake.set_exception(exc or ConnectionResetError("connection closed during the TLS handshake"))
            return
        protocol = self._protocol
        if protocol is not None:
            self._protocol = None
            protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._protocol is not None:
            self._protocol.pause_writing()

    def resume_writing(self) -> None:
        if self._protocol is not None:
            self._protocol.resume_writing()

    # ------------------------------------------------------------ handshake

    def _handshake_step(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as err:
            self._handshake_failed(err)
            return
        self._flush()
        self.handshake.set_result(None)

    def _handshake_failed(self, err: BaseException) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(err)
        if self._raw is not None and not self._raw.is_closing():
            self._flush()                # the alert, if OpenSSL wrote one
            self._closing = True
            self._raw.close()

    def attach(self, protocol: asyncio.Protocol) -> None:
        """After the handshake: hand the connection to ``protocol``."""
        self._protocol = protocol
        protocol.connection_made(self)
        if self._lost:
            self._protocol = None
            protocol.connection_lost(None)
        elif self._protocol is protocol and not self._paused:
            self._read_records()

    # ------------------------------------------------------------ reading

    def _read_records(self) -> None:
        read = self._ssl.read
        while not (self._paused or self._read_eof or self._closing) and self._protocol is not None:
            try:
                data = read(_READ_SIZE)
            except ssl.SSLWantReadError:
                if not self._raw_eof:
                    break
                data = b""               # a FIN without close_notify: the end all the same
            except ssl.SSLZeroReturnError:
                data = b""               # close_notify (after ours)
            except ssl.SSLError as err:
                self._fatal(err)
                return
            if not data:
                self._peer_eof()
                break
            self._protocol.data_received(data)
        if self._outgoing.pending:
            self._flush()                # what reading produced (a key update's answer)

    def _peer_eof(self) -> None:
        self._read_eof = True
        if not self._protocol.eof_received():
            self.close()

    def _scheduled_read(self) -> None:
        self._scheduled = False
        if not self._lost and self._protocol is not None and not self._paused:
            self._read_records()

    def _fatal(self, err: BaseException) -> None:
        log.debug("TLS connection %s failed: %s", self.get_extra_info("peername"), err)
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    # ------------------------------------------------------------ writing

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data and not self._lost:
            self._raw.write(data)

    def write(self, data) -> None:
        if not data or self._closing or self._eof_sent:
            return
        try:
            if len(data) <= _SLICE:
                self._ssl.write(data)
                self._flush()
                return
            view = memoryview(data)
            for i in range(0, len(data), _SLICE):      # in slices: see _SLICE
                self._ssl.write(view[i:i + _SLICE])
                self._flush()
        except ssl.SSLError as err:
            self._fatal(err)

    def writelines(self, list_of_data) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """close_notify, then the TCP FIN (after the bytes already buffered); reading goes on."""
        if self._eof_sent or self._closing:
            return
        self._shutdown()
        if not self._lost:
            self._raw.write_eof()

    def _shutdown(self) -> None:
        self._eof_sent = True
        if self._ssl is None or not self.handshake.done() or self.handshake.exception() is not None:
            return
        # unwrap() calls SSL_shutdown twice; the second reads records looking for the peer's
        # close_notify and drops application data it finds: the records not read yet are moved
        # out of its reach and put back
        held = self._incoming.read()
        try:
            self._ssl.unwrap()           # SSL_shutdown: sends close_notify
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass                         # the peer's close_notify is still to come: reading goes on
        except ssl.SSLError:
            pass
        if held:
            self._incoming.write(held)
        self._flush()

    # ------------------------------------------------------------ the transport the application sees

    def close(self) -> None:
        if self._closing:
            return
        if not self._eof_sent:
            self._shutdown()
        self._closing = True
        if self._raw is not None:
            self._raw.close()

    def abort(self) -> None:
        self._closing = True
        if not self.handshake.done():
            self.handshake.cancel()      # nobody waits for it any more
        if self._raw is not None:
            self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._raw is None or self._raw.is_closing()

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            if not self._lost:
                self._raw.pause_reading()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            if not self._lost:
                self._raw.resume_reading()
            if not self._scheduled:
                # what the BIOs already hold would wait for the next segment otherwise
                self._scheduled = True
                self._loop.call_soon(self._scheduled_read)

    def is_reading(self) -> bool:
        return not self._paused

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def get_extra_info(self, name: str, default=None):
        if name == "ssl_object":
            return self._ssl
        if name == "sslcontext":
            return self._ssl.context if self._ssl is not None else default
        if name == "peercert":
            return self._ssl.getpeercert() if self._ssl is not None else default
        if name == "cipher":
            return self._ssl.cipher() if self._ssl is not None else default
        return self._raw.get_extra_info(name, default) if self._raw is not None else default

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self):
        return self._raw.get_write_buffer_limits()

    def get_write_buffer_size(self) -> int:
        return (self._raw.get_write_buffer_size() if not self._lost else 0) + self._outgoing.pending
