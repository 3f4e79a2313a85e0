"""Explicit mode: traffic enters a workload through its sidecar too.  A sidecar that registers its
workload (``--service --app-port``) opens an inbound listener (``--inbound-port``) and registers
it as the endpoint (``proxy_port``); peers reach the application only through it, so the
destination reports (``reporter="destination"``) and records the server span."""
from __future__ import annotations

import http.client
import subprocess
import sys

import pytest

from controlplane.cli import Client
from controlplane.testing import ControlPlaneProcess, free_ports
from netns import wait_until
from telemetry.otlp_receiver import OtlpReceiver

APP = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = ("ratings saw " + self.headers.get("traceparent", "-")).encode()
        self.send_response(200); self.send_header("content-length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"Host": host})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def series(text: str, name: str, **labels) -> float:
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
               if l.startswith(name + "{") and all(f'{k}="{v}"' in l for k, v in labels.items()))


@pytest.fixture(scope="module")
def explicit_mesh(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("explicit")
    receiver = OtlpReceiver().start()
    cp = ControlPlaneProcess(f"sqlite:{tmp_path / 'cp.db'}", log_path=str(tmp_path / "cp.log")).start()
    app_port, inbound, b_listen, b_admin, a_listen, a_admin = free_ports(6)
    procs = [subprocess.Popen([sys.executable, "-c", APP, str(app_port)])]
    common = ["--control-plane", cp.url, "--tracing-endpoint", receiver.endpoint, "--trace-sample-rate", "1",
              "--drain-timeout", "1"]
    log = open(tmp_path / "sidecars.log", "ab")
    procs.append(subprocess.Popen([sys.executable, "-m", "meshproxy", "run", *common, "--service", "ratings",
                                   "--labels", "app=ratings,version=v1", "--app-port", f"http:{app_port}",
                                   "--inbound-port", str(inbound), "--listen", f"127.0.0.1:{b_listen}",
                                   "--admin", f"127.0.0.1:{b_admin}"], stdout=log, stderr=subprocess.STDOUT))
    procs.append(subprocess.Popen([sys.executable, "-m", "meshproxy", "run", *common, "--labels",
                                   "app=productpage,version=v1", "--listen", f"127.0.0.1:{a_listen}",
                                   "--admin", f"127.0.0.1:{a_admin}"], stdout=log, stderr=subprocess.STDOUT))
    try:
        api = Client(cp.url)
        wait_until(lambda: api.call("GET", "/registry/v1/namespaces/default/services/ratings/endpoints")[1]
                   .get("items"), 20, 0.1, "ratings registered")

        def routed():
            try:
                return get(a_listen, "/", "ratings")[0] == 200
            except OSError:
                return False
        wait_until(routed, 20, 0.1, "the client sidecar routing to ratings")
        yield {"a_listen": a_listen, "a_admin": a_admin, "b_admin": b_admin, "inbound": inbound,
               "app_port": app_port, "receiver": receiver, "api": api}
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        cp.stop()
        receiver.close()


def test_registered_endpoint_is_the_sidecars_inbound_listener(explicit_mesh):
    m = explicit_mesh
    items = m["api"].call("GET", "/registry/v1/namespaces/default/services/ratings/endpoints")[1]["items"]
    assert items[0]["proxy_port"] == m["inbound"] and items[0]["ports"] == {"http": m["app_port"]}
    status, body = get(m["inbound"], "/direct")                         # the inbound listener forwards to the app
    assert status == 200 and body.startswith(b"ratings saw")


def test_request_between_registered_services_has_source_and_destination_series_and_a_server_span(explicit_mesh):
    m = explicit_mesh
    status, body = get(m["a_listen"], "/x", "ratings")
    assert status == 200
    trace_id = body.decode().split("-")[1]
    source = get(m["a_admin"], "/metrics")[1].decode()
    destination = get(m["b_admin"], "/metrics")[1].decode()
    assert series(source, "istio_requests_total", reporter="source",
                  destination_service="ratings.default.svc.cluster.local", response_code="200") >= 1
    assert series(destination, "istio_requests_total", reporter="destination",
                  destination_service="ratings.default.svc.cluster.local", response_code="200") >= 1

    def spans():
        found = [s for s in m["receiver"].spans if s.trace_id == trace_id]
        return found if {s.kind for s in found} >= {2, 3} else None
    found = wait_until(spans, 15, 0.1, "client and server span of the request")
    client = next(s for s in found if s.kind == 3)
    server = next(s for s in found if s.kind == 2)
    assert server.parent_span_id == client.span_id
