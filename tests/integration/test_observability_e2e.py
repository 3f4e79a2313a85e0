"""Observability through real proxy processes: Istio metrics after known traffic, a real
scrape checked by promtool and a strict OpenMetrics parser, a span tree across two
proxies received by a real OTLP/HTTP endpoint, unsampled propagation, a dead collector,
and the access log."""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import textwrap
import time

import pytest

from helpers import Upstream, free_port, http_get, respond, service_entry_yaml
from telemetry.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.asyncio

CANARY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {v1}}}, labels: {{app: reviews, version: v1}}}}
  - {{address: 127.0.0.1, ports: {{http: {v2}}}, labels: {{app: reviews, version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {{host: reviews, subset: v1}}
      weight: 90
    - destination: {{host: reviews, subset: v2}}
      weight: 10
"""


def _samples(text: str, name: str) -> list[tuple[dict, float]]:
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name) + 1:line.rindex("}")]))
            out.append((labels, float(line.rsplit(" ", 1)[1])))
    return out


async def test_ninety_ten_split_shows_up_in_istio_requests_total_with_istio_labels(proxy_factory):
    v1 = await Upstream(respond(200, b"v1")).start()
    v2 = await Upstream(respond(200, b"v2")).start()
    proxy = proxy_factory(CANARY.format(v1=v1.port, v2=v2.port), extra_args=["--labels", "app=productpage,version=v1"])
    for _ in range(100):
        assert (await http_get(proxy.port, "reviews:9080"))[0] == 200
    text = proxy.admin("/metrics")[1].decode()
    by_version = {labels["destination_version"]: value for labels, value in _samples(text, "istio_requests_total")
                  if labels["response_code"] == "200"}
    assert by_version == {"v1": 90.0, "v2": 10.0}
    labels = _samples(text, "istio_requests_total")[0][0]
    assert labels["reporter"] == "source"
    assert labels["destination_service"] == "reviews.default.svc.cluster.local"
    assert labels["destination_service_name"] == "reviews"
    assert labels["destination_service_namespace"] == "default"
    assert labels["source_app"] == "productpage" and labels["source_version"] == "v1"
    assert labels["request_protocol"] == "http" and labels["response_flags"] == "-"
    counts = {l["destination_version"]: v for l, v in _samples(text, "istio_request_duration_milliseconds_count")}
    assert counts == {"v1": 90.0, "v2": 10.0}
    await v1.close()
    await v2.close()


async def test_a_real_scrape_passes_promtool_and_a_strict_openmetrics_parser(proxy_factory, upstream):
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", upstream.port, {})]))
    for _ in range(5):
        await http_get(proxy.port, "svc.local")
    await http_get(proxy.port, "nowhere.local")
    status, body = proxy.admin("/metrics")
    assert shutil.which("promtool"), "promtool missing: scripts/setup.sh installs Debian's prometheus package"
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
    problems = [l for l in (result.stdout + result.stderr).decode().splitlines() if l.strip()]
    # the one lint finding is Istio's own metric name, kept so Istio dashboards work unchanged
    assert all("istio_request_duration_milliseconds" in p for p in problems), problems
    assert result.returncode in (0, 3)
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
    status, om = proxy.admin("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.endswith(b"# EOF\n")
    families = {f.name for f in text_string_to_metric_families(om.decode())}
    assert "istio_requests" in families


async def test_disable_metrics_serves_traffic_and_exports_no_request_metrics(proxy_factory, upstream):
    """--disable-metrics (run.py's metrics-off variant) is a real mode, not only a benchmark knob."""
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", upstream.port, {})]),
                          extra_args=["--disable-metrics"])
    for _ in range(3):
        status, _, _ = await http_get(proxy.port, "svc.local")
        assert status == 200
    assert len(upstream.requests) == 3
    status, body = proxy.admin("/metrics")
    assert status == 200 and b"istio_requests_total" not in body and b"istio_request_duration" not in body


async def test_span_tree_across_two_sidecars_and_the_app_between(proxy_factory):
    receiver = OtlpReceiver().start()
    seen = {}

    async def app(req, writer):
        seen["traceparent"] = req.header("traceparent")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        return True

    backend = await Upstream(app).start()
    ingress_port = free_port()
    sidecar_b = textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: Sidecar
        metadata: {{name: ratings, namespace: default}}
        spec:
          workloadSelector: {{labels: {{app: ratings}}}}
          ingress:
          - port: {{number: {ingress_port}, protocol: HTTP, name: http}}
            defaultEndpoint: 127.0.0.1:{backend.port}
            bind: 127.0.0.1
        """)
    tracing = ["--tracing-endpoint", receiver.endpoint, "--trace-sample-rate", "1.0"]
    proxy_factory(sidecar_b, extra_args=["--labels", "app=ratings,version=v1", *tracing])
    proxy_a = proxy_factory(service_entry_yaml("ratings.default.svc.cluster.local", 9080,
                                               [("127.0.0.1", ingress_port, {})]),
                            extra_args=["--labels", "app=productpage,version=v1", *tracing])
    assert (await http_get(proxy_a.port, "ratings:9080", "/r"))[0] == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(receiver.spans) < 2:
        await asyncio.sleep(0.2)
    client = [s for s in receiver.spans if s.kind == 3]      # SPAN_KIND_CLIENT
    server = [s for s in receiver.spans if s.kind == 2]      # SPAN_KIND_SERVER
    assert len(client) == 1 and len(server) == 1, receiver.spans
    assert server[0].trace_id == client[0].trace_id
    assert server[0].parent_span_id == client[0].span_id
    _, trace_id, parent_id, flags = seen["traceparent"].split("-")
    assert trace_id == client[0].trace_id and parent_id == server[0].span_id and flags == "01"
    receiver.close()
    await backend.close()


async def test_trace_headers_are_propagated_for_unsampled_requests(proxy_factory, upstream):
    receiver = OtlpReceiver().start()
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", upstream.port, {})]),
                          extra_args=["--tracing-endpoint", receiver.endpoint, "--trace-sample-rate", "1.0"])
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    await http_get(proxy.port, "svc.local", headers={"traceparent": incoming, "x-b3-sampled": "0"})
    got = upstream.requests[0]
    _, trace_id, parent, flags = got.header("traceparent").split("-")
    assert trace_id == "0af7651916cd43dd8448eb211c80319c" and flags == "00" and parent != "b7ad6b7169203331"
    assert got.header("x-b3-traceid") == trace_id
    assert got.header("x-request-id")
    await asyncio.sleep(1.5)
    assert receiver.spans == []        # parent said not sampled: nothing recorded
    receiver.close()


async def test_an_unreachable_collector_changes_nothing_for_traffic(proxy_factory, upstream):
    dead = f"http://127.0.0.1:{free_port()}/v1/traces"
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", upstream.port, {})]),
                          extra_args=["--tracing-endpoint", dead, "--trace-sample-rate", "1.0"])
    statuses = [(await http_get(proxy.port, "svc.local"))[0] for _ in range(30)]
    assert statuses == [200] * 30
    assert proxy.admin("/ready")[0] == 200


async def test_access_log_has_one_json_line_per_request_with_envoy_fields(proxy_factory, upstream, tmp_path):
    log_path = tmp_path / "access.log"
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", upstream.port, {})]),
                          extra_args=["--access-log", str(log_path)])
    await http_get(proxy.port, "svc.local", "/logged?q=1", headers={"User-Agent": "tester/1", "X-Request-Id": "rid-7"})
    await http_get(proxy.port, "nowhere.local", "/x")
    deadline = time.monotonic() + 5
    lines = []
    while time.monotonic() < deadline:
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        if len(lines) >= 2:
            break
        await asyncio.sleep(0.2)
    first, second = (json.loads(l) for l in lines[:2])
    assert first["method"] == "GET" and first["path"] == "/logged?q=1" and first["response_code"] == 200
    assert first["x_request_id"] == "rid-7" and first["user_agent"] == "tester/1"
    assert first["upstream_host"] == f"127.0.0.1:{upstream.port}" and first["response_flags"] == "-"
    assert first["authority"] == "svc.local" and "duration" in first and "start_time" in first
    assert second["response_code"] == 404 and second["response_flags"] == "NR"
