"""The llhttp backend: the httptools backend's parsers, driving llhttp through its C API.

Compiled only.  httptools' extension module links llhttp in and exports its functions
(llhttp_init, llhttp_execute, ...); this module finds them with dlopen/dlsym and runs llhttp
with C callbacks that append header fields to the pending list and call the parser's own
methods at C level.  Through httptools' Python-level protocol every field costs two C
callbacks, two bytes objects, a concatenation check and a Python call, and every other event
a Python call.

Everything above llhttp (limits, chunk-extension bookkeeping, framing, the handler calls) is
the httptools backend's (:mod:`meshproxy.codec.httptools_backend`): the parsers here override
only how llhttp is started and run and how the method, status and version are read.

The driver is used only for the httptools releases whose bundled llhttp.h was read (0.9.x:
the struct and callback table declared in llhttp_driver.pxd), only when every function is
found, and only after a self-check (:func:`_driver_agrees`) has fed the same messages through
both backends and seen the same events.  Otherwise, and in pure Python, :func:`available` is
false and the ``llhttp`` backend is not offered (``httptools`` is the default then).
"""
from __future__ import annotations

import os

import cython

import httptools

from .api import COMMON_FIELD_NAMES, CodecLimits, ProtocolError
from .httptools_backend import HttptoolsRequestParser, HttptoolsResponseParser, _Base

_HTTP_REQUEST, _HTTP_RESPONSE = 1, 2
_HPE_INVALID_METHOD, _HPE_INVALID_URL, _HPE_INVALID_STATUS = 6, 7, 13
_HPE_PAUSED_UPGRADE, _HPE_USER = 22, 24
_LL_METHOD_COUNT = 47   # llhttp 9's methods are 0-46 (llhttp_method_name aborts on any other)
_LL_FUNCTIONS = (b"llhttp_init", b"llhttp_execute", b"llhttp_get_error_pos", b"llhttp_get_error_reason",
                 b"llhttp_resume_after_upgrade", b"llhttp_set_lenient_version", b"llhttp_method_name")
_ll_driven = False


def _resolve_llhttp(path: bytes) -> bool:
    """Find llhttp's functions in httptools' already loaded extension module."""
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
    """``at[:n]`` with A-Z lower-cased, made in one copy."""
    out = PyBytes_FromStringAndSize(cython.NULL, n)
    w = PyBytes_AS_STRING(out)
    for i in range(n):
        c = at[i]
        w[i] = c + 32 if 65 <= c <= 90 else c
    return out


# A field name that matches one of api.COMMON_FIELD_NAMES (in any case) is that shared object
# instead of a new copy.  Each common name has a slot of its own in _NAME_SLOTS, found from
# the name's length and its first, middle and last bytes (``| 32``: A-Z as a-z) by a
# multiplicative hash, so a name is compared with one candidate.
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


def _name_slot(at, n) -> int:
    """The _NAME_SLOTS index of the common name ``at[:n]`` matches (in any case), or -1."""
    if 0 < n < 32:
        s = _slot(n, at[0], at[n - 1], at[n >> 1], _SLOT_MULT)
        known = _NAME_SLOTS[s]
        if known is not None and len(known) == n:
            # llhttp hands over token bytes only (ASCII); a byte matches a common name's (a-z,
            # 0-9, "-") only as itself or its upper case, in any locale
            if strncasecmp(at, known, n) == 0:
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
_UNCACHED_NAMES = frozenset((
    b"authorization", b"cookie", b"set-cookie", b"x-request-id", b"traceparent", b"tracestate",
    b"b3", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid", b"x-b3-sampled",
))
_FIELD_CACHE = [None] * 256
_VIEW_MIN = 4096           # response body bytes from which a view of the read beats a copy
_CACHEABLE_SLOTS = bytes([name is not None and name not in _UNCACHED_NAMES for name in _NAME_SLOTS])


def clear_field_cache() -> None:
    """Forget the kept fields (tests compare runs with and without them)."""
    for i in range(256):
        _FIELD_CACHE[i] = None


class _Llhttp:
    """One llhttp parser (its struct lives inside this object) and the header field it is
    reading, for the parser that owns it (``owner``, borrowed: the owner holds this object as
    its ``_parser``).  Stands where httptools' parser object would: :meth:`execute` raises
    what httptools' ``feed_data`` raises."""

    def __init__(self, owner: _Base, kind: int):
        _ll_init(cython.address(self.c), kind, cython.address(_LL_SETTINGS))
        self.c.data = cython.cast(cython.p_void, self)   # borrowed: the struct lives inside self
        self.owner = cython.cast(cython.p_void, owner)
        self.buf = None
        self.views = kind == _HTTP_RESPONSE
        self.hname = self.hvalue = self.hfield = None
        self.hslot = -1
        self.cb_error = None

    def execute(self, data) -> None:
        buf = data if type(data) is bytes else bytes(data)
        self.buf = buf                         # what body() hands out without a copy
        err = _ll_execute(cython.address(self.c), buf, len(buf))
        self.buf = None
        if err:
            self.failed(err, buf)

    def body(self, at, n: int):
        """Body bytes ``at[:n]``, which lie inside the read being parsed: that read itself when
        they are all of it; for a response, a read-only view of it when they are a large part
        (the exchange writes them out as they are, vectored with the head); otherwise a copy."""
        buf = self.buf
        start = at - PyBytes_AS_STRING(buf)
        if start == 0 and n == len(buf):
            return buf
        if self.views and n >= _VIEW_MIN:
            return memoryview(buf)[start:start + n]
        return at[:n]

    def failed(self, err: int, base) -> None:
        """What httptools' feed_data raises for llhttp's ``err``; an exception from a callback
        is raised itself."""
        c = cython.address(self.c)
        if err == _HPE_PAUSED_UPGRADE and c.upgrade == 1:
            offset = c.error_pos - base
            _ll_resume_after_upgrade(c)
            raise httptools.HttpParserUpgrade(offset)
        exc = self.cb_error
        if exc is not None:
            self.cb_error = None
            raise exc
        reason = _ll_error_reason(c)
        text = reason.decode("latin-1") if reason != cython.NULL else ""
        if err == _HPE_INVALID_METHOD:
            raise httptools.HttpParserInvalidMethodError(text)
        if err == _HPE_INVALID_STATUS:
            raise httptools.HttpParserInvalidStatusError(text)
        if err == _HPE_INVALID_URL:
            raise httptools.HttpParserInvalidURLError(text)
        raise httptools.HttpParserError(text)

    def version(self) -> bytes:
        v = self.c.http_major << 8 | self.c.http_minor
        return b"1.1" if v == 0x101 else b"1.0" if v == 0x100 else b"?"

    def flush_field(self) -> None:
        # the name is lower-cased already (_lowered); llhttp strips the value's leading OWS only
        field = self.hfield
        if field is None:
            value = self.hvalue
            n = len(value)
            p = value
            if n and (p[n - 1] == 32 or p[n - 1] == 9):
                value = value.rstrip(b" \t")
            field = (self.hname, value)
            if self.hslot >= 0 and len(value) <= _CACHED_VALUE_MAX:
                _FIELD_CACHE[self.hslot] = field
        else:
            self.hfield = None
        cython.cast(_Base, self.owner)._raw.append(field)
        self.hname = self.hvalue = None


# The callbacks mirror httptools' (parser.pyx): a field is complete when the next one starts,
# the head ends or a chunk ends (trailers); an exception is kept and re-raised by execute.

def _ll_on_url(p, at, n):
    ll = cython.cast(_Llhttp, p.data)
    try:
        cython.cast(HttptoolsRequestParser, ll.owner).on_url(at[:n])
    except BaseException as exc:
        ll.cb_error = exc
        return _HPE_USER
    return 0


def _ll_on_status(p, at, n):
    ll = cython.cast(_Llhttp, p.data)
    try:
        # a shared "OK"
        cython.cast(HttptoolsResponseParser, ll.owner).on_status(
            b"OK" if n == 2 and at[0] == 79 and at[1] == 75 else at[:n])
    except BaseException as exc:
        ll.cb_error = exc
        return _HPE_USER
    return 0


def _ll_on_header_field(p, at, n):
    ll = cython.cast(_Llhttp, p.data)
    try:
        if ll.hvalue is not None:
            ll.flush_field()
        if ll.hname is None:
            s = _name_slot(at, n)
            ll.hslot = s if s >= 0 and _CACHEABLE_SLOTS[s] else -1
            ll.hname = _NAME_SLOTS[s] if s >= 0 else _lowered(at, n)
        else:
            ll.hname += _lowered(at, n)
            ll.hslot = -1
    except BaseException as exc:
        ll.cb_error = exc
        return _HPE_USER
    return 0


def _ll_on_header_value(p, at, n):
    ll = cython.cast(_Llhttp, p.data)
    try:
        if ll.hvalue is None:
            s = ll.hslot
            if s >= 0:
                kept = _FIELD_CACHE[s]
                if kept is not None:
                    value = cython.cast(tuple, kept)[1]
                    if len(value) == n and memcmp(cython.cast(cython.p_char, value), at, n) == 0:
                        ll.hfield = kept          # the same bytes: the kept tuple, no copy
                        ll.hvalue = value
                        return 0
            ll.hvalue = at[:n]
        else:
            ll.hvalue += at[:n]
            ll.hfield = None                  # the value went on: not the kept one
    except BaseException as exc:
        ll.cb_error = exc
        return _HPE_USER
    return 0


def _ll_on_headers_complete(p):
    ll = cython.cast(_Llhttp, p.data)
    try:
        if ll.hvalue is not None:
            ll.flush_field()
        cython.cast(_Base, ll.owner).on_headers_complete()
    except BaseException as exc:
        ll.cb_error = exc
        return -1
    return 1 if p.upgrade else 0


def _ll_on_body(p, at, n):
    ll = cython.cast(_Llhttp, p.data)
    try:
        parser = cython.cast(_Base, ll.owner)
        if parser._sink is not None and not parser._max_body:
            parser._sink.on_body(ll.body(at, n))   # a C call
        else:
            parser.on_body(ll.body(at, n))
    except BaseException as exc:
        ll.cb_error = exc
        return _HPE_USER
    return 0


def _ll_on_message_complete(p):
    ll = cython.cast(_Llhttp, p.data)
    try:
        cython.cast(_Base, ll.owner).on_message_complete()
    except BaseException as exc:
        ll.cb_error = exc
        return -1
    return 0


def _ll_on_chunk_header(p):
    ll = cython.cast(_Llhttp, p.data)
    try:
        parser = cython.cast(_Base, ll.owner)
        if ll.hname is not None or ll.hvalue is not None:
            raise ProtocolError(parser._err_status, "invalid headers state")
        parser.on_chunk_header()
    except BaseException as exc:
        ll.cb_error = exc
        return -1
    return 0


def _ll_on_chunk_complete(p):
    ll = cython.cast(_Llhttp, p.data)
    try:
        if ll.hvalue is not None:
            ll.flush_field()
        cython.cast(_Base, ll.owner).on_chunk_complete()
    except BaseException as exc:
        ll.cb_error = exc
        return -1
    return 0


class LlhttpRequestParser(HttptoolsRequestParser):
    """:class:`HttptoolsRequestParser` with llhttp driven directly."""

    def _new_parser(self) -> None:
        ll = _Llhttp(self, _HTTP_REQUEST)
        _ll_lenient_version(cython.address(ll.c), 1)     # as HttptoolsRequestParser._new_parser
        self._parser = ll

    def _execute(self, data) -> None:
        cython.cast(_Llhttp, self._parser).execute(data)

    def _message_version(self) -> bytes:
        return cython.cast(_Llhttp, self._parser).version()

    def _method(self) -> bytes:
        return _LL_METHODS[cython.cast(_Llhttp, self._parser).c.method]


class LlhttpResponseParser(HttptoolsResponseParser):
    """:class:`HttptoolsResponseParser` with llhttp driven directly."""

    def _new_parser(self) -> None:
        self._parser = _Llhttp(self, _HTTP_RESPONSE)

    def _execute(self, data) -> None:
        cython.cast(_Llhttp, self._parser).execute(data)

    def _message_version(self) -> bytes:
        return cython.cast(_Llhttp, self._parser).version()

    def _status(self) -> int:
        return cython.cast(_Llhttp, self._parser).c.status_code


# ---------------------------------------------------------------------- the self-check

class _Recorder:
    """A handler that records what a parser reports."""

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


# Streams the two backends must report identically, each fed whole, byte by byte and in two
# halves: fields split across reads, an empty value, trailing OWS, common names in another case
# and a near miss of one, chunked bodies with trailers, pipelining, an upgrade, a 1xx, and
# refusals.
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


def run_self_check_stream(parsers: tuple, request: bool, data: bytes, cuts: list) -> list:
    """The events ``parsers`` (a request and a response parser class) report for ``data`` fed
    in pieces ending at ``cuts``."""
    rec = _Recorder()
    parser = parsers[0 if request else 1](rec, CodecLimits())
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
    for request, data in _SELF_CHECK:
        for cuts in ([], list(range(1, len(data))), [len(data) // 2]):
            expected = run_self_check_stream((HttptoolsRequestParser, HttptoolsResponseParser), request, data, cuts)
            seen = run_self_check_stream((LlhttpRequestParser, LlhttpResponseParser), request, data, cuts)
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


def available() -> bool:
    """True when the llhttp backend may be used: compiled, with an httptools whose llhttp was
    found and agreed with httptools' own parser objects (see the module's docstring)."""
    return bool(_ll_driven)
