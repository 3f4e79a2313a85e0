"""One bounded HTTP/1.1 exchange (h11 framing): proxies' admin stats, webhooks, Prometheus.

Every call has one deadline for the whole exchange and a cap on the response body; a
failure is an :class:`HttpFailure` with a message fit for a canary's status.
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
            return await _exchange(host, port, method, target, body, list(headers))
    except TimeoutError:
        raise HttpFailure(f"{method} {url}: no answer within {timeout:g}s") from None
    except (OSError, h11.ProtocolError) as exc:
        raise HttpFailure(f"{method} {url}: {type(exc).__name__}: {exc}") from None


async def _exchange(host, port, method, target, body, headers) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        conn = h11.Connection(h11.CLIENT)
        head = [("host", f"{host}:{port}"), ("connection", "close"), ("content-length", str(len(body))), *headers]
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
                if len(payload) > MAX_RESPONSE:
                    raise h11.ProtocolError("response larger than 16 MiB")
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, bytes(payload)
    finally:
        writer.close()


async def post_json(url: str, value, timeout: float) -> tuple[int, bytes]:
    return await request("POST", url, body=json.dumps(value).encode(),
                         headers=[("content-type", "application/json")], timeout=timeout)
