"""Istio's telemetry as its ecosystem reads it: a real Prometheus scrapes a client sidecar, a
server sidecar (an inbound listener in front of the app) and the control plane, and is asked
Flagger's built-in Istio checks, Kiali's graph queries and Istio's dashboard queries, in their
own words (query texts from flagger pkg/metrics/observers/istio.go, kiali graph/telemetry/istio,
istio manifests/addons/dashboards)."""
from __future__ import annotations

import asyncio
import textwrap
import threading
import time

import pytest

from controlplane.testing import ControlPlaneProcess
from helpers import Upstream, free_port, http_get
from prometheus_server import PrometheusServer

pytestmark = pytest.mark.asyncio

FLAGGER_SUCCESS_RATE = """
sum(rate(istio_requests_total{reporter="destination",destination_workload_namespace="{{ namespace }}",
destination_workload=~"{{ target }}",response_code!~"5.*"}[{{ interval }}]))
/ sum(rate(istio_requests_total{reporter="destination",destination_workload_namespace="{{ namespace }}",
destination_workload=~"{{ target }}"}[{{ interval }}])) * 100"""
FLAGGER_DURATION = """
histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket{reporter="destination",
destination_workload_namespace="{{ namespace }}",destination_workload=~"{{ target }}"}[{{ interval }}])) by (le))"""
KIALI_GROUP_BY = ("source_cluster,source_workload_namespace,source_workload,source_canonical_service,"
                  "source_canonical_revision,destination_cluster,destination_service_namespace,destination_service,"
                  "destination_service_name,destination_workload_namespace,destination_workload,"
                  "destination_canonical_service,destination_canonical_revision,request_protocol,response_code,"
                  "grpc_response_status,response_flags")
KIALI_INCOMING = ('sum(rate(istio_requests_total{reporter="destination",destination_workload_namespace="default"}[60s])) '
                  f"by ({KIALI_GROUP_BY}) > 0")
KIALI_OUTGOING = ('sum(rate(istio_requests_total{reporter="source",source_workload_namespace="default"}[60s])) '
                  f"by ({KIALI_GROUP_BY}) > 0")


def flagger(template: str) -> str:
    return (template.replace("{{ namespace }}", "default").replace("{{ target }}", "reviews-v2")
            .replace("{{ interval }}", "1m"))


def _configs(inbound_port: int, app_port: int) -> tuple[str, str]:
    client = textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: reviews, namespace: default}}
        spec:
          hosts: [reviews.default.svc.cluster.local]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: 9080, name: http, protocol: HTTP}}]
          endpoints:
          - {{address: 127.0.0.1, ports: {{http: {inbound_port}}}, labels: {{app: reviews, version: v2}}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: reviews, namespace: default}}
        spec:
          host: reviews
          subsets: [{{name: v2, labels: {{version: v2}}}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: reviews, namespace: default}}
        spec:
          hosts: [reviews]
          http: [{{route: [{{destination: {{host: reviews, subset: v2}}}}]}}]
        """)
    server = textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: Sidecar
        metadata: {{name: default, namespace: default}}
        spec:
          ingress:
          - port: {{number: {inbound_port}, protocol: HTTP, name: http}}
            bind: 127.0.0.1
            defaultEndpoint: 127.0.0.1:{app_port}
        """)
    return client, server


async def _every_fourth_fails(req, writer):
    body = b"oops" if req.target.endswith("/3") else b"ok"
    status = 500 if req.target.endswith("/3") else 200
    writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
    return True


async def test_flagger_kiali_and_istio_dashboard_queries_answer_from_a_real_prometheus(proxy_factory, tmp_path):
    app = await Upstream(_every_fourth_fails).start()
    inbound = free_port()
    client_cfg, server_cfg = _configs(inbound, app.port)
    server = proxy_factory(server_cfg, extra_args=["--labels", "app=reviews,version=v2"])
    client = proxy_factory(client_cfg, extra_args=["--labels", "app=productpage,version=v1"])
    cp = ControlPlaneProcess(f"sqlite:{tmp_path / 'cp.db'}").start()
    prometheus = PrometheusServer(tmp_path, {
        "client": (f"127.0.0.1:{client.admin_port}", "/stats/prometheus"),
        "server": (f"127.0.0.1:{server.admin_port}", "/stats/prometheus"),
        "istiod": (f"127.0.0.1:{cp.port}", "/metrics")})
    try:
        deadline = time.monotonic() + 15
        while prometheus.targets_up() != {"client": "up", "server": "up", "istiod": "up"}:
            assert time.monotonic() < deadline, f"scrape targets not up: {prometheus.targets_up()}"
            await asyncio.sleep(0.2)
        # traffic across several scrapes (rate() needs the counters to move between samples)
        sent = 0
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            status = (await http_get(client.port, "reviews:9080", f"/r/{sent % 4}"))[0]
            assert status == (500 if sent % 4 == 3 else 200)
            sent += 1
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.0)                                   # the last counts scraped
        loop = asyncio.get_running_loop()
        query = lambda q: loop.run_in_executor(None, prometheus.query, q)

        success = await query(flagger(FLAGGER_SUCCESS_RATE))
        assert len(success) == 1 and 70 <= float(success[0]["value"][1]) <= 80, success   # 3 of 4 succeed
        p99 = await query(flagger(FLAGGER_DURATION))
        assert len(p99) == 1 and 0 < float(p99[0]["value"][1]) <= 250, p99

        incoming = await query(KIALI_INCOMING)
        assert {(s["metric"]["destination_workload"], s["metric"]["destination_canonical_service"],
                 s["metric"]["destination_canonical_revision"], s["metric"]["destination_cluster"],
                 s["metric"]["response_code"]) for s in incoming} == {
            ("reviews-v2", "reviews", "v2", "Kubernetes", "200"), ("reviews-v2", "reviews", "v2", "Kubernetes", "500")}
        outgoing = await query(KIALI_OUTGOING)
        assert {(s["metric"]["source_workload"], s["metric"]["source_canonical_service"],
                 s["metric"]["source_canonical_revision"], s["metric"]["destination_service"],
                 s["metric"]["destination_workload"], s["metric"]["destination_canonical_revision"])
                for s in outgoing} == {
            ("productpage-v1", "productpage", "v1", "reviews.default.svc.cluster.local", "reviews-v2", "v2")}

        # Istio's pilot dashboard and the zero series of the proxies' own counters
        pushes = await query("sum by (type) (pilot_xds_pushes)")
        assert {s["metric"]["type"] for s in pushes} >= {"resources", "endpoints"}
        assert (await query("sum(pilot_xds)"))[0]["value"][1] == "0"
        retries = await query('meshproxy_upstream_rq_retry_total{job="client"}')
        assert retries and all(s["value"][1] == "0" for s in retries)
        assert (await query('meshproxy_tracing_spans_exported_total{job="server"}'))[0]["value"][1] == "0"
    finally:
        prometheus.close()
        cp.stop()
        await app.close()
