"""Telemetry: Istio-standard metrics, trace propagation and spans, access log.

Per worker process (after fork): one :class:`ProxyMetrics`, one :class:`ProxyTracer`
(over a :class:`TraceExport` from :func:`build_trace_export`), one :class:`AccessLog`.
In the master: a :class:`MetricsAggregator` fed with the workers' ``dump()`` and
:func:`render` for ``/metrics``.
"""
from .accesslog import AccessLog
from .exposition import render, render_openmetrics, render_prometheus
from .metrics import MetricsAggregator, PeerInfo, ProxyMetrics, UNKNOWN_PEER, merge_dumps
from .tracing import PROPAGATION_HEADERS, ProxyTracer, TraceContext

__all__ = ["AccessLog", "render", "render_openmetrics", "render_prometheus", "MetricsAggregator", "PeerInfo",
           "ProxyMetrics", "UNKNOWN_PEER", "merge_dumps", "PROPAGATION_HEADERS", "ProxyTracer", "TraceContext",
           "TraceExport", "build_trace_export", "otlp_http_exporter"]

_EXPORT = ("TraceExport", "build_trace_export", "otlp_http_exporter")


def __getattr__(name: str):
    # span export loads the OpenTelemetry SDK: only when asked for (a propagating proxy never is)
    if name in _EXPORT:
        from . import trace_export
        return getattr(trace_export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
