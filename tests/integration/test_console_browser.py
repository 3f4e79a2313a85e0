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


@pytest.fixture
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
