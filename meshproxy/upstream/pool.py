"""Keep-alive connection pools, one per upstream endpoint (address, port).

Idle connections are reused last-in first-out (the warmest socket first, and the
coldest ones age out).  Caps: at most ``max_idle`` idle connections per endpoint; a
connection idle longer than ``idle_timeout`` or that served
``max_requests_per_connection`` requests is closed instead of reused.  The per-cluster
connection cap (circuit breaker) is enforced by the cluster, not here.

Connecting is the only asynchronous step; it runs as a task owned by the pools
(cancelled on close) and bounded by the connect timeout.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Awaitable, Callable

from .connection import UpstreamConnection


class EndpointPool:
    __slots__ = ("key", "idle", "active", "created", "_pools")

    def __init__(self, key: tuple[str, int], pools: "UpstreamPools"):
        self.key = key
        self.idle: list[UpstreamConnection] = []
        self.active = 0          # connections open (idle or busy)
        self.created = 0
        self._pools = pools

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection closed: drop it from the idle list and the open count."""
        if conn in self.idle:
            self.idle.remove(conn)
        if getattr(conn, "_counted", False):
            conn._counted = False
            self.active -= 1
            self._pools.on_connection_closed(self.key)


Resolver = Callable[[str, int], Awaitable[list[str]]]


class DnsCache:
    """Names of DNS endpoints (ServiceEntry ``resolution: DNS``) resolved by the proxy.

    An answer is reused for ``refresh`` seconds (getaddrinfo gives no TTL, so the refresh
    interval stands in for it); when a lookup fails the last good answer keeps serving.
    Several addresses are used in turn.  IP literals never touch the resolver.
    """

    def __init__(self, resolve: Resolver, clock: Callable[[], float], refresh: float = 30.0):
        self._resolve = resolve
        self._clock = clock
        self.refresh = refresh
        self._answers: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._turn = 0
        self.failures = 0

    async def address(self, host: str, port: int) -> str:
        try:
            ipaddress.ip_address(host)
            return host
        except ValueError:
            pass
        key = (host, port)
        cached = self._answers.get(key)
        now = self._clock()
        if cached is None or now - cached[0] >= self.refresh:
            try:
                addresses = await self._resolve(host, port)
                if not addresses:
                    raise OSError(f"no address for {host}")
                cached = self._answers[key] = (now, addresses)
            except OSError:
                self.failures += 1
                if cached is None:
                    raise
                # keep serving the last answer; try the resolver again next time
        addresses = cached[1]
        self._turn += 1
        return addresses[self._turn % len(addresses)]


def system_resolver(loop: asyncio.AbstractEventLoop) -> Resolver:
    async def resolve(host: str, port: int) -> list[str]:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(info[4][0] for info in infos))
    return resolve


class UpstreamPools:
    def __init__(self, loop: asyncio.AbstractEventLoop, make_parser: Callable, clock: Callable[[], float],
                 on_connection_opened: Callable[[tuple[str, int]], None] | None = None,
                 on_connection_closed: Callable[[tuple[str, int]], None] | None = None,
                 resolver: Resolver | None = None):
        self._loop = loop
        self.dns = DnsCache(resolver or system_resolver(loop), clock)
        self._make_parser = make_parser
        self._clock = clock
        self._pools: dict[tuple[str, int], EndpointPool] = {}
        self._tasks: set[asyncio.Task] = set()
        self._opened_cb = on_connection_opened
        self._closed_cb = on_connection_closed

    def pool(self, key: tuple[str, int]) -> EndpointPool:
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = EndpointPool(key, self)
        return pool

    def stats(self) -> dict[str, dict[str, int]]:
        return {f"{k[0]}:{k[1]}": {"open": p.active, "idle": len(p.idle), "created": p.created}
                for k, p in self._pools.items()}

    # ---------------------------------------------------------------- acquire / release

    def acquire_idle(self, key: tuple[str, int], idle_timeout: float | None) -> UpstreamConnection | None:
        pool = self._pools.get(key)
        if pool is None:
            return None
        idle = pool.idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if idle_timeout is not None and self._clock() - conn.idle_since > idle_timeout:
                conn.close()
                continue
            return conn
        return None

    def release(self, conn: UpstreamConnection, reusable: bool, max_idle: int,
                max_requests: int = 0) -> None:
        conn.exchange = None
        conn.requests += 1
        if (not reusable or conn.closed or len(conn.pool.idle) >= max_idle
                or (max_requests and conn.requests >= max_requests)):
            conn.close()
            return
        conn.idle_since = self._clock()
        conn.pool.idle.append(conn)

    def connect(self, key: tuple[str, int], timeout: float,
                on_done: Callable[[UpstreamConnection | None, str], None]) -> asyncio.Task:
        """Open a new connection; ``on_done(conn, "")`` or ``on_done(None, reason)``
        where reason is "timeout" or "refused"/the error text."""
        task = self._loop.create_task(self._connect(key, timeout, on_done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _connect(self, key, timeout, on_done) -> None:
        pool = self.pool(key)
        try:
            async with asyncio.timeout(timeout):
                address = await self.dns.address(key[0], key[1])
                _, conn = await self._loop.create_connection(
                    lambda: UpstreamConnection(pool, self._make_parser), address, key[1])
        except asyncio.TimeoutError:
            on_done(None, "timeout")
            return
        except OSError as err:
            on_done(None, err.strerror or type(err).__name__)
            return
        sock = conn.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        pool.active += 1
        pool.created += 1
        conn._counted = True
        if self._opened_cb:
            self._opened_cb(key)
        if conn.closed:         # lost between connect and now
            on_done(None, "reset")
            return
        on_done(conn, "")

    def on_connection_closed(self, key: tuple[str, int]) -> None:
        if self._closed_cb:
            self._closed_cb(key)

    # ---------------------------------------------------------------- housekeeping

    def sweep(self, idle_timeout: float) -> None:
        """Close idle connections older than ``idle_timeout`` (called periodically)."""
        now = self._clock()
        for pool in self._pools.values():
            for conn in [c for c in pool.idle if now - c.idle_since > idle_timeout]:
                conn.close()

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for pool in self._pools.values():
            for conn in list(pool.idle):
                conn.close()
