"""Gateway ``tls.mode: PASSTHROUGH``: a real gateway process routes TLS connections on
the ClientHello's SNI (VirtualService ``tls`` routes, ``sniHosts``) without terminating
them, so curl and openssl s_client see the backends' own certificates end to end."""
from __future__ import annotations

import asyncio
import ssl
import subprocess
import textwrap

import pytest

from helpers import free_port
from mtls import MeshCA

pytestmark = pytest.mark.asyncio


async def _https_backend(ca: MeshCA, name: str, body: bytes, tmp_path):
    cert, key, _ = ca.issue(dns=(name,)).files(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    async def serve(reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1]


def _service(name: str, port: int) -> str:
    return textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: {name.split('.')[0]}, namespace: default}}
        spec:
          hosts: [{name}]
          location: MESH_EXTERNAL
          resolution: STATIC
          ports: [{{number: 443, name: tls, protocol: TLS}}]
          endpoints: [{{address: 127.0.0.1, ports: {{tls: {port}}}}}]
        ---
        """)


async def test_passthrough_routes_on_sni_without_terminating(proxy_factory, tmp_path):
    ca = MeshCA("backends' own root")
    root = tmp_path / "root.pem"
    root.write_bytes(ca.root_pem)
    shop, shop_port = await _https_backend(ca, "shop.example.com", b"shop", tmp_path)
    blog, blog_port = await _https_backend(ca, "blog.example.com", b"blog", tmp_path)
    gw_port = free_port()
    config = _service("shop.example.com", shop_port) + _service("blog.example.com", blog_port) + textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {{name: edge, namespace: default}}
        spec:
          selector: {{istio: ingressgateway}}
          servers:
          - port: {{number: {gw_port}, name: tls, protocol: TLS}}
            hosts: ["*.example.com"]
            tls: {{mode: PASSTHROUGH}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: sites, namespace: default}}
        spec:
          hosts: ["*.example.com"]
          gateways: [edge]
          tls:
          - match: [{{port: {gw_port}, sniHosts: [shop.example.com]}}]
            route: [{{destination: {{host: shop.example.com, port: {{number: 443}}}}}}]
          - match: [{{sniHosts: [blog.example.com]}}]
            route: [{{destination: {{host: blog.example.com, port: {{number: 443}}}}}}]
        """)
    proxy_factory(config, extra_args=["--mode", "gateway", "--gateway-bind", "127.0.0.1",
                                      "--labels", "istio=ingressgateway"])
    loop = asyncio.get_running_loop()
    for name, body in (("shop.example.com", b"shop"), ("blog.example.com", b"blog")):
        out = await loop.run_in_executor(None, lambda: subprocess.run(
            ["curl", "-s", "--cacert", str(root), "--resolve", f"{name}:{gw_port}:127.0.0.1",
             f"https://{name}:{gw_port}/"], capture_output=True, timeout=15))
        assert out.stdout == body, out
    s_client = await loop.run_in_executor(None, lambda: subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{gw_port}", "-servername", "blog.example.com",
         "-CAfile", str(root), "-verify_return_error", "-brief"], input=b"", capture_output=True, timeout=15))
    text = (s_client.stdout + s_client.stderr).decode()
    assert "blog.example.com" in text and ("Verification: OK" in text or "Verify return code: 0" in text), text
    # an SNI no route takes: the connection is closed, no backend is reached
    other = await loop.run_in_executor(None, lambda: subprocess.run(
        ["curl", "-s", "-k", "--resolve", f"wiki.example.com:{gw_port}:127.0.0.1",
         f"https://wiki.example.com:{gw_port}/"], capture_output=True, timeout=15))
    assert other.returncode != 0 and other.stdout == b""
    shop.close()
    blog.close()
