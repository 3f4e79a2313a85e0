"""Gateway servers with ``protocol: TLS`` and a terminating mode (SIMPLE, MUTUAL) in front of
TCP: one real gateway process terminates TLS with the certificate the SNI picks, then routes
the decrypted stream as TCP (VirtualService ``tls`` routes by ``sniHosts``, ``tcp`` routes)
to plain TCP upstreams the test runs.  Clients are the ones an operator uses: ``openssl
s_client``, curl (the upstreams answer HTTP too) and Python's ``ssl``, which also half-closes
(close_notify, then FIN) and reads the whole reply afterwards."""
from __future__ import annotations

import base64
import socket
import socketserver
import ssl
import subprocess
import textwrap
import threading
import time

import pytest

from helpers import ProxyProcess, free_port
from mtls import MeshCA

GOOD = "spiffe://cluster.local/ns/edge/sa/partner"
DENIED = "spiffe://cluster.local/ns/edge/sa/stranger"


class _Upstream(socketserver.ThreadingTCPServer):
    """A plain TCP upstream named ``name``: an HTTP request gets ``200 name``; anything else is
    read to the client's FIN (the gateway must pass the half-close on) and answered with
    ``name:`` + the bytes' length + a reply as long as what came."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, name: bytes):
        self.name = name
        super().__init__(("127.0.0.1", 0), _Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _Handler(socketserver.BaseRequestHandler):
    def handle(self):
        sock, name = self.request, self.server.name
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.startswith(b"GET ") and b"\r\n\r\n" in data:
                sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (len(name), name))
                return
        sock.sendall(name + b":%d:" % len(data) + b"r" * len(data))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gwtlstcp")
    server_ca, client_ca, foreign_ca = MeshCA("server root"), MeshCA("client root"), MeshCA("foreign root")
    files = {"root": str(tmp / "root.pem")}
    (tmp / "root.pem").write_bytes(server_ca.root_pem)
    shop_crt, shop_key, _ = server_ca.issue(dns=("shop.example.com",)).files(tmp)
    blog = server_ca.issue(dns=("blog.example.com",))
    edge_crt, edge_key, _ = server_ca.issue(dns=("db.example.com",)).files(tmp)
    client_root = tmp / "client-root.pem"
    client_root.write_bytes(client_ca.root_pem)
    clients = {}
    for name, ca, uri in (("good", client_ca, GOOD), ("denied", client_ca, DENIED), ("foreign", foreign_ca, GOOD)):
        crt, key, _ = ca.issue(uri).files(tmp)
        clients[name] = (crt, key)
    upstreams = {name: _Upstream(name.encode()) for name in ("shop", "blog", "db")}
    ports = {"simple": free_port(), "mutual": free_port()}
    services = "".join(textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: {name}, namespace: default}}
        spec:
          hosts: [{name}.internal]
          location: MESH_EXTERNAL
          resolution: STATIC
          ports: [{{number: 7000, name: tcp, protocol: TCP}}]
          endpoints: [{{address: 127.0.0.1, ports: {{tcp: {up.port}}}}}]
        ---
        """) for name, up in upstreams.items())
    config = services + textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {{name: edge, namespace: default}}
        spec:
          selector: {{istio: ingressgateway}}
          servers:
          - port: {{number: {ports["simple"]}, name: tls-shop, protocol: TLS}}
            hosts: [shop.example.com]
            tls: {{mode: SIMPLE, serverCertificate: {shop_crt}, privateKey: {shop_key}}}
          - port: {{number: {ports["simple"]}, name: tls-blog, protocol: TLS}}
            hosts: [blog.example.com]
            tls: {{mode: SIMPLE, credentialName: blog-cred}}
          - port: {{number: {ports["mutual"]}, name: tls-db, protocol: TLS}}
            hosts: [db.example.com]
            tls: {{mode: MUTUAL, serverCertificate: {edge_crt}, privateKey: {edge_key},
                   caCertificates: {client_root}}}
        ---
        apiVersion: v1
        kind: Secret
        metadata: {{name: blog-cred, namespace: default}}
        type: kubernetes.io/tls
        data: {{tls.crt: {_b64(blog.cert_pem)}, tls.key: {_b64(blog.key_pem)}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: sites, namespace: default}}
        spec:
          hosts: ["*.example.com"]
          gateways: [edge]
          tls:
          - match: [{{port: {ports["simple"]}, sniHosts: [shop.example.com]}}]
            route: [{{destination: {{host: shop.internal, port: {{number: 7000}}}}}}]
          - match: [{{sniHosts: [blog.example.com]}}]
            route: [{{destination: {{host: blog.internal, port: {{number: 7000}}}}}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: db, namespace: default}}
        spec:
          hosts: [db.example.com]
          gateways: [edge]
          tcp:
          - match: [{{port: {ports["mutual"]}}}]
            route: [{{destination: {{host: db.internal, port: {{number: 7000}}}}}}]
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: no-strangers, namespace: default}}
        spec:
          selector: {{matchLabels: {{istio: ingressgateway}}}}
          action: DENY
          rules: [{{from: [{{source: {{principals: ["cluster.local/ns/edge/sa/stranger"]}}}}]}}]
        """)
    cfg = tmp / "config"
    cfg.mkdir()
    (cfg / "mesh.yaml").write_text(config)
    proxy = ProxyProcess(cfg, extra_args=["--mode", "gateway", "--gateway-bind", "127.0.0.1",
                                          "--labels", "istio=ingressgateway"]).start()
    yield proxy, ports, files, clients
    proxy.stop()
    for up in upstreams.values():
        up.shutdown()
        up.server_close()


def tls_exchange(port: int, sni: str, payload: bytes, root: str, client: tuple[str, str] | None = None
                 ) -> tuple[bytes, dict]:
    """Python ``ssl`` over a plain socket (memory BIOs, so it can half-close): handshake with
    ``sni``, send ``payload``, close_notify and FIN, then read the reply to the end.  Returns the
    reply and the server certificate the client verified."""
    ctx = ssl.create_default_context(cafile=root)
    if client:
        ctx.load_cert_chain(*client)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        def send():
            data = outgoing.read()
            if data:
                sock.sendall(data)

        def receive() -> bool:
            data = sock.recv(65536)
            if data:
                incoming.write(data)
            else:
                incoming.write_eof()
            return bool(data)

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                send()
                if not receive():
                    raise ConnectionError("closed during the handshake")
        send()
        for i in range(0, len(payload), 16384):
            tls.write(payload[i:i + 16384])
            send()
        try:
            tls.unwrap()                        # close_notify: our half-close
        except ssl.SSLWantReadError:
            pass
        send()
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            try:
                chunk = tls.read(65536)
            except ssl.SSLWantReadError:
                if not receive():
                    break
                continue
            except ssl.SSLZeroReturnError:
                break
            if not chunk:
                break
            reply += chunk
        return reply, tls.getpeercert()


def s_client(port: int, sni: str, root: str, client: tuple[str, str] | None = None) -> str:
    """What ``openssl s_client`` sees of an HTTP request sent through (the upstream answers it
    and closes: s_client does not half-close)."""
    data = f"GET / HTTP/1.1\r\nHost: {sni}\r\n\r\n".encode()
    args = ["-cert", client[0], "-key", client[1]] if client else []
    proc = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", sni,
                           "-CAfile", root, "-verify_return_error", "-ign_eof", *args],
                          input=data, capture_output=True, timeout=15)
    return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


def metric_sum(proxy, name: str, **labels) -> float:
    _, text = proxy.admin("/stats/prometheus")
    total = 0.0
    for line in text.decode().splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _sans(cert: dict) -> set[str]:
    return {value for _, value in cert.get("subjectAltName", ())}


def test_simple_terminates_with_the_sni_certificate_and_routes_by_sni(gateway):
    proxy, ports, files, _ = gateway
    for sni, name in (("shop.example.com", b"shop"), ("blog.example.com", b"blog")):
        reply, cert = tls_exchange(ports["simple"], sni, b"hello", files["root"])
        assert reply == name + b":5:rrrrr"          # decrypted by the gateway, routed by SNI
        assert _sans(cert) == {sni}                  # the certificate (file, then Secret) of that SNI
        curl = subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", files["root"],
                               "--resolve", f"{sni}:{ports['simple']}:127.0.0.1",
                               f"https://{sni}:{ports['simple']}/"], capture_output=True, timeout=15)
        assert curl.stdout == name, curl
    out = s_client(ports["simple"], "blog.example.com", files["root"])
    assert "Verify return code: 0" in out and "HTTP/1.1 200 OK" in out and "\r\n\r\nblog" in out, out
    assert metric_sum(proxy, "istio_tcp_connections_opened_total", destination_service="blog.internal") >= 2
    assert metric_sum(proxy, "istio_tcp_sent_bytes_total", destination_service="shop.internal") > 0


def test_an_sni_no_tls_route_takes_is_closed_without_reaching_an_upstream(gateway):
    _, ports, files, _ = gateway
    ctx = ssl.create_default_context(cafile=files["root"])
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", ports["simple"]), timeout=15) as raw:
        with ctx.wrap_socket(raw, server_hostname="wiki.example.com") as tls:
            tls.sendall(b"hello")
            assert tls.recv(100) == b""


def test_half_close_passes_through_and_megabytes_come_back(gateway):
    _, ports, files, clients = gateway
    payload = bytes(range(256)) * 4096                      # 1 MiB
    reply, _ = tls_exchange(ports["simple"], "shop.example.com", payload, files["root"])
    assert reply == b"shop:%d:" % len(payload) + b"r" * len(payload)
    reply, _ = tls_exchange(ports["mutual"], "db.example.com", payload, files["root"], clients["good"])
    assert reply == b"db:%d:" % len(payload) + b"r" * len(payload)


def test_mutual_refuses_clients_without_a_certificate_or_from_another_ca(gateway):
    proxy, ports, files, clients = gateway
    before = {reason: metric_sum(proxy, "meshproxy_tls_handshake_failures_total", reason=reason)
              for reason in ("client_certificate_required", "client_certificate_untrusted")}
    out = s_client(ports["mutual"], "db.example.com", files["root"], clients["good"])
    assert "\r\n\r\ndb" in out, out
    for client, alert in ((None, "alert certificate required"), (clients["foreign"], "alert unknown ca")):
        out = s_client(ports["mutual"], "db.example.com", files["root"], client)
        assert "HTTP/1.1" not in out and alert in out, out           # refused with a TLS alert
        try:                                             # TLS 1.3: the client's handshake is done before
            reply, _ = tls_exchange(ports["mutual"], "db.example.com", b"hello", files["root"], client)
        except (ssl.SSLError, ConnectionError):          # the server judges its certificate
            reply = b""
        assert reply == b""
    deadline = time.monotonic() + 10
    while True:
        now = {reason: metric_sum(proxy, "meshproxy_tls_handshake_failures_total", reason=reason)
               for reason in before}
        if all(now[r] >= before[r] + 2 for r in before) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert all(now[r] >= before[r] + 2 for r in before), (before, now)


def test_tcp_authorization_policy_applies_to_the_terminated_client(gateway):
    proxy, ports, files, clients = gateway
    reply, _ = tls_exchange(ports["mutual"], "db.example.com", b"hi", files["root"], clients["good"])
    assert reply == b"db:2:rr"
    try:                                                 # DENY by principal: closed without data (a write
        reply, _ = tls_exchange(ports["mutual"], "db.example.com", b"hi", files["root"], clients["denied"])
    except ConnectionError:                              # after the close may meet a reset)
        reply = b""
    assert reply == b""
    assert metric_sum(proxy, "meshproxy_authz_decisions_total", protocol="tcp", decision="denied") >= 1
