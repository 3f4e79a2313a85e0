"""The demo's release story (``./scripts/demo``, after the manual split steps):

1. the route goes back to 100% v1, and a ``Canary`` releases v2: the controller shifts traffic
   step by step, judges each step against v1 and promotes v2 automatically;
2. v3 arrives with injected errors (1 request in 10 fails), gets its sidecar and subset, and the
   same Canary applied with ``stable: v2, canary: v3`` starts a new release: the controller sees
   v3 is worse than v2 beyond noise and rolls it back automatically.

Traffic flows through the ingress gateway all along; every second the demo prints the canary's
phase and weight, and what the users saw.  The console's address is printed to watch it live.
"""
from __future__ import annotations

import http.client
import sys
import threading
import time

from .spec import API_VERSION

CANARY_PATH = "/apis/delivery.meshproxy.io/v1/namespaces/default/canaries/demo"
FAILING_APP = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
version, port, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
count = [0]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def do_GET(self):
        count[0] += 1
        failing = every and count[0] % every == 0
        body = (b"injected error\n" if failing else f"hello from demo {version}\n".encode())
        self.send_response(500 if failing else 200); self.send_header("content-length", str(len(body)))
        self.send_header("x-demo-version", version); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def canary(stable: str, canary_subset: str) -> dict:
    return {"apiVersion": API_VERSION, "kind": "Canary", "metadata": {"name": "demo", "namespace": "default"},
            "spec": {"host": "demo.default.svc.cluster.local", "virtualService": "demo", "stable": stable,
                     "canary": canary_subset,
                     "analysis": {"interval": "1s", "threshold": 2, "stepWeights": [10, 30, 60], "minRequests": 50,
                                  "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}},
                                              {"name": "request-duration", "thresholdRange": {"max": 250}}]}}}


class Traffic:
    """One client sending requests through the gateway until stopped; counts what it saw."""

    def __init__(self, port: int, host: str):
        self.port, self.host = port, host
        self.seen: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        conn = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/", headers={"host": self.host})
                resp = conn.getresponse()
                resp.read()
                key = f"{resp.getheader('x-demo-version')} {resp.status}"
            except (OSError, http.client.HTTPException) as exc:
                key = f"error {type(exc).__name__}"
                if conn is not None:
                    conn.close()
                conn = None
            self.seen[key] = self.seen.get(key, 0) + 1
            time.sleep(0.002)
        if conn is not None:
            conn.close()

    def snapshot(self) -> dict[str, int]:
        return dict(self.seen)

    def start(self) -> "Traffic":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _delta(now: dict, before: dict) -> str:
    diff = {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0)}
    total = sum(diff.values()) or 1
    return "  ".join(f"{k}: {100 * v / total:4.0f}%" for k, v in sorted(diff.items())) or "no traffic"


def follow(api, traffic: Traffic, until: tuple[str, ...], timeout: float) -> dict:
    """Print the canary once a second until its phase is one of ``until``; returns its status."""
    deadline = time.monotonic() + timeout
    before = traffic.snapshot()
    status: dict = {}
    while time.monotonic() < deadline:
        time.sleep(1.0)
        status = api.call("GET", CANARY_PATH)[1].get("status") or {}
        now = traffic.snapshot()
        print(f"  {status.get('phase', '?'):16} weight {status.get('canaryWeight', 0):3}%  "
              f"checks {status.get('passedChecks', 0)} passed {status.get('failedChecks', 0)} failed  "
              f"| users saw {_delta(now, before)}", flush=True)
        before = now
        if status.get("phase") in until:
            return status
    return status


def release_story(api, mesh, cp_url: str, gw_port: int, apply_obj, spawn_sidecar, free_port) -> bool:
    print(f"\nstep 4: progressive delivery. Watch it in the console: {cp_url}/ui#canaries (token above)", flush=True)
    apply_obj({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
               "metadata": {"name": "demo", "namespace": "default"},
               "spec": {"hosts": ["demo.default.svc.cluster.local", "demo.example.com"],
                        "gateways": ["ingress", "mesh"],
                        "http": [{"name": "main", "route": [{"destination": {
                            "host": "demo.default.svc.cluster.local", "subset": "v1"}}]}]}})
    print("  VirtualService demo back to 100% v1; applying Canary demo (v1 -> v2, steps 10/30/60%, 1 s checks):")
    traffic = Traffic(gw_port, "demo.example.com").start()
    try:
        time.sleep(1.0)
        code, body = api.call("PUT", CANARY_PATH, canary("v1", "v2"))
        if code >= 300:
            print(f"  NOT OK: the Canary was refused: {body.get('message')}")
            return False
        first = follow(api, traffic, ("Succeeded", "Failed"), 60)
        print(f"  -> {first.get('phase')}: {first.get('message')}")

        print("\nstep 5: v3 with injected errors (1 request in 10 fails): its sidecar registers it, the "
              "DestinationRule gains subset v3, and the Canary is applied again with stable v2, canary v3:")
        app_port, listen, admin = free_port(), free_port(), free_port()
        mesh.spawn("app-v3", [sys.executable, "-c", FAILING_APP, "v3", str(app_port), "10"])
        spawn_sidecar("v3", app_port, listen, admin)
        dr = api.call("GET", "/apis/networking.istio.io/v1/namespaces/default/destinationrules/demo")[1]
        dr["spec"]["subsets"] = [s for s in dr["spec"]["subsets"] if s["name"] != "v3"] + [
            {"name": "v3", "labels": {"version": "v3"}}]
        apply_obj(dr)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
                w["labels"].get("version") == "v3" for w in
                api.call("GET", "/registry/v1/namespaces/default/services/demo/endpoints")[1]["items"]):
            time.sleep(0.2)
        code, body = api.call("PUT", CANARY_PATH, canary("v2", "v3"))
        if code >= 300:
            print(f"  NOT OK: the Canary was refused: {body.get('message')}")
            return False
        second = follow(api, traffic, ("Succeeded", "Failed"), 60)
        print(f"  -> {second.get('phase')}: {second.get('message')}")
        decision = second.get("lastDecision") or {}
        window = decision.get("window") or {}
        if window:
            print(f"     decided on canary {window['canary']['requests']} requests / {window['canary']['errors']} errors "
                  f"vs stable {window['stable']['requests']} / {window['stable']['errors']}")
        time.sleep(1.5)
        after = traffic.snapshot()
        time.sleep(2.0)
        tail = {k: v - after.get(k, 0) for k, v in traffic.snapshot().items() if v - after.get(k, 0)}
    finally:
        traffic.stop()
    print(f"  after the rollback, users see: {tail}")
    print("  meshctl canary status demo / meshctl history show every step; meshctl rollback undoes any of them")
    ok = (first.get("phase") == "Succeeded" and second.get("phase") == "Failed"
          and set(tail) == {"v2 200"})
    print("  OK: v2 promoted automatically, v3 rolled back automatically, 100% v2 again" if ok else
          "  NOT OK: the release story did not end as expected")
    return ok
