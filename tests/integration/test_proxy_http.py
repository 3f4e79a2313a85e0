"""The HTTP/1.1 proxy end to end: a real ``meshproxy run`` process between a raw
socket client and an upstream the test controls, over both codec backends."""
from __future__ import annotations

import asyncio
import json
import socket

import pytest

from helpers import (
    CODECS, Upstream, eventually, free_port, http_get, parse_responses, raw_exchange, respond, responses_complete,
    service_entry_yaml,
)

pytestmark = pytest.mark.asyncio


# One proxy per codec routes svc.local for the module's tests (a proxy start per test was most of
# this file's time); the upstream is shared too and forgets what it saw before each test.
@pytest.fixture(scope="module", params=CODECS)
def codec(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def shared_upstream():
    up = Upstream().serve_in_thread()
    yield up
    up.stop_thread()


@pytest.fixture
def upstream(shared_upstream):
    shared_upstream.forget()
    return shared_upstream


@pytest.fixture(scope="module")
def routed_proxy(module_proxy_factory, shared_upstream, codec):
    proxy = module_proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", shared_upstream.port, {})]),
                                 codec=codec)
    yield proxy
    proxy.stop()


async def test_request_reaches_the_service_entry_endpoint_by_host(routed_proxy, upstream):
    status, headers, body = await http_get(routed_proxy.port, "svc.local", "/hello?x=1")
    assert status == 200
    assert json.loads(body)["target"] == "/hello?x=1"
    assert upstream.requests[0].header("host") == "svc.local"


async def test_kubernetes_short_names_reach_the_same_service(proxy_factory, upstream, codec):
    proxy = proxy_factory(service_entry_yaml("reviews.default.svc.cluster.local", 9080,
                                             [("127.0.0.1", upstream.port, {})]), codec=codec)
    for host in ("reviews", "reviews.default", "reviews.default.svc.cluster.local", "reviews:9080"):
        status, _, _ = await http_get(proxy.port, host)
        assert status == 200, host
    assert len(upstream.requests) == 4


async def test_absolute_form_target_is_routed_by_its_authority(routed_proxy, upstream):
    data, _ = await raw_exchange(routed_proxy.port,
                                 b"GET http://svc.local/abs HTTP/1.1\r\nHost: svc.local\r\nConnection: close\r\n\r\n")
    assert parse_responses(data)[0][0] == 200
    assert upstream.requests[0].target == "/abs"


async def test_unknown_host_gets_404_with_no_route_flag(routed_proxy, upstream):
    status, _, body = await http_get(routed_proxy.port, "nothing.here")
    assert status == 404
    assert upstream.requests == []


async def test_hop_by_hop_fields_are_removed_and_forwarding_fields_set(routed_proxy, upstream):
    request = (b"GET / HTTP/1.1\r\nHost: svc.local\r\nConnection: keep-alive, x-secret\r\n"
               b"X-Secret: s\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nX-Forwarded-For: 10.0.0.9\r\n"
               b"X-Forwarded-Proto: https\r\nProxy-Connection: x\r\nX-Keep: yes\r\n\r\n")
    data, _ = await raw_exchange(routed_proxy.port, request, timeout=1.0, until=responses_complete(1))
    assert parse_responses(data)[0][0] == 200
    got = upstream.requests[0]
    names = {k.lower() for k, _ in got.headers}
    for hop in ("connection", "keep-alive", "te", "x-secret", "proxy-connection"):
        assert hop not in names, hop
    assert got.header("x-keep") == "yes"
    assert got.header("x-forwarded-for") == "10.0.0.9, 127.0.0.1"
    assert got.header("x-forwarded-proto") == "http"
    assert len(got.header("x-request-id")) == 36


async def test_request_id_is_kept_when_present(routed_proxy, upstream):
    await http_get(routed_proxy.port, "svc.local", headers={"X-Request-Id": "abc-123"})
    assert upstream.requests[0].header("x-request-id") == "abc-123"


async def test_chunked_request_body_is_forwarded_rechunked(routed_proxy, upstream):
    request = (b"POST /up HTTP/1.1\r\nHost: svc.local\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    data, _ = await raw_exchange(routed_proxy.port, request, timeout=1.0, until=responses_complete(1))
    assert parse_responses(data)[0][0] == 200
    got = upstream.requests[0]
    assert got.body == b"hello world"
    assert got.header("transfer-encoding") == "chunked"
    assert b"ext=1" not in got.raw and b"X-Trailer" not in got.raw


async def test_chunked_response_is_forwarded_rechunked_whatever_the_chunk_sizes(proxy_factory, codec):
    # chunks small and large (a large one leaves as a view of the read, its framing in buffers
    # of its own), split across the upstream's writes; two responses on one connection, so a
    # framing error in the first would garble the second
    sizes = [5, 20000, 1, 70000, 4096]
    chunks = [bytes([65 + i]) * n for i, n in enumerate(sizes)]

    async def chunked(req, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for chunk in chunks:
            framed = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
            writer.write(framed[:len(framed) // 2])
            await writer.drain()
            writer.write(framed[len(framed) // 2:])
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        return True

    up = await Upstream(chunked).start()
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", up.port, {})]), codec=codec)
    request = b"GET /c HTTP/1.1\r\nHost: svc.local\r\n\r\n"
    data, _ = await raw_exchange(proxy.port, request * 2, timeout=10, until=responses_complete(2))
    responses = parse_responses(data)
    assert [status for status, _, _ in responses] == [200, 200]
    for _, headers, body in responses:
        assert headers["transfer-encoding"] == "chunked"
        assert body == b"".join(chunks)
    await up.close()


async def test_pipelined_requests_are_answered_in_order(routed_proxy, upstream):
    reqs = b"".join(f"GET /{i} HTTP/1.1\r\nHost: svc.local\r\n\r\n".encode() for i in range(5))
    data, _ = await raw_exchange(routed_proxy.port, reqs, timeout=1.5, until=responses_complete(5))
    responses = parse_responses(data)
    assert [json.loads(b)["target"] for _, _, b in responses] == [f"/{i}" for i in range(5)]


@pytest.mark.parametrize("writes", ["one-write", "write-per-request"])
async def test_pipelined_requests_then_a_half_close_get_every_answer_then_the_close(routed_proxy, upstream, writes):
    """A client that pipelines requests and then shuts down its sending side (shutdown(2)
    SHUT_WR, as ``nc -N`` does) gets every answer in order, as from HAProxy and nginx: a
    half-close ends the requests, not the answers.  Then the proxy closes (EOF within 10 s)."""
    loop = asyncio.get_running_loop()
    reqs = [f"GET /{i} HTTP/1.1\r\nHost: svc.local\r\n\r\n".encode() for i in range(4)]
    s = socket.socket()
    s.setblocking(False)
    try:
        await loop.sock_connect(s, ("127.0.0.1", routed_proxy.port))
        for part in [b"".join(reqs)] if writes == "one-write" else reqs:
            await loop.sock_sendall(s, part)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(s, 65536), 10):
            data += chunk
    finally:
        s.close()
    responses = parse_responses(data)
    assert [json.loads(b)["target"] for _, _, b in responses] == [f"/{i}" for i in range(4)], data


async def test_head_204_and_304_responses_carry_no_body(proxy_factory, codec):
    async def behaviour(req, writer):
        if req.target == "/204":
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        elif req.target == "/304":
            writer.write(b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n" + (b"" if req.method == "HEAD" else b"0123456789"))
        return True

    up = await Upstream(behaviour).start()
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", up.port, {})]), codec=codec)
    reqs = (b"HEAD /h HTTP/1.1\r\nHost: svc.local\r\n\r\n" b"GET /204 HTTP/1.1\r\nHost: svc.local\r\n\r\n"
            b"GET /304 HTTP/1.1\r\nHost: svc.local\r\n\r\n" b"GET /last HTTP/1.1\r\nHost: svc.local\r\n\r\n")
    data, _ = await raw_exchange(proxy.port, reqs, timeout=1.5, until=lambda d: d.endswith(b"0123456789"))
    # HEAD keeps its declared length but sends no body; the final GET proves framing stayed in sync
    head_end = data.index(b"\r\n\r\n") + 4
    assert b"content-length: 10" in data[:head_end].lower()
    rest = data[head_end:]
    assert rest.startswith(b"HTTP/1.1 204")
    assert rest.count(b"HTTP/1.1 ") == 3
    assert rest.endswith(b"0123456789")
    await up.close()


async def test_upstream_reset_before_headers_gives_503(proxy_factory, codec):
    async def reset(req, writer):
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()
        return False

    up = await Upstream(reset).start()
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", up.port, {})]), codec=codec)
    status, _, body = await http_get(proxy.port, "svc.local")
    assert status == 503
    await up.close()


async def test_upstream_reset_mid_body_never_looks_complete(proxy_factory, codec):
    async def truncate(req, writer):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 5000)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()
        return False

    up = await Upstream(truncate).start()
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", up.port, {})]), codec=codec)
    data, closed = await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: svc.local\r\n\r\n", timeout=3)
    assert closed, "the client connection must be closed"
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"200" in head and len(body) < 100000
    await up.close()


async def test_upstream_that_never_answers_gives_504_at_the_route_timeout(proxy_factory, codec):
    async def stall(req, writer):
        await asyncio.sleep(10)
        return False

    up = await Upstream(stall).start()
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", up.port, {})]), codec=codec,
                          extra_args=["--route-timeout", "0.5"])
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    status, _, _ = await http_get(proxy.port, "svc.local")
    elapsed = loop.time() - t0
    assert status == 504
    assert 0.45 < elapsed < 2.0
    await up.close()


async def test_connect_failure_is_retried_once_on_another_endpoint(proxy_factory, upstream, codec):
    dead = free_port()
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", dead, {}),
                                                                ("127.0.0.1", upstream.port, {})]), codec=codec)
    statuses = [(await http_get(proxy.port, "svc.local"))[0] for _ in range(6)]
    assert statuses == [200] * 6


async def test_upstream_keepalive_connections_are_reused(proxy_factory, codec):
    up = await Upstream().start()           # a proxy and upstream of its own: no connection pooled before
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", up.port, {})]), codec=codec)
    for _ in range(5):
        assert (await http_get(proxy.port, "svc.local"))[0] == 200
    assert len(up.requests) == 5
    assert up.connections == 1
    await up.close()


async def test_expect_100_continue_gets_interim_response_then_body_is_forwarded(routed_proxy, upstream):
    reader, writer = await asyncio.open_connection("127.0.0.1", routed_proxy.port)
    writer.write(b"POST /e HTTP/1.1\r\nHost: svc.local\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(b"hello")
    await writer.drain()
    final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    assert final.startswith(b"HTTP/1.1 200")
    writer.close()
    assert upstream.requests[0].body == b"hello"
    assert upstream.requests[0].header("expect") is None


async def test_websocket_upgrade_is_tunnelled_as_bytes_after_101(proxy_factory, codec):
    async def ws_server(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"upgrade: websocket" in head.lower()
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        while True:
            data = await reader.read(1024)
            if not data:
                break
            writer.write(data.upper())
        writer.close()

    server = await asyncio.start_server(ws_server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = proxy_factory(service_entry_yaml("ws.local", 80, [("127.0.0.1", port, {})]), codec=codec)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /chat HTTP/1.1\r\nHost: ws.local\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\nearly")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    assert head.startswith(b"HTTP/1.1 101")
    assert b"upgrade: websocket" in head.lower()
    got = await asyncio.wait_for(reader.readexactly(5), 3)
    assert got == b"EARLY"
    writer.write(b"ping")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(4), 3) == b"PING"
    writer.close()
    server.close()


async def test_malformed_request_gets_400_closed_and_nothing_forwarded(routed_proxy, upstream):
    smuggle = (b"POST / HTTP/1.1\r\nHost: svc.local\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: svc.local\r\n\r\n")
    data, closed = await raw_exchange(routed_proxy.port, smuggle, timeout=2)
    assert data.startswith(b"HTTP/1.1 400")
    assert data.count(b"HTTP/1.1") == 1
    assert closed
    assert upstream.requests == []


async def test_header_read_timeout_gives_408(proxy_factory, upstream, codec):
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", upstream.port, {})]), codec=codec,
                          extra_args=["--header-timeout", "1"])
    data, closed = await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: svc", timeout=20)
    assert data.startswith(b"HTTP/1.1 408")
    assert closed


async def test_idle_keepalive_connection_is_closed_at_idle_timeout(proxy_factory, upstream, codec):
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", upstream.port, {})]), codec=codec,
                          extra_args=["--idle-timeout", "1"])
    data, closed = await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: svc.local\r\n\r\n", timeout=20)
    assert data.startswith(b"HTTP/1.1 200")
    assert closed


@pytest.mark.parametrize("request_bytes,status", [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: svc.local\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: svc.local\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: svc.local\r\nX-Big: " + b"v" * 70000 + b"\r\n\r\n", 431),
])
async def test_limits_hold_in_one_write_and_in_small_writes(routed_proxy, upstream, request_bytes, status):
    data, closed = await raw_exchange(routed_proxy.port, request_bytes, timeout=2)
    assert data.startswith(f"HTTP/1.1 {status}".encode()), data[:80]
    assert closed
    pieces = [request_bytes[i:i + 1000] for i in range(0, len(request_bytes), 1000)]
    data, closed = await raw_exchange(routed_proxy.port, pieces, timeout=2)
    assert data.startswith(f"HTTP/1.1 {status}".encode()), data[:80]
    assert upstream.requests == []


async def test_body_cap_gives_413(proxy_factory, upstream, codec):
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", upstream.port, {})]), codec=codec,
                          extra_args=["--max-body-bytes", "1000"])
    data, closed = await raw_exchange(proxy.port, b"POST / HTTP/1.1\r\nHost: svc.local\r\nContent-Length: 5000\r\n\r\n"
                                      + b"x" * 5000, timeout=2)
    assert data.startswith(b"HTTP/1.1 413")
    chunked = b"POST / HTTP/1.1\r\nHost: svc.local\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\nx\r\n" * 2000 + b"0\r\n\r\n"
    data, closed = await raw_exchange(proxy.port, chunked, timeout=2)
    assert b"HTTP/1.1 413" in data
    assert closed


async def test_dns_service_entry_endpoints_are_resolved_by_the_proxy(proxy_factory, upstream, codec):
    config = service_entry_yaml("named.local", 80, [("localhost", upstream.port, {})]).replace(
        "resolution: STATIC", "resolution: DNS")
    proxy = proxy_factory(config, codec=codec)
    status, _, _ = await http_get(proxy.port, "named.local")
    assert status == 200


async def test_istio_circuit_breaking_task_queues_one_request_and_overflows_the_rest(proxy_factory, codec):
    """The DestinationRule of Istio's circuit-breaking task, unchanged (maxConnections 1,
    http1MaxPendingRequests 1, maxRequestsPerConnection 1).  While the upstream holds the
    first request, two more arrive: one waits for the connection slot and is served when
    the first's connection closes, the other overflows at once: 503 UO.  Which of the two
    reaches the proxy first is up to the scheduler, so the verdicts are compared as a set."""
    import pathlib
    dr = (pathlib.Path(__file__).parents[1] / "fixtures" / "istio" / "destination-rule-circuit-breaker.yaml").read_text()
    in_flight = {"now": 0, "max": 0}
    release = asyncio.Event()

    async def held(req, writer):
        in_flight["now"] += 1
        in_flight["max"] = max(in_flight["max"], in_flight["now"])
        await release.wait()
        in_flight["now"] -= 1
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        return True

    up = await Upstream(held).start()
    proxy = proxy_factory({"se.yaml": service_entry_yaml("httpbin", 8000, [("127.0.0.1", up.port, {})]),
                           "dr.yaml": dr}, codec=codec)

    def get():
        return asyncio.create_task(http_get(proxy.port, "httpbin:8000", "/get", timeout=30))

    first = get()
    await eventually(lambda: in_flight["now"] == 1)
    others = [get(), get()]
    done, _ = await asyncio.wait(others, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    overflowed = done.pop().result()            # the upstream still holds the first: only an overflow answers
    assert overflowed[0] == 503 and b"overflow" in overflowed[2]
    release.set()
    results = [await first] + [await t for t in others]
    assert sorted(r[0] for r in results) == [200, 200, 503]
    assert in_flight["max"] == 1 and up.connections == 2     # one connection at a time, one request each
    text = proxy.admin("/metrics")[1].decode()
    assert any(line.startswith("meshproxy_upstream_rq_pending_overflow_total{") and line.endswith(" 1")
               for line in text.splitlines()), text
    await up.close()
