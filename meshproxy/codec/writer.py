"""Events back into bytes: request/response heads, chunks and proxy-generated responses.

Everything is ``b"".join`` over precomputed pieces; nothing here validates (the heads
come from :mod:`meshproxy.codec.framing`, which already refused anything unsafe)."""
from __future__ import annotations

from http import HTTPStatus
from typing import Iterable

import cython

Headers = Iterable[tuple[bytes, bytes]]

_REASONS: dict[int, bytes] = {s.value: s.phrase.encode("latin-1") for s in HTTPStatus}
# precomputed "HTTP/1.1 200 OK\r\n" lines for every known status
_STATUS_LINES: dict[int, bytes] = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in _REASONS.items()
}
LAST_CHUNK = b"0\r\n\r\n"
CHUNK_END = b"\r\n"      # after a chunk's data


_FIELD = b": ".join  # (name, value) -> b"name: value", called from C by map()


def _fields(headers: Headers) -> bytes:
    """``name: value CRLF`` for every field, then the blank line; no Python loop per field."""
    block = b"\r\n".join(map(_FIELD, headers))
    return block + b"\r\n\r\n" if block else b"\r\n"


def _put(w, data: bytes):
    """Copy ``data`` to ``w``; return the position after it (compiled only)."""
    n = len(data)
    src = data
    memcpy(w, src, n)
    return w + n


def _head(start: bytes, middle: bytes, end: bytes, headers: list, tail: bytes = b"",
          line_end: bytes = b"") -> bytes:
    """``start + middle + end + line_end`` + ``name: value CRLF`` per field + ``tail`` (field
    lines already encoded) + CRLF, written into one allocation (compiled only: the C version
    of ``_fields``)."""
    size = len(start) + len(middle) + len(end) + len(line_end) + len(tail) + 2
    for name, value in headers:
        size += len(name) + len(value) + 4
    out = PyBytes_FromStringAndSize(cython.NULL, size)
    w = _put(_put(_put(_put(PyBytes_AS_STRING(out), start), middle), end), line_end)
    for name, value in headers:
        w = _put(w, name)
        w[0] = 58        # ":"
        w[1] = 32        # " "
        w = _put(w + 2, value)
        w[0] = 13        # CR
        w[1] = 10        # LF
        w += 2
    w = _put(w, tail)
    w[0] = 13
    w[1] = 10
    return out


def encode_request_head(method: bytes, target: bytes, headers: Headers, tail: bytes = b"") -> bytes:
    """``METHOD target HTTP/1.1`` + fields + ``tail`` (field lines already encoded, each ending
    in CRLF) + blank line (always HTTP/1.1 upstream)."""
    if cython.compiled and type(headers) is list:
        return _head(method, b" ", target, headers, tail, b" HTTP/1.1\r\n")
    block = b"\r\n".join(map(_FIELD, headers))     # _fields, inlined: this runs for every request
    if block:
        return b"%s %s HTTP/1.1\r\n%s\r\n%s\r\n" % (method, target, block, tail)
    return b"%s %s HTTP/1.1\r\n%s\r\n" % (method, target, tail)


def encode_response_head(status: int, reason: bytes, headers: Headers,
                         version: bytes = b"1.1") -> bytes:
    line = _STATUS_LINES.get(status)
    if line is not None and version == b"1.1" and (not reason or reason == _REASONS[status]):
        if cython.compiled and type(headers) is list:
            return _head(line, b"", b"", headers)
        block = b"\r\n".join(map(_FIELD, headers))   # _fields, inlined
        return b"%s%s\r\n\r\n" % (line, block) if block else line + b"\r\n"
    return b"HTTP/%s %d %s\r\n%s" % (version, status, reason, _fields(headers))


# (b"content-length", digits) for the lengths seen so far: a response's framing field
# without formatting the number each time; bounded.
LENGTH_FIELDS: dict[int, tuple[bytes, bytes]] = {}


def content_length_field(n: int) -> tuple[bytes, bytes]:
    """``(b"content-length", b"<n>")``, made once per length (up to 4096 lengths kept)."""
    field = LENGTH_FIELDS.get(n)
    if field is None:
        field = (b"content-length", b"%d" % n)
        if len(LENGTH_FIELDS) < 4096:
            LENGTH_FIELDS[n] = field
    return field


def chunk_head(n: int) -> bytes:
    """The line that opens a chunk of ``n`` (> 0) bytes; the data and CHUNK_END follow it, as
    buffers of their own (written together, vectored: the data is not copied)."""
    return b"%x\r\n" % n


def encode_chunk(data: bytes) -> bytes:
    """One chunk of ``data``; empty data encodes to nothing (an empty chunk would end the body)."""
    if not data:
        return b""
    return b"%x\r\n%s\r\n" % (len(data), data)


def simple_response(status: int, body: bytes = b"", headers: Headers = (),
                    close: bool = True) -> bytes:
    """A complete proxy-generated response (errors: 400/408/413/414/431/501/502/503/504)."""
    if not body:
        body = _REASONS.get(status, b"error") + b"\n"
    parts = [_STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status,
             b"content-type: text/plain\r\ncontent-length: ", str(len(body)).encode(), b"\r\n"]
    if close:
        parts.append(b"connection: close\r\n")
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts += (b"\r\n", body)
    return b"".join(parts)
