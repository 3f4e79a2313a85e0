"""Per-request CPU cost of telemetry, each part measured side by side in one run.

    .venv/bin/python benchmarks/telemetry_bench.py [--n 50000]

Measures process CPU time (``time.process_time``, so the OTLP export thread's work when
spans are sampled is included) per simulated request for: an empty loop (baseline),
metrics record_http, tracing start+finish unsampled / 1% / 100% (exporting to a dead
endpoint, so every sampled span is built, queued and dropped), and the access log
(buffer + flush).  Printed numbers are the baseline-subtracted cost in us/request.

ProxyTracer.start + finish, unsampled, tracer alone (min of 200 interleaved runs on the shared
2-core dev box; single runs there vary by +-50%): unsampled W3C parent 2.2 us before (88d5df1)
and after; no trace fields (new ids + x-request-id) 2.6 -> 2.2 us.
"""
from __future__ import annotations

import argparse
import io
import random
import socket
import time

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from meshproxy.telemetry.accesslog import AccessLog
from meshproxy.telemetry.metrics import PeerInfo, ProxyMetrics
from meshproxy.telemetry.trace_export import build_trace_export, otlp_http_exporter
from meshproxy.telemetry.tracing import ProxyTracer

HEADERS = [(b"host", b"reviews:9080"), (b"user-agent", b"bench/1"), (b"accept", b"*/*"),
           (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
           (b"x-request-id", b"7f3c1b2a-0000-4000-8000-000000000001")]
FRESH = [(b"host", b"reviews:9080"), (b"user-agent", b"bench/1"), (b"accept", b"*/*")]


def cpu_per_call(fn, n: int) -> float:
    began = time.process_time()
    fn(n)
    return (time.process_time() - began) / n * 1e6


class EncodeOnlyExporter(SpanExporter):
    """Does the exporter's CPU work (protobuf encoding) without the network."""

    def export(self, spans):
        encode_spans(spans).SerializeToString()
        return SpanExportResult.SUCCESS


def dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1/traces"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000)
    n = ap.parse_args().n

    def baseline(k):
        for _ in range(k):
            pass

    metrics = ProxyMetrics()
    src = PeerInfo("productpage-v1", "default", "productpage", "v1")
    handles = [metrics.http_handle("source", src, PeerInfo(f"reviews-{v}", "default", "reviews", v,
                                                              "reviews.default.svc.cluster.local", "reviews", "default"))
               for v in ("v1", "v2", "v3")]

    def record(k):
        rec = metrics.record_http
        for i in range(k):
            rec(handles[i % 3], 200, "-", 3.7, 120, 1500)

    def tracing(rate, headers, exporter=None):
        exporter = exporter or otlp_http_exporter(dead_endpoint(), timeout_s=0.2)
        export = build_trace_export(exporter, service_name="bench", max_queue_size=2048)
        tracer = ProxyTracer(export, sample_rate=rate, rng=random.Random(1))

        def run(k):
            start, finish = tracer.start, tracer.finish
            for _ in range(k):
                ctx = start(headers, "client", method=b"GET", path=b"/reviews/1", authority=b"reviews:9080")
                finish(ctx, 200, route_name="reviews", upstream_cluster="outbound|9080|v1|reviews", subset="v1",
                       upstream_address="10.0.0.5", upstream_port=9080)
        return run, export

    log = AccessLog(io.BytesIO(), max_entries=n + 1, flush_threshold=n + 1)

    def access(k):
        write = log.log
        for _ in range(k):
            write(1.7e9, b"GET", b"/reviews/1", "HTTP/1.1", 200, "-", 0, 1500, 3.7, "10.0.0.5:9080", 3.0,
                  b"7f3c1b2a-0000-4000-8000-000000000001", b"4bf92f3577b34da6a3ce929d0e0e4736", "reviews",
                  b"bench/1", "10.0.0.1:5555", b"reviews:9080", "outbound|9080|v1|reviews")
        log.flush()

    base = cpu_per_call(baseline, n)
    rows = [("metrics record_http", cpu_per_call(record, n) - base)]
    unsampled_parent, _ = tracing(0.01, HEADERS)
    rows.append(("tracing start+finish, unsampled parent", cpu_per_call(unsampled_parent, n) - base))
    no_trace_fields, _ = tracing(0.0, FRESH)
    rows.append(("tracing start+finish, no trace fields, rate 0", cpu_per_call(no_trace_fields, n) - base))
    for label, rate in (("tracing start+finish, new traces at 1%", 0.01),
                        ("tracing start+finish, 100% (dead collector)", 1.0)):
        run, export = tracing(rate, FRESH)
        rows.append((label, cpu_per_call(run, n) - base))
        rows.append(("   spans dropped (queue full + export failed)", None, export.stats))
        export.provider.shutdown = lambda: None
    run, export = tracing(1.0, FRESH, EncodeOnlyExporter())
    rows.append(("tracing 100%, spans OTLP-encoded, not sent", cpu_per_call(run, n) - base))
    export.force_flush()
    rows.append(("   spans dropped (queue full + export failed)", None, export.stats))

    def access_hot(k):
        write = log.log
        for _ in range(k):
            write(1.7e9, b"GET", b"/reviews/1", "HTTP/1.1", 200, "-", 0, 1500, 3.7, "10.0.0.5:9080", 3.0,
                  b"7f3c1b2a-0000-4000-8000-000000000001", b"4bf92f3577b34da6a3ce929d0e0e4736", "reviews",
                  b"bench/1", "10.0.0.1:5555", b"reviews:9080", "outbound|9080|v1|reviews")
    rows.append(("access log, log() on the request path", cpu_per_call(access_hot, n) - base))
    rows.append(("access log, flush() (format+write, per line)", cpu_per_call(lambda k: log.flush(), n)))
    rows.append(("access log, log() + flush() together", cpu_per_call(access, n) - base))
    print(f"telemetry cost per request, n={n}, CPU time incl. export thread, baseline {base:.3f} us subtracted")
    for row in rows:
        if row[1] is None:
            s = row[2]
            print(f"  {row[0]:<46} submitted={s.submitted} queue_full={s.queue_full} export_failed={s.export_failed}")
        else:
            print(f"  {row[0]:<46} {row[1]:7.2f} us/request")


if __name__ == "__main__":
    main()
