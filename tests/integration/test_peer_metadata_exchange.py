"""Istio's peer metadata exchange between two real sidecars over real sockets: the client
sidecar's workload reaches the server sidecar's reporter="destination" series and the server's
workload the client's reporter="source" series, over mutual TLS; neither application ever sees
the x-envoy-peer-metadata headers; a plaintext caller that forges them, a mesh caller that
sends garbage or lies about its namespace, is not labelled as a workload (and is counted); the
headers never go to an upstream that is not a sidecar over mesh mTLS."""
from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import textwrap
from types import MappingProxyType

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import Upstream, free_port, respond
from meshproxy.config.model import (
    Cluster, Endpoint, HttpRoute, Listener, ProxySettings, RouteTable, Snapshot, VirtualHost, WeightedDestination,
)
from meshproxy.telemetry.exposition import render_prometheus
from meshproxy.telemetry.metrics import merge_dumps
from meshproxy.telemetry.peer_metadata import decode_header, encode_header, own_metadata
from mtls import MeshCA, StaticCertificates, client_context, compile_sidecar, start_worker, workload_telemetry

pytestmark = pytest.mark.asyncio

SLEEP = "spiffe://cluster.local/ns/foo/sa/sleep"
HTTPBIN = "spiffe://cluster.local/ns/foo/sa/httpbin"
# what an application must never see (and what the app below tries to answer with itself)
FORGED = encode_header(own_metadata({"app": "admin", "version": "v9"}, "foo")).decode()


async def _server(app_port: int, inbound_port: int, certificates, mode: str = "PERMISSIVE"):
    app = Cluster("inbound|9080||", "", 9080, None, (Endpoint("127.0.0.1", app_port),))
    vh = VirtualHost("inbound", ("*",), (HttpRoute("", "test", destinations=(
        WeightedDestination("", None, 9080, 100, app.name),)),))
    snap = Snapshot("s1", listeners=(Listener("inbound_9080", "127.0.0.1", inbound_port, "HTTP",
                                              route_table="in", mtls=mode),),
                    route_tables=MappingProxyType({"in": RouteTable("in", default=vh)}),
                    clusters=MappingProxyType({app.name: app}), settings=ProxySettings())
    return await start_worker(snap, certificates, seed=1, telemetry=workload_telemetry(
        {"app": "httpbin", "version": "v2"}, "foo", "httpbin-pod", "httpbin"))


def _client_config(inbound: int, external: int, no_sidecar: int) -> str:
    """httpbin.foo: the server sidecar; plain.foo: a mesh service whose endpoint has no sidecar;
    ext.example.com: outside the mesh."""
    return textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: httpbin, namespace: foo}}
        spec:
          hosts: [httpbin.foo.svc.cluster.local]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: 8000, name: http, protocol: HTTP}}]
          endpoints:
          - {{address: 127.0.0.1, ports: {{http: {inbound}}}, labels: {{security.istio.io/tlsMode: istio, app: httpbin}},
              serviceAccount: httpbin}}
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: plain, namespace: foo}}
        spec:
          hosts: [plain.foo.svc.cluster.local]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: 8000, name: http, protocol: HTTP}}]
          endpoints: [{{address: 127.0.0.1, ports: {{http: {no_sidecar}}}}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: ext, namespace: foo}}
        spec:
          hosts: [ext.example.com]
          location: MESH_EXTERNAL
          resolution: STATIC
          ports: [{{number: 80, name: http, protocol: HTTP}}]
          endpoints: [{{address: 127.0.0.1, ports: {{http: {external}}}}}]
        """)


async def _client(listen: int, inbound: int, external: int, no_sidecar: int, certificates,
                  metadata_namespace: str | None = None):
    return await start_worker(compile_sidecar(_client_config(inbound, external, no_sidecar), listen), certificates,
                              seed=2, telemetry=workload_telemetry({"app": "sleep", "version": "v1"}, "foo",
                                                                   "sleep-pod", "sleep", metadata_namespace))


async def _exchange(port: int, request: bytes, tls: ssl.SSLContext | None = None) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls,
                                                   server_hostname="" if tls is not None else None)
    writer.write(request)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


def _get(host: str, extra: str = "") -> bytes:
    return f"GET /status HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode()


def _samples(worker, name: str = "istio_requests_total") -> list[dict]:
    text = render_prometheus(merge_dumps([worker.telemetry.metrics.dump()])).decode()
    return [dict(s.labels, value=s.value) for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == name]


def _has_metadata(blob: bytes) -> bool:
    return b"x-envoy-peer-metadata" in blob.lower()


def _rejected(worker, direction: str, reason: str) -> float:
    return sum(s["value"] for s in _samples(worker, "meshproxy_peer_metadata_rejected_total")
               if s["direction"] == direction and s["reason"] == reason)


async def test_sidecars_exchange_workload_labels_and_applications_never_see_the_headers(tmp_path):
    ca = MeshCA()
    # the application answers with its own x-envoy-peer-metadata: its sidecar must not pass it on
    app = await Upstream(respond(200, b"from httpbin", headers={"x-envoy-peer-metadata": FORGED})).start()
    external = await Upstream(respond(200, b"from outside")).start()
    no_sidecar = await Upstream(respond(200, b"no sidecar")).start()
    inbound = free_port()
    server = await _server(app.port, inbound, StaticCertificates(ca.issue(HTTPBIN), tmp_path))
    workers = [server]
    try:
        port = free_port()
        workers.append(await _client(port, inbound, external.port, no_sidecar.port,
                                     StaticCertificates(ca.issue(SLEEP), tmp_path)))
        # the application's own copies of the headers do not reach the other side either
        answer = await _exchange(port, _get("httpbin.foo", f"x-envoy-peer-metadata: {FORGED}\r\n"
                                                          "x-envoy-peer-metadata-id: forged\r\n"))
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"from httpbin"), answer
        assert not _has_metadata(answer), answer
        assert len(app.requests) == 1 and not _has_metadata(app.requests[0].raw), app.requests[0].raw
        # the server's series name the caller's workload, the client's the destination's
        served = [s for s in _samples(server) if s["reporter"] == "destination"]
        assert len(served) == 1, served
        assert {k: served[0][k] for k in (
            "source_workload", "source_workload_namespace", "source_app", "source_version",
            "source_canonical_service", "source_canonical_revision", "source_cluster", "source_principal",
            "destination_workload", "destination_principal", "connection_security_policy")} == {
            "source_workload": "sleep-v1", "source_workload_namespace": "foo", "source_app": "sleep",
            "source_version": "v1", "source_canonical_service": "sleep", "source_canonical_revision": "v1",
            "source_cluster": "Kubernetes", "source_principal": SLEEP, "destination_workload": "httpbin-v2",
            "destination_principal": HTTPBIN, "connection_security_policy": "mutual_tls"}, served
        client = workers[1]
        sent = [s for s in _samples(client) if s["reporter"] == "source"]
        assert len(sent) == 1, sent
        assert {k: sent[0][k] for k in (
            "source_workload", "source_principal", "destination_workload", "destination_workload_namespace",
            "destination_app", "destination_version", "destination_canonical_service",
            "destination_canonical_revision", "destination_cluster", "destination_principal",
            "destination_service", "connection_security_policy")} == {
            "source_workload": "sleep-v1", "source_principal": SLEEP, "destination_workload": "httpbin-v2",
            "destination_workload_namespace": "foo", "destination_app": "httpbin", "destination_version": "v2",
            "destination_canonical_service": "httpbin", "destination_canonical_revision": "v2",
            "destination_cluster": "Kubernetes", "destination_principal": HTTPBIN,
            "destination_service": "httpbin.foo.svc.cluster.local", "connection_security_policy": "unknown"}, sent
        # nothing was rejected on a well-behaved exchange
        for worker in (server, client):
            assert not [s for s in _samples(worker, "meshproxy_peer_metadata_rejected_total") if s["value"]]

        # outside the mesh, and to a mesh endpoint without a sidecar: no metadata goes
        for host, upstream, body in (("ext.example.com", external, b"from outside"),
                                     ("plain.foo", no_sidecar, b"no sidecar")):
            answer = await _exchange(port, _get(host))
            assert answer.endswith(body), answer
            assert len(upstream.requests) == 1 and not _has_metadata(upstream.requests[0].raw), upstream.requests
        # (and their series carry no principals: plaintext)
        plain = [s for s in _samples(client) if s["destination_service"] == "plain.foo.svc.cluster.local"]
        assert len(plain) == 1 and plain[0]["destination_principal"] == "unknown", plain

        assert shutil.which("promtool"), "promtool missing: scripts/setup.sh installs Debian's prometheus package"
        for worker in (server, client):
            body = render_prometheus(merge_dumps([worker.telemetry.metrics.dump()]))
            checked = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
            problems = [l for l in (checked.stdout + checked.stderr).decode().splitlines() if l.strip()]
            # the one lint finding is Istio's own metric name, kept so Istio dashboards work unchanged
            assert all("istio_request_duration_milliseconds" in p for p in problems), problems
            assert checked.returncode in (0, 3)
    finally:
        for w in workers:
            await w.drain(0.1)
        for upstream in (app, external, no_sidecar):
            await upstream.close()


async def test_forged_garbled_or_lying_metadata_labels_no_workload(tmp_path):
    ca = MeshCA()
    app = await Upstream(respond(200, b"from httpbin")).start()
    inbound = free_port()
    server = await _server(app.port, inbound, StaticCertificates(ca.issue(HTTPBIN), tmp_path))
    workers = [server]
    claims = encode_header(own_metadata({"app": "sleep", "version": "v1"}, "foo")).decode()
    try:
        # a plaintext caller (PERMISSIVE lets it in) forging a mesh workload's metadata
        answer = await _exchange(inbound, _get("httpbin.foo", f"x-envoy-peer-metadata: {claims}\r\n"
                                                             "x-envoy-peer-metadata-id: sidecar~x.foo\r\n"))
        assert answer.startswith(b"HTTP/1.1 200") and not _has_metadata(answer), answer
        assert not _has_metadata(app.requests[-1].raw)
        plain = [s for s in _samples(server) if s["connection_security_policy"] == "none"]
        assert len(plain) == 1 and plain[0]["source_workload"] == "unknown" and plain[0]["source_app"] == "unknown" \
            and plain[0]["source_workload_namespace"] == "unknown", plain
        assert _rejected(server, "request", "plaintext") == 1

        # a mesh caller (its certificate verified) whose metadata is not a Struct
        issued = ca.issue(SLEEP)
        cert, key, root = issued.files(tmp_path)
        tls = client_context(issued, root, cert, key, alpn=("istio-http/1.1", "istio", "http/1.1"))
        for garbage in ("!!not-base64!!", "AAAA", claims[:-8]):
            answer = await _exchange(inbound, _get("httpbin.foo", f"x-envoy-peer-metadata: {garbage}\r\n"), tls)
            assert answer.startswith(b"HTTP/1.1 200"), answer
            # a caller over mesh mTLS that sent metadata is answered with the server's own
            fields = dict(line.split(b": ", 1) for line in answer.split(b"\r\n\r\n")[0].split(b"\r\n")[1:])
            assert decode_header(fields[b"x-envoy-peer-metadata"])["WORKLOAD_NAME"] == "httpbin-v2", answer
            assert fields[b"x-envoy-peer-metadata-id"] == b"sidecar~httpbin-pod.foo", answer
        assert _rejected(server, "request", "malformed") == 3
        # the same caller sending the header twice
        answer = await _exchange(inbound, _get("httpbin.foo", f"x-envoy-peer-metadata: {claims}\r\n" * 2), tls)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert _rejected(server, "request", "malformed") == 4
        # too large to read
        answer = await _exchange(inbound, _get("httpbin.foo", f"x-envoy-peer-metadata: {'A' * 9000}\r\n"), tls)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert _rejected(server, "request", "too_large") == 1
        served = [s for s in _samples(server) if s["connection_security_policy"] == "mutual_tls"]
        # labelled by its certificate only (Istio's namespace from the SAN), never as a workload
        assert len(served) == 1 and served[0]["source_workload"] == "unknown" \
            and served[0]["source_principal"] == SLEEP and served[0]["source_workload_namespace"] == "foo", served

        # a sidecar in namespace bar claiming to run in foo: believed about nothing
        port = free_port()
        workers.append(await _client(port, inbound, free_port(), free_port(), StaticCertificates(
            ca.issue("spiffe://cluster.local/ns/bar/sa/sleep"), tmp_path), metadata_namespace="foo"))
        answer = await _exchange(port, _get("httpbin.foo"))
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert _rejected(server, "request", "namespace_mismatch") == 1
        liar = [s for s in _samples(server) if s["source_principal"] == "spiffe://cluster.local/ns/bar/sa/sleep"]
        assert len(liar) == 1 and liar[0]["source_workload"] == "unknown" \
            and liar[0]["source_workload_namespace"] == "bar", liar
        # the server answered it with its own metadata (it sent some over mTLS): the client
        # believes it (httpbin's certificate names foo) and its app never saw it
        assert not _has_metadata(answer)
        sent = [s for s in _samples(workers[1]) if s["reporter"] == "source"]
        assert len(sent) == 1 and sent[0]["destination_workload"] == "httpbin-v2", sent
        assert len(app.requests) == 7 and not any(_has_metadata(r.raw) for r in app.requests)
    finally:
        for w in workers:
            await w.drain(0.1)
        await app.close()
