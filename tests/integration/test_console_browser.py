"""The web console (/ui) in a real headless browser: Debian's chromium driven by Playwright,
against the real control plane, a real gateway and a canary under live traffic.

Screenshots go to $MESHPROXY_TEST_ARTIFACTS (default: test-artifacts/ in the repository)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from delivery_mesh import Users, VersionApp, delivery_mesh_fixture, wait_for  # noqa: F401  (the "mesh" fixture)

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("MESHPROXY_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: scripts/setup.sh installs Debian's chromium")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def test_console_shows_live_traffic_advances_the_chart_and_its_buttons_change_routing(mesh, browser):
    shots = ARTIFACTS / "console"
    shots.mkdir(parents=True, exist_ok=True)
    mesh.add_service("webui", {"v1": VersionApp("v1"), "v2": VersionApp("v2")}, "v1")
    users = Users(mesh.gw_port, "webui.example.com", users=2, pause=0.003).start()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: d.accept())          # the confirmations of abort and rollback
    try:
        # traffic: live numbers, without reloading the page
        page.goto(f"{mesh.cp.url}/ui#traffic")
        row = 'tr[data-key="webui.default.svc.cluster.local|v1"]'
        page.wait_for_selector(row, timeout=10000)
        first = page.text_content(f"{row} td.rps")
        wait_for(lambda: page.text_content(f"{row} td.rps") != first, 10, "requests/s changing")
        assert float(page.text_content(f"{row} td.rps")) > 0
        assert "webui" in page.text_content("#splits")
        page.screenshot(path=str(shots / "traffic.png"), full_page=True)

        # canaries: the weight chart advances by itself
        mesh.canary("webui", "v1", "v2", {"interval": "500ms", "threshold": 1, "stepWeights": list(range(10, 91, 5)),
                                          "minRequests": 5, "metrics": [{"name": "request-success-rate",
                                                                         "thresholdRange": {"min": 99}}]})
        page.click('nav a[data-view="canaries"]')
        card = '[data-canary="default/webui"]'
        page.wait_for_selector(f"{card} svg.chart", timeout=10000)
        points = int(page.get_attribute(f"{card} svg.chart", "data-points"))
        wait_for(lambda: int(page.get_attribute(f"{card} svg.chart", "data-points")) >= max(points + 1, 3), 15,
                 "the chart gaining weight steps")
        assert page.locator(f"{card} svg.chart circle.check.pass").count() >= 1
        page.screenshot(path=str(shots / "canary-progressing.png"), full_page=True)

        # abort through the page: routing goes back to 100% stable
        page.click(f"{card} button.abort")
        wait_for(lambda: page.text_content(f"{card} .phase") == "Failed", 10, "the page showing Failed")
        assert mesh.weights("webui") == {"v1": 100}
        assert "aborted by console" in mesh.status("webui")["message"]
        page.screenshot(path=str(shots / "canary-aborted.png"), full_page=True)

        # history: the diff of a canary step, and a rollback to it through the page
        page.click('nav a[data-view="history"]')
        revision = [e for e in mesh.api.call("GET", "/history?limit=200")[1]["items"]
                    if e["origin"] == "canary default/webui: weight 15"][0]["revision"]
        step = f'tr[data-revision="{revision}"]'
        page.wait_for_selector(step, timeout=10000)
        page.click(f"{step} button.diff")
        page.wait_for_selector("pre.diff span.add", timeout=5000)
        assert '"weight": 15' in page.text_content("pre.diff")
        page.click(f"{step} button.rollback")
        wait_for(lambda: mesh.weights("webui") == {"v1": 85, "v2": 15}, 10, "the rollback reaching the routes")
        page.screenshot(path=str(shots / "history-rollback.png"), full_page=True)

        # the mesh: the gateway with the version it ACKed
        page.click('nav a[data-view="mesh"]')
        page.wait_for_selector("#proxies tr[data-node] td.state", timeout=10000)
        assert "acked" in page.text_content("#proxies")
        assert "webui.default" in page.text_content("#services")
        page.screenshot(path=str(shots / "mesh.png"), full_page=True)
    finally:
        users.stop()
        page.close()
    assert problems == []


def _call(cp, method: str, path: str, body=None, token: str | None = None) -> tuple[int, dict]:
    import json
    import ssl
    import urllib.error
    import urllib.request
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(cp.url + path, data=json.dumps(body).encode() if body is not None else None,
                                 method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10,
                                    context=ssl.create_default_context(cadata=cp.credentials_data()["ca"])) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_console_behind_authentication_asks_for_a_token_shows_with_view_and_acts_only_with_edit(browser, tmp_path):
    from controlplane.testing import ControlPlaneProcess
    cp = ControlPlaneProcess(f"sqlite:{tmp_path / 'cp.db'}", tls=True, log_path=str(tmp_path / "cp.log")).start(30)
    try:
        admin = cp.credentials_data()["token"]
        fqdn = "locked.default.svc.cluster.local"
        base = "/apis/networking.istio.io/v1/namespaces/default"
        md = {"name": "locked", "namespace": "default"}
        for plural, kind, spec in (
                ("destinationrules", "DestinationRule", {"host": fqdn, "subsets": [
                    {"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}),
                ("virtualservices", "VirtualService", {"hosts": [fqdn], "http": [
                    {"name": "main", "route": [{"destination": {"host": fqdn, "subset": "v1"}}]}]})):
            assert _call(cp, "PUT", f"{base}/{plural}/locked", {"apiVersion": "networking.istio.io/v1", "kind": kind,
                                                                "metadata": md, "spec": spec}, admin)[0] in (200, 201)
        code, body = _call(cp, "PUT", "/apis/delivery.meshproxy.io/v1/namespaces/default/canaries/locked", {
            "apiVersion": "delivery.meshproxy.io/v1", "kind": "Canary", "metadata": md,
            "spec": {"host": "locked", "stable": "v1", "canary": "v2",
                     "analysis": {"interval": "300ms", "stepWeight": 10, "minRequests": 1000}}}, admin)
        assert code == 201, body
        tokens = {scope: _call(cp, "POST", "/security/v1/api-tokens", {"scope": scope, "name": f"console-{scope}"},
                               admin)[1]["token"] for scope in ("view", "edit")}
        context = browser.new_context(ignore_https_errors=True)      # the mesh CA is not the browser's
        page = context.new_page()
        page.on("dialog", lambda d: d.accept())
        try:
            page.goto(f"{cp.url}/ui")
            page.wait_for_selector("#login:not([hidden])", timeout=10000)       # a 401: the page asks
            assert page.locator(".card").count() == 0
            page.fill("#token", tokens["view"])
            page.click("#login button")
            card = '[data-canary="default/locked"]'
            page.wait_for_selector(card, timeout=10000)                          # view: it shows
            page.click(f"{card} button.pause")
            page.wait_for_selector("#toast:not([hidden])", timeout=5000)
            assert "needs scope edit" in page.text_content("#toast")           # view: it may not act
            code, canary = _call(cp, "GET", "/apis/delivery.meshproxy.io/v1/namespaces/default/canaries/locked",
                                 token=admin)
            assert canary["status"]["paused"] is None
            page.evaluate("sessionStorage.clear()")
            page.reload()
            page.wait_for_selector("#login:not([hidden])", timeout=10000)
            page.fill("#token", tokens["edit"])
            page.click("#login button")
            page.wait_for_selector(f"{card} button.pause", timeout=10000)
            page.click(f"{card} button.pause")
            wait_for(lambda: _call(cp, "GET", "/apis/delivery.meshproxy.io/v1/namespaces/default/canaries/locked",
                                   token=admin)[1]["status"]["paused"], 10, "paused by the edit token")
            events = _call(cp, "GET", "/apis/delivery.meshproxy.io/v1/namespaces/default/canaries/locked/events",
                           token=admin)[1]["items"]
            assert any(e["message"] == "paused: paused by token:console-edit" for e in events), events
            ARTIFACTS.joinpath("console").mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "console" / "auth-paused.png"), full_page=True)
        finally:
            context.close()
    finally:
        cp.stop()
