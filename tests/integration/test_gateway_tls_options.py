"""Gateway server TLS options, applied by the real proxy and checked with real TLS clients
(``openssl s_client`` and ``curl``): minProtocolVersion, maxProtocolVersion, cipherSuites.
One gateway proxy serves every case, one port per server; the routes are direct responses,
so a 200 proves the TLS handshake and the routing behind it."""
from __future__ import annotations

import json
import subprocess
import textwrap

import pytest

from helpers import ProxyProcess, free_port

HOST = "tls.example.com"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gwtls")
    cert, key = tmp / "c.crt", tmp / "c.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={HOST}",
                    "-addext", f"subjectAltName=DNS:{HOST}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    ports = {name: free_port() for name in ("tls13_only", "tls12_max", "one_cipher", "plain_default", "secret_store")}
    options = {"tls13_only": "minProtocolVersion: TLSV1_3",
               "tls12_max": "maxProtocolVersion: TLSV1_2",
               "one_cipher": "maxProtocolVersion: TLSV1_2, cipherSuites: [ECDHE-RSA-AES256-GCM-SHA384]",
               "plain_default": "minProtocolVersion: TLS_AUTO"}
    servers = "".join(f"""
          - port: {{number: {ports[name]}, name: https-{name.replace('_', '-')}, protocol: HTTPS}}
            hosts: [{HOST}]
            tls: {{mode: SIMPLE, serverCertificate: {cert}, privateKey: {key}, {opts}}}""" for name, opts in options.items())
    config = textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {{name: edge, namespace: default}}
        spec:
          selector: {{istio: ingressgateway}}
          servers:{servers}
          - port: {{number: {ports["secret_store"]}, name: https-secret, protocol: HTTPS}}
            hosts: [{HOST}]
            tls: {{mode: SIMPLE, credentialName: tls-secret}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: tls, namespace: default}}
        spec:
          hosts: [{HOST}]
          gateways: [edge]
          http:
          - directResponse: {{status: 200, body: {{string: tls-ok}}}}
        """)
    cfg = tmp / "config"
    cfg.mkdir()
    (cfg / "mesh.yaml").write_text(config)
    proxy = ProxyProcess(cfg, extra_args=["--mode", "gateway", "--gateway-bind", "127.0.0.1",
                                          "--labels", "istio=ingressgateway"]).start()
    yield proxy, ports, str(cert)
    proxy.stop()


def s_client(port: int, *args: str) -> tuple[bool, str]:
    """(handshake completed, protocol and cipher lines) for one openssl s_client run."""
    proc = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", HOST, *args],
                          input=b"", capture_output=True, timeout=30)
    out = proc.stdout.decode(errors="replace")
    lines = [l.strip() for l in out.splitlines() if l.strip().startswith(("Protocol", "Cipher", "New,"))]
    return proc.returncode == 0 and "Cipher is (NONE)" not in out, "\n".join(lines)


def curl(port: int, cert: str, *args: str) -> tuple[int, str]:
    proc = subprocess.run(["curl", "-sS", "--max-time", "15", "--cacert", cert, "--resolve", f"{HOST}:{port}:127.0.0.1",
                           *args, f"https://{HOST}:{port}/"], capture_output=True, timeout=30)
    return proc.returncode, proc.stdout.decode(errors="replace")


def test_min_protocol_version_refuses_older_clients(gateway):
    proxy, ports, cert = gateway
    ok, info = s_client(ports["tls13_only"], "-tls1_2")
    assert not ok, info
    ok, info = s_client(ports["tls13_only"], "-tls1_3")
    assert ok and "TLSv1.3" in info, info
    assert curl(ports["tls13_only"], cert, "--tlsv1.2", "--tls-max", "1.2")[0] != 0
    assert curl(ports["tls13_only"], cert) == (0, "tls-ok")
    # TLS_AUTO is Envoy's server default: 1.2 and 1.3
    assert s_client(ports["plain_default"], "-tls1_2")[0] and s_client(ports["plain_default"], "-tls1_3")[0]


def test_max_protocol_version_caps_the_negotiated_version(gateway):
    proxy, ports, cert = gateway
    ok, info = s_client(ports["tls12_max"])
    assert ok and "TLSv1.2" in info and "TLSv1.3" not in info, info
    assert not s_client(ports["tls12_max"], "-tls1_3")[0]
    assert curl(ports["tls12_max"], cert, "--tlsv1.3")[0] != 0
    assert curl(ports["tls12_max"], cert) == (0, "tls-ok")


def test_cipher_suites_limit_what_a_tls12_client_may_use(gateway):
    proxy, ports, cert = gateway
    ok, info = s_client(ports["one_cipher"], "-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256")
    assert not ok, info
    ok, info = s_client(ports["one_cipher"], "-tls1_2", "-cipher", "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256")
    assert ok and "ECDHE-RSA-AES256-GCM-SHA384" in info, info
    # without the option the library default serves the other suite too
    assert s_client(ports["plain_default"], "-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256")[0]
    status, dump = proxy.admin("/config_dump")
    listeners = json.loads(dump)["snapshot"]["listeners"]
    certs = [l["tls"]["certificates"][0] for l in listeners if l["port"] == ports["one_cipher"]]
    assert certs[0]["cipher_suites"] == ["ECDHE-RSA-AES256-GCM-SHA384"] and certs[0]["max_version"] == "TLSV1_2"


def test_a_server_whose_tls_is_not_supported_is_not_served_and_config_dump_says_why(gateway):
    proxy, ports, cert = gateway
    status, dump = proxy.admin("/config_dump")
    snapshot = json.loads(dump)["snapshot"]
    assert ports["secret_store"] not in [l["port"] for l in snapshot["listeners"]]
    assert "Gateway default/edge: spec.servers[4].tls.credentialName: no Secret default/tls-secret (the credential " \
           "is looked up in the gateway proxy's namespace, default); this server is not served" in snapshot["warnings"]
    assert curl(ports["secret_store"], cert)[0] != 0
