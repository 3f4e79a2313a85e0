"""The pure-Python backend: heads are cut from the stream here, checked by
:mod:`meshproxy.codec.framing` and cross-checked by h11; bodies are delimited by
:class:`framing.BodyReader`.

h11 on its own is lenient where a proxy must not be (bare LF line ends, obs-fold, a leading
empty line rejected, ``,chunked`` refused, a bare CR in a chunk extension); cutting the head
ourselves and letting the shared framing layer decide closes those gaps, so this backend gives
the same verdicts as the httptools one.  h11 still parses every head as a second opinion: if it
refuses a head that the framing layer accepted, the request is refused too (400 / 502).
"""
from __future__ import annotations

import h11

from . import framing
from .api import (
    BODY_CHUNKED,
    BODY_UNTIL_CLOSE,
    CodecLimits,
    ProtocolError,
    RequestHandler,
    ResponseHandler,
)

_HEAD, _BODY, _TUNNEL, _CLOSED, _DEAD = range(5)


# what happens after a head is delivered
_READ_BODY, _SKIP, _SWITCH = 0, 1, 2


class _HeadCutter:
    """Collects the bytes of one head; checks raw bytes and limits as they arrive."""

    __slots__ = ("buf", "scanned", "checked", "limits", "status", "request", "framing_seen")

    def __init__(self, limits: CodecLimits, status: int, request: bool):
        self.buf = bytearray()
        self.scanned = 0
        self.checked = 0  # complete lines before this offset passed the early line checks
        self.framing_seen = 0  # content-length / transfer-encoding lines among the checked ones
        self.limits = limits
        self.status = status
        self.request = request

    def push(self, data: bytes, pos: int) -> bytes | None:
        """Add ``data[pos:]``; return the complete head (ending CRLF CRLF) or None.
        Bytes after the head stay in ``buf``."""
        buf = self.buf
        buf += data[pos:] if pos else data
        if self.request and self.scanned <= 1:
            # RFC 9112 §2.2: ignore empty lines before the request-line
            while buf[:2] == b"\r\n":
                del buf[:2]
                self.scanned = 0
            if buf == b"\r":
                self.scanned = 0
                return None
        if not buf:
            return None
        before = self.scanned
        end = buf.find(b"\r\n\r\n", before - 3 if before > 3 else 0)
        limit = end + 4 if end >= 0 else len(buf)
        framing.scan_head(buf, before, limit, self.status)
        self.scanned = limit
        if self.request and before < 64:
            framing.check_method_prefix(buf[:limit])
        self._check_lines(buf, limit)
        if end < 0:
            if self.request:
                self._check_target(buf)
            if len(buf) > self.limits.max_header_bytes:
                raise ProtocolError(431 if self.request else self.status, "header section too large")
            return None
        head = bytes(buf[:end + 4])
        del buf[:end + 4]
        self.scanned = 0
        self.checked = 0
        self.framing_seen = 0
        if len(head) > self.limits.max_header_bytes:
            if self.request:
                self._check_target(head)
            raise ProtocolError(431 if self.request else self.status, "header section too large")
        return head

    def _check_lines(self, buf, limit: int) -> None:
        """Refuse a bad start line or field line as soon as it is complete, not at head end."""
        pos = self.checked
        while True:
            eol = buf.find(b"\r\n", pos, limit)
            if eol < 0 or eol == pos:
                break
            line = bytes(buf[pos:eol])
            if pos == 0:
                if self.request:
                    method, target, version = framing.parse_request_line(line)
                    if len(target) > self.limits.max_target_bytes:
                        raise ProtocolError(414, "request-target too long")
                    if method not in framing.KNOWN_METHODS or target.translate(None, framing.TARGET_CHARS):
                        raise ProtocolError(400, "invalid request line")
                else:
                    framing.parse_status_line(line)
            else:
                framing.check_field_line(line, self.status)
                if self.request:
                    self._check_framing_field(line)
            pos = eol + 2
        self.checked = pos
        if pos and limit > pos and buf.find(b"\r\n", pos, limit) < 0:
            # the start of the next field line: refused as soon as its bytes say it must be,
            # as llhttp does (whitespace first, an overflowing or non-digit Content-Length,
            # a second framing field)
            partial = bytes(buf[pos:limit]).rstrip(b"\r")
            if partial:
                framing.check_partial_field_line(partial, self.status)
                if b":" in partial and self.request:
                    self._check_framing_field(partial, complete=False)

    def _check_framing_field(self, line: bytes, complete: bool = True) -> None:
        """In a request, a second Content-Length, or Content-Length with Transfer-Encoding,
        is refused when its name is seen (the framing layer refuses the complete head anyway)."""
        name = line.partition(b":")[0].lower()
        bit = 1 if name == b"content-length" else 2 if name == b"transfer-encoding" else 0
        if not bit:
            return
        seen = self.framing_seen
        if seen and (bit == 1 or seen & 1):
            raise ProtocolError(self.status, "duplicate Content-Length or Content-Length with Transfer-Encoding")
        if complete:
            self.framing_seen = seen | bit

    def _check_target(self, buf) -> None:
        """414 before 431: a long target is reported as such, as llhttp's on_url does."""
        first = buf.find(b"\r\n")
        line = buf if first < 0 else buf[:first]
        sp = line.find(b" ")
        if sp < 0:
            return
        sp2 = line.find(b" ", sp + 1)
        if (sp2 if sp2 >= 0 else len(line)) - sp - 1 > self.limits.max_target_bytes:
            raise ProtocolError(414, "request-target too long")


class _H11Parser:
    """What the request and response sides share: the state machine that alternates
    between cutting a head (handed to h11 as a second opinion) and reading a body with
    the shared :class:`framing.BodyReader`.  A side says how a head is delivered
    (:meth:`_deliver_head`) and what ends a message (:meth:`_message_done`)."""

    _err_status = 400

    def __init__(self, handler, limits: CodecLimits, request: bool):
        self._handler = handler
        self._limits = limits
        self._cutter = _HeadCutter(limits, self._err_status, request)
        self._body: framing.BodyReader | None = None
        self._keep_alive = True
        self._state = _HEAD
        self._tunnel = b""

    def feed(self, data: bytes) -> None:
        state = self._state
        if state == _TUNNEL:
            self._tunnel += data
            return
        if state == _CLOSED:
            return  # bytes after a message that closes the connection are never parsed
        if state == _DEAD:
            raise ProtocolError(self._err_status, "parser already failed")
        try:
            self._run(data)
        except BaseException:
            self._state = _DEAD
            raise

    def unconsumed(self) -> bytes:
        return self._tunnel

    def discard(self) -> None:
        """The connection is gone (nothing here refers back to this parser: all it holds
        goes with it)."""

    def _run(self, data: bytes) -> None:
        pos = 0
        handler = self._handler
        while True:
            if self._state == _BODY:
                body = self._body
                pos = body.feed(data, pos)
                if not body.done:
                    return
                self._body = None
                self._state = _HEAD if self._keep_alive else _CLOSED
                self._message_done(data, pos)
                handler.on_message_complete()
                if self._state != _HEAD:
                    return
            else:  # _HEAD
                if pos >= len(data) and not self._cutter.buf:
                    return
                raw = self._cutter.push(data, pos)
                data, pos = b"", 0
                if raw is None:
                    return
                head = self._parse(raw)
                rest = bytes(self._cutter.buf)
                self._cutter.buf.clear()
                kind = self._deliver_head(head)
                if kind == _SKIP:
                    data = rest
                    continue
                if kind == _SWITCH:
                    self._state = _TUNNEL
                    self._tunnel = rest
                    handler.on_message_complete()
                    return
                self._keep_alive = head.keep_alive
                self._body = framing.BodyReader(head.body_kind, head.content_length,
                                                handler.on_body, self._limits, self._err_status)
                self._state = _BODY
                data = rest

    def _deliver_head(self, head) -> int:
        raise NotImplementedError

    def _message_done(self, data: bytes, pos: int) -> None:
        """A body just ended at ``data[pos:]``; called before ``on_message_complete``."""

    def _parse(self, raw: bytes):
        raise NotImplementedError


class H11RequestParser(_H11Parser):
    """Request side of the pure-Python backend; see :class:`meshproxy.codec.api.RequestParser`."""

    def __init__(self, handler: RequestHandler, limits: CodecLimits):
        super().__init__(handler, limits, True)

    def _deliver_head(self, head) -> int:
        self._handler.on_request_head(head)
        return _SWITCH if head.upgrade else _READ_BODY

    def _parse(self, raw: bytes):
        line, headers = framing.split_head(raw)
        method, target, version = framing.parse_request_line(line)
        head = framing.request_head(method, target, version, headers, self._limits)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=len(raw) + 1)
        conn.receive_data(raw)
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            # h11 only speaks "Transfer-Encoding: chunked" exactly; the framing layer has
            # already accepted an equivalent list such as ",chunked", so that hint is not ours.
            if not (exc.error_status_hint == 501 and head.body_kind == BODY_CHUNKED):
                raise ProtocolError(400, f"invalid request head ({exc})") from None
        else:
            if not isinstance(event, h11.Request):
                raise ProtocolError(400, "incomplete request head")
        return head


class H11ResponseParser(_H11Parser):
    """Response side of the pure-Python backend; see :class:`meshproxy.codec.api.ResponseParser`."""

    _err_status = 502

    def __init__(self, handler: ResponseHandler, limits: CodecLimits):
        super().__init__(handler, limits, False)
        self._no_body = False
        # set by the httptools backend, which borrows this parser for one HEAD response:
        # after that message, the rest of the stream is handed back through unconsumed()
        self.stop_after_message = False

    def expect_no_body(self) -> None:
        self._no_body = True

    def feed_eof(self) -> None:
        if self._state == _BODY:
            if self._body.kind == BODY_UNTIL_CLOSE:
                self._body = None
                self._state = _CLOSED
                self._handler.on_message_complete()
                return
            self._state = _DEAD
            raise ProtocolError(502, "upstream closed before the response was complete")
        if self._state == _HEAD and self._cutter.buf:
            self._state = _DEAD
            raise ProtocolError(502, "upstream closed inside a response head")
        if self._state != _DEAD:
            self._state = _CLOSED

    def _deliver_head(self, head) -> int:
        if head.status < 200 and head.status != 101:
            return _SKIP  # 1xx: consumed here, never shown to the handler
        self._no_body = False
        self._handler.on_response_head(head)
        return _SWITCH if head.status == 101 else _READ_BODY

    def _message_done(self, data: bytes, pos: int) -> None:
        if self.stop_after_message and self._keep_alive:
            self._state = _TUNNEL
            self._tunnel = data[pos:]

    def _parse(self, raw: bytes):
        line, headers = framing.split_head(raw, 502)
        status, reason, version = framing.parse_status_line(line)
        head = framing.response_head(status, reason, version, headers, self._limits,
                                     self._no_body)
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=len(raw) + 1)
        req_headers = [("Host", "upstream")]
        if status == 101:  # h11 accepts a 101 only as the answer to an upgrade proposal
            req_headers += [("Connection", "upgrade"), ("Upgrade", "x")]
        conn.send(h11.Request(method="HEAD" if self._no_body else "GET", target="/",
                              headers=req_headers))
        conn.send(h11.EndOfMessage())
        conn.receive_data(raw)
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            if not (exc.error_status_hint == 501 and head.body_kind == BODY_CHUNKED):
                raise ProtocolError(502, f"invalid upstream response head ({exc})") from None
        else:
            if event is h11.NEED_DATA:
                raise ProtocolError(502, "incomplete upstream response head")
        return head
