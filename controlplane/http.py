"""A small asyncio HTTP/1.1 server for the control-plane API (h11 for the framing).

Not the hot path: a few hundred API calls and one long-lived stream per proxy.  A handler
returns either a :class:`Response` or a :class:`StreamResponse`, whose async iterator of
chunks is sent with chunked transfer encoding until it ends or the client goes away.
Every read has a timeout; request bodies are capped.
"""
from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable
from urllib.parse import parse_qs, unquote, urlsplit

import h11

MAX_BODY = 8 * 1024 * 1024
READ_TIMEOUT = 30.0          # a request head and body must arrive within this
IDLE_TIMEOUT = 120.0         # keep-alive idle
WRITE_TIMEOUT = 30.0
HANDSHAKE_TIMEOUT = 10.0     # a TLS handshake (a client trickling its hello gets this long in all)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    peer: str = ""
    peer_uris: tuple[str, ...] = ()     # URI SANs of a verified TLS client certificate
    peer_not_after: str = ""            # its notAfter, as OpenSSL prints it
    principal: object = None            # set by the API once it knows who is asking

    def json(self):
        return json.loads(self.body or b"null")


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, status: int, value) -> "Response":
        return cls(status, json.dumps(value, indent=None, separators=(",", ":")).encode() + b"\n")


@dataclass
class StreamResponse:
    chunks: AsyncIterator[bytes]
    status: int = 200
    content_type: str = "application/x-ndjson"
    on_close: Callable[[], None] | None = None


Handler = Callable[[Request], Awaitable[Response | StreamResponse]]


def peer_certificate(ssl_object) -> tuple[tuple[str, ...], str]:
    """(URI SANs, notAfter) of a verified TLS client certificate; ((), "") without one."""
    if ssl_object is None:
        return (), ""
    from meshproxy.security.tls import peer_uris
    cert = ssl_object.getpeercert() or {}
    return peer_uris(ssl_object), cert.get("notAfter", "")


class HttpServer:
    """``ssl_context`` (``start``): TLS on every connection; a handshake must finish within
    HANDSHAKE_TIMEOUT.  Failed handshakes are refused by asyncio's TLS layer, which does not
    report them to us (so they are not counted here)."""

    def __init__(self, handler: Handler):
        self._handler = handler
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self.port = 0

    async def start(self, host: str, port: int, ssl_context=None) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, backlog=2048, ssl=ssl_context,
                                                  ssl_handshake_timeout=HANDSHAKE_TIMEOUT if ssl_context else None)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            await self._connection(reader, writer)
        except (ConnectionError, asyncio.TimeoutError, h11.ProtocolError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _connection(self, reader, writer) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        peer = writer.get_extra_info("peername")
        peer_str = f"{peer[0]}:{peer[1]}" if peer else ""
        peer_uris, peer_not_after = peer_certificate(writer.get_extra_info("ssl_object"))
        while True:
            request = await self._read_request(conn, reader, peer_str)
            if request is None:
                return
            request.peer_uris, request.peer_not_after = peer_uris, peer_not_after
            try:
                result = await self._handler(request)
            except Exception as exc:  # the API turns known errors into Status; this is a bug
                result = Response.json(500, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                             "reason": "InternalError", "code": 500,
                                             "message": f"{type(exc).__name__}: {exc}"})
            if isinstance(result, StreamResponse):
                await self._stream(conn, reader, writer, result)
                return
            headers = [("content-type", result.content_type), ("content-length", str(len(result.body))),
                       *result.headers]
            writer.write(conn.send(h11.Response(status_code=result.status, headers=headers)))
            writer.write(conn.send(h11.Data(data=result.body)) if result.body else b"")
            writer.write(conn.send(h11.EndOfMessage()))
            async with asyncio.timeout(WRITE_TIMEOUT):
                await writer.drain()
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    async def _read_request(self, conn, reader, peer) -> Request | None:
        head = None
        body = bytearray()
        timeout = IDLE_TIMEOUT
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                async with asyncio.timeout(timeout):
                    data = await reader.read(65536)
                conn.receive_data(data)
                if not data and head is None:
                    return None
                continue
            if isinstance(event, h11.Request):
                head = event
                timeout = READ_TIMEOUT
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise h11.ProtocolError("request body too large")
            elif isinstance(event, h11.EndOfMessage):
                target = urlsplit(head.target.decode("latin-1"))
                query = {k: v[-1] for k, v in parse_qs(target.query).items()}
                headers = {k.decode().lower(): v.decode("latin-1") for k, v in head.headers}
                return Request(head.method.decode(), unquote(target.path), query, headers, bytes(body), peer)
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _stream(self, conn, reader, writer, result: StreamResponse) -> None:
        """Send chunks until the source ends or the peer closes (noticed by a reader task)."""
        writer.write(conn.send(h11.Response(status_code=result.status, headers=[
            ("content-type", result.content_type), ("transfer-encoding", "chunked"),
            ("cache-control", "no-cache")])))
        stream_task = asyncio.current_task()

        async def watch_peer():
            try:
                while await reader.read(4096):
                    pass
            except ConnectionError:
                pass
            stream_task.cancel()

        watcher = asyncio.create_task(watch_peer(), name="http-stream-peer-watch")
        try:
            async for chunk in result.chunks:
                writer.write(conn.send(h11.Data(data=chunk)))
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await writer.drain()
            writer.write(conn.send(h11.EndOfMessage()))
            async with asyncio.timeout(WRITE_TIMEOUT):
                await writer.drain()
        except asyncio.CancelledError:
            if watcher.done():      # the peer went away: a normal end, not our cancellation
                stream_task.uncancel()
                return
            raise
        finally:
            watcher.cancel()
            if result.on_close:
                result.on_close()
            aclose = getattr(result.chunks, "aclose", None)
            if aclose:
                await aclose()
