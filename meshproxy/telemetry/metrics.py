"""Per-worker proxy metrics: Istio's standard metrics plus the proxy's own internals.

Hot path
--------
The request path never touches a metrics library.  A label set that is fixed for a
(direction, source, destination, protocol) combination is interned ONCE into an integer
*handle* (:meth:`ProxyMetrics.http_handle`, :meth:`ProxyMetrics.tcp_handle`); the caller
caches the handle (per cluster/subset).  Per request, :meth:`ProxyMetrics.record_http`
does one dict lookup keyed by ``(handle, status, flags, grpc_status)`` and updates that
series' count, sums and bucket counts (C numbers and arrays when compiled, the same
arithmetic in Python otherwise).

Scrape time
-----------
:meth:`ProxyMetrics.dump` turns those structures into a JSON-serialisable snapshot
(``dict``) that can cross a pipe.  :class:`MetricsAggregator` merges the dumps of
several worker processes (keeping what exited workers counted), and
:mod:`meshproxy.telemetry.exposition` renders a merged dump as Prometheus text or
OpenMetrics.  Nothing here is global: every worker owns its :class:`ProxyMetrics`.

Dump format (``DUMP_FORMAT``)::

    {"format": "meshproxy-metrics/1", "instance": "<unique per process start>", "worker": 0,
     "counters":   {family: [[label_values...], value], ...},
     "gauges":     {family: [[label_values...], value], ...},
     "histograms": {family: [[label_values...], [non-cumulative bucket counts..., +Inf], sum], ...}}

Label values are listed in the order of ``FAMILIES[family].labels``.
"""
from __future__ import annotations

import os
import time
from array import array
from bisect import bisect_left
from dataclasses import dataclass
from typing import Iterable, Protocol

import cython

DUMP_FORMAT = "meshproxy-metrics/1"

# Envoy's default histogram bounds, which Istio's stats plugin uses for the duration
# (milliseconds) and the request/response size (bytes) histograms alike.
ISTIO_BUCKETS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
    300000, 600000, 1800000, 3600000,
)
_NBUCKETS = len(ISTIO_BUCKETS) + 1          # + the +Inf bucket
_BOUNDS = array("d", ISTIO_BUCKETS)         # (a C array of doubles for the compiled _bucket)

REPORTERS = ("source", "destination", "waypoint")

# Istio's labels for the request metrics, in the order Istio's stats plugin emits them.
ISTIO_HTTP_LABELS: tuple[str, ...] = (
    "reporter",
    "source_workload", "source_canonical_service", "source_canonical_revision", "source_workload_namespace",
    "source_principal", "source_app", "source_version", "source_cluster",
    "destination_workload", "destination_workload_namespace", "destination_principal", "destination_app",
    "destination_version", "destination_service", "destination_canonical_service",
    "destination_canonical_revision", "destination_service_name", "destination_service_namespace",
    "destination_cluster",
    "request_protocol", "response_code", "grpc_response_status", "response_flags", "connection_security_policy",
)
ISTIO_TCP_LABELS: tuple[str, ...] = tuple(n for n in ISTIO_HTTP_LABELS
                                          if n not in ("response_code", "grpc_response_status"))
# the labels fixed per (reporter, source, destination, protocol, security policy): a handle's key
_PER_REQUEST = ("response_code", "grpc_response_status", "response_flags")
HTTP_HANDLE_LABELS: tuple[str, ...] = tuple(n for n in ISTIO_HTTP_LABELS if n not in _PER_REQUEST)
TCP_HANDLE_LABELS: tuple[str, ...] = tuple(n for n in ISTIO_TCP_LABELS if n not in _PER_REQUEST)
CLUSTER_ID = "Kubernetes"       # Istio's default cluster id (global.multiCluster.clusterName)


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family as exposed.  ``name`` is the Prometheus text name (counters end
    in ``_total``); ``merge`` says how a gauge combines across workers (sum/max/min)."""
    name: str
    type: str                 # "counter" | "gauge" | "histogram"
    help: str
    labels: tuple[str, ...] = ()
    merge: str = "sum"
    buckets: tuple[float, ...] = ()


def _catalog(*families: Family) -> dict[str, Family]:
    return {f.name: f for f in families}


FAMILIES: dict[str, Family] = _catalog(
    # ---- Istio standard metrics
    Family("istio_requests_total", "counter", "Requests handled by the proxy.", ISTIO_HTTP_LABELS),
    Family("istio_request_duration_milliseconds", "histogram", "Duration of requests in milliseconds.",
           ISTIO_HTTP_LABELS, buckets=ISTIO_BUCKETS),
    Family("istio_request_bytes", "histogram", "HTTP request body sizes in bytes.",
           ISTIO_HTTP_LABELS, buckets=ISTIO_BUCKETS),
    Family("istio_response_bytes", "histogram", "HTTP response body sizes in bytes.",
           ISTIO_HTTP_LABELS, buckets=ISTIO_BUCKETS),
    Family("istio_tcp_sent_bytes_total", "counter", "Bytes sent during response on TCP connections.",
           ISTIO_TCP_LABELS),
    Family("istio_tcp_received_bytes_total", "counter", "Bytes received during request on TCP connections.",
           ISTIO_TCP_LABELS),
    Family("istio_tcp_connections_opened_total", "counter", "TCP connections opened.", ISTIO_TCP_LABELS),
    Family("istio_tcp_connections_closed_total", "counter", "TCP connections closed.", ISTIO_TCP_LABELS),
    # ---- proxy internals
    Family("meshproxy_workers", "gauge", "Worker processes currently reporting."),
    Family("meshproxy_downstream_cx_active", "gauge", "Downstream connections currently open.", ("listener",)),
    Family("meshproxy_downstream_cx_total", "counter", "Downstream connections accepted.", ("listener",)),
    Family("meshproxy_downstream_cx_overflow_total", "counter",
           "Downstream connections refused because the listener was at its connection limit (Envoy "
           "downstream_cx_overflow).", ("listener",)),
    Family("meshproxy_downstream_rq_rejected_total", "counter",
           "Downstream requests rejected before routing, by reason (framing, limits, ...).", ("reason",)),
    Family("meshproxy_authz_decisions_total", "counter",
           "AuthorizationPolicy decisions on inbound and gateway listeners (Envoy rbac.allowed / rbac.denied; "
           "audit = an AUDIT policy matched, dry_run = a dry-run policy would have decided); policy is the "
           "deciding policy, \"\" for the default.", ("listener", "protocol", "decision", "policy")),
    Family("meshproxy_tls_handshake_failures_total", "counter",
           "Downstream connections refused before any request: TLS handshake failures and peer-authentication "
           "refusals (plaintext on a STRICT port, no client certificate, ...), by reason.", ("listener", "reason")),
    Family("meshproxy_upstream_cx_active", "gauge", "Upstream connections currently open.", ("cluster",)),
    Family("meshproxy_upstream_cx_total", "counter", "Upstream connections created.", ("cluster",)),
    Family("meshproxy_upstream_cx_connect_fail_total", "counter", "Upstream connection attempts that failed.",
           ("cluster",)),
    Family("meshproxy_upstream_cx_overflow_total", "counter",
           "Times a request had to wait for a connection because the cluster was at maxConnections "
           "(Envoy upstream_cx_overflow).", ("cluster",)),
    Family("meshproxy_upstream_rq_pending_overflow_total", "counter",
           "Requests refused with 503 UO: more than http1MaxPendingRequests waiting for a connection, "
           "or more than http2MaxRequests in flight (Envoy upstream_rq_pending_overflow).", ("cluster",)),
    Family("meshproxy_upstream_rq_retry_total", "counter", "Request retries attempted.", ("cluster",)),
    Family("meshproxy_upstream_rq_retry_overflow_total", "counter",
           "Retries not attempted because the retry budget was exhausted.", ("cluster",)),
    Family("meshproxy_outlier_ejections_active", "gauge", "Endpoints currently ejected by outlier detection.",
           ("cluster",)),
    Family("meshproxy_outlier_ejections_total", "counter", "Endpoint ejections by outlier detection.",
           ("cluster",)),
    Family("meshproxy_config_info", "gauge",
           "Workers running each config version (each worker contributes 1 to its version).", ("version",)),
    Family("meshproxy_config_reloads_total", "counter", "Config reloads/pushes applied, by result.", ("result",)),
    Family("meshproxy_config_last_reload_success", "gauge",
           "1 when the last config reload/push succeeded on every worker, else 0.", merge="min"),
    Family("meshproxy_config_last_reload_timestamp_seconds", "gauge",
           "Unix time of the most recent config reload/push attempt.", merge="max"),
    Family("meshproxy_draining", "gauge", "1 while any worker is draining.", merge="max"),
    Family("meshproxy_workload_cert_renewals_total", "counter",
           "Workload certificate requests to the CA, by result (success, failure).", ("result",)),
    Family("meshproxy_workload_cert_expiry_timestamp_seconds", "gauge",
           "Unix time the current workload certificate expires.", ("identity",), merge="min"),
    Family("meshproxy_workload_cert_valid", "gauge",
           "1 while the workload certificate is within its validity period, 0 once expired.", ("identity",),
           merge="min"),
    Family("meshproxy_workload_cert_renewal_failing", "gauge",
           "1 while renewals fail (CA unreachable or refusing); the current certificate serves until it expires.",
           ("identity",), merge="max"),
    Family("meshproxy_peer_metadata_rejected_total", "counter",
           "Peer metadata (x-envoy-peer-metadata) ignored, by direction (request: from a caller, response: from "
           "a destination) and reason: plaintext (not over mutual TLS), malformed, too_large, namespace_mismatch "
           "(its NAMESPACE is not the one of the peer's SPIFFE id), too_many_peers (believed, but the worker labels "
           "no more distinct peers).", ("direction", "reason")),
    Family("meshproxy_upstream_tls_handshakes_total", "counter",
           "ISTIO_MUTUAL connections opened to other sidecars, by session (full handshake, or resumed).",
           ("session",)),
    Family("meshproxy_tracing_spans_exported_total", "counter", "Spans accepted by the trace collector."),
    Family("meshproxy_tracing_spans_dropped_total", "counter",
           "Sampled spans dropped (queue full or export failed).", ("reason",)),
    Family("meshproxy_accesslog_entries_written_total", "counter", "Access log lines written."),
    Family("meshproxy_accesslog_entries_dropped_total", "counter",
           "Access log lines dropped because the buffer was full or the sink failed.", ("reason",)),
)


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """What Istio's labels say about one side of a request.  ``service`` is the FQDN
    (``reviews.default.svc.cluster.local``); unknown parts stay ``"unknown"`` as in Istio.
    Build a known workload's with :func:`workload_peer` (Istio's derivation rules)."""
    workload: str = "unknown"
    namespace: str = "unknown"
    app: str = "unknown"
    version: str = "unknown"
    service: str = "unknown"
    service_name: str = "unknown"
    service_namespace: str = "unknown"
    canonical_service: str = "unknown"
    canonical_revision: str = "unknown"
    principal: str = "unknown"
    cluster: str = "unknown"

    def label_values(self, side: str) -> dict[str, str]:
        """This peer as the ``source_*`` or ``destination_*`` labels."""
        values = {f"{side}_workload": self.workload, f"{side}_workload_namespace": self.namespace,
                  f"{side}_app": self.app, f"{side}_version": self.version,
                  f"{side}_canonical_service": self.canonical_service,
                  f"{side}_canonical_revision": self.canonical_revision,
                  f"{side}_principal": self.principal, f"{side}_cluster": self.cluster}
        if side == "destination":
            values |= {"destination_service": self.service, "destination_service_name": self.service_name,
                       "destination_service_namespace": self.service_namespace}
        return values


UNKNOWN_PEER = PeerInfo()


def workload_peer(labels, namespace: str, *, fallback_name: str = "unknown", service: str = "unknown",
                  principal: str = "unknown") -> PeerInfo:
    """A workload's labels as Istio derives them from its pod labels:
    app/version from ``app``/``version`` (then ``app.kubernetes.io/name``/``.../version``);
    canonical service from ``service.istio.io/canonical-name``, ``app.kubernetes.io/name``,
    ``app``, else the workload name; canonical revision likewise, else ``latest``; the workload
    name from ``service.istio.io/workload-name``, else ``<app>-<version>`` (our stand-in for
    the Deployment name).  ``service`` is the FQDN this workload serves, if known."""
    app = labels.get("app") or labels.get("app.kubernetes.io/name") or fallback_name
    version = labels.get("version") or labels.get("app.kubernetes.io/version") or "unknown"
    workload = labels.get("service.istio.io/workload-name") or (
        f"{app}-{version}" if version != "unknown" and app != "unknown" else app)
    canonical = (labels.get("service.istio.io/canonical-name") or labels.get("app.kubernetes.io/name")
                 or labels.get("app") or workload)
    revision = (labels.get("service.istio.io/canonical-revision") or labels.get("app.kubernetes.io/version")
                or labels.get("version") or "latest")
    name, _, rest = service.partition(".")
    service_namespace = rest.split(".", 1)[0] if rest else ("unknown" if service == "unknown" else namespace)
    return PeerInfo(workload=workload, namespace=namespace, app=app, version=version, service=service,
                    service_name=name if service != "unknown" else "unknown", service_namespace=service_namespace,
                    canonical_service=canonical, canonical_revision=revision, principal=principal,
                    cluster=CLUSTER_ID if namespace != "unknown" else "unknown")


class CounterSource(Protocol):
    """Something whose own counters are read at dump time (tracer export stats, access log);
    it may also have ``gauges()`` in the same shape (the workload certificate manager)."""
    def counters(self) -> Iterable[tuple[str, tuple[str, ...], int]]: ...


class _HttpSeries:
    """One request label set's numbers: the count, the three sums and the three histograms'
    bucket counts (non-cumulative; ``dump`` reports them as they are)."""

    __slots__ = ("count", "duration_sum", "request_sum", "response_sum",
                 "duration_buckets", "request_buckets", "response_buckets")

    def __init__(self) -> None:
        self.count = 0
        self.duration_sum = 0.0
        self.request_sum = 0
        self.response_sum = 0
        self.duration_buckets = array("q", [0]) * _NBUCKETS
        self.request_buckets = array("q", [0]) * _NBUCKETS
        self.response_buckets = array("q", [0]) * _NBUCKETS

    def add(self, duration_ms: float, request_bytes: int, response_bytes: int) -> None:
        self.count += 1
        self.duration_sum += duration_ms
        self.request_sum += request_bytes
        self.response_sum += response_bytes
        self.duration_buckets[_bucket(duration_ms)] += 1
        self.request_buckets[_bucket(request_bytes)] += 1
        self.response_buckets[_bucket(response_bytes)] += 1


def _bucket(value: float) -> int:
    """The histogram bucket of ``value``: the first bound >= value, or +Inf's index."""
    if cython.compiled:
        bounds = _BOUNDS
        n = len(bounds)
        for i in range(n):
            if value <= bounds[i]:
                return i
        return n
    return bisect_left(_BOUNDS, value)


class ProxyMetrics:
    """One worker's metrics.  Not thread-safe: owned by the worker's event loop thread."""

    def __init__(self, worker: int = 0, instance: str | None = None, enabled: bool = True):
        self.worker = worker
        # False (``--disable-metrics``, to measure what metrics cost): requests and TCP
        # connections are not recorded and nothing is exported
        self.enabled = enabled
        self.instance = instance or f"{os.getpid()}-{time.time_ns()}"
        # handle -> static label values (everything but response_code/flags/grpc status)
        self._http_static: list[tuple[str, ...]] = []
        self._http_handles: dict[tuple[str, ...], int] = {}
        # (handle, status, flags, grpc_status) -> its numbers
        self._http: dict[tuple, _HttpSeries] = {}
        # handle * 1000 + status -> the same series of requests without flags or gRPC status
        # (nearly all): an int key instead of a 4-tuple built and hashed per request
        self._plain: dict[int, _HttpSeries] = {}
        self._tcp_static: list[tuple[str, ...]] = []
        self._tcp_handles: dict[tuple[str, ...], int] = {}
        # (handle, flags) -> [opened, closed, sent, received]
        self._tcp: dict[tuple[int, str], list[int]] = {}
        self._counters: dict[tuple[str, tuple[str, ...]], int] = {}
        self._gauges: dict[tuple[str, tuple[str, ...]], float] = {}
        self._sources: list[CounterSource] = []
        self._config_version = ""
        self._gauges[("meshproxy_draining", ())] = 0
        self._gauges[("meshproxy_config_last_reload_success", ())] = 1
        self.declare("meshproxy_config_reloads_total", ("success",))
        self.declare("meshproxy_config_reloads_total", ("failure",))

    # ------------------------------------------------------------------ Istio HTTP

    def http_handle(self, reporter: str, source: PeerInfo, destination: PeerInfo,
                    protocol: str = "http", security_policy: str = "none") -> int:
        """Intern the fixed part of a request metric label set; call once and cache."""
        if reporter not in REPORTERS:
            raise ValueError(f"reporter must be one of {REPORTERS}, got {reporter!r}")
        values = {"reporter": reporter, "request_protocol": protocol, "connection_security_policy": security_policy,
                  **source.label_values("source"), **destination.label_values("destination")}
        key = tuple([values[n] for n in HTTP_HANDLE_LABELS])
        h = self._http_handles.get(key)
        if h is None:
            h = self._http_handles[key] = len(self._http_static)
            self._http_static.append(key)
        return h

    def record_http(self, h: int, status: int, flags: str, duration_ms: float,
                    request_bytes: int, response_bytes: int, grpc_status: str = "") -> None:
        """One finished request.  ``flags`` is Envoy's response flags string (``"-"`` for none)."""
        if not self.enabled:
            return
        if flags == "-" and not grpc_status and 0 <= status < 1000:
            s = self._plain.get(h * 1000 + status)
            if s is None:
                s = self._plain[h * 1000 + status] = self._http_series(h, status, flags, grpc_status)
        else:
            s = self._http_series(h, status, flags, grpc_status)
        s.add(duration_ms, request_bytes, response_bytes)

    def _http_series(self, h: int, status: int, flags: str, grpc_status: str) -> _HttpSeries:
        s = self._http.get((h, status, flags, grpc_status))
        if s is None:
            s = self._http[(h, status, flags, grpc_status)] = _HttpSeries()
        return s

    # ------------------------------------------------------------------ Istio TCP

    def tcp_handle(self, reporter: str, source: PeerInfo, destination: PeerInfo,
                   security_policy: str = "none") -> int:
        if reporter not in REPORTERS:
            raise ValueError(f"reporter must be one of {REPORTERS}, got {reporter!r}")
        values = {"reporter": reporter, "request_protocol": "tcp", "connection_security_policy": security_policy,
                  **source.label_values("source"), **destination.label_values("destination")}
        key = tuple([values[n] for n in TCP_HANDLE_LABELS])
        h = self._tcp_handles.get(key)
        if h is None:
            h = self._tcp_handles[key] = len(self._tcp_static)
            self._tcp_static.append(key)
        return h

    def _tcp_series(self, h: int, flags: str) -> list[int]:
        if not self.enabled:
            return [0, 0, 0, 0]          # counted nowhere
        s = self._tcp.get((h, flags))
        if s is None:
            s = self._tcp[(h, flags)] = [0, 0, 0, 0]
        return s

    def record_tcp_open(self, h: int) -> None:
        self._tcp_series(h, "-")[0] += 1

    def record_tcp_bytes(self, h: int, sent: int, received: int, flags: str = "-") -> None:
        """Bytes moved so far on a long-lived connection (optional periodic report)."""
        s = self._tcp_series(h, flags)
        s[2] += sent
        s[3] += received

    def record_tcp_close(self, h: int, sent: int, received: int, flags: str = "-") -> None:
        """Connection closed; ``sent``/``received`` are the bytes not reported yet."""
        s = self._tcp_series(h, flags)
        s[1] += 1
        s[2] += sent
        s[3] += received

    # ------------------------------------------------------------------ proxy internals

    def inc(self, family: str, labels: tuple[str, ...] = (), n: int = 1) -> None:
        """Add to any counter family of :data:`FAMILIES` (labels in the family's order)."""
        key = (family, labels)
        self._counters[key] = self._counters.get(key, 0) + n

    def declare(self, family: str, labels: tuple[str, ...] = ()) -> None:
        """Make a counter series exist at 0 before its first event, so that a dashboard shows
        0 rather than "No data"."""
        key = (family, labels)
        if key not in self._counters:
            self._counters[key] = 0

    def declare_per(self, label: str, values) -> None:
        """Every counter family labelled only by ``label`` (``listener``, ``cluster``), at 0 for
        each of ``values``."""
        for fam in FAMILIES.values():
            if fam.type == "counter" and fam.labels == (label,):
                for value in values:
                    self.declare(fam.name, (value,))

    def add_gauge(self, family: str, labels: tuple[str, ...], delta: float) -> None:
        key = (family, labels)
        self._gauges[key] = self._gauges.get(key, 0) + delta

    def set_gauge(self, family: str, labels: tuple[str, ...], value: float) -> None:
        self._gauges[(family, labels)] = value

    def downstream_cx_opened(self, listener: str) -> None:
        self.inc("meshproxy_downstream_cx_total", (listener,))
        self.add_gauge("meshproxy_downstream_cx_active", (listener,), 1)

    def downstream_cx_closed(self, listener: str) -> None:
        self.add_gauge("meshproxy_downstream_cx_active", (listener,), -1)

    def downstream_cx_overflow(self, listener: str) -> None:
        self.inc("meshproxy_downstream_cx_overflow_total", (listener,))

    def rejected(self, reason: str) -> None:
        """A downstream request refused before routing (``framing``, ``limits``, ...)."""
        self.inc("meshproxy_downstream_rq_rejected_total", (reason,))

    def upstream_cx_opened(self, cluster: str) -> None:
        self.inc("meshproxy_upstream_cx_total", (cluster,))
        self.add_gauge("meshproxy_upstream_cx_active", (cluster,), 1)

    def upstream_cx_closed(self, cluster: str) -> None:
        self.add_gauge("meshproxy_upstream_cx_active", (cluster,), -1)

    def upstream_cx_connect_failed(self, cluster: str) -> None:
        self.inc("meshproxy_upstream_cx_connect_fail_total", (cluster,))

    def pool_overflow(self, cluster: str) -> None:
        self.inc("meshproxy_upstream_rq_pending_overflow_total", (cluster,))

    def retry(self, cluster: str) -> None:
        self.inc("meshproxy_upstream_rq_retry_total", (cluster,))

    def retry_budget_exhausted(self, cluster: str) -> None:
        self.inc("meshproxy_upstream_rq_retry_overflow_total", (cluster,))

    def outlier_ejected(self, cluster: str) -> None:
        self.inc("meshproxy_outlier_ejections_total", (cluster,))
        self.add_gauge("meshproxy_outlier_ejections_active", (cluster,), 1)

    def outlier_restored(self, cluster: str) -> None:
        self.add_gauge("meshproxy_outlier_ejections_active", (cluster,), -1)

    def config_applied(self, version: str, ok: bool, unix_time: float) -> None:
        """A reload/push was attempted: ``version`` is what the worker runs afterwards."""
        self.inc("meshproxy_config_reloads_total", ("success" if ok else "failure",))
        self.set_gauge("meshproxy_config_last_reload_success", (), 1 if ok else 0)
        self.set_gauge("meshproxy_config_last_reload_timestamp_seconds", (), unix_time)
        if version != self._config_version:
            self._gauges.pop(("meshproxy_config_info", (self._config_version,)), None)
            self._config_version = version
        self.set_gauge("meshproxy_config_info", (version,), 1)

    def set_draining(self, draining: bool) -> None:
        self.set_gauge("meshproxy_draining", (), 1 if draining else 0)

    def attach(self, source: CounterSource) -> None:
        """Read ``source.counters()`` at every dump (tracer export stats, access log)."""
        self._sources.append(source)

    # ------------------------------------------------------------------ scrape time

    def dump(self) -> dict:
        """A JSON-serialisable snapshot of this worker's metrics (see module doc); ``{}``
        when disabled."""
        if not self.enabled:
            return {}
        counters: dict[str, list] = {}
        gauges: dict[str, list] = {}
        histograms: dict[str, list] = {}

        requests = counters.setdefault("istio_requests_total", [])
        durations = histograms.setdefault("istio_request_duration_milliseconds", [])
        req_bytes = histograms.setdefault("istio_request_bytes", [])
        resp_bytes = histograms.setdefault("istio_response_bytes", [])
        for (h, status, flags, grpc), s in self._http.items():
            labels = _with_per_request(ISTIO_HTTP_LABELS, self._http_static[h],
                                       {"response_code": str(status), "grpc_response_status": grpc,
                                        "response_flags": flags})
            requests.append([labels, s.count])
            durations.append([labels, list(s.duration_buckets), s.duration_sum])
            req_bytes.append([labels, list(s.request_buckets), s.request_sum])
            resp_bytes.append([labels, list(s.response_buckets), s.response_sum])

        tcp_names = ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total",
                     "istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total")
        for name in tcp_names:
            counters.setdefault(name, [])
        for (h, flags), s in self._tcp.items():
            labels = _with_per_request(ISTIO_TCP_LABELS, self._tcp_static[h], {"response_flags": flags})
            for name, value in zip(tcp_names, s):
                counters[name].append([labels, value])

        for (family, labels), value in self._counters.items():
            counters.setdefault(family, []).append([list(labels), value])
        for source in self._sources:
            for family, labels, value in source.counters():
                counters.setdefault(family, []).append([list(labels), value])
        for (family, labels), value in self._gauges.items():
            gauges.setdefault(family, []).append([list(labels), value])
        for source in self._sources:
            read_gauges = getattr(source, "gauges", None)
            if read_gauges is not None:
                for family, labels, value in read_gauges():
                    gauges.setdefault(family, []).append([list(labels), value])
        gauges["meshproxy_workers"] = [[[], 1]]
        for fam in FAMILIES.values():           # unlabelled counters exist from the start, at 0
            if fam.type == "counter" and not fam.labels and fam.name not in counters:
                counters[fam.name] = [[[], 0]]
        return {"format": DUMP_FORMAT, "instance": self.instance, "worker": self.worker,
                "counters": counters, "gauges": gauges, "histograms": histograms}


def _with_per_request(names: tuple[str, ...], fixed: tuple, per_request: dict) -> list:
    """A series' label values in ``names`` order: a handle's fixed values with the per-request ones."""
    rest = iter(fixed)
    return [per_request[n] if n in per_request else next(rest) for n in names]


# ---------------------------------------------------------------------- merging

class _Merged:
    """Dump contents keyed for merging: family -> {label tuple -> value}."""

    def __init__(self) -> None:
        self.counters: dict[str, dict[tuple, int | float]] = {}
        self.gauges: dict[str, dict[tuple, float]] = {}
        self.histograms: dict[str, dict[tuple, list]] = {}   # -> [bucket list, sum]

    def add_counters_and_histograms(self, dump: dict) -> None:
        for family, series in dump.get("counters", {}).items():
            into = self.counters.setdefault(family, {})
            for labels, value in series:
                key = tuple(labels)
                into[key] = into.get(key, 0) + value
        for family, series in dump.get("histograms", {}).items():
            into = self.histograms.setdefault(family, {})
            for labels, buckets, total in series:
                key = tuple(labels)
                have = into.get(key)
                if have is None:
                    into[key] = [list(buckets), total]
                else:
                    have[0] = [a + b for a, b in zip(have[0], buckets)]
                    have[1] += total

    def add_gauges(self, dump: dict) -> None:
        for family, series in dump.get("gauges", {}).items():
            merge = FAMILIES[family].merge if family in FAMILIES else "sum"
            into = self.gauges.setdefault(family, {})
            for labels, value in series:
                key = tuple(labels)
                if key not in into:
                    into[key] = value
                elif merge == "max":
                    into[key] = max(into[key], value)
                elif merge == "min":
                    into[key] = min(into[key], value)
                else:
                    into[key] += value

    def to_dump(self) -> dict:
        return {
            "format": DUMP_FORMAT, "instance": "merged", "worker": -1,
            "counters": {f: [[list(k), v] for k, v in s.items()] for f, s in self.counters.items()},
            "gauges": {f: [[list(k), v] for k, v in s.items()] for f, s in self.gauges.items()},
            "histograms": {f: [[list(k), h[0], h[1]] for k, h in s.items()] for f, s in self.histograms.items()},
        }


@dataclass
class _Slot:
    instance: str | None = None
    last: dict | None = None
    base: _Merged | None = None          # counters of instances that exited
    retired: set[str] | None = None


class MetricsAggregator:
    """Sums the dumps of several workers into one exposition.

    Each worker has a *slot* (its index).  ``update(slot, dump)`` records the latest
    dump.  When a slot's worker exits (``worker_exited``) or a dump from a new instance
    arrives for the slot (a restart the master did not report), the previous instance's
    last counters and histograms move into the slot's base, so sums never go backwards
    and are never counted twice; its gauges are dropped (its connections are gone).
    Counts a worker made after its last collected dump are lost unless the worker sends
    a final dump on exit.
    """

    def __init__(self) -> None:
        self._slots: dict[int, _Slot] = {}

    def update(self, slot: int, dump: dict) -> None:
        if dump.get("format") != DUMP_FORMAT:
            raise ValueError(f"unknown metrics dump format {dump.get('format')!r}")
        s = self._slots.setdefault(slot, _Slot(base=_Merged(), retired=set()))
        instance = dump["instance"]
        if instance in s.retired:
            return                              # late dump of a worker already folded in
        if s.instance is not None and s.instance != instance:
            self._retire(s)
        s.instance = instance
        s.last = dump

    def worker_exited(self, slot: int) -> None:
        s = self._slots.get(slot)
        if s is not None and s.instance is not None:
            self._retire(s)

    @staticmethod
    def _retire(s: _Slot) -> None:
        if s.last is not None:
            s.base.add_counters_and_histograms(s.last)
        s.retired.add(s.instance)
        s.instance = None
        s.last = None

    def merged(self) -> dict:
        m = _Merged()
        for slot in self._slots.values():
            base = slot.base
            m.add_counters_and_histograms(base.to_dump())
            if slot.last is not None:
                m.add_counters_and_histograms(slot.last)
                m.add_gauges(slot.last)
        return m.to_dump()


def merge_dumps(dumps: Iterable[dict]) -> dict:
    """Sum live dumps (no restart bookkeeping); the one-shot form of the aggregator."""
    agg = MetricsAggregator()
    for i, d in enumerate(dumps):
        agg.update(i, d)
    return agg.merged()
