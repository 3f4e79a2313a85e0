"""Route matching: pure functions over the compiled snapshot.

Precedence, in the order the code applies it (each step tested in
``tests/unit/test_router_match.py``):

Virtual host (:func:`select_virtual_host`), from the request's authority (lower-cased):

1. exact domain *with* the port as sent (``reviews:9080``);
2. exact domain *without* the port (``reviews``);
3. wildcard suffixes (``*.example.com`` stored as ``.example.com``; Istio's partial
   ``*x.example.com`` as ``x.example.com``), the longest suffix first; a wildcard never
   matches the bare suffix itself (``example.com``);
4. the table's ``default`` virtual host (``*``), else ``None`` (the caller answers 404 NR).

Steps 1-2 are dict lookups and step 3 walks the labels of the request's host, so the cost
does not grow with the number of domains in the table (a table holding a partial wildcard
is scanned instead, longest suffix first).

Route (:func:`select_route`), inside one virtual host:

* routes are tried in the order written; the **first** route that matches wins (Istio
  semantics; no "most specific" reordering);
* a route with no match blocks matches every request;
* a route's match blocks are OR-ed; the conditions inside one block are AND-ed;
* ``uri``: exact / prefix / regex on the path *without* the query; regex must match the
  whole path (``fullmatch``); ``ignore_case`` (Istio ``ignoreUriCase``) for exact/prefix;
* ``headers``: exact / prefix / regex on the value (repeated fields joined by ``,``);
  a header without a value matcher is a presence check; an absent header never matches;
* ``without_headers``: the block fails if **any** of them matches (absent header does not
  match, so it passes);
* ``query_params``: value of the first occurrence; ``?key`` has the value ``""``;
  an absent parameter never matches;
* ``method``, ``authority`` (Host as sent, with port), ``scheme``: StringMatch;
* ``port``: the listener's port;
* ``source_labels`` and ``gateways`` were resolved when the snapshot was compiled and are
  ignored here.
"""
from __future__ import annotations

from ..config.model import HeaderMatch, HttpRoute, RouteMatch, RouteTable, StringMatch, VirtualHost
from .request import RequestView

# ---------------------------------------------------------------- virtual host


def strip_port(authority: str) -> str:
    """``host:80`` -> ``host``; ``[::1]:80`` -> ``[::1]``; names without a port unchanged."""
    colon = authority.rfind(":")
    if colon < 0 or authority.endswith("]"):
        return authority
    if authority.startswith("[") and authority[colon - 1] != "]":
        return authority            # bare IPv6 literal inside brackets without port
    return authority[:colon]


# A memo of derived, immutable data (RouteTable.wildcards as a dict) keyed by table
# identity.  The table object is kept in the entry so its id cannot be reused while the
# entry exists.  Behaviour never depends on it; it only saves rebuilding the dict.
_WILDCARD_INDEX: dict[int, tuple[RouteTable, dict[str, VirtualHost]]] = {}
_SCAN_LIMIT = 8


def _wildcard_index(table: RouteTable) -> dict[str, VirtualHost] | None:
    """Suffix -> virtual host for lookups label by label; None when a wildcard is partial
    (``*x.example.com`` stored as ``x.example.com``), which only a scan finds."""
    entry = _WILDCARD_INDEX.get(id(table))
    if entry is not None and entry[0] is table:
        return entry[1]
    index: dict[str, VirtualHost] | None = {}
    for suffix, vhost in table.wildcards:
        if not suffix.startswith("."):
            index = None
            break
        index.setdefault(suffix, vhost)
    if len(_WILDCARD_INDEX) >= 64:
        _WILDCARD_INDEX.clear()
    _WILDCARD_INDEX[id(table)] = (table, index)
    return index


def select_virtual_host(table: RouteTable, authority: str) -> VirtualHost | None:
    """The virtual host for ``authority`` (already lower-cased), see the module docstring."""
    exact = table.exact
    vhost = exact.get(authority)
    if vhost is not None:
        return vhost
    host = strip_port(authority)
    if host is not authority:
        vhost = exact.get(host)
        if vhost is not None:
            return vhost
    wildcards = table.wildcards
    if wildcards:
        if len(wildcards) <= _SCAN_LIMIT:
            for suffix, vhost in wildcards:          # stored longest first
                if host.endswith(suffix) and len(host) > len(suffix):
                    return vhost
        elif _wildcard_index(table) is None:         # partial wildcards ("*x.example.com"): scan
            for suffix, vhost in wildcards:
                if host.endswith(suffix) and len(host) > len(suffix):
                    return vhost
        else:
            index = _wildcard_index(table)
            dot = host.find(".", 1)
            while dot > 0:
                vhost = index.get(host[dot:])
                if vhost is not None:
                    return vhost
                dot = host.find(".", dot + 1)
    return table.default


# ---------------------------------------------------------------- string / block matching


def _same(a: str, b: str) -> bool:
    """``a == b``, deciding by identity or length first (compiled, str == str is otherwise a
    PyUnicode_Compare, an ordering compare of the characters)."""
    return a is b or (len(a) == len(b) and a == b)


def string_matches(sm: StringMatch, value: str) -> bool:
    kind = sm.kind
    if _same(kind, "exact"):
        return _same(value.lower() if sm.ignore_case else value, sm.value)
    if _same(kind, "prefix"):
        return (value.lower() if sm.ignore_case else value).startswith(sm.value)
    if kind == "regex":
        return sm.regex.fullmatch(value) is not None
    raise ValueError(f"StringMatch kind {kind!r} is not exact/prefix/regex")


def _header_matches(hm: HeaderMatch, headers) -> bool:
    value = headers.get(hm.name)
    if value is None:
        return False
    return hm.match is None or string_matches(hm.match, value)


def block_matches(m: RouteMatch, req: RequestView) -> bool:
    """All conditions of one HTTPMatchRequest hold for ``req``."""
    if m.uri is not None and not string_matches(m.uri, req.path):
        return False
    if m.method is not None and not string_matches(m.method, req.method):
        return False
    if m.port is not None and m.port != req.port:
        return False
    if m.headers:
        headers = req.headers
        for hm in m.headers:
            if not _header_matches(hm, headers):
                return False
    if m.without_headers:
        headers = req.headers
        for hm in m.without_headers:
            if _header_matches(hm, headers):
                return False
    if m.query_params:
        params = req.query_params
        for name, sm in m.query_params:
            value = params.get(name)
            if value is None or not string_matches(sm, value):
                return False
    if m.authority is not None and not string_matches(m.authority, req.authority):
        return False
    if m.scheme is not None and not string_matches(m.scheme, req.scheme):
        return False
    return True


def select_route(vhost: VirtualHost, req: RequestView) -> tuple[HttpRoute, RouteMatch | None] | None:
    """First route of ``vhost`` that matches ``req`` and the match block that matched
    (``None`` for a route without match blocks); ``None`` if no route matches."""
    for route in vhost.routes:
        if not route.matches:
            return (route, None)
        for m in route.matches:
            if block_matches(m, req):
                return (route, m)
    return None


# ---------------------------------------------------------------- reasons (for explain)


def _describe(sm: StringMatch) -> str:
    case = " (ignore case)" if sm.ignore_case else ""
    return f'{sm.kind} "{sm.value}"{case}'


def _string_reason(what: str, sm: StringMatch, value: str | None) -> str | None:
    if value is None:
        return f"{what} {_describe(sm)}: absent"
    if string_matches(sm, value):
        return None
    if sm.kind == "exact":
        return f'{what} exact "{sm.value}" != "{value}"' + (" (ignore case)" if sm.ignore_case else "")
    return f'{what} {_describe(sm)} does not match "{value}"'


def block_mismatch(m: RouteMatch, req: RequestView) -> str | None:
    """Why ``m`` does not match ``req`` (the first failing condition, in the order
    :func:`block_matches` checks them), or ``None`` when it matches.  Slow path, for
    ``explain``; agrees with :func:`block_matches` (tested)."""
    if m.uri is not None and (why := _string_reason("uri", m.uri, req.path)):
        return why
    if m.method is not None and (why := _string_reason("method", m.method, req.method)):
        return why
    if m.port is not None and m.port != req.port:
        return f"port {m.port} != {req.port}"
    for hm in m.headers:
        value = req.headers.get(hm.name)
        if hm.match is None:
            if value is None:
                return f"header {hm.name} present: absent"
        elif why := _string_reason(f"header {hm.name}", hm.match, value):
            return why
    for hm in m.without_headers:
        if _header_matches(hm, req.headers):
            cond = "present" if hm.match is None else _describe(hm.match)
            return f'without_header {hm.name} {cond}: matches "{req.headers.get(hm.name)}"'
    for name, sm in m.query_params:
        if why := _string_reason(f"query {name}", sm, req.query_params.get(name)):
            return why
    if m.authority is not None and (why := _string_reason("authority", m.authority, req.authority)):
        return why
    if m.scheme is not None and (why := _string_reason("scheme", m.scheme, req.scheme)):
        return why
    return None
