"""The L4 TCP proxy on real loopback sockets: a TcpProxyListener in front of upstream
servers written here (echo, slow reader, banner, resetter, a SYN-dropping listener).

Every test runs on uvloop (what the proxy runs on) and on the stdlib loop.
Checklist rows 41 (half-close) and 42 (backpressure) of
shared/reference/http-hardening.md; Envoy tcp_proxy_integration_test.cc has the
same scenarios (UpstreamWritesFirst, DownstreamDisconnect, LargeWrite...).
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
import time

import pytest
import uvloop

from meshproxy.downstream.splice import Splice
from meshproxy.downstream.tcp_proxy import (CONNECT_REFUSED, CONNECT_TIMEOUT, NO_UPSTREAM,
                                            make_tcp_proxy_factory)

LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


@pytest.fixture(params=list(LOOPS))
def run(request):
    """Run a scenario coroutine to completion on a fresh loop of the chosen kind."""
    def runner(coro, timeout: float = 10.0):
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as r:
            return r.run(asyncio.wait_for(coro, timeout))
    return runner


# ============================================================ test parts


class Recorder:
    """What the listener reported through its callbacks."""

    def __init__(self):
        self.opened = 0
        self.closed: list[tuple[int, int]] = []
        self.failures: list[tuple[str, int, str]] = []

    def on_open(self, conn):
        self.opened += 1

    def on_close(self, conn, sent, received):
        self.closed.append((sent, received))

    def on_connect_failure(self, host, port, reason):
        self.failures.append((host, port, reason))


async def start_proxy(targets, *, connect_timeout=1.0, idle_timeout=30.0, rec=None,
                      via_create_server=False, max_connections=None):
    """A TCP proxy on 127.0.0.1:0 whose pick_upstream walks ``targets`` in turn.
    Started the way the worker does (``listener.start(sock)``), or by handing the
    listener to ``loop.create_server`` as a protocol factory."""
    loop = asyncio.get_running_loop()
    rec = rec or Recorder()
    it = iter(targets)
    last = [None]

    def pick(*_):
        last[0] = next(it, last[0])
        return last[0]

    listener = make_tcp_proxy_factory(loop, pick, connect_timeout, idle_timeout,
                                      rec.on_open, rec.on_close, rec.on_connect_failure)
    if max_connections is not None:
        listener.max_connections = max_connections
    if via_create_server:
        server = await loop.create_server(listener, "127.0.0.1", 0)
        listener.server = server
        return listener, server.sockets[0].getsockname()[1], rec
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await listener.start(sock)
    return listener, sock.getsockname()[1], rec


async def start_upstream(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[:2]


def dead_port() -> tuple[str, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()


def set_linger_reset(writer: asyncio.StreamWriter) -> None:
    writer.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    return await reader.read()


async def closed_by_proxy(reader: asyncio.StreamReader) -> str:
    """How the proxy ended a connection that carried nothing back: "fin" or "reset".
    (Closing a socket with unread client bytes makes the kernel send a reset.)"""
    try:
        data = await reader.read()
    except ConnectionResetError:
        return "reset"
    assert data == b"", data
    return "fin"


async def wait_until(predicate, timeout=2.0, step=0.01):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)


# ============================================================ relay


def test_ten_megabytes_relayed_exactly_both_ways(run):
    payload = os.urandom(10 * 1024 * 1024)
    digest = hashlib.sha256(payload).hexdigest()
    seen_upstream = {}

    async def echo(reader, writer):
        h = hashlib.sha256()
        while chunk := await reader.read(256 * 1024):
            h.update(chunk)
            writer.write(chunk)
            await writer.drain()
        seen_upstream["sha"] = h.hexdigest()
        writer.close()

    async def scenario():
        up, addr = await start_upstream(echo)
        listener, port, rec = await start_proxy([addr])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def send():
            for i in range(0, len(payload), 1 << 20):
                writer.write(payload[i:i + (1 << 20)])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.ensure_future(send())
        echoed = await read_to_eof(reader)
        await sender
        writer.close()
        await wait_until(lambda: listener.active == 0)
        up.close()
        return echoed, listener, rec

    echoed, listener, rec = run(scenario())
    assert hashlib.sha256(echoed).hexdigest() == digest
    assert seen_upstream["sha"] == digest
    assert rec.opened == 1
    assert rec.closed == [(len(payload), len(payload))]


def test_upstream_that_writes_first_reaches_the_client_before_it_sends_anything(run):
    async def banner(reader, writer):
        writer.write(b"220 ready\r\n")
        line = await reader.readline()
        writer.write(b"echo " + line)
        await writer.drain()
        writer.close()

    async def scenario():
        up, addr = await start_upstream(banner)
        listener, port, rec = await start_proxy([addr], via_create_server=True)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        first = await asyncio.wait_for(reader.readline(), 2)
        writer.write(b"HELO x\r\n")
        rest = await read_to_eof(reader)
        writer.close()
        await wait_until(lambda: listener.active == 0)
        up.close()
        return first, rest, rec

    first, rest, rec = run(scenario())
    assert first == b"220 ready\r\n"
    assert rest == b"echo HELO x\r\n"
    assert rec.closed == [(8, 11 + 13)]


# ============================================================ half-close (checklist 41)


def test_client_half_close_reaches_upstream_which_can_still_answer_then_both_close(run):
    upstream_saw = {}

    async def late_answer(reader, writer):
        upstream_saw["data"] = await reader.read()         # returns at the client's FIN
        await asyncio.sleep(0.1)
        writer.write(b"answer after your FIN " * 1000)
        await writer.drain()
        writer.close()

    async def scenario():
        up, addr = await start_upstream(late_answer)
        listener, port, rec = await start_proxy([addr])
        raw = socket.create_connection(("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=raw)
        writer.write(b"request bytes")
        await writer.drain()
        raw.shutdown(socket.SHUT_WR)            # exactly shutdown(2), not the loop's write_eof
        answer = await read_to_eof(reader)
        writer.close()
        await wait_until(lambda: listener.active == 0)
        up.close()
        return answer, rec

    answer, rec = run(scenario())
    assert upstream_saw["data"] == b"request bytes"
    assert answer == b"answer after your FIN " * 1000
    assert rec.closed == [(13, 22 * 1000)]


def test_upstream_half_close_reaches_client_which_can_still_send_then_both_close(run):
    upstream_saw = {}

    async def says_bye_first(reader, writer):
        writer.write(b"bye from upstream")
        writer.write_eof()
        upstream_saw["data"] = await reader.read()
        writer.close()

    async def scenario():
        up, addr = await start_upstream(says_bye_first)
        listener, port, rec = await start_proxy([addr])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        got = await read_to_eof(reader)                    # upstream's FIN arrived
        writer.write(b"client still talking")
        await writer.drain()
        writer.write_eof()
        await wait_until(lambda: listener.active == 0)
        writer.close()
        up.close()
        return got, rec

    got, rec = run(scenario())
    assert got == b"bye from upstream"
    assert upstream_saw["data"] == b"client still talking"
    assert rec.closed == [(20, 17)]


# ============================================================ backpressure (checklist 42)


def test_fifty_megabytes_to_a_slow_reader_keeps_proxy_buffers_bounded_and_pauses_balance(run):
    total = 50 * 1024 * 1024
    high = 256 * 1024
    got = {"n": 0}

    async def slow_reader(reader, writer):
        while chunk := await reader.read(128 * 1024):
            got["n"] += len(chunk)
            await asyncio.sleep(0.001)
        writer.close()

    async def scenario():
        up, addr = await start_upstream(slow_reader)
        listener, port, rec = await start_proxy([addr])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        samples = []
        splices: list[Splice] = []

        async def sample():
            while True:
                for s in listener.splices():
                    if s not in splices:
                        splices.append(s)
                for s in splices:
                    samples.append(s.buffered()[0])
                await asyncio.sleep(0.001)

        sampler = asyncio.ensure_future(sample())
        block = b"x" * (1 << 20)
        for _ in range(total >> 20):
            writer.write(block)
            await writer.drain()
        writer.write_eof()
        await read_to_eof(reader)
        await wait_until(lambda: listener.active == 0, timeout=5)
        sampler.cancel()
        writer.close()
        up.close()
        return samples, splices[0], rec

    samples, splice, rec = run(scenario(), timeout=20)
    assert got["n"] == total
    assert rec.closed == [(total, 0)]
    assert splice.pauses > 0, "the slow reader never filled the proxy's buffer"
    assert splice.pauses == splice.resumes
    # above the high-water mark reading stops; at most one more read lands on top
    assert max(samples) <= high + 256 * 1024, max(samples)


# ============================================================ connect failures


@contextlib.asynccontextmanager
async def syn_blackhole():
    """A 127.0.0.1 address whose connects hang: a listen(0) socket whose accept queue
    is full, so the kernel drops further SYNs."""
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    addr = blackhole.getsockname()
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(addr)
            fillers.append(s)
        await asyncio.sleep(0.05)
        yield addr
    finally:
        for s in fillers:
            s.close()
        blackhole.close()


def test_connect_timeout_closes_client_within_the_timeout(run):
    async def scenario():
        async with syn_blackhole() as addr:
            listener, port, rec = await start_proxy([addr], connect_timeout=0.3)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello?")
            t0 = time.monotonic()
            data = await closed_by_proxy(reader)
            elapsed = time.monotonic() - t0
            writer.close()
            await wait_until(lambda: listener.active == 0)
            return data, elapsed, addr, rec

    data, elapsed, addr, rec = run(scenario())
    assert data in ("fin", "reset")
    assert 0.25 <= elapsed <= 0.3 + 0.5
    assert rec.failures == [(addr[0], addr[1], CONNECT_TIMEOUT)]
    assert rec.closed == [(0, 0)]


def test_refused_endpoint_is_retried_once_on_a_different_endpoint(run):
    async def echo(reader, writer):
        writer.write(await reader.read())
        writer.close()

    async def scenario():
        up, addr = await start_upstream(echo)
        dead = dead_port()
        listener, port, rec = await start_proxy([dead, addr])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        writer.write_eof()
        data = await read_to_eof(reader)
        writer.close()
        await wait_until(lambda: listener.active == 0)
        up.close()
        return data, dead, rec

    data, dead, rec = run(scenario())
    assert data == b"ping"
    assert rec.failures == [(dead[0], dead[1], CONNECT_REFUSED)]
    assert rec.closed == [(4, 4)]


def test_second_refusal_closes_client_and_reports_both_attempts(run):
    async def scenario():
        a, b = dead_port(), dead_port()
        listener, port, rec = await start_proxy([a, b])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        data = await read_to_eof(reader)
        writer.close()
        await wait_until(lambda: listener.active == 0)
        return data, a, b, rec

    data, a, b, rec = run(scenario())
    assert data == b""
    assert rec.failures == [(a[0], a[1], CONNECT_REFUSED), (b[0], b[1], CONNECT_REFUSED)]
    assert rec.closed == [(0, 0)]


def test_refused_endpoint_is_not_retried_when_the_picker_returns_it_again(run):
    async def scenario():
        a = dead_port()
        listener, port, rec = await start_proxy([a, a])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        data = await read_to_eof(reader)
        writer.close()
        await wait_until(lambda: listener.active == 0)
        return data, a, rec

    data, a, rec = run(scenario())
    assert data == b""
    assert rec.failures == [(a[0], a[1], CONNECT_REFUSED)]


def test_no_healthy_upstream_closes_client_at_once(run):
    async def scenario():
        listener, port, rec = await start_proxy([None])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        data = await read_to_eof(reader)
        writer.close()
        await wait_until(lambda: listener.active == 0)
        return data, rec

    data, rec = run(scenario())
    assert data == b""
    assert rec.failures == [("", 0, NO_UPSTREAM)]
    assert rec.closed == [(0, 0)]


# ============================================================ idle timeout, resets


def test_idle_connection_is_closed_on_both_sides_after_the_idle_timeout(run):
    upstream_eof_at = {}

    async def quiet(reader, writer):
        writer.write(await reader.read(100))
        upstream_eof_at["data"] = await reader.read()
        upstream_eof_at["t"] = time.monotonic()
        writer.close()

    async def scenario():
        up, addr = await start_upstream(quiet)
        listener, port, rec = await start_proxy([addr], idle_timeout=0.4)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hi")
        assert await reader.readexactly(2) == b"hi"
        t0 = time.monotonic()
        rest = await read_to_eof(reader)
        elapsed = time.monotonic() - t0
        writer.close()
        await wait_until(lambda: listener.active == 0 and "t" in upstream_eof_at)
        up.close()
        return rest, elapsed, t0, rec

    rest, elapsed, t0, rec = run(scenario())
    assert rest == b""
    assert 0.35 <= elapsed <= 0.4 * 1.25 + 0.3
    assert upstream_eof_at["data"] == b""
    assert upstream_eof_at["t"] - t0 <= 0.4 * 1.25 + 0.3
    assert rec.closed == [(2, 2)]


def test_upstream_reset_resets_the_client(run):
    async def resetter(reader, writer):
        await reader.read(5)
        set_linger_reset(writer)
        writer.transport.abort()

    async def scenario():
        up, addr = await start_upstream(resetter)
        listener, port, rec = await start_proxy([addr])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello")
        with pytest.raises(ConnectionResetError):
            await read_to_eof(reader)
        writer.close()
        await wait_until(lambda: listener.active == 0)
        up.close()
        return rec

    rec = run(scenario())
    assert rec.closed == [(5, 0)]


def test_client_reset_resets_the_upstream(run):
    upstream_saw = {}

    async def waiter(reader, writer):
        writer.write(b"ready")
        try:
            upstream_saw["data"] = await reader.read()
        except ConnectionResetError:
            upstream_saw["reset"] = True
        writer.close()

    async def scenario():
        up, addr = await start_upstream(waiter)
        listener, port, rec = await start_proxy([addr])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.readexactly(5) == b"ready"
        set_linger_reset(writer)
        writer.transport.abort()
        await wait_until(lambda: listener.active == 0 and upstream_saw)
        up.close()
        return rec

    rec = run(scenario())
    assert upstream_saw == {"reset": True}
    assert rec.closed == [(0, 5)]


# ============================================================ shutdown


def test_close_waits_for_connections_to_finish_within_the_timeout(run):
    async def slow_answer(reader, writer):
        await reader.read(4)
        await asyncio.sleep(0.2)
        writer.write(b"done")
        writer.close()

    async def scenario():
        up, addr = await start_upstream(slow_answer)
        listener, port, rec = await start_proxy([addr])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"work")
        await wait_until(lambda: listener.splices())
        writer.write_eof()
        clean = await listener.close(2.0)
        data = await read_to_eof(reader)
        writer.close()
        up.close()
        return clean, data, listener

    clean, data, listener = run(scenario())
    assert clean is True
    assert data == b"done"
    assert listener.active == 0


def test_close_resets_connections_still_open_at_the_deadline_and_stops_accepting(run):
    upstream_saw = {}

    async def never_done(reader, writer):
        try:
            upstream_saw["data"] = await reader.read()
        except ConnectionResetError:
            upstream_saw["reset"] = True
        writer.close()

    async def scenario():
        up, addr = await start_upstream(never_done)
        listener, port, rec = await start_proxy([addr])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await wait_until(lambda: listener.splices())
        t0 = time.monotonic()
        clean = await listener.close(0.2)
        elapsed = time.monotonic() - t0
        with pytest.raises(ConnectionResetError):
            await read_to_eof(reader)
        writer.close()
        await wait_until(lambda: listener.active == 0 and upstream_saw)
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        up.close()
        return clean, elapsed, rec

    clean, elapsed, rec = run(scenario())
    assert upstream_saw == {"reset": True}
    assert clean is False
    assert 0.15 <= elapsed <= 0.6
    assert rec.closed == [(0, 0)]


def test_close_during_upstream_connect_cancels_the_connect_and_closes_the_client(run):
    async def scenario():
        async with syn_blackhole() as addr:
            listener, port, rec = await start_proxy([addr], connect_timeout=5.0)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await wait_until(lambda: listener.active == 1)
            conn = next(iter(listener.connections))
            t0 = time.monotonic()
            clean = await listener.close(0.1)
            elapsed = time.monotonic() - t0
            how = await closed_by_proxy(reader)
            await asyncio.sleep(0)
            writer.close()
            return clean, elapsed, how, conn, rec

    clean, elapsed, how, conn, rec = run(scenario())
    assert clean is False and elapsed < 0.5
    assert how == "reset"
    assert conn.task.cancelled()
    assert rec.closed == [(0, 0)] and rec.failures == []


# ============================================================ HTTP Upgrade handover


class _HttpSide(asyncio.Protocol):
    """Stands in for the HTTP driver's protocol: reads until a blank line, keeps what
    followed it, pauses reading (as the driver does while waiting for the 101)."""

    def __init__(self):
        self.transport = None
        self.buf = b""
        self.head_done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        if b"\r\n\r\n" in self.buf and not self.head_done.done():
            self.transport.pause_reading()
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            self.head_done.set_result((head, rest))


def test_upgrade_handover_forwards_bytes_already_read_on_both_sides(run):
    """The driver reads the Upgrade request (with tunnel bytes glued after it) and the
    101 (with tunnel bytes glued after it), then hands both transports to a Splice."""

    async def scenario():
        loop = asyncio.get_running_loop()
        ws_server_got = {}

        async def ws_server(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\nserver-frame-1")
            await writer.drain()
            ws_server_got["data"] = await reader.read()
            writer.write(b"server-frame-2")
            writer.close()

        up_server, up_addr = await start_upstream(ws_server)
        closed = loop.create_future()

        async def on_client(down_proto: _HttpSide):
            head, early_client = await down_proto.head_done
            up_t, up_proto = await loop.create_connection(_HttpSide, *up_addr)
            up_t.write(head + b"\r\n\r\n")
            _, early_server = await up_proto.head_done
            down_proto.transport.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            splice = Splice(loop, down_proto.transport, up_t, idle_timeout=5,
                            initial_to_upstream=early_client, initial_to_downstream=early_server,
                            on_close=lambda s, r: closed.set_result((s, r)))
            splice.start()

        tasks = set()

        def factory():
            p = _HttpSide()
            t = loop.create_task(on_client(p))
            tasks.add(t)
            return p

        front = await loop.create_server(factory, "127.0.0.1", 0)
        port = front.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\nclient-frame-1")
        await writer.drain()
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
        writer.write(b"client-frame-2")
        writer.write_eof()
        tail = await read_to_eof(reader)
        counts = await asyncio.wait_for(closed, 2)
        writer.close()
        front.close()
        up_server.close()
        for t in tasks:
            await t
        return tail, ws_server_got["data"], counts

    tail, upstream_data, counts = run(scenario())
    assert tail == b"server-frame-1server-frame-2"
    assert upstream_data == b"client-frame-1client-frame-2"
    assert counts == (28, 28)


# ============================================================ connection limit


def test_connections_beyond_the_listener_limit_are_reset_and_the_others_keep_working(run):
    overflows = []

    async def echo(reader, writer):
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    async def scenario():
        server, target = await start_upstream(echo)
        listener, port, rec = await start_proxy([target], max_connections=2)
        listener.on_overflow = lambda: overflows.append(1)
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for i, (r, w) in enumerate(clients):
            w.write(b"hello %d" % i)
            assert await r.readexactly(7) == b"hello %d" % i
        # a third connection is accepted by the kernel and reset by the proxy at once
        r3, w3 = await asyncio.open_connection("127.0.0.1", port)
        assert await closed_by_proxy(r3) == "reset"
        assert listener.rejected_connections == 1 and overflows == [1]
        assert rec.opened == 2 and listener.active == 2
        # the two admitted connections are unaffected
        for i, (r, w) in enumerate(clients):
            w.write(b"again %d" % i)
            assert await r.readexactly(7) == b"again %d" % i
        # when one closes, a new connection is admitted
        clients[0][1].close()
        await wait_until(lambda: listener.active == 1)
        r4, w4 = await asyncio.open_connection("127.0.0.1", port)
        w4.write(b"later")
        assert await r4.readexactly(5) == b"later"
        assert listener.rejected_connections == 1
        for _, w in (clients[1], (r4, w4), (r3, w3)):
            w.close()
        await listener.close(1.0)
        server.close()
    run(scenario())
