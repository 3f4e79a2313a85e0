"""Keep-alive connection pools, one per upstream endpoint (address, port).

Idle connections are reused last-in first-out (the warmest socket first, and the
coldest ones age out).  Caps: at most ``max_idle`` idle connections per endpoint; a
connection idle longer than ``idle_timeout`` or that served
``max_requests_per_connection`` requests is closed instead of reused.  The per-cluster
connection cap (circuit breaker) is enforced by the cluster, not here.

Requests that may not open a connection (the cluster is at ``maxConnections``) wait in
their endpoint's queue, first come first served: when one of its connections goes idle
or closes, the first waiter is offered the idle connection, or None (a connection slot
may have freed: it tries to open one, or queues again at the front).  Offers are made
from the event loop, never inside the release that triggered them, so a connection is
never handed on while its last response is still being parsed.

Connecting is the only asynchronous step; it runs as a task owned by the pools
(cancelled on close) and bounded by the connect timeout.  ``on_done`` is called exactly
once per connect, also when the task is cancelled (reason "cancelled"), so whoever took
a connection slot for it can give it back.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections import deque
from typing import Awaitable, Callable, Protocol

import cython

from ..batch import SendBatch
from ..clock import monotonic
from ..lists import pop_last, push
from .connection import UpstreamConnection
from .socket_options import set_keepalive
from .tls import UpstreamTlsContexts, UpstreamTlsError


class Waiter(Protocol):
    def connection_available(self, conn: UpstreamConnection | None) -> bool:
        """Take ``conn`` (an idle connection of this endpoint), or with None try again to
        open one; False = queued again (at the front), so nothing more can be offered now."""


class EndpointPool:
    __slots__ = ("key", "idle", "active", "created", "connecting", "waiters", "_offer_scheduled", "_pools")

    def __init__(self, key: tuple[str, int], pools: "UpstreamPools"):
        self.key = key
        self.idle: list[UpstreamConnection] = []
        self.active = 0          # connections open (idle or busy)
        self.created = 0
        self.connecting = 0      # connects in progress
        self.waiters: deque[Waiter] = deque()
        self._offer_scheduled = False
        self._pools = pools

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection closed: drop it from the idle list and the open count."""
        if conn in self.idle:
            self.idle.remove(conn)
        if getattr(conn, "_counted", False):
            conn._counted = False
            self.active -= 1
            self._pools.on_connection_closed(self.key)
        if self.waiters:
            self._pools.offer_soon(self)

    def wait(self, waiter: Waiter, first: bool = False) -> None:
        if first:
            self.waiters.appendleft(waiter)
        else:
            self.waiters.append(waiter)

    def stop_waiting(self, waiter: Waiter) -> None:
        try:
            self.waiters.remove(waiter)
        except ValueError:
            pass


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
    def __init__(self, loop: asyncio.AbstractEventLoop, make_parser: Callable, clock: Callable[[], float] | None,
                 on_connection_opened: Callable[[tuple[str, int]], None] | None = None,
                 on_connection_closed: Callable[[tuple[str, int]], None] | None = None,
                 resolver: Resolver | None = None, batch: SendBatch | None = None):
        self._loop = loop
        self.batch = batch or SendBatch(loop)     # where the connections queue their writes
        self._make_parser = make_parser
        self._clock = clock or time.monotonic     # None: the system clock, read by _now at C level
        self._system_clock = clock is None
        self.dns = DnsCache(resolver or system_resolver(loop), self._clock)
        self._pools: dict[tuple[str, int], EndpointPool] = {}
        self._tasks: set[asyncio.Task] = set()
        self._opened_cb = on_connection_opened
        self._closed_cb = on_connection_closed
        self.tls = UpstreamTlsContexts()              # the worker sets where the workload certificate comes from

    def pool(self, key: tuple[str, int]) -> EndpointPool:
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = EndpointPool(key, self)
        return pool

    def stats(self) -> dict[str, dict[str, int]]:
        return {f"{k[0]}:{k[1]}": {"open": p.active, "idle": len(p.idle), "created": p.created,
                                   "connecting": p.connecting, "waiting": len(p.waiters)}
                for k, p in self._pools.items()}

    # ---------------------------------------------------------------- acquire / release

    def _now(self) -> float:
        if cython.compiled and self._system_clock:
            return monotonic()
        return self._clock()

    def acquire_idle(self, key: tuple[str, int], idle_timeout: float | None) -> UpstreamConnection | None:
        pool = self._pools.get(key)
        if pool is None:
            return None
        return self.acquire_idle_in(pool, idle_timeout)

    def acquire_idle_in(self, pool: EndpointPool, idle_timeout: float | None) -> UpstreamConnection | None:
        """An idle connection of ``pool`` (one of this object's), or None."""
        if pool.waiters:                   # requests are queued for this endpoint: no overtaking them
            return None
        return self._pop_idle(pool, idle_timeout)

    def _pop_idle(self, pool: EndpointPool, idle_timeout: float | None) -> UpstreamConnection | None:
        idle = pool.idle
        while idle:
            conn = pop_last(idle)
            if conn.closed:
                continue
            if idle_timeout is not None and self._now() - conn.idle_since > idle_timeout:
                conn.close()
                continue
            if conn.expires_at <= self._now():         # past its maxConnectionDuration
                conn.close()
                continue
            return conn
        return None

    def release(self, conn: UpstreamConnection, reusable: bool, max_idle: int,
                max_requests: int = 0) -> None:
        conn.handler = None
        conn.requests += 1
        pool = conn.pool
        now = self._now()
        if (not reusable or conn.closed or len(pool.idle) >= max_idle
                or (max_requests and conn.requests >= max_requests) or conn.expires_at <= now):
            conn.close()
            return
        conn.idle_since = now
        push(pool.idle, conn)
        if pool.waiters:
            self.offer_soon(pool)

    # ---------------------------------------------------------------- waiting for a connection

    def offer_soon(self, pool: EndpointPool) -> None:
        if not pool._offer_scheduled:
            pool._offer_scheduled = True
            self._loop.call_soon(self._offer, pool)

    def _offer(self, pool: EndpointPool) -> None:
        pool._offer_scheduled = False
        waiters = pool.waiters
        while waiters:
            conn = self._pop_idle(pool, None)
            if not waiters.popleft().connection_available(conn):
                return

    # ---------------------------------------------------------------- connecting

    def connect(self, key: tuple[str, int], timeout: float,
                on_done: Callable[[UpstreamConnection | None, str], None], keepalive: tuple | None = None,
                max_duration: float | None = None) -> asyncio.Task:
        """Open a new connection; ``on_done(conn, "")`` or ``on_done(None, reason)``
        where reason is "timeout", "cancelled" or "refused"/the error text.  ``keepalive``:
        the cluster's tcpKeepalive (probes, idle s, interval s), set on the new socket;
        ``max_duration``: its maxConnectionDuration (seconds from the connect): after it the
        connection finishes the request it serves and is not reused (Envoy drains it)."""
        pool = self.pool(key)
        pool.connecting += 1
        task = self._loop.create_task(self._connect(pool, timeout, keepalive, max_duration))

        def finished(task: asyncio.Task) -> None:
            self._tasks.discard(task)
            pool.connecting -= 1
            if task.cancelled():
                # also a task cancelled before it ran: on_done still runs once
                on_done(None, "cancelled")
                return
            exc = task.exception()
            if exc is not None:
                on_done(None, type(exc).__name__)
                return
            conn, reason = task.result()
            if conn is not None and conn.closed:    # lost between connect and now
                conn, reason = None, "reset"
            on_done(conn, reason)

        self._tasks.add(task)
        task.add_done_callback(finished)
        return task

    async def _connect(self, pool: EndpointPool, timeout: float, keepalive: tuple | None = None,
                       max_duration: float | None = None) -> tuple[UpstreamConnection | None, str]:
        key = pool.key
        tls = key[2] if len(key) > 2 else None       # DestinationRule tls (upstream/tls.py)
        try:
            async with asyncio.timeout(timeout):
                address = await self.dns.address(key[0], key[1])
                if tls is not None:
                    sni = self.tls.server_hostname(tls, key[0])
                    endpoint = (address, key[1], sni)
                    context = self.tls.context(tls, endpoint)
                else:
                    context = None
                if context is None:
                    _, conn = await self._loop.create_connection(
                        lambda: UpstreamConnection(pool, self._make_parser, self.batch), address, key[1])
                else:
                    _, conn = await self._loop.create_connection(
                        lambda: UpstreamConnection(pool, self._make_parser, self.batch), address, key[1],
                        ssl=context, server_hostname=sni)
                    try:
                        conn.peer_identity = self.tls.check_peer(
                            tls, conn.transport.get_extra_info("ssl_object"), endpoint)
                    except UpstreamTlsError:
                        conn.transport.abort()
                        raise
        except asyncio.TimeoutError:
            return None, "timeout"
        except UpstreamTlsError as err:
            return None, f"tls: {err}"
        except ssl.SSLError as err:
            return None, f"tls handshake: {err.reason or err}"
        except OSError as err:
            return None, err.strerror or type(err).__name__
        sock = conn.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            if keepalive is not None:
                set_keepalive(sock, keepalive)
        if max_duration is not None:
            conn.expires_at = self._now() + max_duration
        pool.active += 1
        pool.created += 1
        conn._counted = True
        if self._opened_cb:
            self._opened_cb(key)
        return conn, ""

    def on_connection_closed(self, key: tuple[str, int]) -> None:
        if self._closed_cb:
            self._closed_cb(key)

    # ---------------------------------------------------------------- housekeeping

    def sweep(self, idle_timeout: float) -> None:
        """Close idle connections older than ``idle_timeout`` (called periodically)."""
        now = self._now()
        for pool in self._pools.values():
            for conn in [c for c in pool.idle if now - c.idle_since > idle_timeout or c.expires_at <= now]:
                conn.close()

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for pool in self._pools.values():
            for conn in list(pool.idle):
                conn.close()
