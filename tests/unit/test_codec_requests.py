"""Request parsing, both backends, real bytes, any read sizes."""
from __future__ import annotations

import pytest

from meshproxy.codec import BACKENDS, make_request_parser
from meshproxy.codec.api import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, CodecLimits, ProtocolError


class Rec:
    def __init__(self):
        self.events = []

    def on_request_head(self, head):
        self.events.append(("head", head))

    def on_body(self, data):
        if self.events and self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + data)
        else:
            self.events.append(("body", data))

    def on_message_complete(self):
        self.events.append(("done",))


def feed(backend, data, limits=CodecLimits(), step=0):
    rec = Rec()
    parser = make_request_parser(backend, rec, limits)
    pieces = [data] if not step else [data[i:i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        parser.feed(piece)
    return rec.events, parser


def refused(backend, data, limits=CodecLimits(), step=0):
    with pytest.raises(ProtocolError) as err:
        feed(backend, data, limits, step)
    return err.value.status


backends = pytest.mark.parametrize("backend", sorted(BACKENDS))
steps = pytest.mark.parametrize("step", [0, 1, 7])


@backends
@steps
def test_get_gives_a_head_with_every_field_filled(backend, step):
    events, _ = feed(backend, b"GET /a/b?q=1 HTTP/1.1\r\nHost: svc.local:8080\r\nUser-Agent:  x  \r\n\r\n", step=step)
    (kind, head), done = events
    assert (head.method, head.target, head.version, head.host, head.path) == \
        (b"GET", b"/a/b?q=1", b"1.1", b"svc.local:8080", b"/a/b?q=1")
    assert head.headers == [(b"host", b"svc.local:8080"), (b"user-agent", b"x")]
    assert (head.body_kind, head.content_length, head.keep_alive, head.upgrade, head.expect_continue) == \
        (BODY_NONE, -1, True, b"", False)
    assert done == ("done",)


@backends
@steps
def test_post_with_content_length_delivers_the_body(backend, step):
    events, _ = feed(backend, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello", step=step)
    assert events[0][1].body_kind == BODY_LENGTH and events[0][1].content_length == 5
    assert events[1:] == [("body", b"hello"), ("done",)]


@backends
@steps
def test_chunked_body_is_decoded_and_trailers_are_dropped(backend, step):
    data = (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    events, _ = feed(backend, data, step=step)
    assert events[0][1].body_kind == BODY_CHUNKED
    assert events[1:] == [("body", b"hello world"), ("done",)]
    assert (b"x-trailer", b"t") not in events[0][1].headers


@backends
@steps
def test_pipelined_requests_come_out_in_order(backend, step):
    data = b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(3))
    events, _ = feed(backend, data, step=step)
    assert [e[1].target for e in events if e[0] == "head"] == [b"/0", b"/1", b"/2"]
    assert [e[0] for e in events] == ["head", "done"] * 3


@backends
def test_http10_is_close_unless_keep_alive_is_asked(backend):
    events, _ = feed(backend, b"GET / HTTP/1.0\r\n\r\n")
    assert events[0][1].keep_alive is False and events[0][1].host == b""
    events, _ = feed(backend, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert events[0][1].keep_alive is True
    events, _ = feed(backend, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert events[0][1].keep_alive is False


@backends
def test_bytes_after_a_connection_close_request_are_never_parsed(backend):
    events, _ = feed(backend, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert [e[0] for e in events] == ["head", "done"]


@backends
def test_absolute_form_target_takes_host_from_the_authority(backend):
    events, _ = feed(backend, b"GET http://a.example:81/p?x HTTP/1.1\r\nHost: b.example\r\n\r\n")
    head = events[0][1]
    assert (head.host, head.path, head.target) == (b"a.example:81", b"/p?x", b"http://a.example:81/p?x")


@backends
def test_expect_100_continue_is_flagged(backend):
    events, _ = feed(backend, b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n")
    assert events[0][1].expect_continue is True


@backends
@steps
def test_upgrade_request_stops_the_parser_and_keeps_tunnel_bytes(backend, step):
    data = (b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\r\n"
            b"\x81\x05hello GET / HTTP/1.1\r\n\r\n")
    events, parser = feed(backend, data, step=step)
    assert events[0][1].upgrade == b"websocket"
    assert [e[0] for e in events] == ["head", "done"]
    assert parser.unconsumed() == b"\x81\x05hello GET / HTTP/1.1\r\n\r\n"


@backends
@steps
@pytest.mark.parametrize("data,status", [
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX(y): b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1x\r\nZ\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nZXX0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1;" + b"e" * 5000 + b"\r\nZ\r\n0\r\n\r\n", 400),
    # a well-formed version we do not speak is 505 on both backends; a malformed one is 400
    (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505),
    (b"GET / HTTP/9.9\r\nHost: a\r\n\r\n", 505),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"GET / HTTP/1.32\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/1.x\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTPS/1.1\r\nHost: a\r\n\r\n", 400),
])
def test_framing_violations_are_refused_with_their_status(backend, step, data, status):
    assert refused(backend, data, step=step) == status


@backends
@steps
def test_nothing_after_a_refusal_is_delivered(backend, step):
    rec = Rec()
    parser = make_request_parser(backend, rec, CodecLimits())
    data = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost : a\r\n\r\nGET /3 HTTP/1.1\r\nHost: a\r\n\r\n"
    pieces = [data] if not step else [data[i:i + step] for i in range(0, len(data), step)]
    with pytest.raises(ProtocolError):
        for piece in pieces:
            parser.feed(piece)
    with pytest.raises(ProtocolError):
        parser.feed(b"GET /4 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert [e[1].target for e in rec.events if e[0] == "head"] == [b"/"]


SMALL = CodecLimits(max_header_bytes=1024, max_header_count=10, max_target_bytes=256, max_body_bytes=100)


@backends
@pytest.mark.parametrize("step", [0, 1])
@pytest.mark.parametrize("data,status", [
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 2000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 2000, 431),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X%d: v\r\n" % i for i in range(12)) + b"\r\n", 431),
    (b"GET /" + b"p" * 300 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    (b"GET /" + b"p" * 2000, 414),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 101\r\n\r\n", 413),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n" + b"x" * 100 + b"\r\n1\r\nx\r\n0\r\n\r\n", 413),
])
def test_limits_hold_for_one_write_and_for_one_byte_writes(backend, step, data, status):
    assert refused(backend, data, SMALL, step) == status
