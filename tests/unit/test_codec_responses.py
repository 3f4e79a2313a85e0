"""Response parsing and the writer, both backends, real bytes."""
from __future__ import annotations

import pytest

from meshproxy.codec import BACKENDS, make_response_parser
from meshproxy.codec.api import BODY_UNTIL_CLOSE, CodecLimits, ProtocolError
from meshproxy.codec.writer import (CHUNK_END, LAST_CHUNK, chunk_head, encode_chunk, encode_request_head,
                                    encode_response_head, simple_response)


class Rec:
    def __init__(self):
        self.events = []

    def on_response_head(self, head):
        self.events.append(("head", head))

    def on_body(self, data):
        if self.events and self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + data)
        else:
            self.events.append(("body", data))

    def on_message_complete(self):
        self.events.append(("done",))


def run(backend, data, step=0, head=False, eof=False):
    rec = Rec()
    parser = make_response_parser(backend, rec, CodecLimits())
    if head:
        parser.expect_no_body()
    for piece in ([data] if not step else [data[i:i + step] for i in range(0, len(data), step)]):
        parser.feed(piece)
    if eof:
        parser.feed_eof()
    return rec.events, parser


backends = pytest.mark.parametrize("backend", sorted(BACKENDS))
steps = pytest.mark.parametrize("step", [0, 1, 5])


@backends
@steps
def test_content_length_response(backend, step):
    events, _ = run(backend, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", step)
    assert events[0][1].status == 200 and events[0][1].reason == b"OK"
    assert events[1:] == [("body", b"hi"), ("done",)]


@backends
@steps
def test_chunked_response_is_decoded(backend, step):
    events, _ = run(backend, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n", step)
    assert events[1:] == [("body", b"hi"), ("done",)]


@backends
def test_body_until_close_is_completed_by_eof(backend):
    events, _ = run(backend, b"HTTP/1.1 200 OK\r\n\r\nabc", eof=True)
    assert events[0][1].body_kind == BODY_UNTIL_CLOSE and not events[0][1].keep_alive
    assert events[1:] == [("body", b"abc"), ("done",)]


@backends
@pytest.mark.parametrize("data", [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
                                  b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
                                  b"HTTP/1.1 200 OK\r\nContent-Le"])
def test_truncated_response_is_an_error_at_eof(backend, data):
    with pytest.raises(ProtocolError) as err:
        run(backend, data, eof=True)
    assert err.value.status == 502


@backends
@steps
def test_head_response_has_no_body_and_the_next_response_parses(backend, step):
    data = (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    rec = Rec()
    parser = make_response_parser(backend, rec, CodecLimits())
    parser.expect_no_body()
    first = data[:data.index(b"HTTP/1.1", 5)]
    rest = data[len(first):]
    for chunk in ([first] if not step else [first[i:i + step] for i in range(0, len(first), step)]):
        parser.feed(chunk)
    parser.feed(rest)
    assert [e[0] for e in rec.events] == ["head", "done", "head", "body", "done"]


@backends
@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_have_no_body(backend, status):
    events, _ = run(backend, b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status
                    + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert [e[0] for e in events] == ["head", "done", "head", "done"]


@backends
@steps
def test_interim_1xx_are_consumed_silently(backend, step):
    events, _ = run(backend, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n"
                    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx", step)
    assert [e[0] for e in events] == ["head", "body", "done"] and events[0][1].status == 200


@backends
@steps
def test_101_stops_the_parser_and_keeps_tunnel_bytes(backend, step):
    events, parser = run(backend, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\n\r\n\x81\x02hi", step)
    assert events[0][1].status == 101 and parser.unconsumed() == b"\x81\x02hi"


@backends
@pytest.mark.parametrize("data", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
])
def test_bad_upstream_framing_is_a_502(backend, data):
    with pytest.raises(ProtocolError) as err:
        run(backend, data)
    assert err.value.status == 502


def test_writer_encodes_heads_chunks_and_error_responses():
    assert encode_request_head(b"GET", b"/x", [(b"host", b"a")]) == b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n"
    assert encode_response_head(200, b"OK", [(b"content-length", b"0")]) == \
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    assert encode_response_head(299, b"Odd", []) == b"HTTP/1.1 299 Odd\r\n\r\n"
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n" and encode_chunk(b"") == b""
    for data in (b"hello", b"x" * 0x1234):
        assert chunk_head(len(data)) + data + CHUNK_END == encode_chunk(data)
    assert LAST_CHUNK == b"0\r\n\r\n"
    resp = simple_response(431)
    head, body = resp.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"connection: close" in head and b"content-type: text/plain" in head
    assert b"content-length: %d" % len(body) in head


@backends
def test_writer_output_parses_back(backend):
    from meshproxy.codec import make_request_parser

    class R:
        heads, body = [], b""
        def on_request_head(self, h): self.heads.append(h)
        def on_body(self, d): self.body += d
        def on_message_complete(self): pass
    r = R()
    p = make_request_parser(backend, r, CodecLimits())
    p.feed(encode_request_head(b"POST", b"/u", [(b"host", b"a"), (b"transfer-encoding", b"chunked")])
           + encode_chunk(b"abc") + LAST_CHUNK)
    assert r.heads[0].path == b"/u" and r.body == b"abc"


@backends
@pytest.mark.parametrize("version,connection,keep_alive", [
    (b"1.1", None, True), (b"1.1", b"keep-alive", True), (b"1.1", b"Keep-Alive", True),
    (b"1.1", b"close", False), (b"1.1", b"Close", False), (b"1.1", b"close, foo", False),
    (b"1.1", b"foo", True), (b"1.0", None, False), (b"1.0", b"keep-alive", True), (b"1.0", b"close", False),
])
def test_response_persistence_from_version_and_connection(backend, version, connection, keep_alive):
    # the common response (one Content-Length) is decided by a fast path; it must agree with RFC 9112 §9.3
    field = b"Connection: %s\r\n" % connection if connection is not None else b""
    for _ in range(2):      # the second time through, the Content-Length value is memoized
        events, _ = run(backend, b"HTTP/%s 200 OK\r\n%sContent-Length: 2\r\n\r\nhi" % (version, field))
        head = events[0][1]
        assert (head.keep_alive, head.content_length, head.body_kind) == (keep_alive, 2, 1)
        assert head.names == tuple(n for n, _ in head.headers)


@backends
@pytest.mark.parametrize("length,expected", [(b"0", 0), (b"007", 7), (b"10", 10), (b"000", 0)])
def test_content_length_with_leading_zeros_is_read_every_time_and_right(backend, length, expected):
    for _ in range(2):
        events, _ = run(backend, b"HTTP/1.1 200 OK\r\nContent-Length: %s\r\n\r\n%s" % (length, b"x" * expected))
        assert events[0][1].content_length == expected
        assert events[-1] == ("done",)


@backends
@pytest.mark.parametrize("length", [b"1x", b"-1", b"+1", b"1 2", b"99999999999999999999"])
def test_a_bad_content_length_is_refused_even_after_good_ones(backend, length):
    run(backend, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")      # memoizes a good value first
    with pytest.raises(ProtocolError) as err:
        run(backend, b"HTTP/1.1 200 OK\r\nContent-Length: %s\r\n\r\n" % length)
    assert err.value.status == 502


def test_writer_heads_without_fields_and_with_unknown_or_custom_reasons():
    from meshproxy.codec.writer import content_length_field
    assert encode_request_head(b"GET", b"/", []) == b"GET / HTTP/1.1\r\n\r\n"
    assert encode_response_head(200, b"", []) == b"HTTP/1.1 200 OK\r\n\r\n"
    assert encode_response_head(200, b"Fine", [(b"a", b"b")]) == b"HTTP/1.1 200 Fine\r\na: b\r\n\r\n"
    assert encode_response_head(200, b"OK", [(b"a", b"b")], version=b"1.0") == b"HTTP/1.0 200 OK\r\na: b\r\n\r\n"
    assert content_length_field(0) == (b"content-length", b"0")
    assert content_length_field(16384) is content_length_field(16384)   # memoized
