"""The process group's config: the master's snapshots reach workers as updates of what changed."""
from __future__ import annotations

import pytest

from meshproxy.config.compile import ProxyIdentity, WorkloadEndpoint
from meshproxy.config.dump import snapshot_to_dict
from meshproxy.config.incremental import ConfigBuilder
from meshproxy.config.resources import Document
from meshproxy.config.shared import UpdateMismatch, apply_update, encode_update


def vs(host, subset):
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": host},
            "spec": {"hosts": [host], "http": [{"route": [{"destination": {"host": host, "subset": subset}}]}]}}


def dr(host):
    return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": host},
            "spec": {"host": host, "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}}


def workloads(n, moved=0):
    return [WorkloadEndpoint(f"svc{s}", "default", f"10.0.{s}.{1 + (moved if s == 3 else 0)}", {"http": 8080},
                             {"version": "v1"}) for s in range(n)]


def test_workers_get_what_changed_and_keep_their_own_objects_for_the_rest():
    builder = ConfigBuilder(ProxyIdentity())
    docs = lambda subset: [Document("controlplane", 0, dr("svc1")), Document("controlplane", 1, vs("svc1", subset))]
    first = builder.build(docs("v1"), workloads(300)).snapshot
    whole = encode_update(first, None)
    worker, _ = apply_update(None, whole)
    assert snapshot_to_dict(worker) == snapshot_to_dict(first)

    moved = builder.build(docs("v1"), workloads(300, moved=5)).snapshot       # one endpoint moved
    update = encode_update(moved, first)
    assert len(update) < len(whole) / 50
    after, changed = apply_update(worker, update)
    assert snapshot_to_dict(after) == snapshot_to_dict(moved)
    same = [n for n in worker.clusters if "svc3." not in n]
    assert all(after.clusters[n] is worker.clusters[n] for n in same)     # the worker's runtime state stays
    assert after.route_tables is worker.route_tables and changed == {n for n in worker.clusters if "svc3." in n}

    rerouted = builder.build(docs(""), workloads(300, moved=5)).snapshot    # a VirtualService changed
    update = encode_update(rerouted, moved)
    assert len(update) < len(whole) / 20
    last, changed_again = apply_update(after, update)
    assert snapshot_to_dict(last) == snapshot_to_dict(rerouted) and changed_again is None
    table, before = last.route_tables["http"], after.route_tables["http"]
    assert table.exact["svc7"] is before.exact["svc7"]                    # untouched routes: same objects
    with pytest.raises(UpdateMismatch):
        apply_update(worker, update)                                     # built on a version it does not run
