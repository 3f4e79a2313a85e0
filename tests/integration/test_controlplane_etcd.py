"""Two control-plane replicas sharing a real 3-member etcd cluster on loopback."""
from __future__ import annotations

import asyncio
import random
import shutil
import time

import pytest

from controlplane.cli import Client
from controlplane.testing import ControlPlaneProcess, EtcdCluster
from meshproxy.config.remote import RemoteConfigClient

pytestmark = pytest.mark.needs_etcd

# scripts/setup.sh installs Debian's etcd-server: a missing etcd is a failure, not a skip
assert shutil.which("etcd"), "etcd not found: scripts/setup.sh installs Debian's etcd-server"

VS_PATH = "/apis/networking.istio.io/v1/namespaces/default/virtualservices"


def vs(weights) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "demo"},
            "spec": {"hosts": ["demo"], "http": [{"route": [
                {"destination": {"host": "demo", "subset": "v1"}, "weight": weights[0]},
                {"destination": {"host": "demo", "subset": "v2"}, "weight": weights[1]}]}]}}


class Recorder:
    def __init__(self):
        self.running = None
        self.calls = 0

    def __call__(self, resources, workloads, version):
        self.calls += 1
        self.running = (resources, workloads, version)
        return []

    def weights(self):
        if not self.running or not self.running[0]:
            return None
        return [d["weight"] for d in self.running[0][0]["spec"]["http"][0]["route"]]


async def eventually(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    assert predicate(), "condition not reached within the time limit"


def _etcd_call(endpoint: str, path: str) -> dict:
    import json
    import urllib.request
    req = urllib.request.Request(f"http://{endpoint}{path}", data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=2) as resp:
        return json.loads(resp.read())


def etcd_leader(cluster, skip: str = "") -> str:
    """The name of the member etcd says is the leader, asked of the live members (etcd's
    gRPC gateway: maintenance status and member list)."""
    for name, endpoint in zip(cluster.names, cluster.endpoints):
        if name == skip or cluster.procs[name].poll() is not None:
            continue
        try:
            leader_id = _etcd_call(endpoint, "/v3/maintenance/status")["leader"]
            members = _etcd_call(endpoint, "/v3/cluster/member/list")["members"]
        except OSError:
            continue
        return next(m["name"] for m in members if m["ID"] == leader_id)
    raise AssertionError("no live etcd member answered")


async def kill_etcd_leader(cluster) -> str:
    """Kill the current leader; return its name once the others have elected a new one."""
    leader = etcd_leader(cluster)
    cluster.kill(leader)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if etcd_leader(cluster, skip=leader) != leader:
                return leader
        except (AssertionError, StopIteration, KeyError):
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"no new etcd leader after killing {leader}")


@pytest.fixture
def etcd(tmp_path):
    cluster = EtcdCluster(str(tmp_path)).start()
    yield cluster
    cluster.stop()


async def test_two_replicas_share_state_and_survive_losing_one_replica_and_the_etcd_leader(etcd):
    a = ControlPlaneProcess(etcd.store_spec(), ttl=2.0).start()
    b = ControlPlaneProcess(etcd.store_spec(), ttl=2.0).start()
    api_a, api_b = Client(a.url), Client(b.url)
    recorder = Recorder()
    registration = {"service": "demo", "address": "127.0.0.4", "ports": {"http": 80},
                    "labels": {"version": "v1"}, "ttl": 2.0}
    client = RemoteConfigClient([a.url, b.url], "sidecar-1", {"namespace": "default"}, recorder, registration,
                                backoff_base=0.05, backoff_max=0.3, rng=random.Random(3))
    task = asyncio.create_task(client.run())
    try:
        # a write on replica B reaches the proxy streaming from replica A (through the etcd watch)
        code, created = await asyncio.to_thread(api_b.call, "PUT", f"{VS_PATH}/demo", vs((90, 10)))
        assert code == 201
        # registered through A, seen by all: the config and the endpoint may arrive in separate pushes
        await eventually(lambda: recorder.weights() == [90, 10] and client.status.url == a.url
                         and [w["address"] for w in recorder.running[1]] == ["127.0.0.4"])
        _, endpoints_b = await asyncio.to_thread(api_b.call, "GET", "/registry/v1/namespaces/default/services/demo/endpoints")
        assert [w["address"] for w in endpoints_b["items"]] == ["127.0.0.4"]

        # `meshctl proxies` on replica B lists the proxy connected to replica A
        await eventually(lambda: [(p["node_id"], p["state"]) for p in api_b.call("GET", "/push/v1/proxies")[1]["items"]]
                         == [("sidecar-1", "acked")])
        assert api_b.call("GET", "/push/v1/proxies")[1]["items"][0]["replica"] != "local"

        # optimistic concurrency holds across replicas
        stale = dict(vs((0, 100)), metadata={"name": "demo", "resourceVersion": created["metadata"]["resourceVersion"]})
        await asyncio.to_thread(api_a.call, "PUT", f"{VS_PATH}/demo", vs((80, 20)))
        code, status = await asyncio.to_thread(api_b.call, "PUT", f"{VS_PATH}/demo", stale)
        assert (code, status["reason"]) == (409, "Conflict")

        # lose replica A and the etcd leader: the proxy moves to B, writes and pushes continue
        a.kill()
        await kill_etcd_leader(etcd)
        await eventually(lambda: client.status.connected and client.status.url == b.url)
        code, _ = await asyncio.to_thread(api_b.call, "PUT", f"{VS_PATH}/demo", vs((50, 50)))
        assert code == 200
        await eventually(lambda: recorder.weights() == [50, 50])
        await asyncio.sleep(2.5)        # longer than the lease TTL: heartbeats now go through B
        assert [w["address"] for w in recorder.running[1]] == ["127.0.0.4"]
        _, history = await asyncio.to_thread(api_b.call, "GET", "/history")
        assert [e["op"] for e in history["items"]] == ["update", "update", "create"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        a.kill()
        b.stop()


async def test_lease_expiry_removes_a_dead_workload_and_rollback_works_on_etcd(etcd):
    with ControlPlaneProcess(etcd.store_spec(), ttl=2.0) as cp:
        api = Client(cp.url)
        code, _ = await asyncio.to_thread(api.call, "POST", "/registry/v1/workloads",
                                          {"id": "w", "service": "demo", "address": "127.0.0.8", "ports": {"http": 80},
                                           "ttl": 2})
        assert code == 201
        endpoints = lambda: api.call("GET", "/registry/v1/namespaces/default/services/demo/endpoints")[1]["items"]
        assert len(endpoints()) == 1
        await eventually(lambda: endpoints() == [], timeout=6.0)          # no heartbeat: etcd expires the lease
        _, first = await asyncio.to_thread(api.call, "PUT", f"{VS_PATH}/demo", vs((90, 10)))
        await asyncio.to_thread(api.call, "PUT", f"{VS_PATH}/demo", vs((0, 100)))
        pa = "/apis/security.istio.io/v1/namespaces/default/peerauthentications/default"
        assert (await asyncio.to_thread(api.call, "PUT", pa, {
            "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": "default"},
            "spec": {"mtls": {"mode": "STRICT"}}}))[0] == 201
        rollback = f"/history/{first['metadata']['resourceVersion']}/rollback"
        code, refused = await asyncio.to_thread(api.call, "POST", rollback)     # would drop STRICT: refused
        assert code == 409 and "(delete PeerAuthentication default/default)" in refused["message"]
        _, now = await asyncio.to_thread(api.call, "GET", f"{VS_PATH}/demo")
        assert [d["weight"] for d in now["spec"]["http"][0]["route"]] == [0, 100]
        code, result = await asyncio.to_thread(api.call, "POST", rollback + "?includeSecurity=true")
        assert code == 200 and [c["op"] for c in result["changes"]] == ["update", "delete"]
        _, now = await asyncio.to_thread(api.call, "GET", f"{VS_PATH}/demo")
        assert [d["weight"] for d in now["spec"]["http"][0]["route"]] == [90, 10]
        assert (await asyncio.to_thread(api.call, "GET", pa))[0] == 404


async def test_replica_and_etcd_leader_killed_under_traffic_writes_and_pushes_continue_with_no_failed_request(etcd, tmp_path):
    """Real sidecars and gateway on two replicas; constant load through the gateway."""
    from pathlib import Path

    from controlplane.demo import Mesh, apply_file, spawn_proxies, wait_for
    from controlplane.testing import GatewayLoad as Load, free_ports

    configs = Path(__file__).resolve().parents[2] / "configs"
    a = ControlPlaneProcess(etcd.store_spec(), ttl=3.0).start()
    b = ControlPlaneProcess(etcd.store_spec(), ttl=3.0).start()
    mesh = Mesh(tmp_path, quiet=True)
    load = None
    try:
        api_a, api_b = Client(a.url), Client(b.url)
        gw_port, gw_admin, *ports = free_ports(9)
        for name in ("demo-serviceentry.yaml", "demo-destinationrule.yaml", "demo-virtualservice.yaml"):
            apply_file(api_a, configs / name)
        apply_file(api_b, configs / "demo-gateway.yaml",
                   lambda o: o["spec"]["servers"][0]["port"].update(number=gw_port))
        spawn_proxies(mesh, f"{a.url},{b.url}", ports, gw_admin, prefix="ha")
        on_a = lambda: [p for p in api_a.call("GET", "/push/v1/proxies?local=true")[1]["items"] if p["state"] == "acked"]
        wait_for(lambda: len(on_a()) == 3, 25, "three proxies ACKing on replica A")
        wait_for(lambda: all(_one(gw_port) in ("v1", "v2") for _ in range(10)), 10, "gateway serving")
        load = Load(gw_port).start()
        await asyncio.sleep(1.0)
        a.kill()
        await kill_etcd_leader(etcd)
        apply_file(api_b, configs / "steps" / "demo-virtualservice-50-50.yaml")          # a write after the failures
        counts_before = dict(load.outcomes)
        on_b = lambda: [p for p in api_b.call("GET", "/push/v1/proxies?local=true")[1]["items"] if p["state"] == "acked"]
        await asyncio.to_thread(wait_for, lambda: len(on_b()) == 3, 25, "three proxies moved to replica B")
        await asyncio.sleep(3.0)
        load.stop()
        after = {k: load.outcomes.get(k, 0) - counts_before.get(k, 0) for k in ("v1", "v2")}
        assert load.failures == []
        assert after["v2"] > 0.3 * (after["v1"] + after["v2"])          # the 50/50 push reached the gateway
        endpoints = api_b.call("GET", "/registry/v1/namespaces/default/services/demo/endpoints")[1]["items"]
        assert len(endpoints) == 2                                      # leases kept alive through B
    finally:
        if load:
            load.stop()
        mesh.close()
        a.kill()
        b.stop()


def _one(port: int) -> str:
    from controlplane.demo import send
    return send(port, "demo.example.com")
