"""Protocol sniffing for captured connections on ports that declare no protocol (sans-IO).

Istio's ``http_inspector`` in our words: a connection whose first bytes are an HTTP/1.x request
line is HTTP, anything else is TCP.  :func:`classify` looks at the bytes received so far and says
``"HTTP"``, ``"TCP"`` or ``None`` (cannot tell yet: wait for more, up to :data:`MAX_SNIFF_BYTES`
or the detection timeout, after which the caller treats the connection as TCP).
"""
from __future__ import annotations

METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT")
MAX_SNIFF_BYTES = 8192
_MAX_METHOD = max(len(m) for m in METHODS) + 1


def classify(data: bytes) -> str | None:
    if not data:
        return None
    space = data.find(b" ", 0, _MAX_METHOD)
    if space < 0:
        # still possibly the start of a method?
        if len(data) < _MAX_METHOD and any(m.startswith(data) for m in METHODS):
            return None
        return "TCP"
    if data[:space] not in METHODS:
        return "TCP"
    end = data.find(b"\r\n")
    if end < 0:
        end = data.find(b"\n")
    if end < 0:
        return "TCP" if len(data) >= MAX_SNIFF_BYTES else None
    line = data[:end].rstrip(b"\r")
    return "HTTP" if line.endswith((b" HTTP/1.1", b" HTTP/1.0")) else "TCP"
