"""Retry and HTTP connection-pool fields over real sockets, through a real proxy process:
``retryIgnorePreviousHosts`` and the TCP settings of a DestinationRule's connection pool
applied to the upstream connections of HTTP clusters."""
from __future__ import annotations

import textwrap
from collections import Counter

import pytest

from helpers import Upstream, http_get, respond, service_entry_yaml

pytestmark = pytest.mark.asyncio


async def test_retry_ignore_previous_hosts_false_may_retry_the_failed_endpoint(proxy_factory):
    # consistent hashing on a header sends every try of one request to the same endpoint
    # unless the retry avoids the hosts it tried: false keeps retrying the failing one
    failing = await Upstream(respond(503, b"down")).start()
    fine = await Upstream(respond(200, b"fine")).start()
    config = service_entry_yaml("rh.local", 80, [("127.0.0.1", failing.port, {}), ("127.0.0.1", fine.port, {})])
    config += textwrap.dedent("""\
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: rh, namespace: default}
        spec:
          host: rh.local
          trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: rh, namespace: default}
        spec:
          hosts: [rh.local]
          http:
          - match: [{uri: {prefix: /same}}]
            route: [{destination: {host: rh.local}}]
            retries: {attempts: 2, retryOn: 5xx, retryIgnorePreviousHosts: false}
          - route: [{destination: {host: rh.local}}]
            retries: {attempts: 2, retryOn: 5xx}
        """)
    proxy = proxy_factory(config)
    users = [f"u{i}" for i in range(20)]
    seen = {}
    for path in ("/same", "/other"):
        failing.requests.clear()
        fine.requests.clear()
        statuses = {u: (await http_get(proxy.port, "rh.local", path, headers={"x-user": u}))[0] for u in users}
        seen[path] = (statuses, Counter(r.header("x-user") for r in failing.requests),
                      Counter(r.header("x-user") for r in fine.requests))
    statuses, bad, good = seen["/same"]
    hashed_to_failing = set(bad)
    assert hashed_to_failing and hashed_to_failing != set(users), (bad, good)
    for u in users:
        if u in hashed_to_failing:      # the first try and both retries on the failing endpoint
            assert (statuses[u], bad[u], good[u]) == (503, 3, 0), u
        else:
            assert (statuses[u], bad[u], good[u]) == (200, 0, 1), u
    statuses, bad, good = seen["/other"]        # Istio's default (true): the retry goes elsewhere
    assert set(bad) == hashed_to_failing
    for u in users:
        assert statuses[u] == 200 and good[u] == 1 and bad[u] == (1 if u in hashed_to_failing else 0), u
    await failing.close()
    await fine.close()


async def test_tcp_keepalive_is_set_on_http_upstream_connections(proxy_factory):
    import subprocess
    kept = await Upstream(respond(200, b"kept")).start()
    plain = await Upstream(respond(200, b"plain")).start()
    config = service_entry_yaml("ka.local", 80, [("127.0.0.1", kept.port, {})], name="ka")
    config += "---\n" + service_entry_yaml("plain.local", 80, [("127.0.0.1", plain.port, {})], name="plain")
    config += textwrap.dedent("""\
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: ka, namespace: default}
        spec:
          host: ka.local
          trafficPolicy: {connectionPool: {tcp: {tcpKeepalive: {probes: 4, time: 37s, interval: 5s}}}}
        """)
    proxy = proxy_factory(config)
    for host in ("ka.local", "plain.local"):
        assert (await http_get(proxy.port, host))[0] == 200
    # the upstream connections stay pooled: the kernel shows their keepalive timer (37 s idle time)
    def timers(port: int) -> str:
        return subprocess.run(["ss", "-tnoH", "state", "established", f"( dport = :{port} )"],
                              capture_output=True, text=True, timeout=5).stdout
    assert "timer:(keepalive,3" in timers(kept.port), timers(kept.port)
    assert timers(plain.port).strip() and "keepalive" not in timers(plain.port), timers(plain.port)
    await kept.close()
    await plain.close()


async def test_max_connection_duration_retires_http_upstream_connections(proxy_factory):
    import asyncio

    async def answer(req, writer):          # /slow answers after 0.8 s, past the connection's duration
        if req.target == "/slow":
            await asyncio.sleep(0.8)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        return True

    aged = await Upstream(answer).start()
    plain = await Upstream(answer).start()
    config = service_entry_yaml("aged.local", 80, [("127.0.0.1", aged.port, {})], name="aged")
    config += "---\n" + service_entry_yaml("plain.local", 80, [("127.0.0.1", plain.port, {})], name="plain")
    config += textwrap.dedent("""\
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: aged, namespace: default}
        spec:
          host: aged.local
          trafficPolicy: {connectionPool: {tcp: {maxConnectionDuration: 0.5s}}}
        """)
    proxy = proxy_factory(config)
    for host, upstream, connections in (("aged.local", aged, 2), ("plain.local", plain, 1)):
        assert (await http_get(proxy.port, host, "/a"))[0] == 200
        assert (await http_get(proxy.port, host, "/b"))[0] == 200     # reused within the duration
        assert upstream.connections == 1
        # a request in flight when the duration passes is answered; the connection is not reused
        assert (await http_get(proxy.port, host, "/slow"))[0] == 200
        assert (await http_get(proxy.port, host, "/c"))[0] == 200
        assert upstream.connections == connections, host
        assert [r.target for r in upstream.requests] == ["/a", "/b", "/slow", "/c"]
    await aged.close()
    await plain.close()
