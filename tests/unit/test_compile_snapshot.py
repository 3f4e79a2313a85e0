"""Compiling decoded resources into the snapshot: hosts, conflicts, merges, clusters, policies."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import yaml

from meshproxy.config.compile import ProxyIdentity, WorkloadEndpoint, compile_snapshot
from meshproxy.config.decode import decode_documents
from meshproxy.config.dump import snapshot_to_dict
from meshproxy.config.resources import Document

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "istio"
REVIEWS = "reviews.default.svc.cluster.local"

REVIEWS_SE = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hosts: [reviews.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v2}}
  - {address: 10.0.0.3, ports: {http: 9081}, labels: {version: v3}}
"""
REVIEWS_DR = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
"""


def resources(*texts: str):
    docs = []
    for text in texts:
        for body in yaml.safe_load_all(textwrap.dedent(text)):
            if body:
                docs.append(Document("test.yaml", len(docs), body))
    result = decode_documents(docs)
    assert result.errors == []
    return result.resources


def compile_(*texts: str, identity: ProxyIdentity = ProxyIdentity(), workloads=()):
    return compile_snapshot(resources(*texts), identity, workloads=workloads)


def vs(name: str, hosts: str, subset: str = "v1", created: str | None = None, gateways: str | None = None,
       extra_route: str = "") -> str:
    ts = f", creationTimestamp: '{created}'" if created else ""
    gw = f"\n  gateways: {gateways}" if gateways else ""
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}{ts}}}
spec:
  hosts: {hosts}{gw}
  http:{extra_route}
  - route:
    - destination: {{host: reviews, subset: {subset}}}
"""


# ---------------------------------------------------------------- hosts


def test_all_kubernetes_host_aliases_reach_the_same_virtual_host():
    snap = compile_(REVIEWS_SE, REVIEWS_DR, vs("reviews", "[reviews]")).snapshot
    table = snap.route_tables["http"]
    aliases = ["reviews", "reviews.default", "reviews.default.svc", REVIEWS]
    vhosts = {id(table.exact[a]) for a in aliases + [f"{a}:9080" for a in aliases]}
    assert len(vhosts) == 1
    assert table.exact["reviews"].name == "default/reviews"


def test_bare_short_name_only_for_the_proxys_own_namespace():
    snap = compile_(REVIEWS_SE, REVIEWS_DR, vs("reviews", "[reviews]"),
                    identity=ProxyIdentity(namespace="other")).snapshot
    table = snap.route_tables["http"]
    assert "reviews" not in table.exact
    assert table.exact["reviews.default"].name == "default/reviews"


def test_service_entry_without_virtual_service_gets_an_implicit_catch_all_route():
    snap = compile_("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api}
spec:
  hosts: [API.Example.com]
  resolution: DNS
  ports: [{number: 80, name: http, protocol: HTTP}, {number: 8080, name: http-alt, protocol: HTTP}]
""").snapshot
    table = snap.route_tables["http"]
    assert table.exact["api.example.com"].routes[0].destinations[0].cluster == "outbound|80||api.example.com"
    assert table.exact["api.example.com:8080"].routes[0].destinations[0].cluster == "outbound|8080||api.example.com"
    cluster = snap.clusters["outbound|80||api.example.com"]
    assert cluster.resolution == "DNS" and cluster.dns_hosts == (("api.example.com", 80),)


def test_wildcard_hosts_go_to_wildcards_longest_first():
    snap = compile_(REVIEWS_SE, REVIEWS_DR, vs("a", "['*.example.com']"), vs("b", "['*.api.example.com']")).snapshot
    table = snap.route_tables["http"]
    assert [suffix for suffix, _ in table.wildcards] == [".api.example.com", ".example.com"]


# ---------------------------------------------------------------- conflicts and merges


def test_oldest_virtual_service_wins_a_host_on_sidecars_with_a_warning():
    result = compile_(REVIEWS_SE, REVIEWS_DR,
                      vs("newer", "[reviews]", subset="v2", created="2024-02-01T00:00:00Z"),
                      vs("older", "[reviews]", subset="v1", created="2024-01-01T00:00:00Z"))
    vh = result.snapshot.route_tables["http"].exact["reviews"]
    assert vh.name == "default/older"
    assert vh.routes[0].destinations[0].subset == "v1"
    assert result.warnings == [
        f"VirtualService default/newer: spec.hosts[0]: host {REVIEWS} is already routed by VirtualService "
        "default/older (older); sidecars use the oldest VirtualService, this one is ignored for it"]


def test_document_order_breaks_creation_time_ties():
    result = compile_(REVIEWS_SE, REVIEWS_DR, vs("first", "[reviews]"), vs("second", "[reviews]", subset="v2"))
    assert result.snapshot.route_tables["http"].exact["reviews"].name == "default/first"


GATEWAY = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*"]
"""


def test_gateway_merges_virtual_services_for_one_host_with_catch_alls_last():
    a = vs("a", "[bookinfo.com]", subset="v1", gateways="[gw]", created="2024-01-01T00:00:00Z")
    b = vs("b", "[bookinfo.com]", subset="v2", gateways="[gw]", created="2024-01-02T00:00:00Z",
           extra_route="\n  - match: [{uri: {prefix: /v3}}]\n    route: [{destination: {host: reviews, subset: v3}}]")
    snap = compile_(REVIEWS_SE, REVIEWS_DR, GATEWAY, a, b,
                    identity=ProxyIdentity(mode="gateway", labels={"istio": "ingressgateway"})).snapshot
    (listener,) = snap.listeners
    assert (listener.name, listener.address, listener.port, listener.protocol) == ("gateway_8080", "0.0.0.0", 8080, "HTTP")
    vh = snap.route_tables[listener.route_table].exact["bookinfo.com"]
    assert vh.name == "default/a+default/b"
    assert [r.destinations[0].subset for r in vh.routes] == ["v3", "v1", "v2"]
    assert "bookinfo.com:8080" in snap.route_tables[listener.route_table].exact


def test_gateway_with_non_matching_selector_makes_no_listener():
    snap = compile_(GATEWAY, identity=ProxyIdentity(mode="gateway", labels={"app": "other"})).snapshot
    assert snap.listeners == ()


def test_bookinfo_gateway_sample_routes_star_host_to_productpage():
    texts = [(FIXTURES / n).read_text() for n in ("bookinfo-gateway.yaml", "service-entry-bookinfo.yaml")]
    snap = compile_(*texts, identity=ProxyIdentity(mode="gateway", labels={"istio": "ingressgateway"})).snapshot
    default = snap.route_tables["http.8080"].default
    assert default.name == "default/bookinfo"
    assert [m.uri.value for m in default.routes[0].matches] == [
        "/productpage", "/static", "/login", "/logout", "/api/v1/products"]
    assert default.routes[0].destinations[0].cluster == "outbound|9080||productpage.default.svc.cluster.local"


def test_destination_rules_for_one_host_merge_first_policy_and_unique_subsets():
    older = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: first, creationTimestamp: '2024-01-01T00:00:00Z'}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
  subsets: [{name: v1, labels: {version: v1}}]
"""
    newer = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: second, creationTimestamp: '2024-01-02T00:00:00Z'}
spec:
  host: reviews.default.svc.cluster.local
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
  subsets: [{name: v1, labels: {version: v2}}, {name: v3, labels: {version: v3}}]
"""
    result = compile_(REVIEWS_SE, newer, older)
    clusters = result.snapshot.clusters
    assert clusters[f"outbound|9080|v1|{REVIEWS}"].labels == {"version": "v1"}
    assert f"outbound|9080|v3|{REVIEWS}" in clusters
    assert clusters[f"outbound|9080|v3|{REVIEWS}"].policy.load_balancer.simple == "RANDOM"
    assert result.warnings == [
        "DestinationRule default/second: spec.trafficPolicy: ignored, DestinationRule default/first (older) "
        f"already sets the traffic policy for host {REVIEWS}",
        f"DestinationRule default/second: spec.subsets: duplicate subset 'v1' for host {REVIEWS}, the one in "
        "DestinationRule default/first (older) is kept"]


# ---------------------------------------------------------------- clusters


def test_clusters_are_named_istio_style_and_filtered_by_subset_labels():
    snap = compile_(REVIEWS_SE, REVIEWS_DR).snapshot
    assert sorted(snap.clusters) == sorted(f"outbound|9080|{s}|{REVIEWS}" for s in ("", "v1", "v2", "v3"))
    all_eps = snap.clusters[f"outbound|9080||{REVIEWS}"].endpoints
    assert [(e.address, e.port) for e in all_eps] == [("10.0.0.1", 9080), ("10.0.0.2", 9080), ("10.0.0.3", 9081)]
    v3 = snap.clusters[f"outbound|9080|v3|{REVIEWS}"]
    assert [(e.address, e.port) for e in v3.endpoints] == [("10.0.0.3", 9081)]
    assert v3.labels == {"version": "v3"} and v3.subset == "v3" and v3.service == REVIEWS


def test_missing_subset_gives_empty_cluster_and_a_warning_never_another_route():
    result = compile_(REVIEWS_SE, REVIEWS_DR, vs("reviews", "[reviews]", subset="v4"))
    dest = result.snapshot.route_tables["http"].exact["reviews"].routes[0].destinations[0]
    assert dest.cluster == "" and dest.subset == "v4"
    assert result.warnings == [
        "VirtualService default/reviews: spec.http[0].route[0].destination.subset: subset 'v4' not found in any "
        f"DestinationRule for host {REVIEWS}; requests get 503 NR"]


def test_unknown_destination_host_gives_empty_cluster_and_a_warning():
    result = compile_(vs("reviews", "[reviews]"))
    dest = result.snapshot.route_tables["http"].exact["reviews"].routes[0].destinations[0]
    assert dest.cluster == ""
    assert result.warnings == [
        "VirtualService default/reviews: spec.http[0].route[0].destination.host: host "
        f"{REVIEWS} is not in the service registry (no ServiceEntry or registered workload); requests get 503 NR"]


def test_policy_override_order_top_then_port_level_then_subset_then_subset_port_level():
    se = REVIEWS_SE.replace("ports: [{number: 9080, name: http, protocol: HTTP}]",
                            "ports: [{number: 9080, name: http, protocol: HTTP}, {number: 9090, name: http-admin, protocol: HTTP}]")
    dr = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    connectionPool: {tcp: {maxConnections: 10}}
    portLevelSettings:
    - port: {number: 9090}
      loadBalancer: {simple: ROUND_ROBIN}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      outlierDetection: {consecutive5xxErrors: 7}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {simple: LEAST_REQUEST}
      portLevelSettings:
      - port: {number: 9080}
        connectionPool: {tcp: {maxConnections: 3}}
"""
    clusters = compile_(se, dr).snapshot.clusters

    def policy(port, subset=""):
        return clusters[f"outbound|{port}|{subset}|{REVIEWS}"].policy

    assert policy(9080).load_balancer.simple == "RANDOM" and policy(9080).connection_pool.max_connections == 10
    # port level replaces the parts whole: no inherited connection pool
    assert policy(9090).load_balancer.simple == "ROUND_ROBIN"
    assert policy(9090).connection_pool.max_connections == 2**31 - 1
    # subset adds its fields over the top level
    assert policy(9080, "v1").load_balancer.simple == "RANDOM"
    assert policy(9080, "v1").outlier.consecutive_5xx == 7
    assert policy(9080, "v1").connection_pool.max_connections == 10
    # subset port level replaces whole, after the subset's own fields
    assert policy(9080, "v2").connection_pool.max_connections == 3
    assert policy(9080, "v2").load_balancer.simple == "LEAST_REQUEST"
    assert policy(9090, "v2").load_balancer.simple == "LEAST_REQUEST"


def test_registered_workloads_merge_into_service_entry_endpoints_by_port_name():
    workloads = [WorkloadEndpoint("reviews", "default", "10.1.0.9", {"http": 8000}, {"version": "v2"})]
    snap = compile_(REVIEWS_SE, REVIEWS_DR, workloads=workloads).snapshot
    v2 = snap.clusters[f"outbound|9080|v2|{REVIEWS}"]
    assert [(e.address, e.port) for e in v2.endpoints] == [("10.0.0.2", 9080), ("10.1.0.9", 8000)]


def test_workloads_alone_define_a_routable_service():
    snap = compile_(workloads=[WorkloadEndpoint("ratings", "default", "127.0.0.1", {"http": 9080})]).snapshot
    vh = snap.route_tables["http"].exact["ratings"]
    assert vh.routes[0].destinations[0].cluster == "outbound|9080||ratings.default.svc.cluster.local"


# ---------------------------------------------------------------- route contents


def test_routes_carry_istio_defaults_and_compiled_values():
    text = vs("reviews", "[reviews]", extra_route="""
  - match: [{uri: {prefix: /API}, ignoreUriCase: true}]
    timeout: 1.5s
    retries: {attempts: 0}
    mirror: {host: reviews, subset: v2}
    mirrorPercentage: {value: 25}
    route: [{destination: {host: reviews, subset: v3}, weight: 0}, {destination: {host: reviews, subset: v2}, weight: 5}]""")
    routes = compile_(REVIEWS_SE, REVIEWS_DR, text).snapshot.route_tables["http"].exact["reviews"].routes
    first, second = routes
    assert first.matches[0].uri.value == "/api" and first.matches[0].uri.ignore_case
    assert first.timeout == 1.5 and first.retries.attempts == 0
    assert [(d.weight, d.subset) for d in first.destinations] == [(0, "v3"), (5, "v2")]
    assert first.mirrors[0].cluster == f"outbound|9080|v2|{REVIEWS}" and first.mirrors[0].percentage == 25.0
    assert second.retries.attempts == 2
    assert second.retries.retry_on == {"connect-failure", "refused-stream", "unavailable", "cancelled",
                                       "retriable-status-codes"}
    assert second.retries.allow_non_idempotent is False
    assert second.destinations[0].weight == 100
    assert first.source == "VirtualService default/reviews: spec.http[0]"


def test_source_labels_select_matches_for_this_proxy_only():
    text = vs("reviews", "[reviews]", extra_route="""
  - match: [{sourceLabels: {app: productpage}}]
    route: [{destination: {host: reviews, subset: v2}}]""")
    mine = compile_(REVIEWS_SE, REVIEWS_DR, text, identity=ProxyIdentity(labels={"app": "productpage"}))
    other = compile_(REVIEWS_SE, REVIEWS_DR, text, identity=ProxyIdentity(labels={"app": "ratings"}))
    assert len(mine.snapshot.route_tables["http"].exact["reviews"].routes) == 2
    assert len(other.snapshot.route_tables["http"].exact["reviews"].routes) == 1


def test_version_is_a_content_hash_and_dump_is_json():
    a = compile_(REVIEWS_SE, REVIEWS_DR).snapshot
    b = compile_(REVIEWS_SE, REVIEWS_DR).snapshot
    c = compile_(REVIEWS_SE).snapshot
    assert a.version == b.version != c.version
    dump = json.loads(json.dumps(snapshot_to_dict(a)))
    assert dump["version"] == a.version
    assert f"outbound|9080|v1|{REVIEWS}" in dump["clusters"]
    assert {r["kind"] for r in dump["resources"]} == {"ServiceEntry", "DestinationRule"}


def test_circuit_breaker_thresholds_map_like_istiod_and_zero_means_unset():
    dr = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 0}
      http: {http1MaxPendingRequests: 7, http2MaxRequests: 40, maxRetries: 0}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      connectionPool:
        tcp: {maxConnections: 2}
        http: {http1MaxPendingRequests: 0, http2MaxRequests: 0}
"""
    clusters = compile_(REVIEWS_SE, dr).snapshot.clusters
    top = clusters[f"outbound|9080||{REVIEWS}"].policy.connection_pool
    assert (top.max_connections, top.max_pending_requests, top.max_requests, top.max_retries) == \
        (2**31 - 1, 7, 40, 2**31 - 1)
    v1 = clusters[f"outbound|9080|v1|{REVIEWS}"].policy.connection_pool
    # the subset's connectionPool replaces the top level's whole; its zeros are unset (defaults)
    assert (v1.max_connections, v1.max_pending_requests, v1.max_requests) == (2, 2**31 - 1, 2**31 - 1)


def test_destination_rule_workload_selector_applies_to_matching_proxies_only():
    selected = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: for-canary-clients}
spec:
  host: reviews
  workloadSelector: {matchLabels: {app: productpage, track: canary}}
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
"""
    cluster = f"outbound|9080||{REVIEWS}"
    canary = compile_(REVIEWS_SE, selected, identity=ProxyIdentity(labels={"app": "productpage", "track": "canary"}))
    stable = compile_(REVIEWS_SE, selected, identity=ProxyIdentity(labels={"app": "productpage", "track": "stable"}))
    other_ns = compile_(REVIEWS_SE, selected, identity=ProxyIdentity(
        namespace="prod", labels={"app": "productpage", "track": "canary"}))
    assert canary.snapshot.clusters[cluster].policy.load_balancer.simple == "RANDOM"
    assert stable.snapshot.clusters[cluster].policy.load_balancer.simple == "LEAST_REQUEST"
    assert other_ns.snapshot.clusters[cluster].policy.load_balancer.simple == "LEAST_REQUEST"


def test_tcp_only_pool_fields_on_an_http_service_are_warned_with_their_path():
    rule = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pool}
spec:
  host: reviews
  trafficPolicy:
    connectionPool: {tcp: {idleTimeout: 5s, maxConnections: 10}}
    portLevelSettings:
    - port: {number: 9080}
      connectionPool: {tcp: {tcpKeepalive: {time: 60s}}}
"""
    result = compile_(REVIEWS_SE, rule)
    # tcpKeepalive is applied to HTTP upstream connections too: no warning for it
    tail = ("applied to TCP connections only; not to HTTP upstream connections (port 9080): "
            "HTTP upstream connections close after connectionPool.http.idleTimeout, as in Istio")
    assert [w for w in result.warnings if "connectionPool" in w] == [
        f"DestinationRule default/pool: spec.trafficPolicy.connectionPool.tcp.idleTimeout: {tail}"]
    pool = result.snapshot.clusters[f"outbound|9080||{REVIEWS}"].policy.connection_pool
    assert pool.tcp_keepalive == (None, 60.0, None) and pool.tcp_idle_timeout is None   # port level replaces whole
