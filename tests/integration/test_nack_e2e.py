"""The real proxy's NACK path end to end: a `meshproxy run --control-plane` process refuses a
resource of a pushed version, says why, is listed as nacked by `meshctl proxies`, applies the
rest of the version and keeps serving the refused resource's last good version (refusal is
per resource, as for files).

The control plane validates every object with the proxy's own decoder, so through its API it
never stores a resource a proxy of the same version refuses.  A control plane's store written
by another version (or by hand) can still hold one: the test writes such a row into the
SQLite store while the control plane is down, as a newer control plane would have.
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest

from controlplane.cli import Client
from controlplane.testing import ControlPlaneProcess
from helpers import ROOT, Upstream, free_port, http_get

pytestmark = pytest.mark.asyncio

NS = "/apis/networking.istio.io/v1/namespaces/default"


def _se(port: int) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "svc"},
            "spec": {"hosts": ["svc.local"], "location": "MESH_INTERNAL", "resolution": "STATIC",
                     "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                     "endpoints": [{"address": "127.0.0.1", "ports": {"http": port}}]}}


VS = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "svc"},
      "spec": {"hosts": ["svc.local"], "http": [{"route": [{"destination": {"host": "svc.local"}}]}]}}


def _proxies(api: Client) -> dict:
    return {p["node_id"]: p for p in api.call("GET", "/push/v1/proxies")[1]["items"]}


async def _until(predicate, timeout: float = 15.0, what: str = "condition"):
    import asyncio
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout} s")


async def test_real_proxy_nacks_a_version_it_refuses_and_keeps_serving_the_last_good(tmp_path):
    up = await Upstream().start()
    db = tmp_path / "cp.db"
    cp = ControlPlaneProcess(f"sqlite:{db}", log_path=str(tmp_path / "cp.log")).start()
    port, admin = free_port(), free_port()
    log = open(tmp_path / "proxy.log", "wb")
    proxy = subprocess.Popen(
        [sys.executable, "-m", "meshproxy", "run", "--control-plane", cp.url, "--node-id", "nack-node",
         "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        api = Client(cp.url)
        assert api.call("PUT", f"{NS}/serviceentries/svc", _se(up.port))[0] in (200, 201)
        assert api.call("PUT", f"{NS}/virtualservices/svc", VS)[0] in (200, 201)
        await _until(lambda: _proxies(api).get("nack-node", {}).get("state") == "acked"
                     , what="the proxy acked")
        good = _proxies(api)["nack-node"]["acked_version"]
        await _until(lambda: _ok(port), what="traffic through the proxy")

        # the control plane goes down; its store gets a VirtualService this proxy refuses
        cp_port = cp.port
        cp.stop()
        bad = json.loads(json.dumps(VS))
        bad["metadata"].update(namespace="default")
        bad["spec"]["http"][0]["route"][0]["wieght"] = 10
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE resources SET body=? WHERE kind='VirtualService' AND name='svc'",
                         (json.dumps({**_stored(conn), "spec": bad["spec"]}),))
        cp = ControlPlaneProcess(f"sqlite:{db}", port=cp_port, log_path=str(tmp_path / "cp.log")).start()
        api = Client(cp.url)

        await _until(lambda: _proxies(api).get("nack-node", {}).get("state") == "nacked",
                     what="the proxy nacked the pushed version")
        entry = _proxies(api)["nack-node"]
        assert entry["last_nack"]["version"] != good
        assert any("VirtualService default/svc" in e and "spec.http[0].route[0].wieght" in e
                   for e in entry["last_nack"]["errors"]), entry["last_nack"]
        shown = subprocess.run([sys.executable, "-m", "controlplane.cli", "proxies"], capture_output=True,
                               text=True, timeout=30, env={**os.environ, "MESHCTL_SERVER": cp.url})
        row = next(line for line in shown.stdout.splitlines() if line.startswith("nack-node"))
        assert "nacked" in row.split() and "wieght" in row and "VirtualService default/svc" in row
        # refusal is per resource (as for files): the version is applied with the refused
        # VirtualService at its last good version, and the NACK says so
        assert list(entry["last_nack"]["resources"]) == ["VirtualService default/svc"]
        assert entry["last_nack"]["applied"] and entry["applied_version"] == entry["last_nack"]["version"]
        assert "last good kept" in row
        # the proxy says so itself, and keeps routing with the last good VirtualService
        dump = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{admin}/config_dump", timeout=5).read())
        assert dump["last_rejection"]["version"] == entry["last_nack"]["version"]
        assert dump["version"] == entry["last_nack"]["version"]
        kept = [r for r in dump["snapshot"]["resources"] if r["kind"] == "VirtualService"]
        assert len(kept) == 1 and kept[0]["name"] == "svc"
        before = len(up.requests)
        assert await _ok(port) and len(up.requests) == before + 1
    finally:
        proxy.terminate()
        proxy.wait(15)
        cp.stop()
        await up.close()


def _stored(conn) -> dict:
    (body,) = conn.execute("SELECT body FROM resources WHERE kind='VirtualService' AND name='svc'").fetchone()
    return json.loads(body)


async def _ok(port: int) -> bool:
    return (await http_get(port, "svc.local"))[0] == 200
