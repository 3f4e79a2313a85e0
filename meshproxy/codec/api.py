"""The sans-IO HTTP/1.1 codec contract shared by every backend.

Bytes go in through ``feed``; parsed messages come out as calls on a handler object
that the connection driver supplies.  Nothing here awaits, and nothing imports asyncio.

Two backends implement :class:`RequestParser` / :class:`ResponseParser`
(``httptools`` is the default, ``h11`` the pure-Python one).  The framing rules that
RFC 9112 requires of a proxy (CL/TE, Host, field syntax, limits) live once in
:mod:`meshproxy.codec.framing`, above both backends, so that both give the same verdict
for the same bytes however the bytes were split into reads.

Header names handed to handlers are lower-cased ``bytes``; values are ``bytes`` with
surrounding optional whitespace removed.  Bodies are handed over *decoded* (chunked
framing removed); the writer (:mod:`meshproxy.codec.writer`) re-frames what is forwarded,
so nothing the client framed ever reaches the upstream byte for byte.
"""
from __future__ import annotations

from typing import Protocol

import cython  # compiled: the heads are extension-type dataclasses (api.pxd); pure Python: Cython's shadow module

Headers = list[tuple[bytes, bytes]]

# How a message body is delimited (RFC 9112 §6.3).
BODY_NONE = 0       # no body (GET without CL/TE, HEAD response, 204, 304, 1xx)
BODY_LENGTH = 1     # Content-Length
BODY_CHUNKED = 2    # Transfer-Encoding: chunked
BODY_UNTIL_CLOSE = 3  # responses only: read until the upstream closes


@cython.dataclasses.dataclass  # fields and their order (= __init__'s) are declared again in api.pxd
class RequestHead:
    method: bytes           # as received, e.g. b"GET" (methods are case-sensitive)
    target: bytes           # request-target as received: origin-form, absolute-form, authority-form or "*"
    version: bytes          # b"1.1" or b"1.0"
    headers: Headers        # (lower-cased name, value), in order, hop-by-hop fields still present
    host: bytes             # Host header value, or the authority of an absolute-form target
    path: bytes             # origin-form path + query ("/" for "*" / authority-form)
    body_kind: int          # BODY_NONE / BODY_LENGTH / BODY_CHUNKED
    content_length: int     # valid when body_kind == BODY_LENGTH, else -1
    keep_alive: bool        # False for HTTP/1.0 without keep-alive, or "Connection: close"
    upgrade: bytes          # lower-cased Upgrade token when the request asks for one (b"websocket"), else b""
    expect_continue: bool   # "Expect: 100-continue"
    # the field names of ``headers`` in order, as the codec saw them: consumers test for a
    # field with one C-level scan (``b"x-request-id" in head.names``) instead of a loop.
    # Empty when a head was built by hand; use :func:`field_names`.
    names: tuple = ()


# Field names most heads carry, lower-case.  The llhttp backend hands out these very objects
# for a matching name (in any case), and the sets of names the proxy tests fields against are
# built from them (:func:`name_set`): a lookup of a common name then finds it by identity,
# its hash already cached, without comparing bytes.
COMMON_FIELD_NAMES = (
    b"host", b"user-agent", b"accept", b"accept-encoding", b"accept-language", b"connection",
    b"keep-alive", b"content-length", b"content-type", b"transfer-encoding", b"date", b"server",
    b"cookie", b"set-cookie", b"cache-control", b"authorization", b"referer", b"origin", b"vary",
    b"etag", b"last-modified", b"location", b"expires", b"pragma", b"upgrade", b"x-request-id",
    b"x-forwarded-for", b"x-forwarded-proto", b"traceparent", b"tracestate", b"b3",
    b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid", b"x-b3-sampled", b"expect",
    b"accept-ranges", b"content-encoding", b"age", b"via",
)
_SHARED_NAMES = {name: name for name in COMMON_FIELD_NAMES}


def name_set(names) -> frozenset:
    """A frozenset of lower-case field names holding the shared objects of the common ones."""
    return frozenset([_SHARED_NAMES.get(name, name) for name in names])


def field_names(head: "RequestHead | ResponseHead") -> tuple:
    """``head.names``, or computed for a head built without it."""
    return head.names or tuple([n for n, _ in head.headers])


@cython.dataclasses.dataclass
class ResponseHead:
    status: int
    reason: bytes
    version: bytes
    headers: Headers
    body_kind: int
    content_length: int
    keep_alive: bool
    names: tuple = ()        # field names of ``headers`` in order (see RequestHead.names)


@cython.dataclasses.dataclass(frozen=True)   # compiled: an extension type (api.pxd), read at C level
class CodecLimits:
    """Limits enforced identically by every backend, whatever the read sizes are."""

    max_header_bytes: int = 60 * 1024     # whole head (request line + fields) -> 431
    max_header_count: int = 100           # -> 431
    max_target_bytes: int = 8 * 1024      # -> 414
    max_body_bytes: int = 0               # 0 = no cap; else -> 413 (CL up front, chunked as it streams)
    max_chunk_ext_bytes: int = 4 * 1024   # chunk extensions longer than this -> 400


class ProtocolError(Exception):
    """A message that must be refused.  ``status`` is what the client gets (400, 413, 414,
    431, 501, 505); the connection is always closed afterwards."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class MessageHandler:
    """Base class of the connection drivers, which receive a parser's events (the methods of
    :class:`RequestHandler` and :class:`ResponseHandler`).  Compiled, the llhttp backend calls a
    MessageHandler's methods at C level; any other handler object works too, through its bound
    methods."""
    __slots__ = ()

    def on_request_head(self, head: RequestHead) -> None:
        raise NotImplementedError

    def on_response_head(self, head: ResponseHead) -> None:
        raise NotImplementedError

    def on_body(self, data: bytes) -> None:
        raise NotImplementedError

    def on_message_complete(self) -> None:
        raise NotImplementedError


class RequestHandler(Protocol):
    """Implemented by the downstream connection driver."""

    def on_request_head(self, head: RequestHead) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_message_complete(self) -> None: ...


class ResponseHandler(Protocol):
    """Implemented by the upstream exchange.  ``on_body``'s data is bytes, or (llhttp backend)
    a read-only memoryview into the read being parsed: the body is not copied out of it."""

    def on_response_head(self, head: ResponseHead) -> None: ...
    def on_body(self, data: bytes | memoryview) -> None: ...
    def on_message_complete(self) -> None: ...


class RequestParser(Protocol):
    def feed(self, data: bytes) -> None:
        """Parse ``data``; calls the handler for every event it completes.

        Raises :class:`ProtocolError` for a message that must be refused.  After a
        ProtocolError the parser is dead: the driver answers with ``err.status`` and
        closes; nothing after the bad bytes is ever parsed as another request.
        After ``on_request_head`` for a request with ``upgrade`` (and the driver's 101),
        the driver stops feeding the parser and tunnels bytes.
        """

    def unconsumed(self) -> bytes:
        """Bytes received after an Upgrade request's head that belong to the tunnel."""

    def discard(self) -> None:
        """The connection is gone: let go of what is held (a partial head, the handler's
        callbacks), so that nothing waits for the cyclic garbage collector."""


class ResponseParser(Protocol):
    def feed(self, data: bytes) -> None:
        """As for requests; raises :class:`ProtocolError` (status 502) on bad framing."""

    def expect_no_body(self) -> None:
        """The request was HEAD (or CONNECT): the next response has no body whatever its headers say."""

    def feed_eof(self) -> None:
        """The upstream closed.  Completes a BODY_UNTIL_CLOSE message; raises ProtocolError
        if a message was in progress (truncated response)."""

    def unconsumed(self) -> bytes:
        """Bytes after a 101 response's head that belong to the tunnel."""

    def discard(self) -> None:
        """As for requests."""
