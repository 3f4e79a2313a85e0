"""Zero trust over real processes: a TLS control plane issues workload certificates to two
sidecars (`meshproxy run --token-file ...`); the client sidecar's auto mTLS reaches the
server sidecar's explicit inbound listener, which a STRICT PeerAuthentication guards and an
AuthorizationPolicy narrows to one caller; plaintext to it is refused.  The control plane
tells the client which endpoints have a sidecar (their registered SPIFFE id)."""
from __future__ import annotations

import json
import ssl
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

from controlplane.testing import ControlPlaneProcess, free_ports

REPO = Path(__file__).resolve().parents[2]

POLICIES = textwrap.dedent("""\
    apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {name: default, namespace: shop}
    spec: {mtls: {mode: STRICT}}
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: httpbin-callers, namespace: shop}
    spec:
      selector: {matchLabels: {app: httpbin}}
      rules:
      - from: [{source: {principals: ["cluster.local/ns/shop/sa/cart"]}}]
    """)


def _api(cp, method: str, path: str, body=None) -> tuple[int, dict]:
    creds = cp.credentials_data()
    req = urllib.request.Request(cp.url + path, data=json.dumps(body).encode() if body is not None else None,
                                 method=method, headers={"content-type": "application/json",
                                                         "authorization": f"Bearer {creds['token']}"})
    try:
        with urllib.request.urlopen(req, timeout=10, context=ssl.create_default_context(cadata=creds["ca"])) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _sidecar(cp, tmp_path: Path, sa: str, *extra: str) -> tuple[subprocess.Popen, int]:
    code, body = _api(cp, "POST", "/security/v1/bootstrap-tokens",
                      {"namespace": "shop", "service_account": sa, "ttl": 600})
    assert code == 201, body
    (tmp_path / f"{sa}.token").write_text(body["token"])
    listen, admin = free_ports(2)
    log = open(tmp_path / f"{sa}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "meshproxy", "run", "--control-plane", cp.url,
                             "--ca-file", str(tmp_path / "root.pem"), "--token-file", str(tmp_path / f"{sa}.token"),
                             "--namespace", "shop", "--service-account", sa, "--listen", f"127.0.0.1:{listen}",
                             "--admin", f"127.0.0.1:{admin}", *extra], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    proc.admin = admin
    return proc, listen


def _metrics(proc) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.admin}/metrics", timeout=5) as r:
            return "\n".join(l for l in r.read().decode().splitlines()
                             if ("handshake" in l or "authz" in l or "connect_fail" in l) and not l.startswith("#"))
    except OSError as exc:
        return str(exc)


def _requests(proc, *want: str) -> list[str]:
    """The istio_requests_total lines of a sidecar that carry every label in ``want``."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.admin}/stats/prometheus", timeout=5) as r:
            return [l for l in r.read().decode().splitlines()
                    if l.startswith("istio_requests_total{") and all(w in l for w in want)]
    except OSError:          # (a scrape that meets a reset under load: asked again)
        return []


def _get(port: int, host: str = "httpbin.shop") -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def _eventually(fn, want, timeout: float, what: str, logs=()):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if want(last):
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: last {last!r}\n" + "\n".join(p.read_text(errors="replace")[-3000:] for p in logs))


def test_auto_mtls_strict_and_authorization_between_real_sidecars(tmp_path):
    app_port, inbound = free_ports(2)
    app = subprocess.Popen([sys.executable, "-m", "http.server", str(app_port), "--bind", "127.0.0.1",
                            "--directory", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cp = ControlPlaneProcess(f"sqlite:{tmp_path / 'cp.db'}", tls=True, log_path=str(tmp_path / "cp.log")).start(
        timeout=30)
    procs = [app]
    try:
        code, body = _api(cp, "GET", "/security/v1/ca/roots")
        assert code == 200, body
        (tmp_path / "root.pem").write_text("".join(body["roots"]))
        applied = subprocess.run([sys.executable, "-m", "controlplane.cli", "--credentials", cp.credentials,
                                  "apply", "-f", "-"], input=POLICIES, capture_output=True, text=True, timeout=30,
                                 cwd=REPO)
        assert applied.returncode == 0, applied.stderr
        server, _ = _sidecar(cp, tmp_path, "httpbin", "--service", "httpbin", "--labels", "app=httpbin",
                             "--app-port", f"http:{app_port}", "--inbound-port", str(inbound))
        procs.append(server)
        cart, cart_port = _sidecar(cp, tmp_path, "cart", "--labels", "app=cart,version=v1")
        procs.append(cart)
        logs = [tmp_path / "httpbin.log", tmp_path / "cart.log"]
        # (a caller the policy does not name is denied with 403: test_auto_mtls.py, in process)
        _eventually(lambda: _get(cart_port), lambda r: r[0] == 200, 30, "cart -> httpbin over mTLS", logs)
        # read until the counter shows (a scrape can meet a reset under load: scraped again, as Prometheus would)
        _eventually(lambda: _metrics(server), lambda m: 'decision="allowed",policy="shop/httpbin-callers"' in m,
                    30, "the allowed request counted by policy", logs)
        # the two sidecars told each other their workloads (peer metadata exchange over mTLS)
        _eventually(lambda: _requests(server, 'reporter="destination"', 'source_workload="cart-v1"',
                                      'source_workload_namespace="shop"', 'source_app="cart"', 'source_version="v1"',
                                      'source_principal="spiffe://cluster.local/ns/shop/sa/cart"'),
                    bool, 30, "the server's series name the caller's workload", logs)
        _eventually(lambda: _requests(cart, 'reporter="source"', 'destination_workload="httpbin"',
                                      'destination_app="httpbin"',
                                      'destination_principal="spiffe://cluster.local/ns/shop/sa/httpbin"',
                                      'source_principal="spiffe://cluster.local/ns/shop/sa/cart"'),
                    bool, 30, "the client's series name the destination's workload", logs)
        # plaintext straight to the STRICT inbound listener: closed without an answer
        assert _get(inbound) == (0, b"")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        cp.stop()
