"""One bounded HTTP/1.1 exchange on its own connection (h11 framing), for everything the control
plane calls over plain HTTP: etcd's JSON gateway, proxies' admin stats, webhooks, Prometheus.

:func:`exchange` is the exchange itself (no deadline: callers that retry across endpoints put
their own around it); :func:`request` adds one deadline for the whole exchange and turns every
failure into an :class:`HttpFailure` with a message fit for a canary's status.
"""
from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

import h11

MAX_RESPONSE = 16 * 1024 * 1024


class HttpFailure(Exception):
    pass


async def request(method: str, url: str, *, body: bytes = b"", headers: list[tuple[str, str]] = (),
                  timeout: float) -> tuple[int, bytes]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise HttpFailure(f"{url}: only http:// URLs are supported")
    host, port = parts.hostname, parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        async with asyncio.timeout(timeout):
            return await exchange(host, port, method, target, body, headers)
    except TimeoutError:
        raise HttpFailure(f"{method} {url}: no answer within {timeout:g}s") from None
    except (OSError, h11.ProtocolError) as exc:
        raise HttpFailure(f"{method} {url}: {type(exc).__name__}: {exc}") from None


async def exchange(host: str, port: int, method: str, target: str, body: bytes = b"",
                   headers=(), max_response: int | None = MAX_RESPONSE) -> tuple[int, bytes]:
    """Send one request with ``connection: close`` and read the whole response: (status, body).
    Raises OSError, or h11.ProtocolError for a malformed response or one over ``max_response``
    bytes (None: no cap)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 24)
        head = [("host", f"{host}:{port}"), ("connection", "close"), ("content-length", str(len(body))),
                *headers]
        writer.write(conn.send(h11.Request(method=method, target=target, headers=head)))
        if body:
            writer.write(conn.send(h11.Data(data=body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        status, payload = 0, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                payload += event.data
                if max_response is not None and len(payload) > max_response:
                    raise h11.ProtocolError(f"response larger than {max_response} bytes")
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, bytes(payload)
    finally:
        writer.close()


async def post_json(url: str, value, timeout: float) -> tuple[int, bytes]:
    return await request("POST", url, body=json.dumps(value).encode(),
                         headers=[("content-type", "application/json")], timeout=timeout)
