"""Push over real sockets: a `meshctl serve` process and RemoteConfigClients in the test.

The clients' callback stands in for the proxy's snapshot builder: it records what it was
given and answers [] (ACK) or errors (NACK).
"""
from __future__ import annotations

import asyncio
import random
import time

import pytest

from controlplane.cli import Client
from controlplane.testing import ControlPlaneProcess
from meshproxy.config.remote import RemoteConfigClient

VS_PATH = "/apis/networking.istio.io/v1/namespaces/default/virtualservices"
DR_PATH = "/apis/networking.istio.io/v1/namespaces/default/destinationrules"


def vs(weights=(90, 10)) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "demo"},
            "spec": {"hosts": ["demo"], "http": [{"route": [
                {"destination": {"host": "demo", "subset": "v1"}, "weight": weights[0]},
                {"destination": {"host": "demo", "subset": "v2"}, "weight": weights[1]}]}]}}


def dr() -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "demo"},
            "spec": {"host": "demo", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                                 {"name": "v2", "labels": {"version": "v2"}}]}}


class Recorder:
    """The proxy side of on_config: keeps every config received; NACKs while `refuse` is set."""

    def __init__(self):
        self.calls: list[tuple[list[dict], list[dict], str]] = []
        self.refuse: list[str] = []
        self.running: tuple[list[dict], list[dict], str] | None = None

    def __call__(self, resources, workloads, version):
        self.calls.append((resources, workloads, version))
        if self.refuse:
            return list(self.refuse)
        self.running = (resources, workloads, version)
        return []

    def weights(self) -> list[int]:
        vs_obj = next(r for r in self.running[0] if r["kind"] == "VirtualService")
        return [d["weight"] for d in vs_obj["spec"]["http"][0]["route"]]


async def eventually(predicate, timeout=5.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(interval)
    assert predicate(), "condition not reached within the time limit"


async def call(api: Client, method: str, path: str, body=None):
    return await asyncio.to_thread(api.call, method, path, body)


def start_client(urls, recorder, node_id="node-a", registration=None, **kw):
    client = RemoteConfigClient(urls, node_id, {"namespace": "default", "labels": {"app": "demo"}, "service": "demo"},
                                recorder, registration, backoff_base=0.05, backoff_max=0.3,
                                rng=random.Random(7), **kw)
    return client, asyncio.create_task(client.run())


async def meshctl(cp, *args):
    import os
    import subprocess
    import sys
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "controlplane.cli", *args],
                                   capture_output=True, text=True, timeout=30,
                                   env={**os.environ, "MESHCTL_SERVER": cp.url})


async def stop(task):
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done, "RemoteConfigClient.run() did not stop within 5 s of being cancelled"


@pytest.fixture
def cp(tmp_path):
    with ControlPlaneProcess(f"sqlite:{tmp_path / 'cp.db'}", ttl=1.0) as proc:
        yield proc


async def test_apply_converges_the_client_which_acks_and_is_listed_by_proxies(cp):
    api = Client(cp.url)
    recorder = Recorder()
    client, task = start_client([cp.url], recorder)
    try:
        await eventually(lambda: recorder.running is not None)
        await call(api, "PUT", f"{DR_PATH}/demo", dr())
        await call(api, "PUT", f"{VS_PATH}/demo", vs())
        await eventually(lambda: recorder.running and len(recorder.running[0]) == 2)
        assert recorder.weights() == [90, 10]
        version = recorder.running[2]
        _, proxies = await call(api, "GET", "/push/v1/proxies")
        await eventually(lambda: api.call("GET", "/push/v1/proxies")[1]["items"][0]["acked_version"] == version)
        (entry,) = api.call("GET", "/push/v1/proxies")[1]["items"]
        assert (entry["node_id"], entry["service"], entry["labels"], entry["state"]) == (
            "node-a", "demo", {"app": "demo"}, "acked")
        assert entry["last_nack"] is None
        assert client.status.version == version
        import urllib.request
        with urllib.request.urlopen(f"{cp.url}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        assert "pilot_xds 1.0" in metrics                               # one connected proxy
        pushes = next(line for line in metrics.splitlines() if line.startswith('pilot_xds_pushes{type="resources"}'))
        assert float(pushes.split()[1]) >= 1                            # Istio's name: no _total
        assert 'meshproxy_cp_api_requests_total{code="201",kind="VirtualService",method="PUT"} 1.0' in metrics
        count = next(line for line in metrics.splitlines() if line.startswith("pilot_proxy_convergence_time_count"))
        assert float(count.split()[1]) >= 2
    finally:
        await stop(task)


async def test_nack_is_recorded_and_the_client_stays_on_its_last_good_config(cp):
    api = Client(cp.url)
    recorder = Recorder()
    client, task = start_client([cp.url], recorder)
    try:
        await call(api, "PUT", f"{VS_PATH}/demo", vs())
        await eventually(lambda: recorder.running and recorder.running[0])
        good = recorder.running[2]
        recorder.refuse = ["VirtualService default/demo: spec.http[0].route[1].destination.subset: unknown subset 'v2'"]
        await call(api, "PUT", f"{VS_PATH}/demo", vs((10, 90)))
        await eventually(lambda: api.call("GET", "/push/v1/proxies")[1]["items"][0]["state"] == "nacked")
        (entry,) = api.call("GET", "/push/v1/proxies")[1]["items"]
        assert entry["acked_version"] == good
        assert entry["last_nack"]["errors"] == recorder.refuse
        assert entry["last_nack"]["version"] != good
        assert client.status.version == good and recorder.weights() == [90, 10]
        shown = await meshctl(cp, "proxies")
        header, row = shown.stdout.splitlines()
        assert header.split()[:5] == ["NODE", "SERVICE", "NAMESPACE", "LABELS", "STATE"]
        assert row.split()[:6] == ["node-a", "demo", "default", "app=demo", "nacked", good]
        assert "unknown subset 'v2'" in row
    finally:
        await stop(task)


async def test_workload_that_stops_heartbeating_is_removed_after_its_ttl(cp):
    api = Client(cp.url)
    watcher = Recorder()
    _, watch_task = start_client([cp.url], watcher, node_id="watcher")
    dying = Recorder()
    registration = {"service": "demo", "namespace": "default", "address": "127.0.0.9",
                    "ports": {"http": 8080}, "labels": {"version": "v1"}, "ttl": 1.0}
    _, dying_task = start_client([cp.url], dying, node_id="dying", registration=registration)
    try:
        await eventually(lambda: watcher.running and watcher.running[1])
        got = [dict(w) for w in watcher.running[1]]
        assert got[0].pop("vip").startswith("240.240.")        # the service's VIP (controlplane.vips)
        assert got == [{"service": "demo", "namespace": "default", "address": "127.0.0.9",
                        "ports": {"http": 8080}, "labels": {"version": "v1"}}]
        listed = (await meshctl(cp, "endpoints", "demo")).stdout.splitlines()
        assert listed[1].split() == ["127.0.0.9", "http=8080", "version=v1", "dying"]
        await asyncio.sleep(1.5)                        # heartbeats (every ttl/3) keep it alive
        assert len(api.call("GET", "/registry/v1/namespaces/default/services/demo/endpoints")[1]["items"]) == 1
        await stop(dying_task)                          # a crash: no deregistration, heartbeats stop
        stopped = time.monotonic()
        await eventually(lambda: watcher.running[1] == [], timeout=3.0)
        assert time.monotonic() - stopped < 2.5   # ttl 1 s + sweep 0.5 s + debounce 0.1 s, with margin
        assert api.call("GET", "/registry/v1/namespaces/default/services/demo/endpoints")[1]["items"] == []
        assert (await meshctl(cp, "endpoints", "demo")).stdout.splitlines() == ["ADDRESS  PORTS  LABELS  NODE"]
    finally:
        await stop(watch_task)


async def test_clean_drain_deregisters_at_once(cp):
    watcher = Recorder()
    _, watch_task = start_client([cp.url], watcher, node_id="watcher")
    registration = {"service": "demo", "address": "127.0.0.7", "ports": {"http": 9000}, "ttl": 30.0}
    client, task = start_client([cp.url], Recorder(), node_id="leaving", registration=registration)
    try:
        await eventually(lambda: watcher.running and watcher.running[1])
        await client.deregister()
        drained = time.monotonic()
        await eventually(lambda: watcher.running[1] == [], timeout=2.0)
        assert time.monotonic() - drained < 1.0                   # not the 30 s TTL
    finally:
        await stop(task)
        await stop(watch_task)


async def test_a_burst_of_applies_goes_out_at_once_then_as_one_more_push(tmp_path):
    # leading edge: the first apply after quiet is pushed at once; the rest of the burst
    # falls in a 0.5 s quiet window (wide enough on a loaded machine) and makes one push
    with ControlPlaneProcess(f"sqlite:{tmp_path / 'cp.db'}", debounce=0.5) as cp:
        api = Client(cp.url)
        recorder = Recorder()
        _, task = start_client([cp.url], recorder)
        try:
            await eventually(lambda: recorder.running is not None)
            before = len(recorder.calls)
            for weight in range(0, 101, 10):                # 11 applies in a row
                await call(api, "PUT", f"{VS_PATH}/demo", vs((weight, 100 - weight)))
            await eventually(lambda: recorder.running[0] and recorder.weights() == [100, 0])
            await asyncio.sleep(0.7)
            pushed = recorder.calls[before:]
            assert len(pushed) == 2                         # the first change, then the last state
            first = next(r for r in pushed[0][0] if r["kind"] == "VirtualService")
            assert [d["weight"] for d in first["spec"]["http"][0]["route"]] != [100, 0]
            assert len(api.call("GET", "/history")[1]["items"]) == 11
        finally:
            await stop(task)


async def test_endpoint_only_change_does_not_resend_resources(cp):
    api = Client(cp.url)
    recorder = Recorder()
    client, task = start_client([cp.url], recorder)
    raw: list[dict] = []
    original = client._handle

    async def spy(url, message):
        raw.append(message)
        await original(url, message)

    client._handle = spy
    try:
        await call(api, "PUT", f"{VS_PATH}/demo", vs())
        await eventually(lambda: recorder.running and recorder.running[0])
        await call(api, "POST", "/registry/v1/workloads",
                   {"id": "w1", "service": "demo", "address": "127.0.0.5", "ports": {"http": 80}, "ttl": 30})
        await eventually(lambda: recorder.running[1])
        last = [m for m in raw if m["type"] == "config"][-1]
        assert last["resources"] is None                 # routes not resent ...
        assert last["workloads"]["base"] != ""            # ... and the endpoints as a delta
        assert [u["item"]["address"] for u in last["workloads"]["updated"]] == ["127.0.0.5"]
        assert last["workloads"]["updated"][0]["key"] == "w1" and last["workloads"]["updated"][0]["version"]
        assert recorder.weights() == [90, 10]             # ... yet the callback got the full resource list
    finally:
        await stop(task)


async def test_restarted_control_plane_with_the_same_store_pushes_nothing_new(tmp_path):
    store = f"sqlite:{tmp_path / 'cp.db'}"
    first = ControlPlaneProcess(store).start()
    port = first.port
    api = Client(first.url)
    recorder = Recorder()
    registration = {"service": "demo", "address": "127.0.0.3", "ports": {"http": 80}, "ttl": 5.0}
    client, task = start_client([first.url], recorder, registration=registration)
    second = None
    try:
        await call(api, "PUT", f"{DR_PATH}/demo", dr())
        await call(api, "PUT", f"{VS_PATH}/demo", vs())
        await eventually(lambda: recorder.running and len(recorder.running[0]) == 2 and recorder.running[1])
        calls_before, version = len(recorder.calls), recorder.running[2]
        first.kill()                                       # SIGKILL: nothing is flushed or deregistered
        await eventually(lambda: not client.status.connected)
        second = ControlPlaneProcess(store, port=port).start()
        await eventually(lambda: client.status.connected and api.call("GET", "/push/v1/proxies")[1]["items"]
                         and api.call("GET", "/push/v1/proxies")[1]["items"][0]["state"] == "acked")
        await asyncio.sleep(0.5)
        assert len(recorder.calls) == calls_before         # the callback never ran again: no swap at all
        assert client.status.version == version
        (entry,) = api.call("GET", "/push/v1/proxies")[1]["items"]
        assert entry["acked_version"] == version
    finally:
        await stop(task)
        first.kill()
        if second:
            second.stop()


async def test_client_fails_over_to_the_next_url_and_keeps_its_config_while_none_answers(tmp_path):
    import shutil
    seed = ControlPlaneProcess(f"sqlite:{tmp_path / 'a.db'}").start()
    Client(seed.url).call("PUT", f"{VS_PATH}/demo", vs())
    seed.stop()
    shutil.copy(tmp_path / "a.db", tmp_path / "b.db")       # two control planes with the same content
    a = ControlPlaneProcess(f"sqlite:{tmp_path / 'a.db'}").start()
    b = ControlPlaneProcess(f"sqlite:{tmp_path / 'b.db'}").start()
    recorder = Recorder()
    client, task = start_client([a.url, b.url], recorder)
    try:
        await eventually(lambda: recorder.running and recorder.running[0] and client.status.url == a.url)
        version, calls = recorder.running[2], len(recorder.calls)
        a.kill()
        await eventually(lambda: client.status.connected and client.status.url == b.url)
        await asyncio.sleep(0.2)
        assert client.status.version == version and len(recorder.calls) == calls
        b.kill()
        await asyncio.sleep(0.5)
        assert recorder.weights() == [90, 10] and client.status.reconnects >= 2
    finally:
        await stop(task)
        a.kill()
        b.kill()


async def test_rollback_pushes_the_earlier_routing(cp):
    api = Client(cp.url)
    recorder = Recorder()
    _, task = start_client([cp.url], recorder)
    try:
        await call(api, "PUT", f"{VS_PATH}/demo", vs((90, 10)))        # revision 1
        await eventually(lambda: recorder.running and recorder.running[0])
        first_version = recorder.running[2]
        await call(api, "PUT", f"{VS_PATH}/demo", vs((0, 100)))        # revision 2
        await eventually(lambda: recorder.weights() == [0, 100])
        await call(api, "POST", "/history/1/rollback")
        await eventually(lambda: recorder.weights() == [90, 10])
        assert recorder.running[2] == first_version                   # same content, same version
    finally:
        await stop(task)
