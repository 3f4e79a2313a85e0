"""One scrape shows the sum over workers; a worker restart loses and double-counts nothing."""
from __future__ import annotations

import json

from meshproxy.telemetry.metrics import MetricsAggregator, PeerInfo, ProxyMetrics, merge_dumps

SRC = PeerInfo(workload="productpage-v1", namespace="default", app="productpage", version="v1")
DST = PeerInfo(workload="reviews-v1", namespace="default", app="reviews", version="v1",
               service="reviews.default.svc.cluster.local", service_name="reviews", service_namespace="default")


def worker(index: int, instance: str, requests: int, cx_active: int = 0) -> ProxyMetrics:
    m = ProxyMetrics(worker=index, instance=instance)
    h = m.http_handle("source", SRC, DST)
    for _ in range(requests):
        m.record_http(h, 200, "-", 2.0, 10, 100)
    for _ in range(cx_active):
        m.upstream_cx_opened("reviews")
    return m


def over_pipe(dump: dict) -> dict:
    return json.loads(json.dumps(dump))


def counter(merged: dict, family: str) -> float:
    return sum(v for _, v in merged["counters"].get(family, []))


def gauge(merged: dict, family: str) -> float:
    return sum(v for _, v in merged["gauges"].get(family, []))


def hist_count(merged: dict, family: str) -> int:
    return sum(sum(buckets) for _, buckets, _ in merged["histograms"].get(family, []))


def test_two_workers_are_summed_counters_histograms_and_gauges():
    merged = merge_dumps([over_pipe(worker(0, "a", 30, 2).dump()), over_pipe(worker(1, "b", 12, 1).dump())])
    assert counter(merged, "istio_requests_total") == 42
    assert hist_count(merged, "istio_request_duration_milliseconds") == 42
    assert sum(t for _, _, t in merged["histograms"]["istio_request_bytes"]) == 420
    assert gauge(merged, "meshproxy_upstream_cx_active") == 3
    assert gauge(merged, "meshproxy_workers") == 2
    assert len(merged["counters"]["istio_requests_total"]) == 1      # same labels: one series


def test_repeated_scrapes_do_not_double_count():
    agg = MetricsAggregator()
    w = worker(0, "a", 5)
    agg.update(0, over_pipe(w.dump()))
    agg.update(0, over_pipe(w.dump()))
    assert counter(agg.merged(), "istio_requests_total") == 5


def test_worker_restart_keeps_old_counts_and_adds_new_ones_without_double_counting():
    agg = MetricsAggregator()
    agg.update(0, over_pipe(worker(0, "a", 10, cx_active=4).dump()))
    agg.update(1, over_pipe(worker(1, "b", 7).dump()))
    before = counter(agg.merged(), "istio_requests_total")
    agg.worker_exited(0)
    after_exit = agg.merged()
    assert counter(after_exit, "istio_requests_total") == before == 17
    assert hist_count(after_exit, "istio_request_duration_milliseconds") == 17
    assert gauge(after_exit, "meshproxy_upstream_cx_active") == 0    # its connections are gone
    assert counter(after_exit, "meshproxy_upstream_cx_total") == 4   # but it did create them
    agg.update(0, over_pipe(worker(0, "a2", 3).dump()))              # replacement starts from zero
    assert counter(agg.merged(), "istio_requests_total") == 20
    agg.update(0, over_pipe(worker(0, "a2", 3).dump()))
    assert counter(agg.merged(), "istio_requests_total") == 20


def test_restart_noticed_only_by_a_new_instance_id_still_keeps_the_old_counts():
    agg = MetricsAggregator()
    agg.update(0, over_pipe(worker(0, "a", 10).dump()))
    agg.update(0, over_pipe(worker(0, "a2", 1).dump()))
    assert counter(agg.merged(), "istio_requests_total") == 11


def test_late_dump_from_an_exited_worker_is_ignored():
    agg = MetricsAggregator()
    old = worker(0, "a", 10)
    agg.update(0, over_pipe(old.dump()))
    agg.worker_exited(0)
    agg.update(0, over_pipe(worker(0, "a2", 2).dump()))
    agg.update(0, over_pipe(old.dump()))
    assert counter(agg.merged(), "istio_requests_total") == 12


def test_counters_never_go_backwards_across_scrapes_through_restarts():
    agg = MetricsAggregator()
    seen = []
    for instance, n in (("a", 3), ("a", 8), ("b", 1), ("b", 4), ("c", 0), ("c", 2)):
        agg.update(0, over_pipe(worker(0, instance, n).dump()))
        seen.append(counter(agg.merged(), "istio_requests_total"))
    assert seen == sorted(seen) and seen[-1] == 8 + 4 + 2


def test_gauges_merge_by_their_rule():
    a, b = worker(0, "a", 0), worker(1, "b", 0)
    a.config_applied("v2", True, 50.0)
    b.config_applied("v1", False, 40.0)
    b.set_draining(True)
    merged = merge_dumps([a.dump(), b.dump()])
    g = {(f, tuple(l)): v for f, s in merged["gauges"].items() for l, v in s}
    assert g[("meshproxy_config_info", ("v2",))] == 1 and g[("meshproxy_config_info", ("v1",))] == 1
    assert g[("meshproxy_config_last_reload_success", ())] == 0
    assert g[("meshproxy_config_last_reload_timestamp_seconds", ())] == 50.0
    assert g[("meshproxy_draining", ())] == 1
