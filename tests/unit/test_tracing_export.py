"""Sampled spans reach a real OTLP/HTTP collector on loopback with the right links;
unsampled requests create no spans; a dead collector or a full queue only drops spans."""
from __future__ import annotations

import random
import socket
import threading
import time

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshproxy.telemetry.trace_export import build_trace_export, otlp_http_exporter
from meshproxy.telemetry.tracing import ProxyTracer
from telemetry.otlp_receiver import OtlpReceiver


@pytest.fixture
def receiver():
    r = OtlpReceiver().start()
    yield r
    r.close()


def proxy(endpoint: str, service: str, seed: int, **kw):
    export = build_trace_export(otlp_http_exporter(endpoint, timeout_s=2.0), service_name=service, **kw)
    return export, ProxyTracer(export, sample_rate=1.0, rng=random.Random(seed))


def test_two_hop_chain_reaches_the_collector_with_client_server_parent_links(receiver):
    # productpage app -> [productpage sidecar: client span] -> [reviews sidecar: server span]
    #   -> reviews app (copies trace headers) -> [reviews sidecar: client span] -> [ratings sidecar: server span]
    exp_pp, pp = proxy(receiver.endpoint, "productpage.default", 1)
    exp_rv, rv = proxy(receiver.endpoint, "reviews.default", 2)
    exp_rt, rt = proxy(receiver.endpoint, "ratings.default", 3)
    head = dict(method=b"GET", authority=b"reviews:9080", path=b"/reviews/0?x=1")

    a = pp.start([(b"user-agent", b"curl/8")], "client", **head)
    b = rv.start(a.headers_to_forward, "server", **head, peer_address="10.0.0.1")
    app_headers = [(n, v) for n, v in b.headers_to_forward if n != b"x-request-id"] + [(b"x-request-id", b.request_id)]
    c = rv.start(app_headers, "client", method=b"GET", authority=b"ratings:9080", path=b"/ratings/0")
    d = rt.start(c.headers_to_forward, "server", method=b"GET", authority=b"ratings:9080", path=b"/ratings/0")
    rt.finish(d, 200, route_name="ratings-route")
    rv.finish(c, 503, route_name="ratings-route", upstream_cluster="outbound|9080|v1|ratings", subset="v1",
              upstream_address="10.0.0.9", upstream_port=9080, retries=2, response_flags="URX")
    rv.finish(b, 200, route_name="reviews-route")
    pp.finish(a, 200, route_name="reviews-route", upstream_cluster="outbound|9080|v2|reviews", subset="v2",
              upstream_address="10.0.0.5", upstream_port=9080)
    for export in (exp_pp, exp_rv, exp_rt):
        assert export.force_flush(5.0)
        export.shutdown()

    spans = {s.span_id: s for s in receiver.spans}
    assert set(spans) == {x.span_id.decode() for x in (a, b, c, d)}
    sa, sb, sc, sd = (spans[x.span_id.decode()] for x in (a, b, c, d))
    assert {s.trace_id for s in (sa, sb, sc, sd)} == {a.trace_id.decode()}
    assert sa.parent_span_id == "" and sb.parent_span_id == sa.span_id
    assert sc.parent_span_id == sb.span_id and sd.parent_span_id == sc.span_id
    assert [s.kind for s in (sa, sb, sc, sd)] == [PbSpan.SPAN_KIND_CLIENT, PbSpan.SPAN_KIND_SERVER,
                                                  PbSpan.SPAN_KIND_CLIENT, PbSpan.SPAN_KIND_SERVER]
    assert (sa.service_name, sb.service_name, sd.service_name) == (
        "productpage.default", "reviews.default", "ratings.default")
    assert sa.name == "GET reviews-route"
    assert sa.attributes["http.request.method"] == "GET" and sa.attributes["url.path"] == "/reviews/0"
    assert sa.attributes["url.query"] == "x=1" and sa.attributes["server.address"] == "reviews"
    assert sa.attributes["server.port"] == 9080 and sa.attributes["http.response.status_code"] == 200
    assert sa.attributes["user_agent.original"] == "curl/8"
    assert sa.attributes["meshproxy.destination_subset"] == "v2"
    assert sa.attributes["meshproxy.upstream_address"] == "10.0.0.5"
    assert sb.attributes["client.address"] == "10.0.0.1"
    assert sc.attributes["http.request.resend_count"] == 2 and sc.attributes["meshproxy.response_flags"] == "URX"
    assert sc.attributes["meshproxy.upstream_cluster"] == "outbound|9080|v1|ratings"
    assert sc.status_code == 2 and sa.status_code != 2          # STATUS_CODE_ERROR for the 503


def test_unsampled_requests_create_no_spans():
    memory = InMemorySpanExporter()
    export = build_trace_export(memory, service_name="s")
    t = ProxyTracer(export, sample_rate=0.0, rng=random.Random(1))
    for _ in range(100):
        t.finish(t.start([], "server"), 200)
    export.force_flush()
    assert memory.get_finished_spans() == () and export.stats.submitted == 0


def test_unreachable_collector_drops_and_counts_spans_without_raising():
    with socket.socket() as s:             # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    export = build_trace_export(otlp_http_exporter(f"http://127.0.0.1:{port}/v1/traces", timeout_s=0.5),
                                service_name="s", schedule_delay_ms=60_000)
    t = ProxyTracer(export, sample_rate=1.0, rng=random.Random(1))
    began = time.perf_counter()
    for _ in range(50):
        t.finish(t.start([], "client", method=b"GET", path=b"/"), 200)
    finishing = time.perf_counter() - began
    assert export.stats.export_failed == 0        # nothing waited for the collector
    export.force_flush(5.0)
    export.shutdown()
    print(f"\n50 sampled finishes with a dead collector took {finishing * 1e3:.2f} ms on the request path")
    assert export.stats.export_failed == 50 and export.stats.exported == 0
    assert dict(((n, l), v) for n, l, v in export.stats.counters())[
        ("meshproxy_tracing_spans_dropped_total", ("export_failed",))] == 50


class GatedExporter(InMemorySpanExporter):
    """Blocks in export until released: a collector that has stopped answering."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def export(self, spans):
        self.release.wait(10)
        return super().export(spans)


def test_spans_beyond_the_queue_bound_are_dropped_and_counted():
    gated = GatedExporter()
    export = build_trace_export(gated, service_name="s", max_queue_size=4, schedule_delay_ms=60_000)
    t = ProxyTracer(export, sample_rate=1.0, rng=random.Random(1))
    for _ in range(4):                       # a full batch wakes the export thread, which then blocks
        t.finish(t.start([], "server"), 200)
    deadline = time.monotonic() + 5
    while export.stats.dequeued < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    for _ in range(6):                       # 4 fit in the queue again, 2 do not
        t.finish(t.start([], "server"), 200)
    assert export.stats.queue_full == 2 and export.stats.submitted == 8
    gated.release.set()
    export.force_flush()
    assert len(gated.get_finished_spans()) == 8 and export.stats.exported == 8
    export.shutdown()


def test_provider_without_preset_ids_is_refused():
    from opentelemetry.sdk.trace import TracerProvider
    from meshproxy.telemetry.trace_export import SpanExportStats, TraceExport
    with pytest.raises(ValueError, match="PresetIdGenerator"):
        ProxyTracer(TraceExport(TracerProvider(), SpanExportStats(), 16))
