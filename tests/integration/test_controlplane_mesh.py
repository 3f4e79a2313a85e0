"""Full mesh, as `./scripts/demo` brings it up (controlplane.demo.bring_up): the control plane
process with its CA, real `meshproxy run --control-plane https://...` sidecars and an ingress
gateway joined with bootstrap tokens, two demo app versions, STRICT mTLS in the namespace, an
AuthorizationPolicy; traffic through the gateway under constant load, and the console's live
view of identities and mutual TLS in a real browser."""
from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import yaml

from controlplane.demo import apply_file, bring_up, inbound_mtls, send, wait_for, zero_trust_step
from controlplane.resources import GROUP
from controlplane.testing import ControlPlaneProcess, GatewayLoad as Load
from test_console_browser import ARTIFACTS, browser  # noqa: F401  (the "browser" fixture)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
NS = f"/apis/{GROUP}/v1/namespaces/default"


def only_v1(obj):
    """DestinationRule with the v1 subset only / VirtualService 100% to v1."""
    if obj["kind"] == "DestinationRule":
        obj["spec"]["subsets"] = obj["spec"]["subsets"][:1]
    else:
        obj["spec"]["http"][0]["route"] = obj["spec"]["http"][0]["route"][:1]
        obj["spec"]["http"][0]["route"][0]["weight"] = 100


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """One demo mesh for the module (each test leaves it routing 100% to v1 through the gateway)."""
    tmp_path = tmp_path_factory.mktemp("demo-mesh")
    demo = bring_up(tmp_path, say=lambda *_: None, prefix="sc", patch=only_v1)
    mesh = demo.mesh
    # the gateway's config must include both registered endpoints before any load starts
    wait_for(lambda: all(_one(demo.gw_port) == "v1" for _ in range(10)), 10, "gateway serving v1")
    mesh.demo, mesh.gw_port, mesh.store = demo, demo.gw_port, f"sqlite:{tmp_path / 'mesh.db'}"
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
        credentials = mesh.cp.credentials
        mesh.cp = ControlPlaneProcess(mesh.store, port=port, ttl=5.0, tls=True)
        mesh.cp.credentials = credentials
        mesh.cp.start(30)
        wait_for(lambda: len(proxies(mesh.api)) == 4 and all(p["state"] == "acked" for p in proxies(mesh.api).values()),
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
    code, changed = mesh.api.call("PUT", f"{NS}/virtualservices/demo", half)          # everything to v2
    assert code == 200, changed
    wait_for(lambda: all(_one(mesh.gw_port) == "v2" for _ in range(10)), 10, "all traffic on v2")
    history = mesh.api.call("GET", "/history")[1]["items"]
    to_v2 = max(e["revision"] for e in history if e["kind"] == "VirtualService")
    code, _ = mesh.api.call("POST", f"/history/{to_v2 - 1}/rollback")     # the mesh just before it
    assert code == 200
    wait_for(lambda: all(_one(mesh.gw_port) == "v1" for _ in range(20)), 10, "traffic back on v1 only")


def _one(port: int) -> str:
    return send(port, "demo.example.com")


def test_demo_runs_strict_mtls_with_identities_and_the_console_shows_them(mesh, browser):
    demo = mesh.demo
    # STRICT in the demo's namespace, and the policy that only lets the gateway call demo
    code, pa = mesh.api.call("GET", "/apis/security.istio.io/v1/namespaces/default/peerauthentications/default")
    assert code == 200 and pa["spec"]["mtls"]["mode"] == "STRICT", (code, pa.get("message"))
    # every proxy has its own workload identity, one service account per service
    expected = {"sc-v1": "demo", "sc-v2": "demo", "sc-ingress": "ingress-gateway", "sc-sleep": "sleep"}
    shown = proxies(mesh.api)
    assert {n: p["principal"] for n, p in shown.items()} == {
        n: f"spiffe://cluster.local/ns/default/sa/{sa}" for n, sa in expected.items()}
    assert all(p["cert_expires_at"] > time.time() + 3600 for p in shown.values())
    # plaintext refused by STRICT (and counted); sleep 403 RBAC: access denied, then allowed
    said: list[str] = []
    assert zero_trust_step(demo, said.append), "\n".join(said)
    # the gateway reaches the sidecars over mutual TLS, as itself
    load = Load(mesh.gw_port).start()
    try:
        wait_for(lambda: load.total() > 50, 10, "traffic through the gateway")
    finally:
        load.stop()
    assert load.failures == []
    served = inbound_mtls(demo.admins["v1"])
    assert served.get(("spiffe://cluster.local/ns/default/sa/ingress-gateway", "mutual_tls"), 0) >= 50, served
    assert all(policy == "mutual_tls" for _, policy in served), served

    # the live view: identities, certificate expiry, and mutual TLS per edge
    context = browser.new_context(ignore_https_errors=True)      # the mesh CA is not the browser's
    page = context.new_page()
    try:
        page.goto(f"{mesh.cp.url}/ui#mesh")
        page.wait_for_selector("#login:not([hidden])", timeout=10000)
        page.fill("#token", mesh.api.token)
        page.click("#login button")
        page.wait_for_selector('#proxies tr[data-node="sc-ingress"] td.identity', timeout=10000)
        for node, sa in expected.items():
            row = f'#proxies tr[data-node="{node}"]'
            assert page.text_content(f"{row} td.identity") == f"spiffe://cluster.local/ns/default/sa/{sa}"
            assert "in 23h" in page.text_content(f"{row} td.expires")
        edge = '#edges tr[data-edge="sc-v1|spiffe://cluster.local/ns/default/sa/ingress-gateway"]'
        page.wait_for_selector(edge, timeout=10000)
        assert page.text_content(f"{edge} td.mtls") == "mutual TLS"
        refused = '#edges tr[data-edge="sc-v1|refused"]'
        page.wait_for_selector(refused, timeout=10000)
        assert "refused: plaintext refused" in page.text_content(refused)
        assert "denied by AuthorizationPolicy" in page.text_content(refused)
        ARTIFACTS.joinpath("console").mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "console" / "mesh-mtls.png"), full_page=True)
    finally:
        context.close()
