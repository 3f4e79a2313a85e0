"""Two control-plane replicas on a real etcd: exactly one drives the canary (leader election on an
etcd lease); when it is killed mid-canary the other takes over from the stored status and
finishes the release without resetting the weights."""
from __future__ import annotations

import pytest

from delivery_mesh import DeliveryMesh, Users, VersionApp, wait_for
from controlplane.cli import Client
from controlplane.testing import ControlPlaneProcess, EtcdCluster

pytestmark = pytest.mark.needs_etcd


def leader_of(*cps):
    views = {cp.url: Client(cp.url).call("GET", "/delivery/v1/leader")[1] for cp in cps if cp.proc.poll() is None}
    leaders = [url for url, v in views.items() if v["isLeader"]]
    return leaders, views


def test_killed_leader_replica_is_replaced_and_the_canary_continues_from_its_weight(tmp_path):
    etcd = EtcdCluster(str(tmp_path), members=1).start()
    other = ControlPlaneProcess(etcd.store_spec(), ttl=600.0, log_path=str(tmp_path / "cp-b.log"))
    mesh = None
    try:
        other.start()
        mesh = DeliveryMesh(tmp_path, store=etcd.store_spec(), more_control_planes=(other.url,)).start()
        cps = (mesh.cp, other)
        leaders, views = wait_for(lambda: (lambda r: r if len(r[0]) == 1 else None)(leader_of(*cps)), 10,
                                  "one leader among the replicas")
        assert len({v["leader"] for v in views.values()}) == 1          # both agree who it is
        mesh.add_service("ha", {"v1": VersionApp("v1"), "v2": VersionApp("v2")}, "v1")
        users = Users(mesh.gw_port, "ha.example.com", users=2, pause=0.003).start()
        try:
            mesh.canary("ha", "v1", "v2", {"interval": "500ms", "threshold": 1, "stepWeights": [10, 20, 30, 40],
                                           "minRequests": 10, "metrics": [{"name": "request-success-rate",
                                                                          "thresholdRange": {"min": 99}}]})
            wait_for(lambda: mesh.status("ha").get("canaryWeight", 0) >= 20, 15, "the canary at 20%")
            leader = next(cp for cp in cps if cp.url == leaders[0])
            survivor = next(cp for cp in cps if cp is not leader)
            leader.kill()
            mesh.api = Client(survivor.url)
            wait_for(lambda: leader_of(survivor)[0] == [survivor.url], 10, "the survivor taking the lease")
            status = mesh.wait_phase("ha", ("Succeeded", "Failed"), 20)
        finally:
            users.stop()
        assert status["phase"] == "Succeeded", status["message"]
        assert mesh.weights("ha") == {"v2": 100}
        weights = [w["weight"] for w in status["weights"]]
        assert weights == sorted(weights) and weights[-1] == 100          # never reset to a lower step
        revisions = [e for e in reversed(mesh.api.call("GET", "/history?limit=500")[1]["items"])
                     if e["origin"].startswith("canary default/ha:")]
        written = [e["origin"].split(": ", 1)[1] for e in revisions]     # each step written once, in order
        assert written == ["weight 10", "weight 20", "weight 30", "weight 40", "promoted (analysis passed)"]
        assert any("continues at phase Progressing" in e["message"] for e in status["events"])
    finally:
        if mesh is not None:
            mesh.close()
        other.stop()
        etcd.stop()
