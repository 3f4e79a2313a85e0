"""Limits at their edges and requests that would turn into tunnels, both codec backends, any
read sizes: the limit itself passes, one more gets the limit's status."""
from __future__ import annotations

import pytest

from meshproxy.codec import BACKENDS, make_request_parser
from meshproxy.codec.api import CodecLimits, ProtocolError

DEFAULT = CodecLimits()
# one write, 1-byte writes (for the small inputs), 7-byte and 4 KiB writes
STEPS = [0, 7, 4096]


class Rec:
    def __init__(self):
        self.heads, self.body, self.done = [], b"", 0

    def on_request_head(self, head):
        self.heads.append(head)

    def on_body(self, data):
        self.body += data

    def on_message_complete(self):
        self.done += 1


def outcome(backend: str, data: bytes, limits: CodecLimits, step: int):
    """("ok", complete messages, body) or the refusal's status."""
    rec = Rec()
    parser = make_request_parser(backend, rec, limits)
    try:
        for i in range(0, len(data), step or len(data)):
            parser.feed(data[i:i + (step or len(data))])
    except ProtocolError as err:
        return err.status
    return ("ok", rec.done, len(rec.body))


def head_of(size: int) -> bytes:
    """A request head of exactly ``size`` bytes, from the request line to the blank line."""
    base = b"GET / HTTP/1.1\r\nHost: a\r\nX: \r\n\r\n"
    return b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * (size - len(base)) + b"\r\n\r\n"


def fields(count: int) -> bytes:
    return b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X%d: v\r\n" % i for i in range(count - 1)) + b"\r\n"


def target_of(size: int) -> bytes:
    return b"GET /" + b"p" * (size - 1) + b" HTTP/1.1\r\nHost: a\r\n\r\n"


def length_body(size: int) -> bytes:
    return b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size


def chunked_body(size: int) -> bytes:
    parts = [size // 3, size // 3, size - 2 * (size // 3)]
    return (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(b"%x\r\n" % n + b"x" * n + b"\r\n" for n in parts) + b"0\r\n\r\n")


backends = pytest.mark.parametrize("backend", sorted(BACKENDS))
steps = pytest.mark.parametrize("step", STEPS)


@backends
@steps
def test_a_head_of_exactly_the_limit_passes_and_one_byte_more_gets_431(backend, step):
    assert len(head_of(60 * 1024)) == DEFAULT.max_header_bytes
    assert outcome(backend, head_of(60 * 1024), DEFAULT, step) == ("ok", 1, 0)
    assert outcome(backend, head_of(60 * 1024 + 1), DEFAULT, step) == 431


@backends
@steps
def test_exactly_100_fields_pass_and_101_get_431(backend, step):
    assert outcome(backend, fields(100), DEFAULT, step) == ("ok", 1, 0)
    assert outcome(backend, fields(101), DEFAULT, step) == 431


@backends
@steps
def test_a_target_of_exactly_the_limit_passes_and_one_byte_more_gets_414(backend, step):
    assert outcome(backend, target_of(8192), DEFAULT, step) == ("ok", 1, 0)
    assert outcome(backend, target_of(8193), DEFAULT, step) == 414


@backends
@pytest.mark.parametrize("step", [0, 1, 7, 4096])
@pytest.mark.parametrize("framing", [length_body, chunked_body], ids=["content-length", "chunked"])
def test_a_body_of_exactly_the_cap_passes_and_one_byte_more_gets_413(backend, step, framing):
    capped = CodecLimits(max_body_bytes=1000)
    assert outcome(backend, framing(1000), capped, step) == ("ok", 1, 1000)
    assert outcome(backend, framing(1001), capped, step) == 413


@backends
@pytest.mark.parametrize("step", [0, 1, 7])
@pytest.mark.parametrize("request_bytes", [
    b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nContent-Length: 5\r\n\r\nhello",
], ids=["websocket-content-length", "h2c-chunked", "connect-content-length"])
def test_an_upgrade_or_connect_request_with_a_body_is_refused_not_tunnelled(backend, step, request_bytes):
    # the body would otherwise be taken for tunnel bytes, held for a 101 that never comes
    assert outcome(backend, request_bytes + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n", DEFAULT, step) == 400


@backends
def test_an_upgrade_request_without_a_body_still_becomes_a_tunnel(backend):
    rec = Rec()
    parser = make_request_parser(backend, rec, DEFAULT)
    parser.feed(b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
                b"Content-Length: 0\r\n\r\nframe-bytes")
    assert rec.heads[0].upgrade == b"websocket"
    assert parser.unconsumed() == b"frame-bytes"
