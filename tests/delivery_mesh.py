"""Real parts for the canary tests: versions of a service the test controls (good, failing,
slow), the real control plane, a real ingress gateway proxy, and users sending traffic.

One ``DeliveryMesh`` (control plane + gateway) serves a whole test module; each test adds its
own service (its own host), so tests never see each other's canaries.
"""
from __future__ import annotations

import http.client
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from controlplane.cli import Client
from controlplane.testing import ControlPlaneProcess, free_ports

ROOT = Path(__file__).resolve().parents[1]
NETWORKING = "/apis/networking.istio.io/v1/namespaces/default"
DELIVERY = "/apis/delivery.meshproxy.io/v1/namespaces/default"


class VersionApp:
    """One version of a service: answers 200 with ``x-version``; every ``error_every``-th request
    is a 500; each answer waits ``delay`` seconds.  All three can change while it runs."""

    def __init__(self, version: str, *, error_every: int = 0, delay: float = 0.0):
        self.version, self.error_every, self.delay = version, error_every, delay
        self.count = 0
        self._lock = threading.Lock()
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def do_GET(self):
                with app._lock:
                    app.count += 1
                    n = app.count
                if app.delay:
                    time.sleep(app.delay)
                failing = app.error_every and n % app.error_every == 0
                body = f"{app.version}\n".encode()
                self.send_response(500 if failing else 200)
                self.send_header("content-length", str(len(body)))
                self.send_header("x-version", app.version)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Users:
    """``users`` clients sending GETs through the gateway back to back (``pause`` between), each
    with its own keep-alive connection and cookie; every outcome recorded with its time."""

    def __init__(self, port: int, host: str, *, users: int = 2, pause: float = 0.0, cookies: bool = False,
                 headers: dict | None = None, new_session_until: str = "", new_session_after: int = 5):
        """``new_session_until``: a client whose session (cookie) has not reached that version
        after ``new_session_after`` requests drops its cookie and starts a new one, as new
        visitors arrive on a site; once it reaches that version it keeps its session."""
        self.port, self.host, self.pause, self.cookies = port, host, pause, cookies
        self.new_session_until, self.new_session_after = new_session_until, new_session_after
        self.headers = headers or {}
        self.outcomes: list[tuple[float, int, int, str]] = []      # (time, user, status, version)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(users)]

    def _run(self, user: int):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        cookie = ""
        in_session, settled = 0, False
        while not self._stop.is_set():
            headers = {"host": self.host, **self.headers}
            if cookie:
                headers["cookie"] = cookie
            try:
                conn.request("GET", "/", headers=headers)
                resp = conn.getresponse()
                resp.read()
                status, version = resp.status, resp.getheader("x-version") or "-"
                set_cookie = resp.getheader("set-cookie")
                if self.cookies and set_cookie and not cookie:
                    cookie = set_cookie.split(";", 1)[0]
                if self.new_session_until and not settled:
                    settled = version == self.new_session_until
                    in_session += 1
                    if not settled and in_session >= self.new_session_after:
                        cookie, in_session = "", 0
            except (OSError, http.client.HTTPException):
                status, version = 0, "-"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            self.outcomes.append((time.monotonic(), user, status, version))
            if self.pause:
                time.sleep(self.pause)
        conn.close()

    def start(self) -> "Users":
        for t in self._threads:
            t.start()
        return self

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def count(self, *, status: int | None = None, version: str | None = None, since: float = 0.0) -> int:
        return sum(1 for t, _, s, v in list(self.outcomes)
                   if t >= since and (status is None or s == status) and (version is None or v == version))


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} did not happen within {timeout} s (last: {last!r})")


class DeliveryMesh:
    def __init__(self, workdir: Path, store: str | None = None, more_control_planes: tuple[str, ...] = ()):
        self.workdir = workdir
        self.more_control_planes = more_control_planes      # the gateway streams from these too
        self.apps: list[VersionApp] = []
        self.procs: list[subprocess.Popen] = []
        self.cp = ControlPlaneProcess(store or f"sqlite:{workdir / 'cp.db'}", ttl=600.0,
                                      log_path=str(workdir / "cp.log"))
        self.gw_port = self.gw_admin = 0

    def start(self) -> "DeliveryMesh":
        self.cp.start()
        self.api = Client(self.cp.url)
        self.gw_port, self.gw_admin, listen = free_ports(3)
        self.put("gateways", {"apiVersion": "networking.istio.io/v1", "kind": "Gateway",
                              "metadata": {"name": "ingress", "namespace": "default"},
                              "spec": {"selector": {"istio": "ingressgateway"}, "servers": [
                                  {"port": {"number": self.gw_port, "name": "http", "protocol": "HTTP"},
                                   "hosts": ["*"]}]}})
        log = open(self.workdir / "gateway.log", "ab")
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "meshproxy", "run", "--control-plane", ",".join((self.cp.url, *self.more_control_planes)),
             "--node-id",
             f"gw-{os.getpid()}", "--mode", "gateway", "--labels", "istio=ingressgateway", "--gateway-bind",
             "127.0.0.1", "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{self.gw_admin}",
             "--drain-grace", "0"],
            stdout=log, stderr=log, cwd=ROOT))
        wait_for(lambda: any(p["state"] == "acked" for p in self.api.call("GET", "/push/v1/proxies")[1]["items"]),
                 20, "the gateway connected and ACKed")
        return self

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(1)        # a drain of idle connections is quick; nothing here needs a clean one
            except subprocess.TimeoutExpired:
                proc.kill()
        self.cp.stop()
        for app in self.apps:
            app.close()

    # ------------------------------------------------------------ API helpers

    def put(self, plural: str, obj: dict) -> dict:
        base = DELIVERY if plural == "canaries" else NETWORKING
        code, body = self.api.call("PUT", f"{base}/{plural}/{obj['metadata']['name']}", obj)
        assert code in (200, 201), body
        return body

    def get(self, plural: str, name: str) -> dict:
        base = DELIVERY if plural == "canaries" else NETWORKING
        code, body = self.api.call("GET", f"{base}/{plural}/{name}")
        assert code == 200, body
        return body

    def status(self, name: str) -> dict:
        return self.get("canaries", name)["status"]

    def weights(self, name: str) -> dict[str, int]:
        vs = self.get("virtualservices", name)
        route = [r for r in vs["spec"]["http"] if r.get("name") != "canary-ab"][0]["route"]
        return {d["destination"]["subset"]: d.get("weight", 100) for d in route}

    def add_service(self, name: str, apps: dict[str, VersionApp], stable: str, *, sticky_cookie: str | None = None):
        """ServiceEntry + DestinationRule (a subset per version) + VirtualService (gateway host
        ``{name}.example.com``, 100% ``stable``) + one registered workload per version."""
        fqdn = f"{name}.default.svc.cluster.local"
        self.apps += apps.values()
        md = {"name": name, "namespace": "default"}
        self.put("serviceentries", {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": md,
                                    "spec": {"hosts": [fqdn], "location": "MESH_INTERNAL", "resolution": "STATIC",
                                             "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}]}})
        self.put("destinationrules", {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": md,
                                      "spec": {"host": fqdn, "subsets": [{"name": v, "labels": {"version": v}}
                                                                         for v in apps]}})
        self.put("virtualservices", {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": md,
                                     "spec": {"hosts": [f"{name}.example.com"], "gateways": ["ingress"],
                                              "http": [{"name": "main", "route": [
                                                  {"destination": {"host": fqdn, "subset": stable}}]}]}})
        for version, app in apps.items():
            code, body = self.api.call("POST", "/registry/v1/workloads", {
                "id": f"{name}-{version}", "service": name, "namespace": "default", "address": "127.0.0.1",
                "ports": {"http": app.port}, "labels": {"app": name, "version": version}, "ttl": 600})
            assert code == 201, body

        def serving():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.gw_port, timeout=2)
                conn.request("GET", "/", headers={"host": f"{name}.example.com"})
                resp = conn.getresponse()
                resp.read()
                conn.close()
                return resp.getheader("x-version") == stable
            except OSError:
                return False

        wait_for(serving, 20, f"the gateway serving {name} from {stable}")

    def canary(self, name: str, stable: str, canary: str, analysis: dict, **spec) -> dict:
        return self.put("canaries", {"apiVersion": "delivery.meshproxy.io/v1", "kind": "Canary",
                                     "metadata": {"name": name, "namespace": "default"},
                                     "spec": {"host": name, "stable": stable, "canary": canary,
                                              "analysis": analysis, **spec}})

    def wait_phase(self, name: str, phases: tuple[str, ...] | str, timeout: float) -> dict:
        phases = (phases,) if isinstance(phases, str) else phases
        return wait_for(lambda: (lambda s: s if s.get("phase") in phases else None)(self.status(name)),
                        timeout, f"canary {name} reaching {'/'.join(phases)}")


@pytest.fixture(scope="session", name="mesh")
def delivery_mesh_fixture(tmp_path_factory):
    """One control plane and gateway for every canary test module (each test its own service)."""
    m = DeliveryMesh(tmp_path_factory.mktemp("delivery")).start()
    yield m
    m.close()
