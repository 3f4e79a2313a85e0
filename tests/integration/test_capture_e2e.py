"""The drop-in sidecar, end to end, in real pods (network namespaces), with real nftables rules,
the real control plane and applications that know nothing about the mesh.

Pods: ``istiod`` (control plane, OTLP receiver), ``client`` (curl / a Python client, DNS captured),
``reviews-v1`` and ``reviews-v2`` (an HTTP app on 9080), ``echo`` (a TCP echo server on 7000,
port name ``tcp-echo``), all meshed (``pod-init`` + ``meshproxy run --capture`` as uid 1337), and
``outside``: no sidecar, an HTTP server on 8080 and 9080, a line server on 5000 and the DNS server
the pods' resolv.conf would use for names the mesh does not know.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from meshpods import PROBE, REVIEWS_90_10, Mesh, add_reviews_and_client, start_ready
from netns import PodNetwork, wait_until

REVIEWS = "reviews.default.svc.cluster.local"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("capture")
    tmp.chmod(0o777)
    with PodNetwork("capture") as net:
        mesh = Mesh(net, tmp)
        outside = net.add_pod("outside")
        start_ready(outside, [sys.executable, PROBE, "http", "outside-http", "8080"])
        start_ready(outside, [sys.executable, PROBE, "http", "outside-9080", "9080"])
        start_ready(outside, [sys.executable, PROBE, "serve", "outside", "5000"])
        start_ready(outside, [sys.executable, PROBE, "dns", "53", f"outside.example={outside.address}"])
        otlp = start_ready(mesh.cp_pod, [sys.executable, PROBE, "otlp", mesh.cp_pod.address, str(tmp / "spans.json")])
        endpoint = otlp.stdout.readline().strip()
        mesh.spans_file = tmp / "spans.json"
        common = mesh.common_args = ["--tracing-endpoint", endpoint, "--dns-upstream", f"{outside.address}:53"]
        probers = json.dumps({"/app-health/reviews/readyz": {"httpGet": {"path": "/health", "port": 9080}},
                              "/app-health/reviews/livez": {"httpGet": {"path": "/fail-health", "port": 9080}},
                              "/app-health/reviews/startupz": {"tcpSocket": {"port": 9999}}})
        add_reviews_and_client(mesh, sidecar=common, reviews_sidecar=["--app-probers", probers])
        mesh.add_workload("echo", "echo", {"app": "echo", "version": "v1"}, app=["echo", "7000"],
                          app_ports=["tcp-echo:7000"], sidecar=common, wait=False)
        mesh.wait_all_ready()                           # the four sidecars start at once
        mesh.outside = outside
        mesh.wait_endpoints("reviews", 2)
        mesh.wait_endpoints("echo", 1)
        yield mesh


def series(metrics: str, name: str, **labels) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def curl(workload, *args: str) -> subprocess.CompletedProcess:
    return workload.pod.run(["curl", "-s", "--max-time", "15", *args])


def test_unmodified_clients_reach_reviews_by_name_through_both_sidecars(mesh):
    client = mesh.workloads["client"]
    result = curl(client, "http://reviews:9080/")
    assert result.returncode == 0, result.stderr
    assert result.stdout in ("reviews-v1", "reviews-v2")
    status, headers, body = client.http(f"http://{REVIEWS}:9080/")     # a Python client, the FQDN
    assert status == 200 and body in (b"reviews-v1", b"reviews-v2")
    assert headers["x-seen-host"] == f"{REVIEWS}:9080"
    trace_id = headers["x-seen-traceparent"].split("-")[1]
    assert series(client.metrics(), "istio_requests_total", reporter="source", destination_service=REVIEWS,
                  response_code="200") >= 2
    destination = sum(series(mesh.workloads[f"reviews-{v}"].metrics(), "istio_requests_total",
                             reporter="destination", destination_service=REVIEWS, response_code="200")
                      for v in ("v1", "v2"))
    assert destination >= 2
    # the pods have workload certificates: the client's sidecar originated mTLS (auto mTLS) and the
    # reviews sidecars' capture listener terminated it, so they know who called
    mutual = sum(series(mesh.workloads[f"reviews-{v}"].metrics(), "istio_requests_total", reporter="destination",
                        connection_security_policy="mutual_tls", response_code="200") for v in ("v1", "v2"))
    assert mutual >= 2

    def spans():
        try:
            found = [s for s in json.loads(mesh.spans_file.read_text()) if s["trace_id"] == trace_id]
        except (OSError, ValueError):
            return None
        return found if {s["kind"] for s in found} >= {2, 3} else None
    found = wait_until(spans, 15, 0.2, "client and server spans of one trace")
    client_span = next(s for s in found if s["kind"] == 3)
    server_span = next(s for s in found if s["kind"] == 2)
    assert server_span["parent_span_id"] == client_span["span_id"]


def test_ninety_ten_virtual_service_splits_exactly_through_capture(mesh):
    mesh.apply(REVIEWS_90_10)
    client = mesh.workloads["client"]
    client.wait_config(lambda dump: "default/reviews" in dump, "VirtualService at the client")
    code = ("import http.client,collections\n"
            "conn=http.client.HTTPConnection('reviews',9080,timeout=5)\n"     # one keep-alive connection
            "def get():\n"
            "    conn.request('GET','/'); return conn.getresponse().read().decode()\n"
            "print(dict(collections.Counter(get() for _ in range(100))))\n")
    result = client.pod.python(code, timeout=60)
    assert result.returncode == 0, result.stderr
    assert eval(result.stdout) == {"reviews-v1": 90, "reviews-v2": 10}


def test_raw_tcp_echo_through_capture_keeps_half_close(mesh):
    client = mesh.workloads["client"]
    code = ("import socket\n"
            "s=socket.create_connection(('echo',7000),timeout=5)\n"
            "data=bytes(range(256))*400\n"
            "s.sendall(data); s.shutdown(socket.SHUT_WR)\n"
            "got=b''\n"
            "while True:\n"
            "    chunk=s.recv(65536)\n"
            "    if not chunk: break\n"
            "    got+=chunk\n"
            "print(got==data, len(got))\n")
    result = client.pod.python(code)
    assert result.stdout.split() == ["True", str(256 * 400)], result.stderr
    metrics = client.metrics()
    assert series(metrics, "istio_tcp_connections_opened_total", destination_service="echo.default.svc.cluster.local") >= 1
    assert series(metrics, "istio_tcp_sent_bytes_total", destination_service="echo.default.svc.cluster.local") >= 256 * 400
    echo = mesh.workloads["echo"].metrics()              # the destination sidecar reports it too
    assert series(echo, "istio_tcp_connections_opened_total", reporter="destination",
                  destination_service="echo.default.svc.cluster.local") >= 1


ECHO_STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: echo-strict, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  mtls: {mode: STRICT}
"""

_PLAINTEXT_TO_ECHO = """
import socket, sys
s = socket.create_connection((sys.argv[1], 7000), timeout=5)
try:
    s.sendall(b"ping"); s.shutdown(socket.SHUT_WR)
    print("answered" if s.recv(100) else "closed")
except OSError:
    print("closed")
"""

_HALF_CLOSE_AND_BULK = """
import hashlib, os, socket, threading
# a half-close round trip: the echo holds its reply until our FIN, then sends it all
s = socket.create_connection(("echo", 7000), timeout=20)
request = b"HOLD" + bytes(range(256)) * 4096
s.sendall(request); s.shutdown(socket.SHUT_WR)
got = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    got += chunk
print("half-close", got == request, len(got))
# 16 MiB both ways at once
data = os.urandom(16 << 20)
s = socket.create_connection(("echo", 7000), timeout=20)
def send():
    s.sendall(data); s.shutdown(socket.SHUT_WR)
t = threading.Thread(target=send); t.start()
digest, n = hashlib.sha256(), 0
while True:
    chunk = s.recv(1 << 18)
    if not chunk:
        break
    digest.update(chunk); n += len(chunk)
t.join()
print("bulk", digest.digest() == hashlib.sha256(data).digest(), n)
"""


def test_captured_tcp_to_a_strict_destination_is_mtls_and_keeps_half_close(mesh):
    """Captured TCP originates auto mTLS (the destination has a sidecar): a STRICT destination
    takes it and knows the caller; half-close and a large transfer pass through both sidecars'
    TLS; plaintext from outside the mesh is refused.  Where the destination's mode is DISABLE
    the client's sidecar sends plaintext."""
    client, echo = mesh.workloads["client"], mesh.workloads["echo"]
    echo_ip = echo.pod.address
    mesh.apply(ECHO_STRICT)
    try:
        wait_until(lambda: mesh.outside.python(_PLAINTEXT_TO_ECHO, echo_ip).stdout.strip() == "closed", 15, 0.2,
                   "STRICT at the echo sidecar")
        principal = "spiffe://cluster.local/ns/default/sa/client"
        before = series(echo.metrics(), "istio_tcp_connections_opened_total", reporter="destination",
                        connection_security_policy="mutual_tls", source_principal=principal)
        result = client.pod.python(_HALF_CLOSE_AND_BULK, timeout=120)
        assert result.stdout.split() == ["half-close", "True", str(4 + 256 * 4096),
                                         "bulk", "True", str(16 << 20)], result.stdout + result.stderr
        def served():        # closed connections' bytes are counted when the sidecar sees the close
            metrics = echo.metrics()
            return (series(metrics, "istio_tcp_connections_opened_total", reporter="destination",
                           connection_security_policy="mutual_tls", source_principal=principal,
                           destination_principal="spiffe://cluster.local/ns/default/sa/echo") - before >= 2
                    and series(metrics, "istio_tcp_received_bytes_total", reporter="destination",
                               connection_security_policy="mutual_tls", source_principal=principal) >= 16 << 20)
        wait_until(served, 15, 0.2, "mutual_tls TCP series with the client's principal at the echo sidecar")
        assert series(client.metrics(), "istio_tcp_connections_opened_total", reporter="source",
                      destination_service="echo.default.svc.cluster.local",
                      destination_principal="spiffe://cluster.local/ns/default/sa/echo") >= 2
        # DISABLE at the destination: the client's sidecar sends plaintext (auto mTLS, as for HTTP)
        plain_before = series(echo.metrics(), "istio_tcp_connections_opened_total", reporter="destination",
                              connection_security_policy="none")
        mesh.apply(ECHO_STRICT.replace("STRICT", "DISABLE"))

        def plaintext_round_trip() -> bool:      # once both sidecars have the new mode
            result = client.pod.python(_HALF_CLOSE_AND_BULK.split("# 16 MiB")[0], timeout=60)
            return (result.stdout.split() == ["half-close", "True", str(4 + 256 * 4096)]
                    and series(echo.metrics(), "istio_tcp_connections_opened_total", reporter="destination",
                               connection_security_policy="none") > plain_before)
        wait_until(plaintext_round_trip, 20, 0.2, "a plaintext half-close round trip to the DISABLE echo")
    finally:
        mesh.meshctl("delete", "peerauthentication", "echo-strict", "-n", "default")
        wait_until(lambda: mesh.outside.python(_PLAINTEXT_TO_ECHO, echo_ip).stdout.strip() == "answered", 15, 0.2,
                   "STRICT removed")


def test_dns_answers_mesh_names_forwards_the_rest_and_refuses_malformed_queries(mesh):
    client = mesh.workloads["client"]
    code = r"""
import socket, sys, dns.message, dns.query, dns.rcode
def ask(name, rdtype="A"):
    return dns.query.udp(dns.message.make_query(name, rdtype), "127.0.0.1", port=15053, timeout=5)
out = {}
for name in ("reviews", "reviews.default", "reviews.default.svc.cluster.local"):
    r = ask(name)
    out[name] = [a.to_text() for rr in r.answer for a in rr]
r = ask("reviews.default.svc.cluster.local", "AAAA")
out["aaaa"] = [dns.rcode.to_text(r.rcode()), len(r.answer)]
r = ask("outside.example")
out["forwarded"] = [a.to_text() for rr in r.answer for a in rr]
r = ask("nowhere.example")
out["nx"] = dns.rcode.to_text(r.rcode())
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
s.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xff", ("127.0.0.1", 15053))
reply = s.recv(512)
out["malformed"] = [reply[:2].hex(), reply[3] & 0xF]
out["getent"] = socket.gethostbyname("outside.example")
out["getent_mesh"] = socket.gethostbyname("reviews")
print(__import__("json").dumps(out))
"""
    result = client.pod.python(code)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    vip = out["reviews"][0]
    assert vip.startswith("240.240.")
    assert out["reviews.default"] == [vip] and out["reviews.default.svc.cluster.local"] == [vip]
    assert out["aaaa"] == ["NOERROR", 0]
    assert out["forwarded"] == [mesh.outside.address]
    assert out["nx"] == "NXDOMAIN"
    assert out["malformed"] == ["1234", 1]                      # FORMERR, same id
    assert out["getent"] == mesh.outside.address                # the app's resolver, port 53 captured
    assert out["getent_mesh"] == vip


def test_sidecar_connections_are_never_captured_again(mesh):
    client = mesh.workloads["client"]
    before = series(client.metrics(), "meshproxy_downstream_cx_total", listener="virtualOutbound")
    for _ in range(3):
        assert curl(client, "http://reviews:9080/").stdout.startswith("reviews-")
    after = series(client.metrics(), "meshproxy_downstream_cx_total", listener="virtualOutbound")
    assert after - before == 3          # each request entered the outbound listener once: no loop
    # a connection straight to the capture port has no original destination: reset, never proxied to itself
    code = ("import socket\n"
            "try:\n"
            "    s=socket.create_connection(('127.0.0.1',15001),timeout=5)\n"
            "    s.sendall(b'GET / HTTP/1.1\\r\\nHost: reviews:9080\\r\\n\\r\\n')\n"
            "    print(repr(s.recv(100)))\n"
            "except ConnectionResetError:\n"
            "    print('reset')\n")
    assert client.pod.python(code).stdout.strip() in ("reset", "b''")


def test_allow_any_passes_unknown_destinations_through_and_registry_only_refuses_them(mesh):
    client, outside = mesh.workloads["client"], mesh.outside
    assert curl(client, f"http://{outside.address}:8080/").stdout == "outside-http"
    assert curl(client, f"http://{outside.address}:9080/").stdout == "outside-9080"     # sniffed as HTTP
    line = client.pod.python("import socket;print(socket.create_connection((__import__('sys').argv[1],5000),"
                             "timeout=5).makefile().readline().strip())", outside.address).stdout.strip()
    assert line == "outside 5000 -"
    metrics = client.metrics()
    assert series(metrics, "istio_tcp_connections_opened_total", destination_service="PassthroughCluster") >= 2
    assert series(metrics, "istio_requests_total", destination_service="PassthroughCluster", response_code="200") >= 1
    mesh.apply("""
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: default}
spec:
  egress: [{hosts: ["*/*"]}]
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
""")
    try:
        client.wait_config(lambda dump: "REGISTRY_ONLY" in dump, "Sidecar at the client")
        refused = curl(client, "-o", "/dev/null", "-w", "%{http_code}", f"http://{outside.address}:9080/")
        assert refused.stdout == "502"
        closed = curl(client, f"http://{outside.address}:8080/")
        assert closed.returncode != 0 and closed.stdout == ""
        assert curl(client, "http://reviews:9080/").stdout.startswith("reviews-")   # the mesh still works
        metrics = client.metrics()
        assert series(metrics, "istio_tcp_connections_opened_total", destination_service="BlackHoleCluster") >= 1
    finally:
        mesh.meshctl("delete", "sidecar", "default", "-n", "default")
        client.wait_config(lambda dump: "REGISTRY_ONLY" not in dump, "Sidecar removed")


APP = r"""
import json, signal, sys, time, urllib.request
out = sys.argv[1]
results = {"first": None, "shutdown": []}
def call():
    try:
        return urllib.request.urlopen("http://reviews:9080/", timeout=5).status
    except Exception as err:
        return repr(err)
results["first"] = call()                      # at once: the proxy must already be there
json.dump(results, open(out, "w"))
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
while not stopping:
    time.sleep(0.02)
end = time.monotonic() + 1.5                   # calls made during the application's own shutdown
while time.monotonic() < end:
    results["shutdown"].append(call())
json.dump(results, open(out, "w"))
sys.exit(7)
"""


def test_app_starts_after_its_sidecar_survives_a_sidecar_restart_and_shuts_down_without_failed_calls(mesh):
    pod = mesh.add_workload("lifecycle", "lifecycle", {"app": "lifecycle"}, pod_init=["--capture-dns"],
                            start_sidecar=False).pod
    app = mesh.tmp / "app.py"
    app.write_text(APP)
    out = mesh.tmp / "app-results.json"
    argv = mesh.sidecar_argv("lifecycle", {"app": "lifecycle", "version": "v1"}, (), mesh.common_args)
    log = open(mesh.tmp / "lifecycle.log", "ab")
    supervisor = pod.popen(argv + ["--", sys.executable, str(app), str(out)], stdout=log, stderr=subprocess.STDOUT,
                           env=mesh.net.env())
    wait_until(lambda: out.exists() and out.read_text(), 30, 0.1, "application started")
    assert json.loads(out.read_text())["first"] == 200
    # the proxy (uid 1337, child of the supervisor) dies under the pod: it is restarted, the app goes on
    children = open(f"/proc/{supervisor.pid}/task/{supervisor.pid}/children").read().split()
    proxy = next(int(pid) for pid in children if os.stat(f"/proc/{pid}").st_uid == 1337)
    os.kill(proxy, signal.SIGKILL)
    time.sleep(0.3)
    mesh.wait_ready(mesh.workloads["lifecycle"])
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(30) == 7                               # the application's exit code
    results = json.loads(out.read_text())
    assert len(results["shutdown"]) >= 3
    assert set(results["shutdown"]) == {200}, results["shutdown"]


def test_a_prober_outside_the_pod_reaches_health_and_the_apps_probes_through_the_sidecar(mesh):
    outside, reviews = mesh.outside, mesh.net.pods["reviews-v1"]

    def status(path: str) -> str:
        return outside.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "15",
                            f"http://{reviews.address}:15021{path}"]).stdout
    assert status("/healthz/ready") == "200"
    assert status("/app-health/reviews/readyz") == "200"          # the app's /health, run by the sidecar
    assert status("/app-health/reviews/livez") == "503"           # the app answered 500
    assert status("/app-health/reviews/startupz") == "503"        # nothing listens on 9999
    assert status("/app-health/nobody/readyz") == "404"
    assert "istio_requests_total" in outside.run(["curl", "-s", f"http://{reviews.address}:15021/stats/prometheus"]).stdout
