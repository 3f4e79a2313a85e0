"""TLS session resumption between two real sidecars (workers with real certificate managers,
real sockets): a new connection to the same endpoint resumes the last one's session, the
caller's identity still reaches AuthorizationPolicy and the server's identity is still
checked on a resumed session; a renewed certificate on either side means full handshakes."""
from __future__ import annotations

import asyncio
import dataclasses
import textwrap
from types import MappingProxyType

import pytest

from controlplane.security.ca import CaState, CertificateAuthority, generate_root
from helpers import Upstream, free_port, respond
from mtls import compile_sidecar, get_status, start_worker
from meshproxy.bootstrap import Worker
from meshproxy.config.model import (
    Cluster, Endpoint, HttpRoute, Listener, ProxySettings, RouteTable, Snapshot, VirtualHost, WeightedDestination,
)
from meshproxy.security import CertificateManager, SpiffeId
from meshproxy.security.authz import ALLOW, AppliedPolicy, Condition, PolicySet, Rule, SOURCE_PRINCIPAL, value_match
from meshproxy.telemetry.exposition import render_prometheus
from meshproxy.telemetry.metrics import merge_dumps
from meshproxy.upstream.tls import UpstreamTlsError

pytestmark = pytest.mark.asyncio

ONLY_SLEEP = PolicySet(allow=(AppliedPolicy("foo/only-sleep", ALLOW, (
    Rule(sources=((Condition(SOURCE_PRINCIPAL, (value_match("cluster.local/ns/foo/sa/sleep"),)),),)),)),))


async def _server(app_port: int, inbound_port: int, certificates) -> Worker:
    app = Cluster("inbound|9080||", "", 9080, None, (Endpoint("127.0.0.1", app_port),))
    vh = VirtualHost("inbound", ("*",), (HttpRoute("", "test", destinations=(
        WeightedDestination("", None, 9080, 100, app.name),)),))
    snap = Snapshot("s1", listeners=(Listener("inbound_9080", "127.0.0.1", inbound_port, "HTTP",
                                              route_table="in", mtls="STRICT", authz=ONLY_SLEEP),),
                    route_tables=MappingProxyType({"in": RouteTable("in", default=vh)}),
                    clusters=MappingProxyType({app.name: app}), settings=ProxySettings())
    return await start_worker(snap, certificates, seed=1)


async def _client(listen: int, endpoint_port: int, certificates) -> Worker:
    # one request per upstream connection: every request opens a new mTLS connection
    text = textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: httpbin, namespace: foo}}
        spec:
          hosts: [httpbin.foo.svc.cluster.local]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: 8000, name: http, protocol: HTTP}}]
          endpoints:
          - {{address: 127.0.0.1, ports: {{http: {endpoint_port}}}, labels: {{security.istio.io/tlsMode: istio}},
              serviceAccount: httpbin}}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: httpbin, namespace: foo}}
        spec:
          host: httpbin.foo.svc.cluster.local
          trafficPolicy: {{connectionPool: {{http: {{maxRequestsPerConnection: 1}}}}}}
        """)
    return await start_worker(compile_sidecar(text, listen), certificates, seed=2)



async def test_sidecars_resume_sessions_and_still_check_both_identities():
    root = generate_root("cluster.local")
    ca = CertificateAuthority(CaState((root,), root.fingerprint), default_ttl=3600)
    server_certs = CertificateManager(SpiffeId("cluster.local", "foo", "httpbin"), ca.issuer())
    client_certs = CertificateManager(SpiffeId("cluster.local", "foo", "sleep"), ca.issuer())
    await server_certs.start()
    await client_certs.start()
    app = await Upstream(respond(200, b"from httpbin")).start()
    inbound, listen = free_port(), free_port()
    server = await _server(app.port, inbound, server_certs)
    client = await _client(listen, inbound, client_certs)
    tls = client.runtime.pools.tls
    try:
        for _ in range(3):
            answer = await get_status(listen)
            # ONLY_SLEEP allows the caller: its principal was read from the (resumed) session
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"from httpbin"), answer
        assert tls.handshakes == {"full": 1, "resumed": 2}
        text = render_prometheus(merge_dumps([client.telemetry.metrics.dump()])).decode()
        assert 'meshproxy_upstream_tls_handshakes_total{session="resumed"} 2' in text

        # a session for this endpoint is on offer; a server that must be someone else is refused
        # on the resumed handshake too (the identity is checked from the session's certificate)
        key = next(k for k in client.runtime.pools._pools if len(k) > 2 and k[2] is not None)
        wrong = dataclasses.replace(key[2], subject_alt_names=("spiffe://cluster.local/ns/foo/sa/reviews",))
        endpoint = ("127.0.0.1", inbound, tls.server_hostname(wrong, key[0]))
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", inbound,
                                                    ssl=tls.context(wrong, endpoint), server_hostname=endpoint[2])
        try:
            assert transport.get_extra_info("ssl_object").session_reused
            with pytest.raises(UpstreamTlsError, match="match none of subjectAltNames"):
                tls.check_peer(wrong, transport.get_extra_info("ssl_object"), endpoint)
        finally:
            transport.abort()

        # the server renews: its tickets are no longer honoured, a full handshake follows
        await server_certs._renew()
        assert (await get_status(listen)).startswith(b"HTTP/1.1 200")
        assert tls.handshakes == {"full": 2, "resumed": 2}
        assert (await get_status(listen)).startswith(b"HTTP/1.1 200")
        assert tls.handshakes == {"full": 2, "resumed": 3}
        # the client renews: sessions of its old certificate are not offered
        await client_certs._renew()
        assert (await get_status(listen)).startswith(b"HTTP/1.1 200")
        assert tls.handshakes == {"full": 3, "resumed": 3}
        assert len(app.requests) == 6
    finally:
        for w in (client, server):
            await w.drain(0.1)
        await app.close()
