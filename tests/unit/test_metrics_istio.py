"""Istio standard metrics and proxy internals after known traffic."""
from __future__ import annotations


import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshproxy.telemetry.exposition import render_prometheus
from meshproxy.telemetry.metrics import ISTIO_BUCKETS, ISTIO_HTTP_LABELS, PeerInfo, ProxyMetrics, workload_peer

PRODUCTPAGE = workload_peer({"app": "productpage", "version": "v1"}, "default")


def reviews(version: str) -> PeerInfo:
    return workload_peer({"app": "reviews", "version": version}, "default",
                         service="reviews.default.svc.cluster.local")


def samples(metrics: ProxyMetrics, name: str) -> list:
    text = render_prometheus(metrics.dump()).decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]


def test_90_10_split_gives_istio_requests_total_90_and_10_with_istio_labels():
    m = ProxyMetrics()
    v1 = m.http_handle("source", PRODUCTPAGE, reviews("v1"))
    v2 = m.http_handle("source", PRODUCTPAGE, reviews("v2"))
    for i in range(100):
        m.record_http(v1 if i % 10 else v2, 200, "-", 4.0, 0, 512)
    got = {s.labels["destination_version"]: s for s in samples(m, "istio_requests_total")}
    assert {v: s.value for v, s in got.items()} == {"v1": 90, "v2": 10}
    assert got["v2"].labels == {
        "reporter": "source", "source_workload": "productpage-v1", "source_workload_namespace": "default",
        "source_app": "productpage", "source_version": "v1", "source_canonical_service": "productpage",
        "source_canonical_revision": "v1", "source_principal": "unknown", "source_cluster": "Kubernetes",
        "destination_service": "reviews.default.svc.cluster.local", "destination_service_name": "reviews",
        "destination_service_namespace": "default", "destination_workload": "reviews-v2",
        "destination_workload_namespace": "default", "destination_version": "v2", "destination_app": "reviews",
        "destination_canonical_service": "reviews", "destination_canonical_revision": "v2",
        "destination_principal": "unknown", "destination_cluster": "Kubernetes",
        "request_protocol": "http", "response_code": "200", "response_flags": "-",
        "connection_security_policy": "none", "grpc_response_status": ""}
    assert list(got["v2"].labels) == list(ISTIO_HTTP_LABELS)         # Istio's 25 labels, in its order


@pytest.mark.parametrize("labels, expected", [
    ({"app": "reviews", "version": "v2"}, ("reviews-v2", "reviews", "v2")),
    ({"app": "reviews"}, ("reviews", "reviews", "latest")),
    ({"app.kubernetes.io/name": "ratings", "app.kubernetes.io/version": "1.2"}, ("ratings-1.2", "ratings", "1.2")),
    ({"app": "a", "version": "v1", "service.istio.io/canonical-name": "shop",
      "service.istio.io/canonical-revision": "r7", "service.istio.io/workload-name": "shop-deploy"},
     ("shop-deploy", "shop", "r7")),
])
def test_workload_canonical_service_and_revision_follow_istios_label_rules(labels, expected):
    peer = workload_peer(labels, "default")
    assert (peer.workload, peer.canonical_service, peer.canonical_revision) == expected


def test_status_and_response_flags_make_separate_series():
    m = ProxyMetrics()
    h = m.http_handle("destination", PRODUCTPAGE, reviews("v1"), security_policy="mutual_tls")
    m.record_http(h, 200, "-", 1, 0, 0)
    m.record_http(h, 503, "UF", 1, 0, 0)
    m.record_http(h, 503, "UF", 1, 0, 0)
    got = {(s.labels["response_code"], s.labels["response_flags"]): s.value
           for s in samples(m, "istio_requests_total")}
    assert got == {("200", "-"): 1, ("503", "UF"): 2}
    assert {s.labels["reporter"] for s in samples(m, "istio_requests_total")} == {"destination"}


def test_plain_flagged_and_grpc_requests_of_one_status_are_separate_series_with_exact_counts():
    # requests without flags or gRPC status take an int-keyed shortcut to the same series table
    m = ProxyMetrics()
    h = m.http_handle("source", PRODUCTPAGE, reviews("v1"))
    other = m.http_handle("source", PRODUCTPAGE, reviews("v2"))
    for _ in range(3):
        m.record_http(h, 503, "-", 1, 0, 0)
    m.record_http(h, 503, "UF", 1, 0, 0)
    m.record_http(h, 503, "-", 1, 0, 0, grpc_status="14")
    m.record_http(other, 503, "-", 1, 0, 0)
    m.record_http(h, 0, "DC", 1, 0, 0)
    got = {(s.labels["destination_version"], s.labels["response_code"], s.labels["response_flags"],
            s.labels["grpc_response_status"]): s.value for s in samples(m, "istio_requests_total")}
    assert got == {("v1", "503", "-", ""): 3, ("v1", "503", "UF", ""): 1, ("v1", "503", "-", "14"): 1,
                   ("v2", "503", "-", ""): 1, ("v1", "0", "DC", ""): 1}


def test_same_label_set_gets_the_same_handle():
    m = ProxyMetrics()
    assert m.http_handle("source", PRODUCTPAGE, reviews("v1")) == m.http_handle("source", PRODUCTPAGE, reviews("v1"))
    assert m.http_handle("source", PRODUCTPAGE, reviews("v1")) != m.http_handle("source", PRODUCTPAGE, reviews("v2"))


def test_unknown_reporter_is_refused():
    with pytest.raises(ValueError, match="reporter"):
        ProxyMetrics().http_handle("client", PRODUCTPAGE, reviews("v1"))


def test_duration_histogram_is_cumulative_with_bounds_inclusive_and_inf_equal_to_count():
    m = ProxyMetrics()
    h = m.http_handle("source", PRODUCTPAGE, reviews("v1"))
    for ms in (0.2, 0.5, 0.6, 7, 10, 4_000_000):          # 0.5 and 10 sit exactly on bounds
        m.record_http(h, 200, "-", ms, 100, 2000)
    buckets = {s.labels["le"]: s.value for s in samples(m, "istio_request_duration_milliseconds_bucket")}
    assert buckets["0.5"] == 2 and buckets["1.0"] == 3 and buckets["5.0"] == 3 and buckets["10.0"] == 5
    assert buckets["3600000.0"] == 5 and buckets["+Inf"] == 6
    assert len(buckets) == len(ISTIO_BUCKETS) + 1
    assert samples(m, "istio_request_duration_milliseconds_count")[0].value == 6
    assert samples(m, "istio_request_duration_milliseconds_sum")[0].value == pytest.approx(4_000_018.3)
    resp = {s.labels["le"]: s.value for s in samples(m, "istio_response_bytes_bucket")}
    assert resp["1000.0"] == 0 and resp["2500.0"] == 6
    assert samples(m, "istio_request_bytes_sum")[0].value == 600


def test_tcp_connection_and_byte_counters():
    m = ProxyMetrics()
    h = m.tcp_handle("source", PRODUCTPAGE, reviews("v1"))
    m.record_tcp_open(h)
    m.record_tcp_open(h)
    m.record_tcp_bytes(h, 100, 10)
    m.record_tcp_close(h, 50, 5)
    assert [s.value for s in samples(m, "istio_tcp_connections_opened_total")] == [2]
    assert [s.value for s in samples(m, "istio_tcp_connections_closed_total")] == [1]
    assert [s.value for s in samples(m, "istio_tcp_sent_bytes_total")] == [150]
    assert [s.value for s in samples(m, "istio_tcp_received_bytes_total")] == [15]
    assert samples(m, "istio_tcp_sent_bytes_total")[0].labels["request_protocol"] == "tcp"


def test_proxy_internals_count_per_cluster_and_reason():
    m = ProxyMetrics()
    for _ in range(3):
        m.upstream_cx_opened("reviews-v1")
    m.upstream_cx_closed("reviews-v1")
    m.pool_overflow("reviews-v1")
    m.retry("reviews-v1")
    m.retry("reviews-v1")
    m.retry_budget_exhausted("reviews-v1")
    m.outlier_ejected("reviews-v1")
    m.outlier_ejected("reviews-v1")
    m.outlier_restored("reviews-v1")
    m.downstream_cx_opened("http-8080")
    m.rejected("framing")
    m.rejected("framing")
    m.rejected("limits")
    m.config_applied("v1", True, 100.0)
    m.config_applied("v2", False, 200.0)
    m.set_draining(True)

    def value(name, **labels):
        return [s.value for s in samples(m, name) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert value("meshproxy_upstream_cx_active", cluster="reviews-v1") == [2]
    assert value("meshproxy_upstream_cx_total", cluster="reviews-v1") == [3]
    assert value("meshproxy_upstream_rq_pending_overflow_total") == [1]
    assert value("meshproxy_upstream_rq_retry_total") == [2]
    assert value("meshproxy_upstream_rq_retry_overflow_total") == [1]
    assert value("meshproxy_outlier_ejections_active") == [1] and value("meshproxy_outlier_ejections_total") == [2]
    assert value("meshproxy_downstream_cx_active", listener="http-8080") == [1]
    assert value("meshproxy_downstream_rq_rejected_total", reason="framing") == [2]
    assert value("meshproxy_downstream_rq_rejected_total", reason="limits") == [1]
    assert value("meshproxy_config_info", version="v2") == [1] and value("meshproxy_config_info", version="v1") == []
    assert value("meshproxy_config_reloads_total", result="failure") == [1]
    assert value("meshproxy_config_last_reload_success") == [0]
    assert value("meshproxy_config_last_reload_timestamp_seconds") == [200.0]
    assert value("meshproxy_draining") == [1] and value("meshproxy_workers") == [1]


def test_record_http_counts_every_request_in_its_own_series():
    """Round robin over three destinations: each series counts exactly its share.
    (The cost per call is measured by benchmarks/telemetry_bench.py, not here.)"""
    m = ProxyMetrics()
    handles = [m.http_handle("source", PRODUCTPAGE, reviews(v)) for v in ("v1", "v2", "v3")]
    n = 3001
    for i in range(n):
        m.record_http(handles[i % 3], 200, "-", 3.7, 120, 1500)
    by_version = {s.labels["destination_version"]: s.value for s in samples(m, "istio_requests_total")}
    assert by_version == {"v1": 1001, "v2": 1000, "v3": 1000}

def test_disabled_metrics_record_nothing_and_export_nothing():
    m = ProxyMetrics(enabled=False)
    h = m.http_handle("source", PRODUCTPAGE, reviews("v1"))
    m.record_http(h, 200, "-", 1.0, 10, 20)
    t = m.tcp_handle("source", PRODUCTPAGE, reviews("v1"))
    m.record_tcp_open(t)
    m.record_tcp_bytes(t, 1, 2)
    m.record_tcp_close(t, 1, 2)
    assert m.dump() == {} and m._http == {} and m._tcp == {}
