"""Under attack and at the edges, through a real proxy process: limits at their exact edges,
connections that send nothing or stall a body, requests that would become tunnels, and peers
that read or write slowly (the proxy's memory stays bounded and is given back)."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import pytest

from helpers import CODECS, Upstream, eventually, http_get, parse_responses, raw_exchange, respond, service_entry_yaml

pytestmark = pytest.mark.asyncio


def _status(data: bytes) -> int:
    return int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else 0


def _head_of(size: int, host: bytes = b"svc.local") -> bytes:
    base = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nX: \r\nConnection: close\r\n\r\n"
    return (b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nX: " + b"v" * (size - len(base))
            + b"\r\nConnection: close\r\n\r\n")


def _fields(count: int) -> bytes:
    return (b"GET / HTTP/1.1\r\nHost: svc.local\r\nConnection: close\r\n"
            + b"".join(b"X%d: v\r\n" % i for i in range(count - 2)) + b"\r\n")


def _target(size: int) -> bytes:
    return b"GET /" + b"p" * (size - 1) + b" HTTP/1.1\r\nHost: svc.local\r\nConnection: close\r\n\r\n"


def _chunked(size: int) -> bytes:
    return (b"POST / HTTP/1.1\r\nHost: svc.local\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            + b"%x\r\n" % size + b"x" * size + b"\r\n0\r\n\r\n")


def _length(size: int) -> bytes:
    return b"POST / HTTP/1.1\r\nHost: svc.local\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % size + b"x" * size


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)] if size else [data]


@pytest.fixture(scope="module")
def edge_upstream():
    up = Upstream().serve_in_thread()
    yield up
    up.stop_thread()


@pytest.fixture(scope="module", params=CODECS)
def edge_proxy(module_proxy_factory, edge_upstream, request):
    """One proxy per codec for the limit tests (they count the upstream's requests before and after)."""
    proxy = module_proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", edge_upstream.port, {})]),
                                 codec=request.param, extra_args=["--max-body-bytes", "1000"])
    yield proxy
    proxy.stop()


@pytest.mark.parametrize("make,limit,status", [
    (_head_of, 60 * 1024, 431), (_fields, 100, 431), (_target, 8 * 1024, 414),
    (_length, 1000, 413), (_chunked, 1000, 413)], ids=["head-bytes", "fields", "target", "content-length", "chunked"])
@pytest.mark.parametrize("write", [0, 4096], ids=["one-write", "4KiB-writes"])
async def test_each_limit_passes_at_its_value_and_refuses_one_more(edge_proxy, edge_upstream, make, limit, status,
                                                                  write):
    upstream = edge_upstream
    if make is _head_of:
        assert len(make(limit)) == limit
    data, _ = await raw_exchange(edge_proxy.port, _pieces(make(limit), write), timeout=5)
    assert _status(data) == 200, data[:80]
    seen = len(upstream.requests)
    data, closed = await raw_exchange(edge_proxy.port, _pieces(make(limit + 1), write), timeout=5)
    assert _status(data) == status and closed, data[:80]
    if status != 413 or make is _length:
        assert len(upstream.requests) == seen, "refused before anything was forwarded"


async def test_an_upgrade_request_with_a_body_gets_400_and_is_not_forwarded(routed_proxy, upstream):
    data, closed = await raw_exchange(routed_proxy.port, b"GET /chat HTTP/1.1\r\nHost: svc.local\r\n"
                                      b"Connection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\nhello",
                                      timeout=3)
    assert _status(data) == 400 and closed
    assert upstream.requests == []


async def test_a_connection_that_sends_nothing_gets_408_at_the_header_timeout(proxy_factory, upstream):
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", upstream.port, {})]),
                          extra_args=["--header-timeout", "1", "--idle-timeout", "30"])
    t0 = time.monotonic()
    data, closed = await raw_exchange(proxy.port, b"", timeout=20)
    assert closed and time.monotonic() - t0 < 15, "held past the header timeout"   # not the 30 s idle one
    assert _status(data) == 408
    # a keep-alive connection between requests is governed by the idle timeout, not this one
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: svc.local\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(int(re.search(rb"content-length: (\d+)", head.lower()).group(1)))
    await asyncio.sleep(1.6)
    writer.write(b"GET / HTTP/1.1\r\nHost: svc.local\r\nConnection: close\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 20)).startswith(b"HTTP/1.1 200")
    writer.close()


# ------------------------------------------------------------------ stalled request bodies

class _HoldingUpstream:
    """Reads a request head, then either answers at once without reading the body
    (``answer``) or waits for the body; records when each connection's read side ended."""

    def __init__(self, answer: bool):
        self.answer = answer
        self.heads: list[bytes] = []
        self.ended: list[float] = []

    async def start(self) -> "_HoldingUpstream":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader, writer):
        try:
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            if self.answer:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly")
            while await reader.read(65536):
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        self.ended.append(time.monotonic())
        writer.close()


async def _stalled_post(port: int, host: bytes, timeout: float) -> tuple[bytes, bool, float]:
    """A POST promising 1000 bytes that sends 10: (what came back, closed by the proxy, when)."""
    data, closed = await raw_exchange(
        port, b"POST /up HTTP/1.1\r\nHost: %s\r\nContent-Length: 1000\r\n\r\n0123456789" % host, timeout=timeout)
    return data, closed, time.monotonic()


async def test_a_stalled_request_body_gets_408_at_the_body_timeout_and_the_upstream_try_ends(proxy_factory):
    up = await _HoldingUpstream(answer=False).start()
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", up.port, {})]),
                          extra_args=["--body-timeout", "1"])
    t0 = time.monotonic()
    data, closed, at = await _stalled_post(proxy.port, b"svc.local", 30)
    assert _status(data) == 408 and closed, data[:80]
    assert at - t0 < 15, f"408 after {at - t0:.1f} s for a 1 s body timeout (the default is 60 s)"
    assert b"connection: close" in data.lower()
    assert len(up.heads) == 1, "the request went upstream before its body stalled"
    await eventually(lambda: up.ended)       # the upstream connection is closed with the exchange
    assert up.ended[0] - t0 < 15, "the upstream attempt was left open"
    up.server.close()


async def test_a_stalled_request_body_is_not_held_past_the_upstream_answer(proxy_factory):
    up = await _HoldingUpstream(answer=True).start()
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", up.port, {})]),
                          extra_args=["--body-timeout", "30"])
    t0 = time.monotonic()
    data, closed, at = await _stalled_post(proxy.port, b"svc.local", 25)
    assert _status(data) == 200 and data.endswith(b"early"), data[:80]
    assert b"connection: close" in data.lower(), "the answer says the connection ends with it"
    assert closed and at - t0 < 15, "the connection was held after the upstream's answer (body timeout 30 s)"


async def test_a_local_answer_before_the_request_body_closes_the_connection(proxy_factory, upstream):
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", upstream.port, {})]),
                          extra_args=["--body-timeout", "30"])
    t0 = time.monotonic()
    # 404 for an unknown Host on a POST whose body never comes
    data, closed, at = await _stalled_post(proxy.port, b"nowhere.local", 25)
    assert _status(data) == 404 and b"connection: close" in data.lower(), data[:120]
    assert closed and at - t0 < 15, "the connection was held after the answer (body timeout 30 s)"
    # bytes that keep arriving after the answer are read and dropped: no reset loses the 404
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST / HTTP/1.1\r\nHost: nowhere.local\r\nContent-Length: 100000\r\n\r\n")
    for _ in range(10):
        writer.write(b"z" * 10000)
        await writer.drain()
    assert _status(await asyncio.wait_for(reader.read(), 3)) == 404
    writer.close()
    # a local answer to a request without a body keeps the connection
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    for _ in range(2):
        writer.write(b"GET / HTTP/1.1\r\nHost: nowhere.local\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert _status(head) == 404 and b"connection: close" not in head.lower()
        await reader.readexactly(int(re.search(rb"content-length: (\d+)", head.lower()).group(1)))
    writer.close()
    assert upstream.requests == []


# ------------------------------------------------------------------ bad bytes after pipelined requests

async def test_pipelined_requests_before_bad_bytes_are_answered_in_order_then_400(proxy_factory, upstream, codec):
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", upstream.port, {})]), codec=codec)
    get = b"GET /%d HTTP/1.1\r\nHost: svc.local\r\n\r\n"
    data, closed = await raw_exchange(proxy.port, get % 1 + get % 2 + get % 3 + b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n",
                                      timeout=5)
    answers = parse_responses(data)
    assert [status for status, _, _ in answers] == [200, 200, 200, 400], data[-200:]
    assert [json.loads(body)["target"] for _, _, body in answers[:3]] == ["/1", "/2", "/3"]
    assert closed and answers[3][1].get("connection") == "close"
    # bad bytes inside a queued request's body: the request before it is answered, that one
    # never goes upstream
    seen = len(upstream.requests)
    data, closed = await raw_exchange(proxy.port, get % 4 + b"POST /5 HTTP/1.1\r\nHost: svc.local\r\n"
                                      b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n", timeout=5)
    answers = parse_responses(data)
    assert [status for status, _, _ in answers] == [200, 400] and closed, data[-200:]
    assert [r.target for r in upstream.requests[seen:]] == ["/4"]


async def test_connect_failures_to_a_dead_endpoint_are_retried_beyond_the_retry_budget(proxy_factory):
    from helpers import free_port
    up = await Upstream(respond(200, b"alive")).start()
    dead = free_port()                       # nothing listens there: every connect is refused
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", dead, {}), ("127.0.0.1", up.port, {})]))
    request = b"GET / HTTP/1.1\r\nHost: svc.local\r\nConnection: close\r\n\r\n"
    for _ in range(3):
        # a burst: about half the requests pick the dead endpoint at once, and their retries wait
        # out the back-off together, more of them than the budget's 20 % of requests in flight
        results = await asyncio.gather(*(raw_exchange(proxy.port, request, timeout=5) for _ in range(40)))
        statuses = [_status(data) for data, _ in results]
        assert statuses == [200] * 40, {s: statuses.count(s) for s in set(statuses)}
    metrics = proxy.admin("/metrics")[1].decode()
    assert 'response_code="503"' not in metrics
    await up.close()


# ------------------------------------------------------------------ memory with slow peers

def _rss_kb(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", open(f"/proc/{pid}/status").read()).group(1))


def _peak_kb(pid: int) -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", open(f"/proc/{pid}/status").read()).group(1))


async def _big_response_server(size: int):
    block = b"y" * (1 << 20)

    async def serve(reader, writer):
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
                left = size
                while left:
                    writer.write(block[:min(left, len(block))])
                    left -= min(left, len(block))
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _worker(proxy) -> dict:
    """The proxy's one worker as the admin's ``/memory`` shows it (RSS, connections, trims)."""
    status, body = proxy.admin("/memory")
    assert status == 200, body
    [worker] = json.loads(body)["processes"]
    return worker


async def _until(measure, done, within: float = 30.0):
    """``measure()`` every 50 ms until ``done(value)``; the last value.  ``within`` is a deadline
    for a failing case only (a busy machine only makes the wait longer, never the outcome)."""
    deadline = time.monotonic() + within
    while True:
        value = measure()
        if done(value) or time.monotonic() >= deadline:
            return value
        await asyncio.sleep(0.05)


def _slow_readers(port: int, request: bytes, count: int = 100) -> list[socket.socket]:
    """``count`` clients that send ``request`` and read nothing (a small receive window)."""
    readers = []
    for _ in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.sendall(request)
        readers.append(s)
    return readers


# What a slow reader of a large response may make the proxy hold: the 64 KiB write high-water
# mark, the response bytes the kernel took from a read still referenced by the loop, and the
# connection's own objects.  A read not bounded by the room under the mark (the loop's 256 KiB)
# holds about twice this.
SLOW_READER_BOUND_KB = 128


async def test_slow_readers_of_large_responses_hold_a_bounded_amount_each_and_memory_comes_back(proxy_factory):
    """slowhttptest -X -k 3: three pipelined requests for 1 MiB each, nothing read.  (Three,
    not one: on loopback the kernel's send buffer grows to take a whole first MiB, so the proxy
    holds nothing for it; the second response fills the proxy's own buffer to its mark.)"""
    server, port = await _big_response_server(1 << 20)
    proxy = proxy_factory(service_entry_yaml("big.local", 80, [("127.0.0.1", port, {})]))
    pid = proxy.proc.pid
    # warm up one full exchange so that code paths and pools exist before the baseline
    data, _ = await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: big.local\r\nConnection: close\r\n\r\n",
                                 timeout=5)
    assert len(data) > 1 << 20
    base = _rss_kb(pid)
    readers = _slow_readers(proxy.port, b"GET / HTTP/1.1\r\nHost: big.local\r\n\r\n" * 3)
    # every connection holds what the proxy lets it hold: each client's side is over its mark
    # and its upstream is not read any more (a state, not a time: the bytes held are final)
    paused = await _until(lambda: _worker(proxy)["clients_not_reading"], lambda n: n == 100)
    held = _rss_kb(pid) - base
    for s in readers:
        s.close()
    # the worker's once-a-second sweep sees the burst end and trims
    after = await _until(lambda: _rss_kb(pid) - base, lambda kb: kb < 8 * 1024)
    assert paused == 100, f"{paused} of 100 slow readers' connections reached the write high-water mark"
    assert held > 4 * 1024, f"the burst held {held} kB (else this test measures nothing)"
    assert held < 100 * SLOW_READER_BOUND_KB, f"{held} kB for 100 slow readers ({held // 100} kB each)"
    assert after < 8 * 1024, f"RSS stayed {after} kB above the baseline after they left (held {held} kB)"
    server.close()


async def test_memory_held_for_unfinished_request_heads_goes_back_after_a_short_burst(proxy_factory, upstream):
    """A burst of connections that each send most of a large head and then leave, all between
    two of the worker's once-a-second looks: what their parsers held is freed when they close
    (not when the cyclic collector next runs) and given back to the system."""
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", upstream.port, {})]))
    pid = proxy.proc.pid
    status, _, _ = await http_get(proxy.port, "svc.local", "/warm")
    assert status == 200
    base = _rss_kb(pid)
    trims = _worker(proxy)["trims"]
    clients = _slow_readers(proxy.port, b"GET / HTTP/1.1\r\nHost: svc.local\r\nX: " + b"v" * (48 << 10), 256)
    held = await _until(lambda: _rss_kb(pid) - base, lambda kb: kb > 8 * 1024)     # the proxy read them
    for s in clients:
        s.close()
    after = await _until(lambda: _rss_kb(pid) - base, lambda kb: kb < 3 * 1024)
    assert held > 8 * 1024, f"the burst held {held} kB (12 MiB of heads sent: else this measures nothing)"
    assert after < 3 * 1024, f"RSS stayed {after} kB above the baseline after they left (held {held} kB)"
    # and the worker saw the burst, though it never saw it open: its next look trims
    assert await _until(lambda: _worker(proxy)["trims"], lambda n: n > trims) > trims


async def test_a_pipelined_response_to_a_client_that_is_not_reading_starts_with_its_upstream_paused():
    """Pipelined requests from clients that read nothing: the first response (larger than the
    write high-water mark, smaller than one read) is taken in whole and its exchange ends; the
    next one starts while the client is still not reading, so it must start with reading from
    its upstream paused (else its response joins the first in the proxy's memory, and so on)."""
    from inproc import cluster, dest, snapshot, start_worker
    from meshproxy.config.model import HttpRoute
    from meshproxy.driver import WRITE_HIGH_WATER
    size = 96 * 1024
    server, port = await _big_response_server(size)
    snap = snapshot([HttpRoute(name="r", source="t", destinations=(dest("c"),))], [cluster("c", port)])
    loop = asyncio.get_running_loop()
    worker, proxy_port = await start_worker(loop, snap)
    listener = next(iter(worker.http_listeners.values()))
    clients = []
    try:
        for i in range(4):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.setblocking(False)
            await loop.sock_connect(s, ("127.0.0.1", proxy_port))
            me = s.getsockname()
            while not [c for c in listener.connections if c.transport.get_extra_info("peername") == me]:
                await asyncio.sleep(0.001)
            # the kernel takes little of what the proxy sends, so the proxy holds the rest
            conn, = [c for c in listener.connections if c.transport.get_extra_info("peername") == me]
            conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
            s.send(b"GET / HTTP/1.1\r\nHost: svc.local\r\n\r\n" * 3)
            clients.append(s)
        conns = list(listener.connections)
        most = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:        # while the exchanges move on, every few ms
            for conn in conns:
                most = max(most, conn.transport.get_write_buffer_size())
            await asyncio.sleep(0.005)
        assert min(c.requests for c in conns) >= 2, "the second exchanges started (else this measures nothing)"
        assert most <= WRITE_HIGH_WATER + size, f"a connection held {most >> 10} KiB for a client reading nothing"
        for conn in conns:
            exchange = conn.exchange
            assert exchange is not None and conn.write_paused and exchange.attempt.conn.read_paused_by, \
                "the second exchange reads its upstream while the client reads nothing"
    finally:
        for s in clients:
            s.close()
        await worker.drain(1)
        server.close()


async def _slow_sink_server():
    """Reads request bodies 64 KiB at a time with a pause between reads (at most 30 MiB/s)."""
    async def serve(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                n = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))
                while n:
                    data = await reader.read(min(n, 65536))
                    n -= len(data)
                    await asyncio.sleep(0.002)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _upload(port: int, host: bytes, size: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST / HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (host, size))
    chunk = b"x" * (1 << 20)
    for _ in range(size // len(chunk)):
        writer.write(chunk)
        await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    writer.close()
    return head


async def _download(port: int, host: bytes, pause: float, limit: int = 1 << 40) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)
    writer.write(b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host)
    got = 0
    while got < limit and (data := await reader.read(65536)):
        got += len(data)
        if pause:
            await asyncio.sleep(pause)
    writer.close()
    return got


# The first large transfer of a process raises its peak RSS once, whatever its size (by up to
# about 15 MiB: the allocator keeps freed large buffers on its heap), and a later one reuses
# that memory, so a warm-up would hide a regression.  Each test measures the first transfer
# of a fresh proxy: buffering the body would add its 48 MiB.
STREAM = 48 << 20
STREAM_BOUND_KB = 24 * 1024


async def test_a_fast_upload_to_a_slow_upstream_is_not_buffered_by_the_proxy(proxy_factory):
    server, port = await _slow_sink_server()
    proxy = proxy_factory(service_entry_yaml("sink.local", 80, [("127.0.0.1", port, {})]))
    before = _peak_kb(proxy.proc.pid)
    assert (await _upload(proxy.port, b"sink.local", STREAM)).startswith(b"HTTP/1.1 200")
    grew = _peak_kb(proxy.proc.pid) - before
    assert grew < STREAM_BOUND_KB, f"peak RSS grew {grew} kB for an {STREAM >> 20} MiB upload to a slow upstream"
    server.close()


async def test_a_fast_download_to_a_slow_client_is_not_buffered_by_the_proxy(proxy_factory):
    server, port = await _big_response_server(STREAM)
    proxy = proxy_factory(service_entry_yaml("big.local", 80, [("127.0.0.1", port, {})]))
    before = _peak_kb(proxy.proc.pid)
    assert await _download(proxy.port, b"big.local", 0.002) > STREAM     # at most 30 MiB/s
    grew = _peak_kb(proxy.proc.pid) - before
    assert grew < STREAM_BOUND_KB, f"peak RSS grew {grew} kB for an {STREAM >> 20} MiB download by a slow client"
    server.close()


async def test_the_request_body_cap_does_not_cap_responses(proxy_factory):
    up = await Upstream(respond(200, b"r" * 50_000)).start()
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", up.port, {})]),
                          extra_args=["--max-body-bytes", "1000"])
    data, _ = await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: svc.local\r\nConnection: close\r\n\r\n")
    assert _status(data) == 200 and data.endswith(b"r" * 50_000)
    await up.close()
