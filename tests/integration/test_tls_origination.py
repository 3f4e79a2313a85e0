"""DestinationRule ``trafficPolicy.tls`` applied: the proxy originates TLS to real TLS
upstreams (SIMPLE, MUTUAL with files, ISTIO_MUTUAL with the workload certificate), sends
the SNI, checks subjectAltNames, and never falls back to plaintext: a server it cannot
verify gets 503 UF."""
from __future__ import annotations

import asyncio
import base64
import random
import ssl
import textwrap

import pytest
import yaml

from helpers import free_port
from meshproxy.bootstrap import Worker, WorkerOptions
from meshproxy.config.compile import ProxyIdentity, compile_snapshot
from meshproxy.config.decode import decode_documents
from meshproxy.config.resources import Document
from meshproxy.config.store import SnapshotStore
from meshproxy.proxy.observe import Telemetry
from mtls import MeshCA, StaticCertificates

pytestmark = pytest.mark.asyncio


class TlsOrigin:
    """An HTTPS (or TLS echo) server on loopback that records the SNI and client certificate."""

    def __init__(self, ctx: ssl.SSLContext, tcp: bool = False):
        self.ctx = ctx
        self.tcp = tcp
        self.snis: list[str | None] = []
        self.client_sans: list = []
        ctx.sni_callback = lambda sock, name, _ctx: self.snis.append(name)

    async def start(self) -> "TlsOrigin":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader, writer):
        cert = writer.get_extra_info("peercert")
        self.client_sans.append(cert.get("subjectAltName") if cert else None)
        try:
            if self.tcp:
                data = await reader.read(100)
                writer.write(b"tls-echo:" + data)
            else:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecure")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        writer.close()


def _server_ctx(issued, root_file: str | None = None, tmp=None) -> ssl.SSLContext:
    cert, key, root = issued.files(tmp)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if root_file:
        ctx.load_verify_locations(root_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _config(port: int, origin_port: int, tls: str, protocol: str = "HTTP", tcp_listen: int = 0) -> str:
    text = textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: api, namespace: default}}
        spec:
          hosts: [api.example.com]
          location: MESH_EXTERNAL
          resolution: STATIC
          ports: [{{number: 443, name: {protocol.lower()}-api, protocol: {protocol}}}]
          endpoints: [{{address: 127.0.0.1, ports: {{{protocol.lower()}-api: {origin_port}}}}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: api, namespace: default}}
        spec:
          host: api.example.com
          trafficPolicy:
            tls: {tls}
        """)
    if tcp_listen:
        text += textwrap.dedent(f"""\
            ---
            apiVersion: networking.istio.io/v1
            kind: Sidecar
            metadata: {{name: default, namespace: default}}
            spec:
              egress:
              - port: {{number: {tcp_listen}, protocol: TCP, name: tcp-api}}
                bind: 127.0.0.1
                hosts: ["./api.example.com"]
            """)
    return text


async def _worker(config: str, listen: int, certificates=None) -> Worker:
    docs = [Document("t.yaml", i, d) for i, d in enumerate(yaml.safe_load_all(config))]
    decoded = decode_documents(docs)
    assert not decoded.errors, decoded.errors
    snap = compile_snapshot(decoded.resources, ProxyIdentity(http_listen=("127.0.0.1", listen))).snapshot
    worker = Worker(asyncio.get_running_loop(), SnapshotStore(snap), WorkerOptions(), Telemetry(),
                    rng=random.Random(1))
    worker.certificates = certificates
    await worker.start()
    return worker


async def _get(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


@pytest.fixture
def ca(tmp_path):
    ca = MeshCA("api root")
    (tmp_path / "root.pem").write_bytes(ca.root_pem)
    return ca


async def test_simple_verifies_the_server_and_sends_the_sni(ca, tmp_path):
    origin = await TlsOrigin(_server_ctx(ca.issue(dns=("api.example.com",)), tmp=tmp_path)).start()
    listen = free_port()
    worker = await _worker(_config(listen, origin.port, f"{{mode: SIMPLE, caCertificates: {tmp_path}/root.pem}}"),
                           listen)
    answer = await _get(listen)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"secure")
    assert origin.snis == ["api.example.com"] and origin.client_sans == [None]
    await worker.drain(0.1)


async def test_simple_refuses_a_server_it_cannot_verify_never_plaintext(ca, tmp_path):
    other = MeshCA("someone else")
    origin = await TlsOrigin(_server_ctx(other.issue(dns=("api.example.com",)), tmp=tmp_path)).start()
    listen = free_port()
    worker = await _worker(_config(listen, origin.port, f"{{mode: SIMPLE, caCertificates: {tmp_path}/root.pem}}"),
                           listen)
    answer = await _get(listen)
    assert answer.startswith(b"HTTP/1.1 503")
    # subjectAltNames that the certificate does not carry: refused too
    origin2 = await TlsOrigin(_server_ctx(ca.issue(dns=("api.example.com",)), tmp=tmp_path)).start()
    listen2 = free_port()
    worker2 = await _worker(_config(listen2, origin2.port, f"{{mode: SIMPLE, caCertificates: {tmp_path}/root.pem, "
                                                         "subjectAltNames: [billing.example.com]}"), listen2)
    assert (await _get(listen2)).startswith(b"HTTP/1.1 503")
    # insecureSkipVerify accepts it, and sni is what is sent
    listen3 = free_port()
    worker3 = await _worker(_config(listen3, origin.port, "{mode: SIMPLE, insecureSkipVerify: true, "
                                                        "sni: edge.example.com}"), listen3)
    assert (await _get(listen3)).endswith(b"secure")
    assert origin.snis[-1] == "edge.example.com"
    for w in (worker, worker2, worker3):
        await w.drain(0.1)


async def test_mutual_presents_the_client_certificate_files(ca, tmp_path):
    client = ca.issue(dns=("client.example.com",))
    cert, key, root = client.files(tmp_path)
    origin = await TlsOrigin(_server_ctx(ca.issue(dns=("api.example.com",)), root, tmp_path)).start()
    listen = free_port()
    worker = await _worker(_config(listen, origin.port, f"{{mode: MUTUAL, clientCertificate: {cert}, "
                                                      f"privateKey: {key}, caCertificates: {root}}}"), listen)
    assert (await _get(listen)).endswith(b"secure")
    assert origin.client_sans == [(("DNS", "client.example.com"),)]
    await worker.drain(0.1)


async def test_istio_mutual_uses_the_workload_certificate_and_istio_sni(ca, tmp_path):
    workload = StaticCertificates(ca.issue("spiffe://cluster.local/ns/default/sa/sleep"), tmp_path)
    server = ca.issue("spiffe://cluster.local/ns/default/sa/api")
    origin = await TlsOrigin(_server_ctx(server, workload.root_file, tmp_path)).start()
    listen = free_port()
    worker = await _worker(_config(listen, origin.port, "{mode: ISTIO_MUTUAL}"), listen, workload)
    assert (await _get(listen)).endswith(b"secure")
    assert origin.snis == ["outbound_.443_._.api.example.com"]
    assert origin.client_sans == [(("URI", "spiffe://cluster.local/ns/default/sa/sleep"),)]
    # without a workload certificate ISTIO_MUTUAL cannot be originated: 503, not plaintext
    listen2 = free_port()
    worker2 = await _worker(_config(listen2, origin.port, "{mode: ISTIO_MUTUAL}"), listen2, None)
    assert (await _get(listen2)).startswith(b"HTTP/1.1 503")
    for w in (worker, worker2):
        await w.drain(0.1)


async def test_tcp_clusters_originate_tls_too(ca, tmp_path):
    origin = await TlsOrigin(_server_ctx(ca.issue(dns=("api.example.com",)), tmp=tmp_path), tcp=True).start()
    listen, tcp_port = free_port(), free_port()
    worker = await _worker(_config(listen, origin.port, f"{{mode: SIMPLE, caCertificates: {tmp_path}/root.pem}}",
                                   protocol="TCP", tcp_listen=tcp_port), listen)
    reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.read(), 5) == b"tls-echo:ping"
    writer.close()
    assert origin.snis == ["api.example.com"]
    await worker.drain(0.1)


def _gateway_config(gw_port: int, origin_port: int, tls: str, secrets: str, selector: str = "") -> str:
    """A gateway routing api.example.com to the origin, with DestinationRule ``tls`` and Secret documents."""
    return _config(0, origin_port, tls).replace("spec:\n  host: api.example.com",
                                               f"spec:\n  host: api.example.com{selector}") + textwrap.dedent(f"""\
        ---
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {{name: edge, namespace: default}}
        spec:
          selector: {{istio: egressgateway}}
          servers:
          - port: {{number: {gw_port}, name: http, protocol: HTTP}}
            hosts: [api.example.com]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: api, namespace: default}}
        spec:
          hosts: [api.example.com]
          gateways: [edge, mesh]
          http:
          - route: [{{destination: {{host: api.example.com, port: {{number: 443}}}}}}]
        """) + secrets


def _secret(name: str, **data: bytes) -> str:
    body = ", ".join(f"{k}: {base64.b64encode(v).decode()}" for k, v in data.items())
    kind = "kubernetes.io/tls" if "tls.crt" in data else "Opaque"
    return f"---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: default}}\ntype: {kind}\n" \
           f"data: {{{body}}}\n"


async def _compiled_worker(config: str, identity: ProxyIdentity) -> tuple[Worker, tuple[str, ...]]:
    docs = [Document("t.yaml", i, d) for i, d in enumerate(yaml.safe_load_all(config))]
    decoded = decode_documents(docs)
    assert not decoded.errors, decoded.errors
    snap = compile_snapshot(decoded.resources, identity).snapshot
    worker = Worker(asyncio.get_running_loop(), SnapshotStore(snap), WorkerOptions(), Telemetry(),
                    rng=random.Random(1))
    await worker.start()
    return worker, snap.warnings


async def test_credential_name_gives_a_gateway_the_client_certificate_from_a_secret(ca, tmp_path):
    client = ca.issue(dns=("egress.example.com",))
    root_file = str(tmp_path / "root.pem")
    # the upstream requires a client certificate from the CA (Python ssl, CERT_REQUIRED)
    origin = await TlsOrigin(_server_ctx(ca.issue(dns=("api.example.com",)), root_file, tmp_path)).start()
    gw_port = free_port()
    gateway = ProxyIdentity(mode="gateway", gateway_bind="127.0.0.1", labels={"istio": "egressgateway"})
    config = _gateway_config(gw_port, origin.port, "{mode: MUTUAL, credentialName: api-client}",
                             _secret("api-client", **{"tls.crt": client.cert_pem, "tls.key": client.key_pem,
                                                      "ca.crt": ca.root_pem}))
    worker, warnings = await _compiled_worker(config, gateway)
    assert not [w for w in warnings if "credentialName" in w], warnings
    assert (await _get(gw_port)).endswith(b"secure")
    assert origin.snis[-1] == "api.example.com"
    assert origin.client_sans == [(("DNS", "egress.example.com"),)]       # the Secret's certificate
    await worker.drain(0.1)
    # the CA may come from <name>-cacert; a server from another CA is refused (503, never plaintext)
    gw_port = free_port()
    config = _gateway_config(gw_port, origin.port, "{mode: MUTUAL, credentialName: api-client}",
                             _secret("api-client", **{"tls.crt": client.cert_pem, "tls.key": client.key_pem})
                             + _secret("api-client-cacert", cacert=MeshCA("another").root_pem))
    worker, _ = await _compiled_worker(config, gateway)
    assert (await _get(gw_port)).startswith(b"HTTP/1.1 503")
    await worker.drain(0.1)
    # SIMPLE: the Secret's CA verifies the server, no client certificate is sent
    simple_origin = await TlsOrigin(_server_ctx(ca.issue(dns=("api.example.com",)), tmp=tmp_path)).start()
    gw_port = free_port()
    config = _gateway_config(gw_port, simple_origin.port, "{mode: SIMPLE, credentialName: api-ca}",
                             _secret("api-ca", cacert=ca.root_pem))
    worker, _ = await _compiled_worker(config, gateway)
    assert (await _get(gw_port)).endswith(b"secure")
    assert simple_origin.client_sans == [None]
    await worker.drain(0.1)


async def test_credential_name_on_a_sidecar_without_workload_selector_is_refused_not_ignored(ca, tmp_path):
    client = ca.issue(dns=("egress.example.com",))
    origin = await TlsOrigin(_server_ctx(ca.issue(dns=("api.example.com",)), str(tmp_path / "root.pem"),
                                         tmp_path)).start()
    secret = _secret("api-client", **{"tls.crt": client.cert_pem, "tls.key": client.key_pem, "ca.crt": ca.root_pem})
    listen = free_port()
    config = _gateway_config(free_port(), origin.port, "{mode: MUTUAL, credentialName: api-client}", secret)
    worker, warnings = await _compiled_worker(config, ProxyIdentity(http_listen=("127.0.0.1", listen)))
    assert any("DestinationRule default/api: spec.trafficPolicy.tls.credentialName: applies on gateways" in w
               for w in warnings), warnings
    assert (await _get(listen)).startswith(b"HTTP/1.1 503")
    assert origin.client_sans == []                      # no connection made without the certificate
    await worker.drain(0.1)
    # with a workloadSelector that selects the sidecar, Istio applies it there too
    listen = free_port()
    config = _gateway_config(free_port(), origin.port, "{mode: MUTUAL, credentialName: api-client}", secret,
                             selector="\n  workloadSelector: {matchLabels: {app: sleep}}")
    worker2, warnings = await _compiled_worker(config, ProxyIdentity(http_listen=("127.0.0.1", listen),
                                                                     labels={"app": "sleep"}))
    assert not [w for w in warnings if "credentialName" in w], warnings
    assert (await _get(listen)).endswith(b"secure")
    assert origin.client_sans == [(("DNS", "egress.example.com"),)]
    await worker2.drain(0.1)
    # and with a certificate file beside it, the decoder refuses the DestinationRule
    docs = [Document("t.yaml", i, d) for i, d in enumerate(yaml.safe_load_all(_config(
        0, origin.port, "{mode: MUTUAL, credentialName: api-client, clientCertificate: /c.pem, privateKey: /k.pem}")))]
    errors = decode_documents(docs).errors
    assert any("tls.clientCertificate: give either credentialName or the certificate files" in str(e)
               for e in errors), errors
