"""Gateway ``credentialName`` through the real control plane (TLS, tokens) and a real gateway
proxy that joined with a bootstrap token: a Secret applied with ``meshctl apply -f`` by an
admin (an edit token is refused), never printed back (get, list, watch, history), pushed to
the gateway that references it; the gateway serves MUTUAL with it (CA from the
``<name>-cacert`` Secret), takes a rotated certificate without a restart, and without the
Secret stops serving that server only, saying why."""
from __future__ import annotations

import base64
import json
import ssl
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from controlplane.testing import ControlPlaneProcess
from helpers import ProxyProcess, free_port
from mtls import MeshCA

REPO = Path(__file__).resolve().parents[2]
HOST = "shop.example.com"
NS = "istio-system"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def secret_yaml(name: str, type_: str = "kubernetes.io/tls", **data: bytes) -> str:
    return yaml_doc({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
                     "type": type_, "data": {k.replace("_", "."): b64(v) for k, v in data.items()}})


def yaml_doc(obj: dict) -> str:
    return json.dumps(obj) + "\n"          # JSON is YAML


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gwcred")
    # the gateway's own workload identity is granted the Secrets of its namespace (default: nobody)
    cp = ControlPlaneProcess(f"sqlite:{tmp / 'cp.db'}", tls=True, log_path=str(tmp / "cp.log"),
                             extra_args=["--secret-readers", f"{NS}/ingressgateway"]).start(timeout=30)
    yield cp, tmp
    cp.stop()


def meshctl(cp, *args, stdin: str | None = None, credentials: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controlplane.cli", "--credentials", credentials or cp.credentials,
                           *args], input=stdin, capture_output=True, text=True, timeout=30, cwd=REPO)


def api(cp, path: str, method: str = "GET", body=None, first_line: bool = False, token: str = "") -> bytes:
    """The API as the admin (what meshctl does, without a process start per call)."""
    creds = cp.credentials_data()
    req = urllib.request.Request(cp.url + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"authorization": f"Bearer {token or creds['token']}",
                                          "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10, context=ssl.create_default_context(cadata=creds["ca"])) as resp:
        return resp.readline() if first_line else resp.read()


def curl(port: int, root: str, *args: str) -> tuple[int, str]:
    proc = subprocess.run(["curl", "-sS", "--max-time", "15", "--cacert", root, "--resolve", f"{HOST}:{port}:127.0.0.1",
                           *args, f"https://{HOST}:{port}/"], capture_output=True, timeout=30)
    return proc.returncode, proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


def served_serial(port: int) -> int | None:
    proc = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", HOST],
                          input=b"", capture_output=True, timeout=30)
    out = proc.stdout.decode(errors="replace")
    if "-----BEGIN CERTIFICATE-----" not in out:
        return None
    pem = out[out.index("-----BEGIN CERTIFICATE-----"):out.index("-----END CERTIFICATE-----") + 25]
    return x509.load_pem_x509_certificate(pem.encode()).serial_number


def wait_for(condition, what: str, proxy, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s\n{proxy.log()}")
        time.sleep(0.1)


def test_secrets_are_admin_written_never_shown_pushed_rotated_and_missed_gracefully(mesh):
    cp, tmp = mesh
    server_ca, client_ca = MeshCA("shop server root"), MeshCA("shop client root")
    first, second = server_ca.issue(dns=(HOST,)), server_ca.issue(dns=(HOST,))
    client = client_ca.issue("spiffe://partners/acme")
    files = {}
    for name, data in (("root", server_ca.root_pem), ("crt", client.cert_pem), ("key", client.key_pem)):
        files[name] = str(tmp / f"client.{name}")
        Path(files[name]).write_bytes(data)
    secrets = secret_yaml("shop-cred", tls_crt=first.cert_pem, tls_key=first.key_pem) + "---\n" + \
        secret_yaml("shop-cred-cacert", "Opaque", ca_crt=client_ca.root_pem)

    # only an admin writes Secrets: an edit token is refused
    edit = json.loads(api(cp, "/security/v1/api-tokens", "POST", {"scope": "edit", "name": "ci"}))["token"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        api(cp, f"/api/v1/namespaces/{NS}/secrets/shop-cred", "PUT", json.loads(secrets.split("---\n")[0]),
            token=edit)
    assert refused.value.code == 403 and "ci (scope edit) may not PUT /api/v1/namespaces/istio-system/secrets/" \
        "shop-cred: needs scope admin" in refused.value.read().decode()
    # the client CA first (a revision to roll back to), then both
    cacert = json.loads(api(cp, f"/api/v1/namespaces/{NS}/secrets/shop-cred-cacert", "PUT",
                            json.loads(secrets.split("---\n")[1])))
    revision = cacert["metadata"]["resourceVersion"]
    applied = meshctl(cp, "apply", "-f", "-", stdin=secrets)
    assert applied.returncode == 0, applied.stderr
    assert "secret/shop-cred -n istio-system created" in applied.stdout, applied.stdout

    # nor does a rollback by an edit token change Secrets behind the admin's back
    with pytest.raises(urllib.error.HTTPError) as refused:
        api(cp, f"/history/{revision}/rollback", "POST", token=edit)
    assert refused.value.code == 403 and "would change Secret(s) istio-system/shop-cred (needs scope admin)" \
        in refused.value.read().decode()

    # never printed back: get, list (meshctl, the API, a watch), history
    shown = [meshctl(cp, "get", "secrets", "-n", NS, "-o", "yaml").stdout,
             api(cp, f"/api/v1/namespaces/{NS}/secrets/shop-cred").decode(),
             api(cp, "/api/v1/secrets").decode(), api(cp, "/history").decode(),
             api(cp, f"/api/v1/namespaces/{NS}/secrets?watch=1&fieldSelector=metadata.name%3Dshop-cred",
                 first_line=True).decode()]
    for text in shown:
        assert "kubernetes.io/tls" in text and "shop-cred" in text, text
        assert b64(first.key_pem)[:40] not in text and b64(first.cert_pem)[:40] not in text, text
        assert "LS0tLS1CRUdJTi" not in text and "BEGIN" not in text, text     # no PEM, base64 or not

    port, plain = free_port(), free_port()
    gateway = textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {{name: shop, namespace: {NS}}}
        spec:
          selector: {{istio: ingressgateway}}
          servers:
          - port: {{number: {port}, name: https, protocol: HTTPS}}
            hosts: [{HOST}]
            tls: {{mode: MUTUAL, credentialName: shop-cred}}
          - port: {{number: {plain}, name: http, protocol: HTTP}}
            hosts: [{HOST}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: shop, namespace: {NS}}}
        spec:
          hosts: [{HOST}]
          gateways: [shop]
          http:
          - directResponse: {{status: 200, body: {{string: shop-ok}}}}
        """)
    for doc in gateway.split("---\n"):
        obj = yaml.safe_load(doc)
        api(cp, f"/apis/networking.istio.io/v1/namespaces/{NS}/{obj['kind'].lower()}s/{obj['metadata']['name']}",
            "PUT", obj)
    (tmp / "mesh-root.pem").write_text("".join(json.loads(api(cp, "/security/v1/ca/roots"))["roots"]))
    token = json.loads(api(cp, "/security/v1/bootstrap-tokens", "POST",
                           {"namespace": NS, "service_account": "ingressgateway", "ttl": 600}))["token"]
    (tmp / "gw.token").write_text(token)
    cfg = tmp / "empty"
    cfg.mkdir()
    proxy = ProxyProcess(cfg, extra_args=[
        "--control-plane", cp.url, "--ca-file", str(tmp / "mesh-root.pem"), "--token-file", str(tmp / "gw.token"),
        "--namespace", NS, "--service-account", "ingressgateway", "--mode", "gateway", "--gateway-bind", "127.0.0.1",
        "--labels", "istio=ingressgateway"])
    try:
        proxy.start()
        client_args = ("--cert", files["crt"], "--key", files["key"])
        wait_for(lambda: curl(port, files["root"], *client_args) == (0, "shop-ok"), "serving the credential", proxy)
        assert curl(port, files["root"])[0] != 0                       # MUTUAL: the -cacert Secret's CA asks
        serial = lambda issued: x509.load_pem_x509_certificate(issued.cert_pem).serial_number
        assert served_serial(port) == serial(first)
        dump = proxy.admin("/config_dump")[1].decode()
        assert "PRIVATE KEY" not in dump and b64(first.key_pem)[:40] not in dump

        # rotation: a new certificate in the same Secret reaches new connections, no restart
        api(cp, f"/api/v1/namespaces/{NS}/secrets/shop-cred", "PUT",
            json.loads(secret_yaml("shop-cred", tls_crt=second.cert_pem, tls_key=second.key_pem)))
        wait_for(lambda: served_serial(port) == serial(second), "the rotated certificate", proxy)
        assert curl(port, files["root"], *client_args) == (0, "shop-ok")

        # without the Secret, that server is not served and the proxy says why; the rest serves on
        api(cp, f"/api/v1/namespaces/{NS}/secrets/shop-cred", "DELETE")
        wait_for(lambda: curl(port, files["root"], *client_args)[0] != 0, "the server to stop", proxy)
        warnings = json.loads(proxy.admin("/config_dump")[1])["snapshot"]["warnings"]
        assert f"Gateway {NS}/shop: spec.servers[0].tls.credentialName: no Secret {NS}/shop-cred (the credential is " \
               f"looked up in the gateway proxy's namespace, {NS}); this server is not served" in warnings
        req = urllib.request.Request(f"http://127.0.0.1:{plain}/", headers={"Host": HOST})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.read() == b"shop-ok"
    finally:
        proxy.stop()


def test_a_workload_of_another_service_account_claiming_to_be_a_gateway_gets_no_key(mesh):
    """Mode and labels are the proxy's own claim; only the certificate's identity is granted."""
    cp, tmp = mesh
    issued = MeshCA("vault root").issue(dns=(HOST,))
    api(cp, f"/api/v1/namespaces/{NS}/secrets/vault-cred", "PUT",
        json.loads(secret_yaml("vault-cred", tls_crt=issued.cert_pem, tls_key=issued.key_pem)))
    port, plain = free_port(), free_port()
    api(cp, f"/apis/networking.istio.io/v1/namespaces/{NS}/gateways/vault", "PUT", {
        "apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": {"name": "vault", "namespace": NS},
        "spec": {"selector": {"istio": "vault"}, "servers": [
            {"port": {"number": port, "name": "https", "protocol": "HTTPS"}, "hosts": [HOST],
             "tls": {"mode": "SIMPLE", "credentialName": "vault-cred"}},
            {"port": {"number": plain, "name": "http", "protocol": "HTTP"}, "hosts": [HOST]}]}})
    (tmp / "mesh-root.pem").write_text("".join(json.loads(api(cp, "/security/v1/ca/roots"))["roots"]))
    token = lambda: json.loads(api(cp, "/security/v1/bootstrap-tokens", "POST",
                                   {"namespace": NS, "service_account": "sleep", "ttl": 600}))["token"]
    (tmp / "sleep.token").write_text(token())
    cfg = tmp / "impostor"
    cfg.mkdir()
    proxy = ProxyProcess(cfg, extra_args=[
        "--control-plane", cp.url, "--ca-file", str(tmp / "mesh-root.pem"), "--token-file", str(tmp / "sleep.token"),
        "--namespace", NS, "--service-account", "sleep", "--mode", "gateway", "--gateway-bind", "127.0.0.1",
        "--labels", "istio=vault"])
    key_b64 = b64(issued.key_pem)[:40]
    refusal = (f"spiffe://cluster.local/ns/{NS}/sa/sleep is not granted the Secrets of namespace {NS} (granted: "
               f"{NS}/ingressgateway; meshctl serve --secret-readers NS/SA)")
    try:
        proxy.start()
        warning = f"Gateway {NS}/vault: spec.servers[0].tls.credentialName: Secret {NS}/vault-cred withheld by " \
                  f"the control plane: {refusal}; this server is not served"
        wait_for(lambda: warning in json.loads(proxy.admin("/config_dump")[1])["snapshot"]["warnings"],
                 "the withheld warning", proxy)
        dump = proxy.admin("/config_dump")[1].decode()
        assert "PRIVATE KEY" not in dump and key_b64 not in dump and b64(issued.cert_pem)[:40] not in dump
        assert served_serial(port) is None                                # the HTTPS server is not served
        req = urllib.request.Request(f"http://127.0.0.1:{plain}/", headers={"Host": HOST})
        with pytest.raises(urllib.error.HTTPError) as no_route:          # the HTTP server is (no route: 404)
            urllib.request.urlopen(req, timeout=5)
        assert no_route.value.code == 404
        listed = meshctl(cp, "proxies")
        assert listed.returncode == 0 and "SECRETS" in listed.stdout, listed.stderr
        row = next(line for line in listed.stdout.splitlines() if f"ns/{NS}/sa/sleep" in line)
        assert row.rstrip().endswith("withheld"), listed.stdout
        shown = next(p for p in json.loads(api(cp, "/push/v1/proxies"))["items"] if "sa/sleep" in p["principal"])
        assert shown["secrets"] == f"withheld: {refusal}"
    finally:
        proxy.stop()

    # the push stream itself, as that identity sees it: the Secret's name and why, no data
    from meshproxy.config.identity import SpiffeId
    from meshproxy.security.manager import key_pem, make_csr, new_key
    key = new_key("ec-p256")
    body = {"csr": make_csr(SpiffeId("cluster.local", NS, "sleep"), key).decode(), "token": token()}
    chain = json.loads(api(cp, "/security/v1/certificates", "POST", body))["certificate_chain"]
    (tmp / "sleep.crt").write_text(chain)
    (tmp / "sleep.key").write_bytes(key_pem(key))
    context = ssl.create_default_context(cadata=cp.credentials_data()["ca"])
    context.load_cert_chain(tmp / "sleep.crt", tmp / "sleep.key")
    req = urllib.request.Request(cp.url + "/push/v1/stream", method="POST", data=json.dumps(
        {"node_id": "raw-impostor", "identity": {"namespace": NS, "mode": "gateway", "labels": {"istio": "vault"}}}
    ).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10, context=context) as resp:
        message = resp.readline().decode()
    assert '"Gateway"' in message and "vault-cred" in message and refusal in message, message
    assert key_b64 not in message and "tls.key" not in message and '"data"' not in message, message
