"""What a user installs: a wheel carrying the compiled hot path, installed into a fresh venv,
serves a request and says it runs compiled; the Dockerfile's build steps are the scripts run
here (no image daemon in CI); the Kubernetes manifests carry Prometheus scrape annotations
that point at ports and paths the proxy and the control plane serve."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import yaml

from helpers import free_port

ROOT = Path(__file__).resolve().parents[2]


def _run(*cmd, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def test_the_dockerfile_runs_the_build_scripts_tested_here():
    steps = [line.split(None, 1)[1] for line in (ROOT / "Dockerfile").read_text().splitlines()
             if line.startswith("RUN ")]
    assert "scripts/build_wheels.sh /wheels" in steps
    assert any(step.startswith('install_wheels.sh /wheels "$(command -v python3)"') for step in steps)
    assert re.search(r"^USER 1337:1337$", (ROOT / "Dockerfile").read_text(), re.M)


def test_a_wheel_installed_in_a_fresh_venv_serves_compiled(tmp_path):
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    _run(ROOT / "scripts" / "build_wheels.sh", wheels, "--no-deps", cwd=ROOT)
    wheel = next(wheels.glob("meshproxy-*.whl"))
    assert re.search(r"-cp311-cp311-linux_x86_64\.whl$", wheel.name), wheel.name     # a platform wheel
    _run(sys.executable, "-m", "venv", venv)
    installed = _run(ROOT / "scripts" / "install_wheels.sh", wheels, venv / "bin" / "python", "--no-deps")
    assert installed.stdout.strip().endswith("meshproxy hot path: compiled")

    # the installed proxy, its dependencies taken from the test venv (PYTHONPATH: no .pth, so
    # not the editable checkout), answers through a route and logs that it runs compiled
    deps = sysconfig.get_paths()["purelib"]
    config = tmp_path / "mesh.yaml"
    config.write_text("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: direct}\n"
                      "spec:\n  hosts: [direct.local]\n  http: [{directResponse: {status: 204}}]\n")
    port, admin = free_port(), free_port()
    log = tmp_path / "proxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([venv / "bin" / "meshproxy", "run", "--config", config, "--listen", f"127.0.0.1:{port}",
                                 "--admin", f"127.0.0.1:{admin}"], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env={**os.environ, "PYTHONPATH": deps})
    try:
        deadline = time.monotonic() + 30
        while "meshproxy ready" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": "direct.local"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 204
        text = log.read_text()
        assert "hot path compiled" in text and "hot path: python" not in text, text
        assert str(venv) in _run(venv / "bin" / "python", "-c", "import meshproxy; print(meshproxy.__file__)",
                                 cwd=tmp_path, env={**os.environ, "PYTHONPATH": deps}).stdout
    finally:
        proc.terminate()
        proc.wait(10)


def test_manifests_carry_scrape_annotations_for_served_ports_and_paths():
    served = {"15000": "/stats/prometheus", "15010": "/metrics"}       # proxy admin, control plane API
    templates = []
    for path in sorted((ROOT / "configs" / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Deployment":
                templates.append((path.name, doc["spec"]["template"]))
    assert len(templates) == 4
    for name, template in templates:
        ann = template["metadata"].get("annotations") or {}
        assert ann.get("prometheus.io/scrape") == "true", name
        ports = {str(p["containerPort"]) for c in template["spec"]["containers"] for p in c.get("ports", [])}
        assert ann["prometheus.io/port"] in ports, name
        assert served[ann["prometheus.io/port"]] == ann["prometheus.io/path"], name
        images = {c["image"] for c in template["spec"]["containers"]}
        assert "meshproxy:0.1.0" in images, name
