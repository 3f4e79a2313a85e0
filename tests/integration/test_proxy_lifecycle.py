"""Process-level behaviour: graceful drain, config reload, bounded memory while
streaming, several workers on one port.  (Drain and reload under concurrent load:
test_drain_reload.py; slow peers: test_attack_edges.py.)"""
from __future__ import annotations

import asyncio
import json
import os
import re
import time

import pytest

from helpers import Upstream, eventually, free_port, http_get, parse_responses, raw_exchange, respond, service_entry_yaml
from meshproxy.process import EXIT_UNCLEAN_DRAIN

pytestmark = pytest.mark.asyncio


def _slow(delay: float, body: bytes = b"slow-done"):
    async def behaviour(req, writer):
        await asyncio.sleep(delay)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        return True
    return behaviour


async def test_sigterm_drains_in_flight_requests_then_exits_zero(proxy_factory, codec):
    up = await Upstream(_slow(1.0)).start()
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", up.port, {})]), codec=codec,
                          extra_args=["--drain-timeout", "5", "--drain-grace", "0"])
    in_flight = [asyncio.create_task(raw_exchange(
        proxy.port, b"GET / HTTP/1.1\r\nHost: svc.local\r\n\r\n", timeout=20)) for _ in range(3)]
    await eventually(lambda: len(up.requests) == 3)          # all three in flight upstream
    proxy.signal()
    await eventually(lambda: proxy.admin("/ready")[0] in (503, 0))
    with pytest.raises(OSError):
        # listeners stopped accepting
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.port), 1)
        w.write(b"GET / HTTP/1.1\r\nHost: svc.local\r\n\r\n")
        await w.drain()
        if not await asyncio.wait_for(r.read(1), 1):
            raise ConnectionResetError("closed without answer")
    for task in in_flight:
        data, closed = await task
        status, headers, body = parse_responses(data)[0]
        assert status == 200 and body == b"slow-done"
        assert headers.get("connection") == "close"
        assert closed
    assert proxy.proc.wait(5) == 0
    await up.close()


async def test_drain_deadline_forces_exit_with_the_unclean_drain_code(proxy_factory, codec):
    up = await Upstream(_slow(30.0)).start()
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", up.port, {})]), codec=codec,
                          extra_args=["--drain-timeout", "1"])
    task = asyncio.create_task(raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: svc.local\r\n\r\n", timeout=20))
    await eventually(lambda: len(up.requests) == 1)
    t0 = time.monotonic()
    proxy.signal()
    code = await asyncio.get_running_loop().run_in_executor(None, proxy.proc.wait, 20)
    assert time.monotonic() - t0 < 10       # the 1 s deadline, not the upstream's 30 s
    assert code == EXIT_UNCLEAN_DRAIN      # the deadline closed a connection: said in the exit code
    data, closed = await task
    assert closed
    await up.close()


async def test_invalid_config_is_rejected_and_last_good_keeps_serving(proxy_factory, upstream):
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", upstream.port, {})]))
    bad = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: broken, namespace: default}
spec:
  hosts: [svc.local]
  http:
  - route:
    - destination: {host: svc.local}
      wieght: 10
"""
    (proxy.config_dir / "bad.yaml").write_text(bad)
    deadline = time.monotonic() + 5
    dump = {}
    while time.monotonic() < deadline:
        dump = json.loads(proxy.admin("/config_dump")[1])
        if dump.get("last_rejection"):
            break
        await asyncio.sleep(0.2)
    errors = dump["last_rejection"]["errors"]
    assert any("VirtualService default/broken" in e and "spec.http[0].route[0].wieght" in e for e in errors), errors
    assert (await http_get(proxy.port, "svc.local"))[0] == 200


def _peak_rss_kb(pid: int) -> int:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))


async def _stream_through(proxy_port: int, size: int) -> tuple[int, int]:
    """Upload ``size`` bytes and download ``size`` bytes through the proxy."""
    chunk = b"x" * 65536
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    writer.write(b"POST /sink HTTP/1.1\r\nHost: big.local\r\nContent-Length: %d\r\n\r\n" % size)
    sent = 0
    while sent < size:
        writer.write(chunk)
        sent += len(chunk)
        await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"200" in head.split(b"\r\n")[0]
    n = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))
    await reader.readexactly(n)
    writer.write(b"GET /source HTTP/1.1\r\nHost: big.local\r\nConnection: close\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    got = 0
    while True:
        data = await reader.read(1 << 20)
        if not data:
            break
        got += len(data)
    writer.close()
    return sent, got


async def _big_server(size: int):
    async def serve(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"POST"):
                    n = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))
                    while n:
                        data = await reader.read(min(n, 1 << 20))
                        n -= len(data)
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
                    block = b"y" * (1 << 20)
                    left = size
                    while left:
                        writer.write(block[:min(left, len(block))])
                        left -= min(left, len(block))
                        await writer.drain()
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("size_mb", [48])
async def test_streaming_large_bodies_both_ways_keeps_proxy_memory_bounded(proxy_factory, codec, size_mb):
    size = size_mb * 1024 * 1024
    server, port = await _big_server(size)
    proxy = proxy_factory(service_entry_yaml("big.local", 80, [("127.0.0.1", port, {})]), codec=codec)
    before = _peak_rss_kb(proxy.proc.pid)
    sent, got = await _stream_through(proxy.port, size)
    peak = _peak_rss_kb(proxy.proc.pid)
    assert sent == size and got == size
    # bounded: the proxy's peak RSS grows by far less than what went through it (the first large
    # transfer of a process raises it once by up to about 15 MiB; buffering a body adds 48 MiB)
    assert peak - before < 24 * 1024, f"peak RSS grew {peak - before} kB streaming {size_mb} MiB each way"
    server.close()


@pytest.mark.slow
async def test_streaming_one_gib_each_way_keeps_proxy_memory_bounded(proxy_factory):
    size = 1024 * 1024 * 1024
    server, port = await _big_server(size)
    proxy = proxy_factory(service_entry_yaml("big.local", 80, [("127.0.0.1", port, {})]))
    before = _peak_rss_kb(proxy.proc.pid)
    sent, got = await _stream_through(proxy.port, size)
    peak = _peak_rss_kb(proxy.proc.pid)
    assert sent == size and got == size
    assert peak - before < 48 * 1024
    server.close()


async def test_several_workers_share_the_listening_port(proxy_factory, upstream):
    port = free_port()
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", upstream.port, {})]),
                          workers=2, listen_port=port)
    children = [p for p in os.listdir("/proc") if p.isdigit()
                and _ppid(int(p)) == proxy.proc.pid]
    assert len(children) == 2
    statuses = [(await http_get(port, "svc.local"))[0] for _ in range(20)]
    assert statuses == [200] * 20
    metrics = proxy.admin("/metrics")[1].decode()
    total = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                if line.startswith("istio_requests_total{") and 'response_code="200"' in line)
    assert total == 20
    assert proxy.stop() == 0


def _ppid(pid: int) -> int:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1
