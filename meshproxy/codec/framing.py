"""The framing rules a proxy must enforce, once, above both parser backends.

A backend tokenises bytes into a start line and a list of fields; everything that decides
*where a message ends* or *whether it may be forwarded at all* lives here:

* :func:`request_head` / :func:`response_head` turn (start line, fields) into the head the
  handler sees, after checking field names (tokens), field values (no NUL/CR/LF/CTL),
  Content-Length (digits, identical duplicates merged, no overflow), Transfer-Encoding
  (only a single final ``chunked``), CL together with TE, Host (exactly one on HTTP/1.1, valid),
  HTTP/1.0 with TE, and the count / size / target limits of :class:`CodecLimits`.
* :func:`scan_head` checks the raw bytes of a head for what a tokenizer may forgive
  (bare LF, bare CR, obs-fold, whitespace before the first field line).
* :class:`BodyReader` delimits a body by Content-Length, strict chunked coding
  (1*HEXDIG sizes without overflow, bounded extensions, CRLF terminators, trailers parsed and
  dropped) or connection close.

Nothing here does I/O.  Every function raises :class:`ProtocolError` with the status the peer
should get (responses use 502 via ``error_status``).
"""
from __future__ import annotations

import re

import cython

from .api import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    BODY_UNTIL_CLOSE,
    CodecLimits,
    Headers,
    ProtocolError,
    RequestHead,
    ResponseHead,
    name_set,
)

# RFC 9110 §5.6.2 tchar
TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# RFC 9110 §5.5 field-value bytes: VCHAR / obs-text / SP / HTAB
VALUE_CHARS = bytes([9]) + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
# request-target bytes: VCHAR only (RFC 3986 is stricter still; we refuse what cannot be forwarded safely)
TARGET_CHARS = bytes(range(0x21, 0x7F))
DIGITS = b"0123456789"
# The same sets as translate tables (allowed byte -> 1, any other -> 0): ``0 in
# data.translate(table)`` is one table pass and a memchr, about half the cost of
# ``data.translate(None, deletechars)``, which rebuilds its table on every call.
_TCHAR_OK, _VALUE_OK, _TARGET_OK = (bytes(c in chars for c in range(256))
                                    for chars in (TCHAR, VALUE_CHARS, TARGET_CHARS))

# The methods llhttp recognises (strict request mode); both backends refuse others alike.
KNOWN_METHODS = frozenset(
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH "
    b"SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY "
    b"SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY".split()
)

_MAX_CL_DIGITS = 18          # < 2**63; more (after leading zeros) is refused, never wrapped
_MAX_CHUNK_SIZE_DIGITS = 16  # 64-bit
_HOST_RE = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?\Z"
)
_ABSOLUTE_RE = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://([^/?#]*)(.*)\Z", re.S)
_CHUNK_EXT_RE = re.compile(
    rb"(?:[ \t]*;[ \t]*[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
    rb"(?:[ \t]*=[ \t]*(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+|\"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*\"))?)*\Z"
)
_HEX = frozenset(b"0123456789abcdefABCDEF")
# RFC 9110 §6.5.1: fields that frame the message never come from trailers (llhttp refuses them)
_FRAMING_FIELDS = name_set((b"content-length", b"transfer-encoding"))


def _bad_name(names: bytes) -> bool:
    return bool(names.translate(None, TCHAR))


def check_fields(headers: Headers, limits: CodecLimits, status: int = 400) -> None:
    """Field names are non-empty tokens, values carry no NUL/CR/LF/CTL, count within limit."""
    _checked_fields(headers, limits, status)


# every byte of a 64-bit word: the word-at-a-time scan of field values (compiled only)
_WORD_01, _WORD_20, _WORD_7F, _WORD_80 = (0x0101010101010101, 0x2020202020202020, 0x7F7F7F7F7F7F7F7F,
                                          0x8080808080808080)


def _checked_fields(headers: Headers, limits: CodecLimits, status: int) -> tuple[bytes, ...]:
    """:func:`check_fields`, returning the field names for the framing dispatch.

    One ``zip(*headers)`` and C-level joins and scans instead of Python loops over fields."""
    if len(headers) > limits.max_header_count:
        raise ProtocolError(431 if status == 400 else status, "too many header fields")
    if not headers:
        return ()
    if cython.compiled and type(headers) is list:
        # the same checks as C loops over each field's bytes (no joined copies), the names
        # tuple filled in place
        fields = headers
        count = len(fields)
        bad = empty = False
        names_out = PyTuple_New(count)
        tchar, vchar = _TCHAR_OK, _VALUE_OK
        for k in range(count):
            name, value = fields[k]
            n = len(name)
            empty |= n == 0
            p = name
            for i in range(n):
                bad |= not tchar[p[i]]
            n = len(value)
            p = value
            i = 0
            while i + 8 <= n:                  # eight bytes at a time while none is below 0x20 or DEL
                memcpy(cython.address(w), p + i, 8)
                d = w ^ _WORD_7F
                if ((w - _WORD_20) & ~w | (d - _WORD_01) & ~d) & _WORD_80:
                    break                      # the byte loop decides (HTAB is allowed)
                i += 8
            while i < n:
                bad |= not vchar[p[i]]
                i += 1
            Py_INCREF(name)                    # the tuple takes a reference
            PyTuple_SET_ITEM(names_out, k, name)
        if bad:
            raise ProtocolError(status, "invalid header field")
        if empty:
            raise ProtocolError(status, "empty header field name")
        return names_out
    names, values = zip(*headers)
    if 0 in b"".join(names).translate(_TCHAR_OK) or 0 in b"".join(values).translate(_VALUE_OK):
        raise ProtocolError(status, "invalid header field")
    if b"" in names:
        raise ProtocolError(status, "empty header field name")
    return names


def _none_of(fields: frozenset, names: tuple) -> bool:
    """``fields.isdisjoint(names)`` (compiled: a C loop of set lookups, no method call)."""
    if cython.compiled:
        for name in names:
            if name in fields:
                return False
        return True
    return fields.isdisjoint(names)


def field_index(names: tuple[bytes, ...], name: bytes) -> int:
    """Where the field ``name`` is in ``names``: its index when it occurs once, -1 when it
    does not occur, -2 when it occurs more than once."""
    if cython.compiled:
        # one C pass: length, then bytes, compared in place
        found = -1
        n = len(name)
        a = name
        for i in range(len(names)):
            item = names[i]
            b = item
            if len(item) == n and memcmp(a, b, n) == 0:
                if found != -1:
                    return -2
                found = i
        return found
    count = names.count(name)
    if count == 1:
        return names.index(name)
    return -2 if count else -1


def _framing_indices(names: tuple[bytes, ...]) -> tuple[int, int, int]:
    """:func:`field_index` of content-length, transfer-encoding and connection, the fields a
    response is framed by (compiled: one pass over ``names`` instead of three)."""
    if cython.compiled:
        cl = te = conn = -1
        for i in range(len(names)):
            item = names[i]
            n = len(item)
            p = item
            if n == 14:
                if memcmp(p, b"content-length", 14) == 0:
                    cl = i if cl == -1 else -2
            elif n == 17:
                if memcmp(p, b"transfer-encoding", 17) == 0:
                    te = i if te == -1 else -2
            elif n == 10:
                if memcmp(p, b"connection", 10) == 0:
                    conn = i if conn == -1 else -2
        return cl, te, conn
    return (field_index(names, b"content-length"), field_index(names, b"transfer-encoding"),
            field_index(names, b"connection"))


def _values_of(name: bytes, names: tuple[bytes, ...], headers: Headers) -> list[bytes]:
    """Every value of field ``name`` (known to be present), in order."""
    i = field_index(names, name)
    if i >= 0:
        return [headers[i][1]]
    return [v for n, v in headers if n == name]


def _content_length(values: list[bytes], status: int) -> int:
    """RFC 9110 §8.6: Content-Length = 1*DIGIT, no overflow.

    RFC 9112 §6.3 *allows* merging identical duplicates (``42, 42`` or two equal lines);
    llhttp refuses them, and so do we, so that both backends give one verdict."""
    if len(values) != 1:
        raise ProtocolError(status, "more than one Content-Length")
    part = values[0]
    if not part or part.translate(None, DIGITS):
        raise ProtocolError(status, "invalid Content-Length")
    stripped = part.lstrip(b"0") or b"0"
    if len(stripped) > _MAX_CL_DIGITS:
        raise ProtocolError(status, "Content-Length too large")
    return int(stripped)


def _short_digits(value: bytes) -> int:
    """The number ``value`` spells when it is 1 to 15 ASCII digits (what :func:`_content_length`
    returns for it), else -1 (compiled: a C loop; pure Python: always -1, the memo decides)."""
    if cython.compiled:
        n = len(value)
        if n == 0 or n > 15:
            return -1
        p = value
        total = 0
        for i in range(n):
            if not 48 <= p[i] <= 57:
                return -1
            total = total * 10 + (p[i] - 48)
        return total
    return -1


def _transfer_codings(values: list[bytes]) -> list[bytes]:
    codings = []
    for raw in values:
        for part in raw.split(b","):
            part = part.strip(b" \t")
            if part:  # RFC 9110 §5.6.1: empty list elements are ignored
                codings.append(part.lower())
    return codings


def _te_is_chunked(values: list[bytes], status: int, unknown_status: int) -> None:
    """Only a single, final ``chunked`` is forwardable (RFC 9112 §6.1, §6.3)."""
    codings = _transfer_codings(values)
    if codings == [b"chunked"]:
        return
    if codings and codings[-1] == b"chunked" and codings.count(b"chunked") == 1 \
            and all(not c.translate(None, TCHAR) for c in codings):
        # a well-formed coding we do not implement in front of chunked (gzip, chunked)
        raise ProtocolError(unknown_status, "unsupported transfer-coding")
    raise ProtocolError(status, "Transfer-Encoding is not a single final chunked")


# the Connection values nearly every client sends, already split and lower-cased
_COMMON_CONNECTION = {v: frozenset((v.lower(),)) for v in (b"keep-alive", b"Keep-Alive", b"close", b"Close")}


def connection_tokens(values) -> frozenset[bytes] | set[bytes]:
    """The lower-cased tokens of every Connection field value (RFC 9110 §7.6.1)."""
    if len(values) == 1:
        common = _COMMON_CONNECTION.get(values[0])
        if common is not None:
            return common
    out = set()
    for raw in values:
        for part in raw.split(b","):
            part = part.strip(b" \t").lower()
            if part:
                out.add(part)
    return out


def split_target(method: bytes, target: bytes) -> tuple[bytes, bytes]:
    """(authority or b"", path) for the four request-target forms."""
    if target[:1] == b"/":
        return b"", target
    if target == b"*":
        return b"", b"/"
    if method == b"CONNECT":
        return target, b"/"
    m = _ABSOLUTE_RE.match(target)
    if m is None:
        raise ProtocolError(400, "invalid request-target")
    authority, rest = m.group(1), m.group(2)
    if b"@" in authority or not authority:
        raise ProtocolError(400, "invalid authority in request-target")
    if not rest:
        rest = b"/"
    elif rest[:1] != b"/":
        rest = b"/" + rest
    return authority, rest


def _target_ok(target: bytes) -> bool:
    """Whether every byte of ``target`` may appear in a request-target."""
    if cython.compiled:
        ok = _TARGET_OK
        p = target
        bad = False
        for i in range(len(target)):
            bad |= not ok[p[i]]
        return not bad
    return 0 not in target.translate(_TARGET_OK)


def _new_request_head(method, target, version, headers, host, path, body_kind, content_length,
                      keep_alive, upgrade, expect_continue, names) -> RequestHead:
    """``RequestHead(...)``; compiled, the fields are stored at C level (no argument parsing)."""
    if cython.compiled:
        head = RequestHead.__new__(RequestHead)
        head.method, head.target, head.version, head.headers = method, target, version, headers
        head.host, head.path, head.body_kind, head.content_length = host, path, body_kind, content_length
        head.keep_alive, head.upgrade, head.expect_continue, head.names = keep_alive, upgrade, expect_continue, names
        return head
    return RequestHead(method, target, version, headers, host, path, body_kind, content_length,
                       keep_alive, upgrade, expect_continue, names)


def _new_response_head(status, reason, version, headers, body_kind, content_length, keep_alive,
                       names) -> ResponseHead:
    """``ResponseHead(...)``; compiled, the fields are stored at C level."""
    if cython.compiled:
        head = ResponseHead.__new__(ResponseHead)
        head.status, head.reason, head.version, head.headers = status, reason, version, headers
        head.body_kind, head.content_length, head.keep_alive, head.names = body_kind, content_length, keep_alive, names
        return head
    return ResponseHead(status, reason, version, headers, body_kind, content_length, keep_alive, names)


def request_head(method: bytes, target: bytes, version: bytes, headers: Headers,
                 limits: CodecLimits) -> RequestHead:
    """Apply every request framing rule; return the head the handler sees."""
    if method not in KNOWN_METHODS:
        raise ProtocolError(400, "unknown or invalid method")
    if len(target) > limits.max_target_bytes:
        raise ProtocolError(414, "request-target too long")
    if not target or not _target_ok(target):
        raise ProtocolError(400, "invalid request-target")
    if version != b"1.1" and version != b"1.0":
        raise ProtocolError(505, "HTTP version not supported")
    names = _checked_fields(headers, limits, 400)
    host_index = field_index(names, b"host")
    if host_index >= 0 and target[:1] == b"/":
        if _none_of(_REQUEST_FRAMING_FIELDS, names):
            # The common head, decided with C-level scans of ``names``: one Host, origin-form
            # target, and no CL/TE/Upgrade/Expect, so no body; keep-alive by version and
            # Connection (the same outcome _request_tail reaches for it, without the loop
            # over fields).
            host = headers[host_index][1]
            if host not in _VALID_HOSTS and not _valid_host(host):
                raise ProtocolError(400, "invalid Host")
            if field_index(names, b"connection") != -1:
                keep_alive = _persistence(version, _values_of(b"connection", names, headers))[1]
            else:
                keep_alive = version == b"1.1"
            return _new_request_head(method, target, version, headers, host, target, BODY_NONE, -1,
                                     keep_alive, b"connect" if method == b"CONNECT" else b"", False, names)
        if _none_of(_REQUEST_RARE_FIELDS, names):
            # one Host and at most Content-Length / Connection among the framing fields
            return _request_tail(
                method, target, version, headers, limits, [headers[host_index][1]],
                _values_of(b"content-length", names, headers) if b"content-length" in names else (),
                (), _values_of(b"connection", names, headers) if b"connection" in names else (), b"", False,
                names)
    return _request_framing(method, target, version, headers, limits, names)


_REQUEST_RARE_FIELDS = name_set((b"transfer-encoding", b"upgrade", b"expect"))
_REQUEST_FRAMING_FIELDS = name_set(_REQUEST_RARE_FIELDS | {b"content-length"})
# Host values already matched by _HOST_RE: a memo of a pure function (a dict lookup costs less
# than the regex), bounded in entries and entry size, so at most ~1 MB per worker process.
_VALID_HOSTS: dict[bytes, None] = {}
_VALID_HOSTS_MAX = 4096   # beyond this, new values are matched every time
_VALID_HOST_MAX_LEN = 261  # a DNS name (253) + ":" + port; longer values are never memoized


def _valid_host(host: bytes) -> bool:
    if _HOST_RE.match(host) is None:
        return False
    if len(_VALID_HOSTS) < _VALID_HOSTS_MAX and len(host) <= _VALID_HOST_MAX_LEN:
        _VALID_HOSTS[host] = None
    return True


def _request_framing(method: bytes, target: bytes, version: bytes, headers: Headers,
                     limits: CodecLimits, names: tuple) -> RequestHead:
    host_values: list[bytes] = []
    cl_values: list[bytes] = []
    te_values: list[bytes] = []
    conn_values: list[bytes] = []
    upgrade = b""
    expect_continue = False
    for name, value in headers:
        # names are lower-case; dispatch only on the few that frame or route
        if name == b"host":
            host_values.append(value)
        elif name == b"content-length":
            cl_values.append(value)
        elif name == b"transfer-encoding":
            te_values.append(value)
        elif name == b"connection":
            conn_values.append(value)
        elif name == b"upgrade":
            upgrade = value
        elif name == b"expect":
            expect_continue = value.lower() == b"100-continue"
    return _request_tail(method, target, version, headers, limits, host_values, cl_values, te_values,
                         conn_values, upgrade, expect_continue, names)


def _request_tail(method: bytes, target: bytes, version: bytes, headers: Headers, limits: CodecLimits,
                  host_values, cl_values, te_values, conn_values, upgrade: bytes,
                  expect_continue: bool, names: tuple) -> RequestHead:
    if len(host_values) > 1:
        raise ProtocolError(400, "more than one Host field")
    host = host_values[0] if host_values else b""
    if host_values and host not in _VALID_HOSTS and not _valid_host(host):
        raise ProtocolError(400, "invalid Host")
    if not host_values and version == b"1.1":
        raise ProtocolError(400, "missing Host")

    if target[:1] == b"/":  # origin-form, the common case (split_target's first branch)
        path = target
    else:
        authority, path = split_target(method, target)
        if authority:
            if _HOST_RE.match(authority) is None:
                raise ProtocolError(400, "invalid authority")
            host = authority  # RFC 9112 §3.2.2: the target's authority wins over Host

    content_length = -1
    body_kind = BODY_NONE
    if te_values:
        if version == b"1.0":
            raise ProtocolError(400, "Transfer-Encoding on HTTP/1.0")
        if cl_values:
            raise ProtocolError(400, "both Content-Length and Transfer-Encoding")
        _te_is_chunked(te_values, 400, 501)
        body_kind = BODY_CHUNKED
    elif cl_values:
        content_length = _content_length(cl_values, 400)
        if limits.max_body_bytes and content_length > limits.max_body_bytes:
            raise ProtocolError(413, "body larger than allowed")
        if content_length:
            body_kind = BODY_LENGTH
        else:
            content_length = 0

    tokens, keep_alive = _persistence(version, conn_values)

    if upgrade:
        upgrade = upgrade.split(b",", 1)[0].strip(b" \t").lower() if b"upgrade" in tokens else b""
    if method == b"CONNECT":
        upgrade = b"connect"
    if upgrade and body_kind != BODY_NONE:
        # After the head the connection becomes a tunnel, so a body would be taken for tunnel
        # bytes and held until a 101 that the upstream sends only once it has the body.
        raise ProtocolError(400, "Upgrade or CONNECT request with a body")

    return _new_request_head(method, target, version, headers, host, path, body_kind,
                             content_length, keep_alive, upgrade, expect_continue, names)


def _check_status_line(status: int, version: bytes) -> None:
    if version != b"1.1" and version != b"1.0":
        raise ProtocolError(502, "upstream HTTP version not supported")
    if not 100 <= status <= 999:
        raise ProtocolError(502, "invalid upstream status")


def response_head(status: int, reason: bytes, version: bytes, headers: Headers,
                  limits: CodecLimits, no_body: bool) -> ResponseHead:
    """Apply the response framing rules; bad upstream framing is a 502."""
    if not 200 <= status <= 999 or version not in _VERSIONS:
        _check_status_line(status, version)
    names = _checked_fields(headers, limits, 502)
    cl, te, conn = _framing_indices(names)
    if cl >= 0 and te == -1 and not no_body and status != 204 and status != 304 and status >= 200:
        # The common response: one Content-Length, no Transfer-Encoding; the outcome
        # _response_tail reaches for it, found with C-level scans of ``names``.
        length = headers[cl][1]
        content_length = _short_digits(length)
        if content_length < 0:
            content_length = _LENGTHS.get(length)
        if content_length is None:
            content_length = _content_length([length], 502)
            if len(_LENGTHS) < _LENGTHS_MAX and length[:1] != b"0":
                _LENGTHS[length] = content_length
        persists = None
        if conn >= 0 and version == b"1.1":
            conn_value = headers[conn][1]
            persists = True if conn_value == b"keep-alive" else _PERSISTENT_1_1.get(conn_value)
        if conn == -1:
            keep_alive = version == b"1.1"
        elif persists is not None:
            keep_alive = persists
        else:
            keep_alive = _persistence(version, _values_of(b"connection", names, headers))[1]
        return _new_response_head(status, reason, version, headers,
                                  BODY_LENGTH if content_length else BODY_NONE, content_length, keep_alive, names)
    return _response_tail(
        status, reason, version, headers, no_body,
        _values_of(b"content-length", names, headers) if b"content-length" in names else (),
        _values_of(b"transfer-encoding", names, headers) if b"transfer-encoding" in names else (),
        _values_of(b"connection", names, headers) if b"connection" in names else (), names)


_VERSIONS = frozenset((b"1.1", b"1.0"))
# Content-Length values already checked by _content_length (canonical digits only): a memo
# of a pure function, bounded like _VALID_HOSTS.
_LENGTHS: dict[bytes, int] = {}
_LENGTHS_MAX = 4096
# whether an HTTP/1.1 message with this one (common) Connection value persists (RFC 9112 §9.3)
_PERSISTENT_1_1 = {value: b"close" not in tokens for value, tokens in _COMMON_CONNECTION.items()}


def _persistence(version: bytes, conn_values) -> tuple:
    """RFC 9112 §9.3: the Connection tokens and whether the connection persists
    (HTTP/1.1 unless ``close``; HTTP/1.0 only with ``keep-alive``)."""
    if not conn_values:
        return (), version == b"1.1"
    tokens = connection_tokens(conn_values)
    if version == b"1.1":
        return tokens, b"close" not in tokens
    return tokens, b"keep-alive" in tokens and b"close" not in tokens


def _response_tail(status: int, reason: bytes, version: bytes, headers: Headers, no_body: bool,
                   cl_values, te_values, conn_values, names: tuple) -> ResponseHead:
    _, keep_alive = _persistence(version, conn_values)

    content_length = -1
    if no_body or status < 200 or status == 204 or status == 304:
        body_kind = BODY_NONE
        if cl_values and not no_body and status >= 200:
            # still must be well-formed (304 may carry the representation's length)
            _content_length(cl_values, 502)
    elif te_values:
        if cl_values:
            # RFC 9112 §6.3 lets TE override CL, but such a response is a smuggling vector
            # and llhttp refuses it in strict mode: both backends answer 502.
            raise ProtocolError(502, "upstream sent both Content-Length and Transfer-Encoding")
        if version == b"1.0":
            keep_alive = False
        _te_is_chunked(te_values, 502, 502)
        body_kind = BODY_CHUNKED
    elif cl_values:
        content_length = _content_length(cl_values, 502)
        body_kind = BODY_LENGTH if content_length else BODY_NONE
    else:
        body_kind = BODY_UNTIL_CLOSE
        keep_alive = False
    return _new_response_head(status, reason, version, headers, body_kind, content_length, keep_alive, names)


# --------------------------------------------------------------------------- raw head scan

def scan_head(buf: bytes | bytearray, scanned: int, end: int, status: int = 400) -> None:
    """Reject bytes a lenient tokenizer may forgive in the part of a head not yet checked.

    ``buf[:scanned]`` was checked by an earlier call; ``buf[scanned:end]`` is new.  Bare LF,
    bare CR (a CR as the last byte waits for the next call) and NUL are refused."""
    lo = scanned - 1 if scanned > 0 else 0
    chunk = bytes(buf[lo:end])
    crlf = chunk.count(b"\r\n")
    lf = chunk.count(b"\n") - (1 if lo < scanned and chunk[:1] == b"\n" else 0)
    if lf != crlf:
        raise ProtocolError(status, "bare LF in head")
    cr = chunk.count(b"\r") - (1 if chunk[-1:] == b"\r" else 0)
    if cr != crlf:
        raise ProtocolError(status, "bare CR in head")
    if b"\x00" in chunk:
        raise ProtocolError(status, "NUL in head")


def check_field_line(line: bytes, status: int = 400) -> None:
    """Early syntax check of one complete field line (as llhttp refuses it mid-head)."""
    if line[:1] in (b" ", b"\t"):
        raise ProtocolError(status, "obs-fold or whitespace-led field line")
    name, sep, value = line.partition(b":")
    if not sep or not name or name.translate(None, TCHAR):
        raise ProtocolError(status, "invalid field name")
    value = value.strip(b" \t")
    if value.translate(None, VALUE_CHARS):
        raise ProtocolError(status, "invalid field value")
    if name.lower() == b"content-length" and (
            not value or value.translate(None, DIGITS) or len(value.lstrip(b"0")) > _MAX_CL_DIGITS):
        raise ProtocolError(status, "invalid Content-Length")


def check_partial_field_line(part: bytes, status: int = 400) -> None:
    """Early check of the start of a field line whose end has not arrived: what no ending
    can make valid (a leading SP/HTAB, a name that is not a token, a Content-Length value
    that is not digits or has too many)."""
    if part[:1] in (b" ", b"\t"):
        raise ProtocolError(status, "obs-fold or whitespace-led field line")
    name, sep, value = part.partition(b":")
    if name.translate(None, TCHAR):
        raise ProtocolError(status, "invalid field name")
    if sep and name.lower() == b"content-length":
        value = value.strip(b" \t")
        if value.translate(None, DIGITS) or len(value.lstrip(b"0")) > _MAX_CL_DIGITS:
            raise ProtocolError(status, "invalid Content-Length")


def split_head(head: bytes, status: int = 400) -> tuple[bytes, Headers]:
    """Split a complete, scanned head (ending CRLF CRLF) into its start line and fields.

    Rejects obs-fold and whitespace-led lines, lines without a colon and whitespace
    before the colon.  Names are lower-cased; values have OWS removed."""
    lines = head[:-4].split(b"\r\n")
    headers: Headers = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise ProtocolError(status, "obs-fold or whitespace-led field line")
        name, sep, value = line.partition(b":")
        if not sep:
            raise ProtocolError(status, "field line without colon")
        if name[-1:] in (b" ", b"\t"):
            raise ProtocolError(status, "whitespace before colon")
        headers.append((name.lower(), value.strip(b" \t")))
    return lines[0], headers


_REQUEST_LINE_RE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([^ ]+) HTTP/([0-9])\.([0-9])\Z")
_STATUS_LINE_RE = re.compile(rb"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: ([\t \x21-\x7e\x80-\xff]*))?\Z")


def parse_request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    m = _REQUEST_LINE_RE.match(line)
    if m is None:
        raise ProtocolError(400, "invalid request line")
    return m.group(1), m.group(2), m.group(3) + b"." + m.group(4)


def parse_status_line(line: bytes) -> tuple[int, bytes, bytes]:
    m = _STATUS_LINE_RE.match(line)
    if m is None:
        raise ProtocolError(502, "invalid upstream status line")
    return int(m.group(3)), m.group(4) or b"", m.group(1) + b"." + m.group(2)


def check_method_prefix(buf: bytes | bytearray) -> None:
    """Refuse early what cannot start a request line (a TLS ClientHello, NUL, garbage)."""
    sp = buf.find(b" ")
    prefix = bytes(buf if sp < 0 else buf[:sp])
    if prefix.translate(None, TCHAR) or (sp == 0):
        raise ProtocolError(400, "invalid method")


# --------------------------------------------------------------------------- bodies

_S_LINE, _S_DATA, _S_DATA_END, _S_TRAILER, _S_DONE = range(5)


class BodyReader:
    """Delimits one message body and hands decoded bytes to ``on_body``.

    ``feed(data, pos)`` consumes from ``data[pos:]`` and returns the position after the
    last consumed byte; ``done`` turns True at the end of the message.  Strict chunked
    rules: chunk-size = 1*HEXDIG (at most 16 digits), extensions per RFC 9112 §7.1.1 and at
    most ``max_chunk_ext_bytes``, CRLF line ends and data terminators, trailer fields parsed
    and dropped (never merged into the head)."""

    __slots__ = ("kind", "remaining", "on_body", "limits", "status", "done", "_state",
                 "_line", "_total", "_trailer_bytes", "_trailers")

    def __init__(self, kind: int, content_length: int, on_body, limits: CodecLimits,
                 status: int = 400):
        self.kind = kind
        self.remaining = content_length
        self.on_body = on_body
        self.limits = limits
        self.status = status
        self.done = kind == BODY_NONE
        self._state = _S_LINE
        self._line = b""
        self._total = 0
        self._trailer_bytes = 0
        self._trailers = 0

    def feed(self, data: bytes, pos: int) -> int:
        if self.done:
            return pos
        kind = self.kind
        if kind == BODY_LENGTH:
            take = min(self.remaining, len(data) - pos)
            if take:
                self.on_body(data[pos:pos + take])
                self.remaining -= take
            if not self.remaining:
                self.done = True
            return pos + take
        if kind == BODY_UNTIL_CLOSE:
            if pos < len(data):
                self.on_body(data[pos:])
            return len(data)
        return self._feed_chunked(data, pos)

    def _too_big(self, n: int) -> None:
        self._total += n
        cap = self.limits.max_body_bytes
        if cap and self._total > cap:
            raise ProtocolError(413 if self.status == 400 else self.status, "body larger than allowed")

    def _take_line(self, data: bytes, pos: int, cap: int) -> tuple[bytes | None, int]:
        """A CRLF-terminated line from the carried bytes + data[pos:]; None if incomplete."""
        end = data.find(b"\n", pos)
        if end < 0:
            self._line += data[pos:]
            if len(self._line) > cap:
                raise ProtocolError(self.status if cap != self.limits.max_header_bytes else
                                    (431 if self.status == 400 else self.status), "line too long")
            return None, len(data)
        line = self._line + data[pos:end + 1]
        self._line = b""
        if len(line) > cap + 2:
            raise ProtocolError(self.status if cap != self.limits.max_header_bytes else
                                (431 if self.status == 400 else self.status), "line too long")
        if line[-2:-1] != b"\r" or b"\r" in line[:-2]:
            raise ProtocolError(self.status, "bare LF or CR in chunked framing")
        return line[:-2], end + 1

    def _feed_chunked(self, data: bytes, pos: int) -> int:
        n = len(data)
        status = self.status
        while pos < n or self._state == _S_DONE:
            state = self._state
            if state == _S_DATA:
                take = min(self.remaining, n - pos)
                self.on_body(data[pos:pos + take])
                self.remaining -= take
                pos += take
                if not self.remaining:
                    self._state = _S_DATA_END
            elif state == _S_LINE:
                line, pos = self._take_line(data, pos, self.limits.max_chunk_ext_bytes + _MAX_CHUNK_SIZE_DIGITS)
                if line is None:
                    return pos
                i = 0
                ln = len(line)
                while i < ln and line[i] in _HEX:
                    i += 1
                if i == 0 or i > _MAX_CHUNK_SIZE_DIGITS:
                    raise ProtocolError(status, "invalid chunk size")
                ext = line[i:]
                if ext and (len(ext) > self.limits.max_chunk_ext_bytes or _CHUNK_EXT_RE.match(ext) is None):
                    raise ProtocolError(status, "invalid chunk extension")
                size = int(line[:i], 16)
                if size:
                    self._too_big(size)
                    self.remaining = size
                    self._state = _S_DATA
                else:
                    self._state = _S_TRAILER
            elif state == _S_DATA_END:
                need = 2 - len(self._line)
                got = data[pos:pos + need]
                self._line += got
                pos += len(got)
                if self._line != b"\r\n"[:len(self._line)]:
                    raise ProtocolError(status, "chunk data not followed by CRLF")
                if len(self._line) < 2:
                    return pos
                if self._line != b"\r\n":
                    raise ProtocolError(status, "chunk data not followed by CRLF")
                self._line = b""
                self._state = _S_LINE
            elif state == _S_TRAILER:
                line, pos = self._take_line(data, pos, self.limits.max_header_bytes)
                if line is None:
                    return pos
                if not line:
                    self._state = _S_DONE
                    continue
                self._trailer_bytes += len(line) + 2
                self._trailers += 1
                if self._trailer_bytes > self.limits.max_header_bytes or \
                        self._trailers > self.limits.max_header_count:
                    raise ProtocolError(431 if status == 400 else status, "trailers too large")
                name, sep, value = line.partition(b":")
                if not sep or not name or name.translate(None, TCHAR) or \
                        value.translate(None, VALUE_CHARS):
                    raise ProtocolError(status, "invalid trailer field")
                if name.lower() in _FRAMING_FIELDS:
                    raise ProtocolError(status, "framing field in trailers")
            else:  # _S_DONE
                self.done = True
                return pos
        return pos
