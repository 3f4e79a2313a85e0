"""Span export: the OpenTelemetry SDK side of tracing, loaded only when an exporter is
configured (``meshproxy run --tracing-endpoint``); propagation (:mod:`.tracing`) never needs it.

:func:`build_trace_export` makes a TracerProvider (never installed globally) with a
:class:`PresetIdGenerator` (so the span the SDK records carries the span id the proxy already
propagated) and a BatchSpanProcessor with a bounded queue.  Spans beyond the queue bound, and
spans whose export failed, are dropped and counted in :class:`SpanExportStats`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import (NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags,
                                 TraceState, set_span_in_context)

class PresetIdGenerator(IdGenerator):
    """Returns the ids the proxy already propagated.  Only :class:`ProxyTracer` sets them,
    immediately before ``start_span`` on the worker's own thread."""

    def __init__(self) -> None:
        self.trace_id = 0
        self.span_id = 0

    def generate_span_id(self) -> int:
        return self.span_id

    def generate_trace_id(self) -> int:
        return self.trace_id


class SpanExportStats:
    """Counts what happened to sampled spans; read at metrics dump time."""

    def __init__(self) -> None:
        self.submitted = 0          # handed to the batch processor (worker thread)
        self.dequeued = 0           # taken from the queue by the export thread
        self.exported = 0
        self.export_failed = 0
        self.queue_full = 0

    @property
    def dropped(self) -> int:
        return self.queue_full + self.export_failed

    def counters(self) -> Iterable[tuple[str, tuple[str, ...], int]]:
        yield "meshproxy_tracing_spans_exported_total", (), self.exported
        yield "meshproxy_tracing_spans_dropped_total", ("queue_full",), self.queue_full
        yield "meshproxy_tracing_spans_dropped_total", ("export_failed",), self.export_failed


class CountingExporter(SpanExporter):
    """Wraps the real exporter; runs on the batch processor's thread."""

    def __init__(self, inner: SpanExporter, stats: SpanExportStats):
        self.inner = inner
        self.stats = stats

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        n = len(spans)
        self.stats.dequeued += n
        try:
            result = self.inner.export(spans)
        except Exception:               # an exporter bug must not kill the export thread
            result = SpanExportResult.FAILURE
        if result == SpanExportResult.SUCCESS:
            self.stats.exported += n
        else:
            self.stats.export_failed += n
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


@dataclass
class TraceExport:
    """A TracerProvider that exports through a bounded batch queue, plus its counts."""
    provider: TracerProvider
    stats: SpanExportStats
    max_queue_size: int

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        return self.provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        self.provider.shutdown()


def otlp_http_exporter(endpoint: str, timeout_s: float = 5.0, headers: dict | None = None) -> SpanExporter:
    """OTLP/HTTP protobuf exporter; ``endpoint`` is the full URL (``http://host:4318/v1/traces``)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter(endpoint=endpoint, timeout=timeout_s, headers=headers)


def build_trace_export(exporter: SpanExporter, *, service_name: str, resource_attributes: dict | None = None,
                       max_queue_size: int = 2048, max_export_batch_size: int = 512,
                       schedule_delay_ms: int = 1000) -> TraceExport:
    """Build (per worker process, after fork) the provider :class:`ProxyTracer` records into."""
    stats = SpanExportStats()
    resource = Resource.create({"service.name": service_name, **(resource_attributes or {})})
    provider = TracerProvider(sampler=ALWAYS_ON, resource=resource, id_generator=PresetIdGenerator())
    provider.add_span_processor(BatchSpanProcessor(
        CountingExporter(exporter, stats), max_queue_size=max_queue_size,
        max_export_batch_size=min(max_export_batch_size, max_queue_size),
        schedule_delay_millis=schedule_delay_ms))
    return TraceExport(provider, stats, max_queue_size)

_KINDS = {"server": SpanKind.SERVER, "client": SpanKind.CLIENT}


def record_span(tracer, ids: PresetIdGenerator, ctx, status: int, route_name: str, upstream_cluster: str,
                subset: str, upstream_address: str, upstream_port: int, retries: int, response_flags: str,
                end_ns: int) -> None:
    """Record one sampled hop (a :class:`~meshproxy.telemetry.tracing.TraceContext`) as a span."""
    method = ctx.method.decode("latin-1") if ctx.method else "_OTHER"
    raw_path = ctx.path.decode("latin-1")
    path, _, query = raw_path.partition("?")
    host, _, port = ctx.authority.decode("latin-1").rpartition(":")
    if not host or not port.isdigit():
        host, port = ctx.authority.decode("latin-1"), ""
    attrs: dict = {
        "http.request.method": method,
        "url.path": path,
        "url.scheme": ctx.scheme,
        "network.protocol.name": "http",
        "network.protocol.version": "1.1",
        "server.address": host,
        "meshproxy.response_flags": response_flags,
        "guid:x-request-id": ctx.request_id.decode("latin-1"),
    }
    if query:
        attrs["url.query"] = query
    if port:
        attrs["server.port"] = int(port)
    if status:
        attrs["http.response.status_code"] = status
    if ctx.user_agent:
        attrs["user_agent.original"] = ctx.user_agent.decode("latin-1")
    if ctx.peer_address:
        attrs["client.address" if ctx.kind == "server" else "network.peer.address"] = ctx.peer_address
    if route_name:
        attrs["http.route"] = route_name
        attrs["meshproxy.route_name"] = route_name
    if upstream_cluster:
        attrs["meshproxy.upstream_cluster"] = upstream_cluster
    if subset:
        attrs["meshproxy.destination_subset"] = subset
    if upstream_address:
        attrs["network.peer.address"] = upstream_address
        attrs["meshproxy.upstream_address"] = upstream_address
        if upstream_port:
            attrs["network.peer.port"] = upstream_port
    if retries:
        attrs["http.request.resend_count"] = retries
    trace_id = int(ctx.trace_id, 16)
    parent_ctx = None
    if ctx.parent_id:
        state = TraceState.from_header([ctx.tracestate.decode("latin-1")]) if ctx.tracestate else None
        parent_ctx = set_span_in_context(NonRecordingSpan(SpanContext(
            trace_id, int(ctx.parent_id, 16), is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED),
            trace_state=state)))
    ids.trace_id = trace_id
    ids.span_id = int(ctx.span_id, 16)
    name = f"{method} {route_name}" if route_name else method
    span = tracer.start_span(name, context=parent_ctx, kind=_KINDS.get(ctx.kind, SpanKind.SERVER),
                                   attributes=attrs, start_time=ctx.start_ns or None,
                                   record_exception=False, set_status_on_exception=False)
    if status == 0 or status >= 500 or (ctx.kind == "client" and status >= 400):
        span.set_status(Status(StatusCode.ERROR))
    span.end(end_time=end_ns)
