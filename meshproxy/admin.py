"""The admin listener: /ready, /config_dump, /metrics, /stats, /clusters, /memory, /logging.

Not on the request path, so it is a plain asyncio-streams server that answers one
request per connection.  What it shows comes from an :class:`AdminSource`, which is
the worker itself when running one process, or the master aggregating its workers.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

from .listener import bind_socket


class AdminSource(Protocol):
    def ready(self) -> bool: ...
    async def config_dump(self) -> dict: ...
    async def metrics(self, accept: str) -> tuple[bytes, str]: ...
    async def clusters(self) -> dict: ...
    async def stats(self) -> str: ...
    async def memory(self) -> dict: ...


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class AdminServer:
    def __init__(self, source: AdminSource, host: str, port: int):
        self.source = source
        self.host = host
        self.port = port
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        # bound here, not by start_server(host, port): its name lookup loads the idna codec
        sock = bind_socket(self.host, self.port, backlog=128, reuse_port=False)
        self.server = await asyncio.start_server(self._serve, sock=sock)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            if len(head) > 16384:
                raise ValueError("head too large")
            line, *fields = head.decode("latin-1").split("\r\n")
            method, target, _ = line.split(" ", 2)
            headers = {}
            for field in fields:
                if ":" in field:
                    name, value = field.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            status, ctype, body = await self._dispatch(method, target, headers)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            status, ctype, body = 400, "text/plain", b"bad request\n"
        except Exception as err:       # an admin bug must never take the proxy down
            logging.getLogger("meshproxy.admin").exception("admin request failed")
            status, ctype, body = 500, "text/plain", f"internal error: {err}\n".encode()
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\ncontent-type: {ctype}\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode("latin-1")
        try:
            writer.write(head + body)
            await asyncio.wait_for(writer.drain(), 10.0)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, method: str, target: str, headers: dict) -> tuple[int, str, bytes]:
        url = urlsplit(target)
        path = url.path
        source = self.source
        if path == "/ready":
            ok = source.ready()
            return (200 if ok else 503), "text/plain", b"LIVE\n" if ok else b"NOT READY\n"
        if path == "/config_dump":
            return 200, "application/json", _json(await source.config_dump())
        if path in ("/metrics", "/stats/prometheus"):
            body, ctype = await source.metrics(headers.get("accept", ""))
            return 200, ctype, body
        if path == "/clusters":
            return 200, "application/json", _json(await source.clusters())
        if path == "/memory":
            return 200, "application/json", _json(await source.memory())
        if path == "/stats":
            return 200, "text/plain", (await source.stats()).encode()
        if path == "/logging":
            query = parse_qs(url.query)
            if method == "POST" and "level" in query:
                level = query["level"][0].upper()
                if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
                    return 400, "text/plain", f"unknown level {level}\n".encode()
                logging.getLogger("meshproxy").setLevel(level)
            current = logging.getLevelName(logging.getLogger("meshproxy").getEffectiveLevel())
            return 200, "text/plain", f"meshproxy: {current}\n".encode()
        return 404, "text/plain", b"not found\n"


def _json(value) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True, default=str) + "\n").encode()
