"""The httptools backend: llhttp, through httptools' public parser objects, tokenises heads and
de-chunks bodies.

llhttp in its default strict mode already refuses bare CR/LF, obs-fold, whitespace before the
colon, bad chunk sizes and terminators.  What it does not decide (Content-Length vs
Transfer-Encoding policy, Host, limits, method set, value bytes) is decided by
:mod:`meshproxy.codec.framing` inside ``on_headers_complete``, before the handler sees the head.

Each header field is appended as ``(name.lower(), value)`` to a list; field checks and the
framing decision happen once per head.  No per-request objects beyond the head and its header
list.  The parsers here talk to llhttp only through a few methods (``_new_parser``,
``_execute``, ``_message_version``, ``_method``, ``_status``), which
:mod:`meshproxy.codec.llhttp_driver` overrides to drive llhttp through its C API instead (the
``llhttp`` backend, compiled only).

Two things llhttp cannot tell us are done here with a little bookkeeping:

* the size of a head that has not ended yet: bytes fed while a head is pending are counted;
* the length of a chunk extension (llhttp streams it without a bound, CVE-2024-22019): bytes
  since the last LF are counted while a chunk-size line is pending, and a feed that holds a
  line longer than the bound with a ``;`` in it is fed to llhttp line by line so that the
  line's length is known when ``on_chunk_header`` fires.
"""
from __future__ import annotations

import cython

import httptools

from . import framing
from .api import (
    BODY_CHUNKED,
    BODY_UNTIL_CLOSE,
    CodecLimits,
    MessageHandler,
    ProtocolError,
    RequestHandler,
    ResponseHandler,
)

_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}
_HEAD, _BODY, _TUNNEL, _CLOSED, _DEAD = range(5)
_CHUNK_SIZE_SLACK = 18  # hex digits + CRLF allowed on top of the extension bound
_PARSER_ERRORS = (httptools.HttpParserError, httptools.HttpParserUpgrade)  # Upgrade is not an HttpParserError


class _Base:
    """Shared feeding and callbacks.

    Through httptools' parser objects llhttp calls back into Python about ten times per
    message, so each callback does as little as it can: ``on_header`` appends
    ``(name.lower(), value without trailing OWS)`` to the pending list with no checks; the
    fields are checked once per head by :func:`framing.request_head` /
    :func:`framing.response_head`.  Trailer fields land in the same list and are checked at
    the end of the message.  The field count is checked after every feed and before the head is
    built, so a head that never ends cannot grow the list beyond one read."""

    __slots__ = ("_handler", "_limits", "_parser", "_raw", "on_body", "_state", "_head_bytes",
                 "_chunked", "_line_pending", "_line_carry", "_ext_cap", "_body_bytes",
                 "_chunk_header_seen", "_tunnel", "_keep_alive", "_err_status", "_max_head_bytes",
                 "_max_raw", "_max_body", "_handler_body", "_handler_complete", "_sink")

    def _init(self, handler, limits: CodecLimits, err_status: int) -> None:
        self._handler = handler
        # compiled, a connection driver's events are C calls (MessageHandler's cpdef methods)
        self._sink = handler if cython.compiled and isinstance(handler, MessageHandler) else None
        self._handler_body = handler.on_body
        self._handler_complete = handler.on_message_complete
        self._limits = limits
        self._raw = []  # (lower-cased name, value) of the pending head, or trailers
        # without a body cap llhttp hands body bytes straight to the handler (one frame less);
        # must be set before the httptools parser is built (it looks its callbacks up once)
        self.on_body = self._on_body_capped if limits.max_body_bytes else handler.on_body
        self._state = _HEAD
        self._head_bytes = 0
        self._chunked = False
        self._line_pending = False
        self._line_carry = 0
        self._ext_cap = limits.max_chunk_ext_bytes + _CHUNK_SIZE_SLACK
        self._body_bytes = 0
        self._chunk_header_seen = False
        self._tunnel = b""
        self._keep_alive = True
        self._err_status = err_status
        self._max_head_bytes = limits.max_header_bytes
        self._max_raw = limits.max_header_count
        self._max_body = limits.max_body_bytes

    # ------------------------------------------------------------------ llhttp, through httptools
    # (the llhttp backend's parsers override these five)

    def _new_parser(self) -> None:
        """A new llhttp parser for the stream (at the start, and after a HEAD response)."""
        raise NotImplementedError

    def _execute(self, data) -> None:
        """Run llhttp over ``data``; its errors are httptools' exceptions."""
        self._parser.feed_data(data)

    def _message_version(self) -> bytes:
        """The parsed message's HTTP version: ``b"1.1"``, ``b"1.0"`` or ``b"?"`` (any other:
        framing answers 505)."""
        return _VERSIONS.get(self._parser.get_http_version(), b"?")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw.append((name.lower(), value.rstrip(b" \t")))  # llhttp strips leading OWS only

    def _take_fields(self) -> list:
        """The pending head's fields, handed over to the head; a new list starts."""
        raw = self._raw
        self._raw = []
        return raw

    def on_headers_complete(self) -> None:   # each side's own
        raise NotImplementedError

    def on_message_complete(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ feeding

    def discard(self) -> None:
        """The connection is gone.  The llhttp parser (httptools' object, or the llhttp
        backend's) holds this object's callbacks and a partial field: dropped, so that the
        cycle between them does not keep a partial head until the cyclic collector runs."""
        self._parser = None
        self.on_body = None

    def unconsumed(self) -> bytes:
        return self._tunnel

    def feed(self, data: bytes) -> None:
        state = self._state
        if state >= _TUNNEL:  # _TUNNEL, _CLOSED or _DEAD: off the hot path
            if state == _TUNNEL:
                self._tunnel += data
                return
            if state == _CLOSED:
                return
            raise ProtocolError(self._err_status, "parser already failed")
        try:
            if len(data) > self._ext_cap and (state == _HEAD or self._chunked) and data.find(59) >= 0 \
                    and self._long_ext_line_possible(data):  # 59 = b";": a chunk extension may be long
                self._feed_by_line(data)
                return
            if state == _HEAD:
                self._head_bytes += len(data)
            # _feed and _after_feed, inlined for the common case
            try:
                self._execute(data)
            except _PARSER_ERRORS as exc:
                self._parser_error(exc, data)
            state = self._state
            if state == _HEAD:
                if self._head_bytes > self._max_head_bytes:
                    raise ProtocolError(431 if self._err_status == 400 else self._err_status,
                                        "header section too large")
                if len(self._raw) > self._max_raw:
                    self._too_many_fields()
            elif state == _BODY:
                if self._line_pending:
                    self._after_feed_line(data)
                if self._raw:
                    self._check_trailers(False)
        except BaseException:
            self._state = _DEAD
            raise

    def _feed(self, data: bytes) -> None:
        try:
            self._execute(data)
        except _PARSER_ERRORS as exc:
            self._parser_error(exc, data)

    def _parser_error(self, exc: Exception, data: bytes) -> None:
        if isinstance(exc, httptools.HttpParserUpgrade):
            self._state = _TUNNEL
            self._tunnel = data[exc.args[0]:]
            return
        if isinstance(exc, httptools.HttpParserCallbackError):
            cause = exc.__context__
            if cause is not None:
                raise cause from None
            raise ProtocolError(self._err_status, str(exc)) from None
        state = self._state
        if state == _CLOSED:
            return  # bytes after a message that closes the connection are ignored
        if self._raw:
            # fields are checked late (per head, per feed); a field that was already over the
            # count, or a bad trailer, came before the bytes llhttp refuses: report it first,
            # as a check per field would have
            if state == _HEAD:
                if len(self._raw) > self._max_raw:
                    self._too_many_fields()
            elif state == _BODY:
                self._check_trailers(False)
        self._refuse(exc)

    def _refuse(self, exc: Exception) -> None:
        raise ProtocolError(self._err_status, f"malformed message ({exc})") from None

    def _too_many_fields(self) -> None:
        raise ProtocolError(431 if self._err_status == 400 else self._err_status, "too many header fields")

    def _after_feed(self, data: bytes) -> None:
        state = self._state
        if state == _HEAD:
            if self._head_bytes > self._max_head_bytes:
                raise ProtocolError(431 if self._err_status == 400 else self._err_status,
                                    "header section too large")
            if len(self._raw) > self._max_raw:
                self._too_many_fields()
        elif state == _BODY:
            if self._line_pending:
                self._after_feed_line(data)
            if self._raw:
                self._check_trailers(False)

    def _after_feed_line(self, data: bytes) -> None:
        i = data.rfind(b"\n")
        self._line_carry = len(data) - i - 1 if i >= 0 else self._line_carry + len(data)
        if self._line_carry > self._ext_cap:
            raise ProtocolError(self._err_status, "chunk extension too long")

    def _long_ext_line_possible(self, data: bytes) -> bool:
        if self._state == _BODY and not self._chunked:
            return False
        lines = data.split(b"\n")
        cap = self._ext_cap
        if self._line_pending and self._line_carry + len(lines[0]) > cap:
            return True
        return any(len(line) > cap and b";" in line for line in lines)

    def _feed_by_line(self, data: bytes) -> None:
        """Feed one line at a time so the length of each chunk-size line is known."""
        start = 0
        n = len(data)
        while start < n and self._state not in (_TUNNEL, _CLOSED):
            end = data.find(b"\n", start)
            end = n if end < 0 else end + 1
            seg = data[start:end]
            carry = self._line_carry if self._line_pending else 0
            self._chunk_header_seen = False
            if self._state == _HEAD:
                self._head_bytes += len(seg)
            self._feed(seg)
            if self._chunk_header_seen and carry + len(seg) > self._ext_cap + 2:
                raise ProtocolError(self._err_status, "chunk extension too long")
            self._after_feed(seg)
            start = end
        if start < n and self._state == _TUNNEL:
            self._tunnel += data[start:]

    # ------------------------------------------------------------------ shared callbacks

    def _check_trailers(self, complete: bool = True) -> None:
        """Trailer fields (validated by llhttp) are counted and checked in order, never merged;
        dropped once the message is complete."""
        raw = self._raw
        status = self._err_status
        cap = self._max_raw
        for i, (name, value) in enumerate(raw):
            if i >= cap:
                raise ProtocolError(431 if status == 400 else status, "too many trailer fields")
            if value.translate(None, framing.VALUE_CHARS):
                raise ProtocolError(status, "invalid trailer field")
            if name in framing._FRAMING_FIELDS:
                raise ProtocolError(status, "framing field in trailers")
        if complete:
            raw.clear()

    def _on_body_capped(self, data: bytes) -> None:
        self._body_bytes += len(data)
        if self._body_bytes > self._max_body:
            raise ProtocolError(413 if self._err_status == 400 else self._err_status,
                                "body larger than allowed")
        self._handler_body(data)

    def on_chunk_header(self) -> None:
        self._line_pending = False
        self._line_carry = 0
        self._chunk_header_seen = True

    def on_chunk_complete(self) -> None:
        self._line_pending = True
        self._line_carry = 0

    def _head_too_big(self, first_line: int) -> bool:
        """Size of a completed head (start line, ``name: value`` lines, blank line; exact unless
        values had more whitespace around them), computed only when the feed was big."""
        size = first_line + 4
        for name, value in self._raw:
            size += len(name) + len(value) + 4
        return size > self._max_head_bytes


class HttptoolsRequestParser(_Base):
    """Request side of the httptools backend; see :class:`meshproxy.codec.api.RequestParser`."""

    __slots__ = ("_url", "_max_target", "_handler_head")

    def __init__(self, handler: RequestHandler, limits: CodecLimits):
        self._init(handler, limits, 400)
        self._url = b""
        self._max_target = limits.max_target_bytes
        self._handler_head = handler.on_request_head
        self._new_parser()

    def _new_parser(self) -> None:
        # llhttp refuses a well-formed HTTP/d.d it does not know (HTTP/1.2, HTTP/9.9) as malformed;
        # with this leniency it hands the version over and framing answers 505, as the h11
        # backend does.  It relaxes nothing else: bad digits and extra characters stay errors.
        self._parser = httptools.HttpRequestParser(self)
        self._parser.set_dangerous_leniencies(lenient_version=True)

    def _method(self) -> bytes:
        return self._parser.get_method()

    # No on_message_begin: per-message state (the URL, the field list) is reset as soon as
    # the head has been handed over, which saves a callback per request.

    def on_url(self, url: bytes) -> None:
        if self._url:
            url = self._url + url
        self._url = url
        if len(url) > self._max_target:
            raise ProtocolError(414, "request-target too long")

    def _refuse(self, exc: Exception) -> None:
        if isinstance(exc, httptools.HttpParserInvalidMethodError):
            # PRI (an HTTP/2 preface) and other unknown methods
            raise ProtocolError(400, "invalid method") from None
        raise ProtocolError(400, f"malformed request ({exc})") from None

    def on_headers_complete(self) -> None:
        method = self._method()
        url = self._url
        raw = self._raw
        if self._head_bytes > self._max_head_bytes and self._head_too_big(len(method) + len(url) + 10):
            raise ProtocolError(431, "header section too large")
        if len(raw) > self._max_raw:  # before the start line checks, as a per-field count would
            raise ProtocolError(431, "too many header fields")
        head = framing.request_head(method, url, self._message_version(), self._take_fields(), self._limits)
        self._url = b""
        self._keep_alive = head.keep_alive
        # the body starts
        self._state = _BODY
        self._head_bytes = 0
        self._body_bytes = 0
        self._chunked = self._line_pending = head.body_kind == BODY_CHUNKED
        self._line_carry = 0
        if self._sink is not None:
            self._sink.on_request_head(head)      # a C call
        else:
            self._handler_head(head)

    def on_message_complete(self) -> None:
        if self._raw:
            self._check_trailers()
        self._state = _HEAD if self._keep_alive else _CLOSED
        self._head_bytes = 0
        self._line_pending = False
        if self._sink is not None:
            self._sink.on_message_complete()      # a C call
        else:
            self._handler_complete()


class HttptoolsResponseParser(_Base):
    """Response side of the httptools backend; see :class:`meshproxy.codec.api.ResponseParser`.

    A response to HEAD (``expect_no_body``) is cut and parsed by the pure-Python head path,
    because llhttp cannot be told about the request method; the llhttp parser is replaced
    after it."""

    __slots__ = ("_reason", "_skip", "_head_kind", "_py", "_handler_head")

    def __init__(self, handler: ResponseHandler, limits: CodecLimits):
        self._init(handler, limits, 502)
        self._reason = b""
        self._skip = False
        self._head_kind = 0
        self._py = None
        self._handler_head = handler.on_response_head
        self._new_parser()

    def _new_parser(self) -> None:
        self._parser = httptools.HttpResponseParser(self)

    def _status(self) -> int:
        return self._parser.get_status_code()

    def expect_no_body(self) -> None:
        from .h11_backend import H11ResponseParser  # the pure-Python head path

        py = H11ResponseParser(self._handler, self._limits)
        py.expect_no_body()
        py.stop_after_message = True
        self._py = py

    def feed(self, data: bytes) -> None:
        py = self._py
        if py is None or self._state != _HEAD:
            return _Base.feed(self, data)
        py.feed(data)
        if py._state == _TUNNEL:  # the HEAD response is complete: back to llhttp
            self._py = None
            self._new_parser()
            rest = py.unconsumed()
            if rest:
                _Base.feed(self, rest)
        elif py._state == _CLOSED:
            self._state = _CLOSED

    def feed_eof(self) -> None:
        if self._py is not None and self._state == _HEAD:
            self._py.feed_eof()
            return
        state = self._state
        if state == _BODY:
            if self._head_kind == BODY_UNTIL_CLOSE:
                self._state = _CLOSED
                self._handler_complete()
                return
            self._state = _DEAD
            raise ProtocolError(502, "upstream closed before the response was complete")
        if state == _HEAD and self._head_bytes:
            self._state = _DEAD
            raise ProtocolError(502, "upstream closed inside a response head")
        if state != _DEAD and state != _TUNNEL:
            self._state = _CLOSED

    def on_status(self, reason: bytes) -> None:
        self._reason = self._reason + reason if self._reason else reason

    def on_headers_complete(self) -> None:
        status = self._status()
        raw = self._raw
        reason = self._reason
        if self._head_bytes > self._max_head_bytes and self._head_too_big(len(reason) + 13):
            raise ProtocolError(502, "upstream header section too large")
        if len(raw) > self._max_raw:
            raise ProtocolError(502, "too many header fields")
        head = framing.response_head(status, reason, self._message_version(), self._take_fields(),
                                     self._limits, False)
        self._reason = b""
        if status < 200 and status != 101:
            self._skip = True  # 1xx: consumed here, never shown to the handler
            return
        self._keep_alive = head.keep_alive
        self._head_kind = kind = head.body_kind
        # the body starts
        self._state = _BODY
        self._head_bytes = 0
        self._body_bytes = 0
        self._chunked = self._line_pending = kind == BODY_CHUNKED
        self._line_carry = 0
        if self._sink is not None:
            self._sink.on_response_head(head)     # a C call
        else:
            self._handler_head(head)

    def on_message_complete(self) -> None:
        if self._raw:
            self._check_trailers()
        self._head_bytes = 0
        self._line_pending = False
        if self._skip:
            self._skip = False
            self._state = _HEAD
            return
        self._state = _HEAD if self._keep_alive else _CLOSED
        if self._sink is not None:
            self._sink.on_message_complete()      # a C call
        else:
            self._handler_complete()


