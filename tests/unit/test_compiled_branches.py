"""Functions with a C branch for the compiled hot path (``if cython.compiled:``) must give
exactly what their Python reference gives.  These tests state the reference independently
(from the RFC sets, the documented id layout, bisect), so they check whichever branch is
running: the compiled one under ``./scripts/test``, the Python one in its pure-Python rerun."""
from __future__ import annotations

import random
from bisect import bisect_left

import pytest

import meshproxy
from meshproxy.codec import BACKENDS
from meshproxy.codec.api import CodecLimits, ProtocolError
from meshproxy.codec.framing import TCHAR, VALUE_CHARS, check_fields, response_head
from meshproxy.codec.writer import encode_request_head, encode_response_head
from meshproxy.telemetry.metrics import ISTIO_BUCKETS, ProxyMetrics, PeerInfo
from meshproxy.telemetry.tracing import IdSource, ProxyTracer, random_uuid

LIMITS = CodecLimits()
BACKEND_NAMES = sorted(BACKENDS)   # llhttp only where it is available (compiled)


def test_the_reported_hot_path_is_the_one_that_runs():
    import os
    import cython

    from meshproxy.codec import framing
    from meshproxy.downstream import http_conn
    from meshproxy.proxy import pipeline
    compiled = [m.__file__.endswith((".so", ".pyd")) for m in (framing, http_conn, pipeline)]
    if meshproxy.HOT_PATH == "compiled":
        assert all(compiled)
    else:
        assert not any(compiled) and not cython.compiled
        if os.environ.get("MESHPROXY_PURE") == "1":
            assert meshproxy.HOT_PATH == "python (MESHPROXY_PURE=1)"


@pytest.mark.parametrize("byte", range(256))
def test_each_byte_in_a_field_name_and_value_gets_the_rfc_verdict(byte):
    b = bytes([byte])
    name_ok = byte in TCHAR
    value_ok = byte in VALUE_CHARS
    for headers, ok in (([(b"x" + b + b"y", b"v")], name_ok), ([(b"name", b"a" + b + b"c")], value_ok),
                        ([(b"host", b"h"), (b"a", b"b"), (b"n" + b, b"v" + b)], name_ok and value_ok)):
        if ok:
            check_fields(headers, LIMITS)
        else:
            with pytest.raises(ProtocolError) as err:
                check_fields(headers, LIMITS)
            assert err.value.status == 400 and err.value.reason == "invalid header field"


def test_empty_field_name_and_its_precedence():
    with pytest.raises(ProtocolError, match="empty header field name"):
        check_fields([(b"a", b"b"), (b"", b"v")], LIMITS)
    # a bad byte anywhere is reported first, as the reference does
    with pytest.raises(ProtocolError, match="invalid header field"):
        check_fields([(b"", b"v"), (b"a", b"\x00")], LIMITS, 502)


def test_response_head_returns_names_in_order_for_the_framing_dispatch():
    head = response_head(200, b"OK", b"1.1", [(b"server", b"x"), (b"content-length", b"5"), (b"date", b"d")],
                         LIMITS, False)
    assert head.names == (b"server", b"content-length", b"date") and head.content_length == 5


FIELDS = [(b"host", b"example.com"), (b"x-empty", b""), (b"user-agent", b"curl/8 \xff")]


@pytest.mark.parametrize("headers", [FIELDS, [], FIELDS[:1]])
def test_encoded_heads_match_the_reference_layout(headers):
    fields = b"".join(b"%s: %s\r\n" % f for f in headers)
    assert encode_request_head(b"GET", b"/a?b", headers) == b"GET /a?b HTTP/1.1\r\n" + fields + b"\r\n"
    assert encode_request_head(b"GET", b"/a?b", iter(headers)) == encode_request_head(b"GET", b"/a?b", headers)
    assert encode_response_head(200, b"", headers) == b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n"
    assert encode_response_head(200, b"OK", tuple(headers)) == encode_response_head(200, b"", headers)
    assert encode_response_head(299, b"", headers) == b"HTTP/1.1 299 \r\n" + fields + b"\r\n"


_UUID_CLEAR = ~((0xF << 76) | (0x3 << 62))
_UUID_V4 = (0x4 << 76) | (0x2 << 62)


def _uuid_text(value: int) -> bytes:
    h = b"%032x" % value
    return b"-".join((h[:8], h[8:12], h[12:16], h[16:20], h[20:]))


@pytest.mark.parametrize("seed", range(50))
@pytest.mark.parametrize("source", [random.Random, lambda seed: IdSource(random.Random(seed).randbytes(32))])
def test_request_ids_are_the_documented_uuid4_of_128_rng_bits(seed, source):
    # compiled, an IdSource fills the 16 bytes from its C state: the same bits as its getrandbits
    expected = _uuid_text(source(seed).getrandbits(128) & _UUID_CLEAR | _UUID_V4)
    got = random_uuid(source(seed))
    assert got == expected and got[14:15] == b"4" and got[19:20] in b"89ab"


@pytest.mark.parametrize("seed", range(50))
def test_new_trace_ids_are_the_documented_slices_of_one_320_bit_draw(seed):
    r = random.Random(seed).getrandbits(320)
    request_id = _uuid_text((r >> 192) & _UUID_CLEAR | _UUID_V4)
    trace, span = (r >> 64) & ((1 << 128) - 1), r & ((1 << 64) - 1)
    tracer = ProxyTracer(None, sample_rate=0.5, rng=random.Random(seed))
    ctx = tracer.start([(b"host", b"h")], names=(b"host",))
    assert ctx.request_id == request_id
    assert ctx.trace_id == b"%032x" % trace and ctx.span_id == b"%016x" % span
    assert ctx.sampled == (trace & ((1 << 64) - 1) < 1 << 63)


# xoshiro256** outputs printed by the authors' reference C code (prng.di.unimi.it/xoshiro256starstar.c,
# compiled with gcc -O2) from the state s[0..3] given; IdSource reads its 32-byte seed as
# four little-endian words.
_XOSHIRO_VECTORS = [
    ((1, 2, 3, 4), [0x2D00, 0x0, 0x5A007080, 0x10E0000000009D80, 0x10E0B61CE1009D80, 0x0870021CE143AD00]),
    ((0x0706050403020100, 0x0F0E0D0C0B0A0908, 0x1716151413121110, 0x1F1E1D1C1B1A1918),
     [0xBC258EF861CB354D, 0x258EF861CB349EB5, 0x013C0EE1B61E1C2D, 0x60E9801651AD191D,
      0x76BCD2D5A42E1C5D, 0x89983C77DAD11265]),
]


@pytest.mark.parametrize("state, outputs", _XOSHIRO_VECTORS)
def test_id_source_is_xoshiro256_starstar(state, outputs):
    source = IdSource(b"".join(w.to_bytes(8, "little") for w in state))
    assert [source.next64() for _ in outputs] == outputs


@pytest.mark.parametrize("k", [1, 7, 63, 64, 65, 128, 320])
def test_id_source_getrandbits_takes_the_top_bits_of_whole_draws(k):
    seed = bytes(range(32))
    reference = IdSource(seed)
    n = (k + 63) // 64
    words = [reference.next64() for _ in range(n)]
    joined = int.from_bytes(b"".join(w.to_bytes(8, "big") for w in words), "big")
    assert IdSource(seed).getrandbits(k) == joined >> (64 * n - k)


def test_id_source_refuses_a_short_seed_and_leaves_the_all_zero_state():
    with pytest.raises(ValueError, match="32 bytes"):
        IdSource(b"\x01" * 31)
    zero, one = IdSource(bytes(32)), IdSource((1).to_bytes(8, "little") + bytes(24))
    draws = [zero.next64() for _ in range(4)]
    assert draws == [one.next64() for _ in range(4)] and any(draws)


@pytest.mark.parametrize("seed", range(20))
def test_new_trace_ids_from_the_default_source_are_the_slices_of_its_320_bit_draw(seed):
    # compiled, the default source fills the ids from its C state without a Python int:
    # the result must be what its getrandbits(320) documents
    key = random.Random(seed).randbytes(32)
    r = IdSource(key).getrandbits(320)
    request_id = _uuid_text((r >> 192) & _UUID_CLEAR | _UUID_V4)
    trace, span = (r >> 64) & ((1 << 128) - 1), r & ((1 << 64) - 1)
    ctx = ProxyTracer(None, sample_rate=0.5, rng=IdSource(key)).start([(b"host", b"h")], names=(b"host",))
    assert ctx.request_id == request_id
    assert ctx.trace_id == b"%032x" % trace and ctx.span_id == b"%016x" % span
    assert ctx.sampled == (trace & ((1 << 64) - 1) < 1 << 63)


def test_default_tracers_are_seeded_apart():
    # each worker builds its own tracer after fork; two tracers must not repeat each other's ids
    a, b = ProxyTracer(None), ProxyTracer(None)
    assert isinstance(a._rng, IdSource if meshproxy.HOT_PATH == "compiled" else random.Random)
    ids_a = {a.start([], names=()).trace_id for _ in range(100)}
    ids_b = {b.start([], names=()).trace_id for _ in range(100)}
    assert len(ids_a) == len(ids_b) == 100 and not ids_a & ids_b


class _ZeroRng(random.Random):
    def getrandbits(self, k):
        return 0


def test_all_zero_draw_still_gives_valid_trace_and_span_ids():
    ctx = ProxyTracer(None, rng=_ZeroRng()).start([], names=())
    assert ctx.trace_id == b"0" * 31 + b"1" and ctx.span_id == b"0" * 15 + b"1"


def test_histogram_buckets_match_bisect_at_and_around_every_bound():
    values = [0, 0.1, 7, 10**9] + [b + d for b in ISTIO_BUCKETS for d in (-0.25, 0, 0.25)]
    metrics = ProxyMetrics()
    h = metrics.http_handle("source", PeerInfo(), PeerInfo())
    for v in values:
        metrics.record_http(h, 200, "-", v, int(v), int(v))
    expected = [0] * (len(ISTIO_BUCKETS) + 1)
    for v in values:
        expected[bisect_left(ISTIO_BUCKETS, v)] += 1
    hist = metrics.dump()["histograms"]["istio_request_duration_milliseconds"]
    assert hist[0][1] == expected and hist[0][2] == pytest.approx(sum(values))


class _Heads:
    def __init__(self):
        self.heads = []

    def on_request_head(self, head):
        self.heads.append(head)

    def on_body(self, data):
        pass

    def on_message_complete(self):
        pass


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_field_names_are_lower_cased_and_trailing_ows_dropped_only_where_present(backend):
    from meshproxy.codec import make_request_parser
    sink = _Heads()
    parser = make_request_parser(backend, sink, LIMITS)
    parser.feed(b"GET / HTTP/1.1\r\nHost: h\r\nX-MiXeD-Case: a b \t\r\nlower: v\r\nUA: \xff\t\r\nE:\r\n\r\n")
    assert sink.heads[0].headers == [(b"host", b"h"), (b"x-mixed-case", b"a b"), (b"lower", b"v"),
                                     (b"ua", b"\xff"), (b"e", b"")]


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_common_field_names_in_any_case_and_their_near_misses_come_out_lower_cased(backend, split):
    """Compiled, a common name is a shared constant (api.COMMON_FIELD_NAMES) when it
    matches in any case; names one byte off, longer or shorter, or split across reads are
    copied and lower-cased.  Either way the field list is the same."""
    from meshproxy.codec import make_request_parser
    from meshproxy.codec.api import COMMON_FIELD_NAMES as _COMMON_NAMES
    names = [n.upper() for n in _COMMON_NAMES] + [n.title() for n in _COMMON_NAMES] + [
        b"Hos", b"Hostt", b"Hosu", b"Gost", b"Content-Lengtz", b"Content_Length", b"B4", b"X-B3-SpanIdX",
        # same length, first, middle and last byte as a common name (the slot's key), one byte off
        b"X-Request-Ix", b"X-B3-Tracxid", b"Acxept-Ranges", b"Axe", b"V-a", b"Cookke", b"Set-Cookke"]
    names = [n for n in names if n.lower() not in (b"host", b"content-length", b"transfer-encoding", b"connection",
                                                   b"upgrade", b"keep-alive")]
    head = b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(n + b": v\r\n" for n in names) + b"\r\n"
    sink = _Heads()
    parser = make_request_parser(backend, sink, LIMITS)
    if split:
        for i in range(len(head)):
            parser.feed(head[i:i + 1])
    else:
        parser.feed(head)
    assert sink.heads[0].headers == [(b"host", b"h")] + [(n.lower(), b"v") for n in names]
    if backend == "llhttp" and not split:
        shared = {n: n for n in _COMMON_NAMES}
        assert all((shared.get(name) is name) == (name in shared) for name, _ in sink.heads[0].headers)


# Heads fed one after another on one connection: each a value the field cache (httptools
# backend, compiled) could wrongly reuse, next to the one it holds.
_CACHE_HEADS = [
    [(b"User-Agent", b"curl/8"), (b"Accept", b"*/*")],
    [(b"User-Agent", b"curl/8"), (b"Accept", b"*/*")],             # the same values
    [(b"USER-AGENT", b"curl/8 \t"), (b"accept", b"*/*")],          # trailing OWS, other case
    [(b"User-Agent", b"curl/80"), (b"Accept", b"*/")],              # one byte longer, shorter
    [(b"User-Agent", b"curl/9"), (b"Accept", b"")],                 # same length, empty
    [(b"User-Agent", b"curl/9"), (b"Accept", b"")],
    [(b"User-Agent", b"u" * 128), (b"Accept", b"a" * 129)],         # at and over the size kept
    [(b"User-Agent", b"u" * 128), (b"Accept", b"a" * 129)],
    [(b"Authorization", b"Bearer x"), (b"Cookie", b"s=1"), (b"X-Request-Id", b"r")],
    [(b"Authorization", b"Bearer x"), (b"Cookie", b"s=1"), (b"X-Request-Id", b"r")],
    [(b"Host-X", b"curl/9"), (b"User-Agentx", b"curl/9")],          # near-miss names, same value
]


def _cache_head(fields) -> bytes:
    return b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n"


def _expected(fields):
    return [(b"host", b"h")] + [(n.lower(), v.rstrip(b" \t")) for n, v in fields]


@pytest.mark.parametrize("split", ["whole", "bytes", "random"])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_repeated_field_values_parse_the_same_whatever_the_field_cache_holds(backend, split):
    """Compiled, a common field whose value is byte-for-byte the last one seen under that
    name is handed out as the same tuple.  The fields must be what a fresh parse gives
    whatever the cache holds: values one byte longer or shorter, with trailing OWS, empty,
    split across reads right where the kept value ends."""
    from meshproxy.codec import llhttp_driver, make_request_parser
    llhttp_driver.clear_field_cache()
    rng = random.Random(7)
    sink = _Heads()
    parser = make_request_parser(backend, sink, LIMITS)
    stream = b"".join(_cache_head(fields) for fields in _CACHE_HEADS)
    if split == "whole":
        parser.feed(stream)
    elif split == "bytes":
        for i in range(len(stream)):
            parser.feed(stream[i:i + 1])
    else:
        i = 0
        while i < len(stream):
            n = rng.randint(1, 40)
            parser.feed(stream[i:i + n])
            i += n
    assert [head.headers for head in sink.heads] == [_expected(fields) for fields in _CACHE_HEADS]


def test_a_value_split_where_the_kept_one_ends_is_not_the_kept_field():
    from meshproxy.codec import DEFAULT_BACKEND, llhttp_driver, make_request_parser
    llhttp_driver.clear_field_cache()
    sink = _Heads()
    parser = make_request_parser(DEFAULT_BACKEND, sink, LIMITS)
    parser.feed(_cache_head([(b"User-Agent", b"curl/8")]))
    second = _cache_head([(b"User-Agent", b"curl/80")])
    cut = second.index(b"curl/8") + len(b"curl/8")
    parser.feed(second[:cut])
    parser.feed(second[cut:])
    assert sink.heads[1].headers == [(b"host", b"h"), (b"user-agent", b"curl/80")]
    assert sink.heads[0].headers[1] == (b"user-agent", b"curl/8")


def test_the_field_cache_hands_out_the_kept_tuple_only_where_it_may():
    """The identity the cache promises, checked where it runs (compiled, llhttp driven):
    common names with values up to 128 bytes are the kept tuple; credentials, tracing
    fields, longer values and names that are not common never are."""
    from meshproxy.codec import DEFAULT_BACKEND, llhttp_driver, make_request_parser
    llhttp_driver.clear_field_cache()
    sink = _Heads()
    parser = make_request_parser(DEFAULT_BACKEND, sink, LIMITS)
    for fields in ([(b"User-Agent", b"curl/8"), (b"Accept", b"a" * 128), (b"Content-Type", b"a" * 129),
                    (b"Authorization", b"Bearer x"), (b"Cookie", b"s=1"), (b"Traceparent", b"t"),
                    (b"X-Custom", b"v")],) * 2:
        parser.feed(_cache_head(fields))
    first, second = (head.headers for head in sink.heads)
    assert first == second
    if DEFAULT_BACKEND != "llhttp":
        return                              # pure Python or httptools' parser objects: no cache
    assert {a[0] for a, b in zip(first, second) if a is b} == {b"host", b"user-agent", b"accept"}
    parser.feed(_cache_head([(b"User-Agent", b"curl/9")]))
    assert sink.heads[2].headers[1] is not first[1] and sink.heads[2].headers[1] == (b"user-agent", b"curl/9")


@pytest.mark.parametrize("names", [(), (b"host",), (b"a", b"host", b"b"), (b"host", b"x", b"host"),
                                   (b"hos", b"hostt", b"Host", b"host "), (b"connection",) * 3])
@pytest.mark.parametrize("name", [b"host", b"connection", b""])
def test_field_index_is_the_only_occurrence_or_minus_one_absent_minus_two_repeated(names, name):
    from meshproxy.codec.framing import field_index
    count = sum(1 for n in names if n == name)
    expected = -1 if count == 0 else names.index(name) if count == 1 else -2
    assert field_index(names, name) == expected


class _ResponseHeads(_Heads):
    def on_response_head(self, head):
        self.heads.append(head)


def test_the_llhttp_backend_is_the_default_wherever_the_hot_path_is_compiled():
    """Compiled, with the httptools this project installs (0.9.x), the llhttp backend drives
    llhttp through its exported C functions, after the import-time self-check agreed with
    httptools' own parser objects; a different httptools, or a disagreement, leaves only the
    httptools backend (slower, same behaviour) and fails this test, so that is never silent."""
    from meshproxy.codec import DEFAULT_BACKEND, llhttp_driver
    assert llhttp_driver.available() is (meshproxy.HOT_PATH == "compiled")
    assert DEFAULT_BACKEND == ("llhttp" if meshproxy.HOT_PATH == "compiled" else "httptools")


def test_the_driver_self_check_streams_cover_every_event_kind():
    """The self-check compares heads, bodies, ends, refusals and tunnelled bytes: each kind
    occurs in its streams (run here through the default backend of this mode)."""
    from meshproxy.codec import DEFAULT_BACKEND, _backend, llhttp_driver
    kinds = set()
    for request, data in llhttp_driver._SELF_CHECK:
        events = llhttp_driver.run_self_check_stream(_backend(DEFAULT_BACKEND), request, data, [])
        kinds.update(e[0] for e in events)
        if events[-1][1]:
            kinds.add("tunnelled bytes")
    assert kinds == {"head", "body", "end", "error", "tunnel", "tunnelled bytes"}


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_each_message_on_a_connection_gets_its_own_version(backend):
    """1.1 then 1.0 then 1.1 in one feed, then an unsupported version (505), on both sides."""
    from meshproxy.codec import make_request_parser, make_response_parser
    sink = _Heads()
    parser = make_request_parser(backend, sink, LIMITS)
    parser.feed(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n"
                b"GET /c HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [(h.path, h.version, h.keep_alive) for h in sink.heads] == [
        (b"/a", b"1.1", True), (b"/b", b"1.0", True), (b"/c", b"1.1", True)]
    with pytest.raises(ProtocolError) as err:
        parser.feed(b"GET /d HTTP/1.2\r\nHost: h\r\n\r\n")
    assert err.value.status == 505

    sink = _ResponseHeads()
    parser = make_response_parser(backend, sink, LIMITS)
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.0 204 No Content\r\nConnection: keep-alive\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    assert [(h.status, h.version) for h in sink.heads] == [(200, b"1.1"), (204, b"1.0"), (200, b"1.1")]
    parser = make_response_parser(backend, _ResponseHeads(), LIMITS)
    with pytest.raises(ProtocolError) as err:
        parser.feed(b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert err.value.status == 502


def test_snapshot_classes_behave_as_frozen_dataclasses_in_both_modes():
    """Compiled, the classes in model.pxd are extension-type dataclasses; they must keep what
    the rest of the code relies on: frozen fields, value equality and hashing, replace(),
    dataclasses.fields() (config_dump) and a readable repr."""
    import dataclasses
    from meshproxy.config.dump import to_jsonable
    from meshproxy.config.model import HeaderOps, HeaderPolicy, HttpRoute, WeightedDestination
    ops = HeaderOps(set=(("x-a", "1"),), remove=("x-b",))
    dest = WeightedDestination("reviews.default.svc.cluster.local", "v1", 9080, 90, "outbound|9080|v1|reviews",
                               HeaderPolicy(request=ops))
    route = HttpRoute("r", "VirtualService default/reviews: spec.http[0]", destinations=(dest,))
    with pytest.raises(AttributeError):
        route.name = "other"
    with pytest.raises(AttributeError):
        ops.set = ()
    same = WeightedDestination("reviews.default.svc.cluster.local", "v1", 9080, 90, "outbound|9080|v1|reviews",
                               HeaderPolicy(request=HeaderOps(set=(("x-a", "1"),), remove=("x-b",))))
    assert same == dest and hash(same) == hash(dest) and same != dataclasses.replace(dest, weight=10)
    assert dataclasses.replace(route, name="r2").destinations == (dest,)
    assert [f.name for f in dataclasses.fields(route)][:4] == ["name", "source", "matches", "destinations"]
    assert to_jsonable(ops) == {"set": [["x-a", "1"]], "add": [], "remove": ["x-b"]}
    assert repr(ops) == "HeaderOps(set=(('x-a', '1'),), add=(), remove=('x-b',))"
    assert repr(route).startswith("HttpRoute(name='r', source='VirtualService default/reviews: spec.http[0]'")


@pytest.mark.parametrize("value", [b"0", b"7", b"007", b"42", b"123456789012345", b"1234567890123456",
                                   b"000000000000000000000001", b"999999999999999999"])
def test_a_response_content_length_of_digits_is_its_number(value):
    """Compiled, up to 15 digits are read by a C loop (_short_digits), longer ones by the
    reference parse; both give the number, leading zeros included."""
    head = response_head(200, b"OK", b"1.1", [(b"content-length", value)], LIMITS, False)
    assert head.content_length == int(value)


@pytest.mark.parametrize("value", [b"", b"1a", b"-1", b"+1", b" 1", b"1 ", b"0x10", b"1,1", b"\xb9",
                                   b"1234567890123456789"])
def test_a_response_content_length_that_is_not_digits_is_refused(value):
    with pytest.raises(ProtocolError) as err:
        response_head(200, b"OK", b"1.1", [(b"content-length", value)], LIMITS, False)
    assert err.value.status == 502


@pytest.mark.parametrize("value, persists", [(b"keep-alive", True), (b"Keep-Alive", True), (b"close", False),
                                             (b"keep-alive, close", False), (b"upgrade", True)])
def test_a_response_connection_value_decides_persistence(value, persists):
    head = response_head(200, b"OK", b"1.1", [(b"content-length", b"2"), (b"connection", value)], LIMITS, False)
    assert head.keep_alive is persists


def test_sets_of_field_names_hold_the_parsers_shared_objects():
    # a common name from the llhttp backend is found in these sets by identity (no bytes
    # compared); a set built from its own literals would still be correct, only slower
    from meshproxy.codec import framing
    from meshproxy.codec.api import COMMON_FIELD_NAMES, name_set
    from meshproxy.proxy import transform
    from meshproxy.telemetry import tracing
    shared = {n: n for n in COMMON_FIELD_NAMES}
    sets = [framing._FRAMING_FIELDS, transform._HOP_BY_HOP, transform._REQUEST_DROP, transform._RESPONSE_DROP,
            transform._REQUEST_DROP_TRACED, transform._RESPONSE_DROP_UPGRADE, transform._RESPONSE_DROP_KEEP_LENGTH,
            tracing.PROPAGATION_HEADERS]
    if meshproxy.HOT_PATH != "compiled":    # C globals in the compiled build, built by the same code
        sets += [framing._REQUEST_RARE_FIELDS, framing._REQUEST_FRAMING_FIELDS, tracing._READ]
    checked = 0
    for names in sets:
        for member in names:
            if member in shared:
                assert member is shared[member], member
                checked += 1
    assert checked >= 30
    assert name_set([b"x-made-up", bytes(b"host")]) == {b"x-made-up", b"host"}


def test_monotonic_reads_the_clock_time_monotonic_reads():
    import time
    from meshproxy.clock import monotonic
    readings = []
    for _ in range(200):
        before = time.monotonic()
        now = monotonic()
        after = time.monotonic()
        assert before - 1e-6 <= now <= after + 1e-6
        readings.append(now)
    assert readings == sorted(readings)
    assert len(set(readings)) > 100        # sub-millisecond resolution, not the loop's cached tick


def test_runtime_now_is_the_injected_clock_or_the_system_clock():
    import asyncio
    import time
    from inproc import snapshot
    from meshproxy.bootstrap import Worker, WorkerOptions
    from meshproxy.config.store import SnapshotStore
    from meshproxy.proxy.observe import Telemetry
    loop = asyncio.new_event_loop()
    try:
        fake = Worker(loop, SnapshotStore(snapshot([], [])), WorkerOptions(), Telemetry(), clock=lambda: 42.5).runtime
        assert fake.now() == 42.5 and fake.clock() == 42.5 and not fake.system_clock
        real = Worker(loop, SnapshotStore(snapshot([], [])), WorkerOptions(), Telemetry()).runtime
        assert real.clock is time.monotonic
        before = time.monotonic()
        assert real.system_clock and before - 1e-6 <= real.now() <= time.monotonic() + 1e-6
        assert abs(real.clock() - time.monotonic()) < 0.5
    finally:
        loop.close()


@pytest.mark.parametrize("byte", range(256))
def test_each_byte_at_each_place_in_a_long_value_gets_the_rfc_verdict(byte):
    # compiled, values are scanned eight bytes at a time: every byte at every offset of a
    # 20-byte value (both words and the tail), alone and beside a tab
    ok = byte in VALUE_CHARS
    for pos in range(20):
        for filler in (b"a", b"\xff", b"\t"):
            value = bytearray(filler * 20)
            value[pos] = byte
            headers = [(b"x-long", bytes(value)), (b"host", b"h")]
            if ok:
                check_fields(headers, LIMITS, 400)
            else:
                with pytest.raises(ProtocolError):
                    check_fields(headers, LIMITS, 400)


@pytest.mark.parametrize("host", [b"svc.local", b"SVC.Local:8080", b"[::1]:80", b"", b"\xc0\xe9.example",
                                  b"a" * 300, b"x?y"])
def test_request_view_authority_method_path_and_query_match_the_reference(host):
    from meshproxy.codec.api import BODY_NONE, RequestHead
    from meshproxy.router.request import view_from_head
    for target in (b"/p", b"/p?q=1&r", b"/?", b"/a/b?c?d", b"/caf\xe9?x=\xe9"):
        for method in (b"GET", b"PROPFIND", b"M-SEARCH"):
            head = RequestHead(method, target, b"1.1", [(b"host", host)], host, target, BODY_NONE, -1,
                               True, b"", False, (b"host",))
            view = view_from_head(head, 80, "http", "1.2.3.4")
            path, _, query = target.decode("latin-1").partition("?")
            assert (view.authority, view.method, view.path, view.query) == (
                host.decode("latin-1").lower(), method.decode("latin-1"), path, query)


def test_started_context_has_every_field_its_constructor_sets():
    # compiled, start() stores the fields itself instead of calling TraceContext(...): a field
    # added to __init__ and not to start() would be None here
    from meshproxy.telemetry.tracing import TraceContext
    ctx = ProxyTracer(None, rng=IdSource(bytes(range(32)))).start([], names=())
    ref = TraceContext(ctx.trace_id, ctx.span_id, ctx.parent_id, ctx.sampled, ctx.debug, ctx.kind,
                       ctx.request_id, ctx.tracestate, ctx.b3_single, ctx.b3_multi)
    slots = TraceContext.__slots__ if hasattr(TraceContext, "__slots__") else [
        n for n in dir(ref) if not n.startswith("_") and not callable(getattr(ref, n))]
    assert {n: getattr(ctx, n) for n in slots} == {n: getattr(ref, n) for n in slots}
    assert ctx.forward_block() == ref.forward_block()


@pytest.mark.parametrize("names_given", [False, True])
def test_hop_by_hop_response_fields_go_and_their_same_length_neighbours_stay(names_given):
    """Compiled, a field whose name length no dropped name has skips the set lookup; names
    of a dropped name's length (te/tf, upgrade/upgradf, connection/connectioo) are looked up,
    and names of 64 bytes or more too."""
    from meshproxy.codec.api import BODY_LENGTH, ResponseHead
    from meshproxy.proxy.transform import forwarded_response_headers
    fields = [(b"server", b"s"), (b"te", b"trailers"), (b"tf", b"1"), (b"connection", b"close"),
              (b"connectioo", b"2"), (b"content-length", b"5"), (b"x" * 70, b"3"), (b"upgrade", b"h2c"),
              (b"upgradf", b"4"), (b"keep-alive", b"timeout=5"), (b"trailer", b"x"), (b"etag", b'"e"')]
    head = ResponseHead(200, b"OK", b"1.1", fields, BODY_LENGTH, 5, False,
                        tuple(n for n, _ in fields) if names_given else ())
    out = forwarded_response_headers(head, (b"content-length", b"5"), True)
    assert out == [(b"server", b"s"), (b"tf", b"1"), (b"connectioo", b"2"), (b"x" * 70, b"3"), (b"upgradf", b"4"),
                   (b"etag", b'"e"'), (b"content-length", b"5")]
