"""Graceful drain and config reload under concurrent keep-alive load, two workers.

The load comes from keep-alive clients that behave as a client should: one request at a time,
a new connection after a response carrying ``Connection: close``.  Their outcomes are told
apart: a request answered; a new connection the proxy never took (refused, or reset before
any byte came back on a connection it had not answered on yet: still in the kernel's
backlog when the listener closed); and a failure, a request on a connection the proxy had
taken that got no complete answer.  Only the last is a failed request, and there must be none.
"""
from __future__ import annotations

import asyncio
import re
import time

import pytest

from helpers import Upstream, eventually, service_entry_yaml

pytestmark = pytest.mark.asyncio


class KeepAliveLoad:
    def __init__(self, port: int, host: str, clients: int):
        self.port, self.host, self.clients = port, host, clients
        self.ok = 0
        self.statuses: dict[int, int] = {}
        self.refused: list[float] = []            # times of connections never taken
        self.failures: list[str] = []
        self.connections_opened: list[float] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> "KeepAliveLoad":
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]
        return self

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _client(self, i: int) -> None:
        request = f"GET /load/{i} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode()
        reader = writer = None
        answered_here = 0
        while not self._stop.is_set():
            if writer is None:
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", self.port), 2)
                except (OSError, asyncio.TimeoutError):
                    self.refused.append(time.monotonic())
                    await asyncio.sleep(0.02)
                    continue
                self.connections_opened.append(time.monotonic())
                answered_here = 0
            try:
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
                await asyncio.wait_for(reader.readexactly(length), 5)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
                got_nothing = isinstance(exc, (ConnectionError, asyncio.IncompleteReadError)) and not (
                    isinstance(exc, asyncio.IncompleteReadError) and exc.partial)
                if answered_here == 0 and got_nothing:
                    self.refused.append(time.monotonic())
                else:
                    self.failures.append(f"client {i}: {type(exc).__name__} after {answered_here} answers")
                writer.close()
                reader = writer = None
                continue
            status = int(head[9:12])
            self.statuses[status] = self.statuses.get(status, 0) + 1
            self.ok += 1
            answered_here += 1
            if re.search(rb"(?i)\r\nconnection: *close", head):
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()


async def _idle_connection(port: int, host: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A keep-alive connection that made one request and then waits."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /idle HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)))
    assert b"connection: close" not in head.lower()
    return reader, writer


async def _closed_at(reader: asyncio.StreamReader) -> float:
    try:
        await reader.read()
    except OSError:
        pass
    return time.monotonic()


def _answer_after(delay: float):
    async def behaviour(req, writer):
        await asyncio.sleep(delay)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        return True
    return behaviour


async def test_sigterm_under_keepalive_load_with_two_workers_fails_no_request_in_flight(proxy_factory):
    up = await Upstream(_answer_after(0.02)).start()
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", up.port, {})]), workers=2,
                          extra_args=["--drain-grace", "2.0", "--drain-timeout", "8"])
    idle = [await _idle_connection(proxy.port, "svc.local") for _ in range(6)]
    idle_closed = [asyncio.create_task(_closed_at(r)) for r, _ in idle]
    load = KeepAliveLoad(proxy.port, "svc.local", clients=50).start()
    await eventually(lambda: load.ok > 30 or load.failures)
    assert not load.failures, (load.ok, load.failures[:3])
    sigterm = time.monotonic()
    proxy.signal()
    await asyncio.sleep(0.3)
    proxy.signal()                      # a second SIGTERM changes nothing: the drain goes on
    await eventually(lambda: proxy.admin("/ready")[0] == 503)     # readiness fails, the grace period runs
    code = await asyncio.get_running_loop().run_in_executor(None, proxy.proc.wait, 30)
    await load.stop()
    assert load.failures == [], load.failures[:5]
    assert set(load.statuses) == {200}
    assert code == 0
    # during the grace period new connections were still taken and served
    assert sum(1 for t in load.connections_opened if sigterm + 0.1 < t < sigterm + 1.9) > 0
    # idle keep-alive connections were closed, but only once the grace period was over
    closed = [await asyncio.wait_for(t, 1) for t in idle_closed]
    assert all(t >= sigterm + 1.9 for t in closed), [round(t - sigterm, 2) for t in closed]
    # connections were refused only after the grace period
    assert all(t >= sigterm + 1.9 for t in load.refused), [round(t - sigterm, 2) for t in load.refused][:5]
    for _, w in idle:
        w.close()
    await up.close()


async def test_config_changes_under_concurrent_keepalive_load_fail_no_request(proxy_factory, tmp_path):
    up = await Upstream(_answer_after(0.005)).start()
    other = await Upstream().start()
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", up.port, {})]), workers=2)
    load = KeepAliveLoad(proxy.port, "svc.local", clients=16).start()
    await asyncio.sleep(0.3)
    for i in range(3):
        # new services, and the routed one's endpoint list rewritten (same endpoint, new order)
        (proxy.config_dir / f"new{i}.yaml").write_text(
            service_entry_yaml(f"new{i}.local", 80, [("127.0.0.1", other.port, {})], name=f"new{i}"))
        (proxy.config_dir / "mesh.yaml").write_text(service_entry_yaml(
            "svc.local", 80, [("127.0.0.1", up.port, {})] + [("127.0.0.1", up.port, {"gen": str(i)})]))
        await asyncio.sleep(1.1)         # one watcher poll and its quiet time
    deadline = time.monotonic() + 5
    served_new = False
    while time.monotonic() < deadline and not served_new:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: new2.local\r\nConnection: close\r\n\r\n")
        served_new = (await reader.read()).startswith(b"HTTP/1.1 200")
        writer.close()
        await asyncio.sleep(0.1)
    await load.stop()
    assert served_new, "the last config reached both workers"
    assert load.ok > 200
    assert load.failures == [] and load.refused == [], (load.failures[:5], load.refused[:5])
    assert set(load.statuses) == {200}, load.statuses
    await up.close()
    await other.close()
