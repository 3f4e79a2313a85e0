"""A TCP listener declared the Istio way (Sidecar egress listener with bind + port)
through a real proxy process: bytes both ways, half-close, a Gateway TCP server."""
from __future__ import annotations

import asyncio
import hashlib
import os
import textwrap

import pytest

from helpers import free_port

pytestmark = pytest.mark.asyncio


async def _echo_until_eof(reader, writer):
    data = bytearray()
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            break
        data += chunk
    # the client half-closed: answer after its FIN, then close
    writer.write(hashlib.sha256(data).hexdigest().encode())
    await writer.drain()
    writer.close()


def _tcp_config(egress_port: int, db_port: int) -> str:
    return textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: db, namespace: default}}
        spec:
          hosts: [db.default.svc.cluster.local]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: 5432, name: tcp-db, protocol: TCP}}]
          endpoints: [{{address: 127.0.0.1, ports: {{tcp-db: {db_port}}}}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: Sidecar
        metadata: {{name: default, namespace: default}}
        spec:
          egress:
          - port: {{number: {egress_port}, protocol: TCP, name: tcp-db}}
            bind: 127.0.0.1
            hosts: ["./db.default.svc.cluster.local"]
        """)


async def test_sidecar_egress_tcp_listener_relays_bytes_and_propagates_half_close(proxy_factory):
    server = await asyncio.start_server(_echo_until_eof, "127.0.0.1", 0)
    db_port = server.sockets[0].getsockname()[1]
    egress = free_port()
    proxy = proxy_factory(_tcp_config(egress, db_port))
    payload = os.urandom(3 * 1024 * 1024)
    reader, writer = await asyncio.open_connection("127.0.0.1", egress)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()                       # half-close: the upstream must see EOF
    answer = await asyncio.wait_for(reader.read(), 10)
    assert answer == hashlib.sha256(payload).hexdigest().encode()
    writer.close()
    text = proxy.admin("/metrics")[1].decode()
    assert "istio_tcp_connections_opened_total" in text
    server.close()


async def test_tcp_listener_resets_connections_beyond_max_connections(proxy_factory):
    relayed_closed = asyncio.Event()

    async def echo(reader, writer):
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        writer.close()
        relayed_closed.set()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    db_port = server.sockets[0].getsockname()[1]
    egress = free_port()
    proxy = proxy_factory(_tcp_config(egress, db_port), extra_args=["--max-connections", "1"])
    reader, writer = await asyncio.open_connection("127.0.0.1", egress)
    writer.write(b"first")
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"first"
    # the second connection is over the listener's limit: reset, never relayed
    # (the reset can reach the client before its connect() has reported success)
    writer2 = None
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", egress)
        writer2.write(b"second")
        await asyncio.wait_for(reader2.readexactly(6), 5)
    writer.write(b"still")                   # the admitted one is unaffected
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"still"
    text = proxy.admin("/metrics")[1].decode()
    overflow = sorted(line for line in text.splitlines() if line.startswith("meshproxy_downstream_cx_overflow_total{"))
    # every listener's counter exists (at 0 until its first overflow); the egress listener's is 1
    assert overflow == [f'meshproxy_downstream_cx_overflow_total{{listener="egress_{egress}"}} 1',
                        'meshproxy_downstream_cx_overflow_total{listener="http"} 0'], overflow
    writer.close()
    if writer2 is not None:
        writer2.close()
    # the relayed connection ends at both sides before the test's loop goes (else the proxy's
    # stop waits out its drain timeout on an upstream socket nobody closes)
    await asyncio.wait_for(relayed_closed.wait(), 5)
    server.close()
