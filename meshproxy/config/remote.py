"""The proxy's control-plane client: one push stream, ACK/NACK, registration, reconnects.

Wiring (the composition root does this; nothing here touches the snapshot store)::

    client = RemoteConfigClient(urls, node_id, identity_info, on_config, registration)
    task = task_group.create_task(client.run())     # runs until cancelled
    ...
    await client.deregister()                       # on a clean drain, before closing listeners
    task.cancel()

``on_config(resources, workloads, version)`` receives the full resource list (Istio
objects as dicts) and the full workload list (``{service, namespace, address, ports,
labels}``) of one config version, builds one snapshot from both and swaps it.  It returns an
:class:`ApplyResult` (or a plain list of errors: ``[]`` to ACK, errors to NACK the whole
version).  Refusal is per resource: a version with refused resources is applied with those
resources at their last good version, and the NACK names them (``rejected``).  It may be a
plain function or a coroutine function; a large payload is parsed off the loop.

Protocol (served by ``controlplane.api``): ``POST /push/v1/stream`` answers with a chunked
stream of JSON lines, ``{"type": "config", "version", "nonce", "resources_version",
"endpoints_version", "resources": DELTA | null, "workloads": DELTA | null}`` (null = the part
you already hold with that version), ``{"type": "in_sync", "version"}`` when the proxy
already runs the current version, and ``{"type": "ping"}`` at least every ping interval.
A DELTA is ``{"base", "updated": [{"key", "version", "item"}], "removed": [key]}``: applied
to the part version ``base`` it gives the message's part version; ``base: ""`` replaces the
whole part.  A delta whose base is not the version held here is not applied: the client
answers ``POST /push/v1/ack {node_id, nonce, resync: true}`` and the control plane sends
whole parts.  The answer to every other config message is ``POST /push/v1/ack {node_id,
nonce, version, errors, rejected, applied}``.

When the control plane is unreachable the last good config keeps serving; the client
retries with exponential backoff and jitter, moving to the next URL each time, and on
reconnect says which part versions it holds, so an unchanged control plane sends nothing
and a changed one sends deltas from them.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Awaitable, Callable
from urllib.parse import urlsplit

import h11

log = logging.getLogger("meshproxy.config.remote")

OnConfig = Callable[[list[dict], list[dict], str], "list[str] | Awaitable[list[str]]"]


@dataclass
class ApplyResult:
    errors: list[str]                          # [] = ACK
    rejected: dict[str, list[str]]             # "Kind ns/name" -> its errors (kept at its last good version)
    applied: bool = True                       # the version runs (minus ``rejected``); False: the last one does


LARGE_MESSAGE = 256 * 1024     # bytes: a stream line this long is parsed in a thread, not on the loop


class StreamBroken(Exception):
    """The stream ended or said something this client cannot use; reconnect."""


class NeedResync(Exception):
    """A message builds on a part version this client does not hold."""


@dataclass
class RemoteStatus:
    url: str = ""                 # the control plane currently streamed from ("" = none)
    connected: bool = False
    version: str = ""             # last ACKed (good) config version
    last_error: str = ""          # last NACK or connection problem
    reconnects: int = 0
    configs_applied: int = 0
    configs_rejected: int = 0
    rejected: dict = field(default_factory=dict)   # resources of the running version kept at their last good


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--control-plane: expected http(s)://HOST:PORT, got {url!r}")
    return parts.hostname, parts.port or 15010


def is_tls(url: str) -> bool:
    return url.startswith("https://")


SslFactory = Callable[[], "ssl.SSLContext | None"]


async def open_connection(host: str, port: int, ssl_context=None):
    """asyncio.open_connection, over TLS (host name checked as the context says) when given a context."""
    if ssl_context is None:
        return await asyncio.open_connection(host, port)
    return await asyncio.open_connection(host, port, ssl=ssl_context, server_hostname=host)


async def json_request(host: str, port: int, method: str, path: str, body: dict | None,
                       ssl_context=None) -> tuple[int, bytes]:
    """One JSON request on its own connection (``connection: close``); returns (status, body).
    Unbounded: callers put a deadline around it."""
    reader, writer = await open_connection(host, port, ssl_context)
    try:
        conn = h11.Connection(h11.CLIENT)
        data = json.dumps(body).encode() if body is not None else b""
        writer.write(conn.send(h11.Request(method=method, target=path, headers=[
            ("host", f"{host}:{port}"), ("content-type", "application/json"),
            ("content-length", str(len(data))), ("connection", "close")])))
        writer.write(conn.send(h11.Data(data=data)) if data else b"")
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
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, bytes(payload)
    finally:
        writer.close()


async def http_call(url: str, method: str, path: str, body: dict | None, timeout: float,
                    ssl_context=None) -> tuple[int, bytes]:
    """One request to the control plane on its own connection, bounded by ``timeout`` as a whole."""
    host, port = _address(url)

    async def call():
        return await json_request(host, port, method, path, body, ssl_context if is_tls(url) else None)

    async with asyncio.timeout(timeout):      # not wait_for: on 3.11 it can swallow a cancellation
        return await call()


class KeepAliveChannel:
    """One kept-alive connection for the small POSTs of a stream (ACKs): no connect per ACK."""

    def __init__(self, url: str, ssl_context: SslFactory | None = None):
        self.host, self.port = _address(url)
        self._ssl = ssl_context if is_tls(url) and ssl_context else (lambda: None)
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter, h11.Connection] | None = None

    async def post(self, path: str, body: dict, timeout: float) -> int:
        for attempt in (0, 1):           # a kept-alive connection may have been closed by the server
            try:
                async with asyncio.timeout(timeout):
                    return await self._post(path, body)
            except (OSError, h11.ProtocolError, StreamBroken):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _post(self, path: str, body: dict) -> int:
        if self._conn is None:
            reader, writer = await open_connection(self.host, self.port, self._ssl())
            self._conn = (reader, writer, h11.Connection(h11.CLIENT))
        reader, writer, conn = self._conn
        data = json.dumps(body).encode()
        writer.write(conn.send(h11.Request(method="POST", target=path, headers=[
            ("host", f"{self.host}:{self.port}"), ("content-type", "application/json"),
            ("content-length", str(len(data)))])))
        writer.write(conn.send(h11.Data(data=data)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        status = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                chunk = await reader.read(65536)
                if not chunk:
                    raise StreamBroken("ack connection closed")
                conn.receive_data(chunk)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                else:
                    self.close()
                return status
            elif isinstance(event, h11.ConnectionClosed):
                raise StreamBroken("ack connection closed")

    def close(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None


class RemoteConfigClient:
    def __init__(self, urls: list[str], node_id: str, identity_info: dict, on_config: OnConfig,
                 registration: dict | None = None, *, ttl: float = 10.0, read_timeout: float = 35.0,
                 connect_timeout: float = 3.0, backoff_base: float = 0.1, backoff_max: float = 5.0,
                 rng: random.Random | None = None, ssl_context: SslFactory | None = None):
        if not urls:
            raise ValueError("RemoteConfigClient needs at least one control-plane URL")
        for url in urls:
            _address(url)
        self.urls = list(urls)
        if any(is_tls(u) for u in urls) and ssl_context is None:
            raise ValueError("an https control plane needs a TLS context (--ca-file and a workload certificate)")
        self._ssl = ssl_context or (lambda: None)     # asked per connection: the certificate renews
        self.node_id = node_id
        self.identity_info = dict(identity_info)
        self.on_config = on_config
        self.registration = dict(registration) if registration else None
        if self.registration is not None:
            self.registration.setdefault("id", node_id)
            self.registration.setdefault("node_id", node_id)
            self.registration.setdefault("ttl", ttl)
            self.identity_info.setdefault("service", self.registration.get("service", ""))
        self.ttl = ttl
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._rng = rng or random.Random()
        self.status = RemoteStatus()
        self.synced = asyncio.Event()         # set once a config was applied or confirmed in sync
        self._url_index = 0
        # part ("resources" | "workloads") -> (version, key -> item): what the running config was built from
        self._held: dict[str, tuple[str, dict[str, dict]]] = {}
        self.resyncs = 0
        self._draining = False
        self._acks: KeepAliveChannel | None = None    # per stream: ACKs on one kept-alive connection

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Stream from the control planes forever (until cancelled)."""
        failures = 0
        while True:
            url = self.urls[self._url_index % len(self.urls)]
            heartbeat: asyncio.Task | None = None
            self._acks = KeepAliveChannel(url, self._ssl)
            try:
                if self.registration is not None and not self._draining:
                    await self._register(url)
                    heartbeat = asyncio.create_task(self._heartbeat_loop(url), name="remote-config-heartbeat")
                async with contextlib.aclosing(self._stream(url)) as messages:
                    async for line in messages:
                        failures = 0
                        message = json.loads(line) if len(line) < LARGE_MESSAGE else \
                            await asyncio.to_thread(json.loads, line)
                        await self._handle(url, message)
                raise StreamBroken("the control plane ended the stream")
            except (OSError, asyncio.TimeoutError, StreamBroken, h11.ProtocolError, ValueError) as exc:
                self.status.connected = False
                self.status.last_error = f"{url}: {type(exc).__name__}: {exc}"
                log.warning("control plane stream lost: %s", self.status.last_error)
            finally:
                self._acks.close()
                if heartbeat is not None:
                    heartbeat.cancel()
                    await asyncio.gather(heartbeat, return_exceptions=True)
            self.status.reconnects += 1
            self._url_index += 1
            delay = min(self.backoff_max, self.backoff_base * 2 ** min(failures, 16))
            failures += 1
            await asyncio.sleep(delay * self._rng.uniform(0.5, 1.0))

    async def deregister(self) -> None:
        """Remove this workload from the control plane now (clean drain); bounded in time."""
        self._draining = True
        if self.registration is None:
            return
        path = f"/registry/v1/workloads/{self.registration['id']}"
        start = self._url_index
        for i in range(len(self.urls)):
            url = self.urls[(start + i) % len(self.urls)]
            try:
                status, _ = await http_call(url, "DELETE", path, None, self.connect_timeout, self._ssl())
                if status in (200, 404):
                    return
            except (OSError, asyncio.TimeoutError, h11.ProtocolError):
                continue

    # ------------------------------------------------------------ registration

    async def _register(self, url: str) -> None:
        status, body = await http_call(url, "POST", "/registry/v1/workloads", self.registration, self.connect_timeout,
                                       self._ssl())
        if status != 201:
            raise StreamBroken(f"registration refused ({status}): {body[:300].decode(errors='replace')}")

    async def _heartbeat_loop(self, url: str) -> None:
        path = f"/registry/v1/workloads/{self.registration['id']}/heartbeat"
        interval = float(self.registration.get("ttl", self.ttl)) / 3
        while not self._draining:
            await asyncio.sleep(interval)
            try:
                status, _ = await http_call(url, "POST", path, None, self.connect_timeout, self._ssl())
                if status == 404 and not self._draining:          # expired meanwhile: register again
                    await self._register(url)
            except (OSError, asyncio.TimeoutError, h11.ProtocolError, StreamBroken) as exc:
                log.warning("heartbeat to %s failed: %s", url, exc)

    # ------------------------------------------------------------ the stream

    async def _stream(self, url: str):
        host, port = _address(url)
        async with asyncio.timeout(self.connect_timeout):
            reader, writer = await open_connection(host, port, self._ssl() if is_tls(url) else None)
        try:
            conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
            body = json.dumps({"node_id": self.node_id, "identity": self.identity_info,
                               "resources_version": self.held_version("resources"),
                               "endpoints_version": self.held_version("workloads")}).encode()
            writer.write(conn.send(h11.Request(method="POST", target="/push/v1/stream", headers=[
                ("host", f"{host}:{port}"), ("content-type", "application/json"),
                ("content-length", str(len(body)))])))
            writer.write(conn.send(h11.Data(data=body)))
            writer.write(conn.send(h11.EndOfMessage()))
            async with asyncio.timeout(self.connect_timeout):
                await writer.drain()
            buffer = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    async with asyncio.timeout(self.read_timeout):
                        data = await reader.read(1 << 20)
                    if not data:
                        raise StreamBroken("connection closed by the control plane")
                    conn.receive_data(data)
                elif isinstance(event, h11.Response):
                    if event.status_code != 200:
                        raise StreamBroken(f"stream refused with status {event.status_code}")
                    self.status.connected, self.status.url = True, url
                elif isinstance(event, h11.Data):
                    buffer += event.data
                    while (end := buffer.find(b"\n")) >= 0:
                        line = bytes(buffer[:end])
                        del buffer[: end + 1]
                        if line.strip():
                            yield line
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return
        finally:
            writer.close()

    async def _handle(self, url: str, message: dict) -> None:
        kind = message.get("type")
        if kind == "ping":
            return
        if kind == "in_sync":
            if message.get("version") != self.status.version and self.status.version:
                raise StreamBroken(f"in_sync for {message.get('version')} but running {self.status.version}")
            self.synced.set()
            return
        if kind != "config":
            raise StreamBroken(f"unknown message type {kind!r}")
        res_version, ep_version = message["resources_version"], message["endpoints_version"]
        try:
            resources = self._apply_part("resources", res_version, message.get("resources"))
            workloads = self._apply_part("workloads", ep_version, message.get("workloads"))
        except NeedResync as exc:
            self._held.clear()             # whole parts follow
            self.resyncs += 1
            log.warning("asking for a resync: %s", exc)
            status = await self._acks.post("/push/v1/ack", {"node_id": self.node_id, "nonce": message["nonce"],
                                                            "resync": True}, self.connect_timeout)
            if status == 404:
                raise StreamBroken("the control plane no longer knows this stream")
            return
        resources = [resources[k] for k in sorted(resources)]
        workloads = list(workloads.values())
        version = message["version"]
        try:
            result = self.on_config(resources, workloads, version)
            if inspect.isawaitable(result):
                result = await result
            if not isinstance(result, ApplyResult):
                errors = list(result)
                result = ApplyResult(errors, {}, applied=not errors)
        except Exception as exc:          # a crash in the builder is a NACK, never a dead client
            result = ApplyResult([f"config callback failed: {type(exc).__name__}: {exc}"], {}, applied=False)
        errors = result.errors
        if errors:
            self.status.configs_rejected += 1
            self.status.last_error = f"NACK {version}: " + "; ".join(errors)
        if result.applied:
            if not errors:
                self.status.configs_applied += 1
            self.status.version = version
            self.status.rejected = dict(result.rejected)
            self.synced.set()
        else:
            self._held.clear()             # the running config is not what this client holds now
        ack = {"node_id": self.node_id, "nonce": message["nonce"], "version": version, "errors": errors,
               "rejected": result.rejected, "applied": result.applied}
        status = await self._acks.post("/push/v1/ack", ack, self.connect_timeout)
        if status == 404:
            raise StreamBroken("the control plane no longer knows this stream")

    def held_version(self, part: str) -> str:
        return self._held.get(part, ("", {}))[0]

    def _apply_part(self, part: str, version: str, delta: dict | None) -> dict[str, dict]:
        """The items of ``part`` at ``version``: held already (``delta`` None) or the held
        items with ``delta`` applied (in place: the lists handed to ``on_config`` are copies)."""
        held_version, items = self._held.get(part, ("", {}))
        if delta is None:
            if held_version != version:
                raise NeedResync(f"{part} version {version} was not sent and is not held here")
            return items
        base = delta.get("base") or ""
        if base and base != held_version:
            raise NeedResync(f"{part} delta builds on {base}, {held_version or 'nothing'} is held here")
        if not base:
            items = {}
        for entry in delta.get("updated") or ():
            items[entry["key"]] = entry["item"]
        for key in delta.get("removed") or ():
            items.pop(key, None)
        self._held[part] = (version, items)
        return items
