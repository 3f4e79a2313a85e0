"""The canary loop's reconciliation with the route, one tick at a time, over the real SQLite
store in memory (no proxies: every window is empty)."""
from __future__ import annotations

import json

from controlplane.delivery.controller import CanaryRun, DeliveryController, new_status
from controlplane.delivery.routing import rewrite_virtual_service, route_state
from controlplane.delivery.spec import decode_canary
from controlplane.delivery.state import AlwaysLeader, SqliteState
from controlplane.store_sqlite import SqliteStore


class NoProxies:
    proxies: dict = {}


DR = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "web", "namespace": "default"},
      "spec": {"host": "web", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                          {"name": "v2", "labels": {"version": "v2"}}]}}
VS = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "web", "namespace": "default"},
      "spec": {"hosts": ["web"], "http": [{"name": "main", "route": [{"destination": {"host": "web", "subset": "v1"}}]}]}}
CANARY = {"apiVersion": "delivery.meshproxy.io/v1", "kind": "Canary", "metadata": {"name": "web", "namespace": "default"},
          "spec": {"host": "web", "stable": "v1", "canary": "v2",
                   "analysis": {"interval": "10s", "stepWeights": [10, 20, 50], "minRequests": 10}}}


async def setup():
    store = SqliteStore(":memory:")
    await store.start()
    for obj in (DR, VS, CANARY):
        await store.put(json.loads(json.dumps(obj)))
    ctl = DeliveryController(store, NoProxies(), state=SqliteState(":memory:"), leadership=AlwaysLeader())
    return store, ctl, decode_canary(CANARY).spec


async def put_weight(store, spec, weight):
    vs = store.resources()[("VirtualService", "default", "web")]
    await store.put(rewrite_virtual_service(vs, spec, weight), origin="test")


def stored_status(spec, store, weight):
    vs = rewrite_virtual_service(store.resources()[("VirtualService", "default", "web")], spec, weight)
    status = new_status()
    status.update(phase="Progressing", canaryWeight=weight, run={"stable": "v1", "canary": "v2"},
                  written=json.loads(json.dumps(route_state(vs["spec"], spec))))
    return status


async def test_a_new_leader_adopts_a_step_written_just_before_the_old_one_died():
    store, ctl, spec = await setup()
    try:
        status = stored_status(spec, store, 10)        # saved at 10% ...
        await put_weight(store, spec, 20)               # ... then 20% written, then the replica died
        run = CanaryRun(ctl, ("default", "web"), status)
        await run.tick()
        assert run.status["paused"] is None and run.status["canaryWeight"] == 20
        assert any("adopted weight 20" in e["message"] for e in run.status["events"])
    finally:
        await store.close()


async def test_a_human_edit_of_the_route_pauses_the_canary_and_is_left_alone():
    store, ctl, spec = await setup()
    try:
        await put_weight(store, spec, 10)
        run = CanaryRun(ctl, ("default", "web"), stored_status(spec, store, 10))
        await run.tick()
        assert run.status["paused"] is None
        await put_weight(store, spec, 35)               # not a step of this canary: a human
        await run.tick()
        assert "changed outside the canary" in run.status["paused"]["reason"]
        vs = store.resources()[("VirtualService", "default", "web")]
        assert [d["weight"] for d in vs["spec"]["http"][0]["route"]] == [65, 35]
    finally:
        await store.close()


async def test_a_stored_route_at_a_foreign_weight_is_not_adopted():
    store, ctl, spec = await setup()
    try:
        await put_weight(store, spec, 35)
        run = CanaryRun(ctl, ("default", "web"), stored_status(spec, store, 10))
        await run.tick()
        assert run.status["paused"] and run.status["canaryWeight"] == 10
    finally:
        await store.close()


class Refused(Exception):
    def __init__(self, code, reason, message):
        super().__init__(message)
        self.code, self.reason = code, reason


class ScopedSecurity:
    """What the control plane's security module offers: who asks, and may they."""

    def __init__(self, scope):
        self.scope = scope
        self.asked = []

    async def authenticate(self, request):
        return type("Principal", (), {"name": f"alice ({self.scope})", "scope": self.scope})()

    def authorize(self, principal, route, method, path=""):
        self.asked.append(route)
        if method != "GET" and principal.scope != "edit":
            raise Refused(403, "Forbidden", f"{principal.name} may not {method} {path}")


async def test_delivery_api_asks_the_control_planes_security_view_for_reads_edit_for_actions():
    from controlplane.delivery.api import DeliveryApi
    from controlplane.http import Request
    store, ctl, spec = await setup()
    try:
        base = "/apis/delivery.meshproxy.io/v1/namespaces/default/canaries/web"
        viewer = DeliveryApi(store, ctl, security=ScopedSecurity("view"))
        assert (await viewer.handle(Request("GET", base, {}, {}, b""))).status == 200
        refused = await viewer.handle(Request("POST", base + "/abort", {}, {}, b"{}"))
        assert refused.status == 403 and b"may not POST" in refused.body
        assert (await viewer.handle(Request("GET", "/ui/app.js", {}, {}, b""))).status == 200   # static: public
        assert viewer.security.asked == ["delivery_get", "delivery_action"]
        editor = DeliveryApi(store, ctl, security=ScopedSecurity("edit"))
        accepted = await editor.handle(Request("POST", base + "/pause", {}, {}, b"{}"))
        assert accepted.status == 202 and b"requested by alice (edit)" in accepted.body
    finally:
        await store.close()


async def test_deleting_a_canary_mid_run_returns_the_route_to_stable():
    store, ctl, spec = await setup()
    try:
        await ctl._reconcile()                          # picks the Canary up
        run = ctl.runs[("default", "web")]
        await run.stop()                                # drive it by hand from here
        await run.tick()                                # Initializing -> Progressing at 10%
        vs = store.resources()[("VirtualService", "default", "web")]
        assert [d["weight"] for d in vs["spec"]["http"][0]["route"]] == [90, 10]
        await store.delete(("Canary", "default", "web"))
        await ctl._reconcile()
        vs = store.resources()[("VirtualService", "default", "web")]
        assert vs["spec"]["http"][0]["route"] == [{"destination": {"host": "web", "subset": "v1"}, "weight": 100}]
        assert ("default", "web") not in ctl.runs and await ctl.state.load(("default", "web")) is None
    finally:
        await store.close()


async def test_a_restarted_control_plane_continues_each_canary_from_its_stored_step(tmp_path):
    """Two control-plane lives on one SQLite file: the second picks the run up at its weight."""
    path = str(tmp_path / "cp.db")
    store = SqliteStore(path)
    await store.start()
    for obj in (DR, VS, CANARY):
        await store.put(json.loads(json.dumps(obj)))
    state = SqliteState(path)
    ctl = DeliveryController(store, NoProxies(), state=state, leadership=AlwaysLeader())
    await state.start()
    run = CanaryRun(ctl, ("default", "web"), None)
    await run.tick()                                    # Initializing -> Progressing at 10%
    await run._save()
    await state.close()
    await store.close()                                 # the first life ends here

    store = SqliteStore(path)
    await store.start()
    state = SqliteState(path)
    ctl = DeliveryController(store, NoProxies(), state=state, leadership=AlwaysLeader())
    try:
        await state.start()
        await ctl._reconcile()
        run = ctl.runs[("default", "web")]
        await run.stop()
        assert run.status["phase"] == "Progressing" and run.status["canaryWeight"] == 10
        await run.tick()
        assert run.status["paused"] is None                  # the route is what it wrote: no drift
        assert any("continues at phase Progressing, weight 10" in e["message"] for e in run.status["events"])
        vs = store.resources()[("VirtualService", "default", "web")]
        assert [d["weight"] for d in vs["spec"]["http"][0]["route"]] == [90, 10]
    finally:
        await state.close()
        await store.close()


async def test_canaries_are_never_pushed_to_proxies():
    from controlplane.push import PushEngine
    from controlplane.scope import Identity
    store, ctl, spec = await setup()
    try:
        push = PushEngine(store)
        await push.start()
        body = push.target_for(Identity("default", "sidecar", ())).resources.full()
        assert b'"VirtualService"' in body and b'"Canary"' not in body
        await push.close()
    finally:
        await store.close()


def test_admin_address_is_read_where_the_control_plane_can_reach_it():
    from controlplane.delivery.controller import admin_address
    assert admin_address("127.0.0.1:15000", "127.0.0.1") == "127.0.0.1:15000"      # same host
    assert admin_address("127.0.0.1:15000", "") == "127.0.0.1:15000"               # peer unknown
    assert admin_address("0.0.0.0:15000", "10.1.2.3") == "10.1.2.3:15000"           # wildcard: the peer
    assert admin_address("10.1.2.3:15000", "10.1.2.3") == "10.1.2.3:15000"
    assert admin_address("127.0.0.1:15000", "10.1.2.3") == ""                       # a pod's own loopback
    assert admin_address("[::]:15000", "fd00::5") == "[fd00::5]:15000"
    assert admin_address("", "10.1.2.3") == "" and admin_address("nonsense", "") == ""
