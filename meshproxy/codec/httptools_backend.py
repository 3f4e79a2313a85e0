"""The default backend: llhttp (through httptools) tokenises heads and de-chunks bodies.

llhttp in its default strict mode already refuses bare CR/LF, obs-fold, whitespace before the
colon, bad chunk sizes and terminators.  What it does not decide (Content-Length vs
Transfer-Encoding policy, Host, limits, method set, value bytes) is decided by
:mod:`meshproxy.codec.framing` inside ``on_headers_complete``, before the handler sees the head.

Hot path: each header field is appended as ``(name.lower(), value)`` to a list; field checks
and the framing decision happen once per head.  No per-request objects beyond the head and its
header list.  Compiled, llhttp is driven directly through the C API httptools' extension
exports, with C callbacks (see "llhttp driven directly" below); otherwise, and in pure Python,
through httptools' parser objects and their Python-level protocol (``on_header`` and friends).

Two things llhttp cannot tell us are done here with a little bookkeeping:

* the size of a head that has not ended yet: bytes fed while a head is pending are counted;
* the length of a chunk extension (llhttp streams it without a bound, CVE-2024-22019): bytes
  since the last LF are counted while a chunk-size line is pending, and a feed that holds a
  line longer than the bound with a ``;`` in it is fed to llhttp line by line so that the
  line's length is known when ``on_chunk_header`` fires.
"""
from __future__ import annotations

import os

import cython

import httptools

from ..lists import push, with_room
from . import framing
from .api import (
    BODY_CHUNKED,
    BODY_UNTIL_CLOSE,
    COMMON_FIELD_NAMES,
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


def _version(parser) -> bytes:
    """The parsed message's HTTP version: ``b"1.1"``, ``b"1.0"`` or ``b"?"`` (any other: framing
    answers 505).  Compiled, and where :func:`_check_llhttp_layout` found llhttp's struct where
    httptools keeps it, the version is read from that struct: ``get_http_version`` formats a
    str with ``"{}.{}".format`` for every message (~2,300 instructions, 5 % of a request)."""
    if cython.compiled:
        if _llhttp_readable:
            v = _llhttp_version(parser)
            if v == 0x101:
                return b"1.1"
            if v == 0x100:
                return b"1.0"
            if v >= 0:
                return b"?"
    return _VERSIONS.get(parser.get_http_version(), b"?")


def _check_llhttp_layout() -> bool:
    """Whether the compiled :func:`_version` may read the version from llhttp's struct.

    Only for the httptools releases whose ``HttpParser`` layout was read in their source
    (0.6.4 to 0.9.x: the object header, the vtable pointer, then the ``llhttp_t*``; llhttp 8
    and 9 start their struct the same way up to ``http_minor``), and only after real parsers
    of both kinds, fed messages of several versions, report through the struct exactly what
    ``get_http_version`` reports.  Anything else keeps ``get_http_version``."""
    if not cython.compiled:
        return False
    try:
        release = tuple(int(x) for x in httptools.__version__.split(".")[:3])
    except ValueError:
        return False
    if not (0, 6, 4) <= release < (0, 10, 0):
        return False

    class _Sink:
        pass

    samples = ((httptools.HttpRequestParser, b"GET / HTTP/%s\r\nHost: a\r\n\r\n"),
               (httptools.HttpResponseParser, b"HTTP/%s 200 OK\r\nContent-Length: 0\r\n\r\n"))
    for make, template in samples:
        for version in (b"1.0", b"1.1", b"1.2", b"2.0", b"0.9"):
            parser = make(_Sink())
            parser.set_dangerous_leniencies(lenient_version=True)
            try:
                parser.feed_data(template % version)
            except httptools.HttpParserError:
                continue
            major, _, minor = parser.get_http_version().partition(".")
            if _llhttp_version(parser) != int(major) << 8 | int(minor):
                return False
    return True


def llhttp_version_read_directly() -> bool:
    """True when the compiled backend reads message versions from llhttp's struct."""
    return bool(_llhttp_readable)


def _field(name: bytes, value: bytes) -> tuple:
    """``(name.lower(), value.rstrip(b" \t"))`` (llhttp strips leading OWS only), new bytes
    objects only where something changes (compiled only: C scans decide)."""
    p = name
    for i in range(len(name)):
        if 65 <= p[i] <= 90:             # A-Z
            name = name.lower()
            break
    n = len(value)
    p = value
    if n and (p[n - 1] == 32 or p[n - 1] == 9):
        value = value.rstrip(b" \t")
    return (name, value)


_llhttp_readable = _check_llhttp_layout()


# ---------------------------------------------------------------------- llhttp driven directly
#
# Compiled, the parsers drive llhttp themselves through the C functions httptools' extension
# module exports (llhttp_init, llhttp_execute, ...), with C callbacks that append header fields
# to the pending list and call the parser's own methods at C level.  Through httptools'
# Python-level protocol every field costs two C callbacks, two bytes objects, a concatenation
# check and a Python call, and every other event a Python call.  Only for the httptools
# releases whose bundled llhttp.h was read (0.9.x: the struct and callback table declared in
# httptools_backend.pxd), only when every function is found, and only after a self-check
# (_driver_agrees) has fed the same messages through both drivers and seen the same events.
# Anything else, and pure Python, keeps httptools' parser objects.

_HTTP_REQUEST, _HTTP_RESPONSE = 1, 2
_HPE_INVALID_METHOD, _HPE_INVALID_URL, _HPE_INVALID_STATUS = 6, 7, 13
_HPE_PAUSED_UPGRADE, _HPE_USER = 22, 24
_LL_METHOD_COUNT = 47   # llhttp 9's methods are 0-46 (llhttp_method_name aborts on any other)
_LL_FUNCTIONS = (b"llhttp_init", b"llhttp_execute", b"llhttp_get_error_pos", b"llhttp_get_error_reason",
                 b"llhttp_resume_after_upgrade", b"llhttp_set_lenient_version", b"llhttp_method_name")
_ll_driven = False


def _resolve_llhttp(path: bytes) -> bool:
    """Find llhttp's functions in httptools' already loaded extension module (compiled only)."""
    global _ll_init, _ll_execute, _ll_error_pos, _ll_error_reason, _ll_resume_after_upgrade
    global _ll_lenient_version, _LL_METHODS
    handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD)
    if handle == cython.NULL:
        return False
    for name in _LL_FUNCTIONS:
        if dlsym(handle, name) == cython.NULL:
            return False
    _ll_init = cython.cast(_ll_init_fn, dlsym(handle, b"llhttp_init"))
    _ll_execute = cython.cast(_ll_execute_fn, dlsym(handle, b"llhttp_execute"))
    _ll_error_pos = cython.cast(_ll_text_fn, dlsym(handle, b"llhttp_get_error_pos"))
    _ll_error_reason = cython.cast(_ll_text_fn, dlsym(handle, b"llhttp_get_error_reason"))
    _ll_resume_after_upgrade = cython.cast(_ll_parser_fn, dlsym(handle, b"llhttp_resume_after_upgrade"))
    _ll_lenient_version = cython.cast(_ll_flag_fn, dlsym(handle, b"llhttp_set_lenient_version"))
    name_of = cython.cast(_ll_name_fn, dlsym(handle, b"llhttp_method_name"))
    _LL_METHODS = tuple([name_of(i) for i in range(_LL_METHOD_COUNT)])   # get_method's bytes, made once
    _LL_SETTINGS.on_url = _ll_on_url
    _LL_SETTINGS.on_status = _ll_on_status
    _LL_SETTINGS.on_header_field = _ll_on_header_field
    _LL_SETTINGS.on_header_value = _ll_on_header_value
    _LL_SETTINGS.on_headers_complete = _ll_on_headers_complete
    _LL_SETTINGS.on_body = _ll_on_body
    _LL_SETTINGS.on_message_complete = _ll_on_message_complete
    _LL_SETTINGS.on_chunk_header = _ll_on_chunk_header
    _LL_SETTINGS.on_chunk_complete = _ll_on_chunk_complete
    return True


def _lowered(at, n) -> bytes:
    """``at[:n]`` with A-Z lower-cased, made in one copy (compiled only)."""
    out = PyBytes_FromStringAndSize(cython.NULL, n)
    w = PyBytes_AS_STRING(out)
    for i in range(n):
        c = at[i]
        w[i] = c + 32 if 65 <= c <= 90 else c
    return out


# A field name that matches one of api.COMMON_FIELD_NAMES (in any case) is that shared object
# instead of a new copy.  Each common name has a slot of its own in _NAME_SLOTS, found from
# the name's length and its first, middle and last bytes (``| 32``: A-Z as a-z) by a
# multiplicative hash, so a name is compared with one candidate, eight bytes at a time.
# _SLOT_MULT is the first multiplier (in a fixed sequence) that keeps the common names apart.
def _slot(n, first, last, middle, mult) -> int:
    key = n << 24 | (first | 32) << 16 | (last | 32) << 8 | (middle | 32)
    return key * mult >> 24 & 255                 # bits 24-31 of the product (mod 2**32 in C)


def _slot_multiplier() -> int:
    for k in range(100000):
        mult = 2654435761 + 2 * k                  # odd, from Knuth's multiplicative hash
        if len({_slot(len(name), name[0], name[-1], name[len(name) >> 1], mult) for name in COMMON_FIELD_NAMES}) \
                == len(COMMON_FIELD_NAMES):
            return mult
    raise RuntimeError("no collision-free slot multiplier for the common field names")


_SLOT_MULT = _slot_multiplier()
_slots = [None] * 256
for _name in COMMON_FIELD_NAMES:
    assert len(_name) < 32
    _slots[_slot(len(_name), _name[0], _name[-1], _name[len(_name) >> 1], _SLOT_MULT)] = _name
_NAME_SLOTS = tuple(_slots)
del _name, _slots
_WORD_20, _WORD_80 = 0x2020202020202020, 0x8080808080808080   # every byte of a 64-bit word


def _name_slot(at, n) -> int:
    """The _NAME_SLOTS index of the common name ``at[:n]`` matches (in any case), or -1
    (compiled only)."""
    if 0 < n < 32:
        s = _slot(n, at[0], at[n - 1], at[n >> 1], _SLOT_MULT)
        known = _NAME_SLOTS[s]
        if known is not None and len(known) == n:
            # ``byte | 0x20`` equals a common name's byte (a-z, 0-9, "-") only for that byte,
            # its upper case, or a control byte (0x0d, 0x10-0x19), which is refused apart
            p = known
            if n >= 8:                          # eight bytes at a time, the last word overlapping
                i = 0
                while True:
                    j = min(i, n - 8)
                    memcpy(cython.address(w), at + j, 8)
                    memcpy(cython.address(k), p + j, 8)
                    if (w | _WORD_20) ^ k or (w - _WORD_20) & ~w & _WORD_80:
                        break
                    if j == n - 8:
                        return s
                    i += 8
            else:
                for i in range(n):
                    c = at[i]
                    if (c | 32) != p[i] or c < 32:
                        break
                else:
                    return s
    return -1


# The last field seen under each common name, as the very (name, value) tuple handed out
# then: a field whose value is byte-for-byte the same (a response's server, content-type,
# connection, accept-ranges; a client's host, user-agent, accept) is that tuple again, with
# no new value, tuple, or their frees later.  One per worker process (one event loop), shared
# by every connection; values up to _CACHED_VALUE_MAX bytes, so at most ~40 KiB.  Like HPACK's
# never-indexed fields (RFC 7541 section 7.1.3), credentials are never kept, nor the tracing
# fields that differ on every request.  The checks of framing.check_fields still run on every
# field, cached or not.
_CACHED_VALUE_MAX = 128
_FIELDS_ROOM = 16          # a new head's field list holds this many before it reallocates
_UNCACHED_NAMES = frozenset((
    b"authorization", b"cookie", b"set-cookie", b"x-request-id", b"traceparent", b"tracestate",
    b"b3", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid", b"x-b3-sampled",
))
_FIELD_CACHE = [None] * 256
_CACHEABLE_SLOTS = bytes([name is not None and name not in _UNCACHED_NAMES for name in _NAME_SLOTS])


def clear_field_cache() -> None:
    """Forget the kept fields (tests compare runs with and without them)."""
    for i in range(256):
        _FIELD_CACHE[i] = None


# The callbacks mirror httptools' (parser.pyx): a field is complete when the next one starts,
# the head ends or a chunk ends (trailers); an exception is kept and re-raised by _execute.

def _ll_on_url(p, at, n):
    parser = cython.cast(HttptoolsRequestParser, p.data)
    try:
        parser.on_url(at[:n])
    except BaseException as exc:
        parser._cb_error = exc
        return _HPE_USER
    return 0


def _ll_on_status(p, at, n):
    parser = cython.cast(HttptoolsResponseParser, p.data)
    try:
        parser.on_status(b"OK" if n == 2 and at[0] == 79 and at[1] == 75 else at[:n])   # a shared "OK"
    except BaseException as exc:
        parser._cb_error = exc
        return _HPE_USER
    return 0


def _ll_on_header_field(p, at, n):
    parser = cython.cast(_Base, p.data)
    try:
        if parser._hvalue is not None:
            parser._flush_field()
        if parser._hname is None:
            s = _name_slot(at, n)
            parser._hslot = s if s >= 0 and _CACHEABLE_SLOTS[s] else -1
            parser._hname = _NAME_SLOTS[s] if s >= 0 else _lowered(at, n)
        else:
            parser._hname += _lowered(at, n)
            parser._hslot = -1
    except BaseException as exc:
        parser._cb_error = exc
        return _HPE_USER
    return 0


def _ll_on_header_value(p, at, n):
    parser = cython.cast(_Base, p.data)
    try:
        if parser._hvalue is None:
            s = parser._hslot
            if s >= 0:
                kept = _FIELD_CACHE[s]
                if kept is not None:
                    value = cython.cast(tuple, kept)[1]
                    if len(value) == n and memcmp(cython.cast(cython.p_char, value), at, n) == 0:
                        parser._hfield = kept      # the same bytes: the kept tuple, no copy
                        parser._hvalue = value
                        return 0
            parser._hvalue = at[:n]
        else:
            parser._hvalue += at[:n]
            parser._hfield = None              # the value went on: not the kept one
    except BaseException as exc:
        parser._cb_error = exc
        return _HPE_USER
    return 0


def _ll_on_headers_complete(p):
    parser = cython.cast(_Base, p.data)
    try:
        if parser._hvalue is not None:
            parser._flush_field()
        parser.on_headers_complete()
    except BaseException as exc:
        parser._cb_error = exc
        return -1
    return 1 if p.upgrade else 0


def _ll_on_body(p, at, n):
    parser = cython.cast(_Base, p.data)
    try:
        if parser._sink is not None and not parser._max_body:
            parser._sink.on_body(at[:n])           # a C call
        else:
            parser.on_body(at[:n])
    except BaseException as exc:
        parser._cb_error = exc
        return _HPE_USER
    return 0


def _ll_on_message_complete(p):
    parser = cython.cast(_Base, p.data)
    try:
        parser.on_message_complete()
    except BaseException as exc:
        parser._cb_error = exc
        return -1
    return 0


def _ll_on_chunk_header(p):
    parser = cython.cast(_Base, p.data)
    try:
        if parser._hname is not None or parser._hvalue is not None:
            raise ProtocolError(parser._err_status, "invalid headers state")
        parser.on_chunk_header()
    except BaseException as exc:
        parser._cb_error = exc
        return -1
    return 0


def _ll_on_chunk_complete(p):
    parser = cython.cast(_Base, p.data)
    try:
        if parser._hvalue is not None:
            parser._flush_field()
        parser.on_chunk_complete()
    except BaseException as exc:
        parser._cb_error = exc
        return -1
    return 0


class _Base:
    """Shared feeding and callbacks.

    Per-request cost is what this class is shaped around: through httptools' parser objects,
    llhttp calls back into Python about ten times per message, so each callback does as little
    as it can (driven directly, the same methods are C calls).  ``on_header`` is a
    closure that appends ``(name.lower(), value without trailing OWS)`` to a list, with no
    attribute lookups and no checks; the fields are checked once per head by
    :func:`framing.request_head` / :func:`framing.response_head`.  Trailer fields land in the
    same list and are checked at the end of the message.  The field count is checked after
    every feed and before the head is built, so a head that never ends cannot grow the list
    beyond one read.  (Lower-casing and validating all names over one joined block was
    measured too: slower than per-field ``lower`` for typical heads.)"""

    __slots__ = ("_handler", "_limits", "_parser", "_raw", "on_header", "on_body", "_state", "_head_bytes",
                 "_chunked", "_line_pending", "_line_carry", "_ext_cap", "_body_bytes",
                 "_chunk_header_seen", "_tunnel", "_keep_alive", "_err_status", "_max_head_bytes",
                 "_max_raw", "_max_body", "_handler_body", "_handler_complete", "_driven", "_sink")

    def _init(self, handler, limits: CodecLimits, err_status: int) -> None:
        self._handler = handler
        # compiled, a connection driver's events are C calls (MessageHandler's cpdef methods)
        self._sink = handler if cython.compiled and isinstance(handler, MessageHandler) else None
        self._handler_body = handler.on_body
        self._handler_complete = handler.on_message_complete
        self._limits = limits
        self._raw = raw = []  # (lower-cased name, value) of the pending head, or trailers
        self._driven = _ll_driven
        if not self._driven:
            append = raw.append
            lower = bytes.lower
            rstrip = bytes.rstrip

            if cython.compiled:
                def on_header(name: bytes, value: bytes) -> None:
                    append(_field(name, value))
            else:
                def on_header(name: bytes, value: bytes) -> None:
                    append((lower(name), rstrip(value, b" \t")))  # llhttp strips leading OWS only

            self.on_header = on_header  # must be set before the llhttp parser is built
        # without a body cap llhttp hands body bytes straight to the handler (one frame less)
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

    def _drive(self, kind: int) -> None:
        """(Re)start the directly driven llhttp parser for a new stream (compiled only)."""
        ll = cython.address(self._ll)
        _ll_init(ll, kind, cython.address(_LL_SETTINGS))
        ll.data = cython.cast(cython.p_void, self)   # borrowed: the struct lives inside self
        self._hname = self._hvalue = self._hfield = None
        self._hslot = -1
        self._cb_error = None

    def _flush_field(self) -> None:
        # the name is lower-cased already (_lowered); llhttp strips the value's leading OWS only
        field = self._hfield
        if field is None:
            value = self._hvalue
            n = len(value)
            p = value
            if n and (p[n - 1] == 32 or p[n - 1] == 9):
                value = value.rstrip(b" \t")
            field = (self._hname, value)
            if self._hslot >= 0 and len(value) <= _CACHED_VALUE_MAX:
                _FIELD_CACHE[self._hslot] = field
        else:
            self._hfield = None
        push(self._raw, field)
        self._hname = self._hvalue = None

    def _take_fields(self) -> list:
        """The pending head's fields, handed over to the head.  Driven directly, the parser
        then starts a new list; through httptools' parser objects, whose ``on_header``
        closure holds the list, the head gets a copy and the list is emptied."""
        raw = self._raw
        if self._driven:
            self._raw = with_room(_FIELDS_ROOM)
            return raw
        fields = raw[:]
        raw.clear()
        return fields

    def _message_version(self) -> bytes:
        if cython.compiled:
            if self._driven:
                v = self._ll.http_major << 8 | self._ll.http_minor
                return b"1.1" if v == 0x101 else b"1.0" if v == 0x100 else b"?"
        return _version(self._parser)

    def on_headers_complete(self) -> None:   # each side's own
        raise NotImplementedError

    def on_message_complete(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ feeding

    def _execute(self, data) -> None:
        """Run llhttp over ``data``: directly when driven, else through httptools' parser."""
        if cython.compiled:
            if self._driven:
                buf = data if type(data) is bytes else bytes(data)
                err = _ll_execute(cython.address(self._ll), buf, len(buf))
                if err:
                    self._llhttp_failed(err, buf)
                return
        self._parser.feed_data(data)

    def _llhttp_failed(self, err: int, base) -> None:
        """What httptools' feed_data raises for llhttp's ``err`` (compiled only); an exception
        from a callback is raised itself."""
        ll = cython.address(self._ll)
        if err == _HPE_PAUSED_UPGRADE and ll.upgrade == 1:
            offset = ll.error_pos - base
            _ll_resume_after_upgrade(ll)
            raise httptools.HttpParserUpgrade(offset)
        exc = self._cb_error
        if exc is not None:
            self._cb_error = None
            raise exc
        reason = _ll_error_reason(ll)
        text = reason.decode("latin-1") if reason != cython.NULL else ""
        if err == _HPE_INVALID_METHOD:
            raise httptools.HttpParserInvalidMethodError(text)
        if err == _HPE_INVALID_STATUS:
            raise httptools.HttpParserInvalidStatusError(text)
        if err == _HPE_INVALID_URL:
            raise httptools.HttpParserInvalidURLError(text)
        raise httptools.HttpParserError(text)

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
    """Request side of the llhttp backend; see :class:`meshproxy.codec.api.RequestParser`."""

    __slots__ = ("_url", "_max_target", "_handler_head")

    def __init__(self, handler: RequestHandler, limits: CodecLimits):
        self._init(handler, limits, 400)
        self._url = b""
        self._max_target = limits.max_target_bytes
        self._handler_head = handler.on_request_head
        # llhttp refuses a well-formed HTTP/d.d it does not know (HTTP/1.2, HTTP/9.9) as malformed;
        # with this leniency it hands the version over and framing answers 505, as the h11
        # backend does.  It relaxes nothing else: bad digits and extra characters stay errors.
        if cython.compiled:
            if self._driven:
                self._drive(_HTTP_REQUEST)
                _ll_lenient_version(cython.address(self._ll), 1)
                return
        self._parser = httptools.HttpRequestParser(self)
        self._parser.set_dangerous_leniencies(lenient_version=True)

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
        if cython.compiled and self._driven:
            method = _LL_METHODS[self._ll.method]
        else:
            method = self._parser.get_method()
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
    """Response side of the llhttp backend; see :class:`meshproxy.codec.api.ResponseParser`.

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
        if cython.compiled:
            if self._driven:
                self._drive(_HTTP_RESPONSE)
                return
        self._parser = httptools.HttpResponseParser(self)

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
        if cython.compiled and self._driven:
            status = self._ll.status_code
        else:
            status = self._parser.get_status_code()
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


# ---------------------------------------------------------------------- choosing the llhttp driver

class _Recorder:
    """A handler that records what a parser reports (the driver's self-check)."""

    def __init__(self):
        self.events = []

    def on_request_head(self, head) -> None:
        self.events.append(("head", head))

    def on_response_head(self, head) -> None:
        self.events.append(("head", head))

    def on_body(self, data: bytes) -> None:
        self.events.append(("body", bytes(data)))

    def on_message_complete(self) -> None:
        self.events.append(("end",))


# Streams the two drivers must report identically, each fed whole, byte by byte and in two
# halves: fields split across reads, an empty value, trailing OWS, common names in another case
# and a near miss of one, chunked bodies with trailers,
# pipelining, an upgrade, a 1xx, and refusals.
_SELF_CHECK = (
    (True, b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nX-Empty:\r\nUser-Agent: t \t\r\nAccept: */*\r\nHosu: n\r\n"
           b"CONTENT-TYPE: a\r\n\r\n"
           b"POST /p HTTP/1.0\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"),
    (True, b"PUT /u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3;e=v\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\nGET / HTTP/1.1\r\nHost: y\r\n\r\n"),
    (True, b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nraw bytes"),
    (True, b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n"),
    (True, b"BREW / HTTP/1.1\r\nHost: x\r\n\r\n"),
    (False, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 2\r\n\r\nok"
            b"HTTP/1.1 204 No Content\r\nDate: d\r\n\r\n"),
    (False, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nT: v\r\n\r\n"),
    (False, b"HTTP/1.1 2000 OK\r\n\r\n"),
)


def _run_self_check_stream(request: bool, data: bytes, cuts: list) -> list:
    rec = _Recorder()
    parser = HttptoolsRequestParser(rec, CodecLimits()) if request else HttptoolsResponseParser(rec, CodecLimits())
    start = 0
    try:
        for end in cuts + [len(data)]:
            if end > start:
                parser.feed(data[start:end])
            start = end
    except ProtocolError as err:
        rec.events.append(("error", err.status, err.reason))
    rec.events.append(("tunnel", parser.unconsumed()))
    return rec.events


def _driver_agrees() -> bool:
    """Whether the directly driven llhttp reports what httptools' parser objects report."""
    global _ll_driven
    for request, data in _SELF_CHECK:
        for cuts in ([], list(range(1, len(data))), [len(data) // 2]):
            _ll_driven = False
            expected = _run_self_check_stream(request, data, cuts)
            _ll_driven = True
            try:
                seen = _run_self_check_stream(request, data, cuts)
            finally:
                _ll_driven = False
            if seen != expected:
                return False
    return True


def _choose_llhttp_driver() -> bool:
    if not cython.compiled:
        return False
    try:
        release = tuple(int(x) for x in httptools.__version__.split(".")[:3])
    except ValueError:
        return False
    if not (0, 9, 0) <= release < (0, 10, 0):
        return False
    from httptools.parser import parser as extension
    if not _resolve_llhttp(os.fsencode(extension.__file__)):
        return False
    return _driver_agrees()


_ll_driven = _choose_llhttp_driver()


def llhttp_driven_directly() -> bool:
    """True when the compiled backend drives llhttp itself instead of through httptools' parser
    objects (see the section above)."""
    return bool(_ll_driven)
