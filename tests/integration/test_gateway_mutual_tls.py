"""Gateway servers that verify client certificates, checked with the clients an operator uses
(``curl``, ``openssl s_client``): MUTUAL with ``caCertificates`` files, ``subjectAltNames`` and
certificate pins, OPTIONAL_MUTUAL; ISTIO_MUTUAL with the proxy's workload certificate from
the mesh CA.  One gateway process serves the file cases, one port per server; the routes are
direct responses, so ``mtls-ok`` proves the handshake, the client checks and the routing."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import socket
import subprocess
import textwrap
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from helpers import ProxyProcess, free_port
from mtls import MeshCA

HOST = "gw.example.com"
GOOD = "spiffe://cluster.local/ns/edge/sa/partner"
OTHER = "spiffe://cluster.local/ns/edge/sa/stranger"


def _write(tmp, name: str, data: bytes) -> str:
    path = tmp / name
    path.write_bytes(data)
    return str(path)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _spki_pin(cert_pem: bytes) -> str:
    key = x509.load_pem_x509_certificate(cert_pem).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def _hash_pin(cert_pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, 64, 2))       # the colon form openssl prints


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gwmtls")
    server_ca, client_ca, foreign_ca = MeshCA("server root"), MeshCA("client root"), MeshCA("foreign root")
    server = server_ca.issue(dns=(HOST,))
    files = {"server_root": _write(tmp, "server-root.pem", server_ca.root_pem),
             "crt": _write(tmp, "server.crt", server.cert_pem), "key": _write(tmp, "server.key", server.key_pem),
             "client_root": _write(tmp, "client-root.pem", client_ca.root_pem)}
    clients = {}
    for name, ca, uri in (("good", client_ca, GOOD), ("other", client_ca, OTHER), ("foreign", foreign_ca, GOOD)):
        issued = ca.issue(uri)
        clients[name] = (_write(tmp, f"{name}.crt", issued.cert_pem), _write(tmp, f"{name}.key", issued.key_pem))
        clients[name + "_pem"] = issued.cert_pem
    ports = {name: free_port() for name in ("mutual", "san", "spki", "hash", "optional", "cred")}
    base = f"serverCertificate: {files['crt']}, privateKey: {files['key']}, caCertificates: {files['client_root']}"
    options = {"mutual": "mode: MUTUAL",
               "san": f"mode: MUTUAL, subjectAltNames: [{GOOD}]",
               "spki": f"mode: MUTUAL, verifyCertificateSpki: [{_spki_pin(clients['good_pem'])}]",
               "hash": f"mode: MUTUAL, verifyCertificateHash: ['{_hash_pin(clients['good_pem'])}']",
               "optional": "mode: OPTIONAL_MUTUAL"}
    servers = "".join(f"""
          - port: {{number: {ports[name]}, name: https-{name}, protocol: HTTPS}}
            hosts: [{HOST}]
            tls: {{{opts}, {base}}}""" for name, opts in options.items())
    config = textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {{name: edge, namespace: default}}
        spec:
          selector: {{istio: ingressgateway}}
          servers:{servers}
          - port: {{number: {ports["cred"]}, name: https-cred, protocol: HTTPS}}
            hosts: [{HOST}]
            tls: {{mode: MUTUAL, credentialName: edge-cred}}
        ---
        apiVersion: v1
        kind: Secret
        metadata: {{name: edge-cred, namespace: default}}
        type: kubernetes.io/tls
        data: {{tls.crt: {_b64(server.cert_pem)}, tls.key: {_b64(server.key_pem)}}}
        ---
        apiVersion: v1
        kind: Secret
        metadata: {{name: edge-cred-cacert, namespace: default}}
        type: Opaque
        data: {{ca.crt: {_b64(client_ca.root_pem)}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: mtls, namespace: default}}
        spec:
          hosts: [{HOST}]
          gateways: [edge]
          http:
          - directResponse: {{status: 200, body: {{string: mtls-ok}}}}
        """)
    cfg = tmp / "config"
    cfg.mkdir()
    (cfg / "mesh.yaml").write_text(config)
    proxy = ProxyProcess(cfg, extra_args=["--mode", "gateway", "--gateway-bind", "127.0.0.1",
                                          "--labels", "istio=ingressgateway"]).start()
    yield proxy, ports, files, clients
    proxy.stop()


def curl(port: int, files: dict, client: tuple[str, str] | None = None) -> tuple[int, str]:
    args = ["--cert", client[0], "--key", client[1]] if client else []
    proc = subprocess.run(["curl", "-sS", "--max-time", "20", "--cacert", files["server_root"],
                           "--resolve", f"{HOST}:{port}:127.0.0.1", *args, f"https://{HOST}:{port}/"],
                          capture_output=True, timeout=30)
    return proc.returncode, proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


def s_client(port: int, files: dict, client: tuple[str, str] | None = None) -> str:
    """What ``openssl s_client`` sees after sending one request (TLS 1.3: the server judges the
    client certificate after the client thinks the handshake is done, so look at the reply)."""
    args = ["-cert", client[0], "-key", client[1]] if client else []
    proc = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", HOST,
                           "-CAfile", files["server_root"], "-verify_return_error", "-ign_eof", *args],
                          input=f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode(),
                          capture_output=True, timeout=30)
    return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


def refusals(proxy) -> dict:
    status, text = proxy.admin("/stats/prometheus")
    out = {}
    for line in text.decode().splitlines():
        if line.startswith("meshproxy_tls_handshake_failures_total{"):
            labels, _, value = line.rpartition(" ")
            out[labels] = float(value)
    return out


def test_mutual_requires_a_client_certificate_from_the_ca_certificates(gateway):
    proxy, ports, files, clients = gateway
    assert curl(ports["mutual"], files, clients["good"])[1] == "mtls-ok"
    rc, out = curl(ports["mutual"], files)                      # no client certificate
    assert rc != 0 and "mtls-ok" not in out, out
    rc, out = curl(ports["mutual"], files, clients["foreign"])  # signed by another CA
    assert rc != 0 and "mtls-ok" not in out, out
    out = s_client(ports["mutual"], files)
    assert "mtls-ok" not in out and "HTTP/1.1" not in out, out
    out = s_client(ports["mutual"], files, clients["good"])
    assert "Verify return code: 0 (ok)" in out and "mtls-ok" in out, out
    out = s_client(ports["mutual"], files, clients["foreign"])
    assert "mtls-ok" not in out and "HTTP/1.1" not in out, out
    # the port asks for a certificate from a client, as an operator would check it
    dump = json.loads(proxy.admin("/config_dump")[1])["snapshot"]
    cert = [l["tls"]["certificates"][0] for l in dump["listeners"] if l["port"] == ports["mutual"]][0]
    assert cert["mode"] == "MUTUAL" and cert["ca_certificates"] == files["client_root"]
    counted = refusals(proxy)             # the clients without a certificate, and from another CA
    assert counted.get(f'meshproxy_tls_handshake_failures_total{{listener="gateway_{ports["mutual"]}",'
                       f'reason="client_certificate_required"}}') == 2, counted
    assert counted.get(f'meshproxy_tls_handshake_failures_total{{listener="gateway_{ports["mutual"]}",'
                       f'reason="client_certificate_untrusted"}}') == 2, counted
    # plaintext on a TLS port: refused and counted
    with socket.create_connection(("127.0.0.1", ports["mutual"]), timeout=20) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        try:
            assert b"mtls-ok" not in sock.recv(1000)
        except ConnectionResetError:
            pass
    deadline = time.monotonic() + 5
    while refusals(proxy).get(f'meshproxy_tls_handshake_failures_total{{listener="gateway_{ports["mutual"]}",'
                              f'reason="plaintext_refused"}}') != 1:
        assert time.monotonic() < deadline, refusals(proxy)
        time.sleep(0.05)


def test_subject_alt_names_and_certificate_pins_refuse_other_clients(gateway):
    proxy, ports, files, clients = gateway
    for name in ("san", "spki", "hash"):
        assert curl(ports[name], files, clients["good"])[1] == "mtls-ok", name
        rc, out = curl(ports[name], files, clients["other"])   # same CA, other SAN and key
        assert rc != 0 and "mtls-ok" not in out, (name, out)
        out = s_client(ports[name], files, clients["other"])
        assert "mtls-ok" not in out, (name, out)
    counted = refusals(proxy)
    assert counted.get(f'meshproxy_tls_handshake_failures_total{{listener="gateway_{ports["san"]}",'
                       f'reason="client_san_mismatch"}}', 0) >= 2, counted
    assert counted.get(f'meshproxy_tls_handshake_failures_total{{listener="gateway_{ports["hash"]}",'
                       f'reason="client_certificate_pin_mismatch"}}', 0) >= 2, counted


def test_a_file_configured_gateway_reads_credential_name_from_secret_documents(gateway):
    proxy, ports, files, clients = gateway
    assert curl(ports["cred"], files, clients["good"]) == (0, "mtls-ok")   # the -cacert Secret's CA
    assert curl(ports["cred"], files)[0] != 0
    assert curl(ports["cred"], files, clients["foreign"])[0] != 0
    dump = proxy.admin("/config_dump")[1].decode()
    assert '"credential": "default/edge-cred"' in dump and '"key_pem": "<redacted>"' in dump
    assert "PRIVATE KEY" not in dump


def test_optional_mutual_serves_clients_without_a_certificate_but_verifies_one_given(gateway):
    proxy, ports, files, clients = gateway
    assert curl(ports["optional"], files) == (0, "mtls-ok")
    assert curl(ports["optional"], files, clients["good"]) == (0, "mtls-ok")
    rc, out = curl(ports["optional"], files, clients["foreign"])
    assert rc != 0 and "mtls-ok" not in out, out


# ---------------------------------------------------------------- ISTIO_MUTUAL


@pytest.mark.asyncio
async def test_istio_mutual_terminates_with_the_workload_certificate_and_wants_a_mesh_client(tmp_path):
    from controlplane.security.ca import CaState, CertificateAuthority, generate_root
    from meshproxy.bootstrap import Worker, WorkerOptions
    from meshproxy.config.compile import ProxyIdentity
    from meshproxy.config.load import build_from_paths
    from meshproxy.config.store import SnapshotStore
    from meshproxy.proxy.observe import Telemetry
    from meshproxy.security import CertificateManager, SpiffeId

    root = generate_root("cluster.local")
    ca = CertificateAuthority(CaState((root,), root.fingerprint), default_ttl=3600)
    gateway_id = SpiffeId("cluster.local", "istio-system", "ingressgateway")
    manager = CertificateManager(gateway_id, ca.issuer())
    client = CertificateManager(SpiffeId("cluster.local", "edge", "partner"), ca.issuer())
    await manager.start()
    await client.start()
    port = free_port()
    (tmp_path / "gw.yaml").write_text(textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {{name: mesh-edge, namespace: istio-system}}
        spec:
          servers:
          - port: {{number: {port}, name: https-mesh, protocol: HTTPS}}
            hosts: ["*"]
            tls: {{mode: ISTIO_MUTUAL, subjectAltNames: [{client.identity.uri}]}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: mesh, namespace: istio-system}}
        spec:
          hosts: ["*"]
          gateways: [mesh-edge]
          http:
          - directResponse: {{status: 200, body: {{string: mesh-ok}}}}
        """))
    identity = ProxyIdentity(namespace="istio-system", mode="gateway", gateway_bind="127.0.0.1")
    # without a workload certificate the server is not served, and the proxy says why
    plain = build_from_paths([str(tmp_path)], identity)
    assert not plain.snapshot.listeners
    assert any("spec.servers[0].tls.mode: ISTIO_MUTUAL terminates with the proxy's workload certificate, and "
               "this proxy has none" in w for w in plain.snapshot.warnings), plain.snapshot.warnings
    built = build_from_paths([str(tmp_path)], ProxyIdentity(namespace="istio-system", mode="gateway",
                                                             gateway_bind="127.0.0.1", workload_certificate=True))
    worker = Worker(asyncio.get_running_loop(), SnapshotStore(built.snapshot), WorkerOptions(), Telemetry(),
                    rng=random.Random(1))
    worker.certificates = manager
    await worker.start()
    try:
        files = {}
        for name, data in (("root", manager.current.bundle_pem), ("crt", client.current.chain_pem),
                           ("key", client.current.key_pem)):
            files[name] = _write(tmp_path, f"client.{name}", data)
        stranger = CertificateManager(SpiffeId("cluster.local", "edge", "stranger"), ca.issuer())
        await stranger.start()
        files["s_crt"] = _write(tmp_path, "stranger.crt", stranger.current.chain_pem)
        files["s_key"] = _write(tmp_path, "stranger.key", stranger.current.key_pem)

        def run(*args):
            proc = subprocess.run(["curl", "-sS", "--max-time", "20", "-k", *args, f"https://127.0.0.1:{port}/"],
                                  capture_output=True, timeout=30)
            return proc.returncode, proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")

        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, run, "--cert", files["crt"], "--key", files["key"]) == (0, "mesh-ok")
        rc, out = await loop.run_in_executor(None, run)
        assert rc != 0 and "mesh-ok" not in out, out
        rc, out = await loop.run_in_executor(None, run, "--cert", files["s_crt"], "--key", files["s_key"])
        assert rc != 0 and "mesh-ok" not in out, out
        # the gateway presents its workload certificate, verifiable with the mesh root
        proc = await loop.run_in_executor(None, lambda: subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", files["root"], "-cert", files["crt"],
             "-key", files["key"], "-verify_return_error", "-showcerts"], input=b"", capture_output=True, timeout=30))
        out = proc.stdout.decode(errors="replace")
        assert "Verify return code: 0 (ok)" in out, out
        leaf = x509.load_pem_x509_certificate(out[out.index("-----BEGIN CERTIFICATE-----"):].encode())
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [gateway_id.uri]
    finally:
        await worker.drain(0.1)


@pytest.mark.asyncio
async def test_a_rotated_credential_reaches_new_connections_and_open_ones_keep_going(tmp_path):
    """The Secret behind credentialName changes: the listener is not rebound, new connections
    get the new certificate, a keep-alive connection opened before carries on."""
    import ssl

    from meshproxy.bootstrap import Worker, WorkerOptions
    from meshproxy.config.compile import ProxyIdentity, compile_snapshot
    from meshproxy.config.decode import decode_documents
    from meshproxy.config.resources import Document
    from meshproxy.config.store import SnapshotStore
    from meshproxy.proxy.observe import Telemetry

    ca = MeshCA("rotation root")
    first, second = ca.issue(dns=(HOST,)), ca.issue(dns=(HOST,))
    port = free_port()
    identity = ProxyIdentity(namespace="default", mode="gateway", gateway_bind="127.0.0.1")

    def snapshot(issued, version):
        bodies = [
            {"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": {"name": "gw"},
             "spec": {"servers": [{"port": {"number": port, "name": "https", "protocol": "HTTPS"}, "hosts": [HOST],
                                   "tls": {"mode": "SIMPLE", "credentialName": "rot"}}]}},
            {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "vs"},
             "spec": {"hosts": [HOST], "gateways": ["gw"],
                      "http": [{"directResponse": {"status": 200, "body": {"string": "rot-ok"}}}]}},
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "rot"}, "type": "kubernetes.io/tls",
             "data": {"tls.crt": _b64(issued.cert_pem), "tls.key": _b64(issued.key_pem)}}]
        result = decode_documents([Document("t", i, b) for i, b in enumerate(bodies)])
        assert result.errors == []
        return compile_snapshot(result.resources, identity, version=version).snapshot

    store = SnapshotStore(snapshot(first, "v1"))
    worker = Worker(asyncio.get_running_loop(), store, WorkerOptions(), Telemetry(), rng=random.Random(1))
    await worker.start()
    client = ssl.create_default_context(cadata=ca.root_pem.decode())

    async def connect():
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=HOST)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return reader, writer, x509.load_der_x509_certificate(der).serial_number

    async def request(reader, writer) -> bytes:
        writer.write(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        return head + await asyncio.wait_for(reader.readexactly(len("rot-ok")), 5)

    serial = lambda issued: x509.load_pem_x509_certificate(issued.cert_pem).serial_number
    try:
        reader, writer, seen = await connect()
        assert seen == serial(first)
        assert (await request(reader, writer)).endswith(b"rot-ok")
        listener = next(iter(worker.http_listeners.values()))
        store.swap(snapshot(second, "v2"))
        for _ in range(200):
            r2, w2, seen = await connect()
            w2.close()
            if seen == serial(second):
                break
            await asyncio.sleep(0.01)
        assert seen == serial(second)
        assert next(iter(worker.http_listeners.values())) is listener          # not rebound
        assert (await request(reader, writer)).endswith(b"rot-ok")              # the old connection carries on
        assert writer.get_extra_info("ssl_object").getpeercert(binary_form=True) is not None
        writer.close()
    finally:
        await worker.drain(0.1)


def test_a_refused_handshake_ends_in_a_tls_alert_not_a_reset(gateway):
    """curl names the alert the gateway sent (before: "Connection reset by peer")."""
    _, ports, files, clients = gateway
    rc, out = curl(ports["mutual"], files)                        # no certificate
    assert rc != 0 and "alert certificate required" in out, out
    rc, out = curl(ports["mutual"], files, clients["foreign"])    # another CA
    assert rc != 0 and "alert unknown ca" in out, out
    out = s_client(ports["mutual"], files, clients["foreign"])
    assert "alert unknown ca" in out and "mtls-ok" not in out, out
