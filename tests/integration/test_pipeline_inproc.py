"""Pipeline behaviour through a real in-loop Worker (hand-built snapshots)."""
from __future__ import annotations

import asyncio

import pytest

from helpers import Upstream, free_port, http_get, parse_responses, raw_exchange, respond, responses_complete
from inproc import cluster, dest, snapshot, start_worker
from meshproxy.codec import DEFAULT_BACKEND
from meshproxy.config.model import HttpRoute

pytestmark = pytest.mark.asyncio


async def test_inprocess_worker_forwards_a_request(upstream, codec):
    snap = snapshot([HttpRoute(name="r", source="t", destinations=(dest("c"),))], [cluster("c", upstream.port)])
    worker, port = await start_worker(asyncio.get_running_loop(), snap, codec)
    try:
        status, _, body = await http_get(port, "svc.local", "/x")
        assert status == 200
        assert upstream.requests[0].target == "/x"
    finally:
        await worker.drain(1)


from collections import Counter
from dataclasses import replace

from meshproxy.config.model import (
    ConnectionPoolPolicy, ConsistentHash, DirectResponse, FaultPolicy, HeaderOps, HeaderPolicy,
    LoadBalancerPolicy, MirrorPolicy, OutlierPolicy, Redirect, RetryPolicy, TrafficPolicy,
)


async def _worker(routes, clusters, codec=DEFAULT_BACKEND, **kw):
    worker, port = await start_worker(asyncio.get_running_loop(), snapshot(routes, clusters, **kw), codec)
    return worker, port


def _counting(status_for):
    """Upstream whose status for the n-th request is ``status_for(n)``."""
    state = {"n": 0}

    async def behaviour(req, writer):
        state["n"] += 1
        status = status_for(state["n"])
        writer.write(b"HTTP/1.1 %d X\r\ncontent-length: 2\r\n\r\nok" % status)
        return True
    return behaviour


async def test_retry_on_5xx_goes_to_another_attempt_and_succeeds(codec):
    up = await Upstream(_counting(lambda n: 503 if n == 1 else 200)).start()
    retry = RetryPolicy(attempts=2, per_try_timeout=None, retry_on=frozenset({"5xx"}))
    worker, port = await _worker([HttpRoute(name="r", source="t", destinations=(dest("c"),), retries=retry)],
                                 [cluster("c", up.port)], codec)
    try:
        assert (await http_get(port, "svc.local"))[0] == 200
        assert len(up.requests) == 2
    finally:
        await worker.drain(1)
        await up.close()


async def test_post_is_not_retried_unless_the_route_allows_it():
    up = await Upstream(_counting(lambda n: 503)).start()
    retry = RetryPolicy(attempts=3, per_try_timeout=None, retry_on=frozenset({"5xx"}))
    worker, port = await _worker([HttpRoute(name="r", source="t", destinations=(dest("c"),), retries=retry)],
                                 [cluster("c", up.port)])
    try:
        data, _ = await raw_exchange(port, b"POST / HTTP/1.1\r\nHost: svc.local\r\nContent-Length: 2\r\n\r\nhi", timeout=1,
                                     until=responses_complete(1))
        assert parse_responses(data)[0][0] == 503
        assert len(up.requests) == 1
    finally:
        await worker.drain(1)
        await up.close()


async def test_retries_exhausted_return_the_last_upstream_answer():
    up = await Upstream(_counting(lambda n: 503)).start()
    retry = RetryPolicy(attempts=2, per_try_timeout=None, retry_on=frozenset({"5xx"}))
    worker, port = await _worker([HttpRoute(name="r", source="t", destinations=(dest("c"),), retries=retry)],
                                 [cluster("c", up.port)])
    try:
        assert (await http_get(port, "svc.local"))[0] == 503
        assert len(up.requests) == 3          # 1 try + 2 retries
    finally:
        await worker.drain(1)
        await up.close()


async def test_route_timeout_gives_504_for_a_slow_upstream(codec):
    async def slow(req, writer):
        await asyncio.sleep(1.0)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        return True
    up = await Upstream(slow).start()
    worker, port = await _worker([HttpRoute(name="r", source="t", destinations=(dest("c"),), timeout=0.5)],
                                 [cluster("c", up.port)], codec)
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert (await http_get(port, "svc.local"))[0] == 504
        assert 0.45 < loop.time() - t0 < 0.9
    finally:
        await worker.drain(1)
        await up.close()


async def test_per_try_timeout_retries_then_succeeds():
    async def first_slow(req, writer, state={"n": 0}):
        state["n"] += 1
        if state["n"] == 1:
            await asyncio.sleep(2)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        return True
    up = await Upstream(first_slow).start()
    retry = RetryPolicy(attempts=2, per_try_timeout=0.2, retry_on=frozenset({"5xx", "reset"}))
    worker, port = await _worker([HttpRoute(name="r", source="t", destinations=(dest("c"),), retries=retry)],
                                 [cluster("c", up.port)])
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert (await http_get(port, "svc.local"))[0] == 200
        assert loop.time() - t0 < 1.0
    finally:
        await worker.drain(1)
        await up.close()


async def test_fault_abort_and_delay(upstream):
    abort = HttpRoute(name="a", source="t", destinations=(dest("c"),),
                      fault=FaultPolicy(abort_status=418, abort_percentage=100.0))
    worker, port = await _worker([abort], [cluster("c", upstream.port)])
    try:
        assert (await http_get(port, "svc.local"))[0] == 418
        assert upstream.requests == []
    finally:
        await worker.drain(1)
    delay = HttpRoute(name="d", source="t", destinations=(dest("c"),),
                      fault=FaultPolicy(delay=0.3, delay_percentage=100.0))
    worker, port = await _worker([delay], [cluster("c", upstream.port)])
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert (await http_get(port, "svc.local"))[0] == 200
        assert loop.time() - t0 >= 0.29
    finally:
        await worker.drain(1)


async def test_redirect_and_direct_response_are_answered_by_the_proxy(upstream):
    routes = [
        HttpRoute(name="redir", source="t", matches=(), redirect=Redirect(uri="/new", code=302)),
    ]
    worker, port = await _worker(routes, [cluster("c", upstream.port)])
    try:
        status, headers, _ = await http_get(port, "svc.local", "/old?x=1")
        assert status == 302 and headers["location"] == "http://svc.local/new?x=1"
    finally:
        await worker.drain(1)
    worker, port = await _worker([HttpRoute(name="dr", source="t", direct_response=DirectResponse(200, b"hi"))],
                                 [cluster("c", upstream.port)])
    try:
        status, _, body = await http_get(port, "svc.local")
        assert (status, body) == (200, b"hi")
        assert upstream.requests == []
    finally:
        await worker.drain(1)


async def test_header_operations_on_request_and_response(upstream):
    route = HttpRoute(name="r", source="t", destinations=(dest("c"),), headers=HeaderPolicy(
        request=HeaderOps(set=(("x-set", "1"),), remove=("x-drop",)),
        response=HeaderOps(add=(("x-resp", "yes"),))))
    worker, port = await _worker([route], [cluster("c", upstream.port)])
    try:
        status, headers, _ = await http_get(port, "svc.local", headers={"X-Drop": "d", "X-Set": "old"})
        assert headers["x-resp"] == "yes"
        got = upstream.requests[0]
        assert got.header("x-set") == "1" and got.header("x-drop") is None
    finally:
        await worker.drain(1)


async def test_weighted_split_is_exact_within_one_and_zero_weight_gets_nothing():
    ups = [await Upstream(respond(200, name.encode())).start() for name in ("a", "b", "z")]
    route = HttpRoute(name="r", source="t", destinations=(dest("a", 70), dest("b", 30), dest("z", 0)))
    worker, port = await _worker([route], [cluster(n, u.port) for n, u in zip("abz", ups)])
    try:
        # Gateway API conformance sends 500 at 70/30/0 and allows 5 points; ours is exact
        counts = Counter()
        for _ in range(500):
            counts[(await http_get(port, "svc.local"))[2]] += 1
        assert counts == Counter({b"a": 350, b"b": 150})
    finally:
        await worker.drain(1)
        for u in ups:
            await u.close()


async def test_sticky_canary_keeps_each_user_on_one_version():
    ups = [await Upstream(respond(200, name.encode())).start() for name in ("v1", "v2")]
    hashing = TrafficPolicy(load_balancer=LoadBalancerPolicy(consistent_hash=ConsistentHash(key="header", name="x-user")))
    clusters = [replace(cluster(n, u.port), policy=hashing) for n, u in zip(("v1", "v2"), ups)]
    route = HttpRoute(name="r", source="t", destinations=(dest("v1", 50), dest("v2", 50)))
    worker, port = await _worker([route], clusters)
    try:
        first = {}
        for user in range(40):
            first[user] = (await http_get(port, "svc.local", headers={"x-user": f"u{user}"}))[2]
        for user in range(40):
            again = (await http_get(port, "svc.local", headers={"x-user": f"u{user}"}))[2]
            assert again == first[user]
        assert 8 < sum(v == b"v2" for v in first.values()) < 32
    finally:
        await worker.drain(1)
        for u in ups:
            await u.close()


def _slow_paths(delay: float, close: bool = False, seen: dict | None = None):
    """Upstream that answers /slow... after ``delay`` seconds and anything else at once;
    ``seen["max"]`` is the most requests it had in progress at once."""
    seen = {"now": 0, "max": 0} if seen is None else seen

    async def behaviour(req, writer):
        seen["now"] += 1
        seen["max"] = max(seen["max"], seen["now"])
        if req.target.startswith("/slow"):
            await asyncio.sleep(delay)
        seen["now"] -= 1
        extra = b"connection: close\r\n" if close else b""
        writer.write(b"HTTP/1.1 200 OK\r\n%scontent-length: 2\r\n\r\nok" % extra)
        return not close
    return behaviour


def _metric(worker, line: str) -> bool:
    from meshproxy.telemetry.exposition import render_prometheus
    return line + "\n" in render_prometheus(worker.telemetry.metrics.dump()).decode()


async def test_circuit_breaker_queues_at_max_connections_and_overflows_past_pending(codec):
    """Istio's circuit-breaking task: maxConnections 1, http1MaxPendingRequests 1.  Of four
    concurrent requests one runs on the connection, one waits for it (Envoy's pending
    queue) and is served on the same connection when it frees, two overflow: 503 UO."""
    up = await Upstream(_slow_paths(0.4)).start()
    policy = TrafficPolicy(connection_pool=ConnectionPoolPolicy(max_connections=1, max_pending_requests=1))
    worker, port = await _worker([HttpRoute(name="r", source="t", destinations=(dest("c"),))],
                                 [cluster("c", up.port, policy=policy)], codec)
    try:
        assert (await http_get(port, "svc.local", "/warm"))[0] == 200       # one pooled connection
        results = await asyncio.gather(*(http_get(port, "svc.local", f"/slow{i}") for i in range(4)))
        assert sorted(r[0] for r in results) == [200, 200, 503, 503]
        assert all(b"overflow" in r[2] for r in results if r[0] == 503)
        assert up.connections == 1 and len(up.requests) == 3
        stats = worker.clusters.get("c").stats()
        assert stats["overflow"]["pending"] == 2 and stats["overflow"]["connections"] >= 1
        assert stats["pending_requests"] == 0 and stats["requests"] == 0 and stats["connections"] == 1
        assert _metric(worker, 'meshproxy_upstream_rq_pending_overflow_total{cluster="c"} 2')
        assert _metric(worker, 'meshproxy_upstream_cx_overflow_total{cluster="c"} 1')
    finally:
        await worker.drain(1)
        await up.close()


async def test_queued_request_gets_a_new_connection_when_the_busy_one_closes():
    """A waiter is offered the freed connection slot when the upstream closes the busy
    connection (Connection: close), and opens its own."""
    seen = {"now": 0, "max": 0}
    up = await Upstream(_slow_paths(0.2, close=True, seen=seen)).start()
    policy = TrafficPolicy(connection_pool=ConnectionPoolPolicy(max_connections=1))
    worker, port = await _worker([HttpRoute(name="r", source="t", destinations=(dest("c"),))],
                                 [cluster("c", up.port, policy=policy)])
    try:
        results = await asyncio.gather(*(http_get(port, "svc.local", f"/slow{i}") for i in range(3)))
        assert [r[0] for r in results] == [200, 200, 200]
        assert up.connections == 3 and seen["max"] == 1      # one at a time, each on its own connection
        assert worker.clusters.get("c").stats()["connections"] == 0
    finally:
        await worker.drain(1)
        await up.close()


async def test_request_waiting_for_a_connection_times_out_with_504_and_leaves_the_queue():
    from meshproxy.config.model import RouteMatch, StringMatch
    up = await Upstream(_slow_paths(1.0)).start()
    policy = TrafficPolicy(connection_pool=ConnectionPoolPolicy(max_connections=1))
    routes = [HttpRoute(name="q", source="t", matches=(RouteMatch(uri=StringMatch("prefix", "/queued")),),
                        destinations=(dest("c"),), timeout=0.3),
              HttpRoute(name="r", source="t", destinations=(dest("c"),))]
    worker, port = await _worker(routes, [cluster("c", up.port, policy=policy)])
    try:
        assert (await http_get(port, "svc.local", "/warm"))[0] == 200
        slow = asyncio.ensure_future(http_get(port, "svc.local", "/slow"))   # holds the connection 1 s
        await asyncio.sleep(0.1)
        started = asyncio.get_running_loop().time()
        status, headers, _ = await http_get(port, "svc.local", "/queued")
        assert status == 504 and 0.25 < asyncio.get_running_loop().time() - started < 0.8
        pool = worker.pools.stats()[f"127.0.0.1:{up.port}"]
        assert pool["waiting"] == 0 and worker.clusters.get("c").stats()["pending_requests"] == 0
        assert (await slow)[0] == 200
        assert (await http_get(port, "svc.local", "/after"))[0] == 200
        assert up.connections == 1 and [r.target for r in up.requests] == ["/warm", "/slow", "/after"]
    finally:
        await worker.drain(1)
        await up.close()


async def test_http2_max_requests_caps_requests_in_flight_on_the_cluster():
    up = await Upstream(_slow_paths(0.3)).start()
    policy = TrafficPolicy(connection_pool=ConnectionPoolPolicy(max_requests=2))
    worker, port = await _worker([HttpRoute(name="r", source="t", destinations=(dest("c"),))],
                                 [cluster("c", up.port, policy=policy)])
    try:
        results = await asyncio.gather(*(http_get(port, "svc.local", f"/slow{i}") for i in range(3)))
        assert sorted(r[0] for r in results) == [200, 200, 503]
        assert worker.clusters.get("c").stats()["overflow"]["requests"] == 1
        assert (await http_get(port, "svc.local", "/again"))[0] == 200
    finally:
        await worker.drain(1)
        await up.close()


async def test_outlier_detection_ejects_a_failing_endpoint():
    bad = await Upstream(respond(500, b"bad")).start()
    good = await Upstream(respond(200, b"good")).start()
    policy = TrafficPolicy(load_balancer=LoadBalancerPolicy(simple="ROUND_ROBIN"),
                           outlier=OutlierPolicy(consecutive_5xx=2, interval=0.05, base_ejection_time=30,
                                                 max_ejection_percent=100))
    worker, port = await _worker([HttpRoute(name="r", source="t", destinations=(dest("c"),))],
                                 [cluster("c", bad.port, good.port, policy=policy)])
    try:
        for _ in range(10):
            await http_get(port, "svc.local")
            await asyncio.sleep(0.02)
        tail = [(await http_get(port, "svc.local"))[2] for _ in range(6)]
        assert tail == [b"good"] * 6
    finally:
        await worker.drain(1)
        await bad.close()
        await good.close()


async def test_mirror_sends_a_copy_with_shadow_host_and_never_changes_the_response(upstream):
    shadow = await Upstream(respond(500, b"shadow")).start()
    route = HttpRoute(name="r", source="t", destinations=(dest("c"),),
                      mirrors=(MirrorPolicy(host="m", subset=None, port=None, cluster="m", percentage=100.0),))
    worker, port = await _worker([route], [cluster("c", upstream.port), cluster("m", shadow.port)])
    try:
        status, _, body = await http_get(port, "svc.local", "/m")
        assert status == 200
        for _ in range(50):
            if shadow.requests:
                break
            await asyncio.sleep(0.02)
        assert shadow.requests[0].header("host") == "svc.local-shadow"
        assert shadow.requests[0].target == "/m"
    finally:
        await worker.drain(1)
        await shadow.close()


async def test_mirror_percentage_is_followed():
    main = await Upstream(respond(200, b"x")).start()
    shadow = await Upstream(respond(200, b"s")).start()
    route = HttpRoute(name="r", source="t", destinations=(dest("c"),),
                      mirrors=(MirrorPolicy(host="m", subset=None, port=None, cluster="m", percentage=30.0),))
    worker, port = await _worker([route], [cluster("c", main.port), cluster("m", shadow.port)])
    try:
        n = 300
        for _ in range(n):
            await http_get(port, "svc.local")
        await asyncio.sleep(0.3)
        # binomial(300, 0.3): mean 90, sd ~7.9; 3 sd
        assert 66 <= len(shadow.requests) <= 114
    finally:
        await worker.drain(1)
        await main.close()
        await shadow.close()


async def test_reused_keepalive_connection_closed_by_the_upstream_is_retried_on_a_new_one():
    """The classic intermittent 503 UC: the upstream closes an idle keep-alive connection
    just as the proxy reuses it.  An idempotent request is sent again on a new connection."""
    state = {"n": 0}

    async def close_after_first(req, writer):
        state["n"] += 1
        if state["n"] == 2:
            writer.transport.abort()       # the second request lands on a connection that dies
            return False
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        return True

    up = await Upstream(close_after_first).start()
    worker, port = await _worker([HttpRoute(name="r", source="t", destinations=(dest("c"),))],
                                 [cluster("c", up.port)])
    try:
        assert (await http_get(port, "svc.local"))[0] == 200
        assert (await http_get(port, "svc.local"))[0] == 200
        assert up.connections == 2
    finally:
        await worker.drain(1)
        await up.close()


async def _one_response_status(reader) -> int:
    """Read one Content-Length-framed response off a keep-alive connection; its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)
    return int(head.split(b" ")[1])


async def test_connections_beyond_the_listener_limit_are_reset_and_counted(upstream):
    """``--max-connections`` per listener: the connection over the limit is reset on accept
    (nothing parsed, nothing sent upstream); admitted ones keep working; a slot freed by a
    close is reused.  Counted as meshproxy_downstream_cx_overflow_total{listener}."""
    from meshproxy.config.model import ProxySettings
    from meshproxy.telemetry.exposition import render_prometheus

    worker, port = await _worker([HttpRoute(name="r", source="t", destinations=(dest("c"),))],
                                 [cluster("c", upstream.port)],
                                 settings=ProxySettings(max_connections_per_listener=2))
    request = b"GET /k HTTP/1.1\r\nHost: svc.local\r\n\r\n"
    try:
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for reader, writer in clients:
            writer.write(request)
            assert await _one_response_status(reader) == 200
        # over the limit: reset before a byte is read
        data, closed = await raw_exchange(port, request, timeout=2.0)
        assert data == b"" and closed
        assert len(upstream.requests) == 2
        listener = next(iter(worker.http_listeners.values()))
        assert listener.rejected_connections == 1 and listener.active == 2
        text = render_prometheus(worker.telemetry.metrics.dump()).decode()
        assert f'meshproxy_downstream_cx_overflow_total{{listener="{listener.name}"}} 1\n' in text
        # the admitted connections still work, and a closed one frees its slot
        reader, writer = clients[0]
        writer.write(request)
        assert await _one_response_status(reader) == 200
        writer.close()
        for _ in range(100):
            if listener.active < 2:
                break
            await asyncio.sleep(0.01)
        assert (await http_get(port, "svc.local"))[0] == 200
        assert listener.rejected_connections == 1
        clients[1][1].close()
    finally:
        await worker.drain(1)


async def test_an_unasked_response_in_the_same_read_closes_the_upstream_connection(codec, caplog):
    """An upstream that answers one request with two responses in one write: the client gets
    the first; the connection is never reused (the second response is nobody's), and no
    callback fails on the way."""
    async def twice(req, writer):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\none"
                     b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\ntwo")
        return True
    up = await Upstream(twice).start()
    worker, port = await _worker([HttpRoute(name="r", source="t", destinations=(dest("c"),))],
                                 [cluster("c", up.port)], codec)
    try:
        with caplog.at_level("ERROR"):
            for _ in range(3):
                status, _, body = await http_get(port, "svc.local")
                assert (status, body) == (200, b"one")
                await asyncio.sleep(0.05)
        assert up.connections == 3
        assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    finally:
        await worker.drain(1)
        await up.close()


async def test_a_keepalive_connection_routes_each_request_by_its_own_host_and_the_current_config():
    """The downstream connection remembers the virtual host of its last request (keep-alive
    clients repeat the Host): a different Host on the same connection, and a new snapshot for
    the same Host, are routed afresh."""
    from dataclasses import replace as _replace
    from types import MappingProxyType
    from meshproxy.config.model import RouteTable, VirtualHost

    a = await Upstream(respond(body=b"from-a")).start()
    b = await Upstream(respond(body=b"from-b")).start()

    def snap(a_goes_to: str, version: str):
        first = snapshot([], [cluster("a", a.port), cluster("b", b.port)], version=version)
        vhosts = {name: VirtualHost(name=f"default/{name}", domains=(f"{name}.local",),
                                    routes=(HttpRoute(name=name, source="t", destinations=(dest(target),)),))
                  for name, target in (("a", a_goes_to), ("b", "b"))}
        table = RouteTable(name="http", exact=MappingProxyType({f"{n}.local": v for n, v in vhosts.items()}))
        return _replace(first, route_tables=MappingProxyType({"http": table}))

    worker, port = await start_worker(asyncio.get_running_loop(), snap("a", "v1"))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def ask(host: bytes) -> bytes:
        writer.write(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        return body if head.startswith(b"HTTP/1.1 200 ") else head.split(b" ")[1]

    try:
        assert await ask(b"a.local") == b"from-a"
        assert await ask(b"b.local") == b"from-b"
        assert await ask(b"a.local") == b"from-a"
        worker.store.swap(snap("b", "v2"))
        assert await ask(b"a.local") == b"from-b"
        assert await ask(b"A.LOCAL") == b"from-b"
        assert await ask(b"c.local") == b"404"         # no virtual host
        assert await ask(b"b.local") == b"from-b"
        assert (len(a.requests), len(b.requests)) == (2, 4)
    finally:
        writer.close()
        await worker.drain(1)
        await a.close()
        await b.close()


async def test_requests_reuse_the_endpoint_connection_across_a_config_swap_that_keeps_it(upstream, codec):
    """The Host remembers its endpoint's pool after the first lookup.  Requests before and
    after a swap that keeps the endpoint (the Host carries over, the pool with it) go out on
    the one upstream connection; a Host made anew for an endpoint that comes back finds the
    same pool."""
    route = HttpRoute(name="r", source="t", destinations=(dest("c"),))
    snap = snapshot([route], [cluster("c", upstream.port)])
    worker, port = await start_worker(asyncio.get_running_loop(), snap, codec)
    try:
        for _ in range(3):
            assert (await http_get(port, "svc.local"))[0] == 200
        host = worker.clusters.get("c").hosts[0]
        assert host.pool is worker.pools.pool(host.key)
        worker.store.swap(replace(snap, version="v2"))
        assert (await http_get(port, "svc.local"))[0] == 200
        assert worker.clusters.get("c").hosts[0] is host
        assert upstream.connections == 1 and len(upstream.requests) == 4
        other = await Upstream().start()
        try:
            worker.store.swap(snapshot([route], [cluster("c", other.port)], version="v3"))
            assert (await http_get(port, "svc.local"))[0] == 200
            worker.store.swap(snapshot([route], [cluster("c", upstream.port)], version="v4"))
            fresh = worker.clusters.get("c").hosts[0]
            assert fresh is not host and fresh.pool is None
            assert (await http_get(port, "svc.local"))[0] == 200
            assert fresh.pool is host.pool and len(upstream.requests) == 5
        finally:
            await other.close()
    finally:
        await worker.drain(1)
