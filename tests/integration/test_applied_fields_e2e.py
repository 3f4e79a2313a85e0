"""Fields that used to be decoded and dropped, now applied, each shown over real sockets
through a real proxy process: TCP route matches on destination and source subnets, ..."""
from __future__ import annotations

import asyncio
import textwrap

import pytest

from helpers import free_port

pytestmark = pytest.mark.asyncio


async def _named_server(name: bytes):
    async def answer(reader, writer):
        writer.write(name)
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _who_answers(port: int, source: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def _service(name: str, port: int) -> str:
    return textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: {name}, namespace: default}}
        spec:
          hosts: [{name}.default.svc.cluster.local]
          resolution: STATIC
          ports: [{{number: 7000, name: tcp, protocol: TCP}}]
          endpoints: [{{address: 127.0.0.1, ports: {{tcp: {port}}}}}]
        ---
        """)


async def test_tcp_routes_match_destination_and_source_subnets_per_connection(proxy_factory):
    servers = {}
    for name in (b"from-two", b"not-here", b"to-loopback"):
        servers[name] = await _named_server(name)
    egress = free_port()
    config = "".join(_service(n.decode(), p) for n, (_, p) in servers.items()) + textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: Sidecar
        metadata: {{name: default, namespace: default}}
        spec:
          egress:
          - port: {{number: {egress}, protocol: TCP, name: tcp}}
            bind: 127.0.0.1
            hosts: ["./*"]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: split-by-address, namespace: default}}
        spec:
          hosts: [from-two.default.svc.cluster.local]
          tcp:
          - match: [{{sourceSubnet: 127.0.0.2/32}}]
            route: [{{destination: {{host: from-two, port: {{number: 7000}}}}}}]
          - match: [{{destinationSubnets: [10.0.0.0/8, "fd00::/8"]}}]
            route: [{{destination: {{host: not-here, port: {{number: 7000}}}}}}]
          - match: [{{destinationSubnets: [127.0.0.1/32]}}]
            route: [{{destination: {{host: to-loopback, port: {{number: 7000}}}}}}]
        """)
    proxy_factory(config)
    assert await _who_answers(egress, "127.0.0.2") == b"from-two"
    assert await _who_answers(egress, "127.0.0.1") == b"to-loopback"          # 10/8 does not take 127.0.0.1
    assert await _who_answers(egress, "127.0.0.3") == b"to-loopback"
    for server, _ in servers.values():
        server.close()


async def test_use_source_ip_false_does_not_stick_a_client_to_one_endpoint(proxy_factory):
    from helpers import Upstream, http_get, respond, service_entry_yaml
    a = await Upstream(respond(200, b"a")).start()
    b = await Upstream(respond(200, b"b")).start()
    se = service_entry_yaml("hash.local", 80, [("127.0.0.1", a.port, {}), ("127.0.0.1", b.port, {})])

    def rule(value: str) -> str:
        return se + textwrap.dedent(f"""\
            ---
            apiVersion: networking.istio.io/v1
            kind: DestinationRule
            metadata: {{name: hash, namespace: default}}
            spec:
              host: hash.local
              trafficPolicy: {{loadBalancer: {{consistentHash: {{useSourceIp: {value}}}}}}}
            """)

    for value, expect_both in (("true", False), ("false", True)):
        proxy = proxy_factory(rule(value))
        bodies = set()
        for _ in range(24):
            status, _, body = await http_get(proxy.port, "hash.local")
            assert status == 200
            bodies.add(body)
        assert (bodies == {b"a", b"b"}) is expect_both, (value, bodies)
        proxy.stop()
    await a.close()
    await b.close()


async def test_outbound_traffic_policy_on_an_egress_listener_passes_unknown_hosts_only_with_allow_any(proxy_factory):
    from helpers import Upstream, http_get, respond, service_entry_yaml
    known = await Upstream(respond(200, b"known")).start()
    outside = await Upstream(respond(200, b"outside")).start()
    se = service_entry_yaml("known.local", 80, [("127.0.0.1", known.port, {})])

    def sidecar(port: int, mode: str | None) -> str:
        policy = f"\n  outboundTrafficPolicy: {{mode: {mode}}}" if mode else ""
        return se + textwrap.dedent(f"""\
            ---
            apiVersion: networking.istio.io/v1
            kind: Sidecar
            metadata: {{name: default, namespace: default}}
            spec:
              egress:
              - port: {{number: {port}, protocol: HTTP, name: http}}
                bind: 127.0.0.1
                hosts: ["./*"]""") + policy + "\n"

    for mode, outside_status in ((None, 200), ("ALLOW_ANY", 200), ("REGISTRY_ONLY", 404)):
        egress = free_port()
        proxy = proxy_factory(sidecar(egress, mode))
        assert (await http_get(egress, "known.local"))[::2] == (200, b"known")
        status, _, body = await http_get(egress, f"127.0.0.1:{outside.port}")
        assert status == outside_status, (mode, status, body)
        if status == 200:
            assert body == b"outside"
        proxy.stop()
    assert len(outside.requests) == 2
    await known.close()
    await outside.close()


async def test_tcp_keepalive_idle_timeout_and_max_connection_duration_apply_to_tcp_connections(proxy_factory):
    import subprocess
    import time

    async def hold(reader, writer):                       # an upstream that echoes and never closes first
        while chunk := await reader.read(65536):
            writer.write(chunk)
        writer.close()

    idle_srv = await asyncio.start_server(hold, "127.0.0.1", 0)
    aged_srv = await asyncio.start_server(hold, "127.0.0.1", 0)
    idle_up, aged_up = (s.sockets[0].getsockname()[1] for s in (idle_srv, aged_srv))
    idle_port, aged_port = free_port(), free_port()
    config = _service("idle", idle_up) + _service("aged", aged_up) + textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: idle, namespace: default}}
        spec:
          host: idle
          trafficPolicy: {{connectionPool: {{tcp: {{idleTimeout: 0.4s}}}}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: aged, namespace: default}}
        spec:
          host: aged
          trafficPolicy:
            connectionPool:
              tcp:
                maxConnectionDuration: 1.2s
                tcpKeepalive: {{probes: 4, time: 37s, interval: 5s}}
        ---
        apiVersion: networking.istio.io/v1
        kind: Sidecar
        metadata: {{name: default, namespace: default}}
        spec:
          egress:
          - port: {{number: {idle_port}, protocol: TCP, name: tcp-idle}}
            bind: 127.0.0.1
            hosts: ["./idle.default.svc.cluster.local"]
          - port: {{number: {aged_port}, protocol: TCP, name: tcp-aged}}
            bind: 127.0.0.1
            hosts: ["./aged.default.svc.cluster.local"]
        """)
    proxy_factory(config)

    # idleTimeout: a silent connection is closed after 0.4 s (the listener default is an hour)
    reader, writer = await asyncio.open_connection("127.0.0.1", idle_port)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    start = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 20) == b""
    assert 0.3 < time.monotonic() - start < 10            # 0.4 s, not the hour
    writer.close()

    # maxConnectionDuration: a busy connection is still closed at 1.2 s; keepalive is on the upstream socket
    reader, writer = await asyncio.open_connection("127.0.0.1", aged_port)
    start = time.monotonic()
    writer.write(b"x")
    await asyncio.wait_for(reader.readexactly(1), 5)
    ss = subprocess.run(["ss", "-tnoH", "state", "established", f"( dport = :{aged_up} )"],
                        capture_output=True, text=True, timeout=5).stdout
    assert "timer:(keepalive,3" in ss, ss                 # 37 s idle time, counting down
    closed_at = None
    while time.monotonic() - start < 15:
        writer.write(b"x")
        try:
            got = await asyncio.wait_for(reader.read(1), 0.2)
        except asyncio.TimeoutError:
            continue
        if got == b"":
            closed_at = time.monotonic() - start
            break
        await asyncio.sleep(0.1)
    assert closed_at is not None and 1.0 < closed_at < 10, closed_at
    writer.close()
    idle_srv.close()
    aged_srv.close()


def _endpoints(proxy, cluster: str) -> dict[int, dict]:
    import json
    clusters = json.loads(proxy.admin("/clusters")[1])["clusters"]
    return {e["port"]: e for e in clusters[cluster]["endpoints"]}


def _outlier_rule(host: str, outlier: str) -> str:
    return textwrap.dedent(f"""\
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: od, namespace: default}}
        spec:
          host: {host}
          trafficPolicy:
            loadBalancer: {{simple: ROUND_ROBIN}}
            outlierDetection: {{{outlier}, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}}
        """)


async def test_outlier_http_error_codes_count_listed_statuses_as_errors(proxy_factory):
    from helpers import Upstream, http_get, respond, service_entry_yaml
    limited = await Upstream(respond(429, b"slow down")).start()
    fine = await Upstream(respond(200, b"fine")).start()
    se = service_entry_yaml("od.local", 80, [("127.0.0.1", limited.port, {}), ("127.0.0.1", fine.port, {})])
    for codes, ejected in (("[429]", True), ("[]", False)):
        proxy = proxy_factory(se + _outlier_rule("od.local", f"consecutive5xxErrors: 2, "
                                                             f"outlierDetectionHttpErrorCodes: {codes}"))
        statuses = [(await http_get(proxy.port, "od.local"))[0] for _ in range(12)]
        health = _endpoints(proxy, "outbound|80||od.local")[limited.port]
        if ejected:       # two 429s eject it: from then on every request reaches the healthy endpoint
            assert statuses.count(429) == 2 and statuses[-6:] == [200] * 6, statuses
            assert health["health"] == "ejected" and health["ejection_reason"] == "consecutive_5xx"
        else:
            assert statuses.count(429) == 6 and health["health"] == "healthy", statuses
        proxy.stop()
    await limited.close()
    await fine.close()


async def test_outlier_local_origin_failures_eject_on_their_own_threshold_when_split(proxy_factory):
    from helpers import Upstream, http_get, respond, service_entry_yaml
    fine = await Upstream(respond(200, b"fine")).start()
    dead = free_port()                                       # nothing listens: every connect is refused
    se = service_entry_yaml("lo.local", 80, [("127.0.0.1", dead, {}), ("127.0.0.1", fine.port, {})])
    for outlier, ejected in (("consecutive5xxErrors: 0, splitExternalLocalOriginErrors: true, "
                              "consecutiveLocalOriginFailures: 2", True),
                             ("consecutive5xxErrors: 0", False)):     # unsplit: they count as 5xx, which is off
        proxy = proxy_factory(se + _outlier_rule("lo.local", outlier))
        for _ in range(8):
            assert (await http_get(proxy.port, "lo.local"))[0] == 200      # refused connects are retried
        health = _endpoints(proxy, "outbound|80||lo.local")[dead]
        assert (health["health"] == "ejected") is ejected, health
        if ejected:
            assert health["ejection_reason"] == "consecutive_local_origin_failures"
        proxy.stop()
    await fine.close()
