"""Push engine and scope, in process: state table, serialisation sharing, what each proxy gets."""
from __future__ import annotations

import asyncio
import json

import pytest

from controlplane.push import ACK, CONNECTED, NACK, SEND, SENT, IllegalTransition, PushEngine, next_state
from controlplane.scope import Identity, select_resources, select_workloads
from controlplane.store_sqlite import SqliteStore


def obj(kind, name, ns="default", **spec):
    return {"apiVersion": "networking.istio.io/v1", "kind": kind, "metadata": {"name": name, "namespace": ns},
            "spec": spec}


def test_ack_nack_state_table_allows_the_protocol_and_names_illegal_pairs():
    assert next_state(CONNECTED, SEND) == SENT
    assert next_state(SENT, ACK) == "acked"
    assert next_state(SENT, NACK) == "nacked"
    with pytest.raises(IllegalTransition, match="event 'ack' is illegal in state 'connected'"):
        next_state(CONNECTED, ACK)


def test_sidecar_gets_mesh_routes_and_gateway_gets_gateway_routes():
    resources = [obj("Gateway", "ingress", servers=[]),
                 obj("VirtualService", "edge", hosts=["a"], gateways=["ingress"]),
                 obj("VirtualService", "both", hosts=["b"], gateways=["ingress", "mesh"]),
                 obj("VirtualService", "inner", hosts=["c"])]
    names = lambda rs: [r["metadata"]["name"] for r in rs]
    assert names(select_resources(resources, Identity("default", "sidecar"))) == ["both", "inner"]
    assert names(select_resources(resources, Identity("default", "gateway"))) == ["ingress", "edge", "both"]


def test_export_to_dot_hides_a_resource_from_other_namespaces():
    resources = [obj("DestinationRule", "private", "team-a", host="x", exportTo=["."]),
                 obj("DestinationRule", "public", "team-a", host="y")]
    assert [r["metadata"]["name"] for r in select_resources(resources, Identity("team-b"))] == ["public"]
    assert len(select_resources(resources, Identity("team-a"))) == 2


def test_peer_authentications_go_to_every_proxy_authorization_policies_to_their_namespace():
    # a client's auto mTLS needs its destinations' PeerAuthentication (DISABLE: plaintext)
    resources = [obj("PeerAuthentication", "plain", "legacy", mtls={"mode": "DISABLE"}),
                 obj("AuthorizationPolicy", "deny", "legacy", action="DENY", rules=[{}]),
                 obj("AuthorizationPolicy", "mesh", "istio-system")]
    names = lambda rs: [r["metadata"]["name"] for r in rs]
    assert names(select_resources(resources, Identity("shop"))) == ["plain", "mesh"]
    assert names(select_resources(resources, Identity("legacy"))) == ["plain", "deny", "mesh"]


def test_sidecar_egress_hosts_limit_resources_and_workloads():
    resources = [obj("Sidecar", "default", "shop", egress=[{"hosts": ["./*", "istio-system/*"]}]),
                 obj("VirtualService", "cart", "shop", hosts=["cart"]),
                 obj("VirtualService", "ads", "ads", hosts=["ads.ads.svc.cluster.local"])]
    workloads = [{"service": "cart", "namespace": "shop"}, {"service": "ads", "namespace": "ads"}]
    identity = Identity("shop")
    assert [r["metadata"]["name"] for r in select_resources(resources, identity)] == ["default", "cart"]
    assert select_workloads(workloads, resources, identity) == [{"service": "cart", "namespace": "shop"}]
    # another namespace has no Sidecar: it sees everything except the shop Sidecar
    assert len(select_resources(resources, Identity("ads"))) == 2


async def test_proxies_with_the_same_identity_share_one_serialisation(tmp_path):
    store = SqliteStore(str(tmp_path / "s.db"))
    await store.start()
    engine = PushEngine(store, debounce=0.01)
    await engine.start()
    try:
        await store.put(obj("VirtualService", "demo", hosts=["demo"]))
        proxies = [engine.connect(f"n{i}", {"namespace": "default"}) for i in range(50)]
        before = engine.stats.serialisations
        await asyncio.sleep(0.1)            # one debounced push for the change
        assert engine.stats.serialisations - before <= 2         # resources part + workloads part
        assert len({p.target.version for p in proxies}) == 1
        messages = [engine._message_for(p) for p in proxies]
        decoded = [json.loads(m) for m in messages]
        assert {d["version"] for d in decoded} == {proxies[0].target.version}
        assert len({d["nonce"] for d in decoded}) == 50
    finally:
        await engine.close()
        await store.close()


async def test_stale_nonce_ack_is_ignored(tmp_path):
    store = SqliteStore(str(tmp_path / "s.db"))
    await store.start()
    engine = PushEngine(store)
    await engine.start()
    try:
        proxy = engine.connect("n1", {})
        first = json.loads(engine._message_for(proxy))
        await store.put(obj("VirtualService", "demo", hosts=["demo"]))
        engine._recompute(0.0)
        second = json.loads(engine._message_for(proxy))
        assert engine.acknowledge("n1", first["nonce"], first["version"], []) == "stale"
        assert engine.acknowledge("n1", second["nonce"], second["version"], []) == "ack"
        assert proxy.acked_version == second["version"]
    finally:
        await engine.close()
        await store.close()


async def test_proxies_differing_only_in_labels_share_one_target_unless_a_sidecar_selects_by_label(tmp_path):
    store = SqliteStore(str(tmp_path / "s.db"))
    await store.start()
    engine = PushEngine(store)
    await engine.start()
    try:
        await store.put(obj("VirtualService", "demo", hosts=["demo"]))
        engine._recompute(0.0)
        a = engine.connect("a", {"namespace": "default", "labels": {"pod": "a"}})
        b = engine.connect("b", {"namespace": "default", "labels": {"pod": "b"}})
        assert a.target is b.target
        await store.put(obj("Sidecar", "only-a", workloadSelector={"labels": {"pod": "a"}},
                            egress=[{"hosts": ["./nothing"]}]))
        engine._recompute(0.0)
        assert a.target is not b.target
        assert a.target.resources.version != b.target.resources.version
    finally:
        await engine.close()
        await store.close()


async def test_the_first_change_after_quiet_is_pushed_at_once_and_later_ones_are_debounced(tmp_path):
    store = SqliteStore(str(tmp_path / "s.db"))
    await store.start()
    engine = PushEngine(store, debounce=2.0, debounce_max=10.0)
    await engine.start()
    try:
        proxy = engine.connect("n1", {})
        engine._message_for(proxy)
        await store.put(obj("VirtualService", "demo", hosts=["demo"]))
        await asyncio.sleep(0.5)                       # far less than the 2 s quiet window
        assert engine.stats.pushes == 1                # leading edge: out at once
        first = proxy.target.version
        await store.put(obj("VirtualService", "demo", hosts=["demo", "other"]))
        await asyncio.sleep(0.5)
        assert proxy.target.version == first           # within the window: waits for quiet
    finally:
        await engine.close()
        await store.close()


async def test_a_nack_names_the_refused_resources_and_says_the_rest_was_applied(tmp_path):
    store = SqliteStore(str(tmp_path / "s.db"))
    await store.start()
    engine = PushEngine(store)
    await engine.start()
    try:
        proxy = engine.connect("n1", {})
        message = json.loads(engine._message_for(proxy))
        refused = {"VirtualService default/demo": ["VirtualService default/demo: spec.http[0]: bad"]}
        assert engine.acknowledge("n1", message["nonce"], message["version"], refused["VirtualService default/demo"],
                                  refused, True) == "nack"
        shown = proxy.to_dict()
        assert shown["state"] == "nacked" and shown["acked_version"] == ""
        assert shown["applied_version"] == message["version"]
        assert shown["last_nack"]["resources"] == refused and shown["last_nack"]["applied"] is True
    finally:
        await engine.close()
        await store.close()


def workload(wid, service, address, **labels):
    return {"id": wid, "service": service, "namespace": "default", "address": address, "ports": {"http": 8080},
            "labels": labels}


async def test_an_endpoint_change_is_a_delta_of_a_few_hundred_bytes_shared_by_proxies(tmp_path):
    store = SqliteStore(str(tmp_path / "s.db"))
    await store.start()
    engine = PushEngine(store)
    await engine.start()
    try:
        for s in range(200):
            for e in range(3):
                await store.register(workload(f"svc{s}-{e}", f"svc{s}", f"10.0.{s}.{e}", app=f"svc{s}"), 3600)
        await store.put(obj("VirtualService", "demo", hosts=["svc1"]))
        engine._recompute(0.0)
        proxies = [engine.connect(f"n{i}", {"namespace": "default"}) for i in range(3)]
        full = [json.loads(engine._message_for(p)) for p in proxies]
        assert full[0]["workloads"]["base"] == "" and len(full[0]["workloads"]["updated"]) == 600
        await store.deregister("svc7-1")
        await store.register(workload("svc7-9", "svc7", "10.0.7.99", app="svc7"), 3600)
        engine._recompute(0.0)
        deltas = [engine._message_for(p) for p in proxies]
        assert len(deltas[0]) < 600, deltas[0]
        message = json.loads(deltas[0])
        assert message["resources"] is None
        assert message["workloads"]["base"] == full[0]["endpoints_version"]
        assert message["workloads"]["removed"] == ["svc7-1"]
        assert [u["key"] for u in message["workloads"]["updated"]] == ["svc7-9"]
        assert engine.stats.deltas == 1                       # serialised once for the three proxies
        assert message["endpoints_version"] != full[0]["endpoints_version"]
    finally:
        await engine.close()
        await store.close()


async def test_a_resync_sends_whole_parts(tmp_path):
    store = SqliteStore(str(tmp_path / "s.db"))
    await store.start()
    engine = PushEngine(store)
    await engine.start()
    try:
        await store.put(obj("VirtualService", "a", hosts=["a"]))
        engine._recompute(0.0)
        proxy = engine.connect("n1", {})
        first = json.loads(engine._message_for(proxy))
        engine.acknowledge("n1", first["nonce"], first["version"], [])
        await store.put(obj("VirtualService", "b", hosts=["b"]))
        engine._recompute(0.0)
        delta = json.loads(engine._message_for(proxy))
        assert delta["resources"]["base"] == first["resources_version"]
        assert [u["key"] for u in delta["resources"]["updated"]] == ["VirtualService/default/b"]
        assert engine.resync("n1", delta["nonce"]) == "resync"
        whole = json.loads(engine._message_for(proxy))
        assert whole["version"] == delta["version"] and whole["resources"]["base"] == ""
        assert sorted(u["key"] for u in whole["resources"]["updated"]) == ["VirtualService/default/a",
                                                                          "VirtualService/default/b"]
        assert engine.acknowledge("n1", whole["nonce"], whole["version"], []) == "ack"
    finally:
        await engine.close()
        await store.close()


async def test_a_restarted_engine_computes_the_same_versions_and_sends_deltas_from_them(tmp_path):
    store = SqliteStore(str(tmp_path / "s.db"))
    await store.start()
    first = PushEngine(store)
    await first.start()
    await store.put(obj("VirtualService", "a", hosts=["a"]))
    await store.register(workload("w1", "a", "10.0.0.1"), 3600)
    first._recompute(0.0)
    version = first.connect("n1", {}).target.version
    await first.close()
    second = PushEngine(store)
    await second.start()
    try:
        res, ep = version.split(".")
        proxy = second.connect("n1", {}, resources_version=res, endpoints_version=ep)
        assert json.loads(second._message_for(proxy)) == {"type": "in_sync", "version": version}
    finally:
        await second.close()
        await store.close()


def test_a_mesh_wide_default_sidecar_narrows_every_namespace_without_its_own():
    resources = [obj("Sidecar", "default", "istio-system", egress=[{"hosts": ["./*", "istio-system/*"]}]),
                 obj("Sidecar", "default", "open", egress=[{"hosts": ["*/*"]}]),
                 obj("VirtualService", "cart", "shop", hosts=["cart"]),
                 obj("VirtualService", "ads", "ads", hosts=["ads.ads.svc.cluster.local"])]
    names = lambda rs: [r["metadata"]["name"] for r in rs]
    assert names(select_resources(resources, Identity("shop"))) == ["default", "cart"]   # the root default applies
    assert names(select_resources(resources, Identity("open"))) == ["default", "cart", "ads"]
    assert select_resources(resources, Identity("open"))[0]["metadata"]["namespace"] == "open"


def test_scope_follows_what_in_scope_routes_reach_and_the_proxys_own_service():
    resources = [obj("Sidecar", "default", "shop", egress=[{"hosts": ["./cart"]}]),
                 obj("VirtualService", "cart", "shop", hosts=["cart"],
                     http=[{"route": [{"destination": {"host": "cart-v2.backend.svc.cluster.local"}}],
                            "mirror": {"host": "audit.backend"}}]),
                 obj("DestinationRule", "cart-v2", "backend", host="cart-v2"),
                 obj("DestinationRule", "other", "backend", host="other")]
    workloads = [{"service": s, "namespace": ns} for s, ns in
                 [("cart", "shop"), ("cart-v2", "backend"), ("audit", "backend"), ("other", "backend"),
                  ("front", "shop"), ("web", "shop")]]
    identity = Identity("shop", service="web")
    assert [r["metadata"]["name"] for r in select_resources(resources, identity)] == ["default", "cart", "cart-v2"]
    assert [w["service"] for w in select_workloads(workloads, resources, identity)] == ["cart", "cart-v2", "audit",
                                                                                       "web"]


async def test_discovery_namespaces_hide_everything_else_from_every_proxy(tmp_path):
    from controlplane.scope import MeshScope
    store = SqliteStore(str(tmp_path / "s.db"))
    await store.start()
    engine = PushEngine(store, mesh=MeshScope(("team-*",)))
    await engine.start()
    try:
        await store.put(obj("VirtualService", "a", "team-a", hosts=["a"]))
        await store.put(obj("VirtualService", "b", "legacy", hosts=["b"]))
        await store.register({"id": "w1", "service": "a", "namespace": "team-a", "address": "10.0.0.1",
                              "ports": {"http": 80}}, 3600)
        await store.register({"id": "w2", "service": "b", "namespace": "legacy", "address": "10.0.0.2",
                              "ports": {"http": 80}}, 3600)
        engine._recompute(0.0)
        message = json.loads(engine._message_for(engine.connect("n1", {"namespace": "team-a"})))
        assert [u["key"] for u in message["resources"]["updated"]] == ["VirtualService/team-a/a"]
        assert [u["key"] for u in message["workloads"]["updated"]] == ["w1"]
    finally:
        await engine.close()
        await store.close()


async def test_a_secret_goes_with_its_data_only_to_a_granted_gateway_and_is_withheld_from_others(tmp_path):
    from controlplane.security.service import Principal, Security, parse_secret_readers
    from meshproxy.config.identity import SpiffeId
    store = SqliteStore(str(tmp_path / "s.db"))
    await store.start()
    engine = PushEngine(store)
    await engine.start()
    try:
        await store.put(obj("Gateway", "gw", "edge", selector={"app": "gw"}, servers=[
            {"port": {"number": 443, "name": "https", "protocol": "HTTPS"}, "hosts": ["*"],
             "tls": {"mode": "SIMPLE", "credentialName": "cred"}}]))
        await store.put({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                         "metadata": {"name": "cred", "namespace": "edge"}, "data": {"tls.key": "S0VZ"}})
        engine._recompute(0.0)
        info = {"namespace": "edge", "mode": "gateway", "labels": {"app": "gw"}}
        granted = engine.connect("a", info, secrets_granted=True)
        other = engine.connect("b", info, secrets_refusal="sa/b is not granted")
        default = engine.connect("c", info)                       # nothing said: denied
        assert granted.target.version != other.target.version
        sent = {p.node_id: json.loads(engine._message_for(p)) for p in (granted, other, default)}
        assert "S0VZ" in json.dumps(sent["a"]) and (granted.to_dict()["secrets"] == "granted")
        for node, reason in (("b", "sa/b is not granted"), ("c", "this proxy's identity is not granted Secrets")):
            text = json.dumps(sent[node])
            assert "S0VZ" not in text and "tls.key" not in text and reason in text, text
        assert other.to_dict()["secrets"] == "withheld: sa/b is not granted"
    finally:
        await engine.close()
        await store.close()

    # who is granted: the certificate's namespace and service account, in its own namespace only
    security = Security(None, secret_readers=("edge/gw,edge/gw2", "ops/gw"))
    assert security.secret_readers == parse_secret_readers(["edge/gw", "edge/gw2", "ops/gw"])
    workload = lambda ns, sa: Principal(f"workload:{sa}", identity=SpiffeId("cluster.local", ns, sa))
    assert security.secret_refusal(workload("edge", "gw"), "edge") == ""
    assert security.secret_refusal(workload("edge", "sleep"), "edge") == (
        "spiffe://cluster.local/ns/edge/sa/sleep is not granted the Secrets of namespace edge (granted: edge/gw, "
        "edge/gw2, ops/gw; meshctl serve --secret-readers NS/SA)")
    assert security.secret_refusal(workload("ops", "gw"), "edge") != ""
    assert "is not a workload certificate" in security.secret_refusal(Principal("token:admin", scope="admin"), "edge")
    assert "--insecure-loopback" in Security(None, tls=False).secret_refusal(workload("edge", "gw"), "edge")
    with pytest.raises(ValueError, match="with --insecure-loopback the control plane pushes no Secret"):
        Security(None, tls=False, secret_readers=("edge/gw",))
    with pytest.raises(ValueError, match="expected NAMESPACE/SERVICE_ACCOUNT"):
        parse_secret_readers(["edge"])


def test_a_secret_a_destination_rule_names_goes_to_gateways_of_its_namespace_only():
    secret = lambda name: {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                           "metadata": {"name": name, "namespace": "edge"}, "data": {"cacert": "Q0E="}}
    resources = [obj("DestinationRule", "api", "edge", host="api.example.com", subsets=[
                     {"name": "v1", "trafficPolicy": {"portLevelSettings": [
                         {"port": {"number": 443}, "tls": {"mode": "MUTUAL", "credentialName": "client"}}]}}]),
                 secret("client"), secret("client-cacert"), secret("unrelated")]
    names = lambda rs: sorted(r["metadata"]["name"] for r in rs if r["kind"] == "Secret")
    granted = dict(secrets_granted=True)
    assert names(select_resources(resources, Identity("edge", "gateway", **granted))) == ["client", "client-cacert"]
    assert names(select_resources(resources, Identity("other", "gateway", **granted))) == []
    assert names(select_resources(resources, Identity("edge", "sidecar", **granted))) == []
    withheld = select_resources(resources, Identity("edge", "gateway"))
    assert names(withheld) == ["client", "client-cacert"] and not any("data" in r for r in withheld
                                                                      if r["kind"] == "Secret")
