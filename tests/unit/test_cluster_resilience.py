"""Outlier detection, panic mode, circuit breakers, retry budget (meshproxy.cluster)."""
import random

import pytest

from meshproxy.config.model import (Cluster, ConnectionPoolPolicy, Endpoint, LoadBalancerPolicy,
                                    OutlierPolicy, TrafficPolicy)
from meshproxy.cluster import ClusterState
from meshproxy.cluster.outlier import IllegalTransition, transition


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def make(n=10, outlier=None, pool=None, clock=None):
    eps = tuple(Endpoint(f"10.0.0.{i}", 8080) for i in range(n))
    policy = TrafficPolicy(load_balancer=LoadBalancerPolicy("ROUND_ROBIN"),
                           connection_pool=pool or ConnectionPoolPolicy(), outlier=outlier)
    c = Cluster("c", "svc", 8080, None, eps, policy)
    return c, ClusterState(c, clock or Clock(), random.Random(7))


def host_of(state, ep):
    """The state's Host record of endpoint ``ep`` (what the proxy keeps from pick_host)."""
    return state.hosts[state.cluster.endpoints.index(ep)]


def picked(state, n=100):
    return {state.pick().address for _ in range(n)}


def fail(state, ep, times, outcome=503):
    for _ in range(times):
        state.record_host(host_of(state, ep), outcome)


OD = OutlierPolicy(consecutive_5xx=5, interval=10.0, base_ejection_time=30.0, max_ejection_percent=50)


def test_endpoint_is_ejected_after_n_consecutive_5xx_and_not_before():
    c, s = make(outlier=OD)
    fail(s, c.endpoints[0], 4)
    assert "10.0.0.0" in picked(s)
    fail(s, c.endpoints[0], 1)
    assert "10.0.0.0" not in picked(s)
    assert s.stats()["endpoints"][0]["health"] == "ejected"


def test_a_success_resets_the_consecutive_count():
    c, s = make(outlier=OD)
    fail(s, c.endpoints[0], 4)
    s.record_host(host_of(s, c.endpoints[0]), 200)
    fail(s, c.endpoints[0], 4)
    assert "10.0.0.0" in picked(s)


def test_local_origin_failures_count_as_5xx():
    c, s = make(outlier=OD)
    for outcome in ("connect-failure", "reset", "timeout", 500, 502):
        s.record_host(host_of(s, c.endpoints[0]), outcome)
    assert "10.0.0.0" not in picked(s)


def test_gateway_errors_eject_on_their_own_threshold_and_500_resets_that_count():
    gw = OutlierPolicy(consecutive_gateway_errors=3, max_ejection_percent=50)
    c, s = make(outlier=gw)
    fail(s, c.endpoints[1], 2, 502)
    s.record_host(host_of(s, c.endpoints[1]), 500)
    fail(s, c.endpoints[1], 2, 504)
    assert "10.0.0.1" in picked(s)
    s.record_host(host_of(s, c.endpoints[1]), "connect-failure")
    assert "10.0.0.1" not in picked(s)


def test_endpoint_returns_when_the_ejection_time_passes_and_the_time_grows_with_each_ejection():
    clock = Clock()
    c, s = make(outlier=OD, clock=clock)
    fail(s, c.endpoints[0], 5)
    clock.now += 29.9
    assert "10.0.0.0" not in picked(s)
    clock.now += 0.2
    assert "10.0.0.0" in picked(s)
    fail(s, c.endpoints[0], 5)                       # second ejection: 2 x 30 s
    assert s.stats()["endpoints"][0]["ejected_for"] == pytest.approx(60.0)
    clock.now += 59
    assert "10.0.0.0" not in picked(s)
    clock.now += 2
    assert "10.0.0.0" in picked(s)


def test_times_ejected_decays_by_one_per_healthy_interval():
    clock = Clock()
    c, s = make(outlier=OD, clock=clock)
    fail(s, c.endpoints[0], 5)
    clock.now += 31
    s.pick()                                          # un-ejected here
    fail(s, c.endpoints[0], 5)                        # times 2
    clock.now += 61
    s.pick()
    clock.now += 25                                   # two healthy intervals: 2 -> 0, then +1
    fail(s, c.endpoints[0], 5)
    assert s.stats()["endpoints"][0]["ejected_for"] == pytest.approx(30.0)


def test_max_ejection_percent_caps_how_many_endpoints_are_ejected():
    c, s = make(n=10, outlier=OutlierPolicy(consecutive_5xx=1, max_ejection_percent=20))
    for ep in c.endpoints:
        s.record_host(host_of(s, ep), 503)
    ejected = [e for e in s.stats()["endpoints"] if e["health"] == "ejected"]
    assert len(ejected) == 2


def test_one_endpoint_can_be_ejected_even_when_the_cap_is_below_one_endpoint():
    c, s = make(n=3, outlier=OutlierPolicy(consecutive_5xx=1, max_ejection_percent=10))
    s.record_host(host_of(s, c.endpoints[0]), 503)
    s.record_host(host_of(s, c.endpoints[1]), 503)
    assert [e["health"] for e in s.stats()["endpoints"]] == ["ejected", "healthy", "healthy"]


def test_panic_mode_uses_all_endpoints_when_healthy_share_is_below_min_health():
    od = OutlierPolicy(consecutive_5xx=1, max_ejection_percent=100, min_health_percent=50)
    c, s = make(n=4, outlier=od)
    s.record_host(host_of(s, c.endpoints[0]), 503)
    assert picked(s) == {"10.0.0.1", "10.0.0.2", "10.0.0.3"} and not s.stats()["panic"]
    s.record_host(host_of(s, c.endpoints[1]), 503)
    s.record_host(host_of(s, c.endpoints[2]), 503)
    assert s.stats()["panic"]
    assert picked(s) == {f"10.0.0.{i}" for i in range(4)}


def test_all_ejected_without_panic_threshold_gives_no_endpoint():
    c, s = make(n=2, outlier=OutlierPolicy(consecutive_5xx=1, max_ejection_percent=100))
    s.record_host(host_of(s, c.endpoints[0]), 503)
    s.record_host(host_of(s, c.endpoints[1]), 503)
    assert s.pick() is None


def test_results_for_an_already_ejected_endpoint_are_ignored():
    c, s = make(outlier=OD)
    fail(s, c.endpoints[0], 10)
    assert s.stats()["endpoints"][0]["times_ejected"] == 1


def test_ejection_state_table_rejects_illegal_events_naming_state_and_event():
    assert transition("healthy", "eject") == "ejected"
    assert transition("ejected", "expire") == "healthy"
    with pytest.raises(IllegalTransition, match="'eject'.*'ejected'"):
        transition("ejected", "eject")
    with pytest.raises(IllegalTransition, match="'expire'.*'healthy'"):
        transition("healthy", "expire")


# ---------------------------------------------------------------- circuit breakers


def test_pending_requests_overflow_at_the_limit_and_free_on_release():
    _, s = make(pool=ConnectionPoolPolicy(max_pending_requests=2))
    assert s.admit_pending() and s.admit_pending()
    assert not s.admit_pending()
    s.release_pending()
    assert s.admit_pending()
    assert s.stats()["overflow"]["pending"] == 1


def test_requests_in_flight_overflow_at_http2_max_requests_apart_from_pending():
    _, s = make(pool=ConnectionPoolPolicy(max_requests=2, max_pending_requests=1))
    assert s.admit_request() and s.admit_request()
    assert not s.admit_request()
    assert s.admit_pending() and not s.admit_pending()   # a separate count
    s.release_request()
    assert s.admit_request()
    stats = s.stats()
    assert stats["overflow"]["requests"] == 1 and stats["overflow"]["pending"] == 1
    assert stats["requests"] == 2 and stats["pending_requests"] == 1
    assert stats["limits"]["max_requests"] == 2


def test_connections_overflow_at_max_connections():
    _, s = make(pool=ConnectionPoolPolicy(max_connections=1))
    assert s.admit_connection() and not s.admit_connection()
    s.release_connection()
    assert s.admit_connection()
    s.force_connection()   # an endpoint with no connection may open one over the limit
    assert s.stats()["connections"] == 2
    s.release_connection()
    assert not s.admit_connection()


def test_max_retries_caps_concurrent_retries():
    _, s = make(pool=ConnectionPoolPolicy(max_retries=1))
    assert s.admit_retry() and not s.admit_retry()
    s.release_retry()
    assert s.admit_retry()


def test_retry_budget_allows_three_concurrent_retries_when_traffic_is_low():
    _, s = make()
    s.admit_request()
    assert [s.admit_retry() for _ in range(4)] == [True, True, True, False]
    assert s.stats()["overflow"]["retry_budget"] == 1


def test_retry_budget_is_twenty_percent_of_requests_in_flight():
    _, s = make()
    for _ in range(50):
        s.admit_request()
    assert sum(s.admit_retry() for _ in range(20)) == 10


def test_stats_show_endpoint_health_load_and_weight():
    c, s = make(n=2, outlier=OD)
    s.host_started(host_of(s, c.endpoints[1]))
    row = s.stats()["endpoints"][1]
    assert (row["address"], row["health"], row["active_requests"], row["weight"], row["ejected_until"]) == \
        ("10.0.0.1", "healthy", 1, 1, None)
