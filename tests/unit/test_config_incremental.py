"""The one build path of files and pushes: per-resource refusal, decode cache, endpoint patches."""
from __future__ import annotations

import asyncio
import threading

import pytest

from meshproxy.config.compile import ProxyIdentity, WorkloadEndpoint, compile_snapshot
from meshproxy.config.decode import decode_documents
from meshproxy.config.dump import snapshot_to_dict
from meshproxy.config.incremental import BuildRunner, ConfigBuilder
from meshproxy.config.resources import Document
from meshproxy.config.store import SnapshotStore
from meshproxy.config.remote_source import PushedConfig


def vs(name: str, host: str, subset: str = "v1", weight: int = 100) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": name},
            "spec": {"hosts": [host], "http": [{"route": [{"destination": {"host": host, "subset": subset},
                                                            "weight": weight}]}]}}


def dr(host: str) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": host},
            "spec": {"host": host, "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                               {"name": "v2", "labels": {"version": "v2"}}]}}


def workloads(services: int, per_service: int = 3, moved: dict[int, int] | None = None) -> list[WorkloadEndpoint]:
    moved = moved or {}
    return [WorkloadEndpoint(f"svc{s}", "default", f"10.0.{s}.{e + 1 + moved.get(s, 0)}", {"http": 8080},
                             {"app": f"svc{s}", "version": "v1" if e else "v2"})
            for s in range(services) for e in range(per_service)]


def docs(source: str, bodies: list[dict]) -> list[Document]:
    return [Document(source, i, b) for i, b in enumerate(bodies)]


def route_weight(snapshot, host: str) -> int:
    vh = snapshot.route_tables["http"].exact[host]
    return vh.routes[0].destinations[0].subset


@pytest.mark.parametrize("source", ["controlplane", "/etc/mesh/config.yaml"])
def test_a_bad_resource_keeps_its_last_good_version_and_the_others_apply_from_files_and_pushes(source):
    builder = ConfigBuilder(ProxyIdentity())
    first = builder.build(docs(source, [dr("svc0"), dr("svc1"), vs("a", "svc0", "v1"), vs("b", "svc1", "v1")]),
                          workloads(2))
    assert first.errors == () and first.rejected == {}
    bad = vs("a", "svc0", "v2", weight=-5)
    second = builder.build(docs(source, [dr("svc0"), dr("svc1"), bad, vs("b", "svc1", "v2")]), workloads(2))
    assert list(second.rejected) == ["VirtualService default/a"]
    assert "spec.http[0].route[0].weight" in second.rejected["VirtualService default/a"][0]
    assert route_weight(second.snapshot, "svc0") == "v1"          # a: last good version kept
    assert route_weight(second.snapshot, "svc1") == "v2"          # b: its change applied
    # a refused resource that never had a good version is simply absent
    third = builder.build(docs(source, [dr("svc0"), dr("svc1"), bad, vs("b", "svc1", "v2"),
                                        vs("c", "svc2", weight=-1)]), workloads(3))
    assert sorted(third.rejected) == ["VirtualService default/a", "VirtualService default/c"]
    assert third.snapshot.route_tables["http"].exact["svc2"].name.startswith("service:")


def test_a_change_decodes_only_the_documents_that_changed():
    builder = ConfigBuilder(ProxyIdentity())
    bodies = [dr(f"svc{s}") for s in range(20)] + [vs(f"v{s}", f"svc{s}") for s in range(20)]
    builder.build(docs("controlplane", bodies), workloads(20))
    assert builder.decodes == 40
    bodies[25] = vs("v5", "svc5", "v2")
    bodies.insert(0, vs("new", "svc30"))                         # positions shift: still cached by content
    out = builder.build(docs("controlplane", bodies), workloads(20))
    assert builder.decodes == 42
    assert route_weight(out.snapshot, "svc5") == "v2"


def test_an_endpoint_change_patches_one_service_and_keeps_routes_and_other_clusters():
    builder = ConfigBuilder(ProxyIdentity())
    bodies = docs("controlplane", [dr("svc1"), vs("v1", "svc1")])
    full = builder.build(bodies, workloads(50)).snapshot
    moved = workloads(50, moved={1: 10})
    out = builder.build(bodies, moved)
    assert out.path == "endpoints" and out.changed_clusters == 3    # svc1's cluster and its two subsets
    snap = out.snapshot
    assert snap.route_tables is full.route_tables and snap.listeners is full.listeners
    changed = {n for n, c in snap.clusters.items() if full.clusters[n] is not c}
    assert changed == {"outbound|8080||svc1.default.svc.cluster.local", "outbound|8080|v1|svc1.default.svc.cluster.local",
                       "outbound|8080|v2|svc1.default.svc.cluster.local"}
    # the patch is exactly what a full compile gives
    fresh = compile_snapshot(decode_documents(bodies).resources, ProxyIdentity(), workloads=moved).snapshot
    assert dict(snap.clusters) == dict(fresh.clusters)
    assert snap.version != full.version


def test_a_new_service_or_port_compiles_in_full():
    builder = ConfigBuilder(ProxyIdentity())
    builder.build([], workloads(3))
    out = builder.build([], workloads(4))
    assert out.path == "full" and "svc3.default.svc.cluster.local" in out.snapshot.route_tables["http"].exact
    other_port = workloads(4)[:-1] + [WorkloadEndpoint("svc3", "default", "10.0.3.9", {"grpc": 9090})]
    assert builder.build([], other_port).path == "full"
    assert builder.build([], other_port).path == "unchanged"


async def test_builds_run_off_the_loop_and_the_swap_happens_on_it():
    store = SnapshotStore()
    swapped_on: list[int] = []
    store.subscribe(lambda new, old: swapped_on.append(threading.get_ident()))
    pushed = PushedConfig(ConfigBuilder(ProxyIdentity()), store)
    built_on: list[int] = []
    original = pushed._build

    def spy(*args):
        built_on.append(threading.get_ident())
        return original(*args)

    pushed._build = spy
    result = await pushed.apply([vs("a", "svc0"), vs("b", "svc0", weight=-1)],
                                [{"service": "svc0", "address": "10.0.0.1", "ports": {"http": 8080}}], "v1")
    assert built_on and built_on[0] != threading.get_ident()
    assert swapped_on == [threading.get_ident()]
    assert result.applied and list(result.rejected) == ["VirtualService default/b"]
    assert store.current.version == "v1" and store.last_rejection.version == "v1"


async def test_the_runner_serialises_builds():
    runner = BuildRunner()
    active, peak = [0], [0]

    def work():
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        sum(range(200_000))
        active[0] -= 1

    await asyncio.gather(*(runner.run(work) for _ in range(4)))
    assert peak[0] == 1 and runner.builds == 4


async def test_model_values_can_be_formatted_in_the_build_thread():
    from meshproxy.config.model import ProxySettings, StringMatch
    text = await BuildRunner().run(lambda: repr(StringMatch("exact", "x")) + repr(ProxySettings()))
    assert text.startswith("StringMatch(kind='exact'")


def test_a_virtualservice_change_recompiles_routes_only_and_equals_a_full_compile():
    builder = ConfigBuilder(ProxyIdentity())
    first = builder.build(docs("controlplane", [dr("svc1"), vs("v1", "svc1")]), workloads(10)).snapshot
    bodies = docs("controlplane", [dr("svc1"), vs("v1", "svc1", "v2"), vs("v3", "svc3")])
    out = builder.build(bodies, workloads(10))
    assert out.path == "routes" and out.changed_clusters == 0
    assert all(out.snapshot.clusters[n] is c for n, c in first.clusters.items())
    assert route_weight(out.snapshot, "svc1") == "v2"
    # an implicit route of an untouched service is the very same object
    assert out.snapshot.route_tables["http"].exact["svc5"] is first.route_tables["http"].exact["svc5"]
    fresh = compile_snapshot(decode_documents(bodies).resources, ProxyIdentity(), workloads=workloads(10))
    assert snapshot_to_dict(out.snapshot) == snapshot_to_dict(fresh.snapshot)
    assert list(out.warnings) == fresh.warnings


def test_a_destinationrule_change_compiles_in_full_and_keeps_the_clusters_it_did_not_change():
    builder = ConfigBuilder(ProxyIdentity())
    first = builder.build(docs("controlplane", [dr("svc1")]), workloads(10)).snapshot
    out = builder.build(docs("controlplane", [dr("svc1"), dr("svc2")]), workloads(10))
    assert out.path == "full" and out.changed_clusters == 2            # svc2's two new subsets
    assert out.snapshot.clusters["outbound|8080||svc1.default.svc.cluster.local"] is \
        first.clusters["outbound|8080||svc1.default.svc.cluster.local"]


def test_routes_recompiled_after_an_endpoint_patch_use_the_patched_endpoints():
    builder = ConfigBuilder(ProxyIdentity())
    builder.build(docs("controlplane", [dr("svc1"), vs("v1", "svc1")]), workloads(5))
    moved = workloads(5, moved={1: 10})
    assert builder.build(docs("controlplane", [dr("svc1"), vs("v1", "svc1")]), moved).path == "endpoints"
    bodies = docs("controlplane", [dr("svc1"), vs("v1", "svc1", "v2")])
    out = builder.build(bodies, moved)
    assert out.path == "routes"
    fresh = compile_snapshot(decode_documents(bodies).resources, ProxyIdentity(), workloads=moved)
    assert snapshot_to_dict(out.snapshot) == snapshot_to_dict(fresh.snapshot)
