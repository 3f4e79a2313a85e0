"""Auto mTLS between two real workers (a client sidecar and a server sidecar) over real
sockets: the client originates ISTIO_MUTUAL to endpoints that have a sidecar and checks
the server's SPIFFE id against the service's identities; the server's STRICT inbound
terminates it and authorizes the caller by principal; endpoints without a sidecar, and a
client without a certificate, get plaintext."""
from __future__ import annotations

import textwrap
from types import MappingProxyType

import pytest

from helpers import Upstream, free_port, respond
from mtls import compile_sidecar, get_status, start_worker
from meshproxy.bootstrap import Worker
from meshproxy.config.model import (
    Cluster, Endpoint, HttpRoute, Listener, ProxySettings, RouteTable, Snapshot, VirtualHost, WeightedDestination,
)
from meshproxy.telemetry.exposition import render_prometheus
from meshproxy.telemetry.metrics import merge_dumps
from meshproxy.security.authz import ALLOW, AppliedPolicy, Condition, PolicySet, Rule, SOURCE_PRINCIPAL, value_match
from mtls import MeshCA, StaticCertificates

pytestmark = pytest.mark.asyncio

ONLY_SLEEP = PolicySet(allow=(AppliedPolicy("foo/only-sleep", ALLOW, (
    Rule(sources=((Condition(SOURCE_PRINCIPAL, (value_match("cluster.local/ns/foo/sa/sleep"),)),),)),)),))


async def _server(app_port: int, inbound_port: int, certificates, mode: str = "STRICT", authz=ONLY_SLEEP) -> Worker:
    app = Cluster("inbound|9080||", "", 9080, None, (Endpoint("127.0.0.1", app_port),))
    vh = VirtualHost("inbound", ("*",), (HttpRoute("", "test", destinations=(
        WeightedDestination("", None, 9080, 100, app.name),)),))
    snap = Snapshot("s1", listeners=(Listener("inbound_9080", "127.0.0.1", inbound_port, "HTTP",
                                              route_table="in", mtls=mode, authz=authz),),
                    route_tables=MappingProxyType({"in": RouteTable("in", default=vh)}),
                    clusters=MappingProxyType({app.name: app}), settings=ProxySettings())
    return await start_worker(snap, certificates, seed=1)


async def _client(listen: int, endpoint_port: int, certificates, sidecar: bool = True,
                  service_account: str = "httpbin", extra: str = "") -> Worker:
    labels = "{security.istio.io/tlsMode: istio, app: httpbin}" if sidecar else "{}"
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
          - {{address: 127.0.0.1, ports: {{http: {endpoint_port}}}, labels: {labels},
              serviceAccount: {service_account}}}
        """)
    return await start_worker(compile_sidecar(text + extra, listen), certificates, seed=2)



async def test_auto_mtls_between_sidecars_carries_the_callers_identity(tmp_path):
    ca = MeshCA()
    app = await Upstream(respond(200, b"from httpbin")).start()
    server_certs = StaticCertificates(ca.issue("spiffe://cluster.local/ns/foo/sa/httpbin"), tmp_path)
    inbound = free_port()
    server = await _server(app.port, inbound, server_certs)
    workers = [server]
    try:
        sleep_port = free_port()
        workers.append(await _client(sleep_port, inbound,
                                     StaticCertificates(ca.issue("spiffe://cluster.local/ns/foo/sa/sleep"), tmp_path)))
        answer = await get_status(sleep_port)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"from httpbin"), answer
        # another identity gets through mTLS but not past the AuthorizationPolicy
        other_port = free_port()
        workers.append(await _client(other_port, inbound,
                                     StaticCertificates(ca.issue("spiffe://cluster.local/ns/foo/sa/other"), tmp_path)))
        denied = await get_status(other_port)
        assert denied.startswith(b"HTTP/1.1 403") and denied.endswith(b"RBAC: access denied")
        # the server is not who the service runs as: the client refuses it (503), sends nothing
        wrong_port = free_port()
        workers.append(await _client(wrong_port, inbound, StaticCertificates(
            ca.issue("spiffe://cluster.local/ns/foo/sa/sleep"), tmp_path), service_account="reviews"))
        assert (await get_status(wrong_port)).startswith(b"HTTP/1.1 503")
        # a client without a certificate sends plaintext, which STRICT refuses
        plain_port = free_port()
        workers.append(await _client(plain_port, inbound, None))
        assert (await get_status(plain_port)).startswith(b"HTTP/1.1 503")
        # an endpoint without a sidecar gets plaintext from a client that has a certificate
        direct_port = free_port()
        workers.append(await _client(direct_port, app.port, StaticCertificates(
            ca.issue("spiffe://cluster.local/ns/foo/sa/sleep"), tmp_path), sidecar=False))
        assert (await get_status(direct_port)).endswith(b"from httpbin")
        assert len(app.requests) == 2
        # Istio's labels at the server: the caller's principal over mutual_tls
        text = render_prometheus(merge_dumps([server.telemetry.metrics.dump()])).decode()
        served = [line for line in text.splitlines() if line.startswith("istio_requests_total{")]
        assert any('connection_security_policy="mutual_tls"' in line and
                   'source_principal="spiffe://cluster.local/ns/foo/sa/sleep"' in line and 'response_code="200"' in line
                   for line in served), served
        assert any('source_principal="spiffe://cluster.local/ns/foo/sa/other"' in line and 'response_code="403"' in line
                   for line in served), served
    finally:
        for w in workers:
            await w.drain(0.1)
        await app.close()


def _peer_authentication(namespace: str, mode: str, selector: str = "", ports: str = "") -> str:
    spec = f"mtls: {{mode: {mode}}}"
    if selector:
        spec += f", selector: {{matchLabels: {{{selector}}}}}"
    if ports:
        spec += f", portLevelMtls: {{{ports}}}"
    return textwrap.dedent(f"""\
        ---
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {{name: pa-{mode.lower()}, namespace: {namespace}}}
        spec: {{{spec}}}
        """)


@pytest.mark.parametrize("server_mode, policies, expected", [
    # the destination's namespace says DISABLE: the client sends plaintext (mTLS would not be terminated)
    ("DISABLE", _peer_authentication("foo", "DISABLE"), "none"),
    # a workload policy's port-level DISABLE, on the port the workload serves
    ("DISABLE", _peer_authentication("foo", "STRICT", "app: httpbin", "PORT: {mode: DISABLE}"), "none"),
    # mesh-wide DISABLE overridden by the workload's STRICT: mTLS
    ("STRICT", _peer_authentication("istio-system", "DISABLE")
     + _peer_authentication("foo", "STRICT", "app: httpbin"), "mutual_tls"),
    ("PERMISSIVE", _peer_authentication("foo", "PERMISSIVE"), "mutual_tls"),
])
async def test_auto_mtls_follows_the_destinations_peer_authentication(tmp_path, server_mode, policies, expected):
    ca = MeshCA()
    app = await Upstream(respond(200, b"from httpbin")).start()
    inbound = free_port()
    server = await _server(app.port, inbound, StaticCertificates(
        ca.issue("spiffe://cluster.local/ns/foo/sa/httpbin"), tmp_path), server_mode, authz=None)
    workers = [server]
    try:
        port = free_port()
        workers.append(await _client(port, inbound, StaticCertificates(
            ca.issue("spiffe://cluster.local/ns/foo/sa/sleep"), tmp_path), extra=policies.replace("PORT", str(inbound))))
        answer = await get_status(port)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"from httpbin"), answer
        text = render_prometheus(merge_dumps([server.telemetry.metrics.dump()])).decode()
        served = [line for line in text.splitlines() if line.startswith("istio_requests_total{")]
        assert len(served) == 1 and f'connection_security_policy="{expected}"' in served[0], served
    finally:
        for w in workers:
            await w.drain(0.1)
        await app.close()
