"""`make demo`: a local mesh on one machine, driven through the control plane's API.

1. the control plane on its embedded store (a temporary SQLite file), serving TLS with its CA;
2. `configs/`: ServiceEntry + DestinationRule (v1/v2 subsets) + Gateway + a 90/10 canary, a STRICT
   PeerAuthentication for the namespace and an AuthorizationPolicy that lets only the ingress
   gateway call demo;
3. every proxy joins as an operator would start it: a bootstrap token from
   `meshctl token create --namespace default --service-account SA`, the root from `meshctl ca root`,
   then `meshproxy run --control-plane https://... --ca-file root.pem --token-file TOKEN
   --service-account SA ...`: two versions of a tiny demo HTTP service with sidecars (service
   account demo), the ingress gateway (ingress-gateway) and a client workload, sleep (sleep);
4. zero trust: a plaintext caller is refused by STRICT, sleep gets 403 `RBAC: access denied`, the
   policy step lets it in; `meshctl proxies` shows every identity and certificate expiry;
5. traffic through the gateway (over mutual TLS to the sidecars), the observed split printed live;
6. the canary moved to 50/50 through the API (configs/steps/), and the split follows;
7. progressive delivery (controlplane/delivery/demo.py): a Canary promotes v2 automatically, then
   v3 with injected errors is rolled back automatically; the console's address is printed.

Every process is started here and stopped here; the whole run is bounded.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from .cli import Client, cert_expiry, main as cli_main
from .delivery.console import parse_security
from .delivery.demo import release_story
from .resources import lookup_kind
from .testing import ControlPlaneProcess, free_ports

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

APP = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
version, port = sys.argv[1], int(sys.argv[2])
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True   # head and body are two writes: without this, ~40 ms delayed-ACK stalls
    def do_GET(self):
        body = f"hello from demo {version}\n".encode()
        self.send_response(200); self.send_header("content-length", str(len(body)))
        self.send_header("x-demo-version", version); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


class Mesh:
    """The processes of the demo; closes them in reverse order of start.

    With ``api`` and ``ca_file`` (a TLS control plane) every proxy joins with a workload
    identity: a single-use bootstrap token per proxy, bound to its namespace and service
    account.  Without them (an ``--insecure-loopback`` control plane) proxies join without one."""

    def __init__(self, workdir: Path, quiet: bool, api: Client | None = None, ca_file: str = ""):
        self.workdir = workdir
        self.quiet = quiet
        self.api = api
        self.ca_file = ca_file
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.cp: ControlPlaneProcess | None = None

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=REPO)
        self.procs.append((name, proc))
        return proc

    def identity_args(self, name: str, service_account: str, namespace: str = "default") -> list[str]:
        """The flags a proxy joins with: ``--namespace``, and on a TLS control plane its
        workload identity (``--ca-file --token-file --service-account``)."""
        if not self.ca_file:
            return ["--namespace", namespace]
        token = meshctl(self, "token", "create", "--namespace", namespace, "--service-account", service_account,
                        "--ttl", "10m").splitlines()[0]
        path = self.workdir / f"{name}.token"
        path.write_text(token + "\n")
        path.chmod(0o600)
        return ["--namespace", namespace, "--ca-file", self.ca_file, "--token-file", str(path),
                "--service-account", service_account]

    def close(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for name, proc in reversed(self.procs):
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self.cp:
            self.cp.stop()


def meshctl(mesh: Mesh, *argv: str) -> str:
    """Run a meshctl command (the real CLI, in this process) against the demo's control plane;
    its standard output.  Fails with meshctl's error."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(["--server", mesh.cp.url, "--credentials", mesh.cp.credentials, *argv])
    if code != 0:
        raise RuntimeError(f"demo: meshctl {' '.join(argv)} failed: {err.getvalue().strip()}")
    return out.getvalue()


def spawn_proxies(mesh: Mesh, control_plane: str, ports: list[int], gw_admin: int, prefix: str = "demo") -> None:
    """Two app versions with their sidecars (registering as service demo) and the ingress gateway.
    ``ports``: 7 free ports (app, listen, admin for v1 and v2; the gateway's default listener)."""
    python = sys.executable
    for version, (app_port, listen, admin) in zip(("v1", "v2"), (ports[0:3], ports[3:6])):
        mesh.spawn(f"app-{version}", [python, "-c", APP, version, str(app_port)])
        spawn_sidecar(mesh, control_plane, version, app_port, listen, admin, prefix)
    mesh.spawn("ingress", [
        python, "-m", "meshproxy", "run", "--control-plane", control_plane, "--node-id", f"{prefix}-ingress",
        *mesh.identity_args("ingress", "ingress-gateway"),
        "--mode", "gateway", "--labels", "istio=ingressgateway,app=istio-ingressgateway", "--gateway-bind", "127.0.0.1",
        "--listen", f"127.0.0.1:{ports[6]}", "--admin", f"127.0.0.1:{gw_admin}"])


def spawn_sidecar(mesh: Mesh, control_plane: str, version: str, app_port: int, listen: int, admin: int,
                  prefix: str = "demo", inbound: int | None = None) -> int:
    """The sidecar of one demo version: registers the workload (service demo, version label) and
    serves it on its inbound port (returned), where peers reach it (over mTLS when it has an identity)."""
    inbound = inbound or free_ports(1)[0]
    mesh.spawn(f"sidecar-{version}", [
        sys.executable, "-m", "meshproxy", "run", "--control-plane", control_plane, "--node-id", f"{prefix}-{version}",
        *mesh.identity_args(f"sidecar-{version}", "demo"),
        "--service", "demo", "--labels", f"app=demo,version={version}",
        "--app-port", str(app_port), "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}",
        "--inbound-port", str(inbound)])
    return inbound


def spawn_client(mesh: Mesh, control_plane: str, listen: int, admin: int, prefix: str = "demo") -> None:
    """sleep: a workload that only calls others (Istio's sample client); its sidecar's outbound
    listener takes the app's plaintext requests and originates mTLS with sleep's identity."""
    mesh.spawn("sidecar-sleep", [
        sys.executable, "-m", "meshproxy", "run", "--control-plane", control_plane, "--node-id", f"{prefix}-sleep",
        *mesh.identity_args("sidecar-sleep", "sleep"), "--labels", "app=sleep",
        "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}"])


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, http.client.HTTPException):
            if predicate():
                return
        time.sleep(0.1)
    raise TimeoutError(f"demo: {what} did not happen within {timeout:.0f} s")


def apply_file(api: Client, path: Path, patch=None) -> list[str]:
    lines = []
    for obj in yaml.safe_load_all(path.read_text()):
        if obj is None:
            continue
        if patch:
            patch(obj)
        md = obj["metadata"]
        ns = md.get("namespace", "default")
        kind = lookup_kind(obj["kind"])
        code, body = api.call("PUT", f"/apis/{kind.group}/v1/namespaces/{ns}/{kind.plural}/{md['name']}", obj)
        if code >= 300:
            raise RuntimeError(f"demo: applying {path.name} failed: {body.get('message')}")
        lines.append(f"{obj['kind']} {ns}/{md['name']} -> resourceVersion {body['metadata']['resourceVersion']}")
    return lines


class GatewayClient:
    """One keep-alive connection to the gateway (re-opened after an error)."""

    def __init__(self, port: int, host: str):
        self.port, self.host, self.conn = port, host, None

    def send(self) -> str:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            self.conn.request("GET", "/", headers={"host": self.host})
            resp = self.conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None
            raise
        if resp.status >= 500:
            return f"status {resp.status}"
        return resp.getheader("x-demo-version") or f"status {resp.status}"


def send(port: int, host: str) -> str:
    """One request on its own connection: the version that answered, or the status."""
    client = GatewayClient(port, host)
    try:
        return client.send()
    finally:
        if client.conn is not None:
            client.conn.close()


def measure(port: int, host: str, seconds: float, label: str) -> dict[str, int]:
    """Send traffic for ``seconds``; every second print the live view: the split so far,
    and per destination version the last second's requests/s, success rate and p99."""
    client = GatewayClient(port, host)
    counts: dict[str, int] = {}
    window: dict[str, list[float]] = {}
    end = time.monotonic() + seconds
    next_print = time.monotonic() + 1
    while time.monotonic() < end:
        t0 = time.monotonic()
        try:
            outcome = client.send()
        except (OSError, http.client.HTTPException) as exc:
            outcome = f"error {type(exc).__name__}"
        counts[outcome] = counts.get(outcome, 0) + 1
        window.setdefault(outcome, []).append(time.monotonic() - t0)
        if time.monotonic() >= next_print:
            next_print += 1
            print(f"  {label}: " + split_line(counts), flush=True)
            print("         " + live_line(window), flush=True)
            window = {}
    if client.conn is not None:
        client.conn.close()
    return counts


def live_line(window: dict[str, list[float]]) -> str:
    total = sum(len(v) for v in window.values()) or 1
    errors = sum(len(v) for k, v in window.items() if k not in ("v1", "v2"))
    parts = []
    for version in ("v1", "v2"):
        lat = sorted(window.get(version, []))
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else 0.0
        parts.append(f"{version}: {len(lat):4d} req/s p99 {p99:5.1f} ms")
    return "   ".join(parts) + f"   success {100 * (total - errors) / total:5.1f}%"


def split_line(counts: dict[str, int]) -> str:
    total = sum(counts.values()) or 1
    return "  ".join(f"{k}={100 * v / total:5.1f}% ({v})" for k, v in sorted(counts.items())) + f"  total={total}"


@dataclass
class Demo:
    """The running demo mesh: its processes, the admin API and the ports to reach it by."""
    mesh: Mesh
    api: Client
    gw_port: int            # the ingress gateway's listener (Host demo.example.com)
    sleep_port: int         # sleep's sidecar: its outbound listener (Host demo.default.svc.cluster.local)
    inbound: dict           # version -> the port its sidecar serves peers on (STRICT mTLS)
    admins: dict            # v1, v2, ingress, sleep -> its proxy's admin port


def bring_up(workdir: Path, say=print, prefix: str = "demo", patch=None) -> Demo:
    """The control plane with its CA, the configs (``patch`` may change the DestinationRule and
    VirtualService), and every proxy joined with its identity, converged and routing."""
    cp = ControlPlaneProcess(f"sqlite:{workdir / 'mesh.db'}", log_path=str(workdir / "controlplane.log"), ttl=5.0,
                             tls=True)
    cp.credentials = str(workdir / "credentials.json")
    mesh = Mesh(workdir, quiet=True)
    try:
        mesh.cp = cp.start(30)
        creds = cp.credentials_data()
        mesh.api = api = Client(cp.url, token=creds["token"], ca_pem=creds["ca"])
        mesh.ca_file = str(workdir / "root.pem")
        Path(mesh.ca_file).write_text(meshctl(mesh, "ca", "root"))
        say(f"control plane: {cp.url} (TLS from its own CA; admin credentials {cp.credentials}; logs in {workdir})")
        say(f"  $ meshctl ca root > {mesh.ca_file}        # the trust bundle every proxy gets as --ca-file")
        gw_port, gw_admin, sleep_port, sleep_admin, *ports = free_ports(11)

        def gateway_port(obj):
            obj["spec"]["servers"][0]["port"]["number"] = gw_port     # a free port instead of 8080

        for name, change, note in (
                ("demo-serviceentry.yaml", None, ""), ("demo-destinationrule.yaml", patch, ""),
                ("demo-gateway.yaml", gateway_port, f" (port {gw_port})"),
                ("demo-virtualservice.yaml", patch, "  (90% v1 / 10% v2)"),
                ("demo-peerauthentication.yaml", None, "  (mTLS STRICT in namespace default)"),
                ("demo-authorizationpolicy.yaml", None, "  (only the ingress gateway may call demo)")):
            for line in apply_file(api, CONFIGS / name, change):
                say(f"  applied {line}{note}")

        say("every proxy joins with its own workload identity (a single-use bootstrap token each):")
        for sa in ("demo", "ingress-gateway", "sleep"):
            say(f"  $ meshctl token create --namespace default --service-account {sa} > {sa}.token")
        say(f"  $ meshproxy run --control-plane {cp.url} --ca-file root.pem --token-file demo.token "
            f"--service-account demo ...")
        spawn_proxies(mesh, cp.url, ports[:7], gw_admin, prefix)
        spawn_client(mesh, cp.url, sleep_port, sleep_admin, prefix)
        def converged():
            proxies = api.call("GET", "/push/v1/proxies")[1].get("items", [])
            endpoints = api.call("GET", "/registry/v1/namespaces/default/services/demo/endpoints")[1]["items"]
            return (len(endpoints) == 2 and len(proxies) == 4 and all(p["state"] == "acked" for p in proxies)
                    and all(p.get("principal") for p in proxies))

        wait_for(converged, 45, "two registered workloads and four proxies with certificates ACKing")
        wait_for(lambda: send(gw_port, "demo.example.com") in ("v1", "v2"), 10, "the gateway routing to demo")
        inbound = {}
        for w in api.call("GET", "/registry/v1/namespaces/default/services/demo/endpoints")[1]["items"]:
            inbound[w["labels"]["version"]] = w["proxy_port"]
        admins = {p["node_id"].removeprefix(f"{prefix}-"): int(p["admin"].rsplit(":", 1)[1])
                  for p in api.call("GET", "/push/v1/proxies")[1]["items"] if p.get("admin")}
        return Demo(mesh, api, gw_port, sleep_port, inbound, admins)
    except BaseException:
        mesh.close()
        raise


def plaintext_call(port: int) -> str:
    """A caller without a certificate, straight to a sidecar's inbound port: what it got."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
        conn.request("GET", "/", headers={"host": "demo.default.svc.cluster.local"})
        resp = conn.getresponse()
        return f"{resp.status} {resp.read()[:40]!r}"
    except (OSError, http.client.HTTPException) as exc:
        return f"refused ({type(exc).__name__}: the connection was closed without an answer)"


def call_as_sleep(port: int) -> tuple[int, str]:
    """sleep's app calling demo through its sidecar: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request("GET", "/", headers={"host": "demo.default.svc.cluster.local"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace").strip()
    finally:
        conn.close()


def _security(admin_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats/prometheus", timeout=5) as resp:
        return parse_security(resp.read().decode())


def inbound_mtls(admin_port: int) -> dict[tuple[str, str], int]:
    """A sidecar's served requests (Istio's reporter="destination") by (caller principal,
    connection_security_policy), from its Prometheus endpoint (what the console's edges show)."""
    return {k: v for k, v in _security(admin_port)["inbound"].items() if v}


def handshake_failures(admin_port: int) -> dict[str, int]:
    """A proxy's connections refused before any request, by reason."""
    return _security(admin_port)["refused"]


def zero_trust_step(demo: Demo, say=print) -> bool:
    """STRICT refuses plaintext; the AuthorizationPolicy denies sleep (403), then lets it in."""
    ok = True
    got = plaintext_call(demo.inbound["v1"])
    refused = handshake_failures(demo.admins["v1"])
    say(f"  plaintext caller -> demo v1's sidecar (127.0.0.1:{demo.inbound['v1']}): {got}\n"
        f"    its sidecar counted meshproxy_tls_handshake_failures_total{{reason=\"plaintext_refused\"}} "
        f"{refused.get('plaintext_refused', 0)}")
    ok &= got.startswith("refused") and refused.get("plaintext_refused", 0) >= 1
    status, body = call_as_sleep(demo.sleep_port)
    say(f"  sleep -> demo over mTLS as spiffe://cluster.local/ns/default/sa/sleep: {status} {body}")
    ok &= (status, body) == (403, "RBAC: access denied")
    for line in apply_file(demo.api, CONFIGS / "steps" / "demo-authorizationpolicy-sleep.yaml"):
        say(f"  applied {line}  (sleep may call demo too)")
    wait_for(lambda: call_as_sleep(demo.sleep_port)[0] == 200, 10, "sleep allowed")
    status, body = call_as_sleep(demo.sleep_port)
    say(f"  sleep -> demo: {status} {body}")
    ok &= status == 200
    return ok


def run(seconds_per_step: float, quiet: bool, release: bool = True) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="meshproxy-demo-"))
    started = time.monotonic()
    demo = bring_up(workdir)
    mesh, api, gw_port = demo.mesh, demo.api, demo.gw_port
    try:
        print("\n$ meshctl proxies        # (its NODE, IDENTITY, CERT EXPIRES and STATE columns)")
        for p in json.loads(meshctl(mesh, "proxies", "-o", "json"))["items"]:
            print(f"  {p['node_id']:13} {p['principal'] or '-':54} {cert_expiry(p):33} {p['state']}")
        console_token = meshctl(mesh, "token", "create", "--scope", "edit", "--name", "console").splitlines()[0]
        print(f"\nconsole (live view: identities, certificate expiry, mTLS per edge): {mesh.cp.url}/ui#mesh\n"
              f"  log in with the token {console_token}; the page's certificate is from the mesh CA "
              f"({mesh.ca_file}): accept it or trust that file")

        print("\nstep 1: zero trust (PeerAuthentication STRICT, AuthorizationPolicy demo-callers):")
        ok = zero_trust_step(demo)

        print(f"\nstep 2: traffic through the ingress gateway (127.0.0.1:{gw_port}, Host demo.example.com), 90/10:")
        first = measure(gw_port, "demo.example.com", seconds_per_step, "90/10")
        before = {p["node_id"]: p["acked_version"] for p in api.call("GET", "/push/v1/proxies")[1]["items"]}
        applied_at = time.monotonic()
        for line in apply_file(api, CONFIGS / "steps" / "demo-virtualservice-50-50.yaml"):
            print(f"\nstep 3: applied {line}  (50% v1 / 50% v2) through the API")
        wait_for(lambda: all(p["state"] == "acked" and p["acked_version"] != before.get(p["node_id"])
                             for p in api.call("GET", "/push/v1/proxies")[1]["items"]), 10, "proxies ACKing 50/50")
        print(f"  every proxy ACKed the new version {1000 * (time.monotonic() - applied_at):.0f} ms after the apply")
        second = measure(gw_port, "demo.example.com", seconds_per_step, "50/50")
        print("\nresult:")
        print("  90/10 step: " + split_line(first))
        print("  50/50 step: " + split_line(second))
        for version in ("v1", "v2"):
            seen = inbound_mtls(demo.admins[version])
            print(f"  demo {version}'s sidecar served: " + ", ".join(
                f"{n} from {principal or 'unknown'} ({policy})" for (principal, policy), n in sorted(seen.items())))
            ok &= bool(seen) and all(policy == "mutual_tls" for _, policy in seen)
        errors = sum(v for k, v in {**first, **second}.items() if k not in ("v1", "v2"))
        share_v2 = second.get("v2", 0) / max(1, sum(second.values()))
        ok = ok and errors == 0 and 0.35 <= share_v2 <= 0.65 and first.get("v2", 0) / max(1, sum(first.values())) < 0.25
        print("  OK: every hop mutual TLS, the split followed the API change with no failed request" if ok else
              f"  NOT OK: {errors} failed requests, plaintext served or the split did not follow (see logs in {workdir})")
        if release:
            def apply_obj(obj):
                kind = lookup_kind(obj["kind"])
                code, body = api.call("PUT", f"/apis/{kind.group}/v1/namespaces/default/{kind.plural}/"
                                             f"{obj['metadata']['name']}", obj)
                if code >= 300:
                    raise RuntimeError(f"demo: applying {obj['kind']} failed: {body.get('message')}")

            released = release_story(api, mesh, mesh.cp.url, gw_port, apply_obj,
                                     lambda v, app, listen, admin: spawn_sidecar(mesh, mesh.cp.url, v, app, listen,
                                                                                 admin),
                                     lambda: free_ports(1)[0])
            ok = ok and released
            if not released:
                print(f"  (logs in {workdir})")
        print(f"\ndemo {'OK' if ok else 'NOT OK'} in {time.monotonic() - started:.0f} s")
        return 0 if ok else 1
    finally:
        mesh.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controlplane.demo")
    parser.add_argument("--seconds", type=float, default=8.0, help="traffic per step (default 8)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--no-release", action="store_true", help="skip the progressive-delivery story (steps 3-4)")
    args = parser.parse_args(argv)
    return run(args.seconds, args.quiet, release=not args.no_release)


if __name__ == "__main__":
    sys.exit(main())
