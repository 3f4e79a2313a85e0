"""What route matching sees of a request: :class:`RequestView`.

Built once per request from the codec's :class:`~meshproxy.codec.api.RequestHead`; cheap
to build (one pass over the header list, no query parsing until a route asks for it).
"""
from __future__ import annotations

from typing import Mapping
from urllib.parse import unquote_plus

import cython

from ..codec.framing import KNOWN_METHODS


class RequestView:
    """The parts of a request that matching, splitting and hashing read.

    ``authority``: Host including the port, lower-cased.  ``path``: without the query.
    ``query``: the raw query string (after ``?``), parsed by :attr:`query_params` on
    first use.  ``headers``: lower-case names; repeated fields joined with ``","``.
    ``port``: the listener's (addressed) port.
    """

    __slots__ = ("method", "authority", "path", "query", "headers", "port", "scheme",
                 "source_ip", "_query_params")

    def __init__(self, method: str, authority: str, path: str, query: str = "",
                 headers: Mapping[str, str] | None = None, port: int = 0,
                 scheme: str = "http", source_ip: str = ""):
        self.method = method
        self.authority = authority
        self.path = path
        self.query = query
        self.headers = headers if headers is not None else {}
        self.port = port
        self.scheme = scheme
        self.source_ip = source_ip
        self._query_params: dict[str, str] | None = None

    @classmethod
    def from_head(cls, head, port: int, scheme: str, source_ip: str) -> "RequestView":
        """From a ``meshproxy.codec.api.RequestHead``; bytes decoded as latin-1."""
        return view_from_head(head, port, scheme, source_ip)

    @property
    def query_params(self) -> Mapping[str, str]:
        """``?a=1&b&a=2`` -> ``{"a": "1", "b": ""}``: first value of a repeated name wins
        (Envoy's ``query_parameters`` matcher looks at the first occurrence); a key
        without ``=`` has the value ``""`` (Istio: matched by ``exact: ""``)."""
        params = self._query_params
        if params is None:
            params = {}
            if self.query:
                for part in self.query.split("&"):
                    if not part:
                        continue
                    name, _, value = part.partition("=")
                    name = unquote_plus(name)
                    if name not in params:
                        params[name] = unquote_plus(value)
            self._query_params = params
        return params

    def cookie(self, name: str) -> str | None:
        """Value of the cookie ``name`` in the ``Cookie`` header, or None."""
        raw = self.headers.get("cookie")
        if not raw:
            return None
        for part in raw.replace(",", ";").split(";"):
            key, sep, value = part.strip().partition("=")
            if sep and key == name:
                return value.strip().strip('"')
        return None

    def __repr__(self) -> str:
        return (f"RequestView({self.method} {self.scheme}://{self.authority}{self.path}"
                f"{'?' + self.query if self.query else ''} port={self.port})")


def _query_start(target: bytes) -> int:
    """Where the ``?`` of ``target`` is, or -1 (compiled: memchr, no method call)."""
    if cython.compiled:
        p = PyBytes_AS_STRING(target)
        found = memchr(p, 63, len(target))    # 63 = "?"
        return -1 if found == cython.NULL else cython.cast(cython.p_char, found) - p
    return target.find(b"?")


def _lower_text(raw: bytes) -> str:
    """``raw.decode("latin-1").lower()``; compiled, one decode when every byte is ASCII and
    none is an upper-case letter (the usual Host) instead of two new strings."""
    if cython.compiled:
        p = raw
        for i in range(len(raw)):
            if 65 <= p[i] <= 90 or p[i] >= 128:
                return raw.decode("latin-1").lower()
        return raw.decode("latin-1")
    return raw.decode("latin-1").lower()


# the text of the methods the codec accepts (its shared method objects hit by identity)
_METHOD_TEXT = {m: m.decode("latin-1") for m in KNOWN_METHODS}


def view_from_head(head, port: int, scheme: str, source_ip: str) -> RequestView:
    """:meth:`RequestView.from_head` (the request path calls this)."""
    headers: dict[str, str] = {}
    for name, value in head.headers:
        key = name.decode("latin-1")
        old = headers.get(key)
        headers[key] = value.decode("latin-1") if old is None else old + "," + value.decode("latin-1")
    target = head.path
    q = _query_start(target)
    if q < 0:
        path, query = target.decode("latin-1"), ""
    else:
        path, query = target[:q].decode("latin-1"), target[q + 1:].decode("latin-1")
    view = RequestView.__new__(RequestView)      # the fields directly: no __init__ call
    method = _METHOD_TEXT.get(head.method)
    view.method = method if method is not None else head.method.decode("latin-1")
    view.authority = _lower_text(head.host)
    view.path = path
    view.query = query
    view.headers = headers
    view.port = port
    view.scheme = scheme
    view.source_ip = source_ip
    view._query_params = None
    return view
