"""Sidecar and Gateway resources become listeners; last-good-per-resource across builds."""
from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import yaml

from meshproxy.config.compile import ProxyIdentity, compile_snapshot
from meshproxy.config.decode import decode_documents
from meshproxy.config.load import build_from_paths
from meshproxy.config.resources import Document
from meshproxy.config.watch import ConfigWatcher

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "istio"

SE = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: prod}
spec:
  hosts: [db.prod.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]
  endpoints: [{address: 10.9.0.1}]
"""


def compile_(*texts, identity=ProxyIdentity()):
    docs = [Document("t.yaml", i, b) for i, b in enumerate(
        b for t in texts for b in yaml.safe_load_all(textwrap.dedent(t)) if b)]
    result = decode_documents(docs)
    assert result.errors == []
    return compile_snapshot(result.resources, identity)


def test_sidecar_ingress_and_http_egress_listeners_from_the_istio_sample():
    identity = ProxyIdentity(namespace="prod-us1", labels={"app": "ratings"})
    snap = compile_((FIXTURES / "sidecar-default.yaml").read_text(), identity=identity).snapshot
    by_name = {lst.name: lst for lst in snap.listeners}
    assert set(by_name) == {"http", "egress_9080", "inbound_9080"}
    inbound = by_name["inbound_9080"]
    assert (inbound.address, inbound.port, inbound.protocol) == ("0.0.0.0", 9080, "HTTP")
    route = snap.route_tables[inbound.route_table].default.routes[0]
    assert route.destinations[0].cluster == "inbound|9080||"
    endpoint = snap.clusters["inbound|9080||"].endpoints[0]
    assert (endpoint.address, endpoint.port) == ("127.0.0.1", 8080)
    egress = by_name["egress_9080"]
    assert (egress.address, egress.protocol, egress.route_table) == ("127.0.0.1", "HTTP", "egress_9080")


def test_sidecar_egress_hosts_scope_the_default_route_table():
    other = SE.replace("name: db, namespace: prod", "name: cache, namespace: other").replace(
        "db.prod", "cache.other")
    sidecar = """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: prod}
spec:
  egress: [{hosts: ["./*"]}]
"""
    snap = compile_(SE.replace("TCP", "HTTP").replace("tcp-pg", "http"), other.replace("TCP", "HTTP").replace(
        "tcp-pg", "http"), sidecar, identity=ProxyIdentity(namespace="prod")).snapshot
    table = snap.route_tables["http"]
    assert "db" in table.exact and "cache.other" not in table.exact


def test_sidecar_tcp_egress_listener_forwards_to_the_single_service_in_scope():
    sidecar = """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: prod}
spec:
  egress:
  - port: {number: 15432, protocol: TCP, name: pg}
    bind: 127.0.0.2
    hosts: ["prod/db.prod.svc.cluster.local"]
"""
    snap = compile_(SE, sidecar, identity=ProxyIdentity(namespace="prod")).snapshot
    pg = next(lst for lst in snap.listeners if lst.name == "egress_15432")
    assert (pg.address, pg.port, pg.protocol) == ("127.0.0.2", 15432, "TCP")
    assert pg.tcp_routes[0].destinations[0].cluster == "outbound|5432||db.prod.svc.cluster.local"


def test_https_gateway_server_gets_tls_settings_and_http_server_redirects():
    se = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: some-config-namespace}
spec:
  hosts: [reviews.prod.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.0.1}]
"""
    vs = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookinfo-rule, namespace: some-config-namespace}
spec:
  hosts: [uk.bookinfo.com]
  gateways: [mygateway]
  http: [{route: [{destination: {host: reviews.prod.svc.cluster.local}}]}]
"""
    identity = ProxyIdentity(mode="gateway", labels={"app": "my-gateway-controller"}, gateway_bind="127.0.0.1")
    result = compile_((FIXTURES / "gateway-https.yaml").read_text(), se, vs, identity=identity)
    snap = result.snapshot
    by_port = {lst.port: lst for lst in snap.listeners}
    https = by_port[443]
    assert https.protocol == "HTTPS" and https.address == "127.0.0.1"
    cert = https.tls.certificates[0]
    assert (cert.sni, cert.certificate, cert.private_key) == ("uk.bookinfo.com", "/etc/certs/servercert.pem",
                                                             "/etc/certs/privatekey.pem")
    assert (cert.min_version, cert.max_version, cert.cipher_suites) == ("TLSV1_2", "TLSV1_3", ())
    vh = snap.route_tables[https.route_table].exact["uk.bookinfo.com"]
    assert vh.routes[0].destinations[0].cluster == "outbound|9080||reviews.prod.svc.cluster.local"
    plain = snap.route_tables[by_port[80].route_table].exact["uk.bookinfo.com"]
    assert plain.routes[0].redirect.scheme == "https" and plain.routes[0].redirect.code == 301
    assert by_port[2379].protocol == "TCP" and by_port[2379].tcp_routes == ()


def test_sidecar_mode_ignores_gateways():
    snap = compile_((FIXTURES / "bookinfo-gateway.yaml").read_text()).snapshot
    assert [lst.name for lst in snap.listeners] == ["http"]


# ---------------------------------------------------------------- last good, per resource


GOOD_REVIEWS = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews, subset: v1}}]}]
"""
GOOD_RATINGS = GOOD_REVIEWS.replace("reviews", "ratings")


def test_bad_virtualservice_is_rejected_and_last_good_config_keeps_serving(tmp_path):
    (tmp_path / "reviews.yaml").write_text(GOOD_REVIEWS)
    (tmp_path / "ratings.yaml").write_text(GOOD_RATINGS)
    identity = ProxyIdentity()
    first = build_from_paths([str(tmp_path)], identity)
    assert first.errors == [] and len(first.resource_set) == 2

    (tmp_path / "reviews.yaml").write_text(GOOD_REVIEWS.replace("subset: v1}", "subset: v2}, weight: -5"))
    (tmp_path / "ratings.yaml").write_text(GOOD_RATINGS.replace("subset: v1", "subset: v3"))
    second = build_from_paths([str(tmp_path)], identity, previous=first.resource_set)
    assert second.errors == [
        "VirtualService default/reviews: spec.http[0].route[0].weight: must be >= 0, got -5"]
    table = second.snapshot.route_tables["http"]
    assert table.exact["reviews"].routes[0].destinations[0].subset == "v1"     # last good version
    assert table.exact["ratings"].routes[0].destinations[0].subset == "v3"     # good change applied
    assert "VirtualService default/reviews: new version refused, last good version keeps serving" in second.notes


def test_removed_resources_are_removed_and_unparsable_files_keep_their_resources(tmp_path):
    (tmp_path / "reviews.yaml").write_text(GOOD_REVIEWS)
    (tmp_path / "ratings.yaml").write_text(GOOD_RATINGS)
    first = build_from_paths([str(tmp_path)], ProxyIdentity())
    (tmp_path / "ratings.yaml").unlink()
    (tmp_path / "reviews.yaml").write_text(GOOD_REVIEWS + "  oops: [\n")
    second = build_from_paths([str(tmp_path)], ProxyIdentity(), previous=first.resource_set)
    assert len(second.errors) == 1 and "YAML syntax error" in second.errors[0]
    assert sorted(k[2] for k in second.resource_set) == ["reviews"]


def test_missing_path_builds_no_snapshot():
    result = build_from_paths(["/nonexistent/meshproxy-config"], ProxyIdentity())
    assert result.snapshot is None
    assert result.errors == ["/nonexistent/meshproxy-config: no such file or directory"]


async def test_watcher_calls_on_change_once_after_a_change_settles(tmp_path):
    f = tmp_path / "vs.yaml"
    f.write_text(GOOD_REVIEWS)
    calls = []
    watcher = ConfigWatcher([str(tmp_path)], lambda: calls.append(1), interval=0.01)
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.sleep(0.05)
        assert calls == []
        f.write_text(GOOD_RATINGS)
        for _ in range(100):
            if calls:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert calls == [1]
    finally:
        task.cancel()
