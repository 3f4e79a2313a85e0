"""AuthorizationPolicy enforced by a real proxy on its inbound listeners: curl gets
Envoy's 403 ``RBAC: access denied`` for a denied request, a denied TCP connection is
closed without data, allowed traffic reaches the app, decisions are counted, and a
changed policy file takes effect on reload."""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import textwrap
import time

import pytest

from helpers import Upstream, free_port, respond

pytestmark = pytest.mark.asyncio


def _config(http_port: int, app_port: int, tcp_port: int, echo_port: int, policies: str) -> str:
    return textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: Sidecar
        metadata: {{name: default, namespace: foo}}
        spec:
          ingress:
          - port: {{number: {http_port}, protocol: HTTP, name: http}}
            bind: 127.0.0.1
            defaultEndpoint: 127.0.0.1:{app_port}
          - port: {{number: {tcp_port}, protocol: TCP, name: tcp}}
            bind: 127.0.0.1
            defaultEndpoint: 127.0.0.1:{echo_port}
        """) + policies


POLICIES = textwrap.dedent("""\
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: deny-admin, namespace: foo}
    spec:
      selector: {matchLabels: {app: httpbin}}
      action: DENY
      rules:
      - to: [{operation: {ports: ["%(http_port)d"], paths: ["/admin*"]}}]
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: allow-get, namespace: foo}
    spec:
      selector: {matchLabels: {app: httpbin}}
      rules:
      - to: [{operation: {methods: ["GET", "HEAD"]}}]
      - to: [{operation: {ports: ["%(tcp_port)d"]}}]
        from: [{source: {ipBlocks: ["10.0.0.0/8"]}}]
    """)


def _curl(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    out = subprocess.run(["curl", "-s", "--path-as-is", "-X", method, "-o", "-", "-w", "\n%{http_code}",
                          f"http://127.0.0.1:{port}{path}", "-H", "Host: httpbin.foo"],
                         capture_output=True, text=True, timeout=10)
    body, _, code = out.stdout.rpartition("\n")
    return int(code), body


async def _echo(reader, writer):
    data = await reader.read(100)
    writer.write(b"echo:" + data)
    await writer.drain()
    writer.close()


async def _tcp_roundtrip(port: int) -> bytes:
    """What came back; b"" when the proxy closed the connection without data (a close with
    our unread bytes in its buffer is a reset, as Envoy's network RBAC gives)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"ping")
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def test_inbound_http_and_tcp_are_authorized_as_istio_does(proxy_factory):
    app = await Upstream(respond(200, b"hello")).start()
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    http_port, tcp_port = free_port(), free_port()
    proxy = proxy_factory(
        {"mesh.yaml": _config(http_port, app.port, tcp_port, echo_port, POLICIES % {"tcp_port": tcp_port, "http_port": http_port})},
        extra_args=["--namespace", "foo", "--labels", "app=httpbin"])
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, _curl, http_port, "/get") == (200, "hello")
    assert await loop.run_in_executor(None, _curl, http_port, "/admin/users") == (403, "RBAC: access denied")
    assert await loop.run_in_executor(None, _curl, http_port, "/post", "POST") == (403, "RBAC: access denied")
    # a dot segment does not get around the DENY: paths are normalised before matching
    assert (await loop.run_in_executor(None, _curl, http_port, "/x/../admin"))[0] == 403
    assert [r.target for r in app.requests] == ["/get"]

    # TCP: the DENY policy's paths cannot be read on TCP, but its port does not match (a DENY rule with
    # only paths would deny every TCP connection, as in Istio); the ALLOW rule for the TCP port needs a
    # 10/8 source, loopback is not: closed, no data
    assert await _tcp_roundtrip(tcp_port) == b""

    _, metrics = proxy.admin("/metrics")
    text = metrics.decode()
    assert re.search(r'meshproxy_authz_decisions_total\{listener="inbound_%d",protocol="http",decision="denied",'
                     r'policy="foo/deny-admin"\} 2' % http_port, text), text
    assert re.search(r'meshproxy_authz_decisions_total\{listener="inbound_%d",protocol="tcp",decision="denied",'
                     r'policy=""\} 1' % tcp_port, text), "\n".join(l for l in text.splitlines() if "authz_decisions_total{" in l)

    status, dump = proxy.admin("/config_dump")
    listeners = {l["name"]: l for l in json.loads(dump)["snapshot"]["listeners"]}
    inbound = listeners[f"inbound_{tcp_port}"]
    assert status == 200 and inbound["mtls"] == "PERMISSIVE"
    assert [p["name"] for p in inbound["authz"]["allow"]] == ["foo/allow-get"]
    assert "10.0.0.0/8" in dump.decode()

    # the policy changes on disk: the TCP rule now allows loopback, the watch reloads it
    (proxy.config_dir / "mesh.yaml").write_text(_config(http_port, app.port, tcp_port, echo_port,
                                                        POLICIES.replace("10.0.0.0/8", "127.0.0.0/8") % {
                                                            "tcp_port": tcp_port, "http_port": http_port}))
    deadline = time.monotonic() + 10
    while await _tcp_roundtrip(tcp_port) != b"echo:ping":
        assert time.monotonic() < deadline, proxy.log()
        await asyncio.sleep(0.2)
    echo.close()
    await app.close()
