"""Pure transformations of heads on their way through the proxy.

Nothing here does I/O or keeps state; every function takes what it needs and returns
new header lists or decisions, so each is unit-testable with plain values.
"""
from __future__ import annotations

import random
from typing import Callable

from ..codec.api import RequestHead, ResponseHead, field_names, name_set
from ..codec.framing import connection_tokens, field_index
from ..config.model import HeaderOps, HttpRoute, RouteMatch
from ..telemetry.peer_metadata import FIELDS as PEER_METADATA_FIELDS
from ..telemetry.tracing import PROPAGATION_HEADERS

Headers = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1 connection-specific fields, plus fields the proxy re-generates itself.
# (name_set: common names are the parser's shared objects, found by identity)
_HOP_BY_HOP = name_set((
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authenticate", b"proxy-authorization",
))
# (x-forwarded-for is re-appended at the end, with the client's address added).  Istio's peer
# metadata fields are the sidecars' own: read by the proxy, never passed to or from an
# application (a sidecar adds its own where it takes part in the exchange).
_REQUEST_DROP = name_set(_HOP_BY_HOP | {b"content-length", b"host", b"expect", b"x-forwarded-proto", b"x-forwarded-for"}
                         | set(PEER_METADATA_FIELDS))
_RESPONSE_DROP = name_set(_HOP_BY_HOP | {b"content-length"} | set(PEER_METADATA_FIELDS))
_REQUEST_DROP_TRACED = name_set(_REQUEST_DROP | PROPAGATION_HEADERS)
_RESPONSE_DROP_UPGRADE = name_set(_RESPONSE_DROP - {b"upgrade"})
_RESPONSE_DROP_KEEP_LENGTH = name_set(_RESPONSE_DROP - {b"content-length"})


_NOTHING: frozenset[bytes] = frozenset()


def _length_mask(names) -> int:
    """Bit n set for the length n of every name in ``names`` (all shorter than 64)."""
    mask = 0
    for name in names:
        assert len(name) < 64
        mask |= 1 << len(name)
    return mask


_REQUEST_DROP_LENGTHS = _length_mask(_REQUEST_DROP_TRACED)     # covers _REQUEST_DROP too
_RESPONSE_DROP_LENGTHS = _length_mask(_RESPONSE_DROP)          # covers the two subsets too


def _kept(first, fields: Headers, drop: frozenset, lengths: int) -> Headers:
    """``first`` (unless None), then ``[field for field in fields if field[0] not in drop]``.
    A name whose length no name in ``drop`` has (``lengths``: a :func:`_length_mask`
    covering ``drop``) is kept without the set lookup: Server, Date, Content-Type, ETag...
    are most of a head."""
    out = [] if first is None else [first]
    for field in fields:
        name = field[0]
        n = len(name)
        if (n < 64 and not (lengths >> n) & 1) or name not in drop:
            out.append(field)
    return out


def _named_fields(headers: Headers, names: tuple) -> frozenset[bytes] | set[bytes]:
    """Fields named in Connection, besides the hop-by-hop ones that are always removed
    (so usually none: ``Connection: keep-alive`` names a hop-by-hop field).  ``names``
    are the field names of ``headers``, in order."""
    i = field_index(names, b"connection")
    if i == -1:
        return _NOTHING
    if i >= 0:
        value = headers[i][1]
        if value == b"keep-alive" or value == b"Keep-Alive":   # (compared, not hashed: a new bytes object each time)
            return _NOTHING
        values = [value]
    else:
        values = [v for n, v in headers if n == b"connection"]
    return connection_tokens(values) - _HOP_BY_HOP


def client_fields(client_ip: str, scheme: str) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    """The X-Forwarded-For and X-Forwarded-Proto fields for a client's requests (made once
    per downstream connection)."""
    return (b"x-forwarded-for", client_ip.encode()), (b"x-forwarded-proto", scheme.encode())


def forwarded_request_headers(head: RequestHead, authority: bytes, client: tuple,
                              new_request_id: Callable[[], bytes] | None,
                              trace_fields: Headers | None = None) -> Headers:
    """The request's fields as sent upstream: Host first, hop-by-hop fields (and those
    named in Connection) removed, X-Forwarded-For appended, X-Forwarded-Proto set (both
    from ``client``, :func:`client_fields`), X-Request-Id kept or generated.  With
    ``trace_fields`` (this hop's propagation fields, x-request-id included) the incoming
    propagation fields are replaced by them in the same pass.  Framing fields are added by
    the caller."""
    # The head's field names decide, with C-level scans, which of the rarer steps run;
    # the common head is one filtering comprehension.
    fields = head.headers
    names = field_names(head)
    drop = _REQUEST_DROP if trace_fields is None else _REQUEST_DROP_TRACED
    out: Headers = _kept((b"host", authority), fields, drop, _REQUEST_DROP_LENGTHS)
    named = _named_fields(fields, names)
    if named:   # fields the client named in Connection are hop-by-hop too
        out = [(n, v) for n, v in out if n not in named or n == b"host"]
    forwarded_for, forwarded_proto = client
    if field_index(names, b"x-forwarded-for") != -1 and b"x-forwarded-for" not in named:
        prior = b", ".join([v for n, v in fields if n == b"x-forwarded-for"])
        forwarded_for = (b"x-forwarded-for", prior + b", " + forwarded_for[1])
    out.append(forwarded_for)
    out.append(forwarded_proto)
    if trace_fields is not None:
        out.extend(trace_fields)
    elif new_request_id is not None and (field_index(names, b"x-request-id") == -1 or b"x-request-id" in named):
        out.append((b"x-request-id", new_request_id()))
    if head.upgrade:
        out.append((b"connection", b"upgrade"))
        out.append((b"upgrade", head.upgrade))
    return out


def forwarded_response_headers(head: ResponseHead, framing: tuple[bytes, bytes] | None,
                               keep_alive: bool, upgrade: bool = False) -> Headers:
    fields = head.headers
    if upgrade:
        drop = _RESPONSE_DROP_UPGRADE          # a 101 keeps its Upgrade field
    elif framing is None:
        drop = _RESPONSE_DROP_KEEP_LENGTH      # HEAD / 304: keep the length the upstream declared
    else:
        drop = _RESPONSE_DROP
    out: Headers = _kept(None, fields, drop, _RESPONSE_DROP_LENGTHS)
    named = _named_fields(fields, field_names(head))
    if named:
        out = [(n, v) for n, v in out if n not in named]
    if framing is not None:
        out.append(framing)
    if upgrade:
        out.append((b"connection", b"upgrade"))
    elif not keep_alive:
        out.append((b"connection", b"close"))
    return out


def apply_header_ops(headers: Headers, ops: HeaderOps) -> Headers:
    """Istio header operations: ``set`` replaces, ``add`` appends, ``remove`` deletes."""
    if not (ops.set or ops.add or ops.remove):
        return headers
    if ops.remove or ops.set:
        gone = {n.encode("latin-1") for n in ops.remove}
        gone.update(n.lower().encode("latin-1") for n, _ in ops.set)
        headers = [(n, v) for n, v in headers if n not in gone]
    for name, value in ops.set:
        headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    for name, value in ops.add:
        headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    return headers


def rewrite_path_and_authority(route: HttpRoute, match: RouteMatch | None,
                               head: RequestHead) -> tuple[bytes, bytes]:
    """Path (origin-form) and authority as forwarded, after ``rewrite``."""
    path = head.path
    authority = head.host
    rewrite = route.rewrite
    if rewrite is None:
        return path, authority
    if rewrite.authority:
        authority = rewrite.authority.encode("latin-1")
    raw = path.decode("latin-1")
    p, sep, query = raw.partition("?")
    if rewrite.uri is not None:
        if match is not None and match.uri is not None and match.uri.kind == "prefix":
            prefix = match.uri.value
            rest = p[len(prefix):] if len(p) >= len(prefix) else ""
            p = rewrite.uri + rest
        else:
            p = rewrite.uri
    elif rewrite.uri_regex is not None:
        p = rewrite.uri_regex.sub(rewrite.uri_regex_rewrite or "", p)
    if not p:
        p = "/"
    return (p + sep + query).encode("latin-1"), authority


def _percent_hit(percentage: float, rng: random.Random) -> bool:
    return percentage >= 100.0 or (percentage > 0.0 and rng.random() * 100.0 < percentage)


def local_reply_for(route: HttpRoute, match: RouteMatch | None, head: RequestHead, view,
                    rng: random.Random, after_delay: bool = False):
    """Decide whether the proxy answers this request itself.

    Returns ``None`` (forward it), ``("delay", seconds)`` (fault delay first), or
    ``("reply", (status, headers, body, flag))``.
    """
    cors = route.cors
    if cors is not None and head.method == b"OPTIONS":
        origin = view.headers.get("origin")
        if origin and "access-control-request-method" in view.headers:
            if cors_origin_allowed(cors, origin):
                return "reply", (200, cors_preflight_headers(cors, origin), b"", "-")
            if not cors.forward_unmatched_preflights:     # IGNORE: answered here, with no CORS fields
                return "reply", (200, [], b"", "-")
            # FORWARD (the default): the upstream answers a preflight the policy does not match
    fault = route.fault
    if fault is not None:
        if not after_delay and fault.delay is not None and _percent_hit(fault.delay_percentage, rng):
            return "delay", fault.delay
        if fault.abort_status is not None and _percent_hit(fault.abort_percentage, rng):
            body = b"fault filter abort"
            return "reply", (fault.abort_status, [(b"content-type", b"text/plain")], body, "FI")
    redirect = route.redirect
    if redirect is not None:
        return "reply", (redirect.code, [(b"location", redirect_location(route, match, head, view))], b"", "-")
    direct = route.direct_response
    if direct is not None:
        return "reply", (direct.status, [(b"content-type", b"text/plain")], direct.body, "-")
    return None


def redirect_location(route: HttpRoute, match: RouteMatch | None, head: RequestHead, view) -> bytes:
    redirect = route.redirect
    raw = head.path.decode("latin-1")
    path, sep, query = raw.partition("?")
    if redirect.uri is not None:
        path = redirect.uri
    elif redirect.prefix_rewrite is not None and match is not None and match.uri is not None \
            and match.uri.kind == "prefix":
        path = redirect.prefix_rewrite + path[len(match.uri.value):]
    host = redirect.authority or head.host.decode("latin-1")
    scheme = redirect.scheme or view.scheme
    hostname, _, req_port = host.partition(":")
    port = None
    if redirect.port is not None:
        port = str(redirect.port)
    elif redirect.derive_port == "FROM_REQUEST_PORT":
        port = req_port or str(view.port)
    elif redirect.derive_port == "FROM_PROTOCOL_DEFAULT":
        port = None
    elif req_port and not redirect.authority:
        port = req_port
    default = "443" if scheme == "https" else "80"
    authority = hostname if port in (None, default) else f"{hostname}:{port}"
    return f"{scheme}://{authority}{path}{sep}{query}".encode("latin-1")


def cors_origin_allowed(cors, origin: str) -> bool:
    for m in cors.allow_origins:
        if m.kind == "exact" and (m.value == origin or m.value == "*"):
            return True
        if m.kind == "prefix" and origin.startswith(m.value):
            return True
        if m.kind == "regex" and m.regex is not None and m.regex.fullmatch(origin):
            return True
    return False


def cors_preflight_headers(cors, origin: str) -> Headers:
    if not cors_origin_allowed(cors, origin):
        return []
    out: Headers = [(b"access-control-allow-origin", origin.encode("latin-1"))]
    if cors.allow_methods:
        out.append((b"access-control-allow-methods", ",".join(cors.allow_methods).encode()))
    if cors.allow_headers:
        out.append((b"access-control-allow-headers", ",".join(cors.allow_headers).encode()))
    if cors.max_age is not None:
        out.append((b"access-control-max-age", str(int(cors.max_age)).encode()))
    if cors.allow_credentials:
        out.append((b"access-control-allow-credentials", b"true"))
    return out


def cors_response_headers(cors, origin: str) -> Headers:
    if not cors_origin_allowed(cors, origin):
        return []
    out: Headers = [(b"access-control-allow-origin", origin.encode("latin-1"))]
    if cors.expose_headers:
        out.append((b"access-control-expose-headers", ",".join(cors.expose_headers).encode()))
    if cors.allow_credentials:
        out.append((b"access-control-allow-credentials", b"true"))
    return out
