"""An ingress gateway from Istio Gateway + VirtualService resources, through a real
proxy in gateway mode: HTTP routing by the gateway's VirtualServices, and HTTPS with
SIMPLE TLS where SNI picks the certificate."""
from __future__ import annotations

import asyncio
import ssl
import subprocess
import textwrap

import pytest

from helpers import Upstream, free_port, http_get, respond, service_entry_yaml

pytestmark = pytest.mark.asyncio


def _cert(tmp_path, name: str) -> tuple[str, str]:
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return str(cert), str(key)


async def test_https_gateway_picks_the_certificate_by_sni_and_routes_by_host(proxy_factory, tmp_path):
    shop = await Upstream(respond(200, b"shop")).start()
    blog = await Upstream(respond(200, b"blog")).start()
    shop_cert, shop_key = _cert(tmp_path, "shop.example.com")
    blog_cert, blog_key = _cert(tmp_path, "blog.example.com")
    https_port, http_port = free_port(), free_port()
    config = (service_entry_yaml("shop.internal", 80, [("127.0.0.1", shop.port, {})], name="shop")
              + "---\n" + service_entry_yaml("blog.internal", 80, [("127.0.0.1", blog.port, {})], name="blog")
              + "---\n" + textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {{name: edge, namespace: default}}
        spec:
          selector: {{istio: ingressgateway}}
          servers:
          - port: {{number: {https_port}, name: https-shop, protocol: HTTPS}}
            hosts: [shop.example.com]
            tls: {{mode: SIMPLE, serverCertificate: {shop_cert}, privateKey: {shop_key}}}
          - port: {{number: {https_port}, name: https-blog, protocol: HTTPS}}
            hosts: [blog.example.com]
            tls: {{mode: SIMPLE, serverCertificate: {blog_cert}, privateKey: {blog_key}}}
          - port: {{number: {http_port}, name: http, protocol: HTTP}}
            hosts: ["*"]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: shop, namespace: default}}
        spec:
          hosts: [shop.example.com]
          gateways: [edge]
          http:
          - route: [{{destination: {{host: shop.internal, port: {{number: 80}}}}}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: blog, namespace: default}}
        spec:
          hosts: [blog.example.com]
          gateways: [edge]
          http:
          - route: [{{destination: {{host: blog.internal, port: {{number: 80}}}}}}]
        """))
    proxy = proxy_factory(config, extra_args=["--mode", "gateway", "--gateway-bind", "127.0.0.1",
                                              "--labels", "istio=ingressgateway"])
    for name, expected in (("shop.example.com", b"shop"), ("blog.example.com", b"blog")):
        ctx = ssl.create_default_context(cafile=shop_cert if name.startswith("shop") else blog_cert)
        reader, writer = await asyncio.open_connection("127.0.0.1", https_port, ssl=ctx, server_hostname=name)
        peer = writer.get_extra_info("peercert")
        assert dict(x[0] for x in peer["subject"])["commonName"] == name
        writer.write(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 5)
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(expected)
        writer.close()
    status, _, body = await http_get(http_port, "blog.example.com")
    assert (status, body) == (200, b"blog")
    await shop.close()
    await blog.close()
