"""Control-plane metrics, Istio's pilot names where Istio has one.

The control plane is not on the request path, so plain prometheus_client metrics are
fine here, registered into a CollectorRegistry the caller passes (never the default
REGISTRY).  Expose with ``prometheus_client.generate_latest(registry)`` or, for an
OpenMetrics scrape, ``prometheus_client.openmetrics.exposition.generate_latest``.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Istio's pilot_proxy_convergence_time buckets (seconds).
CONVERGENCE_BUCKETS = (0.1, 0.5, 1, 3, 5, 10, 20, 30)


# Counters Istio exposes without the ``_total`` suffix (its dashboards query these names).
ISTIO_COUNTER_NAMES = ("pilot_xds_pushes", "pilot_xds_push_errors", "pilot_total_xds_rejects")


def exposition(registry: CollectorRegistry) -> bytes:
    """Prometheus text for ``registry``, with Istio's names for Istio's counters
    (``pilot_xds_pushes``, not prometheus_client's ``pilot_xds_pushes_total``)."""
    from prometheus_client import generate_latest
    text = generate_latest(registry).decode()
    for name in ISTIO_COUNTER_NAMES:
        text = text.replace(f"{name}_total", name)
    return text.encode()


PUSH_TYPES = ("resources", "endpoints", "snapshot")   # the `type` label of pushes, errors and rejects


class ControlPlaneMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.pushes = Counter("pilot_xds_pushes", "Config pushes sent to proxies, by resource type.",
                              ["type"], registry=registry)
        self.push_errors = Counter("pilot_xds_push_errors", "Config pushes that failed to send, by type.",
                                   ["type"], registry=registry)
        self.connected = Gauge("pilot_xds", "Proxies currently connected to the control plane.",
                               registry=registry)
        self.nacks = Counter("pilot_total_xds_rejects", "Config pushes rejected (NACKed) by proxies, by type.",
                             ["type"], registry=registry)
        self.convergence = Histogram(
            "pilot_proxy_convergence_time", "Seconds from a config change to the last proxy ACK of its push.",
            buckets=CONVERGENCE_BUCKETS, registry=registry)
        self.api_requests = Counter("meshproxy_cp_api_requests", "Control-plane API requests.",
                                    ["method", "kind", "code"], registry=registry)
        self.validation_rejected = Counter("meshproxy_cp_validation_rejected",
                                           "Resources rejected by validation, by kind.", ["kind"], registry=registry)
        self.services = Gauge("pilot_services", "Services known to the service registry.", registry=registry)
        self.endpoints = Gauge("meshproxy_cp_registry_endpoints", "Endpoints known to the service registry.",
                               registry=registry)
        # series a dashboard queries exist from the start at 0 (a panel shows 0, not "No data")
        for type_ in PUSH_TYPES:
            self.pushes.labels(type_)
            self.push_errors.labels(type_)
            self.nacks.labels(type_)

    def push_sent(self, type_: str = "snapshot") -> None:
        self.pushes.labels(type_).inc()

    def push_failed(self, type_: str = "snapshot") -> None:
        self.push_errors.labels(type_).inc()

    def proxy_connected(self) -> None:
        self.connected.inc()

    def proxy_disconnected(self) -> None:
        self.connected.dec()

    def nack(self, type_: str = "snapshot") -> None:
        self.nacks.labels(type_).inc()

    def converged(self, seconds: float) -> None:
        """Config applied in the store -> last connected proxy ACKed that version."""
        self.convergence.observe(seconds)

    def api_request(self, method: str, kind: str, code: int) -> None:
        self.api_requests.labels(method, kind, str(code)).inc()

    def rejected(self, kind: str) -> None:
        self.validation_rejected.labels(kind).inc()

    def registry_size(self, services: int, endpoints: int) -> None:
        self.services.set(services)
        self.endpoints.set(endpoints)
