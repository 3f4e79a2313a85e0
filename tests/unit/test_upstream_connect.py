"""UpstreamPools.connect: on_done runs exactly once per connect, whatever ends it, so the
connection slot a request took for it is always given back (real loopback sockets)."""
from __future__ import annotations

import asyncio
import time

import pytest

from meshproxy.codec import DEFAULT_BACKEND, make_response_parser
from meshproxy.codec.api import CodecLimits
from meshproxy.upstream.connection import UpstreamConnection
from meshproxy.upstream.pool import UpstreamPools

pytestmark = pytest.mark.asyncio


def _pools(resolver=None):
    loop = asyncio.get_running_loop()
    return UpstreamPools(loop, lambda handler: make_response_parser(DEFAULT_BACKEND, handler, CodecLimits()),
                         time.monotonic, resolver=resolver)


async def _settle():
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_connect_cancelled_before_it_ran_still_reports_cancelled_once():
    pools = _pools()
    done = []
    task = pools.connect(("127.0.0.1", 9), 1.0, lambda conn, reason: done.append((conn, reason)))
    task.cancel()
    await _settle()
    assert done == [(None, "cancelled")]
    assert pools.pool(("127.0.0.1", 9)).connecting == 0


async def test_a_connect_cancelled_while_resolving_reports_cancelled_once():
    async def never(host, port):
        await asyncio.sleep(3600)
    pools = _pools(never)
    done = []
    task = pools.connect(("upstream.example", 80), 10.0, lambda conn, reason: done.append((conn, reason)))
    await asyncio.sleep(0.05)
    assert pools.pool(("upstream.example", 80)).connecting == 1
    task.cancel()
    await _settle()
    assert done == [(None, "cancelled")]
    assert pools.pool(("upstream.example", 80)).connecting == 0


async def test_a_refused_connect_and_a_good_one_report_once_each():
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    closed = socket_port_without_listener()
    pools = _pools()
    done = []
    pools.connect(("127.0.0.1", port), 2.0, lambda conn, reason: done.append(("ok", conn is not None, reason)))
    pools.connect(("127.0.0.1", closed), 2.0, lambda conn, reason: done.append(("refused", conn is not None, reason)))
    for _ in range(100):
        if len(done) == 2:
            break
        await asyncio.sleep(0.01)
    assert len(done) == 2
    ok, refused = sorted(done)
    assert ok == ("ok", True, "")
    assert refused[:2] == ("refused", False) and refused[2]      # the error text, e.g. "Connection refused"
    assert pools.pool(("127.0.0.1", port)).active == 1 and pools.pool(("127.0.0.1", port)).connecting == 0
    pools.close()
    server.close()


def socket_port_without_listener() -> int:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class _Waiter:
    def __init__(self, requeue: bool = False):
        self.offers = []
        self.requeue = requeue

    def connection_available(self, conn) -> bool:
        self.offers.append(conn)
        return conn is not None or not self.requeue


async def test_queued_requests_are_offered_idle_connections_in_order_and_not_overtaken():
    pools = _pools()
    pool = pools.pool(("127.0.0.1", 1))
    first, second = _Waiter(), _Waiter()
    pool.wait(first)
    pool.wait(second)
    conn = UpstreamConnection(pool, lambda handler: make_response_parser(DEFAULT_BACKEND, handler, CodecLimits()))
    conn.idle_since = time.monotonic()
    pool.idle.append(conn)
    assert pools.acquire_idle(("127.0.0.1", 1), None) is None     # a new request may not take it
    pools.offer_soon(pool)
    pools.offer_soon(pool)                                          # one offer round, not two
    await _settle()
    assert first.offers == [conn] and second.offers == [None] and not pool.waiters
    assert pools.acquire_idle(("127.0.0.1", 1), None) is None       # taken by the first waiter


async def test_a_waiter_that_queues_again_stops_the_offer_round():
    pools = _pools()
    pool = pools.pool(("127.0.0.1", 1))
    stuck, behind = _Waiter(requeue=True), _Waiter()
    pool.wait(stuck)
    pool.wait(behind)
    pools.offer_soon(pool)
    await _settle()
    assert stuck.offers == [None] and behind.offers == []
    assert list(pool.waiters) == [behind]     # (a real waiter puts itself back at the front)
