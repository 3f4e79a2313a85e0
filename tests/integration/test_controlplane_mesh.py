"""Full mesh: the control plane process, real `meshproxy run --control-plane` sidecars and an
ingress gateway, two demo app versions, traffic through the gateway under constant load."""
from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import yaml

from controlplane.cli import Client
from controlplane.demo import Mesh, apply_file, send, spawn_proxies, wait_for
from controlplane.resources import GROUP
from controlplane.testing import ControlPlaneProcess, GatewayLoad as Load, free_ports

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
NS = f"/apis/{GROUP}/v1/namespaces/default"


def only_v1(obj):
    """DestinationRule with the v1 subset only / VirtualService 100% to v1."""
    if obj["kind"] == "DestinationRule":
        obj["spec"]["subsets"] = obj["spec"]["subsets"][:1]
    else:
        obj["spec"]["http"][0]["route"] = obj["spec"]["http"][0]["route"][:1]
        obj["spec"]["http"][0]["route"][0]["weight"] = 100


@pytest.fixture
def mesh(tmp_path):
    mesh = Mesh(tmp_path, quiet=True)
    store = f"sqlite:{tmp_path / 'mesh.db'}"
    mesh.cp = ControlPlaneProcess(store, ttl=5.0, log_path=str(tmp_path / "cp.log")).start()
    api = Client(mesh.cp.url)
    gw_port, gw_admin, *ports = free_ports(9)
    apply_file(api, CONFIGS / "demo-serviceentry.yaml")
    apply_file(api, CONFIGS / "demo-destinationrule.yaml", only_v1)
    apply_file(api, CONFIGS / "demo-gateway.yaml", lambda o: o["spec"]["servers"][0]["port"].update(number=gw_port))
    apply_file(api, CONFIGS / "demo-virtualservice.yaml", only_v1)
    spawn_proxies(mesh, mesh.cp.url, ports, gw_admin, prefix="sc")

    def ready():
        proxies = api.call("GET", "/push/v1/proxies")[1]["items"]
        workloads = api.call("GET", "/registry/v1/namespaces/default/services/demo/endpoints")[1]["items"]
        return len(workloads) == 2 and len(proxies) == 3 and all(p["state"] == "acked" for p in proxies)

    wait_for(ready, 20, "mesh converged")
    # the gateway's config must include both registered endpoints before any load starts
    wait_for(lambda: all(_one(gw_port) == "v1" for _ in range(10)), 10, "gateway serving v1")
    mesh.api, mesh.gw_port, mesh.store = api, gw_port, store
    yield mesh
    mesh.close()


def proxies(api):
    return {p["node_id"]: p for p in api.call("GET", "/push/v1/proxies")[1]["items"]}


def test_canary_step_adding_a_subset_and_shifting_weight_under_load_has_zero_non_2xx(mesh):
    load = Load(mesh.gw_port).start()
    try:
        wait_for(lambda: load.outcomes.get("v1", 0) > 20, 10, "traffic flowing")
        # the canary step as a user does it: the DR gains v2, the VS sends it 10% - two applies
        apply_file(mesh.api, CONFIGS / "demo-destinationrule.yaml")
        apply_file(mesh.api, CONFIGS / "demo-virtualservice.yaml")
        wait_for(lambda: load.outcomes.get("v2", 0) >= 20, 20, "v2 receiving canary traffic")
        # and back: weight off v2 first, then the subset removed
        apply_file(mesh.api, CONFIGS / "demo-virtualservice.yaml", only_v1)
        apply_file(mesh.api, CONFIGS / "demo-destinationrule.yaml", only_v1)
        time.sleep(1.0)
    finally:
        load.stop()
    assert load.failures == []
    assert load.outcomes.get("v1", 0) > 100 and load.outcomes.get("v2", 0) >= 20


def test_control_plane_killed_and_restarted_under_traffic_fails_no_request_and_changes_nothing(mesh):
    before = settled_versions(mesh.api)
    load = Load(mesh.gw_port).start()
    try:
        wait_for(lambda: load.total() > 20, 10, "traffic flowing")
        port = mesh.cp.port
        mesh.cp.kill()
        served_while_down = load.total()
        time.sleep(1.5)
        assert load.total() - served_while_down > 20          # proxies keep serving their last config
        mesh.cp = ControlPlaneProcess(mesh.store, port=port, ttl=5.0).start()
        wait_for(lambda: len(proxies(mesh.api)) == 3 and all(p["state"] == "acked" for p in proxies(mesh.api).values()),
                 15, "proxies reconnected")
        time.sleep(0.5)
    finally:
        load.stop()
    assert load.failures == []
    after = {n: p["acked_version"] for n, p in proxies(mesh.api).items()}
    assert after == before                  # same versions: in sync, no snapshot was pushed


def settled_versions(api, debounce: float = 0.1) -> dict:
    """The proxies' versions once the mesh is in sync and stays so for longer than the control
    plane's push debounce.  "All acked" alone can hold inside the debounce window right after a
    registration (the fixture waits for both), before the push that carries it is computed; a
    test reading the versions then would see them change under it.  That is the likely cause of
    two failures of the restart test in loaded full runs (not reproduced in isolation)."""
    def in_sync() -> dict | None:
        items = proxies(api)
        if all(p["state"] == "acked" and p["acked_version"] == p["sent_version"] for p in items.values()):
            return {n: p["acked_version"] for n, p in items.items()}
        return None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        first = in_sync()
        time.sleep(10 * debounce)
        if first is not None and in_sync() == first:
            return first
    raise TimeoutError("the mesh did not settle in sync within 15 s")


def test_rollback_restores_the_earlier_routing_through_the_gateway(mesh):
    apply_file(mesh.api, CONFIGS / "demo-destinationrule.yaml")
    half = copy.deepcopy(yaml.safe_load((CONFIGS / "steps" / "demo-virtualservice-50-50.yaml").read_text()))
    half["spec"]["http"][0]["route"][0]["weight"], half["spec"]["http"][0]["route"][1]["weight"] = 0, 100
    mesh.api.call("PUT", f"{NS}/virtualservices/demo", half)          # everything to v2
    wait_for(lambda: all(_one(mesh.gw_port) == "v2" for _ in range(10)), 10, "all traffic on v2")
    history = mesh.api.call("GET", "/history")[1]["items"]
    only_v1_revision = max(e["revision"] for e in history if e["kind"] == "VirtualService" and e["op"] == "create")
    code, _ = mesh.api.call("POST", f"/history/{only_v1_revision}/rollback")
    assert code == 200
    wait_for(lambda: all(_one(mesh.gw_port) == "v1" for _ in range(20)), 10, "traffic back on v1 only")


def _one(port: int) -> str:
    return send(port, "demo.example.com")
