"""explain() on a bookinfo-style VirtualService."""
from types import MappingProxyType

from meshproxy.config.model import (Cluster, ConsistentHash, Endpoint, HeaderMatch, HttpRoute, Listener,
                                    LoadBalancerPolicy, OutlierPolicy, RetryPolicy, RouteMatch, RouteTable,
                                    Snapshot, StringMatch, TrafficPolicy, VirtualHost, WeightedDestination)
from meshproxy.router.explain import explain

HOST = "reviews.default.svc.cluster.local"


def dest(subset, weight):
    return WeightedDestination(HOST, subset, 9080, weight, f"outbound|9080|{subset}|{HOST}")


def bookinfo():
    jason = HttpRoute(
        name="v2-for-jason", source="VirtualService default/reviews: spec.http[0]",
        matches=(RouteMatch(headers=(HeaderMatch("end-user", StringMatch("exact", "jason")),)),),
        destinations=(dest("v2", 100),))
    canary = HttpRoute(
        name="canary", source="VirtualService default/reviews: spec.http[1]",
        destinations=(dest("v1", 90), dest("v3", 10), dest("v2", 0)), timeout=2.0,
        retries=RetryPolicy(3, 0.5, frozenset({"5xx", "connect-failure"})))
    vhost = VirtualHost("default/reviews", ("reviews", "reviews:9080", HOST), (jason, canary))
    table = RouteTable("9080", MappingProxyType({"reviews": vhost, "reviews:9080": vhost, HOST: vhost}))
    policy = TrafficPolicy(load_balancer=LoadBalancerPolicy(consistent_hash=ConsistentHash("header", "end-user")),
                           outlier=OutlierPolicy(consecutive_5xx=5))
    clusters = {f"outbound|9080|{v}|{HOST}": Cluster(f"outbound|9080|{v}|{HOST}", HOST, 9080, v,
                                                      (Endpoint("10.0.0.1", 9080),), policy)
                for v in ("v1", "v2", "v3")}
    listener = Listener("0.0.0.0_9080", "0.0.0.0", 9080, "HTTP", route_table="9080")
    return Snapshot("1", (listener,), {"9080": table}, clusters)


def test_explain_says_why_earlier_routes_did_not_match_and_what_the_chosen_route_does():
    text = explain(bookinfo(), "reviews:9080", "/reviews/1", headers={"end-user": "bob"})
    assert "virtual host 'default/reviews' (VirtualService default/reviews) via exact domain \"reviews:9080\"" in text
    assert 'route[0] "v2-for-jason": header end-user exact "jason" != "bob"' in text
    assert 'route[1] "canary": MATCHED (no match conditions)  [VirtualService default/reviews: spec.http[1]]' in text
    assert f"{HOST} subset v1 port 9080 weight 90 share 90.0% -> cluster outbound|9080|v1|{HOST}" in text
    assert "weight 0 share 0% (never chosen)" in text
    assert "split is sticky per header end-user" in text
    assert "timeout: 2s" in text
    assert "retries: 3 on 5xx,connect-failure, per try 500ms" in text
    assert "outlier detection: consecutive 5xx 5" in text
    assert "connection pool: max connections unlimited" in text


def test_explain_shows_the_first_route_matching_for_jason():
    text = explain(bookinfo(), "reviews", "/", headers={"End-User": "jason"}, port=9080)
    assert 'route[0] "v2-for-jason": MATCHED by match[0]' in text
    assert "route[1]" not in text


def test_explain_reports_no_virtual_host():
    text = explain(bookinfo(), "ratings:9080", "/")
    assert 'no virtual host for "ratings:9080" and no default: 404 NR' in text
