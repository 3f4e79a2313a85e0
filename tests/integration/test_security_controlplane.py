"""The security kinds through the real control plane: meshctl apply/get like the
networking kinds, an invalid policy refused with its path at the API, and a proxy that
receives the pushed AuthorizationPolicy and enforces it on its inbound listener."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from controlplane.testing import ControlPlaneProcess
from helpers import ProxyProcess, free_port

REPO = Path(__file__).resolve().parents[2]


def meshctl(cp, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controlplane.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=30, env={**os.environ, "MESHCTL_SERVER": cp.url}, cwd=REPO)


POLICIES = textwrap.dedent("""\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: deny-admin, namespace: foo}
    spec:
      action: DENY
      rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
    ---
    apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {name: default, namespace: foo}
    spec: {mtls: {mode: PERMISSIVE}}
    """)


def _get(port: int, path: str) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": "app.foo"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def test_security_kinds_are_applied_listed_refused_and_pushed(tmp_path):
    app_port, inbound_port = free_port(), free_port()
    app = subprocess.Popen([sys.executable, "-m", "http.server", str(app_port), "--bind", "127.0.0.1",
                            "--directory", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sidecar = textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: Sidecar
        metadata: {{name: default, namespace: foo}}
        spec:
          ingress:
          - port: {{number: {inbound_port}, protocol: HTTP, name: http}}
            bind: 127.0.0.1
            defaultEndpoint: 127.0.0.1:{app_port}
        """)
    with ControlPlaneProcess(f"sqlite:{tmp_path / 'cp.db'}") as cp:
        applied = meshctl(cp, "apply", "-f", "-", stdin=sidecar + "---\n" + POLICIES)
        assert applied.returncode == 0, applied.stderr
        assert "authorizationpolicy.security.istio.io/deny-admin -n foo created" in applied.stdout
        listed = meshctl(cp, "get", "authorizationpolicies", "-n", "foo")
        assert listed.returncode == 0 and "deny-admin" in listed.stdout, listed
        assert "default" in meshctl(cp, "get", "pa", "-n", "foo").stdout
        refused = meshctl(cp, "apply", "-f", "-", stdin=textwrap.dedent("""\
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: ext, namespace: foo}
            spec: {action: CUSTOM, provider: {name: opa}, rules: [{}]}
            """))
        assert refused.returncode != 0
        assert "AuthorizationPolicy foo/ext: spec.action: CUSTOM (an external authorizer) is not supported" \
            in refused.stderr, refused.stderr

        cfg = tmp_path / "empty"
        cfg.mkdir()
        proxy = ProxyProcess(cfg, extra_args=["--control-plane", cp.url, "--namespace", "foo"])
        try:
            proxy.start()
            deadline = time.monotonic() + 15
            while _get(inbound_port, "/") != 200 or _get(inbound_port, "/admin") != 403:
                assert time.monotonic() < deadline, proxy.log()
                time.sleep(0.1)
        finally:
            proxy.stop()
    app.terminate()
    app.wait(5)
