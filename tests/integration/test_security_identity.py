"""Workload identity and a control plane that is not open to everyone, over real processes:
`meshctl serve` with TLS (one per module, 3 s workload certificates), meshctl, openssl,
real sidecars, and certificate managers talking to the control plane over https."""
from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.testing import ControlPlaneProcess, free_ports
from meshproxy.security import CertificateManager, SpiffeId, check_peer, peer_identity
from meshproxy.security.issuer import ControlPlaneIssuer
from meshproxy.security.manager import make_csr, new_key

REPO = Path(__file__).resolve().parents[2]
TTL = 3.0
CART = SpiffeId("cluster.local", "shop", "cart")


@pytest.fixture(scope="module")
def cp(tmp_path_factory):
    d = tmp_path_factory.mktemp("cp")
    proc = ControlPlaneProcess(f"sqlite:{d / 'cp.db'}", tls=True, log_path=str(d / "cp.log"),
                               extra_args=["--workload-cert-ttl", f"{TTL}s"]).start(timeout=30)
    out = subprocess.run([sys.executable, "-m", "controlplane.cli", "--credentials", proc.credentials, "ca", "root"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    proc.root_pem = out.stdout.encode()       # what `meshctl ca root` prints, as an operator gets it
    yield proc
    proc.stop()


def meshctl(cp, *args, credentials: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controlplane.cli", "--credentials", credentials or cp.credentials,
                           *args], capture_output=True, text=True, timeout=30, cwd=REPO)


def call(cp, method: str, path: str, body=None, *, token: str | None = None, context=None) -> tuple[int, dict]:
    creds = cp.credentials_data()
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(cp.url + path, data=data, method=method, headers=headers)
    ctx = context or ssl.create_default_context(cadata=creds["ca"])
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
            status, payload = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    try:
        return status, json.loads(payload or b"{}")
    except ValueError:
        return status, {"text": payload.decode(errors="replace")}


def bootstrap_token(cp, ns="shop", sa="cart", ttl: float = 600) -> str:
    code, body = call(cp, "POST", "/security/v1/bootstrap-tokens", {"namespace": ns, "service_account": sa,
                                                                     "ttl": ttl}, token=cp.credentials_data()["token"])
    assert code == 201, body
    return body["token"]


def root_pem(cp) -> bytes:
    if not hasattr(cp, "root_pem"):
        code, body = call(cp, "GET", "/security/v1/ca/roots", token=cp.credentials_data()["token"])
        assert code == 200, body
        cp.root_pem = "".join(body["roots"]).encode()
    return cp.root_pem


def manager_for(cp, tmp_path, identity=CART, token: str | None = None) -> CertificateManager:
    token_file = tmp_path / f"token-{identity.service_account}-{time.monotonic_ns()}"
    token_file.write_text(token or bootstrap_token(cp, identity.namespace, identity.service_account))
    return CertificateManager(identity, ControlPlaneIssuer([cp.url], str(token_file), root_pem(cp)),
                              retry_base=0.05, retry_max=0.5)


def metrics_text(cp) -> str:
    req = urllib.request.Request(cp.url + "/metrics", headers={"authorization": f"Bearer {cp.credentials_data()['token']}"})
    with urllib.request.urlopen(req, timeout=5, context=ssl.create_default_context(cadata=cp.credentials_data()["ca"])) as r:
        return r.read().decode()


def metric(cp, name: str) -> float:
    text = metrics_text(cp)
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def csr_body(identity_uri: str, **extra) -> dict:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity_uri)]), critical=True)
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
    return {"csr": csr, **extra}


# ---------------------------------------------------------------- certificates


async def test_bootstrap_token_gets_a_spiffe_certificate_that_openssl_verifies_against_the_root(cp, tmp_path):
    out = meshctl(cp, "token", "create", "--namespace", "shop", "--service-account", "cart", "--ttl", "10m")
    assert out.returncode == 0 and "single use" in out.stderr, out.stderr
    manager = manager_for(cp, tmp_path, token=out.stdout.strip())
    (tmp_path / "root.pem").write_bytes(root_pem(cp))
    cert = await manager.start(timeout=10)
    (tmp_path / "leaf.pem").write_bytes(cert.leaf_pem)
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "root.pem"), str(tmp_path / "leaf.pem")],
                            capture_output=True, text=True)
    assert verify.returncode == 0 and ": OK" in verify.stdout, verify.stdout + verify.stderr
    text = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "leaf.pem"), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert "URI:spiffe://cluster.local/ns/shop/sa/cart" in text
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    assert "CA:FALSE" in text
    # X.509 times are whole seconds and not-before is back-dated by 5% of the ttl: truncating
    # both ends makes the lifetime the ttl or one second more, depending on the clock's fraction
    assert TTL - 0.5 <= cert.lifetime <= TTL + 1.5


async def test_bootstrap_token_replayed_expired_or_for_another_identity_is_refused_and_counted(cp, tmp_path):
    refused_before = metric(cp, "citadel_server_authentication_failure_count_total")
    id_errors_before = metric(cp, "citadel_server_id_extraction_err_count_total")
    token = bootstrap_token(cp)
    code, body = call(cp, "POST", "/security/v1/certificates", csr_body("spiffe://cluster.local/ns/shop/sa/admin",
                                                                        token=token))
    assert code == 401 and "not for spiffe://cluster.local/ns/shop/sa/admin" in body["message"]
    code, body = call(cp, "POST", "/security/v1/certificates", csr_body(CART.uri, token=token))
    assert code == 200 and "BEGIN CERTIFICATE" in body["certificate_chain"]
    code, body = call(cp, "POST", "/security/v1/certificates", csr_body(CART.uri, token=token))
    assert code == 401 and "already used" in body["message"]
    short = bootstrap_token(cp, ttl=1)
    time.sleep(1.1)
    code, body = call(cp, "POST", "/security/v1/certificates", csr_body(CART.uri, token=short))
    assert code == 401 and "expired" in body["message"]
    code, body = call(cp, "POST", "/security/v1/certificates", csr_body(CART.uri, token="mpb.0123456789abcdef." + "x" * 43))
    assert code == 401 and "not known" in body["message"]
    assert metric(cp, "citadel_server_authentication_failure_count_total") == refused_before + 4
    assert metric(cp, "citadel_server_id_extraction_err_count_total") == id_errors_before + 1
    code, _ = call(cp, "GET", "/healthz")
    assert code == 200


OVERSIZED_CSR = (REPO / "tests/fixtures/security/csr-rsa8192-shop-cart.pem").read_text()   # openssl req, rsa:8192


async def test_malformed_csr_requests_get_400_with_the_reason(cp):
    token = bootstrap_token(cp)
    for body, needle in [({"csr": "garbage"}, "not a PEM certificate request"),
                         ({"csr": OVERSIZED_CSR, "token": token}, "RSA key of 8192 bits"),
                         ({"token": token}, "'csr'"),
                         ({"csr": "x" * 20000, "token": token}, "at most"),
                         (dict(csr_body(CART.uri, token=token), extra=1), "unknown field")]:
        code, answer = call(cp, "POST", "/security/v1/certificates", body)
        assert code == 400 and needle in answer["message"], answer
    code, answer = call(cp, "POST", "/security/v1/certificates", csr_body(CART.uri, token=token))
    assert code == 200, "a refused request must not use up the token"


async def test_renewal_at_half_lifetime_keeps_a_connection_open_across_it(cp, tmp_path):
    server = manager_for(cp, tmp_path, SpiffeId("cluster.local", "shop", "cart"))
    client = manager_for(cp, tmp_path, SpiffeId("cluster.local", "shop", "web"))
    await server.start(timeout=10)
    await client.start(timeout=10)
    renewals = [asyncio.create_task(server.run()), asyncio.create_task(client.run())]
    serials = []

    async def echo(reader, writer):
        serials.append(writer.get_extra_info("ssl_object").getpeercert()["serialNumber"])
        while data := await reader.read(100):
            writer.write(data)
            await writer.drain()
        writer.close()

    srv = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server.server_context())
    port = srv.sockets[0].getsockname()[1]
    try:
        first_serial = server.current.serial
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client.client_context())
        check_peer(writer.get_extra_info("ssl_object"), [server.identity])
        deadline = time.monotonic() + TTL * 1.6        # past the first certificate's expiry
        while time.monotonic() < deadline:
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 2) == b"ping"
            await asyncio.sleep(0.2)
        assert server.current.serial != first_serial and server.renewals["success"] >= 2
        r2, w2 = await asyncio.open_connection("127.0.0.1", port, ssl=client.client_context())
        served = x509.load_der_x509_certificate(w2.get_extra_info("ssl_object").getpeercert(binary_form=True))
        assert format(served.serial_number, "x") == server.current.serial
        assert peer_identity(w2.get_extra_info("ssl_object")) == server.identity
        w2.close()
        writer.close()
    finally:
        srv.close()
        for task in renewals:
            task.cancel()


# ---------------------------------------------------------------- a real sidecar


def start_sidecar(cp, tmp_path, token: str, *extra: str) -> tuple[subprocess.Popen, int]:
    (tmp_path / "token").write_text(token)
    (tmp_path / "root.pem").write_bytes(root_pem(cp))
    listen, admin = free_ports(2)
    log = open(tmp_path / "sidecar.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "meshproxy", "run", "--control-plane", cp.url,
                             "--ca-file", str(tmp_path / "root.pem"), "--token-file", str(tmp_path / "token"),
                             "--namespace", "shop", "--service-account", "cart", "--service", "cart",
                             "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}", *extra],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return proc, admin


def admin_get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last})")


def test_sidecar_joins_over_tls_and_keeps_its_certificate_while_the_control_plane_is_down(tmp_path):
    cp = ControlPlaneProcess(f"sqlite:{tmp_path / 'cp.db'}", tls=True, log_path=str(tmp_path / "cp.log"),
                             extra_args=["--workload-cert-ttl", f"{TTL}s"]).start()
    proc = None
    try:
        proc, admin = start_sidecar(cp, tmp_path, bootstrap_token(cp))
        dump = wait_for(lambda: json.loads(admin_get(admin, "/config_dump")), 20, "the sidecar's admin")
        assert dump["certificates"]["identity"] == CART.uri and dump["certificates"]["state"] == "valid"
        proxies = wait_for(lambda: json.loads(meshctl(cp, "proxies", "-o", "json").stdout)["items"], 10, "a proxy")
        assert proxies[0]["principal"] == CART.uri and proxies[0]["cert_not_after"]
        wait_for(lambda: json.loads(admin_get(admin, "/config_dump"))["certificates"]["renewals"]["success"] >= 2,
                 TTL * 2, "a renewal")
        # the listing follows the renewed certificate (the push stream keeps the first one)
        wait_for(lambda: json.loads(meshctl(cp, "proxies", "-o", "json").stdout)["items"][0]["cert_expires_at"]
                 > proxies[0]["cert_expires_at"], 10, "meshctl proxies showing the renewed certificate's expiry")
        cp.kill()
        failing = wait_for(lambda: (d := json.loads(admin_get(admin, "/config_dump"))["certificates"])["state"]
                           == "renewal-failing" and d, TTL * 2, "renewal-failing")
        assert failing["last_error"] and failing["expires_in_seconds"] > 0
        metrics = admin_get(admin, "/metrics").decode()
        assert f'meshproxy_workload_cert_renewal_failing{{identity="{CART.uri}"}} 1' in metrics
        assert f'meshproxy_workload_cert_valid{{identity="{CART.uri}"}} 1' in metrics
        wait_for(lambda: json.loads(admin_get(admin, "/config_dump"))["certificates"]["state"] == "expired",
                 TTL * 2, "expired")
        metrics = admin_get(admin, "/metrics").decode()
        assert f'meshproxy_workload_cert_valid{{identity="{CART.uri}"}} 0' in metrics
        assert 'meshproxy_workload_cert_renewals_total{result="failure"}' in metrics
        assert admin_get(admin, "/ready") == b"LIVE\n"      # the proxy itself keeps serving
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(5)
        cp.kill()


def test_sidecar_with_a_used_token_exits_with_a_clear_error(cp, tmp_path):
    token = bootstrap_token(cp)
    code, _ = call(cp, "POST", "/security/v1/certificates", csr_body(CART.uri, token=token))
    assert code == 200
    proc, _ = start_sidecar(cp, tmp_path, token, "--initial-config-timeout", "10")
    assert proc.wait(30) == 1
    log = (tmp_path / "sidecar.log").read_text()
    assert "no workload certificate for spiffe://cluster.local/ns/shop/sa/cart" in log and "already used" in log


# ---------------------------------------------------------------- the API's own security


def test_api_refuses_requests_without_or_with_an_insufficient_token(cp):
    vs = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "r"},
          "spec": {"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}}]}]}}
    path = "/apis/networking.istio.io/v1/namespaces/default/virtualservices/r"
    code, body = call(cp, "PUT", path, vs)
    assert code == 401 and "authentication required" in body["message"]
    code, body = call(cp, "GET", path, token="mpa.0123456789abcdef." + "y" * 43)
    assert code == 401 and "not valid" in body["message"]
    view = meshctl(cp, "token", "create", "--scope", "view", "--name", "dashboards").stdout.strip()
    edit = meshctl(cp, "token", "create", "--scope", "edit", "--name", "ci-bot").stdout.strip()
    code, body = call(cp, "PUT", path, vs, token=view)
    assert code == 403 and "needs scope edit" in body["message"]
    code, body = call(cp, "POST", "/security/v1/bootstrap-tokens", {"namespace": "x"}, token=edit)
    assert code == 403
    code, created = call(cp, "PUT", path, vs, token=edit)
    assert code == 201
    code, history = call(cp, "GET", "/history?limit=1", token=view)
    assert code == 200 and history["items"][0]["origin"] == "token:ci-bot"
    out = meshctl(cp, "history")
    assert "token:ci-bot" in out.stdout

    # a rollback that would drop a security policy: never by an edit token, by an admin only when asked
    admin = cp.credentials_data()["token"]
    revision = created["metadata"]["resourceVersion"]
    strict = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
              "metadata": {"name": "default", "namespace": "vault"}, "spec": {"mtls": {"mode": "STRICT"}}}
    pa = "/apis/security.istio.io/v1/namespaces/vault/peerauthentications/default"
    assert call(cp, "PUT", pa, strict, token=admin)[0] == 201
    code, body = call(cp, "POST", f"/history/{revision}/rollback", token=edit)
    assert code == 403 and body["message"] == (
        f"token:ci-bot may not roll back to revision {revision}: it would change security policies "
        "(delete PeerAuthentication vault/default) (needs scope admin)")
    code, body = call(cp, "POST", f"/history/{revision}/rollback", token=admin)
    assert code == 409 and "would change security policies (delete PeerAuthentication vault/default); " \
        "nothing was changed: to restore them too, ask with includeSecurity=true" in body["message"]
    assert call(cp, "GET", pa, token=view)[1]["spec"]["mtls"]["mode"] == "STRICT"
    code, body = call(cp, "POST", f"/history/{revision}/rollback?includeSecurity=true", token=admin)
    assert code == 200 and body["changes"] == [
        {"op": "delete", "kind": "PeerAuthentication", "namespace": "vault", "name": "default"}]
    assert call(cp, "GET", pa, token=view)[0] == 404


def test_plaintext_to_the_tls_port_is_refused_and_curl_verifies_with_the_root(cp, tmp_path):
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{cp.port}/healthz", timeout=5).read()
    (tmp_path / "root.pem").write_bytes(root_pem(cp))
    out = subprocess.run(["curl", "-sS", "--cacert", str(tmp_path / "root.pem"), f"https://127.0.0.1:{cp.port}/healthz"],
                         capture_output=True, text=True, timeout=10)
    assert out.stdout == "ok\n", out.stderr
    out = subprocess.run(["curl", "-sS", f"https://127.0.0.1:{cp.port}/healthz"], capture_output=True, text=True,
                         timeout=10)
    assert out.returncode != 0 and "certificate" in out.stderr.lower()


async def test_a_client_certificate_from_another_ca_is_refused_at_the_handshake(cp):
    from controlplane.security.ca import CaState, CertificateAuthority, generate_root
    rogue_root = generate_root("cluster.local")
    rogue = CertificateManager(CART, CertificateAuthority(CaState((rogue_root,), rogue_root.fingerprint)).issuer())
    await rogue.start()
    from meshproxy.security.tls import client_context
    ctx = client_context(root_pem(cp), rogue.current.chain_pem, rogue.current.key_pem, check_hostname=True)
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        call(cp, "GET", "/apis/networking.istio.io/v1/virtualservices", context=ctx)

    code, _ = call(cp, "GET", "/healthz")
    assert code == 200


async def test_a_sidecar_certificate_reads_only_its_own_namespace_and_registers_only_itself(cp, tmp_path):
    manager = manager_for(cp, tmp_path)
    await manager.start(timeout=10)
    ctx = manager.client_context(check_hostname=True)
    code, body = call(cp, "GET", "/apis/networking.istio.io/v1/virtualservices", context=ctx)
    assert code == 403 and CART.uri in body["message"]
    code, body = call(cp, "POST", "/registry/v1/workloads", {"service": "cart", "namespace": "default",
                                                             "address": "10.0.0.1", "ports": {}}, context=ctx)
    assert code == 403
    code, body = call(cp, "POST", "/registry/v1/workloads", {"service": "cart", "namespace": "shop", "id": "cart-1",
                                                             "address": "10.0.0.1", "ports": {}}, context=ctx)
    assert code == 201 and body["identity"] == CART.uri and body["service_account"] == "cart"
    other = manager_for(cp, tmp_path, SpiffeId("cluster.local", "shop", "payments"))
    await other.start(timeout=10)
    code, body = call(cp, "DELETE", "/registry/v1/workloads/cart-1",
                      context=other.client_context(check_hostname=True))
    assert code == 403 and "registered by spiffe://cluster.local/ns/shop/sa/cart" in body["message"]
    code, _ = call(cp, "POST", "/push/v1/ack", {"node_id": "x", "nonce": "1", "version": "v"}, context=ctx)
    assert code in (200, 404)      # allowed for a workload; "unknown" stream
    # a registration without a workload certificate or a service account has no identity (no
    # sidecar to originate mTLS to); one made with a token may name its service account
    admin = cp.credentials_data()["token"]
    code, body = call(cp, "POST", "/registry/v1/workloads", {"service": "legacy", "namespace": "shop",
                                                             "address": "10.0.0.9", "ports": {}}, token=admin)
    assert code == 201 and "identity" not in body
    code, body = call(cp, "POST", "/registry/v1/workloads", {"service": "vm", "namespace": "shop", "address": "10.0.0.8",
                                                             "ports": {}, "service_account": "vm"}, token=admin)
    assert code == 201 and body["identity"] == "spiffe://cluster.local/ns/shop/sa/vm"


def test_insecure_loopback_is_refused_on_a_non_loopback_address(tmp_path):
    out = subprocess.run([sys.executable, "-m", "controlplane.cli", "serve", "--store", f"sqlite:{tmp_path / 'x.db'}",
                          "--listen", "0.0.0.0:0", "--insecure-loopback"], capture_output=True, text=True, timeout=30,
                         cwd=REPO)
    assert out.returncode != 0 and "only on a loopback address" in out.stderr


# ---------------------------------------------------------------- root rotation


async def test_root_rotation_under_constant_load_fails_no_request(tmp_path):
    """The documented sequence (README): prepare, wait, activate, wait, finish; new mTLS
    connections every few ms and one long-lived connection throughout, zero failures."""
    ttl = 3.0
    cp = ControlPlaneProcess(f"sqlite:{tmp_path / 'cp.db'}", tls=True, log_path=str(tmp_path / "cp.log"),
                             extra_args=["--workload-cert-ttl", f"{ttl}s"]).start(timeout=30)
    tasks = []
    try:
        server = manager_for(cp, tmp_path, SpiffeId("cluster.local", "shop", "cart"))
        client = manager_for(cp, tmp_path, SpiffeId("cluster.local", "shop", "web"))
        await server.start(timeout=10)
        await client.start(timeout=10)
        old_root = server.current.roots[0]
        tasks += [asyncio.create_task(server.run()), asyncio.create_task(client.run())]

        async def echo(reader, writer):
            while data := await reader.read(100):
                writer.write(data)
                await writer.drain()
            writer.close()

        srv = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server.server_context())
        port = srv.sockets[0].getsockname()[1]
        results = {"ok": 0, "failed": []}
        stop = asyncio.Event()

        async def one_request():
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client.client_context())
            try:
                check_peer(writer.get_extra_info("ssl_object"), [server.identity])
                writer.write(b"hi")
                assert await asyncio.wait_for(reader.readexactly(2), 5) == b"hi"
            finally:
                writer.close()

        async def load():
            while not stop.is_set():
                try:
                    await one_request()
                    results["ok"] += 1
                except Exception as exc:       # every failure is a finding
                    results["failed"].append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.02)

        long_reader, long_writer = await asyncio.open_connection("127.0.0.1", port, ssl=client.client_context())
        tasks.append(asyncio.create_task(load()))

        async def step(name: str) -> None:
            out = await asyncio.to_thread(meshctl, cp, "ca", "rotate", name)
            assert out.returncode == 0, out.stderr
            long_writer.write(b"ok")
            assert await asyncio.wait_for(long_reader.readexactly(2), 5) == b"ok"

        async def wait_until_ready_for_next_step() -> None:
            deadline = time.monotonic() + ttl * 4
            while time.monotonic() < deadline:
                code, status = await asyncio.to_thread(call, cp, "GET", "/security/v1/ca",
                                                       token=cp.credentials_data()["token"])
                assert code == 200, status
                if not status["waiting_for"]:
                    return
                await asyncio.sleep(0.2)
            raise AssertionError(f"rotation still waiting for {status['waiting_for']}")

        await step("prepare")
        await wait_until_ready_for_next_step()
        assert len(server.current.roots) == 2 and len(client.current.roots) == 2
        await step("activate")
        await wait_until_ready_for_next_step()
        await step("finish")
        deadline = time.monotonic() + ttl * 3
        while time.monotonic() < deadline and (server.current.roots == client.current.roots == (old_root,)
                                               or len(server.current.roots) != 1 or len(client.current.roots) != 1):
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        stop.set()
        await tasks.pop()
        new_root = server.current.roots[0]
        assert new_root != old_root and client.current.roots == (new_root,)
        assert results["failed"] == [] and results["ok"] > 20, results
        long_writer.write(b"ok")
        assert await asyncio.wait_for(long_reader.readexactly(2), 5) == b"ok"
        long_writer.close()
        srv.close()
        (tmp_path / "leaf.pem").write_bytes(server.current.leaf_pem)
        (tmp_path / "new.pem").write_bytes(server.current.bundle_pem)
        ok = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "new.pem"), str(tmp_path / "leaf.pem")],
                            capture_output=True, text=True)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        (tmp_path / "old.pem").write_bytes(root_pem(cp))      # what the operator held before the rotation
        stale = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "old.pem"), str(tmp_path / "leaf.pem")],
                               capture_output=True, text=True)
        assert stale.returncode != 0
    finally:
        for task in tasks:
            task.cancel()
        cp.stop()


# ---------------------------------------------------------------- replicas on etcd


@pytest.mark.needs_etcd
def test_replicas_on_etcd_share_one_root_single_use_tokens_and_rotation_steps(tmp_path):
    from controlplane.testing import EtcdCluster
    etcd = EtcdCluster(str(tmp_path), members=1).start()
    a = b = None
    try:
        a = ControlPlaneProcess(etcd.store_spec(), tls=True, log_path=str(tmp_path / "a.log")).start(timeout=30)
        b = ControlPlaneProcess(etcd.store_spec(), tls=True, log_path=str(tmp_path / "b.log")).start(timeout=30)
        assert root_pem(a) == root_pem(b) and root_pem(a).count(b"BEGIN CERTIFICATE") == 1
        token = bootstrap_token(a)
        code, body = call(b, "POST", "/security/v1/certificates", csr_body(CART.uri, token=token))
        assert code == 200, body
        code, body = call(a, "POST", "/security/v1/certificates", csr_body(CART.uri, token=token))
        assert code == 401 and "already used" in body["message"]
        out = meshctl(a, "ca", "rotate", "prepare")
        assert out.returncode == 0, out.stderr
        wait_for(lambda: len(call(b, "GET", "/security/v1/ca/roots", token=b.credentials_data()["token"])[1]["roots"])
                 == 2, 10, "replica b to see the prepared rotation")
    finally:
        for cp in (a, b):
            if cp is not None:
                cp.stop()
        etcd.stop()


def test_delivery_api_and_live_traffic_need_a_token_too(cp):
    code, body = call(cp, "GET", "/delivery/v1/traffic")
    assert code == 401
    code, body = call(cp, "POST", "/apis/delivery.meshproxy.io/v1/namespaces/default/canaries/x/pause")
    assert code == 401
    view = call(cp, "POST", "/security/v1/api-tokens", {"scope": "view", "name": "viewer"},
                token=cp.credentials_data()["token"])[1]["token"]
    code, _ = call(cp, "GET", "/delivery/v1/traffic", token=view)
    assert code == 200
    code, body = call(cp, "POST", "/apis/delivery.meshproxy.io/v1/namespaces/default/canaries/x/pause", token=view)
    assert code == 403 and "needs scope edit" in body["message"]


# ---------------------------------------------------------------- attacks on the TLS port


def _closed_without_answer(sock) -> bool:
    try:
        data = sock.recv(65536)
    except (ConnectionResetError, TimeoutError):
        return True
    # OpenSSL may send one alert record (type 0x15) before closing; never an HTTP answer
    return data == b"" or data[:1] == b"\x15"


def test_garbage_huge_and_trickled_client_hellos_and_renegotiation_leave_the_api_serving(cp, tmp_path):
    import socket
    garbage = socket.create_connection(("127.0.0.1", cp.port), timeout=10)
    garbage.sendall(b"\x16\x03\x01\x00\x20" + os.urandom(32))
    assert _closed_without_answer(garbage)
    huge = socket.create_connection(("127.0.0.1", cp.port), timeout=10)
    huge.sendall(b"\x16\x03\x01\xff\xff" + b"\x01" * 65535)
    assert _closed_without_answer(huge)
    plain = socket.create_connection(("127.0.0.1", cp.port), timeout=10)
    plain.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _closed_without_answer(plain)

    # a real ClientHello sent one byte at a time still gets a full handshake and an answer
    ctx = ssl.create_default_context(cadata=cp.credentials_data()["ca"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    trickle = socket.create_connection(("127.0.0.1", cp.port), timeout=10)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    for byte in outgoing.read():
        trickle.sendall(bytes([byte]))
        time.sleep(0.0005)
    while True:
        incoming.write(trickle.recv(65536))
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            trickle.sendall(outgoing.read())
    trickle.sendall(outgoing.read())
    tls.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    trickle.sendall(outgoing.read())
    answer = b""
    while b"ok\n" not in answer:
        chunk = trickle.recv(65536)
        assert chunk, answer
        incoming.write(chunk)
        try:
            while data := tls.read(65536):    # one read returns one TLS record: drain them all
                answer += data
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            pass
    assert answer.startswith(b"HTTP/1.1 200")

    # renegotiation (TLS 1.2) is refused; the connection ends, the server does not
    (tmp_path / "root.pem").write_bytes(root_pem(cp))
    proc = subprocess.Popen(["openssl", "s_client", "-connect", f"127.0.0.1:{cp.port}", "-tls1_2",
                             "-CAfile", str(tmp_path / "root.pem")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    lines = []
    try:
        for raw in proc.stdout:
            lines.append(raw.decode(errors="replace"))
            if "Verify return code" in lines[-1] and "---" not in lines[-1]:
                break
        proc.stdin.write(b"R\n")
        proc.stdin.flush()
        rest, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines) + rest.decode(errors="replace")
    assert "RENEGOTIATING" in output and "no renegotiation" in output, output[-2000:]
    assert proc.returncode != 0
    code, body = call(cp, "GET", "/healthz")
    assert code == 200


async def test_a_root_supplied_with_ca_cert_and_ca_key_signs_and_cannot_be_rotated_in_place(tmp_path):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(tmp_path / "ca.key"), "-out", str(tmp_path / "ca.crt"), "-days", "30",
                    "-subj", "/O=cluster.local/CN=corp mesh root", "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign"], check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(tmp_path / "leafish.key"), "-out", str(tmp_path / "leafish.crt"), "-days", "30",
                    "-subj", "/CN=not a ca", "-addext", "basicConstraints=critical,CA:FALSE"],
                   check=True, capture_output=True)
    refused = subprocess.run([sys.executable, "-m", "controlplane.cli", "serve", "--store", f"sqlite:{tmp_path / 'x.db'}",
                              "--listen", "127.0.0.1:0", "--ca-cert", str(tmp_path / "leafish.crt"),
                              "--ca-key", str(tmp_path / "leafish.key")], capture_output=True, text=True, timeout=60,
                             cwd=REPO)
    assert refused.returncode == 1 and "not a CA certificate" in refused.stderr
    cp = ControlPlaneProcess(f"sqlite:{tmp_path / 'cp.db'}", tls=True, log_path=str(tmp_path / "cp.log"),
                             extra_args=["--ca-cert", str(tmp_path / "ca.crt"), "--ca-key", str(tmp_path / "ca.key")]
                             ).start(timeout=30)
    try:
        supplied = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
        assert x509.load_pem_x509_certificate(root_pem(cp)) == supplied
        manager = manager_for(cp, tmp_path)
        cert = await manager.start(timeout=10)
        (tmp_path / "leaf.pem").write_bytes(cert.leaf_pem)
        ok = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "leaf.pem")],
                            capture_output=True, text=True)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        out = meshctl(cp, "ca", "rotate", "prepare")
        assert out.returncode == 1 and "restarting with new files" in out.stderr
    finally:
        cp.stop()
