"""Errors of the request path, typed by source and retryability, and the one place that
turns them into responses.

Each failure carries an Envoy response flag for the access log and metrics:

====  =============================================  ======
flag  meaning                                        status
====  =============================================  ======
NR    no route / no cluster for the route             404/503
UH    no healthy upstream endpoint                    503
UF    upstream connection failure                     503
UC    upstream connection terminated (reset)          503
UT    upstream request timeout (route / per try)      504
URX   retries exhausted (with the last failure's)     *
UO    upstream overflow (circuit breaker)             503
UPE   upstream protocol error (bad framing)           502
DC    downstream connection terminated                 -
FI    fault injected (abort)                          *
DI    fault injected (delay)                           -
====  =============================================  ======
"""
from __future__ import annotations

from enum import Enum

from ..codec.writer import simple_response


class Failure(Enum):
    """Where a forwarding attempt failed.  ``retryable_before_send`` failures happened
    before any request byte reached an upstream, so even non-idempotent requests may
    be retried after them."""

    # (retry-on condition, response flag, status, retryable before send, detail): the detail,
    # Envoy's reset reason, makes each member distinct (equal values would make aliases)
    CONNECT_FAILURE = ("connect-failure", "UF", 503, True, "connection_failure")
    CONNECT_TIMEOUT = ("connect-failure", "UF", 503, True, "connection_timeout")
    RESET_BEFORE_RESPONSE = ("reset", "UC", 503, False, "connection_termination")
    PER_TRY_TIMEOUT = ("timeout", "UT", 504, False, "per_try_timeout")
    PROTOCOL_ERROR = ("reset", "UPE", 502, False, "protocol_error")

    def __init__(self, condition: str, flag: str, status: int, before_send: bool, detail: str):
        self.condition = condition      # the Envoy retry-on condition it matches
        self.flag = flag
        self.status = status
        self.retryable_before_send = before_send
        self.detail = detail


_BODIES = {
    400: b"bad request",
    404: b"no route",
    408: b"request timeout",
    413: b"payload too large",
    414: b"uri too long",
    431: b"request header fields too large",
    501: b"not implemented",
    502: b"upstream protocol error",
    503: b"no healthy upstream",
    504: b"upstream request timeout",
    505: b"http version not supported",
}

_FLAG_BODIES = {
    "NR": b"no route to destination",
    "UF": b"upstream connect error or disconnect/reset before headers. reset reason: connection failure",
    "UC": b"upstream connect error or disconnect/reset before headers. reset reason: connection termination",
    "UO": b"upstream overflow (circuit breaker open)",
    "UT": b"upstream request timeout",
    "UPE": b"upstream protocol error",
    "UH": b"no healthy upstream",
}


def error_response(status: int, flag: str = "", close: bool = False) -> bytes:
    """The bytes of a response the proxy generates itself."""
    body = _FLAG_BODIES.get(flag) or _BODIES.get(status, b"error")
    return simple_response(status, body, close=close)
