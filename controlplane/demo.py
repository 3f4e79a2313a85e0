"""`make demo`: a local mesh on one machine, driven through the control plane's API.

1. the control plane on its embedded store (a temporary SQLite file);
2. two versions of a tiny demo HTTP service, each with a sidecar
   (`meshproxy run --control-plane URL --service demo --labels version=vN --app-port P`)
   that registers the workload;
3. an ingress gateway proxy (`meshproxy run --control-plane URL --mode gateway`);
4. `configs/`: ServiceEntry + DestinationRule (v1/v2 subsets) + Gateway + a 90/10 canary;
5. traffic through the gateway, the observed split printed live;
6. the canary moved to 50/50 through the API (configs/steps/), and the split follows;
7. progressive delivery (controlplane/delivery/demo.py): a Canary promotes v2 automatically, then
   v3 with injected errors is rolled back automatically; the console's address is printed.

Every process is started here and stopped here; the whole run is bounded (about 30 s).
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from .cli import Client
from .delivery.demo import release_story
from .resources import GROUP, lookup_kind
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
    """The processes of the demo; closes them in reverse order of start."""

    def __init__(self, workdir: Path, quiet: bool):
        self.workdir = workdir
        self.quiet = quiet
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.cp: ControlPlaneProcess | None = None

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=REPO)
        self.procs.append((name, proc))
        return proc

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


def spawn_proxies(mesh: Mesh, control_plane: str, ports: list[int], gw_admin: int, prefix: str = "demo") -> None:
    """Two app versions with their sidecars (registering as service demo) and the ingress gateway.
    ``ports``: 7 free ports (app, listen, admin for v1 and v2; the gateway's default listener)."""
    python = sys.executable
    for version, (app_port, listen, admin) in zip(("v1", "v2"), (ports[0:3], ports[3:6])):
        mesh.spawn(f"app-{version}", [python, "-c", APP, version, str(app_port)])
        spawn_sidecar(mesh, control_plane, version, app_port, listen, admin, prefix)
    mesh.spawn("ingress", [
        python, "-m", "meshproxy", "run", "--control-plane", control_plane, "--node-id", f"{prefix}-ingress",
        "--mode", "gateway", "--labels", "istio=ingressgateway,app=istio-ingressgateway", "--gateway-bind", "127.0.0.1",
        "--listen", f"127.0.0.1:{ports[6]}", "--admin", f"127.0.0.1:{gw_admin}"])


def spawn_sidecar(mesh: Mesh, control_plane: str, version: str, app_port: int, listen: int, admin: int,
                  prefix: str = "demo") -> None:
    """The sidecar of one demo version: registers the workload (service demo, version label)."""
    mesh.spawn(f"sidecar-{version}", [
        sys.executable, "-m", "meshproxy", "run", "--control-plane", control_plane, "--node-id", f"{prefix}-{version}",
        "--service", "demo", "--namespace", "default", "--labels", f"app=demo,version={version}",
        "--app-port", str(app_port), "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}",
        "--inbound-port", str(free_ports(1)[0])])      # peers reach the app through this sidecar


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
        plural = lookup_kind(obj["kind"]).plural
        code, body = api.call("PUT", f"/apis/{GROUP}/v1/namespaces/{ns}/{plural}/{md['name']}", obj)
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


def run(seconds_per_step: float, quiet: bool, release: bool = True) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="meshproxy-demo-"))
    mesh = Mesh(workdir, quiet)
    try:
        cp = mesh.cp = ControlPlaneProcess(f"sqlite:{workdir / 'mesh.db'}", log_path=str(workdir / "controlplane.log"),
                                           ttl=5.0).start()
        api = Client(cp.url)
        print(f"control plane: {cp.url} (store {workdir / 'mesh.db'}; logs in {workdir})")
        gw_port, gw_admin, *ports = free_ports(9)
        for f in ("demo-serviceentry.yaml", "demo-destinationrule.yaml"):
            for line in apply_file(api, CONFIGS / f):
                print(f"  applied {line}")

        def gateway_port(obj):
            obj["spec"]["servers"][0]["port"]["number"] = gw_port     # a free port instead of 8080

        for line in apply_file(api, CONFIGS / "demo-gateway.yaml", gateway_port):
            print(f"  applied {line} (port {gw_port})")
        for line in apply_file(api, CONFIGS / "demo-virtualservice.yaml"):
            print(f"  applied {line}  (90% v1 / 10% v2)")

        spawn_proxies(mesh, cp.url, ports, gw_admin)

        def converged():
            proxies = api.call("GET", "/push/v1/proxies")[1].get("items", [])
            endpoints = api.call("GET", "/registry/v1/namespaces/default/services/demo/endpoints")[1]["items"]
            return len(endpoints) == 2 and len(proxies) == 3 and all(p["state"] == "acked" for p in proxies)

        wait_for(converged, 20, "two registered workloads and three proxies ACKing")
        wait_for(lambda: send(gw_port, "demo.example.com") in ("v1", "v2"), 10, "the gateway routing to demo")
        print("\nmeshctl proxies:")
        for p in api.call("GET", "/push/v1/proxies")[1]["items"]:
            print(f"  {p['node_id']:16} {p['mode']:8} {p['state']:7} acked={p['acked_version']}")

        print(f"\nstep 1: traffic through the ingress gateway (127.0.0.1:{gw_port}, Host demo.example.com), 90/10:")
        first = measure(gw_port, "demo.example.com", seconds_per_step, "90/10")
        before = {p["node_id"]: p["acked_version"] for p in api.call("GET", "/push/v1/proxies")[1]["items"]}
        applied_at = time.monotonic()
        for line in apply_file(api, CONFIGS / "steps" / "demo-virtualservice-50-50.yaml"):
            print(f"\nstep 2: applied {line}  (50% v1 / 50% v2) through the API")
        wait_for(lambda: all(p["state"] == "acked" and p["acked_version"] != before.get(p["node_id"])
                             for p in api.call("GET", "/push/v1/proxies")[1]["items"]), 10, "proxies ACKing 50/50")
        print(f"  every proxy ACKed the new version {1000 * (time.monotonic() - applied_at):.0f} ms after the apply")
        second = measure(gw_port, "demo.example.com", seconds_per_step, "50/50")
        print("\nresult:")
        print("  90/10 step: " + split_line(first))
        print("  50/50 step: " + split_line(second))
        errors = sum(v for k, v in {**first, **second}.items() if k not in ("v1", "v2"))
        share_v2 = second.get("v2", 0) / max(1, sum(second.values()))
        ok = errors == 0 and 0.35 <= share_v2 <= 0.65 and first.get("v2", 0) / max(1, sum(first.values())) < 0.25
        print("  OK: the split followed the API change with no failed request" if ok else
              f"  NOT OK: {errors} failed requests or the split did not follow (see logs in {workdir})")
        if release:
            def apply_obj(obj):
                kind = lookup_kind(obj["kind"])
                code, body = api.call("PUT", f"/apis/{kind.group}/v1/namespaces/default/{kind.plural}/"
                                             f"{obj['metadata']['name']}", obj)
                if code >= 300:
                    raise RuntimeError(f"demo: applying {obj['kind']} failed: {body.get('message')}")

            released = release_story(api, mesh, cp.url, gw_port, apply_obj,
                                     lambda v, app, listen, admin: spawn_sidecar(mesh, cp.url, v, app, listen, admin),
                                     lambda: free_ports(1)[0])
            ok = ok and released
            if not released:
                print(f"  (logs in {workdir})")
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
